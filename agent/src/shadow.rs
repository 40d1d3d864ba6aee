//! Shadow deployments (`quadrant submit --shadow`, `quadrant shadow`): a new generation of a
//! workload runs beside the live one, in its own cgroup (`<workload>@shadow`, attested as the
//! same workload), and offers the same lane services there. Every lane to those services then
//! carries a mirror grant: the caller's lane library copies that share of its requests to the
//! shadow over a lane of its own and drops the replies, so no caller ever sees one. The agent
//! compares the two generations over the same traffic — failures, p99 latency (the lanes' SLI
//! histograms) and CPU time per 1,000 requests (each cgroup's `cpu.stat`) — and the report says
//! promote or reject; the operator decides. Promoting restarts the workload at the shadow's
//! generation (its plan's declared lanes and SLOs with it); rejecting stops the shadow. The
//! generation was accepted when the shadow was admitted, so generations only move forward
//! either way.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use dataplane_common::Quadrant;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, ShadowsConfig},
    daemon::agent::Agent,
    identity::attest::SHADOW_SUFFIX,
    lanes::{
        broker::{DeclaredLane, sli::SliTotals},
        ring::{LATENCY_BUCKETS, latency_bucket_upper_ns},
    },
    slo::SloSpec,
    workloads::{self, WorkloadError},
};

/// What one generation did while the shadow ran.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GenerationFigures {
    /// Its generation.
    pub generation: Option<u64>,
    /// Lane requests it was sent (the shadow: the mirrored ones).
    pub requests: u64,
    /// Of those, not answered.
    pub failed: u64,
    /// p99 round trip of the answered ones, ms (the upper bound of its histogram bucket).
    pub p99_ms: Option<f64>,
    /// CPU time its cgroup used, s.
    pub cpu_seconds: f64,
    /// CPU-seconds per 1,000 requests.
    pub cpu_seconds_per_1000: Option<f64>,
    /// Its cgroup's `memory.current`, bytes.
    pub memory_bytes: Option<u64>,
}

/// What the comparison says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Too few mirrored requests yet (`shadows.min_requests`).
    InsufficientData,
    /// Within `shadows.tolerance` of the live generation on failures, latency and cost.
    Promote,
    /// Worse than the live generation beyond the tolerance.
    Reject,
}

/// One shadow generation in `quadrant shadow`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShadowReport {
    /// `<quadrant>/<workload>`.
    pub workload: String,
    /// Why it runs as a shadow (asked for, or a cost SLO near its limit).
    pub reason: String,
    /// The share of requests mirrored.
    pub fraction: f64,
    /// When it started (Unix ms).
    pub started_at_ms: u64,
    /// Seconds since.
    pub age_secs: u64,
    /// The lane services the live generation offers.
    pub services: Vec<String>,
    /// The live generation since the shadow started.
    pub live: GenerationFigures,
    /// The shadow generation.
    pub shadow: GenerationFigures,
    /// What the figures say.
    pub verdict: Verdict,
    /// Each comparison, in words.
    pub findings: Vec<String>,
}

/// `quadrant shadow`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShadowsReport {
    /// Every shadow generation running.
    pub shadows: Vec<ShadowReport>,
}

/// What the operator decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The shadow's generation is now the live one.
    Promoted,
    /// The shadow was stopped; the live generation stays.
    Rejected,
}

/// Why a shadow cannot be started or decided.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// No shadow of that workload runs.
    #[error("no shadow generation of {0} runs (`quadrant shadow` lists them)")]
    Unknown(String),
    /// A shadow needs a live generation to compare with.
    #[error(
        "{0} has no live generation running: a shadow is compared with one (submit it without --shadow)"
    )]
    NoLive(String),
    /// One shadow per workload at a time.
    #[error("{key} already runs generation {generation} as a shadow: promote or reject it first")]
    Busy {
        /// `<quadrant>/<workload>`.
        key: String,
        /// The shadow's generation.
        generation: u64,
    },
    /// Starting or stopping a process failed.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
}

/// What promoting a shadow starts: the workload at the shadow's generation, with its plan's
/// declared lanes and SLOs.
#[derive(Debug)]
pub struct Promotion {
    /// The live workload's spec at the new generation.
    pub spec: workloads::Spec,
    /// The plan's declared lanes.
    pub lanes: Vec<DeclaredLane>,
    /// The plan's SLOs.
    pub slos: Vec<SloSpec>,
    /// The breaker thresholds the plan gives its service.
    pub breaker: Option<crate::lanes::broker::PlanBreaker>,
}

