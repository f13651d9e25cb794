//! Lifecycle webhooks: channel occupied/vacated, member added/removed, client events and
//! session connect/disconnect, POSTed in batches to each configured endpoint, in order, and
//! retried with backoff until delivered (at least once), from a bounded queue per endpoint.
//! See `docs/webhooks.md`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
                trusted_roots(&e.ca_file).map_err(|m| ("webhooks.endpoints", format!("endpoint {}: {m}", i + 1)))?;
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
struct Target {
    tls: bool,
    host: String,
    port: u16,
    /// The `Host` header.
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, String> {
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

/// One event, shared by the queues of every endpoint that wants it.
#[derive(Debug)]
struct Event {
    /// Unique on this node, growing in the order events were queued.
    seq: u64,
    time_ms: u64,
    queued: Instant,
    /// Roughly what the event holds, for `queue_bytes`.
    size: usize,
    body: EventBody,
}

#[derive(Debug)]
enum EventBody {
    Occupied { channel: String },
    Vacated { channel: String },
    MemberAdded { channel: String, user: String },
    MemberRemoved { channel: String, user: String },
    Client { channel: String, event: String, data: String, socket_id: Option<String>, user: Option<String> },
    Connect { user: String, client: String, transport: &'static str },
    Disconnect { user: String, client: String, transport: &'static str },
}

impl EventBody {
    fn channel(&self) -> Option<&str> {
        match self {
            Self::Occupied { channel }
            | Self::Vacated { channel }
            | Self::MemberAdded { channel, .. }
            | Self::MemberRemoved { channel, .. }
            | Self::Client { channel, .. } => Some(channel),
            Self::Connect { .. } | Self::Disconnect { .. } => None,
        }
    }

    fn size(&self) -> usize {
        let strings = match self {
            Self::Occupied { channel } | Self::Vacated { channel } => channel.len(),
            Self::MemberAdded { channel, user } | Self::MemberRemoved { channel, user } => channel.len() + user.len(),
            Self::Client { channel, event, data, socket_id, user } => {
                channel.len()
                    + event.len()
                    + data.len()
                    + socket_id.as_ref().map_or(0, String::len)
                    + user.as_ref().map_or(0, String::len)
            }
            Self::Connect { user, client, .. } | Self::Disconnect { user, client, .. } => user.len() + client.len(),
        };
        strings + std::mem::size_of::<Event>() + 16
    }

    fn name(&self) -> EventName {
        match self {
            Self::Occupied { .. } => EventName::ChannelOccupied,
            Self::Vacated { .. } => EventName::ChannelVacated,
            Self::MemberAdded { .. } => EventName::MemberAdded,
            Self::MemberRemoved { .. } => EventName::MemberRemoved,
            Self::Client { .. } => EventName::ClientEvent,
            Self::Connect { .. } => EventName::Connect,
            Self::Disconnect { .. } => EventName::Disconnect,
        }
    }
}

/// Bounds and timings shared by every endpoint's worker.
#[derive(Debug)]
struct Shared {
    settings: WebhooksConfig,
    /// Shutdown began: send what is queued without waiting for `batch_delay`.
    closing: CancellationToken,
    /// The shutdown bound passed: stop trying.
    abort: CancellationToken,
}

#[derive(Debug)]
struct Endpoint {
    config: EndpointConfig,
    target: Target,
    /// Index in `[[webhooks.endpoints]]`, for logs (never the URL).
    index: usize,
    queue: Mutex<Queue>,
    wake: Notify,
    /// TLS settings for `https://`, made on first use (`None`: no usable trust roots).
    tls: OnceLock<Option<Arc<rustls::ClientConfig>>>,
    /// For a `pusher` endpoint: its app's names for Herald channels (set by the Pusher door).
    names: OnceLock<ChannelNames>,
}

/// Turns a Herald channel into an app's name for it; `None` for a channel of no concern to
/// the app. See [`Webhooks::name_channels`].
#[derive(Clone)]
pub struct ChannelNames(Arc<NameFn>);

type NameFn = dyn Fn(&str) -> Option<String> + Send + Sync;

impl ChannelNames {
    pub fn new(names: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(names))
    }
}

impl std::fmt::Debug for ChannelNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelNames")
    }
}

/// The events waiting for one endpoint and their size.
#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
}

