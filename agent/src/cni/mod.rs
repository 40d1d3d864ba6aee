//! `quadrant-cni`: a CNI plugin chained after a primary plugin (the reference `bridge` or `ptp`
//! with `host-local`, say). ADD finds the pod's host-side veth — the peer of `CNI_IFNAME` inside
//! `CNI_NETNS` — and asks the running agent to put the quadrant programs on it and count the
//! pod's addresses as its quadrant's, then prints the previous result unchanged. The quadrant
//! is the pod annotation `quadrant.io/quadrant` (runtime config
//! `io.kubernetes.cri.pod-annotations`), else `"quadrant"` in the plugin's configuration.
//!
//! The protocol (environment, stdin, versions, results and error codes) is `rscni-plugin`'s,
//! used only in [`plugin`]; this module decides.

pub mod conflist;
pub mod plugin;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use ipnet::Ipv4Net;
use serde_json::Value;

/// The annotation that names a pod's quadrant.
pub const ANNOTATION: &str = "quadrant.io/quadrant";
/// The runtime-config key (capability) under which CRI runtimes pass pod annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
/// The capability through which the runtime passes the pod's cgroup (`runtimeConfig.cgroupPath`,
/// CNI conventions).
pub const CGROUP_CAPABILITY: &str = "cgroupPath";
/// The plugin's `type`.
pub const PLUGIN_TYPE: &str = "quadrant-cni";
/// The CNI versions the plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// What went wrong, as the CNI spec's error codes say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// 7: the network configuration is invalid.
    Config(String),
    /// 3: the container (its network namespace or interface) is unknown.
    NoContainer(String),
    /// 11: try again later (the agent is not running).
    Later(String),
    /// 50: the plugin is not available (STATUS while the agent is down).
    Unavailable(String),
    /// 100: the agent refused.
    Refused(String),
    /// 5: an I/O failure.
    Io(String),
}

/// The plugin's own configuration fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConf {
    /// The quadrant of pods without the annotation.
    pub quadrant: Option<String>,
    /// The agent's control socket.
    pub socket: PathBuf,
}

impl PluginConf {
    /// From the plugin-specific fields of the network configuration.
    pub fn from_custom(custom: &std::collections::HashMap<String, Value>) -> Result<Self, Failure> {
        let string = |k: &str| -> Result<Option<String>, Failure> {
            match custom.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(Failure::Config(format!(
                    "\"{k}\" must be a string, not {other}"
                ))),
            }
        };
        Ok(Self {
            quadrant: string("quadrant")?,
            socket: string("socket")?.map_or_else(
                || crate::config::Config::embedded().socket_path(),
                PathBuf::from,
            ),
        })
    }
}

/// The pod's quadrant: its annotation, else the plugin's default; either must name one.
pub fn quadrant_of(runtime_config: Option<&Value>, conf: &PluginConf) -> Result<String, Failure> {
    let annotated = runtime_config
        .and_then(|rc| rc.get(ANNOTATIONS_CAPABILITY))
        .and_then(|a| a.get(ANNOTATION))
        .map(|v| {
            v.as_str().map(str::to_owned).ok_or_else(|| {
                Failure::Config(format!(
                    "the annotation {ANNOTATION} must be a string, not {v}"
                ))
            })
        })
        .transpose()?;
    let (name, source) = match (annotated, &conf.quadrant) {
        (Some(a), _) => (a, format!("pod annotation {ANNOTATION}")),
        (None, Some(d)) => (
            d.clone(),
            "\"quadrant\" of the plugin configuration".to_owned(),
        ),
        (None, None) => {
            return Err(Failure::Config(format!(
                "no quadrant for the pod: annotate it with {ANNOTATION} (the runtime passes \
                 annotations when the plugin lists the capability {ANNOTATIONS_CAPABILITY}) or \
                 set \"quadrant\" in the plugin configuration"
            )));
        }
    };
    if dataplane_common::Quadrant::from_name(&name).is_none() {
        return Err(Failure::Config(format!(
            "unknown quadrant {name:?} (from the {source}): dx, dg, px or pg"
        )));
    }
    Ok(name)
}

