//! What the lanes to each service measured, for the SLOs: every lane's client side counts its
//! requests in the SLI block of the lane's header page (`quadrant_lanes::ring::Sli`); the
//! broker adds up the open lanes' blocks and keeps the counts of lanes that closed, plus the
//! opens refused because the service was not there, busy, broken or behind an open breaker.

use std::{
    collections::BTreeMap,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;

use super::{Broker, State};
use crate::lanes::{
    Transport,
    control::Refusal,
    os::Mapping,
    ring::{LATENCY_BUCKETS, Region, Sli, Stat},
};

/// How long a closed lane stays mapped for its client side's last counts (a service that
/// closes a lane before answering: the client counts the failure after the close).
const RETIRING: Duration = Duration::from_secs(1);

/// A lane closed a moment ago.
pub(super) struct Retired {
    key: (Quadrant, String),
    /// A mirror lane to the service's shadow generation.
    mirror: bool,
    transport: Transport,
    region: Region,
    _memory: Mapping,
    at: Instant,
}

/// Cumulative counts of the lanes to one service since the broker started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliTotals {
    /// Requests made.
    pub requests: u64,
    /// Requests answered within the service's latency threshold (all answered ones without
    /// one).
    pub within: u64,
    /// Requests not answered (the lane failed or closed first).
    pub failed: u64,
    /// Opens refused for a reason the service answers for (`no_service`, `busy`, `io`).
    pub open_failures: u64,
    /// Opens the service's own breaker refused (`breaker_open`): failures its callers see,
    /// counted against its SLOs, never by the breaker itself — a breaker that counted its own
    /// refusals would judge its half-open probe by them and never close while callers retry.
    pub breaker_refusals: u64,
    /// TCP connects to the service's port the kernel's breakers refused (`refused` of the
    /// `BREAKERS` entries for it, every caller quadrant): the kernel's verdicts, counted
    /// against its availability (filled in for the SLOs only, never for the breakers
    /// themselves).
    pub connect_refusals: u64,
    /// Answered round trips per histogram bucket (`ring::latency_bucket`).
    pub latency: [u64; LATENCY_BUCKETS],
    /// Per transport (in `Transport::ALL` order): answered requests, and those within the
    /// latency threshold.
    pub by_transport: [(u64, u64); 3],
    /// Per transport: lanes opened (open or closed since).
    pub lanes: [u64; 3],
    /// Per transport: answered round trips per histogram bucket (they sum to `latency`).
    pub transport_latency: [[u64; LATENCY_BUCKETS]; 3],
    /// Per transport: the sum of the answered round trips, ns.
    pub transport_latency_sum_ns: [u64; 3],
    /// Payload bytes client → server and server → client.
    pub bytes: [u64; 2],
}

impl Default for SliTotals {
    fn default() -> Self {
        Self {
            requests: 0,
            within: 0,
            failed: 0,
            open_failures: 0,
            breaker_refusals: 0,
            connect_refusals: 0,
            latency: [0; LATENCY_BUCKETS],
            by_transport: [(0, 0); 3],
            lanes: [0; 3],
            transport_latency: [[0; LATENCY_BUCKETS]; 3],
            transport_latency_sum_ns: [0; 3],
            bytes: [0; 2],
        }
    }
}

impl SliTotals {
    fn add_region(&mut self, r: &Region, transport: Transport) {
        let t = transport_index(transport);
        self.lanes[t] += 1;
        for (side, b) in self.bytes.iter_mut().enumerate() {
            *b += r.stat(side, Stat::BytesSent).load(Ordering::Relaxed);
        }
        let get = |f| r.sli(f).load(Ordering::Relaxed);
        let (requests, within, failed) = (
            get(Sli::Requests),
            get(Sli::WithinThreshold),
            get(Sli::Failed),
        );
        if requests == 0 && failed == 0 {
            // Nothing measured (a round trip counts its request first): skip the latency
            // counters, most of the cost of a lane opened and closed without a request.
            return;
        }
        self.requests += requests;
        self.within += within;
        self.failed += failed;
        self.transport_latency_sum_ns[t] += r.latency_sum_ns().load(Ordering::Relaxed);
        let by = &mut self.by_transport[t];
        by.0 += requests.saturating_sub(failed);
        by.1 += within;
        for (i, (c, ct)) in self
            .latency
            .iter_mut()
            .zip(self.transport_latency[t].iter_mut())
            .enumerate()
        {
            let n = r.latency_count(i).load(Ordering::Relaxed);
            *c += n;
            *ct += n;
        }
    }
}

