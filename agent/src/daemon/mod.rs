//! The daemon: `quadrant up` wires the services together and serves until SIGINT/SIGTERM or a
//! `down` request, then removes everything — or leaves the dataplane for the next agent.
//!
//! | module | concern |
//! |---|---|
//! | this file | `up`: takeover or cleanup, bring-up, the services, the main loop, shutdown |
//! | [`agent`] | the running agent's services, each with its own synchronisation |
//! | [`bringup`] | what `up` creates, in order, and [`bringup::teardown`] |
//! | [`accel`] | the lane acceleration's start-up decision |
//! | [`guards`] | signature and forward-only versions of the eBPF object |
//! | [`state`] | the state file |
//! | [`offline`] | what the CLI does to an instance itself: `down` after a crash, `exec` |

pub mod accel;
pub mod agent;
pub mod bringup;
pub mod guards;
pub mod offline;
pub mod state;

use std::{fs, os::unix::fs::PermissionsExt as _, path::PathBuf, sync::Arc};

use dataplane_common::Quadrant;
use tokio::{
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

pub use bringup::{QUADRANT_CGROUP_LEVEL, teardown};
pub use state::{State, require_root};

use self::agent::{Agent, locked};
use crate::{
    control::{
        Client, Response, StatusReport,
        server::{self, DownRequest},
    },
    identity::workload_api,
    loader::{KeptDataplane, LoaderError},
    plans,
    sys::{self, SysError},
    workloads,
};

/// Errors of the lifecycle commands.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The eBPF object's signature or versions are refused; nothing was loaded.
    #[error("dataplane refused: {0}")]
    Dataplane(String),
    /// Another agent of the same instance answers on the control socket.
    #[error(
        "an agent for instance {instance} is already running (control socket {socket}); stop it with `quadrant down`"
    )]
    AlreadyRunning {
        /// Instance name.
        instance: String,
        /// Socket path.
        socket: PathBuf,
    },
    /// Not root.
    #[error("quadrant {command} needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); run it with sudo")]
    NotRoot {
        /// The subcommand.
        command: &'static str,
    },
    /// No state file: nothing was brought up with this configuration.
    #[error("instance {instance} is not up (no state file {path}); start it with `quadrant up`")]
    NotUp {
        /// Instance name.
        instance: String,
        /// State file path.
        path: PathBuf,
    },
    /// Host plumbing failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// eBPF loading or attaching failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Control socket failure.
    #[error(transparent)]
    Client(#[from] crate::control::ClientError),
    /// The state file could not be written or read.
    #[error("state file {path}: {reason}")]
    State {
        /// Path.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// A request to an instance that cannot be met.
    #[error("{0}")]
    Refused(String),
    /// The dataplane an earlier agent kept running could not be taken over; nothing of it was
    /// changed.
    #[error(
        "{cause}\n(the dataplane kept by the previous agent was not changed and keeps enforcing; `quadrant down` removes it)"
    )]
    KeptDataplaneStays {
        /// Why.
        cause: Box<DaemonError>,
    },
    /// Bring-up failed and was rolled back.
    #[error("{cause}\n(rolled back: everything created so far was removed)")]
    RolledBack {
        /// The original error.
        cause: Box<DaemonError>,
    },
    /// Bring-up failed and the rollback failed too.
    #[error("{cause}\nrollback also failed: {rollback}; run `quadrant down` to finish cleaning up")]
    RollbackFailed {
        /// The original error.
        cause: Box<DaemonError>,
        /// The rollback error.
        rollback: Box<DaemonError>,
    },
}

/// How `up` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Everything was removed.
    Removed,
    /// The agent stopped; the quadrants and the dataplane keep running for the next agent.
    DataplaneKept,
}

/// Creates everything, then serves the control socket until SIGINT/SIGTERM or a `down` request,
/// then removes everything. `ready` is called once the quadrants are up.
pub async fn up(
    config: crate::config::Config,
    ready: impl FnOnce(&StatusReport),
) -> Result<Stopped, DaemonError> {
    require_root("up")?;
    let socket = config.socket_path();
    if Client::new(&socket).agent_running() {
        return Err(DaemonError::AlreadyRunning {
            instance: config.instance.clone(),
            socket,
        });
    }
    let c = config.clone();
    let (agent, handed) = tokio::task::spawn_blocking(move || start(&c))
        .await
        .map_err(|e| DaemonError::Refused(format!("bring-up failed: {e}")))??;
    let agent = Arc::new(agent);
    adopt_workloads(&agent, handed).await;
    let result = serve(Arc::clone(&agent), ready).await;
    if matches!(result, Ok(Stopped::DataplaneKept)) {
        return result;
    }
    let mounted = locked(&agent.state).mounted_cgroup2;
    let down = teardown(&agent.config, mounted);
    result.and(down.map(|_| Stopped::Removed))
}

