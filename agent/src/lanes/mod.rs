//! RTT lanes: bidirectional, message-framed, policy-authorized channels between workloads.
//!
//! * [`broker`] — the agent side: attestation, policy, limits, lane set-up, `quadrant lanes`.
//! * [`client`] — the library workloads use: [`client::LaneClient::open`],
//!   [`client::LaneListener::accept`], then [`lane::Lane`] send / receive / request / close.
//! * Transports: shared-memory rings ([`ring`]) with `io_uring` wake-ups ([`os::Sleeper`]), a
//!   framed Unix socket pair, and TCP with TLS 1.3 and mutual SVID authentication ([`tls`]).
//! * [`accel_probe`] — `lanes.tcp_acceleration: auto`: whether `sk_msg` wins here, measured at
//!   start.
//! * [`frame`] — the 8-byte header every transport uses; [`control`] — the broker protocol.

pub mod accel_probe;
pub mod broker;
pub mod client;
pub mod control;
pub mod frame;
pub mod lane;
pub mod os;
pub mod ring;
pub mod tls;

pub use client::{LaneClient, LaneListener, SOCKET_ENV};
pub use control::{Transport, TransportChoice};
pub use lane::{Lane, LaneError};
