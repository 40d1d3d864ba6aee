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
    Lane, LaneClient, LaneError, LaneListener, SOCKET_ENV, Transport, TransportChoice, client,
    control, frame, lane, os, ring, tls,
};
