//! A workload's cgroups: its cgroup v2 group below the quadrant's, with the plan's limits there,
//! or — on a hybrid host whose memory, pids and cpu controllers are bound to cgroup v1 — in
//! per-workload v1 groups; and their removal.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::{CFS_PERIOD_US, Spec, V1_ROOT, WorkloadError};

pub(super) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> WorkloadError + 'a {
    move |source| WorkloadError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The cgroup.procs files the process must join, after applying the limits. Returns them and
/// where the limits went.
pub(super) fn prepare_cgroups(spec: &Spec) -> Result<(Vec<PathBuf>, String), WorkloadError> {
    fs::create_dir_all(&spec.cgroup).map_err(io("cannot create cgroup", &spec.cgroup))?;
    let mut procs = vec![spec.cgroup.join("cgroup.procs")];
    let r = &spec.resources;
    let cpu_quota = u64::from(r.cpu_millis) * CFS_PERIOD_US / 1000;
    if spec.cgroup.join("memory.max").exists() && spec.cgroup.join("pids.max").exists() {
        for (file, value) in [
            ("memory.max", r.memory_bytes.to_string()),
            ("pids.max", r.pids.to_string()),
            ("cpu.max", format!("{cpu_quota} {CFS_PERIOD_US}")),
        ] {
            let p = spec.cgroup.join(file);
            if p.exists() {
                fs::write(&p, value).map_err(io("cannot set limit", &p))?;
            }
        }
        return Ok((procs, "cgroup v2".into()));
    }
    // Below the v1 groups of the quadrant instance the workload runs in (`px`, `px-2`), where
    // that instance's capacity is.
    let rel = Path::new(&spec.instance)
        .join(instance_dir(spec))
        .join(&spec.workload);
    let mut applied = Vec::new();
    for (controller, limits) in [
        (
            "memory",
            vec![("memory.limit_in_bytes", r.memory_bytes.to_string())],
        ),
        ("pids", vec![("pids.max", r.pids.to_string())]),
        (
            "cpu",
            vec![
                ("cpu.cfs_period_us", CFS_PERIOD_US.to_string()),
                ("cpu.cfs_quota_us", cpu_quota.to_string()),
            ],
        ),
    ] {
        let root = Path::new(V1_ROOT).join(controller);
        if !root.join("cgroup.procs").exists() {
            continue;
        }
        let dir = root.join(&rel);
        fs::create_dir_all(&dir).map_err(io("cannot create cgroup", &dir))?;
        for (file, value) in limits {
            let p = dir.join(file);
            fs::write(&p, value).map_err(io("cannot set limit", &p))?;
        }
        procs.push(dir.join("cgroup.procs"));
        applied.push(controller);
    }
    Ok((
        procs,
        if applied.is_empty() {
            "none (no controllers)".into()
        } else {
            format!("cgroup v1 ({})", applied.join(", "))
        },
    ))
}

/// The memory workload `workload` of `quadrant` holds: `memory.current` of its v2 group
/// `cgroup`, or on a hybrid host `memory.usage_in_bytes` of its v1 group. `None` when neither
/// exists (not running, or no memory controller).
#[must_use]
pub fn memory_bytes(cgroup: &Path, instance: &str, quadrant: &str, workload: &str) -> Option<u64> {
    let read = |p: &Path| fs::read_to_string(p).ok()?.trim().parse().ok();
    read(&cgroup.join("memory.current")).or_else(|| {
        read(
            &Path::new(V1_ROOT)
                .join("memory")
                .join(instance)
                .join(quadrant)
                .join(workload)
                .join("memory.usage_in_bytes"),
        )
    })
}

/// The name of the quadrant instance's cgroup a workload runs below (`px`, `px-2`).
pub(super) fn instance_dir(spec: &Spec) -> &std::ffi::OsStr {
    spec.cgroup
        .parent()
        .and_then(Path::file_name)
        .unwrap_or_else(|| std::ffi::OsStr::new(&spec.quadrant))
}

