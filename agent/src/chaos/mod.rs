//! The chaos controller's faults in the dataplane (`quadrant chaos`): written straight into the
//! pinned `CHAOS_FAULTS` map by the controller's own process — not the agent, which may be one
//! of the things an experiment kills — each with an expiry the programs check against the kernel
//! clock, so a fault ends on time whoever dies (`dataplane_common::chaos`).
//!
//! Blast radius: a fault names its source and destination identities; one that can touch a
//! production quadrant (PX, PG, or `any`) needs `allow_production`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData};
use dataplane_common::{
    Identity, Quadrant,
    chaos::{
        ANY, CHAOS_ARMED, CHAOS_FAULTS, CHAOS_FAULTS_MAX, FLAG_RESET, Fault, FaultKey, PPM,
        SCOPE_CONNECT, SCOPE_PACKET,
    },
};
use serde::{Deserialize, Serialize};

use crate::{breakers::monotonic_ns, config::Config};

pub mod agent;
mod experiment;
pub mod freeze;
pub mod lane_probe;
pub mod lanes;
pub mod outage;
pub mod pressure;
pub mod rollback;
pub mod run;

pub use experiment::{Experiment, MethodFault, Safeguards, SteadyState, Windows};

/// The longest a fault may last.
pub const MAX_DURATION: Duration = Duration::from_hours(1);
/// The longest delay (the `fq` qdisc drops packets scheduled beyond its 10 s horizon).
pub const MAX_DELAY_MS: u32 = 5_000;

/// What a fault does.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Drop packets delivered into the destination quadrant (a share with `percent`).
    Drop,
    /// Delay packets delivered into the destination quadrant.
    Delay,
    /// Refuse `connect`/`sendmsg` with `ECONNREFUSED` (a share with `percent`).
    Refuse,
    /// Reset TCP connections into the destination quadrant: a segment of an established
    /// connection is delivered with RST set (a share of the segments with `percent`).
    Reset,
    /// Freeze every process of the destination quadrant (`cgroup.freeze`), thawed at the
    /// expiry by a guardian process.
    Freeze,
    /// Kill every process of the destination quadrant (`cgroup.kill`) once; the agent restarts
    /// its workloads as their plans' restart policies say.
    Kill,
    /// Cap the destination quadrant's CPU at `percent` of one CPU and spin inside it.
    CpuPressure,
    /// Leave the destination quadrant `headroom_mib` of memory above its use and fill it: the
    /// quadrant runs out of memory (the stressor is the OOM killer's victim) until the expiry.
    MemoryPressure,
    /// Leave the destination quadrant `headroom_pids` processes above its count and take them:
    /// its forks are refused until the expiry.
    PidsPressure,
    /// Kill the agent with SIGKILL (`to: agent`), as a crash would: the dataplane goes on
    /// enforcing and the next agent takes it over; the controller starts that agent itself
    /// unless `restart_agent` is false (where a service manager restarts it).
    KillAgent,
    /// The destination quadrant's Workload API answers `Unavailable` and ends its open streams
    /// until the expiry (the agent keeps the outage); SVIDs already fetched stay valid.
    IdentityOutage,
    /// Take every lane the destination quadrant may open (`max_lanes`) until the expiry: its
    /// workloads' lane opens are refused for the limit.
    LaneExhaustion,
    /// The policy engine unavailable to the destination quadrant until the expiry: every lane
    /// decision involving it fails closed (the kernel goes on enforcing the last policy).
    PolicyOutage,
}

/// One fault, as asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// What it does.
    pub action: Action,
    /// Source identity (dx, dg, px, pg, host, world) or `any`; for `refuse`, the calling
    /// quadrant.
    pub from: String,
    /// Destination: the quadrant delivered into (or `any`); for `refuse`, any identity.
    pub to: String,
    /// Share of the matched traffic dropped or refused, in percent (0 < p ≤ 100).
    #[serde(default = "all")]
    pub percent: f64,
    /// Added delay, ms (`delay`).
    #[serde(default)]
    pub delay_ms: u32,
    /// Uniform jitter around the delay, ms (`delay`).
    #[serde(default)]
    pub jitter_ms: u32,
    /// Both directions: also from `to` to `from` (a partition).
    #[serde(default)]
    pub both_ways: bool,
    /// How long it lasts, seconds.
    pub seconds: u64,
    /// Memory left to the quadrant above its use, MiB (`memory_pressure`).
    #[serde(default = "default_headroom_mib")]
    pub headroom_mib: u32,
    /// Processes left to the quadrant above its count (`pids_pressure`).
    #[serde(default = "default_headroom_pids")]
    pub headroom_pids: u32,
    /// Whether the controller starts the next agent after `kill_agent`.
    #[serde(default = "yes")]
    pub restart_agent: bool,
    /// `freeze`/`kill`: only this workload of the quadrant (its cgroup), not every process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

pub(crate) fn yes() -> bool {
    true
}

fn all() -> f64 {
    100.0
}

/// The default memory headroom of a `memory_pressure`, MiB.
pub const DEFAULT_HEADROOM_MIB: u32 = 32;
/// The default process headroom of a `pids_pressure`.
pub const DEFAULT_HEADROOM_PIDS: u32 = 16;
/// The most memory headroom, MiB.
pub const MAX_HEADROOM_MIB: u32 = 4096;
/// The most process headroom.
pub const MAX_HEADROOM_PIDS: u32 = 4096;

pub(crate) fn default_headroom_mib() -> u32 {
    DEFAULT_HEADROOM_MIB
}