/// The IPv4 addresses the previous result gives interface `ifname` inside `netns`.
///
/// # Errors
/// When it also gives the pod an IPv6 address: quadrant judges IPv4 only and its programs drop
/// IPv6 on the pod's veth, so a dual-stack or IPv6 pod is refused rather than left with an
/// address that cannot carry anything.
pub fn pod_ipv4_addresses(prev: &Value, ifname: &str) -> Result<Vec<Ipv4Net>, Failure> {
    let v6: Vec<String> = pod_ips(prev, ifname)
        .into_iter()
        .filter(|a| a.parse::<ipnet::Ipv6Net>().is_ok())
        .collect();
    if !v6.is_empty() {
        return Err(Failure::Config(format!(
            "the previous result gives the pod IPv6 address {}; quadrant judges IPv4 only and \
             its programs drop IPv6 on the pod's veth: give this network IPv4 ranges only",
            v6.join(", ")
        )));
    }
    Ok(pod_addresses(prev, ifname))
}

/// The `ips` addresses of the previous result that are interface `ifname`'s (an entry without
/// an interface index counts as the pod's too), as written.
fn pod_ips(prev: &Value, ifname: &str) -> Vec<String> {
    let interfaces = prev["interfaces"].as_array().cloned().unwrap_or_default();
    let pod_index = interfaces
        .iter()
        .position(|i| i["name"] == ifname && i["sandbox"].as_str().is_some_and(|s| !s.is_empty()));
    prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ip| match (ip["interface"].as_u64(), pod_index) {
            (Some(i), Some(p)) => usize::try_from(i).ok() == Some(p),
            (None, _) => true,
            (Some(_), None) => false,
        })
        .filter_map(|ip| ip["address"].as_str().map(str::to_owned))
        .collect()
}

/// The IPv4 addresses the previous result gives interface `ifname` inside `netns` (an `ips`
/// entry without an interface index counts as the pod's too).
#[must_use]
pub fn pod_addresses(prev: &Value, ifname: &str) -> Vec<Ipv4Net> {
    pod_ips(prev, ifname)
        .iter()
        .filter_map(|a| a.parse::<Ipv4Net>().ok())
        .collect()
}

/// `<namespace>/<name>` of the Kubernetes pod, from `CNI_ARGS` (`K=V;K=V`, as kubelet's
/// runtimes pass `K8S_POD_NAMESPACE` and `K8S_POD_NAME`).
#[must_use]
pub fn pod_name(cni_args: &str) -> Option<String> {
    let get = |key: &str| {
        cni_args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_owned())
            .filter(|v| !v.is_empty())
    };
    Some(format!(
        "{}/{}",
        get("K8S_POD_NAMESPACE")?,
        get("K8S_POD_NAME")?
    ))
}

/// The ifindex of `ifname`'s peer, read inside `netns` (the pod's end of a veth pair names its
/// host end's ifindex as its link).
pub fn peer_ifindex(netns: &str, ifname: &str) -> Result<u32, Failure> {
    if netns.is_empty() || !Path::new(netns).exists() {
        return Err(Failure::NoContainer(format!(
            "network namespace {netns:?} does not exist"
        )));
    }
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["ip", "-j", "link", "show", "dev", ifname])
        .output()
        .map_err(|e| Failure::Io(format!("cannot run nsenter: {e}")))?;
    if !out.status.success() {
        return Err(Failure::NoContainer(format!(
            "no interface {ifname} in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let links: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Failure::Io(format!("cannot read `ip -j link` output: {e}")))?;
    links[0]["link_index"]
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| {
            Failure::Config(format!(
                "interface {ifname} in {netns} has no peer on the host (not a veth): the \
                 primary plugin must connect the pod with a veth pair (bridge, ptp)"
            ))
        })
}

/// The name of host interface `ifindex`.
pub fn host_ifname(ifindex: u32) -> Result<String, Failure> {
    for entry in std::fs::read_dir("/sys/class/net")
        .map_err(|e| Failure::Io(format!("cannot list /sys/class/net: {e}")))?
        .flatten()
    {
        let index = std::fs::read_to_string(entry.path().join("ifindex")).unwrap_or_default();
        if index.trim().parse::<u32>().ok() == Some(ifindex) {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Err(Failure::NoContainer(format!(
        "no host interface with ifindex {ifindex} (the pod's veth peer)"
    )))
}

#[cfg(test)]
mod tests;
