//! Every error code and close code Herald uses, declared once. A wrong code makes clients
//! reconnect in a tight loop; a missing one makes them give up. So each says whether the
//! client may retry.

/// Codes in error replies (`{"id":N,"error":{"code":..}}`) and HTTP API error bodies.
///
/// Ranges: 100–199 request errors. The numbers are stable: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Something failed inside the server; the request may succeed later.
    Internal = 100,
    /// Missing, invalid or expired credentials (token or API key).
    Unauthorized = 101,
    /// The request is malformed: bad JSON, missing or invalid fields.
    BadRequest = 107,
    /// No such endpoint or method.
    NotFound = 111,
    /// The request body or message is larger than the configured limit.
    TooLarge = 112,
    /// The server is shutting down or not ready; retry elsewhere or later.
    Unavailable = 113,
}

impl ErrorCode {
    /// Whether the same request may succeed if retried (with backoff).
    pub fn retryable(self) -> bool {
        matches!(self, Self::Internal | Self::Unavailable)
    }

    /// The HTTP status the API answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Internal => 500,
            Self::Unauthorized => 401,
            Self::BadRequest => 400,
            Self::NotFound => 404,
            Self::TooLarge => 413,
            Self::Unavailable => 503,
        }
    }

    /// The number on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

/// WebSocket close codes Herald sends, beside the RFC 6455 ones (1000–1015).
///
/// Ranges: 4000–4499 mean "reconnect (with backoff) and recover"; 4500–4999 mean "do not
/// reconnect automatically: something must change first".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum CloseCode {
    /// The client did not read fast enough; its queue overflowed.
    SlowConsumer = 4001,
    /// The client did not answer pings.
    NoPong = 4002,
}

impl CloseCode {
    pub fn reconnect(self) -> bool {
        (self as u16) < 4500
    }

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The reason text sent with the code.
    pub fn reason(self) -> &'static str {
        match self {
            Self::SlowConsumer => "slow consumer",
            Self::NoPong => "no pong",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_ranges_say_whether_to_reconnect() {
        assert!(CloseCode::SlowConsumer.reconnect());
        assert!(CloseCode::NoPong.reconnect());
    }

    #[test]
    fn http_statuses_are_client_or_server_errors() {
        for c in [
            ErrorCode::Internal,
            ErrorCode::Unauthorized,
            ErrorCode::BadRequest,
            ErrorCode::NotFound,
            ErrorCode::TooLarge,
            ErrorCode::Unavailable,
        ] {
            assert!((400..600).contains(&c.http_status()));
            assert_eq!(c.retryable(), c.http_status() >= 500, "{c:?}");
        }
    }
}
