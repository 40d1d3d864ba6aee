//! The body both tcx programs share.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use dataplane_common::{
    Hook, Reason, Verdict, maps::IfaceValue, policy::PROTO_ICMP, reason::UNATTRIBUTED_SLOT,
};

use crate::{
    decide::{Direction, count, decide_packet, identity_of},
    maps::IFACES,
    parse::{Frame, parse_frame, port_unreachable_udp},
    trace::{self, Subject},
};

/// Enough linear bytes for Ethernet + IPv4 with options + TCP.
const PULL_LEN: u32 = 14 + 60 + 20;

#[inline(always)]
pub fn run(ctx: &TcContext, hook: Hook, dir: Direction) -> i32 {
    let (slot, reason, subject) = classify(ctx, dir);
    count(hook, slot, reason);
    trace::verdict(hook, slot, reason, subject);
    match reason.verdict() {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// A port-unreachable delivered into `quadrant` about a datagram one of its addresses sent
/// counts towards that destination's UDP breaker.
#[inline(always)]
fn unreachable_into(ctx: &TcContext, quadrant: u8) {
    if let Some((source, daddr, dport)) = port_unreachable_udp(ctx.data(), ctx.data_end())
        && identity_of(source) == quadrant
    {
        crate::breaker::udp_unreachable(quadrant, daddr, dport);
    }
}

#[inline(always)]
fn classify(ctx: &TcContext, dir: Direction) -> (u32, Reason, Subject) {
    // SAFETY: reading the skb's ifindex field is allowed for tc programs.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only lookup of a plain value.
    let Some(&IfaceValue { quadrant, .. }) = (unsafe { IFACES.get(ifindex) }) else {
        return (
            UNATTRIBUTED_SLOT,
            Reason::DropUnknownInterface,
            Subject::None,
        );
    };
    let mut parsed = parse_frame(ctx.data(), ctx.data_end());
    if matches!(parsed, Err(Reason::DropTruncated))
        && ctx.len() as usize > ctx.data_end() - ctx.data()
    {
        // Headers in a non-linear part of the skb: pull them in and parse again. A truncated
        // verdict stands only for packets that really are short.
        if ctx.pull_data(PULL_LEN.min(ctx.len())).is_ok() {
            parsed = parse_frame(ctx.data(), ctx.data_end());
        }
    }
    let (reason, subject) = match parsed {
        Ok(Frame::Arp) => (Reason::PassArp, Subject::None),
        Ok(Frame::Ipv4(flow)) => {
            let reason = decide_packet(&flow, quadrant, dir, true);
            if matches!(dir, Direction::IntoQuadrant)
                && flow.proto == PROTO_ICMP
                && matches!(reason.verdict(), Verdict::Pass)
            {
                unreachable_into(ctx, quadrant);
            }
            (reason, Subject::Packet(flow))
        }
        Err(reason) => (reason, Subject::None),
    };
    (u32::from(quadrant), reason, subject)
}