/// The index of `t` in `Transport::ALL`.
#[must_use]
pub fn transport_index(t: Transport) -> usize {
    Transport::ALL.iter().position(|x| *x == t).unwrap_or(0)
}

/// Whether a refused open counts against the service's availability.
#[must_use]
pub const fn counts_against_service(reason: Refusal) -> bool {
    matches!(
        reason,
        Refusal::NoService | Refusal::Busy | Refusal::Io | Refusal::BreakerOpen
    )
}

impl State {
    /// Forgets lane `id`, closed by (or gone with) connection `by`; what its client side
    /// counts stays: at once when the client closed it (it counts nothing afterwards), else
    /// until a moment from now (a request under way may still be counted).
    pub(super) fn retire(&mut self, id: u64, by: u64) {
        if let Some(l) = self.lanes.remove(id) {
            let key = (quadrant_of(&l.info.quadrant), l.info.service.clone());
            if l.client_conn.as_ref().is_some_and(|c| c.id == by) {
                let closed = if l.info.mirror {
                    &mut self.closed_shadow_sli
                } else {
                    &mut self.closed_sli
                };
                closed
                    .entry(key)
                    .or_default()
                    .add_region(&l.region, l.info.transport);
                return;
            }
            self.retiring.push_back(Retired {
                key,
                mirror: l.info.mirror,
                transport: l.info.transport,
                region: l.region,
                _memory: l.memory,
                at: Instant::now(),
            });
        }
    }

    /// Folds the counts of lanes closed longer than [`RETIRING`] ago into `closed_sli` and
    /// unmaps them.
    fn settle(&mut self) {
        while self
            .retiring
            .front()
            .is_some_and(|r| r.at.elapsed() >= RETIRING)
        {
            if let Some(r) = self.retiring.pop_front() {
                let closed = if r.mirror {
                    &mut self.closed_shadow_sli
                } else {
                    &mut self.closed_sli
                };
                closed
                    .entry(r.key)
                    .or_default()
                    .add_region(&r.region, r.transport);
            }
        }
    }
}

/// A uniform draw below a million (admission control).
fn draw_ppm() -> u32 {
    let mut b = [0u8; 4];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return u32::MAX;
    }
    u32::from_ne_bytes(b) % 1_000_000
}

/// The owner other than `owner` of thresholds for `key` in `plans`.
fn other_owner(
    plans: &BTreeMap<String, super::PlanBreaker>,
    owner: &str,
    key: &(Quadrant, String),
) -> Option<String> {
    plans
        .iter()
        .find(|(o, (k, _))| o.as_str() != owner && k == key)
        .map(|(other, _)| other.clone())
}

fn quadrant_of(name: &str) -> Quadrant {
    Quadrant::from_name(name).unwrap_or(Quadrant::Dx)
}

