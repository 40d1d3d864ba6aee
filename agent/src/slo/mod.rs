//! SLOs and error budgets: the `slos` of the configuration, fed from what the lanes to each
//! service measured (the broker's [`SliTotals`]), kept in rolling windows, judged with
//! multiwindow burn-rate rules; `quadrant slo` reports them and admission reads a per-quadrant
//! summary as `input.slo`.

pub mod burn;
mod series;
pub mod spec;

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use dataplane_common::Quadrant;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
pub use spec::{Indicator, SloSpec};

use self::{
    burn::{Events, State},
    series::Series,
};
use crate::{config::ConfigError, lanes::broker::sli::SliTotals, plans};

/// The SLOs a plan's `slo` section declares for workload `workload` of `q`: availability and a
/// p99 latency (99 % of answered round trips within it) of its lane service.
#[must_use]
pub fn plan_slos(q: Quadrant, workload: &str, slo: &plans::Slo) -> Vec<SloSpec> {
    let service = slo.service.clone().unwrap_or_else(|| workload.to_owned());
    let window = vec![spec::TimeWindow {
        duration: slo.window.clone().unwrap_or_else(|| "28d".into()),
        is_rolling: true,
    }];
    let make = |kind: &str, indicator, target, value| SloSpec {
        name: format!("{}-{workload}-{kind}", q.name()),
        quadrant: q.name().to_owned(),
        service: service.clone(),
        indicator,
        objectives: vec![spec::Objective {
            display_name: None,
            target,
            value,
        }],
        time_window: window.clone(),
        budgeting_method: spec::BudgetingMethod::Occurrences,
        min_events: 10,
    };
    let mut out = Vec::new();
    if let Some(a) = slo.availability {
        out.push(make("availability", Indicator::Availability, a, None));
    }
    if let Some(ms) = slo.p99_latency_ms {
        out.push(make("latency", Indicator::Latency, 0.99, Some(ms)));
    }
    out
}

/// A cost SLO's current time slice.
#[derive(Clone, Copy, Debug)]
struct Slice {
    since_ns: u64,
    cpu_usec: u64,
    requests: u64,
}

/// Length of a cost SLO's time slice.
const SLICE_NS: u64 = 1_000_000_000;

/// One SLO being kept.
#[derive(Debug)]
struct Tracked {
    /// A cost SLO's open time slice.
    slice: Option<Slice>,
    /// The workload (`<quadrant>/<workload>`) whose plan declared it; `None`: the configuration.
    owner: Option<String>,
    spec: SloSpec,
    series: Series,
    /// The cumulative events last seen (the series gets the difference).
    last: Option<Events>,
    /// A cost SLO's CPU-seconds per 1,000 requests in its last slice with requests.
    last_cost: Option<f64>,
}

/// The events an SLO counts from a service's totals.
fn events_of(spec: &SloSpec, t: &SliTotals) -> Events {
    let answered = t.requests.saturating_sub(t.failed);
    match spec.indicator {
        Indicator::Availability => Events {
            good: answered,
            total: t.requests + t.open_failures + t.breaker_refusals + t.connect_refusals,
        },
        Indicator::Latency => Events {
            good: t.within.min(answered),
            total: answered,
        },
        // Counted per time slice in `SloService::observe`.
        Indicator::Cost | Indicator::Memory => Events::default(),
    }
}

/// CPU-seconds per 1,000 requests; `None` without requests.
#[must_use]
pub fn per_thousand(cpu_usec: u64, requests: u64) -> Option<f64> {
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    (requests > 0).then(|| cpu_usec as f64 / 1e6 / (requests as f64 / 1000.0))
}

/// The event of a closed cost slice and its cost: `None` without requests (no data).
fn cost_event(spec: &SloSpec, cpu_usec: u64, requests: u64) -> Option<(Events, f64)> {
    let per_thousand = per_thousand(cpu_usec, requests)?;
    let limit = spec.objectives.first().and_then(|o| o.value).unwrap_or(0.0);
    Some((
        Events {
            good: u64::from(per_thousand <= limit),
            total: 1,
        },
        per_thousand,
    ))
}

