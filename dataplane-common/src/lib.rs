//! Types shared by the quadrant eBPF programs (`dataplane-ebpf`) and the agent.
//!
//! Everything here is `no_std`, `#[repr(C)]` and free of implicit padding, because the same bytes
//! are written by one side and read by the other through BPF maps. The agent enables the `user`
//! feature, which adds `aya::Pod` impls.
#![no_std]
#![expect(
    clippy::inline_always,
    reason = "these helpers run inside eBPF programs, where inlining keeps the verifier's view of bounds intact"
)]

/// Version of the eBPF program set (the programs, their hooks and what they decide). An agent
/// refuses to start on a host where a newer program set ran: upgrades only move forward.
/// 1: the isolation programs; 2: with the lane acceleration programs; 3: the cgroup programs
/// also allow what rules naming the caller's workload allow, and `sock_create` refuses raw
/// sockets where such rules exist; 4: the packet programs decide with one policy lookup (scope 1
/// holds the quadrant's and its workloads' allowance joined), XDP consults flow state only for
/// what the policy refuses, and flow timestamps come from the coarse monotonic clock; 5: a tracked
/// flow passes only while the policy allows the direction that opened it (a reload that revokes
/// a flow ends its established connections: packets dropped, `sk_msg` refuses redirected
/// messages with `EACCES`, `sendmsg` no longer takes datagrams for its replies); 6: the verdict
/// trace (`CONFIG.trace`, records through aya-log's `AYA_LOGS` ring buffer); 7: circuit breakers
/// (`connect4`/`sendmsg4` refuse an open breaker with `ECONNREFUSED`; the breaker `sock_ops` on
/// every quadrant cgroup counts failed connects and opens, probes and closes breakers); 8: UDP
/// breakers (the tc program delivering into a quadrant counts the ICMP port-unreachables its
/// datagrams earn; `sendmsg4`/`connect4` let one datagram probe a UDP breaker past its ejection,
/// and a `connect` through a closed breaker draws against the agent's admission-control
/// probability); 9: quadrant instances and service VIPs (`connect4`/`sendmsg4` translate a
/// VIP to a ready instance, least active connections per unit of capacity; `getpeername4` and
/// `recvmsg4` restore the VIP; the breaker `sock_ops` also ends a translated connection's count;
/// a socket's replies are found from its instance's address in `CGROUPS`); 10: connections to
/// a VIP from outside the quadrants (the host, or the world forwarded by it) are translated per
/// packet in tc — the tc egress of the veth the VIP is routed to picks the backend at the
/// connection's first packet and redirects it to that instance's veth, the tc ingress of every
/// veth gives the answers the VIP back (`LB_FLOWS`); 11: chaos faults (`CHAOS_FAULTS`, each
/// ending by itself at its expiry): tc egress drops or delays packets delivered into a quadrant,
/// `connect4`/`sendmsg4` refuse with `ECONNREFUSED`; 12: a reset fault (`Fault::flags`) makes
/// tc egress deliver a segment of an established TCP connection with RST set; 13: flow events —
/// every drop, every flow tc starts tracking and every FIN or RST of one go to `TRACE` within each
/// CPU's budget (`EVENTS_LIMIT`), records name the event and carry the TCP flags or ICMP type;
/// 14: the read-only global `CHAOS_ENABLED` — 0 when the agent runs with chaos off, so the
/// verifier removes every fault check; 15: an outside connection to a VIP passes over a backend
/// whose tuple a live flow holds, and a SYN straight to an instance on the tuple of a live
/// translated connection is dropped (`drop_tuple_in_use`; the reverse entry's
/// `LB_FLOW_REDIRECTING` tells the translated SYN's own second pass apart); 16: the cgroup
/// programs find a Kubernetes pod's cgroup the CNI plugin registered at whatever level it sits
/// (after the quadrants' fixed level, the nearest registered ancestor up to level 6); 17: tc
/// translates connections from the host and the world to this node's instances only (a backend
/// without a veth is a peer node's instance, which the quadrants' sockets reach at `connect()`).
pub const PROGRAM_SET_VERSION: u32 = 17;

/// Version of the map layout (names, key and value layouts). Same forward-only rule.
/// 1: the isolation maps; 2: with `LANE_SOCKS`, `LANE_SOCK_MODE` and `LANE_ACCEL`; 3: with
/// `WL_POLICY_A`/`WL_POLICY_B`, the scope byte of the policy key, `CONFIG.raw_sockets_denied`
/// and the `sock_create` hook's counters; 4: `CONNTRACK` keys a flow by its ordered endpoints
/// (one entry and one lookup for both directions) and records which end opened it; 5:
/// `LANE_SOCK_MODE` also records which end of a connection opened it, `LANE_ACCEL` counts
/// refused messages; 6: `BREAKERS`, `BREAKER_LIMITS`, `BREAKER_PROBES`, `BREAKER_CONNS` and the
/// `sock_ops` hook's counters; 7: `BREAKER_ADMISSION` (and `BreakerLimits::admission` where
/// layout 6 had padding); 8: `CGROUPS` values name the instance and its address, the
/// `LB_SERVICES`, `LB_BACKENDS`, `LB_ACTIVE` and `LB_SOCKS` maps, and the counters of the
/// `getpeername4` and `recvmsg4` hooks; 9: `LB_FLOWS`, `LB_EXPIRED` and `LbBackend::ifindex`;
/// 10: `CHAOS_ARMED` and `CHAOS_FAULTS` (not carried over: a takeover ends every fault); 11:
/// `Fault::flags` where layout 10 had padding (a reset fault; a layout-10 dataplane would read
/// it as a drop, so the controller arms one only on layout 11 or later) and `CHAOS_RESETS`.
pub const MAP_LAYOUT_VERSION: u32 = 11;

/// The oldest map layout whose `CONNTRACK` entries are today's [`maps::CtKey`] → [`maps::CtValue`]:
/// an agent taking over a running dataplane of this layout or newer carries every tracked flow
/// over as it is. Layouts 1 to 3 keyed each flow by the direction that opened it; the takeover
/// converts those entries (see [`DIRECTED_CONNTRACK_LAYOUTS`]). A layout that changes the types
/// again raises this and teaches the takeover the conversion; until then an older layout is
/// refused rather than dropping flows.
pub const CONNTRACK_LAYOUT_SINCE: u32 = 4;

/// The map layouts whose `CONNTRACK` keys are one direction of a flow (source address and port
/// first), with a 16-byte value whose first 10 bytes mean what [`maps::CtValue`]'s do.
pub const DIRECTED_CONNTRACK_LAYOUTS: core::ops::RangeInclusive<u32> = 1..=3;

/// The oldest map layout whose `STATS` indices mean what [`reason::stats_index`] computes today
/// (later layouts only append hooks, so an older, smaller `STATS` is copied index for index);
/// the counters of an older dataplane are not carried over (they restart from zero).
pub const STATS_LAYOUT_SINCE: u32 = 2;

pub mod breaker;
pub mod chaos;
pub mod identity;
pub mod lb;
pub mod maps;
pub mod policy;
pub mod reason;

pub use identity::{Identity, QUADRANT_COUNT, Quadrant};
pub use reason::{Hook, Reason, Verdict};