pub(crate) fn default_headroom_pids() -> u32 {
    DEFAULT_HEADROOM_PIDS
}

impl Action {
    /// Its name in files and on the command line.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Delay => "delay",
            Self::Refuse => "refuse",
            Self::Reset => "reset",
            Self::Freeze => "freeze",
            Self::Kill => "kill",
            Self::CpuPressure => "cpu_pressure",
            Self::MemoryPressure => "memory_pressure",
            Self::PidsPressure => "pids_pressure",
            Self::KillAgent => "kill_agent",
            Self::IdentityOutage => "identity_outage",
            Self::LaneExhaustion => "lane_exhaustion",
            Self::PolicyOutage => "policy_outage",
        }
    }
}

/// A fault, as `quadrant chaos status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FaultStatus {
    /// What it does.
    pub action: Action,
    /// Source identity or `any`.
    pub from: String,
    /// Destination identity or `any`.
    pub to: String,
    /// Drop or refusal share, percent.
    pub percent: f64,
    /// Delay and jitter, ms.
    pub delay_ms: f64,
    /// Jitter, ms.
    pub jitter_ms: f64,
    /// Milliseconds left (0: ended, waiting to be removed).
    pub left_ms: u64,
    /// When it ends, `CLOCK_MONOTONIC` ns (the programs' clock).
    pub expires_ns: u64,
    /// Packets or operations it matched while live; for a resource pressure, its effect:
    /// throttled periods, OOM kills or refused forks in the quadrant.
    pub matched: u64,
    /// Of those, dropped, refused or reset.
    pub dropped: u64,
}

/// Why a fault cannot be armed, or the maps cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// The fault is not valid; the message names the field and the limit.
    #[error("invalid fault: {0}")]
    Invalid(String),
    /// The experiment is not valid; the message names the field and the limit.
    #[error("invalid experiment: {0}")]
    Experiment(String),
    /// The pinned maps (is the agent's dataplane up?).
    #[error("chaos map {name} at {path}: {reason}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Its pin.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A command the controller runs (`ip`, `tc`).
    #[error("{0}")]
    Sys(String),
}

/// An identity by name, or [`ANY`].
fn identity(field: &str, name: &str) -> Result<u8, ChaosError> {
    if name == "any" {
        return Ok(ANY);
    }
    Identity::from_name(name).map(|i| i as u8).ok_or_else(|| {
        ChaosError::Invalid(format!(
            "{field}: {name:?} is not dx, dg, px, pg, host, world or any"
        ))
    })
}

fn name_of(id: u8) -> String {
    if id == ANY {
        return "any".into();
    }
    Identity::ALL
        .iter()
        .find(|i| **i as u8 == id)
        .map_or_else(|| format!("identity {id}"), |i| i.name().to_owned())
}

fn is_production(id: u8) -> bool {
    id == ANY || id == Identity::Px as u8 || id == Identity::Pg as u8
}

impl FaultSpec {
    /// A fault on one quadrant's processes or services: from `any`, to one quadrant (a
    /// production one only with `allow_production`), for 1 s to an hour, with no delay and
    /// not both ways.
    fn check_one_quadrant(&self, allow_production: bool, dst: u8) -> Result<(), ChaosError> {
        let invalid = |m: String| Err(ChaosError::Invalid(m));
        if self.from != "any" || usize::from(dst) >= Quadrant::ALL.len() {
            return invalid(format!(
                "{}: from any, to one quadrant (not {} -> {})",
                self.action.name(),
                self.from,
                self.to
            ));
        }
        if !allow_production && is_production(dst) {
            return invalid(format!(
                "{} is a production quadrant: name it explicitly with --allow-production",
                self.to
            ));
        }
        if self.seconds == 0 || self.seconds > MAX_DURATION.as_secs() {
            return invalid(format!(
                "seconds: {} is outside 1..={}",
                self.seconds,
                MAX_DURATION.as_secs()
            ));
        }
        if self.both_ways || self.delay_ms != 0 || self.jitter_ms != 0 {
            return invalid(format!(
                "{}: takes no delay or both_ways",
                self.action.name()
            ));
        }
        Ok(())
    }

    /// A freeze, kill or outage: one quadrant (a freeze or kill maybe one workload of it), all
    /// of it.
    fn check_freeze(&self, allow_production: bool, dst: u8) -> Result<(), ChaosError> {
        self.check_one_quadrant(allow_production, dst)?;
        if self.percent < 100.0 {
            return Err(ChaosError::Invalid(format!(
                "{}: takes no percent",
                self.action.name()
            )));
        }
        if let Some(w) = &self.workload
            && !crate::identity::attest::valid_workload_name(w)
        {
            return Err(ChaosError::Invalid(format!(
                "workload: {w:?} is not a workload name (1-64 characters of a-z, 0-9, '-', '_', \
                 '.')"
            )));
        }
        Ok(())
    }

    /// A pressure names one quadrant, from `any`, with its amount within the limits.
    fn check_pressure(&self, allow_production: bool, dst: u8) -> Result<(), ChaosError> {
        let invalid = |m: String| Err(ChaosError::Invalid(m));
        self.check_one_quadrant(allow_production, dst)?;
        match self.action {
            Action::CpuPressure if !(self.percent > 0.0 && self.percent <= 100.0) => invalid(
                format!("percent: {} is outside (0, 100] (of one CPU)", self.percent),
            ),
            Action::MemoryPressure if !(1..=MAX_HEADROOM_MIB).contains(&self.headroom_mib) => {
                invalid(format!(
                    "headroom_mib: {} is outside 1..={MAX_HEADROOM_MIB}",
                    self.headroom_mib
                ))
            }
            Action::PidsPressure if !(1..=MAX_HEADROOM_PIDS).contains(&self.headroom_pids) => {
                invalid(format!(
                    "headroom_pids: {} is outside 1..={MAX_HEADROOM_PIDS}",
                    self.headroom_pids
                ))
            }
            Action::MemoryPressure | Action::PidsPressure if self.percent < 100.0 => invalid(
                format!("{:?}: takes no percent (it has a headroom)", self.action),
            ),
            _ => Ok(()),
        }
    }

