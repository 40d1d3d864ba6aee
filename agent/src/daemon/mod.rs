//! The daemon: `quadrant up` wires the services together and serves until SIGINT/SIGTERM or a
//! `down` request, then removes everything — or leaves the dataplane for the next agent.
//!
//! | module | concern |
//! |---|---|
//! | this file | `up`: takeover of a kept dataplane or cleanup of a crashed agent's leftovers, bring-up (rolled back on failure), adoption of handed-over workloads, teardown |
//! | [`serve`] | the services and the main loop until SIGINT/SIGTERM or `down`; the answer to `down` |
//! | [`mod@error`] | [`DaemonError`] |
//! | [`agent`] | the running agent's services, each with its own synchronisation |
//! | [`bringup`] | what `up` creates, in order, and [`bringup::teardown`] |
//! | [`accel`] | the lane acceleration's start-up decision |
//! | [`guards`] | signature and forward-only versions of the eBPF object |
//! | [`state`] | the state file |
//! | [`offline`] | what the CLI does to an instance itself: `down` after a crash, `exec` |

pub mod accel;
pub mod agent;
pub mod bringup;
pub mod error;
pub mod guards;
pub mod offline;
pub mod serve;
pub mod state;

use std::{fs, os::unix::ffi::OsStrExt as _, path::Path, sync::Arc};

use tracing::{error, info, warn};

pub use agent::locked;
pub use bringup::{QUADRANT_CGROUP_LEVEL, teardown};
pub use error::DaemonError;
pub use state::{State, require_root};

use self::agent::Agent;
use crate::{
    control::{Client, StatusReport},
    loader::KeptDataplane,
    plans, workloads,
};

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
    // Before anything is created: a metrics address that is taken stops the start here.
    let metrics =
        match config.metrics.listen {
            Some(addr) => Some(crate::metrics::server::bind(addr).await.map_err(|e| {
                DaemonError::Refused(format!("cannot serve metrics on {addr}: {e}"))
            })?),
            None => None,
        };
    // Kubernetes nodes: pods of the runtime's network reach this agent through quadrant-cni.
    if config.cni.install {
        let (path, changed) = crate::cni::conflist::install(
            &config.cni.conf_dir,
            config.cni.quadrant.as_deref(),
            &config.socket_path(),
        )
        .map_err(|e| DaemonError::Refused(format!("cannot chain quadrant-cni: {e}")))?;
        if changed {
            tracing::info!(conflist = %path.display(), "quadrant-cni chained");
        }
    }
    let c = config.clone();
    let (agent, handed) = tokio::task::spawn_blocking(move || start(&c))
        .await
        .map_err(|e| DaemonError::Refused(format!("bring-up failed: {e}")))??;
    let agent = Arc::new(agent);
    adopt_workloads(&agent, handed).await;
    // The pods an earlier agent attached (their veths still there), and the DELs queued while
    // no agent ran.
    let a = Arc::clone(&agent);
    let pods = tokio::task::spawn_blocking(move || {
        let n = a.pods.restore(&a.config, &a.dataplane);
        a.flows.set_pods(&a.pods.list());
        n
    })
    .await
    .unwrap_or_default();
    if pods > 0 {
        tracing::info!(pods, "pods attached again");
    }
    let result = serve::serve(Arc::clone(&agent), metrics, ready).await;
    if matches!(result, Ok(Stopped::DataplaneKept)) {
        return result;
    }
    if agent.config.cni.install {
        match crate::cni::conflist::uninstall(&agent.config.cni.conf_dir) {
            Ok(files) => {
                for f in files {
                    tracing::info!(conflist = %f.display(), "quadrant-cni taken out");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot take quadrant-cni out of the conflist"),
        }
    }
    let mounted = locked(&agent.state).mounted_cgroup2;
    let down = teardown(&agent.config, mounted);
    result.and(down.map(|_| Stopped::Removed))
}

/// Whether process `pid` is a `quadrant` (the agent that wrote a state file; a pid reused by
/// another program is not).
#[must_use]
pub fn is_agent(pid: u32) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    Path::new(std::ffi::OsStr::from_bytes(argv0))
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("quadrant"))
}

/// The workloads a crashed agent recorded last (none when it recorded none).
fn recorded_workloads(config: &crate::config::Config) -> Vec<workloads::Handover> {
    let path = config.workloads_record_path();
    let handed = fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_yaml::from_str(&t).ok())
        .unwrap_or_default();
    let _ = fs::remove_file(&path);
    handed
}

/// Takes over a dataplane the previous agent kept running — or left running when it was killed
/// (a crash: its programs stay attached and enforcing; this agent takes them over with their
/// flows, breakers and the workloads it recorded) —, or removes the leftovers of one whose
/// dataplane cannot be taken over, then brings the instance up; a failed bring-up is rolled
/// back. Returns the agent and the workloads handed over.
fn start(config: &crate::config::Config) -> Result<(Agent, Vec<workloads::Handover>), DaemonError> {
    let mut kept = None;
    let mut handed = Vec::new();
    if let Some(stale) = State::read(config)? {
        let crashed = !stale.dataplane_kept && !is_agent(stale.pid);
        let crash_takeover = crashed
            && bringup::same_dataplane(&stale.config, config)
            && match KeptDataplane::open(config, stale.map_layout) {
                Ok(dataplane) => {
                    warn!(instance = %config.instance, pid = stale.pid, map_layout = stale.map_layout, "the previous agent was killed: taking over the dataplane it left enforcing");
                    kept = Some((dataplane, stale.mounted_cgroup2));
                    handed = recorded_workloads(config);
                    true
                }
                Err(e) => {
                    warn!(instance = %config.instance, error = %e, "the dataplane a killed agent left cannot be taken over");
                    false
                }
            };
        if !crash_takeover && stale.dataplane_kept && bringup::same_dataplane(&stale.config, config)
        {
            info!(instance = %config.instance, map_layout = stale.map_layout, "taking over the dataplane the previous agent kept running");
            let dataplane = KeptDataplane::open(config, stale.map_layout).map_err(|e| {
                DaemonError::KeptDataplaneStays {
                    cause: Box::new(e.into()),
                }
            })?;
            kept = Some((dataplane, stale.mounted_cgroup2));
            handed = stale.workloads;
        } else if !crash_takeover {
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
        // A shadow generation's comparison (its baselines, its mirroring) does not survive the
        // hand-over: it is stopped, and recorded as rejected; its generation stays spent.
        if let Some(live) = spec
            .key
            .strip_suffix(crate::identity::attest::SHADOW_SUFFIX)
        {
            let adopted = agent.supervisor.adopt(h).is_ok();
            if adopted {
                let _ = agent.supervisor.stop(&spec.key).await;
            }
            warn!(
                workload = live,
                generation = spec.generation,
                "the shadow generation handed over is stopped: a shadow does not outlive its agent"
            );
            let record = serde_json::json!({
                "action": crate::shadow::Decision::Rejected, "workload": live,
                "generation": spec.generation, "reason": "agent upgrade",
            });
            if let Err(e) = agent.admission.record("shadow", record) {
                warn!(error = %e, "shadow stop not audited");
            }
            continue;
        }
        if h.pid.is_none() {
            info!(workload = %spec.key, "starting a handed-over workload that was waiting to be restarted");
            if let Err(e) = agent.supervisor.start(spec).await {
                error!(error = %e, "cannot restart a handed-over workload");
            }
            continue;
        }
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