impl Queue {
    fn len(&self) -> usize {
        self.events.len()
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Takes up to `n` events from the front.
    fn take(&mut self, n: usize) -> Vec<Arc<Event>> {
        let n = n.min(self.events.len());
        let taken: Vec<Arc<Event>> = self.events.drain(..n).collect();
        self.bytes -= taken.iter().map(|e| e.size).sum::<usize>();
        taken
    }

    /// Appends `event`, first dropping the oldest events as long as the bounds would be
    /// passed; returns how many were dropped.
    fn push(&mut self, event: Arc<Event>, max_events: usize, max_bytes: usize) -> usize {
        let mut dropped = 0;
        while !self.events.is_empty() && (self.events.len() >= max_events || self.bytes + event.size > max_bytes) {
            if let Some(old) = self.events.pop_front() {
                self.bytes -= old.size;
                dropped += 1;
            }
        }
        self.bytes += event.size;
        self.events.push_back(event);
        dropped
    }
}

impl Endpoint {
    fn wants(&self, name: EventName) -> bool {
        let herald_only = matches!(name, EventName::Connect | EventName::Disconnect);
        if herald_only && self.config.format == WebhookFormat::Pusher {
            return false;
        }
        self.config.events.is_empty() || self.config.events.contains(&name)
    }

    /// Whether this endpoint's app has a name for `channel` (always, when no names are set).
    fn knows(&self, channel: Option<&str>) -> bool {
        match (self.names.get(), channel) {
            (Some(names), Some(c)) => (names.0)(c).is_some(),
            _ => true,
        }
    }

    /// The name this endpoint's receiver knows `channel` by.
    fn channel_name<'c>(&self, channel: &'c str) -> std::borrow::Cow<'c, str> {
        match self.names.get().and_then(|names| (names.0)(channel)) {
            Some(name) => name.into(),
            None => channel.into(),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Entries are pushed and popped whole; a poisoned lock is still consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// This node's webhooks: where lifecycle events are queued. With no endpoint configured
/// every method returns at once, before building anything.
#[derive(Debug)]
pub struct Webhooks {
    endpoints: Vec<Arc<Endpoint>>,
    shared: Arc<Shared>,
    /// Random per process: with the sequence number, an event id no other node or restart
    /// uses.
    node: String,
    /// The next sequence number; held while an event is queued on every endpoint, so each
    /// queue is in sequence order.
    next: Mutex<u64>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Webhooks {
    /// Endpoints from `config`; nothing runs until [`Webhooks::start`]. An endpoint with a bad
    /// URL (only in a config built in code: `Config::validate` checks them) is left out, loudly.
    pub fn new(config: &WebhooksConfig) -> Self {
        let endpoints = config
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(index, e)| match Target::parse(&e.url) {
                Ok(target) => Some(Arc::new(Endpoint {
                    config: e.clone(),
                    target,
                    index,
                    queue: Mutex::new(Queue::default()),
                    wake: Notify::new(),
                    tls: OnceLock::new(),
                    names: OnceLock::new(),
                })),
                Err(message) => {
                    tracing::error!(endpoint = index + 1, %message, "webhook endpoint left out");
                    None
                }
            })
            .collect();
        Self {
            endpoints,
            shared: Arc::new(Shared {
                settings: config.clone(),
                closing: CancellationToken::new(),
                abort: CancellationToken::new(),
            }),
            node: format!("{:016x}", rand::random::<u64>()),
            next: Mutex::new(1),
            workers: Mutex::new(Vec::new()),
        }
    }

    /// Gives the `pusher` endpoints whose `key` is `key` their app's channel names: their
    /// events then carry the app's name for each channel (`names` answers it), and events on
    /// channels `names` does not know are not sent to them. Called by the Pusher door at start,
    /// once per app; only the first call per endpoint counts.
    pub fn name_channels(&self, key: &str, names: ChannelNames) {
        for ep in &self.endpoints {
            if ep.config.format == WebhookFormat::Pusher && ep.config.key == key {
                let _ = ep.names.set(names.clone());
            }
        }
    }

    /// Whether any endpoint is configured.
    #[inline]
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// Starts one delivery task per endpoint (on the current tokio runtime).
    pub fn start(&self) {
        let mut workers = lock(&self.workers);
        for ep in &self.endpoints {
            let (ep, shared, node) = (ep.clone(), self.shared.clone(), self.node.clone());
            workers.push(tokio::spawn(deliver(ep, shared, node)));
        }
    }

    /// Delivers what is queued within `shutdown_timeout`, then stops. Events still queued
    /// are counted as dropped (`reason="shutdown"`).
    pub async fn shutdown(&self) {
        if !self.enabled() {
            return;
        }
        self.shared.closing.cancel();
        let workers: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.workers));
        let all = async {
            for w in workers {
                let _ = w.await;
            }
        };
        tokio::pin!(all);
        if tokio::time::timeout(self.shared.settings.shutdown_timeout, &mut all).await.is_err() {
            self.shared.abort.cancel();
            all.await;
        }
        let left: usize = self.endpoints.iter().map(|e| e.queue().take(usize::MAX).len()).sum();
        if left > 0 {
            metrics::counter!("herald_webhook_dropped_total", "reason" => "shutdown").increment(left as u64);
            tracing::warn!(events = left, "webhook events not delivered before the shutdown bound");
        }
    }