    /// `kill_agent`: from any, to `agent`; it reaches every quadrant's control plane, so it
    /// needs `allow_production`.
    fn check_kill_agent(&self, allow_production: bool) -> Result<(), ChaosError> {
        let invalid = |m: String| Err(ChaosError::Invalid(m));
        if self.from != "any" || self.to != "agent" {
            return invalid(format!(
                "kill_agent: from any, to agent (not {} -> {})",
                self.from, self.to
            ));
        }
        if !allow_production {
            return invalid(
                "kill_agent stops the control plane of every quadrant, production too: name it \
                 explicitly with --allow-production"
                    .into(),
            );
        }
        if self.both_ways || self.delay_ms != 0 || self.jitter_ms != 0 || self.percent < 100.0 {
            return invalid("kill_agent: takes no percent, delay or both_ways".into());
        }
        Ok(())
    }

    /// The quadrant and resource a pressure names.
    #[must_use]
    pub fn pressed(&self) -> Option<(Quadrant, pressure::Resource)> {
        Some((
            Quadrant::from_name(&self.to)?,
            pressure::Resource::of(self.action)?,
        ))
    }

    /// How hard a pressure presses.
    #[must_use]
    pub fn amount(&self) -> pressure::Amount {
        pressure::Amount {
            cpu_percent: self.percent,
            headroom_mib: self.headroom_mib,
            headroom_pids: self.headroom_pids,
        }
    }

    /// The quadrant whose Workload API an `identity_outage` takes away.
    #[must_use]
    pub fn identity_outage_of(&self) -> Option<Quadrant> {
        (self.action == Action::IdentityOutage)
            .then(|| Quadrant::from_name(&self.to))
            .flatten()
    }

    /// The quadrant whose policy engine a `policy_outage` takes away.
    #[must_use]
    pub fn policy_outage_of(&self) -> Option<Quadrant> {
        (self.action == Action::PolicyOutage)
            .then(|| Quadrant::from_name(&self.to))
            .flatten()
    }

    /// The quadrant whose lanes a `lane_exhaustion` takes.
    #[must_use]
    pub fn lanes_exhausted_of(&self) -> Option<Quadrant> {
        (self.action == Action::LaneExhaustion)
            .then(|| Quadrant::from_name(&self.to))
            .flatten()
    }

    fn target(&self) -> Option<freeze::Target> {
        Some(freeze::Target {
            quadrant: Quadrant::from_name(&self.to)?,
            workload: self.workload.clone(),
        })
    }

    /// What a kill takes: a quadrant, or one of its workloads.
    #[must_use]
    pub fn killed(&self) -> Option<freeze::Target> {
        (self.action == Action::Kill)
            .then(|| self.target())
            .flatten()
    }

    /// What a freeze takes: a quadrant, or one of its workloads.
    #[must_use]
    pub fn frozen(&self) -> Option<freeze::Target> {
        (self.action == Action::Freeze)
            .then(|| self.target())
            .flatten()
    }

