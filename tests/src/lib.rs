//! Helpers shared by quadrant's privileged tests: a packet builder for the fixture tables and
//! small utilities for the namespace tests.

pub mod harness;
pub mod packets;
