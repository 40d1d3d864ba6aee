//! Agent configuration: serde types, the embedded default, and validation.
//!
//! Validation happens before anything is created, so a bad file changes nothing on the host.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use dataplane_common::Quadrant;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

mod breakers;
mod chaos;
mod cni;
mod instances;
mod metrics;
mod observe;
mod peers;
mod sections;
mod shadows;
mod validate;

pub use breakers::BreakersConfig;
pub use chaos::ChaosConfig;
pub use cni::CniConfig;
pub use instances::{
    InstanceCapacity, InstanceRef, MAX_INSTANCES, ServiceConfig, UNLIMITED_WEIGHT,
};
pub use metrics::MetricsConfig;
pub use observe::ObserveConfig;
pub use peers::{KubernetesPeers, MAX_PEERS, PeerNode, PeersConfig, check_name, node_id};
pub use shadows::ShadowsConfig;

pub use sections::*;

/// The configuration compiled into the binary (`agent/config/default.yaml`).
pub const DEFAULT_CONFIG_YAML: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.yaml"));

/// Default instance name.
pub const DEFAULT_INSTANCE: &str = "quadrant";
/// Default host-side interface prefix.
pub const DEFAULT_INTERFACE_PREFIX: &str = "qh";
/// Default bpffs mount point.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Default cgroup2 mount point used by the agent.
pub const DEFAULT_CGROUP2: &str = "/run/quadrant/cgroup2";
/// Default state directory (control socket, state file).
pub const DEFAULT_STATE_DIR: &str = "/run/quadrant";
/// Default idle timeout of tracked flows.
pub const DEFAULT_CONNTRACK_TIMEOUT_SECS: u32 = 120;
/// Longest interface name Linux accepts.
const IFNAMSIZ_MAX: usize = 15;

/// Errors in a configuration. Each names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// YAML syntax or type error.
    #[error("invalid config {origin}: {source}")]
    Parse {
        /// File name or "embedded default".
        origin: String,
        /// Cause, with line and column.
        source: serde_yaml::Error,
    },
    /// A semantic error.
    #[error("invalid config: {field}: {reason}")]
    Invalid {
        /// The offending field, as a path (`policy[3].ports[0]`).
        field: String,
        /// What is wrong and what is expected.
        reason: String,
    },
}

pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The agent configuration (see `agent/config/default.yaml` for the documented defaults).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names the namespaces, cgroups, bpffs directory and control socket of this agent.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// Prefix of the host-side veth names.
    #[serde(default = "default_interface_prefix")]
    pub interface_prefix: String,
    /// bpffs mount point.
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    /// cgroup2 mount point the agent uses.
    #[serde(default = "default_cgroup2")]
    pub cgroup2: PathBuf,
    /// Directory of the control socket and state file.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Idle seconds after which a tracked flow's replies no longer pass.
    #[serde(default = "default_ct_timeout")]
    pub conntrack_timeout_secs: u32,
    /// How the XDP early-drop stage is attached to each host-side veth.
    #[serde(default)]
    pub xdp_mode: XdpAttachMode,
    /// Per-quadrant settings, keyed by `dx`, `dg`, `px`, `pg`; all four are required.
    pub quadrants: BTreeMap<String, QuadrantConfig>,
    /// Host settings.
    #[serde(default)]
    pub host: HostConfig,
    /// Local flow rules, added to the Rego runtime authorization as its `local` layer (global
    /// denies still apply).
    #[serde(default)]
    pub policy: Vec<PolicyRule>,
    /// Directory of the Rego policy bundle; the bundle embedded in the binary (`policies/`) when
    /// absent.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// Refuse a `policy_dir` without a valid `bundle.dsse.json` (a signature present is always
    /// checked).
    #[serde(default)]
    pub require_signed_policy: bool,
    /// A detached signature (`quadrant dataplane sign`) of the agent's eBPF object, checked
    /// against `trust_store` (a key with the `dataplane` role for every quadrant) before
    /// anything is loaded.
    #[serde(default)]
    pub dataplane_signature: Option<PathBuf>,
    /// Refuse to start without `dataplane_signature`.
    #[serde(default)]
    pub require_signed_dataplane: bool,
    /// Reload the policy by itself when a file in `policy_dir` changes (as `opa run --watch`);
    /// otherwise `quadrant policy reload` or SIGHUP.
    #[serde(default)]
    pub watch_policy_dir: bool,
    /// SPIFFE identity settings.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Directory of trusted signing keys (`<id>.json`: public key, roles, quadrants).
    #[serde(default = "default_trust_store")]
    pub trust_store: PathBuf,
    /// Root of the content-addressed artifact store.
    #[serde(default = "default_artifacts_root")]
    pub artifacts_root: PathBuf,
    /// The append-only, hash-chained audit log of admission decisions.
    #[serde(default = "default_audit_log")]
    pub audit_log: PathBuf,
    /// RTT lanes: message size and per-quadrant limits.
    #[serde(default)]
    pub lanes: LanesConfig,
    /// Circuit breakers: the thresholds every (caller quadrant, destination) breaker uses.
    #[serde(default)]
    pub breakers: BreakersConfig,
    /// Service-level objectives of lane services (`OpenSLO` field names).
    #[serde(default)]
    pub slos: Vec<crate::slo::SloSpec>,
    /// Shadow deployments: the share of requests mirrored and how a shadow is judged.
    #[serde(default)]
    pub shadows: ShadowsConfig,
    /// Services with a virtual address, balanced across their quadrant's instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceConfig>,
    /// The agents of other nodes whose instances take lanes none here can.
    #[serde(default, skip_serializing_if = "is_default")]
    pub peers: PeersConfig,
    /// The Prometheus metrics and health endpoint (off unless `listen` is set).
    #[serde(default, skip_serializing_if = "is_default")]
    pub metrics: MetricsConfig,
    /// Flow events: the kernel's budget per CPU and how many the agent keeps.
    #[serde(default, skip_serializing_if = "is_default")]
    pub observe: ObserveConfig,
    /// Kubernetes nodes: chaining `quadrant-cni` into the node's CNI configuration.
    #[serde(default, skip_serializing_if = "is_default")]
    pub cni: CniConfig,
    /// Chaos faults: whether this node's dataplane can take them at all.
    #[serde(default, skip_serializing_if = "is_default")]
    pub chaos: ChaosConfig,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Default audit log (persistent).
