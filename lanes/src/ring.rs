//! The shared-memory layout of a lane and its two single-producer, single-consumer byte rings.
//!
//! ```text
//! page 0   magic | per-side statistics (side 0 = client, 1 = server) | ring control blocks
//! page 1…  ring 0 data (client → server), `cap` bytes
//!          ring 1 data (server → client), `cap` bytes
//! ```
//!
//! Positions are free-running `u64` byte counts; the index into the data is `pos & (cap - 1)`.
//! Frames ([`super::frame`]) are 8-byte aligned and never wrap: a frame that does not fit before
//! the end of the ring is preceded by a `Pad` frame up to the end. A frame's length is therefore
//! at most `cap / 2`, which guarantees it always fits once the ring drains.
//!
//! Each side keeps its own copy of the position it writes (the producer's tail, the consumer's
//! head) and only reads the other one from shared memory, checking it before use: the peer is
//! another process and may be buggy or hostile. Every offset is bounds-checked against `cap`, so a
//! corrupted control block or frame header produces a [`RingError`], never an access outside the
//! mapping. (The peer can still scribble over payload bytes it is producing while they are read;
//! that changes the message it sent, nothing else.)

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use super::frame::{FrameError, HEADER_LEN, Header, Kind};

/// Where a producer that finds its ring empty starts again from the beginning: messages sent
/// one at a time stay within the ring's first pages.
pub const HOT_WINDOW: usize = 16 * 1024;

/// Size of the header page.
pub const PAGE: usize = 4096;
/// Layout identifier at offset 0 ("QLANE001").
pub const MAGIC: u64 = u64::from_le_bytes(*b"QLANE001");
const STATS_OFFSET: usize = 64;
const STATS_STRIDE: usize = 128;
/// Within a side's statistics block, after the [`Stat`] fields: the CPU the side runs the lane
/// on, plus one (0: asleep in the lane, or not said).
const RUNNING_CPU: usize = 8 * 8;
/// Within a side's statistics block: what the side understands ([`FEATURE_DOORBELL`],
/// [`FEATURE_LONG_PAD`]); 0 for an end built before the features existed.
const FEATURES: usize = 9 * 8;

/// Within a side's statistics block: the side's bell, a futex word its peer bumps (and wakes)
/// to wake it ([`FEATURE_BELL`]).
const BELL: usize = 10 * 8;
/// Within a side's statistics block: where the side sleeps ([`SLEEPS_ON_BELL`],
/// [`SLEEPS_ON_SOCKET`]; 0 while it does not).
const SLEEPING: usize = 10 * 8 + 4;
/// Within a side's statistics block: set (by the broker) once the side is gone — its process
/// ended, or the lane was cut — so that a peer woken on its bell finds out without a syscall.
const GONE: usize = 11 * 8;

/// This end sleeps on the lane's socket pair too: ring it there (a synchronous wake-up) rather
/// than through its eventfd.
pub const FEATURE_DOORBELL: u64 = 1;
/// This end sleeps on its bell first ([`Region::bell`]): ring it there while it does.
pub const FEATURE_BELL: u64 = 4;
/// [`Region::sleeping`]: the side waits on its bell.
pub const SLEEPS_ON_BELL: u32 = 1;
/// [`Region::sleeping`]: the side waits on the lane's socket pair.
pub const SLEEPS_ON_SOCKET: u32 = 2;
/// This end, as consumer, takes padding up to the end of the ring from anywhere: its producer
/// may restart an empty ring at offset 0 ([`HOT_WINDOW`]).
pub const FEATURE_LONG_PAD: u64 = 2;
/// Offset of ring 0's control block in the header page.
pub const CTRL_OFFSET: usize = 1024;
/// Distance between the two control blocks.
pub const CTRL_STRIDE: usize = 1024;
// Within a control block: the producer's line, the consumer's line, the wait flags.
/// The producer's position within a control block.
pub const TAIL: usize = 0;
const TAIL_MSGS: usize = 8;
/// The consumer's position within a control block.
pub const HEAD: usize = 128;
const HEAD_MSGS: usize = 136;
const CONSUMER_WAITING: usize = 256;
const PRODUCER_WAITING: usize = 384;

/// Where the requesting side's SLI block starts in the header page: [`Sli`] fields, then
/// [`LATENCY_BUCKETS`] round-trip counters (see [`latency_bucket`]).
const SLI_OFFSET: usize = 3072;
/// Round-trip histogram buckets of the SLI block (followed by the sum of the round trips).
pub const LATENCY_BUCKETS: usize = 64;
/// Round trips below this many nanoseconds count in bucket 0.
const LATENCY_FLOOR_NS: u64 = 1024;

/// Fields of the client side's SLI block (each a `u64`): what `Lane::request` records for the
/// agent's service-level indicators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Sli {
    /// The latency threshold of the service's latency SLO, ns (0: none), written by the broker
    /// before the lane is handed out.
    ThresholdNs = 0,
    /// Requests made (answered or not).
    Requests = 1,
    /// Requests answered within [`Sli::ThresholdNs`] (all answered ones when it is 0).
    WithinThreshold = 2,
    /// Requests that failed: the peer went away, closed the lane or broke it before answering.
    Failed = 3,
}

