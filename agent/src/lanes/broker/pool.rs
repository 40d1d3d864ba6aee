//! Prepared lanes: the parts of a lane that do not depend on who opens it — the sealed memfd
//! with its rings initialized and mapped, and the transport's descriptors (eventfds and a
//! `SOCK_SEQPACKET` pair for shared memory, a stream pair for a Unix socket) — built ahead by a
//! background thread, so that an open takes one instead of making one (about 21 µs of system
//! calls on the open's path, measured). The thread runs under `SCHED_IDLE`: a refill at normal
//! priority competed with the very opens it served on two CPUs and made the tail worse.
//!
//! A quadrant's pool of a transport starts with its first open of that transport and is kept at
//! [`DEPTH`], but only within the quadrant's headroom: its open lanes and its prepared ones
//! together never exceed `max_lanes`, nor their memory `max_shm_bytes`. A prepared lane is
//! charged to the quadrant like any other once it is opened; if the pool is empty the open
//! builds its parts itself, as before. Stopping the broker (`quadrant down`) empties the pool.

use std::{
    collections::BTreeMap,
    io,
    os::fd::OwnedFd,
    sync::{
        Condvar, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use dataplane_common::Quadrant;

use crate::{
    config::LaneLimits,
    lanes::{
        Transport,
        os::{self, Mapping},
        ring::{self, Region},
    },
};

/// Prepared lanes kept per quadrant and transport.
pub const DEPTH: usize = 2;

/// The descriptors of a lane's transport, both ends'.
#[derive(Debug)]
pub(super) enum Ends {
    /// Each end's eventfd and its end of the socket pair (client's first).
    Shm {
        efd_client: OwnedFd,
        efd_server: OwnedFd,
        sock_client: OwnedFd,
        sock_server: OwnedFd,
    },
    /// The stream pair (client's end first).
    Uds {
        sock_client: OwnedFd,
        sock_server: OwnedFd,
    },
    /// Nothing besides the memory (the ends connect over TCP).
    Tcp,
}

/// A lane's parts, ready to be handed out.
#[derive(Debug)]
pub(super) struct Parts {
    pub memfd: OwnedFd,
    pub memory: Mapping,
    pub region: Region,
    /// Ring bytes per direction (0: statistics page only).
    pub ring_bytes: usize,
    pub ends: Ends,
}

impl Parts {
    /// Makes the parts of a `transport` lane whose messages are at most `max_message` bytes.
    pub(super) fn make(transport: Transport, max_message: usize) -> io::Result<Self> {
        let ring_bytes = if transport == Transport::Shm {
            ring::capacity_for(max_message)
        } else {
            0
        };
        let len = ring::mapping_len(ring_bytes);
        let memfd = os::sealed_memfd("quadrant-lane", len)?;
        let memory = Mapping::new(&memfd, len, true)?;
        // SAFETY: the mapping has exactly this length, is page-aligned and lives in the parts.
        let region = unsafe { Region::new(memory.as_ptr(), memory.len(), ring_bytes) }
            .map_err(io::Error::other)?;
        region.initialize();
        let ends = match transport {
            Transport::Shm => {
                let (sock_client, sock_server) = os::seqpacket_pair()?;
                Ends::Shm {
                    efd_client: os::eventfd()?,
                    efd_server: os::eventfd()?,
                    sock_client,
                    sock_server,
                }
            }
            Transport::Uds => {
                let (sock_client, sock_server) = os::stream_pair()?;
                Ends::Uds {
                    sock_client,
                    sock_server,
                }
            }
            Transport::Tcp => Ends::Tcp,
        };
        Ok(Self {
            memfd,
            memory,
            region,
            ring_bytes,
            ends,
        })
    }

    /// The memory a lane with these parts holds (what `max_shm_bytes` counts).
    pub(super) fn bytes(&self) -> u64 {
        ring::mapping_len(self.ring_bytes) as u64
    }
}

/// Whether a quadrant may hold one more prepared lane of `lane_bytes`: its open lanes (`open`:
/// count and bytes) and prepared ones (`pooled`) stay within `limits`, and fewer than
/// [`DEPTH`] of this kind (`of_kind`) are prepared.
#[must_use]
pub fn room_for_one(
    limits: &LaneLimits,
    open: (u32, u64),
    pooled: (u32, u64),
    of_kind: usize,
    lane_bytes: u64,
) -> bool {
    of_kind < DEPTH
        && u64::from(open.0) + u64::from(pooled.0) < u64::from(limits.max_lanes)
        && open.1 + pooled.1 + lane_bytes <= limits.max_shm_bytes
}

/// The prepared lanes, by opener quadrant and transport.
#[derive(Debug, Default)]
pub(super) struct Pool {
    parts: Mutex<BTreeMap<(Quadrant, Transport), Vec<Parts>>>,
    /// Signalled after an open asked for a prepared lane, when a lane closed, or the broker
    /// stops.
    changed: Condvar,
    stopped: AtomicBool,
    /// An open asked for a prepared lane since the filler was last woken for one.
    wanted: AtomicBool,
}

impl Pool {
    /// A prepared `transport` lane for `q`, if there is one; from now on the pool keeps some.
    /// `None` also when the filler holds the pool's lock: it runs at idle priority and may be
    /// preempted holding it, and an open must not wait for idle work. The filler is woken by
    /// [`Pool::refill`], which the open calls once its opener has the answer.
    pub(super) fn take(&self, q: Quadrant, transport: Transport) -> Option<Parts> {
        self.wanted.store(true, Ordering::Release);
        let mut parts = match self.parts.try_lock() {
            Ok(p) => p,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        parts.entry((q, transport)).or_default().pop()
    }

    /// Wakes the filler if an open asked the pool for a lane since the last call. The waker
    /// pays for a wake-up (a system call, and an interrupt when the filler's CPU is idle):
    /// an open does it after its answer, not on the way to it (taking a prepared lane measured
    /// p50 23 µs with the wake-up in it, 5 µs without, opens 5 ms apart).
    pub(super) fn refill(&self) {
        if self.wanted.swap(false, Ordering::AcqRel) {
            self.changed.notify_one();
        }
    }

    /// What `q` holds prepared: lanes and bytes, and of `transport`.
    pub(super) fn held(&self, q: Quadrant, transport: Transport) -> ((u32, u64), usize) {
        let parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all = (0u32, 0u64);
        for ((pq, _), list) in parts.iter() {
            if *pq == q {
                all.0 += u32::try_from(list.len()).unwrap_or(u32::MAX);
                all.1 += list.iter().map(Parts::bytes).sum::<u64>();
            }
        }
        (all, parts.get(&(q, transport)).map_or(0, Vec::len))
    }

    /// The quadrants and transports whose pools are kept.
    pub(super) fn kinds(&self) -> Vec<(Quadrant, Transport)> {
        self.parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect()
    }

    /// Adds prepared parts; `false` (and the parts dropped) once the broker stopped.
    #[must_use]
    pub(super) fn put(&self, q: Quadrant, transport: Transport, p: Parts) -> bool {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        if self.stopped.load(Ordering::Acquire) {
            return false;
        }
        parts.entry((q, transport)).or_default().push(p);
        true
    }

    /// Wakes the filler: headroom may have changed.
    pub(super) fn poke(&self) {
        self.changed.notify_one();
    }

    /// Waits until poked (or `timeout`); `false` once the broker stopped.
    pub(super) fn wait(&self, timeout: Duration) -> bool {
        let parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        if self.stopped.load(Ordering::Acquire) {
            return false;
        }
        let _unused = self
            .changed
            .wait_timeout(parts, timeout)
            .unwrap_or_else(PoisonError::into_inner);
        !self.stopped.load(Ordering::Acquire)
    }

    /// Stops refilling and drops every prepared lane.
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.changed.notify_all();
    }

    /// Holds the pool's lock, as the filler does while it counts or adds.
    #[cfg(test)]
    pub(super) fn lock_for_test(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<(Quadrant, Transport), Vec<Parts>>> {
        self.parts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Prepared lanes in all.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Vec::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_lanes: u32, max_shm_bytes: u64) -> LaneLimits {
        LaneLimits {
            max_lanes,
            max_shm_bytes,
            ..LaneLimits::default()
        }
    }

    #[test]
    fn the_pool_stays_within_the_quadrants_headroom() {
        let page = 4096;
        // Plenty of room: up to DEPTH of a kind.
        assert!(room_for_one(&limits(64, 1 << 30), (0, 0), (0, 0), 0, page));
        assert!(room_for_one(
            &limits(64, 1 << 30),
            (0, 0),
            (1, page),
            1,
            page
        ));
        assert!(!room_for_one(
            &limits(64, 1 << 30),
            (0, 0),
            (2, 2 * page),
            DEPTH,
            page
        ));
        // Open and prepared lanes together within max_lanes.
        assert!(room_for_one(&limits(3, 1 << 30), (2, 0), (0, 0), 0, page));
        assert!(!room_for_one(
            &limits(3, 1 << 30),
            (2, 0),
            (1, page),
            0,
            page
        ));
        assert!(!room_for_one(&limits(2, 1 << 30), (2, 0), (0, 0), 0, page));
        // And their memory within max_shm_bytes: a 10 MiB quadrant holding one 8 MiB lane open
        // prepares no second one, but a one-page lane still fits.
        let shm = 8 << 20;
        assert!(!room_for_one(
            &limits(64, 10 << 20),
            (1, shm),
            (0, 0),
            0,
            shm
        ));
        assert!(room_for_one(
            &limits(64, 10 << 20),
            (1, shm),
            (0, 0),
            0,
            page
        ));
        assert!(!room_for_one(&limits(64, shm), (0, 0), (1, shm), 0, page));
    }

    #[test]
    fn the_filler_is_woken_once_for_the_opens_that_asked_since_it_last_was() {
        let pool = Pool::default();
        pool.refill();
        assert!(!pool.wanted.load(Ordering::Acquire), "nothing asked yet");
        // Even an ask that finds nothing prepared is one: it starts the kind.
        assert!(pool.take(Quadrant::Dx, Transport::Uds).is_none());
        assert!(pool.take(Quadrant::Dx, Transport::Shm).is_none());
        assert!(pool.wanted.load(Ordering::Acquire));
        pool.refill();
        assert!(
            !pool.wanted.load(Ordering::Acquire),
            "one wake-up answers both asks"
        );
    }

    #[test]
    fn taking_starts_a_kind_and_stopping_empties_the_pool() {
        let pool = Pool::default();
        assert!(pool.take(Quadrant::Dx, Transport::Uds).is_none());
        assert_eq!(pool.kinds(), vec![(Quadrant::Dx, Transport::Uds)]);
        for _ in 0..DEPTH {
            assert!(pool.put(
                Quadrant::Dx,
                Transport::Uds,
                Parts::make(Transport::Uds, 1024).unwrap(),
            ));
        }
        let ((lanes, bytes), of_kind) = pool.held(Quadrant::Dx, Transport::Uds);
        assert_eq!((lanes, bytes, of_kind), (2, 2 * 4096, DEPTH));
        assert!(pool.take(Quadrant::Dx, Transport::Uds).is_some());
        assert_eq!(pool.len(), DEPTH - 1);
        pool.stop();
        assert_eq!(pool.len(), 0);
        assert!(!pool.put(
            Quadrant::Dx,
            Transport::Uds,
            Parts::make(Transport::Uds, 1024).unwrap(),
        ));
        assert_eq!(pool.len(), 0, "nothing is added once stopped");
        assert!(!pool.wait(Duration::from_millis(1)));
    }
}