/// Removes the v1 groups of a workload (the v2 group goes with the quadrant's).
pub(super) fn remove_v1_cgroups(spec: &Spec) {
    for controller in ["memory", "pids", "cpu"] {
        let dir = Path::new(V1_ROOT)
            .join(controller)
            .join(&spec.instance)
            .join(instance_dir(spec))
            .join(&spec.workload);
        let _ = fs::remove_dir(&dir);
    }
}

/// Removes every v1 group of `instance` (teardown).
pub fn remove_instance_v1_cgroups(instance: &str) {
    for controller in ["memory", "pids", "cpu"] {
        let dir = Path::new(V1_ROOT).join(controller).join(instance);
        if dir.exists() {
            remove_tree(&dir);
        }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Applies a quadrant instance's capacity to its cgroup: `cpu.max` and `memory.max` in cgroup
/// v2 where the controllers are delegated to it, else (a hybrid host) in v1 groups
/// `<controller>/<agent instance>/<name>`, under which the instance's workloads' own v1 groups
/// go. Returns the `cgroup.procs` files a process of the instance joins besides its v2 group.
pub fn apply_capacity(
    dir: &Path,
    agent_instance: &str,
    name: &str,
    capacity: &crate::config::InstanceCapacity,
) -> Result<Vec<PathBuf>, WorkloadError> {
    if capacity.is_unlimited() {
        return Ok(Vec::new());
    }
    // Delegate the controllers down to the instance's cgroup where cgroup v2 has them.
    if let Some(parent) = dir.parent() {
        for d in [parent.parent(), Some(parent)].into_iter().flatten() {
            let _ = fs::write(d.join("cgroup.subtree_control"), "+cpu +memory");
        }
    }
    if dir.join("cpu.max").exists() || dir.join("memory.max").exists() {
        for (file, value) in [
            ("cpu.max", capacity.cpu_max()),
            ("memory.max", capacity.memory_bytes.map(|m| m.to_string())),
        ] {
            if let Some(v) = value {
                let p = dir.join(file);
                fs::write(&p, v).map_err(io("cannot set limit", &p))?;
            }
        }
        return Ok(Vec::new());
    }
    let mut procs = Vec::new();
    let max = capacity.cpu_max();
    let mut parts = max.as_deref().unwrap_or_default().split_whitespace();
    let quota = parts.next().map(str::to_owned);
    let period = parts.next().map(str::to_owned);
    for (controller, limits) in [
        (
            "memory",
            capacity
                .memory_bytes
                .map(|m| vec![("memory.limit_in_bytes", m.to_string())]),
        ),
        (
            "cpu",
            quota
                .zip(period)
                .map(|(q, p)| vec![("cpu.cfs_period_us", p), ("cpu.cfs_quota_us", q)]),
        ),
    ] {
        let Some(limits) = limits else { continue };
        let root = Path::new(V1_ROOT).join(controller);
        if !root.join("cgroup.procs").exists() {
            continue;
        }
        let group = root.join(agent_instance).join(name);
        fs::create_dir_all(&group).map_err(io("cannot create cgroup", &group))?;
        for (file, value) in limits {
            let p = group.join(file);
            fs::write(&p, value).map_err(io("cannot set limit", &p))?;
        }
        procs.push(group.join("cgroup.procs"));
    }
    Ok(procs)
}

/// The v1 groups a process of quadrant instance `name` joins (those [`apply_capacity`] or a
/// chaos resource pressure made).
#[must_use]
pub fn capacity_v1_procs(agent_instance: &str, name: &str) -> Vec<PathBuf> {
    ["memory", "cpu", "pids"]
        .into_iter()
        .map(|c| Path::new(V1_ROOT).join(c).join(agent_instance).join(name))
        .filter(|d| d.is_dir())
        .map(|d| d.join("cgroup.procs"))
        .collect()
}

/// Removes the v1 groups of quadrant instance `name` and its workloads.
pub fn remove_v1_group(agent_instance: &str, name: &str) {
    for controller in ["memory", "pids", "cpu"] {
        let dir = Path::new(V1_ROOT)
            .join(controller)
            .join(agent_instance)
            .join(name);
        if dir.exists() {
            remove_tree(&dir);
        }
    }
}
