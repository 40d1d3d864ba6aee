//! Timing round trips: the pacings (back to back, fixed gaps, Poisson arrivals), the samples
//! per configuration, and the rows the report prints.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Message sizes of every transport.
pub const SIZES: [usize; 4] = [64, 4096, 64 * 1024, 1 << 20];

/// How requests follow each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pacing {
    /// Each request as soon as the previous answer is in: the service never sleeps.
    BackToBack,
    /// Each request this many microseconds after the previous answer (a closed loop with
    /// think time): long enough gaps let both ends go to sleep.
    Gap(u64),
    /// Requests at Poisson-distributed times, this many a second on average (an open loop: a
    /// request does not wait for the previous answer to be due).
    Poisson(u64),
}

/// Every pacing the report covers.
pub const PACINGS: [Pacing; 5] = [
    Pacing::BackToBack,
    Pacing::Gap(100),
    Pacing::Gap(1_000),
    Pacing::Gap(10_000),
    Pacing::Poisson(1_000),
];

/// The shared-memory and Unix-socket lanes' pacings: every one above, and gaps of 50 ms —
/// longer than a shared-memory end once slept on its bell before it fell back to the lane's
/// socket (a cliff that paced traffic just past it paid on every message).
pub const LANE_PACINGS: [Pacing; 6] = [
    Pacing::BackToBack,
    Pacing::Gap(100),
    Pacing::Gap(1_000),
    Pacing::Gap(10_000),
    Pacing::Gap(50_000),
    Pacing::Poisson(1_000),
];

impl Pacing {
    /// The name in the report.
    pub fn name(self) -> String {
        match self {
            Self::BackToBack => "b2b".into(),
            Self::Gap(us) if us >= 1000 => format!("gap {} ms", us / 1000),
            Self::Gap(us) => format!("gap {us} us"),
            Self::Poisson(rate) => format!("poisson {rate}/s"),
        }
    }

    /// Round trips timed: back to back by size (as many as fit in about a second); paced about
    /// 1.5 s of traffic, at least 300.
    fn samples(self, size: usize) -> usize {
        let b2b = match size {
            0..=4096 => 20_000,
            4097..=65_536 => 4_000,
            _ => 300,
        };
        let paced = |gap_us: u64| {
            usize::try_from(1_500_000 / gap_us)
                .unwrap_or(300)
                .clamp(300, 5_000)
        };
        match self {
            Self::BackToBack => b2b,
            Self::Gap(us) => paced(us).min(b2b.max(300)),
            Self::Poisson(rate) => paced(1_000_000 / rate.max(1)).min(b2b.max(300)),
        }
    }
}

/// One measured configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub transport: String,
    pub baseline: bool,
    pub pacing: String,
    pub size: usize,
    pub samples: u64,
    /// Latency from the intended send time (for back to back: from the send).
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Latency from the moment the request was actually sent (the client's own timer lateness
    /// and queueing left out).
    pub p50_send_us: f64,
    pub p99_send_us: f64,
    /// Payload moved one way per second in request-response.
    pub mib_per_s: f64,
}

/// Microseconds (to 0.01) at quantile `q`.
pub fn us(h: &Histogram<u64>, q: f64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds shown to 0.01 us")]
    let v = h.value_at_quantile(q) as f64;
    (v / 10.0).round() / 100.0
}

/// A row from histograms in nanoseconds: latency from the intended send time, and from the
/// actual send.
pub fn row(
    transport: &str,
    baseline: bool,
    (pacing, size): (Pacing, usize),
    (intended, sent): (&Histogram<u64>, &Histogram<u64>),
    elapsed: Duration,
) -> Row {
    #[expect(
        clippy::cast_precision_loss,
        reason = "a throughput shown to 0.1 MiB/s"
    )]
    let mib = (size as f64 * intended.len() as f64) / elapsed.as_secs_f64() / f64::from(1u32 << 20);
    Row {
        transport: transport.into(),
        baseline,
        pacing: pacing.name(),
        size,
        samples: intended.len(),
        p50_us: us(intended, 0.50),
        p99_us: us(intended, 0.99),
        p999_us: us(intended, 0.999),
        p50_send_us: us(sent, 0.50),
        p99_send_us: us(sent, 0.99),
        mib_per_s: (mib * 10.0).round() / 10.0,
    }
}

/// A histogram for nanoseconds up to a minute.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000_000, 3)?)
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// xorshift64*: the Poisson schedule needs uniform numbers, not good ones.
struct Rng(u64);

impl Rng {
    /// Uniform in (0, 1].
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        #[expect(clippy::cast_precision_loss, reason = "53 bits into an f64")]
        let u = (x as f64 + 1.0) / ((1u64 << 53) as f64);
        u
    }
}

/// Makes this thread's sleeps end when asked rather than up to 50 µs later (the default timer
/// slack), so paced requests leave on time.
pub fn precise_sleeps() {
    // SAFETY: sets this thread's timer slack to 1 ns; no pointers.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// Times round trips of `size` bytes paced by `pacing` (after a few back-to-back warm-up ones),
/// checking the last echo, and prints a progress line.
pub fn measure(
    transport: &str,
    baseline: bool,
    (pacing, size): (Pacing, usize),
    mut round_trip: impl FnMut(&[u8], &mut Vec<u8>) -> anyhow::Result<()>,
) -> anyhow::Result<Row> {
    let n = pacing.samples(size);
    let msg: Vec<u8> = (0..size)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    let mut reply = Vec::with_capacity(size);
    for _ in 0..(n / 10).min(1000) {
        round_trip(&msg, &mut reply)?;
    }
    let (mut from_intended, mut from_send) = (histogram()?, histogram()?);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let start = Instant::now();
    let mut intended = Instant::now();
    for _ in 0..n {
        intended = match pacing {
            Pacing::BackToBack => Instant::now(),
            Pacing::Gap(us) => Instant::now() + Duration::from_micros(us),
            Pacing::Poisson(rate) => {
                #[expect(clippy::cast_precision_loss, reason = "a rate below 2^53")]
                let mean = 1.0 / rate as f64;
                intended + Duration::from_secs_f64(-rng.next().ln() * mean)
            }
        };
        sleep_until(intended);
        let sent = Instant::now();
        round_trip(&msg, &mut reply)?;
        let done = Instant::now();
        from_intended.record(ns(done.saturating_duration_since(intended)))?;
        from_send.record(ns(done - sent))?;
    }
    let elapsed = start.elapsed();
    if reply != msg {
        bail!("{transport} {size} B: the echo differs from what was sent");
    }
    let r = row(
        transport,
        baseline,
        (pacing, size),
        (&from_intended, &from_send),
        elapsed,
    );
    eprintln!(
        "  {:<22} {:<14} {:>8} B  p50 {:>9.2} us  p99 {:>9.2} us",
        r.transport, r.pacing, r.size, r.p50_us, r.p99_us
    );
    Ok(r)
}