/// Fields before the histogram in the SLI block.
const SLI_FIELDS: usize = 4;

/// The histogram bucket of a round trip of `ns`: log-linear, four buckets per power of two from
/// 1,024 ns (bucket 0: below it; the last bucket: everything from about 58 ms on).
#[must_use]
pub const fn latency_bucket(ns: u64) -> usize {
    if ns < LATENCY_FLOOR_NS {
        return 0;
    }
    let log = 63 - ns.leading_zeros() as usize;
    let sub = ((ns >> (log - 2)) & 3) as usize;
    let idx = 1 + (log - 10) * 4 + sub;
    if idx >= LATENCY_BUCKETS {
        LATENCY_BUCKETS - 1
    } else {
        idx
    }
}

/// The upper bound (exclusive) of bucket `idx`, ns (`u64::MAX` for the last).
#[must_use]
pub const fn latency_bucket_upper_ns(idx: usize) -> u64 {
    if idx == 0 {
        return LATENCY_FLOOR_NS;
    }
    if idx >= LATENCY_BUCKETS - 1 {
        return u64::MAX;
    }
    let octave = (idx - 1) / 4;
    let sub = ((idx - 1) % 4) as u64;
    (LATENCY_FLOOR_NS << octave) / 4 * (5 + sub)
}

/// Statistics fields of one side (each a `u64` slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Stat {
    /// Payload bytes sent.
    BytesSent = 0,
    /// Messages sent.
    MessagesSent = 1,
    /// Payload bytes received.
    BytesReceived = 2,
    /// Messages received.
    MessagesReceived = 3,
    /// Exponentially weighted round-trip time of `request` calls, in nanoseconds.
    RttEwmaNs = 4,
    /// Number of round trips measured.
    RttSamples = 5,
    /// Non-zero once the side closed the lane.
    Closed = 6,
}

/// Bytes a lane's mapping needs for rings of `cap` bytes each (`cap` 0: statistics only).
#[must_use]
pub fn mapping_len(cap: usize) -> usize {
    PAGE + 2 * cap
}

/// The ring capacity (a power of two) that carries messages of `max_message` bytes.
#[must_use]
pub fn capacity_for(max_message: usize) -> usize {
    (2 * align8(HEADER_LEN + max_message)).next_power_of_two()
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// Why a ring operation failed. Each is a reason to close the lane.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The mapping is not a lane layout of the expected size.
    #[error("shared memory is not a lane layout: {0}")]
    Layout(String),
    /// A control block value the peer wrote is impossible.
    #[error("peer corrupted the ring: {0}")]
    Corrupt(String),
    /// A frame header the peer wrote is malformed.
    #[error("malformed frame header in the ring: {0}")]
    Frame(#[from] FrameError),
    /// The message is larger than the lane carries.
    #[error("message of {len} bytes exceeds the lane's limit of {max} bytes")]
    TooLarge {
        /// Message length.
        len: usize,
        /// The lane's maximum.
        max: usize,
    },
}

/// A mapped lane layout: base pointer and length. The memory must stay mapped for as long as
/// anything derived from the region is used.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    base: *mut u8,
    cap: usize,
}

