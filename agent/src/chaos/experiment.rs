//! Chaos experiments (`quadrant chaos run FILE`): the file's shape — a steady-state hypothesis
//! (probes and their tolerances), a method (faults), safeguards — and its validation, as Chaos
//! Toolkit's experiments are shaped. The JSON Schema is published as
//! `manifests/schemas/chaos-experiment.schema.json`.

use dataplane_common::Quadrant;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Action, ChaosError, FaultSpec};

/// A chaos experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// What it tests.
    #[schemars(length(min = 1, max = 200))]
    pub title: String,
    /// The quadrants its faults may touch (the blast radius). One by default; more, or a
    /// production quadrant, only with `allow_production` / as listed here. None for an
    /// experiment whose faults touch no quadrant's traffic or processes (`kill_agent`): then
    /// every quadrant must hold its steady state.
    #[schemars(length(min = 0, max = 4))]
    pub targets: Vec<String>,
    /// Whether px or pg may be targets.
    #[serde(default)]
    pub allow_production: bool,
    /// The run's windows.
    #[serde(default)]
    pub windows: Windows,
    /// The steady-state hypothesis: probes of every quadrant and their tolerances.
    #[serde(default)]
    pub steady_state: SteadyState,
    /// The faults, armed together at the start of the fault window and ending with it.
    #[schemars(length(min = 1, max = 16))]
    pub method: Vec<MethodFault>,
    /// Abort conditions, checked every second during the fault window.
    #[serde(default)]
    pub safeguards: Safeguards,
    /// Actions taken in order once the faults have ended (also after an abort); one that fails
    /// fails the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub rollbacks: Vec<super::rollback::Rollback>,
}

/// Baseline, fault and recovery windows, seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Windows {
    /// Before the faults.
    #[schemars(range(min = 1, max = 600))]
    pub baseline_secs: u64,
    /// With the faults.
    #[schemars(range(min = 1, max = 3600))]
    pub fault_secs: u64,
    /// After them: the targets must be back to steady state within it.
    #[schemars(range(min = 1, max = 600))]
    pub recovery_secs: u64,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            baseline_secs: 3,
            fault_secs: 5,
            recovery_secs: 5,
        }
    }
}

/// Probes and tolerances.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SteadyState {
    /// Requests per second to each quadrant's echo (UDP from the host).
    #[schemars(range(min = 1, max = 2000))]
    pub rate_per_sec: u32,
    /// A request unanswered this long is lost, ms.
    #[schemars(range(min = 1, max = 10000))]
    pub timeout_ms: u32,
    /// The share of requests a non-target quadrant must answer during the fault (0.999:
    /// SC-003's 99.9 %).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_availability: f64,
    /// A non-target quadrant's p99 during the fault, at most this times its baseline p99.
    #[schemars(range(min = 1.0, max = 100.0))]
    pub max_p99_ratio: f64,
    /// A non-target quadrant's p99 during the fault, at most this (SC-002's data bound 1.5 ms).
    #[schemars(range(min = 0.001, max = 10000.0))]
    pub max_p99_ms: f64,
    /// Seconds the targets have, after the faults end, to answer every request again.
    #[schemars(range(min = 1, max = 600))]
    pub recovery_within_secs: u64,
}

impl Default for SteadyState {
    fn default() -> Self {
        Self {
            rate_per_sec: 200,
            timeout_ms: 200,
            min_availability: 0.999,
            max_p99_ratio: 1.5,
            max_p99_ms: 1.5,
            recovery_within_secs: 30,
        }
    }
}

/// One fault of the method (its duration is the fault window).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MethodFault {
    /// `drop`, `delay`, `refuse`, `reset`, `freeze`, `kill`, `cpu_pressure`,
    /// `memory_pressure`, `pids_pressure` or `kill_agent`.
    pub action: Action,
    /// Source identity (dx, dg, px, pg, host, world) or any.
    pub from: String,
    /// Destination identity or any.
    pub to: String,
    /// Share dropped or refused, percent; for `cpu_pressure`, the target's CPU during the
    /// fault, percent of one CPU.
    #[serde(default = "all")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    /// Added delay, ms.
    #[serde(default)]
    pub delay_ms: u32,
    /// Jitter, ms.
    #[serde(default)]
    pub jitter_ms: u32,
    /// Also the other way (a partition).
    #[serde(default)]
    pub both_ways: bool,
    /// Memory left to the target above its use, MiB (`memory_pressure`).
    #[serde(default = "super::default_headroom_mib")]
    #[schemars(range(min = 1, max = 4096))]
    pub headroom_mib: u32,
    /// Processes left to the target above its count (`pids_pressure`).
    #[serde(default = "super::default_headroom_pids")]
    #[schemars(range(min = 1, max = 4096))]
    pub headroom_pids: u32,
    /// Whether the controller starts the next agent after `kill_agent` (false where a service
    /// manager restarts it).
    #[serde(default = "super::yes")]
    pub restart_agent: bool,
    /// `freeze`/`kill`: only this workload of the target, not every process of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub workload: Option<String>,
}

