//! The client library workloads use: open lanes to services, offer a service and accept its
//! lanes. The broker's socket comes from `QUADRANT_LANE_SOCKET` (set by `quadrant exec` and for
//! submitted workloads) unless a path is given.

use std::{
    collections::{HashMap, VecDeque},
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

use super::{
    control::{LaneGrant, LaneMessage, LaneRequest, Transport, TransportChoice},
    frame::Kind,
    lane::{Framed, Lane, LaneError, Side, Stream},
    os::{self, MAX_CONTROL_MESSAGE},
    record,
    tls::{self, Svid},
};

/// Environment variable naming the lane broker's socket.
pub const SOCKET_ENV: &str = "QUADRANT_LANE_SOCKET";

/// How long a TCP lane's handshake and authorization may take.
const TCP_SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a service waits for the broker to come back after it went away (an agent handing
/// the dataplane to its successor is back within seconds) before `accept` gives up.
const SERVICE_BROKER_PATIENCE: Duration = Duration::from_mins(1);
/// How long an opener waits for the broker to come back before `open` gives up.
const CLIENT_BROKER_PATIENCE: Duration = Duration::from_secs(10);
/// TCP handshakes a service runs at once; a connection beyond them is closed at once.
const MAX_TCP_HANDSHAKES: usize = 32;

/// A connection to the broker.
#[derive(Debug)]
pub struct Control {
    fd: OwnedFd,
    send_lock: Mutex<()>,
}

impl Control {
    fn connect(path: &Path) -> Result<Self, LaneError> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| LaneError::Broker(format!("socket: {e}")))?;
        let addr = UnixAddr::new(path)
            .map_err(|e| LaneError::Broker(format!("{}: {e}", path.display())))?;
        connect(fd.as_raw_fd(), &addr).map_err(|e| {
            LaneError::Broker(format!(
                "cannot reach the lane broker at {}: {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            fd,
            send_lock: Mutex::new(()),
        })
    }

    /// Connects to the broker at `path`, trying again (20 ms, doubling to 200 ms: an attempt
    /// costs one failed `connect`) while it is not there, for up to `patience`.
    fn connect_retrying(path: &Path, patience: Duration) -> Result<Self, LaneError> {
        let deadline = Instant::now() + patience;
        let mut pause = Duration::from_millis(20);
        loop {
            match Self::connect(path) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    pub(crate) fn send(&self, request: &LaneRequest) -> Result<(), LaneError> {
        let bytes = serde_json::to_vec(request).map_err(|e| LaneError::Broker(e.to_string()))?;
        let _guard = self
            .send_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        os::send_with_fds(self.fd.as_raw_fd(), &bytes, &[]).map_err(|e| {
            if broker_gone(&e) {
                LaneError::BrokerGone
            } else {
                LaneError::Broker(format!("cannot send to the broker: {e}"))
            }
        })
    }

    fn recv(&self) -> Result<(LaneMessage, Vec<OwnedFd>), LaneError> {
        os::yield_until_readable(self.fd.as_raw_fd(), os::control_yield());
        let mut buf = vec![0; MAX_CONTROL_MESSAGE];
        match os::recv_with_fds(self.fd.as_raw_fd(), &mut buf) {
            Ok(Some((n, fds))) => {
                let msg = serde_json::from_slice(&buf[..n])
                    .map_err(|e| LaneError::Broker(format!("malformed broker message: {e}")))?;
                Ok((msg, fds))
            }
            Ok(None) => Err(LaneError::BrokerGone),
            Err(e) if broker_gone(&e) => Err(LaneError::BrokerGone),
            Err(e) => Err(LaneError::Broker(format!(
                "cannot read from the broker: {e}"
            ))),
        }
    }

    /// Waits up to `timeout` for the socket to become readable.
    fn readable(&self, timeout: Duration) -> io::Result<bool> {
        poll_in(&[self.fd.as_raw_fd()], timeout).map(|r| r[0])
    }
}

/// Offers `service` on `control`; returns the service's SPIFFE ID.
fn register(control: &Control, service: &str, tcp_port: Option<u16>) -> Result<String, LaneError> {
    control.send(&LaneRequest::Listen {
        service: service.to_owned(),
        tcp_port,
        pings: true,
    })?;
    loop {
        return match control.recv()?.0 {
            LaneMessage::Listening { spiffe_id, .. } => Ok(spiffe_id),
            // The broker pings a listener as soon as it knows it, which can be before its
            // answer to the offer has been read here.
            LaneMessage::Ping { seq } => {
                control.send(&LaneRequest::Pong { seq })?;
                continue;
            }
            LaneMessage::Error {
                message,
                reason,
                limit,
                retry_after_ms,
            } => Err(LaneError::Refused {
                message,
                reason,
                limit,
                retry_after_ms,
            }),
            other => Err(LaneError::Broker(format!(
                "unexpected broker message {other:?}"
            ))),
        };
    }
}

/// Whether `e` means the broker's end of the connection is gone.
fn broker_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

fn poll_in(fds: &[i32], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: pfds is a live array of pollfd of the given length.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// An `open` request for a lane (not a mirror lane), passing over no instance.
fn open_request(
    (quadrant, service): (&str, &str),
    transport: TransportChoice,
    request_ids: bool,
    key: Option<&str>,
) -> LaneRequest {
    LaneRequest::Open {
        quadrant: quadrant.to_owned(),
        service: service.to_owned(),
        transport,
        mirror: false,
        request_ids,
        avoid_instance: None,
        affinity_key: key.map(ToOwned::to_owned),
    }
}

fn socket_path(path: Option<&Path>) -> Result<PathBuf, LaneError> {
    match path {
        Some(p) => Ok(p.to_owned()),
        None => std::env::var_os(SOCKET_ENV)
            .map(PathBuf::from)
            .ok_or_else(|| LaneError::Broker(format!("{SOCKET_ENV} is not set"))),
    }
}

/// Opens lanes.
#[derive(Debug)]
pub struct LaneClient {
    path: PathBuf,
    control: Arc<Control>,
}

impl LaneClient {
    /// Connects to the broker at `path`, or at `$QUADRANT_LANE_SOCKET`.
    pub fn connect(path: Option<&Path>) -> Result<Self, LaneError> {
        let path = socket_path(path)?;
        Ok(Self {
            control: Arc::new(Control::connect(&path)?),
            path,
        })
    }

    /// Opens a lane to `service` in `quadrant`. The broker checks the policy for this
    /// workload's SPIFFE ID and the quadrant's limits, and picks the transport. If the broker
    /// went away (an agent upgrade), the request is made again, once, to the broker that
    /// replaces it.
    pub fn open(
        &mut self,
        quadrant: &str,
        service: &str,
        transport: TransportChoice,
    ) -> Result<Lane, LaneError> {
        self.open_with(&open_request((quadrant, service), transport, false, None))
    }

    /// [`Self::open`] with an affinity key: lanes opened with the same key go to the same
    /// instance of a service several instances offer (while it takes lanes).
    pub fn open_keyed(
        &mut self,
        (quadrant, service): (&str, &str),
        transport: TransportChoice,
        key: &str,
    ) -> Result<Lane, LaneError> {
        self.open_with(&open_request(
            (quadrant, service),
            transport,
            false,
            Some(key),
        ))
    }

    /// Opens a lane whose every message carries a request envelope (the [`crate::Caller`]'s),
    /// on another instance than `avoid` if another offers the service, by `key` if given.
    pub(crate) fn open_with_ids(
        &mut self,
        (quadrant, service): (&str, &str),
        transport: TransportChoice,
        (avoid, key): (Option<u8>, Option<&str>),
    ) -> Result<Lane, LaneError> {
        let mut request = open_request((quadrant, service), transport, true, key);
        if let LaneRequest::Open { avoid_instance, .. } = &mut request {
            *avoid_instance = avoid;
        }
        self.open_with(&request)
    }

    /// Opens the lane a mirror thread copies requests over, to `service`'s shadow generation.
    pub(crate) fn open_mirror(&mut self, quadrant: &str, service: &str) -> Result<Lane, LaneError> {
        self.open_with(&LaneRequest::Open {
            quadrant: quadrant.to_owned(),
            service: service.to_owned(),
            transport: TransportChoice::Auto,
            mirror: true,
            request_ids: false,
            avoid_instance: None,
            affinity_key: None,
        })
    }

    fn open_with(&mut self, request: &LaneRequest) -> Result<Lane, LaneError> {
        let asked = self
            .control
            .send(request)
            .and_then(|()| self.control.recv());
        let (msg, fds) = match asked {
            Err(LaneError::BrokerGone) => {
                self.control = Arc::new(Control::connect_retrying(
                    &self.path,
                    CLIENT_BROKER_PATIENCE,
                )?);
                self.control.send(request)?;
                self.control.recv()?
            }
            other => other?,
        };
        match msg {
            LaneMessage::Opened { grant } => {
                let mirror = grant.mirror.map(|m| {
                    crate::mirror::Mirror::new(
                        m.fraction_ppm,
                        self.path.clone(),
                        &grant.quadrant,
                        &grant.service,
                    )
                });
                let id = grant.lane;
                let mut lane = self.establish(grant, fds).inspect_err(|_| {
                    // The broker keeps (and charges) a lane until an end closes it.
                    let _ = self.control.send(&LaneRequest::Close { lane: id });
                })?;
                if let Some(m) = mirror {
                    lane.mirror_to(m);
                }
                Ok(lane)
            }
            LaneMessage::Error {
                message,
                reason,
                limit,
                retry_after_ms,
            } => Err(LaneError::Refused {
                message,
                reason,
                limit,
                retry_after_ms,
            }),
            other => Err(LaneError::Broker(format!(
                "unexpected broker message {other:?}"
            ))),
        }
    }

    fn establish(&self, grant: LaneGrant, fds: Vec<OwnedFd>) -> Result<Lane, LaneError> {
        let control = Some(Arc::clone(&self.control));
        if grant.transport != Transport::Tcp {
            return Lane::from_local_grant(grant, Side::Client, fds, control);
        }
        let tcp = grant
            .tcp
            .clone()
            .ok_or_else(|| LaneError::Broker("TCP grant without TCP details".into()))?;
        let addr: SocketAddr = tcp
            .address
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| LaneError::Broker(format!("bad TCP lane address: {e}")))?;
        let svid = Svid::from_material(&tcp.svid).map_err(LaneError::Tls)?;
        let config = tls::client_config(&svid, &grant.peer_id).map_err(LaneError::Tls)?;
        let sock = TcpStream::connect_timeout(&addr, TCP_SETUP_TIMEOUT)?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(TCP_SETUP_TIMEOUT))?;
        let conn = rustls::ClientConnection::new(config, tls::sni())
            .map_err(|e| LaneError::Tls(e.to_string()))?;
        let (stream, _) = record::handshake(conn.into(), sock.try_clone()?)
            .map_err(|e| LaneError::Tls(format!("handshake: {e}")))?;
        let stream: Box<dyn Stream> = Box::new(stream);
        let mut framed = Framed::new(stream, grant.max_message);
        let hello = serde_json::json!({
            "lane": tcp.server_lane.unwrap_or(grant.lane),
            "token": tcp.token
        })
        .to_string();
        framed
            .send(Kind::Hello, hello.as_bytes())
            .map_err(tls_error)?;
        let mut reply = Vec::new();
        match framed.recv(&mut reply).map_err(tls_error)? {
            Some(Kind::Accept) => {}
            Some(Kind::Refuse) => {
                return Err(LaneError::Refused {
                    message: format!(
                        "the service refused the TCP lane: {}",
                        String::from_utf8_lossy(&reply)
                    ),
                    reason: None,
                    limit: None,
                    retry_after_ms: None,
                });
            }
            other => {
                return Err(LaneError::Tls(format!("expected Accept, got {other:?}")));
            }
        }
        sock.set_read_timeout(None)?;
        Lane::from_tcp(grant, Side::Client, fds, (framed, sock), control)
    }
}

/// The server side of a TCP lane's set-up up to the client's Hello: the TLS handshake (the
/// client's SVID is verified in it) and one Hello frame. Returns the framed stream, the client's
/// SPIFFE ID and the Hello's payload.
fn handshake(sock: &TcpStream, config: Arc<rustls::ServerConfig>) -> Result<Hello, LaneError> {
    let conn = rustls::ServerConnection::new(config).map_err(|e| LaneError::Tls(e.to_string()))?;
    let (stream, certs) = record::handshake(conn.into(), sock.try_clone()?)
        .map_err(|e| LaneError::Tls(format!("handshake: {e}")))?;
    let peer = certs
        .first()
        .and_then(tls::spiffe_id_of)
        .ok_or_else(|| LaneError::Tls("client presented no SVID".into()))?;
    let stream: Box<dyn Stream> = Box::new(stream);
    let mut framed = Framed::new(stream, 4096);
    let mut hello = Vec::new();
    match framed.recv(&mut hello) {
        Ok(Some(Kind::Hello)) => Ok((framed, peer, hello)),
        Ok(other) => Err(LaneError::Tls(format!(
            "client {peer}: expected Hello, got {other:?}"
        ))),
        Err(e) => Err(LaneError::Tls(format!("client {peer}: {e}"))),
    }
}

fn tls_error(e: LaneError) -> LaneError {
    match e {
        LaneError::Io(io) => LaneError::Tls(io.to_string()),
        LaneError::PeerGone => {
            LaneError::Tls("the peer closed the connection during set-up".into())
        }
        other => other,
    }
}

/// A TCP lane's client after the handshake: the framed TLS stream, the client's SPIFFE ID and
/// its Hello's payload.
type Hello = (Framed<Box<dyn Stream>>, String, Vec<u8>);

/// A TCP connection whose TLS handshake and Hello a handshake thread finished (or failed).
struct Handshaken {
    from: SocketAddr,
    sock: TcpStream,
    result: Result<Hello, LaneError>,
}

/// TCP connections in their handshake, each on its own thread so that a client that stalls
/// holds up only itself; finished ones queue here and wake [`LaneListener::accept`].
struct Handshakes {
    done: Mutex<VecDeque<Handshaken>>,
    running: std::sync::atomic::AtomicUsize,
    wake_tx: std::os::unix::net::UnixStream,
    wake_rx: std::os::unix::net::UnixStream,
}

impl std::fmt::Debug for Handshakes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshakes")
            .field(
                "running",
                &self.running.load(std::sync::atomic::Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

/// Offers a service and accepts its lanes.
#[derive(Debug)]
pub struct LaneListener {
    path: PathBuf,
    service: String,
    tcp_port: Option<u16>,
    control: Arc<Control>,
    spiffe_id: String,
    tcp: Option<TcpListener>,
    ready: VecDeque<(LaneGrant, Vec<OwnedFd>)>,
    tcp_pending: HashMap<u64, (LaneGrant, Vec<OwnedFd>, Instant)>,
    newest_svid: Option<Svid>,
    handshakes: Arc<Handshakes>,
}

impl LaneListener {
    /// Registers `service` in the caller's quadrant; with `tcp_port`, also accepts mTLS lanes on
    /// that port of the quadrant's address (the listener runs in the quadrant's namespace).
    pub fn listen(
        path: Option<&Path>,
        service: &str,
        tcp_port: Option<u16>,
    ) -> Result<Self, LaneError> {
        let tcp = match tcp_port {
            Some(port) => Some(TcpListener::bind(("0.0.0.0", port))?),
            None => None,
        };
        let path = socket_path(path)?;
        let control = Control::connect(&path)?;
        let spiffe_id = register(&control, service, tcp_port)?;
        let (wake_tx, wake_rx) = std::os::unix::net::UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        Ok(Self {
            path,
            service: service.to_owned(),
            tcp_port,
            control: Arc::new(control),
            spiffe_id,
            tcp,
            ready: VecDeque::new(),
            tcp_pending: HashMap::new(),
            newest_svid: None,
            handshakes: Arc::new(Handshakes {
                done: Mutex::new(VecDeque::new()),
                running: std::sync::atomic::AtomicUsize::new(0),
                wake_tx,
                wake_rx,
            }),
        })
    }

    /// The service's SPIFFE ID.
    #[must_use]
    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    /// Offers the service again to the broker that replaced the one that went away. Lanes
    /// already accepted keep working (the broker is not on their path); the new broker does
    /// not know them.
    fn rejoin(&mut self) -> Result<(), LaneError> {
        let control = Control::connect_retrying(&self.path, SERVICE_BROKER_PATIENCE)?;
        let spiffe_id = register(&control, &self.service, self.tcp_port)?;
        if spiffe_id != self.spiffe_id {
            return Err(LaneError::Broker(format!(
                "the broker now names this service {spiffe_id}, not {}",
                self.spiffe_id
            )));
        }
        self.control = Arc::new(control);
        Ok(())
    }

    fn take_message(&mut self) -> Result<(), LaneError> {
        let (msg, fds) = self.control.recv()?;
        match msg {
            LaneMessage::Incoming { grant } => {
                if grant.transport == Transport::Tcp {
                    if let Some(t) = &grant.tcp {
                        self.newest_svid =
                            Some(Svid::from_material(&t.svid).map_err(LaneError::Tls)?);
                    }
                    // Unclaimed TCP grants expire.
                    self.tcp_pending
                        .retain(|_, (_, _, at)| at.elapsed() < TCP_SETUP_TIMEOUT * 2);
                    self.tcp_pending
                        .insert(grant.lane, (grant, fds, Instant::now()));
                } else {
                    self.ready.push_back((grant, fds));
                }
                Ok(())
            }
            LaneMessage::Ping { seq } => self.control.send(&LaneRequest::Pong { seq }),
            LaneMessage::Error { message, .. } => Err(LaneError::Broker(message)),
            other => Err(LaneError::Broker(format!(
                "unexpected broker message {other:?}"
            ))),
        }
    }

    /// Waits for the next lane. A TCP connection that fails the handshake or the lane's
    /// authorization is refused and not returned; the error says why. TCP handshakes run on
    /// their own threads, so a client that stalls its handshake holds up no other lane.
    ///
    /// The broker's pings are answered here: a service offered by several instances whose
    /// listener stays away from `accept` for 300 ms is taken for hung, and new lanes go to the
    /// other instances until it is back — so accept on a thread of its own.
    pub fn accept(&mut self) -> Result<Lane, LaneError> {
        loop {
            if let Some((grant, fds)) = self.ready.pop_front() {
                return Lane::from_local_grant(
                    grant,
                    Side::Server,
                    fds,
                    Some(Arc::clone(&self.control)),
                );
            }
            let done = self
                .handshakes
                .done
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop_front();
            if let Some(h) = done {
                let from = h.from;
                return h
                    .result
                    .and_then(|(framed, peer, hello)| {
                        self.finish_tcp(&h.sock, framed, &peer, &hello)
                    })
                    .map_err(|e| match e {
                        LaneError::Tls(why) => {
                            LaneError::Tls(format!("refused a TCP lane from {from}: {why}"))
                        }
                        other => other,
                    });
            }
            let mut fds = vec![
                self.control.fd.as_raw_fd(),
                self.handshakes.wake_rx.as_raw_fd(),
            ];
            if let Some(l) = &self.tcp {
                fds.push(l.as_fd().as_raw_fd());
            }
            let ready = poll_in(&fds, Duration::from_hours(1))?;
            if ready[0] {
                match self.take_message() {
                    Err(LaneError::BrokerGone) => self.rejoin()?,
                    other => other?,
                }
                continue;
            }
            if ready[1] {
                let mut buf = [0u8; 64];
                let _ = Read::read(&mut &self.handshakes.wake_rx, &mut buf);
                continue;
            }
            if ready.get(2).copied().unwrap_or(false)
                && let Some(l) = &self.tcp
            {
                let (sock, from) = l.accept()?;
                if let Err(e) = self.start_handshake(sock, from) {
                    return Err(match e {
                        LaneError::Tls(why) => {
                            LaneError::Tls(format!("refused a TCP lane from {from}: {why}"))
                        }
                        other => other,
                    });
                }
            }
        }
    }

    /// Hands a new TCP connection to a handshake thread (TLS with the newest SVID the broker
    /// sent, then the client's Hello).
    fn start_handshake(&mut self, sock: TcpStream, from: SocketAddr) -> Result<(), LaneError> {
        use std::sync::atomic::Ordering;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(TCP_SETUP_TIMEOUT))?;
        sock.set_write_timeout(Some(TCP_SETUP_TIMEOUT))?;
        // Grants announced before this connection are in the control socket already.
        while self.control.readable(Duration::ZERO)? {
            match self.take_message() {
                // Offered again by the next turn of `accept`.
                Err(LaneError::BrokerGone) => break,
                other => other?,
            }
        }
        let svid = self
            .newest_svid
            .as_ref()
            .ok_or_else(|| LaneError::Tls("no TCP lane was announced by the broker".into()))?;
        let config = tls::server_config(svid).map_err(LaneError::Tls)?;
        if self.handshakes.running.fetch_add(1, Ordering::AcqRel) >= MAX_TCP_HANDSHAKES {
            self.handshakes.running.fetch_sub(1, Ordering::AcqRel);
            return Err(LaneError::Tls(format!(
                "{MAX_TCP_HANDSHAKES} handshakes already running"
            )));
        }
        let handshakes = Arc::clone(&self.handshakes);
        std::thread::spawn(move || {
            let result = handshake(&sock, config);
            handshakes
                .done
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push_back(Handshaken { from, sock, result });
            handshakes.running.fetch_sub(1, Ordering::AcqRel);
            let _ = Write::write(&mut &handshakes.wake_tx, &[1]);
        });
        Ok(())
    }

    /// Authorizes a handshaken TCP connection's Hello and answers it.
    fn finish_tcp(
        &mut self,
        sock: &TcpStream,
        mut framed: Framed<Box<dyn Stream>>,
        peer: &str,
        hello: &[u8],
    ) -> Result<Lane, LaneError> {
        let result = self.authorize(hello, peer);
        match result {
            Ok((grant, fds)) => {
                framed.send(Kind::Accept, &[]).map_err(tls_error)?;
                sock.set_read_timeout(None)?;
                sock.set_write_timeout(None)?;
                framed.set_max(grant.max_message);
                Lane::from_tcp(
                    grant,
                    Side::Server,
                    fds,
                    (framed, sock.try_clone()?),
                    Some(Arc::clone(&self.control)),
                )
            }
            Err(why) => {
                let _ = framed.send(Kind::Refuse, why.as_bytes());
                Err(LaneError::Tls(format!("client {peer}: {why}")))
            }
        }
    }

    fn authorize(&mut self, hello: &[u8], peer: &str) -> Result<(LaneGrant, Vec<OwnedFd>), String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Hello {
            lane: u64,
            token: String,
        }
        let h: Hello =
            serde_json::from_slice(hello).map_err(|e| format!("malformed Hello: {e}"))?;
        // The broker announces a lane to the service before it hands the grant to the opener, so
        // a genuine lane's announcement is already queued: take what is there, never wait.
        while !self.tcp_pending.contains_key(&h.lane)
            && self
                .control
                .readable(Duration::ZERO)
                .map_err(|e| e.to_string())?
        {
            self.take_message().map_err(|e| e.to_string())?;
        }
        let (grant, _, _) = self
            .tcp_pending
            .get(&h.lane)
            .ok_or_else(|| format!("lane {} was not opened through the broker", h.lane))?;
        let expected = grant
            .tcp
            .as_ref()
            .map(|t| t.token.as_bytes())
            .unwrap_or_default();
        // Compared without an early exit, so the time taken says nothing about the token.
        let same = expected.len() == h.token.len()
            && expected
                .iter()
                .zip(h.token.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err(format!("wrong token for lane {}", h.lane));
        }
        if grant.peer_id != peer {
            return Err(format!(
                "lane {} was granted to {}, the client proved {peer}",
                h.lane, grant.peer_id
            ));
        }
        let (grant, fds, _) = self
            .tcp_pending
            .remove(&h.lane)
            .unwrap_or_else(|| unreachable!());
        Ok((grant, fds))
    }
}