    /// Events waiting in every endpoint's queue.
    pub fn queued(&self) -> usize {
        self.endpoints.iter().map(|e| e.queue().len()).sum()
    }

    /// First subscriber of `channel` on this node.
    pub fn channel_occupied(&self, channel: &str) {
        if self.enabled() {
            self.emit(EventName::ChannelOccupied, || EventBody::Occupied { channel: channel.to_owned() });
        }
    }

    /// Last subscriber of `channel` on this node left.
    pub fn channel_vacated(&self, channel: &str) {
        if self.enabled() {
            self.emit(EventName::ChannelVacated, || EventBody::Vacated { channel: channel.to_owned() });
        }
    }

    /// The first connection of `user` joined the presence of `channel`.
    pub fn member_added(&self, channel: &str, user: &str) {
        if self.enabled() {
            self.emit(EventName::MemberAdded, || EventBody::MemberAdded {
                channel: channel.to_owned(),
                user: user.to_owned(),
            });
        }
    }

    /// The last connection of `user` left the presence of `channel`.
    pub fn member_removed(&self, channel: &str, user: &str) {
        if self.enabled() {
            self.emit(EventName::MemberRemoved, || EventBody::MemberRemoved {
                channel: channel.to_owned(),
                user: user.to_owned(),
            });
        }
    }

    /// A client event (Pusher `client-*`) sent on `channel`: `data` as the client sent it,
    /// `socket_id` of the sender, `user` on presence channels.
    pub fn client_event(&self, channel: &str, event: &str, data: &str, socket_id: Option<&str>, user: Option<&str>) {
        if self.enabled() {
            self.emit(EventName::ClientEvent, || EventBody::Client {
                channel: channel.to_owned(),
                event: event.to_owned(),
                data: data.to_owned(),
                socket_id: socket_id.map(str::to_owned),
                user: user.map(str::to_owned),
            });
        }
    }

    /// A session connected (`transport`: `native`, `pusher`, ...). Herald format only.
    pub fn connect(&self, user: &str, client: &str, transport: &'static str) {
        if self.enabled() {
            self.emit(EventName::Connect, || EventBody::Connect {
                user: user.to_owned(),
                client: client.to_owned(),
                transport,
            });
        }
    }

    /// A connected session ended. Herald format only.
    pub fn disconnect(&self, user: &str, client: &str, transport: &'static str) {
        if self.enabled() {
            self.emit(EventName::Disconnect, || EventBody::Disconnect {
                user: user.to_owned(),
                client: client.to_owned(),
                transport,
            });
        }
    }