pub const DEFAULT_AUDIT_LOG: &str = "/var/lib/quadrant/audit.log";

/// Default trust store directory.
pub const DEFAULT_TRUST_STORE: &str = "/etc/quadrant/trust";

fn default_trust_store() -> PathBuf {
    DEFAULT_TRUST_STORE.into()
}

fn default_artifacts_root() -> PathBuf {
    crate::artifacts::DEFAULT_ROOT.into()
}

fn default_audit_log() -> PathBuf {
    DEFAULT_AUDIT_LOG.into()
}

fn default_instance() -> String {
    DEFAULT_INSTANCE.to_owned()
}
fn default_interface_prefix() -> String {
    DEFAULT_INTERFACE_PREFIX.to_owned()
}
fn default_bpffs() -> PathBuf {
    DEFAULT_BPFFS.into()
}
fn default_cgroup2() -> PathBuf {
    DEFAULT_CGROUP2.into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_ct_timeout() -> u32 {
    DEFAULT_CONNTRACK_TIMEOUT_SECS
}

/// How the XDP program is attached to the host-side veths.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum XdpAttachMode {
    /// Driver (native) mode: veth runs XDP in its NAPI poll.
    Native,
    /// Generic (skb) mode, run by the core network stack before tc.
    #[default]
    Generic,
    /// No XDP stage; tc ingress enforces alone.
    Off,
}

/// One quadrant's settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuadrantConfig {
    /// The quadrant's IPv4 prefix (at most /30, so it has a gateway and a workload address;
    /// /27 or larger for more than one instance).
    pub prefix: Ipv4Net,
    /// Instances it starts with (1..=16; `quadrant scale` changes it at run time). Each is its
    /// own namespace, veth, cgroup and address, all with the quadrant's identity.
    #[serde(default = "one_instance")]
    pub instances: u8,
    /// What each instance's cgroup may use; also its weight in load balancing.
    #[serde(default, skip_serializing_if = "InstanceCapacity::is_unlimited")]
    pub capacity: InstanceCapacity,
    /// How submitted workloads are placed on the instances that fit.
    #[serde(default)]
    pub placement: crate::scale::place::Strategy,
    /// Labels of single instances (by index), which plans' `constraints` select.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub instance_labels: BTreeMap<u8, BTreeMap<String, String>>,
}

const fn one_instance() -> u8 {
    1
}

impl QuadrantConfig {
    /// One instance on `prefix`, without limits.
    #[must_use]
    pub fn new(prefix: Ipv4Net) -> Self {
        Self {
            prefix,
            instances: 1,
            capacity: InstanceCapacity::default(),
            placement: crate::scale::place::Strategy::default(),
            instance_labels: BTreeMap::new(),
        }
    }
}

