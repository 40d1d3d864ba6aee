//! Ed25519 signatures (ring) in DSSE envelopes, and the offline trust store that says which key
//! may sign what for which quadrants.
//!
//! An envelope signs `PAE(payloadType, payload)` = `"DSSEv1" SP len(type) SP type SP len(payload)
//! SP payload` (the DSSE v1 pre-authentication encoding), so a signature over one payload type
//! can never be replayed as another.
//!
//! Trust store: a directory of `<key-id>.json` documents `{"id", "public_key" (base64, 32 bytes),
//! "roles": ["plan" | "artifact" | "break-glass"], "quadrants": ["dx", …]}`. A development key
//! (quadrants dx, dg) cannot sign for px or pg.

use std::{
    fs,
    path::{Path, PathBuf},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use dataplane_common::Quadrant;
use ring::{
    rand::SystemRandom,
    signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey},
};
use serde::{Deserialize, Serialize};

/// Payload type of an artifact signature (the payload is the artifact reference).
pub const ARTIFACT_PAYLOAD_TYPE: &str = "application/vnd.quadrant.artifact.v1+text";
/// Payload type of a signed plan (the payload is the plan's canonical JSON).
pub const PLAN_PAYLOAD_TYPE: &str = "application/vnd.quadrant.plan.v1+json";
/// Payload type of a policy bundle signature (the payload is `sha256:<bundle digest>`).
pub const POLICY_BUNDLE_PAYLOAD_TYPE: &str = "application/vnd.quadrant.policy-bundle.v1+text";
/// Payload type of a dataplane signature (the payload is [`crate::loader::object_statement`]).
pub const DATAPLANE_PAYLOAD_TYPE: &str = "application/vnd.quadrant.dataplane.v1+text";
/// Payload type of a break-glass rollback authorization (canonical JSON).
pub const ROLLBACK_PAYLOAD_TYPE: &str = "application/vnd.quadrant.rollback.v1+json";

/// What a key may sign.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Execution plans.
    Plan,
    /// Artifacts.
    Artifact,
    /// Break-glass rollbacks.
    BreakGlass,
    /// Policy bundles (the key must cover every quadrant: a bundle governs all of them).
    Policy,
    /// The agent's eBPF object (every quadrant, like policy).
    Dataplane,
}

/// Errors of signing and verification; each names the key or file at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// The envelope is not valid JSON or not base64 where it must be.
    #[error("malformed signature envelope: {0}")]
    Malformed(String),
    /// The envelope signs another kind of payload.
    #[error("the envelope signs {actual:?}, expected {expected:?}")]
    WrongType {
        /// Expected payload type.
        expected: String,
        /// Found.
        actual: String,
    },
    /// No signature at all.
    #[error("the envelope carries no signature")]
    Unsigned,
    /// Signed only by keys the trust store does not hold.
    #[error("signed by unknown key(s) {0}; add the public key with `quadrant keys trust`")]
    UnknownKey(String),
    /// A trusted key's signature does not verify.
    #[error("the signature of key {0} does not verify (payload or signature altered)")]
    BadSignature(String),
    /// The key may not sign this role or quadrant.
    #[error("key {key} may not sign {role} for quadrant {quadrant} (allowed: {allowed})")]
    NotAllowed {
        /// Key id.
        key: String,
        /// The role asked for.
        role: String,
        /// The quadrant asked for.
        quadrant: String,
        /// What the key may do.
        allowed: String,
    },
    /// Reading or writing a key or trust document failed.
    #[error("{path}: {reason}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
}

/// One signature in an envelope.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Signature {
    /// Key id.
    pub keyid: String,
    /// Base64 Ed25519 signature over the PAE.
    pub sig: String,
}

/// A DSSE envelope.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Envelope {
    /// Payload type.
    pub payload_type: String,
    /// Base64 payload.
    pub payload: String,
    /// Signatures.
    pub signatures: Vec<Signature>,
}