/// Takes over a dataplane the previous agent kept running, or removes the leftovers of a
/// crashed one, then brings the instance up; a failed bring-up is rolled back. Returns the agent
/// and the workloads handed over with a kept dataplane.
fn start(config: &crate::config::Config) -> Result<(Agent, Vec<workloads::Handover>), DaemonError> {
    let mut kept = None;
    let mut handed = Vec::new();
    if let Some(stale) = State::read(config)? {
        if stale.dataplane_kept && bringup::same_dataplane(&stale.config, config) {
            info!(instance = %config.instance, map_layout = stale.map_layout, "taking over the dataplane the previous agent kept running");
            let dataplane = KeptDataplane::open(config, stale.map_layout).map_err(|e| {
                DaemonError::KeptDataplaneStays {
                    cause: Box::new(e.into()),
                }
            })?;
            kept = Some((dataplane, stale.mounted_cgroup2));
            handed = stale.workloads;
        } else {
            if stale.dataplane_kept {
                warn!(instance = %config.instance, "the kept dataplane was built from another configuration: removing it");
            } else {
                warn!(instance = %config.instance, "removing leftovers of an agent that did not shut down");
            }
            teardown(&stale.config, stale.mounted_cgroup2)?;
        }
    }
    if kept.is_none() {
        teardown(config, false)?;
    }
    match bringup::bring_up(config, kept) {
        Ok(agent) => Ok((agent, handed)),
        Err(e @ DaemonError::KeptDataplaneStays { .. }) => Err(e),
        Err(cause) => {
            let mounted = State::read(config)
                .ok()
                .flatten()
                .is_some_and(|s| s.mounted_cgroup2);
            Err(match teardown(config, mounted) {
                Ok(_) => DaemonError::RolledBack {
                    cause: Box::new(cause),
                },
                Err(rollback) => DaemonError::RollbackFailed {
                    cause: Box::new(cause),
                    rollback: Box::new(rollback),
                },
            })
        }
    }
}

/// Supervises the workloads the previous agent handed over with its dataplane; one whose process
/// is gone is started again when its restart policy says so.
async fn adopt_workloads(agent: &Agent, handed: Vec<workloads::Handover>) {
    for h in handed {
        let spec = h.spec.clone();
        if let Err(e) = agent.supervisor.adopt(h) {
            warn!(error = %e, "handed-over workload not adopted");
            if spec.restart != plans::RestartPolicy::Never
                && let Err(e) = agent.supervisor.start(spec).await
            {
                error!(error = %e, "cannot restart a handed-over workload");
            }
        }
    }
}

/// The SVID rotation task and one Workload API server per quadrant. Without the identity
/// service there is no Workload API: callers get "connection refused" rather than an identity.
fn start_identity_services(agent: &Agent, stop: &watch::Receiver<bool>) -> Result<(), DaemonError> {
    let dir = agent.config.workload_socket_dir();
    fs::create_dir_all(&dir).map_err(sys::io_err("cannot create", &dir))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
        .map_err(sys::io_err("cannot open up", &dir))?;
    let Some(identity) = agent.identity.as_ref().ok() else {
        return Ok(());
    };
    tokio::spawn(Arc::clone(identity).run_rotation(stop.clone()));
    for q in Quadrant::ALL {
        let path = agent.config.workload_socket(q);
        let (service, stop) = (Arc::clone(identity), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = workload_api::serve(&path, q, service, stop).await {
                warn!(quadrant = q.name(), socket = %path.display(), error = %e, "Workload API stopped");
            }
        });
    }
    Ok(())
}

/// Reloads the policy on a blocking thread (activations take turns inside the policy service);
/// the main loop goes on meanwhile.
fn reload_in_background(agent: &Arc<Agent>, why: &'static str) {
    let agent = Arc::clone(agent);
    tokio::task::spawn_blocking(move || {
        info!("{why}: reloading the policy");
        if let Err(e) = agent.reload_policy() {
            warn!(error = %e, "policy reload failed: the previous policy stays live");
        }
    });
}