/// Host settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Extra addresses or prefixes classified as identity `host`.
    #[serde(default)]
    pub addresses: Vec<Ipv4Net>,
}

/// A quadrant's addresses, derived from its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuadrantAddrs {
    /// The prefix.
    pub prefix: Ipv4Net,
    /// Host side of the veth (first usable address).
    pub gateway: Ipv4Addr,
    /// Inside the namespace (second usable address).
    pub workload: Ipv4Addr,
}

impl Config {
    /// The embedded default configuration.
    ///
    /// # Panics
    /// Never: the embedded file is checked by a unit test.
    #[must_use]
    pub fn embedded() -> Self {
        Self::from_yaml(DEFAULT_CONFIG_YAML, "embedded default")
            .expect("the embedded default configuration is valid")
    }

    /// Reads and validates a YAML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut config: Self = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source,
        })?;
        config.apply_node_prefixes()?;
        config.validate()?;
        Ok(config)
    }

    /// The addresses of quadrant `q`.
    ///
    /// # Panics
    /// If called on an unvalidated config without that quadrant.
    #[must_use]
    pub fn addrs(&self, q: Quadrant) -> QuadrantAddrs {
        let prefix = self.quadrants[q.name()].prefix;
        let base = u32::from(prefix.network());
        QuadrantAddrs {
            prefix,
            gateway: Ipv4Addr::from(base + 1),
            workload: Ipv4Addr::from(base + 2),
        }
    }

    /// Host-side veth name of quadrant `q`.
    #[must_use]
    pub fn host_iface(&self, q: Quadrant) -> String {
        format!("{}-{}", self.interface_prefix, q.name())
    }

    /// Network namespace name of quadrant `q`.
    #[must_use]
    pub fn netns(&self, q: Quadrant) -> String {
        format!("{}-{}", self.instance, q.name())
    }

    /// The instance's cgroup directory (parent of the quadrant cgroups).
    #[must_use]
    pub fn cgroup_parent(&self) -> PathBuf {
        self.cgroup2.join(&self.instance)
    }

    /// Cgroup directory of quadrant `q`.
    #[must_use]
    pub fn cgroup_dir(&self, q: Quadrant) -> PathBuf {
        self.cgroup_parent().join(q.name())
    }

    /// Cgroup directory in which the agent measures the lane acceleration at start-up
    /// (`lanes.tcp_acceleration: auto`); it exists only while the probe runs.
    #[must_use]
    pub fn accel_probe_cgroup_dir(&self) -> PathBuf {
        self.cgroup_parent().join("accel-probe")
    }

    /// The instance's bpffs directory.
    #[must_use]
    pub fn bpffs_dir(&self) -> PathBuf {
        self.bpffs.join(&self.instance)
    }

    /// The control socket path.
    #[must_use]
    pub fn socket_path(&self) -> PathBuf {
        self.state_dir.join(format!("{}.sock", self.instance))
    }

    /// Directory of the per-quadrant Workload API sockets (world-traversable: access is decided
    /// by attestation).
    #[must_use]
    pub fn workload_socket_dir(&self) -> PathBuf {
        self.state_dir.join(format!("{}-workload", self.instance))
    }

    /// The Workload API socket of quadrant `q`.
    #[must_use]
    pub fn workload_socket(&self, q: Quadrant) -> PathBuf {
        self.workload_socket_dir()
            .join(format!("{}.sock", q.name()))
    }

    /// The lane broker's socket (`SOCK_SEQPACKET`, world-connectable: callers are attested).
    #[must_use]
    pub fn lane_socket(&self) -> PathBuf {
        self.state_dir.join(format!("{}-lanes.sock", self.instance))
    }

    /// The state file path (what `up` created, read by `down` and `exec`).
    #[must_use]
    pub fn state_path(&self) -> PathBuf {
        self.state_dir.join(format!("{}.state.yaml", self.instance))
    }

    /// Where the running agent records the workloads it supervises (their processes), so that
    /// the agent started after a crash can take them over.
    #[must_use]
    pub fn workloads_record_path(&self) -> PathBuf {
        self.state_dir
            .join(format!("{}.workloads.yaml", self.instance))
    }

    /// Compiles this configuration's own rules (the `local` layer alone) into map entries.
    pub fn compile_policy(&self) -> Result<crate::policy::CompiledPolicy, ConfigError> {
        crate::policy::compile::compile_rules(&self.policy)
    }
}

#[cfg(test)]
mod tests;
