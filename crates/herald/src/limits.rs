//! Per-connection rate limits: token buckets for commands and publications, and the count of
//! refusals that turns a client that will not slow down into a closed connection.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::LimitsConfig;

/// How long refusals are counted before the count starts over.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// A token bucket: `rate` tokens a second, at most `burst` saved up; starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self { rate: f64::from(rate.max(1)), burst, tokens: burst, at: now }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Which per-connection limit refused something (the label of `herald_limit_refusals_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Commands,
    Publications,
}

impl Limit {
    /// The configuration key, used as the metric label.
    pub fn key(self) -> &'static str {
        match self {
            Self::Commands => "commands_per_second",
            Self::Publications => "publications_per_second",
        }
    }
}

/// What the limiter says about one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Answer with error 115 and go on.
    Refuse(Limit),
    /// Answer with error 115 and close the connection (4006): too many refusals.
    Close(Limit),
}

/// The rate limits of one connection.
#[derive(Debug, Clone)]
pub struct ConnectionLimiter {
    commands: TokenBucket,
    publications: TokenBucket,
    max_refusals: u32,
    refusals: u32,
    window_start: Instant,
}

impl ConnectionLimiter {
    pub fn new(cfg: &LimitsConfig, now: Instant) -> Self {
        Self {
            commands: TokenBucket::new(cfg.commands_per_second, cfg.commands_burst, now),
            publications: TokenBucket::new(cfg.publications_per_second, cfg.publications_burst, now),
            max_refusals: cfg.max_refusals,
            refusals: 0,
            window_start: now,
        }
    }

    /// One command (any frame) arrived.
    pub fn command(&mut self, now: Instant) -> Verdict {
        if self.commands.take(now) {
            Verdict::Allow
        } else {
            self.refuse(Limit::Commands, now)
        }
    }

    /// A `publish` is about to be carried out (after `command` allowed it).
    pub fn publication(&mut self, now: Instant) -> Verdict {
        if self.publications.take(now) {
            Verdict::Allow
        } else {
            self.refuse(Limit::Publications, now)
        }
    }

    fn refuse(&mut self, limit: Limit, now: Instant) -> Verdict {
        metrics::counter!("herald_limit_refusals_total", "limit" => limit.key()).increment(1);
        if now.saturating_duration_since(self.window_start) >= REFUSAL_WINDOW {
            self.window_start = now;
            self.refusals = 0;
        }
        self.refusals = self.refusals.saturating_add(1);
        if self.refusals > self.max_refusals {
            Verdict::Close(limit)
        } else {
            Verdict::Refuse(limit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LimitsConfig {
        LimitsConfig {
            commands_per_second: 10,
            commands_burst: 5,
            publications_per_second: 2,
            publications_burst: 1,
            max_refusals: 3,
            ..Default::default()
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..8).filter(|_| b.take(t0)).count(), 5, "the burst");
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(100)), "one token per 100 ms");
        assert!(!b.take(t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| b.take(later)).count(), 5, "never more than the burst saved up");
    }

    #[test]
    fn refusals_past_the_maximum_close_and_the_window_forgives() {
        let t0 = Instant::now();
        let mut l = ConnectionLimiter::new(&cfg(), t0);
        let verdicts: Vec<Verdict> = (0..10).map(|_| l.command(t0)).collect();
        assert_eq!(verdicts[..5], [Verdict::Allow; 5]);
        assert_eq!(verdicts[5..8], [Verdict::Refuse(Limit::Commands); 3]);
        assert_eq!(verdicts[8], Verdict::Close(Limit::Commands));
        // A client that backed off for a window starts with a clean count.
        let later = t0 + REFUSAL_WINDOW;
        assert_eq!(l.command(later), Verdict::Allow);
        let mut l = ConnectionLimiter::new(&cfg(), t0);
        assert_eq!(l.publication(t0), Verdict::Allow);
        assert_eq!(l.publication(t0), Verdict::Refuse(Limit::Publications));
        assert_eq!(l.publication(t0 + Duration::from_millis(500)), Verdict::Allow, "2 per second");
    }
}
