//! Chaos faults (`dataplane_common::chaos`): packets delivered into a quadrant dropped, delayed
//! or (TCP) turned into resets, `connect`/`sendmsg` refused — each fault until its expiry on
//! the kernel clock.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, LruHashMap},
    programs::TcContext,
};
use dataplane_common::{
    Reason,
    chaos::{
        CHAOS_FAULTS_MAX, CHAOS_RESETS_MAX, FLAG_RESET, Fault, FaultKey, ResetKey, SCOPE_CONNECT,
        SCOPE_PACKET, delay_ns, drops,
    },
    policy::PROTO_TCP,
};

use crate::{decide::identity_of, lb::atomic_add, parse::Ipv4Flow};

/// TCP flags (byte 13 of the header).
const TCP_RST: u8 = 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_FIN: u8 = 0x01;

/// 1 unless the agent loaded the programs with chaos off (`chaos.enabled: false`): read-only
/// data the loader sets, so the verifier knows it and removes every fault check below as dead
/// code — a dataplane that cannot inject a fault whatever its maps hold.
#[unsafe(no_mangle)]
static CHAOS_ENABLED: u8 = 1;

/// \[0\] → the latest expiry of any fault (monotonic ns). Writer: the chaos controller.
#[map(name = "CHAOS_ARMED")]
static CHAOS_ARMED: Array<u64> = Array::with_max_entries(1, 0);

/// [`FaultKey`] → [`Fault`]. Writer: the chaos controller; the programs add to the counters.
#[map(name = "CHAOS_FAULTS")]
static CHAOS_FAULTS: HashMap<FaultKey, Fault> = HashMap::with_max_entries(CHAOS_FAULTS_MAX, 0);

/// [`ResetKey`] → the expiry of the reset fault that reset it. Writer: tc egress.
#[map(name = "CHAOS_RESETS")]
static CHAOS_RESETS: LruHashMap<ResetKey, u64> = LruHashMap::with_max_entries(CHAOS_RESETS_MAX, 0);

/// The kernel clock while a fault may be live; `None` otherwise — one array lookup when nothing
/// is armed. The first packet after the last fault ended disarms (compare-and-swap from that
/// expiry to 0, so a controller arming at the same instant is never undone).
#[inline(always)]
fn armed() -> Option<u64> {
    // SAFETY: a read of a static; volatile so that the compiler keeps the load the loader's
    // value decides.
    if unsafe { core::ptr::read_volatile(&raw const CHAOS_ENABLED) } == 0 {
        return None;
    }
    let slot = CHAOS_ARMED.get_ptr_mut(0)?;
    // SAFETY: a pointer to the live array value.
    let until = unsafe { *slot };
    if until == 0 {
        return None;
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now < until {
        return Some(now);
    }
    // SAFETY: as above; `BPF_CMPXCHG` on a map value.
    unsafe {
        let _ = core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::SeqCst },
            { core::intrinsics::AtomicOrdering::SeqCst },
        >(slot, until, 0);
    }
    None
}

/// The live fault for (`src`, `dst`) in `scope`, counted as matched.
#[inline(always)]
fn find(src: u8, dst: u8, scope: u8, now: u64) -> Option<*mut Fault> {
    let [exact, from, to] = FaultKey::candidates(src, dst, scope);
    let f = live(&exact, now)
        .or_else(|| live(&from, now))
        .or_else(|| live(&to, now))?;
    // SAFETY: `f` points to a live map value.
    unsafe { atomic_add(&raw mut (*f).matched, 1) };
    Some(f)
}

#[inline(always)]
fn live(key: &FaultKey, now: u64) -> Option<*mut Fault> {
    let f = CHAOS_FAULTS.get_ptr_mut(key)?;
    // SAFETY: a pointer to a live map value.
    (now < unsafe { (*f).expires_ns }).then_some(f)
}

/// Whether the fault drops; counts it if so.
#[inline(always)]
fn dropped(f: *mut Fault) -> bool {
    // SAFETY: `f` points to a live map value; the helper has no preconditions.
    unsafe {
        let ppm = (*f).drop_ppm;
        if ppm != 0 && drops(ppm, bpf_get_prandom_u32()) {
            atomic_add(&raw mut (*f).dropped, 1);
            return true;
        }
    }
    false
}

/// A packet `flow` delivered into quadrant `quadrant` (tc egress): `Some(DropChaos)` if a fault
/// drops it; a fault that delays it sets its departure time (an `fq` qdisc holds it); a reset
/// fault sets RST on a segment of an established TCP connection it draws.
#[inline(always)]
pub fn into_quadrant(ctx: &TcContext, flow: &Ipv4Flow, quadrant: u8) -> Option<Reason> {
    let now = armed()?;
    let f = find(identity_of(flow.saddr), quadrant, SCOPE_PACKET, now)?;
    // SAFETY: `f` points to a live map value.
    if unsafe { (*f).flags } & FLAG_RESET != 0 {
        if flow.proto == PROTO_TCP && !flow.opens && !flow.closes {
            reset_once(ctx, flow, f);
        }
        return None;
    }
    if dropped(f) {
        return Some(Reason::DropChaos);
    }
    // SAFETY: `f` points to a live map value; tc programs may write the skb's tstamp at egress,
    // where it is the packet's earliest departure time (monotonic).
    unsafe {
        let (delay, jitter) = ((*f).delay_us, (*f).jitter_us);
        if delay != 0 || jitter != 0 {
            let skb = ctx.skb.skb;
            let at = now + delay_ns(delay, jitter, bpf_get_prandom_u32());
            if (*skb).tstamp < at {
                (*skb).tstamp = at;
            }
        }
    }
    None
}

/// The first segment of a connection the reset fault `f` draws, and only the first: reset.
#[inline(always)]
fn reset_once(ctx: &TcContext, flow: &Ipv4Flow, f: *mut Fault) {
    let key = ResetKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
    };
    // SAFETY: `f` points to a live map value.
    let expires = unsafe { (*f).expires_ns };
    // SAFETY: a read of a live LRU map value.
    if unsafe { CHAOS_RESETS.get(key) }.is_some_and(|e| *e == expires) {
        return;
    }
    if dropped(f) && reset(ctx, flow) {
        let _ = CHAOS_RESETS.insert(key, expires, 0);
    }
}

/// Sets RST on the TCP segment at `flow.l4` unless it carries SYN, FIN or RST already, fixing
/// the checksum (flags are not in the pseudo-header); whether it did. A segment whose header
/// cannot be read is left as it is.
#[inline(always)]
fn reset(ctx: &TcContext, flow: &Ipv4Flow) -> bool {
    let off = usize::from(flow.l4) + 12;
    let Ok(old) = ctx.load::<u16>(off) else {
        return false;
    };
    // The 16-bit word as it lies in the packet: data offset, then the flags byte.
    let mut bytes = old.to_ne_bytes();
    if bytes[1] & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return false;
    }
    bytes[1] |= TCP_RST;
    let new = u16::from_ne_bytes(bytes);
    ctx.l4_csum_replace(usize::from(flow.l4) + 16, u64::from(old), u64::from(new), 2)
        .is_ok()
        && ctx.store(off, &new, 0).is_ok()
}

/// A `connect`/`sendmsg` of quadrant `caller` to `daddr` the policy allowed: `Some(RefuseChaos)`
/// if a fault refuses it.
#[inline(always)]
pub fn at_connect(caller: u8, daddr: u32) -> Option<Reason> {
    let now = armed()?;
    let f = find(caller, identity_of(daddr), SCOPE_CONNECT, now)?;
    dropped(f).then_some(Reason::RefuseChaos)
}
