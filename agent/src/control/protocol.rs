//! The control protocol: one JSON request line and one JSON response line per connection, their
//! types and published schemas, and the request parser (JSON, then schema, then type).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::plans::{InvalidMessage, SchemaError, TaggedValidator};

use crate::loader::{AttachedProgram, Counter};

/// Longest request line the agent reads (1 MiB: below the 1.5 MiB Kubernetes allows an object, and
/// far above any plan the schema admits with sensible sizes). A longer request is answered with
/// an error naming this limit.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

fn default_observe_last() -> u32 {
    20
}

/// A request to the agent.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Report quadrants, programs and counters.
    Status,
    /// Tear everything down and exit; with `keep_dataplane`, stop only the agent: the quadrants,
    /// the pinned eBPF dataplane and the running workloads go on, for the next agent to take
    /// over (an upgrade).
    Down {
        /// Leave the quadrants and the dataplane running.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        keep_dataplane: bool,
    },
    /// Re-evaluate the policy bundle and make the result live at once; on any error the
    /// current policy stays.
    PolicyReload,
    /// Submit a signed plan: signature → schema → generation → artifacts → admission → run.
    Submit {
        /// The DSSE envelope.
        envelope: crate::signing::Envelope,
        /// Start the new generation as a shadow beside the live one (`quadrant shadow`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        shadow: bool,
    },
    /// Go back to an older generation: a break-glass authorization and the signed plan of that
    /// generation.
    Rollback {
        /// The break-glass authorization (DSSE envelope).
        authorization: crate::signing::Envelope,
        /// The older signed plan.
        envelope: crate::signing::Envelope,
    },
    /// List the workloads.
    Workloads,
    /// Stop a workload (`<quadrant>/<workload>`).
    Stop {
        /// Name.
        name: String,
    },
    /// List the open RTT lanes, the services offered and each quadrant's lane usage.
    Lanes,
    /// Set the verdict trace: the programs report every verdict (`all`), the drops (`drops`)
    /// or nothing (`off`) to the agent, which logs them.
    Trace {
        /// What to trace.
        mode: crate::trace::TraceMode,
    },
    /// List the circuit breakers the kernel keeps, with their thresholds.
    Breakers,
    /// Run `instances` instances of `quadrant` (adding or removing the highest ones).
    Scale {
        /// Quadrant name.
        quadrant: String,
        /// How many instances it runs from now on (1..=16).
        instances: u8,
    },
    /// List every quadrant instance: address, capacity, readiness per service, connections.
    Instances,
    /// Where a workload of this plan would be placed, and why (nothing is started).
    Place {
        /// The plan (validated against the plan schema).
        plan: serde_json::Value,
    },
    /// Stop sending new connections to instance `index` of `quadrant` (`resume`: send them
    /// again); its connections go on.
    Drain {
        /// Quadrant name.
        quadrant: String,
        /// Which instance (1.. : instance 0 is the quadrant itself).
        index: u8,
        /// Undo a drain.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resume: bool,
    },
    /// Report every SLO: SLI, error budget, burn rates, alerts.
    Slo,
    /// Report the shadow generations: each compared with its live generation, and a verdict.
    Shadows,
    /// Promote a shadow generation (it becomes the live one) or reject it (it stops).
    ShadowDecide {
        /// `<quadrant>/<workload>`.
        workload: String,
        /// What to do.
        decision: crate::shadow::Decision,
    },
    /// Stream events (`manifests/schemas/event.schema.json`), one JSON line each, until the
    /// client disconnects.
    Events {
        /// Only the events that name this quadrant (in a field, a `<q>/<name>` or a SPIFFE ID),
        /// and those that name none (they concern every quadrant).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quadrant: Option<String>,
    },
    /// Flow events (`manifests/schemas/flow.schema.json`), one JSON line each: the last `last`
    /// the agent kept that `filter` passes, then — with `follow` — every later one until the
    /// client disconnects.
    Observe {
        /// Which flows.
        #[serde(default)]
        filter: crate::flows::FlowFilter,
        /// How many of the kept ones, newest last.
        #[serde(default = "default_observe_last")]
        last: u32,
        /// Go on with new flows as they come.
        #[serde(default)]
        follow: bool,
    },
    /// A chaos fault: the Workload API of `quadrant` answers `Unavailable` (and ends its open
    /// streams) for `millis` ms; 0 ends an outage now.
    IdentityOutage {
        /// Quadrant name.
        quadrant: String,
        /// How long, ms (at most an hour).
        millis: u64,
    },
    /// A chaos fault: the policy engine unavailable to `quadrant` for `millis` ms — every lane
    /// decision involving it fails closed; 0 ends an outage now.
    PolicyOutage {
        /// Quadrant name.
        quadrant: String,
        /// How long, ms (at most an hour).
        millis: u64,
    },
    /// The live identity and policy outages (chaos faults the agent keeps).
    Outages,
    /// Admit a workload: its review and its X.509-SVID (PEM chain, leaf first).
    Admit {
        /// `{"review": {"object": {...}}}`.
        review: serde_json::Value,
        /// PEM certificates.
        svid_pem: String,
    },
    /// CNI ADD (`quadrant-cni`): put the quadrant programs on a pod's host-side veth and count
    /// its addresses as its quadrant's.
    PodAdd {
        /// The pod.
        pod: crate::pods::PodSpec,
    },
    /// CNI DEL: take them off again (a pod not attached is no error).
    PodDel {
        /// `CNI_CONTAINERID`.
        container_id: String,
        /// `CNI_IFNAME`.
        ifname: String,
    },
    /// CNI CHECK: the pod is attached as it was.
    PodCheck {
        /// `CNI_CONTAINERID`.
        container_id: String,
        /// `CNI_IFNAME`.
        ifname: String,
    },
    /// CNI GC: detach every pod not in `valid`.
    PodGc {
        /// `cni.dev/valid-attachments`.
        valid: Vec<crate::pods::Attachment>,
    },
    /// The attached pods.
    Pods,
}

