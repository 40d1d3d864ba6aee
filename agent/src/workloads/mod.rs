//! Running admitted workloads inside their quadrant: the workload's cgroup (with the plan's
//! limits), the quadrant's network namespace, its SPIFFE identity through
//! `SPIFFE_ENDPOINT_SOCKET`, output to a log file, and the plan's restart policy.
//!
//! Limits go to the cgroup v2 group when the hierarchy offers the controllers; on a host whose
//! memory, pids and cpu controllers are bound to cgroup v1 hierarchies (hybrid mode), to
//! per-workload v1 groups below `<v1 mount>/<instance>/<q>/<workload>`.

use std::{
    collections::BTreeMap,
    fs,
    os::{fd::OwnedFd, unix::process::ExitStatusExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::info;

use crate::plans::{Resources, RestartPolicy};

mod cgroups;
mod run;

pub use cgroups::{
    apply_capacity, capacity_v1_procs, memory_bytes, remove_instance_v1_cgroups, remove_v1_group,
};
use cgroups::{io, prepare_cgroups, remove_v1_cgroups};
use run::{run, run_adopted};

/// Where cgroup v1 controllers are mounted on hybrid hosts.
const V1_ROOT: &str = "/sys/fs/cgroup";
const CFS_PERIOD_US: u64 = 100_000;
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(200);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Everything needed to start one workload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Spec {
    /// `<quadrant>/<workload>`.
    pub key: String,
    /// Instance name (v1 cgroup paths).
    pub instance: String,
    /// Quadrant name.
    pub quadrant: String,
    /// Workload name.
    pub workload: String,
    /// Plan generation.
    pub generation: u64,
    /// The executable (a verified artifact).
    pub executable: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment (`SPIFFE_ENDPOINT_SOCKET` is added).
    pub env: BTreeMap<String, String>,
    /// Limits.
    pub resources: Resources,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// The workload's cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Named network namespace of the quadrant.
    pub netns: String,
    /// `unix://…` Workload API endpoint of the quadrant.
    pub endpoint: String,
    /// The lane broker's socket (`QUADRANT_LANE_SOCKET`).
    pub lane_socket: PathBuf,
    /// Output file.
    pub log: PathBuf,
    /// Start it without `CAP_NET_RAW` (its quadrant's policy names single workloads).
    #[serde(default)]
    pub drop_net_raw: bool,
}

/// What `quadrant workloads` shows.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Status {
    /// `<quadrant>/<workload>`.
    pub name: String,
    /// Generation running.
    pub generation: u64,
    /// Current pid while running.
    pub pid: Option<u32>,
    /// `running`, `exited`, `stopped`, `failed`.
    pub state: String,
    /// How the last run ended.
    pub last_exit: Option<String>,
    /// Restarts so far.
    pub restarts: u32,
    /// Exited, and waiting out the backoff before the restart its policy asks for.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart_pending: bool,
    /// Where limits were applied (`cgroup v2` or `cgroup v1`).
    pub limits: String,
    /// Output file.
    pub log: PathBuf,
}

/// A workload handed from an agent that stops with `--keep-dataplane` (or was killed) to the
/// next one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Handover {
    /// What it runs.
    pub spec: Spec,
    /// Its process; none when it was waiting to be restarted (the next agent starts it).
    pub pid: Option<u32>,
    /// Restarts so far.
    pub restarts: u32,
    /// Where its limits were applied.
    pub limits: String,
}

/// What the supervisor asks of a workload's task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Control {
    Run,
    /// Stop the process (SIGTERM, then SIGKILL).
    Stop,
    /// Leave the process running and let go of it (handover).
    Detach,
}

struct Entry {
    spec: Spec,
    status: Mutex<Status>,
    stop: watch::Sender<Control>,
    done: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The workloads of one agent.
#[derive(Default)]
pub struct Supervisor {
    entries: Mutex<BTreeMap<String, Arc<Entry>>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("workloads", &self.list().len())
            .finish()
    }
}

