//! Refusals in the log (refused tokens, origins and API keys, limits hit, slow consumers,
//! WebSockets on a wrong path), rate-limited per kind: at most `log.refusals_per_second`
//! lines of one kind in a second, so a client that sends a million bad tokens cannot flood
//! the log. What was left out is said on the next line of that kind (its `suppressed` field
//! and a line of its own). Counters count every refusal; the log shows examples.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What was refused: one budget of lines per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A connection or subscription token refused (`herald_token_refusals_total`).
    Token,
    /// A browser page from an origin `http.allowed_origins` does not list.
    Origin,
    /// An HTTP API request without a valid key.
    ApiKey,
    /// A TCP connection over `limits.max_connections` or `limits.max_connections_per_ip`.
    ConnectionLimit,
    /// A command, publication or connection refused by a per-connection or per-user limit,
    /// and closes for too many refusals.
    RateLimit,
    /// A connection closed because its queue overflowed (4001).
    SlowConsumer,
    /// A WebSocket opened on a path that is not an endpoint (4504).
    WrongEndpoint,
}

const KINDS: usize = 7;

impl Kind {
    /// The `kind` field of its log lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Origin => "origin",
            Self::ApiKey => "api_key",
            Self::ConnectionLimit => "connection_limit",
            Self::RateLimit => "rate_limit",
            Self::SlowConsumer => "slow_consumer",
            Self::WrongEndpoint => "wrong_endpoint",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The period of one budget of lines.
const PERIOD: Duration = Duration::from_secs(1);

/// Lines per kind per second; set from `log.refusals_per_second` at start-up.
static LIMIT: AtomicU32 = AtomicU32::new(DEFAULT_PER_SECOND);

/// The default of `log.refusals_per_second`.
pub const DEFAULT_PER_SECOND: u32 = 10;

static BUDGETS: [Mutex<Budget>; KINDS] = [const { Mutex::new(Budget::new()) }; KINDS];

/// Sets the number of lines each kind may log per second (0: none).
pub fn set_limit(per_second: u32) {
    LIMIT.store(per_second, Ordering::Relaxed);
}

/// Whether a refusal of `kind` may be logged now: `Some(n)` with the number of refusals of
/// this kind left out since the last line, `None` to leave this one out.
pub fn admit(kind: Kind) -> Option<u64> {
    let limit = LIMIT.load(Ordering::Relaxed);
    let mut budget = BUDGETS[kind.index()].lock().unwrap_or_else(|e| e.into_inner());
    budget.admit(Instant::now(), limit)
}

/// One kind's lines in the current period.
#[derive(Debug)]
struct Budget {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Budget {
    const fn new() -> Self {
        Self { start: None, logged: 0, suppressed: 0 }
    }

    fn admit(&mut self, now: Instant, limit: u32) -> Option<u64> {
        if self.start.is_none_or(|s| now.saturating_duration_since(s) >= PERIOD) {
            self.start = Some(now);
            self.logged = 0;
        }
        if self.logged < limit {
            self.logged += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

/// Logs a refusal at `level` unless its kind is over its budget; before it, a line saying
/// how many of this kind were left out, if any. The fields and message are `tracing`'s.
///
/// `refusal!(info, Kind::Token, peer = %addr, reason = "expired", "token refused")`
macro_rules! refusal {
    ($level:ident, $kind:expr, $($rest:tt)+) => {{
        let kind: $crate::ratelog::Kind = $kind;
        if let Some(suppressed) = $crate::ratelog::admit(kind) {
            if suppressed > 0 {
                tracing::$level!(kind = kind.name(), suppressed, "{suppressed} similar refusals were not logged");
            }
            tracing::$level!(kind = kind.name(), $($rest)+);
        }
    }};
}

pub(crate) use refusal;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_lets_through_the_limit_per_period_and_counts_the_rest() {
        let mut b = Budget::new();
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..25).map(|_| b.admit(t0, 10)).collect();
        assert_eq!(admitted.iter().filter(|a| a.is_some()).count(), 10);
        assert!(admitted[..10].iter().all(|a| *a == Some(0)));
        // The next period: the first line carries the 15 left out.
        assert_eq!(b.admit(t0 + PERIOD, 10), Some(15));
        assert_eq!(b.admit(t0 + PERIOD, 10), Some(0));
        // Nothing logged with a limit of 0, and all of it counted.
        let mut off = Budget::new();
        assert_eq!(off.admit(t0, 0), None);
        assert_eq!(off.admit(t0 + PERIOD * 3, 0), None);
        assert_eq!(off.suppressed, 2);
    }
}