/// DSSE v1 pre-authentication encoding.
#[must_use]
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// A private signing key.
#[derive(Debug)]
pub struct SigningKey {
    id: String,
    pair: Ed25519KeyPair,
}

/// A trust-store document.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// Key id.
    pub id: String,
    /// Base64 Ed25519 public key.
    pub public_key: String,
    /// What it may sign.
    pub roles: Vec<Role>,
    /// For which quadrants.
    pub quadrants: Vec<String>,
}

impl SigningKey {
    /// A new key; returns it with its PKCS#8 document (to store with mode 0600).
    pub fn generate(id: &str) -> Result<(Self, Vec<u8>), SignatureError> {
        let rng = SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| SignatureError::Malformed("random generator failed".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref())
            .map_err(|e| SignatureError::Malformed(e.to_string()))?;
        Ok((
            Self {
                id: id.to_owned(),
                pair,
            },
            doc.as_ref().to_vec(),
        ))
    }

    /// Loads a PKCS#8 key file; the key id is the file stem.
    pub fn load(path: &Path) -> Result<Self, SignatureError> {
        let bytes = fs::read(path).map_err(|e| SignatureError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let pair = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| SignatureError::Io {
            path: path.to_owned(),
            reason: format!("not an Ed25519 PKCS#8 key: {e}"),
        })?;
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self { id, pair })
    }

    /// Key id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The trust document for this key.
    #[must_use]
    pub fn trusted(&self, roles: Vec<Role>, quadrants: &[Quadrant]) -> TrustedKey {
        TrustedKey {
            id: self.id.clone(),
            public_key: B64.encode(self.pair.public_key().as_ref()),
            roles,
            quadrants: quadrants.iter().map(|q| q.name().to_owned()).collect(),
        }
    }

    /// Signs `payload` of `payload_type` into a one-signature envelope.
    #[must_use]
    pub fn sign(&self, payload_type: &str, payload: &[u8]) -> Envelope {
        let sig = self.pair.sign(&pae(payload_type, payload));
        Envelope {
            payload_type: payload_type.to_owned(),
            payload: B64.encode(payload),
            signatures: vec![Signature {
                keyid: self.id.clone(),
                sig: B64.encode(sig.as_ref()),
            }],
        }
    }
}

/// The offline trust store.
#[derive(Clone, Debug, Default)]
pub struct TrustStore {
    keys: Vec<TrustedKey>,
}

impl TrustStore {
    /// A store holding `keys`.
    #[must_use]
    pub fn new(keys: Vec<TrustedKey>) -> Self {
        Self { keys }
    }

