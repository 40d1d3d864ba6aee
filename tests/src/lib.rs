//! Helpers shared by quadrant's privileged tests: a packet builder for the fixture tables and
//! small utilities for the namespace tests.
#![expect(
    clippy::missing_panics_doc,
    reason = "test support: a panic is how a test fails"
)]

pub mod bounded;
pub mod cni;
pub mod harness;
pub mod kubeapi;
pub mod packets;
