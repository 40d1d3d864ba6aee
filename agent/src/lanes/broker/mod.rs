//! The lane broker in the agent: attests each connecting workload (`SO_PEERCRED` → cgroup →
//! quadrant and workload → SPIFFE ID), decides each `open` with the policy's lane rules and the
//! opener quadrant's limits, builds the lane (sealed memfd rings and eventfds, a Unix socket
//! pair, or a TCP grant with SVIDs and a one-time token) and hands each end its descriptors.
//!
//! One thread per connection: requests are blocking reads on a `SOCK_SEQPACKET` socket, which is
//! the shortest path from a request to its answer. Messages to the *other* end of a lane are sent
//! without waiting: a listener that does not read its socket gets no more lanes ("busy") instead
//! of blocking the broker.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, getsockopt, listen,
    socket, sockopt::PeerCredentials,
};
use tracing::{debug, warn};

use super::{
    Transport, TransportChoice,
    control::{self, LaneMessage, LaneRequest, Refusal},
    os::{self, MAX_CONTROL_MESSAGE, Mapping},
    ring::{self, Region},
};
use crate::{
    config::Config,
    identity::{IdentityService, attest, spiffe_id},
    plans::{InvalidMessage, SchemaError, TaggedValidator},
    policy::LaneRule,
};

mod breaker;
mod cuts;
mod decide;
mod open;
mod open_lanes;
pub mod ping;
pub mod pool;
mod remote;
mod replicas;
mod report;
pub mod route;
pub mod sli;
pub mod trip;

pub use decide::Refused;
use decide::refuse;
pub use report::{
    Acceleration, LaneInfo, LanesReport, QuadrantLanes, Refusals, ServiceInfo, render,
};

/// How long an open waits for a service's queue to have room for the lane.
const INCOMING_PATIENCE: Duration = Duration::from_millis(200);

struct Conn {
    id: u64,
    fd: OwnedFd,
    /// The request being handled came after [`QUIET`] without one on this connection.
    after_quiet: AtomicBool,
}

/// A pause between an opener's requests after which its next open is taken for an occasional
/// one rather than one of a burst (see `hand_over` in `open.rs`).
const QUIET: Duration = Duration::from_millis(1);

impl Conn {
    /// Sends `msg`; with `wait` false, waits at most [`INCOMING_PATIENCE`] for room in the
    /// receiver's queue.
    fn send(&self, msg: &LaneMessage, fds: &[&OwnedFd], wait: bool) -> io::Result<()> {
        let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if !wait && !os::wait_writable(self.fd.as_raw_fd(), INCOMING_PATIENCE)? {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "its queue stayed full",
            ));
        }
        os::send_with_fds_flags(self.fd.as_raw_fd(), &bytes, &raw, !wait)
    }

    /// Sends `msg` if the receiver's queue has room now.
    fn try_send(&self, msg: &LaneMessage) -> io::Result<()> {
        let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
        os::send_with_fds_flags(self.fd.as_raw_fd(), &bytes, &[], true)
    }
}

struct Service {
    conn: Arc<Conn>,
    spiffe_id: String,
    tcp_port: Option<u16>,
    /// The instance of the quadrant whose process offers it.
    instance: u8,
}

/// A service's shadow generation: where mirror lanes go, and the share of requests the
/// client sides copy to it.
struct Shadow {
    service: Service,
    fraction_ppm: u32,
}

struct OpenLane {
    info: LaneInfo,
    client_quadrant: Quadrant,
    /// The opener's connection; none for a lane another node's workload opened.
    client_conn: Option<Arc<Conn>>,
    /// The service's connection; none for a lane to another node's instance.
    server_conn: Option<Arc<Conn>>,
    opened: Instant,
    region: Region,
    memory: Mapping,
    /// A copy of the client's end of the lane's socket (shared memory, Unix socket): shut down,
    /// both ends find the peer gone (a chaos partition cuts the lane).
    sever: Option<OwnedFd>,
}

impl OpenLane {
    /// Whether connection `id` is one of its ends.
    fn has_conn(&self, id: u64) -> bool {
        [&self.client_conn, &self.server_conn]
            .into_iter()
            .flatten()
            .any(|c| c.id == id)
    }
}