// SAFETY: the region is shared memory accessed through atomics and bounds-checked copies; the
// raw pointer is only an address.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Wraps `len` bytes at `base`, laid out for rings of `cap` bytes.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes, aligned to 64 bytes, for the
    /// lifetime of the returned value and everything made from it.
    pub unsafe fn new(base: *mut u8, len: usize, cap: usize) -> Result<Self, RingError> {
        if cap != 0 && (!cap.is_power_of_two() || cap < 64) {
            return Err(RingError::Layout(format!(
                "ring capacity {cap} is not a power of two of at least 64"
            )));
        }
        if len != mapping_len(cap) {
            return Err(RingError::Layout(format!(
                "mapping is {len} bytes, rings of {cap} bytes need {}",
                mapping_len(cap)
            )));
        }
        if base.align_offset(64) != 0 {
            return Err(RingError::Layout("mapping is not 64-byte aligned".into()));
        }
        Ok(Self { base, cap })
    }

    /// Writes the magic (the creator does this once; the rest of a fresh mapping is zero).
    pub fn initialize(&self) {
        self.u64_at(0).store(MAGIC, Ordering::Release);
    }

    /// Checks the magic.
    pub fn check_magic(&self) -> Result<(), RingError> {
        let m = self.u64_at(0).load(Ordering::Acquire);
        if m == MAGIC {
            Ok(())
        } else {
            Err(RingError::Layout(format!(
                "magic is {m:#x}, expected {MAGIC:#x}"
            )))
        }
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(offset + 8 <= PAGE && offset.is_multiple_of(8));
        // SAFETY: in bounds (the header page is always mapped) and aligned (base is 64-aligned,
        // checked in `new`, and the offset a multiple of 8).
        #[expect(clippy::cast_ptr_alignment, reason = "aligned: see the safety comment")]
        unsafe {
            &*self.base.add(offset).cast::<AtomicU64>()
        }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(offset + 4 <= PAGE && offset.is_multiple_of(4));
        // SAFETY: as in `u64_at`.
        #[expect(clippy::cast_ptr_alignment, reason = "aligned: see the safety comment")]
        unsafe {
            &*self.base.add(offset).cast::<AtomicU32>()
        }
    }

    /// The 64-bit word at `offset` in side `side`'s statistics block.
    fn side_u64(&self, side: usize, offset: usize) -> &AtomicU64 {
        assert!(side < 2);
        self.u64_at(STATS_OFFSET + side * STATS_STRIDE + offset)
    }

    /// The 32-bit word at `offset` in side `side`'s statistics block.
    fn side_u32(&self, side: usize, offset: usize) -> &AtomicU32 {
        assert!(side < 2);
        self.u32_at(STATS_OFFSET + side * STATS_STRIDE + offset)
    }

    /// One statistics slot of `side` (0 client, 1 server).
    ///
    /// # Panics
    /// If `side` is not 0 or 1.
    #[must_use]
    pub fn stat(&self, side: usize, stat: Stat) -> &AtomicU64 {
        self.side_u64(side, stat as usize * 8)
    }

    /// Side `side`'s word saying which CPU it runs the lane on (the CPU number + 1), or 0 while
    /// it sleeps in the lane. Written by that side only; the peer reads it to decide whether
    /// polling for it can succeed.
    ///
    /// # Panics
    /// If `side` is not 0 or 1.
    #[must_use]
    pub fn running_cpu(&self, side: usize) -> &AtomicU64 {
        self.side_u64(side, RUNNING_CPU)
    }

    /// Side `side`'s feature word ([`FEATURE_DOORBELL`], [`FEATURE_LONG_PAD`]), written by that
    /// side when it takes its end of the lane.
    ///
    /// # Panics
    /// If `side` is not 0 or 1.
    #[must_use]
    pub fn features(&self, side: usize) -> &AtomicU64 {
        self.side_u64(side, FEATURES)
    }

    /// Side `side`'s bell: a futex word the peer bumps, then wakes, to wake the side while it
    /// sleeps on it ([`FEATURE_BELL`]).
    ///
    /// # Panics
    /// If `side` is not 0 or 1.
    #[must_use]
    pub fn bell(&self, side: usize) -> &AtomicU32 {
        self.side_u32(side, BELL)
    }

    /// Where side `side` sleeps ([`SLEEPS_ON_BELL`], [`SLEEPS_ON_SOCKET`]; 0: it does not),
    /// written by that side only.
    ///
    /// # Panics
    /// If `side` is not 0 or 1.
    #[must_use]
    pub fn sleeping(&self, side: usize) -> &AtomicU32 {
        self.side_u32(side, SLEEPING)
    }

    /// Non-zero once side `side` is gone (its process ended, or the lane was cut), written by
    /// the broker only.
    ///
    /// # Panics
    /// If `side` is not 0 or 1.
    #[must_use]
    pub fn gone(&self, side: usize) -> &AtomicU64 {
        self.side_u64(side, GONE)
    }

    /// A field of the client side's SLI block.
    #[must_use]
    pub fn sli(&self, field: Sli) -> &AtomicU64 {
        self.u64_at(SLI_OFFSET + field as usize * 8)
    }

    /// Round-trip counter `idx` (below [`LATENCY_BUCKETS`]) of the SLI block.
    ///
    /// # Panics
    /// If `idx` is not below [`LATENCY_BUCKETS`].
    #[must_use]
    pub fn latency_count(&self, idx: usize) -> &AtomicU64 {
        assert!(idx < LATENCY_BUCKETS);
        self.u64_at(SLI_OFFSET + (SLI_FIELDS + idx) * 8)
    }

    /// The sum of the answered round trips of the SLI block, ns (after the histogram; a
    /// client library older than this field leaves it 0).
    #[must_use]
    pub fn latency_sum_ns(&self) -> &AtomicU64 {
        self.u64_at(SLI_OFFSET + (SLI_FIELDS + LATENCY_BUCKETS) * 8)
    }

    fn ctrl(ring: usize, field: usize) -> usize {
        CTRL_OFFSET + ring * CTRL_STRIDE + field
    }

    fn data(&self, ring: usize) -> *mut u8 {
        // SAFETY: PAGE + ring * cap is within the mapping (checked in `new`).
        unsafe { self.base.add(PAGE + ring * self.cap) }
    }

    /// The producer of ring `ring` (0: client → server, 1: server → client).
    ///
    /// # Panics
    /// If `ring` is not 0 or 1, or the layout has no rings.
    #[must_use]
    pub fn producer(&self, ring: usize, max_message: usize, max_in_flight: u64) -> Producer {
        assert!(ring < 2 && self.cap > 0);
        Producer {
            region: *self,
            ring,
            tail: self
                .u64_at(Region::ctrl(ring, TAIL))
                .load(Ordering::Acquire),
            tail_msgs: self
                .u64_at(Region::ctrl(ring, TAIL_MSGS))
                .load(Ordering::Acquire),
            max_message: max_message.min(self.cap / 2 - HEADER_LEN),
            max_in_flight,
            seen_head: 0,
            seen_head_msgs: 0,
        }
    }

    /// The consumer of ring `ring`.
    ///
    /// # Panics
    /// As [`Region::producer`].
    #[must_use]
    pub fn consumer(&self, ring: usize, max_message: usize) -> Consumer {
        assert!(ring < 2 && self.cap > 0);
        Consumer {
            region: *self,
            ring,
            head: self
                .u64_at(Region::ctrl(ring, HEAD))
                .load(Ordering::Acquire),
            head_msgs: self
                .u64_at(Region::ctrl(ring, HEAD_MSGS))
                .load(Ordering::Acquire),
            max_message: max_message.min(self.cap / 2 - HEADER_LEN),
        }
    }
}

