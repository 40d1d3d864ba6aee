//! The `kill_agent` fault: the agent's process killed with SIGKILL, as a crash kills it. Its
//! programs stay attached (their links are pinned) and go on enforcing; the agent started next
//! takes over the dataplane and the workloads it left (`daemon::start`). The controller starts
//! that agent itself (`restart_agent`, the default) as a service manager would — set it to
//! false where one (systemd's `Restart=`) does — and measures how long the control socket
//! stayed silent.

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::ChaosError;
use crate::config::Config;

/// How long a restarted agent has to answer on its control socket.
const BACK_WITHIN: Duration = Duration::from_mins(1);

/// What the fault did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Killed {
    /// The agent killed.
    pub pid: u32,
    /// Milliseconds from the kill until the restarted agent answered (`None`: not restarted
    /// by the controller).
    pub back_after_ms: Option<f64>,
}

/// SIGKILLs the running agent of `config`'s instance and, with `restart`, starts the next one
/// (`quadrant [--config FILE] up`, detached, its output in
/// `<state_dir>/<instance>.agent-restart.log`) and waits until it answers.
///
/// # Errors
/// No running agent, a kill refused, or a restarted agent that does not answer in time.
pub fn kill_agent(
    config: &Config,
    config_path: Option<&Path>,
    restart: bool,
) -> Result<Killed, ChaosError> {
    let pid = crate::daemon::State::read(config)
        .ok()
        .flatten()
        .map(|s| s.pid)
        .filter(|pid| crate::daemon::is_agent(*pid))
        .ok_or_else(|| {
            ChaosError::Sys(format!(
                "kill_agent: no running agent of instance {} (state {})",
                config.instance,
                config.state_path().display()
            ))
        })?;
    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| ChaosError::Sys(format!("kill_agent: cannot kill pid {pid}: {e}")))?;
    // Gone before the next one starts: it would otherwise find the old one still answering.
    while crate::daemon::is_agent(pid) && !zombie(pid) {
        if killed_at.elapsed() > Duration::from_secs(5) {
            return Err(ChaosError::Sys(format!(
                "kill_agent: pid {pid} still runs 5 s after SIGKILL"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if !restart {
        return Ok(Killed {
            pid,
            back_after_ms: None,
        });
    }
    let log_path = config
        .state_dir
        .join(format!("{}.agent-restart.log", config.instance));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| ChaosError::Sys(format!("{}: {e}", log_path.display())))?;
    let mut up = Command::new(std::env::current_exe().map_err(|e| ChaosError::Sys(e.to_string()))?);
    if let Some(p) = config_path {
        up.arg("--config").arg(p);
    }
    up.arg("up")
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| ChaosError::Sys(e.to_string()))?,
        )
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the agent leaves the controller's session, so it
    // outlives the controller as any service would.
    unsafe {
        up.pre_exec(|| {
            let _ = nix::unistd::setsid();
            Ok(())
        });
    }
    let mut child = up
        .spawn()
        .map_err(|e| ChaosError::Sys(format!("kill_agent: cannot start the next agent: {e}")))?;
    let client = crate::control::Client::new(config.socket_path());
    loop {
        if client.status().is_ok() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ChaosError::Sys(format!(
                "kill_agent: the next agent exited with {status}; its output is in {}",
                log_path.display()
            )));
        }
        if killed_at.elapsed() > BACK_WITHIN {
            return Err(ChaosError::Sys(format!(
                "kill_agent: the next agent did not answer within {} s; its output is in {}",
                BACK_WITHIN.as_secs(),
                log_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Killed {
        pid,
        back_after_ms: Some(killed_at.elapsed().as_secs_f64() * 1000.0),
    })
}

/// Whether `pid` is a zombie (killed, not yet reaped by its parent).
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
