//! XDP on a quadrant's host-side veth: the early drop stage for frames the quadrant sends.
//!
//! Same decision as tc ingress, read-only (it never records flows): a frame this stage passes is
//! decided again, and recorded, by tc ingress.
//!
//! Declared frags-aware (`xdp.frags`, kernel ≥ 5.18): it only reads headers, which lie in the
//! first buffer, and a veth keeps GSO on its peer only while its XDP program accepts frags.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use dataplane_common::{Hook, Reason, Verdict, maps::IfaceValue, reason::UNATTRIBUTED_SLOT};

use crate::{
    decide::{Direction, count, decide_packet},
    maps::IFACES,
    parse::{Frame, parse_frame},
    trace::{self, Subject},
};

#[xdp]
pub fn quadrant_xdp(ctx: XdpContext) -> u32 {
    let (slot, reason, subject) = classify(&ctx);
    count(Hook::Xdp, slot, reason);
    trace::verdict(Hook::Xdp, slot, reason, subject);
    match reason.verdict() {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> (u32, Reason, Subject) {
    // SAFETY: ingress_ifindex reads the context, which the verifier allows.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: read-only lookup of a plain value.
    let Some(&IfaceValue { quadrant, .. }) = (unsafe { IFACES.get(ifindex) }) else {
        return (
            UNATTRIBUTED_SLOT,
            Reason::DropUnknownInterface,
            Subject::None,
        );
    };
    let (reason, subject) = match parse_frame(ctx.data(), ctx.data_end()) {
        Ok(Frame::Arp) => (Reason::PassArp, Subject::None),
        Ok(Frame::Ipv4(flow)) => (
            decide_packet(&flow, quadrant, Direction::FromQuadrant, false),
            Subject::Packet(flow),
        ),
        Err(reason) => (reason, Subject::None),
    };
    (u32::from(quadrant), reason, subject)
}
