//! A policy bundle: the `policies/` tree embedded in the binary, or a `policy_dir` (signature,
//! revision, digest), and the regorus engines that evaluate it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use regorus::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use dataplane_common::Quadrant;

use super::compile::rule_to_flows;
use crate::config::{Config, ConfigError, PolicyRule};
use crate::signing::{Envelope, POLICY_BUNDLE_PAYLOAD_TYPE, Role, SigningKey, TrustStore};

/// The bundle compiled into the binary: every file under `policies/`.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "runtime/global.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/runtime/global.rego"
        )),
    ),
    (
        "runtime/decision.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/runtime/decision.rego"
        )),
    ),
    (
        "runtime/decision_test.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/runtime/decision_test.rego"
        )),
    ),
    (
        "runtime/quadrants/dx.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/runtime/quadrants/dx.rego"
        )),
    ),
    (
        "runtime/quadrants/dg.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/runtime/quadrants/dg.rego"
        )),
    ),
    (
        "runtime/quadrants/px.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/runtime/quadrants/px.rego"
        )),
    ),
    (
        "runtime/quadrants/pg.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/runtime/quadrants/pg.rego"
        )),
    ),
    (
        "admission/decision.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/admission/decision.rego"
        )),
    ),
    (
        "admission/decision_test.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/admission/decision_test.rego"
        )),
    ),
    (
        "admission/templates/required_labels.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/admission/templates/required_labels.rego"
        )),
    ),
    (
        "admission/templates/content_addressed.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/admission/templates/content_addressed.rego"
        )),
    ),
    (
        "admission/templates/resource_limits.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/admission/templates/resource_limits.rego"
        )),
    ),
    (
        "admission/templates/slo_budget.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/admission/templates/slo_budget.rego"
        )),
    ),
    (
        "admission/templates/production_identity.rego",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/admission/templates/production_identity.rego"
        )),
    ),
    (
        "admission/constraints.json",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/admission/constraints.json"
        )),
    ),
];

/// The detached signature of a policy directory: `<policy_dir>/bundle.dsse.json`.
pub const SIGNATURE_FILE: &str = "bundle.dsse.json";
const SIGNATURE_SUFFIX: &str = ".dsse.json";

/// Data documents (JSON) of a bundle are merged into `data`.
const DATA_SUFFIX: &str = ".json";
/// Query of the flows the kernel enforces.
pub(super) const FLOWS_QUERY: &str = "data.quadrant.runtime.flows";
/// A policy directory's manifest, carrying the bundle revision.
pub const MANIFEST_FILE: &str = "manifest.json";
const LANES_QUERY: &str = "data.quadrant.runtime.lane_rules";
/// Query of the global-versus-quadrant conflicts.
pub(super) const CONFLICTS_QUERY: &str = "data.quadrant.runtime.conflicts";
/// Query of flows placed in a layer that does not own them.
pub(super) const MISPLACED_QUERY: &str = "data.quadrant.runtime.misplaced";
/// Runtime decision for one flow.
pub const RUNTIME_DECISION: &str = "data.quadrant.runtime.decision";
/// Admission decision for one review.
pub const ADMISSION_DECISION: &str = "data.quadrant.admission.decision";

/// Errors of policy loading and evaluation; each names the file or query at fault.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A bundle file could not be read.
    #[error("cannot read policy {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Rego that does not parse or compile.
    #[error("policy {path}: {message}")]
    Rego {
        /// File.
        path: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A data document that is not valid JSON.
    #[error("policy data {path}: {message}")]
    Data {
        /// File.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Evaluation failed.
    #[error("evaluating {query}: {message}")]
    Eval {
        /// The query.
        query: String,
        /// Cause.
        message: String,
    },
    /// The runtime flows do not compile to the kernel's policy map.
    #[error("runtime flow {flow}: {source}")]
    Flow {
        /// The flow, as JSON.
        flow: String,
        /// Cause.
        source: Box<ConfigError>,
    },
    /// A workload's cgroup, which a rule naming it needs, could not be made or read.
    #[error("cgroup {path} of a workload a rule names: {reason}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// The bundle's signature does not check out.
    #[error("policy bundle signature: {0}")]
    Signature(String),
    /// The bundle has no Rego at all.
    #[error("policy bundle {0} holds no .rego file")]
    Empty(PathBuf),
}

/// A Gatekeeper-style constraint: a template instantiated with parameters for some quadrants.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Constraint {
    /// Name reported with each violation.
    pub name: String,
    /// Template package below `quadrant.admission.templates`.
    pub template: String,
    /// Which quadrants it applies to.
    #[serde(rename = "match")]
    pub matches: ConstraintMatch,
    /// The template's `input.parameters`.
    #[serde(default)]
    pub parameters: Value,
}

