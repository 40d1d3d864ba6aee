//! Breakers the agent computes, one per lane service: the share of its calls that failed (or
//! were slow) within a sliding window (`breakers.failure_ratio`, `slow_call_ms` and
//! `slow_call_ratio` over `window_ms`, judged from `min_calls` calls on, as resilience4j does).
//! Open, every lane open to the service is refused with `breaker_open` and a retry-after, on any
//! transport; a service that takes TCP lanes also gets an open entry in the kernel's `BREAKERS`
//! for each caller quadrant, so `connect()` to its port is refused too (`ECONNREFUSED`). After
//! the ejection the breaker is half-open: opens go through and the next `min_calls` calls decide
//! — still failing, it opens again for twice as long; otherwise it closes.

use std::collections::{BTreeMap, VecDeque};

use dataplane_common::{Quadrant, breaker::next_ejection_ms};

use super::{decide::Refused, sli::SliTotals};
use crate::{
    config::BreakersConfig,
    lanes::{
        control::Refusal,
        ring::{LATENCY_BUCKETS, latency_bucket_upper_ns},
    },
};

/// Calls, failures and slow calls (cumulative, or within a window).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Calls {
    /// Calls: requests made plus opens refused for the service's own reasons.
    pub calls: u64,
    /// Calls that failed.
    pub failed: u64,
    /// Answered calls slower than `slow_call_ms` (by the round-trip histogram's buckets: a
    /// bucket counts when its lower bound is at least the threshold).
    pub slow: u64,
}

impl Calls {
    fn of(t: &SliTotals, slow_ns: u64) -> Self {
        let slow = if slow_ns == 0 {
            0
        } else {
            (1..LATENCY_BUCKETS)
                .filter(|&i| latency_bucket_upper_ns(i - 1) >= slow_ns)
                .map(|i| t.latency[i])
                .sum()
        };
        Self {
            calls: t.requests + t.open_failures,
            failed: t.failed + t.open_failures,
            slow,
        }
    }

    fn answered(self) -> u64 {
        self.calls.saturating_sub(self.failed)
    }

    fn minus(self, o: Self) -> Option<Self> {
        Some(Self {
            calls: self.calls.checked_sub(o.calls)?,
            failed: self.failed.checked_sub(o.failed)?,
            slow: self.slow.checked_sub(o.slow)?,
        })
    }

    fn plus(self, o: Self) -> Self {
        Self {
            calls: self.calls + o.calls,
            failed: self.failed + o.failed,
            slow: self.slow + o.slow,
        }
    }
}

/// A service breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TripState {
    /// Calls go through.
    Closed,
    /// Opens refused until the monotonic time (ns).
    Open {
        /// Until when.
        until_ns: u64,
    },
    /// Opens go through; the next `min_calls` calls decide.
    HalfOpen,
}

impl TripState {
    /// Its name, as the kernel's breakers name theirs.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
struct Tripped {
    state: TripState,
    ejection_ms: u32,
    /// When the last probe lane was let through past the ejection (half-open).
    probe_at: Option<u64>,
    /// Admission control's refusal probability while closed, ppm.
    reject_ppm: u32,
    opened: u64,
    last: Option<Calls>,
    window: VecDeque<(u64, Calls)>,
}

/// One transition, for the event and the audit record.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The service's quadrant.
    pub quadrant: Quadrant,
    /// The service.
    pub service: String,
    /// State before.
    pub from: TripState,
    /// State after.
    pub to: TripState,
    /// `failure_ratio`, `slow_call_ratio`, `ejection_elapsed`, `probe_failed`,
    /// `probe_succeeded`.
    pub cause: &'static str,
    /// The window's calls at the transition.
    pub window: Calls,
    /// Ejection now in force, ms (0 when not open).
    pub ejection_ms: u32,
}

/// The agent's service breakers.
#[derive(Debug, Default)]
pub struct Trips {
    services: BTreeMap<(Quadrant, String), Tripped>,
}

