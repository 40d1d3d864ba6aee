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

/// The configuration compiled into the binary (`agent/config/default.yaml`).
pub const DEFAULT_CONFIG_YAML: &str = include_str!("../config/default.yaml");

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

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The agent configuration (see `agent/config/default.yaml` for the documented defaults).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
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
}

/// RTT lane settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LanesConfig {
    /// Largest message a lane carries (shared-memory rings are sized for it).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: u32,
    /// Limits on the lanes each quadrant's workloads open, by quadrant; unset quadrants and
    /// fields take the defaults.
    #[serde(default)]
    pub limits: BTreeMap<String, LaneLimits>,
    /// Kernel acceleration of TCP between workloads on this host.
    #[serde(default)]
    pub tcp_acceleration: TcpAcceleration,
}

/// Kernel acceleration of local TCP (lanes and any other TCP between the quadrants' workloads).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TcpAcceleration {
    /// Plain TCP through the stack, the veths and the tc programs.
    Off,
    /// `sock_ops` records established sockets, `sk_msg` redirects each message to a local peer
    /// socket while the policy allows the flow that opened the connection (after a reload that
    /// revokes it, the sender gets `EACCES`).
    SkMsg,
    /// `sk_msg` where it wins here: measured when the agent starts (a loopback connection
    /// redirected by `sk_msg` against one through the stack, taking turns) and kept on only if
    /// its p50 is at most 0.9× and its p99 at most 1.0× the stack's; otherwise plain TCP. The
    /// figures are in `quadrant lanes`. The default.
    #[default]
    Auto,
}

impl Default for LanesConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: default_max_message(),
            limits: BTreeMap::new(),
            tcp_acceleration: TcpAcceleration::Auto,
        }
    }
}

impl LanesConfig {
    /// The limits that apply to lanes opened from quadrant `q`.
    #[must_use]
    pub fn limits_of(&self, q: Quadrant) -> LaneLimits {
        self.limits.get(q.name()).cloned().unwrap_or_default()
    }
}

/// Per-quadrant lane limits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LaneLimits {
    /// Open lanes.
    #[serde(default = "default_max_lanes")]
    pub max_lanes: u32,
    /// Shared memory held by open lanes, in bytes.
    #[serde(default = "default_max_shm")]
    pub max_shm_bytes: u64,
    /// Messages in flight (sent, not yet received) per lane and direction; a sender beyond it
    /// waits.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
}

impl Default for LaneLimits {
    fn default() -> Self {
        Self {
            max_lanes: default_max_lanes(),
            max_shm_bytes: default_max_shm(),
            max_in_flight: default_max_in_flight(),
        }
    }
}

/// Smallest lane message limit accepted.
pub const MIN_LANE_MESSAGE: u32 = 64;
/// Largest lane message limit accepted.
pub const MAX_LANE_MESSAGE: u32 = 64 << 20;

fn default_max_message() -> u32 {
    1 << 20
}
fn default_max_lanes() -> u32 {
    64
}
fn default_max_shm() -> u64 {
    256 << 20
}
fn default_max_in_flight() -> u32 {
    1024
}

/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "quadrant.local";
/// Default X.509- and JWT-SVID lifetime.
pub const DEFAULT_SVID_TTL_SECS: u64 = 3600;
/// Default directory of the CA and JWT keys (persistent, unlike the state directory).
pub const DEFAULT_CA_DIR: &str = "/var/lib/quadrant/ca";
/// Shortest SVID lifetime accepted (rotation happens at half of it).
const MIN_SVID_TTL_SECS: u64 = 2;

/// SPIFFE identity settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The trust domain of every SPIFFE ID the agent issues.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Lifetime of issued SVIDs; they are re-issued at half of it.
    #[serde(default = "default_svid_ttl")]
    pub svid_ttl_secs: u64,
    /// Where the CA key, CA certificate and JWT key are kept (created 0700, keys 0600).
    #[serde(default = "default_ca_dir")]
    pub ca_dir: PathBuf,
    /// An upstream CA (PEM files) that signs the agent's CA as an intermediate.
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            svid_ttl_secs: default_svid_ttl(),
            ca_dir: default_ca_dir(),
            upstream: None,
        }
    }
}

