//! Links between the agents of several nodes (`peers` in the configuration): a lane to a
//! service that no instance on this node can take goes to an instance on another node, over
//! TCP + mTLS between the workloads.
//!
//! The peers are the nodes of `peers.nodes` and, with `peers.kubernetes`, the cluster's nodes
//! whose agents published themselves on their Node objects (`kubernetes.rs`). Each agent proves
//! itself with a node SVID (`spiffe://<trust domain>/node/<name>`, its `instance` or its
//! Kubernetes node name) from its CA; nodes trust each other when their CAs chain to one
//! upstream CA (`identity.upstream`), as SPIRE servers sharing an `UpstreamAuthority` do, and
//! accept only the nodes that are their peers.
//! On linking, both sides tell their quadrants' prefixes: each writes the other's into
//! `PREFIXES` with the quadrant identities, so the kernel programs on both nodes judge the
//! traffic between a caller here and an instance there by the same quadrant policy as local
//! traffic, and (with `peers.routes`) routes them via the peer's address.
//!
//! A lane open here asks the service's node over the link (`Request::Open`); that agent decides
//! it with its own policy and breakers, picks one of its instances, hands the service its end and
//! answers where to connect with which one-time token. This agent gives the opener its end with
//! an SVID from its own CA (both verify each other against the upstream root). Instances of the
//! node in link slot `p` appear in lane grants as `16·(p + 1) + k`, so a retrying caller can pass
//! over one of them like a local one; a node keeps its slot while it is a peer.

mod backends;
mod endpoints;
mod kubernetes;
mod pods;
mod serve;
pub mod wire;

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc, Mutex, PoisonError, RwLock, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use dataplane_common::{Identity, Quadrant};
use ipnet::Ipv4Net;
use rustls::{ClientConnection, StreamOwned};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    config::{Config, MAX_PEERS, PeerNode, node_id},
    daemon::agent::Agent,
    identity::IdentityService,
    lanes::tls,
};
pub use backends::MAX_PEER_BACKENDS;
pub use pods::MAX_PEER_PODS;
use wire::{Frames, Reply, Request};

/// How often a link is checked with a hello, and how long a lost one waits before the next try.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// Connecting and the handshake, each.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an open waits for the service's node.
pub const OPEN_TIMEOUT: Duration = Duration::from_millis(1500);
/// Reads wake this often to see whether the agent stops.
const POLL: Duration = Duration::from_millis(100);

type Link = (StreamOwned<ClientConnection, TcpStream>, Frames);

struct Node {
    cfg: PeerNode,
    /// Listed by the Kubernetes API (else by `peers.nodes`).
    discovered: bool,
    /// The prefixes its Node object announces (a discovered node's); its link must tell the
    /// same.
    announced: Option<BTreeMap<String, Ipv4Net>>,
    link: Mutex<Option<Link>>,
    status: Mutex<PeerStatus>,
    lanes: AtomicU64,
}

/// One peer node as `quadrant instances` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its name (its node SVID's).
    pub name: String,
    /// Where its agent accepts peers.
    pub address: String,
    /// Where this agent learned of it: `peers.nodes` or `kubernetes`.
    #[serde(default)]
    pub source: String,
    /// This agent's link to it is up.
    pub linked: bool,
    /// Why the link is down, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its quadrants' prefixes, as it told them (written into `PREFIXES`).
    #[schemars(with = "BTreeMap<String, String>")]
    pub prefixes: BTreeMap<String, Ipv4Net>,
    /// Lanes opened to its instances from here.
    pub lanes_opened: u64,
    /// Listed by the Kubernetes API beyond the link slots: accepted, not linked to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waiting: bool,
    /// Its pods judged here as their quadrants.
    #[serde(default)]
    pub pods: usize,
    /// Its pods that are not, and why (at most 16 shown).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods_refused: Vec<String>,
    /// Its instances this node's VIPs balance to (services balanced cluster-wide).
    #[serde(default)]
    pub instances: usize,
    /// Instances it told that they do not, and why (at most 16 shown).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances_refused: Vec<String>,
}

