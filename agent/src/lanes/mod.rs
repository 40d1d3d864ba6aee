//! RTT lanes, the agent side. The workload side — client, lanes, rings, frames, the broker
//! protocol, TLS — is the `quadrant-lanes` crate, which workloads link without the agent; it is
//! re-exported here under the same names.
//!
//! * [`broker`] — attestation, policy, limits, lane set-up, `quadrant lanes`.
//! * [`accel_probe`] — `lanes.tcp_acceleration: auto`: whether `sk_msg` wins here, measured at
//!   start.

pub mod accel_probe;
pub mod broker;

pub use quadrant_lanes::{
    Answer, CallError, Caller, CallerStats, Lane, LaneClient, LaneError, LaneListener, RequestId,
    RetryPolicy, SOCKET_ENV, Transport, TransportChoice, caller, client, control, envelope, frame,
    lane, os, ring, tls,
};
