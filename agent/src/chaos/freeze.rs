//! Killing (`cgroup.kill`) and freezing every process of a quadrant — or of one of its workloads
//! — for a while (cgroup v2 `cgroup.freeze` on each of its instances' cgroups, or on the
//! workload's group below each). A freeze has no kernel clock to end it, so it gets a lease: a
//! file with its expiry beside the agent's state, and a guardian process (`quadrant chaos thaw`,
//! detached in a session of its own) that thaws at the expiry — also when the controller that
//! froze it is killed. `recover --all` thaws everything at once.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use dataplane_common::Quadrant;

use super::ChaosError;
use crate::{breakers::monotonic_ns, config::Config};

/// What a freeze or kill takes: every process of a quadrant, or of one of its workloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The quadrant.
    pub quadrant: Quadrant,
    /// One of its workloads (its cgroup below each instance's), or the whole quadrant.
    pub workload: Option<String>,
}

impl Target {
    /// The whole quadrant `q`.
    #[must_use]
    pub fn quadrant(q: Quadrant) -> Self {
        Self {
            quadrant: q,
            workload: None,
        }
    }

    /// `dx` or `dx/api`.
    #[must_use]
    pub fn name(&self) -> String {
        match &self.workload {
            Some(w) => format!("{}/{w}", self.quadrant.name()),
            None => self.quadrant.name().to_owned(),
        }
    }

    /// Its cgroups: every instance's, or the workload's group in every instance that has it.
    fn groups(&self, config: &Config) -> Vec<PathBuf> {
        let instances = cgroups_of(config, self.quadrant);
        match &self.workload {
            None => instances,
            Some(w) => instances
                .into_iter()
                .map(|d| d.join(w))
                .filter(|d| d.is_dir())
                .collect(),
        }
    }
}

/// The cgroups of every instance of `q` (`<q>` and `<q>-<k>`).
pub(super) fn cgroups_of(config: &Config, q: Quadrant) -> Vec<PathBuf> {
    let parent = config.cgroup_parent();
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name == q.name()
                || name
                    .strip_prefix(q.name())
                    .and_then(|r| r.strip_prefix('-'))
                    .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

fn lease(config: &Config, t: &Target) -> PathBuf {
    let name = match &t.workload {
        Some(w) => format!("{}-{w}", t.quadrant.name()),
        None => t.quadrant.name().to_owned(),
    };
    config
        .state_dir
        .join(format!("{}-chaos-freeze-{name}", config.instance))
}

/// Freezes (or thaws) `t`; returns how many cgroups.
///
/// # Errors
/// When it has no cgroup (the dataplane is not up, the workload not running) or a write fails.
pub fn set_frozen(config: &Config, t: &Target, frozen: bool) -> Result<usize, ChaosError> {
    let n = write_each(config, t, "cgroup.freeze", if frozen { "1" } else { "0" })?;
    if !frozen {
        let _ = std::fs::remove_file(lease(config, t));
    }
    Ok(n)
}

/// Writes `value` to `file` in every cgroup of `t`; returns how many.
fn write_each(config: &Config, t: &Target, file: &str, value: &str) -> Result<usize, ChaosError> {
    let cgroups = t.groups(config);
    if cgroups.is_empty() {
        return Err(ChaosError::Sys(match &t.workload {
            Some(w) => format!(
                "{} runs no workload {w} (no cgroup {w} below its instances' under {})",
                t.quadrant.name(),
                config.cgroup_parent().display()
            ),
            None => format!(
                "{} has no cgroup under {} (is the agent's dataplane up?)",
                t.quadrant.name(),
                config.cgroup_parent().display()
            ),
        }));
    }
    for c in &cgroups {
        let path = c.join(file);
        std::fs::write(&path, value)
            .map_err(|e| ChaosError::Sys(format!("{}: {e}", path.display())))?;
    }
    Ok(cgroups.len())
}

/// What is frozen now — quadrants, and workloads frozen on their own — with the lease's expiry
/// when there is one.
#[must_use]
pub fn frozen(config: &Config) -> Vec<(Target, Option<u64>)> {
    let is_frozen =
        |d: &Path| std::fs::read_to_string(d.join("cgroup.freeze")).is_ok_and(|v| v.trim() == "1");
    let mut out = Vec::new();
    for q in Quadrant::ALL {
        let instances = cgroups_of(config, q);
        if instances.iter().any(|d| is_frozen(d)) {
            out.push(Target::quadrant(q));
        }
        let mut workloads: Vec<String> = instances
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|rd| rd.filter_map(Result::ok))
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && is_frozen(&e.path()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        workloads.sort();
        workloads.dedup();
        out.extend(workloads.into_iter().map(|w| Target {
            quadrant: q,
            workload: Some(w),
        }));
    }
    out.into_iter()
        .map(|t| {
            let until = std::fs::read_to_string(lease(config, &t))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            (t, until)
        })
        .collect()
}

/// Freezes `t` for `seconds`: the lease, the freeze, then its guardian. Returns the expiry.
///
/// # Errors
/// A missing cgroup, a failed write, or a guardian that cannot start (the freeze is undone).
pub fn freeze(
    config: &Config,
    config_path: Option<&Path>,
    t: &Target,
    seconds: u64,
) -> Result<u64, ChaosError> {
    let until = monotonic_ns() + seconds * 1_000_000_000;
    std::fs::write(lease(config, t), until.to_string())
        .map_err(|e| ChaosError::Sys(format!("cannot write the freeze lease: {e}")))?;
    if let Err(e) = set_frozen(config, t, true) {
        let _ = std::fs::remove_file(lease(config, t));
        return Err(e);
    }
    let me = std::env::current_exe().map_err(|e| ChaosError::Sys(e.to_string()))?;
    let mut guardian = Command::new(me);
    if let Some(p) = config_path {
        guardian.arg("--config").arg(p);
    }
    guardian
        .args([
            "chaos",
            "thaw",
            "--quadrant",
            t.quadrant.name(),
            "--at",
            &until.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; the guardian leaves the controller's session, so a
    // signal to the controller's group does not reach it.
    unsafe {
        guardian.pre_exec(|| {
            let _ = nix::unistd::setsid();
            Ok(())
        });
    }
    if let Some(w) = &t.workload {
        guardian.arg("--workload").arg(w);
    }
    if let Err(e) = guardian.spawn() {
        let _ = set_frozen(config, t, false);
        return Err(ChaosError::Sys(format!(
            "cannot start the guardian that thaws {} at the expiry ({e}); thawed again",
            t.name()
        )));
    }
    Ok(until)
}

/// Kills every process of `t` (`cgroup.kill`); returns how many cgroups.
///
/// # Errors
/// A missing cgroup or a failed write.
pub fn kill(config: &Config, t: &Target) -> Result<usize, ChaosError> {
    write_each(config, t, "cgroup.kill", "1")
}

/// `quadrant chaos thaw --quadrant Q [--workload W] --at NS`: waits until the expiry, then
/// thaws `t` if its lease still names that expiry (a later freeze has its own guardian).
///
/// # Errors
/// The thaw's write.
pub fn thaw_at(config: &Config, t: &Target, at_ns: u64) -> Result<(), ChaosError> {
    loop {
        let now = monotonic_ns();
        if now >= at_ns {
            break;
        }
        std::thread::sleep(Duration::from_nanos(at_ns - now).min(Duration::from_secs(1)));
    }
    let current = std::fs::read_to_string(lease(config, t)).ok();
    if current.is_some_and(|s| s.trim() != at_ns.to_string()) {
        return Ok(());
    }
    set_frozen(config, t, false).map(|_| ())
}