/// The agent's answer.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Status`].
    Status(Box<StatusReport>),
    /// The agent tore everything down.
    Down {
        /// What was removed.
        removed: Vec<String>,
    },
    /// The agent stopped and left the dataplane enforcing (`down` with `keep_dataplane`).
    DataplaneKept {
        /// bpffs directory holding the pins the next agent takes over.
        pin_dir: PathBuf,
        /// Map layout of the kept dataplane.
        map_layout: u32,
        /// Running workloads left running for the next agent to supervise.
        handed_over_workloads: Vec<String>,
    },
    /// The plan was admitted and its workload started.
    Submitted {
        /// The workload's status right after start.
        status: crate::workloads::Status,
        /// Key that signed the plan.
        signer: String,
        /// The workload's SPIFFE ID.
        spiffe_id: String,
        /// Audit record of the admission.
        audit_seq: Option<u64>,
        /// Why the new generation started as a shadow beside the live one, if it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shadow: Option<String>,
    },
    /// Answer to [`Request::Shadows`].
    Shadows(Box<crate::shadow::ShadowsReport>),
    /// Answer to [`Request::ShadowDecide`]: the figures it was decided on.
    ShadowDecided {
        /// Promoted or rejected.
        decision: crate::shadow::Decision,
        /// The shadow as it stood.
        report: Box<crate::shadow::ShadowReport>,
    },
    /// Answer to [`Request::Workloads`].
    Workloads {
        /// Every workload.
        workloads: Vec<crate::workloads::Status>,
    },
    /// Answer to [`Request::Stop`].
    Stopped(crate::workloads::Status),
    /// Answer to [`Request::Lanes`].
    Lanes(Box<crate::lanes::broker::LanesReport>),
    /// Answer to [`Request::IdentityOutage`] and [`Request::PolicyOutage`].
    IdentityOutage {
        /// Quadrant name.
        quadrant: String,
        /// Milliseconds left of its outage (0: none live).
        left_ms: u64,
        /// Calls refused during the outage this request started over or ended.
        refused: u64,
    },
    /// Answer to [`Request::Outages`].
    Outages {
        /// Every live outage, identity then policy.
        faults: Vec<crate::chaos::FaultStatus>,
    },
    /// Answer to [`Request::Breakers`].
    Breakers(Box<crate::breakers::BreakersReport>),
    /// Answer to [`Request::Scale`].
    Scaled {
        /// Quadrant name.
        quadrant: String,
        /// Instances it runs now.
        instances: u8,
    },
    /// Answer to [`Request::Instances`].
    Instances(Box<crate::scale::InstancesReport>),
    /// Answer to [`Request::Place`].
    Placement(Box<crate::scale::place::Placement>),
    /// Answer to [`Request::Drain`].
    Drained {
        /// Quadrant name.
        quadrant: String,
        /// The instance.
        index: u8,
        /// Whether it is draining now.
        draining: bool,
    },
    /// Answer to [`Request::Slo`].
    Slo(Box<crate::slo::SloReport>),
    /// The verdict trace is now set to `mode`.
    Trace {
        /// What is traced.
        mode: crate::trace::TraceMode,
    },
    /// Answer to [`Request::Admit`].
    Admission(crate::admission::Decision),
    /// Answer to [`Request::PodAdd`] and [`Request::PodCheck`].
    Pod(Box<crate::pods::PodStatus>),
    /// Answer to [`Request::PodDel`].
    PodDeleted {
        /// It was attached.
        removed: bool,
    },
    /// Answer to [`Request::PodGc`].
    PodsCollected {
        /// `<container id>/<ifname>` of each pod detached.
        removed: Vec<String>,
    },
    /// Answer to [`Request::Pods`].
    Pods {
        /// Every attached pod.
        pods: Vec<crate::pods::PodStatus>,
    },
    /// The new policy is live.
    PolicyReloaded {
        /// Policy state line (as in status).
        policy: String,
        /// The live policy slot now.
        slot: u32,
    },
    /// The request failed.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// What `quadrant status` shows.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct StatusReport {
    /// Instance name.
    pub instance: String,
    /// Agent process id.
    pub pid: u32,
    /// bpffs directory holding the pins.
    pub pin_dir: PathBuf,
    /// Control socket path.
    pub socket: PathBuf,
    /// Runtime authorization state: `enforced: …` or `deny-all: <why>`.
    pub policy: String,
    /// The digest of the policy bundle the kernel enforces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_digest: Option<String>,
    /// The digest of the policy bundle admission decides with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission_digest: Option<String>,
    /// What this agent carried over when it took over a dataplane an earlier agent kept
    /// running (absent when it loaded a fresh one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried: Option<crate::loader::Carried>,
    /// One entry per quadrant.
    pub quadrants: Vec<QuadrantStatus>,
    /// Non-zero verdict counters.
    pub counters: Vec<Counter>,
    /// Where the Prometheus metrics are served (`metrics.listen`; absent: not served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// One quadrant in the status report.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct QuadrantStatus {
    /// `dx`, `dg`, `px`, `pg`.
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// Prefix.
    pub prefix: String,
    /// Host side address (gateway).
    pub gateway: String,
    /// Address inside the namespace.
    pub address: String,
    /// Host-side interface.
    pub host_interface: String,
    /// Its ifindex.
    pub host_ifindex: u32,
    /// Cgroup directory.
    pub cgroup: PathBuf,
    /// Cgroup id.
    pub cgroup_id: u64,
    /// Attached programs.
    pub programs: Vec<AttachedProgram>,
}