/// One service breaker in `quadrant breakers`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ServiceBreakerRow {
    /// `<quadrant>/<service>`.
    pub service: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Calls in the sliding window.
    pub calls: u64,
    /// Failed calls in it.
    pub failed: u64,
    /// Slow calls in it.
    pub slow: u64,
    /// Ejection in force (or last), ms.
    pub ejection_ms: u32,
    /// How long opens are still refused, ms.
    pub retry_after_ms: Option<u64>,
    /// Times it opened.
    pub opened: u64,
    /// Admission control's refusal probability while closed (0 to 1).
    #[serde(default)]
    pub rejection_probability: f64,
    /// The workload whose plan's `breaker` section sets its thresholds (absent: the
    /// configuration's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

#[expect(clippy::cast_precision_loss, reason = "call counts far below 2^52")]
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Which ratio, if any, is over its threshold for the calls `w`.
fn over(w: Calls, cfg: &BreakersConfig) -> Option<&'static str> {
    if w.calls < u64::from(cfg.min_calls) {
        return None;
    }
    if cfg.failure_ratio > 0.0 && ratio(w.failed, w.calls) >= cfg.failure_ratio {
        return Some("failure_ratio");
    }
    if cfg.slow_call_ms > 0.0 && ratio(w.slow, w.answered()) >= cfg.slow_call_ratio {
        return Some("slow_call_ratio");
    }
    None
}

impl Trips {
    /// Whether the agent computes any ratio.
    #[must_use]
    pub fn enabled(cfg: &BreakersConfig) -> bool {
        cfg.enabled && (cfg.failure_ratio > 0.0 || cfg.slow_call_ms > 0.0 || cfg.admission_control)
    }

    /// Admission control's refusal probability (ppm) for each service judged so far.
    #[must_use]
    pub fn rejections(&self) -> Vec<((Quadrant, String), u32)> {
        self.services
            .iter()
            .map(|(k, s)| (k.clone(), s.reject_ppm))
            .collect()
    }

