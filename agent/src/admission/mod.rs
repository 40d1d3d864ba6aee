//! Admission of a workload into a quadrant, fail-closed:
//! SVID valid for that quadrant (chain to the bundle, unexpired, trust domain, SPIFFE rules) →
//! Gatekeeper-style constraints (Rego) → decision recorded in the audit log. Any error on the
//! way — no policy engine, an evaluation error, a log that cannot be written — is a rejection
//! that says so.

use std::{collections::BTreeMap, sync::Mutex, time::SystemTime};

use dataplane_common::Quadrant;
use regorus::{
    Engine,
    languages::rego::compiler::Compiler,
    rvm::{Program, RegoVM},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::warn;

use crate::{
    audit::AuditLog,
    identity::{ca::Authority, verify::verify_svid},
    policy::{Constraint, PolicyBundle, PolicyError},
};

/// Package prefix of the constraint templates.
const TEMPLATES: &str = "data.quadrant.admission.templates";

/// A violated constraint.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Violation {
    /// Constraint name.
    pub constraint: String,
    /// Why.
    pub msg: String,
}

/// The outcome of one admission.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
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

    /// Why the workload was rejected: the error, or every violated constraint.
    #[must_use]
    pub fn why(&self) -> String {
        self.error.clone().unwrap_or_else(|| {
            self.violations
                .iter()
                .map(|v| format!("{}: {}", v.constraint, v.msg))
                .collect::<Vec<_>>()
                .join("; ")
        })
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

/// Instruction budget of one template evaluation in the Rego VM (regorus' default is 25,000,
/// which a review listing a few hundred artifacts can reach).
const VM_MAX_INSTRUCTIONS: usize = 1_000_000;

/// A prepared engine with the bundle's constraints, their parameters already converted and
/// their templates compiled for the Rego VM.
#[derive(Debug)]
pub struct Prepared {
    engine: Engine,
    constraints: Vec<PreparedConstraint>,
    /// The digest of the bundle it was prepared from.
    digest: String,
}

struct PreparedConstraint {
    name: String,
    quadrants: Vec<String>,
    rule: String,
    parameters: regorus::Value,
    /// The template compiled to Rego VM bytecode, or `None` when regorus cannot compile it
    /// (then the tree-walking interpreter evaluates it: same result, slower).
    vm: Option<Box<RegoVM>>,
}

impl std::fmt::Debug for PreparedConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedConstraint")
            .field("name", &self.name)
            .field("rule", &self.rule)
            .field("compiled", &self.vm.is_some())
            .finish_non_exhaustive()
    }
}

/// Compiles `rule` of `engine`'s modules to Rego VM bytecode.
fn compile_rule(
    engine: &Engine,
    rule: &str,
) -> Result<(regorus::CompiledPolicy, std::sync::Arc<Program>), String> {
    let policy = engine
        .clone()
        .compile_with_entrypoint(&rule.into())
        .map_err(|e| e.to_string())?;
    let program = Compiler::compile_from_policy(&policy, &[rule]).map_err(|e| e.to_string())?;
    Ok((policy, program))
}

