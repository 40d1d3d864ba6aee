//! Execution plans: typed (serde + schemars), validated against their JSON Schema before
//! anything else, signed in DSSE envelopes over their canonical bytes, and checked against the
//! per-quadrant signer sets of the trust store.
//!
//! The schema is generated from [`Plan`] and published as `manifests/schemas/plan.schema.json`
//! (a unit test keeps the file in step with the types).

use std::collections::BTreeMap;

use dataplane_common::Quadrant;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::signing::{
    Envelope, PLAN_PAYLOAD_TYPE, ROLLBACK_PAYLOAD_TYPE, Role, SignatureError, SigningKey,
    TrustStore,
};

/// The only plan API version.
pub const API_VERSION: &str = "quadrant/v1";
/// Largest plan document accepted, in bytes.
pub const MAX_PLAN_BYTES: usize = 256 * 1024;

/// Quadrant names as plans spell them.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QuadrantName {
    /// Development.
    Dx,
    /// Development gateway.
    Dg,
    /// Production.
    Px,
    /// Production gateway.
    Pg,
}

impl From<QuadrantName> for Quadrant {
    fn from(q: QuadrantName) -> Self {
        match q {
            QuadrantName::Dx => Self::Dx,
            QuadrantName::Dg => Self::Dg,
            QuadrantName::Px => Self::Px,
            QuadrantName::Pg => Self::Pg,
        }
    }
}

/// Resource limits of the workload's cgroup.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in thousandths of a core.
    #[schemars(range(min = 1, max = 64_000))]
    pub cpu_millis: u32,
    /// Memory limit in bytes (1 MiB to 64 GiB).
    #[schemars(range(min = 1_048_576, max = 68_719_476_736_u64))]
    pub memory_bytes: u64,
    /// Maximum number of processes and threads.
    #[schemars(range(min = 1, max = 32_768))]
    pub pids: u32,
}

/// Lane transports a plan may require.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Shared memory on the same host.
    Shm,
    /// Unix sockets.
    Uds,
    /// TCP (every TCP lane is mutually authenticated with SVIDs, so this is `tcp_mtls`).
    Tcp,
    /// TCP with mutual TLS (SVIDs).
    TcpMtls,
}

/// A lane the workload needs. When a plan declares lanes, the workload may open lanes only to
/// those services, and over the transport given here.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LaneRequirement {
    /// The service: `<quadrant>/<service>`.
    #[schemars(regex(pattern = r"^(dx|dg|px|pg)/[a-z0-9][a-z0-9._-]{0,63}$"))]
    pub peer: String,
    /// A required transport; the agent chooses when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
}

/// Service-level objectives of the lane service the workload offers: each becomes an SLO of the
/// agent (`quadrant slo`) while the workload runs, counted against its quadrant's error budget.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// The lane service the objectives are about (default: the workload's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9._-]{0,62}$"))]
    pub service: Option<String>,
    /// The SLOs' rolling window, `<n>s|m|h|d|w` between 1m and 366d (default 28d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}[smhdw]$"))]
    pub window: Option<String>,
    /// Target p99 latency of the service's lane round trips, milliseconds (a latency SLO: 99 %
    /// of answered requests within it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001, max = 60_000.0))]
    pub p99_latency_ms: Option<f64>,
    /// Target availability, a fraction (0.995 = 99.5 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub availability: Option<f64>,
}

/// The circuit breaker the agent computes for the workload's lane service, while it runs: the
/// fields given replace the configuration's `breakers` values for that service alone.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanBreaker {
    /// The lane service (default: the workload's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9._-]{0,62}$"))]
    pub service: Option<String>,
    /// Share of the window's calls that failed which opens the breaker (0: not judged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub failure_ratio: Option<f64>,
    /// A round trip longer than this is a slow call, ms (0: slow calls are not judged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 60_000.0))]
    pub slow_call_ms: Option<f64>,
    /// Share of the window's answered calls that were slow which opens the breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub slow_call_ratio: Option<f64>,
    /// The sliding window, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 3_600_000))]
    pub window_ms: Option<u32>,
    /// Calls the window must hold before a ratio is judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub min_calls: Option<u32>,
    /// How long the breaker first stays open, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 3_600_000))]
    pub base_ejection_ms: Option<u32>,
    /// The longest it stays open at once, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 3_600_000))]
    pub max_ejection_ms: Option<u32>,
}

