//! Quadrant instances and services with a virtual address: the names and addresses of each
//! instance, the `capacity` of its cgroup, the `services` section, and their validation.
//!
//! Instance 0 of a quadrant is the quadrant as it always was (namespace `<instance>-<q>`, veth
//! `<prefix>-<q>`, the prefix's second address, cgroup `<instance>/<q>`); instance `k ≥ 1` is
//! `<instance>-<q>-<k>`, `<prefix>-<q>-<k>`, the prefix's address `2 + k` and `<instance>/<q>-<k>`.

use std::{net::Ipv4Addr, path::PathBuf};

use dataplane_common::{Quadrant, lb::LB_SERVICES_MAX};
use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, IFNAMSIZ_MAX, invalid};

/// Instances a quadrant may run at most (the kernel's backend slots per service).
pub const MAX_INSTANCES: u8 = 16;

/// One instance of a quadrant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceRef {
    /// The quadrant.
    pub quadrant: Quadrant,
    /// Which of its instances (0: the quadrant's first, named after it).
    pub index: u8,
}

impl InstanceRef {
    /// Instance `index` of `quadrant`.
    #[must_use]
    pub const fn new(quadrant: Quadrant, index: u8) -> Self {
        Self { quadrant, index }
    }

    /// `px` for instance 0, `px-2` for instance 2: the suffix of its namespace, veth and cgroup.
    #[must_use]
    pub fn name(self) -> String {
        if self.index == 0 {
            self.quadrant.name().to_owned()
        } else {
            format!("{}-{}", self.quadrant.name(), self.index)
        }
    }
}

/// What each instance's cgroup may use (`cpu.max`, `memory.max`); also its weight in load
/// balancing.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstanceCapacity {
    /// CPUs (0.2: `cpu.max` 20000 100000); none: unlimited.
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Bytes of memory (`memory.max`); none: unlimited.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// The CFS period of an instance's CPU limit, µs.
pub const CAPACITY_PERIOD_US: u32 = 10_000;

/// Capacity weight of an instance without a CPU limit (one CPU).
pub const UNLIMITED_WEIGHT: u16 = 1000;

impl InstanceCapacity {
    /// Whether no limit is set.
    #[must_use]
    pub fn is_unlimited(&self) -> bool {
        self.cpu.is_none() && self.memory_bytes.is_none()
    }

    /// Weight in load balancing: thousandths of a CPU (one CPU when unlimited), at least 1.
    #[must_use]
    pub fn weight(&self) -> u16 {
        self.cpu.map_or(UNLIMITED_WEIGHT, |c| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "clamped to 1..=u16::MAX first"
            )]
            let w = (c * 1000.0).round().clamp(1.0, f64::from(u16::MAX)) as u16;
            w
        })
    }

    /// `cpu.max` for the CPU limit: quota and period in µs. The period is 10 ms, so an instance
    /// at its limit waits at most ~10 ms for its next share rather than the default 100 ms.
    #[must_use]
    pub fn cpu_max(&self) -> Option<String> {
        self.cpu.map(|c| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "validated to 0.001..=1024 CPUs"
            )]
            let quota = (c * f64::from(CAPACITY_PERIOD_US)).round().max(1000.0) as u64;
            format!("{quota} {CAPACITY_PERIOD_US}")
        })
    }
}

/// A service with a virtual address, balanced across the instances of its quadrant.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Name (unique).
    pub name: String,
    /// The quadrant whose instances serve it.
    pub quadrant: String,
    /// Port, on the VIP and on each instance.
    pub port: u16,
    /// The virtual address callers connect to.
    pub vip: Ipv4Addr,
    /// `tcp` (default) or `udp`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// `none` (default: least active connections) or `workload`: every connection of one
    /// calling workload goes to the same instance while it is ready (a weighted Maglev table,
    /// so that an instance coming or going moves few callers of the others).
    #[serde(default = "default_affinity", skip_serializing_if = "is_no_affinity")]
    pub affinity: String,
    /// Which instances the quadrants' sockets on this node are balanced over, as Kubernetes'
    /// `internalTrafficPolicy`: `cluster` (default: this node's and, with `peers`, the ready
    /// instances its linked peer nodes tell for a service of the same name) or `local` (this
    /// node's instances, and its pods among the endpoints of `kubernetes_service`). Connections from the host and the world are balanced in tc over this
    /// node's instances (and its pods behind `kubernetes_service`) either way.
    #[serde(
        default = "default_traffic_policy",
        skip_serializing_if = "is_cluster_traffic"
    )]
    pub internal_traffic_policy: String,
    /// `namespace/name` of a Kubernetes Service (with `peers.kubernetes`): the ready endpoints
    /// of its `EndpointSlice`s join the VIP's instances — each only while this node's kernel
    /// judges its address as the service's quadrant (a pod `quadrant-cni` attached here or a
    /// peer told, an instance's address). The slice's port of the service's protocol is the
    /// endpoint's (the one named as this service when it has several). With the Service's
    /// `ClusterIP` as `vip`, the quadrants' connections to it are translated at the socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_service: Option<String>,
}

