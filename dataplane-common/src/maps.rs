//! Map names, sizes, keys and values shared by kernel and agent.
//!
//! The agent never spells a map name itself: it uses these constants.

use crate::policy::PortRange;

/// LPM trie: IPv4 prefix → [`PrefixValue`]. Written by the agent, read by tc and XDP.
pub const PREFIXES: &str = "PREFIXES";
/// Hash: (source identity, destination identity, protocol) → [`PolicyValue`], slot 0 of the
/// double-buffered policy. Written by the agent while inactive, read by every program while
/// [`DataplaneConfig::policy_slot`] selects it.
pub const POLICY_A: &str = "POLICY_A";
/// Slot 1 of the double-buffered policy (see [`POLICY_A`]).
pub const POLICY_B: &str = "POLICY_B";
/// Hash: ifindex → [`IfaceValue`]. Written by the agent, read by tc and XDP.
pub const IFACES: &str = "IFACES";
/// Hash: cgroup id → [`CgroupValue`]. Written by the agent, read by the cgroup programs.
pub const CGROUPS: &str = "CGROUPS";
/// Array\[1\]: [`DataplaneConfig`]. Written by the agent, read by every program.
pub const CONFIG: &str = "CONFIG";
/// Array\[4\]: quadrant id → [`QuadrantValue`]. Written by the agent, read by cgroup programs.
pub const QUADRANTS: &str = "QUADRANTS";
/// LRU hash: [`CtKey`] → [`CtValue`]. Written by tc (new allowed flows), read by all.
pub const CONNTRACK: &str = "CONNTRACK";
/// Per-CPU array: [`crate::reason::stats_index`] → packet/operation count. Written by every
/// program, read by the agent.
pub const STATS: &str = "STATS";

/// Hash: ([`WlPolicyKey`]) → [`PolicyValue`], slot 0 of the workload policy: what rules naming
/// one workload's SPIFFE ID allow, keyed by that workload's cgroup id. Read by the cgroup
/// programs; double-buffered with [`POLICY_A`] under the same [`DataplaneConfig::policy_slot`].
pub const WL_POLICY_A: &str = "WL_POLICY_A";
/// Slot 1 of the workload policy (see [`WL_POLICY_A`]).
pub const WL_POLICY_B: &str = "WL_POLICY_B";

/// Every map the dataplane object defines, for pinning and status.
pub const ALL: [&str; 14] = [
    PREFIXES,
    POLICY_A,
    POLICY_B,
    WL_POLICY_A,
    WL_POLICY_B,
    IFACES,
    CGROUPS,
    CONFIG,
    QUADRANTS,
    CONNTRACK,
    STATS,
    LANE_SOCKS,
    LANE_SOCK_MODE,
    LANE_ACCEL,
];

/// Established TCP sockets of the quadrants' workloads ([`SockKey`] → socket), for the `sk_msg`
/// redirect of local TCP lanes (only populated when lane acceleration is on).
pub const LANE_SOCKS: &str = "LANE_SOCKS";
/// How each recorded socket sends ([`SockKey`] → [`lane_accel::MODE_REDIRECT`] or
/// [`lane_accel::MODE_STACK`]), fixed by its first message: a connection whose first message had
/// to take the stack never switches to the redirect, which could overtake bytes still in flight.
pub const LANE_SOCK_MODE: &str = "LANE_SOCK_MODE";
/// Per-CPU counters of lane acceleration, indexed by [`lane_accel`].
pub const LANE_ACCEL: &str = "LANE_ACCEL";
/// Capacity of [`LANE_SOCKS`].
pub const LANE_SOCKS_MAX: u32 = 65_536;

/// Slots of [`LANE_ACCEL`].
pub mod lane_accel {
    /// Sockets added to [`super::LANE_SOCKS`].
    pub const ADDED: u32 = 0;
    /// Messages redirected straight into the peer socket.
    pub const REDIRECTED: u32 = 1;
    /// Messages that took the normal path (no local peer in the map).
    pub const PASSED: u32 = 2;
    /// Number of slots.
    pub const COUNT: u32 = 3;
    /// [`super::LANE_SOCK_MODE`]: every message goes straight to the peer socket.
    pub const MODE_REDIRECT: u32 = 1;
    /// [`super::LANE_SOCK_MODE`]: every message takes the TCP/IP stack.
    pub const MODE_STACK: u32 = 2;
}

/// Key of [`LANE_SOCKS`]: one end of a TCP connection as its own socket sees it. Addresses in
/// network byte order, ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// This socket's address.
    pub local_ip4: u32,
    /// The peer's address.
    pub remote_ip4: u32,
    /// This socket's port.
    pub local_port: u32,
    /// The peer's port.
    pub remote_port: u32,
}