async fn serve(
    agent: Arc<Agent>,
    ready: impl FnOnce(&StatusReport),
) -> Result<Stopped, DaemonError> {
    let socket = agent.config.socket_path();
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(sys::io_err("cannot listen on", &socket))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
        .map_err(sys::io_err("cannot restrict", &socket))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    start_identity_services(&agent, &stop_rx)?;
    if let Some(ring) = locked(&agent.trace).take() {
        tokio::spawn(crate::trace::follow(ring, stop_rx.clone()));
    }
    let lane_broker = agent.broker.serve().map_err(sys::io_err(
        "cannot serve lanes on",
        &agent.config.lane_socket(),
    ))?;
    let a = Arc::clone(&agent);
    let status = tokio::task::spawn_blocking(move || a.status())
        .await
        .map_err(|e| DaemonError::Refused(format!("status failed: {e}")))??;
    ready(&status);

    let (down_tx, mut down_rx) = mpsc::channel::<DownRequest>(1);
    let signal_err = |what| sys::io_err(what, &socket);
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(signal_err("cannot handle SIGINT on"))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(signal_err("cannot handle SIGHUP on"))?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(signal_err("cannot handle SIGTERM on"))?;
    let (reload_tx, mut reload_rx) = mpsc::channel::<()>(1);
    let _watcher = watch_policy(&agent.config, reload_tx);
    let mut pending_down = None;
    loop {
        tokio::select! {
            Some(()) = reload_rx.recv() => reload_in_background(&agent, "policy directory changed"),
            _ = sighup.recv() => reload_in_background(&agent, "SIGHUP"),
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            Some(requester) = down_rx.recv() => {
                info!(keep_dataplane = requester.1, "down requested");
                pending_down = Some(requester);
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (agent, down_tx) = (Arc::clone(&agent), down_tx.clone());
                    tokio::spawn(async move {
                        if let Err(e) = server::serve_connection(stream, agent, down_tx).await {
                            warn!(error = %e, "control connection failed");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "accept failed"),
            },
        }
    }
    drop(listener);
    lane_broker.stop();
    let _ = stop_tx.send(true);
    let handed = if matches!(pending_down, Some((_, true))) {
        agent.supervisor.hand_over().await
    } else {
        agent.supervisor.stop_all().await;
        Vec::new()
    };
    finish_down(&agent, pending_down, handed).await
}

/// After the services stopped: answers a `down` request — removing everything, or keeping the
/// dataplane for the next agent.
async fn finish_down(
    agent: &Agent,
    pending_down: Option<(UnixStream, bool)>,
    handed: Vec<workloads::Handover>,
) -> Result<Stopped, DaemonError> {
    let Some((mut requester, keep)) = pending_down else {
        return Ok(Stopped::Removed);
    };
    let (response, result) = if keep {
        let handed_over_workloads = handed.iter().map(|h| h.spec.key.clone()).collect();
        // The quadrants, pins and links stay; the state file tells the next `up` to take them
        // over.
        let mut state = locked(&agent.state);
        state.dataplane_kept = true;
        state.workloads = handed;
        let result = state.write();
        let map_layout = state.map_layout;
        drop(state);
        let _ = fs::remove_file(agent.config.socket_path());
        let response = match &result {
            Ok(()) => Response::DataplaneKept {
                pin_dir: agent.config.bpffs_dir(),
                map_layout,
                handed_over_workloads,
            },
            Err(e) => Response::Error {
                message: format!("cannot record the kept dataplane: {e}"),
            },
        };
        (response, result.map(|()| Stopped::DataplaneKept))
    } else {
        // The requester gets its answer once everything is removed.
        let mounted = locked(&agent.state).mounted_cgroup2;
        let result = teardown(&agent.config, mounted);
        let response = match &result {
            Ok(removed) => Response::Down {
                removed: removed.clone(),
            },
            Err(e) => Response::Error {
                message: format!("teardown failed: {e}"),
            },
        };
        (response, result.map(|_| Stopped::Removed))
    };
    if let Err(e) = server::write_response(&mut requester, &response).await {
        warn!(error = %e, "cannot answer the down request");
    }
    result
}

/// Watches `policy_dir` when `watch_policy_dir` is set; each burst of changes sends on `reload`.
fn watch_policy(
    config: &crate::config::Config,
    reload: mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    let dir = config
        .policy_dir
        .as_ref()
        .filter(|_| config.watch_policy_dir)?;
    match crate::policy::watch::watch(dir, reload) {
        Ok(w) => {
            info!(dir = %dir.display(), "watching the policy directory");
            Some(w)
        }
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot watch the policy directory; reload with `quadrant policy reload` or SIGHUP");
            None
        }
    }
}
