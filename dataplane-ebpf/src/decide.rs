//! The quadrant decision shared by every program: classify addresses into identities, honour
//! tracked flows, look up the policy, count the verdict.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, maps::lpm_trie::Key};
use dataplane_common::{
    Hook, Identity, Reason,
    maps::{
        CgroupValue, CtKey, CtValue, DataplaneConfig, PolicyKey, SCOPE_PACKET, SCOPE_QUADRANT,
        TRACE_OFF, WlPolicyKey,
    },
    reason::stats_index,
};

use crate::{
    maps::{
        CGROUPS, CONFIG, CONNTRACK, POLICY_A, POLICY_B, PREFIXES, STATS, WL_POLICY_A, WL_POLICY_B,
    },
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

/// Whether an IPv4 address (network byte order) lies in 127.0.0.0/8.
#[inline(always)]
pub fn is_loopback(addr: u32) -> bool {
    addr.to_ne_bytes()[0] == 127
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
            trace: TRACE_OFF,
        },
    }
}

/// If `key` is a flow seen within the timeout: refreshes it and returns whether its higher
/// endpoint opened it.
#[inline(always)]
fn established(key: &CtKey, cfg: &DataplaneConfig) -> Option<bool> {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let entry = CONNTRACK.get_ptr_mut(key)?;
    let timeout = u64::from(cfg.ct_timeout_secs) * NS_PER_SEC;
    // SAFETY: the pointer comes from a successful map lookup; concurrent writers only store
    // whole u64 timestamps, a torn read is not possible for an aligned u64.
    unsafe {
        if now.saturating_sub((*entry).last_seen_ns) > timeout {
            return None;
        }
        (*entry).last_seen_ns = now;
        Some((*entry).opened_by_hi != 0)
    }
}

