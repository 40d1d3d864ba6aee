//! An open lane, whatever its transport: send, receive, request (send then receive, timed),
//! close.

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    os::{fd::OwnedFd, unix::net::UnixStream},
    sync::{Arc, OnceLock, atomic::Ordering},
    time::{Duration, Instant},
};

use super::{
    client::Control,
    control::{LaneGrant, LaneRequest, Transport},
    envelope::{ENVELOPE_LEN, Ids, RequestId},
    frame::{FrameError, HEADER_LEN, Header, Kind},
    os::{self, Mapping},
    ring::{self, Consumer, Producer, Received, Region, RingError, Sent, Sli, Stat},
};

/// Why a lane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// The broker refused (policy, limits, unknown service…); the message says which.
    #[error("lane refused: {message}")]
    Refused {
        /// The broker's message.
        message: String,
        /// Why, from the registry (absent from brokers before it).
        reason: Option<crate::control::Refusal>,
        /// The limit exceeded, if that was the reason.
        limit: Option<String>,
        /// When asking again may succeed, ms from now (an open circuit breaker).
        retry_after_ms: Option<u64>,
    },
    /// Talking to the broker failed.
    #[error("lane broker: {0}")]
    Broker(String),
    /// The broker closed the connection (the agent stopped or is being replaced). Lanes
    /// already open go on: the broker is not on their path.
    #[error("lane broker: the broker closed the connection (is the agent running?)")]
    BrokerGone,
    /// The peer process went away (crashed or exited without closing).
    #[error("lane peer went away")]
    PeerGone,
    /// The lane was already closed.
    #[error("lane is closed")]
    Closed,
    /// A message larger than the lane carries.
    #[error("message of {len} bytes exceeds the lane's limit of {max} bytes")]
    TooLarge {
        /// Length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The peer sent a malformed frame.
    #[error("malformed frame from the peer: {0}")]
    Frame(#[from] FrameError),
    /// The shared-memory ring was corrupted by the peer.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The peer broke the lane protocol.
    #[error("lane protocol: {0}")]
    Protocol(String),
    /// Nothing arrived before the deadline. A Unix-socket or TCP lane may have read part of a
    /// frame, so it is closed; a shared-memory lane can be used again.
    #[error("no message arrived within {0:?}")]
    TimedOut(Duration),
    /// The TCP lane's TLS handshake or authorization failed.
    #[error("TCP lane: {0}")]
    Tls(String),
    /// I/O.
    #[error("lane I/O: {0}")]
    Io(#[from] io::Error),
}

/// Which end of the lane this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The end that opened it.
    Client = 0,
    /// The service's end.
    Server = 1,
}

fn spin_budget() -> Duration {
    static SPIN: OnceLock<Duration> = OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("QUADRANT_LANE_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        Duration::from_micros(us)
    })
}

/// How long a sleeping end waits on its bell, a futex word in the lane's header, before it
/// sleeps on the lane's socket pair instead. A futex wakes a sleeper sooner than a byte on a
/// socket (BENCHMARKS.md, "Shared-memory ends sleep on a futex first"); the socket also wakes
/// it when the peer's process ends, which the bell does only through the broker
/// ([`os::ring_gone`]) or once this time has passed. A peer that closes (or drops) its end
/// rings the bell itself. Gaps up to this long between messages are bridged by the bell (traffic
/// paced just past a shorter limit paid a timer wake-up and the socket's slower wake-up on
/// every message: BENCHMARKS.md, "Paced traffic stays on the bell"); an idle lane pays one
/// timer wake-up and then sleeps on the socket, and a peer that dies while no broker knows the
/// lane (an agent restarting) is noticed within this time.
const BELL_SLEEP: Duration = Duration::from_secs(1);

/// How long an end polls for a peer that sleeps in the lane (one it has just woken, say) before
/// it sleeps too.
const ASLEEP_BUDGET: Duration = Duration::from_micros(2);

/// Shared-memory transport state.
#[derive(Debug)]
struct Shm {
    tx: Producer,
    rx: Consumer,
    waker: os::Waker,
    region: Region,
    /// This end's side (`Side as usize`); the peer is the other.
    side: usize,
}

impl Shm {
    /// Whether both ends sleep on their bells first ([`ring::FEATURE_BELL`]).
    fn bells(&self) -> bool {
        let knows = |side: usize| {
            self.region.features(side).load(Ordering::Relaxed) & ring::FEATURE_BELL != 0
        };
        knows(self.side) && knows(1 - self.side)
    }

    /// Wakes the peer, which said (by its waiting flag) that it sleeps or is about to: on its
    /// bell while it sleeps there, else by the doorbell or its eventfd. The bell is bumped
    /// first either way, so a peer between reading it and sleeping on it does not sleep.
    fn wake_peer(&self) -> io::Result<()> {
        let peer = 1 - self.side;
        let features = self.region.features(peer).load(Ordering::Relaxed);
        if self.bells() {
            let bell = self.region.bell(peer);
            bell.fetch_add(1, Ordering::SeqCst);
            if self.region.sleeping(peer).load(Ordering::SeqCst) == ring::SLEEPS_ON_BELL {
                os::futex_wake(bell);
                return Ok(());
            }
            // On the socket, or on the socket and its eventfd: it chose before it knew this
            // end (or it is awake again, and takes a spurious wake-up).
        }
        self.waker.wake(features & ring::FEATURE_DOORBELL != 0)
    }

    /// Sleeps on this end's bell, which held `seen` before the end said it waits, for at most
    /// [`BELL_SLEEP`] (or the time `left`); then, if nothing rang it, on the socket pair, where
    /// the peer's hang-up also wakes it.
    fn sleep_on_bell(&mut self, seen: u32, left: Option<Duration>) -> io::Result<()> {
        let bell = self.region.bell(self.side);
        let first = left.map_or(BELL_SLEEP, |l| l.min(BELL_SLEEP));
        let start = Instant::now();
        if !os::futex_wait(bell, seen, first)? {
            return Ok(());
        }
        let left = match left {
            Some(l) => match l.checked_sub(start.elapsed()) {
                Some(rest) if !rest.is_zero() => Some(rest),
                _ => return Ok(()),
            },
            None => None,
        };
        self.region
            .sleeping(self.side)
            .store(ring::SLEEPS_ON_SOCKET, Ordering::SeqCst);
        // A peer that bumped the bell before it saw the socket named would not ring there.
        if bell.load(Ordering::SeqCst) != seen {
            return Ok(());
        }
        self.waker.sleep(left, self.doorbells())
    }

    /// Whether the peer has closed the lane (it marks that before it queues its `Close`): a
    /// producer waiting for room the peer will never make gives up.
    fn peer_closed(&self) -> bool {
        self.region
            .stat(1 - self.side, Stat::Closed)
            .load(Ordering::SeqCst)
            != 0
    }

    /// Whether both ends wake each other through the socket pair ([`ring::FEATURE_DOORBELL`]).
    fn doorbells(&self) -> bool {
        let knows = |side: usize| {
            self.region.features(side).load(Ordering::Relaxed) & ring::FEATURE_DOORBELL != 0
        };
        knows(self.side) && knows(1 - self.side)
    }

    /// Says (in the lane's header) that this end runs on the current CPU; returns what it wrote.
    fn awake(&self) -> u64 {
        // SAFETY: no arguments; reads the CPU number (vDSO).
        let cpu = unsafe { libc::sched_getcpu() };
        let word = u64::try_from(cpu).map_or(0, |c| c + 1);
        self.region
            .running_cpu(self.side)
            .store(word, Ordering::Relaxed);
        word
    }

