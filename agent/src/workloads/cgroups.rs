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
    let rel = Path::new(&spec.instance)
        .join(&spec.quadrant)
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

/// Removes the v1 groups of a workload (the v2 group goes with the quadrant's).
pub(super) fn remove_v1_cgroups(spec: &Spec) {
    for controller in ["memory", "pids", "cpu"] {
        let dir = Path::new(V1_ROOT)
            .join(controller)
            .join(&spec.instance)
            .join(&spec.quadrant)
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