/// Where a constraint applies.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConstraintMatch {
    /// Quadrant names.
    pub quadrants: Vec<String>,
}

/// A runtime flow as the Rego decision produces it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    /// Source identity or quadrant-wide SPIFFE ID pattern.
    pub from: String,
    /// Destination identity.
    pub to: String,
    /// Protocols.
    pub protocols: Vec<String>,
    /// Destination ports; every port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<String>>,
    /// The layer that allowed it (`dx`, … or `local`).
    #[serde(default)]
    pub layer: String,
}

/// A lane rule as the Rego decision produces it (`lane_rules`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct LaneRule {
    /// A quadrant, a SPIFFE ID, or a quadrant-wide pattern ending in `/workload/*`.
    pub from: String,
    /// The service's quadrant.
    pub to: String,
    /// Services; every service when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<String>>,
    /// Transports (`shm`, `uds`, `tcp`); every transport when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transports: Option<Vec<String>>,
    /// The layer that allowed it.
    #[serde(default)]
    pub layer: String,
}

impl LaneRule {
    /// Whether the rule covers a caller of quadrant `q` with SPIFFE ID `id`.
    #[must_use]
    pub fn covers_source(&self, q: Quadrant, id: &str) -> bool {
        if self.from == q.name() || self.from == id {
            return true;
        }
        self.from
            .strip_suffix('*')
            .is_some_and(|prefix| prefix.ends_with("/workload/") && id.starts_with(prefix))
    }

    /// Whether the rule covers `service` in quadrant `q`.
    #[must_use]
    pub fn covers_service(&self, q: Quadrant, service: &str) -> bool {
        self.to == q.name()
            && self
                .services
                .as_ref()
                .is_none_or(|s| s.iter().any(|x| x == service || x == "*"))
    }

    /// Whether the rule allows `transport`.
    #[must_use]
    pub fn allows_transport(&self, transport: &str) -> bool {
        self.transports
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == transport))
    }
}

/// A loaded policy bundle.
#[derive(Clone, Debug)]
pub struct PolicyBundle {
    origin: String,
    pub(super) rego: Vec<(String, String)>,
    data: Vec<(String, String)>,
    /// The configured trust domain, given to the policies as `data.quadrant_agent.trust_domain`
    /// (not a file of the bundle: not part of its digest).
    trust_domain: String,
}

impl PolicyBundle {
    /// The bundle compiled into the binary.
    #[must_use]
    pub fn embedded() -> Self {
        Self::from_files(
            "embedded policies",
            EMBEDDED
                .iter()
                .map(|(p, t)| ((*p).to_owned(), (*t).to_owned())),
        )
    }

    fn from_files(origin: &str, files: impl IntoIterator<Item = (String, String)>) -> Self {
        let (data, rego): (Vec<_>, Vec<_>) = files
            .into_iter()
            .partition(|(p, _)| p.ends_with(DATA_SUFFIX));
        Self {
            origin: origin.to_owned(),
            rego,
            data,
            trust_domain: crate::config::DEFAULT_TRUST_DOMAIN.to_owned(),
        }
    }

    /// The same bundle evaluated for `trust_domain` (templates read it as
    /// `data.quadrant_agent.trust_domain` where a constraint sets no `trust_domain` parameter).
    #[must_use]
    pub fn with_trust_domain(mut self, trust_domain: &str) -> Self {
        trust_domain.clone_into(&mut self.trust_domain);
        self
    }

    /// What the agent tells the policies about itself, under a root of its own
    /// (`data.quadrant_agent`).
    pub fn agent_data(&self) -> Result<regorus::Value, PolicyError> {
        let doc = serde_json::json!({ "quadrant_agent": { "trust_domain": self.trust_domain } });
        regorus::Value::from_json_str(&doc.to_string()).map_err(|e| eval_err("agent data", &e))
    }

