//! Services balanced across nodes: every hello a node answers tells the instances it has ready
//! for each of its services with a VIP (name, address, port, weight); the asking node adds them
//! to its own VIP of the service of that name when that one is balanced cluster-wide
//! (`internal_traffic_policy: cluster`), as kube-proxy and Cilium balance a Service over the
//! endpoints of every node. Only what a node's own link hears counts, and it goes as soon as
//! the link does: a node that stops answering takes its instances out of the others' VIPs.
//!
//! A Service's endpoints from the Kubernetes API (`services[].kubernetes_service`) join its VIP
//! too ([`Peers::set_endpoints`]), each only while this node's kernel judges its address as the
//! service's quadrant: an `EndpointSlice` is an object anyone allowed to write one can fill, so it
//! cannot point a PX VIP at a development pod or at the world.
//!
//! A node may only offer addresses inside its own prefix of the service's quadrant (the one its
//! link told and this node's kernel judges as that quadrant): a node cannot turn another's VIP
//! towards an address of this node, of another node or of the world.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::PoisonError};

use dataplane_common::Identity;
use ipnet::Ipv4Net;
use tracing::{info, warn};

use super::{Peers, locked, wire::ServiceBackend};
use crate::{config::Config, scale::RemoteBackend};

/// Instances a peer may tell at most (16 per service fill a service's slots).
pub const MAX_PEER_BACKENDS: usize = 256;

/// What node `name` tells (`told`) that this node takes, given the prefixes its link told
/// (`prefixes`), and what it does not, with why. Services balanced only locally here, and
/// instances of weight 0, are passed over without a word.
pub(super) fn check(
    config: &Config,
    name: &str,
    prefixes: &BTreeMap<String, Ipv4Net>,
    told: &[ServiceBackend],
) -> (Vec<RemoteBackend>, Vec<String>) {
    let mut taken: Vec<RemoteBackend> = Vec::new();
    let mut refused = Vec::new();
    if told.len() > MAX_PEER_BACKENDS {
        refused.push(format!(
            "{} instances told; at most {MAX_PEER_BACKENDS} are taken",
            told.len()
        ));
    }
    for b in told.iter().take(MAX_PEER_BACKENDS) {
        let what = format!("{} for {}", b.address, b.service);
        let Some((n, s)) = config
            .services
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == b.service)
        else {
            refused.push(format!("{what} (no service of that name here)"));
            continue;
        };
        if !s.cluster_wide() || b.weight == 0 {
            continue;
        }
        if b.port != s.port {
            refused.push(format!(
                "{what} (port {}; the service's port here is {})",
                b.port, s.port
            ));
            continue;
        }
        let q = s.quadrant().name();
        match prefixes.get(q) {
            Some(net) if net.contains(&b.address) => {}
            Some(net) => {
                refused.push(format!("{what} (outside node {name}'s {q} prefix {net})"));
                continue;
            }
            None => {
                refused.push(format!("{what} (node {name} told no {q} prefix)"));
                continue;
            }
        }
        if taken.iter().any(|t| t.service == n && t.addr == b.address) {
            continue;
        }
        taken.push(RemoteBackend {
            source: "peers",
            service: n,
            node: name.to_owned(),
            addr: b.address,
            port: b.port,
            ifindex: 0,
            weight: b.weight,
        });
    }
    (taken, refused)
}

/// A ready endpoint of a Kubernetes Service (from its `EndpointSlice`s).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Endpoint {
    /// Its address.
    pub addr: Ipv4Addr,
    /// The port it serves the service on.
    pub port: u16,
    /// The node it runs on, when the slice says.
    pub node: Option<String>,
}

