//! The figures read at scrape time: [`Sources`] gathers them from a running agent, and
//! [`families`] turns them into metric families (pure, so unit tests feed it directly).

use std::collections::BTreeMap;

use dataplane_common::Quadrant;
use quadrant_lanes::ring::{LATENCY_BUCKETS, latency_bucket_upper_ns};

use super::{Family, Kind, Labels, Value};
use crate::{
    daemon::agent::{Agent, locked},
    lanes::{
        Transport,
        broker::{QuadrantLanes, Refusals, ServiceInfo, sli::SliTotals},
    },
};

/// Everything the scrape-time families are made of.
#[derive(Debug, Default)]
pub struct Sources {
    /// The quadrants the agent runs (every per-quadrant gauge has a sample for each).
    pub quadrants: Vec<Quadrant>,
    /// The sources that could not be read (`verdicts`, `breakers`, `chaos`) and why.
    pub unreadable: BTreeMap<&'static str, String>,
    /// The kernel's verdict counters.
    pub verdicts: Vec<crate::loader::Counter>,
    /// The quadrants run a policy (not deny-all).
    pub policy_enforced: bool,
    /// The revision of the live `policy_dir` bundle.
    pub policy_revision: Option<u64>,
    /// The digest of the bundle the kernel enforces.
    pub policy_digest: Option<String>,
    /// Lane usage per opener quadrant.
    pub lane_usage: Vec<QuadrantLanes>,
    /// Refused lane opens.
    pub lane_refusals: Vec<Refusals>,
    /// Services offered.
    pub lane_services: Vec<ServiceInfo>,
    /// What the lanes to each service counted (mirror lanes apart, not here).
    pub sli: BTreeMap<(Quadrant, String), SliTotals>,
    /// Supervised workloads.
    pub workloads: Vec<crate::workloads::Status>,
    /// The kernel's circuit breakers.
    pub breakers: Vec<crate::breakers::BreakerRow>,
    /// The lane services' breakers.
    pub service_breakers: Vec<crate::lanes::broker::trip::ServiceBreakerRow>,
    /// SLOs.
    pub slos: Vec<crate::slo::SloStatus>,
    /// Quadrant instances.
    pub instances: Vec<crate::scale::InstanceStatus>,
    /// Each service with a VIP: its ready instances on this node and on the peer nodes that
    /// its VIP balances over.
    pub service_backends: Vec<ServiceBackends>,
    /// Chaos faults in force.
    pub chaos: Vec<crate::chaos::FaultStatus>,
    /// Pods attached by `quadrant-cni`.
    pub pods: Vec<crate::pods::PodStatus>,
    /// Flow events the agent read, by kind.
    pub flow_events: Vec<(crate::flows::EventKind, u64)>,
    /// What the kernel's programs wrote and lost of flow events, summed over CPUs.
    pub flow_limits: dataplane_common::maps::EventsLimit,
    /// The peer nodes (`None`: no `peers` section).
    pub peers: Option<Vec<crate::peers::PeerStatus>>,
    /// With `peers.kubernetes`: whether the Kubernetes API is followed.
    pub kubernetes_up: Option<bool>,
}

/// One service's ready instances, as its VIP balances over them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceBackends {
    /// The service's name.
    pub service: String,
    /// Ready (and not draining) instances of this node.
    pub node: u64,
    /// Instances of peer nodes it balances over.
    pub peers: u64,
    /// Endpoints of its Kubernetes Service it balances over.
    pub kubernetes: u64,
}

impl ServiceBackends {
    /// Every configured service's, from `quadrant instances`.
    #[must_use]
    pub fn of(config: &crate::config::Config, report: &crate::scale::InstancesReport) -> Vec<Self> {
        config
            .services
            .iter()
            .map(|svc| {
                let remote = |source: &str| {
                    report
                        .remote
                        .iter()
                        .filter(|r| r.service == svc.name && r.source == source && r.balanced)
                        .count() as u64
                };
                Self {
                    service: svc.name.clone(),
                    node: report
                        .instances
                        .iter()
                        .filter(|i| !i.draining && i.services.get(&svc.name) == Some(&true))
                        .count() as u64,
                    peers: remote("peers"),
                    kubernetes: remote("kubernetes"),
                }
            })
            .collect()
    }
}

