//! The agent's lifecycle: `up` (create, load, attach, serve, tear down), `down`, and the state
//! file that lets `down` and `exec` find what `up` created, even after a crash.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use dataplane_common::Quadrant;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{Mutex, mpsc},
};
use tracing::{error, info, warn};

use crate::{
    admission::{Admission, Prepared, pem_chain},
    api::{self, QuadrantStatus, Request, Response, StatusReport},
    artifacts::ArtifactStore,
    audit::AuditLog,
    config::{CompiledPolicy, Config},
    generations::Generations,
    identity::{IdentityService, attest, ca, workload_api},
    lanes::broker::Broker,
    loader::{AttachedProgram, Carried, Dataplane, KeptDataplane, LoaderError, WorkloadRules},
    plans,
    policy::PolicyBundle,
    quadrants::{self, QuadrantHandle},
    signing::TrustStore,
    sys::{self, SysError},
    workloads::{self, Supervisor},
};

/// Depth of `<cgroup2>/<instance>/<quadrant>` below the cgroup2 root.
pub const QUADRANT_CGROUP_LEVEL: u32 = 2;

/// Errors of the lifecycle commands.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
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
    Client(#[from] api::ClientError),
    /// The state file could not be written or read.
    #[error("state file {path}: {reason}")]
    State {
        /// Path.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// The agent answered with an error.
    #[error("agent: {0}")]
    Agent(String),
    /// The dataplane an earlier agent kept running could not be taken over; nothing of it was
    /// changed.
    #[error(
        "{cause}\n(the dataplane kept by the previous agent was not changed and keeps enforcing; `quadrant down` removes it)"
    )]
    KeptDataplaneStays {
        /// Why.
        cause: Box<AppError>,
    },
    /// Bring-up failed and was rolled back.
    #[error("{cause}\n(rolled back: everything created so far was removed)")]
    RolledBack {
        /// The original error.
        cause: Box<AppError>,
    },
    /// Bring-up failed and the rollback failed too.
    #[error("{cause}\nrollback also failed: {rollback}; run `quadrant down` to finish cleaning up")]
    RollbackFailed {
        /// The original error.
        cause: Box<AppError>,
        /// The rollback error.
        rollback: Box<AppError>,
    },
}

/// What `up` records before it creates anything.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// The configuration the instance runs with.
    pub config: Config,
    /// Whether the agent mounted the cgroup2 hierarchy (then `down` unmounts it).
    pub mounted_cgroup2: bool,
    /// Process id of the agent.
    pub pid: u32,
    /// Whether the agent stopped and left the quadrants and the dataplane running for the next
    /// agent to take over (`quadrant down --keep-dataplane`).
    #[serde(default)]
    pub dataplane_kept: bool,
    /// Map layout of the running dataplane (0: written by an agent that did not record it).
    #[serde(default)]
    pub map_layout: u32,
    /// Running workloads handed to the next agent with the kept dataplane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<workloads::Handover>,
}

impl State {
    /// Reads the state file of `config`'s instance, if there is one.
    pub fn read(config: &Config) -> Result<Option<Self>, AppError> {
        let path = config.state_path();
        match fs::read_to_string(&path) {
            Ok(text) => serde_yaml::from_str(&text)
                .map(Some)
                .map_err(|e| AppError::State {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AppError::State {
                path,
                reason: e.to_string(),
            }),
        }
    }

    fn write(&self) -> Result<(), AppError> {
        let path = self.config.state_path();
        let err = |e: &dyn std::fmt::Display| AppError::State {
            path: path.clone(),
            reason: e.to_string(),
        };
        let text = serde_yaml::to_string(self).map_err(|e| err(&e))?;
        let tmp = path.with_extension("tmp");
        // Root only: it names the workloads handed over with their environment.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| err(&e))?;
        file.write_all(text.as_bytes()).map_err(|e| err(&e))?;
        fs::rename(&tmp, &path).map_err(|e| err(&e))
    }
}

/// Fails unless the process runs as root.
pub fn require_root(command: &'static str) -> Result<(), AppError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(AppError::NotRoot { command })
    }
}

