//! Resource pressure inside one quadrant (`cpu_pressure`, `memory_pressure`, `pids_pressure`):
//! the quadrant's limit tightened and a stressor run inside it, as `stress-ng` would be — but
//! in a `chaos-stress` group below each instance's cgroup, so the stressor counts against the
//! quadrant's limit and is killed as a group.
//!
//! - CPU: the quadrant's quota set to `percent` of one CPU; one spinning thread per CPU.
//!   Effect: periods in which the quadrant was throttled (`cpu.stat nr_throttled`).
//! - Memory: the limit set to the quadrant's use plus `headroom_mib`; the stressor holds the
//!   headroom (all but 8 MiB, taking back what is freed) and five times a second sends a probe
//!   over the limit, which the kernel's OOM killer stops (its `oom_score_adj` is 1000): the
//!   quadrant stays out of memory. Effect: OOM kills in the quadrant.
//! - Pids: the limit set to the quadrant's process count plus `headroom_pids`; the stressor
//!   forks until the kernel refuses, holds its children and keeps asking. Effect: refused forks
//!   (`pids.events max`).
//!
//! The limits live where the instance's capacity lives (`workloads::apply_capacity`): cgroup v2
//! where the controller is delegated to the instance's cgroup, else — a hybrid host — the v1
//! group `<controller>/<agent instance>/<instance>`, which the quadrant's processes are moved
//! into (and new `quadrant exec` processes join). Like a freeze, the fault has a lease beside
//! the agent's state (the values to restore, the counters at the start) and a guardian process
//! of its own session that keeps the stressor running and, at the expiry, kills it and restores
//! the limits — also when the controller that started it is killed. `recover --all` ends every
//! pressure at once.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use dataplane_common::Quadrant;
use serde::{Deserialize, Serialize};

use super::{Action, ChaosError, freeze::cgroups_of};
use crate::{breakers::monotonic_ns, config::Config};

/// Where cgroup v1 controllers are mounted on a hybrid host.
const V1_ROOT: &str = "/sys/fs/cgroup";
/// The group below each instance's cgroup the stressor runs in.
const STRESS_GROUP: &str = "chaos-stress";
/// The most a memory stressor allocates beyond its quadrant's whole limit before it holds what
/// it has: under a working limit it is stopped long before; a limit that does not stop it costs
/// the host no more than this, and the fault then counts no effect.
const MEMORY_OVERSHOOT_MIB: u64 = 64;
/// Pause before a stressor the kernel stopped is started again.
const RESTART_PAUSE: Duration = Duration::from_millis(20);

/// A resource under pressure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// CPU time.
    Cpu,
    /// Memory.
    Memory,
    /// Processes.
    Pids,
}

impl Resource {
    /// The resource an action presses on.
    #[must_use]
    pub fn of(action: Action) -> Option<Self> {
        match action {
            Action::CpuPressure => Some(Self::Cpu),
            Action::MemoryPressure => Some(Self::Memory),
            Action::PidsPressure => Some(Self::Pids),
            _ => None,
        }
    }

    /// The action pressing on it.
    #[must_use]
    pub fn action(self) -> Action {
        match self {
            Self::Cpu => Action::CpuPressure,
            Self::Memory => Action::MemoryPressure,
            Self::Pids => Action::PidsPressure,
        }
    }

    /// The cgroup controller.
    #[must_use]
    pub fn controller(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory",
            Self::Pids => "pids",
        }
    }

    /// What its effect counts.
    #[must_use]
    pub fn effect(self) -> &'static str {
        match self {
            Self::Cpu => "throttled periods",
            Self::Memory => "OOM kills",
            Self::Pids => "refused forks",
        }
    }
}

/// How hard: the CPU cap, the memory and process headroom.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Amount {
    /// The quadrant's CPU during the fault, percent of one CPU.
    pub cpu_percent: f64,
    /// Memory left to the quadrant above its use, MiB.
    pub headroom_mib: u32,
    /// Processes left to the quadrant above its count.
    pub headroom_pids: u32,
}

/// One instance cgroup's group for a controller: cgroup v2 (the instance's own cgroup) or a v1
/// group on a hybrid host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// The group holding the limit.
    pub dir: PathBuf,
    /// Whether it is cgroup v2.
    pub v2: bool,
}

