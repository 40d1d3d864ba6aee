//! The body both tcx programs share.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use dataplane_common::{
    Hook, Identity, Reason, Verdict, maps::IfaceValue, policy::PROTO_ICMP,
    reason::UNATTRIBUTED_SLOT,
};

use crate::{
    decide::{Direction, count, decide_packet, identity_of},
    lb_flow::{self, Into},
    maps::IFACES,
    parse::{Frame, parse_frame, port_unreachable_udp},
    trace::{self, Subject},
};

/// Enough linear bytes for Ethernet + IPv4 with options + TCP.
const PULL_LEN: u32 = 14 + 60 + 20;

#[inline(always)]
pub fn run(ctx: &TcContext, hook: Hook, dir: Direction) -> i32 {
    let (slot, reason, subject, redirect) = classify(ctx, dir);
    count(hook, slot, reason);
    trace::verdict(hook, slot, reason, subject);
    match reason.verdict() {
        // A packet translated to a backend behind another instance's veth goes there.
        Verdict::Pass => redirect
            .and_then(|(here, to)| lb_flow::redirect(here, to))
            .unwrap_or(TC_ACT_OK),
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// Whether an address lies outside the quadrants (the host's or the world's): only such
/// sources send packets to a VIP (a quadrant's processes are translated at the socket).
#[inline(always)]
fn outside(addr: u32) -> bool {
    identity_of(addr) >= Identity::Host as u8
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
fn classify(ctx: &TcContext, dir: Direction) -> (u32, Reason, Subject, Option<(u32, u32)>) {
    // SAFETY: reading the skb's ifindex field is allowed for tc programs.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only lookup of a plain value.
    let Some(&IfaceValue { quadrant, .. }) = (unsafe { IFACES.get(ifindex) }) else {
        return (
            UNATTRIBUTED_SLOT,
            Reason::DropUnknownInterface,
            Subject::None,
            None,
        );
    };
    let mut redirect = None;
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
        Ok(Frame::Ipv4(mut flow)) => {
            let into = matches!(dir, Direction::IntoQuadrant);
            let translated = if into && outside(flow.saddr) {
                lb_flow::into_quadrant(ctx, &mut flow)
            } else {
                Into::Untouched
            };
            let reason = match translated {
                Into::NoBackend => Reason::RefuseNoBackend,
                Into::TupleInUse => Reason::DropTupleInUse,
                Into::Translated { ifindex: to, new } => {
                    redirect = Some((ifindex, to));
                    let reason = decide_packet(&flow, quadrant, dir, true);
                    if let Some(new) = new
                        && matches!(reason.verdict(), Verdict::Pass)
                    {
                        lb_flow::commit(&new, to != 0 && to != ifindex);
                    }
                    reason
                }
                Into::Untouched => decide_packet(&flow, quadrant, dir, true),
            };
            let mut allowed = matches!(reason.verdict(), Verdict::Pass);
            let reason = if into
                && allowed
                && let Some(fault) = crate::chaos::into_quadrant(ctx, &flow, quadrant)
            {
                allowed = false;
                fault
            } else {
                reason
            };
            if into && flow.proto == PROTO_ICMP && allowed {
                unreachable_into(ctx, quadrant);
            }
            if !into && allowed && outside(flow.daddr) {
                lb_flow::from_quadrant(ctx, &flow);
            }
            (reason, Subject::Packet(flow))
        }
        Err(reason) => (reason, Subject::None),
    };
    (u32::from(quadrant), reason, subject, redirect)
}