fn all() -> f64 {
    100.0
}

/// When to stop early.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Safeguards {
    /// Abort (remove every fault at once) when a non-target quadrant answers less than this
    /// share of the last second's requests.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub abort_below_availability: f64,
}

impl Default for Safeguards {
    fn default() -> Self {
        Self {
            abort_below_availability: 0.9,
        }
    }
}

impl Experiment {
    /// Parses and validates an experiment (YAML or JSON), naming the field of the first problem.
    ///
    /// # Errors
    /// A parse error with its position, or the first field out of its limits.
    pub fn parse(text: &str) -> Result<Self, ChaosError> {
        let value: serde_json::Value =
            serde_yaml::from_str(text).map_err(|e| ChaosError::Experiment(format!("{e}")))?;
        let schema = serde_json::to_value(schemars::schema_for!(Experiment))
            .map_err(|e| ChaosError::Experiment(e.to_string()))?;
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| ChaosError::Experiment(format!("its schema does not compile: {e}")))?;
        if let Some(e) = validator.iter_errors(&value).next() {
            let at = e.instance_path().to_string();
            return Err(ChaosError::Experiment(format!(
                "{}: {e}",
                if at.is_empty() { "/" } else { &at }
            )));
        }
        let exp: Self =
            serde_json::from_value(value).map_err(|e| ChaosError::Experiment(format!("{e}")))?;
        exp.validate()?;
        Ok(exp)
    }

    /// The target quadrants.
    ///
    /// # Errors
    /// An unknown quadrant name.
    pub fn target_quadrants(&self) -> Result<Vec<Quadrant>, ChaosError> {
        self.targets
            .iter()
            .map(|t| {
                Quadrant::from_name(t).ok_or_else(|| {
                    ChaosError::Experiment(format!("targets: {t:?} is not dx, dg, px or pg"))
                })
            })
            .collect()
    }

    /// The faults as the controller arms them, each for the fault window.
    #[must_use]
    pub fn faults(&self) -> Vec<FaultSpec> {
        self.method
            .iter()
            .map(|m| FaultSpec {
                action: m.action,
                from: m.from.clone(),
                to: m.to.clone(),
                percent: m.percent,
                delay_ms: m.delay_ms,
                jitter_ms: m.jitter_ms,
                both_ways: m.both_ways,
                seconds: self.windows.fault_secs,
                headroom_mib: m.headroom_mib,
                headroom_pids: m.headroom_pids,
                restart_agent: m.restart_agent,
                workload: m.workload.clone(),
            })
            .collect()
    }

    /// The quadrants fault `m` touches: those it names on either side; `any` on both sides
    /// touches all four (`any` on one side confines it to the other side's traffic).
    #[must_use]
    pub fn touched(m: &MethodFault) -> Vec<Quadrant> {
        if m.action == Action::KillAgent {
            return Vec::new();
        }
        if m.from == "any" && m.to == "any" {
            return Quadrant::ALL.to_vec();
        }
        [&m.from, &m.to]
            .into_iter()
            .filter_map(|s| Quadrant::from_name(s))
            .collect()
    }

    /// Blast radius: every quadrant a fault touches must be a target; production targets need
    /// `allow_production`; the faults must be valid.
    fn validate(&self) -> Result<(), ChaosError> {
        let targets = self.target_quadrants()?;
        if !self.allow_production
            && let Some(p) = targets
                .iter()
                .find(|q| matches!(q, Quadrant::Px | Quadrant::Pg))
        {
            return Err(ChaosError::Experiment(format!(
                "targets: {} is a production quadrant; set allow_production: true to name it",
                p.name()
            )));
        }
        for (i, m) in self.method.iter().enumerate() {
            if let Some(q) = Self::touched(m).iter().find(|q| !targets.contains(q)) {
                return Err(ChaosError::Experiment(format!(
                    "method[{i}]: {} -> {} touches {}, which is not among the targets ({})",
                    m.from,
                    m.to,
                    q.name(),
                    self.targets.join(", ")
                )));
            }
        }
        if !self.allow_production
            && let Some(i) = self
                .method
                .iter()
                .position(|m| m.action == Action::KillAgent)
        {
            return Err(ChaosError::Experiment(format!(
                "method[{i}]: kill_agent stops the control plane of every quadrant, production \
                 too; set allow_production: true to name it"
            )));
        }
        for (i, r) in self.rollbacks.iter().enumerate() {
            r.validate(i)?;
        }
        // Production is governed by the targets here (named, with allow_production).
        for (i, f) in self.faults().iter().enumerate() {
            f.entries(true, 0)
                .map_err(|e| ChaosError::Experiment(format!("method[{i}]: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARTITION: &str = "title: partition dx and dg\ntargets: [dx, dg]\nmethod:\n  - { action: drop, from: dx, to: dg, both_ways: true }\n";

    #[test]
    fn an_experiment_parses_with_its_defaults() {
        let e = Experiment::parse(PARTITION).expect("valid");
        assert_eq!(e.windows, Windows::default());
        assert!((e.steady_state.min_availability - 0.999).abs() < 1e-9);
        let f = e.faults();
        assert_eq!(f[0].seconds, 5);
        assert!(f[0].both_ways);
    }

    #[test]
    fn the_blast_radius_is_what_the_targets_name() {
        let err = |text: &str| Experiment::parse(text).unwrap_err().to_string();
        let outside =
            err("title: t\ntargets: [dx]\nmethod:\n  - { action: drop, from: dx, to: dg }\n");
        assert!(
            outside.contains("touches dg, which is not among the targets (dx)"),
            "{outside}"
        );
        let any =
            err("title: t\ntargets: [dx]\nmethod:\n  - { action: drop, from: any, to: any }\n");
        assert!(any.contains("touches dg"), "{any}");
        assert!(
            Experiment::parse(
                "title: t\ntargets: [dx]\nmethod:\n  - { action: drop, from: dx, to: any }\n"
            )
            .is_ok(),
            "any on one side: the target's own traffic"
        );
        let prod =
            err("title: t\ntargets: [px]\nmethod:\n  - { action: drop, from: px, to: px }\n");
        assert!(prod.contains("allow_production: true"), "{prod}");
        assert!(
            Experiment::parse(
                "title: t\ntargets: [px]\nallow_production: true\nmethod:\n  - { action: drop, from: px, to: px }\n"
            )
            .is_ok()
        );
    }

    #[test]
    fn killing_the_agent_touches_no_quadrant_but_needs_production_named() {
        let text =
            "title: t\ntargets: []\nmethod:\n  - { action: kill_agent, from: any, to: agent }\n";
        let err = Experiment::parse(text).unwrap_err().to_string();
        assert!(
            err.contains("method[0]: kill_agent") && err.contains("allow_production"),
            "{err}"
        );
        let e =
            Experiment::parse(&text.replace("targets: []", "targets: []\nallow_production: true"))
                .expect("valid");
        assert!(e.target_quadrants().expect("targets").is_empty());
        assert!(e.faults()[0].restart_agent);
        let err = Experiment::parse(
            "title: t\ntargets: []\nallow_production: true\nmethod:\n  - { action: kill_agent, from: dx, to: agent }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("from any, to agent"), "{err}");
    }

    #[test]
    fn schema_errors_name_the_field() {
        let err = Experiment::parse(
            "title: t\ntargets: [dx]\nwindows: { baseline_secs: 0, fault_secs: 1, recovery_secs: 1 }\nmethod:\n  - { action: drop, from: dx, to: dx }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/windows/baseline_secs"), "{err}");
        let err = Experiment::parse("title: t\ntargets: [dx]\nmethod: []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/method"), "{err}");
        let err = Experiment::parse(
            "title: t\ntargets: [dx]\nmethod:\n  - { action: delay, from: dx, to: dx }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("method[0]") && err.contains("needs a delay"),
            "{err}"
        );
    }
}
