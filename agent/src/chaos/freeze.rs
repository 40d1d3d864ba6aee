//! Killing (`cgroup.kill`) and freezing every process of a quadrant (cgroup v2 `cgroup.freeze` on each of its instances'
//! cgroups) for a while. A freeze has no kernel clock to end it, so it gets a lease: a file with
//! its expiry beside the agent's state, and a guardian process (`quadrant chaos thaw`, detached
//! in a session of its own) that thaws at the expiry — also when the controller that froze the
//! quadrant is killed. `recover --all` thaws every quadrant at once.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use dataplane_common::Quadrant;

use super::ChaosError;
use crate::{breakers::monotonic_ns, config::Config};

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

fn lease(config: &Config, q: Quadrant) -> PathBuf {
    config
        .state_dir
        .join(format!("{}-chaos-freeze-{}", config.instance, q.name()))
}

/// Freezes (or thaws) every instance of `q`; returns how many cgroups.
///
/// # Errors
/// When the quadrant has no cgroup (its dataplane is not up) or a write fails.
pub fn set_frozen(config: &Config, q: Quadrant, frozen: bool) -> Result<usize, ChaosError> {
    let n = write_each(config, q, "cgroup.freeze", if frozen { "1" } else { "0" })?;
    if !frozen {
        let _ = std::fs::remove_file(lease(config, q));
    }
    Ok(n)
}

/// Writes `value` to `file` in every instance cgroup of `q`; returns how many.
fn write_each(config: &Config, q: Quadrant, file: &str, value: &str) -> Result<usize, ChaosError> {
    let cgroups = cgroups_of(config, q);
    if cgroups.is_empty() {
        return Err(ChaosError::Sys(format!(
            "{} has no cgroup under {} (is the agent's dataplane up?)",
            q.name(),
            config.cgroup_parent().display()
        )));
    }
    for c in &cgroups {
        let path = c.join(file);
        std::fs::write(&path, value)
            .map_err(|e| ChaosError::Sys(format!("{}: {e}", path.display())))?;
    }
    Ok(cgroups.len())
}

/// The quadrants frozen now, with their lease's expiry (monotonic ns) when there is one.
#[must_use]
pub fn frozen(config: &Config) -> Vec<(Quadrant, Option<u64>)> {
    Quadrant::ALL
        .iter()
        .filter(|q| {
            cgroups_of(config, **q).iter().any(|c| {
                std::fs::read_to_string(c.join("cgroup.freeze")).is_ok_and(|v| v.trim() == "1")
            })
        })
        .map(|q| {
            let until = std::fs::read_to_string(lease(config, *q))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            (*q, until)
        })
        .collect()
}

/// Freezes `q` for `seconds`: the lease, the freeze, then its guardian. Returns the expiry.
///
/// # Errors
/// A missing cgroup, a failed write, or a guardian that cannot start (the freeze is undone).
pub fn freeze(
    config: &Config,
    config_path: Option<&Path>,
    q: Quadrant,
    seconds: u64,
) -> Result<u64, ChaosError> {
    let until = monotonic_ns() + seconds * 1_000_000_000;
    std::fs::write(lease(config, q), until.to_string())
        .map_err(|e| ChaosError::Sys(format!("cannot write the freeze lease: {e}")))?;
    set_frozen(config, q, true)?;
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
            q.name(),
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
    if let Err(e) = guardian.spawn() {
        let _ = set_frozen(config, q, false);
        return Err(ChaosError::Sys(format!(
            "cannot start the guardian that thaws {} at the expiry ({e}); thawed again",
            q.name()
        )));
    }
    Ok(until)
}

/// Kills every process of every instance of `q` (`cgroup.kill`); returns how many cgroups.
///
/// # Errors
/// A missing cgroup or a failed write.
pub fn kill(config: &Config, q: Quadrant) -> Result<usize, ChaosError> {
    write_each(config, q, "cgroup.kill", "1")
}

/// `quadrant chaos thaw --quadrant Q --at NS`: waits until the expiry, then thaws `q` if its
/// lease still names that expiry (a later freeze has its own guardian).
///
/// # Errors
/// The thaw's write.
pub fn thaw_at(config: &Config, q: Quadrant, at_ns: u64) -> Result<(), ChaosError> {
    loop {
        let now = monotonic_ns();
        if now >= at_ns {
            break;
        }
        std::thread::sleep(Duration::from_nanos(at_ns - now).min(Duration::from_secs(1)));
    }
    let current = std::fs::read_to_string(lease(config, q)).ok();
    if current.is_some_and(|s| s.trim() != at_ns.to_string()) {
        return Ok(());
    }
    set_frozen(config, q, false).map(|_| ())
}
