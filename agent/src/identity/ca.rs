//! The embedded certificate authority of a trust domain: X.509-SVIDs (ECDSA P-256, rcgen + ring),
//! JWT-SVIDs (ES256, ring) and the trust bundles.
//!
//! The CA key and the JWT signing key live in the configured CA directory (mode 0700, keys 0600)
//! and are reused across restarts. With an upstream CA (files, like SPIRE's `disk`
//! `UpstreamAuthority`) the agent's CA certificate is an intermediate signed by it at start-up,
//! and the bundle holds the upstream certificate instead of the agent's own.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use ring::{
    rand::{SecureRandom as _, SystemRandom},
    signature::{self, EcdsaKeyPair, KeyPair as _},
};
use serde_json::{Map, Value, json};

/// How long the self-signed CA certificate is valid.
const CA_VALIDITY: Duration = Duration::from_hours(10 * 365 * 24);
/// Back-dating of every certificate, for clocks that are a little behind.
const BACKDATE: Duration = Duration::from_mins(1);
const CA_KEY_FILE: &str = "ca-key.pem";
const CA_CERT_FILE: &str = "ca-cert.pem";
const JWT_KEY_FILE: &str = "jwt-key.pk8";

/// Errors of the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A key or certificate file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A stored or upstream key or certificate is invalid.
    #[error("{path}: {reason}")]
    BadMaterial {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("cannot issue a certificate for {id}: {source}")]
    Issue {
        /// The SPIFFE ID being issued.
        id: String,
        /// Cause.
        source: rcgen::Error,
    },
    /// A JWT-SVID did not validate.
    #[error("invalid JWT-SVID: {0}")]
    InvalidJwt(String),
    /// The system random generator failed.
    #[error("random generator failed")]
    Random,
}

/// An upstream CA read from files.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// PEM certificate of the upstream CA.
    pub cert: PathBuf,
    /// PEM PKCS#8 private key of the upstream CA.
    pub key: PathBuf,
}

/// A freshly issued X.509-SVID.
#[derive(Clone, Debug)]
pub struct X509Svid {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// DER certificates, leaf first, then the agent CA when it is an intermediate.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key.
    pub key_pkcs8: Vec<u8>,
    /// Expiry.
    pub not_after: SystemTime,
}

/// The trust domain's authority.
pub struct Authority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// Certificates after the leaf in every chain (the agent CA when it is an intermediate).
    intermediates: Vec<Vec<u8>>,
    /// The trust bundle (DER roots).
    roots: Vec<Vec<u8>>,
    jwt_key: EcdsaKeyPair,
    jwt_kid: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("jwt_kid", &self.jwt_kid)
            .finish_non_exhaustive()
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CaError + 'a {
    move |source| CaError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn bad(path: &Path, reason: impl std::fmt::Display) -> CaError {
    CaError::BadMaterial {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Writes `data` to `path` with mode 0600, atomically (temporary file, fsync, rename).
fn write_secret(path: &Path, data: &[u8]) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("cannot create", &tmp))?;
    f.write_all(data).map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io("cannot rename", path))
}

