//! MCP-Core policy: OPA Rego (v1) evaluated with regorus.
//!
//! A policy bundle is the `policies/` tree — runtime authorization in layers (global, one per
//! quadrant), Gatekeeper-style admission templates with their constraints, and Rego unit tests —
//! embedded in the binary, or read from a directory (`policy_dir` in the configuration).
//!
//! Runtime authorization is decided here and enforced in the kernel: [`PolicyBundle::compile`]
//! turns `data.quadrant.runtime.flows` (plus the configuration's local rules, subject to the same
//! global denies) into the entries of the dataplane's policy map.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use regorus::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use dataplane_common::Quadrant;

use crate::config::{
    CompiledFlows, CompiledPolicy, Config, ConfigError, OneOrMany, PolicyRule, PortSpec,
    WorkloadPolicy, compile_rules,
};
use crate::signing::{Envelope, POLICY_BUNDLE_PAYLOAD_TYPE, Role, SigningKey, TrustStore};

/// The bundle compiled into the binary: every file under `policies/`.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "runtime/global.rego",
        include_str!("../../policies/runtime/global.rego"),
    ),
    (
        "runtime/decision.rego",
        include_str!("../../policies/runtime/decision.rego"),
    ),
    (
        "runtime/decision_test.rego",
        include_str!("../../policies/runtime/decision_test.rego"),
    ),
    (
        "runtime/quadrants/dx.rego",
        include_str!("../../policies/runtime/quadrants/dx.rego"),
    ),
    (
        "runtime/quadrants/dg.rego",
        include_str!("../../policies/runtime/quadrants/dg.rego"),
    ),
    (
        "runtime/quadrants/px.rego",
        include_str!("../../policies/runtime/quadrants/px.rego"),
    ),
    (
        "runtime/quadrants/pg.rego",
        include_str!("../../policies/runtime/quadrants/pg.rego"),
    ),
    (
        "admission/decision.rego",
        include_str!("../../policies/admission/decision.rego"),
    ),
    (
        "admission/decision_test.rego",
        include_str!("../../policies/admission/decision_test.rego"),
    ),
    (
        "admission/templates/required_labels.rego",
        include_str!("../../policies/admission/templates/required_labels.rego"),
    ),
    (
        "admission/templates/content_addressed.rego",
        include_str!("../../policies/admission/templates/content_addressed.rego"),
    ),
    (
        "admission/templates/resource_limits.rego",
        include_str!("../../policies/admission/templates/resource_limits.rego"),
    ),
    (
        "admission/templates/production_identity.rego",
        include_str!("../../policies/admission/templates/production_identity.rego"),
    ),
    (
        "admission/constraints.json",
        include_str!("../../policies/admission/constraints.json"),
    ),
];

/// The detached signature of a policy directory: `<policy_dir>/bundle.dsse.json`.
pub const SIGNATURE_FILE: &str = "bundle.dsse.json";
const SIGNATURE_SUFFIX: &str = ".dsse.json";

/// Data documents (JSON) of a bundle are merged into `data`.
const DATA_SUFFIX: &str = ".json";
/// Query of the flows the kernel enforces.
const FLOWS_QUERY: &str = "data.quadrant.runtime.flows";
/// A policy directory's manifest, carrying the bundle revision.
pub const MANIFEST_FILE: &str = "manifest.json";
const LANES_QUERY: &str = "data.quadrant.runtime.lane_rules";
/// Query of the global-versus-quadrant conflicts.
const CONFLICTS_QUERY: &str = "data.quadrant.runtime.conflicts";
/// Query of flows placed in a layer that does not own them.
const MISPLACED_QUERY: &str = "data.quadrant.runtime.misplaced";
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

/// One Rego unit test result.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TestResult {
    /// `data.<package>.<rule>`.
    pub name: String,
    /// Whether the rule evaluated to true.
    pub passed: bool,
    /// Evaluation error, if any.
    pub error: Option<String>,
}

/// What `quadrant policy check` reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CheckReport {
    /// Quadrant allows overridden by a global deny, with both sides.
    pub conflicts: Vec<Value>,
    /// Flows placed in a layer that does not own them.
    pub misplaced: Vec<Value>,
    /// Flows the kernel will enforce.
    pub flows: usize,
}

