//! The one registry of verdict reasons and hooks.
//!
//! Every verdict any program returns carries a [`Reason`]; the reason fixes the verdict, and the
//! pair (hook, quadrant, reason) indexes the per-CPU counter map. The agent's status output, the
//! fixture tests and the benchmarks name reasons only through this module.

use crate::identity::QUADRANT_COUNT_U32;

/// Pass or drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The packet or socket operation goes on.
    Pass,
    /// The packet is dropped, or the socket operation fails (`EPERM`; `ECONNREFUSED` for a
    /// circuit breaker, see [`Reason::is_breaker`]).
    Drop,
}

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident = $id:literal, $name:literal, $verdict:ident; )+) => {
        /// Why a program returned its verdict.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Reason {
            $( $(#[$doc])* $variant = $id, )+
        }

        impl Reason {
            /// Every reason, in id order.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];

            /// Stable `snake_case` name used in status output and metrics.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self { $(Self::$variant => $name,)+ }
            }

            /// The verdict this reason stands for.
            #[must_use]
            pub const fn verdict(self) -> Verdict {
                match self { $(Self::$variant => Verdict::$verdict,)+ }
            }

            /// The reason with this id, if any.
            #[must_use]
            pub const fn from_id(id: u32) -> Option<Self> {
                match id { $($id => Some(Self::$variant),)+ _ => None }
            }
        }
    };
}

reasons! {
    /// A policy rule allows this (source, destination, protocol, port).
    AllowPolicy = 0, "allow_policy", Pass;
    /// Part of a flow a policy rule allowed earlier (either direction).
    AllowEstablished = 1, "allow_established", Pass;
    /// A socket operation towards the loopback address of the caller's own namespace.
    AllowLoopback = 2, "allow_loopback", Pass;
    /// ARP, needed for the veth neighbour to resolve; carries no payload between quadrants.
    PassArp = 3, "pass_arp", Pass;
    /// A rule naming the calling workload's SPIFFE ID allows this socket operation.
    AllowWorkloadPolicy = 4, "allow_workload_policy", Pass;
    /// No policy rule allows this; the default between identities is deny.
    DenyPolicy = 10, "deny_policy", Drop;
    /// Source address outside the prefix of the quadrant the packet leaves from.
    DenySpoofed = 11, "deny_spoofed", Drop;
    /// Sent into a quadrant with a destination outside that quadrant's prefix.
    DenyMisrouted = 12, "deny_misrouted", Drop;
    /// A connection from outside the quadrants straight to an instance, on the very tuple a
    /// live connection to a service VIP was translated to: the instance could not tell the two
    /// apart, so the SYN is dropped rather than the older connection broken.
    DropTupleInUse = 13, "drop_tuple_in_use", Drop;
    /// A frame or header shorter than its headers claim.
    DropTruncated = 20, "drop_truncated", Drop;
    /// IPv4 header length below 20 bytes, or beyond the packet, or total length inconsistent.
    DropBadIhl = 21, "drop_bad_ihl", Drop;
    /// IPv4 fragment: quadrant policy needs the L4 header of every packet.
    DropFragment = 22, "drop_fragment", Drop;
    /// 802.1Q / 802.1ad tagged frame: quadrant veths carry untagged frames only.
    DropVlan = 23, "drop_vlan", Drop;
    /// IPv6 packet: quadrants are IPv4-only.
    DropIpv6 = 24, "drop_ipv6", Drop;
    /// Any other ethertype.
    DropUnknownL3 = 25, "drop_unknown_l3", Drop;
    /// IPv4 version field is not 4.
    DropBadVersion = 26, "drop_bad_version", Drop;
    /// The program runs on an interface the agent did not register (fail closed).
    DropUnknownInterface = 30, "drop_unknown_interface", Drop;
    /// The calling process is in a cgroup the agent did not register (fail closed).
    DenyUnknownCgroup = 31, "deny_unknown_cgroup", Drop;
    /// IPv6 socket address that is neither loopback nor IPv4-mapped.
    DenyIpv6 = 32, "deny_ipv6", Drop;
    /// A raw IP or packet socket in a quadrant whose policy names single workloads: such a
    /// socket could forge packets the socket-layer workload checks never see.
    DenyRawSocket = 33, "deny_raw_socket", Drop;
    /// The circuit breaker of (caller quadrant, destination) is open, or half-open with its one
    /// probe in flight: `connect`/`sendmsg` fail with `ECONNREFUSED`.
    RefuseBreakerOpen = 34, "refuse_breaker_open", Drop;
    /// The caller quadrant holds the most connections its breaker allows to this destination:
    /// `connect` fails with `ECONNREFUSED`.
    RefuseBreakerFull = 35, "refuse_breaker_full", Drop;
    /// Admission control, as Envoy's: the destination's recent success rate made the agent set
    /// a refusal probability on its closed breaker, and this `connect` drew a refusal: it fails
    /// with `ECONNREFUSED`.
    RefuseBreakerAdmission = 36, "refuse_breaker_admission", Drop;
    /// A connection to a service's virtual address while none of its instances is ready: the
    /// call fails with `ECONNREFUSED`, as a Kubernetes service without endpoints answers (a
    /// packet from outside the quadrants, translated in tc, is dropped).
    RefuseNoBackend = 37, "refuse_no_backend", Drop;
    /// A chaos fault refuses this `connect`/`sendmsg` (`ECONNREFUSED`).
    RefuseChaos = 38, "refuse_chaos", Drop;
    /// A chaos fault drops this packet.
    DropChaos = 39, "drop_chaos", Drop;
}