/// Cumulative readings where the comparison starts: when the first mirrored request reached
/// the shadow (until then the readings move along), so its start-up is not counted against it
/// and both generations are measured over the same period.
#[derive(Debug, Default)]
struct Baseline {
    live: BTreeMap<(Quadrant, String), SliTotals>,
    shadow: BTreeMap<(Quadrant, String), SliTotals>,
    live_cpu_usec: u64,
    shadow_cpu_usec: u64,
}

impl Baseline {
    /// Now, with the shadow's counts as they were in `shadow` (the snapshot that showed it had
    /// no mirrored request yet: one counted since is then not lost).
    fn read(
        agent: &Agent,
        q: Quadrant,
        workload: &str,
        shadow: BTreeMap<(Quadrant, String), SliTotals>,
    ) -> Self {
        let config = &agent.config;
        Self {
            live: agent.broker.sli_totals(),
            shadow,
            live_cpu_usec: read_cpu_usec(config, q, workload).unwrap_or(0),
            shadow_cpu_usec: read_cpu_usec(config, q, &format!("{workload}{SHADOW_SUFFIX}"))
                .unwrap_or(0),
        }
    }
}

#[derive(Debug)]
struct Running {
    quadrant: Quadrant,
    workload: String,
    live_generation: Option<u64>,
    reason: String,
    fraction_ppm: u32,
    started_at_ms: u64,
    started: Instant,
    promotion: Promotion,
    baseline: Baseline,
}

/// The shadow generations running, by `<quadrant>/<workload>`.
#[derive(Debug, Default)]
pub struct Shadows {
    running: Mutex<BTreeMap<String, Running>>,
}

/// The supervisor's key of a workload's shadow generation.
#[must_use]
pub fn shadow_key(key: &str) -> String {
    format!("{key}{SHADOW_SUFFIX}")
}

/// How the supervisor runs the shadow of a workload whose live spec at the new generation is
/// `live`: its own key, cgroup and log.
#[must_use]
pub fn shadow_spec(config: &Config, q: Quadrant, live: &workloads::Spec) -> workloads::Spec {
    let name = format!("{}{SHADOW_SUFFIX}", live.workload);
    let mut spec = live.clone();
    spec.key = shadow_key(&live.key);
    // Its own groups, also the v1 ones of a hybrid host: the shadow's limits are its own. It
    // runs in the live generation's instance (namespace and instance cgroup).
    spec.cgroup = live
        .cgroup
        .parent()
        .map_or_else(|| config.cgroup_dir(q), std::path::Path::to_path_buf)
        .join(&name);
    spec.workload.clone_from(&name);
    spec.log = live.log.with_file_name(format!("{}-{name}.log", q.name()));
    spec
}

fn read_cpu_usec(config: &Config, q: Quadrant, cgroup: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(config.cgroup_dir(q).join(cgroup).join("cpu.stat")).ok()?;
    crate::slo::cpu_usage_usec(&stat)
}

fn read_memory(config: &Config, q: Quadrant, cgroup: &str) -> Option<u64> {
    workloads::memory_bytes(
        &config.cgroup_dir(q).join(cgroup),
        &config.instance,
        q.name(),
        cgroup,
    )
}

/// What the lanes to `services` of `q` counted beyond `base`.
fn grown(
    now: &BTreeMap<(Quadrant, String), SliTotals>,
    base: &BTreeMap<(Quadrant, String), SliTotals>,
    q: Quadrant,
    services: &[String],
) -> SliTotals {
    let mut out = SliTotals::default();
    for s in services {
        let key = (q, s.clone());
        let (Some(n), b) = (now.get(&key), base.get(&key).copied().unwrap_or_default()) else {
            continue;
        };
        out.requests += n.requests.saturating_sub(b.requests);
        out.failed += n.failed.saturating_sub(b.failed);
        for (i, c) in out.latency.iter_mut().enumerate() {
            *c += n.latency[i].saturating_sub(b.latency[i]);
        }
    }
    out
}