impl Broker {
    /// The latency threshold lanes to `service` in `q` carry, ns (0: none).
    pub(super) fn threshold_ns(&self, q: Quadrant, service: &str) -> u64 {
        self.thresholds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(q, service.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Sets the latency threshold of each service with a latency SLO (lanes opened from now on
    /// carry it).
    pub fn set_latency_thresholds(&self, thresholds: BTreeMap<(Quadrant, String), u64>) {
        *self
            .thresholds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = thresholds;
    }

    /// Counts a refused open against `service` in `q` when the reason is the service's.
    pub(super) fn count_open_failure(&self, q: Quadrant, service: &str, reason: Refusal) {
        if counts_against_service(reason) {
            let mut state = self.state();
            let t = state.closed_sli.entry((q, service.to_owned())).or_default();
            if reason == Refusal::BreakerOpen {
                t.breaker_refusals += 1;
            } else {
                t.open_failures += 1;
            }
        }
    }

    /// Judges the service breakers on `totals` at `now_ns` (when the agent computes any ratio)
    /// and tells the kernel about services that take TCP lanes; returns the transitions.
    pub fn judge_trips(
        &self,
        now_ns: u64,
        totals: &BTreeMap<(Quadrant, String), SliTotals>,
    ) -> Vec<super::trip::Transition> {
        if !self.trips_enabled() {
            return Vec::new();
        }
        let overrides = self.breaker_overrides();
        let transitions = self
            .trips
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .judge(now_ns, totals, &self.config.breakers, &overrides);
        self.write_admission(&overrides);
        for t in &transitions {
            let port = self
                .state()
                .services
                .get(&(t.quadrant, t.service.clone()))
                .and_then(|s| s.tcp_port);
            let Some(port) = port else { continue };
            let addr = self.config.addrs(t.quadrant).workload;
            match t.to {
                super::trip::TripState::Open { until_ns } => {
                    self.breakers
                        .force(addr, port, Some((until_ns, t.ejection_ms)));
                }
                super::trip::TripState::Closed => self.breakers.force(addr, port, None),
                super::trip::TripState::HalfOpen => {}
            }
        }
        transitions
    }

    /// Tells the kernel admission control's refusal probability of each service that takes
    /// TCP lanes, when it changed.
    fn write_admission(
        &self,
        overrides: &BTreeMap<(Quadrant, String), crate::config::BreakersConfig>,
    ) {
        let rejections = self
            .trips
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .rejections();
        let ports: BTreeMap<(Quadrant, String), u16> = self.tcp_services().into_iter().collect();
        let mut written = self
            .admission_written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, ppm) in rejections {
            let on = overrides
                .get(&key)
                .unwrap_or(&self.config.breakers)
                .admission_control;
            let ppm = if on { ppm } else { 0 };
            let Some(&port) = ports.get(&key) else {
                continue;
            };
            if written.get(&key).copied().unwrap_or(0) != ppm {
                self.breakers
                    .admission(self.config.addrs(key.0).workload, port, ppm);
                written.insert(key, ppm);
            }
        }
    }

    /// The service breakers for `quadrant breakers`, each with the workload whose plan sets
    /// its thresholds.
    #[must_use]
    pub fn service_breakers(&self, now_ns: u64) -> Vec<super::trip::ServiceBreakerRow> {
        let mut rows = self
            .trips
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .rows(now_ns);
        let plans = self
            .plan_breakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for r in &mut rows {
            r.plan = plans
                .iter()
                .find(|(_, ((q, s), _))| format!("{}/{s}", q.name()) == r.service)
                .map(|(owner, _)| owner.clone());
        }
        rows
    }

    /// Whether the agent computes any service breaker (the configuration's thresholds or a
    /// plan's).
    #[must_use]
    pub fn trips_enabled(&self) -> bool {
        super::trip::Trips::enabled(&self.config.breakers)
            || self
                .plan_breakers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .values()
                .any(|(_, c)| super::trip::Trips::enabled(c))
    }

    /// The thresholds plans set, by service.
    fn breaker_overrides(&self) -> BTreeMap<(Quadrant, String), crate::config::BreakersConfig> {
        self.plan_breakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Sets (or with `None` removes) the breaker thresholds workload `owner`'s plan gives its
    /// lane service.
    ///
    /// # Errors
    /// Another running workload's plan set thresholds for the same service already.
    pub fn set_plan_breaker(
        &self,
        owner: &str,
        thresholds: Option<super::PlanBreaker>,
    ) -> Result<(), String> {
        let mut plans = self
            .plan_breakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match thresholds {
            None => {
                plans.remove(owner);
            }
            Some((key, cfg)) => {
                if let Some(other) = other_owner(&plans, owner, &key) {
                    return Err(format!(
                        "{}/{} has breaker thresholds from the plan of {other} already",
                        key.0.name(),
                        key.1
                    ));
                }
                plans.insert(owner.to_owned(), (key, cfg));
            }
        }
        Ok(())
    }

    /// The running workload other than `owner` whose plan set breaker thresholds for `key`.
    #[must_use]
    pub fn plan_breaker_owner(&self, owner: &str, key: &(Quadrant, String)) -> Option<String> {
        other_owner(
            &self
                .plan_breakers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            owner,
            key,
        )
    }

    /// Refuses an open to a service whose breaker is open.
    pub(super) fn check_trip(
        &self,
        q: Quadrant,
        service: &str,
    ) -> Result<(), super::decide::Refused> {
        let cfg = self
            .breaker_overrides()
            .remove(&(q, service.to_owned()))
            .unwrap_or_else(|| self.config.breakers.clone());
        self.trips
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .check(
                (q, service),
                crate::breakers::monotonic_ns(),
                &cfg,
                draw_ppm(),
            )
    }

    /// The workload offering `service` in `q` (from its SPIFFE ID), if it is offered.
    #[must_use]
    pub fn service_workload(&self, q: Quadrant, service: &str) -> Option<String> {
        let state = self.state();
        let id = &state.services.get(&(q, service.to_owned()))?.spiffe_id;
        id.rsplit_once("/workload/").map(|(_, w)| w.to_owned())
    }

    /// The services that take TCP lanes, with their port.
    #[must_use]
    pub fn tcp_services(&self) -> Vec<((Quadrant, String), u16)> {
        self.state()
            .services
            .iter()
            .filter_map(|(k, s)| Some((k.clone(), s.tcp_port?)))
            .collect()
    }

    /// The services workload `workload` of `q` offers (its live generation's).
    #[must_use]
    pub fn services_of(&self, q: Quadrant, workload: &str) -> Vec<String> {
        let suffix = format!("/workload/{workload}");
        self.state()
            .services
            .iter()
            .filter(|((sq, _), s)| *sq == q && s.spiffe_id.ends_with(&suffix))
            .map(|((_, name), _)| name.clone())
            .collect()
    }

    /// Whether any lane is open or closed within the last second (the SLO and breaker
    /// sampling runs faster then).
    #[must_use]
    pub fn has_lanes(&self) -> bool {
        let state = self.state();
        !state.lanes.is_empty() || !state.retiring.is_empty()
    }

    /// What the lanes to each service measured so far (open and closed lanes; mirror lanes to
    /// shadow generations apart).
    #[must_use]
    pub fn sli_totals(&self) -> BTreeMap<(Quadrant, String), SliTotals> {
        self.totals(false)
    }

    /// What the mirror lanes to each service's shadow generation measured so far.
    #[must_use]
    pub fn shadow_totals(&self) -> BTreeMap<(Quadrant, String), SliTotals> {
        self.totals(true)
    }

    fn totals(&self, mirror: bool) -> BTreeMap<(Quadrant, String), SliTotals> {
        let mut state = self.state();
        state.settle();
        let mut out = if mirror {
            state.closed_shadow_sli.clone()
        } else {
            state.closed_sli.clone()
        };
        for r in state.retiring.iter().filter(|r| r.mirror == mirror) {
            out.entry(r.key.clone())
                .or_default()
                .add_region(&r.region, r.transport);
        }
        for l in state.lanes.values().filter(|l| l.info.mirror == mirror) {
            out.entry((quadrant_of(&l.info.quadrant), l.info.service.clone()))
                .or_default()
                .add_region(&l.region, l.info.transport);
        }
        out
    }
}
