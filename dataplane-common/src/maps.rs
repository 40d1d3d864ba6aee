//! Map names, sizes, keys and values shared by kernel and agent.
//!
//! The agent never spells a map name itself: it uses these constants.

use crate::policy::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, PortRange};

/// LPM trie: IPv4 prefix → [`PrefixValue`]. Written by the agent, read by tc and XDP.
pub const PREFIXES: &str = "PREFIXES";
/// Array: [`PolicyKey::index`] → [`PolicyValue`] (empty: nothing allowed), slot 0 of the
/// double-buffered policy. An array, not a hash: the key space is small and dense, and the
/// verifier turns an array lookup into a bounds check and an address computation. Written by
/// the agent while inactive, read by every program while [`DataplaneConfig::policy_slot`]
/// selects it. An array since map layout 4 (a hash of [`PolicyKey`] before).
pub const POLICY_A: &str = "POLICY_A";
/// Slot 1 of the double-buffered policy (see [`POLICY_A`]).
pub const POLICY_B: &str = "POLICY_B";
/// Hash: ifindex → [`IfaceValue`]. Written by the agent, read by tc and XDP.
pub const IFACES: &str = "IFACES";
/// Hash: cgroup id → [`CgroupValue`]. Written by the agent, read by the cgroup programs.
pub const CGROUPS: &str = "CGROUPS";
/// Array\[1\]: [`DataplaneConfig`]. Written by the agent, read by every program.
pub const CONFIG: &str = "CONFIG";
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

/// Ring buffer of [`TraceRecord`]s: the flow events — every drop, and every flow a tc program
/// starts tracking ([`EVENT_FLOW_OPEN`]) or sees a FIN or RST of ([`EVENT_FLOW_CLOSE`]), while
/// [`EVENTS_LIMIT`] allows them — and every verdict [`DataplaneConfig::trace`] asks for. Written
/// by every decision program, read by the agent. Not pinned: each agent reads the one of the
/// programs it loaded.
pub const TRACE: &str = "TRACE";
/// Per-CPU array, one [`EventsLimit`]: each CPU's budget of flow events and what it lost. The
/// agent sets the rate and burst before attaching; the programs keep the rest. Not pinned.
pub const EVENTS_LIMIT: &str = "EVENTS_LIMIT";

/// One CPU's flow-event budget (a token bucket kept in nanoseconds of credit, as Cilium's
/// `ratelimit.h` keeps it) and its counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventsLimit {
    /// Flow events this CPU may write per second (0: no flow events; the trace still writes).
    pub per_sec: u32,
    /// How many it may write at once after a quiet spell.
    pub burst: u32,
    /// What one event costs, ns of credit: `1e9 / per_sec` (0: no limit), computed by the
    /// agent so that the programs do not divide.
    pub cost_ns: u64,
    /// The most credit there is: `burst` events' worth.
    pub cap_ns: u64,
    /// Credit left, ns.
    pub credit_ns: u64,
    /// When the credit was last brought up to date (`bpf_ktime_get_coarse_ns`: the tick's
    /// resolution is plenty for a budget of events per second, and it costs less).
    pub last_ns: u64,
    /// Records written.
    pub written: u64,
    /// Flow events not written: over the budget.
    pub lost_rate_limit: u64,
    /// Records not written: the ring buffer was full (the agent did not keep up).
    pub lost_ring_full: u64,
}

impl EventsLimit {
    /// A budget of `per_sec` events a second, `burst` at once (0 a second: no flow events;
    /// above a billion: no limit), its counts at zero.
    #[must_use]
    pub fn new(per_sec: u32, burst: u32) -> Self {
        let cost_ns = if per_sec == 0 {
            0
        } else {
            1_000_000_000 / u64::from(per_sec)
        };
        Self {
            per_sec,
            burst,
            cost_ns,
            cap_ns: cost_ns.saturating_mul(u64::from(burst.max(1))),
            ..Self::default()
        }
    }
}
/// Size of [`TRACE`] in bytes (a power of two and a multiple of the page size): 8,192 records.
pub const TRACE_BYTES: u32 = 256 * 1024;

/// [`TraceRecord::kind`]: a packet; every address and port field is set.
pub const TRACE_PACKET: u8 = 0;
/// [`TraceRecord::kind`]: `connect`/`sendmsg`; the destination fields and `proto` are set.
pub const TRACE_DESTINATION: u8 = 1;
/// [`TraceRecord::kind`]: nothing parsed (a malformed frame, ARP, an unknown interface,
/// `sock_create`).
pub const TRACE_NOTHING: u8 = 2;