impl Prepared {
    /// Prepares the bundle for admission (local flow rules do not matter here). The whole
    /// bundle must compile: a bundle with a broken module is no basis for any decision.
    pub fn new(bundle: &PolicyBundle) -> Result<Self, PolicyError> {
        bundle.engine(&[])?;
        let engine = bundle.templates_engine()?;
        // The Rego VM keeps its own `data`: what the agent tells the templates.
        let agent_data = bundle.agent_data()?;
        // One compilation per template, shared by the constraints that use it.
        let mut compiled = BTreeMap::new();
        let constraints = bundle
            .constraints()?
            .into_iter()
            .map(|c: Constraint| -> Result<PreparedConstraint, PolicyError> {
                let parameters = regorus::Value::from_json_str(&c.parameters.to_string())
                    .map_err(|e| PolicyError::Data {
                        path: format!("constraint {}", c.name),
                        message: e.to_string(),
                    })?;
                let rule = format!("{TEMPLATES}.{}.violation", c.template);
                let program = compiled
                    .entry(rule.clone())
                    .or_insert_with(|| match compile_rule(&engine, &rule) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            warn!(rule, error = %e, "template not compiled for the Rego VM: the interpreter evaluates it");
                            None
                        }
                    })
                    .clone();
                let vm = program
                    .map(|(policy, program)| {
                        let mut vm = RegoVM::new_with_policy(policy);
                        vm.load_program(program);
                        vm.set_max_instructions(VM_MAX_INSTRUCTIONS);
                        vm.set_data(agent_data.clone())
                            .map_err(|e| PolicyError::Data {
                                path: format!("constraint {} (agent data)", c.name),
                                message: e.to_string(),
                            })?;
                        Ok::<_, PolicyError>(Box::new(vm))
                    })
                    .transpose()?;
                Ok(PreparedConstraint {
                    rule,
                    name: c.name,
                    quadrants: c.matches.quadrants,
                    parameters,
                    vm,
                })
            })
            .collect::<Result<_, PolicyError>>()?;
        Ok(Self {
            engine,
            constraints,
            digest: bundle.digest(),
        })
    }
}

/// The admission controller of a running agent.
#[derive(Debug)]
pub struct Admission {
    /// The prepared policy; `Err` holds why there is none (admission then fails closed).
    prepared: Mutex<Result<Prepared, String>>,
    /// The digest of the prepared bundle, kept apart so that reading it (`quadrant status`)
    /// never waits for an evaluation holding `prepared`.
    digest: Mutex<Option<String>>,
    audit: Result<AuditLog, String>,
    /// What templates read as `input.slo`: each quadrant's SLO summary (set by the SLO
    /// sampler; empty until it first runs).
    slo: Mutex<regorus::Value>,
    /// Decisions and their latency, and policy activations, for `/metrics`.
    pub metrics: crate::metrics::Live,
}

impl Admission {
    /// An admission controller over `prepared` (or the reason there is none) writing to `audit`.
    #[must_use]
    pub fn new(prepared: Result<Prepared, String>, audit: Result<AuditLog, String>) -> Self {
        Self {
            digest: Mutex::new(prepared.as_ref().ok().map(|p| p.digest.clone())),
            prepared: Mutex::new(prepared),
            audit,
            slo: Mutex::new(regorus::Value::new_object()),
            metrics: crate::metrics::Live::default(),
        }
    }

    /// Sets what templates read as `input.slo` (`{"px": {"budget_remaining": …, "fast_burn":
    /// …, "slow_burn": …, "breaching": […]}, …}`).
    pub fn set_slo(&self, slo: &Value) {
        *self
            .slo
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = rego_value(slo);
    }

