//! SLO specifications (the `slos` section of the configuration), with `OpenSLO`'s field names:
//! `indicator`, `objectives[].target` / `value`, `timeWindow[].duration` / `isRolling`,
//! `budgetingMethod`.

use std::{collections::BTreeSet, time::Duration};

use dataplane_common::Quadrant;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, invalid};

/// What an SLO measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Indicator {
    /// The share of lane requests to the service that were answered (bad: the lane failed or
    /// closed before the answer, or the open was refused because the service was not there,
    /// busy, broken or behind an open breaker; policy refusals are not errors).
    Availability,
    /// The share of answered lane requests whose round trip was at most `objectives[0].value`
    /// milliseconds.
    Latency,
    /// The share of one-second time slices (with requests) in which the service's workload
    /// spent at most `objectives[0].value` CPU-seconds per 1,000 lane requests to the service
    /// (`cpu.stat` of the workload's cgroup).
    Cost,
    /// The share of one-second time slices at whose end the service's workload held at most
    /// `objectives[0].value` MiB of memory (`memory.current` of its cgroup): the memory side of
    /// its cost.
    Memory,
}

impl Indicator {
    /// Its name in configurations and reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Availability => "availability",
            Self::Latency => "latency",
            Self::Cost => "cost",
            Self::Memory => "memory",
        }
    }

    /// Measured from the workload's cgroup in one-second slices (`cost`, `memory`).
    #[must_use]
    pub const fn sliced(self) -> bool {
        matches!(self, Self::Cost | Self::Memory)
    }
}

/// Largest memory objective, MiB (1 TiB).
pub const MAX_MEMORY_MIB: f64 = 1_048_576.0;

/// How the error budget is counted. Only `Occurrences` (good events / all events).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BudgetingMethod {
    /// Good events over all events in the window.
    #[default]
    Occurrences,
}

/// One objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Objective {
    /// A name for reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The share of good events to keep, above 0 and below 1 (0.999 = 99.9 %).
    pub target: f64,
    /// For `latency`: the threshold in milliseconds a round trip must not exceed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
}

/// The SLO's window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TimeWindow {
    /// `<n>s`, `<n>m`, `<n>h`, `<n>d` or `<n>w`, between 1 minute and 366 days.
    pub duration: String,
    /// Rolling (the only kind kept).
    #[serde(default = "yes")]
    pub is_rolling: bool,
}

const fn yes() -> bool {
    true
}

fn default_window() -> Vec<TimeWindow> {
    vec![TimeWindow {
        duration: "28d".into(),
        is_rolling: true,
    }]
}

const fn default_min_events() -> u64 {
    10
}

/// One SLO: a lane service in a quadrant, what is measured and the objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SloSpec {
    /// Unique name (`[a-z0-9-]`, at most 63).
    pub name: String,
    /// The quadrant whose error budget this is, and where the service runs.
    pub quadrant: String,
    /// The lane service (as its workload offers it).
    pub service: String,
    /// What is measured.
    pub indicator: Indicator,
    /// Exactly one objective.
    pub objectives: Vec<Objective>,
    /// The window (default: 28 days, rolling).
    #[serde(default = "default_window")]
    pub time_window: Vec<TimeWindow>,
    /// How the budget is counted.
    #[serde(default)]
    pub budgeting_method: BudgetingMethod,
    /// A burn-rate window with fewer events than this is "no data" and never fires.
    #[serde(default = "default_min_events")]
    pub min_events: u64,
}

/// Shortest window accepted.
pub const MIN_WINDOW: Duration = Duration::from_mins(1);
/// Longest window accepted.
pub const MAX_WINDOW: Duration = Duration::from_hours(8784);
/// Most SLOs a configuration may hold.
pub const MAX_SLOS: usize = 256;

/// Parses `<n><unit>` (s, m, h, d, w).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let unit = text.chars().last()?;
    let n: u64 = text[..text.len() - unit.len_utf8()].parse().ok()?;
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 604_800,
        _ => return None,
    };
    n.checked_mul(secs).map(Duration::from_secs)
}