/// Writes frames into one ring.
#[derive(Debug)]
pub struct Producer {
    region: Region,
    ring: usize,
    tail: u64,
    tail_msgs: u64,
    max_message: usize,
    max_in_flight: u64,
    // The reader's positions at the last attempt: a sleeping producer waits for them to move.
    seen_head: u64,
    seen_head_msgs: u64,
}

/// The outcome of a send attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Written; `wake` says the consumer sleeps and must be woken.
    Done {
        /// Signal the consumer.
        wake: bool,
    },
    /// No room (bytes or in-flight messages); nothing was written.
    Full,
}

impl Producer {
    /// Largest message this producer sends.
    #[must_use]
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Writes one frame of `kind` with `len` payload bytes filled in place by `fill`, if there is
    /// room. `fill` sees exactly `len` bytes.
    pub fn try_send_with(
        &mut self,
        kind: Kind,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<Sent, RingError> {
        if len > self.max_message {
            return Err(RingError::TooLarge {
                len,
                max: self.max_message,
            });
        }
        let r = &self.region;
        let cap = r.cap as u64;
        let head = r
            .u64_at(Region::ctrl(self.ring, HEAD))
            .load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > cap || !used.is_multiple_of(8) {
            return Err(RingError::Corrupt(format!(
                "reader position {head} is not within the {cap} bytes before the writer's {}",
                self.tail
            )));
        }
        let head_msgs = r
            .u64_at(Region::ctrl(self.ring, HEAD_MSGS))
            .load(Ordering::Acquire);
        let in_flight = self.tail_msgs.wrapping_sub(head_msgs);
        self.seen_head = head;
        self.seen_head_msgs = head_msgs;
        if in_flight > self.tail_msgs {
            return Err(RingError::Corrupt(format!(
                "reader consumed {head_msgs} messages, more than the {} written",
                self.tail_msgs
            )));
        }
        if in_flight >= self.max_in_flight {
            return Ok(Sent::Full);
        }
        let need = align8(HEADER_LEN + len);
        #[expect(clippy::cast_possible_truncation, reason = "cap is a usize")]
        let idx = (self.tail & (cap - 1)) as usize;
        let contiguous = r.cap - idx;
        // A frame that does not fit before the end goes to the start; so does one written into
        // an empty ring past the hot window, which keeps paced traffic on memory (pages, cache
        // lines) both ends touched before instead of walking the whole ring and faulting in a
        // page every few messages.
        // Ring 0's consumer is side 1 (the server), ring 1's side 0.
        let restart = used == 0
            && idx >= HOT_WINDOW
            && need <= idx
            && r.features(1 - self.ring).load(Ordering::Relaxed) & FEATURE_LONG_PAD != 0;
        let pad = if need > contiguous || restart {
            contiguous
        } else {
            0
        };
        if (cap - used) < (pad + need) as u64 {
            return Ok(Sent::Full);
        }
        let data = r.data(self.ring);
        let mut at = idx;
        if pad > 0 {
            #[expect(clippy::cast_possible_truncation, reason = "pad ≤ cap/2 < 4 GiB")]
            let h = Header {
                len: (pad - HEADER_LEN) as u32,
                kind: Kind::Pad,
            };
            // SAFETY: idx + 8 ≤ cap (idx is 8-aligned, cap a multiple of 8).
            unsafe { std::ptr::copy_nonoverlapping(h.encode().as_ptr(), data.add(at), HEADER_LEN) };
            at = 0;
        }
        #[expect(clippy::cast_possible_truncation, reason = "len ≤ max_message < 4 GiB")]
        let h = Header {
            len: len as u32,
            kind,
        };
        // SAFETY: at + need ≤ cap: either need ≤ contiguous, or at = 0 and need ≤ cap / 2.
        unsafe {
            std::ptr::copy_nonoverlapping(h.encode().as_ptr(), data.add(at), HEADER_LEN);
            fill(std::slice::from_raw_parts_mut(
                data.add(at + HEADER_LEN),
                len,
            ));
        }
        self.tail += (pad + need) as u64;
        self.tail_msgs += 1;
        r.u64_at(Region::ctrl(self.ring, TAIL_MSGS))
            .store(self.tail_msgs, Ordering::Release);
        r.u64_at(Region::ctrl(self.ring, TAIL))
            .store(self.tail, Ordering::Release);
        fence(Ordering::SeqCst);
        let wake = r
            .u32_at(Region::ctrl(self.ring, CONSUMER_WAITING))
            .load(Ordering::Relaxed)
            != 0;
        Ok(Sent::Done { wake })
    }

    /// Announces that the producer is about to sleep until there is room; returns `false` if
    /// room appeared meanwhile (then it must not sleep).
    #[must_use]
    pub fn prepare_wait(&self) -> bool {
        let r = &self.region;
        r.u32_at(Region::ctrl(self.ring, PRODUCER_WAITING))
            .store(1, Ordering::SeqCst);
        let head = r
            .u64_at(Region::ctrl(self.ring, HEAD))
            .load(Ordering::SeqCst);
        let head_msgs = r
            .u64_at(Region::ctrl(self.ring, HEAD_MSGS))
            .load(Ordering::SeqCst);
        // Sleep only if the reader has made no progress since the failed attempt; any change is
        // worth another try.
        let still_full = head == self.seen_head && head_msgs == self.seen_head_msgs;
        if !still_full {
            self.done_waiting();
        }
        still_full
    }

    /// Clears the waiting flag.
    pub fn done_waiting(&self) {
        let r = &self.region;
        r.u32_at(Region::ctrl(self.ring, PRODUCER_WAITING))
            .store(0, Ordering::SeqCst);
    }
}

/// Reads frames from one ring.
#[derive(Debug)]
pub struct Consumer {
    region: Region,
    ring: usize,
    head: u64,
    head_msgs: u64,
    max_message: usize,
}

/// What a receive attempt found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received<R> {
    /// A data frame, handed to the reader; `wake` says the producer sleeps waiting for room.
    Data {
        /// The reader's result.
        value: R,
        /// Signal the producer.
        wake: bool,
    },
    /// The producer closed the lane.
    Closed,
    /// Nothing to read.
    Empty,
}