#[derive(Default)]
struct State {
    services: BTreeMap<(Quadrant, String), Service>,
    /// The same services offered by other instances of their quadrant (`replicas.rs`).
    replicas: BTreeMap<(Quadrant, String), Vec<Service>>,
    /// Services offered by shadow generations (`quadrant shadow`).
    shadows: BTreeMap<(Quadrant, String), Shadow>,
    lanes: open_lanes::OpenLanes,
    refusals: BTreeMap<(String, Refusal), u64>,
    /// What the client sides of closed lanes counted, and refused opens, per service.
    closed_sli: BTreeMap<(Quadrant, String), sli::SliTotals>,
    /// The same for the mirror lanes to shadow generations.
    closed_shadow_sli: BTreeMap<(Quadrant, String), sli::SliTotals>,
    /// Lanes closed a moment ago, still mapped: the client side may count its last request
    /// after the service closed the lane.
    retiring: std::collections::VecDeque<sli::Retired>,
    /// The pings of listeners that answer them, by connection (`ping.rs`).
    pings: BTreeMap<u64, ping::Pinged>,
}

impl State {
    fn usage(&self, q: Quadrant) -> (u32, u64) {
        self.lanes.usage(q)
    }
}

/// A lane service and the breaker thresholds a running workload's plan gives it.
pub type PlanBreaker = ((Quadrant, String), crate::config::BreakersConfig);

/// A lane a workload's plan declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredLane {
    /// The service's quadrant.
    pub quadrant: Quadrant,
    /// The service.
    pub service: String,
    /// The transport the plan requires, if any.
    pub transport: Option<Transport>,
}

/// The lane rules in force (or why there are none) and the bundle they come from.
#[derive(Debug)]
struct Rules {
    live: Result<Arc<Vec<LaneRule>>, String>,
    origin: String,
    digest: Option<String>,
}

/// The lane broker.
pub struct Broker {
    config: Config,
    identity: Option<Arc<IdentityService>>,
    rules: Mutex<Rules>,
    declared: Mutex<BTreeMap<(Quadrant, String), Vec<DeclaredLane>>>,
    state: Mutex<State>,
    /// Workloads with a shadow generation, and the share of requests mirrored to it (ppm).
    shadows: Mutex<BTreeMap<(Quadrant, String), u32>>,
    /// Admission control's refusal probability last written to the kernel, by service.
    admission_written: Mutex<BTreeMap<(Quadrant, String), u32>>,
    /// Service breaker thresholds from running workloads' plans, by workload key.
    plan_breakers: Mutex<BTreeMap<String, PlanBreaker>>,
    /// What each quadrant's open lanes hold, kept by `state` and read by the pool's filler
    /// without taking its lock.
    usage: Arc<open_lanes::Usage>,
    events: Arc<crate::events::EventBus>,
    next_lane: AtomicU64,
    next_conn: AtomicU64,
    pool: pool::Pool,
    breakers: breaker::Breakers,
    /// Latency threshold per service with a latency SLO, ns.
    thresholds: Mutex<BTreeMap<(Quadrant, String), u64>>,
    /// The service breakers the agent computes.
    trips: Mutex<trip::Trips>,
    /// Services re-routed because their latency SLO burnt.
    routes: Mutex<route::Routes>,
    /// Woken when a lane opens (the sampler of SLIs and breakers then reads every 20 ms).
    pub lane_opened: tokio::sync::Notify,
    /// Outages of the policy engine a chaos experiment asked for: every lane decision that
    /// involves such a quadrant fails closed.
    pub policy_outages: Arc<crate::chaos::outage::Outages>,
    /// Instances that take no new lanes (`quadrant drain`).
    draining: Mutex<std::collections::BTreeSet<(Quadrant, u8)>>,
    /// Chaos partitions and refusals, read from the dataplane's chaos maps.
    cuts: Mutex<cuts::Cuts>,
    /// The other nodes' agents, whose instances take lanes none here can (`peers`).
    peers: std::sync::OnceLock<Arc<crate::peers::Peers>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("socket", &self.config.lane_socket())
            .finish_non_exhaustive()
    }
}