/// The p99 of `latency` (bucket counts), ms: the upper bound of the bucket holding it.
#[must_use]
pub fn p99_ms(latency: &[u64; LATENCY_BUCKETS]) -> Option<f64> {
    let total: u64 = latency.iter().sum();
    if total == 0 {
        return None;
    }
    // The smallest bucket with at least 99 % of the answered requests at or below it.
    let need = total - total / 100;
    let mut seen = 0;
    for (i, c) in latency.iter().enumerate() {
        seen += c;
        if seen >= need {
            #[expect(clippy::cast_precision_loss, reason = "ns below 2^52")]
            return Some(latency_bucket_upper_ns(i) as f64 / 1e6);
        }
    }
    None
}

fn figures(
    generation: Option<u64>,
    totals: &SliTotals,
    cpu_usec: u64,
    memory: Option<u64>,
) -> GenerationFigures {
    GenerationFigures {
        generation,
        requests: totals.requests,
        failed: totals.failed,
        p99_ms: p99_ms(&totals.latency),
        #[expect(clippy::cast_precision_loss, reason = "µs below 2^52")]
        cpu_seconds: cpu_usec as f64 / 1e6,
        cpu_seconds_per_1000: crate::slo::per_thousand(cpu_usec, totals.requests),
        memory_bytes: memory,
    }
}