impl Consumer {
    /// Reads one frame in place if one is there: `read` sees the payload in the ring (no copy),
    /// then the space is released.
    pub fn try_recv_with<R>(
        &mut self,
        read: impl FnOnce(&[u8]) -> R,
    ) -> Result<Received<R>, RingError> {
        let r = self.region;
        let cap = r.cap as u64;
        loop {
            let tail = r
                .u64_at(Region::ctrl(self.ring, TAIL))
                .load(Ordering::Acquire);
            let avail = tail.wrapping_sub(self.head);
            if avail > cap || !avail.is_multiple_of(8) {
                return Err(RingError::Corrupt(format!(
                    "writer position {tail} is not within the {cap} bytes after the reader's {}",
                    self.head
                )));
            }
            if avail == 0 {
                return Ok(Received::Empty);
            }
            #[expect(clippy::cast_possible_truncation, reason = "cap is a usize")]
            let idx = (self.head & (cap - 1)) as usize;
            let contiguous = r.cap - idx;
            let data = r.data(self.ring);
            let mut raw = [0u8; HEADER_LEN];
            // SAFETY: idx + 8 ≤ cap. Copied once: the header is checked and used from this copy.
            unsafe { std::ptr::copy_nonoverlapping(data.add(idx), raw.as_mut_ptr(), HEADER_LEN) };
            // Padding may reach from anywhere to the end of the ring; anything else is a message.
            #[expect(clippy::cast_possible_truncation, reason = "cap < 4 GiB")]
            let header = Header::decode(&raw, (r.cap - HEADER_LEN) as u32)?;
            if header.kind != Kind::Pad && header.len as usize > self.max_message {
                #[expect(clippy::cast_possible_truncation, reason = "max_message < cap / 2")]
                return Err(FrameError::TooLong {
                    len: header.len,
                    max: self.max_message as u32,
                }
                .into());
            }
            let need = align8(HEADER_LEN + header.len as usize);
            if header.kind == Kind::Pad {
                if HEADER_LEN + header.len as usize != contiguous || (contiguous as u64) > avail {
                    return Err(RingError::Corrupt(format!(
                        "padding of {} bytes at offset {idx} does not end at the ring's end",
                        header.len
                    )));
                }
                self.release(contiguous, false);
                continue;
            }
            if need as u64 > avail {
                return Err(RingError::Corrupt(format!(
                    "frame of {} bytes at offset {idx} runs past the {avail} bytes written",
                    header.len
                )));
            }
            if need > contiguous {
                return Err(RingError::Corrupt(format!(
                    "frame of {} bytes at offset {idx} wraps around the ring",
                    header.len
                )));
            }
            match header.kind {
                Kind::Data => {}
                Kind::Close => {
                    self.release(need, true);
                    return Ok(Received::Closed);
                }
                other => {
                    return Err(RingError::Corrupt(format!(
                        "frame kind {other:?} does not belong in a ring"
                    )));
                }
            }
            // SAFETY: idx + need ≤ cap (checked above).
            let payload = unsafe {
                std::slice::from_raw_parts(data.add(idx + HEADER_LEN), header.len as usize)
            };
            let value = read(payload);
            let wake = self.release(need, true);
            return Ok(Received::Data { value, wake });
        }
    }

    /// Bytes consumed so far (a free-running position).
    #[must_use]
    pub fn head_position(&self) -> u64 {
        self.head
    }