/// Whether a flow on this tuple (either direction) was seen within the timeout; its entry is
/// left as it is.
#[inline(always)]
pub fn tracked(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> bool {
    let (key, _) = CtKey::of(saddr, daddr, sport, dport, proto);
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let timeout = u64::from(config().ct_timeout_secs) * NS_PER_SEC;
    // SAFETY: read-only lookup of a plain value.
    unsafe { CONNTRACK.get(key) }.is_some_and(|e| now.saturating_sub(e.last_seen_ns) <= timeout)
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
    // One read of the configuration: every lookup of this decision uses the same policy slot,
    // even while the agent flips it.
    let cfg = config();
    let allows = |from, to, port| {
        scoped_policy_allows(cfg.policy_slot, from, to, flow.proto, port, SCOPE_PACKET)
    };
    let key = || CtKey::of(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    // A connection-opening SYN belongs to no tracked flow (a new connection on a reused tuple
    // is the policy's to decide, not the old flow's). A tracked flow lives only as long as the
    // policy allows the direction that opened it: a reload that revokes it ends its
    // established connections too.
    if !track {
        // A stage that records nothing needs no flow state for what the policy allows, nor
        // when the policy allows neither direction (then no tracked flow can let it pass).
        if allows(src, dst, flow.dport) {
            return Reason::AllowPolicy;
        }
        if flow.opens || !allows(dst, src, flow.sport) {
            return Reason::DenyPolicy;
        }
        // Refused this way, allowed the other: a reply to a flow the other end opened passes.
        let (key, src_is_hi) = key();
        return match established(&key, &cfg) {
            Some(opened_by_hi) if opened_by_hi != src_is_hi => Reason::AllowEstablished,
            _ => Reason::DenyPolicy,
        };
    }
    let (key, src_is_hi) = key();
    if !flow.opens
        && let Some(opened_by_hi) = established(&key, &cfg)
    {
        // (source, destination, destination port) of the direction that opened it.
        let opener_allowed = if opened_by_hi == src_is_hi {
            allows(src, dst, flow.dport)
        } else {
            allows(dst, src, flow.sport)
        };
        return if opener_allowed {
            Reason::AllowEstablished
        } else {
            Reason::DenyPolicy
        };
    }
    if !allows(src, dst, flow.dport) {
        return Reason::DenyPolicy;
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let value = CtValue {
        last_seen_ns: now,
        src,
        dst,
        opened_by_hi: u8::from(src_is_hi),
        pad: [0; 5],
    };
    // A full LRU map evicts the oldest flow; a failed insert only means the next packet of
    // this flow is decided by policy again.
    let _ = CONNTRACK.insert(key, value, 0);
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
    let Some(index) = key.index() else {
        return false;
    };
    let map = if slot == 0 { &POLICY_A } else { &POLICY_B };
    match map.get(index) {
        Some(v) => v.allows(proto, u16::from_be(dport)),
        None => false,
    }
}

/// Packet layer: whether the policy allows `proto` to `dport` (network order) from `src` to
/// `dst` for every process of `src`, or for some workload of it (the packet cannot tell which;
/// the cgroup programs decide that for the socket): one lookup of the packet scope, which the
/// agent compiles as the union of both.
#[inline(always)]
pub fn policy_allows(src: u8, dst: u8, proto: u8, dport: u16) -> bool {
    scoped_policy_allows(config().policy_slot, src, dst, proto, dport, SCOPE_PACKET)
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

/// The deepest level a Kubernetes pod's cgroup is looked for at (`kubepods/pod<uid>` is 2,
/// `kubepods/burstable/pod<uid>` 3; a container's own cgroup one below).
const POD_MAX_LEVEL: u32 = 6;

/// The registration of the calling process's cgroup: its quadrant's (the ancestor at the
/// configured level), else a pod's the CNI plugin registered (its cgroup, at whatever level it
/// sits: the nearest registered ancestor from the root down); `None` for any other process.
#[inline(always)]
pub fn caller_cgroup() -> Option<CgroupValue> {
    let level = cgroup_level();
    // SAFETY: helper without preconditions; the level comes from the agent's configuration.
    let id = unsafe { aya_ebpf::helpers::bpf_get_current_ancestor_cgroup_id(level.cast_signed()) };
    // SAFETY: read-only lookup of a plain value.
    if let Some(v) = unsafe { CGROUPS.get(id) } {
        return Some(*v);
    }
    for l in 1..=POD_MAX_LEVEL {
        // SAFETY: as above; a level below the caller's own gives 0, which is never registered.
        let id = unsafe { aya_ebpf::helpers::bpf_get_current_ancestor_cgroup_id(l.cast_signed()) };
        if id == 0 {
            break;
        }
        // SAFETY: read-only lookup of a plain value.
        if let Some(v) = unsafe { CGROUPS.get(id) } {
            return Some(*v);
        }
    }
    None
}

/// Whether raw IP and packet sockets are refused in quadrant `quadrant`.
#[inline(always)]
pub fn raw_sockets_denied(quadrant: u8) -> bool {
    u32::from(config().raw_sockets_denied) & (1 << (u32::from(quadrant) & 15)) != 0
}

/// The verdict trace mode (`CONFIG.trace`).
#[inline(always)]
pub fn trace_mode() -> u16 {
    config().trace
}

/// Whether a tracked flow was opened by `peer:peer_port` towards `local:local_port` (a socket
/// answering a flow someone else opened) and the policy still allows that flow. Network byte
/// order.
#[inline(always)]
pub fn is_reply(local: u32, local_port: u16, peer: u32, peer_port: u16, proto: u8) -> bool {
    let (key, peer_is_hi) = CtKey::of(peer, local, peer_port, local_port, proto);
    let cfg = config();
    established(&key, &cfg) == Some(peer_is_hi)
        && scoped_policy_allows(
            cfg.policy_slot,
            identity_of(peer),
            identity_of(local),
            proto,
            local_port,
            SCOPE_PACKET,
        )
}
