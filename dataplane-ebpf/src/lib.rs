//! Host-side stub of the eBPF crate.
//!
//! The programs live in the `dataplane` binary (src/main.rs and its modules), which only builds for
//! the bpfel target. This library exists so that `agent/build.rs` can name the crate as a
//! build-dependency and cargo re-runs the eBPF build when its sources change.
#![no_std]