    fn emit(&self, name: EventName, body: impl FnOnce() -> EventBody) {
        if !self.endpoints.iter().any(|e| e.wants(name)) {
            return;
        }
        let body = body();
        let channel = body.channel();
        let wanted: Vec<&Arc<Endpoint>> = self.endpoints.iter().filter(|e| e.wants(name) && e.knows(channel)).collect();
        if wanted.is_empty() {
            return;
        }
        let settings = &self.shared.settings;
        let mut next = lock(&self.next);
        let event = Arc::new(Event { seq: *next, time_ms: unix_ms(), queued: Instant::now(), size: body.size(), body });
        *next += 1;
        for ep in wanted {
            let dropped = ep.queue().push(event.clone(), settings.queue_size, settings.queue_bytes);
            if dropped > 0 {
                metrics::counter!("herald_webhook_dropped_total", "reason" => "queue_full").increment(dropped as u64);
            }
            ep.wake.notify_one();
        }
    }
}

impl crate::hub::Occupancy for Webhooks {
    fn occupied(&self, channel: &str) {
        self.channel_occupied(channel);
    }

    fn vacated(&self, channel: &str) {
        self.channel_vacated(channel);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One endpoint's delivery loop: a batch at a time, each retried until delivered or given up,
/// so events arrive in the order they were queued.
async fn deliver(ep: Arc<Endpoint>, shared: Arc<Shared>, node: String) {
    let settings = &shared.settings;
    let mut conn: Option<SendRequest<Body>> = None;
    loop {
        // Wait for an event (or for shutdown with nothing left to send).
        loop {
            if !ep.queue().is_empty() {
                break;
            }
            if shared.closing.is_cancelled() {
                return;
            }
            tokio::select! {
                () = ep.wake.notified() => {}
                () = shared.closing.cancelled() => {}
            }
        }
        if ep.queue().len() < settings.batch_size && !shared.closing.is_cancelled() {
            tokio::select! {
                () = tokio::time::sleep(settings.batch_delay) => {}
                () = shared.closing.cancelled() => {}
            }
        }
        let batch = ep.queue().take(settings.batch_size);
        let Some(first) = batch.first() else { continue };
        let body = Bytes::from(encode(&ep, &node, &batch));
        let signature = (!ep.config.secret.is_empty()).then(|| sign(ep.config.secret.expose(), &body));
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let sent = tokio::select! {
                r = tokio::time::timeout(settings.request_timeout, post(&ep, &mut conn, &body, signature.as_deref())) => r,
                () = shared.abort.cancelled() => {
                    give_up(&ep, batch.len(), "shutdown bound reached");
                    return;
                }
            };
            let result = match &sent {
                Ok(Ok(status)) if status.is_success() => "ok",
                Ok(Ok(_)) => "status",
                Ok(Err(_)) => "network",
                Err(_) => "timeout",
            };
            metrics::counter!("herald_webhook_requests_total", "result" => result).increment(1);
            if result == "ok" {
                tracing::trace!(endpoint = ep.index + 1, events = batch.len(), "webhook batch delivered");
                break;
            }
            // A connection that failed or answered an error is not reused.
            conn = None;
            match &sent {
                Ok(Ok(status)) => tracing::debug!(endpoint = ep.index + 1, %status, attempt, "webhook refused"),
                Ok(Err(e)) => tracing::debug!(endpoint = ep.index + 1, error = %e, attempt, "webhook not sent"),
                Err(_) => tracing::debug!(endpoint = ep.index + 1, attempt, "webhook request timed out"),
            }
            let too_many = settings.max_attempts > 0 && attempt >= settings.max_attempts;
            if too_many || first.queued.elapsed() >= settings.max_age {
                give_up(&ep, batch.len(), if too_many { "max_attempts reached" } else { "max_age reached" });
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff(settings, attempt)) => {}
                () = shared.abort.cancelled() => {
                    give_up(&ep, batch.len(), "shutdown bound reached");
                    return;
                }
            }
        }
    }
}

fn give_up(ep: &Endpoint, events: usize, why: &str) {
    metrics::counter!("herald_webhook_failures_total").increment(events as u64);
    tracing::warn!(endpoint = ep.index + 1, events, why, "webhook events given up");
}

