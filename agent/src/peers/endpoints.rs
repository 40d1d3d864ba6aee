//! The endpoints of the Kubernetes Services that services with a VIP name
//! (`services[].kubernetes_service`): one watch per service on the `EndpointSlice`s labelled
//! `kubernetes.io/service-name=<name>` in its namespace, as kube-proxy and Cilium follow them.
//! An endpoint counts while its `ready` condition is true or unset (terminating endpoints are
//! not ready); only IPv4 slices are read (the dataplane is IPv4).

use std::{collections::BTreeMap, net::Ipv4Addr, pin::Pin};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio_stream::{Stream, StreamMap};

use super::backends::Endpoint;
use crate::config::{Config, ServiceConfig};

/// The label naming a slice's Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// One service's watch.
pub(super) type SliceEvents =
    Pin<Box<dyn Stream<Item = Result<watcher::Event<EndpointSlice>, watcher::Error>> + Send>>;

/// A watch for every service that names a Kubernetes Service, by the service's index.
pub(super) fn watches(client: &Client, config: &Config) -> StreamMap<usize, SliceEvents> {
    let mut out = StreamMap::new();
    for (n, s) in config.services.iter().enumerate() {
        let Some((namespace, name)) = s.kubernetes_service() else {
            continue;
        };
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
        let selector = format!("{SERVICE_LABEL}={name}");
        let events = watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
        out.insert(n, Box::pin(events) as SliceEvents);
    }
    out
}

/// Each service's slices by name, kept from its watch's events.
#[derive(Default)]
pub(super) struct Slices {
    live: BTreeMap<usize, BTreeMap<String, EndpointSlice>>,
    relisting: BTreeMap<usize, BTreeMap<String, EndpointSlice>>,
}

impl Slices {
    /// Takes one event of service `n`'s watch; whether its slices changed.
    pub(super) fn apply(&mut self, n: usize, event: watcher::Event<EndpointSlice>) -> bool {
        let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        let live = self.live.entry(n).or_default();
        match event {
            watcher::Event::Init => {
                self.relisting.insert(n, BTreeMap::new());
                false
            }
            watcher::Event::InitApply(s) => {
                self.relisting.entry(n).or_default().insert(name(&s), s);
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relisting.remove(&n).unwrap_or_default();
                let changed = *live != listed;
                *live = listed;
                changed
            }
            watcher::Event::Apply(s) => live.insert(name(&s), s.clone()).as_ref() != Some(&s),
            watcher::Event::Delete(s) => live.remove(&name(&s)).is_some(),
        }
    }

    /// Service `n`'s ready endpoints.
    pub(super) fn endpoints(&self, n: usize, service: &ServiceConfig) -> Vec<Endpoint> {
        self.live
            .get(&n)
            .map(|slices| endpoints_of(slices.values(), service))
            .unwrap_or_default()
    }
}

/// The ready IPv4 endpoints of `slices` for `service`: each with the slice's port of the
/// service's protocol (the one named as the service when the slice has several).
fn endpoints_of<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    service: &ServiceConfig,
) -> Vec<Endpoint> {
    let protocol = service.protocol.to_ascii_uppercase();
    let mut out = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let ports: Vec<_> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == protocol)
            .collect();
        let port = match ports.as_slice() {
            [one] => one.port,
            many => many
                .iter()
                .find(|p| p.name.as_deref() == Some(service.name.as_str()))
                .and_then(|p| p.port),
        };
        let Some(port) = port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            continue;
        };
        for e in &slice.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for a in &e.addresses {
                if let Ok(addr) = a.parse::<Ipv4Addr>() {
                    out.push(Endpoint {
                        addr,
                        port,
                        node: e.node_name.clone(),
                    });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service() -> ServiceConfig {
        serde_json::from_value(json!({
            "name": "api", "quadrant": "px", "port": 8080, "vip": "10.96.0.10",
        }))
        .expect("service")
    }

    fn slice(value: &serde_json::Value) -> EndpointSlice {
        serde_json::from_value(value.clone()).expect("slice")
    }

    #[test]
    fn ready_ipv4_endpoints_with_the_services_port_are_read() {
        let one = slice(&json!({
            "metadata": { "name": "api-1" },
            "addressType": "IPv4",
            "ports": [{ "port": 80, "protocol": "TCP" }, { "port": 53, "protocol": "UDP" }],
            "endpoints": [
                { "addresses": ["10.1.2.3"], "conditions": { "ready": true }, "nodeName": "w-1" },
                { "addresses": ["10.1.2.4"] },
                { "addresses": ["10.1.2.5"], "conditions": { "ready": false, "terminating": true } },
            ],
        }));
        let named = slice(&json!({
            "metadata": { "name": "api-2" },
            "addressType": "IPv4",
            "ports": [{ "name": "metrics", "port": 9090 }, { "name": "api", "port": 8081 }],
            "endpoints": [{ "addresses": ["10.1.2.6"] }],
        }));
        let unnamed = slice(&json!({
            "metadata": { "name": "api-3" },
            "addressType": "IPv4",
            "ports": [{ "name": "a", "port": 1 }, { "name": "b", "port": 2 }],
            "endpoints": [{ "addresses": ["10.1.2.7"] }],
        }));
        let v6 = slice(&json!({
            "metadata": { "name": "api-4" },
            "addressType": "IPv6",
            "ports": [{ "port": 80 }],
            "endpoints": [{ "addresses": ["fd00::1"] }],
        }));
        let got = endpoints_of([&one, &named, &unnamed, &v6].into_iter(), &service());
        let want = [
            ("10.1.2.3", 80, Some("w-1")),
            ("10.1.2.4", 80, None),
            ("10.1.2.6", 8081, None),
        ]
        .map(|(a, port, node)| Endpoint {
            addr: a.parse().expect("ip"),
            port,
            node: node.map(str::to_owned),
        });
        assert_eq!(got, want);
    }

    #[test]
    fn a_relist_replaces_a_services_slices() {
        let mut s = Slices::default();
        let a = slice(&json!({
            "metadata": { "name": "api-1" }, "addressType": "IPv4",
            "ports": [{ "port": 80 }], "endpoints": [{ "addresses": ["10.1.2.3"] }],
        }));
        assert!(s.apply(0, watcher::Event::Apply(a.clone())));
        assert!(!s.apply(0, watcher::Event::Apply(a.clone())), "unchanged");
        assert!(!s.apply(0, watcher::Event::Init));
        assert!(!s.apply(0, watcher::Event::InitApply(a)));
        assert!(!s.apply(0, watcher::Event::InitDone), "the same slices");
        assert!(s.apply(0, watcher::Event::Init) | s.apply(0, watcher::Event::InitDone));
        assert!(s.endpoints(0, &service()).is_empty(), "relisted empty");
    }
}
