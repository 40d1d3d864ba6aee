//! The configuration's sections: RTT lanes (message size, per-quadrant limits, the TCP
//! acceleration), identity (trust domain, SVID lifetime, CA, upstream), and the local policy
//! rules.

use std::{collections::BTreeMap, path::PathBuf};

use dataplane_common::Quadrant;
use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// RTT lane settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
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
    /// A service whose latency SLO burns is re-routed (new `auto` lanes to another transport)
    /// at most once in this many seconds.
    #[serde(default = "default_reroute_hold_secs")]
    pub reroute_hold_secs: u32,
    /// During the hold after a re-route, the share of new `auto` lanes that go to the new
    /// transport (the others keep the old one), so a switch never moves all of a service's
    /// new lanes at once; after the hold all go to it.
    #[serde(default = "default_reroute_fraction")]
    pub reroute_fraction: f64,
}

const fn default_reroute_hold_secs() -> u32 {
    60
}

const fn default_reroute_fraction() -> f64 {
    0.5
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
            reroute_hold_secs: default_reroute_hold_secs(),
            reroute_fraction: default_reroute_fraction(),
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
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}

fn default_svid_ttl() -> u64 {
    DEFAULT_SVID_TTL_SECS
}

fn default_ca_dir() -> PathBuf {
    DEFAULT_CA_DIR.into()
}