fn pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let text = fs::read_to_string(path).map_err(io("cannot read", path))?;
    let certs: Vec<Vec<u8>> = pem::parse_many(text.as_bytes())
        .map_err(|e| bad(path, e))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.contents().to_vec())
        .collect();
    if certs.is_empty() {
        return Err(bad(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Seconds since the epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Authority {
    /// Loads the CA and JWT keys from `dir`, creating them on first use, and builds the CA
    /// certificate (self-signed, or signed by `upstream`).
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        upstream: Option<&Upstream>,
    ) -> Result<Self, CaError> {
        fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io("cannot restrict", dir))?;
        let key_path = dir.join(CA_KEY_FILE);
        let ca_key = if key_path.exists() {
            let pem = fs::read_to_string(&key_path).map_err(io("cannot read", &key_path))?;
            KeyPair::from_pem(&pem).map_err(|e| bad(&key_path, e))?
        } else {
            let k =
                KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| bad(&key_path, e))?;
            write_secret(&key_path, k.serialize_pem().as_bytes())?;
            k
        };

        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| bad(dir, e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "quadrant agent CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))?];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_VALIDITY).into();

        let cert_path = dir.join(CA_CERT_FILE);
        let (intermediates, roots) = match upstream {
            None => {
                // Reuse the stored self-signed certificate so the bundle stays stable.
                let der = if cert_path.exists() {
                    pem_certs(&cert_path)?.remove(0)
                } else {
                    let cert = params
                        .self_signed(&ca_key)
                        .map_err(|e| bad(&cert_path, e))?;
                    write_secret(&cert_path, cert.pem().as_bytes())?;
                    cert.der().to_vec()
                };
                (vec![], vec![der])
            }
            Some(up) => {
                let up_certs = pem_certs(&up.cert)?;
                let up_key_pem = fs::read_to_string(&up.key).map_err(io("cannot read", &up.key))?;
                let up_key = KeyPair::from_pem(&up_key_pem).map_err(|e| bad(&up.key, e))?;
                let up_issuer = Issuer::from_ca_cert_der(&up_certs[0].clone().into(), up_key)
                    .map_err(|e| bad(&up.cert, e))?;
                let cert = params
                    .signed_by(&ca_key, &up_issuer)
                    .map_err(|e| bad(&up.cert, e))?;
                write_secret(&cert_path, cert.pem().as_bytes())?;
                (vec![cert.der().to_vec()], up_certs)
            }
        };
        let issuer = Issuer::new(params, ca_key);

        let rng = SystemRandom::new();
        let jwt_path = dir.join(JWT_KEY_FILE);
        let pkcs8 = if jwt_path.exists() {
            fs::read(&jwt_path).map_err(io("cannot read", &jwt_path))?
        } else {
            let doc =
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| CaError::Random)?;
            write_secret(&jwt_path, doc.as_ref())?;
            doc.as_ref().to_vec()
        };
        let jwt_key =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
                .map_err(|e| bad(&jwt_path, e))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, jwt_key.public_key().as_ref());
        let jwt_kid = B64.encode(&digest.as_ref()[..12]);
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            intermediates,
            roots,
            jwt_key,
            jwt_kid,
            rng,
        })
    }

    /// The trust domain name.
    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust domain's SPIFFE ID (`spiffe://<td>`), the key of bundle maps.
    #[must_use]
    pub fn trust_domain_id(&self) -> String {
        format!("spiffe://{}", self.trust_domain)
    }

    /// The X.509 bundle: DER root certificates.
    #[must_use]
    pub fn roots(&self) -> &[Vec<u8>] {
        &self.roots
    }

    /// Issues an X.509-SVID for `spiffe_id` valid for `ttl`, following the SPIFFE X509-SVID
    /// profile: CA=false, critical key usage digitalSignature only, exactly one URI SAN.
    pub fn mint_x509(&self, spiffe_id: &str, ttl: Duration) -> Result<X509Svid, CaError> {
        let issue = |source| CaError::Issue {
            id: spiffe_id.to_owned(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(issue)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(issue)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        dn.push(
            DnType::CommonName,
            spiffe_id.rsplit('/').next().unwrap_or(spiffe_id),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![uri_san(spiffe_id)?];
        params.use_authority_key_identifier_extension = true;
        let mut serial = [0u8; 16];
        self.rng.fill(&mut serial).map_err(|_| CaError::Random)?;
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = SystemTime::now();
        let not_after = now + ttl;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer).map_err(issue)?;
        let mut chain = vec![cert.der().to_vec()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(X509Svid {
            spiffe_id: spiffe_id.to_owned(),
            chain,
            key_pkcs8: key.serialize_der(),
            not_after,
        })
    }

    /// Issues a JWT-SVID (ES256) for `spiffe_id` and `audiences`, valid for `ttl`.
    pub fn mint_jwt(
        &self,
        spiffe_id: &str,
        audiences: &[String],
        ttl: Duration,
    ) -> Result<String, CaError> {
        let now = unix_now();
        let header = json!({ "alg": "ES256", "kid": self.jwt_kid, "typ": "JWT" });
        let claims =
            json!({ "sub": spiffe_id, "aud": audiences, "iat": now, "exp": now + ttl.as_secs() });
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self
            .jwt_key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| CaError::Random)?;
        Ok(format!("{signing_input}.{}", B64.encode(sig.as_ref())))
    }

    /// Validates a JWT-SVID of this trust domain for `audience`; returns its SPIFFE ID and claims.
    pub fn validate_jwt(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(String, Map<String, Value>), CaError> {
        let invalid = |m: &str| CaError::InvalidJwt(m.to_owned());
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "not a JWS compact serialization (three dot-separated parts)",
            ));
        };
        let header: Value = serde_json::from_slice(
            &B64.decode(h)
                .map_err(|_| invalid("header is not base64url"))?,
        )
        .map_err(|_| invalid("header is not JSON"))?;
        if header["alg"] != "ES256" {
            return Err(invalid("algorithm must be ES256"));
        }
        if header["kid"] != self.jwt_kid.as_str() {
            return Err(invalid(
                "signed by a key this trust domain does not have (kid)",
            ));
        }
        let sig = B64
            .decode(s)
            .map_err(|_| invalid("signature is not base64url"))?;
        let public = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.jwt_key.public_key().as_ref(),
        );
        public
            .verify(format!("{h}.{c}").as_bytes(), &sig)
            .map_err(|_| invalid("signature does not verify"))?;
        let claims: Map<String, Value> = serde_json::from_slice(
            &B64.decode(c)
                .map_err(|_| invalid("claims are not base64url"))?,
        )
        .map_err(|_| invalid("claims are not a JSON object"))?;
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| invalid("no exp claim"))?;
        if exp <= unix_now() {
            return Err(invalid("expired"));
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(a)) => a.iter().any(|v| v == audience),
            _ => false,
        };
        if !aud_ok {
            return Err(invalid(&format!(
                "audience {audience:?} not in the aud claim"
            )));
        }
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("no sub claim"))?;
        if !sub.starts_with(&format!("{}/", self.trust_domain_id())) {
            return Err(invalid("sub is not a SPIFFE ID of this trust domain"));
        }
        Ok((sub.to_owned(), claims))
    }

    /// The JWT bundle as a JWKS document.
    #[must_use]
    pub fn jwks(&self) -> Vec<u8> {
        let point = self.jwt_key.public_key().as_ref();
        // Uncompressed SEC1 point: 0x04 || x (32) || y (32).
        let (x, y) = (&point[1..33], &point[33..65]);
        json!({
            "keys": [{ "kty": "EC", "crv": "P-256", "x": B64.encode(x), "y": B64.encode(y), "kid": self.jwt_kid, "use": "jwt-svid" }],
        })
        .to_string()
        .into_bytes()
    }
}