impl Group {
    /// Its memory use and limit files.
    fn memory_files(&self) -> (PathBuf, PathBuf) {
        if self.v2 {
            (self.dir.join("memory.current"), self.dir.join("memory.max"))
        } else {
            (
                self.dir.join("memory.usage_in_bytes"),
                self.dir.join("memory.limit_in_bytes"),
            )
        }
    }

    /// The limit files with the values to write for `amount`, from the group's current state.
    fn limits(&self, r: Resource, amount: &Amount) -> Result<Vec<(PathBuf, String)>, ChaosError> {
        let read = |f: &str| read_trimmed(&self.dir.join(f));
        Ok(match (r, self.v2) {
            (Resource::Cpu, v2) => {
                let period: u64 = if v2 {
                    read("cpu.max")?
                        .split_whitespace()
                        .nth(1)
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(100_000)
                } else {
                    read("cpu.cfs_period_us")?.parse().unwrap_or(100_000)
                };
                let quota = cpu_quota(amount.cpu_percent, period);
                if v2 {
                    vec![(self.dir.join("cpu.max"), format!("{quota} {period}"))]
                } else {
                    vec![(self.dir.join("cpu.cfs_quota_us"), quota.to_string())]
                }
            }
            (Resource::Memory, _) => {
                let (current, limit) = self.memory_files();
                let used: u64 = read_trimmed(&current)?.parse().unwrap_or(0);
                let max = used + u64::from(amount.headroom_mib) * 1024 * 1024;
                vec![(limit, max.to_string())]
            }
            (Resource::Pids, _) => {
                let used: u64 = read("pids.current")?.parse().unwrap_or(0);
                let max = used + u64::from(amount.headroom_pids);
                vec![(self.dir.join("pids.max"), max.to_string())]
            }
        })
    }

    /// The effect counted so far: hierarchical counters are read here; cgroup v1 counts an
    /// OOM kill and a refused fork only in the group of the process it happened to, so there
    /// the subtree is summed.
    fn effect(&self, r: Resource) -> u64 {
        let field = |file: &Path, key: &str| {
            std::fs::read_to_string(file).ok().and_then(|s| {
                s.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse().ok()).flatten()
                })
            })
        };
        match (r, self.v2) {
            (Resource::Cpu, _) => field(&self.dir.join("cpu.stat"), "nr_throttled").unwrap_or(0),
            (Resource::Pids, true) => field(&self.dir.join("pids.events"), "max").unwrap_or(0),
            (Resource::Pids, false) => subtree(&self.dir)
                .iter()
                .filter_map(|d| field(&d.join("pids.events"), "max"))
                .sum(),
            (Resource::Memory, true) => {
                field(&self.dir.join("memory.events"), "oom_kill").unwrap_or(0)
            }
            (Resource::Memory, false) => subtree(&self.dir)
                .iter()
                .filter_map(|d| field(&d.join("memory.oom_control"), "oom_kill"))
                .sum(),
        }
    }
}

fn read_trimmed(path: &Path) -> Result<String, ChaosError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| ChaosError::Sys(format!("{}: {e}", path.display())))
}

fn write(path: &Path, value: &str) -> Result<(), ChaosError> {
    std::fs::write(path, value)
        .map_err(|e| ChaosError::Sys(format!("cannot write {value:?} to {}: {e}", path.display())))
}

/// `dir` and every group below it.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = std::fs::read_dir(&out[i]) {
            out.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    out
}

/// The CFS quota for `percent` of one CPU per `period` µs (at least 1 ms, the kernel's floor).
#[must_use]
pub fn cpu_quota(percent: f64, period: u64) -> u64 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "0 < percent <= 100, period below 2^53"
    )]
    let q = (percent / 100.0 * period as f64).round() as u64;
    q.max(1_000)
}