/// Whether `specs` for `owner` validate beside the SLOs of everyone else.
fn check(tracked: &[Tracked], owner: &str, specs: &[SloSpec]) -> Result<(), ConfigError> {
    let mut all: Vec<SloSpec> = tracked
        .iter()
        .filter(|t| t.owner.as_deref() != Some(owner))
        .map(|t| t.spec.clone())
        .collect();
    let others = all.len();
    all.extend(specs.iter().cloned());
    // A fault in `specs` is named by the SLO's name, not by its place in the combined list.
    spec::validate(&all).map_err(|e| match e {
        ConfigError::Invalid { field, reason } => {
            let named = field
                .strip_prefix("slos[")
                .and_then(|rest| rest.split_once(']'))
                .and_then(|(i, tail)| Some((i.parse::<usize>().ok()?, tail)))
                .and_then(|(i, tail)| {
                    let s = specs.get(i.checked_sub(others)?)?;
                    Some(format!("{}{tail}", s.name))
                });
            ConfigError::Invalid {
                field: named.unwrap_or(field),
                reason,
            }
        }
        other => other,
    })
}

/// Every SLO of the configuration, with its windows.
#[derive(Debug)]
pub struct SloService {
    tracked: Mutex<Vec<Tracked>>,
}

/// One burn-rate rule's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BurnRate {
    /// `page` or `ticket`.
    pub severity: String,
    /// The rate both windows must exceed.
    pub factor: f64,
    /// Long window, seconds.
    pub long_window_secs: f64,
    /// Short window, seconds.
    pub short_window_secs: f64,
    /// Burn rate over the long window (absent: no events).
    pub long_burn: Option<f64>,
    /// Burn rate over the short window.
    pub short_burn: Option<f64>,
    /// Events in the long and short windows.
    pub long_events: u64,
    /// Events in the short window.
    pub short_events: u64,
    /// `firing`, `quiet` or `no_data`.
    pub state: State,
}

/// One SLO in `quadrant slo`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SloStatus {
    /// Name.
    pub name: String,
    /// Quadrant whose budget it is.
    pub quadrant: String,
    /// The lane service.
    pub service: String,
    /// What is measured.
    pub indicator: Indicator,
    /// The objective's target.
    pub target: f64,
    /// The latency threshold, ms (latency SLOs).
    pub threshold_ms: Option<f64>,
    /// The window, as configured.
    pub window: String,
    /// Good and total events over the window.
    pub events: Events,
    /// Good / total over the window (absent: no events).
    pub sli: Option<f64>,
    /// Share of the window's budget left (1: untouched, 0: spent; absent: no events).
    pub budget_remaining: Option<f64>,
    /// The three rules.
    pub burn_rates: Vec<BurnRate>,
    /// The firing rules, in words.
    pub alerts: Vec<String>,
    /// Cost SLOs: the CPU-seconds per 1,000 requests of the last time slice with requests,
    /// and the objective's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_1000: Option<CostFigure>,
    /// Memory SLOs: the MiB the workload held at the end of the last slice, and the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<CostFigure>,
}

/// What a cost or memory SLO measured last.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CostFigure {
    /// CPU-seconds per 1,000 requests over the last time slice with requests (cost), or MiB
    /// held at the end of the last slice (memory).
    pub last: f64,
    /// The objective's limit.
    pub limit: f64,
}

/// A quadrant's SLOs in short, as admission sees them (`input.slo.<quadrant>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QuadrantSlo {
    /// The smallest budget left among its SLOs with events (absent: none has events).
    pub budget_remaining: Option<f64>,
    /// A `page` rule fires for one of its SLOs.
    pub fast_burn: bool,
    /// The `ticket` rule fires for one of its SLOs.
    pub slow_burn: bool,
    /// The SLOs whose budget is spent or whose page rule fires, with their figures.
    pub breaching: Vec<String>,
}