impl SockKey {
    /// The key of the other end of the same connection.
    #[must_use]
    #[inline(always)]
    pub const fn peer(&self) -> Self {
        Self {
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Capacity of [`PREFIXES`].
pub const PREFIXES_MAX: u32 = 1024;
/// Capacity of each policy slot ([`POLICY_A`], [`POLICY_B`]).
pub const POLICY_MAX: u32 = 256;
/// Capacity of each workload policy slot ([`WL_POLICY_A`], [`WL_POLICY_B`]).
pub const WL_POLICY_MAX: u32 = 1024;
/// Capacity of [`IFACES`].
pub const IFACES_MAX: u32 = 256;
/// Capacity of [`CGROUPS`].
pub const CGROUPS_MAX: u32 = 256;
/// Capacity of [`CONNTRACK`].
pub const CONNTRACK_MAX: u32 = 65_536;

/// Value of [`PREFIXES`]: the identity a prefix belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixValue {
    /// [`crate::Identity`] id.
    pub identity: u8,
    /// Explicit padding (zero).
    pub pad: [u8; 3],
}

/// Key of [`POLICY_A`] and [`POLICY_B`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    /// Source [`crate::Identity`] id.
    pub src: u8,
    /// Destination [`crate::Identity`] id.
    pub dst: u8,
    /// IP protocol number (1 ICMP, 6 TCP, 17 UDP).
    pub proto: u8,
    /// [`SCOPE_QUADRANT`] or [`SCOPE_SOME_WORKLOAD`].
    pub scope: u8,
}

/// [`PolicyKey::scope`]: allowed for every process of the source identity.
pub const SCOPE_QUADRANT: u8 = 0;
/// [`PolicyKey::scope`]: allowed for some workload of the source quadrant, by a rule naming its
/// SPIFFE ID. The packet programs, which cannot tell the workloads of a quadrant apart, pass such
/// flows; the cgroup programs allow them only to the named workload's cgroup ([`WL_POLICY_A`]).
pub const SCOPE_SOME_WORKLOAD: u8 = 1;

/// Key of [`WL_POLICY_A`] and [`WL_POLICY_B`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WlPolicyKey {
    /// Cgroup id of the workload's cgroup (`<quadrant cgroup>/<workload>`).
    pub cgroup_id: u64,
    /// Destination [`crate::Identity`] id.
    pub dst: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Explicit padding (zero): part of the hash key.
    pub pad: [u8; 6],
}

/// Maximum port ranges one (source, destination, protocol) entry holds.
pub const MAX_PORT_RANGES: usize = 8;

/// Value of [`POLICY_A`] and [`POLICY_B`]: the destination port ranges allowed for one key. For ICMP the ranges are
/// ignored and the presence of the entry (with `count > 0`) allows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyValue {
    /// Number of valid entries in `ranges`.
    pub count: u32,
    /// Inclusive destination port ranges.
    pub ranges: [PortRange; MAX_PORT_RANGES],
}

/// Value of [`IFACES`]: the quadrant whose host-side veth this ifindex is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceValue {
    /// [`crate::Quadrant`] id.
    pub quadrant: u8,
    /// Explicit padding (zero).
    pub pad: [u8; 3],
}

/// Value of [`CGROUPS`]: the quadrant a cgroup (by id) belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupValue {
    /// [`crate::Quadrant`] id.
    pub quadrant: u8,
    /// Explicit padding (zero).
    pub pad: [u8; 3],
}

/// Value of [`QUADRANTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuadrantValue {
    /// The quadrant's workload address inside its namespace (network byte order), used to find
    /// the reply direction of a flow from a socket hook. Zero if not up.
    pub addr: u32,
}

/// Value of [`CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Depth of the quadrant cgroups below the cgroup2 root (`/quadrant/dx` is 2): the cgroup
    /// programs look up the caller's ancestor at this level.
    pub cgroup_level: u32,
    /// Idle time after which a tracked flow no longer counts as established, in seconds.
    pub ct_timeout_secs: u32,
    /// Which policy map is live: 0 = [`POLICY_A`], 1 = [`POLICY_B`]. The agent fills the other
    /// one completely, then flips this with one array update, so a new policy takes effect all
    /// at once.
    pub policy_slot: u32,
    /// Bit `1 << quadrant id` set: that quadrant's policy names single workloads, so raw IP and
    /// packet sockets are refused there (written with the same update as `policy_slot`).
    pub raw_sockets_denied: u32,
}

/// Key of [`CONNTRACK`]: one direction of a flow as seen on the wire. Addresses and ports in
/// network byte order. For ICMP echo both ports hold the echo identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Source address.
    pub saddr: u32,
    /// Destination address.
    pub daddr: u32,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Explicit padding (zero).
    pub pad: [u8; 3],
}

impl CtKey {
    /// The key of the opposite direction.
    #[must_use]
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            pad: [0; 3],
        }
    }
}

/// Value of [`CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` when the flow was last seen.
    pub last_seen_ns: u64,
    /// Source identity of the direction that opened the flow.
    pub src: u8,
    /// Destination identity of the direction that opened the flow.
    pub dst: u8,
    /// Explicit padding (zero).
    pub pad: [u8; 6],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and have no implicit padding
    // (checked by the size assertions below), so every bit pattern is valid.
    unsafe impl aya::Pod for super::PrefixValue {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::WlPolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::IfaceValue {}
    unsafe impl aya::Pod for super::CgroupValue {}
    unsafe impl aya::Pod for super::QuadrantValue {}
    unsafe impl aya::Pod for super::DataplaneConfig {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::SockKey {}
}

// No implicit padding: every byte of a key is hashed, and the agent and kernel must agree.
const _: () = {
    assert!(size_of::<PrefixValue>() == 4);
    assert!(size_of::<PolicyKey>() == 4);
    assert!(size_of::<PolicyValue>() == 4 + 4 * MAX_PORT_RANGES);
    assert!(size_of::<IfaceValue>() == 4);
    assert!(size_of::<CgroupValue>() == 4);
    assert!(size_of::<QuadrantValue>() == 4);
    assert!(size_of::<DataplaneConfig>() == 16);
    assert!(size_of::<CtKey>() == 16);
    assert!(size_of::<WlPolicyKey>() == 16);
    assert!(size_of::<CtValue>() == 16);
};