impl Sources {
    /// Reads them from `agent` (kernel maps and files: call from a blocking task).
    #[must_use]
    pub fn read(agent: &Agent) -> Self {
        let mut unreadable = BTreeMap::new();
        let report = agent.instances_report();
        let (verdicts, policy_digest, flow_limits) = {
            let dataplane = locked(&agent.dataplane);
            let verdicts = dataplane.counters().unwrap_or_else(|e| {
                unreadable.insert("verdicts", e.to_string());
                Vec::new()
            });
            let limits = dataplane.events_counts().unwrap_or_else(|e| {
                unreadable.insert("flow_events", e.to_string());
                dataplane_common::maps::EventsLimit::default()
            });
            (
                verdicts,
                dataplane.policy_digest().map(ToOwned::to_owned),
                limits,
            )
        };
        let breakers = agent.breakers_report().map_or_else(
            |e| {
                unreadable.insert("breakers", e.to_string());
                (Vec::new(), Vec::new())
            },
            |r| (r.breakers, r.services),
        );
        let chaos = crate::chaos::status(&agent.config).unwrap_or_else(|e| {
            unreadable.insert("chaos", e.to_string());
            Vec::new()
        });
        let lanes = agent.broker.report();
        let policy_revision = locked(&agent.generations)
            .as_ref()
            .ok()
            .and_then(|g| g.current(crate::policy::activate::BUNDLE_REVISION_KEY));
        Self {
            quadrants: agent.quadrants.iter().map(|(h, _)| h.quadrant).collect(),
            unreadable,
            verdicts,
            policy_enforced: agent.policy.state().starts_with("enforced"),
            policy_revision,
            policy_digest,
            lane_usage: lanes.quadrants,
            lane_refusals: lanes.refusals,
            lane_services: lanes.services,
            sli: agent.broker.sli_totals(),
            workloads: agent.supervisor.list(),
            breakers: breakers.0,
            service_breakers: breakers.1,
            slos: agent.slo_report().slos,
            instances: report.instances.clone(),
            service_backends: ServiceBackends::of(&agent.config, &report),
            chaos,
            pods: agent.pods.list(),
            flow_events: agent.flows.read_counts().to_vec(),
            flow_limits,
            peers: agent.broker.peers().map(|p| p.status()),
            kubernetes_up: agent
                .config
                .peers
                .kubernetes
                .as_ref()
                .and(agent.broker.peers())
                .map(|p| p.kubernetes_error().is_none()),
        }
    }
}

