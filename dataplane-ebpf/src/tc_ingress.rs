//! tcx ingress on a quadrant's host-side veth: packets the quadrant sends.
//!
//! Enforces source-address ownership (anti-spoofing) and the policy for flows the quadrant opens,
//! and records allowed flows so their replies pass.

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::Hook;

use crate::{decide::Direction, tc::run};

#[classifier]
pub fn quadrant_tc_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::TcIngress, Direction::FromQuadrant)
}