/// Compares the shadow with the live generation: enough mirrored requests, then failures,
/// p99 latency and CPU time per 1,000 requests each within `cfg.tolerance`.
#[must_use]
pub fn judge(
    live: &GenerationFigures,
    shadow: &GenerationFigures,
    cfg: &ShadowsConfig,
) -> (Verdict, Vec<String>) {
    if shadow.requests < cfg.min_requests {
        return (
            Verdict::InsufficientData,
            vec![format!(
                "{} of {} mirrored requests needed so far",
                shadow.requests, cfg.min_requests
            )],
        );
    }
    let tol = cfg.tolerance;
    let mut findings = Vec::new();
    let mut worse = false;
    #[expect(clippy::cast_precision_loss, reason = "counts below 2^52")]
    let ratio = |f: &GenerationFigures| {
        if f.requests == 0 {
            0.0
        } else {
            f.failed as f64 / f.requests as f64
        }
    };
    let (lf, sf) = (ratio(live), ratio(shadow));
    let bad = sf > lf + tol / 100.0;
    worse |= bad;
    findings.push(format!(
        "failures: shadow {:.2} %, live {:.2} % ({})",
        sf * 100.0,
        lf * 100.0,
        if bad { "worse" } else { "within tolerance" }
    ));
    let mut compare = |what: &str, unit: &str, l: Option<f64>, s: Option<f64>| match (l, s) {
        (Some(l), Some(s)) => {
            let bad = s > l * (1.0 + tol);
            worse |= bad;
            findings.push(format!(
                "{what}: shadow {s:.4} {unit}, live {l:.4} {unit} ({})",
                if bad { "worse" } else { "within tolerance" }
            ));
        }
        _ => findings.push(format!("{what}: not measured for both")),
    };
    compare("p99 latency", "ms", live.p99_ms, shadow.p99_ms);
    compare(
        "CPU per 1,000 requests",
        "s",
        live.cpu_seconds_per_1000,
        shadow.cpu_seconds_per_1000,
    );
    (
        if worse {
            Verdict::Reject
        } else {
            Verdict::Promote
        },
        findings,
    )
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Shadows {
    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The generation workload `key` runs as a shadow, if any.
    #[must_use]
    pub fn generation_of(&self, key: &str) -> Option<u64> {
        self.running().get(key).map(|r| r.promotion.spec.generation)
    }

    /// Why a new generation of workload `key` (running `live_generation`) should start as a
    /// shadow: asked for, or a cost SLO of a service it offers near its limit. `None`: it
    /// replaces the live one.
    #[must_use]
    pub fn reason(
        agent: &Agent,
        key: &str,
        q: Quadrant,
        workload: &str,
        asked: bool,
    ) -> Option<String> {
        if asked {
            return Some("asked for (--shadow)".into());
        }
        agent
            .supervisor
            .get(key)
            .ok()
            .filter(|s| s.state != "stopped")?;
        let now = crate::breakers::monotonic_ns();
        agent.broker.services_of(q, workload).iter().find_map(|s| {
            agent
                .slo
                .cost_near_limit(now, q, s, agent.config.shadows.approach)
        })
    }

    /// Starts generation `promotion.spec.generation` of `key` as a shadow: the broker learns
    /// it (its processes may offer services; lanes to them mirror), then its process starts.
    ///
    /// # Errors
    /// No live generation, a shadow already running, or the process does not start (the
    /// broker then forgets it again).
    pub async fn start(
        &self,
        agent: &Arc<Agent>,
        q: Quadrant,
        workload: &str,
        reason: String,
        promotion: Promotion,
    ) -> Result<workloads::Status, ShadowError> {
        let key = promotion.spec.key.clone();
        let live = agent
            .supervisor
            .get(&key)
            .ok()
            .filter(|s| s.state != "stopped")
            .ok_or_else(|| ShadowError::NoLive(key.clone()))?;
        if let Some(generation) = self.generation_of(&key) {
            return Err(ShadowError::Busy { key, generation });
        }
        let config = &agent.config;
        let fraction_ppm = config.shadows.fraction_ppm();
        let spec = shadow_spec(config, q, &promotion.spec);
        let baseline = Baseline::read(agent, q, workload, agent.broker.shadow_totals());
        agent.broker.set_shadow(q, workload, Some(fraction_ppm));
        if let Err(e) = agent.supervisor.start(spec.clone()).await {
            agent.broker.set_shadow(q, workload, None);
            return Err(e.into());
        }
        let generation = promotion.spec.generation;
        self.running().insert(
            key.clone(),
            Running {
                quadrant: q,
                workload: workload.to_owned(),
                live_generation: Some(live.generation),
                reason: reason.clone(),
                fraction_ppm,
                started_at_ms: unix_ms(),
                started: Instant::now(),
                promotion,
                baseline,
            },
        );
        let fraction = f64::from(fraction_ppm) / 1e6;
        agent
            .events
            .emit(|seq, at_ms| crate::events::Event::ShadowStarted {
                seq,
                at_ms,
                workload: key.clone(),
                generation,
                live_generation: live.generation,
                fraction_ppm,
                reason: reason.clone(),
            });
        let record = serde_json::json!({
            "action": "start", "workload": key, "generation": generation,
            "live_generation": live.generation, "fraction": fraction, "reason": reason,
        });
        if let Err(e) = agent.admission.record("shadow", record) {
            tracing::warn!(error = %e, "shadow start not audited");
        }
        Ok(agent.supervisor.get(&spec.key)?)
    }

    /// Moves the baseline of every shadow that has not been sent a mirrored request yet to
    /// now (the agent's SLO sampler calls this).
    pub fn observe(&self, agent: &Agent) {
        let mut running = self.running();
        if running.is_empty() {
            return;
        }
        let shadow_now = agent.broker.shadow_totals();
        for r in running.values_mut() {
            let services = agent.broker.services_of(r.quadrant, &r.workload);
            if grown(&shadow_now, &r.baseline.shadow, r.quadrant, &services).requests == 0 {
                r.baseline = Baseline::read(agent, r.quadrant, &r.workload, shadow_now.clone());
            }
        }
    }

    /// `quadrant shadow`: every shadow with its figures and verdict.
    #[must_use]
    pub fn report(&self, agent: &Agent) -> ShadowsReport {
        let live_now = agent.broker.sli_totals();
        let shadow_now = agent.broker.shadow_totals();
        let running = self.running();
        ShadowsReport {
            shadows: running
                .iter()
                .map(|(key, r)| one_report(agent, key, r, &live_now, &shadow_now))
                .collect(),
        }
    }

    /// Promotes or rejects the shadow of `key`, with the figures it was decided on.
    ///
    /// # Errors
    /// No shadow of `key`, or the new live generation does not start.
    pub async fn decide(
        &self,
        agent: &Arc<Agent>,
        key: &str,
        decision: Decision,
    ) -> Result<ShadowReport, ShadowError> {
        let report = self
            .report(agent)
            .shadows
            .into_iter()
            .find(|s| s.workload == key)
            .ok_or_else(|| ShadowError::Unknown(key.to_owned()))?;
        let r = self
            .running()
            .remove(key)
            .ok_or_else(|| ShadowError::Unknown(key.to_owned()))?;
        // Mirroring stops first: the shadow's services are forgotten, then it stops.
        agent.broker.set_shadow(r.quadrant, &r.workload, None);
        let _ = agent.supervisor.stop(&shadow_key(key)).await;
        if decision == Decision::Promoted {
            let Promotion {
                spec,
                lanes,
                slos,
                breaker,
            } = r.promotion;
            agent
                .broker
                .set_declared(r.quadrant, &r.workload, Some(lanes));
            agent.supervisor.start(spec).await?;
            if let Err(e) = agent.set_workload_slos(key, slos) {
                tracing::warn!(error = %e, workload = key, "the promoted plan's SLOs are not kept");
            }
            if let Err(e) = agent.broker.set_plan_breaker(key, breaker) {
                tracing::warn!(error = %e, workload = key, "the promoted plan's breaker thresholds are not kept");
            }
        }
        let generation = report.shadow.generation.unwrap_or_default();
        agent
            .events
            .emit(|seq, at_ms| crate::events::Event::ShadowDecided {
                seq,
                at_ms,
                workload: key.to_owned(),
                generation,
                decision,
                verdict: report.verdict,
            });
        let record = serde_json::json!({
            "action": decision, "workload": key, "generation": generation,
            "verdict": report.verdict, "findings": report.findings,
            "live": report.live, "shadow": report.shadow,
        });
        if let Err(e) = agent.admission.record("shadow", record) {
            tracing::warn!(error = %e, "shadow decision not audited");
        }
        Ok(report)
    }
}

fn one_report(
    agent: &Agent,
    key: &str,
    r: &Running,
    live_now: &BTreeMap<(Quadrant, String), SliTotals>,
    shadow_now: &BTreeMap<(Quadrant, String), SliTotals>,
) -> ShadowReport {
    let config = &agent.config;
    let q = r.quadrant;
    let services = agent.broker.services_of(q, &r.workload);
    let shadow_cgroup = format!("{}{SHADOW_SUFFIX}", r.workload);
    let live_cpu = read_cpu_usec(config, q, &r.workload)
        .map_or(0, |c| c.saturating_sub(r.baseline.live_cpu_usec));
    let live = figures(
        r.live_generation,
        &grown(live_now, &r.baseline.live, q, &services),
        live_cpu,
        read_memory(config, q, &r.workload),
    );
    let shadow_cpu = read_cpu_usec(config, q, &shadow_cgroup)
        .map_or(0, |c| c.saturating_sub(r.baseline.shadow_cpu_usec));
    let shadow = figures(
        Some(r.promotion.spec.generation),
        &grown(shadow_now, &r.baseline.shadow, q, &services),
        shadow_cpu,
        read_memory(config, q, &shadow_cgroup),
    );
    let (verdict, findings) = judge(&live, &shadow, &config.shadows);
    ShadowReport {
        workload: key.to_owned(),
        reason: r.reason.clone(),
        fraction: f64::from(r.fraction_ppm) / 1e6,
        started_at_ms: r.started_at_ms,
        age_secs: r.started.elapsed().as_secs(),
        services,
        live,
        shadow,
        verdict,
        findings,
    }
}

/// The text form of `quadrant shadow`.
#[must_use]
pub fn render(r: &ShadowsReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if r.shadows.is_empty() {
        out.push_str("no shadow generations\n");
    }
    let opt =
        |v: Option<f64>, unit: &str| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4} {unit}"));
    for s in &r.shadows {
        let _ = writeln!(
            out,
            "{}: generation {} shadows generation {}, {:.1} % of requests to {} mirrored, {} s ({})",
            s.workload,
            s.shadow.generation.unwrap_or_default(),
            s.live
                .generation
                .map_or_else(|| "-".into(), |g| g.to_string()),
            s.fraction * 100.0,
            if s.services.is_empty() {
                "(no service yet)".to_owned()
            } else {
                s.services.join(", ")
            },
            s.age_secs,
            s.reason
        );
        for (name, f) in [("live", &s.live), ("shadow", &s.shadow)] {
            let _ = writeln!(
                out,
                "  {name:<6} requests {}, failed {}, p99 {}, CPU {:.3} s ({} per 1,000), memory {}",
                f.requests,
                f.failed,
                opt(f.p99_ms, "ms"),
                f.cpu_seconds,
                opt(f.cpu_seconds_per_1000, "s"),
                f.memory_bytes
                    .map_or_else(|| "-".to_owned(), |m| format!("{} KiB", m / 1024))
            );
        }
        let _ = writeln!(out, "  verdict: {:?}", s.verdict);
        for f in &s.findings {
            let _ = writeln!(out, "    {f}");
        }
    }
    out
}

#[cfg(test)]
mod tests;