/// `quadrant slo`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SloReport {
    /// Every SLO.
    pub slos: Vec<SloStatus>,
    /// Per quadrant (`dx` … `pg`).
    pub quadrants: BTreeMap<String, QuadrantSlo>,
}

fn status(t: &mut Tracked, now_ns: u64) -> SloStatus {
    let spec = &t.spec;
    let target = spec.target();
    let period = spec.window();
    let events = t.series.sum(now_ns, period);
    #[expect(clippy::cast_precision_loss, reason = "event counts far below 2^52")]
    let sli = (events.total > 0).then(|| events.good as f64 / events.total as f64);
    let mut alerts = Vec::new();
    let burn_rates = burn::rules(period)
        .iter()
        .map(|rule| {
            let long = t.series.sum(now_ns, rule.long);
            let short = t.series.sum(now_ns, rule.short);
            let state = burn::evaluate(rule, long, short, target, spec.min_events);
            let (lb, sb) = (
                burn::burn_rate(long, target),
                burn::burn_rate(short, target),
            );
            if state == State::Firing {
                alerts.push(format!(
                    "{}: burn rate {:.1} over {:.1}s and {:.1} over {:.1}s, above {}",
                    rule.severity,
                    lb.unwrap_or_default(),
                    rule.long.as_secs_f64(),
                    sb.unwrap_or_default(),
                    rule.short.as_secs_f64(),
                    rule.factor
                ));
            }
            BurnRate {
                severity: rule.severity.into(),
                factor: rule.factor,
                long_window_secs: rule.long.as_secs_f64(),
                short_window_secs: rule.short.as_secs_f64(),
                long_burn: lb,
                short_burn: sb,
                long_events: long.total,
                short_events: short.total,
                state,
            }
        })
        .collect();
    #[expect(clippy::cast_precision_loss, reason = "at most a minute in ns")]
    let threshold_ms = spec.threshold_ns().map(|ns| ns as f64 / 1e6);
    let limit = spec.objectives.first().and_then(|o| o.value).unwrap_or(0.0);
    SloStatus {
        name: spec.name.clone(),
        quadrant: spec.quadrant.clone(),
        service: spec.service.clone(),
        indicator: spec.indicator,
        target,
        threshold_ms,
        window: spec
            .time_window
            .first()
            .map(|w| w.duration.clone())
            .unwrap_or_default(),
        events,
        sli,
        budget_remaining: burn::budget_remaining(events, target),
        burn_rates,
        alerts,
        cost_per_1000: t
            .last_cost
            .filter(|_| spec.indicator == Indicator::Cost)
            .map(|last| CostFigure { last, limit }),
        memory_mib: t
            .last_cost
            .filter(|_| spec.indicator == Indicator::Memory)
            .map(|last| CostFigure { last, limit }),
    }
}

/// What a service's workload cgroup reads now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// `usage_usec` of `cpu.stat` (cumulative).
    pub cpu_usec: Option<u64>,
    /// `memory.current`.
    pub memory_bytes: Option<u64>,
}

/// Closes a memory SLO's slice once it is a second old: one event, good if the workload held
/// at most the objective's MiB at its end. A workload that is not running opens no slice.
fn observe_memory(t: &mut Tracked, now_ns: u64, bytes: Option<u64>) {
    let Some(bytes) = bytes else {
        t.slice = None;
        return;
    };
    let fresh = Slice {
        since_ns: now_ns,
        cpu_usec: 0,
        requests: 0,
    };
    match t.slice {
        Some(s) if now_ns.saturating_sub(s.since_ns) >= SLICE_NS => {
            #[expect(clippy::cast_precision_loss, reason = "bytes far below 2^52 MiB")]
            let mib = bytes as f64 / 1_048_576.0;
            let limit = t
                .spec
                .objectives
                .first()
                .and_then(|o| o.value)
                .unwrap_or(0.0);
            t.series.add(
                now_ns,
                Events {
                    good: u64::from(mib <= limit),
                    total: 1,
                },
            );
            t.last_cost = Some(mib);
            t.slice = Some(fresh);
        }
        Some(_) => {}
        None => t.slice = Some(fresh),
    }
}