/// A loaded policy bundle.
#[derive(Clone, Debug)]
pub struct PolicyBundle {
    origin: String,
    rego: Vec<(String, String)>,
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

    /// Compiles the quadrant-wide runtime authorization into policy-map entries (flows naming a
    /// single workload are left out; [`Self::compile_all`] has them).
    pub fn compile(&self, config: &Config) -> Result<CompiledPolicy, PolicyError> {
        self.compile_all(config).map(|c| c.quadrant)
    }

    /// Compiles the runtime authorization: quadrant-wide entries, and the flows that rules
    /// naming one workload's SPIFFE ID allow, per workload and as their union per quadrant.
    pub fn compile_all(&self, config: &Config) -> Result<CompiledFlows, PolicyError> {
        let td = &config.identity.trust_domain;
        let mut quadrant = Vec::new();
        let mut per_workload: BTreeMap<(Quadrant, String), Vec<PolicyRule>> = BTreeMap::new();
        for f in self.flows(&config.policy)? {
            match flow_to_rule(&f, td)? {
                (rule, None) => quadrant.push(rule),
                (rule, Some((q, workload))) => {
                    per_workload.entry((q, workload)).or_default().push(rule);
                }
            }
        }
        let merged = |what: &str| {
            let what = what.to_owned();
            move |e| PolicyError::Flow {
                flow: what,
                source: Box::new(e),
            }
        };
        let mut workloads = WorkloadPolicy::new();
        for ((q, workload), rules) in &per_workload {
            let compiled = compile_rules(rules).map_err(merged(&format!(
                "(flows of workload {}/{workload})",
                q.name()
            )))?;
            for ((_, dst, proto), ranges) in compiled {
                workloads.insert((*q, workload.clone(), dst, proto), ranges);
            }
        }
        let all: Vec<PolicyRule> = per_workload.into_values().flatten().collect();
        // The packet programs decide with one entry per key holding both: it must fit.
        compile_rules(&[&quadrant[..], &all[..]].concat()).map_err(merged(
            "(flows a packet may carry: the quadrant's and its workloads' rules joined)",
        ))?;
        Ok(CompiledFlows {
            quadrant: compile_rules(&quadrant).map_err(merged("(merged flows)"))?,
            some_workload: compile_rules(&all).map_err(merged("(merged workload flows)"))?,
            workloads,
        })
    }

    /// Conflicts and misplaced rules.
    pub fn check(&self, local: &[PolicyRule]) -> Result<CheckReport, PolicyError> {
        let mut engine = self.engine(local)?;
        let as_vec = |v: Value| match v {
            Value::Array(a) => a,
            _ => vec![],
        };
        let conflicts = as_vec(query(&mut engine, CONFLICTS_QUERY)?);
        let misplaced = as_vec(query(&mut engine, MISPLACED_QUERY)?);
        Ok(CheckReport {
            conflicts,
            misplaced,
            flows: self.flows(local)?.len(),
        })
    }

    /// Evaluates `query` (default: the admission decision for inputs with a `review`, else the
    /// runtime decision) for `input`.
    pub fn eval(
        &self,
        local: &[PolicyRule],
        input: &Value,
        query_text: Option<&str>,
    ) -> Result<(String, Value), PolicyError> {
        let q = query_text.map_or_else(
            || {
                if input.get("review").is_some() {
                    ADMISSION_DECISION
                } else {
                    RUNTIME_DECISION
                }
                .to_owned()
            },
            ToOwned::to_owned,
        );
        let mut engine = self.engine(local)?;
        engine.set_input(
            regorus::Value::from_json_str(&input.to_string()).map_err(|e| eval_err("input", &e))?,
        );
        let v = query(&mut engine, &q)?;
        Ok((q, v))
    }

