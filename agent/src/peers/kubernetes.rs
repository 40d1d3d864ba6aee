//! Peer nodes from the Kubernetes API (`peers.kubernetes`): the cluster is the distributed
//! layer, so an agent finds the others where Kubernetes keeps its nodes.
//!
//! Each agent writes two annotations on its own Node object — where it accepts peers
//! ([`ADDRESS`]: `peers.listen`, with the node's `InternalIP` when it listens on every address)
//! and its quadrants' prefixes ([`PREFIXES`]) — and watches the Node objects (list, then watch,
//! relisting after an error with kube-runtime's backoff). Every other node that carries an
//! address is a peer: its announced prefixes go into `PREFIXES` (and routes) at once, so the
//! kernel programs judge its quadrants' traffic even while its agent is away; it is linked to
//! and accepted, and its link must tell the same prefixes. A node whose object goes, or whose
//! annotation does, stops being one (link ended, prefixes and routes removed). The node's name
//! is its node SVID's name, so links are authenticated by mTLS under the one upstream CA, not by
//! what the API says. A full `down` takes the annotations off again.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use super::{Discovered, POLL, Peers, locked};
use crate::config::{KubernetesPeers, PeerNode, check_name};
use ipnet::Ipv4Net;

/// A Node object's metadata, as the watch gets it.
type Meta = PartialObjectMeta<NodeObject>;

/// The annotation naming where a node's agent accepts peers (`ip:port`).
pub const ADDRESS: &str = "quadrant.io/peer-address";
/// The annotation listing a node's quadrant prefixes (`dg=10.240.1.0/24,dx=…`).
pub const PREFIXES: &str = "quadrant.io/quadrant-prefixes";
/// How long a failed connection to the API or a failed annotation waits before the next try.
const RETRY: Duration = Duration::from_secs(2);
/// How long publishing (or withdrawing) may wait for the API server: the watch stays
/// responsive, and a stopping agent is not held up by a server that does not answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the endpoints are judged again without a change of their slices.
const ENDPOINTS_RECHECK: Duration = Duration::from_secs(1);
/// The field manager named in this agent's patches.
const MANAGER: &str = "quadrant-agent";

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

/// Follows the Kubernetes API until the agent stops (the thread `peer-kubernetes`).
pub(super) fn follow(peers: &Arc<Peers>, k: &KubernetesPeers) {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run(peers, k)),
        Err(e) => failed(
            peers,
            format!("cannot start the Kubernetes watch's runtime: {e}"),
        ),
    }
}

/// Notes why the API cannot be followed (logged when the reason changes).
fn failed(peers: &Peers, why: String) {
    let mut e = locked(&peers.kubernetes_error);
    if e.as_deref() != Some(why.as_str()) {
        warn!(error = %why, "Kubernetes API");
    }
    *e = Some(why);
}

async fn client(k: &KubernetesPeers) -> Result<Client, String> {
    let config = match &k.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::incluster().map_err(|e| {
            format!(
                "no in-cluster Kubernetes configuration (a pod's service account) and no \
                 peers.kubernetes.kubeconfig: {e}"
            )
        })?,
    };
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// Waits `d` in steps of [`POLL`]; true when the agent stops meanwhile.
async fn stops_within(peers: &Peers, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if peers.stopping() {
            return true;
        }
        tokio::time::sleep(POLL).await;
    }
    peers.stopping()
}