/// What the agent does when the workload exits.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Leave it stopped.
    Never,
    /// Restart after a non-zero exit.
    #[default]
    OnFailure,
    /// Always restart.
    Always,
}

/// An execution plan: what runs where, from which artifacts, with which limits.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Always `quadrant/v1`.
    #[schemars(regex(pattern = r"^quadrant/v1$"))]
    pub api_version: String,
    /// The quadrant the workload runs in.
    pub quadrant: QuadrantName,
    /// Workload name (its cgroup and the last segment of its SPIFFE ID).
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$"))]
    pub workload: String,
    /// Strictly increasing per (quadrant, workload): lower or equal generations are refused.
    #[schemars(range(min = 1))]
    pub generation: u64,
    /// Artifacts by content: `<pkg>@sha256:<digest>`; the first is executed.
    #[schemars(
        length(min = 1, max = 16),
        inner(regex(pattern = r"^[a-z0-9][a-z0-9._-]{0,127}@sha256:[0-9a-f]{64}$"))
    )]
    pub artifacts: Vec<String>,
    /// Arguments passed to the executable.
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    #[schemars(extend("maxProperties" = 64, "propertyNames" = {"pattern": "^[A-Z_][A-Z0-9_]{0,127}$"}))]
    pub env: BTreeMap<String, String>,
    /// Resource limits.
    pub resources: Resources,
    /// Lanes the workload needs.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub lanes: Vec<LaneRequirement>,
    /// Service-level requirements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<Slo>,
    /// Circuit-breaker thresholds of the workload's lane service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<PlanBreaker>,
    /// Labels (admission constraints read them).
    #[serde(default)]
    #[schemars(extend("maxProperties" = 32, "propertyNames" = {"pattern": "^[a-z0-9][a-z0-9./_-]{0,62}$"}))]
    pub labels: BTreeMap<String, String>,
    /// Placement constraints, `key=value`.
    #[serde(default)]
    #[schemars(
        length(max = 16),
        inner(regex(pattern = r"^[a-z0-9._-]{1,63}=[A-Za-z0-9._-]{0,63}$"))
    )]
    pub constraints: Vec<String>,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How urgent the plan is: admission templates read it (the shipped SLO-budget constraint
    /// lets `p0` and `security` plans in while a production quadrant's budget burns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// A plan's priority.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Must run now (an incident fix).
    P0,
    /// High.
    P1,
    /// Normal.
    P2,
    /// Low.
    P3,
    /// A security fix.
    Security,
}

/// A break-glass authorization to go back to an older generation of one workload. Signed by a
/// key with the `break-glass` role for the quadrant; it is the only way back.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// The workload's quadrant.
    pub quadrant: QuadrantName,
    /// The workload.
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$"))]
    pub workload: String,
    /// The generation to return to (the signed plan presented with it must have it).
    #[schemars(range(min = 1))]
    pub target_generation: u64,
    /// Why; recorded in the audit log.
    #[schemars(length(min = 8, max = 1024))]
    pub reason: String,
    /// Unix seconds after which the authorization is void.
    pub expires_at: u64,
}

/// The rollback authorization JSON Schema.
#[must_use]
pub fn rollback_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(Rollback)).unwrap_or(Value::Null)
}

/// Signs a rollback authorization.
#[must_use]
pub fn sign_rollback(rollback: &Rollback, key: &SigningKey) -> Envelope {
    let value = serde_json::to_value(rollback).unwrap_or(Value::Null);
    key.sign(ROLLBACK_PAYLOAD_TYPE, &canonical(&value))
}

/// Checks a rollback authorization: schema, a break-glass key for its quadrant, not expired at
/// `now` (unix seconds). Returns it and the key id.
pub fn verify_rollback(
    envelope: &Envelope,
    trust: &TrustStore,
    now: u64,
) -> Result<(Rollback, String), PlanError> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&envelope.payload)
        .map_err(|e| PlanError::Payload(format!("not base64: {e}")))?;
    let value: Value =
        serde_json::from_slice(&raw).map_err(|e| PlanError::Syntax(e.to_string()))?;
    let validator = jsonschema::validator_for(&rollback_schema())
        .map_err(|e| PlanError::Schema(vec![format!("schema: {e}")]))?;
    let errors = schema_errors(&validator, &value);
    if !errors.is_empty() {
        return Err(PlanError::Schema(errors));
    }
    let rollback: Rollback =
        serde_json::from_value(value).map_err(|e| PlanError::Schema(vec![e.to_string()]))?;
    let (_, key) = trust.verify(
        envelope,
        ROLLBACK_PAYLOAD_TYPE,
        Role::BreakGlass,
        rollback.quadrant.into(),
    )?;
    if rollback.expires_at <= now {
        return Err(PlanError::Payload(format!(
            "the break-glass authorization expired at {} (now {now})",
            rollback.expires_at
        )));
    }
    Ok((rollback, key))
}