    /// Runs every `test_*` rule of the bundle, as `opa test` does: a test passes when it
    /// evaluates to true.
    pub fn run_tests(&self) -> Result<Vec<TestResult>, PolicyError> {
        let mut engine = self.engine(&[])?;
        let mut results = Vec::new();
        for (_, text) in &self.rego {
            let Some(package) = text.lines().find_map(|l| l.trim().strip_prefix("package ")) else {
                continue;
            };
            let names: BTreeSet<&str> = text
                .lines()
                .filter(|l| l.starts_with("test_"))
                .filter_map(|l| {
                    l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .next()
                })
                .collect();
            for name in names {
                let full = format!("data.{}.{name}", package.trim());
                let (passed, error) = match engine.eval_rule(full.clone()) {
                    Ok(regorus::Value::Bool(true)) => (true, None),
                    Ok(other) => (false, Some(format!("evaluated to {other}"))),
                    Err(e) => (false, Some(e.to_string())),
                };
                results.push(TestResult {
                    name: full,
                    passed,
                    error,
                });
            }
        }
        Ok(results)
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

fn eval_err(query: &str, e: &dyn std::fmt::Display) -> PolicyError {
    PolicyError::Eval {
        query: query.to_owned(),
        message: e.to_string(),
    }
}

fn query(engine: &mut Engine, q: &str) -> Result<Value, PolicyError> {
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

fn rule_to_flows(r: &PolicyRule) -> Vec<Value> {
    let one = |o: &OneOrMany| match o {
        OneOrMany::One(s) => vec![s.clone()],
        OneOrMany::Many(v) => v.clone(),
    };
    // One flow per (from, to) pair, as the Rego layers write them.
    let mut flows = Vec::new();
    for from in one(&r.from) {
        for to in one(&r.to) {
            let mut f = serde_json::json!({
                "from": from,
                "to": to,
                "protocols": r.protocols.clone().unwrap_or_else(|| vec!["tcp".into(), "udp".into(), "icmp".into()]),
            });
            if let Some(ports) = &r.ports {
                f["ports"] = ports
                    .iter()
                    .map(|p| match p {
                        PortSpec::Port(n) => Value::String(n.to_string()),
                        PortSpec::Range(s) => Value::String(s.clone()),
                    })
                    .collect();
            }
            flows.push(f);
        }
    }
    flows
}

/// Maps a flow's source to an identity the kernel knows. A quadrant-wide SPIFFE ID pattern
/// (`spiffe://<td>/quadrant/<q>/workload/*`) is quadrant `<q>`; a single workload's SPIFFE ID
/// (`…/workload/<name>`) is quadrant `<q>` restricted to workload `<name>` (returned beside the
/// rule), which the cgroup programs tell apart by the workload's cgroup.
fn flow_to_rule(
    f: &Flow,
    trust_domain: &str,
) -> Result<(PolicyRule, Option<(Quadrant, String)>), PolicyError> {
    let flow_err = |reason: &str| PolicyError::Flow {
        flow: serde_json::to_string(f).unwrap_or_default(),
        source: Box::new(ConfigError::Invalid {
            field: "from".into(),
            reason: reason.to_owned(),
        }),
    };
    let from = if let Some(rest) = f.from.strip_prefix("spiffe://") {
        let prefix = format!("{trust_domain}/quadrant/");
        let Some(path) = rest.strip_prefix(&prefix) else {
            return Err(flow_err(&format!(
                "SPIFFE ID outside trust domain {trust_domain}"
            )));
        };
        let Some((q, workload)) = path.split_once("/workload/") else {
            return Err(flow_err(
                "expected spiffe://<trust domain>/quadrant/<q>/workload/<name or *>",
            ));
        };
        let Some(quadrant) = Quadrant::from_name(q) else {
            return Err(flow_err(&format!(
                "unknown quadrant {q:?} in the SPIFFE ID"
            )));
        };
        if workload == "*" {
            (q.to_owned(), None)
        } else if crate::identity::attest::valid_workload_name(workload) {
            (q.to_owned(), Some((quadrant, workload.to_owned())))
        } else {
            return Err(flow_err(&format!(
                "invalid workload name {workload:?} in the SPIFFE ID (1-64 of a-z, 0-9, '-', '_', '.')"
            )));
        }
    } else {
        (f.from.clone(), None)
    };
    let (from, workload) = from;
    Ok((
        PolicyRule {
            from: OneOrMany::One(from),
            to: OneOrMany::One(f.to.clone()),
            protocols: Some(f.protocols.clone()),
            ports: f
                .ports
                .as_ref()
                .map(|p| p.iter().map(|s| PortSpec::Range(s.clone())).collect()),
        },
        workload,
    ))
}

#[cfg(test)]
mod tests {
    use dataplane_common::{
        Identity,
        policy::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, PortRange},
    };

    use super::*;

    #[test]
    fn embedded_bundle_lists_every_file_under_policies() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let on_disk = PolicyBundle::from_dir(&dir).unwrap();
        let mut disk: Vec<&str> = on_disk
            .rego
            .iter()
            .chain(&on_disk.data)
            .map(|(p, _)| p.as_str())
            .collect();
        let mut embedded: Vec<&str> = EMBEDDED.iter().map(|(p, _)| *p).collect();
        disk.sort_unstable();
        embedded.sort_unstable();
        assert_eq!(disk, embedded, "add new policy files to EMBEDDED");
    }

    #[test]
    fn every_rego_unit_test_passes() {
        let results = PolicyBundle::embedded().run_tests().unwrap();
        assert!(results.len() >= 15, "found {} tests", results.len());
        let failed: Vec<_> = results.iter().filter(|r| !r.passed).collect();
        assert!(failed.is_empty(), "{failed:#?}");
    }

    #[test]
    fn default_flows_compile_to_the_default_matrix() {
        let config = Config::embedded();
        let p = PolicyBundle::embedded().compile(&config).unwrap();
        assert!(p.contains_key(&(Identity::Dx, Identity::Dg, PROTO_TCP)));
        assert!(p.contains_key(&(Identity::Host, Identity::Pg, PROTO_TCP)));
        assert!(p.contains_key(&(Identity::Px, Identity::Host, PROTO_ICMP)));
        assert!(!p.contains_key(&(Identity::Px, Identity::Host, PROTO_TCP)));
        assert!(!p.contains_key(&(Identity::Dx, Identity::Px, PROTO_TCP)));
        assert!(!p.contains_key(&(Identity::World, Identity::Dx, PROTO_TCP)));
        assert_eq!(
            p.len(),
            4 * 3 * 3 + 4,
            "intra, partner and host -> q on 3 protocols, q -> host icmp"
        );
    }

    #[test]
    fn default_matrix_isolates_development_from_production() {
        let p = PolicyBundle::embedded()
            .compile(&Config::embedded())
            .unwrap();
        for q in Quadrant::ALL {
            let i = Identity::from(q);
            assert!(p.contains_key(&(i, i, PROTO_TCP)), "{q:?} intra");
            assert!(p.contains_key(&(Identity::Host, i, PROTO_TCP)));
            assert!(p.contains_key(&(i, Identity::Host, PROTO_ICMP)));
            assert!(!p.contains_key(&(i, Identity::Host, PROTO_TCP)));
            assert!(!p.contains_key(&(i, Identity::World, PROTO_TCP)));
        }
        assert!(p.contains_key(&(Identity::Dx, Identity::Dg, PROTO_UDP)));
        assert!(p.contains_key(&(Identity::Pg, Identity::Px, PROTO_ICMP)));
        for dev in [Identity::Dx, Identity::Dg] {
            for prod in [Identity::Px, Identity::Pg] {
                for proto in [PROTO_TCP, PROTO_UDP, PROTO_ICMP] {
                    assert!(!p.contains_key(&(dev, prod, proto)));
                    assert!(!p.contains_key(&(prod, dev, proto)));
                }
            }
        }
    }

    #[test]
    fn local_rules_are_subject_to_global_denies() {
        let mut config = Config::embedded();
        config.policy = serde_yaml::from_str(
            "- { from: dx, to: host, protocols: [tcp], ports: [22] }\n- { from: dx, to: px, protocols: [tcp], ports: [443] }\n",
        )
        .unwrap();
        let bundle = PolicyBundle::embedded();
        let p = bundle.compile(&config).unwrap();
        assert!(
            p.contains_key(&(Identity::Dx, Identity::Host, PROTO_TCP)),
            "a local allow is added"
        );
        assert!(
            !p.contains_key(&(Identity::Dx, Identity::Px, PROTO_TCP)),
            "a global deny wins over it"
        );
        let report = bundle.check(&config.policy).unwrap();
        assert_eq!(report.conflicts.len(), 1, "{report:?}");
        assert_eq!(report.conflicts[0]["allow"]["layer"], "local");
    }

    #[test]
    fn eval_explains_its_decision() {
        let bundle = PolicyBundle::embedded();
        let (q, v) = bundle
            .eval(
                &[],
                &serde_json::json!({"from": "dx", "to": "px", "protocol": "tcp", "port": 443}),
                None,
            )
            .unwrap();
        assert_eq!(q, RUNTIME_DECISION);
        assert_eq!(v["allowed"], false);
        assert_eq!(
            v["denied_by"][0]["reason"],
            "development and production are isolated"
        );
        let (_, v) = bundle
            .eval(
                &[],
                &serde_json::json!({"from": "dg", "to": "dx", "protocol": "udp", "port": 53}),
                None,
            )
            .unwrap();
        assert_eq!(v["allowed"], true);
        assert_eq!(v["allowed_by"][0]["layer"], "dx");
        let review = serde_json::json!({"review": {"object": {"quadrant": "px", "labels": {}, "artifacts": ["x:latest"]}}});
        let (q, v) = bundle.eval(&[], &review, None).unwrap();
        assert_eq!(q, ADMISSION_DECISION);
        assert_eq!(v["allowed"], false);
        assert!(v["violations"].as_array().unwrap().len() >= 4, "{v}");
    }

    #[test]
    fn spiffe_ids_map_to_quadrants_and_workloads() {
        let f = |from: &str| Flow {
            from: from.into(),
            to: "dg".into(),
            protocols: vec!["tcp".into()],
            ports: None,
            layer: "dg".into(),
        };
        let (r, w) = flow_to_rule(
            &f("spiffe://quadrant.local/quadrant/dx/workload/*"),
            "quadrant.local",
        )
        .unwrap();
        assert_eq!(r.from, OneOrMany::One("dx".into()));
        assert_eq!(w, None);
        let (r, w) = flow_to_rule(
            &f("spiffe://quadrant.local/quadrant/dx/workload/web"),
            "quadrant.local",
        )
        .unwrap();
        assert_eq!(r.from, OneOrMany::One("dx".into()));
        assert_eq!(w, Some((Quadrant::Dx, "web".into())));
        for bad in [
            "spiffe://quadrant.local/quadrant/dx/workload/../px",
            "spiffe://quadrant.local/quadrant/dx/workload/",
            "spiffe://quadrant.local/quadrant/qq/workload/web",
            "spiffe://quadrant.local/quadrant/dx/web",
        ] {
            let e = flow_to_rule(&f(bad), "quadrant.local").unwrap_err();
            assert!(e.to_string().contains("from"), "{bad}: {e}");
        }
        let e = flow_to_rule(
            &f("spiffe://evil.example/quadrant/dx/workload/*"),
            "quadrant.local",
        )
        .unwrap_err();
        assert!(e.to_string().contains("outside trust domain"), "{e}");
    }

    #[test]
    fn a_workload_rule_compiles_to_its_workload_and_the_quadrant_union() {
        use std::fmt::Write as _;
        let tmp = std::env::temp_dir().join(format!("quadrant-policy-wl-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        assert!(
            std::process::Command::new("cp")
                .arg("-r")
                .arg(&src)
                .arg(&tmp)
                .status()
                .unwrap()
                .success()
        );
        let dx = tmp.join("runtime/quadrants/dx.rego");
        let mut text = fs::read_to_string(&dx).unwrap();
        for (workload, port) in [("api", "7310"), ("web", "8080")] {
            let _ = write!(
                text,
                "\nallow contains {{\"from\": \"spiffe://quadrant.local/quadrant/dx/workload/{workload}\", \"to\": \"host\", \"protocols\": [\"tcp\"], \"ports\": [\"{port}\"]}}\n"
            );
        }
        // A workload rule towards production is overridden by the global deny.
        text.push_str("\nallow contains {\"from\": \"spiffe://quadrant.local/quadrant/dx/workload/api\", \"to\": \"px\", \"protocols\": [\"tcp\"]}\n");
        fs::write(&dx, text).unwrap();
        let compiled = PolicyBundle::from_dir(&tmp)
            .unwrap()
            .compile_all(&Config::embedded())
            .unwrap();
        let _ = fs::remove_dir_all(&tmp);
        let tcp_host = |w: &str| {
            compiled
                .workloads
                .get(&(Quadrant::Dx, w.to_owned(), Identity::Host, PROTO_TCP))
                .cloned()
        };
        assert_eq!(
            tcp_host("api"),
            Some(vec![PortRange { lo: 7310, hi: 7310 }])
        );
        assert_eq!(
            tcp_host("web"),
            Some(vec![PortRange { lo: 8080, hi: 8080 }])
        );
        assert_eq!(compiled.workloads.len(), 2, "{:?}", compiled.workloads);
        assert_eq!(
            compiled
                .some_workload
                .get(&(Identity::Dx, Identity::Host, PROTO_TCP)),
            Some(&vec![
                PortRange { lo: 7310, hi: 7310 },
                PortRange { lo: 8080, hi: 8080 }
            ])
        );
        // Not widened to the quadrant.
        assert!(
            !compiled
                .quadrant
                .contains_key(&(Identity::Dx, Identity::Host, PROTO_TCP))
        );
    }

    #[test]
    fn a_signed_policy_directory_is_verified_and_tampering_is_refused() {
        let tmp = std::env::temp_dir().join(format!("quadrant-policy-sign-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).unwrap();
        let dir = tmp.join("policies");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        assert!(
            std::process::Command::new("cp")
                .arg("-r")
                .arg(&src)
                .arg(&dir)
                .status()
                .unwrap()
                .success()
        );
        let (all, _) = SigningKey::generate("policy-admin").unwrap();
        let (dev_only, _) = SigningKey::generate("dev-admin").unwrap();
        fs::create_dir_all(tmp.join("trust")).unwrap();
        for (k, qs) in [(&all, &Quadrant::ALL[..]), (&dev_only, &[Quadrant::Dx][..])] {
            let doc = serde_json::to_string(&k.trusted(vec![Role::Policy], qs)).unwrap();
            fs::write(tmp.join("trust").join(format!("{}.json", k.id())), doc).unwrap();
        }
        let mut config = Config::embedded();
        config.policy_dir = Some(dir.clone());
        config.trust_store = tmp.join("trust");
        assert!(
            PolicyBundle::for_config(&config).is_ok(),
            "unsigned and not required"
        );
        config.require_signed_policy = true;
        let e = PolicyBundle::for_config(&config).unwrap_err().to_string();
        assert!(
            e.contains("is missing and require_signed_policy is set"),
            "{e}"
        );
        let bundle = PolicyBundle::from_dir(&dir).unwrap();
        fs::write(
            dir.join(SIGNATURE_FILE),
            serde_json::to_string(&bundle.sign(&all)).unwrap(),
        )
        .unwrap();
        assert!(
            PolicyBundle::for_config(&config).is_ok(),
            "signed by a key covering every quadrant"
        );
        fs::write(
            dir.join(SIGNATURE_FILE),
            serde_json::to_string(&bundle.sign(&dev_only)).unwrap(),
        )
        .unwrap();
        let e = PolicyBundle::for_config(&config).unwrap_err().to_string();
        assert!(
            e.contains("key dev-admin may not sign policy for quadrant dg"),
            "{e}"
        );
        fs::write(
            dir.join(SIGNATURE_FILE),
            serde_json::to_string(&bundle.sign(&all)).unwrap(),
        )
        .unwrap();
        let global = dir.join("runtime/global.rego");
        let text = fs::read_to_string(&global).unwrap();
        fs::write(&global, text.replace("deny contains", "# deny contains")).unwrap();
        let e = PolicyBundle::for_config(&config).unwrap_err().to_string();
        assert!(
            e.contains("for another bundle"),
            "an edited policy after signing: {e}"
        );
        let _ = fs::remove_dir_all(&tmp);
    }

    #[test]
    fn broken_rego_names_the_file() {
        let mut b = PolicyBundle::embedded();
        b.rego.push((
            "runtime/broken.rego".into(),
            "package quadrant.broken\nallow if {".into(),
        ));
        let e = b.engine(&[]).unwrap_err().to_string();
        assert!(e.starts_with("policy runtime/broken.rego:"), "{e}");
    }
}
