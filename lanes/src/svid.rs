//! Verification of a presented X.509-SVID against the trust domain's bundle and the SPIFFE
//! X509-SVID rules: for the TCP + mTLS lanes (both ends) and for the agent's admission.

use std::time::SystemTime;

use dataplane_common::Quadrant;
use x509_parser::{
    certificate::X509Certificate, extensions::GeneralName, prelude::FromDer as _, time::ASN1Time,
};

/// Why an SVID was refused. Each names the rule it breaks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SvidError {
    /// No certificate presented.
    #[error("no SVID presented")]
    Missing,
    /// A certificate does not parse.
    #[error("certificate {index} of the chain is not valid DER X.509: {reason}")]
    Malformed {
        /// Position in the chain (0 = leaf).
        index: usize,
        /// Parser message.
        reason: String,
    },
    /// The leaf is a CA certificate.
    #[error("the leaf is a CA certificate (an X509-SVID must have CA=false)")]
    LeafIsCa,
    /// The leaf may sign certificates or CRLs, or lacks digitalSignature.
    #[error("the leaf's key usage must be digitalSignature only, marked critical")]
    KeyUsage,
    /// Not exactly one URI SAN.
    #[error("the leaf has {0} URI SANs; an X509-SVID has exactly one")]
    UriSans(usize),
    /// The URI SAN is not a SPIFFE ID of this trust domain.
    #[error("SPIFFE ID {id} is not in trust domain {trust_domain}")]
    TrustDomain {
        /// The presented ID.
        id: String,
        /// Ours.
        trust_domain: String,
    },
    /// The SPIFFE ID path is not `/quadrant/<q>/workload/<name>`.
    #[error(
        "SPIFFE ID {0} is not a quadrant workload ID (spiffe://<td>/quadrant/<q>/workload/<name>)"
    )]
    NotQuadrantId(String),
    /// The SPIFFE ID path is not `/node/<name>`.
    #[error("SPIFFE ID {0} is not a node agent's ID (spiffe://<td>/node/<name>)")]
    NotNodeId(String),
    /// The SVID belongs to another quadrant.
    #[error("SPIFFE ID {id} belongs to quadrant {actual}, not {expected}")]
    WrongQuadrant {
        /// The presented ID.
        id: String,
        /// Its quadrant.
        actual: String,
        /// The quadrant being entered.
        expected: String,
    },
    /// Outside its validity period.
    #[error("certificate {index} of the chain is {what} (valid {not_before} to {not_after})")]
    Validity {
        /// Position in the chain.
        index: usize,
        /// "expired" or "not yet valid".
        what: &'static str,
        /// Start.
        not_before: String,
        /// End.
        not_after: String,
    },
    /// A signature in the chain does not verify, or the chain does not end at the bundle.
    #[error("the chain does not verify up to the trust bundle: {0}")]
    Chain(String),
}

/// A verified SVID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// Its quadrant.
    pub quadrant: Quadrant,
    /// Its workload name.
    pub workload: String,
}

fn parse(index: usize, der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| SvidError::Malformed {
            index,
            reason: e.to_string(),
        })
}

/// Verifies `chain` (DER, leaf first) for `trust_domain` against `roots`, at `now`. With
/// `quadrant`, the SVID must also belong to it.
pub fn verify_svid(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    trust_domain: &str,
    quadrant: Option<Quadrant>,
    now: SystemTime,
) -> Result<VerifiedSvid, SvidError> {
    let (id, path) = leaf_id(chain, trust_domain)?;
    let parts: Vec<&str> = path.split('/').collect();
    let (actual, workload) = match parts.as_slice() {
        ["quadrant", q, "workload", w] if valid_workload_name(w) => (
            Quadrant::from_name(q).ok_or_else(|| SvidError::NotQuadrantId(id.clone()))?,
            (*w).to_owned(),
        ),
        _ => return Err(SvidError::NotQuadrantId(id.clone())),
    };
    if let Some(expected) = quadrant
        && expected != actual
    {
        return Err(SvidError::WrongQuadrant {
            id: id.clone(),
            actual: actual.name().to_owned(),
            expected: expected.name().to_owned(),
        });
    }

    check_chain(chain, roots, now)?;
    Ok(VerifiedSvid {
        spiffe_id: id,
        quadrant: actual,
        workload,
    })
}

