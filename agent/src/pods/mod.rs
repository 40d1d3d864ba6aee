//! Pods attached by `quadrant-cni` (CNI chaining on a Kubernetes node): each pod's host-side
//! veth carries the packet programs and its addresses count as its quadrant's. The agent records
//! them (`<state_dir>/<instance>.pods.yaml`, 0600, rewritten on every change) so that the next
//! agent — after `down --keep-dataplane`, a crash or a restart — attaches them again, and it
//! removes at start the pods whose DEL came while no agent ran (queued by the plugin in
//! `<state_dir>/<instance>.cni-pending/`).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use dataplane_common::Quadrant;
use ipnet::Ipv4Net;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    loader::{AttachedProgram, Dataplane},
};

/// Pods at most (each holds an `IFACES` entry and its addresses in `PREFIXES`).
pub const MAX_PODS: usize = 1_024;

/// What the plugin asks the agent to attach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`: the pod's interface inside its namespace.
    pub ifname: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// The pod interface's peer on the host.
    pub host_ifname: String,
    /// Its ifindex.
    pub host_ifindex: u32,
    /// `dx`, `dg`, `px` or `pg`.
    pub quadrant: String,
    /// The pod's IPv4 addresses (from the primary plugin's result), with their prefix length.
    #[schemars(with = "Vec<String>")]
    pub addresses: Vec<Ipv4Net>,
    /// `<namespace>/<name>` of the Kubernetes pod (`K8S_POD_NAMESPACE` and `K8S_POD_NAME` of
    /// `CNI_ARGS`), when the runtime says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The pod's cgroup as the runtime names it (`runtimeConfig.cgroupPath`): a path below the
    /// cgroup2 root (`/kubepods/burstable/pod<uid>`) or a systemd slice
    /// (`kubepods-burstable-pod<uid>.slice`). With it, the pod's sockets are judged at
    /// `connect()`/`sendmsg()` too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// An attached pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PodStatus {
    /// What was attached.
    #[serde(flatten)]
    pub spec: PodSpec,
    /// The programs on its veth (and its cgroup).
    pub programs: Vec<AttachedProgram>,
    /// The id of its cgroup in `CGROUPS`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

/// A CNI attachment (`cni.dev/valid-attachments` of GC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

/// The pods of this agent.
#[derive(Debug)]
pub struct Pods {
    record: PathBuf,
    pending: PathBuf,
    attached: Mutex<BTreeMap<String, PodStatus>>,
}

/// The record of the attached pods.
#[must_use]
pub fn record_path(config: &Config) -> PathBuf {
    config
        .state_dir
        .join(format!("{}.pods.yaml", config.instance))
}

/// Where the plugin queues a DEL that found no agent: the control socket's path with
/// `.cni-pending` instead of `.sock`.
#[must_use]
pub fn pending_dir(socket: &Path) -> PathBuf {
    socket.with_extension("cni-pending")
}

/// The key of an attachment (also its link directory's name), after checking both parts as
/// the CNI spec allows them: a container id of letters, digits, `_`, `.` and `-`; an interface
/// name of at most 15 bytes without `/`, `:` or whitespace.
pub fn key(container_id: &str, ifname: &str) -> Result<String, String> {
    if container_id.is_empty()
        || container_id.len() > 256
        || !container_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "container id {container_id:?} must be 1-256 characters of letters, digits, '_', '.' and '-'"
        ));
    }
    if ifname.is_empty()
        || ifname.len() > 15
        || ifname == "."
        || ifname == ".."
        || ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!(
            "interface name {ifname:?} must be 1-15 bytes without '/', ':' or whitespace"
        ));
    }
    Ok(format!("{container_id}-{ifname}"))
}