impl PeerStatus {
    /// `linked`, `down`, or `waiting` for a link slot.
    #[must_use]
    pub fn state(&self) -> &'static str {
        if self.waiting {
            "waiting"
        } else if self.linked {
            "linked"
        } else {
            "down"
        }
    }
}

/// A node the Kubernetes API lists: where its agent accepts peers and the prefixes its Node
/// object announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Discovered {
    pub node: PeerNode,
    pub prefixes: Option<BTreeMap<String, Ipv4Net>>,
}

/// The links to the other nodes and the acceptor of theirs.
pub struct Peers {
    config: Config,
    identity: Arc<IdentityService>,
    agent: Weak<Agent>,
    /// This agent's name among its peers (its node SVID's): `instance`, or its Kubernetes node.
    me: String,
    /// The link slots: a node keeps its slot, its number `p` in lane grants, while it is a peer.
    slots: Vec<RwLock<Option<Arc<Node>>>>,
    /// Nodes the API lists beyond the slots: accepted, listed, not linked to.
    waiting: Mutex<Vec<Discovered>>,
    /// Serialises changes of the set of peers.
    changing: Mutex<()>,
    /// Prefixes written into `PREFIXES`, by node.
    learned: Mutex<BTreeMap<String, BTreeMap<String, Ipv4Net>>>,
    /// Pods of the peers, by node: what each told, and what went into `PREFIXES`.
    pods: Mutex<BTreeMap<String, pods::PeerPods>>,
    /// Instances of the peers in this node's VIPs, by node: how many, and those refused.
    backends: Mutex<BTreeMap<String, (usize, Vec<String>)>>,
    /// Kubernetes endpoints not balanced to, by service.
    endpoints_refused: Mutex<BTreeMap<String, Vec<String>>>,
    /// Routes added for the peers' prefixes.
    routes: Mutex<Vec<Ipv4Net>>,
    stop: AtomicBool,
    /// At the stop: take this node's entry off the Kubernetes API too (a full `down`).
    withdraw: AtomicBool,
    /// Why the Kubernetes API cannot be followed, while it cannot.
    kubernetes_error: Mutex<Option<String>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("me", &self.me)
            .field("nodes", &self.all().len())
            .finish_non_exhaustive()
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Peers {
    /// Starts the acceptor (with `peers.listen`), one link per listed node and, with
    /// `peers.kubernetes`, the watch of the cluster's nodes; `None` without peers.
    ///
    /// # Errors
    /// Without the identity service, when `peers.listen` cannot be bound, or without this
    /// node's Kubernetes name.
    pub fn start(agent: &Arc<Agent>) -> Result<Option<Arc<Self>>, String> {
        let config = &agent.config;
        if config.peers.nodes.is_empty() && config.peers.listen.is_none() {
            return Ok(None);
        }
        let identity = agent.identity.as_ref().map_err(|e| {
            format!("peers need the identity service (node SVIDs), which is unavailable: {e}")
        })?;
        let me = match &config.peers.kubernetes {
            Some(k) => k.node()?,
            None => config.instance.clone(),
        };
        let peers = Arc::new(Self {
            config: config.clone(),
            identity: Arc::clone(identity),
            agent: Arc::downgrade(agent),
            me,
            slots: (0..MAX_PEERS).map(|_| RwLock::new(None)).collect(),
            waiting: Mutex::default(),
            changing: Mutex::default(),
            learned: Mutex::default(),
            pods: Mutex::default(),
            backends: Mutex::default(),
            endpoints_refused: Mutex::default(),
            routes: Mutex::default(),
            stop: AtomicBool::new(false),
            withdraw: AtomicBool::new(false),
            kubernetes_error: Mutex::default(),
            threads: Mutex::default(),
        });
        if let Some(addr) = config.peers.listen {
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| format!("cannot accept peers on {addr}: {e}"))?;
            info!(%addr, "accepting peer nodes");
            let p = Arc::clone(&peers);
            let handle = std::thread::Builder::new()
                .name("peer-accept".into())
                .spawn(move || p.accept_loop(&listener))
                .map_err(|e| format!("cannot start the peer acceptor: {e}"))?;
            locked(&peers.threads).push(handle);
        }
        {
            let _changing = locked(&peers.changing);
            for n in &config.peers.nodes {
                peers.add(
                    &Discovered {
                        node: n.clone(),
                        prefixes: None,
                    },
                    false,
                )?;
            }
        }
        if let Some(k) = &config.peers.kubernetes {
            let p = Arc::clone(&peers);
            let k = k.clone();
            let handle = std::thread::Builder::new()
                .name("peer-kubernetes".into())
                .spawn(move || kubernetes::follow(&p, &k))
                .map_err(|e| format!("cannot start the Kubernetes watch: {e}"))?;
            locked(&peers.threads).push(handle);
        }
        Ok(Some(peers))
    }