/// Every published JSON Schema: (name for `quadrant schema NAME`, file in `manifests/schemas`,
/// the schema generated from the Rust types). A unit test keeps the files current.
#[must_use]
pub fn published_schemas() -> Vec<(&'static str, &'static str, serde_json::Value)> {
    vec![
        ("plan", "plan.schema.json", crate::plans::schema()),
        (
            "rollback",
            "rollback.schema.json",
            crate::plans::rollback_schema(),
        ),
        ("request", "control-request.schema.json", request_schema()),
        (
            "response",
            "control-response.schema.json",
            response_schema(),
        ),
        (
            "lane-request",
            "lane-request.schema.json",
            crate::lanes::control::request_schema(),
        ),
        (
            "lane-message",
            "lane-message.schema.json",
            crate::lanes::control::message_schema(),
        ),
        ("event", "event.schema.json", crate::events::schema()),
        ("flow", "flow.schema.json", crate::flows::schema()),
        (
            "chaos-experiment",
            "chaos-experiment.schema.json",
            serde_json::to_value(schemars::schema_for!(crate::chaos::Experiment))
                .unwrap_or_default(),
        ),
        (
            "chaos-report",
            "chaos-report.schema.json",
            serde_json::to_value(schemars::schema_for!(crate::chaos::run::Report))
                .unwrap_or_default(),
        ),
    ]
}

/// JSON Schema of control requests (published as manifests/schemas/control-request.schema.json).
#[must_use]
pub fn request_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Request)).unwrap_or_default()
}

/// JSON Schema of control responses (published as manifests/schemas/control-response.schema.json).
#[must_use]
pub fn response_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Response)).unwrap_or_default()
}

/// Parses one request line: JSON, then the request schema (errors name the JSON pointer), then
/// the typed request. Nothing reaches the agent's logic before it passes all three.
pub fn parse_request(line: &str) -> Result<Request, InvalidRequest> {
    static VALIDATOR: std::sync::OnceLock<Result<TaggedValidator, SchemaError>> =
        std::sync::OnceLock::new();
    let validator = VALIDATOR
        .get_or_init(|| TaggedValidator::new(&request_schema(), "request"))
        .as_ref()
        .map_err(|e| InvalidRequest(InvalidMessage::Validator(e.clone())))?;
    validator.parse(line.as_bytes()).map_err(InvalidRequest)
}

/// A control request that is not one.
#[derive(Debug, thiserror::Error)]
#[error("invalid request: {0}")]
pub struct InvalidRequest(#[from] pub InvalidMessage);

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn requests_are_checked_against_their_schema_first() {
        assert_eq!(
            parse_request(r#"{"request":"status"}"#).unwrap(),
            Request::Status
        );
        let e = parse_request(r#"{"request":"stop"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid request") && e.contains("name"), "{e}");
        let e = parse_request(r#"{"request":"stop","name":7}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/name"), "{e}");
        let e = parse_request(r#"{"request":"reboot"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid request"), "{e}");
        let e = parse_request(r#"{"request":"status","extra":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("extra"), "{e}");
        assert!(
            parse_request("not json")
                .unwrap_err()
                .to_string()
                .contains("not JSON")
        );
    }

    #[test]
    fn every_published_schema_is_current() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/schemas");
        let published = published_schemas();
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(
            files,
            published.len(),
            "a schema file in {} is not published by the code",
            dir.display()
        );
        for (name, file, schema) in published {
            let on_disk: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap_or_default())
                    .unwrap_or_default();
            assert_eq!(
                on_disk, schema,
                "manifests/schemas/{file} is stale: regenerate it with `quadrant schema {name} > manifests/schemas/{file}`"
            );
        }
    }
}
