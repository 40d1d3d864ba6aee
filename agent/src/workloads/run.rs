//! A workload's process: spawned into its quadrant (cgroups, network namespace, no `CAP_NET_RAW`
//! where asked), supervised until it exits or is stopped, restarted per its plan.

use std::{
    ffi::CString,
    fs,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
};

use tokio::{process::Command, sync::watch};
use tracing::{info, warn};

use super::{
    Control, Entry, RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN, STOP_GRACE, Spec, describe,
    prepare_cgroups, remove_v1_cgroups, set,
};
use crate::plans::RestartPolicy;

/// Supervises an adopted process until it exits or is stopped; after an exit the restart
/// policy applies (the exit status of a process this agent did not start is unknown: a failure).
pub(super) async fn run_adopted(
    spec: Spec,
    pid: u32,
    pidfd: tokio::io::unix::AsyncFd<OwnedFd>,
    entry: Arc<Entry>,
    mut stop: watch::Receiver<Control>,
) {
    let exited = tokio::select! {
        _ = pidfd.readable() => true,
        _ = stop.changed() => false,
    };
    if !exited {
        if *stop.borrow() == Control::Detach {
            set(&entry, |s| s.state = "detached".into());
            return;
        }
        if let Ok(pid) = i32::try_from(pid) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(STOP_GRACE, pidfd.readable())
                .await
                .is_err()
            {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = pidfd.readable().await;
            }
        }
        set(&entry, |s| {
            s.pid = None;
            s.state = "stopped".into();
            s.last_exit = Some("stopped (adopted process)".into());
        });
        return;
    }
    set(&entry, |s| {
        s.pid = None;
        s.state = "exited".into();
        s.last_exit = Some("exited (adopted process, status unknown)".into());
    });
    if spec.restart == RestartPolicy::Never {
        return;
    }
    set(&entry, |s| s.restart_pending = true);
    tokio::select! {
        () = tokio::time::sleep(RESTART_BACKOFF_MIN) => {}
        _ = stop.changed() => {
            // A handover between the exit and the restart: the next agent restarts it.
            let state = if *stop.borrow() == Control::Detach { "detached" } else { "stopped" };
            set(&entry, |s| {
                s.state = state.into();
                s.restart_pending = false;
            });
            return;
        }
    }
    set(&entry, |s| s.restart_pending = false);
    match prepare_cgroups(&spec) {
        Ok((procs, _)) => {
            set(&entry, |s| s.restarts += 1);
            run(spec, procs, entry, stop).await;
        }
        Err(e) => set(&entry, |s| {
            s.state = "failed".into();
            s.last_exit = Some(format!("cannot restart: {e}"));
        }),
    }
}

pub(super) async fn run(
    spec: Spec,
    procs: Vec<PathBuf>,
    entry: Arc<Entry>,
    mut stop: watch::Receiver<Control>,
) {
    let mut backoff = RESTART_BACKOFF_MIN;
    loop {
        let child = spawn(&spec, &procs);
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                warn!(workload = %spec.key, error = %e, "cannot start workload");
                set(&entry, |s| {
                    s.state = "failed".into();
                    s.last_exit = Some(format!("cannot start: {e}"));
                });
                break;
            }
        };
        set(&entry, |s| {
            s.pid = child.id();
            s.state = "running".into();
        });
        info!(workload = %spec.key, pid = ?child.id(), generation = spec.generation, "workload started");
        let outcome = tokio::select! {
            status = child.wait() => Some(status),
            _ = stop.changed() => None,
        };
        let Some(status) = outcome else {
            if *stop.borrow() == Control::Detach {
                // Handover: the process goes on; the next agent adopts it. Dropping the handle
                // would kill it.
                std::mem::forget(child);
                set(&entry, |s| s.state = "detached".into());
                return;
            }
            // Stop: SIGTERM, then SIGKILL after a grace period.
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let status = if let Ok(s) = tokio::time::timeout(STOP_GRACE, child.wait()).await {
                s.ok()
            } else {
                let _ = child.kill().await;
                child.wait().await.ok()
            };
            set(&entry, |s| {
                s.pid = None;
                s.state = "stopped".into();
                s.last_exit = status.map(|st| describe(st).1);
            });
            break;
        };
        let (success, text) = status.map_or((false, "wait failed".to_owned()), describe);
        set(&entry, |s| {
            s.pid = None;
            s.state = "exited".into();
            s.last_exit = Some(text.clone());
        });
        let again = match spec.restart {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Always => true,
        };
        if !again {
            break;
        }
        set(&entry, |s| s.restart_pending = true);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {
                set(&entry, |s| s.restart_pending = false);
                if *stop.borrow() == Control::Detach {
                    // A handover between the exit and the restart: the next agent restarts it
                    // (its cgroups stay for it).
                    set(&entry, |s| s.state = "detached".into());
                    return;
                }
                set(&entry, |s| s.state = "stopped".into());
                break;
            }
        }
        set(&entry, |s| s.restart_pending = false);
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
        set(&entry, |s| s.restarts += 1);
    }
    remove_v1_cgroups(&spec);
}

fn spawn(spec: &Spec, procs: &[PathBuf]) -> Result<tokio::process::Child, std::io::Error> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)?;
    // Opened before fork: the child only writes and calls setns, both async-signal-safe.
    let proc_fds: Vec<OwnedFd> = procs
        .iter()
        .map(|p| {
            fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map(OwnedFd::from)
        })
        .collect::<Result<_, _>>()?;
    let netns: OwnedFd =
        fs::File::open(Path::new(crate::sys::NETNS_RUN_DIR).join(&spec.netns))?.into();
    let zero = CString::new("0").unwrap_or_default();
    let mut cmd = Command::new(&spec.executable);
    cmd.args(&spec.args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(&spec.env)
        .env("SPIFFE_ENDPOINT_SOCKET", &spec.endpoint)
        .env(crate::lanes::SOCKET_ENV, &spec.lane_socket)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    let fds: Vec<i32> = proc_fds.iter().map(AsRawFd::as_raw_fd).collect();
    let netns_fd = netns.as_raw_fd();
    let drop_raw = spec.drop_net_raw;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (write, setns) on descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                // "0" moves the writing process into the cgroup.
                if libc::write(*fd, zero.as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if drop_raw {
                crate::sys::drop_net_raw()?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(proc_fds);
    drop(netns);
    child
}
