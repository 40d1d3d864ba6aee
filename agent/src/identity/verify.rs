//! Verification of a presented X.509-SVID against the trust domain's bundle and the SPIFFE
//! X509-SVID rules, for admission (and later mTLS peers).

use std::time::SystemTime;

use dataplane_common::Quadrant;
use x509_parser::{
    certificate::X509Certificate, extensions::GeneralName, prelude::FromDer as _, time::ASN1Time,
};

use super::attest::valid_workload_name;

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
        spiffe_id: id.clone(),
        quadrant: actual,
        workload,
    })
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

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
        PKCS_ECDSA_P256_SHA256, SanType,
    };

    use super::*;
    use crate::identity::ca::Authority;

    const TD: &str = "quadrant.local";
    const PX_API: &str = "spiffe://quadrant.local/quadrant/px/workload/api";

    fn authority(name: &str) -> (Authority, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("quadrant-verify-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (Authority::load_or_create(&dir, TD, None).unwrap(), dir)
    }

    fn leaf(uris: &[&str], ca: bool, usages: Vec<KeyUsagePurpose>) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "forged");
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).to_owned().try_into().unwrap()))
            .collect();
        p.is_ca = if ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.key_usages = usages;
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    #[expect(clippy::too_many_lines, reason = "one case table")]
    fn forged_and_misused_svids_are_refused_by_rule() {
        let (ca, dir) = authority("matrix");
        let roots = ca.roots().to_vec();
        let now = SystemTime::now();
        let verify = |chain: &[Vec<u8>], q| verify_svid(chain, &roots, TD, q, now);

        let good = ca.mint_x509(PX_API, Duration::from_hours(1)).unwrap();
        let ok = verify(&good.chain, Some(Quadrant::Px)).unwrap();
        assert_eq!(
            (ok.spiffe_id.as_str(), ok.quadrant, ok.workload.as_str()),
            (PX_API, Quadrant::Px, "api")
        );

        let ds = || vec![KeyUsagePurpose::DigitalSignature];
        let self_signed = leaf(&[PX_API], false, ds());
        let wrong_td = ca
            .mint_x509(
                "spiffe://evil.example/quadrant/px/workload/api",
                Duration::from_hours(1),
            )
            .unwrap();
        let expired = ca.mint_x509(PX_API, Duration::ZERO).unwrap();
        let dx_id = ca
            .mint_x509(
                "spiffe://quadrant.local/quadrant/dx/workload/api",
                Duration::from_hours(1),
            )
            .unwrap();
        let not_quadrant = ca
            .mint_x509(
                "spiffe://quadrant.local/ns/default/sa/api",
                Duration::from_hours(1),
            )
            .unwrap();
        let cases: Vec<(&str, Vec<Vec<u8>>, SvidError)> = vec![
            ("empty chain", vec![], SvidError::Missing),
            (
                "garbage",
                vec![b"not a certificate".to_vec()],
                SvidError::Malformed {
                    index: 0,
                    reason: String::new(),
                },
            ),
            (
                "self-signed",
                vec![self_signed],
                SvidError::Chain(String::new()),
            ),
            (
                "two URI SANs",
                vec![leaf(
                    &[PX_API, "spiffe://quadrant.local/quadrant/px/workload/b"],
                    false,
                    ds(),
                )],
                SvidError::UriSans(2),
            ),
            (
                "no URI SAN",
                vec![leaf(&[], false, ds())],
                SvidError::UriSans(0),
            ),
            (
                "CA certificate as leaf",
                vec![leaf(
                    &[PX_API],
                    true,
                    vec![
                        KeyUsagePurpose::DigitalSignature,
                        KeyUsagePurpose::KeyCertSign,
                    ],
                )],
                SvidError::LeafIsCa,
            ),
            (
                "may sign certificates",
                vec![leaf(
                    &[PX_API],
                    false,
                    vec![
                        KeyUsagePurpose::DigitalSignature,
                        KeyUsagePurpose::KeyCertSign,
                    ],
                )],
                SvidError::KeyUsage,
            ),
            (
                "wrong trust domain",
                wrong_td.chain,
                SvidError::TrustDomain {
                    id: String::new(),
                    trust_domain: String::new(),
                },
            ),
            (
                "expired",
                expired.chain,
                SvidError::Validity {
                    index: 0,
                    what: "expired",
                    not_before: String::new(),
                    not_after: String::new(),
                },
            ),
            (
                "other quadrant's ID",
                dx_id.chain,
                SvidError::WrongQuadrant {
                    id: String::new(),
                    actual: String::new(),
                    expected: String::new(),
                },
            ),
            (
                "not a quadrant ID",
                not_quadrant.chain,
                SvidError::NotQuadrantId(String::new()),
            ),
        ];
        for (what, chain, expected) in cases {
            // "expired" needs a clock past the SVID's (zero-length) lifetime plus the backdating.
            let at = if what == "expired" {
                now + Duration::from_mins(2)
            } else {
                now
            };
            let err = verify_svid(&chain, &roots, TD, Some(Quadrant::Px), at).unwrap_err();
            assert_eq!(
                std::mem::discriminant(&err),
                std::mem::discriminant(&expected),
                "{what}: {err}"
            );
        }
        // An SVID of another agent's CA (same trust domain name) does not chain to our bundle.
        let (other, other_dir) = authority("other");
        let foreign = other.mint_x509(PX_API, Duration::from_hours(1)).unwrap();
        assert!(matches!(
            verify(&foreign.chain, Some(Quadrant::Px)),
            Err(SvidError::Chain(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other_dir);
    }
}