/// The wait after failed attempt `attempt` (1-based): `retry_initial` doubled per attempt,
/// capped at `retry_max`, then a random part of up to half of it taken off.
fn backoff(settings: &WebhooksConfig, attempt: u32) -> Duration {
    let base = settings.retry_initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(settings.retry_max);
    let jitter = rand::random::<f64>() * 0.5;
    base.mul_f64(1.0 - jitter)
}

/// Hex HMAC-SHA256 of `body` under `secret`: Pusher's `X-Pusher-Signature`, and Herald's
/// `X-Herald-Signature` after `sha256=`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm is never taken.
        Err(_) => return String::new(),
    };
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// A request body: `{"time_ms":..,"events":[..]}` in the endpoint's format.
fn encode(ep: &Endpoint, node: &str, batch: &[Arc<Event>]) -> Vec<u8> {
    let events: Vec<serde_json::Value> = batch
        .iter()
        .map(|e| match ep.config.format {
            WebhookFormat::Pusher => pusher_event(e, |c| ep.channel_name(c)),
            WebhookFormat::Herald => herald_event(node, e),
        })
        .collect();
    serde_json::to_vec(&json!({ "time_ms": unix_ms(), "events": events })).unwrap_or_default()
}

fn pusher_event<'e>(e: &'e Event, names: impl Fn(&'e str) -> std::borrow::Cow<'e, str>) -> serde_json::Value {
    let mut v = serde_json::Map::new();
    v.insert("name".into(), json!(e.body.name().as_str()));
    if let Some(c) = e.body.channel() {
        v.insert("channel".into(), json!(names(c)));
    }
    match &e.body {
        EventBody::MemberAdded { user, .. } | EventBody::MemberRemoved { user, .. } => {
            v.insert("user_id".into(), json!(user));
        }
        EventBody::Client { event, data, socket_id, user, .. } => {
            v.insert("event".into(), json!(event));
            v.insert("data".into(), json!(data));
            if let Some(s) = socket_id {
                v.insert("socket_id".into(), json!(s));
            }
            if let Some(u) = user {
                v.insert("user_id".into(), json!(u));
            }
        }
        // Connect and disconnect are not queued for Pusher endpoints (`Endpoint::wants`).
        _ => {}
    }
    serde_json::Value::Object(v)
}

fn herald_event(node: &str, e: &Event) -> serde_json::Value {
    let mut v = json!({"id": format!("{node}-{}", e.seq), "time_ms": e.time_ms, "name": e.body.name().as_str()});
    let fields = match &e.body {
        EventBody::Occupied { channel } | EventBody::Vacated { channel } => json!({"channel": channel}),
        EventBody::MemberAdded { channel, user } | EventBody::MemberRemoved { channel, user } => {
            json!({"channel": channel, "user": user})
        }
        EventBody::Client { channel, event, data, socket_id, user } => {
            json!({"channel": channel, "event": event, "data": data, "socket_id": socket_id, "user": user})
        }
        EventBody::Connect { user, client, transport } | EventBody::Disconnect { user, client, transport } => {
            json!({"user": user, "client": client, "transport": transport})
        }
    };
    if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), fields) {
        obj.extend(extra);
    }
    v
}

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("TLS: no trusted root certificates (system store or ca_file)")]
    NoRoots,
    #[error("TLS: `{0}` is not a valid server name")]
    ServerName(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// POSTs `body` on the endpoint's kept-alive connection (made first when there is none).
async fn post(
    ep: &Endpoint,
    conn: &mut Option<SendRequest<Body>>,
    body: &Bytes,
    signature: Option<&str>,
) -> Result<http::StatusCode, PostError> {
    let sender = match conn {
        Some(s) if !s.is_closed() => s,
        _ => conn.insert(open(ep).await?),
    };
    sender.ready().await?;
    let mut req = http::Request::post(ep.target.path.as_str())
        .header(http::header::HOST, ep.target.authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, concat!("herald/", env!("CARGO_PKG_VERSION")));
    match ep.config.format {
        WebhookFormat::Pusher => {
            req = req.header("X-Pusher-Key", ep.config.key.as_str());
            if let Some(s) = signature {
                req = req.header("X-Pusher-Signature", s);
            }
        }
        WebhookFormat::Herald => {
            if let Some(s) = signature {
                req = req.header("X-Herald-Signature", format!("sha256={s}"));
            }
        }
    }
    let response = sender.send_request(req.body(Body::from(body.clone()))?).await?;
    let status = response.status();
    // Read (a bounded part of) the answer so the connection can carry the next request.
    if axum::body::to_bytes(Body::new(response.into_body()), 64 << 10).await.is_err() {
        *conn = None;
    }
    Ok(status)
}

async fn open(ep: &Endpoint) -> Result<SendRequest<Body>, PostError> {
    let target = &ep.target;
    let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if target.tls {
        let Some(config) = ep.tls.get_or_init(|| client_tls(&ep.config.ca_file)).clone() else {
            return Err(PostError::NoRoots);
        };
        let name = rustls_pki_types::ServerName::try_from(target.host.clone())
            .map_err(|_| PostError::ServerName(target.host.clone()))?;
        Box::new(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?)
    } else {
        Box::new(tcp)
    };
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the peer closes.
        let _ = connection.await;
    });
    Ok(sender)
}

