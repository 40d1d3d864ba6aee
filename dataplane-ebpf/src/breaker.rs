//! Circuit breakers in the kernel (see `dataplane_common::breaker`): the check `connect4` and
//! `sendmsg4` make once the policy allowed a destination, the `sock_ops` program on each
//! quadrant's cgroup that learns how the quadrant's TCP connects end, and — for UDP — the tc
//! program delivering into a quadrant, which sees the ICMP port-unreachables its datagrams
//! earned.
//!
//! UDP breakers: `consecutive_failures` port-unreachables within [`UDP_WINDOW_NS`] open one
//! (while closed, `open_until_ns` holds the start of that window). After the ejection the next
//! datagram goes through as the probe (half-open; `open_until_ns` is then when it went) and the
//! others are refused; an unreachable for the probe reopens it for twice as long, and the first
//! datagram [`UDP_QUIET_NS`] after the probe without one closes it.
//!
//! Per breaker the fields are read and written without atomics: two CPUs failing at the same
//! instant may count one failure once, which delays the opening by one failure at most. The one
//! probe of a half-open breaker is exact: it is the `connect` whose `BPF_NOEXIST` insert into
//! `BREAKER_PROBES` succeeded.

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, sock_ops},
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::SockOpsContext,
};
use dataplane_common::{
    Reason,
    breaker::{
        BREAKER_CONNS_MAX, BREAKER_EVENTS_BYTES, BREAKERS_MAX, Breaker, BreakerEvent, BreakerKey,
        BreakerLimits, BreakerProbe, CAUSE_FAILURES, CAUSE_PROBE_FAILED, CAUSE_PROBE_STARTED,
        CAUSE_PROBE_SUCCEEDED, CLOSED, HALF_OPEN, OPEN, PROBE_STALE_NS, jitter_ns,
        next_ejection_ms,
    },
    identity::QUADRANT_COUNT_U32,
    policy::{PROTO_TCP, PROTO_UDP},
};

use crate::decide::{identity_of, is_loopback};

/// IPv4 address family.
const AF_INET: u32 = 2;

/// Port-unreachables further apart than this start counting again.
const UDP_WINDOW_NS: u64 = 10_000_000_000;
/// A UDP probe without a port-unreachable for this long succeeded.
const UDP_QUIET_NS: u64 = 1_000_000_000;

/// Breaker state. Writers: the cgroup programs, `quadrant_breaker_sockops`, the agent.
#[map(name = "BREAKERS")]
static BREAKERS: HashMap<BreakerKey, Breaker> = HashMap::with_max_entries(BREAKERS_MAX, 0);

/// \[0\] → the thresholds. Writer: agent.
#[map(name = "BREAKER_LIMITS")]
static BREAKER_LIMITS: Array<BreakerLimits> = Array::with_max_entries(1, 0);

/// The one probe of each half-open breaker. Writers: the cgroup programs (start),
/// `quadrant_breaker_sockops` (end).
#[map(name = "BREAKER_PROBES")]
static BREAKER_PROBES: HashMap<BreakerKey, BreakerProbe> =
    HashMap::with_max_entries(BREAKERS_MAX, 0);

/// Socket cookie → breaker of a connection counted (or to be counted) in `Breaker::active`.
/// Value: the key and 1 once counted. LRU: an entry whose socket never reached TCP (a connect
/// that failed locally) leaves by itself.
#[map(name = "BREAKER_CONNS")]
static BREAKER_CONNS: LruHashMap<u64, (BreakerKey, u64)> =
    LruHashMap::with_max_entries(BREAKER_CONNS_MAX, 0);

/// Admission control: the probability (ppm) with which a `connect` through a closed breaker is
/// refused. Writer: the agent.
#[map(name = "BREAKER_ADMISSION")]
static BREAKER_ADMISSION: HashMap<BreakerKey, u32> = HashMap::with_max_entries(BREAKERS_MAX, 0);

/// Transitions for the agent. Writers: the cgroup programs and `quadrant_breaker_sockops`.
#[map(name = "BREAKER_EVENTS")]
static BREAKER_EVENTS: RingBuf = RingBuf::with_byte_size(BREAKER_EVENTS_BYTES, 0);