/// Errors of plan handling; each points at the field or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The document is too large.
    #[error("plan is {0} bytes; the limit is {MAX_PLAN_BYTES}")]
    TooLarge(usize),
    /// Not JSON or YAML.
    #[error("plan is not valid JSON or YAML: {0}")]
    Syntax(String),
    /// Schema violations, each `<json pointer>: <message>`.
    #[error("plan does not match its schema:\n  {}", .0.join("\n  "))]
    Schema(Vec<String>),
    /// The signature does not check out.
    #[error("plan signature: {0}")]
    Signature(#[from] SignatureError),
    /// The signed payload is not the plan the envelope claims.
    #[error("signed payload: {0}")]
    Payload(String),
}

/// The plan JSON Schema (draft 2020-12) as a JSON value.
#[must_use]
pub fn schema() -> Value {
    serde_json::to_value(schemars::schema_for!(Plan)).unwrap_or(Value::Null)
}

/// Parses a plan document (JSON or YAML), validates it against the schema, and returns the
/// typed plan.
pub fn parse(text: &str) -> Result<Plan, PlanError> {
    if text.len() > MAX_PLAN_BYTES {
        return Err(PlanError::TooLarge(text.len()));
    }
    // JSON is YAML; parsing through YAML accepts both with one code path.
    let value: Value = serde_yaml::from_str(text).map_err(|e| PlanError::Syntax(e.to_string()))?;
    from_value(&value)
}

/// Every way `value` breaks the schema of `validator`, each as `<json pointer>: <message>`.
#[must_use]
pub fn schema_errors(validator: &jsonschema::Validator, value: &Value) -> Vec<String> {
    // The common case, valid input, takes the faster check.
    if validator.is_valid(value) {
        return Vec::new();
    }
    validator
        .iter_errors(value)
        .map(|e| {
            let at = e.instance_path().to_string();
            format!("{}: {e}", if at.is_empty() { "/" } else { &at })
        })
        .collect()
}

/// A published schema that does not compile: a defect of this binary (unit tests check every
/// schema), reported rather than panicking.
#[derive(Clone, Debug, thiserror::Error)]
#[error("schema does not compile: {0}")]
pub struct SchemaError(String);