/// Upstream CA files.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// PEM certificate (chain) of the upstream CA; its first certificate signs the agent CA.
    pub cert: PathBuf,
    /// PEM private key of the upstream CA.
    pub key: PathBuf,
}

impl IdentityConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let td = &self.trust_domain;
        if td.is_empty()
            || td.len() > 255
            || !td.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
            })
        {
            return Err(invalid(
                "identity.trust_domain",
                format!(
                    "{td:?} is not a SPIFFE trust domain name (lowercase letters, digits, '.', '-', '_')"
                ),
            ));
        }
        if self.svid_ttl_secs < MIN_SVID_TTL_SECS {
            return Err(invalid(
                "identity.svid_ttl_secs",
                format!("must be at least {MIN_SVID_TTL_SECS}"),
            ));
        }
        if !self.ca_dir.is_absolute() {
            return Err(invalid("identity.ca_dir", "must be an absolute path"));
        }
        Ok(())
    }
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

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}
fn default_svid_ttl() -> u64 {
    DEFAULT_SVID_TTL_SECS
}
fn default_ca_dir() -> PathBuf {
    DEFAULT_CA_DIR.into()
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
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuadrantConfig {
    /// The quadrant's IPv4 prefix (at most /30, so it has a gateway and a workload address).
    pub prefix: Ipv4Net,
}

/// Host settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Extra addresses or prefixes classified as identity `host`.
    #[serde(default)]
    pub addresses: Vec<Ipv4Net>,
}

/// One name or a list of names.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single name.
    One(String),
    /// Several names.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The names, one or many.
    #[must_use]
    pub fn names(&self) -> &[String] {
        match self {
            Self::One(s) => std::slice::from_ref(s),
            Self::Many(v) => v,
        }
    }
}

/// A port or an inclusive range, written `443` or `"8000-8080"`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortSpec {
    /// One port.
    Port(u16),
    /// `"lo-hi"` or `"port"`.
    Range(String),
}