    /// Reads every `*.json` document in `dir` (a missing directory is an empty store).
    pub fn load(dir: &Path) -> Result<Self, SignatureError> {
        let io = |e: std::io::Error| SignatureError::Io {
            path: dir.to_owned(),
            reason: e.to_string(),
        };
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(io(e)),
        };
        let mut keys = Vec::new();
        for entry in rd {
            let path = entry.map_err(io)?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = fs::read_to_string(&path).map_err(|e| SignatureError::Io {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let key: TrustedKey = serde_json::from_str(&text).map_err(|e| SignatureError::Io {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if key
                .quadrants
                .iter()
                .any(|q| Quadrant::from_name(q).is_none())
            {
                return Err(SignatureError::Io {
                    path,
                    reason: "quadrants must be dx, dg, px or pg".into(),
                });
            }
            keys.push(key);
        }
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Self { keys })
    }

    /// The keys.
    #[must_use]
    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// Verifies `envelope` as `payload_type`, signed by a trusted key allowed to sign `role` for
    /// `quadrant`; returns the payload and the key id that vouched for it.
    pub fn verify(
        &self,
        envelope: &Envelope,
        payload_type: &str,
        role: Role,
        quadrant: Quadrant,
    ) -> Result<(Vec<u8>, String), SignatureError> {
        if envelope.payload_type != payload_type {
            return Err(SignatureError::WrongType {
                expected: payload_type.to_owned(),
                actual: envelope.payload_type.clone(),
            });
        }
        if envelope.signatures.is_empty() {
            return Err(SignatureError::Unsigned);
        }
        let payload = B64
            .decode(&envelope.payload)
            .map_err(|e| SignatureError::Malformed(format!("payload: {e}")))?;
        let message = pae(payload_type, &payload);
        let mut refusal = None;
        let mut unknown = Vec::new();
        for s in &envelope.signatures {
            let Some(key) = self.keys.iter().find(|k| k.id == s.keyid) else {
                unknown.push(s.keyid.clone());
                continue;
            };
            let public = B64
                .decode(&key.public_key)
                .map_err(|e| SignatureError::Malformed(format!("trusted key {}: {e}", key.id)))?;
            let sig = B64
                .decode(&s.sig)
                .map_err(|e| SignatureError::Malformed(format!("signature of {}: {e}", s.keyid)))?;
            if UnparsedPublicKey::new(&ED25519, &public)
                .verify(&message, &sig)
                .is_err()
            {
                refusal.get_or_insert(SignatureError::BadSignature(key.id.clone()));
                continue;
            }
            if !key.roles.contains(&role) || !key.quadrants.iter().any(|q| q == quadrant.name()) {
                refusal.get_or_insert(SignatureError::NotAllowed {
                    key: key.id.clone(),
                    role: serde_json::to_value(role)
                        .ok()
                        .and_then(|v| v.as_str().map(ToOwned::to_owned))
                        .unwrap_or_default(),
                    quadrant: quadrant.name().to_owned(),
                    allowed: format!(
                        "{} for {}",
                        key.roles
                            .iter()
                            .filter_map(|r| serde_json::to_value(r)
                                .ok()?
                                .as_str()
                                .map(ToOwned::to_owned))
                            .collect::<Vec<_>>()
                            .join(", "),
                        key.quadrants.join(", ")
                    ),
                });
                continue;
            }
            return Ok((payload, key.id.clone()));
        }
        Err(refusal.unwrap_or_else(|| SignatureError::UnknownKey(unknown.join(", "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(keys: &[(&SigningKey, Vec<Role>, &[Quadrant])]) -> TrustStore {
        TrustStore::new(
            keys.iter()
                .map(|(k, r, q)| k.trusted(r.clone(), q))
                .collect(),
        )
    }

    #[test]
    fn pae_matches_the_dsse_specification_example() {
        // DSSE v1 spec: PAE("http://example.com/HelloWorld", "hello world").
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn signer_sets_are_per_quadrant_and_role() {
        let (dev, _) = SigningKey::generate("dev").unwrap();
        let (prod, _) = SigningKey::generate("prod").unwrap();
        let trust = store(&[
            (&dev, vec![Role::Plan], &[Quadrant::Dx, Quadrant::Dg]),
            (
                &prod,
                vec![Role::Plan, Role::Artifact],
                &[Quadrant::Px, Quadrant::Pg],
            ),
        ]);
        let plan = br#"{"quadrant":"px"}"#;
        let by_prod = prod.sign(PLAN_PAYLOAD_TYPE, plan);
        assert_eq!(
            trust
                .verify(&by_prod, PLAN_PAYLOAD_TYPE, Role::Plan, Quadrant::Px)
                .unwrap(),
            (plan.to_vec(), "prod".into())
        );
        let by_dev = dev.sign(PLAN_PAYLOAD_TYPE, plan);
        let e = trust
            .verify(&by_dev, PLAN_PAYLOAD_TYPE, Role::Plan, Quadrant::Px)
            .unwrap_err();
        assert!(matches!(e, SignatureError::NotAllowed { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("key dev may not sign plan for quadrant px (allowed: plan for dx, dg)"),
            "{e}"
        );
        assert!(
            trust
                .verify(&by_dev, PLAN_PAYLOAD_TYPE, Role::Plan, Quadrant::Dg)
                .is_ok()
        );
        let e = trust
            .verify(&by_dev, PLAN_PAYLOAD_TYPE, Role::BreakGlass, Quadrant::Dg)
            .unwrap_err();
        assert!(matches!(e, SignatureError::NotAllowed { .. }));
    }

    #[test]
    fn tampering_unknown_keys_and_type_confusion_are_refused() {
        let (k, _) = SigningKey::generate("k").unwrap();
        let (stranger, _) = SigningKey::generate("stranger").unwrap();
        let trust = store(&[(&k, vec![Role::Artifact, Role::Plan], &Quadrant::ALL)]);
        let env = k.sign(ARTIFACT_PAYLOAD_TYPE, b"app@sha256:00");
        let mut altered = env.clone();
        altered.payload = B64.encode(b"app@sha256:01");
        assert_eq!(
            trust.verify(
                &altered,
                ARTIFACT_PAYLOAD_TYPE,
                Role::Artifact,
                Quadrant::Dx
            ),
            Err(SignatureError::BadSignature("k".into()))
        );
        let mut retyped = env.clone();
        retyped.payload_type = PLAN_PAYLOAD_TYPE.into();
        assert_eq!(
            trust.verify(&retyped, PLAN_PAYLOAD_TYPE, Role::Plan, Quadrant::Dx),
            Err(SignatureError::BadSignature("k".into())),
            "a signature is bound to its payload type"
        );
        assert!(matches!(
            trust.verify(&env, PLAN_PAYLOAD_TYPE, Role::Plan, Quadrant::Dx),
            Err(SignatureError::WrongType { .. })
        ));
        let foreign = stranger.sign(ARTIFACT_PAYLOAD_TYPE, b"app@sha256:00");
        assert_eq!(
            trust.verify(
                &foreign,
                ARTIFACT_PAYLOAD_TYPE,
                Role::Artifact,
                Quadrant::Dx
            ),
            Err(SignatureError::UnknownKey("stranger".into()))
        );
        let mut unsigned = env.clone();
        unsigned.signatures.clear();
        assert_eq!(
            trust.verify(
                &unsigned,
                ARTIFACT_PAYLOAD_TYPE,
                Role::Artifact,
                Quadrant::Dx
            ),
            Err(SignatureError::Unsigned)
        );
        // A valid signature among bad ones is enough.
        let mut mixed = foreign.clone();
        mixed.signatures.extend(env.signatures.clone());
        assert!(
            trust
                .verify(&mixed, ARTIFACT_PAYLOAD_TYPE, Role::Artifact, Quadrant::Dx)
                .is_ok()
        );
    }

    #[test]
    fn keys_round_trip_through_files() {
        let dir = std::env::temp_dir().join(format!("quadrant-keys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("trust")).unwrap();
        let (k, pkcs8) = SigningKey::generate("release").unwrap();
        fs::write(dir.join("release.pk8"), pkcs8).unwrap();
        fs::write(
            dir.join("trust/release.json"),
            serde_json::to_string(&k.trusted(vec![Role::Artifact], &[Quadrant::Px])).unwrap(),
        )
        .unwrap();
        let loaded = SigningKey::load(&dir.join("release.pk8")).unwrap();
        let trust = TrustStore::load(&dir.join("trust")).unwrap();
        let env = loaded.sign(ARTIFACT_PAYLOAD_TYPE, b"x");
        assert!(
            trust
                .verify(&env, ARTIFACT_PAYLOAD_TYPE, Role::Artifact, Quadrant::Px)
                .is_ok()
        );
        fs::write(
            dir.join("trust/bad.json"),
            r#"{"id":"bad","public_key":"","roles":["plan"],"quadrants":["qa"]}"#,
        )
        .unwrap();
        assert!(
            TrustStore::load(&dir.join("trust"))
                .unwrap_err()
                .to_string()
                .contains("quadrants must be")
        );
        let _ = fs::remove_dir_all(dir);
    }
}