/// Why a document is not a valid message of a tagged schema.
#[derive(Debug, thiserror::Error)]
pub enum InvalidMessage {
    /// Not JSON at all.
    #[error("not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// Against the schema, each problem at its JSON pointer.
    #[error("{}", .0.join("; "))]
    Schema(Vec<String>),
    /// Past the schema, the typed value still does not fit.
    #[error("{0}")]
    Type(#[source] serde_json::Error),
    /// The schema itself does not compile.
    #[error(transparent)]
    Validator(#[from] SchemaError),
}

/// Validators for an internally tagged enum's schema: one per `oneOf` branch (each with the
/// schema's definitions), chosen by the tag, so an error names the field of the kind that was
/// meant rather than "not valid under any of the schemas".
#[derive(Debug)]
pub struct TaggedValidator {
    tag: &'static str,
    by_kind: BTreeMap<String, jsonschema::Validator>,
}

impl TaggedValidator {
    /// Compiles the branches of `root`, tagged by the property `tag`.
    pub fn new(root: &Value, tag: &'static str) -> Result<Self, SchemaError> {
        let defs = root.get("$defs").cloned().unwrap_or_default();
        let branches = root
            .get("oneOf")
            .and_then(Value::as_array)
            .ok_or_else(|| SchemaError("it has no oneOf".into()))?;
        let by_kind = branches
            .iter()
            .map(|branch| {
                let kind = branch
                    .pointer(&format!("/properties/{tag}/const"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| SchemaError("a branch has no const tag".into()))?
                    .to_owned();
                let mut schema = branch.clone();
                schema["$defs"] = defs.clone();
                let v =
                    jsonschema::validator_for(&schema).map_err(|e| SchemaError(e.to_string()))?;
                Ok((kind, v))
            })
            .collect::<Result<_, SchemaError>>()?;
        Ok(Self { tag, by_kind })
    }

    /// Parses `bytes` as a message of this schema: JSON, then the schema of its kind (each
    /// error naming its JSON pointer), then the type. Nothing passes that fails one of them.
    pub fn parse<T: serde::de::DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, InvalidMessage> {
        let value: Value = serde_json::from_slice(bytes).map_err(InvalidMessage::NotJson)?;
        let errors = self.errors(&value);
        if !errors.is_empty() {
            return Err(InvalidMessage::Schema(errors));
        }
        serde_json::from_value(value).map_err(InvalidMessage::Type)
    }

    /// Every way `value` breaks the schema of its kind (`/<tag>` when the kind is unknown).
    #[must_use]
    pub fn errors(&self, value: &Value) -> Vec<String> {
        let kind = value
            .get(self.tag)
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(v) = self.by_kind.get(kind) {
            schema_errors(v, value)
        } else {
            let known: Vec<&str> = self.by_kind.keys().map(String::as_str).collect();
            vec![format!(
                "/{}: {kind:?} is not one of {}",
                self.tag,
                known.join(", ")
            )]
        }
    }
}

/// The compiled plan schema, built once.
fn validator() -> Result<&'static jsonschema::Validator, PlanError> {
    static VALIDATOR: std::sync::OnceLock<Result<jsonschema::Validator, SchemaError>> =
        std::sync::OnceLock::new();
    VALIDATOR
        .get_or_init(|| {
            jsonschema::validator_for(&schema()).map_err(|e| SchemaError(e.to_string()))
        })
        .as_ref()
        .map_err(|e| PlanError::Schema(vec![format!("schema: {e}")]))
}

/// Validates a plan document already parsed into JSON.
pub fn from_value(value: &Value) -> Result<Plan, PlanError> {
    let validator = validator()?;
    let mut errors = schema_errors(validator, value);
    if !errors.is_empty() {
        errors.sort();
        errors.dedup();
        return Err(PlanError::Schema(errors));
    }
    serde_json::from_value(value.clone()).map_err(|e| PlanError::Schema(vec![e.to_string()]))
}

/// Canonical bytes of a JSON value: keys sorted at every level, no insignificant whitespace.
#[must_use]
pub fn canonical(value: &Value) -> Vec<u8> {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let ordered: BTreeMap<&String, Value> =
                    m.iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(ordered.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    // serde_json writes object members in map order; `sorted` fixes that order.
    serde_json::to_vec(&sorted(value)).unwrap_or_default()
}

/// Signs `plan` with `key`: a DSSE envelope over the plan's canonical JSON.
#[must_use]
pub fn sign(plan: &Plan, key: &SigningKey) -> Envelope {
    let value = serde_json::to_value(plan).unwrap_or(Value::Null);
    key.sign(PLAN_PAYLOAD_TYPE, &canonical(&value))
}

/// Checks a signed plan: the envelope's payload is a schema-valid plan, and a trusted key
/// allowed to sign plans for the plan's quadrant signed it. Returns the plan and the key id.
pub fn verify(envelope: &Envelope, trust: &TrustStore) -> Result<(Plan, String), PlanError> {
    use base64::Engine as _;
    // The quadrant decides which signers count, so read it first, then verify for it.
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&envelope.payload)
        .map_err(|e| PlanError::Payload(format!("not base64: {e}")))?;
    let text =
        std::str::from_utf8(&raw).map_err(|e| PlanError::Payload(format!("not UTF-8: {e}")))?;
    let plan = parse(text)?;
    let (payload, key) = trust.verify(
        envelope,
        PLAN_PAYLOAD_TYPE,
        Role::Plan,
        plan.quadrant.into(),
    )?;
    let value: Value =
        serde_json::from_slice(&payload).map_err(|e| PlanError::Payload(e.to_string()))?;
    if canonical(&value) != payload {
        return Err(PlanError::Payload(
            "the signed bytes are not in canonical form".into(),
        ));
    }
    Ok((plan, key))
}

#[cfg(test)]
mod tests;