/// The group holding `r`'s limit for the instance cgroup `v2_dir` (named `name`, of agent
/// instance `agent`): the v2 cgroup when the controller is delegated to it (tried first),
/// else the v1 group under `v1_root`, created.
///
/// # Errors
/// Neither has the controller, or the v1 group cannot be made.
pub fn group_for(
    r: Resource,
    v2_dir: &Path,
    v1_root: &Path,
    agent: &str,
    name: &str,
) -> Result<Group, ChaosError> {
    let file = match r {
        Resource::Cpu => "cpu.max",
        Resource::Memory => "memory.max",
        Resource::Pids => "pids.max",
    };
    if !v2_dir.join(file).exists()
        && let Some(parent) = v2_dir.parent()
    {
        let _ = std::fs::write(
            parent.join("cgroup.subtree_control"),
            format!("+{}", r.controller()),
        );
    }
    if v2_dir.join(file).exists() {
        return Ok(Group {
            dir: v2_dir.to_owned(),
            v2: true,
        });
    }
    let root = v1_root.join(r.controller());
    if !root.join("cgroup.procs").exists() {
        return Err(ChaosError::Sys(format!(
            "no {} controller for {name}: neither its cgroup v2 group {} has {file} nor is a \
             cgroup v1 {} hierarchy mounted at {}",
            r.controller(),
            v2_dir.display(),
            r.controller(),
            root.display()
        )));
    }
    let dir = root.join(agent).join(name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ChaosError::Sys(format!("cannot create {}: {e}", dir.display())))?;
    Ok(Group { dir, v2: false })
}

/// Every process in the v2 tree at `v2_dir` whose v1 `controller` group is outside `v1_rel`
/// (`/<agent>/<instance>`) moves into `group`: on a hybrid host, the quadrant's processes then
/// feel the limit.
fn adopt_v1(v2_dir: &Path, controller: &str, v1_rel: &str, group: &Path) {
    for d in subtree(v2_dir) {
        let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.split_whitespace() {
            let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
                continue;
            };
            let inside = cg.lines().any(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, ctrls, path) = (parts.next(), parts.next(), parts.next());
                ctrls.is_some_and(|c| c.split(',').any(|c| c == controller))
                    && path.is_some_and(|p| {
                        p == v1_rel || p.strip_prefix(v1_rel).is_some_and(|r| r.starts_with('/'))
                    })
            });
            if !inside {
                let _ = std::fs::write(group.join("cgroup.procs"), pid);
            }
        }
    }
}

/// A pressure's lease: what to restore, where its stressors run, the effect at the start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// The quadrant.
    pub quadrant: String,
    /// The resource.
    pub resource: Resource,
    /// How hard.
    pub amount: Amount,
    /// The expiry, `CLOCK_MONOTONIC` ns.
    pub until_ns: u64,
    /// The limit groups, one per instance.
    pub groups: Vec<Group>,
    /// The limits as they were.
    pub restore: Vec<(PathBuf, String)>,
    /// Each stressor's `cgroup.procs` files to join (v2 and, hybrid, v1), one list per
    /// instance.
    pub stressors: Vec<Vec<PathBuf>>,
    /// The effect counted when it started.
    pub effect_at_start: u64,
    /// What a memory stressor allocates at most, MiB: the largest limit set plus
    /// [`MEMORY_OVERSHOOT_MIB`].
    pub stress_mib: u64,
}

impl Lease {
    /// The effect since the start.
    #[must_use]
    pub fn effect(&self) -> u64 {
        let now: u64 = self.groups.iter().map(|g| g.effect(self.resource)).sum();
        now.saturating_sub(self.effect_at_start)
    }
}

impl Lease {
    /// As `quadrant chaos status` shows it: `matched` is the effect so far (throttled periods,
    /// OOM kills, refused forks).
    #[must_use]
    pub fn status(&self, now_ns: u64) -> super::FaultStatus {
        super::FaultStatus {
            action: self.resource.action(),
            from: "any".into(),
            to: self.quadrant.clone(),
            percent: if self.resource == Resource::Cpu {
                self.amount.cpu_percent
            } else {
                100.0
            },
            delay_ms: 0.0,
            jitter_ms: 0.0,
            left_ms: self.until_ns.saturating_sub(now_ns) / 1_000_000,
            expires_ns: self.until_ns,
            matched: self.effect(),
            dropped: 0,
        }
    }
}

fn lease_path(config: &Config, q: Quadrant, r: Resource) -> PathBuf {
    config.state_dir.join(format!(
        "{}-chaos-pressure-{}-{}.json",
        config.instance,
        q.name(),
        r.controller()
    ))
}