    /// The drop share (ppm), delay and jitter (µs) of a fault in the map; `None` for a fault
    /// on processes.
    fn shape(&self) -> Result<Option<(u32, u32, u32)>, ChaosError> {
        Ok(Some(match self.action {
            Action::Delay => {
                if self.delay_ms == 0 && self.jitter_ms == 0 {
                    return Err(ChaosError::Invalid(
                        "delay_ms: a delay fault needs a delay or a jitter".into(),
                    ));
                }
                if self.delay_ms > MAX_DELAY_MS || self.jitter_ms > self.delay_ms.max(1) {
                    return Err(ChaosError::Invalid(format!(
                        "delay_ms/jitter_ms: {} ± {} ms; the delay is at most {MAX_DELAY_MS} ms \
                         and the jitter at most the delay",
                        self.delay_ms, self.jitter_ms
                    )));
                }
                (0, self.delay_ms * 1000, self.jitter_ms * 1000)
            }
            Action::Freeze
            | Action::Kill
            | Action::CpuPressure
            | Action::MemoryPressure
            | Action::PidsPressure
            | Action::KillAgent
            | Action::IdentityOutage
            | Action::LaneExhaustion
            | Action::PolicyOutage => return Ok(None),
            Action::Drop | Action::Refuse | Action::Reset => {
                if self.delay_ms != 0 || self.jitter_ms != 0 {
                    return Err(ChaosError::Invalid(
                        "delay_ms: only a delay fault delays".into(),
                    ));
                }
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "0 < percent <= 100"
                )]
                let ppm = (self.percent * f64::from(PPM) / 100.0).round() as u32;
                (ppm.max(1), 0, 0)
            }
        }))
    }

    /// The map entries of this fault (two for `both_ways`), checked against the limits and the
    /// blast-radius rule.
    ///
    /// # Errors
    /// The first field out of its limits, or a production quadrant without `allow_production`.
    pub fn entries(
        &self,
        allow_production: bool,
        now_ns: u64,
    ) -> Result<Vec<(FaultKey, Fault)>, ChaosError> {
        let invalid = |m: String| Err(ChaosError::Invalid(m));
        if self.workload.is_some() && !matches!(self.action, Action::Freeze | Action::Kill) {
            return invalid(format!(
                "workload: only freeze and kill take one, not {}",
                self.action.name()
            ));
        }
        if self.action == Action::KillAgent {
            self.check_kill_agent(allow_production)?;
            return Ok(Vec::new());
        }
        let (src, dst) = (identity("from", &self.from)?, identity("to", &self.to)?);
        if matches!(
            self.action,
            Action::Freeze
                | Action::Kill
                | Action::IdentityOutage
                | Action::LaneExhaustion
                | Action::PolicyOutage
        ) {
            self.check_freeze(allow_production, dst)?;
            return Ok(Vec::new());
        }
        if pressure::Resource::of(self.action).is_some() {
            self.check_pressure(allow_production, dst)?;
            return Ok(Vec::new());
        }
        let scope = if self.action == Action::Refuse {
            SCOPE_CONNECT
        } else {
            SCOPE_PACKET
        };
        let quadrant_or_any = |id: u8| id == ANY || usize::from(id) < Quadrant::ALL.len();
        if scope == SCOPE_PACKET && !quadrant_or_any(dst) {
            return invalid(format!(
                "to: {} — packet faults act on packets delivered into a quadrant; name one or any",
                self.to
            ));
        }
        if scope == SCOPE_CONNECT && !quadrant_or_any(src) {
            return invalid(format!(
                "from: {} — refuse acts on the connects of a quadrant's processes; name one or any",
                self.from
            ));
        }
        if self.both_ways && !(quadrant_or_any(src) && quadrant_or_any(dst)) {
            return invalid("both_ways: needs quadrants (or any) on both sides".into());
        }
        if !allow_production && (is_production(src) || is_production(dst)) {
            return invalid(format!(
                "{} -> {} can reach a production quadrant (px, pg; any includes them): name it \
                 explicitly with --allow-production",
                self.from, self.to
            ));
        }
        if !(self.percent > 0.0 && self.percent <= 100.0) {
            return invalid(format!("percent: {} is outside (0, 100]", self.percent));
        }
        if self.seconds == 0 || self.seconds > MAX_DURATION.as_secs() {
            return invalid(format!(
                "seconds: {} is outside 1..={}",
                self.seconds,
                MAX_DURATION.as_secs()
            ));
        }
        let Some((drop_ppm, delay_us, jitter_us)) = self.shape()? else {
            return Ok(Vec::new());
        };
        let fault = Fault {
            expires_ns: now_ns + self.seconds * 1_000_000_000,
            matched: 0,
            dropped: 0,
            drop_ppm,
            delay_us,
            jitter_us,
            flags: if self.action == Action::Reset {
                FLAG_RESET
            } else {
                0
            },
        };
        let key = |src, dst| FaultKey {
            src,
            dst,
            scope,
            pad: 0,
        };
        let mut out = vec![(key(src, dst), fault)];
        if self.both_ways && src != dst {
            out.push((key(dst, src), fault));
        }
        Ok(out)
    }
}

/// The pinned chaos maps of an agent's dataplane.
#[expect(
    missing_debug_implementations,
    reason = "aya's map handles implement no Debug"
)]
pub struct Faults {
    armed: Array<MapData, u64>,
    faults: HashMap<MapData, FaultKey, Fault>,
}