/// The directory of the pod cgroup `path` names, below the cgroup2 hierarchy mounted at `root`:
/// a path (`/kubepods/burstable/pod<uid>`), or a systemd slice whose dashes nest it
/// (`kubepods-burstable-pod<uid>.slice` is `kubepods.slice/kubepods-burstable.slice/…`). It
/// must exist, stay below `root` and not be the root itself.
pub fn cgroup_dir(root: &Path, path: &str) -> Result<PathBuf, String> {
    // A systemd slice name is exact: `.slice`, lower case.
    let slice = path.strip_suffix(".slice").filter(|_| !path.contains('/'));
    let relative: PathBuf = if let Some(stem) = slice {
        let parts: Vec<&str> = stem.split('-').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "cgroup {path:?}: a systemd slice name without empty parts"
            ));
        }
        (1..=parts.len())
            .map(|n| format!("{}.slice", parts[..n].join("-")))
            .collect()
    } else {
        Path::new(path.trim_start_matches('/')).to_owned()
    };
    if relative.as_os_str().is_empty()
        || relative
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!(
            "cgroup {path:?} must name a cgroup below the cgroup2 root, without '.' or '..'"
        ));
    }
    let dir = root.join(relative);
    if !dir.join("cgroup.procs").is_file() {
        return Err(format!(
            "cgroup {path:?}: no cgroup at {} (is the runtime's cgroupPath below the cgroup2 \
             hierarchy mounted at {}?)",
            dir.display(),
            root.display()
        ));
    }
    Ok(dir)
}