/// The live pressures' leases.
#[must_use]
pub fn leases(config: &Config) -> Vec<Lease> {
    let mut out = Vec::new();
    for q in Quadrant::ALL {
        for r in [Resource::Cpu, Resource::Memory, Resource::Pids] {
            if let Some(l) = std::fs::read(lease_path(config, q, r))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                out.push(l);
            }
        }
    }
    out
}

/// Puts `q` under pressure on `r` for `seconds`: the groups, the lease, the tightened limits,
/// then the guardian (which starts the stressors). Returns the lease.
///
/// # Errors
/// A missing cgroup or controller, a failed write (whatever was tightened is restored), a
/// pressure already on (`q`, `r`), or a guardian that cannot start.
pub fn start(
    config: &Config,
    config_path: Option<&Path>,
    q: Quadrant,
    r: Resource,
    amount: Amount,
    seconds: u64,
) -> Result<Lease, ChaosError> {
    let path = lease_path(config, q, r);
    if path.exists() {
        return Err(ChaosError::Invalid(format!(
            "{} is under {} pressure already (lease {}); `quadrant chaos recover --all` ends it",
            q.name(),
            r.controller(),
            path.display()
        )));
    }
    let instances = cgroups_of(config, q);
    if instances.is_empty() {
        return Err(ChaosError::Sys(format!(
            "{} has no cgroup under {} (is the agent's dataplane up?)",
            q.name(),
            config.cgroup_parent().display()
        )));
    }
    let mut lease = Lease {
        quadrant: q.name().to_owned(),
        resource: r,
        amount,
        until_ns: monotonic_ns() + seconds * 1_000_000_000,
        groups: Vec::new(),
        restore: Vec::new(),
        stressors: Vec::new(),
        effect_at_start: 0,
        stress_mib: 0,
    };
    let mut tighten = Vec::new();
    for v2 in &instances {
        let name = v2
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let g = group_for(r, v2, Path::new(V1_ROOT), &config.instance, &name)?;
        let v2_stress = v2.join(STRESS_GROUP);
        std::fs::create_dir_all(&v2_stress)
            .map_err(|e| ChaosError::Sys(format!("{}: {e}", v2_stress.display())))?;
        let mut join = vec![v2_stress.join("cgroup.procs")];
        if !g.v2 {
            adopt_v1(
                v2,
                r.controller(),
                &format!("/{}/{name}", config.instance),
                &g.dir,
            );
            let v1_stress = g.dir.join(STRESS_GROUP);
            std::fs::create_dir_all(&v1_stress)
                .map_err(|e| ChaosError::Sys(format!("{}: {e}", v1_stress.display())))?;
            join.push(v1_stress.join("cgroup.procs"));
        }
        for (file, value) in g.limits(r, &amount)? {
            lease.restore.push((file.clone(), read_trimmed(&file)?));
            tighten.push((file, value));
        }
        lease.stressors.push(join);
        lease.groups.push(g);
    }
    lease.effect_at_start = lease.groups.iter().map(|g| g.effect(r)).sum();
    lease.stress_mib = tighten
        .iter()
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        / (1024 * 1024)
        + MEMORY_OVERSHOOT_MIB;
    let text = serde_json::to_vec(&lease).map_err(|e| ChaosError::Sys(e.to_string()))?;
    std::fs::write(&path, text)
        .map_err(|e| ChaosError::Sys(format!("cannot write the lease {}: {e}", path.display())))?;
    for (file, value) in &tighten {
        if let Err(e) = write(file, value) {
            let _ = end(config, q, r);
            return Err(e);
        }
    }
    if let Err(e) = spawn_guardian(config_path, &path) {
        let _ = end(config, q, r);
        return Err(ChaosError::Sys(format!(
            "cannot start the guardian of the {} pressure on {} ({e}); limits restored",
            r.controller(),
            q.name()
        )));
    }
    Ok(lease)
}

fn spawn_guardian(config_path: Option<&Path>, lease: &Path) -> std::io::Result<()> {
    let mut c = Command::new(std::env::current_exe()?);
    if let Some(p) = config_path {
        c.arg("--config").arg(p);
    }
    c.args(["chaos", "pressure-guard", "--lease"])
        .arg(lease)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; the guardian leaves the controller's session, so a
    // signal to the controller's group does not reach it.
    unsafe {
        c.pre_exec(|| {
            let _ = nix::unistd::setsid();
            Ok(())
        });
    }
    c.spawn().map(|_| ())
}