fn default_traffic_policy() -> String {
    "cluster".to_owned()
}

fn is_cluster_traffic(p: &str) -> bool {
    p == "cluster"
}

fn default_affinity() -> String {
    "none".to_owned()
}

fn is_no_affinity(a: &str) -> bool {
    a == "none"
}

fn default_protocol() -> String {
    "tcp".to_owned()
}

impl ServiceConfig {
    /// The service's quadrant (validated).
    #[must_use]
    pub fn quadrant(&self) -> Quadrant {
        Quadrant::from_name(&self.quadrant).unwrap_or(Quadrant::Px)
    }

    /// `kubernetes_service` as (namespace, name).
    #[must_use]
    pub fn kubernetes_service(&self) -> Option<(&str, &str)> {
        self.kubernetes_service.as_deref()?.split_once('/')
    }

    /// Whether instances on the peer nodes serve it too (`internal_traffic_policy: cluster`).
    #[must_use]
    pub fn cluster_wide(&self) -> bool {
        self.internal_traffic_policy == "cluster"
    }

    /// The IP protocol number.
    #[must_use]
    pub fn proto(&self) -> u8 {
        if self.protocol == "udp" {
            dataplane_common::policy::PROTO_UDP
        } else {
            dataplane_common::policy::PROTO_TCP
        }
    }
}

impl ServiceConfig {
    /// Checks the fields that need no other service: name, quadrant, protocol, affinity, port.
    fn validate_fields(&self, n: usize) -> Result<(), ConfigError> {
        let field = |f: &str| format!("services[{n}].{f}");
        if self.name.is_empty()
            || self.name.len() > 63
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(invalid(
                field("name"),
                format!(
                    "{:?} must be 1-63 characters of a-z, 0-9 and '-'",
                    self.name
                ),
            ));
        }
        if Quadrant::from_name(&self.quadrant).is_none() {
            return Err(invalid(
                field("quadrant"),
                format!("{:?}: expected dx, dg, px or pg", self.quadrant),
            ));
        }
        if self.protocol != "tcp" && self.protocol != "udp" {
            return Err(invalid(
                field("protocol"),
                format!("{:?}: expected tcp or udp", self.protocol),
            ));
        }
        if self.affinity != "none" && self.affinity != "workload" {
            return Err(invalid(
                field("affinity"),
                format!("{:?}: expected none or workload", self.affinity),
            ));
        }
        if self.internal_traffic_policy != "cluster" && self.internal_traffic_policy != "local" {
            return Err(invalid(
                field("internal_traffic_policy"),
                format!(
                    "{:?}: expected cluster or local",
                    self.internal_traffic_policy
                ),
            ));
        }
        if let Some(k) = &self.kubernetes_service {
            let label = |p: &str| {
                !p.is_empty()
                    && p.len() <= 63
                    && p.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !p.starts_with('-')
                    && !p.ends_with('-')
            };
            if !k
                .split_once('/')
                .is_some_and(|(ns, n)| label(ns) && label(n))
            {
                return Err(invalid(
                    field("kubernetes_service"),
                    format!(
                        "{k:?}: expected namespace/name, each 1-63 characters of a-z, 0-9 and \
                         '-' (a Kubernetes Service)"
                    ),
                ));
            }
        }
        if self.port == 0 {
            return Err(invalid(field("port"), "must be 1-65535"));
        }
        Ok(())
    }
}

impl Config {
    /// The instances quadrant `q` starts with.
    #[must_use]
    pub fn instances(&self, q: Quadrant) -> u8 {
        self.quadrants.get(q.name()).map_or(1, |c| c.instances)
    }

    /// The capacity of each instance of quadrant `q`.
    #[must_use]
    pub fn capacity(&self, q: Quadrant) -> InstanceCapacity {
        self.quadrants
            .get(q.name())
            .map(|c| c.capacity)
            .unwrap_or_default()
    }

    /// Network namespace of instance `i`.
    #[must_use]
    pub fn instance_netns(&self, i: InstanceRef) -> String {
        format!("{}-{}", self.instance, i.name())
    }

    /// Host-side veth of instance `i`.
    #[must_use]
    pub fn instance_iface(&self, i: InstanceRef) -> String {
        format!("{}-{}", self.interface_prefix, i.name())
    }

    /// Cgroup directory of instance `i`.
    #[must_use]
    pub fn instance_cgroup_dir(&self, i: InstanceRef) -> PathBuf {
        self.cgroup_parent().join(i.name())
    }

    /// Address of instance `i` inside its namespace: the prefix's address `2 + index`.
    #[must_use]
    pub fn instance_addr(&self, i: InstanceRef) -> Ipv4Addr {
        let base = u32::from(self.addrs(i.quadrant).prefix.network());
        Ipv4Addr::from(base + 2 + u32::from(i.index))
    }

