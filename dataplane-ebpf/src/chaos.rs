//! Chaos faults (`dataplane_common::chaos`): packets delivered into a quadrant dropped or
//! delayed, `connect`/`sendmsg` refused — each fault until its expiry on the kernel clock.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap},
    programs::TcContext,
};
use dataplane_common::{
    Reason,
    chaos::{CHAOS_FAULTS_MAX, Fault, FaultKey, SCOPE_CONNECT, SCOPE_PACKET, delay_ns, drops},
};

use crate::{decide::identity_of, lb::atomic_add};

/// \[0\] → the latest expiry of any fault (monotonic ns). Writer: the chaos controller.
#[map(name = "CHAOS_ARMED")]
static CHAOS_ARMED: Array<u64> = Array::with_max_entries(1, 0);

/// [`FaultKey`] → [`Fault`]. Writer: the chaos controller; the programs add to the counters.
#[map(name = "CHAOS_FAULTS")]
static CHAOS_FAULTS: HashMap<FaultKey, Fault> = HashMap::with_max_entries(CHAOS_FAULTS_MAX, 0);

/// The kernel clock while a fault may be live; `None` otherwise — one array lookup when nothing
/// is armed. The first packet after the last fault ended disarms (compare-and-swap from that
/// expiry to 0, so a controller arming at the same instant is never undone).
#[inline(always)]
fn armed() -> Option<u64> {
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

/// A packet from `saddr` delivered into quadrant `quadrant` (tc egress): `Some(DropChaos)` if a
/// fault drops it; a fault that delays it sets its departure time (an `fq` qdisc holds it).
#[inline(always)]
pub fn into_quadrant(ctx: &TcContext, saddr: u32, quadrant: u8) -> Option<Reason> {
    let now = armed()?;
    let f = find(identity_of(saddr), quadrant, SCOPE_PACKET, now)?;
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

/// A `connect`/`sendmsg` of quadrant `caller` to `daddr` the policy allowed: `Some(RefuseChaos)`
/// if a fault refuses it.
#[inline(always)]
pub fn at_connect(caller: u8, daddr: u32) -> Option<Reason> {
    let now = armed()?;
    let f = find(caller, identity_of(daddr), SCOPE_CONNECT, now)?;
    dropped(f).then_some(Reason::RefuseChaos)
}