/// One traced verdict (record of [`TRACE`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceRecord {
    /// Source address (network byte order).
    pub saddr: u32,
    /// Destination address (network byte order).
    pub daddr: u32,
    /// Source port (network byte order).
    pub sport: u16,
    /// Destination port (network byte order).
    pub dport: u16,
    /// [`crate::Hook`] id.
    pub hook: u8,
    /// Quadrant slot ([`crate::reason::UNATTRIBUTED_SLOT`] when none).
    pub slot: u8,
    /// [`crate::Reason`] id.
    pub reason: u8,
    /// IP protocol number.
    pub proto: u8,
    /// [`TRACE_PACKET`], [`TRACE_DESTINATION`] or [`TRACE_NOTHING`].
    pub kind: u8,
    /// [`EVENT_VERDICT`], [`EVENT_FLOW_OPEN`] or [`EVENT_FLOW_CLOSE`] (program set 13; zero
    /// padding before).
    pub event: u8,
    /// A packet's TCP flags byte, or its ICMP type.
    pub l4_flags: u8,
    /// Explicit padding (zero).
    pub pad: u8,
}

/// [`TraceRecord::event`]: a verdict (a drop, or any verdict the trace asks for).
pub const EVENT_VERDICT: u8 = 0;
/// [`TraceRecord::event`]: a tc program started tracking this flow (its first allowed packet).
pub const EVENT_FLOW_OPEN: u8 = 1;
/// [`TraceRecord::event`]: an allowed TCP segment with FIN or RST.
pub const EVENT_FLOW_CLOSE: u8 = 2;

/// Every map the dataplane object defines, for pinning and status.
pub const ALL: [&str; 30] = [
    PREFIXES,
    POLICY_A,
    POLICY_B,
    WL_POLICY_A,
    WL_POLICY_B,
    IFACES,
    CGROUPS,
    CONFIG,
    CONNTRACK,
    STATS,
    LANE_SOCKS,
    LANE_SOCK_MODE,
    LANE_ACCEL,
    crate::breaker::BREAKERS,
    crate::breaker::BREAKER_LIMITS,
    crate::breaker::BREAKER_PROBES,
    crate::breaker::BREAKER_CONNS,
    crate::breaker::BREAKER_ADMISSION,
    crate::lb::LB_SERVICES,
    crate::lb::LB_BACKENDS,
    crate::lb::LB_ACTIVE,
    crate::lb::LB_SOCKS,
    crate::lb::LB_PORTS,
    crate::lb::LB_LISTENERS,
    crate::lb::LB_MAGLEV,
    crate::lb::LB_FLOWS,
    crate::lb::LB_EXPIRED,
    crate::chaos::CHAOS_ARMED,
    crate::chaos::CHAOS_FAULTS,
    crate::chaos::CHAOS_RESETS,
];

/// Established TCP sockets of the quadrants' workloads ([`SockKey`] → socket), for the `sk_msg`
/// redirect of local TCP lanes (only populated when lane acceleration is on).
pub const LANE_SOCKS: &str = "LANE_SOCKS";
/// Each recorded socket's state ([`SockKey`] → flags of [`lane_accel`]): whether this end opened
/// the connection ([`lane_accel::OPENED_HERE`], set when it is established) and how it sends
/// ([`lane_accel::MODE_REDIRECT`] or [`lane_accel::MODE_STACK`] under [`lane_accel::MODE_MASK`]),
/// fixed by its first message: a connection whose first message had to take the stack never
/// switches to the redirect, which could overtake bytes still in flight.
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
    /// Messages of redirected connections refused because the policy no longer allows the flow
    /// that opened the connection (the sender gets `EACCES`).
    pub const REFUSED: u32 = 3;
    /// Number of slots.
    pub const COUNT: u32 = 4;
    /// [`super::LANE_SOCK_MODE`]: the bits holding the sending mode (0: not decided yet).
    pub const MODE_MASK: u32 = 0xff;
    /// [`super::LANE_SOCK_MODE`]: this end opened the connection (`connect`), so the flow that
    /// the policy must keep allowing runs from its address to its peer's port; otherwise from the
    /// peer's address to this end's port.
    pub const OPENED_HERE: u32 = 1 << 8;
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
/// Identity ids the policy index has room for ([`crate::identity::IDENTITY_COUNT`] rounded up
/// to a power of two).
pub const POLICY_IDENTITY_SLOTS: u32 = 8;
/// Protocols the policy index has room for: ICMP, TCP, UDP and one spare.
pub const POLICY_PROTO_SLOTS: u32 = 4;
/// Scopes of a policy entry ([`SCOPE_QUADRANT`], [`SCOPE_PACKET`]).
pub const POLICY_SCOPES: u32 = 2;
/// Entries of each policy slot ([`POLICY_A`], [`POLICY_B`]): one per possible [`PolicyKey`].
pub const POLICY_MAX: u32 =
    POLICY_SCOPES * POLICY_PROTO_SLOTS * POLICY_IDENTITY_SLOTS * POLICY_IDENTITY_SLOTS;
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
    /// [`SCOPE_QUADRANT`] or [`SCOPE_PACKET`].
    pub scope: u8,
}