fn uri_san(uri: &str) -> Result<SanType, CaError> {
    let ia5 = uri
        .to_owned()
        .try_into()
        .map_err(|e: rcgen::Error| CaError::Issue {
            id: uri.to_owned(),
            source: e,
        })?;
    Ok(SanType::URI(ia5))
}

#[cfg(test)]
mod tests {
    use x509_parser::{
        certificate::X509Certificate, extensions::GeneralName, prelude::FromDer as _,
    };

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("quadrant-ca-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn svid_follows_the_x509_svid_profile_and_chains_to_the_bundle() {
        let dir = temp_dir("profile");
        let ca = Authority::load_or_create(&dir, "example.org", None).unwrap();
        let id = "spiffe://example.org/quadrant/px/workload/api";
        let svid = ca.mint_x509(id, Duration::from_hours(1)).unwrap();
        assert_eq!(svid.chain.len(), 1);
        let (_, leaf) = X509Certificate::from_der(&svid.chain[0]).unwrap();
        let bc = leaf.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let ku = leaf.key_usage().unwrap().unwrap();
        assert!(
            ku.critical
                && ku.value.digital_signature()
                && !ku.value.key_cert_sign()
                && !ku.value.crl_sign()
        );
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| {
                if let GeneralName::URI(u) = n {
                    Some(*u)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(uris, [id]);
        assert_eq!(san.value.general_names.len(), 1);
        assert!(!leaf.subject().as_raw().is_empty());
        let (_, root) = X509Certificate::from_der(&ca.roots()[0]).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert!(root.basic_constraints().unwrap().unwrap().value.ca);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_are_private_and_reused_across_restarts() {
        let dir = temp_dir("reuse");
        let a = Authority::load_or_create(&dir, "example.org", None).unwrap();
        let mode = fs::metadata(dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::metadata(dir.join(JWT_KEY_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let b = Authority::load_or_create(&dir, "example.org", None).unwrap();
        assert_eq!(a.roots(), b.roots(), "the bundle survives a restart");
        let token = a
            .mint_jwt(
                "spiffe://example.org/quadrant/dx/workload/w",
                &["db".into()],
                Duration::from_mins(1),
            )
            .unwrap();
        assert!(
            b.validate_jwt(&token, "db").is_ok(),
            "tokens survive a restart"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn upstream_makes_the_agent_ca_an_intermediate() {
        let dir = temp_dir("upstream");
        let up_dir = temp_dir("upstream-root");
        fs::create_dir_all(&up_dir).unwrap();
        let up_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.distinguished_name
            .push(DnType::CommonName, "upstream root");
        let up_cert = p.self_signed(&up_key).unwrap();
        fs::write(up_dir.join("root.pem"), up_cert.pem()).unwrap();
        fs::write(up_dir.join("root.key"), up_key.serialize_pem()).unwrap();
        let up = Upstream {
            cert: up_dir.join("root.pem"),
            key: up_dir.join("root.key"),
        };
        let ca = Authority::load_or_create(&dir, "example.org", Some(&up)).unwrap();
        assert_eq!(ca.roots(), [up_cert.der().to_vec()]);
        let svid = ca
            .mint_x509(
                "spiffe://example.org/quadrant/dx/workload/w",
                Duration::from_mins(1),
            )
            .unwrap();
        assert_eq!(svid.chain.len(), 2, "leaf + agent intermediate");
        let (_, leaf) = X509Certificate::from_der(&svid.chain[0]).unwrap();
        let (_, mid) = X509Certificate::from_der(&svid.chain[1]).unwrap();
        let (_, root) = X509Certificate::from_der(&ca.roots()[0]).unwrap();
        leaf.verify_signature(Some(mid.public_key())).unwrap();
        mid.verify_signature(Some(root.public_key())).unwrap();
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&up_dir);
    }

    #[test]
    fn jwt_validation_rejects_what_it_must() {
        let dir = temp_dir("jwt");
        let ca = Authority::load_or_create(&dir, "example.org", None).unwrap();
        let id = "spiffe://example.org/quadrant/dx/workload/w";
        let token = ca
            .mint_jwt(id, &["db".into(), "cache".into()], Duration::from_mins(1))
            .unwrap();
        let (sub, claims) = ca.validate_jwt(&token, "cache").unwrap();
        assert_eq!(sub, id);
        assert_eq!(claims["sub"], id);
        let err = |t: &str, aud: &str| ca.validate_jwt(t, aud).unwrap_err().to_string();
        assert!(err(&token, "web").contains("audience"));
        assert!(err("a.b", "db").contains("three"));
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = B64.encode(json!({"sub": "spiffe://example.org/quadrant/px/workload/w", "aud": ["db"], "exp": unix_now() + 60}).to_string());
        parts[1] = &forged;
        assert!(err(&parts.join("."), "db").contains("signature"));
        let expired = ca.mint_jwt(id, &["db".into()], Duration::ZERO).unwrap();
        assert!(err(&expired, "db").contains("expired"));
        let other_dir = temp_dir("jwt-other");
        let other = Authority::load_or_create(&other_dir, "example.org", None).unwrap();
        let foreign = other
            .mint_jwt(id, &["db".into()], Duration::from_mins(1))
            .unwrap();
        assert!(err(&foreign, "db").contains("kid"));
        let other_td_dir = temp_dir("jwt-td");
        let _ = fs::remove_dir_all(&other_dir);
        let jwks: Value = serde_json::from_slice(&ca.jwks()).unwrap();
        assert_eq!(jwks["keys"][0]["crv"], "P-256");
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&other_td_dir);
    }
}