impl SloSpec {
    /// The quadrant (valid once validated).
    #[must_use]
    pub fn quadrant(&self) -> Quadrant {
        Quadrant::from_name(&self.quadrant).unwrap_or(Quadrant::Dx)
    }

    /// The objective's target.
    #[must_use]
    pub fn target(&self) -> f64 {
        self.objectives.first().map_or(0.0, |o| o.target)
    }

    /// The latency threshold, ns (latency SLOs).
    #[must_use]
    pub fn threshold_ns(&self) -> Option<u64> {
        if self.indicator != Indicator::Latency {
            return None;
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "validated: positive and at most a minute"
        )]
        self.objectives
            .first()
            .and_then(|o| o.value)
            .map(|ms| (ms * 1e6) as u64)
    }

    /// The window (valid once validated).
    #[must_use]
    pub fn window(&self) -> Duration {
        self.time_window
            .first()
            .and_then(|w| parse_duration(&w.duration))
            .unwrap_or(Duration::from_hours(672))
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok_name {
            return Err(invalid(
                format!("{at}.name"),
                format!("{:?} must be 1 to 63 of a-z, 0-9 and -", self.name),
            ));
        }
        if Quadrant::from_name(&self.quadrant).is_none() {
            return Err(invalid(
                format!("{at}.quadrant"),
                format!("{:?}: expected dx, dg, px or pg", self.quadrant),
            ));
        }
        if self.service.is_empty() || self.service.len() > 63 {
            return Err(invalid(format!("{at}.service"), "must be 1 to 63 bytes"));
        }
        let [objective] = self.objectives.as_slice() else {
            return Err(invalid(
                format!("{at}.objectives"),
                format!("exactly one objective, got {}", self.objectives.len()),
            ));
        };
        if !(objective.target > 0.0 && objective.target < 1.0) {
            return Err(invalid(
                format!("{at}.objectives[0].target"),
                format!("{} must be above 0 and below 1", objective.target),
            ));
        }
        match (self.indicator, objective.value) {
            (Indicator::Cost, Some(v)) if v > 0.0 && v <= 1_000_000.0 => {}
            (Indicator::Cost, v) => {
                return Err(invalid(
                    format!("{at}.objectives[0].value"),
                    format!(
                        "a cost SLO needs CPU-seconds per 1000 requests above 0 and at most 1000000, got {v:?}"
                    ),
                ));
            }
            (Indicator::Memory, Some(v)) if v > 0.0 && v <= MAX_MEMORY_MIB => {}
            (Indicator::Memory, v) => {
                return Err(invalid(
                    format!("{at}.objectives[0].value"),
                    format!(
                        "a memory SLO needs MiB above 0 and at most {MAX_MEMORY_MIB}, got {v:?}"
                    ),
                ));
            }
            (Indicator::Latency, Some(v)) if v > 0.0 && v <= 60_000.0 => {}
            (Indicator::Latency, v) => {
                return Err(invalid(
                    format!("{at}.objectives[0].value"),
                    format!(
                        "a latency SLO needs a threshold in milliseconds above 0 and at most 60000, got {v:?}"
                    ),
                ));
            }
            (Indicator::Availability, Some(_)) => {
                return Err(invalid(
                    format!("{at}.objectives[0].value"),
                    "an availability SLO has no threshold",
                ));
            }
            (Indicator::Availability, None) => {}
        }
        let [window] = self.time_window.as_slice() else {
            return Err(invalid(
                format!("{at}.timeWindow"),
                format!("exactly one window, got {}", self.time_window.len()),
            ));
        };
        match parse_duration(&window.duration) {
            Some(d) if (MIN_WINDOW..=MAX_WINDOW).contains(&d) => {}
            _ => {
                return Err(invalid(
                    format!("{at}.timeWindow[0].duration"),
                    format!(
                        "{:?}: expected <n>s|m|h|d|w between 1m and 366d",
                        window.duration
                    ),
                ));
            }
        }
        if !window.is_rolling {
            return Err(invalid(
                format!("{at}.timeWindow[0].isRolling"),
                "only rolling windows are kept",
            ));
        }
        if self.min_events == 0 {
            return Err(invalid(format!("{at}.minEvents"), "must be at least 1"));
        }
        Ok(())
    }
}

