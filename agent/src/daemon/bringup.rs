//! Bring-up and teardown: what `up` creates, in order, and how everything it created goes.
//!
//! `load` prepares everything that changes no running quadrant — state file, mounts, the
//! dataplane guards, the new programs and maps, identity, and the policy made live in the new
//! maps — so that with a kept dataplane a failure there leaves it exactly as it was. Then
//! [`bring_up`] creates (or takes over) the quadrants and attaches the programs.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use dataplane_common::Quadrant;
use tracing::{error, info, warn};

use super::{
    DaemonError, accel,
    agent::Agent,
    guards,
    state::{State, generations_path},
};
use crate::{
    admission::Admission,
    audit::AuditLog,
    config::Config,
    events::EventBus,
    generations::{GenerationError, Generations},
    identity::{IdentityService, ca},
    lanes::broker::Broker,
    loader::{Dataplane, KeptDataplane},
    policy::activate::PolicyService,
    quadrants::{self, QuadrantHandle},
    sys::{self, SysError},
    workloads::{self, Supervisor},
};

/// Depth of `<cgroup2>/<instance>/<quadrant>` below the cgroup2 root.
pub const QUADRANT_CGROUP_LEVEL: u32 = 2;

/// Whether two configurations name the same quadrants, interfaces, cgroups, pins and XDP mode,
/// so that an agent started with `b` can take over the dataplane one with `a` kept running.
#[must_use]
pub fn same_dataplane(a: &Config, b: &Config) -> bool {
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

/// What [`load`] prepares before it changes anything: with a kept dataplane, everything up to
/// here leaves the running quadrants as they are.
struct Loaded {
    state: State,
    dataplane: Mutex<Dataplane>,
    identity: Result<Arc<IdentityService>, String>,
    generations: Arc<Mutex<Result<Generations, GenerationError>>>,
    admission: Arc<Admission>,
    broker: Arc<Broker>,
    events: Arc<EventBus>,
    policy: PolicyService,
    /// The kept quadrants (takeover only).
    adopted: Vec<QuadrantHandle>,
}

/// State file, mounts, guards, programs and maps, identity, and the policy made live in the new
/// maps (deny-all if it cannot be: MCP-Core decides, the kernel enforces, and without an
/// identity service or an evaluable policy the quadrants come up closed, never open).
fn load(
    config: &Config,
    kept: Option<&mut KeptDataplane>,
    kept_mounted_cgroup2: bool,
) -> Result<Loaded, DaemonError> {
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

    let mut generations = Generations::open(&generations_path(config));
    guards::check_dataplane(config, &mut generations)?;
    let adopted = if kept.is_some() {
        Quadrant::ALL
            .iter()
            .map(|&q| quadrants::adopt(config, q))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let mut dataplane = if kept.is_some() {
        Dataplane::load_for_takeover(&config.bpffs_dir(), config.chaos.enabled)?
    } else {
        Dataplane::load_with(Some(&config.bpffs_dir()), config.chaos.enabled)?
    };
    dataplane.write_config(config, QUADRANT_CGROUP_LEVEL)?;
    dataplane.write_breaker_limits(config.breakers.limits())?;
    let mut dataplane = Mutex::new(dataplane);

    let identity = identity_service(config);
    let audit = AuditLog::open(&config.audit_log).map_err(|e| e.to_string());
    if let Err(e) = &audit {
        error!(error = %e, "audit log unusable: every admission will be refused");
    }
    let admission = Arc::new(Admission::new(Err("no policy made live yet".into()), audit));
    let events = Arc::new(EventBus::default());
    let broker = Arc::new(Broker::new(
        config,
        identity.as_ref().ok().map(Arc::clone),
        Arc::clone(&events),
    ));
    let generations = Arc::new(Mutex::new(generations));
    let policy = PolicyService::new(
        config,
        identity.as_ref().map(|_| ()).map_err(Clone::clone),
        Arc::clone(&generations),
        Arc::clone(&admission),
        Arc::clone(&broker),
        Arc::clone(&events),
    );
    if let Err(e) = policy.start(&dataplane) {
        error!(error = %e, "no policy made live: the quadrants come up in deny-all");
    }
    if let Some(k) = kept {
        dataplane
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .carry_state(k)?;
    }
    Ok(Loaded {
        state,
        dataplane,
        identity,
        generations,
        admission,
        broker,
        events,
        policy,
        adopted,
    })
}

/// The trust domain's CA and the SVID issuance on top of it, or why there is none.
fn identity_service(config: &Config) -> Result<Arc<IdentityService>, String> {
    let upstream = config.identity.upstream.as_ref().map(|u| ca::Upstream {
        cert: u.cert.clone(),
        key: u.key.clone(),
    });
    ca::Authority::load_or_create(
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
    })
}

/// Brings the instance up: loads (see `load`), then creates the quadrants and attaches the
/// programs — or, with a kept dataplane, switches its links to the new programs.
pub fn bring_up(
    config: &Config,
    kept: Option<(KeptDataplane, bool)>,
) -> Result<Agent, DaemonError> {
    let (mut kept, kept_mounted) = match kept {
        Some((k, mounted)) => (Some(k), mounted),
        None => (None, false),
    };
    let Loaded {
        mut state,
        dataplane,
        identity,
        generations,
        admission,
        broker,
        events,
        policy,
        adopted,
    } = load(config, kept.as_mut(), kept_mounted).map_err(|e| {
        if kept.is_some() {
            DaemonError::KeptDataplaneStays { cause: Box::new(e) }
        } else {
            e
        }
    })?;
    let mut dp = dataplane
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let switch_started = std::time::Instant::now();
    let (quadrants, instances) = quadrants_up(config, &mut dp, &adopted, kept.is_some())?;
    let carried = match kept.take() {
        Some(k) => {
            let carried = dp.finish_takeover(k)?;
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
    let accel = accel::start(config, &mut dp, &cgroups)?;
    let trace = dp
        .take_trace()
        .inspect_err(|e| warn!(error = %e, "no verdict trace"))
        .ok();
    let slo = Arc::new(crate::slo::SloService::new(&config.slos));
    broker.set_latency_thresholds(slo.latency_thresholds());
    let breaker_events = dp
        .take_breaker_events()
        .inspect_err(|e| warn!(error = %e, "breaker transitions are not reported"))
        .ok();
    Ok(Agent {
        config: config.clone(),
        state: Mutex::new(state),
        dataplane: Mutex::new(dp),
        quadrants,
        identity,
        policy,
        admission,
        generations,
        supervisor: Supervisor::default(),
        broker,
        events,
        carried,
        accel,
        trace: Mutex::new(trace),
        flows: Arc::new(crate::flows::FlowLog::new(config)),
        breaker_events: Mutex::new(breaker_events),
        slo,
        shadows: crate::shadow::Shadows::default(),
        instances,
        outages: Arc::default(),
        metrics_addr: std::sync::OnceLock::new(),
        pods: crate::pods::Pods::load(config),
    })
}

/// Each quadrant's first instance and the programs attached for it.
type AttachedQuadrants = Vec<(QuadrantHandle, Vec<crate::loader::AttachedProgram>)>;

/// Creates (or takes over) the quadrants and their added instances and attaches the programs.
fn quadrants_up(
    config: &Config,
    dp: &mut Dataplane,
    adopted: &[QuadrantHandle],
    kept: bool,
) -> Result<(AttachedQuadrants, crate::scale::Instances), DaemonError> {
    let mut quadrants = Vec::new();
    for (i, q) in Quadrant::ALL.into_iter().enumerate() {
        let (handle, programs) = if let Some(h) = adopted.get(i) {
            (h.clone(), dp.take_over(config, h)?)
        } else {
            let h = quadrants::create(config, q)?;
            let programs = dp.attach(config, &h)?;
            (h, programs)
        };
        info!(
            quadrant = q.name(),
            ifindex = handle.host_ifindex,
            cgroup_id = handle.cgroup_id,
            "quadrant up"
        );
        quadrants.push((handle, programs));
    }
    let instances = crate::scale::Instances::default();
    instances.start(config, dp, kept).map_err(|e| {
        DaemonError::Refused(format!("cannot bring up the quadrant instances: {e}"))
    })?;
    Ok((quadrants, instances))
}

/// Removes everything `config` names. Returns what it removed. Safe to call when nothing exists.
pub fn teardown(config: &Config, unmount_cgroup2: bool) -> Result<Vec<String>, DaemonError> {
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
    for q in Quadrant::ALL {
        for i in crate::scale::possible(q) {
            if quadrants::instance_exists(config, i) {
                quadrants::remove_instance(config, i)?;
                removed.push(format!(
                    "quadrant instance {} ({}, {})",
                    i.name(),
                    config.instance_netns(i),
                    config.instance_iface(i)
                ));
            }
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
    for path in [
        config.socket_path(),
        config.state_path(),
        config.workloads_record_path(),
    ] {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_dataplane_is_taken_over_only_with_the_same_names() {
        let a = Config::embedded();
        assert!(same_dataplane(&a, &a.clone()));
        let mut b = a.clone();
        b.policy_dir = Some("/etc/quadrant/policies".into());
        b.identity.svid_ttl_secs = 60;
        assert!(
            same_dataplane(&a, &b),
            "policy and identity may change across a takeover"
        );
        for change in [
            |c: &mut Config| c.instance = "other".into(),
            |c: &mut Config| c.interface_prefix = "zz".into(),
            |c: &mut Config| c.cgroup2 = "/elsewhere".into(),
            |c: &mut Config| c.bpffs = "/elsewhere".into(),
            |c: &mut Config| c.xdp_mode = crate::config::XdpAttachMode::Off,
            |c: &mut Config| {
                c.quadrants.get_mut("px").unwrap().prefix = "10.250.0.0/24".parse().unwrap();
            },
        ] {
            let mut b = a.clone();
            change(&mut b);
            assert!(!same_dataplane(&a, &b), "{b:?}");
        }
    }
}