    /// Ends the links, the acceptor and the Kubernetes watch; with `full` (a full `down`),
    /// deletes the routes it added and takes this node's entry off its Node object.
    pub fn stop(&self, full: bool) {
        self.withdraw.store(full, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *locked(&self.threads));
        for t in threads {
            let _ = t.join();
        }
        if full {
            for net in locked(&self.routes).drain(..) {
                let _ = crate::sys::ip(&["route", "del", &net.to_string()]);
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps `d` in steps, returning early when the agent stops.
    fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopping() && Instant::now() < end {
            std::thread::sleep(POLL.min(end.saturating_duration_since(Instant::now())));
        }
    }

    /// The node in slot `p`.
    fn node(&self, p: usize) -> Option<Arc<Node>> {
        self.slots
            .get(p)?
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The linked-to nodes with their slots, in the order lanes go to them: those of
    /// `peers.nodes` in its order, then those of the Kubernetes API by name.
    fn all(&self) -> Vec<(usize, Arc<Node>)> {
        let mut all: Vec<(usize, Arc<Node>)> = (0..self.slots.len())
            .filter_map(|p| self.node(p).map(|n| (p, n)))
            .collect();
        all.sort_by(|(pa, a), (pb, b)| {
            (a.discovered, a.discovered.then_some(&a.cfg.name), pa).cmp(&(
                b.discovered,
                b.discovered.then_some(&b.cfg.name),
                pb,
            ))
        });
        all
    }

    /// Every peer node and its link, for `quadrant instances`.
    #[must_use]
    pub fn status(&self) -> Vec<PeerStatus> {
        let mut all: Vec<PeerStatus> = self
            .all()
            .into_iter()
            .map(|(_, n)| {
                let mut s = locked(&n.status).clone();
                s.lanes_opened = n.lanes.load(Ordering::Relaxed);
                if let Some(p) = locked(&self.pods).get(&n.cfg.name) {
                    s.pods = p.written.len();
                    s.pods_refused = p.refused.iter().take(16).cloned().collect();
                }
                if let Some((count, refused)) = locked(&self.backends).get(&n.cfg.name) {
                    s.instances = *count;
                    s.instances_refused = refused.iter().take(16).cloned().collect();
                }
                s
            })
            .collect();
        let pods = locked(&self.pods);
        all.extend(locked(&self.waiting).iter().map(|d| {
            PeerStatus {
                name: d.node.name.clone(),
                address: d.node.address.to_string(),
                prefixes: locked(&self.learned)
                    .get(&d.node.name)
                    .cloned()
                    .unwrap_or_default(),
                source: "kubernetes".into(),
                waiting: true,
                pods: pods.get(&d.node.name).map_or(0, |p| p.written.len()),
                error: Some(format!(
                    "not linked to: this agent links to at most {MAX_PEERS} peer nodes; it accepts \
                 this one's link"
                )),
                ..PeerStatus::default()
            }
        }));
        all
    }

    /// Why the Kubernetes API cannot be followed, while it cannot.
    #[must_use]
    pub fn kubernetes_error(&self) -> Option<String> {
        locked(&self.kubernetes_error).clone()
    }

    /// The linked-to nodes' slots and names, in the order lanes go to them.
    pub(crate) fn order(&self) -> Vec<(usize, String)> {
        self.all()
            .into_iter()
            .map(|(p, n)| (p, n.cfg.name.clone()))
            .collect()
    }

    /// Where node `name` accepts peers, if it is one of this agent's peer nodes.
    pub(crate) fn address_of(&self, name: &str) -> Option<SocketAddrV4> {
        self.all()
            .into_iter()
            .map(|(_, n)| n.cfg.clone())
            .chain(locked(&self.waiting).iter().map(|d| d.node.clone()))
            .find(|n| n.name == name)
            .map(|n| n.address)
    }

    /// The names of every peer node, for messages.
    pub(crate) fn names(&self) -> Vec<String> {
        self.status().into_iter().map(|s| s.name).collect()
    }

    /// Whether any link is up.
    #[must_use]
    pub fn any_linked(&self) -> bool {
        self.all().iter().any(|(_, n)| locked(&n.link).is_some())
    }

    /// Gives `node` a free slot and a thread keeping its link (the caller holds `changing`);
    /// the prefixes its Node object announces are learned at once, before any link.
    fn add(self: &Arc<Self>, d: &Discovered, discovered: bool) -> Result<(), String> {
        let node = &d.node;
        let Some(p) = (0..self.slots.len()).find(|p| self.node(*p).is_none()) else {
            return Err(format!(
                "no link slot for node {}: at most {MAX_PEERS} peer nodes",
                node.name
            ));
        };
        let mut status = PeerStatus {
            name: node.name.clone(),
            address: node.address.to_string(),
            source: if discovered {
                "kubernetes"
            } else {
                "peers.nodes"
            }
            .into(),
            error: Some("not linked yet".into()),
            ..PeerStatus::default()
        };
        if let Some(announced) = &d.prefixes {
            match self.learn_for(&node.name, node.address, announced) {
                Ok(()) => status.prefixes.clone_from(announced),
                Err(e) => status.error = Some(format!("its Node object's prefixes: {e}")),
            }
        }
        let n = Arc::new(Node {
            status: Mutex::new(status),
            cfg: node.clone(),
            discovered,
            announced: d.prefixes.clone(),
            link: Mutex::new(None),
            lanes: AtomicU64::new(0),
        });
        *self.slots[p]
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&n));
        let me = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name(format!("peer-{p}"))
            .spawn(move || me.link_loop(p, &n))
            .map_err(|e| format!("cannot start a peer link: {e}"))?;
        let mut threads = locked(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
        Ok(())
    }

    /// Makes the nodes the Kubernetes API lists (this one left out) the discovered peers: a
    /// node gone, or at a new address or with new prefixes, loses its link and its prefixes; a
    /// new one gets a slot while there is one, else waits for one (its announced prefixes
    /// enforced all the same).
    pub(crate) fn set_discovered(self: &Arc<Self>, mut wanted: Vec<Discovered>) {
        let _changing = locked(&self.changing);
        wanted.retain(|w| w.node.name != self.me);
        wanted.sort_by(|a, b| a.node.name.cmp(&b.node.name));
        for (p, n) in self.all() {
            let same = |w: &Discovered| w.node == n.cfg && w.prefixes == n.announced;
            if n.discovered && !wanted.iter().any(same) {
                *self.slots[p]
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                info!(
                    node = n.cfg.name,
                    "peer node left the Kubernetes API's list, or changed"
                );
                self.forget(&n.cfg.name);
            }
        }
        let present: Vec<PeerNode> = self.all().into_iter().map(|(_, n)| n.cfg.clone()).collect();
        let mut waiting = Vec::new();
        for w in wanted {
            if present.iter().any(|n| n.name == w.node.name) {
                continue;
            }
            if !waiting.is_empty() {
                waiting.push(w);
                continue;
            }
            info!(node = w.node.name, address = %w.node.address, "peer node from the Kubernetes API");
            if let Err(e) = self.add(&w, true) {
                warn!(error = %e, "peer node not linked to");
                waiting.push(w);
            }
        }
        // A waiting node gone (or changed) is forgotten; a waiting node's announced prefixes
        // are enforced as well, linked to or not.
        let was_waiting = std::mem::take(&mut *locked(&self.waiting));
        let slotted: Vec<String> = self
            .all()
            .into_iter()
            .map(|(_, n)| n.cfg.name.clone())
            .collect();
        for old in was_waiting {
            if !waiting.contains(&old) && !slotted.contains(&old.node.name) {
                self.forget(&old.node.name);
            }
        }
        for w in &waiting {
            if let Some(announced) = &w.prefixes
                && let Err(e) = self.learn_for(&w.node.name, w.node.address, announced)
            {
                warn!(node = w.node.name, error = %e, "waiting peer node's prefixes not taken");
            }
        }
        *locked(&self.waiting) = waiting;
    }

    /// Learns the prefixes node `name`'s link tells, which must be those its Node object
    /// announces when it has one.
    ///
    /// # Errors
    /// For a difference, or as [`Peers::learn`].
    pub(crate) fn learn_told(
        &self,
        name: &str,
        told: &BTreeMap<String, Ipv4Net>,
    ) -> Result<(), String> {
        let announced = self
            .all()
            .into_iter()
            .find(|(_, n)| n.cfg.name == name)
            .and_then(|(_, n)| n.announced.clone())
            .or_else(|| {
                locked(&self.waiting)
                    .iter()
                    .find(|d| d.node.name == name)
                    .and_then(|d| d.prefixes.clone())
            });
        if let Some(a) = announced {
            check_told(name, &a, told)?;
        }
        self.learn(name, told)
    }

    /// This node's quadrant prefixes and host addresses, each with what holds it: what no peer's
    /// prefix or pod may be.
    fn own_nets(&self) -> Vec<(String, Ipv4Net)> {
        self.own_prefixes()
            .into_iter()
            .map(|(q, n)| (format!("{q} on this node"), n))
            .chain(
                self.config
                    .host
                    .addresses
                    .iter()
                    .map(|n| ("a host address".to_owned(), n.trunc())),
            )
            .collect()
    }

    /// This node's quadrant prefixes, as it tells them.
    fn own_prefixes(&self) -> BTreeMap<String, Ipv4Net> {
        Quadrant::ALL
            .iter()
            .map(|q| (q.name().to_owned(), self.config.addrs(*q).prefix))
            .collect()
    }

    fn trust_domain(&self) -> &str {
        self.identity.authority().trust_domain()
    }

    /// This node's SVID, decoded for rustls.
    fn node_svid(&self) -> Result<tls::Svid, String> {
        let id = node_id(self.trust_domain(), &self.me);
        let svid = self
            .identity
            .x509_for(&id)
            .map_err(|e| format!("cannot issue the node SVID {id}: {e}"))?
            .borrow()
            .clone();
        tls::Svid::from_material(&tls::Svid::material(
            &svid.chain,
            &svid.key_pkcs8,
            self.identity.authority().roots(),
            self.trust_domain(),
        ))
    }

    /// Sends `request` to the node in slot `p` and waits for its answer (at most `timeout`); a
    /// broken link is dropped (its keeper links again).
    ///
    /// # Errors
    /// When the node is not linked, or the exchange fails or times out.
    pub fn ask(&self, p: usize, request: &Request, timeout: Duration) -> Result<Reply, String> {
        let node = self
            .node(p)
            .ok_or_else(|| format!("peer slot {p} holds no node any more"))?;
        let mut link = locked(&node.link);
        let (stream, frames) = link
            .as_mut()
            .ok_or_else(|| format!("node {} is not linked", node.cfg.name))?;
        let deadline = Instant::now() + timeout;
        let answer = wire::write(stream, request).and_then(|()| {
            frames
                .next::<_, Reply>(stream, Some(deadline))?
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))
        });
        answer.map_err(|e| {
            *link = None;
            let why = format!("link to node {} failed: {e}", node.cfg.name);
            locked(&node.status).linked = false;
            locked(&node.status).error = Some(why.clone());
            why
        })
    }