/// Closes a cost SLO's slice once it is a second old: one event, good if the CPU time per 1,000
/// requests stayed within the objective. A workload that is not running (no CPU reading) opens
/// no slice.
fn observe_cost(t: &mut Tracked, now_ns: u64, cpu_usec: Option<u64>, requests: u64) {
    let Some(cpu_usec) = cpu_usec else {
        t.slice = None;
        return;
    };
    match t.slice {
        Some(s) if now_ns.saturating_sub(s.since_ns) >= SLICE_NS => {
            let event = cost_event(
                &t.spec,
                cpu_usec.saturating_sub(s.cpu_usec),
                requests.saturating_sub(s.requests),
            );
            if let Some((e, cost)) = event {
                t.series.add(now_ns, e);
                t.last_cost = Some(cost);
            }
            t.slice = Some(Slice {
                since_ns: now_ns,
                cpu_usec,
                requests,
            });
        }
        Some(_) => {}
        None => {
            t.slice = Some(Slice {
                since_ns: now_ns,
                cpu_usec,
                requests,
            });
        }
    }
}

/// `usage_usec` from a cgroup v2 `cpu.stat`.
#[must_use]
pub fn cpu_usage_usec(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// The per-quadrant summary of `slos`.
#[must_use]
pub fn by_quadrant(slos: &[SloStatus]) -> BTreeMap<String, QuadrantSlo> {
    Quadrant::ALL
        .iter()
        .map(|q| {
            let mine: Vec<&SloStatus> = slos.iter().filter(|s| s.quadrant == q.name()).collect();
            let fires = |sev: &str, s: &SloStatus| {
                s.burn_rates
                    .iter()
                    .any(|b| b.severity == sev && b.state == State::Firing)
            };
            let breaching = mine
                .iter()
                .filter(|s| s.budget_remaining.is_some_and(|b| b <= 0.0) || fires("page", s))
                .map(|s| {
                    format!(
                        "{} ({} of {}/{}): {} good of {}, target {}, budget remaining {}{}",
                        s.name,
                        s.indicator.name(),
                        s.quadrant,
                        s.service,
                        s.events.good,
                        s.events.total,
                        s.target,
                        s.budget_remaining
                            .map_or_else(|| "n/a".to_owned(), |b| format!("{:.1} %", b * 100.0)),
                        if s.alerts.is_empty() {
                            String::new()
                        } else {
                            format!("; {}", s.alerts.join("; "))
                        }
                    )
                })
                .collect();
            let summary = QuadrantSlo {
                budget_remaining: mine
                    .iter()
                    .filter_map(|s| s.budget_remaining)
                    .reduce(f64::min),
                fast_burn: mine.iter().any(|s| fires("page", s)),
                slow_burn: mine.iter().any(|s| fires("ticket", s)),
                breaching,
            };
            (q.name().to_owned(), summary)
        })
        .collect()
}

impl SloService {
    /// Keeps `specs` (validated with the configuration).
    #[must_use]
    pub fn new(specs: &[SloSpec]) -> Self {
        Self {
            tracked: Mutex::new(
                specs
                    .iter()
                    .map(|s| Tracked {
                        slice: None,
                        owner: None,
                        series: Series::new(s.window()),
                        spec: s.clone(),
                        last: None,
                        last_cost: None,
                    })
                    .collect(),
            ),
        }
    }

    /// How often the windows should be fed: the narrowest bucket, at most every second.
    #[must_use]
    pub fn tick(&self) -> Duration {
        self.tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|t| t.series.width())
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1))
    }

    /// Replaces the SLOs workload `owner` (`<quadrant>/<workload>`) declares with `specs` (none:
    /// it stopped). An SLO whose name and window stay keeps its history. Refused, changing
    /// nothing, when the result would not validate (a name taken, a second latency SLO for a
    /// service); the error names the field.
    pub fn set_owned(&self, owner: &str, specs: Vec<SloSpec>) -> Result<(), ConfigError> {
        let mut tracked = self.tracked.lock().unwrap_or_else(PoisonError::into_inner);
        check(&tracked, owner, &specs)?;
        let mut kept: Vec<Tracked> = Vec::new();
        let mut old = Vec::new();
        for t in tracked.drain(..) {
            if t.owner.as_deref() == Some(owner) {
                old.push(t);
            } else {
                kept.push(t);
            }
        }
        for s in specs {
            let reuse = old
                .iter()
                .position(|t| t.spec.name == s.name && t.spec.window() == s.window());
            let t = match reuse {
                Some(i) => {
                    let mut t = old.swap_remove(i);
                    t.spec = s;
                    t
                }
                None => Tracked {
                    slice: None,
                    owner: Some(owner.to_owned()),
                    series: Series::new(s.window()),
                    spec: s,
                    last: None,
                    last_cost: None,
                },
            };
            kept.push(t);
        }
        *tracked = kept;
        Ok(())
    }

    /// Whether [`Self::set_owned`] would take `specs` for `owner` now.
    pub fn check_owned(&self, owner: &str, specs: &[SloSpec]) -> Result<(), ConfigError> {
        check(
            &self.tracked.lock().unwrap_or_else(PoisonError::into_inner),
            owner,
            specs,
        )
    }

    /// The `minEvents` of SLO `name` (10 if unknown).
    #[must_use]
    pub fn min_events(&self, name: &str) -> u64 {
        self.tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|t| t.spec.name == name)
            .map_or(10, |t| t.spec.min_events)
    }

    /// The latency threshold of each service with a latency SLO, ns.
    #[must_use]
    pub fn latency_thresholds(&self) -> BTreeMap<(Quadrant, String), u64> {
        self.tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|t| {
                t.spec
                    .threshold_ns()
                    .map(|ns| ((t.spec.quadrant(), t.spec.service.clone()), ns))
            })
            .collect()
    }

    /// Why a new generation of the workload offering `service` in `q` should start as a
    /// shadow: one of the service's cost SLOs measured at least `approach` of its limit in its
    /// last slice, or has spent its budget. `None`: no cost SLO is near its limit.
    #[must_use]
    pub fn cost_near_limit(
        &self,
        now_ns: u64,
        q: Quadrant,
        service: &str,
        approach: f64,
    ) -> Option<String> {
        if approach <= 0.0 {
            return None;
        }
        let mut tracked = self.tracked.lock().unwrap_or_else(PoisonError::into_inner);
        tracked
            .iter_mut()
            .filter(|t| {
                t.spec.indicator.sliced() && t.spec.quadrant() == q && t.spec.service == service
            })
            .find_map(|t| {
                let s = status(t, now_ns);
                let (cost, unit) = match (s.cost_per_1000, s.memory_mib) {
                    (Some(c), _) => (c, "CPU-s per 1,000 requests"),
                    (None, Some(m)) => (m, "MiB"),
                    (None, None) => return None,
                };
                let kind = s.indicator.name();
                if s.budget_remaining.is_some_and(|b| b <= 0.0) {
                    return Some(format!(
                        "{kind} SLO {} has spent its error budget ({:.4} {unit} last, limit {})",
                        s.name, cost.last, cost.limit
                    ));
                }
                (cost.last >= approach * cost.limit).then(|| {
                    format!(
                        "{kind} SLO {} measured {:.4} {unit}, at least {:.0} % of its limit {}",
                        s.name,
                        cost.last,
                        approach * 100.0,
                        cost.limit
                    )
                })
            })
    }

    /// The services with an availability SLO.
    #[must_use]
    pub fn availability_services(&self) -> Vec<(Quadrant, String)> {
        self.tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|t| t.spec.indicator == Indicator::Availability)
            .map(|t| (t.spec.quadrant(), t.spec.service.clone()))
            .collect()
    }

    /// The services with a cost or memory SLO (measured from their workload's cgroup).
    #[must_use]
    pub fn cost_services(&self) -> Vec<(Quadrant, String)> {
        self.tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|t| t.spec.indicator.sliced())
            .map(|t| (t.spec.quadrant(), t.spec.service.clone()))
            .collect()
    }

    /// Feeds the windows with what the services' totals grew by since the last call; `usage`
    /// is what the cgroups of the cost and memory SLOs' services' workloads read now.
    pub fn observe(
        &self,
        now_ns: u64,
        totals: &BTreeMap<(Quadrant, String), SliTotals>,
        usage: &BTreeMap<(Quadrant, String), CgroupUsage>,
    ) {
        let mut tracked = self.tracked.lock().unwrap_or_else(PoisonError::into_inner);
        for t in tracked.iter_mut() {
            let key = (t.spec.quadrant(), t.spec.service.clone());
            let read = usage.get(&key);
            match t.spec.indicator {
                Indicator::Cost => {
                    let requests = totals.get(&key).map_or(0, |s| s.requests);
                    observe_cost(t, now_ns, read.and_then(|u| u.cpu_usec), requests);
                    continue;
                }
                Indicator::Memory => {
                    observe_memory(t, now_ns, read.and_then(|u| u.memory_bytes));
                    continue;
                }
                Indicator::Availability | Indicator::Latency => {}
            }
            let now = totals
                .get(&(t.spec.quadrant(), t.spec.service.clone()))
                .map(|s| events_of(&t.spec, s))
                .unwrap_or_default();
            let last = t.last.unwrap_or_default();
            // Totals only grow while the broker runs; if they ever went back, start over.
            let delta = if now.total >= last.total && now.good >= last.good {
                Events {
                    good: now.good - last.good,
                    total: now.total - last.total,
                }
            } else {
                now
            };
            t.last = Some(now);
            if delta.total > 0 {
                t.series.add(now_ns, delta);
            }
        }
    }

    /// Every SLO's state at `now_ns`.
    #[must_use]
    pub fn report(&self, now_ns: u64) -> SloReport {
        let mut tracked = self.tracked.lock().unwrap_or_else(PoisonError::into_inner);
        let slos: Vec<SloStatus> = tracked.iter_mut().map(|t| status(t, now_ns)).collect();
        let quadrants = by_quadrant(&slos);
        SloReport { slos, quadrants }
    }
}