impl Peers {
    /// Makes `endpoints` — service `n`'s ready Kubernetes endpoints — part of its VIP, each
    /// whose address this node's kernel judges as the service's quadrant (an instance of this
    /// node is one already); the others are listed with why (`quadrant instances`).
    pub(crate) fn set_endpoints(&self, n: usize, endpoints: &[Endpoint]) {
        let (Some(agent), Some(s)) = (self.agent.upgrade(), self.config.services.get(n)) else {
            return;
        };
        let q = s.quadrant();
        let weight = self.config.capacity(q).weight();
        let pods = agent.pods.list();
        let mut taken = Vec::new();
        let mut refused = Vec::new();
        {
            let dp = agent
                .dataplane
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for e in endpoints.iter().take(MAX_PEER_BACKENDS) {
                if self
                    .config
                    .instance_of_addr(e.addr)
                    .is_some_and(|i| i.quadrant == q)
                {
                    continue;
                }
                match dp.identity_of(e.addr) {
                    Ok(id) if id == Identity::from(q) => taken.push(RemoteBackend {
                        source: "kubernetes",
                        service: n,
                        node: e.node.clone().unwrap_or_else(|| "kubernetes".to_owned()),
                        addr: e.addr,
                        port: e.port,
                        ifindex: 0,
                        weight,
                    }),
                    Ok(id) => refused.push(format!(
                        "{}:{} ({} here, not {})",
                        e.addr,
                        e.port,
                        id.name(),
                        q.name()
                    )),
                    Err(err) => refused.push(format!("{}:{} ({err})", e.addr, e.port)),
                }
            }
        }
        // The pods of this node keep their veths (outside the dataplane's lock: a sysctl may
        // be written).
        for b in &mut taken {
            b.ifindex = local_veth(&pods, b.addr);
        }
        if endpoints.len() > MAX_PEER_BACKENDS {
            refused.push(format!(
                "{} endpoints; at most {MAX_PEER_BACKENDS} are taken",
                endpoints.len()
            ));
        }
        {
            let mut all = locked(&self.endpoints_refused);
            let before = all.insert(s.name.clone(), refused.clone());
            if !refused.is_empty() && before.as_ref() != Some(&refused) {
                warn!(
                    service = s.name,
                    ?refused,
                    "Kubernetes endpoints not balanced to"
                );
            }
        }
        let count = taken.len();
        match into_vips(
            &agent,
            &self.config,
            &format!("kubernetes:{}", s.name),
            taken,
        ) {
            Ok(false) => {}
            Ok(true) => info!(
                service = s.name,
                endpoints = count,
                "Kubernetes endpoints in the service's VIP"
            ),
            Err(e) => warn!(
                service = s.name,
                error = %e,
                "cannot write Kubernetes endpoints into the load-balancing maps; the VIP keeps \
                 the ones before"
            ),
        }
    }

    /// The Kubernetes endpoints not balanced to, and why, as `service: address (why)`.
    #[must_use]
    pub fn endpoints_refused(&self) -> Vec<String> {
        locked(&self.endpoints_refused)
            .iter()
            .flat_map(|(s, r)| r.iter().map(move |r| format!("{s}: {r}")))
            .collect()
    }

    /// This node's instances ready for its services, as it tells them (at most
    /// [`MAX_PEER_BACKENDS`]).
    pub(super) fn own_backends(&self) -> Vec<ServiceBackend> {
        let Some(agent) = self.agent.upgrade() else {
            return Vec::new();
        };
        let mut out: Vec<ServiceBackend> = agent
            .instances
            .ready_here(&self.config)
            .into_iter()
            .filter_map(|(n, i, weight)| {
                let s = self.config.services.get(n)?;
                Some(ServiceBackend {
                    service: s.name.clone(),
                    address: self.config.instance_addr(i),
                    port: s.port,
                    weight,
                })
            })
            .collect();
        out.truncate(MAX_PEER_BACKENDS);
        out
    }

    /// Makes the instances node `name` tells (none: its link is down, or it is gone) part of
    /// this node's VIPs, and writes the load-balancing maps when they change.
    pub(crate) fn learn_backends(&self, name: &str, told: &[ServiceBackend]) {
        let Some(agent) = self.agent.upgrade() else {
            return;
        };
        let prefixes = locked(&self.learned).get(name).cloned().unwrap_or_default();
        let (taken, refused) = check(&self.config, name, &prefixes, told);
        let count = taken.len();
        {
            let mut all = locked(&self.backends);
            let before = if count == 0 && refused.is_empty() {
                all.remove(name)
            } else {
                all.insert(name.to_owned(), (count, refused.clone()))
            };
            if !refused.is_empty() && before.is_none_or(|(_, r)| r != refused) {
                warn!(
                    node = name,
                    ?refused,
                    "peer node's instances not balanced to"
                );
            }
        }
        match into_vips(&agent, &self.config, name, taken) {
            Ok(false) => {}
            Ok(true) => info!(
                node = name,
                instances = count,
                "peer node's instances in the services' VIPs"
            ),
            Err(e) => warn!(
                node = name,
                error = %e,
                "cannot write a peer node's instances into the load-balancing maps; the VIPs \
                 keep the ones before"
            ),
        }
    }
}

/// The host-side veth of this node's pod at `addr` (0: none here), its reverse-path filter off:
/// the answers of the host's and the world's connections leave it with the VIP as their source
/// (as for an instance's veth, `quadrants::create_instance`).
fn local_veth(pods: &[crate::pods::PodStatus], addr: Ipv4Addr) -> u32 {
    let Some(p) = pods
        .iter()
        .find(|p| p.spec.addresses.iter().any(|a| a.addr() == addr))
    else {
        return 0;
    };
    let key = format!("net.ipv4.conf.{}.rp_filter", p.spec.host_ifname);
    let path = std::path::PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() != "0")
        && let Err(e) = crate::sys::write_sysctl(&key, "0")
    {
        warn!(error = %e, "a pod endpoint's answers to outside connections may be filtered");
    }
    p.spec.host_ifindex
}

