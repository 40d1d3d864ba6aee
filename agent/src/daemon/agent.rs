//! The running agent: its services, each with its own synchronisation — no lock over all of
//! them. The dataplane and the generation store sit behind their own `std` locks and are reached
//! from blocking tasks; `Supervisor`, `Admission`, `Broker`, `EventBus` and `PolicyService`
//! synchronise themselves; the rest does not change once the agent is up.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use aya::maps::{MapData, RingBuf};

use super::{accel::Accel, state::State};
use crate::{
    admission::{Admission, Decision, pem_chain},
    config::Config,
    control::protocol::{QuadrantStatus, StatusReport},
    events::EventBus,
    generations::{GenerationError, Generations},
    identity::IdentityService,
    lanes::broker::{Acceleration, Broker, LanesReport},
    loader::{AttachedProgram, Carried, Dataplane, LoaderError},
    policy::activate::{ActivateError, Activated, PolicyService},
    quadrants::QuadrantHandle,
    trace::TraceMode,
    workloads::Supervisor,
};

/// The services of a running agent.
pub struct Agent {
    /// The configuration it runs with.
    pub config: Config,
    /// Its state file.
    pub state: Mutex<State>,
    /// The loaded programs and maps.
    pub dataplane: Mutex<Dataplane>,
    /// Each quadrant and the programs attached for it.
    pub quadrants: Vec<(QuadrantHandle, Vec<AttachedProgram>)>,
    /// SVID issuance, or why there is none.
    pub identity: Result<Arc<IdentityService>, String>,
    /// The live policy and the path to change it.
    pub policy: PolicyService,
    /// Admission control.
    pub admission: Arc<Admission>,
    /// Accepted plan generations (and bundle revisions, dataplane versions).
    pub generations: Arc<Mutex<Result<Generations, GenerationError>>>,
    /// The workloads it runs.
    pub supervisor: Supervisor,
    /// The lane broker.
    pub broker: Arc<Broker>,
    /// Its events.
    pub events: Arc<EventBus>,
    /// What it carried over from a kept dataplane.
    pub carried: Option<Carried>,
    /// The lane acceleration.
    pub accel: Accel,
    /// The flow events' (and the verdict trace's) ring buffer, until the agent starts reading
    /// it.
    pub trace: Mutex<Option<RingBuf<MapData>>>,
    /// The flow events read from it, for `quadrant observe`.
    pub flows: Arc<crate::flows::FlowLog>,
    /// The circuit breakers' ring buffer of transitions, until the agent starts reading it.
    pub breaker_events: Mutex<Option<RingBuf<MapData>>>,
    /// The SLOs and their windows.
    pub slo: Arc<crate::slo::SloService>,
    /// The shadow generations running.
    pub shadows: crate::shadow::Shadows,
    /// The quadrants' added instances and their readiness for the services with a VIP.
    pub instances: crate::scale::Instances,
    /// Outages of the Workload API a chaos experiment asked for.
    pub outages: Arc<crate::chaos::outage::Outages>,
    /// Pods attached by `quadrant-cni`.
    pub pods: crate::pods::Pods,
    /// Where `/metrics` is served (set once the endpoint listens).
    pub metrics_addr: std::sync::OnceLock<std::net::SocketAddr>,
}

