//! RTT lanes, the workload side: bidirectional, message-framed, policy-authorized channels
//! between workloads, opened through the quadrant agent's lane broker. A workload links this
//! crate only (no aya, regorus, tonic or the agent's CA).
//!
//! * [`client`] — [`client::LaneClient::open`], [`client::LaneListener::accept`], then
//!   [`lane::Lane`] send / receive / request / close.
//! * Transports: shared-memory rings ([`ring`]) whose ends poll each other while the peer runs
//!   on another CPU and otherwise sleep and ring a doorbell on the lane's socket pair
//!   ([`os::Waker`]), a framed Unix socket pair, and TCP with TLS 1.3 and mutual SVID authentication ([`tls`],
//!   checked by the SPIFFE rules of [`svid`]; records after the handshake by `record`).
//! * [`frame`] — the 8-byte header every transport uses; [`control`] — the broker protocol.
//! * Mirroring: a lane to a service with a shadow generation copies a share of its requests to
//!   the shadow from a thread of its own and drops the shadow's replies (`mirror`).
//! * [`workers`] — threads a service keeps to serve its next lane, instead of one started and
//!   ended per lane.
//!
//! The broker itself is the agent's (`quadrant::lanes::broker`).

pub mod caller;
pub mod client;
pub mod control;
pub mod envelope;
pub mod frame;
pub mod lane;
mod mirror;
pub mod os;
mod record;
pub mod ring;
pub mod svid;
pub mod tls;
pub mod workers;

pub use caller::{Answer, CallError, Caller, CallerStats, RetryPolicy};
pub use client::{LaneClient, LaneListener, SOCKET_ENV};
pub use control::{Transport, TransportChoice};
pub use envelope::RequestId;
pub use lane::{Lane, LaneError};
pub use workers::Workers;
