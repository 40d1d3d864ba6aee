//! quadrant node agent.
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | configuration types, embedded default, validation |
//! | [`sys`] | iproute2, mounts, sysctls, namespace entry |
//! | [`quadrants`] | a quadrant's namespace, veth, addresses and cgroup |
//! | [`loader`] | the eBPF object: load, pin, attach, maps, counters |
//! | [`control`] | the control socket: protocol, typed client, server |
//! | [`daemon`] | `up`: bring-up, the services, the main loop, teardown; state file; `down`, `exec` |
//! | [`deploy`] | submit and break-glass rollback of signed plans |
//! | [`admission`] | fail-closed admission: SVID → constraints → audit record |
//! | [`audit`] | append-only, hash-chained audit log |
//! | [`artifacts`] | content-addressed artifact store (`<root>/<pkg>@sha256:<digest>`) |
//! | [`signing`] | Ed25519 DSSE envelopes and the per-quadrant trust store |
//! | [`plans`] | execution plans: types, JSON Schema (schemars + jsonschema), canonical signing |
//! | [`generations`] | monotone plan generations per workload |
//! | [`workloads`] | running admitted workloads in their quadrant with limits and restarts |
//! | [`identity`] | MCP-Core identity: CA, SVIDs, attestation, SPIFFE Workload API |
//! | [`policy`] | MCP-Core policy: Rego bundle (regorus), compilation for the kernel, the one activation path, watch, tests, eval |
//! | [`lanes`] | RTT lanes, agent side: the broker and the acceleration probe (the workload side is `quadrant-lanes`) |
//! | [`events`] | the event stream (`quadrant events`), each event checked against its schema |
//! | [`trace`] | the verdict trace: mode, reading the programs' records, rendering |
//! | [`ringbuf`] | draining the programs' ring buffers of fixed-size records |
//! | [`slo`] | SLOs and error budgets: specs, rolling windows, burn-rate alerts, `quadrant slo`, admission's `input.slo` |
//! | [`breakers`] | circuit breakers: `quadrant breakers`, the kernel's transitions as events and audit records |

pub mod admission;
pub mod artifacts;
pub mod audit;
pub mod breakers;
pub mod chaos;
pub mod cni;
pub mod config;
pub mod control;
pub mod daemon;
pub mod deploy;
pub mod events;
pub mod flows;
pub mod generations;
pub mod identity;
pub mod lanes;
pub mod loader;
pub mod metrics;
pub mod peers;
pub mod plans;
pub mod pods;
pub mod policy;
pub mod quadrants;
pub mod ringbuf;
pub mod scale;
pub mod shadow;
pub mod signing;
pub mod slo;
pub mod sys;
pub mod trace;
pub mod workloads;