impl Faults {
    /// Opens the maps pinned under `pins` (`<bpffs>/<instance>`).
    ///
    /// # Errors
    /// When a map is not pinned there (no dataplane up) or has another shape.
    pub fn open(pins: &Path) -> Result<Self, ChaosError> {
        let open = |name: &'static str| {
            let path = pins.join("maps").join(name);
            MapData::from_pin(&path).map_err(|e| ChaosError::Map {
                name,
                path: path.clone(),
                reason: format!("{e} (is the agent's dataplane up, with map layout 10 or later?)"),
            })
        };
        let shape = |name: &'static str, e: aya::maps::MapError| ChaosError::Map {
            name,
            path: pins.join("maps").join(name),
            reason: e.to_string(),
        };
        Ok(Self {
            armed: Array::try_from(Map::Array(open(CHAOS_ARMED)?))
                .map_err(|e| shape(CHAOS_ARMED, e))?,
            faults: HashMap::try_from(Map::HashMap(open(CHAOS_FAULTS)?))
                .map_err(|e| shape(CHAOS_FAULTS, e))?,
        })
    }

    fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> ChaosError {
        move |e| ChaosError::Map {
            name,
            path: PathBuf::new(),
            reason: e.to_string(),
        }
    }

    /// Writes `entries` (after removing ended faults) and moves the armed horizon to the latest
    /// expiry: the programs start matching at once.
    ///
    /// # Errors
    /// When the map would hold more than its capacity, or a write fails.
    pub fn arm(&mut self, entries: &[(FaultKey, Fault)], now_ns: u64) -> Result<(), ChaosError> {
        let ended: Vec<FaultKey> = self
            .faults
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, f)| f.expires_ns <= now_ns)
            .map(|(k, _)| k)
            .collect();
        for k in ended {
            let _ = self.faults.remove(&k);
        }
        let live: Vec<FaultKey> = self.faults.keys().filter_map(Result::ok).collect();
        let new = entries.iter().filter(|(k, _)| !live.contains(k)).count();
        if live.len() + new > CHAOS_FAULTS_MAX as usize {
            return Err(ChaosError::Invalid(format!(
                "{} faults live and {new} more; at most {CHAOS_FAULTS_MAX}",
                live.len()
            )));
        }
        let until = entries.iter().map(|(_, f)| f.expires_ns).max().unwrap_or(0);
        // The horizon first: a fault written before it would be skipped for an instant only.
        let was = self.armed.get(&0, 0).unwrap_or(0);
        self.armed
            .set(0, was.max(until), 0)
            .map_err(Self::map_err(CHAOS_ARMED))?;
        for (k, f) in entries {
            self.faults
                .insert(k, f, 0)
                .map_err(Self::map_err(CHAOS_FAULTS))?;
        }
        Ok(())
    }

    /// Every fault in the map at monotonic time `now_ns`.
    #[must_use]
    pub fn status(&self, now_ns: u64) -> Vec<FaultStatus> {
        let mut out: Vec<FaultStatus> = self
            .faults
            .iter()
            .filter_map(Result::ok)
            .map(|(k, f)| FaultStatus {
                action: match (k.scope, f.delay_us, f.jitter_us) {
                    (SCOPE_CONNECT, ..) => Action::Refuse,
                    _ if f.flags & FLAG_RESET != 0 => Action::Reset,
                    (_, 0, 0) => Action::Drop,
                    _ => Action::Delay,
                },
                from: name_of(k.src),
                to: name_of(k.dst),
                percent: f64::from(f.drop_ppm) * 100.0 / f64::from(PPM),
                delay_ms: f64::from(f.delay_us) / 1000.0,
                jitter_ms: f64::from(f.jitter_us) / 1000.0,
                left_ms: f.expires_ns.saturating_sub(now_ns) / 1_000_000,
                expires_ns: f.expires_ns,
                matched: f.matched,
                dropped: f.dropped,
            })
            .collect();
        out.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
        out
    }

    /// The armed horizon: the latest expiry of any fault written (0: none since the last
    /// disarm).
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn armed_until(&self) -> Result<u64, ChaosError> {
        self.armed.get(&0, 0).map_err(Self::map_err(CHAOS_ARMED))
    }

    /// Removes one fault (gone already is fine).
    ///
    /// # Errors
    /// When the map refuses for another reason.
    pub fn remove(&mut self, key: &FaultKey) -> Result<(), ChaosError> {
        match self.faults.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(Self::map_err(CHAOS_FAULTS)(e)),
        }
    }

    /// Removes every fault and disarms; returns how many were removed.
    ///
    /// # Errors
    /// When a map update fails.
    pub fn recover(&mut self) -> Result<usize, ChaosError> {
        self.armed
            .set(0, 0, 0)
            .map_err(Self::map_err(CHAOS_ARMED))?;
        let keys: Vec<FaultKey> = self.faults.keys().filter_map(Result::ok).collect();
        for k in &keys {
            self.faults.remove(k).map_err(Self::map_err(CHAOS_FAULTS))?;
        }
        Ok(keys.len())
    }
}

/// The host-side veths of the quadrants `dst` names (every instance), from the host's links.
fn veths(config: &Config, dst: u8) -> Result<Vec<String>, ChaosError> {
    let links =
        crate::sys::ip(&["-o", "link", "show"]).map_err(|e| ChaosError::Sys(e.to_string()))?;
    let prefix = format!("{}-", config.interface_prefix);
    Ok(links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .filter_map(|n| {
            let rest = n.strip_prefix(&prefix)?;
            let q = rest.split('-').next()?;
            let tail = &rest[q.len()..];
            let quadrant = Quadrant::from_name(q)?;
            let instance = tail.is_empty()
                || tail
                    .strip_prefix('-')
                    .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()));
            (instance && (dst == ANY || dst == quadrant as u8)).then(|| n.to_owned())
        })
        .collect())
}

