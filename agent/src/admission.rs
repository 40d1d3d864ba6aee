//! Admission of a workload into a quadrant, fail-closed:
//! SVID valid for that quadrant (chain to the bundle, unexpired, trust domain, SPIFFE rules) →
//! Gatekeeper-style constraints (Rego) → decision recorded in the audit log. Any error on the
//! way — no policy engine, an evaluation error, a log that cannot be written — is a rejection
//! that says so.

use std::{sync::Mutex, time::SystemTime};

use dataplane_common::Quadrant;
use regorus::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    audit::AuditLog,
    identity::{ca::Authority, verify::verify_svid},
    policy::ADMISSION_DECISION,
};

/// A violated constraint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Violation {
    /// Constraint name.
    pub constraint: String,
    /// Why.
    pub msg: String,
}

/// The outcome of one admission.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Decision {
    /// Admitted or not.
    pub allowed: bool,
    /// The verified SPIFFE ID, once the SVID checked out.
    pub spiffe_id: Option<String>,
    /// Constraints the workload violates.
    pub violations: Vec<Violation>,
    /// A rejection before or outside the constraints (identity, availability).
    pub error: Option<String>,
    /// Sequence number of the audit record.
    pub audit_seq: Option<u64>,
}

impl Decision {
    fn reject(error: impl Into<String>) -> Self {
        Self {
            allowed: false,
            spiffe_id: None,
            violations: vec![],
            error: Some(error.into()),
            audit_seq: None,
        }
    }

    /// Replaces the error with `hint` when the SVID could not even be read (the decision
    /// itself, a rejection, is already recorded).
    #[must_use]
    pub fn with_error_hint(mut self, hint: &str) -> Self {
        if self
            .error
            .as_deref()
            .is_some_and(|e| e.contains("no SVID presented"))
        {
            self.error = Some(format!("identity: {hint}"));
        }
        self
    }
}

/// The admission controller of a running agent.
#[derive(Debug)]
pub struct Admission {
    /// The prepared policy engine; `Err` holds why there is none (admission then fails closed).
    engine: Mutex<Result<Engine, String>>,
    audit: Result<AuditLog, String>,
}

impl Admission {
    /// An admission controller over `engine` (or the reason there is none) writing to `audit`.
    #[must_use]
    pub fn new(engine: Result<Engine, String>, audit: Result<AuditLog, String>) -> Self {
        Self {
            engine: Mutex::new(engine),
            audit,
        }
    }

    /// Replaces the engine (after a policy reload).
    pub fn set_engine(&self, engine: Result<Engine, String>) {
        *self
            .engine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = engine;
    }

    /// Evaluates the constraints for `review` (no identity check, no audit record): the part
    /// the admission benchmark times.
    pub fn evaluate(&self, review: &Value) -> Result<Vec<Violation>, String> {
        let mut guard = self
            .engine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let engine = guard
            .as_mut()
            .map_err(|e| format!("admission unavailable (fail-closed): {e}"))?;
        let input = regorus::Value::from_json_str(&review.to_string())
            .map_err(|e| format!("invalid review: {e}"))?;
        engine.set_input(input);
        let v = engine
            .eval_rule(ADMISSION_DECISION.to_owned())
            .map_err(|e| {
                format!("admission unavailable (fail-closed): policy evaluation failed: {e}")
            })?;
        let v = serde_json::to_value(&v).map_err(|e| e.to_string())?;
        let violations = v.get("violations").cloned().unwrap_or(Value::Array(vec![]));
        serde_json::from_value(violations)
            .map_err(|e| format!("admission unavailable (fail-closed): bad decision document: {e}"))
    }

    /// Admits (or not) the workload described by `review` (`{"review": {"object": {...}}}`)
    /// presenting `svid` (DER chain, leaf first), and records the decision.
    pub fn admit(&self, authority: &Authority, review: &Value, svid: &[Vec<u8>]) -> Decision {
        let mut decision = self.decide(authority, review, svid);
        let object = review.pointer("/review/object");
        let event = json!({
            "quadrant": object.and_then(|o| o.get("quadrant")),
            "workload": object.and_then(|o| o.get("workload")),
            "spiffe_id": decision.spiffe_id,
            "allowed": decision.allowed,
            "violations": decision.violations,
            "error": decision.error,
        });
        match &self.audit {
            Ok(log) => match log.append("admission", event) {
                Ok(record) => decision.audit_seq = Some(record.seq),
                Err(e) => {
                    return Decision::reject(format!(
                        "cannot record the decision (fail-closed): {e}"
                    ));
                }
            },
            Err(e) => {
                return Decision::reject(format!("cannot record the decision (fail-closed): {e}"));
            }
        }
        decision
    }

    fn decide(&self, authority: &Authority, review: &Value, svid: &[Vec<u8>]) -> Decision {
        let Some(object) = review.pointer("/review/object").and_then(Value::as_object) else {
            return Decision::reject("invalid review: expected {\"review\": {\"object\": {...}}}");
        };
        let Some(quadrant) = object
            .get("quadrant")
            .and_then(Value::as_str)
            .and_then(Quadrant::from_name)
        else {
            return Decision::reject(
                "invalid review: review.object.quadrant must be dx, dg, px or pg",
            );
        };
        let verified = match verify_svid(
            svid,
            authority.roots(),
            authority.trust_domain(),
            Some(quadrant),
            SystemTime::now(),
        ) {
            Ok(v) => v,
            Err(e) => return Decision::reject(format!("identity: {e}")),
        };
        if let Some(w) = object.get("workload").and_then(Value::as_str)
            && w != verified.workload
        {
            let mut d = Decision::reject(format!(
                "identity: the review names workload {w:?} but the SVID is {}",
                verified.spiffe_id
            ));
            d.spiffe_id = Some(verified.spiffe_id);
            return d;
        }
        // The identity the constraints see is the verified one, never a claim in the review.
        let mut object = object.clone();
        object.insert(
            "spiffe_id".into(),
            Value::String(verified.spiffe_id.clone()),
        );
        object.insert("workload".into(), Value::String(verified.workload.clone()));
        let review = json!({ "review": { "object": object } });
        match self.evaluate(&review) {
            Ok(violations) => Decision {
                allowed: violations.is_empty(),
                spiffe_id: Some(verified.spiffe_id),
                violations,
                error: None,
                audit_seq: None,
            },
            Err(e) => {
                let mut d = Decision::reject(e);
                d.spiffe_id = Some(verified.spiffe_id);
                d
            }
        }
    }
}

/// Parses a PEM chain (leaf first) into DER certificates.
pub fn pem_chain(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let blocks = pem::parse_many(text.as_bytes()).map_err(|e| format!("invalid PEM: {e}"))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.contents().to_vec())
        .collect();
    if certs.is_empty() {
        return Err("no CERTIFICATE block in the SVID file".into());
    }
    Ok(certs)
}