/// A lock that a panicked holder did not poison for the others: every holder leaves the value
/// consistent at each step it takes.
pub fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("instance", &self.config.instance)
            .field("policy", &self.policy.state())
            .field("carried", &self.carried)
            .field("accel", &self.accel)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// `quadrant scale Q N`.
    pub fn scale(
        &self,
        q: dataplane_common::Quadrant,
        n: u8,
    ) -> Result<u8, crate::scale::ScaleError> {
        let n = self.instances.scale(&self.config, &self.dataplane, q, n)?;
        tracing::info!(quadrant = q.name(), instances = n, "scaled");
        Ok(n)
    }

    /// Where a workload asking for `request` goes among `q`'s instances (its own earlier
    /// generation, `key`, not counted: the new one replaces it).
    #[must_use]
    pub fn place(
        &self,
        q: dataplane_common::Quadrant,
        key: &str,
        request: &crate::scale::place::Request,
    ) -> crate::scale::place::Placement {
        let qc = self.config.quadrants.get(q.name());
        let cap = self.config.capacity(q);
        let placed = self.supervisor.placed();
        let candidates: Vec<crate::scale::place::Candidate> = (0..self.instances.count(q))
            .map(|k| {
                let i = crate::config::InstanceRef::new(q, k);
                let dir = self.config.instance_cgroup_dir(i);
                let (cpu, mem) = placed
                    .iter()
                    .filter(|(other, cg, _)| other != key && cg.parent() == Some(dir.as_path()))
                    .fold((0u32, 0u64), |(c, m), (_, _, r)| {
                        (
                            c.saturating_add(r.cpu_millis),
                            m.saturating_add(r.memory_bytes),
                        )
                    });
                crate::scale::place::Candidate {
                    index: k,
                    draining: self.instances.is_draining(i),
                    labels: qc
                        .and_then(|c| c.instance_labels.get(&k).cloned())
                        .unwrap_or_default(),
                    #[expect(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "validated to 0.001..=1024 CPUs"
                    )]
                    cpu_millis: cap.cpu.map(|c| (c * 1000.0).round() as u32),
                    memory_bytes: cap.memory_bytes,
                    used_cpu_millis: cpu,
                    used_memory_bytes: mem,
                }
            })
            .collect();
        crate::scale::place::place(
            q.name(),
            &candidates,
            request,
            qc.map(|c| c.placement).unwrap_or_default(),
        )
    }

    /// `quadrant instances`.
    #[must_use]
    pub fn instances_report(&self) -> crate::scale::InstancesReport {
        let mut report = self
            .instances
            .report(&self.config, &locked(&self.dataplane));
        if let Some(p) = self.broker.peers() {
            report.peers = p.status();
            report.kubernetes_error = p.kubernetes_error();
            report.endpoints_refused = p.endpoints_refused();
        }
        report
    }

    /// `quadrant drain Q K` (or its undoing): instance K of Q receives no new connections.
    pub fn drain(
        &self,
        q: dataplane_common::Quadrant,
        index: u8,
        draining: bool,
    ) -> Result<(), String> {
        if !self
            .instances
            .set_draining(crate::config::InstanceRef::new(q, index), draining)
        {
            return Err(format!(
                "{} has no added instance {index} (it runs {}; instance 0 is the quadrant itself \
                 and is not drained)",
                q.name(),
                self.instances.count(q)
            ));
        }
        self.broker.set_draining(q, index, draining);
        self.instances
            .write_lb(&self.config, &mut locked(&self.dataplane))
            .map_err(|e| e.to_string())
    }

    /// `quadrant status` (reads the kernel's counters: call from a blocking task).
    pub fn status(&self) -> Result<StatusReport, LoaderError> {
        let quadrants = self
            .quadrants
            .iter()
            .map(|(h, programs)| {
                let q = h.quadrant;
                let a = self.config.addrs(q);
                QuadrantStatus {
                    name: q.name().to_owned(),
                    netns: self.config.netns(q),
                    prefix: a.prefix.to_string(),
                    gateway: a.gateway.to_string(),
                    address: a.workload.to_string(),
                    host_interface: self.config.host_iface(q),
                    host_ifindex: h.host_ifindex,
                    cgroup: self.config.cgroup_dir(q),
                    cgroup_id: h.cgroup_id,
                    programs: programs.clone(),
                }
            })
            .collect();
        let dataplane = locked(&self.dataplane);
        Ok(StatusReport {
            instance: self.config.instance.clone(),
            pid: locked(&self.state).pid,
            pin_dir: self.config.bpffs_dir(),
            socket: self.config.socket_path(),
            policy: self.policy.state(),
            policy_digest: dataplane.policy_digest().map(ToOwned::to_owned),
            admission_digest: self.admission.bundle_digest(),
            carried: self.carried.clone(),
            quadrants,
            counters: dataplane.counters()?,
            metrics: self.metrics_addr.get().copied(),
        })
    }

    /// Replaces the SLOs workload `key`'s plan declares (none: it stopped) and tells the
    /// broker the latency thresholds lanes carry from now on.
    pub fn set_workload_slos(
        &self,
        key: &str,
        specs: Vec<crate::slo::SloSpec>,
    ) -> Result<(), crate::config::ConfigError> {
        self.slo.set_owned(key, specs)?;
        self.broker
            .set_latency_thresholds(self.slo.latency_thresholds());
        Ok(())
    }

    /// `quadrant slo`: every SLO's state now.
    #[must_use]
    pub fn slo_report(&self) -> crate::slo::SloReport {
        self.slo.report(crate::breakers::monotonic_ns())
    }

    /// Judges the service breakers and feeds the SLO windows from the lanes' counts; with
    /// `summarize`, also tells admission the quadrants' SLO summary (which sums every window).
    pub fn sample_slos(&self, summarize: bool) {
        self.broker.cut_partitioned_lanes();
        let now = crate::breakers::monotonic_ns();
        let totals = self.broker.sli_totals();
        for t in self.broker.judge_trips(now, &totals) {
            crate::breakers::report_service(&self.config, &self.events, &self.admission, &t);
        }
        let usage = self
            .slo
            .cost_services()
            .into_iter()
            .filter_map(|(q, service)| {
                let workload = self.broker.service_workload(q, &service)?;
                let dir = self.config.cgroup_dir(q).join(&workload);
                Some((
                    (q, service),
                    crate::slo::CgroupUsage {
                        cpu_usec: std::fs::read_to_string(dir.join("cpu.stat"))
                            .ok()
                            .as_deref()
                            .and_then(crate::slo::cpu_usage_usec),
                        memory_bytes: crate::workloads::memory_bytes(
                            &dir,
                            &self.config.instance,
                            q.name(),
                            &workload,
                        ),
                    },
                ))
            })
            .collect();
        let totals = self.with_kernel_refusals(totals);
        self.slo.observe(now, &totals, &usage);
        self.shadows.observe(self);
        if summarize {
            let report = self.slo.report(now);
            self.reroute_burning(now, &report, &totals);
            self.admission
                .set_slo(&serde_json::to_value(report.quadrants).unwrap_or_default());
        }
    }

    /// `totals` with the TCP connects the kernel's breakers refused to the port of each service
    /// an availability SLO judges (`BREAKERS` entries for its quadrant's address and that
    /// port).
    fn with_kernel_refusals(
        &self,
        mut totals: std::collections::BTreeMap<
            (dataplane_common::Quadrant, String),
            crate::lanes::broker::sli::SliTotals,
        >,
    ) -> std::collections::BTreeMap<
        (dataplane_common::Quadrant, String),
        crate::lanes::broker::sli::SliTotals,
    > {
        // Only the services an availability SLO counts: the map is read entry by entry.
        let judged = self.slo.availability_services();
        let services: Vec<_> = self
            .broker
            .tcp_services()
            .into_iter()
            .filter(|(key, _)| judged.contains(key))
            .collect();
        if services.is_empty() {
            return totals;
        }
        let Ok(entries) = locked(&self.dataplane).breakers() else {
            return totals;
        };
        for ((q, service), port) in services {
            let addr = u32::from_ne_bytes(self.config.addrs(q).workload.octets());
            let refused: u64 = entries
                .iter()
                .filter(|(k, _)| {
                    k.daddr == addr
                        && k.dport == port.to_be()
                        && k.proto == dataplane_common::policy::PROTO_TCP
                })
                .map(|(_, b)| b.refused)
                .sum();
            if refused > 0 {
                totals.entry((q, service)).or_default().connect_refusals = refused;
            }
        }
        totals
    }

    /// Re-routes the services whose latency SLO has a rule firing (see
    /// `lanes::broker::route`); each switch is logged, an event and an audit record.
    fn reroute_burning(
        &self,
        now: u64,
        report: &crate::slo::SloReport,
        totals: &std::collections::BTreeMap<
            (dataplane_common::Quadrant, String),
            crate::lanes::broker::sli::SliTotals,
        >,
    ) {
        let burning = report.slos.iter().filter(|s| {
            s.indicator == crate::slo::Indicator::Latency
                && s.burn_rates
                    .iter()
                    .any(|b| b.state == crate::slo::burn::State::Firing)
        });
        for s in burning {
            let Some(q) = dataplane_common::Quadrant::from_name(&s.quadrant) else {
                continue;
            };
            let Some(t) = totals.get(&(q, s.service.clone())) else {
                continue;
            };
            let min = self.slo.min_events(&s.name);
            let Some(r) = self
                .broker
                .reroute_burning((q, &s.service), now, t, (min, s.target))
            else {
                continue;
            };
            tracing::info!(
                target: "quadrant::slo",
                "{} burns: new auto lanes to {}/{} go to {} instead of {} ({})",
                s.name, s.quadrant, s.service, r.to.name(), r.from.name(), r.reason
            );
            let (from, to, reason) = (r.from, r.to, r.reason.clone());
            self.events
                .emit(|seq, at_ms| crate::events::Event::LaneRerouted {
                    seq,
                    at_ms,
                    service: format!("{}/{}", s.quadrant, s.service),
                    slo: s.name.clone(),
                    from,
                    to,
                    reason,
                });
            let record = serde_json::json!({
                "service": format!("{}/{}", s.quadrant, s.service),
                "slo": s.name,
                "from": r.from.name(),
                "to": r.to.name(),
                "reason": r.reason,
            });
            if let Err(e) = self.admission.record("reroute", record) {
                tracing::warn!(error = %e, "re-route not audited");
            }
        }
    }

    /// `quadrant breakers`: every breaker the kernel keeps.
    pub fn breakers_report(&self) -> Result<crate::breakers::BreakersReport, LoaderError> {
        let entries = locked(&self.dataplane).breakers()?;
        let now = crate::breakers::monotonic_ns();
        Ok(crate::breakers::BreakersReport {
            services: self.broker.service_breakers(now),
            limits: (&self.config.breakers).into(),
            breakers: entries
                .iter()
                .map(|(k, b)| crate::breakers::row(&self.config, k, b, now))
                .collect(),
        })
    }

    /// `quadrant lanes`: the broker's lanes, with the `sk_msg` counters when the acceleration is
    /// on.
    pub fn lanes_report(&self) -> LanesReport {
        let mut report = self.broker.report();
        if self.accel.on {
            let before = self.accel.counted_before;
            report.tcp_acceleration =
                locked(&self.dataplane)
                    .lane_accel_counters()
                    .ok()
                    .map(|now| {
                        let [sockets, redirected, passed, refused] =
                            std::array::from_fn(|i| now[i].saturating_sub(before[i]));
                        Acceleration {
                            sockets,
                            redirected,
                            passed,
                            refused,
                        }
                    });
        }
        match &self.accel.probe {
            Some(Ok(f)) => report.tcp_acceleration_probe = Some(f.clone()),
            Some(Err(e)) => report.tcp_acceleration_probe_error = Some(e.to_string()),
            None => {}
        }
        report
    }

    /// `quadrant trace MODE`.
    pub fn set_trace(&self, mode: TraceMode) -> Result<TraceMode, LoaderError> {
        let mut dataplane = locked(&self.dataplane);
        dataplane.set_trace(mode.value())?;
        self.flows.set_trace(dataplane.trace());
        Ok(TraceMode::of(dataplane.trace()))
    }

    /// `quadrant admit`: the SVID check, the constraints and the audit record (Rego: call from a
    /// blocking task).
    pub fn admit(&self, review: &serde_json::Value, svid_pem: &str) -> Decision {
        let authority = self
            .identity
            .as_ref()
            .map(|i| i.authority())
            .map_err(String::as_str);
        match pem_chain(svid_pem) {
            Ok(chain) => self.admission.admit(authority, review, &chain),
            Err(e) => self
                .admission
                .admit(authority, review, &[])
                .with_error_hint(&e),
        }
    }

    /// Reloads the policy (Rego, cgroups, map writes: call from a blocking task).
    pub fn reload_policy(&self) -> Result<Activated, ActivateError> {
        self.policy.activate(&self.dataplane)
    }
}