async fn run(peers: &Arc<Peers>, k: &KubernetesPeers) {
    let client = loop {
        match client(k).await {
            Ok(c) => break c,
            Err(e) => failed(peers, e),
        }
        if stops_within(peers, RETRY).await {
            return;
        }
    };
    let api: Api<NodeObject> = Api::all(client.clone());
    let mut slice_events = super::endpoints::watches(&client, &peers.config);
    let mut slices = super::endpoints::Slices::default();
    let mut next_endpoints = Instant::now();
    let metadata: Api<Meta> = Api::all(client);
    let own = own_annotations(peers);
    let mut published: Option<BTreeMap<String, String>> = None;
    let mut next_publish = Instant::now();
    let mut nodes = Nodes::default();
    // Names and annotations are all a peer needs: the metadata alone, not every node's status
    // (its images list runs to tens of KiB), on every node of the cluster.
    let stream = watcher(metadata, watcher::Config::default()).default_backoff();
    tokio::pin!(stream);
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { break };
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        failed(peers, format!("watching the cluster's nodes: {e}"));
                        continue;
                    }
                };
                *locked(&peers.kubernetes_error) = None;
                nodes.apply(peers, event, &mut published);
            }
            Some((n, event)) = slice_events.next(), if !slice_events.is_empty() => {
                match event {
                    Ok(e) => {
                        if slices.apply(n, e) {
                            set_endpoints(peers, &slices, n);
                        }
                    }
                    Err(e) => failed(
                        peers,
                        format!(
                            "watching the EndpointSlices of {}: {e}",
                            peers.config.services[n].kubernetes_service.as_deref().unwrap_or("")
                        ),
                    ),
                }
            }
            _ = tick.tick() => {
                if peers.stopping() {
                    break;
                }
                // Pods and peers' prefixes change what the kernel judges an endpoint to be.
                if Instant::now() >= next_endpoints {
                    next_endpoints = Instant::now() + ENDPOINTS_RECHECK;
                    for n in slice_events.keys().copied().collect::<Vec<_>>() {
                        set_endpoints(peers, &slices, n);
                    }
                }
                if published.is_none() && Instant::now() >= next_publish {
                    match publish_within(&api, peers, &own).await {
                        Ok(a) => {
                            info!(node = peers.me, annotations = ?a, "published this agent on its Node object");
                            published = Some(a);
                        }
                        Err(e) => {
                            failed(peers, e);
                            next_publish = Instant::now() + RETRY;
                        }
                    }
                }
            }
        }
    }
    if peers.withdraw.load(Ordering::Relaxed) && published.is_some() {
        withdraw(&api, peers).await;
    }
}

/// The nodes the watch lists, kept from its events.
#[derive(Default)]
struct Nodes {
    listed: BTreeMap<String, Discovered>,
    relisting: Option<BTreeMap<String, Discovered>>,
}

impl Nodes {
    /// Takes one event; makes the listed nodes the peers when they change, and forgets what
    /// was `published` when this node's own object lost it.
    fn apply(
        &mut self,
        peers: &Arc<Peers>,
        event: watcher::Event<Meta>,
        published: &mut Option<BTreeMap<String, String>>,
    ) {
        let before = self.listed.clone();
        match event {
            watcher::Event::Init => self.relisting = Some(BTreeMap::new()),
            watcher::Event::InitApply(n) => {
                if own_changed(peers, &n, published.as_ref()) {
                    *published = None;
                }
                if let (Some(r), Some(p)) = (self.relisting.as_mut(), peer_of(&n)) {
                    r.insert(p.node.name.clone(), p);
                }
            }
            watcher::Event::InitDone => {
                if let Some(r) = self.relisting.take() {
                    self.listed = r;
                }
            }
            watcher::Event::Apply(n) => {
                if own_changed(peers, &n, published.as_ref()) {
                    *published = None;
                }
                let name = n.metadata.name.clone().unwrap_or_default();
                match peer_of(&n) {
                    Some(p) => self.listed.insert(name, p),
                    None => self.listed.remove(&name),
                };
            }
            watcher::Event::Delete(n) => {
                if let Some(name) = &n.metadata.name {
                    self.listed.remove(name);
                }
            }
        }
        if self.listed != before {
            peers.set_discovered(self.listed.values().cloned().collect());
        }
    }
}

/// Service `n`'s endpoints, as its slices have them now, into its VIP.
fn set_endpoints(peers: &Peers, slices: &super::endpoints::Slices, n: usize) {
    if let Some(s) = peers.config.services.get(n) {
        peers.set_endpoints(n, &slices.endpoints(n, s));
    }
}

