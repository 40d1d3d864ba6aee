//! The quadrant decision shared by every program: classify addresses into identities, honour
//! tracked flows, look up the policy, count the verdict.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use dataplane_common::{
    Hook, Identity, Reason,
    maps::{
        CtKey, CtValue, DataplaneConfig, PolicyKey, SCOPE_QUADRANT, SCOPE_SOME_WORKLOAD,
        WlPolicyKey,
    },
    reason::stats_index,
};

use crate::{
    maps::{CONFIG, CONNTRACK, POLICY_A, POLICY_B, PREFIXES, STATS, WL_POLICY_A, WL_POLICY_B},
    parse::Ipv4Flow,
};

/// Which way a packet crosses a quadrant's host-side veth.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sent by the quadrant (XDP and tc ingress on the host side).
    FromQuadrant,
    /// Delivered into the quadrant (tc egress on the host side).
    IntoQuadrant,
}

const NS_PER_SEC: u64 = 1_000_000_000;
/// Used when the agent has not written CONFIG yet.
const DEFAULT_CT_TIMEOUT_SECS: u32 = 120;

/// Adds one to the per-CPU counter of (hook, quadrant slot, reason).
#[inline(always)]
pub fn count(hook: Hook, slot: u32, reason: Reason) {
    if let Some(ptr) = STATS.get_ptr_mut(stats_index(hook, slot, reason)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *ptr += 1 };
    }
}

/// The identity of an IPv4 address (network byte order): the longest matching prefix, or world.
#[inline(always)]
pub fn identity_of(addr: u32) -> u8 {
    match PREFIXES.get(Key::new(32, addr)) {
        Some(v) => v.identity,
        None => Identity::World as u8,
    }
}

#[inline(always)]
fn config() -> DataplaneConfig {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => DataplaneConfig {
            cgroup_level: 0,
            ct_timeout_secs: DEFAULT_CT_TIMEOUT_SECS,
            policy_slot: 0,
            raw_sockets_denied: 0,
        },
    }
}

/// Whether `key` is a tracked direction seen within the timeout; refreshes it if so.
#[inline(always)]
fn established(key: &CtKey, now: u64) -> bool {
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return false;
    };
    let timeout = u64::from(config().ct_timeout_secs) * NS_PER_SEC;
    // SAFETY: the pointer comes from a successful map lookup; concurrent writers only store
    // whole u64 timestamps, a torn read is not possible for an aligned u64.
    unsafe {
        if now.saturating_sub((*entry).last_seen_ns) > timeout {
            return false;
        }
        (*entry).last_seen_ns = now;
    }
    true
}

/// Decides a packet crossing the veth of quadrant `quadrant`. With `track`, a flow the policy
/// allows is recorded so that both of its directions pass later.
#[inline(always)]
pub fn decide_packet(flow: &Ipv4Flow, quadrant: u8, dir: Direction, track: bool) -> Reason {
    let src = identity_of(flow.saddr);
    let dst = identity_of(flow.daddr);
    match dir {
        Direction::FromQuadrant if src != quadrant => return Reason::DenySpoofed,
        Direction::IntoQuadrant if dst != quadrant => return Reason::DenyMisrouted,
        _ => {}
    }
    let key = CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        pad: [0; 3],
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if established(&key, now) || established(&key.reversed(), now) {
        return Reason::AllowEstablished;
    }
    if !policy_allows(src, dst, flow.proto, flow.dport) {
        return Reason::DenyPolicy;
    }
    if track {
        let value = CtValue {
            last_seen_ns: now,
            src,
            dst,
            pad: [0; 6],
        };
        // A full LRU map evicts the oldest flow; a failed insert only means the next packet of
        // this flow is decided by policy again.
        let _ = CONNTRACK.insert(key, value, 0);
    }
    Reason::AllowPolicy
}

/// Whether a policy entry of `scope` allows `proto` to `dport` (network order) from `src` to
/// `dst`, in the live slot.
#[inline(always)]
fn scoped_policy_allows(slot: u32, src: u8, dst: u8, proto: u8, dport: u16, scope: u8) -> bool {
    let key = PolicyKey {
        src,
        dst,
        proto,
        scope,
    };
    let map = if slot == 0 { &POLICY_A } else { &POLICY_B };
    // SAFETY: the value is only read while the program runs.
    match unsafe { map.get(key) } {
        Some(v) => v.allows(proto, u16::from_be(dport)),
        None => false,
    }
}

/// Packet layer: whether the policy allows `proto` to `dport` (network order) from `src` to
/// `dst` for every process of `src`, or for some workload of it (the packet cannot tell which;
/// the cgroup programs decide that for the socket).
#[inline(always)]
pub fn policy_allows(src: u8, dst: u8, proto: u8, dport: u16) -> bool {
    // One live slot for the whole decision; the agent never writes the live slot.
    let slot = config().policy_slot;
    scoped_policy_allows(slot, src, dst, proto, dport, SCOPE_QUADRANT)
        || scoped_policy_allows(slot, src, dst, proto, dport, SCOPE_SOME_WORKLOAD)
}

/// Socket layer: whether the policy allows `proto` to `dport` from `src` to `dst` for every
/// process of `src`.
#[inline(always)]
pub fn quadrant_policy_allows(src: u8, dst: u8, proto: u8, dport: u16) -> bool {
    scoped_policy_allows(config().policy_slot, src, dst, proto, dport, SCOPE_QUADRANT)
}

/// Socket layer: whether a rule naming the workload whose cgroup id is `cgroup_id` allows
/// `proto` to `dport` (network order) towards `dst`.
#[inline(always)]
pub fn workload_policy_allows(cgroup_id: u64, dst: u8, proto: u8, dport: u16) -> bool {
    let key = WlPolicyKey {
        cgroup_id,
        dst,
        proto,
        pad: [0; 6],
    };
    let map = if config().policy_slot == 0 {
        &WL_POLICY_A
    } else {
        &WL_POLICY_B
    };
    // SAFETY: the value is only read while the program runs.
    match unsafe { map.get(key) } {
        Some(v) => v.allows(proto, u16::from_be(dport)),
        None => false,
    }
}

/// The agent-configured depth of quadrant cgroups.
#[inline(always)]
pub fn cgroup_level() -> u32 {
    config().cgroup_level
}

/// Whether raw IP and packet sockets are refused in quadrant `quadrant`.
#[inline(always)]
pub fn raw_sockets_denied(quadrant: u8) -> bool {
    config().raw_sockets_denied & (1 << (u32::from(quadrant) & 31)) != 0
}

/// Whether a tracked flow has `peer:peer_port` → `local:local_port` as one of its directions
/// (a socket answering a flow someone else opened). Network byte order.
#[inline(always)]
pub fn is_reply(local: u32, local_port: u16, peer: u32, peer_port: u16, proto: u8) -> bool {
    let key = CtKey {
        saddr: peer,
        daddr: local,
        sport: peer_port,
        dport: local_port,
        proto,
        pad: [0; 3],
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    established(&key, now)
}
