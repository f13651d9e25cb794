//! Every error code and close code Herald uses, declared once. A wrong code makes clients
//! reconnect in a tight loop; a missing one makes them give up. So each says whether the
//! client may retry. `docs/protocol.md` has the same table for people.

/// Codes in error replies (`{"id":N,"error":{"code":..}}`) and HTTP API error bodies.
///
/// Range 100–199. The numbers are stable: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Something failed inside the server; the request may succeed later.
    Internal = 100,
    /// Missing, invalid or expired credentials (token or API key).
    Unauthorized = 101,
    /// The channel name is invalid, or its namespace is not configured.
    InvalidChannel = 102,
    /// The namespace does not allow this (subscribe, publish) for this client.
    PermissionDenied = 103,
    /// No such command or API method.
    UnknownCommand = 104,
    /// The connection is already subscribed to the channel.
    AlreadySubscribed = 105,
    /// A per-connection limit was reached (subscriptions).
    LimitExceeded = 106,
    /// The request is malformed: bad JSON, missing or invalid fields.
    BadRequest = 107,
    /// The first command on a connection must be `connect` (and only the first).
    NotConnected = 108,
    /// The namespace does not offer this (presence is off, or no history is kept).
    NotAvailable = 109,
    /// No such endpoint.
    NotFound = 111,
    /// The request body or publication is larger than the configured limit.
    TooLarge = 112,
    /// The server is shutting down or not ready; retry elsewhere or later.
    Unavailable = 113,
    /// The HTTP method is not allowed on this endpoint.
    MethodNotAllowed = 114,
    /// A browser request from a web origin that `http.allowed_origins` does not allow (HTTP
    /// 403, on WebSocket handshakes, SSE and the API).
    OriginNotAllowed = 120,
    /// The request body did not arrive within `api.body_timeout` (HTTP 408).
    RequestTimeout = 121,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 16] = [
        Self::Internal,
        Self::Unauthorized,
        Self::InvalidChannel,
        Self::PermissionDenied,
        Self::UnknownCommand,
        Self::AlreadySubscribed,
        Self::LimitExceeded,
        Self::BadRequest,
        Self::NotConnected,
        Self::NotAvailable,
        Self::NotFound,
        Self::TooLarge,
        Self::Unavailable,
        Self::MethodNotAllowed,
        Self::OriginNotAllowed,
        Self::RequestTimeout,
    ];

    /// Whether the same request may succeed if retried (with backoff).
    pub fn retryable(self) -> bool {
        matches!(self, Self::Internal | Self::Unavailable)
    }

    /// The HTTP status the API answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Internal => 500,
            Self::Unauthorized => 401,
            Self::PermissionDenied | Self::OriginNotAllowed => 403,
            Self::RequestTimeout => 408,
            Self::InvalidChannel | Self::BadRequest | Self::AlreadySubscribed | Self::NotConnected => 400,
            Self::NotAvailable => 409,
            Self::UnknownCommand | Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::TooLarge => 413,
            Self::LimitExceeded => 429,
            Self::Unavailable => 503,
        }
    }

    /// The number on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a number, if it is one of ours.
    pub fn from_u16(n: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_u16() == n)
    }

    /// A short default message.
    pub fn message(self) -> &'static str {
        match self {
            Self::Internal => "internal error",
            Self::Unauthorized => "unauthorized",
            Self::InvalidChannel => "invalid channel",
            Self::PermissionDenied => "permission denied",
            Self::UnknownCommand => "unknown command",
            Self::AlreadySubscribed => "already subscribed",
            Self::LimitExceeded => "limit exceeded",
            Self::BadRequest => "bad request",
            Self::NotConnected => "connect first",
            Self::NotAvailable => "not available in this namespace",
            Self::NotFound => "not found",
            Self::TooLarge => "too large",
            Self::Unavailable => "unavailable",
            Self::MethodNotAllowed => "method not allowed",
            Self::OriginNotAllowed => "origin not allowed",
            Self::RequestTimeout => "request timeout",
        }
    }
}

/// WebSocket close codes Herald sends, beside the RFC 6455 ones (1000 normal, 1001 server
/// shutting down, 1002 protocol error, 1003 binary frame on the JSON protocol, 1007 invalid
/// UTF-8, 1009 frame or message over the size limit).
///
/// Ranges: 4000–4499 mean "reconnect (with backoff) and recover"; 4500–4999 mean "do not
/// reconnect automatically: something must change first".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum CloseCode {
    /// The client did not read fast enough; its outgoing queue overflowed. Reconnect and
    /// recover what was missed.
    SlowConsumer = 4001,
    /// The client did not answer the server's pings.
    NoPong = 4002,
    /// No `connect` command arrived in time after the WebSocket opened.
    ConnectTimeout = 4003,
    /// The server is overloaded or failed internally; reconnect later.
    ServerError = 4004,
    /// The connection token expired and was not refreshed; get a new token and reconnect.
    TokenExpired = 4005,
    /// The client broke the protocol repeatedly; fix the client.
    ProtocolViolation = 4500,
    /// The backend disconnected this client (API `disconnect`).
    ForceDisconnect = 4503,
}

impl CloseCode {
    pub const ALL: [CloseCode; 7] = [
        Self::SlowConsumer,
        Self::NoPong,
        Self::ConnectTimeout,
        Self::ServerError,
        Self::TokenExpired,
        Self::ProtocolViolation,
        Self::ForceDisconnect,
    ];

    /// Whether a client should reconnect by itself after this code.
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
            Self::ConnectTimeout => "connect timeout",
            Self::ServerError => "server error",
            Self::TokenExpired => "token expired",
            Self::ProtocolViolation => "protocol violation",
            Self::ForceDisconnect => "disconnected by the server",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_ranges_say_whether_to_reconnect() {
        for c in CloseCode::ALL {
            assert_eq!(c.reconnect(), (4000..4500).contains(&c.as_u16()), "{c:?}");
            assert!(c.reason().len() <= 123);
        }
    }

    #[test]
    fn error_codes_are_unique_and_map_to_http() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_u16()), "duplicate {c:?}");
            assert_eq!(ErrorCode::from_u16(c.as_u16()), Some(c));
            assert!((400..600).contains(&c.http_status()));
            assert_eq!(c.retryable(), c.http_status() >= 500, "{c:?}");
        }
    }
}
