//! MCP-Core policy: OPA Rego (v1) evaluated with regorus.
//!
//! A policy bundle is the `policies/` tree — runtime authorization in layers (global, one per
//! quadrant), Gatekeeper-style admission templates with their constraints, and Rego unit tests —
//! embedded in the binary, or read from a directory (`policy_dir` in the configuration).
//!
//! | module | concern |
//! |---|---|
//! | `bundle` | loading (embedded or `policy_dir`), signature, revision, digest, the engines, flows and lane rules |
//! | [`compile`] | flows → the kernel's policy-map entries: one merge of port ranges, one fit check, workloads resolved to cgroups |
//! | [`eval`] | Rego unit tests, `policy check`, `policy eval` |
//! | [`activate`] | the one path that makes a bundle live: read once → revision guard → compile → kernel, admission, lane broker → event |
//! | [`watch`] | `watch_policy_dir`: inotify on `policy_dir`, debounced into reloads |

pub mod activate;
mod bundle;
pub mod compile;
pub mod eval;
pub mod watch;

pub use bundle::*;
pub use compile::{CompiledFlows, CompiledPolicy, KernelPolicy, WorkloadPolicy};