impl PolicyKey {
    /// The key's entry in [`POLICY_A`]/[`POLICY_B`]; `None` for a protocol other than ICMP, TCP
    /// and UDP (never allowed) or an identity, scope out of range.
    #[must_use]
    #[inline(always)]
    pub const fn index(&self) -> Option<u32> {
        let proto = match self.proto {
            PROTO_ICMP => 0,
            PROTO_TCP => 1,
            PROTO_UDP => 2,
            _ => return None,
        };
        let (src, dst, scope) = (self.src as u32, self.dst as u32, self.scope as u32);
        if src >= POLICY_IDENTITY_SLOTS || dst >= POLICY_IDENTITY_SLOTS || scope >= POLICY_SCOPES {
            return None;
        }
        Some(
            ((scope * POLICY_PROTO_SLOTS + proto) * POLICY_IDENTITY_SLOTS + src)
                * POLICY_IDENTITY_SLOTS
                + dst,
        )
    }
}

/// [`PolicyKey::scope`]: allowed for every process of the source identity (read by the cgroup
/// programs, which then consult [`WL_POLICY_A`] for the caller's workload).
pub const SCOPE_QUADRANT: u8 = 0;
/// [`PolicyKey::scope`]: what a packet of the source identity may carry — the quadrant-wide
/// allowance joined with every rule naming one of its workloads' SPIFFE IDs (a packet cannot say
/// which process sent it; the cgroup programs decide that for the socket). The packet programs
/// decide with this one lookup. Since program set 4; before, they looked up scope 0 and then a
/// scope 1 that held only the workload rules.
pub const SCOPE_PACKET: u8 = 1;

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

/// Value of [`CGROUPS`]: the quadrant instance a cgroup (by id) belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupValue {
    /// [`crate::Quadrant`] id.
    pub quadrant: u8,
    /// Which instance of the quadrant (0: the quadrant's first, named after it).
    pub instance: u8,
    /// Explicit padding (zero).
    pub pad: [u8; 2],
    /// The instance's address inside its namespace (network byte order), the local end of the
    /// flows its sockets answer.
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
    pub raw_sockets_denied: u16,
    /// Verdict trace: [`TRACE_OFF`], [`TRACE_DROPS`] or [`TRACE_ALL`] (program set 6; the half
    /// of what was a `u32` bit mask of four quadrants, so a CONFIG written by either layout reads
    /// the same in the other).
    pub trace: u16,
}

/// [`DataplaneConfig::trace`]: no trace (every program pays one comparison).
pub const TRACE_OFF: u16 = 0;
/// [`DataplaneConfig::trace`]: one log record per dropped packet or refused operation.
pub const TRACE_DROPS: u16 = 1;
/// [`DataplaneConfig::trace`]: one log record per verdict.
pub const TRACE_ALL: u16 = 2;

/// Key of [`CONNTRACK`]: a flow, both of its directions under one key. The two endpoints
/// (address, port) are ordered, lower first, so a packet and its reply find the same entry with
/// one lookup; [`CtValue::opened_by_hi`] remembers which end opened the flow. Addresses and
/// ports in network byte order. For ICMP echo both ports hold the echo identifier. Since map
/// layout 4; layouts 1 to 3 keyed one direction (source first) and were looked up both ways.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Address of the lower endpoint.
    pub lo_addr: u32,
    /// Address of the higher endpoint.
    pub hi_addr: u32,
    /// Port of the lower endpoint.
    pub lo_port: u16,
    /// Port of the higher endpoint.
    pub hi_port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Explicit padding (zero).
    pub pad: [u8; 3],
}

