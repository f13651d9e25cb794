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
    /// A limit on this client was reached: subscriptions per connection, or connections per
    /// user (then the connection is closed with 4501).
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
    /// The server is shutting down or not ready, or its engine (Redis) does not answer; retry
    /// elsewhere or later.
    Unavailable = 113,
    /// The HTTP method is not allowed on this endpoint.
    MethodNotAllowed = 114,
    /// Too many commands or publications per second on this connection: slow down and retry
    /// after a short wait. A client that keeps going is closed with 4006.
    RateLimited = 115,
    /// This node holds as many channels or as many bytes of history as it is configured for
    /// (`limits.max_channels`, `limits.max_history_bytes`); retry later.
    NodeLimit = 116,
    /// The subscription token expired (in an `unsubscribe` push: the subscription ended);
    /// get a new one and subscribe again.
    SubscriptionExpired = 117,
    /// `sub_refresh` for a channel this connection is not subscribed to with a token.
    NotSubscribed = 118,
    /// The namespace needs a subscription token: `subscribe` with one (then retry the command).
    TokenRequired = 119,
    /// A browser request from a web origin that `http.allowed_origins` does not allow (HTTP
    /// 403, on WebSocket handshakes, SSE and the API).
    OriginNotAllowed = 120,
    /// The request body did not arrive within `api.body_timeout` (HTTP 408).
    RequestTimeout = 121,
    /// The `since` position names an epoch the channel no longer has (its history was lost,
    /// e.g. the server restarted): reload the state and continue from the position in the
    /// error's message or a fresh `subscribe`.
    EpochMismatch = 122,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 22] = [
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
        Self::RateLimited,
        Self::NodeLimit,
        Self::SubscriptionExpired,
        Self::NotSubscribed,
        Self::TokenRequired,
        Self::OriginNotAllowed,
        Self::RequestTimeout,
        Self::EpochMismatch,
    ];

    /// Whether the same request may succeed if retried (with backoff).
    pub fn retryable(self) -> bool {
        matches!(self, Self::Internal | Self::Unavailable | Self::RateLimited | Self::NodeLimit)
    }

    /// The HTTP status the API answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Internal => 500,
            Self::Unauthorized | Self::SubscriptionExpired | Self::TokenRequired => 401,
            Self::PermissionDenied | Self::OriginNotAllowed => 403,
            Self::RequestTimeout => 408,
            Self::InvalidChannel | Self::BadRequest | Self::AlreadySubscribed | Self::NotConnected => 400,
            Self::NotAvailable | Self::EpochMismatch | Self::NotSubscribed => 409,
            Self::UnknownCommand | Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::TooLarge => 413,
            Self::LimitExceeded | Self::RateLimited | Self::NodeLimit => 429,
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
            Self::RateLimited => "slow down",
            Self::NodeLimit => "server capacity reached",
            Self::SubscriptionExpired => "subscription token expired",
            Self::NotSubscribed => "not subscribed with a token",
            Self::TokenRequired => "subscription token required",
            Self::OriginNotAllowed => "origin not allowed",
            Self::RequestTimeout => "request timeout",
            Self::EpochMismatch => "epoch mismatch: the channel's history was lost",
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
    /// The client kept sending after being told to slow down (error 115): too many refused
    /// commands in a short time. Reconnect with backoff.
    RateLimited = 4006,
    /// The client broke the protocol repeatedly; fix the client.
    ProtocolViolation = 4500,
    /// The user already has as many connections as `limits.max_connections_per_user` allows;
    /// close another one first.
    TooManyConnections = 4501,
    /// The backend disconnected this client (API `disconnect`).
    ForceDisconnect = 4503,
    /// A WebSocket opened on a path that is not a WebSocket endpoint (e.g. `/`); the reason
    /// names the right ones (`/connect`, `/ws/<channel>`). Fix the URL.
    NotAnEndpoint = 4504,
    /// A raw `/ws/<channel>` client sent a message, and the channel's namespace does not allow
    /// clients to publish (`publish = false`).
    PublishNotAllowed = 4505,
    /// A raw `/ws/<channel>` WebSocket whose channel cannot be subscribed: a bad name, an
    /// unknown namespace, or a namespace not open to anonymous clients. The reason says which.
    /// (The upgrade is accepted and closed with this code, so a browser sees the reason.)
    SubscribeRefused = 4506,
}

impl CloseCode {
    pub const ALL: [CloseCode; 12] = [
        Self::SlowConsumer,
        Self::NoPong,
        Self::ConnectTimeout,
        Self::ServerError,
        Self::TokenExpired,
        Self::RateLimited,
        Self::ProtocolViolation,
        Self::TooManyConnections,
        Self::ForceDisconnect,
        Self::NotAnEndpoint,
        Self::PublishNotAllowed,
        Self::SubscribeRefused,
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
            Self::RateLimited => "rate limit exceeded",
            Self::ProtocolViolation => "protocol violation",
            Self::TooManyConnections => "too many connections for this user",
            Self::ForceDisconnect => "disconnected by the server",
            Self::NotAnEndpoint => {
                "not a WebSocket endpoint: use /ws/<channel> (raw data) or /connect (Herald protocol, see /herald.js)"
            }
            Self::PublishNotAllowed => {
                "this channel's namespace does not allow clients to publish (publish = false); publish through the API"
            }
            Self::SubscribeRefused => "this channel cannot be subscribed here",
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
            // Server trouble (5xx) and "not now" limits (429 with a code of their own) are
            // retryable; what the client must change first is not.
            let later = matches!(c, ErrorCode::RateLimited | ErrorCode::NodeLimit);
            assert_eq!(c.retryable(), c.http_status() >= 500 || later, "{c:?}");
        }
    }
}