    fn release(&mut self, bytes: usize, message: bool) -> bool {
        let r = &self.region;
        self.head += bytes as u64;
        if message {
            self.head_msgs += 1;
            r.u64_at(Region::ctrl(self.ring, HEAD_MSGS))
                .store(self.head_msgs, Ordering::Release);
        }
        r.u64_at(Region::ctrl(self.ring, HEAD))
            .store(self.head, Ordering::Release);
        fence(Ordering::SeqCst);
        r.u32_at(Region::ctrl(self.ring, PRODUCER_WAITING))
            .load(Ordering::Relaxed)
            != 0
    }

    /// Whether this ring's producer waits for room (read after the caller's own marks).
    #[must_use]
    pub fn producer_waiting(&self) -> bool {
        self.region
            .u32_at(Region::ctrl(self.ring, PRODUCER_WAITING))
            .load(Ordering::SeqCst)
            != 0
    }

    /// Announces that the consumer is about to sleep; returns `false` if data arrived meanwhile
    /// (then it must not sleep).
    #[must_use]
    pub fn prepare_wait(&self) -> bool {
        let r = &self.region;
        r.u32_at(Region::ctrl(self.ring, CONSUMER_WAITING))
            .store(1, Ordering::SeqCst);
        let tail = r
            .u64_at(Region::ctrl(self.ring, TAIL))
            .load(Ordering::SeqCst);
        if tail == self.head {
            true
        } else {
            self.done_waiting();
            false
        }
    }