fn l(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// The quadrant part of `<quadrant>/<name>` (or of a bare quadrant name).
fn quadrant_part(name: &str) -> &str {
    name.split_once('/').map_or(name, |(q, _)| q)
}

/// Every scrape-time family, in a fixed order; each is described even without samples.
#[must_use]
pub fn families(s: &Sources) -> Vec<Family> {
    let mut out = vec![build_info(), sources_up(s)];
    out.push(verdicts(s));
    out.extend(policy(s));
    out.extend(lanes(s));
    out.push(workloads(s));
    out.push(pods(s));
    out.extend(breakers(s));
    out.extend(slos(s));
    out.extend(instances(s));
    out.extend(peers(s));
    out.extend(chaos(s));
    out.extend(flow_events(s));
    out
}

fn build_info() -> Family {
    let mut f = Family::new(
        "quadrant_build_info",
        "The agent's version (always 1)",
        Kind::Gauge,
    );
    f.int(l(&[("version", env!("CARGO_PKG_VERSION"))]), 1);
    f
}

fn sources_up(s: &Sources) -> Family {
    let mut f = Family::new(
        "quadrant_metrics_source_up",
        "Whether the scrape could read a source of figures (1) or not (0: its figures are \
         missing from this scrape; the agent's log says why)",
        Kind::Gauge,
    );
    for source in ["verdicts", "breakers", "chaos", "flow_events"] {
        f.int(
            l(&[("source", source)]),
            u64::from(!s.unreadable.contains_key(source)),
        );
    }
    f
}

fn verdicts(s: &Sources) -> Family {
    let mut f = Family::new(
        "quadrant_verdicts",
        "Verdicts of the kernel programs by hook, quadrant, reason and verdict (read from the \
         per-CPU counters at scrape time)",
        Kind::Counter,
    );
    for c in &s.verdicts {
        f.int(
            l(&[
                ("hook", &c.hook),
                ("quadrant", &c.quadrant),
                ("reason", &c.reason),
                ("verdict", &c.verdict),
            ]),
            c.count,
        );
    }
    f
}

fn policy(s: &Sources) -> Vec<Family> {
    let mut enforced = Family::new(
        "quadrant_policy_enforced",
        "1 while the quadrants run a policy bundle, 0 while they are deny-all (no policy could \
         be made live)",
        Kind::Gauge,
    );
    enforced.int(Vec::new(), u64::from(s.policy_enforced));
    let mut revision = Family::new(
        "quadrant_policy_bundle_revision",
        "Revision of the live policy_dir bundle (absent: the embedded bundle, or none)",
        Kind::Gauge,
    );
    if let Some(r) = s.policy_revision {
        revision.int(Vec::new(), r);
    }
    let mut info = Family::new(
        "quadrant_policy_info",
        "The digest of the policy bundle the kernel enforces (always 1)",
        Kind::Gauge,
    );
    if let Some(d) = &s.policy_digest {
        info.int(l(&[("digest", d)]), 1);
    }
    vec![enforced, revision, info]
}

/// Prometheus buckets of a round-trip histogram: the lanes' log-linear buckets merged by power
/// of two (upper bounds 1.024 µs · 2^k up to 33.6 ms), then +Inf.
#[must_use]
pub fn round_trip_buckets(counts: &[u64; LATENCY_BUCKETS]) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = Vec::new();
    let mut acc = 0u64;
    for (i, c) in counts.iter().enumerate() {
        acc += c;
        let upper = latency_bucket_upper_ns(i);
        // Bucket 0 ends at 1,024 ns; bucket 4k ends at a power of two (1,024 ns · 2^k).
        let edge = i % 4 == 0 && upper != u64::MAX;
        if edge {
            #[expect(clippy::cast_precision_loss, reason = "bounds below 2^26 ns")]
            out.push((upper as f64 / 1e9, acc));
            acc = 0;
        }
    }
    out.push((f64::INFINITY, acc));
    out
}

fn lanes(s: &Sources) -> Vec<Family> {
    let gauge = |name, help, get: fn(&QuadrantLanes) -> u64| {
        let mut f = Family::new(name, help, Kind::Gauge);
        for u in &s.lane_usage {
            f.int(l(&[("quadrant", &u.quadrant)]), get(u));
        }
        f
    };
    let mut out = vec![
        gauge(
            "quadrant_lanes_open",
            "Lanes the quadrant's workloads have open",
            |u| u64::from(u.lanes),
        ),
        gauge(
            "quadrant_lanes_limit",
            "The quadrant's limit of open lanes",
            |u| u64::from(u.max_lanes),
        ),
        gauge(
            "quadrant_lane_shm_bytes",
            "Shared memory the quadrant's open lanes hold",
            |u| u.shm_bytes,
        ),
        gauge(
            "quadrant_lane_shm_limit_bytes",
            "The quadrant's limit of lane shared memory",
            |u| u.max_shm_bytes,
        ),
    ];
    let mut services = Family::new(
        "quadrant_lane_services",
        "Lane services offered, by the service's quadrant",
        Kind::Gauge,
    );
    for q in &s.quadrants {
        let n = s
            .lane_services
            .iter()
            .filter(|i| i.quadrant == q.name())
            .count();
        services.int(l(&[("quadrant", q.name())]), n as u64);
    }
    out.push(services);
    let mut refusals = Family::new(
        "quadrant_lane_refusals",
        "Refused lane opens by the opener's quadrant (none: unattested) and reason",
        Kind::Counter,
    );
    for r in &s.lane_refusals {
        refusals.int(
            l(&[("quadrant", &r.quadrant), ("reason", r.reason.name())]),
            r.count,
        );
    }
    out.push(refusals);
    out.extend(lane_traffic(s));
    out
}