/// Makes `taken` the backends learned under `key` and writes the load-balancing maps; whether
/// they changed. Nothing is half-applied: when the maps cannot be written, the backends before
/// are put back (and written again).
fn into_vips(
    agent: &crate::daemon::agent::Agent,
    config: &Config,
    key: &str,
    taken: Vec<RemoteBackend>,
) -> Result<bool, crate::loader::LoaderError> {
    let Some(before) = agent.instances.set_remote(key, taken) else {
        return Ok(false);
    };
    let mut dp = agent
        .dataplane
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Err(e) = agent.instances.write_lb(config, &mut dp) {
        agent.instances.set_remote(key, before);
        let _ = agent.instances.write_lb(config, &mut dp);
        return Err(e);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_yaml(
            "quadrants:\n  dx: { prefix: 10.1.0.0/24 }\n  dg: { prefix: 10.1.1.0/24 }\n  \
             px: { prefix: 10.2.0.0/24 }\n  pg: { prefix: 10.3.0.0/24 }\n\
             services:\n  - { name: api, quadrant: px, port: 8080, vip: 10.2.0.100 }\n  \
             - { name: near, quadrant: px, port: 9090, vip: 10.2.0.101, \
             internal_traffic_policy: local }\n",
            "t",
        )
        .expect("config")
    }

    fn told(service: &str, address: &str, port: u16, weight: u16) -> ServiceBackend {
        ServiceBackend {
            service: service.into(),
            address: address.parse().expect("ip"),
            port,
            weight,
        }
    }

    #[test]
    fn a_peer_offers_only_its_own_quadrants_addresses() {
        let prefixes: BTreeMap<String, Ipv4Net> = [
            ("px".to_owned(), "10.250.2.0/24".parse().expect("net")),
            ("dx".to_owned(), "10.250.0.0/24".parse().expect("net")),
        ]
        .into();
        let (taken, refused) = check(
            &config(),
            "b",
            &prefixes,
            &[
                told("api", "10.250.2.2", 8080, 1000),
                told("api", "10.250.2.2", 8080, 1000),
                // This node's PX, the peer's DX, the world: never a backend of this node's VIP.
                told("api", "10.2.0.2", 8080, 1000),
                told("api", "10.250.0.2", 8080, 1000),
                told("api", "192.0.2.1", 8080, 1000),
                told("api", "10.250.2.3", 8081, 1000),
                told("api", "10.250.2.4", 8080, 0),
                told("near", "10.250.2.2", 9090, 1000),
                told("web", "10.250.2.2", 80, 1000),
            ],
        );
        assert_eq!(
            taken,
            [RemoteBackend {
                source: "peers",
                service: 0,
                node: "b".into(),
                addr: "10.250.2.2".parse().expect("ip"),
                port: 8080,
                ifindex: 0,
                weight: 1000,
            }]
        );
        assert_eq!(
            refused,
            [
                "10.2.0.2 for api (outside node b's px prefix 10.250.2.0/24)",
                "10.250.0.2 for api (outside node b's px prefix 10.250.2.0/24)",
                "192.0.2.1 for api (outside node b's px prefix 10.250.2.0/24)",
                "10.250.2.3 for api (port 8081; the service's port here is 8080)",
                "10.250.2.2 for web (no service of that name here)",
            ]
        );
        let (taken, refused) = check(
            &config(),
            "b",
            &BTreeMap::new(),
            &[told("api", "10.250.2.2", 8080, 1000)],
        );
        assert!(taken.is_empty());
        assert_eq!(refused, ["10.250.2.2 for api (node b told no px prefix)"]);
    }

    #[test]
    fn told_instances_are_read_within_the_limit() {
        let prefixes: BTreeMap<String, Ipv4Net> =
            [("px".to_owned(), "10.250.0.0/16".parse().expect("net"))].into();
        let many: Vec<ServiceBackend> = (0..=MAX_PEER_BACKENDS)
            .map(|i| {
                let a = Ipv4Addr::from(0x0afa_0000 + u32::try_from(i).expect("i"));
                told("api", &a.to_string(), 8080, 1)
            })
            .collect();
        let (taken, refused) = check(&config(), "b", &prefixes, &many);
        assert_eq!(taken.len(), MAX_PEER_BACKENDS);
        assert_eq!(refused, ["257 instances told; at most 256 are taken"]);
    }
}
