//! Serving: the control socket, the Workload API and SVID rotation, the lane broker and the
//! verdict trace run until SIGINT/SIGTERM or a `down` request; SIGHUP and a watched
//! `policy_dir` reload the policy on a blocking thread meanwhile. Then the answer to `down`:
//! everything removed, or the dataplane kept for the next agent.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, sync::Arc};

use dataplane_common::Quadrant;
use tokio::{
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{info, warn};

use super::{
    DaemonError, Stopped,
    agent::{Agent, locked},
    teardown,
};
use crate::{
    control::{
        Response, StatusReport,
        server::{self, DownRequest},
    },
    identity::workload_api,
    sys, workloads,
};

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

/// How often the lanes' counts are read: every 20 ms while lanes are open (or closed within the
/// last second) and the agent computes breaker ratios, so that a trip reaches the kernel within
/// about that (P7); otherwise at the SLOs' tick. The SLO summary admission reads is refreshed
/// at the SLOs' tick.
fn sample_every(agent: &Agent) -> std::time::Duration {
    if agent.broker.trips_enabled() && agent.broker.has_lanes() {
        std::time::Duration::from_millis(20).min(agent.slo.tick())
    } else {
        agent.slo.tick()
    }
}

/// Feeds the SLO windows and judges the service breakers (see [`sample_every`]) until `stop`
/// fires; an opened lane ends a slow wait at once (not a fast one: a node opening thousands of
/// lanes a second would otherwise sum every lane's counts after each open, under the broker's
/// lock that opens take).
async fn sample_slos(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    let mut summarized = tokio::time::Instant::now();
    loop {
        let every = sample_every(&agent);
        let fast = every < agent.slo.tick();
        tokio::select! {
            _ = stop.changed() => return,
            () = agent.broker.lane_opened.notified(), if !fast => {}
            () = tokio::time::sleep(every) => {}
        }
        let summarize = summarized.elapsed() >= agent.slo.tick();
        if summarize {
            summarized = tokio::time::Instant::now();
        }
        let a = Arc::clone(&agent);
        let _ = tokio::task::spawn_blocking(move || a.sample_slos(summarize)).await;
    }
}

/// Pings the lane listeners every [`crate::lanes::broker::ping::PING_INTERVAL`] until `stop`
/// fires (a round takes the broker's lock briefly and never waits for a listener).
async fn ping_listeners(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(crate::lanes::broker::ping::PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => agent.broker.ping_listeners(),
        }
    }
}

/// How often the instances' readiness for the services with a VIP is probed.
const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// How often the outside flows whose connection ended without a FIN or RST are collected.
const FLOW_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Starts the collector of ended outside flows (`loader::expire_flows`): a thread of its
/// own working on the pinned maps, one pass every [`FLOW_GC_INTERVAL`] until the agent stops.
fn collect_flows(agent: &Arc<Agent>, stop: watch::Receiver<bool>) -> Result<(), DaemonError> {
    let pins = agent.config.bpffs_dir();
    let timeout = std::time::Duration::from_secs(u64::from(agent.config.conntrack_timeout_secs));
    std::thread::Builder::new()
        .name("flow-gc".into())
        .spawn(move || {
            while !*stop.borrow() {
                if let Err(e) = crate::loader::expire_flows(&pins, timeout) {
                    tracing::warn!(error = %e, "cannot collect the ended outside flows");
                }
                std::thread::sleep(FLOW_GC_INTERVAL);
            }
        })
        .map(|_| ())
        .map_err(|e| {
            DaemonError::from(sys::io_err(
                "cannot start the flow collector",
                Path::new(""),
            )(e))
        })
}

/// Starts the readiness probes of the services with a VIP: a thread of its own (it enters the
/// instances' namespaces), one round every [`PROBE_INTERVAL`] until the agent stops.
fn probe_instances(agent: &Arc<Agent>, stop: watch::Receiver<bool>) -> Result<(), DaemonError> {
    let weak = Arc::downgrade(agent);
    std::thread::Builder::new()
        .name("instance-probe".into())
        .spawn(move || {
            loop {
                if *stop.borrow() {
                    break;
                }
                let Some(agent) = weak.upgrade() else { break };
                let started = std::time::Instant::now();
                if let Err(e) =
                    crate::scale::probe_round(&agent.config, &agent.instances, &agent.dataplane)
                {
                    tracing::error!(error = %e, "instance probes stopped");
                    break;
                }
                drop(agent);
                std::thread::sleep(PROBE_INTERVAL.saturating_sub(started.elapsed()));
            }
        })
        .map(|_| ())
        .map_err(|e| {
            DaemonError::from(sys::io_err(
                "cannot start the instance probes",
                Path::new(""),
            )(e))
        })
}