/// The lanes' counts summed per service quadrant (and transport).
fn lane_traffic(s: &Sources) -> Vec<Family> {
    let mut per_q: BTreeMap<Quadrant, SliTotals> = BTreeMap::new();
    for ((q, _), t) in &s.sli {
        let sum = per_q.entry(*q).or_default();
        sum.requests += t.requests;
        sum.failed += t.failed;
        for i in 0..3 {
            sum.lanes[i] += t.lanes[i];
            sum.transport_latency_sum_ns[i] += t.transport_latency_sum_ns[i];
            for (a, b) in sum.transport_latency[i]
                .iter_mut()
                .zip(&t.transport_latency[i])
            {
                *a += b;
            }
        }
        sum.bytes[0] += t.bytes[0];
        sum.bytes[1] += t.bytes[1];
    }
    let mut opened = Family::new(
        "quadrant_lanes_opened",
        "Lanes opened to services of the quadrant, by transport",
        Kind::Counter,
    );
    let mut requests = Family::new(
        "quadrant_lane_requests",
        "Requests made over lanes to services of the quadrant (answered or not)",
        Kind::Counter,
    );
    let mut failures = Family::new(
        "quadrant_lane_request_failures",
        "Lane requests to services of the quadrant that were not answered (the lane failed or \
         closed first)",
        Kind::Counter,
    );
    let mut bytes = Family::new(
        "quadrant_lane_bytes",
        "Payload bytes over lanes to services of the quadrant, by direction",
        Kind::Counter,
    );
    let mut rtt = Family::new(
        "quadrant_lane_round_trip_seconds",
        "Round trips of answered lane requests to services of the quadrant, by transport, as \
         the client library measured them",
        Kind::Histogram,
    );
    for (q, t) in &per_q {
        let q = q.name();
        requests.int(l(&[("quadrant", q)]), t.requests);
        failures.int(l(&[("quadrant", q)]), t.failed);
        bytes.int(
            l(&[("quadrant", q), ("direction", "to_server")]),
            t.bytes[0],
        );
        bytes.int(
            l(&[("quadrant", q), ("direction", "to_client")]),
            t.bytes[1],
        );
        for (i, transport) in Transport::ALL.iter().enumerate() {
            let labels = l(&[("quadrant", q), ("transport", transport.name())]);
            opened.int(labels.clone(), t.lanes[i]);
            let counts = &t.transport_latency[i];
            #[expect(clippy::cast_precision_loss, reason = "a sum of round trips in ns")]
            rtt.push(
                labels,
                Value::Histogram {
                    sum: t.transport_latency_sum_ns[i] as f64 / 1e9,
                    count: counts.iter().sum(),
                    buckets: round_trip_buckets(counts),
                },
            );
        }
    }
    vec![opened, requests, failures, bytes, rtt]
}

/// Workload states `quadrant workloads` shows.
const WORKLOAD_STATES: [&str; 4] = ["running", "exited", "stopped", "failed"];

fn workloads(s: &Sources) -> Family {
    let mut f = Family::new(
        "quadrant_workloads",
        "Supervised workloads by quadrant and state",
        Kind::Gauge,
    );
    for q in &s.quadrants {
        for state in WORKLOAD_STATES {
            let n = s
                .workloads
                .iter()
                .filter(|w| quadrant_part(&w.name) == q.name() && w.state == state)
                .count();
            f.int(l(&[("quadrant", q.name()), ("state", state)]), n as u64);
        }
    }
    f
}

fn pods(s: &Sources) -> Family {
    let mut f = Family::new(
        "quadrant_pods",
        "Pods quadrant-cni attached, by quadrant",
        Kind::Gauge,
    );
    for q in &s.quadrants {
        let n = s
            .pods
            .iter()
            .filter(|p| p.spec.quadrant == q.name())
            .count();
        f.int(l(&[("quadrant", q.name())]), n as u64);
    }
    f
}

/// Breaker states.
const BREAKER_STATES: [&str; 3] = ["closed", "open", "half_open"];

