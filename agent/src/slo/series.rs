//! A rolling window of good/total event counts in fixed buckets, enough to answer "how many
//! events in the last `span`" for every burn-rate window of an SLO and for its whole period.

use std::time::Duration;

use super::burn::Events;

/// Buckets per period at most (a 28-day period: one-minute buckets).
const MAX_BUCKETS: u64 = 40_320;
/// Narrowest bucket.
const MIN_BUCKET: Duration = Duration::from_millis(100);

/// Counts in buckets of equal width covering one period.
#[derive(Debug)]
pub struct Series {
    width_ns: u64,
    buckets: Vec<Events>,
    /// The index (time / width) of the newest bucket written.
    newest: u64,
}

impl Series {
    /// A series covering `period`.
    #[must_use]
    pub fn new(period: Duration) -> Self {
        let width = (period / u32::try_from(MAX_BUCKETS).unwrap_or(u32::MAX)).max(MIN_BUCKET);
        let width_ns = u64::try_from(width.as_nanos()).unwrap_or(u64::MAX).max(1);
        let count = u64::try_from(period.as_nanos())
            .unwrap_or(u64::MAX)
            .div_ceil(width_ns)
            .clamp(1, MAX_BUCKETS + 1);
        Self {
            width_ns,
            buckets: vec![Events::default(); usize::try_from(count).unwrap_or(1)],
            newest: 0,
        }
    }

    /// The bucket width.
    #[must_use]
    pub const fn width(&self) -> Duration {
        Duration::from_nanos(self.width_ns)
    }

    fn slot(&self, index: u64) -> usize {
        usize::try_from(index % self.buckets.len() as u64).unwrap_or(0)
    }

    /// Moves the window to `now_ns`, clearing buckets it passed.
    fn advance(&mut self, now_ns: u64) {
        let index = now_ns / self.width_ns;
        if index <= self.newest {
            return;
        }
        let passed = (index - self.newest).min(self.buckets.len() as u64);
        for i in 1..=passed {
            let s = self.slot(self.newest + i);
            self.buckets[s] = Events::default();
        }
        self.newest = index;
    }

    /// Adds events seen at `now_ns`.
    pub fn add(&mut self, now_ns: u64, e: Events) {
        self.advance(now_ns);
        let s = self.slot(self.newest);
        self.buckets[s].good += e.good;
        self.buckets[s].total += e.total;
    }

    /// Events in the last `span` up to `now_ns` (whole buckets: at least one, at most the
    /// period).
    #[must_use]
    pub fn sum(&mut self, now_ns: u64, span: Duration) -> Events {
        self.advance(now_ns);
        let span_ns = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
        let n = span_ns
            .div_ceil(self.width_ns)
            .clamp(1, self.buckets.len() as u64);
        let mut out = Events::default();
        for i in 0..n {
            let Some(index) = self.newest.checked_sub(i) else {
                break;
            };
            let b = self.buckets[self.slot(index)];
            out.good += b.good;
            out.total += b.total;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn windows_sum_recent_buckets_and_forget_old_ones() {
        // 28 days: one-minute buckets.
        let mut s = Series::new(Duration::from_hours(672));
        assert_eq!(s.width(), Duration::from_mins(1));
        let t0 = 1_000 * 60 * S;
        s.add(t0, Events { good: 9, total: 10 });
        s.add(t0 + 30 * S, Events { good: 1, total: 1 });
        s.add(t0 + 60 * S, Events { good: 0, total: 5 });
        let last_minute = s.sum(t0 + 60 * S, Duration::from_mins(1));
        assert_eq!(last_minute, Events { good: 0, total: 5 });
        let last_hour = s.sum(t0 + 60 * S, Duration::from_hours(1));
        assert_eq!(
            last_hour,
            Events {
                good: 10,
                total: 16
            }
        );
        // 29 days later everything has left the period.
        let later = t0 + 29 * 86_400 * S;
        assert_eq!(s.sum(later, Duration::from_hours(672)), Events::default());
        s.add(later, Events { good: 1, total: 2 });
        assert_eq!(
            s.sum(later, Duration::from_mins(1)),
            Events { good: 1, total: 2 }
        );
    }

    #[test]
    fn short_periods_use_the_narrowest_bucket() {
        let mut s = Series::new(Duration::from_mins(28));
        assert_eq!(s.width(), Duration::from_millis(100));
        s.add(10 * S, Events { good: 1, total: 1 });
        s.add(10 * S + S / 2, Events { good: 0, total: 1 });
        assert_eq!(
            s.sum(10 * S + S / 2, Duration::from_millis(200)),
            Events { good: 0, total: 1 }
        );
        assert_eq!(
            s.sum(10 * S + S / 2, Duration::from_secs(1)),
            Events { good: 1, total: 2 }
        );
    }
}
