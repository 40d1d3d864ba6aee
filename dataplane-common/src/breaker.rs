//! Circuit breakers: one per (caller quadrant, destination address, port, protocol), kept in the
//! kernel.
//!
//! `connect4`/`sendmsg4` refuse an open breaker with `ECONNREFUSED` (a policy denial is `EPERM`)
//! before any packet leaves. The breaker `sock_ops` program counts each caller's consecutive
//! failed TCP connects (`SYN_SENT` → `CLOSE`: refused by the peer, timed out, abandoned) and opens
//! the breaker itself when they reach [`BreakerLimits::consecutive_failures`]. Once its ejection
//! time has passed, the next `connect` becomes the one probe (half-open; every other caller is
//! still refused); the probe's success closes the breaker, its failure opens it again for twice
//! as long, up to [`BreakerLimits::max_ejection_ms`]. The agent may open and close breakers
//! through the map as well, and reads every transition from [`BREAKER_EVENTS`].

/// Hash: [`BreakerKey`] → [`Breaker`]. Written by the cgroup programs, the breaker `sock_ops`
/// and the agent; an entry exists once a destination failed (or is counted, with
/// [`BreakerLimits::max_connections`]).
pub const BREAKERS: &str = "BREAKERS";
/// Array\[1\]: [`BreakerLimits`]. Written by the agent.
pub const BREAKER_LIMITS: &str = "BREAKER_LIMITS";
/// Hash: [`BreakerKey`] → [`BreakerProbe`], the one probe of a half-open breaker (inserted with
/// `BPF_NOEXIST`, so exactly one `connect` wins).
pub const BREAKER_PROBES: &str = "BREAKER_PROBES";
/// Hash: socket cookie → [`BreakerKey`], the connections counted in [`Breaker::active`] (only
/// while [`BreakerLimits::max_connections`] is set), removed when they close.
pub const BREAKER_CONNS: &str = "BREAKER_CONNS";
/// Breaker key → the probability (parts per million) with which a `connect` through its closed
/// breaker is refused (admission control). Writer: the agent.
pub const BREAKER_ADMISSION: &str = "BREAKER_ADMISSION";
/// Ring buffer of [`BreakerEvent`]s, read by the agent. Not pinned: each agent reads the one of
/// the programs it loaded.
pub const BREAKER_EVENTS: &str = "BREAKER_EVENTS";
/// Size of [`BREAKER_EVENTS`] in bytes: 1,024 events.
pub const BREAKER_EVENTS_BYTES: u32 = 32 * 1024;

/// Capacity of [`BREAKERS`]: destinations per node with a breaker entry.
pub const BREAKERS_MAX: u32 = 4096;
/// Capacity of [`BREAKER_CONNS`].
pub const BREAKER_CONNS_MAX: u32 = 65_536;
/// A probe that has not finished after this long (its socket never reached TCP, e.g. `connect`
/// failed locally) is replaced by the next `connect`.
pub const PROBE_STALE_NS: u64 = 130 * 1_000_000_000;

/// [`Breaker::state`]: connections go through.
pub const CLOSED: u32 = 0;
/// [`Breaker::state`]: refused until [`Breaker::open_until_ns`].
pub const OPEN: u32 = 1;
/// [`Breaker::state`]: one probe is in flight; everything else is refused.
pub const HALF_OPEN: u32 = 2;

/// Name of a breaker state.
#[must_use]
pub const fn state_name(state: u32) -> &'static str {
    match state {
        CLOSED => "closed",
        OPEN => "open",
        HALF_OPEN => "half_open",
        _ => "unknown",
    }
}

/// [`BreakerEvent::cause`]: consecutive failures reached the threshold.
pub const CAUSE_FAILURES: u8 = 0;
/// [`BreakerEvent::cause`]: the ejection time passed and a `connect` became the probe.
pub const CAUSE_PROBE_STARTED: u8 = 1;
/// [`BreakerEvent::cause`]: the probe connected.
pub const CAUSE_PROBE_SUCCEEDED: u8 = 2;
/// [`BreakerEvent::cause`]: the probe failed.
pub const CAUSE_PROBE_FAILED: u8 = 3;

/// Name of a transition's cause.
#[must_use]
pub const fn cause_name(cause: u8) -> &'static str {
    match cause {
        CAUSE_FAILURES => "consecutive_failures",
        CAUSE_PROBE_STARTED => "probe_started",
        CAUSE_PROBE_SUCCEEDED => "probe_succeeded",
        CAUSE_PROBE_FAILED => "probe_failed",
        _ => "unknown",
    }
}

/// Which breaker: the calling quadrant and the destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BreakerKey {
    /// Destination address (network byte order).
    pub daddr: u32,
    /// Destination port (network byte order).
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// The caller's quadrant id.
    pub caller: u8,
}