/// Checks every SLO and that names are unique and a service has at most one latency SLO (its
/// lanes carry one threshold).
pub fn validate(slos: &[SloSpec]) -> Result<(), ConfigError> {
    if slos.len() > MAX_SLOS {
        return Err(invalid(
            "slos",
            format!("{} SLOs, more than the limit of {MAX_SLOS}", slos.len()),
        ));
    }
    let mut names = BTreeSet::new();
    let mut latency = BTreeSet::new();
    for (i, s) in slos.iter().enumerate() {
        let at = format!("slos[{i}]");
        s.validate(&at)?;
        if !names.insert(&s.name) {
            return Err(invalid(
                format!("{at}.name"),
                format!("{:?} is used twice", s.name),
            ));
        }
        if s.indicator == Indicator::Latency && !latency.insert((&s.quadrant, &s.service)) {
            return Err(invalid(
                format!("{at}.service"),
                format!(
                    "{}/{} has a latency SLO already (its lanes carry one threshold)",
                    s.quadrant, s.service
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> SloSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn durations_parse_with_their_unit() {
        assert_eq!(parse_duration("28d"), Some(Duration::from_hours(672)));
        assert_eq!(parse_duration("28m"), Some(Duration::from_mins(28)));
        assert_eq!(parse_duration("2w"), Some(Duration::from_hours(336)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        for bad in ["", "d", "28", "28x", "-1d", "1.5h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn openslo_field_names_are_read_and_bad_specs_name_the_field() {
        let ok = spec(
            "{name: echo-latency, quadrant: dg, service: echo, indicator: latency, \
             objectives: [{target: 0.99, value: 1.5}], timeWindow: [{duration: 28m, isRolling: true}]}",
        );
        validate(std::slice::from_ref(&ok)).unwrap();
        assert_eq!(ok.threshold_ns(), Some(1_500_000));
        assert_eq!(ok.window(), Duration::from_mins(28));
        let defaults = spec(
            "{name: a, quadrant: px, service: api, indicator: availability, objectives: [{target: 0.999}]}",
        );
        validate(std::slice::from_ref(&defaults)).unwrap();
        assert_eq!(defaults.window(), Duration::from_hours(672));
        assert_eq!(defaults.min_events, 10);
        let cases = [
            (
                "{name: A, quadrant: px, service: api, indicator: availability, objectives: [{target: 0.9}]}",
                "slos[0].name",
            ),
            (
                "{name: a, quadrant: qx, service: api, indicator: availability, objectives: [{target: 0.9}]}",
                "slos[0].quadrant",
            ),
            (
                "{name: a, quadrant: px, service: api, indicator: availability, objectives: [{target: 1.0}]}",
                "slos[0].objectives[0].target",
            ),
            (
                "{name: a, quadrant: px, service: api, indicator: latency, objectives: [{target: 0.9}]}",
                "slos[0].objectives[0].value",
            ),
            (
                "{name: a, quadrant: px, service: api, indicator: availability, objectives: [{target: 0.9, value: 3}]}",
                "slos[0].objectives[0].value",
            ),
            (
                "{name: a, quadrant: px, service: api, indicator: availability, objectives: []}",
                "slos[0].objectives",
            ),
            (
                "{name: a, quadrant: px, service: api, indicator: availability, objectives: [{target: 0.9}], timeWindow: [{duration: 30s}]}",
                "slos[0].timeWindow[0].duration",
            ),
            (
                "{name: a, quadrant: px, service: api, indicator: availability, objectives: [{target: 0.9}], timeWindow: [{duration: 1d, isRolling: false}]}",
                "slos[0].timeWindow[0].isRolling",
            ),
        ];
        for (yaml, field) in cases {
            let e = validate(&[spec(yaml)]).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
        let twice = [defaults.clone(), defaults];
        assert!(
            validate(&twice)
                .unwrap_err()
                .to_string()
                .contains("used twice")
        );
        let mut other = ok.clone();
        other.name = "other".into();
        assert!(
            validate(&[ok, other])
                .unwrap_err()
                .to_string()
                .contains("latency SLO already")
        );
    }
}