fn tc(args: &[&str]) -> Result<String, ChaosError> {
    let out = std::process::Command::new("tc")
        .args(args)
        .output()
        .map_err(|e| ChaosError::Sys(format!("cannot run tc: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ChaosError::Sys(format!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Arms `spec` on the dataplane of `config`'s instance: for a delay, first an `fq` qdisc on the
/// veths it delays into (it holds each packet until the departure time the program sets).
/// Returns the entries written.
///
/// # Errors
/// An invalid fault, the maps, or `tc`.
pub fn inject(
    config: &Config,
    config_path: Option<&Path>,
    spec: &FaultSpec,
    allow_production: bool,
) -> Result<Vec<(FaultKey, Fault)>, ChaosError> {
    let now = monotonic_ns();
    let entries = spec.entries(allow_production, now)?;
    if let Some(t) = spec.frozen() {
        freeze::freeze(config, config_path, &t, spec.seconds)?;
        return Ok(entries);
    }
    if let Some(t) = spec.killed() {
        freeze::kill(config, &t)?;
        return Ok(entries);
    }
    if let Some((q, r)) = spec.pressed() {
        pressure::start(config, config_path, q, r, spec.amount(), spec.seconds)?;
        return Ok(entries);
    }
    if let Some(q) = spec.identity_outage_of() {
        identity_outage(config, q, spec.seconds * 1000)?;
        return Ok(entries);
    }
    if let Some(q) = spec.policy_outage_of() {
        policy_outage(config, q, spec.seconds * 1000)?;
        return Ok(entries);
    }
    if let Some(q) = spec.lanes_exhausted_of() {
        lanes::start((config, config_path), q, spec.seconds, true)?;
        return Ok(entries);
    }
    let mut faults = Faults::open(&config.bpffs_dir())?;
    require_reset_support(config, &entries)?;
    prepare_delay(config, spec)?;
    faults.arm(&entries, now)?;
    Ok(entries)
}

/// An outage the agent keeps (it takes the request on its control socket): `ask` is the client
/// call, `fault` the fault's name for the error. Returns what was refused during the outage it
/// replaced or ended.
fn agent_outage(
    config: &Config,
    fault: &str,
    ask: impl FnOnce(&crate::control::Client) -> Result<(u64, u64), crate::control::ClientError>,
) -> Result<u64, ChaosError> {
    ask(&crate::control::Client::new(config.socket_path()))
        .map(|(_, refused)| refused)
        .map_err(|e| {
            ChaosError::Sys(format!(
                "{fault}: the agent did not take it ({e}); it keeps the outage, so it must be \
                 running"
            ))
        })
}

/// The identity and policy outages the agent keeps; none when no agent answers (they end with
/// it).
fn agent_outages(config: &Config) -> Vec<FaultStatus> {
    if !config.socket_path().exists() {
        return Vec::new();
    }
    crate::control::Client::new(config.socket_path())
        .outages()
        .unwrap_or_else(|e| {
            tracing::debug!(error = %e, "no outages from the agent");
            Vec::new()
        })
}

/// Asks the agent for an outage of `q`'s Workload API for `millis` (0: end it); returns the
/// calls refused during the outage it replaced or ended.
///
/// # Errors
/// No agent answering, or its refusal.
pub fn identity_outage(config: &Config, q: Quadrant, millis: u64) -> Result<u64, ChaosError> {
    agent_outage(config, "identity_outage", |c| {
        c.identity_outage(q.name(), millis)
    })
}

/// Asks the agent for an outage of the policy engine for `q` for `millis` (0: end it); returns
/// the lane decisions refused during the outage it replaced or ended.
///
/// # Errors
/// No agent answering, or its refusal.
pub fn policy_outage(config: &Config, q: Quadrant, millis: u64) -> Result<u64, ChaosError> {
    agent_outage(config, "policy_outage", |c| {
        c.policy_outage(q.name(), millis)
    })
}

/// Refuses to inject when chaos is off: in the configuration the running agent records, or in
/// this one.
///
/// # Errors
/// Chaos off, naming where.
pub fn require_enabled(config: &Config) -> Result<(), ChaosError> {
    let running = crate::daemon::State::read(config)
        .ok()
        .flatten()
        .map(|s| s.config.chaos.enabled);
    let off = match running {
        Some(false) => Some("the running agent was started with `chaos.enabled: false`"),
        _ if !config.chaos.enabled => Some("this configuration has `chaos.enabled: false`"),
        _ => None,
    };
    off.map_or(Ok(()), |why| {
        Err(ChaosError::Invalid(format!(
            "chaos is off for instance {}: {why}, so its programs carry no fault checks and no \
             fault is injected (set `chaos.enabled: true` and restart the agent to allow it)",
            config.instance
        )))
    })
}

/// The map layout that reads [`Fault::flags`]: a reset fault written into an older dataplane
/// would drop instead.
const RESET_LAYOUT_SINCE: u32 = 11;

/// A reset fault only on a dataplane whose programs read its flag (map layout 11 on, as the
/// agent's state records).
///
/// # Errors
/// A reset among `entries` and an older (or unknown) running layout.
pub fn require_reset_support(
    config: &Config,
    entries: &[(FaultKey, Fault)],
) -> Result<(), ChaosError> {
    if entries.iter().all(|(_, f)| f.flags & FLAG_RESET == 0) {
        return Ok(());
    }
    let layout = crate::daemon::State::read(config)
        .ok()
        .flatten()
        .map_or(0, |s| s.map_layout);
    if layout < RESET_LAYOUT_SINCE {
        return Err(ChaosError::Invalid(format!(
            "reset: the running dataplane has map layout {layout}; resets need layout \
             {RESET_LAYOUT_SINCE} or later (take it over with this agent: `quadrant down \
             --keep-dataplane`, then `quadrant up`)"
        )));
    }
    Ok(())
}

/// For a delay, the `fq` qdisc on every veth it delays into (it holds each packet until the
/// departure time the program sets); nothing for other faults.
///
/// # Errors
/// A kernel without the fq qdisc, or `tc`.
pub fn prepare_delay(config: &Config, spec: &FaultSpec) -> Result<(), ChaosError> {
    if spec.action == Action::Delay {
        let mut dsts = vec![identity("to", &spec.to)?];
        if spec.both_ways {
            dsts.push(identity("from", &spec.from)?);
        }
        for dst in dsts {
            for dev in veths(config, dst)? {
                tc(&["qdisc", "replace", "dev", &dev, "root", "fq"]).map_err(|e| {
                    ChaosError::Sys(format!(
                        "a delay fault needs the fq qdisc, which holds each packet until the \
                         departure time the program sets, on {dev}: {e} (a kernel without \
                         CONFIG_NET_SCH_FQ cannot delay; drop and refuse faults work without it)"
                    ))
                })?;
            }
        }
    }
    Ok(())
}

/// Whether this kernel has the `fq` qdisc the delay faults need (tried on a dummy interface in
/// a network namespace of its own, removed again).
#[must_use]
pub fn fq_available() -> bool {
    let ns = format!("qfq-{}", std::process::id());
    let run = |args: &[&str]| {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let _ = run(&["ip", "netns", "add", &ns]);
    let ok = run(&["ip", "-n", &ns, "link", "add", "d0", "type", "dummy"])
        && run(&[
            "ip", "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "d0", "root", "fq",
        ]);
    let _ = run(&["ip", "netns", "del", &ns]);
    ok
}

/// `quadrant chaos status`.
///
/// # Errors
/// The maps.
pub fn status(config: &Config) -> Result<Vec<FaultStatus>, ChaosError> {
    let now = monotonic_ns();
    let mut out = Faults::open(&config.bpffs_dir())?.status(now);
    out.extend(
        freeze::frozen(config)
            .into_iter()
            .map(|(t, until)| FaultStatus {
                action: Action::Freeze,
                from: "any".into(),
                to: t.name(),
                percent: 100.0,
                delay_ms: 0.0,
                jitter_ms: 0.0,
                left_ms: until.map_or(0, |u| u.saturating_sub(now) / 1_000_000),
                expires_ns: until.unwrap_or(0),
                matched: 0,
                dropped: 0,
            }),
    );
    out.extend(pressure::leases(config).into_iter().map(|l| l.status(now)));
    out.extend(agent_outages(config));
    out.extend(
        lanes::running(config)
            .into_iter()
            .map(|(q, until)| FaultStatus {
                action: Action::LaneExhaustion,
                from: "any".into(),
                to: q.name().into(),
                percent: 100.0,
                delay_ms: 0.0,
                jitter_ms: 0.0,
                left_ms: until.saturating_sub(now) / 1_000_000,
                expires_ns: until,
                matched: 0,
                dropped: 0,
            }),
    );
    Ok(out)
}

/// `quadrant chaos recover --all`: every fault removed and the `fq` qdiscs the delays needed
/// taken off the quadrants' veths (the agent never installs one). Returns what it did.
///
/// # Errors
/// The maps or `tc`.
pub fn recover(config: &Config) -> Result<String, ChaosError> {
    // Every step is taken whatever another one found: one fault that cannot be undone leaves
    // no other in place.
    let mut failed = Vec::new();
    let removed = Faults::open(&config.bpffs_dir())
        .and_then(|mut f| f.recover())
        .unwrap_or_else(|e| {
            failed.push(format!("the dataplane's faults: {e}"));
            0
        });
    let mut thawed = 0;
    for (t, _) in freeze::frozen(config) {
        match freeze::set_frozen(config, &t, false) {
            Ok(_) => thawed += 1,
            Err(e) => failed.push(format!("thawing {}: {e}", t.name())),
        }
    }
    let mut eased = 0;
    for l in pressure::leases(config) {
        if let Some(q) = Quadrant::from_name(&l.quadrant) {
            match pressure::end(config, q, l.resource) {
                Ok(_) => eased += 1,
                Err(e) => failed.push(format!(
                    "restoring {}'s {} limits (the lease stays for the next recover): {e}",
                    l.quadrant,
                    l.resource.controller()
                )),
            }
        }
    }
    let hogs = lanes::kill_all(config);
    let mut outages = 0;
    for o in agent_outages(config) {
        let Some(q) = Quadrant::from_name(&o.to) else {
            continue;
        };
        let ended = if o.action == Action::PolicyOutage {
            policy_outage(config, q, 0)
        } else {
            identity_outage(config, q, 0)
        };
        match ended {
            Ok(_) => outages += 1,
            Err(e) => failed.push(format!("ending {}'s {}: {e}", o.to, o.action.name())),
        }
    }
    let mut qdiscs = 0;
    match veths(config, ANY) {
        Ok(devs) => {
            for dev in devs {
                let fq =
                    tc(&["qdisc", "show", "dev", &dev, "root"]).map(|s| s.starts_with("qdisc fq "));
                match fq.and_then(|fq| {
                    if fq {
                        tc(&["qdisc", "del", "dev", &dev, "root"]).map(|_| true)
                    } else {
                        Ok(false)
                    }
                }) {
                    Ok(true) => qdiscs += 1,
                    Ok(false) => {}
                    Err(e) => failed.push(format!("the fq qdisc of {dev}: {e}")),
                }
            }
        }
        Err(e) => failed.push(format!("the quadrants' veths: {e}")),
    }
    let done = format!(
        "removed {removed} fault(s) and {qdiscs} fq qdisc(s), thawed {thawed} quadrant(s) or \
         workload(s), ended {eased} resource pressure(s), {hogs} lane hog(s) and {outages} \
         outage(s)"
    );
    if failed.is_empty() {
        Ok(format!("{done}; the dataplane is disarmed"))
    } else {
        Err(ChaosError::Sys(format!(
            "{done}; {} step(s) failed: {}",
            failed.len(),
            failed.join("; ")
        )))
    }
}

/// The text form of `quadrant chaos status`.
#[must_use]
pub fn render(faults: &[FaultStatus]) -> String {
    if faults.is_empty() {
        return "no faults\n".into();
    }
    let mut out = String::from(
        "ACTION           FROM   TO     PERCENT  DELAY (ms)     LEFT (ms)  MATCHED   DROPPED\n",
    );
    for f in faults {
        let _ = writeln!(
            out,
            "{:<16} {:<6} {:<6} {:<8} {:<14} {:<10} {:<9} {}",
            f.action.name(),
            f.from,
            f.to,
            if matches!(
                f.action,
                Action::Delay | Action::MemoryPressure | Action::PidsPressure
            ) {
                "-".to_owned()
            } else {
                format!("{:.2}", f.percent)
            },
            if f.action == Action::Delay {
                format!("{} ± {}", f.delay_ms, f.jitter_ms)
            } else {
                "-".to_owned()
            },
            if f.left_ms == 0 {
                "ended".to_owned()
            } else {
                f.left_ms.to_string()
            },
            f.matched,
            f.dropped
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(action: Action, from: &str, to: &str) -> FaultSpec {
        FaultSpec {
            action,
            from: from.into(),
            to: to.into(),
            percent: 100.0,
            delay_ms: 0,
            jitter_ms: 0,
            both_ways: false,
            seconds: 10,
            headroom_mib: DEFAULT_HEADROOM_MIB,
            headroom_pids: DEFAULT_HEADROOM_PIDS,
            restart_agent: true,
            workload: None,
        }
    }

    #[test]
    fn a_pressure_names_one_quadrant_and_its_limits() {
        let ok = spec(Action::MemoryPressure, "any", "dx");
        assert!(
            ok.entries(false, 0).expect("valid").is_empty(),
            "no map entry"
        );
        assert_eq!(
            ok.pressed(),
            Some((Quadrant::Dx, pressure::Resource::Memory))
        );
        let err = |s: &FaultSpec, allow| s.entries(allow, 0).unwrap_err().to_string();
        assert!(err(&spec(Action::CpuPressure, "dx", "dg"), false).contains("from any, to one"));
        assert!(err(&spec(Action::PidsPressure, "any", "host"), true).contains("to one quadrant"));
        assert!(err(&spec(Action::CpuPressure, "any", "pg"), false).contains("--allow-production"));
        assert!(
            spec(Action::CpuPressure, "any", "pg")
                .entries(true, 0)
                .is_ok()
        );
        let mut cpu = spec(Action::CpuPressure, "any", "dx");
        cpu.percent = 0.0;
        assert!(err(&cpu, false).contains("percent: 0 is outside (0, 100] (of one CPU)"));
        let mut mem = spec(Action::MemoryPressure, "any", "dx");
        mem.headroom_mib = MAX_HEADROOM_MIB + 1;
        assert!(err(&mem, false).contains("headroom_mib: 4097 is outside 1..=4096"));
        mem.headroom_mib = 16;
        mem.percent = 50.0;
        assert!(err(&mem, false).contains("takes no percent"));
        let mut pids = spec(Action::PidsPressure, "any", "dx");
        pids.delay_ms = 5;
        assert!(err(&pids, false).contains("takes no delay"));
        let mut drop = spec(Action::Drop, "dx", "dg");
        drop.workload = Some("api".into());
        assert!(err(&drop, false).contains("only freeze and kill take one, not drop"));
        let mut freeze = spec(Action::Freeze, "any", "dx");
        freeze.workload = Some("Not A Name".into());
        assert!(err(&freeze, false).contains("is not a workload name"));
    }

    #[test]
    fn a_partition_is_two_entries_ending_together() {
        let mut s = spec(Action::Drop, "dx", "dg");
        s.both_ways = true;
        let e = s.entries(false, 1_000).expect("valid");
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].0.src, e[0].0.dst), (0, 1));
        assert_eq!((e[1].0.src, e[1].0.dst), (1, 0));
        assert!(e.iter().all(|(k, f)| k.scope == SCOPE_PACKET
            && f.drop_ppm == PPM
            && f.expires_ns == 1_000 + 10_000_000_000));
    }

    #[test]
    fn production_quadrants_need_to_be_allowed_by_name() {
        for (from, to) in [("dx", "px"), ("pg", "dg"), ("any", "dx"), ("dx", "any")] {
            let err = spec(Action::Drop, from, to)
                .entries(false, 0)
                .expect_err("production");
            assert!(err.to_string().contains("--allow-production"), "{err}");
            assert!(spec(Action::Drop, from, to).entries(true, 0).is_ok());
        }
    }

    #[test]
    fn limits_are_named() {
        let mut s = spec(Action::Delay, "dx", "dg");
        assert!(
            s.entries(false, 0)
                .unwrap_err()
                .to_string()
                .contains("needs a delay")
        );
        s.delay_ms = 100;
        s.jitter_ms = 10;
        let e = s.entries(false, 0).expect("valid");
        assert_eq!(
            (e[0].1.delay_us, e[0].1.jitter_us, e[0].1.drop_ppm),
            (100_000, 10_000, 0)
        );
        s.delay_ms = MAX_DELAY_MS + 1;
        assert!(
            s.entries(false, 0)
                .unwrap_err()
                .to_string()
                .contains("at most 5000 ms")
        );
        let mut d = spec(Action::Drop, "dx", "dg");
        d.percent = 5.0;
        assert_eq!(d.entries(false, 0).expect("valid")[0].1.drop_ppm, 50_000);
        d.percent = 0.0;
        assert!(
            d.entries(false, 0)
                .unwrap_err()
                .to_string()
                .contains("percent: 0")
        );
        d.percent = 100.0;
        d.seconds = 0;
        assert!(
            d.entries(false, 0)
                .unwrap_err()
                .to_string()
                .contains("seconds: 0")
        );
        assert!(
            spec(Action::Drop, "dx", "host")
                .entries(true, 0)
                .unwrap_err()
                .to_string()
                .contains("delivered into a quadrant")
        );
        assert!(
            spec(Action::Refuse, "world", "dx")
                .entries(true, 0)
                .unwrap_err()
                .to_string()
                .contains("connects of a quadrant")
        );
        assert!(
            spec(Action::Drop, "qa", "dx")
                .entries(true, 0)
                .unwrap_err()
                .to_string()
                .contains("\"qa\" is not")
        );
        let r = spec(Action::Refuse, "dx", "host")
            .entries(false, 0)
            .expect("valid");
        assert_eq!(r[0].0.scope, SCOPE_CONNECT);
    }
}
