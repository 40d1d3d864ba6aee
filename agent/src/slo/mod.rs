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
use crate::lanes::broker::sli::SliTotals;

/// One SLO being kept.
#[derive(Debug)]
struct Tracked {
    spec: SloSpec,
    series: Series,
    /// The cumulative events last seen (the series gets the difference).
    last: Option<Events>,
}

/// The events an SLO counts from a service's totals.
fn events_of(spec: &SloSpec, t: &SliTotals) -> Events {
    let answered = t.requests.saturating_sub(t.failed);
    match spec.indicator {
        Indicator::Availability => Events {
            good: answered,
            total: t.requests + t.open_failures,
        },
        Indicator::Latency => Events {
            good: t.within.min(answered),
            total: answered,
        },
    }
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
    }
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
                        match s.indicator {
                            Indicator::Availability => "availability",
                            Indicator::Latency => "latency",
                        },
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
                        series: Series::new(s.window()),
                        spec: s.clone(),
                        last: None,
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

    /// Whether there is anything to keep.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Feeds the windows with what the services' totals grew by since the last call.
    pub fn observe(&self, now_ns: u64, totals: &BTreeMap<(Quadrant, String), SliTotals>) {
        let mut tracked = self.tracked.lock().unwrap_or_else(PoisonError::into_inner);
        for t in tracked.iter_mut() {
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
mod tests {
    use super::*;

    fn spec(yaml: &str) -> SloSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn totals_become_windowed_events_budgets_and_alerts() {
        let avail = spec(
            "{name: echo-up, quadrant: px, service: echo, indicator: availability, \
             objectives: [{target: 0.99}], timeWindow: [{duration: 28m}]}",
        );
        let fast = spec(
            "{name: echo-fast, quadrant: px, service: echo, indicator: latency, \
             objectives: [{target: 0.9, value: 1}], timeWindow: [{duration: 28m}]}",
        );
        let svc = SloService::new(&[avail, fast]);
        assert_eq!(svc.tick(), Duration::from_millis(100));
        let key = (Quadrant::Px, "echo".to_owned());
        // 100 answered requests, all within the threshold, then 20 that failed.
        let mut t = SliTotals {
            requests: 100,
            within: 100,
            ..SliTotals::default()
        };
        svc.observe(100 * S, &BTreeMap::from([(key.clone(), t)]));
        t.requests = 120;
        t.failed = 20;
        svc.observe(101 * S, &BTreeMap::from([(key, t)]));
        let r = svc.report(101 * S);
        let up = &r.slos[0];
        assert_eq!(
            up.events,
            Events {
                good: 100,
                total: 120
            }
        );
        // 20 bad of 120 with 1 % allowed: burn 16.7, budget -15.7.
        assert!(
            (up.budget_remaining.unwrap() + 15.666_666).abs() < 1e-3,
            "{up:?}"
        );
        // The fast rule looks at 2.5 s and 0.21 s: both hold the 20 failures (and the short
        // one only those, burn 100).
        assert_eq!(up.burn_rates[0].state, State::Firing, "{up:?}");
        assert_eq!(up.burn_rates[0].short_events, 20);
        let fastest = &r.slos[1];
        assert_eq!(
            fastest.events,
            Events {
                good: 100,
                total: 100
            }
        );
        assert_eq!(fastest.budget_remaining, Some(1.0));
        let px = &r.quadrants["px"];
        assert!(px.fast_burn && px.budget_remaining.unwrap() < 0.0);
        assert_eq!(px.breaching.len(), 1);
        assert!(
            px.breaching[0].starts_with("echo-up (availability of px/echo): 100 good of 120"),
            "{}",
            px.breaching[0]
        );
        assert!(!r.quadrants["dx"].fast_burn && r.quadrants["dx"].budget_remaining.is_none());
        // Half an hour later the window holds nothing: no data, nothing fires.
        let later = svc.report(101 * S + 30 * 60 * S);
        assert_eq!(later.slos[0].events, Events::default());
        assert!(
            later.slos[0]
                .burn_rates
                .iter()
                .all(|b| b.state == State::NoData)
        );
        assert!(!later.quadrants["px"].fast_burn);
        assert!(render(&later).contains("echo-up (px/echo"));
    }
}