    /// Whether an end that runs on CPU word `own` and has waited since `start` polls once more
    /// (else it sleeps), by what its peer says of itself. Polling only helps while the peer runs
    /// on another CPU, and then for at most the spin budget. A peer on this CPU cannot answer
    /// until this end stops — the scheduler often queues a woken task beside its waker, and
    /// polling would hold it off for the whole budget (~50 µs a hop, measured) — so this end
    /// sleeps at once. A peer asleep in the lane (one this end has just woken) gets a moment in
    /// case it wakes on another CPU. Yielding instead of sleeping was measured too: the
    /// scheduler does not reliably run the queued peer, and a yield can give the CPU away for a
    /// whole time slice.
    fn keep_polling(&self, start: Instant, own: u64) -> bool {
        let peer = self
            .region
            .running_cpu(1 - self.side)
            .load(Ordering::Relaxed);
        let budget = match peer {
            0 => ASLEEP_BUDGET,
            p if p == own => return false,
            _ => spin_budget(),
        };
        start.elapsed() < budget
    }

    /// Waits once for the ring to change: polls, or sleeps after `prepare` (the producer's or
    /// consumer's `prepare_wait`) said it may; `done` ends the wait either way.
    fn wait(
        &mut self,
        (start, deadline): (Instant, Option<Instant>),
        own: &mut u64,
        prepare: impl FnOnce(&Self) -> bool,
        done: impl FnOnce(&Self),
    ) -> Result<(), LaneError> {
        if self.waker.peer_gone() || self.region.gone(1 - self.side).load(Ordering::SeqCst) != 0 {
            return Err(LaneError::PeerGone);
        }
        let left = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Err(LaneError::TimedOut(start.elapsed())),
            },
            None => None,
        };
        if self.keep_polling(start, *own) {
            std::hint::spin_loop();
            return Ok(());
        }
        // The bell's value before this end says it waits: a ring after that ends the sleep.
        let bell = self.bells().then(|| {
            let seen = self.region.bell(self.side).load(Ordering::SeqCst);
            self.region
                .sleeping(self.side)
                .store(ring::SLEEPS_ON_BELL, Ordering::SeqCst);
            seen
        });
        // Marked gone (and the bell bumped) between the check above and reading the bell: this
        // end would sleep through that bump, so it looks again before it sleeps.
        if bell.is_some() && self.region.gone(1 - self.side).load(Ordering::SeqCst) != 0 {
            self.region.sleeping(self.side).store(0, Ordering::SeqCst);
            return Err(LaneError::PeerGone);
        }
        if prepare(self) {
            self.region
                .running_cpu(self.side)
                .store(0, Ordering::Relaxed);
            // Woken only by the doorbell when both ends know it (an end that does not wakes
            // its peer through the eventfd; one that does, so when the peer advertises it).
            let slept = match bell {
                Some(seen) => self.sleep_on_bell(seen, left),
                None => self.waker.sleep(left, self.doorbells()),
            };
            *own = self.awake();
            slept?;
        }
        if bell.is_some() {
            self.region.sleeping(self.side).store(0, Ordering::SeqCst);
        }
        done(self);
        Ok(())
    }

    /// Waits once for something to read; `true` when the peer is gone, after which the ring
    /// is looked at once more: what the peer wrote before it went is still read.
    fn wait_to_read(
        &mut self,
        waiting: (Instant, Option<Instant>),
        own: &mut u64,
    ) -> Result<bool, LaneError> {
        match self.wait(
            waiting,
            own,
            |s| s.rx.prepare_wait(),
            |s| s.rx.done_waiting(),
        ) {
            Ok(()) => Ok(false),
            Err(LaneError::PeerGone) => Ok(true),
            Err(e) => Err(e),
        }
    }

    fn send(
        &mut self,
        kind: Kind,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), LaneError> {
        let mut waiting: Option<(Instant, u64)> = None;
        loop {
            match self.tx.try_send_with(kind, len, |b| fill(b))? {
                Sent::Done { wake } => {
                    if wake {
                        self.wake_peer()?;
                    }
                    return Ok(());
                }
                Sent::Full if self.peer_closed() => return Err(LaneError::PeerGone),
                Sent::Full => {}
            }
            let (start, mut own) = *waiting.get_or_insert_with(|| (Instant::now(), self.awake()));
            // The peer's mark is read after this end says it waits for room, and the closing
            // peer reads that after it marks: one of the two sees the other.
            self.wait(
                (start, None),
                &mut own,
                |s| s.tx.prepare_wait() && !s.peer_closed(),
                |s| s.tx.done_waiting(),
            )?;
            waiting = Some((start, own));
        }
    }

    fn recv<R>(
        &mut self,
        read: &mut dyn FnMut(&[u8]) -> R,
        deadline: Option<Instant>,
    ) -> Result<Option<R>, LaneError> {
        let (mut waiting, mut last_look): (Option<(Instant, u64)>, bool) = (None, false);
        loop {
            match self.rx.try_recv_with(&mut *read)? {
                Received::Data { value, wake } => {
                    if wake {
                        self.wake_peer()?;
                    }
                    return Ok(Some(value));
                }
                Received::Closed => return Ok(None),
                Received::Empty if last_look => return Err(LaneError::PeerGone),
                Received::Empty => {}
            }
            let (start, mut own) = *waiting.get_or_insert_with(|| (Instant::now(), self.awake()));
            last_look = self.wait_to_read((start, deadline), &mut own)?;
            waiting = Some((start, own));
        }
    }

    /// Receives one request and writes the response straight from it into the other ring (one
    /// copy). `size` gives the response's length from the request (at most `max`); `fill`
    /// writes it. `Ok(None)`: the peer closed. Returns the request's and the response's
    /// lengths.
    fn respond(
        &mut self,
        max: usize,
        size: &mut dyn FnMut(&[u8]) -> usize,
        fill: &mut dyn FnMut(&[u8], &mut [u8]),
    ) -> Result<Option<(usize, usize)>, LaneError> {
        /// What answering in place came to.
        enum Answer {
            Sent {
                wake: bool,
                request: usize,
                response: usize,
            },
            /// No room for the response now: the request, copied out, is answered by a
            /// waiting send (holding it in the ring while waiting could wait forever on a peer
            /// waiting for room in this ring).
            Later(Vec<u8>, usize),
            TooLarge(usize),
            Broken(RingError),
        }
        let (mut waiting, mut last_look): (Option<(Instant, u64)>, bool) = (None, false);
        loop {
            let Self { tx, rx, .. } = &mut *self;
            let received = rx.try_recv_with(|request| {
                let n = size(request);
                if n > max {
                    return Answer::TooLarge(n);
                }
                match tx.try_send_with(Kind::Data, n, |out| fill(request, out)) {
                    Ok(Sent::Done { wake }) => Answer::Sent {
                        wake,
                        request: request.len(),
                        response: n,
                    },
                    Ok(Sent::Full) => Answer::Later(request.to_vec(), n),
                    Err(e) => Answer::Broken(e),
                }
            })?;
            match received {
                Received::Data { value, wake } => {
                    if wake {
                        self.wake_peer()?;
                    }
                    return match value {
                        Answer::Sent {
                            wake,
                            request,
                            response,
                        } => {
                            if wake {
                                self.wake_peer()?;
                            }
                            Ok(Some((request, response)))
                        }
                        Answer::Later(request, n) => {
                            self.send(Kind::Data, n, &mut |out| fill(&request, out))?;
                            Ok(Some((request.len(), n)))
                        }
                        Answer::TooLarge(len) => Err(LaneError::TooLarge { len, max }),
                        Answer::Broken(e) => Err(e.into()),
                    };
                }
                Received::Closed => return Ok(None),
                Received::Empty if last_look => return Err(LaneError::PeerGone),
                Received::Empty => {}
            }
            let (start, mut own) = *waiting.get_or_insert_with(|| (Instant::now(), self.awake()));
            last_look = self.wait_to_read((start, None), &mut own)?;
            waiting = Some((start, own));
        }
    }
}