fn breakers(s: &Sources) -> Vec<Family> {
    let mut kernel = Family::new(
        "quadrant_breakers",
        "The kernel's circuit breakers (per destination) by calling quadrant and state",
        Kind::Gauge,
    );
    let mut services = Family::new(
        "quadrant_service_breakers",
        "The lane services' circuit breakers by the service's quadrant and state",
        Kind::Gauge,
    );
    for q in &s.quadrants {
        for state in BREAKER_STATES {
            let labels = l(&[("quadrant", q.name()), ("state", state)]);
            let n = s
                .breakers
                .iter()
                .filter(|b| b.caller == q.name() && b.state == state)
                .count();
            kernel.int(labels.clone(), n as u64);
            let n = s
                .service_breakers
                .iter()
                .filter(|b| quadrant_part(&b.service) == q.name() && b.state == state)
                .count();
            services.int(labels, n as u64);
        }
    }
    vec![kernel, services]
}

fn enum_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

fn slos(s: &Sources) -> Vec<Family> {
    let mut objective = Family::new(
        "quadrant_slo_objective",
        "The SLO's target share of good events",
        Kind::Gauge,
    );
    let mut sli = Family::new(
        "quadrant_slo_sli",
        "Good / total events over the SLO's window (absent: no events)",
        Kind::Gauge,
    );
    let mut budget = Family::new(
        "quadrant_slo_error_budget_remaining",
        "Share of the window's error budget left (1: untouched, 0 or less: spent)",
        Kind::Gauge,
    );
    let mut burn = Family::new(
        "quadrant_slo_burn_rate",
        "Error budget burn rate over a rule's window (window: long or short; rule: the \
         severity and the long window in seconds)",
        Kind::Gauge,
    );
    let mut firing = Family::new(
        "quadrant_slo_alert_firing",
        "1 while a multi-window burn-rate rule fires (both windows above its factor)",
        Kind::Gauge,
    );
    for slo in &s.slos {
        let base = [
            ("slo", slo.name.as_str()),
            ("quadrant", slo.quadrant.as_str()),
            ("indicator", &enum_name(&slo.indicator)),
        ]
        .map(|(k, v)| (k, v.to_owned()));
        objective.float(base.to_vec(), slo.target);
        if let Some(v) = slo.sli {
            sli.float(base.to_vec(), v);
        }
        if let Some(v) = slo.budget_remaining {
            budget.float(base.to_vec(), v);
        }
        for r in &slo.burn_rates {
            let rule = format!("{}_{}s", r.severity, r.long_window_secs.round());
            let mut labels = base.to_vec();
            labels.push(("rule", rule));
            for (window, v) in [("long", r.long_burn), ("short", r.short_burn)] {
                if let Some(v) = v {
                    let mut w = labels.clone();
                    w.push(("window", window.to_owned()));
                    burn.float(w, v);
                }
            }
            firing.int(
                labels,
                u64::from(r.state == crate::slo::burn::State::Firing),
            );
        }
    }
    vec![objective, sli, budget, burn, firing]
}

/// Peer nodes by source and link state; the Kubernetes API's state.
fn peers(s: &Sources) -> Vec<Family> {
    let mut nodes = Family::new(
        "quadrant_peer_nodes",
        "Peer nodes by where they come from (`peers.nodes` or `kubernetes`) and link state \
         (`linked`, `down`, or `waiting` for a link slot)",
        Kind::Gauge,
    );
    if let Some(peers) = &s.peers {
        for source in ["peers.nodes", "kubernetes"] {
            for state in ["linked", "down", "waiting"] {
                let n = peers
                    .iter()
                    .filter(|p| p.source == source && p.state() == state)
                    .count();
                nodes.int(l(&[("source", source), ("state", state)]), n as u64);
            }
        }
    }
    let mut api = Family::new(
        "quadrant_kubernetes_api_up",
        "1 while the agent follows the cluster's nodes in the Kubernetes API (peers.kubernetes), \
         0 while it cannot (`quadrant instances` says why)",
        Kind::Gauge,
    );
    if let Some(up) = s.kubernetes_up {
        api.int(Vec::new(), u64::from(up));
    }
    vec![nodes, api]
}