/// Value of [`BREAKERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Breaker {
    /// Monotonic clock (ns) until which an open breaker refuses. For a UDP breaker also: while
    /// closed, when its current window of port-unreachables began; while half-open, when its
    /// probe datagram went.
    pub open_until_ns: u64,
    /// Connections refused by this breaker.
    pub refused: u64,
    /// Times it opened.
    pub opened: u64,
    /// [`CLOSED`], [`OPEN`] or [`HALF_OPEN`].
    pub state: u32,
    /// Consecutive failed connects.
    pub failures: u32,
    /// The ejection time of the current (or last) opening, ms, before jitter.
    pub ejection_ms: u32,
    /// Connections counted open (only with [`BreakerLimits::max_connections`]).
    pub active: u32,
}

/// Value of [`BREAKER_LIMITS`]: the thresholds every breaker uses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BreakerLimits {
    /// 0: breakers are off — no lookup at `connect`, nothing counted (the agent's switch).
    pub enabled: u32,
    /// Consecutive failed connects that open a breaker; 0: the kernel never opens one.
    pub consecutive_failures: u32,
    /// Connections one caller quadrant may hold open to one destination; 0: no limit.
    pub max_connections: u32,
    /// First ejection time, ms; each failed probe doubles it.
    pub base_ejection_ms: u32,
    /// Longest ejection time, ms.
    pub max_ejection_ms: u32,
    /// 1: `connect`s through a closed breaker draw against its `BREAKER_ADMISSION` probability;
    /// 0: no lookup.
    pub admission: u32,
}

/// Value of [`BREAKER_PROBES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerProbe {
    /// Cookie of the probing socket.
    pub cookie: u64,
    /// Monotonic clock (ns) when it started.
    pub started_ns: u64,
}

/// One state transition (record of [`BREAKER_EVENTS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerEvent {
    /// Monotonic clock (ns) of the transition.
    pub at_ns: u64,
    /// Which breaker.
    pub key: BreakerKey,
    /// Consecutive failures at the transition.
    pub failures: u32,
    /// Ejection time now in force, ms (0 when closed).
    pub ejection_ms: u32,
    /// State before.
    pub from: u8,
    /// State after.
    pub to: u8,
    /// `CAUSE_*`.
    pub cause: u8,
    /// Explicit padding (zero).
    pub pad: [u8; 5],
}

/// The ejection time after `ejection_ms` when a probe fails: doubled, at most `max_ms`.
#[must_use]
#[inline(always)]
pub const fn next_ejection_ms(ejection_ms: u32, limits: &BreakerLimits) -> u32 {
    let doubled = ejection_ms.saturating_mul(2);
    let doubled = if doubled == 0 {
        limits.base_ejection_ms
    } else {
        doubled
    };
    if doubled > limits.max_ejection_ms {
        limits.max_ejection_ms
    } else {
        doubled
    }
}

/// Jitter added to an ejection of `ejection_ms`: up to a tenth of it, from `random`.
#[must_use]
#[inline(always)]
pub const fn jitter_ns(ejection_ms: u32, random: u32) -> u64 {
    let tenth_us = ejection_ms as u64 * 100;
    if tenth_us == 0 {
        0
    } else {
        (random as u64 % tenth_us) * 1000
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers only, no implicit padding (sizes asserted below).
    unsafe impl aya::Pod for super::BreakerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Breaker {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BreakerLimits {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BreakerProbe {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BreakerEvent {}
}

const _: () = {
    assert!(size_of::<BreakerKey>() == 8);
    assert!(size_of::<Breaker>() == 40);
    assert!(size_of::<BreakerLimits>() == 24);
    assert!(size_of::<BreakerProbe>() == 16);
    assert!(size_of::<BreakerEvent>() == 32);
};

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BreakerLimits = BreakerLimits {
        enabled: 1,
        consecutive_failures: 5,
        max_connections: 0,
        base_ejection_ms: 1000,
        max_ejection_ms: 60_000,
        admission: 0,
    };

    #[test]
    fn ejection_doubles_from_the_base_up_to_the_maximum() {
        let mut e = 0;
        let mut seen = [0; 8];
        for s in &mut seen {
            e = next_ejection_ms(e, &LIMITS);
            *s = e;
        }
        assert_eq!(
            seen,
            [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
        assert_eq!(next_ejection_ms(u32::MAX, &LIMITS), 60_000);
    }

    #[test]
    fn jitter_stays_below_a_tenth_of_the_ejection() {
        for r in [0, 1, 99_999, 100_000, u32::MAX] {
            assert!(jitter_ns(1000, r) < 100_000_000, "{r}");
        }
        assert_eq!(jitter_ns(0, 12345), 0);
        assert_eq!(jitter_ns(1000, 5), 5000);
    }
}
