//! The client's errors. Cheap to clone (sources sit behind `Arc`), so one error can end a
//! subscription, fail every waiting request and stay readable in [`State::Closed`](crate::State).

use std::sync::Arc;
use std::time::Duration;

use herald_protocol::ErrorCode;

/// Everything that can go wrong between the client and a Herald server.
///
/// ```
/// use herald_client::Error;
/// use herald_protocol::ErrorCode;
///
/// let e = Error::Server {
///     command: "subscribe",
///     channel: Some("secret".into()),
///     code: 103,
///     message: "permission denied".into(),
/// };
/// assert_eq!(e.error_code(), Some(ErrorCode::PermissionDenied));
/// assert!(!e.is_retryable());
/// assert_eq!(e.to_string(), "subscribe on `secret` refused: permission denied (code 103)");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL cannot be used to open a WebSocket.
    #[error("invalid url `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },

    /// The WebSocket could not be opened, or reading or writing it failed.
    #[error("websocket to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: Arc<tokio_tungstenite::tungstenite::Error>,
    },

    /// The server answered a request with an error reply.
    #[error("{command}{} refused: {message} (code {code})", channel_suffix(channel))]
    Server {
        /// The command that was refused: `connect`, `subscribe`, `unsubscribe` or `publish`.
        command: &'static str,
        /// The channel the command named, if any.
        channel: Option<String>,
        /// The protocol error code (see [`ErrorCode`]).
        code: u16,
        /// The server's message.
        message: String,
    },

    /// The connection was closed with this WebSocket close code: by
    /// [`Client::close`](crate::Client::close) (1000), or by the server. Once the client is
    /// closed for good (a server code of 1000 or 4500–4999, see [`State`](crate::State)),
    /// every request fails with this error. From [`Client::connect`](crate::Client::connect),
    /// it means the server closed during the first attempt, with any code.
    #[error("connection closed (code {code}: {reason})")]
    Closed { code: u16, reason: String },

    /// The connection dropped while the request was in flight; the client is reconnecting.
    /// The request may or may not have reached the server.
    #[error("disconnected while `{command}` was in flight: {reason}")]
    Disconnected { command: &'static str, reason: String },

    /// No reply within the request timeout (see
    /// [`ClientOptions::request_timeout`](crate::ClientOptions::request_timeout)).
    #[error("`{command}` got no reply within {after:?}")]
    Timeout { command: &'static str, after: Duration },

    /// The server sent something this client cannot understand.
    #[error("protocol error: {message}")]
    Protocol { message: String },

    /// This client already has a live [`Subscription`](crate::Subscription) to the channel.
    #[error("already subscribed to `{channel}`")]
    AlreadySubscribed { channel: String },

    /// The data to publish could not be encoded as JSON.
    #[error("cannot encode the data to publish on `{channel}`")]
    Encode {
        channel: String,
        #[source]
        source: Arc<serde_json::Error>,
    },
}

fn channel_suffix(channel: &Option<String>) -> String {
    channel.as_deref().map(|c| format!(" on `{c}`")).unwrap_or_default()
}

impl Error {
    /// The protocol error code of a [`Error::Server`] reply, when it is one Herald defines.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => ErrorCode::from_u16(*code),
            _ => None,
        }
    }

    /// Whether the same request may succeed later: transport trouble, timeouts, a dropped
    /// connection, or a server error whose code says so ([`ErrorCode::retryable`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use herald_client::Error;
    /// assert!(Error::Timeout { command: "publish", after: Duration::from_secs(10) }.is_retryable());
    /// assert!(!Error::Closed { code: 1000, reason: String::new() }.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::Disconnected { .. } | Self::Timeout { .. } => true,
            Self::Server { code, .. } => ErrorCode::from_u16(*code).is_none_or(ErrorCode::retryable),
            Self::InvalidUrl { .. }
            | Self::Closed { .. }
            | Self::Protocol { .. }
            | Self::AlreadySubscribed { .. }
            | Self::Encode { .. } => false,
        }
    }

    pub(crate) fn transport(url: &str, source: tokio_tungstenite::tungstenite::Error) -> Self {
        Self::Transport { url: url.to_owned(), source: Arc::new(source) }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Self::Protocol { message: message.into() }
    }
}