/// What the listening and pool threads need to stop.
#[derive(Debug)]
pub struct Serving {
    broker: Arc<Broker>,
    listener: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    filler: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Serving {
    /// Stops accepting, empties the pool of prepared lanes and removes the socket (open lanes
    /// stay usable by their ends).
    pub fn stop(mut self) {
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.broker.pool.stop();
        if let Some(t) = self.filler.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Broker {
    /// A broker refusing every lane until lane rules are set ([`Self::set_rules`]); without an
    /// identity service there are no TCP lanes.
    #[must_use]
    pub fn new(
        config: &Config,
        identity: Option<Arc<IdentityService>>,
        events: Arc<crate::events::EventBus>,
    ) -> Self {
        let state = State::default();
        let usage = state.lanes.counters();
        Self {
            config: config.clone(),
            identity,
            rules: Mutex::new(Rules {
                live: Err("no policy made live yet".into()),
                origin: String::new(),
                digest: None,
            }),
            declared: Mutex::new(BTreeMap::new()),
            state: Mutex::new(state),
            shadows: Mutex::new(BTreeMap::new()),
            plan_breakers: Mutex::new(BTreeMap::new()),
            admission_written: Mutex::new(BTreeMap::new()),
            usage,
            events,
            next_lane: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            pool: pool::Pool::default(),
            thresholds: Mutex::new(BTreeMap::new()),
            trips: Mutex::new(trip::Trips::default()),
            routes: Mutex::new(route::Routes::default()),
            lane_opened: tokio::sync::Notify::new(),
            policy_outages: Arc::new(crate::chaos::outage::Outages::policy()),
            draining: Mutex::new(std::collections::BTreeSet::new()),
            cuts: Mutex::new(cuts::Cuts::new(config.bpffs_dir())),
            peers: std::sync::OnceLock::new(),
            breakers: breaker::Breakers::pinned(
                config
                    .bpffs_dir()
                    .join("maps")
                    .join(dataplane_common::breaker::BREAKERS),
            ),
        }
    }

    /// Cuts every open lane a chaos partition now separates (a drop fault taking every packet
    /// between its client's and its service's quadrants, either way); returns how many. Called
    /// by the sampler, so a partition cuts lanes within its period.
    pub fn cut_partitioned_lanes(&self) -> usize {
        let now = crate::breakers::monotonic_ns();
        let mut cuts = self.cuts.lock().unwrap_or_else(PoisonError::into_inner);
        if !cuts.any(now) {
            return 0;
        }
        let mut state = self.state();
        let across: Vec<u64> = state
            .lanes
            .iter()
            .filter(|(_, l)| {
                l.sever.is_some()
                    && Quadrant::from_name(&l.info.quadrant)
                        .is_some_and(|s| cuts.severs(l.client_quadrant, s, now))
            })
            .map(|(id, _)| *id)
            .collect();
        let mut cut = 0;
        for id in across {
            if let Some(fd) = state.lanes.take_sever(id) {
                let _ =
                    nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
                // An end asleep on its bell rather than on the socket learns it here.
                if let Some(l) = state.lanes.get(&id) {
                    os::ring_gone(&l.region, 0);
                    os::ring_gone(&l.region, 1);
                }
                cut += 1;
            }
        }
        drop(state);
        if cut > 0 {
            tracing::info!(lanes = cut, "chaos: lanes across a partition cut");
        }
        cut
    }

    /// Lanes no instance here can take go to these nodes' instances from now on.
    pub fn set_peers(&self, peers: Arc<crate::peers::Peers>) {
        let _ = self.peers.set(peers);
    }

    /// The peer nodes, when configured.
    #[must_use]
    pub fn peers(&self) -> Option<&Arc<crate::peers::Peers>> {
        self.peers.get()
    }

    /// Takes instance `index` of `q` out of (or back into) the choice of new lanes.
    pub fn set_draining(&self, q: Quadrant, index: u8, draining: bool) {
        let mut set = self.draining.lock().unwrap_or_else(PoisonError::into_inner);
        if draining {
            set.insert((q, index));
        } else {
            set.remove(&(q, index));
        }
    }

    /// Records the lanes a workload's plan declares: from then on it may open lanes only to
    /// those services, over the transport the plan requires (if any). `None` (or no declared
    /// lanes) lifts the restriction.
    pub fn set_declared(&self, q: Quadrant, workload: &str, lanes: Option<Vec<DeclaredLane>>) {
        let mut d = self.declared.lock().unwrap_or_else(PoisonError::into_inner);
        match lanes {
            Some(l) if !l.is_empty() => {
                d.insert((q, workload.to_owned()), l);
            }
            _ => {
                d.remove(&(q, workload.to_owned()));
            }
        }
    }

    /// Replaces the lane rules (or records why every lane is refused), from the bundle of
    /// `origin` with `digest`.
    pub fn set_rules(
        &self,
        rules: Result<Vec<LaneRule>, String>,
        origin: &str,
        digest: Option<&str>,
    ) {
        *self.rules.lock().unwrap_or_else(PoisonError::into_inner) = Rules {
            live: rules.map(Arc::new),
            origin: origin.to_owned(),
            digest: digest.map(ToOwned::to_owned),
        };
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Listens on the configured socket (world-connectable; callers are attested).
    pub fn serve(self: &Arc<Self>) -> io::Result<Serving> {
        let path = self.config.lane_socket();
        let _ = std::fs::remove_file(&path);
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(io::Error::from)?;
        let addr = UnixAddr::new(&path).map_err(io::Error::from)?;
        bind(fd.as_raw_fd(), &addr)
            .map_err(|e| io::Error::other(format!("cannot bind {}: {e}", path.display())))?;
        std::fs::set_permissions(
            &path,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o666),
        )?;
        listen(&fd, Backlog::new(128).map_err(io::Error::from)?).map_err(io::Error::from)?;
        let listener = Arc::new(fd);
        let me = Arc::clone(self);
        let l = Arc::clone(&listener);
        let thread = std::thread::Builder::new()
            .name("lane-broker".into())
            .spawn(move || me.accept_loop(&l))?;
        let me = Arc::clone(self);
        let filler = std::thread::Builder::new()
            .name("lane-pool".into())
            .spawn(move || me.fill_pool())?;
        Ok(Serving {
            broker: Arc::clone(self),
            listener,
            thread: Some(thread),
            filler: Some(filler),
            path,
        })
    }

    /// Keeps every started pool of prepared lanes at its depth, within its quadrant's headroom,
    /// until the broker stops.
    fn fill_pool(&self) {
        // Only on otherwise idle CPU time: a refill must not compete with the opens it serves.
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sets this thread's policy; the parameter lives across the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param) } != 0 {
            warn!(error = %io::Error::last_os_error(), "the lane pool's thread keeps its priority");
        }
        while self.fill(&self.pool.kinds()) {
            // Poked when a prepared lane is taken or a lane closes; the timeout catches the rest.
            if !self.pool.wait(Duration::from_secs(1)) {
                return;
            }
        }
    }

    /// Prepares lanes of `kinds` until each is at its depth or its quadrant's headroom is
    /// used; `false` once the pool has stopped (it takes no more parts then). Takes no lock an
    /// open waits for while it works: the usage comes from [`open_lanes::Usage`], and an open
    /// that finds the pool's lock held builds its own lane.
    fn fill(&self, kinds: &[(Quadrant, Transport)]) -> bool {
        let max_message = self.config.lanes.max_message_bytes as usize;
        let bytes = |transport| {
            ring::mapping_len(if transport == Transport::Shm {
                ring::capacity_for(max_message)
            } else {
                0
            }) as u64
        };
        for &(q, transport) in kinds {
            let limits = self.config.lanes.limits_of(q);
            loop {
                let (pooled, of_kind) = self.pool.held(q, transport);
                let open = self.usage.of(q);
                if !pool::room_for_one(&limits, open, pooled, of_kind, bytes(transport)) {
                    break;
                }
                match pool::Parts::make(transport, max_message) {
                    Ok(p) => {
                        if !self.pool.put(q, transport, p) {
                            return false;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot prepare a lane");
                        break;
                    }
                }
            }
        }
        true
    }

    fn accept_loop(self: Arc<Self>, listener: &OwnedFd) {
        loop {
            match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(raw) => {
                    // SAFETY: accept4 returned a new descriptor we own.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    let conn = Arc::new(Conn {
                        id: self.next_conn.fetch_add(1, Ordering::Relaxed),
                        fd,
                        after_quiet: AtomicBool::new(false),
                    });
                    let me = Arc::clone(&self);
                    if let Err(e) = std::thread::Builder::new()
                        .name("lane-conn".into())
                        .spawn(move || me.connection(&conn))
                    {
                        warn!(error = %e, "cannot start a lane connection thread");
                    }
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => {}
                // Shut down by `Serving::stop`.
                Err(_) => return,
            }
        }
    }

    fn count_refusal(&self, quadrant: &str, reason: Refusal) {
        *self
            .state()
            .refusals
            .entry((quadrant.to_owned(), reason))
            .or_default() += 1;
    }

    fn connection(&self, conn: &Arc<Conn>) {
        let caller = getsockopt(&conn.fd, PeerCredentials)
            .ok()
            .map(|c| c.pid())
            .ok_or(attest::AttestError::NoPeer)
            .and_then(|pid| attest::attest(Some(pid), &self.config.instance));
        let caller = match caller {
            Ok(c) => c,
            Err(e) => {
                // Every request of an unattested caller gets the reason (closing at once would
                // reset the connection under its first request and lose the answer).
                let mut buf = vec![0; MAX_CONTROL_MESSAGE];
                while let Ok(Some(_)) = os::recv_with_fds(conn.fd.as_raw_fd(), &mut buf) {
                    self.count_refusal("none", Refusal::Attestation);
                    let message = format!("caller not attested: {e}");
                    let reply = LaneMessage::Error {
                        message,
                        reason: Some(Refusal::Attestation),
                        limit: None,
                        retry_after_ms: None,
                    };
                    if conn.send(&reply, &[], true).is_err() {
                        break;
                    }
                }
                return;
            }
        };
        let id = spiffe_id(
            &self.config.identity.trust_domain,
            caller.quadrant,
            &caller.workload,
        );
        let mut buf = vec![0; MAX_CONTROL_MESSAGE];
        let mut handled = Instant::now();
        // Whether the connection reached its end of stream: its process has ended (its lanes
        // hold it open until then). A failed read says nothing about the process.
        let ended = loop {
            let n = match os::recv_with_fds(conn.fd.as_raw_fd(), &mut buf) {
                Ok(Some((n, _fds))) => n,
                Ok(None) => break true,
                Err(e) => {
                    debug!(error = %e, "lane connection read failed");
                    break false;
                }
            };
            conn.after_quiet
                .store(handled.elapsed() >= QUIET, Ordering::Relaxed);
            let request = match parse_request(&buf[..n]) {
                Ok(r) => r,
                Err(e) => {
                    let message = e.to_string();
                    self.count_refusal(caller.quadrant.name(), Refusal::Invalid);
                    let _ = conn.send(
                        &LaneMessage::Error {
                            message,
                            reason: Some(Refusal::Invalid),
                            limit: None,
                            retry_after_ms: None,
                        },
                        &[],
                        true,
                    );
                    continue;
                }
            };
            match request {
                LaneRequest::Open {
                    quadrant,
                    service,
                    transport,
                    mirror,
                    request_ids,
                    avoid_instance,
                    affinity_key,
                } => {
                    self.open_request(
                        conn,
                        &caller,
                        &id,
                        (&quadrant, &service, mirror, request_ids),
                        (transport, avoid_instance, affinity_key.as_deref()),
                    );
                }
                LaneRequest::Listen {
                    service,
                    tcp_port,
                    pings,
                } => {
                    let reply = self.listen(conn, &caller, &id, &service, tcp_port);
                    let _ = conn.send(&reply, &[], true);
                    // Pinged only once it has its answer: the first ping cannot come first.
                    if pings && matches!(reply, LaneMessage::Listening { .. }) {
                        self.watch_listener(conn.id);
                    }
                }
                LaneRequest::Close { lane } => self.close(conn.id, lane),
                LaneRequest::Pong { seq } => self.pong(conn.id, seq),
            }
            handled = Instant::now();
        };
        self.disconnect(conn.id, ended);
    }

    /// An `open` request: the plan's declared lanes, then the policy, the limits and the lane;
    /// a refusal is counted, published as an event and answered with its reason.
    fn open_request(
        &self,
        conn: &Arc<Conn>,
        caller: &attest::Caller,
        id: &str,
        (quadrant, service, mirror, request_ids): (&str, &str, bool, bool),
        (transport, avoid_instance, affinity_key): (TransportChoice, Option<u8>, Option<&str>),
    ) {
        // The schema admits only the four names; refused rather than assumed anyway.
        let result = Quadrant::from_name(quadrant)
            .ok_or_else(|| refuse(Refusal::Invalid, format!("unknown quadrant {quadrant:?}")))
            .and_then(|target| {
                let transport = {
                    let declared = self.declared.lock().unwrap_or_else(PoisonError::into_inner);
                    decide::declared_transport(
                        declared
                            .get(&(caller.quadrant, caller.workload.clone()))
                            .map(Vec::as_slice),
                        &format!("{}/{}", caller.quadrant.name(), caller.workload),
                        target,
                        service,
                        transport,
                    )?
                };
                self.open(
                    conn,
                    (caller.quadrant, id),
                    &open::Wanted {
                        quadrant: target,
                        service,
                        mirror,
                        request_ids,
                        avoid_instance,
                        affinity_key,
                    },
                    transport,
                )
            });
        if let Err(r) = result {
            self.count_refusal(caller.quadrant.name(), r.reason);
            if let Some(target) = Quadrant::from_name(quadrant).filter(|_| !mirror) {
                self.count_open_failure(target, service, r.reason);
            }
            self.events
                .emit(|seq, at_ms| crate::events::Event::LaneRefused {
                    seq,
                    at_ms,
                    quadrant: caller.quadrant.name().to_owned(),
                    reason: r.reason,
                    message: r.message.clone(),
                });
            let _ = conn.send(
                &LaneMessage::Error {
                    message: r.message,
                    reason: Some(r.reason),
                    limit: r.limit,
                    retry_after_ms: r.retry_after_ms,
                },
                &[],
                true,
            );
        }
        self.pool.refill();
    }

    fn listen(
        &self,
        conn: &Arc<Conn>,
        caller: &attest::Caller,
        id: &str,
        service: &str,
        tcp_port: Option<u16>,
    ) -> LaneMessage {
        let q = caller.quadrant;
        let refused = |message: String, reason| LaneMessage::Error {
            message,
            reason: Some(reason),
            limit: None,
            retry_after_ms: None,
        };
        let fraction = if caller.shadow {
            let fractions = self.shadows.lock().unwrap_or_else(PoisonError::into_inner);
            match fractions.get(&(q, caller.workload.clone())) {
                Some(f) => Some(*f),
                None => {
                    return refused(
                        format!(
                            "{}/{} has no shadow generation running; a shadow offers services \
                             only while `quadrant shadow` lists it",
                            q.name(),
                            caller.workload
                        ),
                        Refusal::Plan,
                    );
                }
            }
        } else {
            None
        };
        let mut state = self.state();
        let key = (q, service.to_owned());
        let existing = if fraction.is_some() {
            state.shadows.get(&key).map(|s| &s.service)
        } else {
            state.services.get(&key)
        };
        let offered = Service {
            conn: Arc::clone(conn),
            spiffe_id: id.to_owned(),
            tcp_port,
            instance: caller.instance,
        };
        if let Some(existing) = existing {
            if fraction.is_none() && existing.instance != caller.instance {
                // Another instance of the quadrant offers it too: lanes are spread over both.
                if state.add_replica(key, offered) {
                    return LaneMessage::Listening {
                        service: service.to_owned(),
                        spiffe_id: id.to_owned(),
                    };
                }
                return refused(
                    format!(
                        "service {service} is already offered by instance {} of {}",
                        caller.instance,
                        q.name()
                    ),
                    Refusal::Taken,
                );
            }
            return refused(
                format!(
                    "service {service} is already offered in {} by {}{}",
                    q.name(),
                    existing.spiffe_id,
                    if fraction.is_some() {
                        " (shadow generation)"
                    } else {
                        ""
                    }
                ),
                Refusal::Taken,
            );
        }
        match fraction {
            Some(fraction_ppm) => {
                state.shadows.insert(
                    key,
                    Shadow {
                        service: offered,
                        fraction_ppm,
                    },
                );
            }
            None => {
                state.services.insert(key, offered);
            }
        }
        LaneMessage::Listening {
            service: service.to_owned(),
            spiffe_id: id.to_owned(),
        }
    }

    /// Starts or ends a shadow generation of workload `workload` in `q`: while `fraction_ppm`
    /// is set, its processes may offer services, and lanes to those services copy that share
    /// of their requests to it. Ending one forgets the services it offers.
    pub fn set_shadow(&self, q: Quadrant, workload: &str, fraction_ppm: Option<u32>) {
        let mut fractions = self.shadows.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = fraction_ppm {
            fractions.insert((q, workload.to_owned()), f);
        } else {
            fractions.remove(&(q, workload.to_owned()));
            drop(fractions);
            let suffix = format!("/workload/{workload}");
            self.state()
                .shadows
                .retain(|(sq, _), s| !(*sq == q && s.service.spiffe_id.ends_with(&suffix)));
        }
    }

    /// Forgets a lane one of its ends closed (or whose end went away) and frees what it was
    /// charged. The other end learns it from the lane itself: a Close frame, or the hang-up of
    /// its socket.
    fn close(&self, conn_id: u64, lane: u64) {
        let mut state = self.state();
        if state.lanes.get(&lane).is_some_and(|e| e.has_conn(conn_id)) {
            state.retire(lane, conn_id);
            drop(state);
            self.pool.poke();
        }
    }

    /// Forgets a control connection and retires its lanes; `ended` says its process has ended.
    fn disconnect(&self, conn_id: u64, ended: bool) {
        let mut state = self.state();
        state.forget_offers(conn_id);
        state.pings.remove(&conn_id);
        state.shadows.retain(|_, s| s.service.conn.id != conn_id);
        let gone: Vec<u64> = state
            .lanes
            .iter()
            .filter(|(_, l)| l.has_conn(conn_id))
            .map(|(id, _)| *id)
            .collect();
        // When the process has ended, the lanes' other ends, which may sleep on their bells
        // rather than on the lanes' sockets, are told at once. A living process's lanes keep
        // working: their ends still hold the sockets that tell of a hang-up.
        for (id, l) in state
            .lanes
            .iter()
            .filter(|(_, l)| ended && l.has_conn(conn_id))
        {
            for (side, end) in [&l.client_conn, &l.server_conn].into_iter().enumerate() {
                if end.as_ref().is_some_and(|c| c.id == conn_id) {
                    tracing::debug!(lane = id, side, "lane end gone with its connection");
                    os::ring_gone(&l.region, side);
                }
            }
        }
        for lane in gone {
            state.retire(lane, conn_id);
        }
        drop(state);
        self.pool.poke();
    }
}

/// Parses a request after validating it against its schema; the error names the field.
pub fn parse_request(bytes: &[u8]) -> Result<LaneRequest, InvalidLaneRequest> {
    static VALIDATOR: std::sync::OnceLock<Result<TaggedValidator, SchemaError>> =
        std::sync::OnceLock::new();
    let validator = VALIDATOR
        .get_or_init(|| TaggedValidator::new(&control::request_schema(), "kind"))
        .as_ref()
        .map_err(|e| InvalidLaneRequest(InvalidMessage::Validator(e.clone())))?;
    validator.parse(bytes).map_err(InvalidLaneRequest)
}

/// A lane request that is not one.
#[derive(Debug, thiserror::Error)]
#[error("invalid lane request: {0}")]
pub struct InvalidLaneRequest(#[from] pub InvalidMessage);

#[cfg(test)]
mod tests;
