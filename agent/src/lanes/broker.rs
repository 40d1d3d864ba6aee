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
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, getsockopt, listen,
    socket, sockopt::PeerCredentials,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::{
    control::{self, LaneGrant, LaneMessage, LaneRequest, TcpGrant, Transport, TransportChoice},
    os::{self, MAX_CONTROL_MESSAGE, Mapping},
    ring::{self, Region, Stat},
    tls::Svid,
};
use crate::{
    config::Config,
    identity::{IdentityService, attest, spiffe_id},
    policy::LaneRule,
};

/// One open lane, as `quadrant lanes` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct LaneInfo {
    /// Lane id.
    pub lane: u64,
    /// Transport.
    pub transport: Transport,
    /// The service.
    pub service: String,
    /// The service's quadrant.
    pub quadrant: String,
    /// The opener's SPIFFE ID.
    pub client: String,
    /// The service's SPIFFE ID.
    pub server: String,
    /// Payload bytes client → server.
    pub bytes_to_server: u64,
    /// Payload bytes server → client.
    pub bytes_to_client: u64,
    /// Messages both ways.
    pub messages: u64,
    /// Smoothed round-trip time of the client's requests, in nanoseconds (0: none measured).
    pub rtt_ns: u64,
    /// Shared memory the lane holds.
    pub shm_bytes: u64,
    /// Seconds since it opened.
    pub age_secs: u64,
}

/// A service being offered.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct ServiceInfo {
    /// Its quadrant.
    pub quadrant: String,
    /// Its name.
    pub service: String,
    /// The listener's SPIFFE ID.
    pub spiffe_id: String,
    /// Its TCP port, if it takes TCP lanes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
}

/// A quadrant's lane usage against its limits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct QuadrantLanes {
    /// The quadrant.
    pub quadrant: String,
    /// Lanes its workloads have open.
    pub lanes: u32,
    /// Their limit.
    pub max_lanes: u32,
    /// Shared memory they hold.
    pub shm_bytes: u64,
    /// Its limit.
    pub max_shm_bytes: u64,
}

/// How often opens were refused, by the opener's quadrant and reason.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct Refusals {
    /// The opener's quadrant (`none` for unattested callers).
    pub quadrant: String,
    /// `policy`, `max_lanes`, `max_shm_bytes`, `no_service`, `busy`, `attestation`, `invalid`.
    pub reason: String,
    /// How many.
    pub count: u64,
}

/// What `quadrant lanes` prints.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct LanesReport {
    /// The broker's socket.
    pub socket: PathBuf,
    /// Where the lane rules come from, or why every lane is refused.
    pub policy: String,
    /// The digest of the policy bundle the lane rules come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_digest: Option<String>,
    /// Open lanes.
    pub lanes: Vec<LaneInfo>,
    /// Services offered.
    pub services: Vec<ServiceInfo>,
    /// Usage per quadrant.
    pub quadrants: Vec<QuadrantLanes>,
    /// Refused opens.
    pub refusals: Vec<Refusals>,
    /// Kernel TCP acceleration counters, when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_acceleration: Option<Acceleration>,
    /// With `tcp_acceleration: auto`: what the start-up measurement found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_acceleration_probe: Option<crate::lanes::accel_probe::ProbeFigures>,
    /// With `tcp_acceleration: auto`: why there is no measurement (the acceleration is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_acceleration_probe_error: Option<String>,
}

/// What the `sock_ops`/`sk_msg` acceleration did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct Acceleration {
    /// Established sockets recorded.
    pub sockets: u64,
    /// Messages handed straight to a local peer socket.
    pub redirected: u64,
    /// Messages that took the normal path.
    pub passed: u64,
    /// Messages of redirected connections refused because a policy reload revoked the flow
    /// that opened the connection.
    pub refused: u64,
}

/// How long an open waits for a service's queue to have room for the lane.
const INCOMING_PATIENCE: Duration = Duration::from_millis(200);

struct Conn {
    id: u64,
    fd: OwnedFd,
}

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
}

struct Service {
    conn: Arc<Conn>,
    spiffe_id: String,
    tcp_port: Option<u16>,
}

