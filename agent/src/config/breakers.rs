//! The `breakers` section: the thresholds of the circuit breakers the kernel keeps per (caller
//! quadrant, destination address and port).

use dataplane_common::breaker::BreakerLimits;
use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// Circuit breaker thresholds (the names follow Envoy's outlier detection and circuit breakers,
/// and resilience4j's failure- and slow-call rates for the ones the agent computes).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BreakersConfig {
    /// Breakers at all; off, `connect` pays one array lookup and nothing is counted.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Consecutive failed TCP connects (refused, timed out, abandoned) from one quadrant to one
    /// destination that open its breaker; 0: the kernel opens none.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// TCP connections one quadrant may hold open to one destination; 0: no limit.
    #[serde(default)]
    pub max_connections: u32,
    /// How long a breaker first stays open, ms; each failed probe doubles it.
    #[serde(default = "default_base_ejection_ms")]
    pub base_ejection_ms: u32,
    /// The longest a breaker stays open at once, ms.
    #[serde(default = "default_max_ejection_ms")]
    pub max_ejection_ms: u32,
    /// Share of a lane service's calls within `window_ms` that failed (unanswered requests, and
    /// opens refused for the service's own reasons) that opens the service's breaker, computed
    /// by the agent; 0: off.
    #[serde(default = "default_failure_ratio")]
    pub failure_ratio: f64,
    /// A round trip longer than this many ms is a slow call; 0: slow calls are not judged.
    #[serde(default)]
    pub slow_call_ms: f64,
    /// Share of answered calls within `window_ms` that were slow that opens the breaker.
    #[serde(default = "default_slow_call_ratio")]
    pub slow_call_ratio: f64,
    /// The sliding window of the agent's ratios, ms.
    #[serde(default = "default_window_ms")]
    pub window_ms: u32,
    /// Calls the window must hold before a ratio is judged (also the calls a half-open
    /// breaker's judgement waits for).
    #[serde(default = "default_min_calls")]
    pub min_calls: u32,
    /// Admission control, as Envoy's: while a lane service's breaker is closed, lane opens and
    /// `connect`s to its TCP port are refused with a probability that grows as its success rate
    /// over the window falls below `admission_success_threshold`.
    #[serde(default)]
    pub admission_control: bool,
    /// The success rate admission control aims for.
    #[serde(default = "default_admission_success_threshold")]
    pub admission_success_threshold: f64,
    /// How sharply the refusal probability rises (Envoy's `aggression`; 1: linearly).
    #[serde(default = "default_admission_aggression")]
    pub admission_aggression: f64,
    /// The highest refusal probability admission control sets.
    #[serde(default = "default_max_rejection_probability")]
    pub max_rejection_probability: f64,
}

const fn default_admission_success_threshold() -> f64 {
    0.95
}
const fn default_admission_aggression() -> f64 {
    1.0
}
const fn default_max_rejection_probability() -> f64 {
    0.8
}

impl Default for BreakersConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: default_consecutive_failures(),
            max_connections: 0,
            base_ejection_ms: default_base_ejection_ms(),
            max_ejection_ms: default_max_ejection_ms(),
            failure_ratio: default_failure_ratio(),
            slow_call_ms: 0.0,
            slow_call_ratio: default_slow_call_ratio(),
            window_ms: default_window_ms(),
            min_calls: default_min_calls(),
            admission_control: false,
            admission_success_threshold: default_admission_success_threshold(),
            admission_aggression: default_admission_aggression(),
            max_rejection_probability: default_max_rejection_probability(),
        }
    }
}

const fn default_failure_ratio() -> f64 {
    0.5
}
const fn default_slow_call_ratio() -> f64 {
    0.5
}
const fn default_window_ms() -> u32 {
    10_000
}
const fn default_min_calls() -> u32 {
    20
}

/// Most consecutive failures a threshold may ask for.
pub const MAX_CONSECUTIVE_FAILURES: u32 = 10_000;
/// Longest ejection accepted: one hour.
pub const MAX_EJECTION_MS: u32 = 3_600_000;
/// Shortest ejection accepted.
pub const MIN_EJECTION_MS: u32 = 10;