pub(super) async fn serve(
    agent: Arc<Agent>,
    metrics: Option<tokio::net::TcpListener>,
    ready: impl FnOnce(&StatusReport),
) -> Result<Stopped, DaemonError> {
    let socket = agent.config.socket_path();
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(sys::io_err("cannot listen on", &socket))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
        .map_err(sys::io_err("cannot restrict", &socket))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(listener) = metrics {
        serve_metrics(&agent, listener, &stop_rx);
    }
    start_identity_services(&agent, &stop_rx)?;
    if let Some(ring) = locked(&agent.trace).take() {
        tokio::spawn(crate::flows::follow(
            ring,
            Arc::clone(&agent.flows),
            stop_rx.clone(),
        ));
    }
    tokio::spawn(sample_slos(Arc::clone(&agent), stop_rx.clone()));
    tokio::spawn(record_workloads(Arc::clone(&agent), stop_rx.clone()));
    tokio::spawn(ping_listeners(Arc::clone(&agent), stop_rx.clone()));
    if !agent.config.services.is_empty() {
        probe_instances(&agent, stop_rx.clone())?;
        collect_flows(&agent, stop_rx.clone())?;
    }
    if let Some(ring) = locked(&agent.breaker_events).take() {
        tokio::spawn(crate::breakers::follow(
            ring,
            agent.config.clone(),
            Arc::clone(&agent.events),
            Arc::clone(&agent.admission),
            stop_rx.clone(),
        ));
    }
    let lane_broker = agent.broker.serve().map_err(sys::io_err(
        "cannot serve lanes on",
        &agent.config.lane_socket(),
    ))?;
    let peers = crate::peers::Peers::start(&agent).map_err(DaemonError::Refused)?;
    if let Some(p) = &peers {
        agent.broker.set_peers(Arc::clone(p));
    }
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
    if let Some(p) = peers {
        let keep = matches!(pending_down, Some((_, true)));
        let _ = tokio::task::spawn_blocking(move || p.stop(!keep)).await;
    }
    // Stopped in order: what the record says is handed over (or stopped) now.
    let _ = fs::remove_file(agent.config.workloads_record_path());
    let handed = if matches!(pending_down, Some((_, true))) {
        agent.supervisor.hand_over().await
    } else {
        agent.supervisor.stop_all().await;
        Vec::new()
    };
    finish_down(&agent, pending_down, handed).await
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` (bound to `metrics.listen`).
fn serve_metrics(
    agent: &Arc<Agent>,
    listener: tokio::net::TcpListener,
    stop: &watch::Receiver<bool>,
) {
    if let Ok(local) = listener.local_addr() {
        let _ = agent.metrics_addr.set(local);
        info!(address = %local, "serving metrics");
    }
    tokio::spawn(crate::metrics::server::serve(
        listener,
        Arc::clone(agent),
        stop.clone(),
    ));
}

/// How often the supervised workloads are recorded for the agent after a crash.
const WORKLOADS_RECORD_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Records the supervised workloads ([`crate::workloads::Supervisor::snapshot`]) whenever they
/// change, atomically, in [`crate::config::Config::workloads_record_path`]: an agent killed
/// without a `down` leaves it for the next one, which takes the workloads over with the
/// dataplane.
async fn record_workloads(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    let path = agent.config.workloads_record_path();
    let mut last = None;
    loop {
        let snapshot = agent.supervisor.snapshot();
        if last.as_ref() != Some(&snapshot) {
            match serde_yaml::to_string(&snapshot) {
                Ok(text) => {
                    // Root only from its creation on: it holds the workloads' environment.
                    let written = sys::write_private_atomically(&path, text.as_bytes());
                    match written {
                        Ok(()) => last = Some(snapshot),
                        Err(e) => {
                            warn!(error = %e, path = %path.display(), "cannot record the workloads");
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot record the workloads"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(WORKLOADS_RECORD_INTERVAL) => {}
            _ = stop.changed() => break,
        }
    }
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
        let outages = Arc::clone(&agent.outages);
        tokio::spawn(async move {
            if let Err(e) = workload_api::serve(&path, q, service, outages, stop).await {
                warn!(quadrant = q.name(), socket = %path.display(), error = %e, "Workload API stopped");
            }
        });
    }
    Ok(())
}