struct OpenLane {
    info: LaneInfo,
    client_quadrant: Quadrant,
    client_conn: Arc<Conn>,
    server_conn: Arc<Conn>,
    opened: Instant,
    region: Region,
    _memory: Mapping,
}

#[derive(Default)]
struct State {
    services: BTreeMap<(Quadrant, String), Service>,
    lanes: BTreeMap<u64, OpenLane>,
    refusals: BTreeMap<(String, String), u64>,
}

impl State {
    fn usage(&self, q: Quadrant) -> (u32, u64) {
        self.lanes
            .values()
            .filter(|l| l.client_quadrant == q)
            .fold((0, 0), |(n, b), l| (n + 1, b + l.info.shm_bytes))
    }
}

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
    events: Arc<crate::events::EventBus>,
    next_lane: AtomicU64,
    next_conn: AtomicU64,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("socket", &self.config.lane_socket())
            .finish_non_exhaustive()
    }
}

struct Refusal {
    reason: &'static str,
    message: String,
    limit: Option<String>,
}

fn refuse(reason: &'static str, message: String) -> Refusal {
    Refusal {
        reason,
        message,
        limit: None,
    }
}

/// What the listening thread needs to stop.
#[derive(Debug)]
pub struct Serving {
    listener: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Serving {
    /// Stops accepting and removes the socket (open lanes stay usable by their ends).
    pub fn stop(mut self) {
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Broker {
    /// A broker for `config`; without an identity service, or with lane rules that failed to
    /// evaluate, every lane is refused.
    #[must_use]
    /// A broker refusing every lane until lane rules are set ([`Self::set_rules`]).
    pub fn new(
        config: &Config,
        identity: Option<Arc<IdentityService>>,
        events: Arc<crate::events::EventBus>,
    ) -> Self {
        Self {
            config: config.clone(),
            identity,
            rules: Mutex::new(Rules {
                live: Err("no policy made live yet".into()),
                origin: String::new(),
                digest: None,
            }),
            declared: Mutex::new(BTreeMap::new()),
            state: Mutex::new(State::default()),
            events,
            next_lane: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
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

    /// Applies the caller's plan: the lane must be declared, and a declared transport replaces
    /// `auto` (any other choice is refused).
    fn declared_transport(
        &self,
        caller: &attest::Caller,
        to_q: Quadrant,
        service: &str,
        choice: TransportChoice,
    ) -> Result<TransportChoice, Refusal> {
        let declared = self.declared.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(lanes) = declared.get(&(caller.quadrant, caller.workload.clone())) else {
            return Ok(choice);
        };
        let who = format!("{}/{}", caller.quadrant.name(), caller.workload);
        let Some(lane) = lanes
            .iter()
            .find(|l| l.quadrant == to_q && l.service == service)
        else {
            let list: Vec<String> = lanes
                .iter()
                .map(|l| format!("{}/{}", l.quadrant.name(), l.service))
                .collect();
            return Err(refuse(
                "plan",
                format!(
                    "the plan of {who} declares lanes to {} only, not to {}/{service}",
                    list.join(", "),
                    to_q.name()
                ),
            ));
        };
        match (lane.transport, choice) {
            (None, c) => Ok(c),
            (Some(t), TransportChoice::Auto) => Ok(t.into()),
            (Some(t), c) if c.candidates() == [t] => Ok(c),
            (Some(t), c) => Err(refuse(
                "plan",
                format!(
                    "the plan of {who} requires {} for its lane to {}/{service}; {} was asked",
                    t.name(),
                    to_q.name(),
                    serde_json::to_value(c)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ),
            )),
        }
    }

    /// Replaces the lane rules (policy reload); lanes already open stay open.
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
        Ok(Serving {
            listener,
            thread: Some(thread),
            path,
        })
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

    fn count_refusal(&self, quadrant: &str, reason: &str) {
        *self
            .state()
            .refusals
            .entry((quadrant.to_owned(), reason.to_owned()))
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
                    self.count_refusal("none", "attestation");
                    let message = format!("caller not attested: {e}");
                    let reply = LaneMessage::Error {
                        message,
                        limit: None,
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
        loop {
            let n = match os::recv_with_fds(conn.fd.as_raw_fd(), &mut buf) {
                Ok(Some((n, _fds))) => n,
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "lane connection read failed");
                    break;
                }
            };
            let request = match parse_request(&buf[..n]) {
                Ok(r) => r,
                Err(message) => {
                    self.count_refusal(caller.quadrant.name(), "invalid");
                    let _ = conn.send(
                        &LaneMessage::Error {
                            message,
                            limit: None,
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
                } => {
                    // The schema admits only the four names; refused rather than assumed anyway.
                    let result = Quadrant::from_name(&quadrant)
                        .ok_or_else(|| refuse("invalid", format!("unknown quadrant {quadrant:?}")))
                        .and_then(|target| {
                            let transport =
                                self.declared_transport(&caller, target, &service, transport)?;
                            self.open(conn, caller.quadrant, &id, target, &service, transport)
                        });
                    if let Err(r) = result {
                        self.count_refusal(caller.quadrant.name(), r.reason);
                        self.events
                            .emit(|seq, at_ms| crate::events::Event::LaneRefused {
                                seq,
                                at_ms,
                                quadrant: caller.quadrant.name().to_owned(),
                                reason: r.reason.to_owned(),
                                message: r.message.clone(),
                            });
                        let _ = conn.send(
                            &LaneMessage::Error {
                                message: r.message,
                                limit: r.limit,
                            },
                            &[],
                            true,
                        );
                    }
                }
                LaneRequest::Listen { service, tcp_port } => {
                    let reply = self.listen(conn, caller.quadrant, &id, &service, tcp_port);
                    let _ = conn.send(&reply, &[], true);
                }
                LaneRequest::Close { lane } => self.close(conn.id, lane),
            }
        }
        self.disconnect(conn.id);
    }

    fn listen(
        &self,
        conn: &Arc<Conn>,
        q: Quadrant,
        id: &str,
        service: &str,
        tcp_port: Option<u16>,
    ) -> LaneMessage {
        let mut state = self.state();
        let key = (q, service.to_owned());
        if let Some(existing) = state.services.get(&key) {
            return LaneMessage::Error {
                message: format!(
                    "service {service} is already offered in {} by {}",
                    q.name(),
                    existing.spiffe_id
                ),
                limit: None,
            };
        }
        state.services.insert(
            key,
            Service {
                conn: Arc::clone(conn),
                spiffe_id: id.to_owned(),
                tcp_port,
            },
        );
        LaneMessage::Listening {
            service: service.to_owned(),
            spiffe_id: id.to_owned(),
        }
    }

    fn decide(
        &self,
        from_q: Quadrant,
        from_id: &str,
        to_q: Quadrant,
        service: &str,
        choice: TransportChoice,
        has_tcp: bool,
    ) -> Result<Transport, Refusal> {
        let rules = match &self
            .rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live
        {
            Ok(r) => Arc::clone(r),
            Err(e) => {
                return Err(refuse(
                    "policy",
                    format!("lane policy unavailable, every lane is refused: {e}"),
                ));
            }
        };
        let matching: Vec<&LaneRule> = rules
            .iter()
            .filter(|r| r.covers_source(from_q, from_id) && r.covers_service(to_q, service))
            .collect();
        if matching.is_empty() {
            return Err(refuse(
                "policy",
                format!(
                    "policy allows no lane from {from_id} to service {service} in {}",
                    to_q.name()
                ),
            ));
        }
        let mut reasons = Vec::new();
        for &t in choice.candidates() {
            if !matching.iter().any(|r| r.allows_transport(t.name())) {
                reasons.push(format!("{} is not allowed by the policy", t.name()));
                continue;
            }
            if t == Transport::Tcp && !has_tcp {
                reasons.push("the service takes no TCP lanes".to_owned());
                continue;
            }
            if t == Transport::Tcp && self.identity.is_none() {
                reasons
                    .push("TCP lanes need the identity service, which is unavailable".to_owned());
                continue;
            }
            return Ok(t);
        }
        Err(refuse(
            "policy",
            format!(
                "no transport for a lane from {from_id} to {service} in {}: {}",
                to_q.name(),
                reasons.join("; ")
            ),
        ))
    }

    fn svid_material(&self, id: &str) -> Result<control::SvidMaterial, Refusal> {
        let identity = self
            .identity
            .as_ref()
            .ok_or_else(|| refuse("policy", "identity service unavailable".into()))?;
        let svid = identity
            .x509_for(id)
            .map_err(|e| refuse("policy", format!("cannot issue an SVID for {id}: {e}")))?
            .borrow()
            .clone();
        Ok(Svid::material(
            &svid.chain,
            &svid.key_pkcs8,
            identity.authority().roots(),
            identity.authority().trust_domain(),
        ))
    }

    #[allow(clippy::too_many_lines)]
    fn open(
        &self,
        conn: &Arc<Conn>,
        from_q: Quadrant,
        from_id: &str,
        to_q: Quadrant,
        service: &str,
        choice: TransportChoice,
    ) -> Result<(), Refusal> {
        let (server_conn, server_id, tcp_port) = {
            let state = self.state();
            let s = state
                .services
                .get(&(to_q, service.to_owned()))
                .ok_or_else(|| {
                    refuse(
                        "no_service",
                        format!("no service {service} is offered in {}", to_q.name()),
                    )
                })?;
            (Arc::clone(&s.conn), s.spiffe_id.clone(), s.tcp_port)
        };
        let transport = self.decide(from_q, from_id, to_q, service, choice, tcp_port.is_some())?;
        let limits = self.config.lanes.limits_of(from_q);
        let max_message = self.config.lanes.max_message_bytes;
        let ring_bytes = if transport == Transport::Shm {
            ring::capacity_for(max_message as usize)
        } else {
            0
        };
        let shm_bytes = ring::mapping_len(ring_bytes) as u64;
        let lane_id = self.next_lane.fetch_add(1, Ordering::Relaxed);

        let io_err = |what: &str, e: io::Error| {
            refuse("io", format!("cannot create the lane's {what}: {e}"))
        };
        let memfd = os::sealed_memfd(
            &format!("quadrant-lane-{lane_id}"),
            ring::mapping_len(ring_bytes),
        )
        .map_err(|e| io_err("memory", e))?;
        let memory = Mapping::new(&memfd, ring::mapping_len(ring_bytes), true)
            .map_err(|e| io_err("memory", e))?;
        // SAFETY: the mapping has exactly this length, is page-aligned and lives in the entry.
        let region = unsafe { Region::new(memory.as_ptr(), memory.len(), ring_bytes) }
            .map_err(|e| refuse("io", e.to_string()))?;
        region.initialize();

        #[allow(clippy::cast_possible_truncation)] // capacity_for(≤ 64 MiB) fits
        let grant = |local: &str, peer: &str, tcp: Option<TcpGrant>| LaneGrant {
            lane: lane_id,
            transport,
            service: service.to_owned(),
            quadrant: to_q.name().to_owned(),
            local_id: local.to_owned(),
            peer_id: peer.to_owned(),
            max_message,
            ring_bytes: ring_bytes as u32,
            max_in_flight: limits.max_in_flight,
            tcp,
        };
        let mut client_fds: Vec<OwnedFd> = Vec::new();
        let mut server_fds: Vec<OwnedFd> = Vec::new();
        let (client_grant, server_grant) = match transport {
            Transport::Shm => {
                let efd_c = os::eventfd().map_err(|e| io_err("eventfd", e))?;
                let efd_s = os::eventfd().map_err(|e| io_err("eventfd", e))?;
                let (pc, ps) = os::seqpacket_pair().map_err(|e| io_err("socket pair", e))?;
                let dup = |f: &OwnedFd| f.try_clone().map_err(|e| io_err("descriptor", e));
                client_fds.extend([dup(&memfd)?, dup(&efd_c)?, dup(&efd_s)?, pc]);
                server_fds.extend([memfd, efd_s, efd_c, ps]);
                (
                    grant(from_id, &server_id, None),
                    grant(&server_id, from_id, None),
                )
            }
            Transport::Uds => {
                let (uc, us) = os::stream_pair().map_err(|e| io_err("socket pair", e))?;
                client_fds.extend([memfd.try_clone().map_err(|e| io_err("descriptor", e))?, uc]);
                server_fds.extend([memfd, us]);
                (
                    grant(from_id, &server_id, None),
                    grant(&server_id, from_id, None),
                )
            }
            Transport::Tcp => {
                let mut token = [0u8; 16];
                ring_rand(&mut token).map_err(|e| refuse("io", e))?;
                let token = crate::artifacts::hex(&token);
                let address = format!(
                    "{}:{}",
                    self.config.addrs(to_q).workload,
                    tcp_port.unwrap_or_default()
                );
                client_fds.push(memfd.try_clone().map_err(|e| io_err("descriptor", e))?);
                server_fds.push(memfd);
                let client_tcp = TcpGrant {
                    address: Some(address),
                    token: token.clone(),
                    svid: self.svid_material(from_id)?,
                };
                let server_tcp = TcpGrant {
                    address: None,
                    token,
                    svid: self.svid_material(&server_id)?,
                };
                (
                    grant(from_id, &server_id, Some(client_tcp)),
                    grant(&server_id, from_id, Some(server_tcp)),
                )
            }
        };

        let mut state = self.state();
        let (lanes, shm) = state.usage(from_q);
        if lanes >= limits.max_lanes {
            return Err(Refusal {
                reason: "max_lanes",
                message: format!(
                    "lane limit reached: quadrant {} has {lanes} open lanes, max_lanes is {}",
                    from_q.name(),
                    limits.max_lanes
                ),
                limit: Some("max_lanes".into()),
            });
        }
        if shm + shm_bytes > limits.max_shm_bytes {
            return Err(Refusal {
                reason: "max_shm_bytes",
                message: format!(
                    "lane limit reached: quadrant {} holds {shm} bytes of lane memory, this lane needs {shm_bytes} more, max_shm_bytes is {}",
                    from_q.name(),
                    limits.max_shm_bytes
                ),
                limit: Some("max_shm_bytes".into()),
            });
        }
        let info = LaneInfo {
            lane: lane_id,
            transport,
            service: service.to_owned(),
            quadrant: to_q.name().to_owned(),
            client: from_id.to_owned(),
            server: server_id.clone(),
            bytes_to_server: 0,
            bytes_to_client: 0,
            messages: 0,
            rtt_ns: 0,
            shm_bytes,
            age_secs: 0,
        };
        // Charged before the lock is released, so concurrent opens cannot overshoot the limits.
        state.lanes.insert(
            lane_id,
            OpenLane {
                info,
                client_quadrant: from_q,
                client_conn: Arc::clone(conn),
                server_conn: Arc::clone(&server_conn),
                opened: Instant::now(),
                region,
                _memory: memory,
            },
        );
        drop(state);
        // The service first: once the opener has its end, the other must exist. A service that
        // does not take its lanes within INCOMING_PATIENCE makes the opener's request fail
        // ("busy") rather than queue without bound.
        let server_refs: Vec<&OwnedFd> = server_fds.iter().collect();
        if let Err(e) = server_conn.send(
            &LaneMessage::Incoming {
                grant: server_grant,
            },
            &server_refs,
            false,
        ) {
            self.state().lanes.remove(&lane_id);
            return Err(refuse(
                "busy",
                format!(
                    "service {service} in {} did not take the lane within {} ms: {e}",
                    to_q.name(),
                    INCOMING_PATIENCE.as_millis()
                ),
            ));
        }
        let client_refs: Vec<&OwnedFd> = client_fds.iter().collect();
        if let Err(e) = conn.send(
            &LaneMessage::Opened {
                grant: client_grant,
            },
            &client_refs,
            true,
        ) {
            warn!(lane = lane_id, error = %e, "cannot hand the lane to its opener");
            self.close(conn.id, lane_id);
            return Ok(());
        }
        self.events
            .emit(|seq, at_ms| crate::events::Event::LaneOpened {
                seq,
                at_ms,
                lane: lane_id,
                transport,
                client: from_id.to_owned(),
                service: format!("{}/{service}", to_q.name()),
            });
        Ok(())
    }

    /// Forgets a lane one of its ends closed (or whose end went away) and frees what it was
    /// charged. The other end learns it from the lane itself: a Close frame, or the hang-up of
    /// its socket.
    fn close(&self, conn_id: u64, lane: u64) {
        let mut state = self.state();
        if state
            .lanes
            .get(&lane)
            .is_some_and(|e| e.client_conn.id == conn_id || e.server_conn.id == conn_id)
        {
            state.lanes.remove(&lane);
        }
    }

    fn disconnect(&self, conn_id: u64) {
        let mut state = self.state();
        state.services.retain(|_, s| s.conn.id != conn_id);
        let gone: Vec<u64> = state
            .lanes
            .iter()
            .filter(|(_, l)| l.client_conn.id == conn_id || l.server_conn.id == conn_id)
            .map(|(id, _)| *id)
            .collect();
        for lane in gone {
            state.lanes.remove(&lane);
        }
    }

    /// The report `quadrant lanes` prints.
    #[must_use]
    pub fn report(&self) -> LanesReport {
        let (policy, policy_digest) = {
            let r = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
            let line = match &r.live {
                Ok(rules) => format!("{} lane rules from {}", rules.len(), r.origin),
                Err(e) => format!("every lane refused: {e}"),
            };
            (line, r.digest.clone())
        };
        let state = self.state();
        let lanes = state
            .lanes
            .values()
            .map(|l| {
                let s = |side, stat| l.region.stat(side, stat).load(Ordering::Relaxed);
                let mut info = l.info.clone();
                info.bytes_to_server = s(0, Stat::BytesSent);
                info.bytes_to_client = s(1, Stat::BytesSent);
                info.messages = s(0, Stat::MessagesSent) + s(1, Stat::MessagesSent);
                info.rtt_ns = s(0, Stat::RttEwmaNs);
                info.age_secs = l.opened.elapsed().as_secs();
                info
            })
            .collect();
        let services = state
            .services
            .iter()
            .map(|((q, name), s)| ServiceInfo {
                quadrant: q.name().to_owned(),
                service: name.clone(),
                spiffe_id: s.spiffe_id.clone(),
                tcp_port: s.tcp_port,
            })
            .collect();
        let quadrants = Quadrant::ALL
            .iter()
            .map(|&q| {
                let (lanes, shm_bytes) = state.usage(q);
                let limits = self.config.lanes.limits_of(q);
                QuadrantLanes {
                    quadrant: q.name().to_owned(),
                    lanes,
                    max_lanes: limits.max_lanes,
                    shm_bytes,
                    max_shm_bytes: limits.max_shm_bytes,
                }
            })
            .collect();
        let refusals = state
            .refusals
            .iter()
            .map(|((quadrant, reason), count)| Refusals {
                quadrant: quadrant.clone(),
                reason: reason.clone(),
                count: *count,
            })
            .collect();
        LanesReport {
            policy_digest,
            socket: self.config.lane_socket(),
            policy,
            lanes,
            services,
            quadrants,
            refusals,
            tcp_acceleration: None,
            tcp_acceleration_probe: None,
            tcp_acceleration_probe_error: None,
        }
    }
}

fn ring_rand(out: &mut [u8]) -> Result<(), String> {
    use ::ring::rand::SecureRandom as _;
    ::ring::rand::SystemRandom::new()
        .fill(out)
        .map_err(|_| "no randomness for the lane token".to_owned())
}

/// The text form of `quadrant lanes`.
#[must_use]
pub fn render(r: &LanesReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "lane broker {} ({})", r.socket.display(), r.policy);
    let _ = writeln!(out, "\nservices:");
    if r.services.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for s in &r.services {
        let tcp = s.tcp_port.map(|p| format!(", tcp {p}")).unwrap_or_default();
        let _ = writeln!(out, "  {}/{}  {}{tcp}", s.quadrant, s.service, s.spiffe_id);
    }
    let _ = writeln!(out, "\nlanes:");
    if r.lanes.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for l in &r.lanes {
        #[allow(clippy::cast_precision_loss)] // display only
        let rtt = if l.rtt_ns == 0 {
            "-".to_owned()
        } else {
            format!("{:.1} us", l.rtt_ns as f64 / 1000.0)
        };
        let _ = writeln!(
            out,
            "  #{} {:<3} {} -> {}/{} ({})  sent {} B / received {} B, {} messages, rtt {rtt}, {} s",
            l.lane,
            l.transport.name(),
            l.client,
            l.quadrant,
            l.service,
            l.server,
            l.bytes_to_server,
            l.bytes_to_client,
            l.messages,
            l.age_secs
        );
    }
    let _ = writeln!(out, "\nusage (lanes opened by each quadrant):");
    for q in &r.quadrants {
        let _ = writeln!(
            out,
            "  {}: {}/{} lanes, {}/{} bytes of lane memory",
            q.quadrant, q.lanes, q.max_lanes, q.shm_bytes, q.max_shm_bytes
        );
    }
    if let Some(p) = &r.tcp_acceleration_probe {
        let _ = writeln!(
            out,
            "\ntcp acceleration probe ({} round trips of {} bytes each way): sk_msg p50 {} ns p99 {} ns, stack p50 {} ns p99 {} ns: {}",
            p.rounds,
            p.bytes,
            p.redirected_p50_ns,
            p.redirected_p99_ns,
            p.stack_p50_ns,
            p.stack_p99_ns,
            if p.on {
                "on"
            } else {
                "off (needs p50 <= 0.9x and p99 <= 1.0x the stack's)"
            }
        );
    }
    if let Some(e) = &r.tcp_acceleration_probe_error {
        let _ = writeln!(out, "\ntcp acceleration off: the probe failed: {e}");
    }
    if let Some(a) = &r.tcp_acceleration {
        let _ = writeln!(
            out,
            "\ntcp acceleration (sk_msg): {} sockets, {} messages redirected, {} passed, {} refused (flow revoked)",
            a.sockets, a.redirected, a.passed, a.refused
        );
    }
    if !r.refusals.is_empty() {
        let _ = writeln!(out, "\nrefused opens:");
        for f in &r.refusals {
            let _ = writeln!(out, "  {} {}: {}", f.quadrant, f.reason, f.count);
        }
    }
    out
}

/// Parses a request after validating it against its schema; the error names the field.
pub fn parse_request(bytes: &[u8]) -> Result<LaneRequest, String> {
    static VALIDATOR: std::sync::OnceLock<Result<crate::plans::TaggedValidator, String>> =
        std::sync::OnceLock::new();
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("lane request is not JSON: {e}"))?;
    let validator = VALIDATOR
        .get_or_init(|| crate::plans::TaggedValidator::new(&control::request_schema(), "kind"))
        .as_ref()
        .map_err(|e| format!("lane request schema does not compile: {e}"))?;
    let errors = validator.errors(&value);
    if !errors.is_empty() {
        return Err(format!("invalid lane request: {}", errors.join("; ")));
    }
    serde_json::from_value(value).map_err(|e| format!("invalid lane request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_validated_with_field_names() {
        let ok = parse_request(br#"{"kind":"open","quadrant":"dg","service":"echo"}"#).unwrap();
        assert_eq!(
            ok,
            LaneRequest::Open {
                quadrant: "dg".into(),
                service: "echo".into(),
                transport: TransportChoice::Auto
            }
        );
        for (bad, needle) in [
            (
                &br#"{"kind":"open","quadrant":"zz","service":"echo"}"#[..],
                "/quadrant",
            ),
            (
                br#"{"kind":"open","quadrant":"dg","service":"Echo!"}"#,
                "/service",
            ),
            (
                br#"{"kind":"open","quadrant":"dg","service":"e","transport":"udp"}"#,
                "/transport",
            ),
            (
                br#"{"kind":"listen","service":"e","tcp_port":0}"#,
                "/tcp_port",
            ),
            (
                br#"{"kind":"open","quadrant":"dg","service":"e","extra":1}"#,
                "extra",
            ),
            (br#"{"kind":"fly"}"#, "kind"),
            (b"not json", "not JSON"),
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.contains(needle), "{e} should name {needle}");
        }
    }
}