/// Verifies `chain` as the SVID of a node's agent (`spiffe://<td>/node/<name>`, the peer links
/// between nodes); returns its SPIFFE ID.
pub fn verify_node_svid(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    trust_domain: &str,
    now: SystemTime,
) -> Result<String, SvidError> {
    let (id, path) = leaf_id(chain, trust_domain)?;
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["node", name] if valid_workload_name(name) => {}
        _ => return Err(SvidError::NotNodeId(id)),
    }
    check_chain(chain, roots, now)?;
    Ok(id)
}

/// The leaf's checks common to every SVID (not a CA, signing only, one URI SAN in
/// `trust_domain`); its SPIFFE ID and the ID's path.
fn leaf_id(chain: &[Vec<u8>], trust_domain: &str) -> Result<(String, String), SvidError> {
    let first = chain.first().ok_or(SvidError::Missing)?;
    let leaf = parse(0, first)?;
    if leaf
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(SvidError::LeafIsCa);
    }
    match leaf.key_usage().ok().flatten() {
        Some(ku)
            if ku.critical
                && ku.value.digital_signature()
                && !ku.value.key_cert_sign()
                && !ku.value.crl_sign() => {}
        _ => return Err(SvidError::KeyUsage),
    }
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| {
                    if let GeneralName::URI(u) = n {
                        Some((*u).to_owned())
                    } else {
                        None
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let [id] = uris.as_slice() else {
        return Err(SvidError::UriSans(uris.len()));
    };
    let Some(path) = id.strip_prefix(&format!("spiffe://{trust_domain}/")) else {
        return Err(SvidError::TrustDomain {
            id: id.clone(),
            trust_domain: trust_domain.to_owned(),
        });
    };
    Ok((id.clone(), path.to_owned()))
}

/// Validity of every certificate at `now`, each signed by the next, the last by a root.
fn check_chain(chain: &[Vec<u8>], roots: &[Vec<u8>], now: SystemTime) -> Result<(), SvidError> {
    let now = ASN1Time::from_timestamp(
        i64::try_from(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
        .unwrap_or(i64::MAX),
    )
    .map_err(|e| SvidError::Chain(e.to_string()))?;
    let certs: Vec<X509Certificate<'_>> = chain
        .iter()
        .enumerate()
        .map(|(i, der)| parse(i, der))
        .collect::<Result<_, _>>()?;
    for (index, c) in certs.iter().enumerate() {
        let v = c.validity();
        let what = if now < v.not_before {
            "not yet valid"
        } else if now > v.not_after {
            "expired"
        } else {
            continue;
        };
        return Err(SvidError::Validity {
            index,
            what,
            not_before: v.not_before.to_string(),
            not_after: v.not_after.to_string(),
        });
    }
    for (i, pair) in certs.windows(2).enumerate() {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .map_err(|e| {
                SvidError::Chain(format!(
                    "certificate {i} is not signed by certificate {}: {e}",
                    i + 1
                ))
            })?;
    }
    let last = certs.last().ok_or(SvidError::Missing)?;
    let anchored = roots.iter().any(|r| {
        X509Certificate::from_der(r)
            .is_ok_and(|(_, root)| last.verify_signature(Some(root.public_key())).is_ok())
    });
    if !anchored {
        return Err(SvidError::Chain(
            "not signed by any certificate of the trust bundle".into(),
        ));
    }
    Ok(())
}

/// Whether `name` is a valid workload name: 1-64 characters of `a-z`, `0-9`, `-`, `_`, `.`, not
/// `.` or `..` (it becomes a cgroup directory and the last segment of a SPIFFE ID).
#[must_use]
pub fn valid_workload_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}
