//! A latency histogram with log-linear buckets (like HdrHistogram with two significant
//! digits): exact below 128, within 1/64 of the value above. Recorded lock-free by many tasks.

use std::sync::atomic::{AtomicU64, Ordering};

/// Values below this are their own bucket.
const LINEAR: u64 = 128;
/// Buckets per power of two above `LINEAR`.
const HALF: u64 = LINEAR / 2;
/// Enough buckets for values up to 2^63.
const BUCKETS: usize = (LINEAR + 57 * HALF) as usize;

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    // `shift` >= 1 puts `v >> shift` in [HALF, LINEAR).
    let shift = 63 - u64::from(v.leading_zeros()) - 6;
    (LINEAR + (shift - 1) * HALF + ((v >> shift) - HALF)) as usize
}

/// The largest value that falls in bucket `i`.
fn highest(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let shift = (i - LINEAR) / HALF + 1;
    let sub = (i - LINEAR) % HALF + HALF;
    u64::try_from((u128::from(sub + 1) << shift) - 1).unwrap_or(u64::MAX)
}

/// Shared by all recording tasks.
#[derive(Debug)]
pub(super) struct AtomicHistogram {
    counts: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl AtomicHistogram {
    pub(super) fn new() -> Self {
        Self { counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(), max: AtomicU64::new(0) }
    }

    pub(super) fn record(&self, v: u64) {
        self.counts[index(v)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(v, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> Histogram {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        Histogram { total: counts.iter().sum(), counts, max: self.max.load(Ordering::Relaxed) }
    }
}

/// A snapshot to read percentiles from.
#[derive(Debug, Clone)]
pub(super) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Histogram {
    pub(super) fn new() -> Self {
        Self { counts: vec![0; BUCKETS], total: 0, max: 0 }
    }

    pub(super) fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    pub(super) fn count(&self) -> u64 {
        self.total
    }

    pub(super) fn max(&self) -> u64 {
        self.max
    }

    /// The smallest recorded value (to bucket precision) that at least `q` of all values are at
    /// or below: the value of rank `ceil(q * count)`. 0 when nothing was recorded.
    pub(super) fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return highest(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_ordered() {
        let mut last = 0;
        for v in (0..5000u64).chain([1 << 20, (1 << 20) + 1, u64::MAX / 2, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS, "{v}");
            assert!(highest(i) >= v, "{v} above its bucket {i}");
            if i > 0 {
                assert!(highest(i - 1) < v, "{v} also fits bucket {}", i - 1);
            }
            assert!(i >= last || v > 5000);
            last = i;
        }
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile(0.5), 50);
        assert_eq!(h.quantile(0.9), 90);
        assert_eq!(h.quantile(0.99), 99);
        assert_eq!(h.quantile(1.0), 100);
        assert_eq!(h.quantile(0.0), 1);
        assert_eq!(h.max(), 100);
    }

    #[test]
    fn large_values_are_within_one_sixty_fourth() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (q, exact) in [(0.5, 50_000_000u64), (0.9, 90_000_000), (0.99, 99_000_000), (0.999, 99_900_000)] {
            let got = h.quantile(q);
            assert!(got >= exact && got - exact <= exact / 64, "q{q}: {got} vs {exact}");
        }
        assert_eq!(h.quantile(1.0), 100_000_000);
    }

    #[test]
    fn empty_and_shared() {
        assert_eq!(Histogram::new().quantile(0.5), 0);
        let a = AtomicHistogram::new();
        a.record(3);
        a.record(1_000_000);
        let s = a.snapshot();
        assert_eq!(s.count(), 2);
        assert_eq!(s.quantile(0.5), 3);
        assert_eq!(s.quantile(1.0), 1_000_000);
    }
}