impl CtKey {
    /// The key of the flow a packet from `saddr:sport` to `daddr:dport` belongs to, and whether
    /// that packet's source is the key's higher endpoint.
    #[must_use]
    #[inline(always)]
    pub const fn of(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> (Self, bool) {
        let src_is_hi = saddr > daddr || (saddr == daddr && sport > dport);
        let key = if src_is_hi {
            Self {
                lo_addr: daddr,
                hi_addr: saddr,
                lo_port: dport,
                hi_port: sport,
                proto,
                pad: [0; 3],
            }
        } else {
            Self {
                lo_addr: saddr,
                hi_addr: daddr,
                lo_port: sport,
                hi_port: dport,
                proto,
                pad: [0; 3],
            }
        };
        (key, src_is_hi)
    }
}

/// Value of [`CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    /// The monotonic clock (coarse since program set 4) when the flow was last seen, in ns.
    pub last_seen_ns: u64,
    /// Source identity of the direction that opened the flow.
    pub src: u8,
    /// Destination identity of the direction that opened the flow.
    pub dst: u8,
    /// 1 when the key's higher endpoint opened the flow, 0 when the lower one did.
    pub opened_by_hi: u8,
    /// Explicit padding (zero).
    pub pad: [u8; 5],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and have no implicit padding
    // (checked by the size assertions below), so every bit pattern is valid.
    unsafe impl aya::Pod for super::PrefixValue {}
    // SAFETY: as above, for PolicyKey.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above, for WlPolicyKey.
    unsafe impl aya::Pod for super::WlPolicyKey {}
    // SAFETY: as above, for PolicyValue.
    unsafe impl aya::Pod for super::PolicyValue {}
    // SAFETY: as above, for IfaceValue.
    unsafe impl aya::Pod for super::IfaceValue {}
    // SAFETY: as above, for CgroupValue.
    unsafe impl aya::Pod for super::CgroupValue {}
    // SAFETY: as above, for DataplaneConfig.
    unsafe impl aya::Pod for super::DataplaneConfig {}
    // SAFETY: as above, for CtKey.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above, for CtValue.
    unsafe impl aya::Pod for super::CtValue {}
    // SAFETY: as above, for SockKey.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above, for TraceRecord.
    unsafe impl aya::Pod for super::TraceRecord {}
    // SAFETY: as above, for EventsLimit.
    unsafe impl aya::Pod for super::EventsLimit {}
}

// No implicit padding: every byte of a key is hashed, and the agent and kernel must agree.
const _: () = {
    assert!(size_of::<PrefixValue>() == 4);
    assert!(size_of::<EventsLimit>() == 64);
    assert!(size_of::<TraceRecord>() == 20);
    assert!(size_of::<PolicyKey>() == 4);
    assert!(size_of::<PolicyValue>() == 4 + 4 * MAX_PORT_RANGES);
    assert!(size_of::<IfaceValue>() == 4);
    assert!(size_of::<CgroupValue>() == 8);
    assert!(size_of::<DataplaneConfig>() == 16);
    assert!(size_of::<CtKey>() == 16);
    assert!(size_of::<WlPolicyKey>() == 16);
    assert!(size_of::<CtValue>() == 16);
};

#[cfg(test)]
mod tests {
    use super::{CtKey, EventsLimit};

    #[test]
    fn an_events_budget_is_computed_for_the_programs() {
        let l = EventsLimit::new(1_000, 200);
        assert_eq!((l.cost_ns, l.cap_ns), (1_000_000, 200_000_000));
        assert_eq!(EventsLimit::new(0, 0).cost_ns, 0, "off: per_sec 0 says so");
        let unlimited = EventsLimit::new(u32::MAX, u32::MAX);
        assert_eq!((unlimited.cost_ns, unlimited.cap_ns), (0, 0));
        assert_eq!(
            EventsLimit::new(1, 0).cap_ns,
            1_000_000_000,
            "a burst of at least one"
        );
    }

    #[test]
    fn both_directions_of_a_flow_have_one_key() {
        let (a, b) = (
            u32::from_ne_bytes([10, 240, 0, 2]),
            u32::from_ne_bytes([10, 240, 1, 2]),
        );
        let (out, out_hi) = CtKey::of(a, b, 40_000, 443, 6);
        let (back, back_hi) = CtKey::of(b, a, 443, 40_000, 6);
        assert_eq!(out, back);
        assert_ne!(
            out_hi, back_hi,
            "exactly one direction starts at the higher end"
        );
        // Same addresses: the ports order the ends.
        let (l, l_hi) = CtKey::of(a, a, 5000, 6000, 17);
        let (r, r_hi) = CtKey::of(a, a, 6000, 5000, 17);
        assert_eq!(l, r);
        assert!(!l_hi && r_hi);
        // Other flows stay apart.
        assert_ne!(out, CtKey::of(a, b, 40_001, 443, 6).0);
        assert_ne!(out, CtKey::of(a, b, 40_000, 443, 17).0);
        assert_ne!(out, CtKey::of(b, a, 40_000, 443, 6).0);
    }
}