/// Errors of starting a workload.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A cgroup, namespace or log step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// No such workload.
    #[error("no workload {0}; see `quadrant workloads`")]
    Unknown(String),
    /// A handed-over workload cannot be adopted.
    #[error("cannot adopt workload {name} (pid {pid}): {reason}")]
    Adopt {
        /// `<quadrant>/<workload>`.
        name: String,
        /// Its process.
        pid: u32,
        /// Why.
        reason: String,
    },
}

impl Supervisor {
    /// Starts `spec` (replacing a running workload of the same name: an upgrade).
    pub async fn start(&self, spec: Spec) -> Result<(), WorkloadError> {
        let old = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&spec.key);
        if let Some(old) = old {
            stop_entry(&old).await;
        }
        // Filesystem work (cgroups, their limits, the log directory) off the runtime threads.
        let prepared = spec.clone();
        let (procs, limits) = tokio::task::spawn_blocking(move || {
            let cgroups = prepare_cgroups(&prepared)?;
            if let Some(dir) = prepared.log.parent() {
                fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
            }
            Ok::<_, WorkloadError>(cgroups)
        })
        .await
        .map_err(|e| WorkloadError::Io {
            what: "cannot prepare the cgroups of",
            path: spec.cgroup.clone(),
            source: std::io::Error::other(e),
        })??;
        let (stop_tx, stop_rx) = watch::channel(Control::Run);
        let entry = Arc::new(Entry {
            spec: spec.clone(),
            status: Mutex::new(Status {
                name: spec.key.clone(),
                generation: spec.generation,
                pid: None,
                state: "starting".into(),
                last_exit: None,
                restarts: 0,
                restart_pending: false,
                limits,
                log: spec.log.clone(),
            }),
            stop: stop_tx,
            done: Mutex::new(None),
        });
        let task = tokio::spawn(run(spec.clone(), procs, Arc::clone(&entry), stop_rx));
        self.insert(entry, task);
        Ok(())
    }

    fn insert(&self, entry: Arc<Entry>, task: tokio::task::JoinHandle<()>) {
        *entry
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(entry.spec.key.clone(), entry);
    }

    /// Lets go of every running workload, leaving its process running, and returns what the
    /// next agent needs to supervise it ([`Self::adopt`]). Workloads not running are dropped.
    pub async fn hand_over(&self) -> Vec<Handover> {
        let entries: Vec<Arc<Entry>> = std::mem::take(
            &mut *self
                .entries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_values()
        .collect();
        let mut out = Vec::new();
        for e in entries {
            signal_entry(&e, Control::Detach).await;
            let status = e
                .status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            // Detached: running (a pid), or between an exit and its restart (none).
            if status.state == "detached" {
                out.push(Handover {
                    spec: e.spec.clone(),
                    pid: status.pid,
                    restarts: status.restarts,
                    limits: status.limits,
                });
            }
        }
        out
    }

    /// What [`Self::hand_over`] would hand over, without letting go: every workload whose
    /// process runs now. The agent records it so that the agent started after a crash can take
    /// the workloads over.
    #[must_use]
    pub fn snapshot(&self) -> Vec<Handover> {
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<Handover> = entries
            .values()
            .filter_map(|e| {
                let status = e
                    .status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                // Running (its pid), or waiting to be restarted (none: the next agent starts it).
                let pid = match (status.state.as_str(), status.pid) {
                    ("running", Some(pid)) => Some(pid),
                    ("exited", _) if status.restart_pending => None,
                    _ => return None,
                };
                Some(Handover {
                    spec: e.spec.clone(),
                    pid,
                    restarts: status.restarts,
                    limits: status.limits,
                })
            })
            .collect();
        out.sort_by(|a, b| a.spec.key.cmp(&b.spec.key));
        out
    }

    /// Supervises a workload an earlier agent handed over: its process must still run in the
    /// workload's cgroup. When it exits (its status is not known to a process that is not its
    /// parent, so it counts as a failure) the restart policy applies as usual.
    pub fn adopt(&self, h: Handover) -> Result<(), WorkloadError> {
        let Some(pid) = h.pid else {
            return Err(WorkloadError::Adopt {
                name: h.spec.key.clone(),
                pid: 0,
                reason: "it was waiting to be restarted: it has no process to adopt".into(),
            });
        };
        let gone = |what: &str| WorkloadError::Adopt {
            name: h.spec.key.clone(),
            pid,
            reason: what.to_owned(),
        };
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|e| gone(&format!("no such process ({e})")))?;
        // `<quadrant instance>/<workload>`: `px/api`, or `px-2/api` for one placed on instance 2.
        let leaf = Path::new(cgroups::instance_dir(&h.spec)).join(&h.spec.workload);
        if !cgroup
            .lines()
            .filter_map(|l| l.strip_prefix("0::"))
            .any(|p| Path::new(p).ends_with(&leaf))
        {
            return Err(gone("the process is not in the workload's cgroup"));
        }
        // SAFETY: pidfd_open(2) with a pid and no flags; the result is a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = i32::try_from(fd)
            .ok()
            .filter(|fd| *fd >= 0)
            .ok_or_else(|| gone(&std::io::Error::last_os_error().to_string()))?;
        // SAFETY: a fresh descriptor nobody else owns.
        let pidfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same until it is
        // dropped.
        let pidfd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| gone(&e.to_string()))?;
        let (stop_tx, stop_rx) = watch::channel(Control::Run);
        let entry = Arc::new(Entry {
            spec: h.spec.clone(),
            status: Mutex::new(Status {
                name: h.spec.key.clone(),
                generation: h.spec.generation,
                pid: Some(pid),
                state: "running".into(),
                last_exit: None,
                restarts: h.restarts,
                restart_pending: false,
                limits: h.limits,
                log: h.spec.log.clone(),
            }),
            stop: stop_tx,
            done: Mutex::new(None),
        });
        info!(workload = %h.spec.key, pid, "adopted a workload handed over by the previous agent");
        let task = tokio::spawn(run_adopted(h.spec, pid, pidfd, Arc::clone(&entry), stop_rx));
        self.insert(entry, task);
        Ok(())
    }

    /// Stops workload `name` (`<quadrant>/<workload>`).
    pub async fn stop(&self, name: &str) -> Result<Status, WorkloadError> {
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| WorkloadError::Unknown(name.to_owned()))?;
        stop_entry(&entry).await;
        let status = entry
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok(status)
    }

    /// Stops everything (agent shutdown).
    pub async fn stop_all(&self) {
        let entries: Vec<Arc<Entry>> = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for e in entries {
            stop_entry(&e).await;
        }
    }

    /// Every workload's key, cgroup and resources (where placement counts it).
    #[must_use]
    pub fn placed(&self) -> Vec<(String, PathBuf, Resources)> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|e| {
                (
                    e.spec.key.clone(),
                    e.spec.cgroup.clone(),
                    e.spec.resources.clone(),
                )
            })
            .collect()
    }

    /// Every workload's status.
    #[must_use]
    pub fn list(&self) -> Vec<Status> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|e| {
                e.status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            })
            .collect()
    }

    /// The status of `name`.
    pub fn get(&self, name: &str) -> Result<Status, WorkloadError> {
        self.list()
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| WorkloadError::Unknown(name.to_owned()))
    }
}

async fn stop_entry(entry: &Entry) {
    signal_entry(entry, Control::Stop).await;
}

/// Asks the entry's task to stop or detach and waits until it has.
async fn signal_entry(entry: &Entry, control: Control) {
    let _ = entry.stop.send(control);
    let task = entry
        .done
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(task) = task {
        let _ = task.await;
    }
}

fn set(entry: &Entry, f: impl FnOnce(&mut Status)) {
    f(&mut entry
        .status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner));
}

fn describe(status: std::process::ExitStatus) -> (bool, String) {
    match (status.code(), status.signal()) {
        (Some(0), _) => (true, "exit 0".into()),
        (Some(c), _) => (false, format!("exit {c}")),
        (None, Some(s)) => (false, format!("signal {s}")),
        (None, None) => (false, "unknown".into()),
    }
}