/// What `up` holds while it runs.
struct Running {
    config: Config,
    state: State,
    dataplane: Dataplane,
    handles: Vec<QuadrantHandle>,
    attached: Vec<Vec<AttachedProgram>>,
    identity: Result<Arc<IdentityService>, String>,
    policy_state: String,
    admission: Admission,
    generations: Result<Generations, String>,
    supervisor: Supervisor,
    lanes: Arc<Broker>,
    events: Arc<crate::events::EventBus>,
    carried: Option<Carried>,
    accel: Accel,
    /// The verdict trace's ring buffer, until `serve` starts reading it.
    trace: Option<aya::maps::RingBuf<aya::maps::MapData>>,
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
pub async fn up(config: Config, ready: impl FnOnce(&StatusReport)) -> Result<Stopped, AppError> {
    require_root("up")?;
    let socket = config.socket_path();
    if api::agent_running(&socket) {
        return Err(AppError::AlreadyRunning {
            instance: config.instance.clone(),
            socket,
        });
    }
    // A dataplane the previous agent kept running is taken over; leftovers of a crashed agent
    // of this instance (with the configuration it ran with) are removed, then anything this
    // configuration's names still point at.
    let mut kept = None;
    let mut handed = Vec::new();
    if let Some(stale) = State::read(&config)? {
        if stale.dataplane_kept && same_dataplane(&stale.config, &config) {
            info!(instance = %config.instance, map_layout = stale.map_layout, "taking over the dataplane the previous agent kept running");
            let dataplane = KeptDataplane::open(&config, stale.map_layout).map_err(|e| {
                AppError::KeptDataplaneStays {
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
        teardown(&config, false)?;
    }

    let running = match bring_up(&config, kept) {
        Ok(r) => r,
        Err(e @ AppError::KeptDataplaneStays { .. }) => return Err(e),
        Err(cause) => {
            let mounted = State::read(&config)
                .ok()
                .flatten()
                .is_some_and(|s| s.mounted_cgroup2);
            return Err(match teardown(&config, mounted) {
                Ok(_) => AppError::RolledBack {
                    cause: Box::new(cause),
                },
                Err(rollback) => AppError::RollbackFailed {
                    cause: Box::new(cause),
                    rollback: Box::new(rollback),
                },
            });
        }
    };
    adopt_workloads(&running, handed).await;
    let running = Arc::new(Mutex::new(running));
    let result = serve(Arc::clone(&running), ready).await;
    if matches!(result, Ok(Stopped::DataplaneKept)) {
        return result;
    }
    let guard = running.lock().await;
    let down = teardown(&guard.config, guard.state.mounted_cgroup2);
    result.and(down.map(|_| Stopped::Removed))
}

/// Supervises the workloads the previous agent handed over with its dataplane; one whose process
/// is gone is started again when its restart policy says so.
async fn adopt_workloads(running: &Running, handed: Vec<workloads::Handover>) {
    for h in handed {
        let spec = h.spec.clone();
        if let Err(e) = running.supervisor.adopt(h) {
            warn!(error = %e, "handed-over workload not adopted");
            if spec.restart != plans::RestartPolicy::Never
                && let Err(e) = running.supervisor.start(spec).await
            {
                error!(error = %e, "cannot restart a handed-over workload");
            }
        }
    }
}

/// Whether two configurations name the same quadrants, interfaces, cgroups, pins and XDP mode,
/// so that an agent started with `b` can take over the dataplane one with `a` kept running.
fn same_dataplane(a: &Config, b: &Config) -> bool {
    a.instance == b.instance
        && a.bpffs_dir() == b.bpffs_dir()
        && a.cgroup2 == b.cgroup2
        && a.xdp_mode == b.xdp_mode
        && Quadrant::ALL.iter().all(|&q| {
            a.netns(q) == b.netns(q)
                && a.host_iface(q) == b.host_iface(q)
                && a.addrs(q) == b.addrs(q)
                && a.cgroup_dir(q) == b.cgroup_dir(q)
        })
}

/// What bring-up prepares before it changes anything: with a kept dataplane, everything up to
/// here leaves the running quadrants as they are.
struct Loaded {
    state: State,
    generations: Result<Generations, String>,
    dataplane: Dataplane,
    identity: Result<Arc<IdentityService>, String>,
    policy_state: String,
    /// The kept quadrants (takeover only).
    adopted: Vec<QuadrantHandle>,
}

#[allow(clippy::too_many_lines)] // one step after the other, in order
fn load(
    config: &Config,
    kept: Option<&mut KeptDataplane>,
    kept_mounted_cgroup2: bool,
) -> Result<Loaded, AppError> {
    fs::create_dir_all(&config.state_dir)
        .map_err(sys::io_err("cannot create", &config.state_dir))?;
    // Traversable (the Workload API sockets live below it) but not listable; the control socket
    // itself is 0600.
    fs::set_permissions(&config.state_dir, fs::Permissions::from_mode(0o711))
        .map_err(sys::io_err("cannot restrict", &config.state_dir))?;
    sys::ensure_bpffs(&config.bpffs)?;
    let mounted_cgroup2 = sys::ensure_cgroup2(&config.cgroup2)? || kept_mounted_cgroup2;
    let state = State {
        config: config.clone(),
        mounted_cgroup2,
        pid: std::process::id(),
        // Until the takeover is complete, a later `up` still finds the kept dataplane.
        dataplane_kept: kept.is_some(),
        workloads: Vec::new(),
        map_layout: kept
            .as_ref()
            .map_or(dataplane_common::MAP_LAYOUT_VERSION, |k| k.layout()),
    };
    state.write()?;
    let parent = config.cgroup_parent();
    fs::create_dir_all(&parent).map_err(sys::io_err("cannot create cgroup", &parent))?;

    let mut generations = Generations::open(&generations_path(config)).map_err(|e| e.to_string());
    check_dataplane(config, &mut generations)?;
    let adopted = if kept.is_some() {
        Quadrant::ALL
            .iter()
            .map(|&q| quadrants::adopt(config, q))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let mut dataplane = if kept.is_some() {
        Dataplane::load_for_takeover(&config.bpffs_dir())?
    } else {
        Dataplane::load(Some(&config.bpffs_dir()))?
    };

    // MCP-Core decides, the kernel enforces. Without the identity service, or with a policy
    // that cannot be evaluated, the quadrants come up in deny-all (an empty policy map), never
    // open.
    let upstream = config.identity.upstream.as_ref().map(|u| ca::Upstream {
        cert: u.cert.clone(),
        key: u.key.clone(),
    });
    let identity = ca::Authority::load_or_create(
        &config.identity.ca_dir,
        &config.identity.trust_domain,
        upstream.as_ref(),
    )
    .map(|authority| {
        Arc::new(IdentityService::new(
            authority,
            &config.instance,
            Duration::from_secs(config.identity.svid_ttl_secs),
        ))
    })
    .map_err(|e| {
        error!(error = %e, "identity service unavailable: quadrants come up in deny-all");
        format!("identity service unavailable: {e}")
    });
    let compiled = match &identity {
        Err(e) => Err(e.clone()),
        Ok(_) => PolicyBundle::for_config(config)
            .map_err(|e| e.to_string())
            .and_then(|b| compile_for_kernel(config, &b).map(|c| (c, b)))
            .and_then(|(c, b)| Ok((c, check_revision(&generations, &b)?, b))),
    };
    let (policy, policy_state, revision) = match compiled {
        Ok(((compiled, workload_rules), revision, bundle)) => {
            let state = policy_state(&compiled, &workload_rules, bundle.origin());
            dataplane.set_workload_rules(workload_rules);
            (compiled, state, revision)
        }
        Err(e) => {
            error!(error = %e, "policy evaluation failed: quadrants come up in deny-all");
            (CompiledPolicy::new(), format!("deny-all: {e}"), None)
        }
    };
    dataplane.write_config(config, QUADRANT_CGROUP_LEVEL, &policy)?;
    if let Err(e) = record_revision(&mut generations, revision) {
        error!(error = %e, "cannot record the policy bundle revision");
    }
    if let Some(k) = kept {
        dataplane.carry_state(k)?;
    }
    Ok(Loaded {
        state,
        generations,
        dataplane,
        identity,
        policy_state,
        adopted,
    })
}

/// Brings the instance up: loads (see [`load`]), then creates the quadrants and attaches the
/// programs — or, with a kept dataplane, switches its links to the new programs.
#[allow(clippy::too_many_lines)] // one step after the other, in order
fn bring_up(config: &Config, kept: Option<(KeptDataplane, bool)>) -> Result<Running, AppError> {
    let (mut kept, kept_mounted) = match kept {
        Some((k, mounted)) => (Some(k), mounted),
        None => (None, false),
    };
    let Loaded {
        mut state,
        generations,
        mut dataplane,
        identity,
        policy_state,
        adopted,
    } = load(config, kept.as_mut(), kept_mounted).map_err(|e| {
        if kept.is_some() {
            AppError::KeptDataplaneStays { cause: Box::new(e) }
        } else {
            e
        }
    })?;
    let mut handles = Vec::new();
    let mut attached = Vec::new();
    let switch_started = std::time::Instant::now();
    for (i, q) in Quadrant::ALL.into_iter().enumerate() {
        let handle = if let Some(h) = adopted.get(i) {
            attached.push(dataplane.take_over(config, h)?);
            h.clone()
        } else {
            let h = quadrants::create(config, q)?;
            attached.push(dataplane.attach(config, &h)?);
            h
        };
        info!(
            quadrant = q.name(),
            ifindex = handle.host_ifindex,
            cgroup_id = handle.cgroup_id,
            "quadrant up"
        );
        handles.push(handle);
    }
    let carried = match kept.take() {
        Some(k) => {
            let carried = dataplane.finish_takeover(k)?;
            info!(
                from_map_layout = carried.from_map_layout,
                to_map_layout = carried.to_map_layout,
                flows = carried.flows,
                counters = carried.counters,
                switch_us = switch_started.elapsed().as_micros(),
                "took over the kept dataplane"
            );
            state.dataplane_kept = false;
            state.map_layout = dataplane_common::MAP_LAYOUT_VERSION;
            state.write()?;
            Some(carried)
        }
        None => None,
    };
    let cgroups: Vec<PathBuf> = Quadrant::ALL
        .iter()
        .map(|&q| config.cgroup_dir(q))
        .collect();
    let accel = match config.lanes.tcp_acceleration {
        crate::config::TcpAcceleration::Off => Accel::default(),
        crate::config::TcpAcceleration::SkMsg => {
            dataplane.attach_lane_acceleration(&cgroups)?;
            info!("lane acceleration on: sock_ops on the quadrant cgroups, sk_msg on LANE_SOCKS");
            Accel {
                on: true,
                ..Accel::default()
            }
        }
        crate::config::TcpAcceleration::Auto => {
            probe_acceleration(config, &mut dataplane, &cgroups)
        }
    };
    let prepared = PolicyBundle::for_config(config)
        .and_then(|b| Prepared::new(&b))
        .map_err(|e| e.to_string());
    let audit = AuditLog::open(&config.audit_log).map_err(|e| e.to_string());
    if let Err(e) = &audit {
        error!(error = %e, "audit log unusable: every admission will be refused");
    }
    let admission = Admission::new(prepared, audit);
    let lane_rules = match (&identity, PolicyBundle::for_config(config)) {
        (Err(e), _) => Err(e.clone()),
        (Ok(_), Ok(b)) => b
            .lane_rules()
            .map(|r| (r, b.origin().to_owned()))
            .map_err(|e| e.to_string()),
        (Ok(_), Err(e)) => Err(e.to_string()),
    };
    let (lane_rules, lane_origin) = match lane_rules {
        Ok((r, origin)) => (Ok(r), origin),
        Err(e) => {
            error!(error = %e, "lane rules unavailable: every lane will be refused");
            (Err(e), String::new())
        }
    };
    let events = Arc::new(crate::events::EventBus::default());
    let lanes = Arc::new(Broker::new(
        config,
        identity.as_ref().ok().map(Arc::clone),
        lane_rules,
        &lane_origin,
        Arc::clone(&events),
    ));
    let trace = dataplane
        .take_trace()
        .inspect_err(|e| warn!(error = %e, "no verdict trace"))
        .ok();
    Ok(Running {
        config: config.clone(),
        state,
        dataplane,
        handles,
        attached,
        identity,
        policy_state,
        admission,
        generations,
        supervisor: Supervisor::default(),
        lanes,
        events,
        carried,
        accel,
        trace,
    })
}

/// The lane acceleration as the agent runs it.
#[derive(Debug, Default)]
struct Accel {
    /// `sk_msg` and `sock_ops` attached to the quadrants.
    on: bool,
    /// The counters when the quadrants' acceleration began (the probe's messages are not
    /// theirs).
    counted_before: [u64; 4],
    /// With `auto`: the measurement, or why there is none.
    probe: Option<Result<crate::lanes::accel_probe::ProbeFigures, String>>,
}

/// Runs the acceleration probe with `sock_ops` on the probe cgroup `dir` (taken off again
/// before returning).
fn measure_acceleration(
    dataplane: &mut Dataplane,
    dir: &Path,
) -> Result<crate::lanes::accel_probe::ProbeFigures, String> {
    let ops = dataplane.attach_sock_ops(dir).map_err(|e| e.to_string())?;
    let figures = std::env::current_exe()
        .map_err(|e| format!("cannot find the agent's binary: {e}"))
        .and_then(|bin| {
            crate::lanes::accel_probe::measure(&bin, dir, |ports, remove| {
                dataplane
                    .loopback_pair_in_lane_socks(ports, remove)
                    .map_err(|e| e.to_string())
            })
        });
    dataplane.detach_sock_ops(ops).map_err(|e| e.to_string())?;
    figures
}

/// Attaches `sock_ops` to every quadrant cgroup; if one fails, detaches those already done.
fn attach_to_quadrants(
    dataplane: &mut Dataplane,
    cgroups: &[PathBuf],
) -> Result<Vec<aya::programs::sock_ops::SockOpsLinkId>, LoaderError> {
    let mut ids = Vec::with_capacity(cgroups.len());
    for cg in cgroups {
        match dataplane.attach_sock_ops(cg) {
            Ok(id) => ids.push(id),
            Err(e) => {
                for id in ids {
                    let _ = dataplane.detach_sock_ops(id);
                }
                return Err(e);
            }
        }
    }
    Ok(ids)
}

/// `tcp_acceleration: auto`: measures `sk_msg` against the stack in a probe cgroup and attaches
/// the acceleration to the quadrants only if it wins. A failed measurement leaves it off (it is
/// an optimisation) and says why.
fn probe_acceleration(config: &Config, dataplane: &mut Dataplane, cgroups: &[PathBuf]) -> Accel {
    let dir = config.accel_probe_cgroup_dir();
    let probe = (|| {
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let sk_msg = dataplane.attach_sk_msg().map_err(|e| e.to_string())?;
        let measured = measure_acceleration(dataplane, &dir);
        // On to the quadrants only when all of it is: a failure on the way takes back what was
        // attached, nothing stays half on.
        if !measured.as_ref().is_ok_and(|f| f.on) {
            if let Err(e) = dataplane.detach_sk_msg(sk_msg) {
                warn!(error = %e, "cannot detach sk_msg after the acceleration probe");
            }
            return measured;
        }
        let ops = match attach_to_quadrants(dataplane, cgroups) {
            Ok(ops) => ops,
            Err(e) => {
                let _ = dataplane.detach_sk_msg(sk_msg);
                return Err(format!("cannot turn the acceleration on: {e}"));
            }
        };
        let kept = dataplane.keep_sk_msg(sk_msg).and_then(|()| {
            ops.into_iter()
                .try_for_each(|id| dataplane.keep_sock_ops(id))
        });
        kept.map_err(|e| format!("cannot turn the acceleration on: {e}"))?;
        measured
    })();
    if let Err(e) = quadrants::remove_cgroup(&dir) {
        warn!(error = %e, "cannot remove the acceleration probe's cgroup");
    }
    match &probe {
        Ok(f) => info!(
            sk_msg_p50_ns = f.redirected_p50_ns,
            sk_msg_p99_ns = f.redirected_p99_ns,
            stack_p50_ns = f.stack_p50_ns,
            stack_p99_ns = f.stack_p99_ns,
            on = f.on,
            "lane acceleration measured (auto): on only if sk_msg's p50 <= 0.9x and p99 <= 1.0x the stack's"
        ),
        Err(e) => warn!(error = %e, "lane acceleration probe failed: acceleration off"),
    }
    let on = probe.as_ref().is_ok_and(|f| f.on);
    Accel {
        on,
        counted_before: if on {
            dataplane.lane_accel_counters().unwrap_or_default()
        } else {
            [0; 4]
        },
        probe: Some(probe),
    }
}

/// Removes everything `config` names. Returns what it removed. Safe to call when nothing exists.
pub fn teardown(config: &Config, unmount_cgroup2: bool) -> Result<Vec<String>, AppError> {
    let mut removed = Vec::new();
    for q in Quadrant::ALL {
        let existed = sys::netns_exists(&config.netns(q))
            || sys::link_exists(&config.host_iface(q))
            || config.cgroup_dir(q).exists();
        quadrants::remove(config, q)?;
        if existed {
            removed.push(format!(
                "quadrant {} ({}, {})",
                q.name(),
                config.netns(q),
                config.host_iface(q)
            ));
        }
    }
    let pins = config.bpffs_dir();
    if pins.exists() {
        // Unpinning the links detaches the programs; unpinning programs and maps frees them.
        fs::remove_dir_all(&pins).map_err(sys::io_err("cannot remove pins", &pins))?;
        removed.push(format!("pins {}", pins.display()));
    }
    workloads::remove_instance_v1_cgroups(&config.instance);
    let sockets = config.workload_socket_dir();
    if sockets.exists() {
        fs::remove_dir_all(&sockets).map_err(sys::io_err("cannot remove", &sockets))?;
    }
    let parent = config.cgroup_parent();
    if parent.exists() {
        quadrants::remove_cgroup(&parent)?;
        removed.push(format!("cgroup {}", parent.display()));
    }
    if unmount_cgroup2 && config.cgroup2.exists() {
        sys::unmount(&config.cgroup2)?;
        let _ = fs::remove_dir(&config.cgroup2);
    }
    for path in [config.socket_path(), config.state_path()] {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(SysError::Io {
                    what: "cannot remove",
                    path,
                    source: e,
                }
                .into());
            }
        }
    }
    Ok(removed)
}

fn status_of(r: &Running) -> Result<StatusReport, AppError> {
    let quadrants = r
        .handles
        .iter()
        .zip(&r.attached)
        .map(|(h, progs)| {
            let q = h.quadrant;
            let a = r.config.addrs(q);
            QuadrantStatus {
                name: q.name().to_owned(),
                netns: r.config.netns(q),
                prefix: a.prefix.to_string(),
                gateway: a.gateway.to_string(),
                address: a.workload.to_string(),
                host_interface: r.config.host_iface(q),
                host_ifindex: h.host_ifindex,
                cgroup: r.config.cgroup_dir(q),
                cgroup_id: h.cgroup_id,
                programs: progs.clone(),
            }
        })
        .collect();
    Ok(StatusReport {
        instance: r.config.instance.clone(),
        pid: r.state.pid,
        pin_dir: r.config.bpffs_dir(),
        socket: r.config.socket_path(),
        policy: r.policy_state.clone(),
        carried: r.carried.clone(),
        quadrants,
        counters: r.dataplane.counters()?,
    })
}

/// The SVID rotation task and one Workload API server per quadrant. Without the identity
/// service there is no Workload API: callers get "connection refused" rather than an identity.
fn start_identity_services(
    r: &Running,
    stop_rx: &tokio::sync::watch::Receiver<bool>,
) -> Result<(), AppError> {
    let dir = r.config.workload_socket_dir();
    fs::create_dir_all(&dir).map_err(sys::io_err("cannot create", &dir))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
        .map_err(sys::io_err("cannot open up", &dir))?;
    let Some(identity) = r.identity.as_ref().ok() else {
        return Ok(());
    };
    tokio::spawn(Arc::clone(identity).run_rotation(stop_rx.clone()));
    for q in Quadrant::ALL {
        let path = r.config.workload_socket(q);
        let (service, stop) = (Arc::clone(identity), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = workload_api::serve(&path, q, service, stop).await {
                warn!(quadrant = q.name(), socket = %path.display(), error = %e, "Workload API stopped");
            }
        });
    }
    Ok(())
}

async fn serve(
    running: Arc<Mutex<Running>>,
    ready: impl FnOnce(&StatusReport),
) -> Result<Stopped, AppError> {
    let socket = running.lock().await.config.socket_path();
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(sys::io_err("cannot listen on", &socket))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
        .map_err(sys::io_err("cannot restrict", &socket))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    start_identity_services(&*running.lock().await, &stop_rx)?;
    if let Some(ring) = running.lock().await.trace.take() {
        tokio::spawn(crate::trace::follow(ring, stop_rx.clone()));
    }
    let lane_broker = {
        let r = running.lock().await;
        r.lanes.serve().map_err(sys::io_err(
            "cannot serve lanes on",
            &r.config.lane_socket(),
        ))?
    };
    ready(&status_of(&*running.lock().await)?);

    let (down_tx, mut down_rx) = mpsc::channel::<(UnixStream, bool)>(1);
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(sys::io_err("cannot handle SIGINT on", &socket))?;
    let mut sighup =
        signal(SignalKind::hangup()).map_err(sys::io_err("cannot handle SIGHUP on", &socket))?;
    let mut sigterm = signal(SignalKind::terminate())
        .map_err(sys::io_err("cannot handle SIGTERM on", &socket))?;
    let (reload_tx, mut reload_rx) = mpsc::channel::<()>(1);
    let _watcher = watch_policy(&running.lock().await.config, reload_tx);
    let mut pending_down = None;
    loop {
        tokio::select! {
            Some(()) = reload_rx.recv() => {
                info!("policy directory changed: reloading the policy");
                if let Response::Error { message } = reload_policy(&mut *running.lock().await) {
                    warn!(%message, "policy reload failed");
                } else {
                    info!("policy reloaded after a change in the policy directory");
                }
            }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sighup.recv() => {
                info!("SIGHUP: reloading the policy");
                if let Response::Error { message } = reload_policy(&mut *running.lock().await) {
                    warn!(%message, "policy reload failed");
                }
            }
            Some(requester) = down_rx.recv() => { info!(keep_dataplane = requester.1, "down requested"); pending_down = Some(requester); break; }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let running = Arc::clone(&running);
                    let down_tx = down_tx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, running, down_tx).await {
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
        running.lock().await.supervisor.hand_over().await
    } else {
        running.lock().await.supervisor.stop_all().await;
        Vec::new()
    };
    finish_down(&running, pending_down, &socket, handed).await
}

/// After the services stopped: answers a `down` request — removing everything, or keeping the
/// dataplane for the next agent.
async fn finish_down(
    running: &Mutex<Running>,
    pending_down: Option<(UnixStream, bool)>,
    socket: &Path,
    handed: Vec<workloads::Handover>,
) -> Result<Stopped, AppError> {
    if let Some((mut requester, true)) = pending_down {
        let handed_over_workloads = handed.iter().map(|h| h.spec.key.clone()).collect();
        // The quadrants, pins and links stay; the state file tells the next `up` to take them
        // over.
        let mut guard = running.lock().await;
        guard.state.dataplane_kept = true;
        guard.state.workloads = handed;
        let result = guard.state.write();
        let _ = fs::remove_file(socket);
        let response = match &result {
            Ok(()) => Response::DataplaneKept {
                pin_dir: guard.config.bpffs_dir(),
                map_layout: guard.state.map_layout,
                handed_over_workloads,
            },
            Err(e) => Response::Error {
                message: format!("cannot record the kept dataplane: {e}"),
            },
        };
        drop(guard);
        if let Err(e) = write_response(&mut requester, &response).await {
            warn!(error = %e, "cannot answer the down request");
        }
        return result.map(|()| Stopped::DataplaneKept);
    }
    if let Some((mut requester, _)) = pending_down {
        // The requester gets its answer once everything is removed.
        let guard = running.lock().await;
        let result = teardown(&guard.config, guard.state.mounted_cgroup2);
        drop(guard);
        let response = match &result {
            Ok(removed) => Response::Down {
                removed: removed.clone(),
            },
            Err(e) => Response::Error {
                message: format!("teardown failed: {e}"),
            },
        };
        if let Err(e) = write_response(&mut requester, &response).await {
            warn!(error = %e, "cannot answer the down request");
        }
        result.map(|_| Stopped::Removed)
    } else {
        Ok(Stopped::Removed)
    }
}

/// The broker's lanes, with the `sk_msg` counters when the acceleration is on.
fn lanes_report(r: &Running) -> crate::lanes::broker::LanesReport {
    let mut report = r.lanes.report();
    if r.accel.on {
        let before = r.accel.counted_before;
        report.tcp_acceleration = r.dataplane.lane_accel_counters().ok().map(|now| {
            let [sockets, redirected, passed, refused] =
                std::array::from_fn(|i| now[i].saturating_sub(before[i]));
            crate::lanes::broker::Acceleration {
                sockets,
                redirected,
                passed,
                refused,
            }
        });
    }
    match &r.accel.probe {
        Some(Ok(f)) => report.tcp_acceleration_probe = Some(f.clone()),
        Some(Err(e)) => report.tcp_acceleration_probe_error = Some(e.clone()),
        None => {}
    }
    report
}

/// What a control connection sent.
enum RequestLine {
    /// Nothing: a liveness probe (`agent_running`) connects and closes without a request.
    Empty,
    /// One request line.
    Line(String),
    /// Something that is no request line, and why.
    Refused(String),
}

/// Reads one request line of at most [`api::MAX_REQUEST_BYTES`]. A longer one is not read to its
/// end: the agent answers at once that it is too large (the client's write then fails, and it
/// reads the answer).
async fn read_request(stream: &mut UnixStream) -> io::Result<RequestLine> {
    let limit = api::MAX_REQUEST_BYTES;
    let mut bytes = Vec::new();
    BufReader::new(stream.take(limit as u64 + 1))
        .read_until(b'\n', &mut bytes)
        .await?;
    if bytes.is_empty() {
        return Ok(RequestLine::Empty);
    }
    if bytes.len() > limit {
        return Ok(RequestLine::Refused(format!(
            "invalid request: too large: more than {limit} bytes (1 MiB) without a newline; the \
             control socket takes one JSON request of at most {limit} bytes per line"
        )));
    }
    Ok(match String::from_utf8(bytes) {
        Ok(line) => RequestLine::Line(line),
        Err(e) => RequestLine::Refused(format!(
            "invalid request: not UTF-8 (byte {} is not valid UTF-8)",
            e.utf8_error().valid_up_to()
        )),
    })
}

async fn handle(
    mut stream: UnixStream,
    running: Arc<Mutex<Running>>,
    down_tx: mpsc::Sender<(UnixStream, bool)>,
) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let line = match read_request(&mut stream).await? {
        RequestLine::Empty => return Ok(()),
        RequestLine::Line(line) => Ok(line),
        RequestLine::Refused(message) => Err(message),
    };
    let response = if cred.uid() == 0 {
        match line.and_then(|l| api::parse_request(&l)) {
            Err(message) => Response::Error { message },
            Ok(Request::Status) => match status_of(&*running.lock().await) {
                Ok(s) => Response::Status(Box::new(s)),
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Ok(Request::PolicyReload) => reload_policy(&mut *running.lock().await),
            Ok(Request::Submit { envelope }) => {
                let mut r = running.lock().await;
                let response = submit(&mut r, &envelope, None).await;
                submit_event(&r.events, &response);
                response
            }
            Ok(Request::Rollback {
                authorization,
                envelope,
            }) => {
                let mut r = running.lock().await;
                let response = submit(&mut r, &envelope, Some(&authorization)).await;
                submit_event(&r.events, &response);
                response
            }
            Ok(Request::Events) => {
                let rx = running.lock().await.events.subscribe();
                let events = Arc::clone(&running.lock().await.events);
                return stream_events(stream, rx, &events).await;
            }
            Ok(Request::Lanes) => Response::Lanes(Box::new(lanes_report(&*running.lock().await))),
            Ok(Request::Trace { mode }) => {
                match running.lock().await.dataplane.set_trace(mode.value()) {
                    Ok(()) => Response::Trace { mode },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Ok(Request::Workloads) => Response::Workloads {
                workloads: running.lock().await.supervisor.list(),
            },
            Ok(Request::Stop { name }) => match running.lock().await.supervisor.stop(&name).await {
                Ok(status) => Response::Stopped(status),
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Ok(Request::Admit { review, svid_pem }) => {
                let r = running.lock().await;
                let authority = r
                    .identity
                    .as_ref()
                    .map(|i| i.authority())
                    .map_err(String::as_str);
                let decision = match pem_chain(&svid_pem) {
                    Ok(chain) => r.admission.admit(authority, &review, &chain),
                    Err(e) => r
                        .admission
                        .admit(authority, &review, &[])
                        .with_error_hint(&e),
                };
                Response::Admission(decision)
            }
            Ok(Request::Down { keep_dataplane }) => {
                // The main loop tears down (or keeps the dataplane) and answers on this
                // connection.
                return match down_tx.send((stream, keep_dataplane)).await {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::SendError((mut stream, _))) => {
                        let msg = "the agent is already shutting down".to_owned();
                        write_response(&mut stream, &Response::Error { message: msg }).await
                    }
                };
            }
        }
    } else {
        Response::Error {
            message: format!(
                "uid {} may not use the control socket (root only)",
                cred.uid()
            ),
        }
    };
    write_response(&mut stream, &response).await
}

/// Generation-store keys of the highest eBPF program set and map layout versions run here.
const PROGRAM_SET_KEY: &str = "dataplane/program-set";
const MAP_LAYOUT_KEY: &str = "dataplane/map-layout";

/// Before anything is loaded: the object's detached signature when configured (required with
/// `require_signed_dataplane`), then forward-only program set and map layout versions, which
/// are recorded once they pass.
fn check_dataplane(
    config: &Config,
    generations: &mut Result<Generations, String>,
) -> Result<(), AppError> {
    use dataplane_common::{MAP_LAYOUT_VERSION, PROGRAM_SET_VERSION};
    let refuse = AppError::Dataplane;
    match &config.dataplane_signature {
        Some(path) => {
            let text = fs::read_to_string(path)
                .map_err(|e| refuse(format!("cannot read {}: {e}", path.display())))?;
            let envelope: crate::signing::Envelope = serde_json::from_str(&text)
                .map_err(|e| refuse(format!("{}: {e}", path.display())))?;
            let trust = TrustStore::load(&config.trust_store).map_err(|e| refuse(e.to_string()))?;
            let statement = crate::loader::object_statement();
            for q in Quadrant::ALL {
                let (payload, key) = trust
                    .verify(
                        &envelope,
                        crate::signing::DATAPLANE_PAYLOAD_TYPE,
                        crate::signing::Role::Dataplane,
                        q,
                    )
                    .map_err(|e| refuse(format!("{}: {e}", path.display())))?;
                if payload != statement.as_bytes() {
                    return Err(refuse(format!(
                        "{} (by {key}) signs {:?}, this agent's object is {statement:?}",
                        path.display(),
                        String::from_utf8_lossy(&payload)
                    )));
                }
            }
        }
        None if config.require_signed_dataplane => {
            return Err(refuse(
                "require_signed_dataplane is set but no dataplane_signature is configured; sign with `quadrant dataplane sign`".into(),
            ));
        }
        None => {}
    }
    let store = generations.as_mut().map_err(|e| {
        refuse(format!(
            "cannot check the dataplane versions (fail-closed): {e}"
        ))
    })?;
    for (key, ours, what) in [
        (PROGRAM_SET_KEY, PROGRAM_SET_VERSION, "eBPF program set"),
        (MAP_LAYOUT_KEY, MAP_LAYOUT_VERSION, "map layout"),
    ] {
        if let Some(seen) = store.current(key).filter(|&seen| seen > u64::from(ours)) {
            return Err(refuse(format!(
                "this agent's {what} is version {ours}, older than version {seen} that ran on this host; upgrades only move forward"
            )));
        }
    }
    for (key, ours) in [
        (PROGRAM_SET_KEY, PROGRAM_SET_VERSION),
        (MAP_LAYOUT_KEY, MAP_LAYOUT_VERSION),
    ] {
        store
            .force(key, u64::from(ours))
            .map_err(|e| refuse(e.to_string()))?;
    }
    Ok(())
}

/// Generation-store keys of the live policy bundle's revision and (the first 64 bits of) its
/// digest.
const BUNDLE_REVISION_KEY: &str = "policy-bundle/revision";
const BUNDLE_DIGEST_KEY: &str = "policy-bundle/digest";

/// Forward-only policy bundles: a `policy_dir` bundle's revision must not be older than the one
/// last made live on this host, and the same revision must be the same bundle. Returns what to
/// record once the bundle is live. The embedded bundle is versioned with the binary.
fn check_revision(
    generations: &Result<Generations, String>,
    bundle: &PolicyBundle,
) -> Result<Option<(u64, u64)>, String> {
    if bundle.is_embedded() {
        return Ok(None);
    }
    let revision = bundle.revision().map_err(|e| e.to_string())?;
    let store = generations
        .as_ref()
        .map_err(|e| format!("cannot check the bundle revision (fail-closed): {e}"))?;
    let digest = u64::from_str_radix(&bundle.digest()[..16], 16).unwrap_or_default();
    let manifest = crate::policy::MANIFEST_FILE;
    match (revision, store.current(BUNDLE_REVISION_KEY)) {
        (None, None) => Ok(None),
        (None, Some(live)) => Err(format!(
            "the policy bundle has no revision ({manifest}), but revision {live} was live on this host; bundles only move forward"
        )),
        (Some(r), Some(live)) if r < live => Err(format!(
            "policy bundle revision {r} is older than revision {live}, live on this host before; bundles only move forward"
        )),
        (Some(r), Some(live)) if r == live && store.current(BUNDLE_DIGEST_KEY) != Some(digest) => {
            Err(format!(
                "policy bundle revision {r} is not the revision {r} made live before (its files differ): a changed bundle needs a new revision in {manifest}"
            ))
        }
        (Some(r), _) => Ok(Some((r, digest))),
    }
}

/// Records a bundle revision [`check_revision`] accepted, once the bundle is live.
fn record_revision(
    generations: &mut Result<Generations, String>,
    revision: Option<(u64, u64)>,
) -> Result<(), String> {
    let (Some((r, digest)), Ok(store)) = (revision, generations.as_mut()) else {
        return Ok(());
    };
    store
        .force(BUNDLE_REVISION_KEY, r)
        .and_then(|()| store.force(BUNDLE_DIGEST_KEY, digest))
        .map_err(|e| e.to_string())
}

/// The event of a submit's answer.
fn submit_event(events: &crate::events::EventBus, response: &Response) {
    match response {
        Response::Submitted {
            status, spiffe_id, ..
        } => events.emit(|seq, at_ms| crate::events::Event::WorkloadStarted {
            seq,
            at_ms,
            name: status.name.clone(),
            generation: status.generation,
            spiffe_id: spiffe_id.clone(),
        }),
        Response::Error { message } => {
            events.emit(|seq, at_ms| crate::events::Event::SubmitRefused {
                seq,
                at_ms,
                message: message.clone(),
            });
        }
        _ => {}
    }
}

/// Writes each event as a JSON line until the subscriber goes away or the agent stops.
async fn stream_events(
    mut stream: UnixStream,
    mut rx: tokio::sync::broadcast::Receiver<String>,
    events: &crate::events::EventBus,
) -> io::Result<()> {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let line = match rx.recv().await {
            Ok(line) => line,
            Err(RecvError::Lagged(missed)) => events.lagged(missed),
            Err(RecvError::Closed) => return Ok(()),
        };
        stream.write_all(line.as_bytes()).await?;
        stream.write_all(b"\n").await?;
    }
}

/// Where the accepted plan generations are kept (beside the audit log: both must persist).
fn generations_path(config: &Config) -> PathBuf {
    config
        .audit_log
        .with_file_name(format!("{}-generations.json", config.instance))
}

/// The admission review of a plan.
fn review_of(plan: &plans::Plan, q: Quadrant, signer: &str) -> serde_json::Value {
    serde_json::json!({"review": {"object": {
        "quadrant": q.name(),
        "workload": plan.workload,
        "labels": plan.labels,
        "artifacts": plan.artifacts,
        "resources": {
            "cpu": plan.resources.cpu_millis,
            "memory": plan.resources.memory_bytes,
            "pids": plan.resources.pids,
        },
        "generation": plan.generation,
        "signer": signer,
    }}})
}

/// How the supervisor runs a plan's workload.
fn spec_of(
    config: &Config,
    plan: &plans::Plan,
    q: Quadrant,
    key: String,
    executable: PathBuf,
) -> workloads::Spec {
    workloads::Spec {
        key,
        instance: config.instance.clone(),
        quadrant: q.name().to_owned(),
        workload: plan.workload.clone(),
        generation: plan.generation,
        executable,
        args: plan.args.clone(),
        env: plan.env.clone(),
        resources: plan.resources.clone(),
        restart: plan.restart,
        cgroup: config.cgroup_dir(q).join(&plan.workload),
        netns: config.netns(q),
        endpoint: format!("unix://{}", config.workload_socket(q).display()),
        lane_socket: config.lane_socket(),
        log: config
            .state_dir
            .join(format!("{}-logs", config.instance))
            .join(format!("{}-{}.log", q.name(), plan.workload)),
        // Set from the live dataplane when the workload starts.
        drop_net_raw: false,
    }
}

/// The generation rule: a newer generation, or an older one under a live break-glass
/// authorization for exactly this plan. Returns the authorization when it applies.
fn check_generation(
    generations: &Generations,
    trust: &TrustStore,
    plan: &plans::Plan,
    key: &str,
    rollback: Option<&crate::signing::Envelope>,
) -> Result<Option<(plans::Rollback, String, Option<u64>)>, String> {
    match rollback {
        None => {
            if let Err(e) = generations.check(key, plan.generation) {
                return Err(e.to_string());
            }
            Ok(None)
        }
        Some(auth) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let (rb, authorized_by) = match plans::verify_rollback(auth, trust, now) {
                Ok(v) => v,
                Err(e) => return Err(format!("break-glass: {e}")),
            };
            if rb.quadrant != plan.quadrant
                || rb.workload != plan.workload
                || rb.target_generation != plan.generation
            {
                return Err(format!(
                    "break-glass: the authorization is for {}/{} generation {}, the plan is {key} generation {}",
                    Quadrant::from(rb.quadrant).name(),
                    rb.workload,
                    rb.target_generation,
                    plan.generation
                ));
            }
            let current = generations.current(key);
            if current.is_none_or(|c| plan.generation >= c) {
                return Err(format!(
                    "break-glass: generation {} is not older than the accepted {current:?}; submit it normally",
                    plan.generation
                ));
            }
            Ok(Some((rb, authorized_by, current)))
        }
    }
}

/// The lanes a plan declares, as the broker enforces them. Every TCP lane is mutually
/// authenticated, so `tcp` and `tcp_mtls` both mean a TCP + mTLS lane.
fn declared_lanes(plan: &plans::Plan) -> Vec<crate::lanes::broker::DeclaredLane> {
    use crate::lanes::Transport;
    plan.lanes
        .iter()
        .filter_map(|l| {
            let (q, service) = l.peer.split_once('/')?;
            Some(crate::lanes::broker::DeclaredLane {
                quadrant: Quadrant::from_name(q)?,
                service: service.to_owned(),
                transport: l.transport.map(|t| match t {
                    plans::Transport::Shm => Transport::Shm,
                    plans::Transport::Uds => Transport::Uds,
                    plans::Transport::Tcp | plans::Transport::TcpMtls => Transport::Tcp,
                }),
            })
        })
        .collect()
}

/// `quadrant submit`: signature → schema → generation → artifacts → identity and admission →
/// generation recorded → workload started. Nothing is started or recorded unless every step
/// passes.
async fn submit(
    r: &mut Running,
    envelope: &crate::signing::Envelope,
    rollback: Option<&crate::signing::Envelope>,
) -> Response {
    let refuse = |message: String| Response::Error { message };
    let trust = match TrustStore::load(&r.config.trust_store) {
        Ok(t) => t,
        Err(e) => return refuse(format!("trust store: {e}")),
    };
    let (plan, signer) = match plans::verify(envelope, &trust) {
        Ok(v) => v,
        Err(e) => return refuse(e.to_string()),
    };
    let q = Quadrant::from(plan.quadrant);
    let key = format!("{}/{}", q.name(), plan.workload);
    let generations = match &r.generations {
        Ok(g) => g,
        Err(e) => return refuse(format!("generation store unusable (fail-closed): {e}")),
    };
    // Forward only, unless a live break-glass authorization names exactly this generation.
    let break_glass = match check_generation(generations, &trust, &plan, &key, rollback) {
        Ok(b) => b,
        Err(e) => return refuse(e),
    };
    let store = ArtifactStore::new(&r.config.artifacts_root);
    let mut executable = None;
    for reference in &plan.artifacts {
        match store.open_verified(reference) {
            Ok(path) => {
                executable.get_or_insert(path);
            }
            Err(e) => return refuse(e.to_string()),
        }
    }
    let Some(executable) = executable else {
        return refuse("the plan names no artifact".into());
    };
    let identity = match &r.identity {
        Ok(i) => Arc::clone(i),
        Err(e) => return refuse(format!("admission unavailable (fail-closed): {e}")),
    };
    let caller = attest::Caller {
        quadrant: q,
        workload: plan.workload.clone(),
    };
    let spiffe_id = identity.id_of(&caller);
    let svid = match identity.authority().mint_x509(&spiffe_id, identity.ttl()) {
        Ok(s) => s,
        Err(e) => return refuse(format!("admission unavailable (fail-closed): {e}")),
    };
    let review = review_of(&plan, q, &signer);
    let decision = r
        .admission
        .admit(Ok(identity.authority()), &review, &svid.chain);
    if !decision.allowed {
        let why = decision.why();
        return refuse(format!("admission rejected {key}: {why}"));
    }
    if let Some((rb, authorized_by, from)) = &break_glass {
        let event = serde_json::json!({
            "workload": key, "from_generation": from, "to_generation": rb.target_generation,
            "reason": rb.reason, "authorized_by": authorized_by, "plan_signer": signer,
            "expires_at": rb.expires_at,
        });
        if let Err(e) = r.admission.record("break-glass", event) {
            return refuse(format!(
                "break-glass: cannot record the rollback (fail-closed): {e}"
            ));
        }
        warn!(workload = %key, to = rb.target_generation, reason = %rb.reason, by = %authorized_by, "break-glass rollback");
    }
    if let Ok(g) = &mut r.generations {
        let recorded = if break_glass.is_some() {
            g.force(&key, plan.generation)
        } else {
            g.accept(&key, plan.generation)
        };
        if let Err(e) = recorded {
            return refuse(e.to_string());
        }
    }
    let mut spec = spec_of(&r.config, &plan, q, key.clone(), executable);
    spec.drop_net_raw = r.dataplane.raw_sockets_denied(q);
    r.lanes
        .set_declared(q, &plan.workload, Some(declared_lanes(&plan)));
    if let Err(e) = r.supervisor.start(spec).await {
        return refuse(format!("{key} admitted but not started: {e}"));
    }
    // Give the process a moment to be placed, so the answer carries its pid.
    tokio::time::sleep(Duration::from_millis(50)).await;
    match r.supervisor.get(&key) {
        Ok(status) => Response::Submitted {
            status,
            signer,
            spiffe_id,
            audit_seq: decision.audit_seq,
        },
        Err(e) => refuse(e.to_string()),
    }
}

/// Watches `policy_dir` when `watch_policy_dir` is set; each burst of changes sends on `reload`.
fn watch_policy(config: &Config, reload: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let dir = config
        .policy_dir
        .as_ref()
        .filter(|_| config.watch_policy_dir)?;
    match crate::policy_watch::watch(dir, reload) {
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

/// Re-evaluates the bundle and flips the kernel to the result; keeps the live policy on error.
fn reload_policy(r: &mut Running) -> Response {
    let response = reload_policy_inner(r);
    match &response {
        Response::PolicyReloaded { policy, slot } => {
            r.events
                .emit(|seq, at_ms| crate::events::Event::PolicyReloaded {
                    seq,
                    at_ms,
                    policy: policy.clone(),
                    slot: *slot,
                });
        }
        Response::Error { message } => {
            r.events
                .emit(|seq, at_ms| crate::events::Event::PolicyReloadFailed {
                    seq,
                    at_ms,
                    message: message.clone(),
                });
        }
        _ => {}
    }
    response
}

fn reload_policy_inner(r: &mut Running) -> Response {
    if let Err(e) = &r.identity {
        return Response::Error {
            message: format!(
                "{e}; the quadrants stay in deny-all until the agent restarts with a working identity service"
            ),
        };
    }
    let compiled = PolicyBundle::for_config(&r.config)
        .map_err(|e| e.to_string())
        .and_then(|b| compile_for_kernel(&r.config, &b).map(|c| (c, b)))
        .and_then(|(c, b)| Ok((c, check_revision(&r.generations, &b)?, b)));
    match compiled {
        Ok(((policy, workload_rules), revision, bundle)) => {
            let state = policy_state(&policy, &workload_rules, bundle.origin());
            r.dataplane.set_workload_rules(workload_rules);
            apply_reloaded(r, &policy, state, revision, &bundle)
        }
        Err(e) => {
            warn!(error = %e, "policy reload refused");
            Response::Error {
                message: format!("policy not reloaded, the previous one stays live: {e}"),
            }
        }
    }
}

/// Makes a reloaded policy live in the kernel, then in admission and the lane broker.
fn apply_reloaded(
    r: &mut Running,
    policy: &CompiledPolicy,
    state: String,
    revision: Option<(u64, u64)>,
    bundle: &PolicyBundle,
) -> Response {
    match r.dataplane.apply_policy(policy) {
        Ok(slot) => {
            if let Err(e) = record_revision(&mut r.generations, revision) {
                warn!(error = %e, "cannot record the policy bundle revision");
            }
            r.admission
                .set_prepared(Prepared::new(bundle).map_err(|e| e.to_string()));
            r.lanes.set_rules(
                bundle.lane_rules().map_err(|e| e.to_string()),
                bundle.origin(),
            );
            r.policy_state = state;
            info!(entries = policy.len(), slot, "policy reloaded");
            Response::PolicyReloaded {
                policy: r.policy_state.clone(),
                slot,
            }
        }
        Err(e) => Response::Error {
            message: format!("policy not applied, the previous one stays live: {e}"),
        },
    }
}

/// Compiles `bundle` for the kernel and resolves each workload a rule names to its cgroup id,
/// creating the workload's cgroup (as `quadrant exec --workload` and the supervisor do; neither
/// removes it) so that its id is fixed before the workload starts.
fn compile_for_kernel(
    config: &Config,
    bundle: &PolicyBundle,
) -> Result<(CompiledPolicy, WorkloadRules), String> {
    let flows = bundle.compile_all(config).map_err(|e| e.to_string())?;
    let mut entries = Vec::new();
    for ((q, workload, dst, proto), ranges) in flows.workloads {
        let dir = config.cgroup_dir(q).join(&workload);
        fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
        let id = sys::cgroup_id(&dir).map_err(|e| e.to_string())?;
        entries.push((id, dst, proto, ranges));
    }
    Ok((
        flows.quadrant,
        WorkloadRules {
            some_workload: flows.some_workload,
            entries,
        },
    ))
}

/// The policy line of the status report.
fn policy_state(policy: &CompiledPolicy, workloads: &WorkloadRules, origin: &str) -> String {
    format!(
        "enforced: {} map entries, {} for single workloads, from {origin}",
        policy.len(),
        workloads.some_workload.len() + workloads.entries.len()
    )
}

async fn write_response(stream: &mut UnixStream, response: &Response) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(response).map_err(io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes).await
}

/// `quadrant down`: asks a running agent to tear down, or removes the leftovers of one that is
/// gone. Returns what was removed.
pub fn down(config: &Config) -> Result<Vec<String>, AppError> {
    require_root("down")?;
    let socket = config.socket_path();
    if api::agent_running(&socket) {
        let request = Request::Down {
            keep_dataplane: false,
        };
        return match api::call(&socket, &request)? {
            Response::Down { removed } => Ok(removed),
            Response::Error { message } => Err(AppError::Agent(message)),
            _ => Err(AppError::Agent("unexpected answer to down".into())),
        };
    }
    match State::read(config)? {
        Some(stale) => teardown(&stale.config, stale.mounted_cgroup2),
        None => teardown(config, false),
    }
}

/// `quadrant down --keep-dataplane`: stops the running agent and leaves the quadrants, the eBPF
/// dataplane and the running workloads going until the next `quadrant up` takes them over.
/// Returns the pin directory, the kept map layout and the workloads handed over.
pub fn down_keep_dataplane(config: &Config) -> Result<(PathBuf, u32, Vec<String>), AppError> {
    require_root("down")?;
    let socket = config.socket_path();
    if !api::agent_running(&socket) {
        return Err(match State::read(config)? {
            Some(s) if s.dataplane_kept => AppError::Agent(format!(
                "no agent is running for instance {}; its dataplane is already kept (in {})",
                config.instance,
                config.bpffs_dir().display()
            )),
            _ => AppError::NotUp {
                instance: config.instance.clone(),
                path: config.state_path(),
            },
        });
    }
    let request = Request::Down {
        keep_dataplane: true,
    };
    match api::call(&socket, &request)? {
        Response::DataplaneKept {
            pin_dir,
            map_layout,
            handed_over_workloads,
        } => Ok((pin_dir, map_layout, handed_over_workloads)),
        Response::Error { message } => Err(AppError::Agent(message)),
        _ => Err(AppError::Agent("unexpected answer to down".into())),
    }
}

/// `quadrant policy reload`: asks the running agent to re-evaluate and apply its policy.
pub fn policy_reload(config: &Config) -> Result<(String, u32), AppError> {
    match api::call(&config.socket_path(), &Request::PolicyReload)? {
        Response::PolicyReloaded { policy, slot } => Ok((policy, slot)),
        Response::Error { message } => Err(AppError::Agent(message)),
        _ => Err(AppError::Agent("unexpected answer to policy reload".into())),
    }
}

/// `quadrant admit`: asks the running agent to admit a workload.
pub fn admit(
    config: &Config,
    review: serde_json::Value,
    svid_pem: String,
) -> Result<crate::admission::Decision, AppError> {
    match api::call(&config.socket_path(), &Request::Admit { review, svid_pem })? {
        Response::Admission(d) => Ok(d),
        Response::Error { message } => Err(AppError::Agent(message)),
        _ => Err(AppError::Agent("unexpected answer to admit".into())),
    }
}

/// Sends `request` to the running agent and returns its answer, turning errors into `AppError`.
pub fn call(config: &Config, request: &Request) -> Result<Response, AppError> {
    match api::call(&config.socket_path(), request)? {
        Response::Error { message } => Err(AppError::Agent(message)),
        other => Ok(other),
    }
}

/// `quadrant status`: asks the running agent.
pub fn status(config: &Config) -> Result<StatusReport, AppError> {
    match api::call(&config.socket_path(), &Request::Status)? {
        Response::Status(s) => Ok(*s),
        Response::Error { message } => Err(AppError::Agent(message)),
        _ => Err(AppError::Agent("unexpected answer to status".into())),
    }
}

/// `quadrant lanes`: asks the running agent for its lanes.
pub fn lanes(config: &Config) -> Result<crate::lanes::broker::LanesReport, AppError> {
    match api::call(&config.socket_path(), &Request::Lanes)? {
        Response::Lanes(r) => Ok(*r),
        Response::Error { message } => Err(AppError::Agent(message)),
        _ => Err(AppError::Agent("unexpected answer to lanes".into())),
    }
}

/// `quadrant trace MODE`: sets the running agent's verdict trace.
pub fn trace(
    config: &Config,
    mode: crate::trace::TraceMode,
) -> Result<crate::trace::TraceMode, AppError> {
    match api::call(&config.socket_path(), &Request::Trace { mode })? {
        Response::Trace { mode } => Ok(mode),
        Response::Error { message } => Err(AppError::Agent(message)),
        _ => Err(AppError::Agent("unexpected answer to trace".into())),
    }
}

/// `quadrant exec`: enters quadrant `q` as workload `workload` (cgroup, then network
/// namespace), sets `SPIFFE_ENDPOINT_SOCKET` to the quadrant's Workload API, and replaces the
/// process with `argv`. Returns only on failure.
#[must_use]
pub fn exec(config: &Config, q: Quadrant, workload: Option<&str>, argv: &[String]) -> AppError {
    if let Err(e) = require_root("exec") {
        return e;
    }
    let state = match State::read(config) {
        Ok(Some(s)) => s,
        Ok(None) => {
            return AppError::NotUp {
                instance: config.instance.clone(),
                path: config.state_path(),
            };
        }
        Err(e) => return e,
    };
    let c = &state.config;
    let mut cgroup = c.cgroup_dir(q);
    if let Some(w) = workload {
        if !attest::valid_workload_name(w) {
            return AppError::Agent(format!(
                "invalid workload name {w:?}: use 1-64 characters of a-z, 0-9, '-', '_', '.'"
            ));
        }
        cgroup = cgroup.join(w);
        if let Err(e) = fs::create_dir_all(&cgroup) {
            return SysError::Io {
                what: "cannot create cgroup",
                path: cgroup,
                source: e,
            }
            .into();
        }
    }
    let endpoint = format!("unix://{}", c.workload_socket(q).display());
    let lanes = c.lane_socket().display().to_string();
    // Where the policy names single workloads, no process the agent starts may forge their
    // packets: without CAP_NET_RAW there are no raw IP or packet sockets. If the live setting
    // cannot be read, the capability goes (fail closed).
    let drop_raw = crate::loader::raw_sockets_denied_pinned(&c.bpffs_dir(), q).unwrap_or(true);
    let _ = io::stdout().flush();
    sys::enter_and_exec(
        &cgroup,
        &c.netns(q),
        argv,
        &[
            ("SPIFFE_ENDPOINT_SOCKET", &endpoint),
            (crate::lanes::SOCKET_ENV, &lanes),
        ],
        drop_raw,
    )
    .into()
}

/// Where the configuration of a CLI call comes from: `--config FILE` or the embedded default.
pub fn load_config(path: Option<&Path>) -> Result<Config, crate::config::ConfigError> {
    match path {
        Some(p) => Config::from_file(p),
        None => Ok(Config::embedded()),
    }
}