/// Ends the pressure on (`q`, `r`): its stressors killed, its limits restored, its lease
/// removed. Returns the effect it had; `None` when there was none on.
///
/// # Errors
/// A limit that cannot be restored (the lease stays, so `recover --all` can try again).
pub fn end(config: &Config, q: Quadrant, r: Resource) -> Result<Option<u64>, ChaosError> {
    let path = lease_path(config, q, r);
    let Some(lease): Option<Lease> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    else {
        return Ok(None);
    };
    let effect = lease.effect();
    // The lease first: a guardian sees it gone and starts no stressor again.
    let _ = std::fs::remove_file(&path);
    for join in &lease.stressors {
        for procs in join {
            if let Some(group) = procs.parent() {
                kill_group(group);
            }
        }
    }
    for (file, value) in &lease.restore {
        // A group gone (the agent's `down` removed the quadrant) has nothing to restore.
        if !file.exists() {
            continue;
        }
        if let Err(e) = write(file, value) {
            if let Ok(text) = serde_json::to_vec(&lease) {
                let _ = std::fs::write(&path, text);
            }
            return Err(e);
        }
    }
    Ok(Some(effect))
}

/// Kills every process in `group` (SIGKILL, until it is empty or 2 s passed) and removes it.
fn kill_group(group: &Path) {
    let kill = group.join("cgroup.kill");
    for _ in 0..200 {
        let procs = std::fs::read_to_string(group.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        if kill.exists() {
            let _ = std::fs::write(&kill, "1");
        } else {
            for pid in procs.split_whitespace().filter_map(|p| p.parse().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir(group);
}

/// `quadrant chaos pressure-guard --lease FILE`: keeps one stressor per instance running
/// until the expiry (one the kernel stopped is started again), then ends the pressure — unless
/// the lease was ended or replaced meanwhile.
///
/// # Errors
/// An unreadable lease, or restoring the limits.
pub fn guard(config: &Config, config_path: Option<&Path>, lease: &Path) -> Result<(), ChaosError> {
    let read = || -> Option<Lease> { serde_json::from_slice(&std::fs::read(lease).ok()?).ok() };
    let l = read().ok_or_else(|| ChaosError::Sys(format!("no lease at {}", lease.display())))?;
    let q = Quadrant::from_name(&l.quadrant)
        .ok_or_else(|| ChaosError::Sys(format!("unknown quadrant {:?}", l.quadrant)))?;
    let mut children: Vec<Option<Child>> = l.stressors.iter().map(|_| None).collect();
    while monotonic_ns() < l.until_ns {
        if read().as_ref() != Some(&l) {
            // Ended (or ended and started anew) by someone else.
            return Ok(());
        }
        for ((slot, join), group) in children.iter_mut().zip(&l.stressors).zip(&l.groups) {
            let running = slot
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_none());
            if !running {
                *slot = spawn_stressor(config_path, &l, join, group).ok();
            }
        }
        std::thread::sleep(RESTART_PAUSE);
    }
    if read().as_ref() != Some(&l) {
        return Ok(());
    }
    end(config, q, l.resource)?;
    for c in children.iter_mut().flatten() {
        let _ = c.wait();
    }
    Ok(())
}

fn spawn_stressor(
    config_path: Option<&Path>,
    l: &Lease,
    join: &[PathBuf],
    group: &Group,
) -> std::io::Result<Child> {
    let mut c = Command::new(std::env::current_exe()?);
    if let Some(p) = config_path {
        c.arg("--config").arg(p);
    }
    c.args(["chaos", "stress"])
        .arg(match l.resource {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Pids => "pids",
        })
        .arg("--mib")
        .arg(l.stress_mib.to_string());
    if l.resource == Resource::Memory {
        let (usage, limit) = group.memory_files();
        c.arg("--usage").arg(usage).arg("--limit").arg(limit);
    }
    for j in join {
        c.arg("--join").arg(j);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe: the stressor dies with its guardian.
    unsafe {
        c.pre_exec(|| {
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            Ok(())
        });
    }
    c.spawn()
}

/// `quadrant chaos stress RESOURCE --join PROCS…`: joins the groups, then presses until killed.
///
/// # Errors
/// A group it cannot join.
pub fn stress(
    r: Resource,
    join: &[PathBuf],
    mib: u64,
    memory: Option<(&Path, &Path)>,
) -> Result<(), ChaosError> {
    for procs in join {
        write(procs, &std::process::id().to_string())?;
    }
    match r {
        Resource::Cpu => {
            let n = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            for _ in 1..n {
                std::thread::spawn(spin);
            }
            spin();
        }
        Resource::Memory => {
            let (usage, limit) = memory.ok_or_else(|| {
                ChaosError::Sys("a memory stressor needs --usage and --limit".into())
            })?;
            hold_memory(usage, limit, mib)
        }
        Resource::Pids => loop {
            // SAFETY: the child only calls async-signal-safe functions (prctl, pause) until it
            // is killed with its parent.
            match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Child) => {
                    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
                    loop {
                        nix::unistd::pause();
                    }
                }
                Ok(nix::unistd::ForkResult::Parent { .. }) => {}
                Err(_) => std::thread::sleep(RESTART_PAUSE),
            }
        },
    }
}

/// Memory a holder leaves free below the limit, MiB.
const HOLD_MARGIN_MIB: u64 = 8;
/// How often the holder takes back what was freed and sends a probe over the limit.
const PROBE_EVERY: Duration = Duration::from_millis(200);

/// The memory stressor: holds the quadrant's memory up to [`HOLD_MARGIN_MIB`] below its limit,
/// taking back whatever is freed, and every [`PROBE_EVERY`] forks a probe that asks for more
/// than the margin. The probe's `oom_score_adj` is 1000 and it shares none of the held memory
/// (`MADV_DONTFORK`), so the OOM killer stops it, not a workload: each probe is one OOM kill,
/// the effect counted, for the cost of a small fork. The holder keeps the default score; as the
/// quadrant's largest process it is the choice when a workload's own allocation finds no
/// memory (its guardian then starts it again). At most `cap_mib` held.
fn hold_memory(usage: &Path, limit: &Path, cap_mib: u64) -> Result<(), ChaosError> {
    const MIB: usize = 1024 * 1024;
    let read = |p: &Path| -> u64 {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(u64::MAX)
    };
    let mut held: u64 = 0;
    loop {
        while held < cap_mib
            && read(usage).saturating_add(HOLD_MARGIN_MIB * MIB as u64) < read(limit)
        {
            // SAFETY: a fresh private anonymous mapping, never unmapped (the process holds it
            // until it is killed); every page written, so every page is charged.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    MIB,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    break;
                }
                let _ = libc::madvise(p, MIB, libc::MADV_DONTFORK);
                std::ptr::write_bytes(p.cast::<u8>(), 0x5a, MIB);
            }
            held += 1;
        }
        // SAFETY: the child calls only async-signal-safe functions (open, write, mmap, _exit)
        // and no allocator.
        match unsafe { nix::unistd::fork() } {
            // SAFETY: in the child just forked.
            Ok(nix::unistd::ForkResult::Child) => unsafe { probe_child(2 * HOLD_MARGIN_MIB) },
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                let _ = nix::sys::wait::waitpid(child, None);
            }
            Err(_) => {}
        }
        std::thread::sleep(PROBE_EVERY);
    }
}