    /// Reads every `.rego` and `.json` file below `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, PolicyError> {
        let mut files = Vec::new();
        walk(dir, dir, &mut files)?;
        files.sort();
        if !files
            .iter()
            .any(|(p, _)| Path::new(p).extension().is_some_and(|e| e == "rego"))
        {
            return Err(PolicyError::Empty(dir.to_owned()));
        }
        Ok(Self::from_files(&dir.display().to_string(), files))
    }

    /// The bundle `config` names: `policy_dir`, or the embedded one. A policy directory's
    /// signature (`bundle.dsse.json`) is verified against the trust store when present, and
    /// must be present when `require_signed_policy` is set; the embedded bundle is part of the
    /// binary.
    pub fn for_config(config: &Config) -> Result<Self, PolicyError> {
        let td = &config.identity.trust_domain;
        let Some(dir) = &config.policy_dir else {
            return Ok(Self::embedded().with_trust_domain(td));
        };
        let bundle = Self::from_dir(dir)?.with_trust_domain(td);
        let sig = dir.join(SIGNATURE_FILE);
        match fs::read_to_string(&sig) {
            Ok(text) => {
                let envelope: Envelope = serde_json::from_str(&text)
                    .map_err(|e| PolicyError::Signature(format!("{}: {e}", sig.display())))?;
                let trust = TrustStore::load(&config.trust_store)
                    .map_err(|e| PolicyError::Signature(e.to_string()))?;
                bundle.verify_signature(&envelope, &trust)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if config.require_signed_policy {
                    return Err(PolicyError::Signature(format!(
                        "{} is missing and require_signed_policy is set; sign the bundle with `quadrant policy sign`",
                        sig.display()
                    )));
                }
            }
            Err(e) => {
                return Err(PolicyError::Read {
                    path: sig,
                    source: e,
                });
            }
        }
        Ok(bundle)
    }

    /// SHA-256 over the bundle's files: for each file in path order, `path NUL sha256(content)
    /// LF`.
    #[must_use]
    pub fn digest(&self) -> String {
        let mut files: Vec<&(String, String)> = self.rego.iter().chain(&self.data).collect();
        files.sort();
        let mut listing = String::new();
        for (path, text) in files {
            let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            listing.push_str(path);
            listing.push('\0');
            listing.push_str(&crate::artifacts::hex(d.as_ref()));
            listing.push('\n');
        }
        crate::artifacts::hex(
            ring::digest::digest(&ring::digest::SHA256, listing.as_bytes()).as_ref(),
        )
    }

    /// Signs the bundle's digest with `key`.
    #[must_use]
    pub fn sign(&self, key: &SigningKey) -> Envelope {
        key.sign(
            POLICY_BUNDLE_PAYLOAD_TYPE,
            format!("sha256:{}", self.digest()).as_bytes(),
        )
    }

    /// Checks that a key allowed to sign policy for every quadrant signed exactly this bundle.
    pub fn verify_signature(
        &self,
        envelope: &Envelope,
        trust: &TrustStore,
    ) -> Result<String, PolicyError> {
        let mut signer = None;
        for q in Quadrant::ALL {
            let (payload, key) = trust
                .verify(envelope, POLICY_BUNDLE_PAYLOAD_TYPE, Role::Policy, q)
                .map_err(|e| PolicyError::Signature(e.to_string()))?;
            if payload != format!("sha256:{}", self.digest()).as_bytes() {
                return Err(PolicyError::Signature(format!(
                    "the signature by {key} is for another bundle (a policy file was changed after signing)"
                )));
            }
            signer = Some(key);
        }
        signer.ok_or_else(|| PolicyError::Signature("no signature".into()))
    }

    /// Whether this is the bundle compiled into the binary (versioned with the binary itself).
    #[must_use]
    pub fn is_embedded(&self) -> bool {
        self.origin == "embedded policies"
    }

    /// The bundle's revision, from `manifest.json` at its root (`{"bundle": {"revision": N}}`);
    /// `None` without a manifest. A revision only moves forward on a host.
    pub fn revision(&self) -> Result<Option<u64>, PolicyError> {
        let Some((path, text)) = self.data.iter().find(|(p, _)| p == MANIFEST_FILE) else {
            return Ok(None);
        };
        let doc: Value = serde_json::from_str(text).map_err(|e| PolicyError::Data {
            path: path.clone(),
            message: e.to_string(),
        })?;
        doc.pointer("/bundle/revision")
            .and_then(Value::as_u64)
            .map(Some)
            .ok_or_else(|| PolicyError::Data {
                path: path.clone(),
                message: "expected {\"bundle\": {\"revision\": <non-negative integer>}}".into(),
            })
    }

    /// Where the bundle came from.
    #[must_use]
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// An engine with every module and data document loaded, and `local` rules (from the
    /// configuration) as the `local` layer.
    pub fn engine(&self, local: &[PolicyRule]) -> Result<Engine, PolicyError> {
        let mut engine = Engine::new();
        for (path, text) in &self.rego {
            engine
                .add_policy(path.clone(), text.clone())
                .map_err(|e| PolicyError::Rego {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
        }
        for (path, text) in &self.data {
            let value = regorus::Value::from_json_str(text).map_err(|e| PolicyError::Data {
                path: path.clone(),
                message: e.to_string(),
            })?;
            engine.add_data(value).map_err(|e| PolicyError::Data {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
        let local_flows: Vec<Value> = local.iter().flat_map(rule_to_flows).collect();
        // Under a root of its own: regorus keeps data documents apart from rule trees.
        let local_doc = serde_json::json!({ "quadrant_local": { "allow": local_flows } });
        engine
            .add_data(
                regorus::Value::from_json_str(&local_doc.to_string())
                    .map_err(|e| eval_err("local rules", &e))?,
            )
            .map_err(|e| eval_err("local rules", &e))?;
        engine
            .add_data(self.agent_data()?)
            .map_err(|e| eval_err("agent data", &e))?;
        Ok(engine)
    }

    /// An engine holding only the admission templates (`admission/templates/`): admission
    /// evaluates them one constraint at a time, and a smaller engine evaluates faster.
    pub fn templates_engine(&self) -> Result<Engine, PolicyError> {
        let mut engine = Engine::new();
        for (path, text) in self
            .rego
            .iter()
            .filter(|(p, _)| p.contains("admission/templates/"))
        {
            engine
                .add_policy(path.clone(), text.clone())
                .map_err(|e| PolicyError::Rego {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
        }
        engine
            .add_data(self.agent_data()?)
            .map_err(|e| eval_err("agent data", &e))?;
        Ok(engine)
    }

    /// The admission constraints of the bundle's data documents (`constraints` arrays).
    pub fn constraints(&self) -> Result<Vec<Constraint>, PolicyError> {
        let mut out = Vec::new();
        for (path, text) in &self.data {
            let doc: Value = serde_json::from_str(text).map_err(|e| PolicyError::Data {
                path: path.clone(),
                message: e.to_string(),
            })?;
            if let Some(list) = doc.get("constraints") {
                let mut cs: Vec<Constraint> =
                    serde_json::from_value(list.clone()).map_err(|e| PolicyError::Data {
                        path: path.clone(),
                        message: format!("constraints: {e}"),
                    })?;
                out.append(&mut cs);
            }
        }
        Ok(out)
    }

    /// The flows the kernel enforces (quadrant and local layers minus global denies).
    pub fn flows(&self, local: &[PolicyRule]) -> Result<Vec<Flow>, PolicyError> {
        sorted_set(&mut self.engine(local)?, FLOWS_QUERY)
    }

    /// The lane rules the broker applies (quadrant layers minus global denies).
    pub fn lane_rules(&self) -> Result<Vec<LaneRule>, PolicyError> {
        sorted_set(&mut self.engine(&[])?, LANES_QUERY)
    }
}

/// Evaluates `q`, a Rego set of objects, into sorted values of `T` (each element's error names
/// it).
fn sorted_set<T: serde::de::DeserializeOwned + Ord>(
    engine: &mut Engine,
    q: &str,
) -> Result<Vec<T>, PolicyError> {
    let mut out: Vec<T> = match query(engine, q)? {
        Value::Array(items) => items
            .into_iter()
            .map(|f| {
                serde_json::from_value(f.clone()).map_err(|e| eval_err(q, &format!("{f}: {e}")))
            })
            .collect::<Result<_, _>>()?,
        Value::Null => vec![],
        other => return Err(eval_err(q, &format!("expected a set, got {other}"))),
    };
    out.sort();
    Ok(out)
}

pub(super) fn eval_err(query: &str, e: &dyn std::fmt::Display) -> PolicyError {
    PolicyError::Eval {
        query: query.to_owned(),
        message: e.to_string(),
    }
}

pub(super) fn query(engine: &mut Engine, q: &str) -> Result<Value, PolicyError> {
    let v = engine
        .eval_rule(q.to_owned())
        .map_err(|e| eval_err(q, &e))?;
    if v == regorus::Value::Undefined {
        return Ok(Value::Null);
    }
    serde_json::to_value(&v).map_err(|e| eval_err(q, &e))
}

fn read(p: &Path) -> impl FnOnce(std::io::Error) -> PolicyError + '_ {
    move |source| PolicyError::Read {
        path: p.to_owned(),
        source,
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> Result<(), PolicyError> {
    for entry in fs::read_dir(dir).map_err(read(dir))? {
        let path = entry.map_err(read(dir))?.path();
        if path.is_dir() {
            walk(root, &path, out)?;
        } else if path.to_string_lossy().ends_with(SIGNATURE_SUFFIX) {
            // The bundle's own signature is not part of what it signs.
        } else if path.extension().is_some_and(|e| e == "rego" || e == "json") {
            let text = fs::read_to_string(&path).map_err(read(&path))?;
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            out.push((rel, text));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