impl Reason {
    /// Whether a socket operation refused for this reason fails with `ECONNREFUSED` (a circuit
    /// breaker) rather than `EPERM` (policy).
    #[must_use]
    pub const fn is_breaker(self) -> bool {
        matches!(
            self,
            Self::RefuseBreakerOpen | Self::RefuseBreakerFull | Self::RefuseBreakerAdmission
        )
    }

    /// Whether a socket operation refused for this reason fails with `ECONNREFUSED` (a breaker,
    /// or a service with no ready instance) rather than `EPERM` (policy).
    #[must_use]
    pub const fn is_connection_refused(self) -> bool {
        self.is_breaker() || matches!(self, Self::RefuseNoBackend | Self::RefuseChaos)
    }
}

/// Reason ids are below this bound (the counter map reserves this many slots per hook and
/// quadrant).
pub const REASON_SLOTS: u32 = 40;

/// Where a program runs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// XDP on the host-side veth: frames leaving the quadrant.
    Xdp = 0,
    /// tcx ingress on the host-side veth: packets leaving the quadrant.
    TcIngress = 1,
    /// tcx egress on the host-side veth: packets entering the quadrant.
    TcEgress = 2,
    /// cgroup `connect4`.
    Connect4 = 3,
    /// cgroup `connect6`.
    Connect6 = 4,
    /// cgroup `sendmsg4`.
    Sendmsg4 = 5,
    /// cgroup `sendmsg6`.
    Sendmsg6 = 6,
    /// cgroup `sock_create`.
    SockCreate = 7,
    /// cgroup `sock_ops` of the circuit breakers (counts no verdicts).
    SockOps = 8,
    /// cgroup `getpeername4`: gives a socket translated from a service VIP the VIP back
    /// (counts no verdicts).
    Getpeername4 = 9,
    /// cgroup `recvmsg4`: gives datagrams from a VIP's instance the VIP as their source
    /// (counts no verdicts).
    Recvmsg4 = 10,
    /// cgroup `sock_release`: an instance's listener for a service goes, and the instance
    /// leaves the service's backends (counts no verdicts).
    SockRelease = 11,
    /// cgroup `post_bind4`: records an instance's socket bound to a service's port (counts no
    /// verdicts).
    PostBind4 = 12,
}