/// The ifindex of host interface `name`, if it exists.
fn host_ifindex(name: &str) -> Option<u32> {
    fs::read_to_string(Path::new("/sys/class/net").join(name).join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl Pods {
    /// The pods `config`'s agent recorded (none if there is no record).
    #[must_use]
    pub fn load(config: &Config) -> Self {
        let record = record_path(config);
        let pods = fs::read_to_string(&record)
            .ok()
            .and_then(|t| serde_yaml::from_str::<Vec<PodStatus>>(&t).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| Some((key(&p.spec.container_id, &p.spec.ifname).ok()?, p)))
            .collect();
        Self {
            record,
            pending: pending_dir(&config.socket_path()),
            attached: Mutex::new(pods),
        }
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PodStatus>> {
        self.attached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn save(&self, pods: &BTreeMap<String, PodStatus>) -> Result<(), String> {
        let list: Vec<&PodStatus> = pods.values().collect();
        let text = serde_yaml::to_string(&list).map_err(|e| e.to_string())?;
        crate::sys::write_private_atomically(&self.record, text.as_bytes())
            .map_err(|e| format!("cannot record the pods in {}: {e}", self.record.display()))
    }

    /// Checks `spec` against this node: a known quadrant, a host veth with that name and
    /// ifindex, addresses outside every quadrant prefix and host address of the node, a cgroup
    /// (if named) that exists; returns the quadrant and the cgroup's directory and id.
    fn validate(
        config: &Config,
        spec: &PodSpec,
    ) -> Result<(Quadrant, Option<(PathBuf, u64)>), String> {
        key(&spec.container_id, &spec.ifname)?;
        let q = Quadrant::from_name(&spec.quadrant)
            .ok_or_else(|| format!("unknown quadrant {:?}: dx, dg, px or pg", spec.quadrant))?;
        match host_ifindex(&spec.host_ifname) {
            Some(i) if i == spec.host_ifindex => {}
            Some(i) => {
                return Err(format!(
                    "host interface {} has ifindex {i}, not {}",
                    spec.host_ifname, spec.host_ifindex
                ));
            }
            None => return Err(format!("no host interface {}", spec.host_ifname)),
        }
        if spec.addresses.is_empty() {
            return Err("the pod has no IPv4 address in the previous result".into());
        }
        for a in &spec.addresses {
            for other in Quadrant::ALL {
                let prefix = config.addrs(other).prefix;
                if prefix.contains(&a.addr()) {
                    return Err(format!(
                        "pod address {} lies in quadrant {}'s prefix {prefix}",
                        a.addr(),
                        other.name()
                    ));
                }
            }
            if config.host.addresses.iter().any(|h| h.contains(&a.addr())) {
                return Err(format!("pod address {} is a host address", a.addr()));
            }
        }
        let cgroup = match &spec.cgroup {
            None => None,
            Some(path) => {
                let dir = cgroup_dir(&config.cgroup2, path)?;
                let id = crate::sys::cgroup_id(&dir).map_err(|e| e.to_string())?;
                Some((dir, id))
            }
        };
        Ok((q, cgroup))
    }

    /// ADD: attaches the pod (again, if it is attached already: a repeated ADD).
    pub fn add(
        &self,
        config: &Config,
        dataplane: &Mutex<Dataplane>,
        spec: PodSpec,
    ) -> Result<PodStatus, String> {
        let (q, cgroup) = Self::validate(config, &spec)?;
        let cgroup_id = cgroup.as_ref().map(|(_, id)| *id);
        let k = key(&spec.container_id, &spec.ifname)?;
        let mut pods = self.locked();
        if !pods.contains_key(&k) && pods.len() >= MAX_PODS {
            return Err(format!(
                "{MAX_PODS} pods are attached already, the most an agent takes"
            ));
        }
        let mut dp = crate::daemon::agent::locked(dataplane);
        // A repeated ADD for another veth or other addresses: the earlier attachment goes
        // first (its pinned links would otherwise be switched on the old veth, leaving the new
        // one without programs).
        if let Some(old) = pods.get(&k)
            && (old.spec.host_ifindex != spec.host_ifindex
                || old.spec.addresses != spec.addresses
                || old.cgroup_id != cgroup_id)
        {
            dp.detach_pod(
                &k,
                old.spec.host_ifindex,
                &old.spec.addresses,
                old.cgroup_id,
            )
            .map_err(|e| e.to_string())?;
            pods.remove(&k);
            self.save(&pods)?;
        }
        let attached = dp
            .attach_pod(
                &k,
                &spec.host_ifname,
                spec.host_ifindex,
                q,
                &spec.addresses,
                config.xdp_mode,
            )
            .and_then(|mut programs| {
                if let Some((dir, _)) = &cgroup {
                    let addr = spec
                        .addresses
                        .first()
                        .map_or(std::net::Ipv4Addr::UNSPECIFIED, Ipv4Net::addr);
                    programs.extend(dp.attach_pod_cgroup(&k, dir, q, addr)?.1);
                }
                Ok(programs)
            });
        let programs = match attached {
            Ok(p) => p,
            Err(e) => {
                // Nothing half-applied: what was registered or pinned goes again.
                let undone = dp.detach_pod(&k, spec.host_ifindex, &spec.addresses, cgroup_id);
                if pods.remove(&k).is_some() {
                    self.save(&pods)?;
                }
                return Err(match undone {
                    Ok(()) => e.to_string(),
                    Err(u) => format!("{e} (and undoing it failed: {u})"),
                });
            }
        };
        drop(dp);
        let status = PodStatus {
            spec,
            programs,
            cgroup_id,
        };
        pods.insert(k, status.clone());
        self.save(&pods)?;
        Ok(status)
    }

    /// DEL: detaches the pod; true if it was attached (a pod never attached, or detached
    /// already, is no error).
    pub fn del(
        &self,
        dataplane: &Mutex<Dataplane>,
        container_id: &str,
        ifname: &str,
    ) -> Result<bool, String> {
        let k = key(container_id, ifname)?;
        let mut pods = self.locked();
        let Some(p) = pods.get(&k) else {
            return Ok(false);
        };
        crate::daemon::agent::locked(dataplane)
            .detach_pod(&k, p.spec.host_ifindex, &p.spec.addresses, p.cgroup_id)
            .map_err(|e| e.to_string())?;
        pods.remove(&k);
        self.save(&pods)?;
        Ok(true)
    }

    /// CHECK: the pod is attached, its veth is still the one attached, and each of its links
    /// is pinned.
    pub fn check(&self, container_id: &str, ifname: &str) -> Result<PodStatus, String> {
        let k = key(container_id, ifname)?;
        let pods = self.locked();
        let p = pods
            .get(&k)
            .ok_or_else(|| format!("pod {container_id} ({ifname}) is not attached"))?;
        if host_ifindex(&p.spec.host_ifname) != Some(p.spec.host_ifindex) {
            return Err(format!(
                "the veth {} of pod {container_id} is gone",
                p.spec.host_ifname
            ));
        }
        if let Some(missing) = p.programs.iter().find(|a| !a.link_pin.exists()) {
            return Err(format!(
                "the {} program of pod {container_id} is not attached ({} is missing)",
                missing.hook,
                missing.link_pin.display()
            ));
        }
        Ok(p.clone())
    }

    /// The attached pods.
    #[must_use]
    pub fn list(&self) -> Vec<PodStatus> {
        self.locked().values().cloned().collect()
    }

    /// GC: detaches every pod not in `valid`; returns their keys.
    pub fn gc(
        &self,
        dataplane: &Mutex<Dataplane>,
        valid: &[Attachment],
    ) -> Result<Vec<String>, String> {
        let stale: Vec<(String, String)> = self
            .locked()
            .values()
            .filter(|p| {
                !valid
                    .iter()
                    .any(|v| v.container_id == p.spec.container_id && v.ifname == p.spec.ifname)
            })
            .map(|p| (p.spec.container_id.clone(), p.spec.ifname.clone()))
            .collect();
        let mut removed = Vec::new();
        for (c, i) in stale {
            if self.del(dataplane, &c, &i)? {
                removed.push(format!("{c}/{i}"));
            }
        }
        Ok(removed)
    }

    /// At start: carries out the DELs queued while no agent ran, then attaches every recorded
    /// pod whose veth is still there (switching links an earlier agent left pinned) and
    /// forgets the others. Returns how many pods are attached.
    pub fn restore(&self, config: &Config, dataplane: &Mutex<Dataplane>) -> usize {
        for entry in fs::read_dir(&self.pending).into_iter().flatten().flatten() {
            let queued = fs::read_to_string(entry.path())
                .ok()
                .and_then(|t| serde_json::from_str::<Attachment>(&t).ok());
            if let Some(a) = queued {
                if let Err(e) = self.del(dataplane, &a.container_id, &a.ifname) {
                    tracing::warn!(container = a.container_id, error = %e, "queued pod DEL failed");
                } else {
                    tracing::info!(
                        container = a.container_id,
                        ifname = a.ifname,
                        "pod removed (its DEL came while no agent ran)"
                    );
                }
            }
            let _ = fs::remove_file(entry.path());
        }
        let recorded: Vec<PodStatus> = self.list();
        for p in recorded {
            let spec = p.spec.clone();
            let (c, i) = (spec.container_id.clone(), spec.ifname.clone());
            if let Err(e) = self.add(config, dataplane, spec) {
                tracing::warn!(container = c, ifname = i, error = %e, "recorded pod not attached again; forgotten");
                let _ = self.del(dataplane, &c, &i);
                if let Ok(k) = key(&c, &i) {
                    let mut pods = self.locked();
                    pods.remove(&k);
                    let _ = self.save(&pods);
                }
            }
        }
        self.locked().len()
    }
}

/// Queues a DEL for the agent's return (the plugin, when no agent answers).
pub fn queue_del(socket: &Path, a: &Attachment) -> std::io::Result<()> {
    let dir = pending_dir(socket);
    fs::create_dir_all(&dir)?;
    let k = key(&a.container_id, &a.ifname).map_err(std::io::Error::other)?;
    let text = serde_json::to_vec(a).map_err(std::io::Error::other)?;
    crate::sys::write_private_atomically(&dir.join(k), &text)
}

#[cfg(test)]
mod tests;