    /// Feeds the services' cumulative totals at `now_ns` and returns the transitions; a
    /// service in `overrides` (a plan's `breaker` section) is judged by its own thresholds.
    pub fn judge(
        &mut self,
        now_ns: u64,
        totals: &BTreeMap<(Quadrant, String), SliTotals>,
        global: &BreakersConfig,
        overrides: &BTreeMap<(Quadrant, String), BreakersConfig>,
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        for (key, t) in totals {
            let cfg = overrides.get(key).unwrap_or(global);
            if !Self::enabled(cfg) {
                continue;
            }
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "validated: 0 to 60,000 ms"
            )]
            let slow_ns = (cfg.slow_call_ms * 1e6) as u64;
            let window_ns = u64::from(cfg.window_ms) * 1_000_000;
            let limits = dataplane_common::breaker::BreakerLimits {
                base_ejection_ms: cfg.base_ejection_ms,
                max_ejection_ms: cfg.max_ejection_ms,
                ..Default::default()
            };
            let now_calls = Calls::of(t, slow_ns);
            let s = self.services.entry(key.clone()).or_insert_with(|| Tripped {
                state: TripState::Closed,
                ejection_ms: 0,
                probe_at: None,
                reject_ppm: 0,
                opened: 0,
                last: None,
                window: VecDeque::new(),
            });
            let delta = s
                .last
                .map_or(now_calls, |l| now_calls.minus(l).unwrap_or(now_calls));
            s.last = Some(now_calls);
            if delta.calls > 0 {
                s.window.push_back((now_ns, delta));
            }
            while s
                .window
                .front()
                .is_some_and(|(at, _)| now_ns.saturating_sub(*at) > window_ns)
            {
                s.window.pop_front();
            }
            let w = s
                .window
                .iter()
                .fold(Calls::default(), |acc, (_, c)| acc.plus(*c));
            s.reject_ppm = if s.state == TripState::Closed {
                cfg.rejection_ppm(w.calls, w.failed)
            } else {
                0
            };
            let from = s.state;
            let (to, cause) = match from {
                TripState::Closed => match over(w, cfg) {
                    Some(cause) => (open(s, cfg.base_ejection_ms, now_ns), cause),
                    None => continue,
                },
                TripState::Open { until_ns } if now_ns >= until_ns => {
                    s.window.clear();
                    (TripState::HalfOpen, "ejection_elapsed")
                }
                TripState::Open { .. } => continue,
                TripState::HalfOpen if w.calls < u64::from(cfg.min_calls) => continue,
                TripState::HalfOpen => {
                    if over(w, cfg).is_some() {
                        let next = next_ejection_ms(s.ejection_ms, &limits);
                        (open(s, next, now_ns), "probe_failed")
                    } else {
                        s.window.clear();
                        s.ejection_ms = 0;
                        (TripState::Closed, "probe_succeeded")
                    }
                }
            };
            s.state = to;
            if !matches!(to, TripState::HalfOpen) {
                s.probe_at = None;
            }
            out.push(Transition {
                quadrant: key.0,
                service: key.1.clone(),
                from,
                to,
                cause,
                window: w,
                ejection_ms: if matches!(to, TripState::Open { .. }) {
                    s.ejection_ms
                } else {
                    0
                },
            });
        }
        out
    }

    /// Refuses an open to `service` in `q` while its breaker is open. Past the ejection
    /// (half-open, whether or not the sampler has said so yet) one lane is let through as the
    /// probe, and another only `base_ejection_ms` later while the probe's calls are judged.
    ///
    /// While closed, admission control refuses the open when `draw_ppm` (uniform below a
    /// million) falls under the service's refusal probability.
    pub fn check(
        &mut self,
        (q, service): (Quadrant, &str),
        now_ns: u64,
        cfg: &BreakersConfig,
        draw_ppm: u32,
    ) -> Result<(), Refused> {
        let Some(s) = self.services.get_mut(&(q, service.to_owned())) else {
            return Ok(());
        };
        let (wait_ns, why) = match s.state {
            TripState::Closed if draw_ppm < s.reject_ppm => {
                return Err(Refused {
                    reason: Refusal::BreakerOpen,
                    message: format!(
                        "admission control of {}/{service} refused the open: its calls succeed \
                         too rarely, so {:.1} % of opens are refused \
                         (breakers.admission_success_threshold {})",
                        q.name(),
                        f64::from(s.reject_ppm) / 1e4,
                        cfg.admission_success_threshold
                    ),
                    limit: None,
                    retry_after_ms: None,
                });
            }
            TripState::Closed => return Ok(()),
            TripState::Open { until_ns } if now_ns < until_ns => (
                until_ns - now_ns,
                "is open: too many of its calls failed or were slow (breakers.failure_ratio, slow_call_ratio)",
            ),
            _ => {
                let slot = u64::from(cfg.base_ejection_ms) * 1_000_000;
                match s.probe_at {
                    Some(at) if now_ns.saturating_sub(at) < slot => (
                        slot - now_ns.saturating_sub(at),
                        "is half-open: the calls of its probe lane are being judged",
                    ),
                    _ => {
                        s.probe_at = Some(now_ns);
                        return Ok(());
                    }
                }
            }
        };
        let retry_after_ms = wait_ns.div_ceil(1_000_000);
        Err(Refused {
            reason: Refusal::BreakerOpen,
            message: format!(
                "circuit breaker of {}/{service} {why}; retry after {retry_after_ms} ms",
                q.name()
            ),
            limit: None,
            retry_after_ms: Some(retry_after_ms),
        })
    }

    /// Every service breaker that left the closed state at least once, or is not closed.
    #[must_use]
    pub fn rows(&self, now_ns: u64) -> Vec<ServiceBreakerRow> {
        self.services
            .iter()
            .filter(|(_, s)| s.opened > 0 || s.state != TripState::Closed || s.reject_ppm > 0)
            .map(|((q, name), s)| {
                let w = s
                    .window
                    .iter()
                    .fold(Calls::default(), |acc, (_, c)| acc.plus(*c));
                ServiceBreakerRow {
                    service: format!("{}/{name}", q.name()),
                    state: s.state.name().to_owned(),
                    calls: w.calls,
                    failed: w.failed,
                    slow: w.slow,
                    ejection_ms: s.ejection_ms,
                    retry_after_ms: match s.state {
                        TripState::Open { until_ns } => {
                            Some(until_ns.saturating_sub(now_ns).div_ceil(1_000_000))
                        }
                        _ => None,
                    },
                    opened: s.opened,
                    rejection_probability: f64::from(s.reject_ppm) / 1e6,
                    plan: None,
                }
            })
            .collect()
    }
}

