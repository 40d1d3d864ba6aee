//! Faults injected into the dataplane's own programs (the chaos controller, `quadrant chaos`).
//!
//! A fault lives in [`CHAOS_FAULTS`] with the monotonic time it ends at ([`Fault::expires_ns`]),
//! which the programs compare with the kernel clock: a fault whose writer died still ends on
//! time, and nothing is left to clean up but a dead entry. [`CHAOS_ARMED`] holds the latest end
//! of any fault: while it lies in the past (no experiment), a program pays one array lookup and a
//! clock read.
//!
//! Matching: a packet delivered into a quadrant (tc egress of its host-side veth) is looked up as
//! (source identity, the quadrant) with [`SCOPE_PACKET`], then (source, [`ANY`]), then ([`ANY`],
//! the quadrant); a `connect`/`sendmsg` the policy allowed as (caller quadrant, destination
//! identity) with [`SCOPE_CONNECT`] in the same order. The first live entry applies: it drops
//! (or refuses) with probability `drop_ppm` / 1,000,000, else delays the packet by `delay_us` ±
//! `jitter_us` (its departure time, held by an `fq` qdisc on the veth). A fault with
//! [`FLAG_RESET`] instead turns a TCP segment of an established connection (no SYN, FIN or RST)
//! into a reset with that probability, once per connection and fault ([`CHAOS_RESETS`]): the
//! segment is delivered with RST set (checksum fixed), so the receiving socket is reset; the
//! sender's next segment (its retransmission at the latest) passes and earns the receiver's
//! kernel's reset, so both ends see the connection reset.

/// The programs' read-only global: 1 when faults are checked, 0 when the agent loaded them with
/// chaos off (the verifier then removes every check).
pub const CHAOS_ENABLED: &str = "CHAOS_ENABLED";
/// Array\[1\]: `u64`, the monotonic time (ns) until which any fault may be live (0: none).
pub const CHAOS_ARMED: &str = "CHAOS_ARMED";
/// Hash: [`FaultKey`] → [`Fault`]. Written by the chaos controller (the programs add to its
/// counters atomically), read by tc egress and the `connect4`/`sendmsg4` programs.
pub const CHAOS_FAULTS: &str = "CHAOS_FAULTS";
/// Faults at once.
pub const CHAOS_FAULTS_MAX: u32 = 64;
/// LRU hash: [`ResetKey`] → `u64`, the expiry of the reset fault that reset that connection
/// (so the same fault resets it once). Written by tc egress only.
pub const CHAOS_RESETS: &str = "CHAOS_RESETS";
/// Connections [`CHAOS_RESETS`] remembers.
pub const CHAOS_RESETS_MAX: u32 = 8_192;
/// [`FaultKey::src`] / [`FaultKey::dst`]: any identity.
pub const ANY: u8 = 0xff;
/// [`FaultKey::scope`]: packets delivered into a quadrant.
pub const SCOPE_PACKET: u8 = 0;
/// [`FaultKey::scope`]: `connect`/`sendmsg` of a quadrant's processes.
pub const SCOPE_CONNECT: u8 = 1;
/// [`Fault::drop_ppm`] of a fault that drops (or refuses) everything it matches.
pub const PPM: u32 = 1_000_000;
/// [`Fault::flags`]: reset TCP connections instead of dropping (map layout 11; layout 10 had
/// zero padding here).
pub const FLAG_RESET: u32 = 1;

/// Which traffic a fault applies to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FaultKey {
    /// Source identity (a packet's source; the calling quadrant at `connect`), or [`ANY`].
    pub src: u8,
    /// Destination identity (the quadrant delivered into; the destination at `connect`), or
    /// [`ANY`].
    pub dst: u8,
    /// [`SCOPE_PACKET`] or [`SCOPE_CONNECT`].
    pub scope: u8,
    /// Explicit padding (zero).
    pub pad: u8,
}

/// One direction of a TCP connection, as its packets carry it (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResetKey {
    /// Source address.
    pub saddr: u32,
    /// Destination address.
    pub daddr: u32,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

/// What a fault does, until when, and what it did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Monotonic time (ns, `CLOCK_MONOTONIC`) it ends at.
    pub expires_ns: u64,
    /// Packets or socket operations it matched while live (added to atomically).
    pub matched: u64,
    /// Of those, the ones it dropped, refused or reset.
    pub dropped: u64,
    /// Drop (or refusal) probability in parts per million ([`PPM`]: all).
    pub drop_ppm: u32,
    /// Added departure delay of packets it does not drop, µs.
    pub delay_us: u32,
    /// Uniform jitter around `delay_us`, µs.
    pub jitter_us: u32,
    /// [`FLAG_RESET`] or 0.
    pub flags: u32,
}

impl FaultKey {
    /// The keys a (source, destination) lookup tries, in order.
    #[inline(always)]
    #[must_use]
    pub const fn candidates(src: u8, dst: u8, scope: u8) -> [Self; 3] {
        [
            Self {
                src,
                dst,
                scope,
                pad: 0,
            },
            Self {
                src,
                dst: ANY,
                scope,
                pad: 0,
            },
            Self {
                src: ANY,
                dst,
                scope,
                pad: 0,
            },
        ]
    }
}

/// Whether a fault with `drop_ppm` drops for the random `draw`.
#[inline(always)]
#[must_use]
pub const fn drops(drop_ppm: u32, draw: u32) -> bool {
    draw % PPM < drop_ppm
}

/// The delay (ns) of `delay_us` ± `jitter_us` for the random `draw`: uniform over the
/// `2·jitter + 1` whole microseconds around the delay, never negative.
#[inline(always)]
#[must_use]
pub const fn delay_ns(delay_us: u32, jitter_us: u32, draw: u32) -> u64 {
    let span = 2 * (jitter_us as u64) + 1;
    let us = delay_us as u64 + (draw as u64 % span);
    us.saturating_sub(jitter_us as u64) * 1000
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers only, no implicit padding (sizes asserted below).
    unsafe impl aya::Pod for super::FaultKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Fault {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ResetKey {}
}

const _: () = {
    assert!(size_of::<FaultKey>() == 4);
    assert!(size_of::<Fault>() == 40);
    assert!(size_of::<ResetKey>() == 12);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_probability_is_parts_per_million() {
        assert!(!drops(0, 0));
        assert!(drops(PPM, u32::MAX));
        let dropped = (0..100_000u32)
            .filter(|i| drops(50_000, i.wrapping_mul(2_654_435_761)))
            .count();
        assert!((4_500..=5_500).contains(&dropped), "5 %: {dropped}");
    }

    #[test]
    fn delay_spreads_over_the_jitter_and_never_goes_negative() {
        assert_eq!(delay_ns(100_000, 0, 12_345), 100_000_000);
        let (mut lo, mut hi) = (u64::MAX, 0);
        for draw in 0..100_000u32 {
            let d = delay_ns(100_000, 10_000, draw.wrapping_mul(2_654_435_761));
            lo = lo.min(d);
            hi = hi.max(d);
        }
        assert_eq!((lo, hi), (90_000_000, 110_000_000));
        assert_eq!(delay_ns(5, 10, 0), 0, "clamped at zero");
    }

    #[test]
    fn exact_pairs_come_before_wildcards() {
        let [exact, from, to] = FaultKey::candidates(0, 2, SCOPE_PACKET);
        assert_eq!((exact.src, exact.dst), (0, 2));
        assert_eq!((from.src, from.dst), (0, ANY));
        assert_eq!((to.src, to.dst), (ANY, 2));
    }
}