#[inline(always)]
fn limits() -> BreakerLimits {
    BREAKER_LIMITS.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn event(key: BreakerKey, b: &Breaker, from: u32, cause: u8) {
    #[expect(clippy::cast_possible_truncation, reason = "states are below 3")]
    let record = BreakerEvent {
        at_ns: now_ns(),
        key,
        failures: b.failures,
        ejection_ms: if b.state == CLOSED { 0 } else { b.ejection_ms },
        from: from as u8,
        to: b.state as u8,
        cause,
        pad: [0; 5],
    };
    // A full ring loses the event, never the transition (the map holds the state).
    let _ = BREAKER_EVENTS.output::<BreakerEvent>(&record, 0);
}

/// Opens `b` for `ejection_ms` (plus jitter) from now.
#[inline(always)]
fn open(b: &mut Breaker, ejection_ms: u32) {
    // SAFETY: helper without preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    b.ejection_ms = ejection_ms;
    b.open_until_ns =
        now_ns() + u64::from(ejection_ms) * 1_000_000 + jitter_ns(ejection_ms, random);
    b.state = OPEN;
    b.opened += 1;
}

/// The breaker decision for a `connect` (TCP or UDP) or a `sendmsg` the policy allowed: `None`
/// lets it go on. `ctx` is the `bpf_sock_addr` context (for the socket cookie).
#[inline(always)]
pub fn at_connect(ctx: *mut c_void, key: BreakerKey, connect: bool) -> Option<Reason> {
    let tcp_connect = connect && key.proto == PROTO_TCP;
    let limits = limits();
    if limits.enabled == 0 {
        return None;
    }
    let Some(b) = BREAKERS.get_ptr_mut(key) else {
        if tcp_connect && limits.max_connections != 0 {
            // The first connection counted to this destination.
            let _ = BREAKERS.insert(key, Breaker::default(), u64::from(BPF_NOEXIST));
            track_connection(ctx, key);
        }
        return None;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let b = unsafe { &mut *b };
    if b.state == CLOSED {
        if connect && limits.admission != 0 && admission_refuses(key) {
            b.refused += 1;
            return Some(Reason::RefuseBreakerAdmission);
        }
        if tcp_connect && limits.max_connections != 0 {
            if b.active >= limits.max_connections {
                b.refused += 1;
                return Some(Reason::RefuseBreakerFull);
            }
            track_connection(ctx, key);
        }
        return None;
    }
    let now = now_ns();
    if b.state == OPEN && now < b.open_until_ns {
        b.refused += 1;
        return Some(Reason::RefuseBreakerOpen);
    }
    if !tcp_connect {
        return datagram_past_ejection(key, b, now);
    }
    // Ejection over (or a half-open breaker whose probe never reached TCP): this connect tries
    // to become the one probe.
    if b.state == HALF_OPEN {
        // SAFETY: read-only lookup of a plain value.
        let stale = unsafe { BREAKER_PROBES.get(key) }
            .is_none_or(|p| now.saturating_sub(p.started_ns) > PROBE_STALE_NS);
        if !stale {
            b.refused += 1;
            return Some(Reason::RefuseBreakerOpen);
        }
        let _ = BREAKER_PROBES.remove(key);
    }
    // SAFETY: the context is the program's own `bpf_sock_addr`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx) };
    let probe = BreakerProbe {
        cookie,
        started_ns: now,
    };
    if BREAKER_PROBES
        .insert(key, probe, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another CPU's connect is the probe.
        b.refused += 1;
        return Some(Reason::RefuseBreakerOpen);
    }
    let from = b.state;
    b.state = HALF_OPEN;
    if from != HALF_OPEN {
        event(key, b, from, CAUSE_PROBE_STARTED);
    }
    if limits.max_connections != 0 {
        track_connection(ctx, key);
    }
    None
}

/// Whether this `connect` draws a refusal from `key`'s admission-control probability.
#[inline(always)]
fn admission_refuses(key: BreakerKey) -> bool {
    // SAFETY: read-only lookup of a plain value.
    let Some(&ppm) = (unsafe { BREAKER_ADMISSION.get(key) }) else {
        return false;
    };
    // SAFETY: helper without preconditions.
    let draw = unsafe { bpf_get_prandom_u32() } % 1_000_000;
    draw < ppm
}

/// A datagram (or UDP connect) to an open breaker whose ejection is over, or to a half-open one.
/// A UDP breaker takes the first as its probe and closes once the probe went unanswered by an
/// unreachable for [`UDP_QUIET_NS`]; a breaker the agent forced on a non-UDP key lets
/// datagrams through past its ejection.
#[inline(always)]
fn datagram_past_ejection(key: BreakerKey, b: &mut Breaker, now: u64) -> Option<Reason> {
    if key.proto != PROTO_UDP {
        return if b.state == OPEN {
            None
        } else {
            b.refused += 1;
            Some(Reason::RefuseBreakerOpen)
        };
    }
    if b.state == OPEN {
        b.state = HALF_OPEN;
        b.open_until_ns = now;
        event(key, b, OPEN, CAUSE_PROBE_STARTED);
        return None;
    }
    if now.saturating_sub(b.open_until_ns) > UDP_QUIET_NS {
        b.state = CLOSED;
        b.failures = 0;
        b.open_until_ns = now;
        event(key, b, HALF_OPEN, CAUSE_PROBE_SUCCEEDED);
        b.ejection_ms = 0;
        return None;
    }
    b.refused += 1;
    Some(Reason::RefuseBreakerOpen)
}

/// A datagram quadrant `caller` sent from `source` to `daddr:dport` came back port-unreachable
/// (seen by the tc program delivering into the quadrant). Counts towards the UDP breaker.
#[inline(always)]
pub fn udp_unreachable(caller: u8, daddr: u32, dport: u16) {
    let limits = limits();
    if limits.enabled == 0 || limits.consecutive_failures == 0 {
        return;
    }
    let key = BreakerKey {
        daddr,
        dport,
        proto: PROTO_UDP,
        caller,
    };
    let now = now_ns();
    if BREAKERS.get_ptr_mut(key).is_none() {
        let fresh = Breaker {
            open_until_ns: now,
            ..Breaker::default()
        };
        let _ = BREAKERS.insert(key, fresh, u64::from(BPF_NOEXIST));
    }
    let Some(b) = BREAKERS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let b = unsafe { &mut *b };
    if b.state == OPEN {
        // Answers to datagrams sent before it opened.
        return;
    }
    b.failures = b.failures.saturating_add(1);
    if b.state == HALF_OPEN {
        open(b, next_ejection_ms(b.ejection_ms, &limits));
        event(key, b, HALF_OPEN, CAUSE_PROBE_FAILED);
        return;
    }
    if now.saturating_sub(b.open_until_ns) > UDP_WINDOW_NS {
        b.failures = 1;
        b.open_until_ns = now;
    }
    if b.failures >= limits.consecutive_failures {
        open(b, limits.base_ejection_ms);
        event(key, b, CLOSED, CAUSE_FAILURES);
    }
}

/// Remembers that this socket's connection, once it reaches TCP, counts towards `key`'s limit.
#[inline(always)]
fn track_connection(ctx: *mut c_void, key: BreakerKey) {
    // SAFETY: the context is the program's own `bpf_sock_addr`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx) };
    let _ = BREAKER_CONNS.insert(cookie, (key, 0), u64::from(BPF_NOEXIST));
}

/// Counts a tracked connection that reached TCP; its end is seen through the state callback.
#[inline(always)]
fn count_connection(cookie: u64) {
    let Some(entry) = BREAKER_CONNS.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let entry = unsafe { &mut *entry };
    if entry.1 != 0 {
        return;
    }
    if let Some(b) = BREAKERS.get_ptr_mut(entry.0) {
        entry.1 = 1;
        // SAFETY: as above.
        unsafe { (*b).active += 1 };
    }
}

/// A counted connection ended.
#[inline(always)]
fn release_connection(cookie: u64) {
    // SAFETY: read-only lookup of a plain value.
    let Some(&(key, counted)) = (unsafe { BREAKER_CONNS.get(cookie) }) else {
        return;
    };
    if BREAKER_CONNS.remove(cookie).is_err() || counted == 0 {
        return;
    }
    if let Some(b) = BREAKERS.get_ptr_mut(key) {
        // SAFETY: a map value pointer, valid for this program run.
        unsafe { (*b).active = (*b).active.saturating_sub(1) };
    }
}

/// Whether the socket `cookie` is the probe of `key`'s breaker; if so the probe ends.
#[inline(always)]
fn end_probe(key: &BreakerKey, cookie: u64) -> bool {
    // SAFETY: read-only lookup of a plain value.
    let mine = unsafe { BREAKER_PROBES.get(key) }.is_some_and(|p| p.cookie == cookie);
    if mine {
        let _ = BREAKER_PROBES.remove(key);
    }
    mine
}

#[inline(always)]
fn connected(key: BreakerKey, cookie: u64) {
    let Some(b) = BREAKERS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let b = unsafe { &mut *b };
    b.failures = 0;
    if b.state == HALF_OPEN && end_probe(&key, cookie) {
        b.state = CLOSED;
        event(key, b, HALF_OPEN, CAUSE_PROBE_SUCCEEDED);
        b.ejection_ms = 0;
    }
}

#[inline(always)]
fn failed(key: BreakerKey, cookie: u64) {
    let limits = limits();
    if BREAKERS.get_ptr_mut(key).is_none() {
        if limits.consecutive_failures == 0 {
            return;
        }
        let _ = BREAKERS.insert(key, Breaker::default(), u64::from(BPF_NOEXIST));
    }
    let Some(b) = BREAKERS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let b = unsafe { &mut *b };
    b.failures = b.failures.saturating_add(1);
    if b.state == HALF_OPEN && end_probe(&key, cookie) {
        open(b, next_ejection_ms(b.ejection_ms, &limits));
        event(key, b, HALF_OPEN, CAUSE_PROBE_FAILED);
    } else if b.state == CLOSED
        && limits.consecutive_failures != 0
        && b.failures >= limits.consecutive_failures
    {
        open(b, limits.base_ejection_ms);
        event(key, b, CLOSED, CAUSE_FAILURES);
    }
}

/// The breaker of a connection, from its local address (which names the caller's quadrant) and
/// its destination; `None` for loopback and for sockets outside the quadrants' prefixes.
#[inline(always)]
fn key_of(ctx: &SockOpsContext) -> Option<BreakerKey> {
    if ctx.family() != AF_INET {
        return None;
    }
    let (local, remote) = (ctx.local_ip4(), ctx.remote_ip4());
    if is_loopback(remote) {
        return None;
    }
    let caller = identity_of(local);
    if u32::from(caller) >= QUADRANT_COUNT_U32 {
        return None;
    }
    // remote_port: network order, in the upper 16 bits on little-endian kernels.
    let raw = ctx.remote_port();
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    #[expect(clippy::cast_possible_truncation, reason = "at most 16 bits are left")]
    Some(BreakerKey {
        daddr: remote,
        dport: be as u16,
        proto: PROTO_TCP,
        caller,
    })
}

#[sock_ops]
pub fn quadrant_breaker_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    // Cheap checks first: this runs for every callback of every TCP socket of the quadrant.
    let closing = op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE;
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && !closing {
        return 0;
    }
    // SAFETY: the context's pointer is the kernel's `bpf_sock_ops` for this call.
    let cookie = || unsafe { bpf_get_socket_cookie(ctx.ops.cast::<c_void>()) };
    // A connection to a service VIP counts against the instance it went to until it closes,
    // breakers or not.
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB && crate::lb::connecting(cookie()) {
        #[expect(clippy::cast_possible_wrap, reason = "the flags use the low bits")]
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    } else if closing {
        crate::lb::closed(cookie());
    }
    let limits = limits();
    if limits.enabled == 0 {
        return 0;
    }
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        if ctx.family() != AF_INET || is_loopback(ctx.remote_ip4()) {
            return 0;
        }
        // How this connect ends arrives through the state callback.
        #[expect(clippy::cast_possible_wrap, reason = "the flags use the low bits")]
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        if limits.max_connections != 0 {
            count_connection(cookie());
        }
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        if let Some(key) = key_of(&ctx) {
            connected(key, cookie());
        }
    } else {
        if ctx.arg(0) == BPF_TCP_SYN_SENT
            && let Some(key) = key_of(&ctx)
        {
            // Refused by the peer (RST), timed out, or abandoned before it connected.
            failed(key, cookie());
        }
        if limits.max_connections != 0 {
            release_connection(cookie());
        }
    }
    0
}
