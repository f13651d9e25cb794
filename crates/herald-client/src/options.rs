//! What a [`Client`](crate::Client) sends in `connect` and how it times, retries and buffers.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Options for [`Client::connect`](crate::Client::connect). Start from the defaults and
/// change what you need.
///
/// ```
/// use std::time::Duration;
/// use herald_client::ClientOptions;
///
/// let options = ClientOptions::default()
///     .token("eyJhbGciOiJIUzI1NiJ9.e30.sig")
///     .name("ticker")
///     .request_timeout(Duration::from_secs(5))
///     .subscription_buffer(256);
/// assert_eq!(options.get_request_timeout(), Duration::from_secs(5));
/// // The token never shows in logs.
/// assert!(!format!("{options:?}").contains("eyJ"));
/// ```
#[derive(Clone)]
pub struct ClientOptions {
    pub(crate) token: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) request_timeout: Duration,
    pub(crate) ping_margin: Duration,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) subscription_buffer: usize,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            token: None,
            name: None,
            version: None,
            request_timeout: Duration::from_secs(10),
            ping_margin: Duration::from_secs(10),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(20),
            subscription_buffer: 1024,
            tls: None,
        }
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("name", &self.name)
            .field("version", &self.version)
            .field("request_timeout", &self.request_timeout)
            .field("ping_margin", &self.ping_margin)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("subscription_buffer", &self.subscription_buffer)
            .field("tls", &if self.tls.is_some() { "given" } else { "default" })
            .finish()
    }
}

impl ClientOptions {
    /// The connection token (a JWT) sent in `connect`. Default: none (anonymous).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The client name sent in `connect`, shown in the server's logs. Default: none.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The client version sent in `connect`. Default: none.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// How long a request (`connect`, `subscribe`, `unsubscribe`, `publish`) waits for its
    /// reply, including the time it waits for the connection while the client reconnects.
    /// Also bounds one socket write and the closing handshake. Default: 10 s; at least 1 ms.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The configured request timeout.
    pub fn get_request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Slack added to the server's ping interval (from the `connect` reply): when no frame at
    /// all arrives for `ping + margin`, the server is taken for dead and the client
    /// reconnects. Default: 10 s.
    pub fn ping_margin(mut self, margin: Duration) -> Self {
        self.ping_margin = margin;
        self
    }

    /// Reconnect backoff: the n-th attempt in a row (from 0) waits a random time between zero
    /// and `min(max, base * 2^n)` ("full jitter"), so a restarted server is not hit by every
    /// client at once. Defaults: base 250 ms, max 20 s.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// How many events each [`Subscription`](crate::Subscription) buffers before the client
    /// stops reading the connection until the application catches up (see the crate docs on
    /// backpressure). Default: 1024; at least 1.
    pub fn subscription_buffer(mut self, events: usize) -> Self {
        self.subscription_buffer = events.max(1);
        self
    }

    /// The TLS settings for `wss://` URLs (e.g. with the root certificate of a private CA
    /// added). Default: rustls with the ring provider, trusting the system's root certificates
    /// (read by `rustls-native-certs`, which honours `SSL_CERT_FILE` and `SSL_CERT_DIR`); see
    /// [`tls::client_config`](crate::tls::client_config). Not used for `ws://`.
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}