    /// Clears the waiting flag.
    pub fn done_waiting(&self) {
        let r = &self.region;
        r.u32_at(Region::ctrl(self.ring, CONSUMER_WAITING))
            .store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn latency_buckets_are_log_linear_and_bounded() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1023), 0);
        assert_eq!(latency_bucket(1024), 1);
        assert_eq!(latency_bucket(1279), 1);
        assert_eq!(latency_bucket(1280), 2);
        assert_eq!(latency_bucket(2048), 5);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
        let mut last = 0;
        for idx in 0..LATENCY_BUCKETS {
            let upper = latency_bucket_upper_ns(idx);
            assert!(upper > last, "bucket {idx}");
            if upper != u64::MAX {
                assert_eq!(latency_bucket(upper - 1), idx, "bucket {idx} upper {upper}");
                assert_eq!(latency_bucket(upper), idx + 1, "bucket {idx} upper {upper}");
            }
            last = upper;
        }
    }

    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    pub(crate) struct Line([u8; 64]);

    /// A 64-byte aligned heap mapping standing in for shared memory.
    pub(crate) struct Heap {
        words: Vec<Line>,
        pub(crate) region: Region,
    }

    impl Heap {
        pub(crate) fn new(cap: usize) -> Self {
            let len = mapping_len(cap);
            let mut words = vec![Line([0; 64]); len / 64];
            // SAFETY: the vector holds `len` bytes, 64-aligned, and lives as long as `Heap`.
            let region = unsafe { Region::new(words.as_mut_ptr().cast(), len, cap) }.unwrap();
            region.initialize();
            Self { words, region }
        }

        pub(crate) fn poke(&mut self, offset: usize, bytes: &[u8]) {
            let all: &mut [u8] = bytemuck_bytes(&mut self.words);
            all[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
    }

    fn bytemuck_bytes(words: &mut [Line]) -> &mut [u8] {
        // SAFETY: plain integers, any byte pattern is valid; length in bytes is 64 × words.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 64) }
    }

    fn send(p: &mut Producer, msg: &[u8]) -> Result<Sent, RingError> {
        p.try_send_with(Kind::Data, msg.len(), |b| b.copy_from_slice(msg))
    }

    fn recv(c: &mut Consumer) -> Result<Received<Vec<u8>>, RingError> {
        c.try_recv_with(<[u8]>::to_vec)
    }

    #[test]
    fn capacity_fits_the_largest_message() {
        assert_eq!(capacity_for(1 << 20), 4 << 20);
        assert_eq!(capacity_for(64), 256);
        let heap = Heap::new(capacity_for(1000));
        let mut p = heap.region.producer(0, 1000, 8);
        let mut c = heap.region.consumer(0, 1000);
        for round in 0..10u8 {
            let msg = vec![round; 1000];
            assert_eq!(send(&mut p, &msg), Ok(Sent::Done { wake: false }));
            assert_eq!(
                recv(&mut c),
                Ok(Received::Data {
                    value: msg,
                    wake: false
                })
            );
        }
        assert!(matches!(
            send(&mut p, &[0; 1001]),
            Err(RingError::TooLarge { .. })
        ));
    }

    #[test]
    fn messages_sent_one_at_a_time_stay_in_the_hot_window() {
        let cap = capacity_for(1 << 20);
        let heap = Heap::new(cap);
        let mut p = heap.region.producer(0, 1 << 20, 8);
        let mut c = heap.region.consumer(0, 1 << 20);
        // A consumer that does not take long padding keeps the producer walking the ring.
        for _ in 0..8 {
            assert!(matches!(send(&mut p, &[1; 4096]), Ok(Sent::Done { .. })));
            assert!(matches!(recv(&mut c), Ok(Received::Data { .. })));
        }
        assert!(usize::try_from(p.tail).unwrap() > HOT_WINDOW);
        heap.region
            .features(1)
            .store(FEATURE_LONG_PAD, Ordering::Relaxed);
        let mut furthest = 0;
        for (i, size) in [64usize, 4096, 65536, 1 << 20]
            .iter()
            .cycle()
            .take(400)
            .enumerate()
        {
            let msg = vec![u8::try_from(i % 251).unwrap(); *size];
            // Where this frame starts: the tail now, or 0 if it restarts.
            let start = usize::try_from(p.tail).unwrap() & (cap - 1);
            assert!(matches!(send(&mut p, &msg), Ok(Sent::Done { .. })));
            let end = usize::try_from(p.tail).unwrap() & (cap - 1);
            furthest = furthest.max(if end == 0 { cap } else { end });
            assert_eq!(
                recv(&mut c),
                Ok(Received::Data {
                    value: msg,
                    wake: false
                })
            );
            // The ring was empty: a frame that would start past the window restarts at 0 —
            // unless it is larger than what lies before it (it would overwrite the pad).
            let need = align8(HEADER_LEN + size);
            assert!(
                start < HOT_WINDOW || end == need || need > start,
                "frame {i} of {size} bytes written at {start}"
            );
        }
        // 400 messages up to 1 MiB stayed within the window, one 64 KiB and one 1 MiB frame.
        let bound = HOT_WINDOW + align8(HEADER_LEN + 65536) + align8(HEADER_LEN + (1 << 20));
        assert!(furthest <= bound, "{furthest} > {bound}");
        // While the consumer lags, the producer walks on as before.
        for _ in 0..4 {
            assert!(matches!(send(&mut p, &[7; 8192]), Ok(Sent::Done { .. })));
        }
        let tail = usize::try_from(p.tail).unwrap() & (cap - 1);
        assert!(tail > HOT_WINDOW, "{tail}");
    }

    #[test]
    fn in_flight_limit_is_backpressure() {
        let heap = Heap::new(4096);
        let mut p = heap.region.producer(1, 64, 2);
        let mut c = heap.region.consumer(1, 64);
        assert!(matches!(send(&mut p, b"a"), Ok(Sent::Done { .. })));
        assert!(matches!(send(&mut p, b"b"), Ok(Sent::Done { .. })));
        assert_eq!(send(&mut p, b"c"), Ok(Sent::Full));
        assert!(p.prepare_wait(), "still full: the producer may sleep");
        // The consumer takes one and sees the producer waiting.
        assert_eq!(
            recv(&mut c),
            Ok(Received::Data {
                value: b"a".to_vec(),
                wake: true
            })
        );
        p.done_waiting();
        assert!(matches!(send(&mut p, b"c"), Ok(Sent::Done { .. })));
    }

    #[test]
    fn sleeping_consumer_is_woken_and_close_is_seen() {
        let heap = Heap::new(256);
        let mut p = heap.region.producer(0, 64, 16);
        let mut c = heap.region.consumer(0, 64);
        assert_eq!(recv(&mut c), Ok(Received::Empty));
        assert!(c.prepare_wait());
        assert_eq!(send(&mut p, b"x"), Ok(Sent::Done { wake: true }));
        c.done_waiting();
        assert!(matches!(recv(&mut c), Ok(Received::Data { .. })));
        p.try_send_with(Kind::Close, 0, |_| {}).unwrap();
        assert_eq!(recv(&mut c), Ok(Received::Closed));
    }

    #[test]
    fn a_message_that_arrives_before_the_sleep_is_announced_cancels_it() {
        let heap = Heap::new(256);
        let mut p = heap.region.producer(0, 64, 16);
        let mut c = heap.region.consumer(0, 64);
        assert_eq!(recv(&mut c), Ok(Received::Empty));
        // The consumer decided to sleep, but before it says so the message lands: the producer
        // saw no sleeper and will not wake it, so the consumer must not sleep.
        assert_eq!(send(&mut p, b"x"), Ok(Sent::Done { wake: false }));
        assert!(!c.prepare_wait());
        assert!(matches!(recv(&mut c), Ok(Received::Data { .. })));
        // Nor the producer: room that appears before it says it sleeps cancels its sleep.
        let mut p = heap.region.producer(1, 64, 1);
        let mut c = heap.region.consumer(1, 64);
        assert!(matches!(send(&mut p, b"a"), Ok(Sent::Done { .. })));
        assert_eq!(send(&mut p, b"b"), Ok(Sent::Full));
        assert!(matches!(recv(&mut c), Ok(Received::Data { .. })));
        assert!(!p.prepare_wait());
    }

    #[test]
    fn corrupted_control_blocks_and_headers_are_refused() {
        // A tail beyond the ring.
        let mut heap = Heap::new(256);
        let mut c = heap.region.consumer(0, 64);
        heap.poke(CTRL_OFFSET + TAIL, &(1000u64).to_le_bytes());
        assert!(matches!(recv(&mut c), Err(RingError::Corrupt(_))));
        // A header announcing more than was written.
        let mut heap = Heap::new(256);
        let mut c = heap.region.consumer(0, 64);
        heap.poke(CTRL_OFFSET + TAIL, &8u64.to_le_bytes());
        heap.poke(PAGE, &Header::data(40).encode());
        assert!(matches!(recv(&mut c), Err(RingError::Corrupt(_))));
        // A header over the lane's limit.
        heap.poke(CTRL_OFFSET + TAIL, &256u64.to_le_bytes());
        heap.poke(PAGE, &Header::data(100).encode());
        assert!(matches!(
            recv(&mut c),
            Err(RingError::Frame(FrameError::TooLong { .. }))
        ));
        // A frame crossing the end of the ring.
        let mut heap = Heap::new(256);
        let mut c = heap.region.consumer(0, 120);
        for (pos, byte) in [(CTRL_OFFSET + HEAD, 200u64), (CTRL_OFFSET + TAIL, 328)] {
            heap.poke(pos, &byte.to_le_bytes());
        }
        let mut c2 = heap.region.consumer(0, 120);
        heap.poke(PAGE + 200, &Header::data(60).encode());
        assert!(matches!(recv(&mut c2), Err(RingError::Corrupt(m)) if m.contains("wraps")));
        drop(c.try_recv_with(|_| ()));
        // A reader position ahead of the writer, seen by the producer.
        let mut heap = Heap::new(256);
        let mut p = heap.region.producer(0, 64, 16);
        heap.poke(CTRL_OFFSET + HEAD, &64u64.to_le_bytes());
        assert!(matches!(send(&mut p, b"x"), Err(RingError::Corrupt(_))));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Send(usize),
        Recv,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![(0usize..=120).prop_map(Op::Send), Just(Op::Recv)]
    }

    proptest! {
        /// Any interleaving of sends and receives on a small ring behaves as a FIFO queue, across
        /// many wrap-arounds, and `Full` happens only when the bytes or messages are really used.
        #[test]
        fn ring_is_a_bounded_fifo(ops in proptest::collection::vec(op(), 1..400)) {
            let heap = Heap::new(256);
            let mut p = heap.region.producer(0, 120, 6);
            let mut c = heap.region.consumer(0, 120);
            let mut model: VecDeque<Vec<u8>> = VecDeque::new();
            let mut counter = 0u8;
            for op in ops {
                match op {
                    Op::Send(len) => {
                        counter = counter.wrapping_add(1);
                        let msg = vec![counter; len];
                        match send(&mut p, &msg).unwrap() {
                            Sent::Done { .. } => model.push_back(msg),
                            Sent::Full => {
                                let bytes: usize = model.iter().map(|m| align8(8 + m.len())).sum();
                                prop_assert!(model.len() >= 6 || bytes + align8(8 + len) > 256 / 2,
                                    "full with {} messages, {bytes} bytes", model.len());
                            }
                        }
                    }
                    Op::Recv => match recv(&mut c).unwrap() {
                        Received::Data { value, .. } => prop_assert_eq!(Some(value), model.pop_front()),
                        Received::Empty => prop_assert!(model.is_empty()),
                        Received::Closed => prop_assert!(false, "nobody closed"),
                    },
                }
            }
        }

        /// Whatever the peer writes into the control block and the data, the reader returns an
        /// error or a payload inside the ring; it never panics or reads outside.
        #[test]
        fn torn_or_hostile_writes_are_contained(
            tail in any::<u64>(), head in 0u64..1024, bytes in proptest::collection::vec(any::<u8>(), 256),
        ) {
            let mut heap = Heap::new(256);
            heap.poke(PAGE, &bytes);
            heap.poke(CTRL_OFFSET + HEAD, &(head & !7).to_le_bytes());
            heap.poke(CTRL_OFFSET + TAIL, &tail.to_le_bytes());
            let mut c = heap.region.consumer(0, 120);
            for _ in 0..40 {
                match c.try_recv_with(<[u8]>::len) {
                    Ok(Received::Data { value, .. }) => prop_assert!(value <= 120),
                    Ok(_) | Err(_) => break,
                }
            }
            let mut p = heap.region.producer(0, 120, 1 << 20);
            let _ = send(&mut p, &[1; 100]);
        }
    }

    #[test]
    fn concurrent_producer_and_consumer_preserve_order() {
        let heap = Heap::new(1024);
        let region = heap.region;
        let n = 20_000u32;
        let writer = std::thread::spawn(move || {
            let mut p = region.producer(0, 200, 64);
            let mut i = 0u32;
            while i < n {
                let len = (i % 200) as usize;
                match p
                    .try_send_with(Kind::Data, len, |b| {
                        b.fill(i.to_le_bytes()[0]);
                    })
                    .unwrap()
                {
                    Sent::Done { .. } => i += 1,
                    Sent::Full => std::hint::spin_loop(),
                }
            }
        });
        let mut c = region.consumer(0, 200);
        let mut i = 0u32;
        while i < n {
            match c
                .try_recv_with(|b| {
                    let len = (i % 200) as usize;
                    b.len() == len && b.iter().all(|&x| x == i.to_le_bytes()[0])
                })
                .unwrap()
            {
                Received::Data { value, .. } => {
                    assert!(value, "message {i} arrived changed");
                    i += 1;
                }
                Received::Empty => std::hint::spin_loop(),
                Received::Closed => unreachable!(),
            }
        }
        writer.join().unwrap();
        drop(heap);
    }
}
