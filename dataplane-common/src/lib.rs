//! Types shared by the quadrant eBPF programs (`dataplane-ebpf`) and the agent.
//!
//! Everything here is `no_std`, `#[repr(C)]` and free of implicit padding, because the same bytes
//! are written by one side and read by the other through BPF maps. The agent enables the `user`
//! feature, which adds `aya::Pod` impls.
#![no_std]
#![expect(
    clippy::inline_always,
    reason = "these helpers run inside eBPF programs, where inlining keeps the verifier's view of bounds intact"
)]

pub mod identity;
pub mod maps;
pub mod policy;
pub mod reason;

pub use identity::{Identity, QUADRANT_COUNT, Quadrant};
pub use reason::{Hook, Reason, Verdict};
