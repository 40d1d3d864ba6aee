//! quadrant node agent.
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | configuration types, embedded default, validation, policy compilation |
//! | [`sys`] | iproute2, mounts, sysctls, namespace entry |
//! | [`quadrants`] | a quadrant's namespace, veth, addresses and cgroup |
//! | [`loader`] | the eBPF object: load, pin, attach, maps, counters |
//! | [`api`] | the control socket protocol and status rendering |
//! | [`app`] | lifecycle: up, down, status, exec, state file |
//! | [`admission`] | fail-closed admission: SVID → constraints → audit record |
//! | [`audit`] | append-only, hash-chained audit log |
//! | [`artifacts`] | content-addressed artifact store (`<root>/<pkg>@sha256:<digest>`) |
//! | [`signing`] | Ed25519 DSSE envelopes and the per-quadrant trust store |
//! | [`plans`] | execution plans: types, JSON Schema (schemars + jsonschema), canonical signing |
//! | [`generations`] | monotone plan generations per workload |
//! | [`workloads`] | running admitted workloads in their quadrant with limits and restarts |
//! | [`identity`] | MCP-Core identity: CA, SVIDs, attestation, SPIFFE Workload API |
//! | [`policy`] | MCP-Core policy: Rego bundle (regorus), runtime flows compiled to the kernel, tests, eval |
//! | [`trace`] | the verdict trace: mode, reading the programs' records, rendering |

pub mod admission;
pub mod api;
pub mod app;
pub mod artifacts;
pub mod audit;
pub mod config;
pub mod events;
pub mod generations;
pub mod identity;
pub mod lanes;
pub mod loader;
pub mod plans;
pub mod policy;
pub mod policy_watch;
pub mod quadrants;
pub mod signing;
pub mod sys;
pub mod trace;
pub mod workloads;