/// The report as text.
#[must_use]
pub fn render(report: &SloReport) -> String {
    use std::fmt::Write as _;
    if report.slos.is_empty() {
        return "no SLOs configured (slos in the configuration)\n".into();
    }
    let mut out = String::new();
    for s in &report.slos {
        let pct =
            |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{:.3} %", v * 100.0));
        let _ = writeln!(
            out,
            "{} ({}/{}, {:?}{}, target {} over {}): SLI {} ({} good of {}), budget remaining {}",
            s.name,
            s.quadrant,
            s.service,
            s.indicator,
            s.threshold_ms
                .map_or_else(String::new, |t| format!(" <= {t} ms")),
            s.target,
            s.window,
            pct(s.sli),
            s.events.good,
            s.events.total,
            pct(s.budget_remaining),
        );
        for b in &s.burn_rates {
            let rate = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
            let _ = writeln!(
                out,
                "  {:<6} > {:<4} burn {} over {:.1}s ({} events), {} over {:.1}s ({} events): {:?}",
                b.severity,
                b.factor,
                rate(b.long_burn),
                b.long_window_secs,
                b.long_events,
                rate(b.short_burn),
                b.short_window_secs,
                b.short_events,
                b.state
            );
        }
    }
    out
}

#[cfg(test)]
mod tests;