fn instances(s: &Sources) -> Vec<Family> {
    let mut count = Family::new(
        "quadrant_instances",
        "Instances each quadrant runs",
        Kind::Gauge,
    );
    for q in &s.quadrants {
        let n = s
            .instances
            .iter()
            .filter(|i| i.quadrant == q.name())
            .count();
        count.int(l(&[("quadrant", q.name())]), n as u64);
    }
    let mut ready = Family::new(
        "quadrant_instance_ready",
        "1 while an instance takes new work: not draining and ready for each of its services \
         with a virtual address",
        Kind::Gauge,
    );
    let mut draining = Family::new(
        "quadrant_instance_draining",
        "1 while an instance is drained (`quadrant drain`)",
        Kind::Gauge,
    );
    let mut connections = Family::new(
        "quadrant_instance_connections",
        "Active connections the load balancer counts for an instance",
        Kind::Gauge,
    );
    for i in &s.instances {
        // `index`, not `instance`: Prometheus gives every series its target's `instance`.
        let labels = l(&[("quadrant", &i.quadrant), ("index", &i.index.to_string())]);
        ready.int(
            labels.clone(),
            u64::from(!i.draining && i.services.values().all(|r| *r)),
        );
        draining.int(labels.clone(), u64::from(i.draining));
        connections.int(labels, i.connections);
    }
    let mut backends = Family::new(
        "quadrant_service_backends",
        "Ready instances a service's VIP balances over: this node's (`source=\"node\"`), the \
         peer nodes' (`source=\"peers\"`, services balanced cluster-wide) and its Kubernetes \
         Service's endpoints (`source=\"kubernetes\"`)",
        Kind::Gauge,
    );
    for b in &s.service_backends {
        for (source, n) in [
            ("node", b.node),
            ("peers", b.peers),
            ("kubernetes", b.kubernetes),
        ] {
            backends.int(l(&[("service", &b.service), ("source", source)]), n);
        }
    }
    vec![count, ready, draining, connections, backends]
}

fn flow_events(s: &Sources) -> Vec<Family> {
    let mut read = Family::new(
        "quadrant_flow_events",
        "Flow events the agent read from the kernel programs, by kind (drop, flow_open, \
         flow_close, verdict)",
        Kind::Counter,
    );
    for (kind, n) in &s.flow_events {
        read.int(l(&[("event", kind.name())]), *n);
    }
    let mut lost = Family::new(
        "quadrant_flow_events_lost",
        "Flow events the kernel programs did not write: over a CPU's budget \
         (observe.events_per_sec, reason rate_limit) or into a full ring buffer (ring_full)",
        Kind::Counter,
    );
    lost.int(
        l(&[("reason", "rate_limit")]),
        s.flow_limits.lost_rate_limit,
    );
    lost.int(l(&[("reason", "ring_full")]), s.flow_limits.lost_ring_full);
    vec![read, lost]
}

fn chaos(s: &Sources) -> Vec<Family> {
    let mut active = Family::new(
        "quadrant_chaos_faults_active",
        "Chaos faults in force by action, source and target (quadrant, any, host or world)",
        Kind::Gauge,
    );
    let mut matched = Family::new(
        "quadrant_chaos_fault_matched",
        "Packets or connects the faults in force matched",
        Kind::Counter,
    );
    let mut effects = Family::new(
        "quadrant_chaos_fault_effects",
        "Packets dropped, connects refused or connections reset by the faults in force",
        Kind::Counter,
    );
    let mut grouped: BTreeMap<(String, String, String), (u64, u64, u64)> = BTreeMap::new();
    for f in &s.chaos {
        let key = (
            enum_name(&f.action),
            quadrant_part(&f.from).to_owned(),
            quadrant_part(&f.to).to_owned(),
        );
        let e = grouped.entry(key).or_default();
        e.0 += 1;
        e.1 += f.matched;
        e.2 += f.dropped;
    }
    for ((action, from, to), (n, m, d)) in grouped {
        let labels = l(&[("action", &action), ("from", &from), ("to", &to)]);
        active.int(labels.clone(), n);
        matched.int(labels.clone(), m);
        effects.int(labels, d);
    }
    vec![active, matched, effects]
}
