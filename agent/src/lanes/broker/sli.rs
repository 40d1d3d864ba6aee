//! What the lanes to each service measured, for the SLOs: every lane's client side counts its
//! requests in the SLI block of the lane's header page (`quadrant_lanes::ring::Sli`); the
//! broker adds up the open lanes' blocks and keeps the counts of lanes that closed, plus the
//! opens refused because the service was not there, busy, broken or behind an open breaker.

use std::{collections::BTreeMap, sync::atomic::Ordering};

use dataplane_common::Quadrant;

use super::{Broker, State};
use crate::lanes::{
    control::Refusal,
    ring::{LATENCY_BUCKETS, Region, Sli},
};

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
    /// Opens refused for a reason the service answers for (`no_service`, `busy`, `io`,
    /// `breaker_open`).
    pub open_failures: u64,
    /// Answered round trips per histogram bucket (`ring::latency_bucket`).
    pub latency: [u64; LATENCY_BUCKETS],
}

impl Default for SliTotals {
    fn default() -> Self {
        Self {
            requests: 0,
            within: 0,
            failed: 0,
            open_failures: 0,
            latency: [0; LATENCY_BUCKETS],
        }
    }
}

impl SliTotals {
    fn add_region(&mut self, r: &Region) {
        let get = |f| r.sli(f).load(Ordering::Relaxed);
        self.requests += get(Sli::Requests);
        self.within += get(Sli::WithinThreshold);
        self.failed += get(Sli::Failed);
        for (i, c) in self.latency.iter_mut().enumerate() {
            *c += r.latency_count(i).load(Ordering::Relaxed);
        }
    }
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
    /// Forgets lane `id`, keeping what its client side counted.
    pub(super) fn retire(&mut self, id: u64) {
        if let Some(l) = self.lanes.remove(&id) {
            let key = (quadrant_of(&l.info.quadrant), l.info.service.clone());
            self.closed_sli
                .entry(key)
                .or_default()
                .add_region(&l.region);
        }
    }
}

fn quadrant_of(name: &str) -> Quadrant {
    Quadrant::from_name(name).unwrap_or(Quadrant::Dx)
}

impl Broker {
    /// The latency threshold lanes to `service` in `q` carry, ns (0: none).
    pub(super) fn threshold_ns(&self, q: Quadrant, service: &str) -> u64 {
        self.config
            .slos
            .iter()
            .filter(|s| s.quadrant() == q && s.service == service)
            .find_map(crate::slo::SloSpec::threshold_ns)
            .unwrap_or(0)
    }

    /// Counts a refused open against `service` in `q` when the reason is the service's.
    pub(super) fn count_open_failure(&self, q: Quadrant, service: &str, reason: Refusal) {
        if counts_against_service(reason) {
            self.state()
                .closed_sli
                .entry((q, service.to_owned()))
                .or_default()
                .open_failures += 1;
        }
    }

    /// What the lanes to each service measured so far (open and closed lanes).
    #[must_use]
    pub fn sli_totals(&self) -> BTreeMap<(Quadrant, String), SliTotals> {
        let state = self.state();
        let mut out = state.closed_sli.clone();
        for l in state.lanes.values() {
            out.entry((quadrant_of(&l.info.quadrant), l.info.service.clone()))
                .or_default()
                .add_region(&l.region);
        }
        out
    }
}