/// A byte stream carrying frames (Unix socket or TLS over TCP).
pub(crate) trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Framing over a byte stream, with a read buffer so small frames cost one read.
pub struct Framed<S> {
    pub(crate) stream: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    scratch: Vec<u8>,
    /// Where received frames are assembled (kept apart from `scratch`, which sends use, so it
    /// keeps its length and a frame of the same size needs no zeroing).
    incoming: Vec<u8>,
    max: u32,
}

impl<S> std::fmt::Debug for Framed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framed")
            .field("buffered", &(self.end - self.start))
            .finish_non_exhaustive()
    }
}

/// Initial read buffer of a stream lane (it grows to the largest header-plus-payload batch
/// read at once, up to `MAX_READ_BUF`).
const READ_BUF: usize = 4096;
const MAX_READ_BUF: usize = 64 * 1024;
const COALESCE: usize = 16 * 1024;

impl<S: Read + Write> Framed<S> {
    /// Frames over `stream`, refusing payloads over `max` bytes.
    pub fn new(stream: S, max: u32) -> Self {
        Self {
            stream,
            buf: vec![0; READ_BUF],
            start: 0,
            end: 0,
            scratch: Vec::new(),
            incoming: Vec::new(),
            max,
        }
    }

    pub(crate) fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    pub(crate) fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), LaneError> {
        self.send_parts(kind, &[], payload)
    }

    /// Sends one frame whose payload is `prefix` then `payload`.
    pub(crate) fn send_parts(
        &mut self,
        kind: Kind,
        prefix: &[u8],
        payload: &[u8],
    ) -> Result<(), LaneError> {
        let len = prefix.len() + payload.len();
        #[expect(
            clippy::cast_possible_truncation,
            reason = "checked against max (a u32) by the caller"
        )]
        let h = Header {
            len: len as u32,
            kind,
        }
        .encode();
        if len <= COALESCE {
            self.scratch.clear();
            self.scratch.extend_from_slice(&h);
            self.scratch.extend_from_slice(prefix);
            self.scratch.extend_from_slice(payload);
            self.stream.write_all(&self.scratch)?;
        } else {
            self.scratch.clear();
            self.scratch.extend_from_slice(&h);
            self.scratch.extend_from_slice(prefix);
            self.stream.write_all(&self.scratch)?;
            self.stream.write_all(payload)?;
        }
        self.stream.flush()?;
        Ok(())
    }

    /// Makes `n` bytes available in `buf[start..]`; false at end of stream before any byte.
    fn fill(&mut self, n: usize) -> Result<bool, LaneError> {
        if self.end - self.start >= n {
            return Ok(true);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // A full buffer means the peer sends faster than one read takes: read more at once.
        if self.end == self.buf.len() && self.buf.len() < MAX_READ_BUF {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        while self.end < n {
            let got = match self.stream.read(&mut self.buf[self.end..]) {
                Ok(g) => g,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_peer_gone(&e) => return Err(LaneError::PeerGone),
                Err(e) => return Err(e.into()),
            };
            if got == 0 {
                return if self.end == 0 {
                    Ok(false)
                } else {
                    Err(LaneError::PeerGone)
                };
            }
            self.end += got;
        }
        Ok(true)
    }

    /// Receives one frame into `out`; `None` at end of stream on a frame boundary.
    pub fn recv(&mut self, out: &mut Vec<u8>) -> Result<Option<Kind>, LaneError> {
        if !self.fill(HEADER_LEN)? {
            return Ok(None);
        }
        let h = Header::decode(&self.buf[self.start..self.end], self.max)?;
        self.start += HEADER_LEN;
        let len = h.len as usize;
        // Sized without zeroing what a reused buffer already holds: every byte is overwritten.
        if out.len() < len {
            out.resize(len, 0);
        } else {
            out.truncate(len);
        }
        let buffered = (self.end - self.start).min(len);
        out[..buffered].copy_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        if buffered < len {
            let mut at = buffered;
            while at < len {
                match self.stream.read(&mut out[at..]) {
                    Ok(0) => return Err(LaneError::PeerGone),
                    Ok(n) => at += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if is_peer_gone(&e) => return Err(LaneError::PeerGone),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(Some(h.kind))
    }
}

fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
    )
}

enum Io {
    Shm(Box<Shm>),
    Uds(Framed<UnixStream>),
    Tcp(Box<Framed<Box<dyn Stream>>>),
}

/// An open lane.
pub struct Lane {
    grant: LaneGrant,
    side: Side,
    // Keeps the shared page mapped for `region`.
    _memory: Mapping,
    region: Region,
    io: Io,
    control: Option<Arc<Control>>,
    closed: bool,
    /// The client side of a lane to a service with a shadow generation.
    mirror: Option<crate::mirror::Mirror>,
    /// A lane with request ids: what is not answered yet.
    ids: Option<Ids>,
    /// A TCP lane's socket, for receive deadlines.
    tcp: Option<TcpStream>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("lane", &self.grant.lane)
            .field("transport", &self.grant.transport)
            .field("side", &self.side)
            .field("peer", &self.grant.peer_id)
            .finish_non_exhaustive()
    }
}

fn take_fds(fds: Vec<OwnedFd>, n: usize) -> Result<Vec<OwnedFd>, LaneError> {
    if fds.len() == n {
        Ok(fds)
    } else {
        Err(LaneError::Broker(format!(
            "lane grant carried {} descriptors, expected {n}",
            fds.len()
        )))
    }
}

/// The request-id book of a lane whose grant asks for request ids.
fn ids_for(grant: &LaneGrant, side: Side) -> Result<Option<Ids>, LaneError> {
    if !grant.request_ids {
        return Ok(None);
    }
    if (grant.max_message as usize) < ENVELOPE_LEN {
        return Err(LaneError::Broker(format!(
            "a lane with request ids needs messages of at least {ENVELOPE_LEN} bytes, the grant \
             allows {}",
            grant.max_message
        )));
    }
    Ok(Some(Ids::new(side, grant.max_in_flight)))
}

fn map_lane_memory(fd: &OwnedFd, ring_bytes: usize) -> Result<(Mapping, Region), LaneError> {
    let len = ring::mapping_len(ring_bytes);
    let memory = Mapping::new(fd, len, true)?;
    // SAFETY: the mapping is `len` bytes, page-aligned, and lives in the `Lane` with the region.
    let region = unsafe { Region::new(memory.as_ptr(), len, ring_bytes) }?;
    region.check_magic()?;
    Ok((memory, region))
}

impl Lane {
    /// Builds a shared-memory or Unix-socket lane from a grant and its descriptors.
    pub(crate) fn from_local_grant(
        grant: LaneGrant,
        side: Side,
        fds: Vec<OwnedFd>,
        control: Option<Arc<Control>>,
    ) -> Result<Self, LaneError> {
        let mut fds = take_fds(fds, grant.fd_count())?.into_iter();
        let mut next = || {
            fds.next()
                .ok_or_else(|| LaneError::Broker("missing descriptor".into()))
        };
        let mem = next()?;
        let ring_bytes = grant.ring_bytes as usize;
        let (memory, region) = map_lane_memory(&mem, ring_bytes)?;
        let max = grant.max_message as usize;
        let io = match grant.transport {
            Transport::Shm => {
                let own_efd = next()?;
                let peer_efd = next()?;
                let peer_sock = next()?;
                let (tx_ring, rx_ring) = match side {
                    Side::Client => (0, 1),
                    Side::Server => (1, 0),
                };
                // Before any traffic: this end sleeps on its bell, then on the socket pair, and
                // takes long padding.
                region.features(side as usize).store(
                    ring::FEATURE_DOORBELL | ring::FEATURE_LONG_PAD | ring::FEATURE_BELL,
                    Ordering::Relaxed,
                );
                Io::Shm(Box::new(Shm {
                    tx: region.producer(tx_ring, max, u64::from(grant.max_in_flight)),
                    rx: region.consumer(rx_ring, max),
                    waker: os::Waker::new(peer_sock, own_efd, peer_efd),
                    region,
                    side: side as usize,
                }))
            }
            Transport::Uds => {
                let sock = UnixStream::from(next()?);
                Io::Uds(Framed::new(sock, grant.max_message))
            }
            Transport::Tcp => {
                return Err(LaneError::Broker("TCP grant passed as a local lane".into()));
            }
        };
        Ok(Self {
            ids: ids_for(&grant, side)?,
            grant,
            side,
            _memory: memory,
            region,
            io,
            control,
            closed: false,
            mirror: None,
            tcp: None,
        })
    }

    /// Builds a TCP lane over an authenticated, authorized TLS stream.
    pub(crate) fn from_tcp(
        grant: LaneGrant,
        side: Side,
        fds: Vec<OwnedFd>,
        (framed, sock): (Framed<Box<dyn Stream>>, TcpStream),
        control: Option<Arc<Control>>,
    ) -> Result<Self, LaneError> {
        let mem = take_fds(fds, 1)?
            .into_iter()
            .next()
            .ok_or(LaneError::Closed)?;
        let (memory, region) = map_lane_memory(&mem, 0)?;
        Ok(Self {
            ids: ids_for(&grant, side)?,
            grant,
            side,
            _memory: memory,
            region,
            io: Io::Tcp(Box::new(framed)),
            control,
            closed: false,
            mirror: None,
            tcp: Some(sock),
        })
    }

    /// Copies this client side's requests to the service's shadow generation, as its grant
    /// asked.
    pub(crate) fn mirror_to(&mut self, mirror: crate::mirror::Mirror) {
        self.mirror = Some(mirror);
    }

    /// Requests not copied to the service's shadow generation because it was behind (0 when
    /// the service has none).
    #[must_use]
    pub fn mirror_dropped(&self) -> u64 {
        self.mirror
            .as_ref()
            .map_or(0, crate::mirror::Mirror::dropped)
    }

    /// Lane id.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.grant.lane
    }

    /// Its transport.
    #[must_use]
    pub fn transport(&self) -> Transport {
        self.grant.transport
    }

    /// The other end's SPIFFE ID (as attested by the broker, or proven in the TLS handshake).
    #[must_use]
    pub fn peer_id(&self) -> &str {
        &self.grant.peer_id
    }

    /// This end's SPIFFE ID.
    #[must_use]
    pub fn local_id(&self) -> &str {
        &self.grant.local_id
    }

    /// Largest message (on a lane with request ids, the envelope's 16 bytes less than the
    /// lane carries).
    #[must_use]
    pub fn max_message(&self) -> usize {
        let wire = self.grant.max_message as usize;
        if self.ids.is_some() {
            wire - ENVELOPE_LEN
        } else {
            wire
        }
    }

    /// Whether the lane was closed (by `close`, or after a timed-out receive on a stream).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The instance of the service's quadrant whose listener serves the lane.
    #[must_use]
    pub fn instance(&self) -> u8 {
        self.grant.instance
    }

    /// Messages one end may send ahead of the other's reading.
    #[must_use]
    pub fn max_in_flight(&self) -> u32 {
        self.grant.max_in_flight
    }

    /// Whether every message carries a request envelope ([`crate::envelope`]).
    #[must_use]
    pub fn has_request_ids(&self) -> bool {
        self.ids.is_some()
    }

    /// On the service's end of a lane with request ids: the request the next `send` answers
    /// (the oldest one received and not answered) — a repeat of a request handled before has
    /// the same id and a higher attempt. `None` on other lanes or with nothing to answer.
    #[must_use]
    pub fn request_id(&self) -> Option<RequestId> {
        match self.side {
            Side::Server => self.ids.as_ref().and_then(Ids::oldest),
            Side::Client => None,
        }
    }

    fn count(&self, sent: bool, bytes: usize) {
        let side = self.side as usize;
        let (b, m) = if sent {
            (Stat::BytesSent, Stat::MessagesSent)
        } else {
            (Stat::BytesReceived, Stat::MessagesReceived)
        };
        self.region
            .stat(side, b)
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.region.stat(side, m).fetch_add(1, Ordering::Relaxed);
    }

    fn check_len(&self, len: usize) -> Result<(), LaneError> {
        if self.closed {
            return Err(LaneError::Closed);
        }
        if len > self.max_message() {
            return Err(LaneError::TooLarge {
                len,
                max: self.max_message(),
            });
        }
        Ok(())
    }

    /// The envelope the next plain `send` carries (`None` on a lane without request ids).
    fn outgoing(&self) -> Result<Option<RequestId>, LaneError> {
        self.ids.as_ref().map(Ids::outgoing).transpose()
    }

    /// Sends one message (waits while the peer is `max_in_flight` messages or a ring behind).
    /// On a lane with request ids, a client's message is a new request; a service's answers
    /// the oldest request not answered yet.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), LaneError> {
        let env = self.outgoing()?;
        self.send_as(env, msg)
    }

    /// Sends `msg` under envelope `env` (none on a lane without request ids).
    pub(crate) fn send_as(&mut self, env: Option<RequestId>, msg: &[u8]) -> Result<(), LaneError> {
        self.check_len(msg.len())?;
        let envelope = env.map(RequestId::bytes);
        let prefix = envelope.as_ref().map_or(&[][..], |e| &e[..]);
        let wire = prefix.len() + msg.len();
        match &mut self.io {
            Io::Shm(s) => s.send(Kind::Data, wire, &mut |b| {
                b[..prefix.len()].copy_from_slice(prefix);
                b[prefix.len()..].copy_from_slice(msg);
            })?,
            Io::Uds(f) => f.send_parts(Kind::Data, prefix, msg)?,
            Io::Tcp(f) => f.send_parts(Kind::Data, prefix, msg)?,
        }
        self.count(true, wire);
        if let (Some(ids), Some(env)) = (&mut self.ids, env) {
            ids.sent(env);
        }
        Ok(())
    }

    /// Sends a message of `len` bytes written in place by `fill` (in the ring itself on a
    /// shared-memory lane: no copy).
    pub fn send_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<(), LaneError> {
        let env = self.outgoing()?;
        let mut fill = Some(fill);
        self.fill_as(env, len, &mut |b| {
            if let Some(f) = fill.take() {
                f(b);
            }
        })
    }

    /// Sends a message of `len` bytes written by `fill` under envelope `env`.
    fn fill_as(
        &mut self,
        env: Option<RequestId>,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), LaneError> {
        self.check_len(len)?;
        let envelope = env.map(RequestId::bytes);
        let prefix = envelope.as_ref().map_or(&[][..], |e| &e[..]);
        let wire = prefix.len() + len;
        match &mut self.io {
            Io::Shm(s) => s.send(Kind::Data, wire, &mut |b| {
                b[..prefix.len()].copy_from_slice(prefix);
                fill(&mut b[prefix.len()..]);
            })?,
            Io::Uds(f) => {
                let mut buf = vec![0; len];
                fill(&mut buf);
                f.send_parts(Kind::Data, prefix, &buf)?;
            }
            Io::Tcp(f) => {
                let mut buf = vec![0; len];
                fill(&mut buf);
                f.send_parts(Kind::Data, prefix, &buf)?;
            }
        }
        self.count(true, wire);
        if let (Some(ids), Some(env)) = (&mut self.ids, env) {
            ids.sent(env);
        }
        Ok(())
    }

    /// Receives one message into `out`. `Ok(false)`: the peer closed the lane.
    pub fn recv(&mut self, out: &mut Vec<u8>) -> Result<bool, LaneError> {
        self.recv_with(|payload| {
            out.clear();
            out.extend_from_slice(payload);
        })
        .map(|v| v.is_some())
    }

    /// Receives one message and hands it to `read` (in place in the ring on a shared-memory
    /// lane). `Ok(None)`: the peer closed the lane.
    pub fn recv_with<R>(&mut self, read: impl FnOnce(&[u8]) -> R) -> Result<Option<R>, LaneError> {
        Ok(self.recv_frame(read, None)?.map(|(value, _)| value))
    }

    /// Receives one message into `out`, waiting until `deadline` at most
    /// ([`LaneError::TimedOut`] then). `Ok(false)`: the peer closed the lane.
    pub fn recv_until(&mut self, out: &mut Vec<u8>, deadline: Instant) -> Result<bool, LaneError> {
        Ok(self.recv_into(out, deadline)?.0)
    }

    /// Receives one message into `out` until `deadline`: whether one came (`false`: the peer
    /// closed the lane), and its envelope if it had one.
    fn recv_into(
        &mut self,
        out: &mut Vec<u8>,
        deadline: Instant,
    ) -> Result<(bool, Option<RequestId>), LaneError> {
        let got = self.recv_frame(
            |payload| {
                out.clear();
                out.extend_from_slice(payload);
            },
            Some(deadline),
        )?;
        Ok(got.map_or((false, None), |((), env)| (true, env)))
    }

    /// Receives an answer on a client's lane with request ids into `out`, waiting until
    /// `deadline` at most; returns the request it answers. `Ok(None)`: the peer closed.
    pub(crate) fn recv_answer(
        &mut self,
        out: &mut Vec<u8>,
        deadline: Instant,
    ) -> Result<Option<RequestId>, LaneError> {
        match self.recv_into(out, deadline)? {
            (true, Some(env)) => Ok(Some(env)),
            (true, None) => Err(LaneError::Protocol(
                "an answer without a request envelope".into(),
            )),
            (false, _) => Ok(None),
        }
    }

    /// Receives one frame: `read` sees the message (without its envelope); returns what it
    /// returned and the envelope. `Ok(None)`: the peer closed the lane.
    fn recv_frame<R>(
        &mut self,
        read: impl FnOnce(&[u8]) -> R,
        deadline: Option<Instant>,
    ) -> Result<Option<(R, Option<RequestId>)>, LaneError> {
        if self.closed {
            return Err(LaneError::Closed);
        }
        let enveloped = self.ids.is_some();
        let mut read = Some(read);
        let mut len = 0;
        let mut env: Option<Result<RequestId, LaneError>> = None;
        let mut inner = |p: &[u8]| -> Option<R> {
            len = p.len();
            let body = if enveloped {
                match RequestId::decode(p) {
                    Ok(e) => {
                        env = Some(Ok(e));
                        &p[ENVELOPE_LEN..]
                    }
                    Err(e) => {
                        env = Some(Err(e));
                        return None;
                    }
                }
            } else {
                p
            };
            read.take().map(|f| f(body))
        };
        let start = Instant::now();
        let got = match &mut self.io {
            Io::Shm(s) => s.recv(&mut inner, deadline),
            Io::Uds(f) => {
                if deadline.is_some() {
                    f.stream.set_read_timeout(read_timeout(deadline))?;
                }
                let got = recv_stream(f, &mut inner);
                if deadline.is_some() {
                    f.stream.set_read_timeout(None)?;
                }
                got
            }
            Io::Tcp(f) => {
                if let (Some(sock), Some(_)) = (&self.tcp, deadline) {
                    sock.set_read_timeout(read_timeout(deadline))?;
                }
                let got = recv_stream(f, &mut inner);
                if let (Some(sock), Some(_)) = (&self.tcp, deadline) {
                    sock.set_read_timeout(None)?;
                }
                got
            }
        };
        let got = match got {
            Err(LaneError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                // Part of a frame may have been read: the stream cannot be trusted again.
                self.closed = true;
                return Err(LaneError::TimedOut(start.elapsed()));
            }
            other => other?,
        };
        let Some(value) = got else {
            return Ok(None);
        };
        self.count(false, len);
        let env = match env {
            Some(Ok(e)) => {
                if let Some(ids) = &mut self.ids {
                    ids.received(e)?;
                }
                Some(e)
            }
            Some(Err(e)) => return Err(e),
            None => None,
        };
        let value = value.ok_or_else(|| LaneError::Protocol("a message was read twice".into()))?;
        Ok(Some((value, env)))
    }

    /// Receives one request and answers it: `size` gives the response's length from the
    /// request, `fill` writes the response from the request. On a shared-memory lane the request
    /// is read where it lies and the response written straight into the lane — one copy where
    /// `recv` then `send` make two (a 1 MiB echo: copied once). `Ok(false)`: the peer closed.
    /// A response longer than the lane carries is an error, and its request is consumed. On a
    /// lane with request ids the response goes under the request's id.
    pub fn respond_with(
        &mut self,
        size: impl FnOnce(&[u8]) -> usize,
        fill: impl FnOnce(&[u8], &mut [u8]),
    ) -> Result<bool, LaneError> {
        if self.closed {
            return Err(LaneError::Closed);
        }
        let (mut size, mut fill) = (Some(size), Some(fill));
        let mut size_once = |r: &[u8]| size.take().map_or(0, |f| f(r));
        let mut fill_once = |r: &[u8], out: &mut [u8]| {
            if let Some(f) = fill.take() {
                f(r, out);
            }
        };
        let wire_max = self.grant.max_message as usize;
        let extra = if self.ids.is_some() { ENVELOPE_LEN } else { 0 };
        let lengths = match &mut self.io {
            Io::Shm(s) => {
                // The request's envelope, copied into the response's; a malformed one ends
                // the answer (a response too large for the lane, replaced by the real error).
                let env = std::cell::Cell::new(None);
                let bad = std::cell::Cell::new(None);
                let mut size_wire = |r: &[u8]| {
                    if extra == 0 {
                        return size_once(r);
                    }
                    match RequestId::decode(r) {
                        Ok(e) => {
                            env.set(Some(e));
                            size_once(&r[extra..]).saturating_add(extra)
                        }
                        Err(e) => {
                            bad.set(Some(e));
                            usize::MAX
                        }
                    }
                };
                let mut fill_wire = |r: &[u8], out: &mut [u8]| {
                    if let Some(e) = env.get() {
                        e.encode(out);
                    }
                    fill_once(&r[extra..], &mut out[extra..]);
                };
                let answered = s.respond(wire_max, &mut size_wire, &mut fill_wire);
                if let Some(e) = bad.take() {
                    return Err(e);
                }
                answered.map_err(|e| match e {
                    LaneError::TooLarge { len, max } => LaneError::TooLarge {
                        len: len - extra,
                        max: max - extra,
                    },
                    other => other,
                })?
            }
            Io::Uds(_) | Io::Tcp(_) => {
                let Some((request, env)) = self.recv_frame(<[u8]>::to_vec, None)? else {
                    return Ok(false);
                };
                let n = size_once(&request);
                self.fill_as(env, n, &mut |out| fill_once(&request, out))?;
                // recv_frame and fill_as counted both.
                return Ok(true);
            }
        };
        let Some((request, response)) = lengths else {
            return Ok(false);
        };
        self.count(false, request);
        self.count(true, response);
        Ok(true)
    }

    /// Sends `msg` and waits for one reply into `out`, recording the round-trip time in the
    /// lane's statistics (`quadrant lanes` shows it) and, on the client side, the outcome in the
    /// SLI block the agent reads for the service's SLOs.
    pub fn request(&mut self, msg: &[u8], out: &mut Vec<u8>) -> Result<Duration, LaneError> {
        let start = Instant::now();
        let answered = self.send(msg).and_then(|()| {
            if self.recv(out)? {
                Ok(())
            } else {
                Err(LaneError::Closed)
            }
        });
        let rtt = start.elapsed();
        if matches!(self.side, Side::Client) {
            self.record_sli(answered.is_ok(), rtt);
        }
        answered?;
        if let Some(m) = &mut self.mirror {
            m.offer(msg);
        }
        self.record_rtt(rtt);
        Ok(rtt)
    }

    /// Records a round trip in the lane's statistics.
    pub(crate) fn record_rtt(&self, rtt: Duration) {
        let ns = nanos(rtt);
        let side = self.side as usize;
        let ewma = self.region.stat(side, Stat::RttEwmaNs);
        let old = ewma.load(Ordering::Relaxed);
        ewma.store(
            if old == 0 { ns } else { old - old / 8 + ns / 8 },
            Ordering::Relaxed,
        );
        self.region
            .stat(side, Stat::RttSamples)
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one request in the SLI block: failed, or answered in `rtt`.
    pub(crate) fn record_sli(&self, answered: bool, rtt: Duration) {
        let ns = nanos(rtt);
        let r = &self.region;
        r.sli(Sli::Requests).fetch_add(1, Ordering::Relaxed);
        if !answered {
            r.sli(Sli::Failed).fetch_add(1, Ordering::Relaxed);
            return;
        }
        r.latency_count(ring::latency_bucket(ns))
            .fetch_add(1, Ordering::Relaxed);
        r.latency_sum_ns().fetch_add(ns, Ordering::Relaxed);
        let threshold = r.sli(Sli::ThresholdNs).load(Ordering::Relaxed);
        if threshold == 0 || ns <= threshold {
            r.sli(Sli::WithinThreshold).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the lane: the peer's next receive returns `Ok(false)` once it has read what was
    /// sent before.
    pub fn close(mut self) -> Result<(), LaneError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), LaneError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.region
            .stat(self.side as usize, Stat::Closed)
            .store(1, Ordering::SeqCst);
        let result = match &mut self.io {
            // Never waits. A peer asleep on its bell may sleep there long after this end's
            // socket hangs up, so it is rung: to read the `Close`, to give up waiting for room
            // in the ring this end no longer reads, or — the ring full, no `Close` queued — to
            // find this side gone once it has read what the ring holds.
            Io::Shm(s) => match s.tx.try_send_with(Kind::Close, 0, |_| {}) {
                Ok(Sent::Done { wake }) if wake || s.rx.producer_waiting() => {
                    s.wake_peer().map_err(LaneError::from)
                }
                Ok(Sent::Done { .. }) => Ok(()),
                Ok(Sent::Full) => {
                    os::ring_gone(&s.region, s.side);
                    Ok(())
                }
                Err(e) => Err(e.into()),
            },
            Io::Uds(f) => f.send(Kind::Close, &[]).or(Ok(())),
            Io::Tcp(f) => f.send(Kind::Close, &[]).or(Ok(())),
        };
        if let Some(c) = &self.control {
            // The broker also notices when the connection goes; this frees the lane at once.
            let _ = c.send(&LaneRequest::Close {
                lane: self.grant.lane,
            });
        }
        result
    }

    /// The lane's shared statistics page (both sides' counters).
    #[must_use]
    pub fn stat(&self, side: Side, stat: Stat) -> u64 {
        self.region
            .stat(side as usize, stat)
            .load(Ordering::Relaxed)
    }
}