/// The certificate authorities in PEM file `path`; the error names the file, never its content.
fn trusted_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("ca_file {} is not valid PEM: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("ca_file {} holds no PEM certificate", path.display()));
    }
    Ok(roots)
}

/// TLS for an `https://` endpoint: the roots of `ca_file`, or else the system's; rustls with
/// ring.
fn client_tls(ca_file: &std::path::Path) -> Option<Arc<rustls::ClientConfig>> {
    let roots = if ca_file.as_os_str().is_empty() {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "a system certificate could not be read");
        }
        roots.add_parsable_certificates(found.certs);
        roots
    } else {
        trusted_roots(ca_file).unwrap_or_else(|message| {
            tracing::error!(%message, "webhook ca_file not loaded");
            rustls::RootCertStore::empty()
        })
    };
    if roots.is_empty() {
        tracing::error!("no trusted root certificates found: https:// webhooks cannot be sent");
        return None;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hex_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn targets_are_parsed_and_bad_urls_refused() {
        let t = Target::parse("http://127.0.0.1:9000/hooks?x=1").expect("parses");
        assert_eq!((t.tls, t.host.as_str(), t.port, t.path.as_str()), (false, "127.0.0.1", 9000, "/hooks?x=1"));
        let t = Target::parse("https://example.com").expect("parses");
        assert_eq!((t.tls, t.port, t.path.as_str(), t.authority.as_str()), (true, 443, "/", "example.com"));
        for bad in ["ftp://x/", "example.com/hook", "", "http://user:pw@example.com/"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        let t = Target::parse("http://[::1]:8/").expect("parses");
        assert_eq!(t.host, "::1");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_below() {
        let s = WebhooksConfig {
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            ..Default::default()
        };
        for (attempt, full) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (40, 1000)] {
            let d = backoff(&s, attempt);
            let full = Duration::from_millis(full);
            assert!(d <= full && d >= full / 2, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn pusher_endpoints_need_a_key_and_a_secret_and_no_herald_only_events() {
        let mut c = WebhooksConfig::default();
        c.endpoints.push(EndpointConfig {
            url: "http://127.0.0.1/".into(),
            format: WebhookFormat::Pusher,
            ..Default::default()
        });
        assert!(c.validate().is_err());
        c.endpoints[0].key = "k".into();
        c.endpoints[0].secret = Secret::new("s");
        assert_eq!(c.validate(), Ok(()));
        c.endpoints[0].events = vec![EventName::Connect];
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_full_queue_drops_its_oldest_event() {
        let c = WebhooksConfig {
            queue_size: 2,
            endpoints: vec![EndpointConfig { url: "http://127.0.0.1:1/".into(), ..Default::default() }],
            ..Default::default()
        };
        let w = Webhooks::new(&c);
        for ch in ["a", "b", "c"] {
            w.channel_occupied(ch);
        }
        let queue = w.endpoints[0].queue();
        let seqs: Vec<u64> = queue.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 3]);
    }

    #[test]
    fn a_queue_is_bounded_in_bytes_too() {
        let c = WebhooksConfig {
            queue_bytes: 4096,
            endpoints: vec![EndpointConfig { url: "http://127.0.0.1:1/".into(), ..Default::default() }],
            ..Default::default()
        };
        let w = Webhooks::new(&c);
        let data = "x".repeat(1000);
        for _ in 0..10 {
            w.client_event("private-a", "client-x", &data, None, None);
        }
        let queue = w.endpoints[0].queue();
        assert_eq!(queue.len(), 3, "three events of about 1.1 KB fit in 4 KiB");
        assert!(queue.bytes <= 4096);
        assert_eq!(queue.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [8, 9, 10], "the newest kept");
        drop(queue);
        assert_eq!(w.endpoints[0].queue().take(usize::MAX).len(), 3);
        assert_eq!(w.endpoints[0].queue().bytes, 0);
    }

    fn endpoint(format: WebhookFormat) -> Arc<Endpoint> {
        let c = WebhooksConfig {
            endpoints: vec![EndpointConfig {
                url: "http://127.0.0.1:1/".into(),
                format,
                key: "app-key".into(),
                secret: Secret::new("s"),
                ..Default::default()
            }],
            ..Default::default()
        };
        Webhooks::new(&c).endpoints[0].clone()
    }

    #[test]
    fn pusher_endpoints_get_their_apps_channels_under_the_apps_names() {
        let c = WebhooksConfig {
            endpoints: vec![
                EndpointConfig {
                    url: "http://127.0.0.1:1/a".into(),
                    format: WebhookFormat::Pusher,
                    key: "key-a".into(),
                    secret: Secret::new("s"),
                    ..Default::default()
                },
                EndpointConfig { url: "http://127.0.0.1:1/herald".into(), ..Default::default() },
            ],
            ..Default::default()
        };
        let w = Webhooks::new(&c);
        let names = ChannelNames::new(|c: &str| c.strip_prefix("app-a:").map(str::to_owned));
        w.name_channels("key-b", names.clone());
        assert!(w.endpoints[0].names.get().is_none(), "another app's key");
        w.name_channels("key-a", names);
        w.channel_occupied("app-a:presence-room");
        w.channel_occupied("app-b:news");
        w.member_added("app-a:presence-room", "42");
        assert_eq!(w.endpoints[0].queue().len(), 2, "only app a's channels");
        assert_eq!(w.endpoints[1].queue().len(), 3, "the Herald endpoint gets every channel");
        let batch = w.endpoints[0].queue().take(10);
        let body: serde_json::Value = serde_json::from_slice(&encode(&w.endpoints[0], "n", &batch)).expect("json");
        assert_eq!(
            body["events"],
            json!([
                {"name": "channel_occupied", "channel": "presence-room"},
                {"name": "member_added", "channel": "presence-room", "user_id": "42"},
            ])
        );
        let batch = w.endpoints[1].queue().take(10);
        let body: serde_json::Value = serde_json::from_slice(&encode(&w.endpoints[1], "n", &batch)).expect("json");
        assert_eq!(body["events"][0]["channel"], "app-a:presence-room");
    }

    #[test]
    fn events_are_encoded_as_each_format_documents() {
        let event = |seq, body| Arc::new(Event { seq, time_ms: 7, queued: Instant::now(), size: 0, body });
        let batch = [
            event(1, EventBody::Occupied { channel: "presence-a".into() }),
            event(2, EventBody::MemberAdded { channel: "presence-a".into(), user: "42".into() }),
            event(
                3,
                EventBody::Client {
                    channel: "presence-a".into(),
                    event: "client-typing".into(),
                    data: "{\"on\":true}".into(),
                    socket_id: Some("1.2".into()),
                    user: Some("42".into()),
                },
            ),
            event(4, EventBody::Connect { user: "42".into(), client: "c1".into(), transport: "native" }),
        ];
        let pusher: serde_json::Value =
            serde_json::from_slice(&encode(&endpoint(WebhookFormat::Pusher), "n", &batch[..3])).expect("json");
        assert!(pusher["time_ms"].as_u64().is_some());
        assert_eq!(
            pusher["events"],
            json!([
                {"name": "channel_occupied", "channel": "presence-a"},
                {"name": "member_added", "channel": "presence-a", "user_id": "42"},
                {"name": "client_event", "channel": "presence-a", "event": "client-typing", "data": "{\"on\":true}",
                 "socket_id": "1.2", "user_id": "42"},
            ])
        );
        let herald: serde_json::Value =
            serde_json::from_slice(&encode(&endpoint(WebhookFormat::Herald), "n", &batch)).expect("json");
        assert_eq!(
            herald["events"],
            json!([
                {"id": "n-1", "time_ms": 7, "name": "channel_occupied", "channel": "presence-a"},
                {"id": "n-2", "time_ms": 7, "name": "member_added", "channel": "presence-a", "user": "42"},
                {"id": "n-3", "time_ms": 7, "name": "client_event", "channel": "presence-a", "event": "client-typing",
                 "data": "{\"on\":true}", "socket_id": "1.2", "user": "42"},
                {"id": "n-4", "time_ms": 7, "name": "connect", "user": "42", "client": "c1", "transport": "native"},
            ])
        );
    }

    #[test]
    fn nothing_is_queued_without_endpoints_or_for_unwanted_events() {
        let w = Webhooks::new(&WebhooksConfig::default());
        w.connect("u", "c", "native");
        assert_eq!(w.queued(), 0);
        let c = WebhooksConfig {
            endpoints: vec![EndpointConfig {
                url: "http://127.0.0.1:1/".into(),
                events: vec![EventName::MemberAdded],
                ..Default::default()
            }],
            ..Default::default()
        };
        let w = Webhooks::new(&c);
        w.connect("u", "c", "native");
        w.channel_occupied("x");
        assert_eq!(w.queued(), 0);
        w.member_added("x", "u");
        assert_eq!(w.queued(), 1);
    }

    #[test]
    fn endpoints_are_tables_in_the_config_file() {
        let config: crate::Config = toml::from_str(
            r#"
            [webhooks]
            batch_size = 10
            [[webhooks.endpoints]]
            url = "https://hooks.example.com/herald"
            secret = "s1"
            [[webhooks.endpoints]]
            url = "http://127.0.0.1:9000/pusher"
            format = "pusher"
            key = "app-key"
            secret = "s2"
            events = ["channel_occupied", "channel_vacated"]
            "#,
        )
        .expect("parses");
        let e = &config.webhooks.endpoints;
        assert_eq!((e.len(), e[0].format, e[1].format), (2, WebhookFormat::Herald, WebhookFormat::Pusher));
        assert_eq!(e[1].events, [EventName::ChannelOccupied, EventName::ChannelVacated]);
        assert_eq!(config.validate().map_err(|e| e.to_string()), Ok(()));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closures return its large error type
    fn check_config_hides_endpoints_and_env_can_set_them() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "herald.toml",
                "[[webhooks.endpoints]]\nurl = \"https://hooks.example.com/t/abcdef\"\nsecret = \"hunter2\"\n",
            )?;
            let overrides = crate::config::Overrides::default();
            let loaded = crate::config::load(Some(std::path::Path::new("herald.toml")), &overrides).expect("loads");
            assert_eq!(loaded.config.webhooks.endpoints.len(), 1);
            let explained = loaded.explain();
            assert!(explained.contains("webhooks.endpoints = [\"<redacted>\"]"), "{explained}");
            assert!(!explained.contains("hunter2") && !explained.contains("abcdef"), "{explained}");

            jail.set_env("HERALD_WEBHOOKS__ENDPOINTS", r#"[{url="http://127.0.0.1:9/h",format="pusher",key="k"}]"#);
            let e = crate::config::load(Some(std::path::Path::new("herald.toml")), &overrides)
                .and_then(|l| l.config.validate().map(|()| l))
                .expect_err("a pusher endpoint without a secret");
            assert!(e.to_string().contains("`pusher` needs `key` and `secret`"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn debug_output_hides_secrets_and_url_paths() {
        let e = EndpointConfig {
            url: "https://hooks.example.com/t/abcdef?token=xyz".into(),
            secret: Secret::new("hunter2"),
            ..Default::default()
        };
        let s = format!("{e:?}");
        assert!(!s.contains("hunter2") && !s.contains("abcdef") && !s.contains("xyz"), "{s}");
    }
}