    /// Counts a lane opened to the node in slot `p`.
    pub(crate) fn count_lane(&self, p: usize) {
        if let Some(n) = self.node(p) {
            n.lanes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Keeps the link to `node` in slot `p` up while it holds the slot: links, then says hello
    /// every [`KEEPALIVE`].
    fn link_loop(&self, p: usize, node: &Arc<Node>) {
        let holds = || self.node(p).is_some_and(|n| Arc::ptr_eq(&n, node));
        while !self.stopping() && holds() {
            if locked(&node.link).is_none() {
                // Its instances leave this node's VIPs with the link.
                self.learn_backends(&node.cfg.name, &[]);
                match self.link(node) {
                    Ok(()) => info!(node = node.cfg.name, "linked to peer node"),
                    Err(e) => {
                        let mut s = locked(&node.status);
                        if s.error.as_deref() != Some(e.as_str()) {
                            warn!(node = node.cfg.name, error = %e, "cannot link to peer node");
                        }
                        s.linked = false;
                        s.error = Some(e);
                    }
                }
            } else {
                let hello = Request::Hello {
                    node: self.me.clone(),
                    prefixes: self.own_prefixes(),
                    pods: self.own_pods(),
                };
                match self.ask(p, &hello, CONNECT_TIMEOUT) {
                    Ok(Reply::Hello {
                        prefixes,
                        pods,
                        backends,
                        ..
                    }) => {
                        if let Err(e) = self.learn_told(&node.cfg.name, &prefixes) {
                            warn!(node = node.cfg.name, error = %e, "peer's prefixes not taken");
                            locked(&node.status).error = Some(e);
                        }
                        self.learn_pods(&node.cfg.name, &pods);
                        self.learn_backends(&node.cfg.name, &backends);
                    }
                    Ok(_) => {}
                    Err(e) => warn!(node = node.cfg.name, error = %e, "peer link lost"),
                }
            }
            self.pause(KEEPALIVE);
        }
        *locked(&node.link) = None;
        self.learn_backends(&node.cfg.name, &[]);
    }

    /// Connects to `node`, completes the handshake and the hellos, and learns its prefixes.
    fn link(&self, node: &Node) -> Result<(), String> {
        let peer_id = node_id(self.trust_domain(), &node.cfg.name);
        let config = tls::node_client_config(&self.node_svid()?, &peer_id)?;
        let addr = SocketAddr::V4(node.cfg.address);
        let sock = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = sock.set_nodelay(true);
        sock.set_read_timeout(Some(POLL))
            .and_then(|()| sock.set_write_timeout(Some(CONNECT_TIMEOUT)))
            .map_err(|e| format!("socket to {addr}: {e}"))?;
        let conn = ClientConnection::new(config, tls::sni()).map_err(|e| e.to_string())?;
        let mut stream = StreamOwned::new(conn, sock);
        complete_handshake(&mut stream.conn, &mut stream.sock)
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        let mut frames = Frames::default();
        let hello = Request::Hello {
            node: self.me.clone(),
            prefixes: self.own_prefixes(),
            pods: self.own_pods(),
        };
        wire::write(&mut stream, &hello).map_err(|e| format!("handshake with {addr}: {e}"))?;
        let reply = frames
            .next::<_, Reply>(&mut stream, Some(Instant::now() + CONNECT_TIMEOUT))
            .map_err(|e| format!("handshake with {addr}: {e}"))?
            .ok_or_else(|| format!("{addr} did not answer within {CONNECT_TIMEOUT:?}"))?;
        let (prefixes, pods, backends) = match reply {
            Reply::Hello {
                node: name,
                prefixes,
                pods,
                backends,
            } if name == node.cfg.name => (prefixes, pods, backends),
            Reply::Hello { node: name, .. } => {
                return Err(format!(
                    "{addr} says it is node {name:?}, not {:?}",
                    node.cfg.name
                ));
            }
            Reply::Refused { message, .. } => {
                return Err(format!(
                    "node {} refused the link: {message}",
                    node.cfg.name
                ));
            }
            Reply::Granted(_) => return Err(format!("{addr} answered a hello with a grant")),
        };
        self.learn_told(&node.cfg.name, &prefixes)?;
        self.learn_pods(&node.cfg.name, &pods);
        self.learn_backends(&node.cfg.name, &backends);
        *locked(&node.link) = Some((stream, frames));
        let mut s = locked(&node.status);
        s.linked = true;
        s.error = None;
        s.prefixes = prefixes;
        Ok(())
    }

    /// Writes node `name`'s quadrant prefixes into `PREFIXES` (and routes them via its address)
    /// after checking that none overlaps a prefix of this node or of another peer.
    ///
    /// # Errors
    /// For an unknown quadrant, an overlap, or a failed map or route update.
    pub(crate) fn learn(
        &self,
        name: &str,
        prefixes: &BTreeMap<String, Ipv4Net>,
    ) -> Result<(), String> {
        let address = self
            .address_of(name)
            .ok_or_else(|| format!("node {name} is not a peer"))?;
        self.learn_for(name, address, prefixes)
    }

    /// [`Peers::learn`] for node `name` at `address`.
    fn learn_for(
        &self,
        name: &str,
        address: SocketAddrV4,
        prefixes: &BTreeMap<String, Ipv4Net>,
    ) -> Result<(), String> {
        let mut learned = locked(&self.learned);
        if learned.get(name) == Some(prefixes) {
            return Ok(());
        }
        let mut taken = self.own_nets();
        for (other, nets) in learned.iter().filter(|(n, _)| n.as_str() != name) {
            taken.extend(
                nets.iter()
                    .map(|(q, n)| (format!("{q} on node {other}"), *n)),
            );
        }
        let entries = entries_of(name, prefixes, &taken)?;
        let agent = self.agent.upgrade().ok_or("the agent is stopping")?;
        agent
            .dataplane
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add_prefixes(&entries)
            .map_err(|e| format!("cannot write node {name}'s prefixes: {e}"))?;
        if self.config.peers.routes {
            let via = address.ip().to_string();
            let mut failed = None;
            {
                let mut routes = locked(&self.routes);
                for (net, _) in &entries {
                    if let Err(e) =
                        crate::sys::ip(&["route", "replace", &net.to_string(), "via", &via])
                    {
                        failed = Some(format!("cannot route node {name}'s prefix {net}: {e}"));
                        break;
                    }
                    if !routes.contains(net) {
                        routes.push(*net);
                    }
                }
            }
            if let Some(e) = failed {
                // Nothing half-applied: what this call added goes again.
                let before: Vec<Ipv4Net> = learned
                    .get(name)
                    .map(|m| m.values().map(Ipv4Net::trunc).collect())
                    .unwrap_or_default();
                let added: Vec<Ipv4Net> = entries
                    .iter()
                    .map(|(n, _)| *n)
                    .filter(|n| !before.contains(n))
                    .collect();
                drop(learned);
                self.unlearn(name, &added);
                return Err(e);
            }
        }
        info!(
            node = name,
            ?prefixes,
            "peer node's quadrant prefixes written"
        );
        if let Some(old) = learned.insert(name.to_owned(), prefixes.clone()) {
            let stale: Vec<Ipv4Net> = old
                .values()
                .filter(|n| !prefixes.values().any(|p| p == *n))
                .map(Ipv4Net::trunc)
                .collect();
            drop(learned);
            self.unlearn(name, &stale);
        }
        Ok(())
    }

    /// Takes node `name`'s prefixes out of `PREFIXES` and its routes away (it is no longer a
    /// peer).
    fn forget(&self, name: &str) {
        self.learn_backends(name, &[]);
        locked(&self.backends).remove(name);
        self.learn_pods(name, &[]);
        locked(&self.pods).remove(name);
        let Some(old) = locked(&self.learned).remove(name) else {
            return;
        };
        let nets: Vec<Ipv4Net> = old.values().map(Ipv4Net::trunc).collect();
        self.unlearn(name, &nets);
    }

    fn unlearn(&self, name: &str, nets: &[Ipv4Net]) {
        if nets.is_empty() {
            return;
        }
        if let Some(agent) = self.agent.upgrade()
            && let Err(e) = agent
                .dataplane
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove_prefixes(nets)
        {
            warn!(node = name, error = %e, "cannot remove a former peer's prefixes");
        }
        let mut routes = locked(&self.routes);
        for net in nets {
            if let Some(i) = routes.iter().position(|r| r == net) {
                routes.remove(i);
                let _ = crate::sys::ip(&["route", "del", &net.to_string()]);
            }
        }
        info!(node = name, ?nets, "former peer node's prefixes removed");
    }
}

/// Whether the prefixes node `name`'s link tells are those its Node object announces.
fn check_told(
    name: &str,
    announced: &BTreeMap<String, Ipv4Net>,
    told: &BTreeMap<String, Ipv4Net>,
) -> Result<(), String> {
    if announced == told {
        return Ok(());
    }
    let show = |m: &BTreeMap<String, Ipv4Net>| {
        m.iter()
            .map(|(q, n)| format!("{q}={n}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    Err(format!(
        "node {name}'s link tells prefixes {}, its Node object announces {}; the node's \
         agent publishes them again at its start",
        show(told),
        show(announced)
    ))
}

/// The `PREFIXES` entries of node `name`'s quadrant prefixes, unless one names an unknown
/// quadrant or overlaps a prefix in `taken` (described by what holds it).
fn entries_of(
    name: &str,
    prefixes: &BTreeMap<String, Ipv4Net>,
    taken: &[(String, Ipv4Net)],
) -> Result<Vec<(Ipv4Net, Identity)>, String> {
    let mut entries = Vec::new();
    for (q, net) in prefixes {
        let quadrant = Quadrant::from_name(q)
            .ok_or_else(|| format!("node {name} names an unknown quadrant {q:?}"))?;
        if let Some((what, _)) = taken
            .iter()
            .find(|(_, t)| t.contains(&net.network()) || net.contains(&t.network()))
        {
            return Err(format!(
                "node {name}'s prefix {net} for {q} overlaps {what}; each node needs prefixes of \
                 its own"
            ));
        }
        entries.push((net.trunc(), Identity::from(quadrant)));
    }
    Ok(entries)
}

/// Completes a link's TLS handshake on `sock`, waiting out its short read timeouts (a busy peer
/// may take longer than one to answer) for up to [`CONNECT_TIMEOUT`].
fn complete_handshake<C, D>(conn: &mut C, sock: &mut TcpStream) -> std::io::Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while conn.is_handshaking() {
        match conn.complete_io(sock) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(pairs: &[(&str, &str)]) -> BTreeMap<String, Ipv4Net> {
        pairs
            .iter()
            .map(|(q, n)| ((*q).to_owned(), n.parse().expect("net")))
            .collect()
    }

    #[test]
    fn a_link_must_tell_the_prefixes_the_node_object_announces() {
        let announced = nets(&[("px", "10.250.2.0/24"), ("pg", "10.250.3.0/24")]);
        assert_eq!(check_told("b", &announced, &announced.clone()), Ok(()));
        let err = check_told("b", &announced, &nets(&[("px", "10.250.2.0/24")]))
            .expect_err("one missing");
        assert!(
            err.contains("tells prefixes px=10.250.2.0/24, its Node object announces pg=10.250.3.0/24,px=10.250.2.0/24"),
            "{err}"
        );
    }

    #[test]
    fn a_peers_prefixes_become_its_quadrants_unless_they_overlap() {
        let taken = vec![(
            "px on this node".to_owned(),
            "10.240.2.0/24".parse().expect("net"),
        )];
        let ok = entries_of(
            "b",
            &nets(&[("px", "10.250.2.0/24"), ("pg", "10.250.3.0/24")]),
            &taken,
        )
        .expect("disjoint");
        assert_eq!(
            ok,
            vec![
                ("10.250.3.0/24".parse().expect("net"), Identity::Pg),
                ("10.250.2.0/24".parse().expect("net"), Identity::Px),
            ]
        );
        for (net, why) in [
            ("10.240.2.128/25", "inside"),
            ("10.240.0.0/16", "around"),
            ("10.240.2.0/24", "the same"),
        ] {
            let err = entries_of("b", &nets(&[("dx", net)]), &taken).expect_err(why);
            assert!(err.contains("overlaps px on this node"), "{why}: {err}");
        }
        let err = entries_of("b", &nets(&[("qa", "10.9.0.0/24")]), &taken).expect_err("quadrant");
        assert!(err.contains("unknown quadrant \"qa\""), "{err}");
    }
}
