//! Exponential backoff with full jitter: attempt n sleeps a uniform random time in
//! `[0, min(max, base * 2^n)]`, so clients cut off together do not come back together.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0 }
    }

    /// The upper bound of the delay for an attempt: `min(max, base * 2^attempt)`, without
    /// overflowing however many attempts failed.
    pub(crate) fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).map_or(self.max, |d| d.min(self.max))
    }

    /// The delay before the next attempt, drawn from `rng`; counts the attempt.
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// Attempts so far (since the last reset).
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_until_the_maximum() {
        let b = Backoff::new(250 * MS, 20_000 * MS);
        let ceilings: Vec<_> = (0..10).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [250, 500, 1000, 2000, 4000, 8000, 16000, 20000, 20000, 20000]);
        assert_eq!(b.ceiling(u32::MAX), 20_000 * MS, "no overflow after many failures");
        assert_eq!(Backoff::new(Duration::MAX, 5 * MS).ceiling(3), 5 * MS);
    }

    #[test]
    fn delays_are_full_jitter_below_the_ceiling() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let mut seen_small = false;
        for round in 0..200u32 {
            let attempt = b.attempt();
            let d = b.next_delay(&mut rng);
            assert!(d <= b.ceiling(attempt), "round {round}: {d:?} above {:?}", b.ceiling(attempt));
            // Full jitter reaches down to zero, not just to half the ceiling.
            seen_small |= attempt >= 4 && d < b.ceiling(attempt) / 4;
        }
        assert!(seen_small);
        assert_eq!(b.attempt(), 200);
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert!(b.next_delay(&mut rng) <= 100 * MS);
    }

    #[test]
    fn a_zero_base_never_sleeps() {
        let mut b = Backoff::new(Duration::ZERO, Duration::from_secs(1));
        assert_eq!(b.next_delay(&mut StdRng::seed_from_u64(1)), Duration::ZERO);
    }
}