/// Receives one frame of a stream lane and hands a data frame to `read`; `Ok(None)`: the peer
/// closed the lane.
fn recv_stream<S: Read + Write, R>(
    f: &mut Framed<S>,
    read: &mut dyn FnMut(&[u8]) -> R,
) -> Result<Option<R>, LaneError> {
    let mut buf = std::mem::take(&mut f.incoming);
    let kind = f.recv(&mut buf);
    let out = match kind {
        Ok(Some(Kind::Data)) => Ok(Some(read(&buf))),
        Ok(Some(Kind::Close)) => Ok(None),
        // The stream ended without a Close frame: the peer died or dropped the socket.
        Ok(None) => Err(LaneError::PeerGone),
        Ok(Some(other)) => Err(LaneError::Protocol(format!(
            "unexpected {other:?} frame on an open lane"
        ))),
        Err(e) => Err(e),
    };
    f.incoming = buf;
    out
}

/// A socket read timeout that ends at `deadline` (at least a microsecond: zero means none).
fn read_timeout(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| {
        d.saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1))
    })
}

/// `d` in nanoseconds.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Drop for Lane {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::mpsc, thread};

    use proptest::prelude::*;

    use super::*;

    /// Both ends of a shared-memory lane built as the broker builds one, without a broker.
    fn shm_pair(max_message: u32, max_in_flight: u32) -> (Lane, Lane) {
        pair(Transport::Shm, max_message, max_in_flight, false)
    }

    /// Both ends of a shared-memory or Unix-socket lane, with request ids or without.
    fn pair(
        transport: Transport,
        max_message: u32,
        max_in_flight: u32,
        request_ids: bool,
    ) -> (Lane, Lane) {
        let ring_bytes = ring::capacity_for(max_message as usize);
        let len = ring::mapping_len(ring_bytes);
        let memfd = os::sealed_memfd("quadrant-lane-test", len).unwrap();
        let memory = Mapping::new(&memfd, len, true).unwrap();
        // SAFETY: the mapping has exactly this length and outlives the initialization.
        unsafe { Region::new(memory.as_ptr(), len, ring_bytes) }
            .unwrap()
            .initialize();
        let (efd_c, efd_s) = (os::eventfd().unwrap(), os::eventfd().unwrap());
        let (pc, ps) = os::seqpacket_pair().unwrap();
        let grant = |local: &str, peer: &str| LaneGrant {
            lane: 1,
            transport,
            service: "echo".into(),
            quadrant: "dg".into(),
            local_id: local.into(),
            peer_id: peer.into(),
            max_message,
            ring_bytes: u32::try_from(ring_bytes).unwrap(),
            max_in_flight,
            tcp: None,
            mirror: None,
            request_ids,
            instance: 0,
        };
        let dup = |f: &OwnedFd| f.try_clone().unwrap();
        let (client_fds, server_fds) = if transport == Transport::Shm {
            (
                vec![dup(&memfd), dup(&efd_c), dup(&efd_s), pc],
                vec![memfd, efd_s, efd_c, ps],
            )
        } else {
            let (c, s) = os::stream_pair().unwrap();
            (vec![dup(&memfd), c], vec![memfd, s])
        };
        let client =
            Lane::from_local_grant(grant("client", "server"), Side::Client, client_fds, None)
                .unwrap();
        let server =
            Lane::from_local_grant(grant("server", "client"), Side::Server, server_fds, None)
                .unwrap();
        (client, server)
    }

    /// Pauses `us` microseconds: 0 not at all, below 50 by spinning (so the gap lands inside
    /// the peer's polling budgets and at their edges), else by sleeping.
    fn pause(us: u64) {
        if us == 0 {
            return;
        }
        let d = Duration::from_micros(us);
        if us < 50 {
            let t = Instant::now();
            while t.elapsed() < d {
                std::hint::spin_loop();
            }
        } else {
            thread::sleep(d);
        }
    }

    /// Gaps around the waiting policy's edges: none, within and just past the 2 µs a waiter
    /// gives a sleeping peer, around the 50 µs spin budget, and long enough for both to sleep.
    fn gap() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0u64), 1u64..4, 45u64..60, Just(200u64), Just(2000u64),]
    }

    /// Runs `client_gaps.len()` echoes (the client pausing before each request, the service
    /// before each answer); a lost wake-up shows as a run that never finishes.
    fn echo_with_gaps(client_gaps: Vec<u64>, server_gaps: Vec<u64>, size: usize) {
        // A sleeping end waits in poll(2) without a timeout, so a lost wake-up never finishes;
        // a slow run (a loaded machine, another test's agents) still does. The limit only has
        // to tell the two apart, not time anything.
        let budget = Duration::from_secs(30);
        let (mut client, mut server) = shm_pair(4096, 4);
        let n = client_gaps.len();
        let (done_tx, done_rx) = mpsc::channel();
        let service = thread::spawn(move || {
            let mut buf = Vec::new();
            for gap in server_gaps.iter().cycle().take(n) {
                assert!(server.recv(&mut buf).unwrap(), "the client closed early");
                pause(*gap);
                server.send(&buf).unwrap();
            }
            assert!(!server.recv(&mut buf).unwrap(), "the close arrives last");
        });
        let caller = thread::spawn(move || {
            let mut reply = Vec::new();
            for (i, gap) in client_gaps.iter().enumerate() {
                pause(*gap);
                let msg: Vec<u8> = (0..size)
                    .map(|j| u8::try_from((i + j) % 251).unwrap())
                    .collect();
                client.send(&msg).unwrap();
                assert!(client.recv(&mut reply).unwrap());
                assert_eq!(reply, msg, "echo {i} out of order or changed");
            }
            client.close().unwrap();
            done_tx.send(()).unwrap();
        });
        assert!(
            done_rx.recv_timeout(budget).is_ok(),
            "no answer within {budget:?}: a wake-up was lost"
        );
        caller.join().unwrap();
        service.join().unwrap();
    }

    proptest! {
        // A failing case waits out its budget; a few shrink steps are enough to report it.
        #![proptest_config(ProptestConfig {
            cases: 24,
            max_shrink_iters: 16,
            ..ProptestConfig::default()
        })]

        #[test]
        fn a_peer_that_sleeps_between_messages_gets_every_message_in_order(
            client_gaps in prop::collection::vec(gap(), 1..120),
            server_gaps in prop::collection::vec(gap(), 1..16),
            size in prop_oneof![Just(1usize), Just(64), Just(4096)],
        ) {
            echo_with_gaps(client_gaps, server_gaps, size);
        }
    }

    /// Gaps of 0–4 µs on both sides, 50,000 times: most waits end within a microsecond of the
    /// moment the waiter decides to sleep, where a wake-up is lost if the waiter does not look
    /// at the ring once more after announcing its sleep. Without that check this test hangs in
    /// some runs (a timing race); the ring's own test of the check is deterministic.
    #[test]
    fn waits_that_end_at_the_sleep_boundary_lose_no_wake_up() {
        let client: Vec<u64> = (0..50_000).map(|i| i * 7 % 5).collect();
        let server: Vec<u64> = (0..7).map(|i| i * 3 % 4).collect();
        echo_with_gaps(client, server, 64);
    }

    /// An end built before the doorbell (its feature word 0) sleeps on its eventfd only: the
    /// other end wakes it there, and keeps walking the ring rather than padding to its end.
    #[test]
    fn an_end_without_the_doorbell_is_woken_through_its_eventfd() {
        let (mut client, mut server) = shm_pair(4096, 4);
        client
            .region
            .features(Side::Client as usize)
            .store(0, Ordering::Relaxed);
        let service = thread::spawn(move || {
            let mut buf = Vec::new();
            while server.recv(&mut buf).unwrap() {
                pause(300);
                server.send(&buf).unwrap();
            }
        });
        let (done_tx, done_rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reply = Vec::new();
            for i in 0..300u32 {
                client.send(&i.to_le_bytes()).unwrap();
                assert!(client.recv(&mut reply).unwrap());
                assert_eq!(reply, i.to_le_bytes());
            }
            let Io::Shm(shm) = &client.io else {
                panic!("a shared-memory lane")
            };
            let walked = shm.rx.head_position();
            client.close().unwrap();
            done_tx.send(walked).unwrap();
        });
        // 300 answers of 16 bytes each walked 4,800 bytes of the server's ring: no restart.
        assert_eq!(
            done_rx.recv_timeout(Duration::from_secs(10)),
            Ok(300 * 16),
            "the client was not woken through its eventfd"
        );
        service.join().unwrap();
    }

    /// An end that went to sleep before its peer had taken its end (so without the bell: the
    /// peer's feature word was still 0) is woken when the peer, bells and all, sends.
    #[test]
    fn an_end_asleep_before_its_peer_took_its_end_is_woken() {
        let (mut client, mut server) = shm_pair(4096, 4);
        let features = client
            .region
            .features(Side::Client as usize)
            .swap(0, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            // A deadline far beyond the test's wait: its ending the sleep must not pass for a
            // wake-up.
            let got = server.recv_until(&mut buf, Instant::now() + Duration::from_mins(2));
            let _ = tx.send(got.map(|_| buf));
        });
        // The service sleeps on its socket and eventfd by now, having chosen before the client
        // said what it understands.
        thread::sleep(Duration::from_millis(100));
        client
            .region
            .features(Side::Client as usize)
            .store(features, Ordering::Relaxed);
        client.send(b"first").unwrap();
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the sleeping service was not woken");
        assert_eq!(got.unwrap(), b"first");
    }

    /// An end asleep on its bell, whose peer's process has ended (the peer's socket still open
    /// here, as in the moment before the kernel closes it), learns it when the broker marks
    /// the peer gone and rings the bell — not at the end of its bell sleep, nor never.
    #[test]
    fn an_end_asleep_on_its_bell_learns_that_its_peer_is_gone() {
        let (client, mut server) = shm_pair(4096, 4);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            tx.send(server.recv(&mut buf)).unwrap();
        });
        thread::sleep(Duration::from_millis(5));
        os::ring_gone(&client.region, Side::Client as usize);
        let got = rx.recv_timeout(Duration::from_secs(10));
        assert!(
            matches!(got, Ok(Err(LaneError::PeerGone))),
            "the service did not learn that its client is gone: {got:?}"
        );
        drop(client);
    }

    /// Answers written in place come back in order and intact, also when the answer ring is
    /// full (the client sends a burst before reading: the in-place answer waits as a copy).
    #[test]
    fn responses_written_in_place_arrive_in_order() {
        let (mut client, mut server) = shm_pair(4096, 2);
        let service = thread::spawn(move || {
            let mut answered = 0;
            while server
                .respond_with(
                    |r| r.len() + 1,
                    |r, out| {
                        out[..r.len()].copy_from_slice(r);
                        out[r.len()] = 0xff;
                    },
                )
                .unwrap()
            {
                answered += 1;
            }
            answered
        });
        let mut reply = Vec::new();
        for burst in 0..50u32 {
            // Four requests in flight against a limit of two per direction.
            for i in 0..4 {
                client.send(&(burst * 4 + i).to_le_bytes()).unwrap();
            }
            for i in 0..4 {
                assert!(client.recv(&mut reply).unwrap());
                let mut want = (burst * 4 + i).to_le_bytes().to_vec();
                want.push(0xff);
                assert_eq!(reply, want);
            }
        }
        client.close().unwrap();
        assert_eq!(service.join().unwrap(), 200);
    }

    #[test]
    fn a_response_longer_than_the_lane_carries_is_refused() {
        let (mut client, mut server) = shm_pair(64, 2);
        client.send(b"x").unwrap();
        assert!(matches!(
            server.respond_with(|_| 65, |_, _| {}),
            Err(LaneError::TooLarge { len: 65, max: 64 })
        ));
    }

    /// A burst larger than the ring's in-flight limit: the producer sleeps for room and is woken
    /// by the consumer, whose reads are themselves paced.
    #[test]
    fn a_producer_waiting_for_room_is_woken() {
        let (mut client, mut server) = shm_pair(4096, 2);
        let (done_tx, done_rx) = mpsc::channel();
        let reader = thread::spawn(move || {
            let mut buf = Vec::new();
            for i in 0..200u32 {
                if i % 10 == 0 {
                    pause(200);
                }
                assert!(server.recv(&mut buf).unwrap());
                assert_eq!(buf, i.to_le_bytes());
            }
            done_tx.send(()).unwrap();
        });
        thread::spawn(move || {
            for i in 0..200u32 {
                client.send(&i.to_le_bytes()).unwrap();
            }
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "the producer was not woken for room"
        );
        reader.join().unwrap();
    }

    /// A producer asleep for room in a ring its peer will never read again — the peer closed
    /// its end but its process (and so the lane's socket) lives on — learns it from the peer's
    /// close, not from a hang-up that does not come.
    #[test]
    fn a_producer_waiting_for_room_learns_that_its_peer_closed() {
        let (mut client, mut server) = shm_pair(4096, 2);
        client.send(b"one").unwrap();
        client.send(b"two").unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let got = client.send(b"three");
            let _ = tx.send(got);
            client
        });
        // The producer sleeps by now (on its bell, past it on the socket: either way).
        thread::sleep(Duration::from_millis(50));
        server.shutdown().unwrap();
        let got = rx.recv_timeout(Duration::from_secs(10));
        assert!(
            matches!(got, Ok(Err(LaneError::PeerGone))),
            "the waiting producer did not learn of the close: {got:?}"
        );
        drop(server);
    }

    /// A peer that closes its end with the ring full (no room for its `Close`) is found gone
    /// once what it sent before has been read — all of it, in order — while its process, and
    /// the lane's socket, live on.
    #[test]
    fn what_a_peer_sent_before_closing_on_a_full_ring_is_read_and_then_it_is_gone() {
        let (mut client, mut server) = shm_pair(4096, 2);
        client.send(b"one").unwrap();
        client.send(b"two").unwrap();
        client.shutdown().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let mut got = Vec::new();
            let end = loop {
                match server.recv(&mut buf) {
                    Ok(true) => got.push(buf.clone()),
                    other => break other,
                }
            };
            let _ = tx.send((got, end));
        });
        let (got, end) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the service did not learn that its client is gone");
        assert_eq!(got, [b"one".to_vec(), b"two".to_vec()]);
        assert!(matches!(end, Err(LaneError::PeerGone)), "{end:?}");
        drop(client);
    }

    /// An end idle for longer than it sleeps on its bell then sleeps on the lane's socket,
    /// where its peer's next message — and then its close — still wake it.
    #[test]
    fn an_end_asleep_past_its_bell_is_woken_on_the_socket() {
        let (mut client, mut server) = shm_pair(4096, 4);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let first = server.recv(&mut buf).map(|_| buf.clone());
            let _ = tx.send(first.map(Some));
            let _ = tx.send(server.recv(&mut buf).map(|more| more.then(|| buf.clone())));
        });
        let past = BELL_SLEEP + Duration::from_millis(200);
        thread::sleep(past);
        client.send(b"late").unwrap();
        let first = rx.recv_timeout(Duration::from_secs(10));
        assert!(
            matches!(&first, Ok(Ok(Some(m))) if m == b"late"),
            "the message after a long gap was not delivered: {first:?}"
        );
        thread::sleep(past);
        client.close().unwrap();
        let end = rx.recv_timeout(Duration::from_secs(10));
        assert!(
            matches!(end, Ok(Ok(None))),
            "the close was not delivered: {end:?}"
        );
    }

    /// On a lane with request ids each request reaches the service under the id and attempt
    /// it was sent with, and each answer — sent plainly or written in place — comes back under
    /// its request's id, on both local transports; the application sees neither envelope.
    #[test]
    fn request_ids_travel_with_each_request_and_its_answer() {
        for transport in [Transport::Shm, Transport::Uds] {
            let (mut client, mut server) = pair(transport, 64, 4, true);
            assert_eq!(
                client.max_message(),
                48,
                "{transport:?}: 16 bytes go to the envelope"
            );
            assert!(matches!(
                client.send(&[0; 49]),
                Err(LaneError::TooLarge { len: 49, max: 48 })
            ));
            let first = RequestId { id: 7, attempt: 2 };
            let second = RequestId { id: 9, attempt: 0 };
            client.send_as(Some(first), b"one").unwrap();
            client.send_as(Some(second), b"two").unwrap();
            let mut got = Vec::new();
            assert!(server.recv(&mut got).unwrap());
            assert_eq!(got, b"one");
            assert_eq!(server.request_id(), Some(first));
            server.send(b"ONE").unwrap();
            assert_eq!(server.request_id(), None, "{transport:?}: answered");
            assert!(
                server
                    .respond_with(<[u8]>::len, |r, out| out
                        .copy_from_slice(&r.to_ascii_uppercase()))
                    .unwrap()
            );
            let far = Instant::now() + Duration::from_secs(5);
            assert_eq!(client.recv_answer(&mut got, far).unwrap(), Some(first));
            assert_eq!(got, b"ONE");
            assert_eq!(client.recv_answer(&mut got, far).unwrap(), Some(second));
            assert_eq!(got, b"TWO");
            // A service has nothing to say on such a lane but answers.
            let unasked = server.send(b"news").unwrap_err().to_string();
            assert!(
                unasked.contains("no request is waiting"),
                "{transport:?}: {unasked}"
            );
        }
    }

    /// An answer to a request the client never sent breaks the lane's protocol.
    #[test]
    fn an_answer_to_no_request_is_refused() {
        let (mut client, mut server) = pair(Transport::Uds, 64, 4, true);
        client
            .send_as(Some(RequestId { id: 1, attempt: 0 }), b"x")
            .unwrap();
        let mut got = Vec::new();
        assert!(server.recv(&mut got).unwrap());
        server
            .send_as(Some(RequestId { id: 2, attempt: 0 }), b"y")
            .unwrap();
        let far = Instant::now() + Duration::from_secs(5);
        let e = client.recv_answer(&mut got, far).unwrap_err().to_string();
        assert!(e.contains("request 2"), "{e}");
    }

    /// A receive with a deadline returns at the deadline; a shared-memory lane stays usable,
    /// a stream lane (which may hold part of a frame) is closed.
    #[test]
    fn a_receive_with_a_deadline_ends_at_it() {
        for transport in [Transport::Shm, Transport::Uds] {
            let (mut client, mut server) = pair(transport, 64, 4, false);
            let mut got = Vec::new();
            let start = Instant::now();
            let e = client
                .recv_until(&mut got, start + Duration::from_millis(30))
                .unwrap_err();
            let waited = start.elapsed();
            assert!(matches!(e, LaneError::TimedOut(_)), "{transport:?}: {e}");
            assert!(
                waited >= Duration::from_millis(30) && waited < Duration::from_secs(2),
                "{transport:?}: waited {waited:?}"
            );
            server.send(b"late").unwrap();
            let again = client.recv_until(&mut got, Instant::now() + Duration::from_secs(5));
            if transport == Transport::Shm {
                assert!(again.unwrap());
                assert_eq!(got, b"late");
            } else {
                assert!(matches!(again, Err(LaneError::Closed)), "{again:?}");
            }
        }
    }
}