    /// The instance whose address is `ip`, if any (any index an instance may get: up to
    /// [`MAX_INSTANCES`], within the quadrant's prefix).
    #[must_use]
    pub fn instance_of_addr(&self, ip: Ipv4Addr) -> Option<InstanceRef> {
        Quadrant::ALL.into_iter().find_map(|q| {
            let prefix = self.quadrants.get(q.name())?.prefix;
            let base = u32::from(prefix.network());
            let k = u32::from(ip).checked_sub(base + 2)?;
            let room = u32::try_from(prefix.hosts().count().saturating_sub(1)).unwrap_or(0);
            if k >= u32::from(MAX_INSTANCES).min(room) {
                return None;
            }
            Some(InstanceRef::new(q, u8::try_from(k).ok()?))
        })
    }

    pub(super) fn validate_instances(&self) -> Result<(), ConfigError> {
        for q in Quadrant::ALL {
            let Some(qc) = self.quadrants.get(q.name()) else {
                continue;
            };
            let field = |f: &str| format!("quadrants.{}.{f}", q.name());
            if !(1..=MAX_INSTANCES).contains(&qc.instances) {
                return Err(invalid(
                    field("instances"),
                    format!("{} is outside 1..={MAX_INSTANCES}", qc.instances),
                ));
            }
            // Every address an instance may get (`quadrant scale` goes up to the maximum) lies
            // in the prefix, below its broadcast address.
            let room = qc.prefix.hosts().count();
            if room < 2 + usize::from(MAX_INSTANCES) && qc.instances > 1 {
                return Err(invalid(
                    field("instances"),
                    format!(
                        "{} has room for {room} addresses; instances need the gateway and up to \
                         {MAX_INSTANCES} more: use /27 or larger",
                        qc.prefix
                    ),
                ));
            }
            let longest = self.interface_prefix.len() + 1 + q.name().len() + 3;
            if qc.instances > 1 && longest > IFNAMSIZ_MAX {
                return Err(invalid(
                    field("instances"),
                    format!(
                        "instance interfaces like {}-{}-{MAX_INSTANCES} are longer than \
                         {IFNAMSIZ_MAX} characters; shorten interface_prefix",
                        self.interface_prefix,
                        q.name()
                    ),
                ));
            }
            if let Some(c) = qc.capacity.cpu
                && !(0.1..=1024.0).contains(&c)
            {
                return Err(invalid(
                    field("capacity.cpu"),
                    format!(
                        "{c} is outside 0.1..=1024 CPUs (the kernel's smallest quota, 1 ms, in \
                         a 10 ms period)"
                    ),
                ));
            }
            if let Some(m) = qc.capacity.memory_bytes
                && m < 4 << 20
            {
                return Err(invalid(
                    field("capacity.memory_bytes"),
                    format!("{m} is below 4 MiB, too little for any process"),
                ));
            }
        }
        self.validate_services()
    }

    fn validate_services(&self) -> Result<(), ConfigError> {
        if self.services.len() > LB_SERVICES_MAX as usize {
            return Err(invalid(
                "services",
                format!(
                    "{} services; at most {LB_SERVICES_MAX} have a virtual address",
                    self.services.len()
                ),
            ));
        }
        for (n, s) in self.services.iter().enumerate() {
            let field = |f: &str| format!("services[{n}].{f}");
            s.validate_fields(n)?;
            if s.kubernetes_service.is_some() && self.peers.kubernetes.is_none() {
                return Err(invalid(
                    field("kubernetes_service"),
                    "needs peers.kubernetes (the agent reads EndpointSlices from the \
                     Kubernetes API it follows there)",
                ));
            }
            if self.services[..n].iter().any(|o| o.name == s.name) {
                return Err(invalid(
                    field("name"),
                    format!("{:?} is named twice", s.name),
                ));
            }
            if s.vip.is_loopback() || s.vip.is_unspecified() || s.vip.is_broadcast() {
                return Err(invalid(
                    field("vip"),
                    format!("{} cannot be a service address", s.vip),
                ));
            }
            if let Some(i) = self.instance_of_addr(s.vip) {
                return Err(invalid(
                    field("vip"),
                    format!(
                        "{} is (or may become) the address of instance {} of {}",
                        s.vip,
                        i.index,
                        i.quadrant.name()
                    ),
                ));
            }
            if let Some(q) = Quadrant::ALL
                .into_iter()
                .find(|&q| self.addrs(q).gateway == s.vip)
            {
                return Err(invalid(
                    field("vip"),
                    format!("{} is {}'s gateway", s.vip, q.name()),
                ));
            }
            if let Some(o) = self.services[..n]
                .iter()
                .find(|o| o.quadrant == s.quadrant && o.port == s.port && o.protocol == s.protocol)
            {
                return Err(invalid(
                    field("port"),
                    format!(
                        "{} port {} ({}) already serves {:?}: an instance's listener serves one \
                         service",
                        s.quadrant, s.port, s.protocol, o.name
                    ),
                ));
            }
            if let Some(o) = self.services[..n]
                .iter()
                .find(|o| o.vip == s.vip && o.port == s.port && o.protocol == s.protocol)
            {
                return Err(invalid(
                    field("vip"),
                    format!(
                        "{}:{} ({}) is already service {:?}'s",
                        s.vip, s.port, s.protocol, o.name
                    ),
                ));
            }
        }
        Ok(())
    }
}