impl Hook {
    /// Every hook, in id order.
    pub const ALL: [Self; 13] = [
        Self::Xdp,
        Self::TcIngress,
        Self::TcEgress,
        Self::Connect4,
        Self::Connect6,
        Self::Sendmsg4,
        Self::Sendmsg6,
        Self::SockCreate,
        Self::SockOps,
        Self::Getpeername4,
        Self::Recvmsg4,
        Self::SockRelease,
        Self::PostBind4,
    ];

    /// The hook with this id, if any.
    #[must_use]
    pub const fn from_id(id: u32) -> Option<Self> {
        if id < HOOK_COUNT {
            Some(Self::ALL[id as usize])
        } else {
            None
        }
    }

    /// Stable name used in status output.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::TcIngress => "tc_ingress",
            Self::TcEgress => "tc_egress",
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::Sendmsg4 => "sendmsg4",
            Self::Sendmsg6 => "sendmsg6",
            Self::SockCreate => "sock_create",
            Self::SockOps => "sock_ops",
            Self::Getpeername4 => "getpeername4",
            Self::Recvmsg4 => "recvmsg4",
            Self::SockRelease => "sock_release",
            Self::PostBind4 => "post_bind4",
        }
    }
}

/// Quadrant slots in the counter map: the four quadrants and one for verdicts that could not be
/// attributed to a quadrant (unknown interface or cgroup).
pub const QUADRANT_SLOTS: u32 = QUADRANT_COUNT_U32 + 1;

/// Slot for verdicts not attributable to a quadrant.
pub const UNATTRIBUTED_SLOT: u32 = QUADRANT_COUNT_U32;

/// Number of entries in the per-CPU counter map.
pub const STATS_ENTRIES: u32 = HOOK_COUNT * QUADRANT_SLOTS * REASON_SLOTS;

/// Number of hooks.
pub const HOOK_COUNT: u32 = 13;

const _: () = assert!(Hook::ALL.len() as u64 == HOOK_COUNT as u64);

/// Index of the counter for (hook, quadrant slot, reason). `slot` above the last slot is folded
/// into [`UNATTRIBUTED_SLOT`], so the result is always in bounds.
#[must_use]
#[inline(always)]
pub const fn stats_index(hook: Hook, slot: u32, reason: Reason) -> u32 {
    let slot = if slot < QUADRANT_COUNT_U32 {
        slot
    } else {
        UNATTRIBUTED_SLOT
    };
    (hook as u32 * QUADRANT_SLOTS + slot) * REASON_SLOTS + reason as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_ids_fit_and_are_unique() {
        for (i, a) in Reason::ALL.iter().enumerate() {
            assert!((*a as u32) < REASON_SLOTS, "{a:?} exceeds REASON_SLOTS");
            assert_eq!(Reason::from_id(*a as u32), Some(*a));
            for b in &Reason::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn stats_index_is_in_bounds_and_distinct() {
        let mut seen = [false; STATS_ENTRIES as usize];
        for hook in Hook::ALL {
            for slot in 0..QUADRANT_SLOTS {
                for reason in Reason::ALL {
                    let i = stats_index(hook, slot, *reason) as usize;
                    assert!(i < STATS_ENTRIES as usize);
                    assert!(!seen[i], "{hook:?}/{slot}/{reason:?} collides");
                    seen[i] = true;
                }
            }
        }
        assert_eq!(
            stats_index(Hook::Xdp, 200, Reason::DenyPolicy),
            stats_index(Hook::Xdp, UNATTRIBUTED_SLOT, Reason::DenyPolicy)
        );
    }

    #[test]
    fn only_allow_reasons_pass() {
        for r in Reason::ALL {
            assert_eq!(
                r.is_breaker(),
                r.name().starts_with("refuse_breaker"),
                "{r:?}"
            );
            let pass = r.name().starts_with("allow") || r.name().starts_with("pass");
            assert_eq!(r.verdict() == Verdict::Pass, pass, "{r:?}");
        }
    }
}
