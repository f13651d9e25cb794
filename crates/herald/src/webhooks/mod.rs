//! Lifecycle webhooks: channel occupied/vacated, member added/removed, client events and
//! session connect/disconnect, POSTed in batches to each configured endpoint, in order, and
//! retried with backoff until delivered (at least once), from a bounded queue per endpoint.
//! See `docs/webhooks.md`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod config;
mod send;
#[cfg(test)]
mod tests;

use config::Target;
pub use config::{EndpointConfig, EventName, WebhookFormat, WebhooksConfig};
pub use send::sign;

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

    /// Whether this endpoint's format shows `body`: Pusher's has no anonymous members (every
    /// member there has a `user_id`), so an anonymous connection's presence (user `""`) is
    /// not sent to a `pusher` endpoint.
    fn shows(&self, body: &EventBody) -> bool {
        match body {
            EventBody::MemberAdded { user, .. } | EventBody::MemberRemoved { user, .. } => {
                !user.is_empty() || self.config.format != WebhookFormat::Pusher
            }
            _ => true,
        }
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

    /// Tells the endpoints of each Pusher app (`format = "pusher"` endpoints with the app's
    /// key) the app's names for Herald channels, so their events carry Pusher names and only
    /// the app's channels.
    pub fn name_pusher_apps(&self, apps: &[crate::doors::pusher::PusherApp]) {
        for app in apps {
            let key = app.key.clone();
            let app = app.clone();
            let names = ChannelNames::new(move |c| app.pusher_name(c).map(std::borrow::Cow::into_owned));
            self.name_channels(&key, names);
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
            workers.push(tokio::spawn(send::deliver(ep, shared, node)));
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
        let wanted: Vec<&Arc<Endpoint>> =
            self.endpoints.iter().filter(|e| e.wants(name) && e.knows(channel) && e.shows(&body)).collect();
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