const fn default_enabled() -> bool {
    true
}
const fn default_consecutive_failures() -> u32 {
    5
}
const fn default_base_ejection_ms() -> u32 {
    1000
}
const fn default_max_ejection_ms() -> u32 {
    60_000
}

impl BreakersConfig {
    /// Admission control's refusal probability (ppm) for a window of `calls` calls of which
    /// `failed` failed (Envoy's formula: `((calls - successes / threshold) / (calls + 1)) ^ (1 /
    /// aggression)`, at least 0, at most `max_rejection_probability`); 0 when it is off or the
    /// window holds fewer than `min_calls` calls.
    #[must_use]
    pub fn rejection_ppm(&self, calls: u64, failed: u64) -> u32 {
        if !self.admission_control || calls < u64::from(self.min_calls) || calls == 0 {
            return 0;
        }
        #[expect(clippy::cast_precision_loss, reason = "call counts far below 2^52")]
        let (calls, successes) = (calls as f64, calls.saturating_sub(failed) as f64);
        let base =
            ((calls - successes / self.admission_success_threshold) / (calls + 1.0)).max(0.0);
        let p = base
            .powf(1.0 / self.admission_aggression)
            .min(self.max_rejection_probability);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "0 <= p <= 1"
        )]
        let ppm = (p * 1e6).round() as u32;
        ppm
    }

    /// These thresholds with a plan's `breaker` section over them, validated (a field at fault
    /// is named `breaker.<field>`).
    ///
    /// # Errors
    /// The combination is not valid (e.g. a base ejection above the maximum).
    pub fn with_plan(&self, plan: &crate::plans::PlanBreaker) -> Result<Self, ConfigError> {
        let mut c = self.clone();
        c.failure_ratio = plan.failure_ratio.unwrap_or(c.failure_ratio);
        c.slow_call_ms = plan.slow_call_ms.unwrap_or(c.slow_call_ms);
        c.slow_call_ratio = plan.slow_call_ratio.unwrap_or(c.slow_call_ratio);
        c.window_ms = plan.window_ms.unwrap_or(c.window_ms);
        c.min_calls = plan.min_calls.unwrap_or(c.min_calls);
        c.base_ejection_ms = plan.base_ejection_ms.unwrap_or(c.base_ejection_ms);
        c.max_ejection_ms = plan.max_ejection_ms.unwrap_or(c.max_ejection_ms);
        c.validate().map_err(|e| match e {
            ConfigError::Invalid { field, reason } => ConfigError::Invalid {
                field: field.replacen("breakers.", "breaker.", 1),
                reason,
            },
            other => other,
        })?;
        Ok(c)
    }

    /// What the kernel's `BREAKER_LIMITS` holds.
    #[must_use]
    pub fn limits(&self) -> BreakerLimits {
        BreakerLimits {
            enabled: u32::from(self.enabled),
            consecutive_failures: self.consecutive_failures,
            max_connections: self.max_connections,
            base_ejection_ms: self.base_ejection_ms,
            max_ejection_ms: self.max_ejection_ms,
            admission: u32::from(self.enabled && self.admission_control),
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.consecutive_failures > MAX_CONSECUTIVE_FAILURES {
            return Err(invalid(
                "breakers.consecutive_failures",
                format!(
                    "{} is above the limit of {MAX_CONSECUTIVE_FAILURES} (0 turns the kernel's trips off)",
                    self.consecutive_failures
                ),
            ));
        }
        for (field, v) in [
            ("breakers.base_ejection_ms", self.base_ejection_ms),
            ("breakers.max_ejection_ms", self.max_ejection_ms),
        ] {
            if !(MIN_EJECTION_MS..=MAX_EJECTION_MS).contains(&v) {
                return Err(invalid(
                    field,
                    format!("{v} is outside {MIN_EJECTION_MS}..={MAX_EJECTION_MS} ms"),
                ));
            }
        }
        for (field, v) in [
            ("breakers.failure_ratio", self.failure_ratio),
            ("breakers.slow_call_ratio", self.slow_call_ratio),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(field, format!("{v} is outside 0..=1")));
            }
        }
        if !(0.0..=60_000.0).contains(&self.slow_call_ms) {
            return Err(invalid(
                "breakers.slow_call_ms",
                format!("{} is outside 0..=60000 ms", self.slow_call_ms),
            ));
        }
        if !(100..=3_600_000).contains(&self.window_ms) {
            return Err(invalid(
                "breakers.window_ms",
                format!("{} is outside 100..=3600000 ms", self.window_ms),
            ));
        }
        if !(1..=1_000_000).contains(&self.min_calls) {
            return Err(invalid(
                "breakers.min_calls",
                format!("{} is outside 1..=1000000", self.min_calls),
            ));
        }
        for (field, v, lo, hi) in [
            (
                "breakers.admission_success_threshold",
                self.admission_success_threshold,
                0.0,
                1.0,
            ),
            (
                "breakers.admission_aggression",
                self.admission_aggression,
                0.01,
                100.0,
            ),
            (
                "breakers.max_rejection_probability",
                self.max_rejection_probability,
                0.0,
                1.0,
            ),
        ] {
            if !(v > lo && v <= hi) {
                return Err(invalid(field, format!("{v} is outside ({lo}, {hi}]")));
            }
        }
        if self.base_ejection_ms > self.max_ejection_ms {
            return Err(invalid(
                "breakers.base_ejection_ms",
                format!(
                    "{} is above breakers.max_ejection_ms ({})",
                    self.base_ejection_ms, self.max_ejection_ms
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_control_refuses_more_as_the_success_rate_falls() {
        let on = BreakersConfig {
            admission_control: true,
            min_calls: 20,
            ..BreakersConfig::default()
        };
        // Off, or too few calls: never.
        assert_eq!(BreakersConfig::default().rejection_ppm(100, 50), 0);
        assert_eq!(on.rejection_ppm(19, 19), 0);
        // All successful: (100 - 100 / 0.95) / 101 < 0, so 0.
        assert_eq!(on.rejection_ppm(100, 0), 0);
        // Half failed: (100 - 50 / 0.95) / 101 = 0.468994 by hand.
        assert_eq!(on.rejection_ppm(100, 50), 468_994);
        // Aggression 2 takes the square root: 0.684832.
        let sharp = BreakersConfig {
            admission_aggression: 2.0,
            ..on.clone()
        };
        assert_eq!(sharp.rejection_ppm(100, 50), 684_832);
        // Everything failed: 100 / 101 = 0.99, held to the maximum of 0.8.
        assert_eq!(on.rejection_ppm(100, 100), 800_000);
    }

    #[test]
    fn a_plan_replaces_only_the_thresholds_it_names() {
        let global = BreakersConfig::default();
        let plan = crate::plans::PlanBreaker {
            min_calls: Some(5),
            base_ejection_ms: Some(500),
            ..Default::default()
        };
        let c = global.with_plan(&plan).unwrap();
        assert_eq!((c.min_calls, c.base_ejection_ms), (5, 500));
        assert_eq!(
            (c.failure_ratio, c.window_ms, c.max_ejection_ms),
            (0.5, 10_000, 60_000)
        );
        // A base ejection above the configuration's maximum is named as the plan's field.
        let e = global
            .with_plan(&crate::plans::PlanBreaker {
                base_ejection_ms: Some(120_000),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("breaker.base_ejection_ms"), "{e}");
        assert!(e.contains("120000 is above"), "{e}");
    }

    #[test]
    fn defaults_are_valid_and_bad_values_name_the_field_and_limit() {
        let ok = BreakersConfig::default();
        ok.validate().unwrap();
        assert_eq!(ok.limits().consecutive_failures, 5);
        let cases = [
            (
                BreakersConfig {
                    consecutive_failures: 10_001,
                    ..ok.clone()
                },
                "breakers.consecutive_failures: 10001 is above the limit of 10000",
            ),
            (
                BreakersConfig {
                    base_ejection_ms: 5,
                    ..ok.clone()
                },
                "breakers.base_ejection_ms: 5 is outside 10..=3600000 ms",
            ),
            (
                BreakersConfig {
                    base_ejection_ms: 2000,
                    max_ejection_ms: 1000,
                    ..ok.clone()
                },
                "breakers.base_ejection_ms: 2000 is above breakers.max_ejection_ms (1000)",
            ),
        ];
        for (config, want) in cases {
            let got = config.validate().unwrap_err().to_string();
            assert!(got.contains(want), "{got}");
        }
    }
}
