//! `[webhooks]`: endpoints, formats, event names and bounds, checked by `Config::validate`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// `[webhooks]`: see docs/webhooks.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Where to POST lifecycle events; none by default (then webhooks cost nothing). Each
    /// endpoint is a table `[[webhooks.endpoints]]` with `url` (`http://` or `https://`, trusted
    /// through the system's certificate store), `format` (`herald`, the default, or `pusher`),
    /// `ca_file` (PEM certificate authorities to trust instead of the system's, for an
    /// `https://` endpoint with a private CA), `secret` (signs each request: `X-Herald-Signature: sha256=<hex>` or, for `pusher`,
    /// `X-Pusher-Signature`; required for `pusher`), `key` (the Pusher app key sent as
    /// `X-Pusher-Key`; required for `pusher`) and `events` (names to send, e.g.
    /// `["member_added", "member_removed"]`; empty, the default, sends every event the
    /// format has). `check-config` does not print endpoints: URLs and secrets may carry
    /// credentials. Each endpoint has its own queue and delivers in order.
    #[schemars(with = "Vec<EndpointConfig>")]
    pub endpoints: Vec<EndpointConfig>,
    /// Most events waiting per endpoint (not counting the batch being sent). When the queue
    /// is full, the oldest waiting event is dropped and counted in
    /// `herald_webhook_dropped_total`.
    pub queue_size: usize,
    /// Most bytes of events waiting per endpoint (event data counted with a small overhead
    /// per event); beyond it the oldest waiting events are dropped the same way.
    pub queue_bytes: usize,
    /// Most events in one request.
    pub batch_size: usize,
    /// How long the first event of a batch waits for others before the request is sent.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub batch_delay: Duration,
    /// Longest wait for an endpoint to connect and answer one request. A request that takes
    /// longer counts as failed and is sent again, so the receiver may see that batch twice.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_timeout: Duration,
    /// Wait before the first retry of a failed request (network error, timeout or a status
    /// other than 2xx); it doubles with each retry up to `retry_max`, each wait jittered
    /// down by up to half so that nodes do not retry in step.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub retry_initial: Duration,
    /// Longest wait between two attempts of one request.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub retry_max: Duration,
    /// Attempts of one batch before it is given up and its events counted in
    /// `herald_webhook_failures_total`; 0 means no limit (only `max_age` gives up).
    pub max_attempts: u32,
    /// A batch whose oldest event waited longer than this is given up after its next failed
    /// attempt and counted in `herald_webhook_failures_total`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_age: Duration,
    /// On shutdown, how long to keep delivering what is queued (after clients were
    /// disconnected, so their `disconnect` events are included). What is left is counted in
    /// `herald_webhook_dropped_total`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub shutdown_timeout: Duration,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            queue_size: 10_000,
            queue_bytes: 16 << 20,
            batch_size: 100,
            batch_delay: Duration::from_millis(50),
            request_timeout: Duration::from_secs(10),
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            max_attempts: 0,
            max_age: Duration::from_secs(3600),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// One `[[webhooks.endpoints]]`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointConfig {
    /// `http://host[:port]/path` or `https://...` to POST events to.
    pub url: String,
    /// `herald` (Herald's own JSON, every event) or `pusher` (Pusher Channels' webhook JSON).
    pub format: WebhookFormat,
    /// Pusher app key, sent as `X-Pusher-Key` (format `pusher`).
    pub key: String,
    /// Signs each request body with HMAC-SHA256 (hex). Required for `pusher` (the app's
    /// secret); optional for `herald`.
    #[schemars(with = "String")]
    pub secret: Secret,
    /// Events to send; empty sends every event the format has.
    pub events: Vec<EventName>,
    /// For an `https://` endpoint: a PEM file of the certificate authorities to trust instead
    /// of the system's store (a private CA). Empty: the system's store.
    #[schemars(with = "String")]
    pub ca_file: std::path::PathBuf,
}

impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a token in its path or query: only the scheme and host are shown.
        f.debug_struct("EndpointConfig")
            .field("url", &redacted_url(&self.url))
            .field("format", &self.format)
            .field("key", &self.key)
            .field("secret", &self.secret)
            .field("events", &self.events)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Which JSON an endpoint receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    #[default]
    Herald,
    Pusher,
}

/// The name of a lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventName {
    ChannelOccupied,
    ChannelVacated,
    MemberAdded,
    MemberRemoved,
    ClientEvent,
    Connect,
    Disconnect,
}

impl EventName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChannelOccupied => "channel_occupied",
            Self::ChannelVacated => "channel_vacated",
            Self::MemberAdded => "member_added",
            Self::MemberRemoved => "member_removed",
            Self::ClientEvent => "client_event",
            Self::Connect => "connect",
            Self::Disconnect => "disconnect",
        }
    }
}

impl WebhooksConfig {
    /// Checks what types alone cannot express: (key, message) of the first problem.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let check =
            |ok: bool, key: &'static str, message: &str| if ok { Ok(()) } else { Err((key, message.to_owned())) };
        check(self.queue_size >= 1, "webhooks.queue_size", "must be at least 1")?;
        check(self.queue_bytes >= 1024, "webhooks.queue_bytes", "must be at least 1024 bytes")?;
        check(self.batch_size >= 1, "webhooks.batch_size", "must be at least 1")?;
        check(!self.request_timeout.is_zero(), "webhooks.request_timeout", "must be greater than zero")?;
        check(!self.retry_initial.is_zero(), "webhooks.retry_initial", "must be greater than zero")?;
        check(self.retry_max >= self.retry_initial, "webhooks.retry_max", "must be at least retry_initial")?;
        for (i, e) in self.endpoints.iter().enumerate() {
            let target =
                Target::parse(&e.url).map_err(|m| ("webhooks.endpoints", format!("endpoint {}: {m}", i + 1)))?;
            if !e.ca_file.as_os_str().is_empty() {
                check(
                    target.tls,
                    "webhooks.endpoints",
                    &format!("endpoint {}: `ca_file` needs an https:// URL", i + 1),
                )?;
                super::send::trusted_roots(&e.ca_file)
                    .map_err(|m| ("webhooks.endpoints", format!("endpoint {}: {m}", i + 1)))?;
            }
            if e.format == WebhookFormat::Pusher {
                let ok = !e.key.is_empty() && !e.secret.is_empty();
                check(
                    ok,
                    "webhooks.endpoints",
                    &format!("endpoint {}: format `pusher` needs `key` and `secret`", i + 1),
                )?;
                let herald_only = e.events.iter().find(|n| matches!(n, EventName::Connect | EventName::Disconnect));
                if let Some(n) = herald_only {
                    let message = format!("endpoint {}: Pusher's format has no `{}` event", i + 1, n.as_str());
                    return Err(("webhooks.endpoints", message));
                }
            }
        }
        Ok(())
    }
}

/// Where an endpoint's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) tls: bool,
    pub(super) host: String,
    pub(super) port: u16,
    /// The `Host` header.
    pub(super) authority: String,
    pub(super) path: String,
}

impl Target {
    pub(super) fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|_| format!("`{}` is not a URL", redacted_url(url)))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("`{}` must start with http:// or https://", redacted_url(url))),
        };
        let Some(authority) = uri.authority() else {
            return Err(format!("`{}` has no host", redacted_url(url)));
        };
        if authority.as_str().contains('@') {
            return Err("must not carry a user or password (use `secret` to authenticate requests)".into());
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Self { tls, host, port, authority: authority.as_str().to_owned(), path })
    }
}

/// The scheme and host of `url`, for messages: its path or query may hold a token.
fn redacted_url(url: &str) -> String {
    match url.parse::<http::Uri>() {
        Ok(u) => format!("{}://{}/…", u.scheme_str().unwrap_or("?"), u.host().unwrap_or("?")),
        Err(_) => "<not a URL>".into(),
    }
}
