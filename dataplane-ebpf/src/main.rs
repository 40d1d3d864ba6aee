//! quadrant's eBPF object: one module per hook and direction, shared logic in `parse`, `decide`
//! and `maps`.
//!
//! | hook | entry | attached to |
//! |---|---|---|
//! | XDP | [`xdp::quadrant_xdp`] | host-side veth of each quadrant (frames leaving it) |
//! | tcx ingress | [`tc_ingress::quadrant_tc_ingress`] | host-side veth (packets leaving the quadrant) |
//! | tcx egress | [`tc_egress::quadrant_tc_egress`] | host-side veth (packets entering the quadrant) |
//! | cgroup connect4/6, sendmsg4/6 | [`cgroup_sock_addr`] | each quadrant's cgroup |
//! | cgroup `sock_create` | [`sock_create::quadrant_sock_create`] | each quadrant's cgroup |
//! | cgroup getpeername4, recvmsg4 (service VIPs) | [`lb`] | each quadrant's cgroup |
//! | `sock_ops` (circuit breakers) | [`breaker::quadrant_breaker_sockops`] | each quadrant's cgroup |
//! | `sock_ops`, `sk_msg` | [`lane_accel`] | each quadrant's cgroup; the `LANE_SOCKS` sockhash (optional) |
#![no_std]
#![no_main]
// `atomic_xadd` for the load balancer's connection counts (`lb::atomic_add`): the bpf target has
// no read-modify-write atomics in `core::sync::atomic`.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics, for BPF_ATOMIC adds")]
#![expect(
    clippy::inline_always,
    reason = "BPF-to-BPF calls cost verifier state and lose packet-bound facts; the helpers are meant to be inlined"
)]
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand each entry its context by value"
)]

mod breaker;
mod cgroup_sock_addr;
mod chaos;
mod decide;
mod lane_accel;
mod lb;
mod lb_flow;
mod maps;
mod parse;
mod sock_create;
mod tc;
mod tc_egress;
mod tc_ingress;
mod trace;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; nothing is ever executed.
    loop {}
}

/// Dual-licensed so GPL-only helpers are available.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