/// A memory probe: the OOM killer's first choice, asking for `mib` more.
///
/// # Safety
/// Only in a child just forked: it uses async-signal-safe calls only.
unsafe fn probe_child(mib: u64) -> ! {
    // SAFETY: async-signal-safe calls on memory and descriptors of this process only.
    unsafe {
        let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
        if fd >= 0 {
            let _ = libc::write(fd, c"1000".as_ptr().cast(), 4);
            let _ = libc::close(fd);
        }
        let len = usize::try_from(mib).unwrap_or(4) * 1024 * 1024;
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p != libc::MAP_FAILED {
            std::ptr::write_bytes(p.cast::<u8>(), 0x5a, len);
        }
        libc::_exit(0)
    }
}

fn spin() -> ! {
    let mut x = 0_u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).expect("dir");
        for (f, v) in files {
            std::fs::write(dir.join(f), v).expect("file");
        }
    }

    const AMOUNT: Amount = Amount {
        cpu_percent: 20.0,
        headroom_mib: 32,
        headroom_pids: 8,
    };

    #[test]
    fn cgroup_v2_limits_are_written_in_the_instance_group() {
        let t = tempfile::tempdir().expect("tmp");
        let v2 = t.path().join("q/dx");
        fake(
            &v2,
            &[
                ("cpu.max", "max 100000\n"),
                ("memory.max", "max\n"),
                ("memory.current", "1048576\n"),
                ("pids.max", "max\n"),
                ("pids.current", "3\n"),
                ("cpu.stat", "usage_usec 1\nnr_periods 9\nnr_throttled 4\n"),
                ("memory.events", "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n"),
                ("pids.events", "max 5\n"),
            ],
        );
        let v1 = t.path().join("v1");
        let g = |r| group_for(r, &v2, &v1, "qa", "dx").expect("group");
        let cpu = g(Resource::Cpu);
        assert!(cpu.v2);
        assert_eq!(
            cpu.limits(Resource::Cpu, &AMOUNT).expect("limits"),
            vec![(v2.join("cpu.max"), "20000 100000".to_owned())]
        );
        assert_eq!(
            g(Resource::Memory)
                .limits(Resource::Memory, &AMOUNT)
                .expect("limits"),
            vec![(
                v2.join("memory.max"),
                (1_048_576 + 32 * 1_048_576).to_string()
            )]
        );
        assert_eq!(
            g(Resource::Pids)
                .limits(Resource::Pids, &AMOUNT)
                .expect("limits"),
            vec![(v2.join("pids.max"), "11".to_owned())]
        );
        assert_eq!(cpu.effect(Resource::Cpu), 4);
        assert_eq!(g(Resource::Memory).effect(Resource::Memory), 2);
        assert_eq!(g(Resource::Pids).effect(Resource::Pids), 5);
        assert!(!v1.exists(), "no v1 group where v2 has the controller");
    }

    #[test]
    fn a_hybrid_host_gets_v1_groups_and_their_files() {
        let t = tempfile::tempdir().expect("tmp");
        let v2 = t.path().join("q/dx");
        fake(&v2, &[("cgroup.procs", "")]);
        let v1 = t.path().join("v1");
        for c in ["cpu", "memory"] {
            fake(&v1.join(c), &[("cgroup.procs", "")]);
        }
        let cpu = group_for(Resource::Cpu, &v2, &v1, "qa", "dx").expect("cpu");
        assert_eq!(
            cpu,
            Group {
                dir: v1.join("cpu/qa/dx"),
                v2: false
            }
        );
        fake(
            &cpu.dir,
            &[
                ("cpu.cfs_period_us", "50000\n"),
                ("cpu.cfs_quota_us", "-1\n"),
            ],
        );
        assert_eq!(
            cpu.limits(Resource::Cpu, &AMOUNT).expect("limits"),
            vec![(cpu.dir.join("cpu.cfs_quota_us"), "10000".to_owned())]
        );
        let mem = group_for(Resource::Memory, &v2, &v1, "qa", "dx").expect("memory");
        fake(&mem.dir, &[("memory.usage_in_bytes", "0\n")]);
        assert_eq!(
            mem.limits(Resource::Memory, &AMOUNT).expect("limits")[0].1,
            (32 * 1_048_576).to_string()
        );
        // v1 counts an OOM kill in the victim's own group only: the subtree is summed.
        fake(
            &mem.dir,
            &[(
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
            )],
        );
        fake(
            &mem.dir.join(STRESS_GROUP),
            &[(
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
            )],
        );
        assert_eq!(mem.effect(Resource::Memory), 4);
        let err = group_for(Resource::Pids, &v2, &v1, "qa", "dx").unwrap_err();
        assert!(
            err.to_string().contains("no pids controller for dx"),
            "{err}"
        );
    }

    #[test]
    fn the_quota_has_the_kernels_floor() {
        assert_eq!(cpu_quota(50.0, 100_000), 50_000);
        assert_eq!(cpu_quota(0.5, 100_000), 1_000);
        assert_eq!(cpu_quota(100.0, 100_000), 100_000);
    }
}