/// A rule allowing flows from some identities to others.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Source identities.
    pub from: OneOrMany,
    /// Destination identities.
    pub to: OneOrMany,
    /// `tcp`, `udp`, `icmp`; all three if absent.
    #[serde(default)]
    pub protocols: Option<Vec<String>>,
    /// Destination ports; all if absent. Not allowed with only `icmp`.
    #[serde(default)]
    pub ports: Option<Vec<PortSpec>>,
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
        let config: Self = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.instance.is_empty()
            || self.instance.len() > 32
            || !self
                .instance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(invalid(
                "instance",
                format!(
                    "{:?} must be 1-32 characters of a-z, 0-9 and '-'",
                    self.instance
                ),
            ));
        }
        let longest = self.interface_prefix.len() + 3;
        if self.interface_prefix.is_empty()
            || longest > IFNAMSIZ_MAX
            || !self
                .interface_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(invalid(
                "interface_prefix",
                format!(
                    "{:?} must be 1-{} characters of a-z, 0-9 and '-' (interface names are at most {IFNAMSIZ_MAX})",
                    self.interface_prefix,
                    IFNAMSIZ_MAX - 3
                ),
            ));
        }
        for (field, path) in [
            ("bpffs", &self.bpffs),
            ("cgroup2", &self.cgroup2),
            ("state_dir", &self.state_dir),
        ] {
            if !path.is_absolute() {
                return Err(invalid(
                    field,
                    format!("{} must be an absolute path", path.display()),
                ));
            }
        }
        self.identity.validate()?;
        if self.conntrack_timeout_secs == 0 {
            return Err(invalid("conntrack_timeout_secs", "must be at least 1"));
        }
        for name in self.quadrants.keys() {
            if Quadrant::from_name(name).is_none() {
                return Err(invalid(
                    format!("quadrants.{name}"),
                    "unknown quadrant; expected dx, dg, px or pg",
                ));
            }
        }
        let mut seen: Vec<(Quadrant, Ipv4Net)> = Vec::new();
        for q in Quadrant::ALL {
            let Some(qc) = self.quadrants.get(q.name()) else {
                return Err(invalid(
                    format!("quadrants.{}", q.name()),
                    "missing; all four quadrants need a prefix",
                ));
            };
            let field = format!("quadrants.{}.prefix", q.name());
            if qc.prefix != qc.prefix.trunc() {
                return Err(invalid(
                    field,
                    format!(
                        "{} has host bits set; did you mean {}?",
                        qc.prefix,
                        qc.prefix.trunc()
                    ),
                ));
            }
            if qc.prefix.prefix_len() > 30 {
                return Err(invalid(
                    field,
                    format!("{} is too small; use /30 or larger", qc.prefix),
                ));
            }
            for (other, net) in &seen {
                if net.contains(&qc.prefix) || qc.prefix.contains(net) {
                    return Err(invalid(
                        field,
                        format!("{} overlaps {}'s prefix {net}", qc.prefix, other.name()),
                    ));
                }
            }
            seen.push((q, qc.prefix));
        }
        self.validate_paths()?;
        self.validate_lanes()?;
        self.compile_policy()?;
        Ok(())
    }

    fn validate_lanes(&self) -> Result<(), ConfigError> {
        let m = self.lanes.max_message_bytes;
        if !(MIN_LANE_MESSAGE..=MAX_LANE_MESSAGE).contains(&m) {
            return Err(invalid(
                "lanes.max_message_bytes",
                format!("{m} is outside {MIN_LANE_MESSAGE}..={MAX_LANE_MESSAGE}"),
            ));
        }
        for (name, l) in &self.lanes.limits {
            if Quadrant::from_name(name).is_none() {
                return Err(invalid(
                    format!("lanes.limits.{name}"),
                    "unknown quadrant; expected dx, dg, px or pg",
                ));
            }
            if l.max_in_flight == 0 {
                return Err(invalid(
                    format!("lanes.limits.{name}.max_in_flight"),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }

    fn validate_paths(&self) -> Result<(), ConfigError> {
        if !self.trust_store.is_absolute() {
            return Err(invalid(
                "trust_store",
                format!("{} must be an absolute path", self.trust_store.display()),
            ));
        }
        if !self.artifacts_root.is_absolute() {
            return Err(invalid(
                "artifacts_root",
                format!("{} must be an absolute path", self.artifacts_root.display()),
            ));
        }
        if !self.audit_log.is_absolute() {
            return Err(invalid(
                "audit_log",
                format!("{} must be an absolute path", self.audit_log.display()),
            ));
        }
        if let Some(dir) = &self.policy_dir
            && !dir.is_absolute()
        {
            return Err(invalid(
                "policy_dir",
                format!("{} must be an absolute path", dir.display()),
            ));
        }
        Ok(())
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

    /// Compiles this configuration's own rules (the `local` layer alone) into map entries.
    pub fn compile_policy(&self) -> Result<crate::policy::CompiledPolicy, ConfigError> {
        crate::policy::compile::compile_rules(&self.policy)
    }
}

#[cfg(test)]
mod tests {
    use dataplane_common::{
        Identity,
        policy::{PROTO_TCP, PROTO_UDP, PortRange},
    };

    use super::*;

    fn with(extra: &str) -> Result<Config, ConfigError> {
        let base = "quadrants:\n  dx: { prefix: 10.1.0.0/24 }\n  dg: { prefix: 10.1.1.0/24 }\n  px: { prefix: 10.1.2.0/24 }\n  pg: { prefix: 10.1.3.0/24 }\n";
        Config::from_yaml(&format!("{base}{extra}"), "test")
    }

    fn err(extra: &str) -> String {
        with(extra).unwrap_err().to_string()
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded();
        assert!(
            c.policy.is_empty(),
            "the default matrix lives in the Rego bundle"
        );
        assert_eq!(c.policy_dir, None);
        let dx = c.addrs(Quadrant::Dx);
        assert_eq!(dx.gateway, Ipv4Addr::new(10, 240, 0, 1));
        assert_eq!(dx.workload, Ipv4Addr::new(10, 240, 0, 2));
        assert_eq!(c.host_iface(Quadrant::Pg), "qh-pg");
        assert_eq!(c.netns(Quadrant::Px), "quadrant-px");
    }

    #[test]
    fn rules_merge_ports_and_expand_lists() {
        let c = with("policy:\n  - { from: [dx, dg], to: px, protocols: [tcp], ports: [443, \"8000-8080\"] }\n  - { from: dx, to: px, protocols: [tcp], ports: [22] }\n").unwrap();
        let p = c.compile_policy().unwrap();
        assert_eq!(
            p[&(Identity::Dx, Identity::Px, PROTO_TCP)],
            vec![
                PortRange { lo: 443, hi: 443 },
                PortRange { lo: 8000, hi: 8080 },
                PortRange { lo: 22, hi: 22 }
            ]
        );
        assert_eq!(p[&(Identity::Dg, Identity::Px, PROTO_TCP)].len(), 2);
        assert!(!p.contains_key(&(Identity::Dx, Identity::Px, PROTO_UDP)));
    }

    #[test]
    fn bad_input_names_the_field() {
        assert!(
            err("policy:\n  - { from: dx, to: prod }\n")
                .contains("policy[0].to: unknown identity \"prod\"")
        );
        assert!(
            err("policy:\n  - { from: dx, to: px, protocols: [sctp] }\n")
                .contains("policy[0].protocols[0]")
        );
        assert!(
            err("policy:\n  - { from: dx, to: px, ports: [\"90-80\"] }\n")
                .contains("ends before it starts")
        );
        assert!(
            err("policy:\n  - { from: dx, to: px, ports: [\"http\"] }\n")
                .contains("policy[0].ports[0]")
        );
        assert!(
            err("policy:\n  - { from: dx, to: px, protocols: [icmp], ports: [1] }\n")
                .contains("icmp has no ports")
        );
        assert!(
            err("policy:\n  - { from: dx, to: px, color: red }\n")
                .contains("unknown field `color`")
        );
        assert!(err("instance: \"a b\"\n").contains("instance"));
        assert!(err("interface_prefix: abcdefghijklm\n").contains("interface_prefix"));
        assert!(err("bpffs: relative/dir\n").contains("bpffs"));
        assert!(
            err("identity: { trust_domain: \"Bad Domain\" }\n").contains("identity.trust_domain")
        );
        assert!(err("identity: { svid_ttl_secs: 1 }\n").contains("identity.svid_ttl_secs"));
        assert!(err("identity: { ca_dir: ca }\n").contains("identity.ca_dir"));
        assert!(
            err("xdp_mode: turbo\n").contains("xdp_mode: unknown variant `turbo`"),
            "{}",
            err("xdp_mode: turbo\n")
        );
        assert_eq!(
            with("xdp_mode: off\n").unwrap().xdp_mode,
            XdpAttachMode::Off
        );
        assert_eq!(with("").unwrap().xdp_mode, XdpAttachMode::Generic);
        let many = (1..=9)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        assert!(
            err(&format!(
                "policy:\n  - {{ from: dx, to: px, protocols: [tcp], ports: [{many}] }}\n"
            ))
            .contains("more than 8 port ranges")
        );
    }

    #[test]
    fn prefixes_are_checked() {
        let overlap = Config::from_yaml(
            "quadrants:\n  dx: { prefix: 10.1.0.0/16 }\n  dg: { prefix: 10.1.1.0/24 }\n  px: { prefix: 10.2.0.0/24 }\n  pg: { prefix: 10.3.0.0/24 }\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(
            overlap.contains("quadrants.dg.prefix") && overlap.contains("overlaps dx"),
            "{overlap}"
        );
        let missing = Config::from_yaml("quadrants:\n  dx: { prefix: 10.1.0.0/24 }\n", "t")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("quadrants.dg: missing"), "{missing}");
        let hostbits = Config::from_yaml(
            "quadrants:\n  dx: { prefix: 10.1.0.5/24 }\n  dg: { prefix: 10.1.1.0/24 }\n  px: { prefix: 10.2.0.0/24 }\n  pg: { prefix: 10.3.0.0/24 }\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(hostbits.contains("did you mean 10.1.0.0/24"), "{hostbits}");
        let unknown = Config::from_yaml(
            "quadrants:\n  dx: { prefix: 10.1.0.0/24 }\n  dg: { prefix: 10.1.1.0/24 }\n  px: { prefix: 10.2.0.0/24 }\n  pg: { prefix: 10.3.0.0/24 }\n  qa: { prefix: 10.4.0.0/24 }\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("quadrants.qa"), "{unknown}");
    }
}