    /// The digest of the bundle admission decides with (`None`: it refuses everything).
    #[must_use]
    pub fn bundle_digest(&self) -> Option<String> {
        self.digest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the prepared policy (or records why there is none).
    pub fn set_prepared(&self, prepared: Result<Prepared, String>) {
        let mut live = self
            .prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Under the same lock, so the digest never names another bundle than the one deciding.
        *self
            .digest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            prepared.as_ref().ok().map(|p| p.digest.clone());
        *live = prepared;
    }

    /// Appends an event other than an admission (a break-glass rollback) to the audit log.
    pub fn record(&self, kind: &str, event: Value) -> Result<u64, String> {
        match &self.audit {
            Ok(log) => log
                .append(kind, event)
                .map(|r| r.seq)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        }
    }

    /// Evaluates the constraints for `review` (no identity check, no audit record): the part
    /// the admission benchmark times.
    ///
    /// Each matching constraint's template is evaluated with `input = {review, parameters}`,
    /// as Gatekeeper does; this is the same decision as `data.quadrant.admission.decision`
    /// (checked by a unit test) without Rego's `with`, which re-evaluates the templates and
    /// costs several times more.
    pub fn evaluate(&self, review: &Value) -> Result<Vec<Violation>, String> {
        let unavailable =
            |e: &dyn std::fmt::Display| format!("admission unavailable (fail-closed): {e}");
        let mut guard = self
            .prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let prepared = guard.as_mut().map_err(|e| unavailable(e))?;
        let object = review
            .get("review")
            .ok_or("invalid review: expected {\"review\": {...}}")?;
        let quadrant = object
            .pointer("/object/quadrant")
            .and_then(Value::as_str)
            .unwrap_or_default();
        // Converted once; each constraint's input shares it.
        let review_value = rego_value(object);
        let slo = self
            .slo
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut violations = Vec::new();
        for c in &mut prepared.constraints {
            if !c.quadrants.iter().any(|q| q == quadrant) {
                continue;
            }
            let mut input = regorus::Value::new_object();
            let map = input.as_object_mut().map_err(|e| unavailable(&e))?;
            map.insert(regorus::Value::from("review"), review_value.clone());
            map.insert(regorus::Value::from("parameters"), c.parameters.clone());
            map.insert(regorus::Value::from("slo"), slo.clone());
            let failed = |e: &dyn std::fmt::Display| {
                unavailable(&format!("constraint {} ({}): {e}", c.name, c.rule))
            };
            let v = if let Some(vm) = c.vm.as_mut() {
                vm.set_input(input);
                vm.execute_entry_point_by_name(&c.rule)
                    .map_err(|e| failed(&e))?
            } else {
                prepared.engine.set_input(input);
                prepared
                    .engine
                    .eval_rule(c.rule.clone())
                    .map_err(|e| failed(&e))?
            };
            if v == regorus::Value::Undefined {
                return Err(unavailable(&format!(
                    "constraint {}: template {} is not defined",
                    c.name, c.rule
                )));
            }
            let found = v.as_set().map_err(|_| {
                unavailable(&format!("constraint {}: violation must be a set", c.name))
            })?;
            for f in found {
                let msg = f["msg"]
                    .as_string()
                    .map_or_else(|_| "violation without msg".to_owned(), ToString::to_string);
                violations.push(Violation {
                    constraint: c.name.clone(),
                    msg,
                });
            }
        }
        violations.sort_by(|a, b| (&a.constraint, &a.msg).cmp(&(&b.constraint, &b.msg)));
        Ok(violations)
    }

    /// Admits (or not) the workload described by `review` (`{"review": {"object": {...}}}`)
    /// presenting `svid` (DER chain, leaf first), and records the decision.
    pub fn admit(
        &self,
        authority: Result<&Authority, &str>,
        review: &Value,
        svid: &[Vec<u8>],
    ) -> Decision {
        let start = std::time::Instant::now();
        let decision = self.admit_recorded(authority, review, svid);
        self.metrics.admission(
            decision.allowed,
            !decision.violations.is_empty(),
            start.elapsed(),
        );
        decision
    }

    fn admit_recorded(
        &self,
        authority: Result<&Authority, &str>,
        review: &Value,
        svid: &[Vec<u8>],
    ) -> Decision {
        let mut decision = match authority {
            Ok(authority) => self.decide(authority, review, svid),
            Err(e) => Decision::reject(format!("admission unavailable (fail-closed): {e}")),
        };
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

/// `value` as a Rego value, built directly: regorus' own `Deserialize` path interns every object
/// key through a global table, which costs a review about half a microsecond more.
fn rego_value(value: &Value) -> regorus::Value {
    match value {
        Value::Null => regorus::Value::Null,
        Value::Bool(b) => regorus::Value::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => regorus::Value::from(i),
            (None, Some(u)) => regorus::Value::from(u),
            (None, None) => regorus::Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => regorus::Value::from(s.as_str()),
        Value::Array(items) => {
            regorus::Value::from(items.iter().map(rego_value).collect::<Vec<_>>())
        }
        Value::Object(map) => regorus::Value::from(
            map.iter()
                .map(|(k, v)| (regorus::Value::from(k.as_str()), rego_value(v)))
                .collect::<BTreeMap<_, _>>(),
        ),
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

#[cfg(test)]
mod tests;
