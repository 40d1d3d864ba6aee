//! tcx egress on a quadrant's host-side veth: packets delivered into the quadrant.
//!
//! Enforces the policy for flows other identities (quadrants, the host, the world) open towards
//! the quadrant, and records allowed flows so their replies pass.

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::Hook;

use crate::{decide::Direction, tc::run};

#[classifier]
pub fn quadrant_tc_egress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::TcEgress, Direction::IntoQuadrant)
}