/// [`publish`], giving up after [`CALL_TIMEOUT`].
async fn publish_within(
    api: &Api<NodeObject>,
    peers: &Peers,
    own: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    tokio::time::timeout(CALL_TIMEOUT, publish(api, peers, own))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the API server did not answer within {CALL_TIMEOUT:?}"
            ))
        })
}

/// Takes this agent's annotations off its Node object (a full `down`).
async fn withdraw(api: &Api<NodeObject>, peers: &Peers) {
    let patch = json!({ "metadata": { "annotations": { ADDRESS: null, PREFIXES: null } } });
    let done = tokio::time::timeout(
        CALL_TIMEOUT,
        api.patch(&peers.me, &patch_params(), &Patch::Merge(&patch)),
    )
    .await;
    match done {
        Ok(Ok(_)) => info!(node = peers.me, "took this agent off its Node object"),
        Ok(Err(e)) => {
            warn!(node = peers.me, error = %e, "cannot take this agent off its Node object");
        }
        Err(_) => warn!(
            node = peers.me,
            "cannot take this agent off its Node object: no answer within {CALL_TIMEOUT:?}"
        ),
    }
}

/// This agent's annotations but for the address when it listens on every address (the
/// node's `InternalIP` then, read at publishing).
fn own_annotations(peers: &Peers) -> BTreeMap<String, String> {
    let prefixes = peers
        .own_prefixes()
        .iter()
        .map(|(q, n)| format!("{q}={n}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut a = BTreeMap::from([(PREFIXES.to_owned(), prefixes)]);
    if let Some(l) = peers.config.peers.listen
        && !l.ip().is_unspecified()
    {
        a.insert(ADDRESS.to_owned(), l.to_string());
    }
    a
}

/// Whether `node` is this agent's own Node object without the annotations it published.
fn own_changed(peers: &Peers, node: &Meta, published: Option<&BTreeMap<String, String>>) -> bool {
    let Some(published) = published else {
        return false;
    };
    if node.metadata.name.as_deref() != Some(peers.me.as_str()) {
        return false;
    }
    let have = node.metadata.annotations.as_ref();
    published
        .iter()
        .any(|(k, v)| have.and_then(|a| a.get(k)) != Some(v))
}

/// Writes this agent's annotations on its Node object; the annotations written.
async fn publish(
    api: &Api<NodeObject>,
    peers: &Peers,
    own: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    let mut annotations = own.clone();
    if !annotations.contains_key(ADDRESS) {
        let port = peers.config.peers.listen.map_or(0, |l| l.port());
        let node = api
            .get(&peers.me)
            .await
            .map_err(|e| format!("cannot read this node's object {}: {e}", peers.me))?;
        let ip = internal_ip(&node).ok_or_else(|| {
            format!(
                "node {} has no IPv4 InternalIP in its status, and peers.listen listens on \
                 every address: set peers.listen to the address peers reach this node at",
                peers.me
            )
        })?;
        annotations.insert(ADDRESS.to_owned(), SocketAddrV4::new(ip, port).to_string());
    }
    let patch = json!({ "metadata": { "annotations": annotations } });
    api.patch(&peers.me, &patch_params(), &Patch::Merge(&patch))
        .await
        .map_err(|e| format!("cannot annotate this node's object {}: {e}", peers.me))?;
    Ok(annotations)
}

/// The node's first IPv4 `InternalIP`.
fn internal_ip(node: &NodeObject) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// The peer a Node object names: its name, the address its agent published and the prefixes it
/// announces; `None` for a node without our agent (or with an address annotation that is not
/// an `ip:port`, logged). Prefixes that cannot be read are left out (logged): the link tells
/// them then.
fn peer_of(node: &Meta) -> Option<Discovered> {
    let name = node.metadata.name.as_deref()?;
    let annotations = node.metadata.annotations.as_ref()?;
    let address = annotations.get(ADDRESS)?;
    let parsed = address
        .parse::<SocketAddrV4>()
        .ok()
        .filter(|a| a.port() != 0 && !a.ip().is_unspecified());
    let node = match (parsed, check_name(name)) {
        (Some(address), Ok(())) => PeerNode {
            name: name.to_owned(),
            address,
        },
        (None, _) => {
            warn!(
                node = name,
                address, "node's {ADDRESS} is not an IPv4 address and port; not a peer"
            );
            return None;
        }
        (_, Err(e)) => {
            warn!(node = name, error = %e, "node's name cannot be a peer's");
            return None;
        }
    };
    let prefixes = annotations
        .get(PREFIXES)
        .and_then(|text| match prefixes_of(text) {
            Ok(p) => Some(p),
            Err(e) => {
                warn!(node = name, error = %e, "node's {PREFIXES} cannot be read");
                None
            }
        });
    Some(Discovered { node, prefixes })
}

/// `dx=10.240.0.0/24,dg=…` as a map; every quadrant named once.
fn prefixes_of(text: &str) -> Result<BTreeMap<String, Ipv4Net>, String> {
    let mut out = BTreeMap::new();
    for part in text.split(',') {
        let (q, net) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not quadrant=prefix"))?;
        if dataplane_common::Quadrant::from_name(q).is_none() {
            return Err(format!("{q:?} is not a quadrant"));
        }
        let net: Ipv4Net = net.parse().map_err(|e| format!("{net:?} for {q}: {e}"))?;
        if out.insert(q.to_owned(), net).is_some() {
            return Err(format!("{q} is named twice"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, annotations: &[(&str, &str)]) -> Meta {
        let n = node(name, annotations, &[]);
        PartialObjectMeta {
            types: None,
            metadata: n.metadata,
            _phantom: std::marker::PhantomData,
        }
    }

    fn node(name: &str, annotations: &[(&str, &str)], ips: &[(&str, &str)]) -> NodeObject {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": annotations.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
            },
            "status": { "addresses": ips.iter().map(|(t, a)| json!({"type": t, "address": a})).collect::<Vec<_>>() },
        }))
        .expect("node")
    }

    #[test]
    fn announced_prefixes_are_read_or_left_out() {
        let ok = prefixes_of("dx=10.1.0.0/24,px=10.1.2.0/24").expect("prefixes");
        assert_eq!(ok["px"].to_string(), "10.1.2.0/24");
        for (bad, why) in [
            ("dx=10.1.0.0/24,qa=10.9.0.0/24", "not a quadrant"),
            ("dx=10.1.0.0/24,dx=10.2.0.0/24", "named twice"),
            ("dx", "not quadrant=prefix"),
            ("dx=10.1.0.0", "for dx"),
        ] {
            let err = prefixes_of(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
        let n = meta(
            "w-1",
            &[(ADDRESS, "10.0.0.7:7470"), (PREFIXES, "dx=nonsense")],
        );
        let d = peer_of(&n).expect("still a peer");
        assert_eq!(d.prefixes, None, "the link tells them then");
    }

    #[test]
    fn a_node_is_a_peer_only_with_a_usable_address() {
        let p = peer_of(&meta("w-1", &[(ADDRESS, "10.0.0.7:7470")]))
            .expect("peer")
            .node;
        assert_eq!(
            (p.name.as_str(), p.address.to_string().as_str()),
            ("w-1", "10.0.0.7:7470")
        );
        for bad in [
            "10.0.0.7",
            "0.0.0.0:7470",
            "10.0.0.7:0",
            "[fd00::1]:7470",
            "w-2:7470",
        ] {
            assert_eq!(peer_of(&meta("w-1", &[(ADDRESS, bad)])), None, "{bad}");
        }
        assert_eq!(peer_of(&meta("w-1", &[("other", "x")])), None);
    }

    #[test]
    fn the_published_address_is_the_first_ipv4_internal_ip() {
        let n = node(
            "w-1",
            &[],
            &[
                ("Hostname", "w-1"),
                ("InternalIP", "fd00::7"),
                ("ExternalIP", "192.0.2.1"),
                ("InternalIP", "10.0.0.7"),
            ],
        );
        assert_eq!(internal_ip(&n), Some(Ipv4Addr::new(10, 0, 0, 7)));
        assert_eq!(internal_ip(&node("w-1", &[], &[("Hostname", "w-1")])), None);
    }
}