fn open(s: &mut Tripped, ejection_ms: u32, now_ns: u64) -> TripState {
    s.ejection_ms = ejection_ms;
    s.opened += 1;
    s.window.clear();
    TripState::Open {
        until_ns: now_ns + u64::from(ejection_ms) * 1_000_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn totals(requests: u64, failed: u64) -> BTreeMap<(Quadrant, String), SliTotals> {
        BTreeMap::from([(
            (Quadrant::Px, "api".to_owned()),
            SliTotals {
                requests,
                within: requests - failed,
                failed,
                ..SliTotals::default()
            },
        )])
    }

    #[test]
    fn failure_ratio_opens_half_opens_and_closes_or_doubles() {
        let cfg = BreakersConfig {
            min_calls: 10,
            window_ms: 1000,
            base_ejection_ms: 100,
            ..BreakersConfig::default()
        };
        let mut t = Trips::default();
        // 9 calls, all failed: too few to judge.
        assert!(t.judge(0, &totals(9, 9), &cfg, &BTreeMap::new()).is_empty());
        assert!(t.check((Quadrant::Px, "api"), 0, &cfg, 999_999).is_ok());
        // The tenth: 100 % failed ≥ 50 %: open for 100 ms.
        let tr = t.judge(10 * MS, &totals(10, 10), &cfg, &BTreeMap::new());
        assert_eq!(tr.len(), 1);
        assert_eq!((tr[0].cause, tr[0].ejection_ms), ("failure_ratio", 100));
        assert_eq!(
            tr[0].window,
            Calls {
                calls: 10,
                failed: 10,
                slow: 0
            }
        );
        let r = t
            .check((Quadrant::Px, "api"), 50 * MS, &cfg, 999_999)
            .unwrap_err();
        assert_eq!(
            (r.reason, r.retry_after_ms),
            (Refusal::BreakerOpen, Some(60))
        );
        // Past the ejection one probe lane goes through, before the next judgement says
        // half-open; the next open waits a base ejection for the probe's calls to be judged.
        assert!(
            t.check((Quadrant::Px, "api"), 110 * MS, &cfg, 999_999)
                .is_ok()
        );
        let r = t
            .check((Quadrant::Px, "api"), 130 * MS, &cfg, 999_999)
            .unwrap_err();
        assert!(r.message.contains("is half-open"), "{}", r.message);
        assert_eq!(r.retry_after_ms, Some(80));
        let tr = t.judge(130 * MS, &totals(10, 10), &cfg, &BTreeMap::new());
        assert_eq!(
            (tr[0].to, tr[0].cause),
            (TripState::HalfOpen, "ejection_elapsed")
        );
        assert!(
            t.check((Quadrant::Px, "api"), 140 * MS, &cfg, 999_999)
                .is_err()
        );
        // A probe whose calls never reach min_calls does not hold the service shut: another
        // lane goes through a base ejection later.
        assert!(
            t.check((Quadrant::Px, "api"), 210 * MS, &cfg, 999_999)
                .is_ok()
        );
        // Ten more calls, still all failing: open again for twice as long.
        let tr = t.judge(200 * MS, &totals(20, 20), &cfg, &BTreeMap::new());
        assert_eq!((tr[0].cause, tr[0].ejection_ms), ("probe_failed", 200));
        let tr = t.judge(400 * MS, &totals(20, 20), &cfg, &BTreeMap::new());
        assert_eq!(tr[0].to, TripState::HalfOpen);
        // Ten calls with 2 failures (20 % < 50 %): closed.
        let tr = t.judge(500 * MS, &totals(30, 22), &cfg, &BTreeMap::new());
        assert_eq!(
            (tr[0].to, tr[0].cause),
            (TripState::Closed, "probe_succeeded")
        );
        assert_eq!(t.rows(500 * MS)[0].opened, 2);
    }

    #[test]
    fn admission_control_refuses_opens_with_the_probability_of_the_success_rate() {
        let cfg = BreakersConfig {
            min_calls: 10,
            failure_ratio: 0.9,
            admission_control: true,
            ..BreakersConfig::default()
        };
        let mut t = Trips::default();
        // 20 calls, half failed: closed (below 90 %), refusing 45.2 % of opens (by hand:
        // (20 - 10 / 0.95) / 21).
        assert!(
            t.judge(0, &totals(20, 10), &cfg, &BTreeMap::new())
                .is_empty()
        );
        let key = (Quadrant::Px, "api".to_owned());
        assert_eq!(t.rejections(), [(key, 451_128)]);
        let r = t
            .check((Quadrant::Px, "api"), 0, &cfg, 451_127)
            .unwrap_err();
        assert_eq!(r.reason, Refusal::BreakerOpen);
        assert!(
            r.message.contains("45.1 % of opens are refused"),
            "{}",
            r.message
        );
        assert!(t.check((Quadrant::Px, "api"), 0, &cfg, 451_128).is_ok());
        assert!((t.rows(0)[0].rejection_probability - 0.451_128).abs() < 1e-9);
        // Off: nothing refused whatever the draw.
        let off = BreakersConfig {
            admission_control: false,
            ..cfg.clone()
        };
        let mut t = Trips::default();
        let _ = t.judge(0, &totals(20, 10), &off, &BTreeMap::new());
        assert!(t.check((Quadrant::Px, "api"), 0, &off, 0).is_ok());
    }

    #[test]
    fn a_service_with_plan_thresholds_is_judged_by_them() {
        let global = BreakersConfig {
            min_calls: 20,
            ..BreakersConfig::default()
        };
        let mut t = Trips::default();
        let mut both = totals(5, 5);
        both.insert(
            (Quadrant::Px, "web".to_owned()),
            both[&(Quadrant::Px, "api".to_owned())],
        );
        let overrides = BTreeMap::from([(
            (Quadrant::Px, "web".to_owned()),
            BreakersConfig {
                min_calls: 5,
                base_ejection_ms: 300,
                ..global.clone()
            },
        )]);
        // Five failed calls each: only web's plan judges that few.
        let tr = t.judge(0, &both, &global, &overrides);
        assert_eq!(tr.len(), 1, "{tr:?}");
        assert_eq!((tr[0].service.as_str(), tr[0].ejection_ms), ("web", 300));
        // A service its plan turns off is not judged, whatever the configuration says.
        let off = BTreeMap::from([(
            (Quadrant::Px, "api".to_owned()),
            BreakersConfig {
                failure_ratio: 0.0,
                ..global.clone()
            },
        )]);
        let mut t = Trips::default();
        assert!(t.judge(0, &totals(30, 30), &global, &off).is_empty());
    }

    #[test]
    fn old_calls_leave_the_window_and_slow_calls_count_by_bucket() {
        let cfg = BreakersConfig {
            min_calls: 10,
            window_ms: 1000,
            slow_call_ms: 1.0,
            ..BreakersConfig::default()
        };
        let mut t = Trips::default();
        // 6 failures, then 2 s later 6 more: never 10 in one window.
        assert!(t.judge(0, &totals(6, 6), &cfg, &BTreeMap::new()).is_empty());
        assert!(
            t.judge(2000 * MS, &totals(12, 12), &cfg, &BTreeMap::new())
                .is_empty()
        );
        // 10 answered calls, 6 of them in a bucket from 1.28 ms on: slow.
        let mut s = SliTotals {
            requests: 10,
            within: 10,
            ..SliTotals::default()
        };
        s.latency[crate::lanes::ring::latency_bucket(2_000_000)] = 6;
        s.latency[crate::lanes::ring::latency_bucket(10_000)] = 4;
        let mut t = Trips::default();
        let tr = t.judge(
            0,
            &BTreeMap::from([((Quadrant::Px, "api".to_owned()), s)]),
            &cfg,
            &BTreeMap::new(),
        );
        assert_eq!(tr[0].cause, "slow_call_ratio");
        assert_eq!(tr[0].window.slow, 6);
    }
}
