//! The Redis engine: several Herald nodes share channels, history and presence through one
//! Redis.
//!
//! **Keys.** Everything of a channel lives under one hash tag, `{<prefix>:<channel>}`, so a
//! Redis Cluster keeps a channel's keys (and its sharded pub/sub channel) in one slot:
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `{p:c}:meta` | hash | `e` epoch, `o` last offset, `l` history TTL (ms) |
//! | `{p:c}:stream` | stream | history: entry id `0-<offset>`, fields `b` (body), `t` (ms) |
//! | `{p:c}:pub` | pub/sub channel | publications and join/leave pushes |
//! | `{p:c}:presence` | hash | client → user and connection info |
//! | `{p:c}:presence:exp` | sorted set | client → expiry (ms) |
//! | `{p:c}:presence:users` | hash | user → connections present |
//! | `{p}:base` | string | random part of every epoch of this prefix |
//!
//! **Publish** is one Lua script: it assigns the offset, stores the publication (trimmed by
//! size and age), refreshes the TTLs and PUBLISHes it with its epoch and offset: one round
//! trip, atomic. Deliveries come back through one pub/sub connection per node, subscribed to
//! the channels that have local subscribers ([`Engine::listen`]). That link checks every
//! publication's offset against the last one it delivered: a gap (a reconnect, a lost
//! message) is filled from the stream in order, or, when the stream no longer has it, the
//! local subscribers are told to recover ([`Delivery::lost`]).
//!
//! **Epochs** are `<base>-<window>`: `base` is random per prefix (a flushed Redis gets a new
//! one), `window` the number of the 5-minute period in which the stream was created, by
//! Redis's clock. A read of a channel without a stream writes nothing and reports the epoch a
//! stream created now would get. A stream's metadata outlives its last publication by at
//! least one window, so a stream that is forgotten and recreated lands in a later window: its
//! epoch is new, and stale positions never match it. The price: a client that subscribed to
//! an empty channel in one window and got its first publication in a later one holds the
//! older epoch, so its next recovery says `recovered: false` (never a false recovery).
//!
//! Every call is bounded by `timeout`; failures are [`EngineError::Unavailable`]. A publish
//! that timed out may still have been stored (Redis may have run it): the caller cannot know.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use herald_protocol::ClientInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Script};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

mod scripts;
#[doc(hidden)]
pub mod test_server;

use self::scripts::{
    HISTORY_LUA, PRESENCE_ADD_LUA, PRESENCE_COMMON_LUA, PRESENCE_EXPIRE_LUA, PRESENCE_LUA, PRESENCE_REMOVE_LUA,
    PUBLISH_LUA,
};
use super::{
    Delivery, Engine, EngineError, EngineStats, History, HistoryPolicy, HistoryQuery, PresenceChange, PresenceEntry,
    PresenceStats, PublicationRecord, Publish, StreamPosition,
};

/// Length of an epoch window, and the least time a channel's metadata outlives its last
/// publication (the second makes recreated streams land in a later window).
const EPOCH_WINDOW_SECS: u64 = 300;

/// Most publications the link reads back from a stream to fill one gap.
const CATCH_UP_MAX: usize = 10_000;

/// How often the pub/sub link is pinged, to notice a silent network failure.
const PING_EVERY: Duration = Duration::from_secs(2);

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisSettings {
    pub url: String,
    pub password: String,
    pub prefix: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.url)
            .field("password", &if self.password.is_empty() { "" } else { "<redacted>" })
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl From<&crate::config::RedisConfig> for RedisSettings {
    fn from(c: &crate::config::RedisConfig) -> Self {
        Self {
            url: c.url.clone(),
            password: c.password.expose().to_owned(),
            prefix: c.prefix.clone(),
            timeout: c.timeout,
        }
    }
}

impl RedisSettings {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self { url: url.into(), password: String::new(), prefix: prefix.into(), timeout: Duration::from_secs(1) }
    }

    /// A Redis client for these settings (connects nothing yet).
    pub fn client(&self) -> Result<redis::Client, EngineError> {
        let bad = |e: redis::RedisError| EngineError::Unavailable(format!("bad Redis URL: {e}"));
        let mut info = self.url.as_str().into_connection_info().map_err(bad)?;
        if !self.password.is_empty() {
            let settings = info.redis_settings().clone().set_password(&self.password);
            info = info.set_redis_settings(settings);
        }
        redis::Client::open(info).map_err(bad)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Entries are inserted, changed and removed whole; a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A channel this node listens to.
#[derive(Debug)]
struct Listening {
    /// Whether the pub/sub link is subscribed to it now.
    up: watch::Sender<bool>,
    /// The last position delivered (or, before the first delivery, read): the next
    /// publication must continue it.
    last: Option<StreamPosition>,
}

#[derive(Debug)]
enum Cmd {
    Subscribe(String),
    Unsubscribe(String),
}

struct Inner {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    conn: Mutex<Option<ConnectionManager>>,
    connecting: tokio::sync::Mutex<()>,
    base: Mutex<Option<Arc<str>>>,
    delivery: OnceLock<Arc<dyn Delivery>>,
    listening: Mutex<HashMap<String, Listening>>,
    cmds: mpsc::UnboundedSender<Cmd>,
    scripts: Scripts,
}

struct Scripts {
    publish: Script,
    history: Script,
    presence_add: Script,
    presence_remove: Script,
    presence_expire: Script,
    presence: Script,
}

/// The Redis engine. Cheap to share; dropping it stops its pub/sub link.
pub struct RedisEngine {
    inner: Arc<Inner>,
    stop: CancellationToken,
    /// The test server this engine's tests run against, stopped with the engine.
    #[cfg(test)]
    server: Option<test_server::RedisServer>,
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine").field("prefix", &self.inner.prefix).finish_non_exhaustive()
    }
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(format!("redis: {e}"))
}

impl RedisEngine {
    /// Starts the engine (its pub/sub link connects in the background; calls fail with
    /// `Unavailable` until Redis answers). Needs a tokio runtime.
    pub fn new(settings: RedisSettings) -> Result<Self, EngineError> {
        let client = settings.client()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| EngineError::Unavailable("the Redis engine needs a tokio runtime".into()))?;
        let (cmds, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            client,
            prefix: settings.prefix,
            timeout: settings.timeout,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            base: Mutex::new(None),
            delivery: OnceLock::new(),
            listening: Mutex::new(HashMap::new()),
            cmds,
            scripts: Scripts {
                publish: Script::new(PUBLISH_LUA),
                history: Script::new(HISTORY_LUA),
                presence_add: Script::new(&format!("{PRESENCE_COMMON_LUA}{PRESENCE_ADD_LUA}")),
                presence_remove: Script::new(&format!("{PRESENCE_COMMON_LUA}{PRESENCE_REMOVE_LUA}")),
                presence_expire: Script::new(&format!("{PRESENCE_COMMON_LUA}{PRESENCE_EXPIRE_LUA}")),
                presence: Script::new(PRESENCE_LUA),
            },
        });
        let stop = CancellationToken::new();
        runtime.spawn(link(inner.clone(), rx, stop.clone()));
        Ok(Self {
            inner,
            stop,
            #[cfg(test)]
            server: None,
        })
    }

    /// Channels this node listens to now (for tests and diagnostics).
    pub fn listening_count(&self) -> usize {
        lock(&self.inner.listening).len()
    }
}

impl Inner {
    fn key(&self, channel: &str, suffix: &str) -> String {
        format!("{{{}:{}}}:{}", self.prefix, channel, suffix)
    }

    fn channel_of<'a>(&self, pubsub: &'a str) -> Option<&'a str> {
        pubsub.strip_prefix('{')?.strip_prefix(self.prefix.as_str())?.strip_prefix(':')?.strip_suffix("}:pub")
    }

    /// Runs `f` within the timeout.
    async fn bounded<T>(&self, f: impl std::future::Future<Output = Result<T, EngineError>>) -> Result<T, EngineError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(EngineError::Unavailable(format!("redis did not answer within {:?}", self.timeout))),
        }
    }

    async fn conn(&self) -> Result<ConnectionManager, EngineError> {
        if let Some(c) = lock(&self.conn).clone() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = lock(&self.conn).clone() {
            return Ok(c);
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let c = self.client.get_connection_manager_with_config(config).await.map_err(unavailable)?;
        *lock(&self.conn) = Some(c.clone());
        Ok(c)
    }

    /// The random part of this prefix's epochs, created by the first node that asks.
    async fn base(&self, refresh: bool) -> Result<Arc<str>, EngineError> {
        if !refresh {
            if let Some(b) = lock(&self.base).clone() {
                return Ok(b);
            }
        }
        let mut conn = self.conn().await?;
        let key = format!("{{{}}}:base", self.prefix);
        let fresh = format!("{:08x}", rand::random::<u32>());
        let _: () =
            redis::cmd("SET").arg(&key).arg(&fresh).arg("NX").query_async(&mut conn).await.map_err(unavailable)?;
        let base: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.map_err(unavailable)?;
        let base: Arc<str> = Arc::from(base.as_str());
        *lock(&self.base) = Some(base.clone());
        Ok(base)
    }

    async fn publish(
        &self,
        channel: &str,
        publication: Publish,
        policy: HistoryPolicy,
    ) -> Result<StreamPosition, EngineError> {
        // Tags and the live exclusion do not cross Redis yet.
        let Publish { data, info, .. } = publication;
        let base = self.base(false).await?;
        let mut conn = self.conn().await?;
        let life_ms = policy.ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
        let (epoch, offset): (String, u64) = self
            .scripts
            .publish
            .key(self.key(channel, "meta"))
            .key(self.key(channel, "stream"))
            .arg(&*base)
            .arg(EPOCH_WINDOW_SECS)
            .arg(policy.size)
            .arg(life_ms)
            .arg(EPOCH_WINDOW_SECS * 1000)
            .arg(encode_body(info.as_ref(), &data))
            .arg(self.key(channel, "pub"))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(StreamPosition { epoch: Arc::from(epoch.as_str()), offset })
    }

    async fn history(&self, channel: &str, query: HistoryQuery) -> Result<History, EngineError> {
        let base = self.base(false).await?;
        let mut conn = self.conn().await?;
        let (since_epoch, since_offset) = match &query.since {
            Some(p) => (p.epoch.to_string(), p.offset.to_string()),
            None => (String::new(), "-1".to_owned()),
        };
        type Raw = (String, u64, u8, Vec<(u64, Vec<u8>)>);
        let (epoch, offset, complete, entries): Raw = self
            .scripts
            .history
            .key(self.key(channel, "meta"))
            .key(self.key(channel, "stream"))
            .arg(&*base)
            .arg(EPOCH_WINDOW_SECS)
            .arg(since_epoch)
            .arg(since_offset)
            .arg(query.limit)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut publications = Vec::with_capacity(entries.len());
        for (offset, body) in entries {
            let (info, data) = decode_body(Bytes::from(body))
                .ok_or_else(|| EngineError::Unavailable(format!("redis: unreadable history entry in `{channel}`")))?;
            publications.push(PublicationRecord { offset, data, info, ..Default::default() });
        }
        if query.reverse {
            publications.reverse();
        }
        Ok(History {
            position: StreamPosition { epoch: Arc::from(epoch.as_str()), offset },
            publications,
            complete: complete == 1,
        })
    }

    fn presence_keys<'a>(&self, script: &'a Script, channel: &str) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(self.key(channel, "presence"))
            .key(self.key(channel, "presence:exp"))
            .key(self.key(channel, "presence:users"));
        inv
    }

    async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, EngineError> {
        let mut conn = self.conn().await?;
        let raw: Vec<(String, Vec<u8>)> =
            self.presence_keys(&self.scripts.presence, channel).invoke_async(&mut conn).await.map_err(unavailable)?;
        let mut list: Vec<PresenceEntry> = raw.into_iter().filter_map(|(c, v)| decode_presence(c, &v)).collect();
        list.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(list)
    }

    /// Reads what `channel` missed since the last delivered position and delivers it, in
    /// order; when it cannot (history gone, Redis failing), the subscribers are told to
    /// recover. Runs on the link task only, so deliveries keep one order.
    async fn catch_up(&self, channel: &str) {
        let Some(since) = lock(&self.listening).get(channel).and_then(|l| l.last.clone()) else { return };
        let query = HistoryQuery { since: Some(since), limit: CATCH_UP_MAX, reverse: false };
        match self.bounded(self.history(channel, query)).await {
            Ok(h) if h.complete => {
                for record in h.publications {
                    self.deliver(
                        channel,
                        StreamPosition { epoch: h.position.epoch.clone(), offset: record.offset },
                        &record,
                    );
                }
            }
            Ok(h) => self.lose(channel, Some(h.position)),
            Err(e) => {
                tracing::warn!(channel, error = %e, "could not read what the pub/sub link missed");
                self.lose(channel, None);
            }
        }
    }

    fn deliver(&self, channel: &str, position: StreamPosition, record: &PublicationRecord) {
        if let Some(l) = lock(&self.listening).get_mut(channel) {
            l.last = Some(position.clone());
        }
        if let Some(d) = self.delivery.get() {
            d.deliver(channel, &position, record);
        }
    }

    fn lose(&self, channel: &str, now: Option<StreamPosition>) {
        if let Some(l) = lock(&self.listening).get_mut(channel) {
            l.last = now;
        }
        if let Some(d) = self.delivery.get() {
            d.lost(channel);
        }
    }

    /// One message from the pub/sub link.
    async fn handle(&self, msg: redis::Msg) {
        let Some(channel) = self.channel_of(msg.get_channel_name()) else { return };
        let channel = channel.to_owned();
        let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
        match payload.first() {
            Some(b'n') => {
                if let Some(d) = self.delivery.get() {
                    d.notify(&channel, payload.slice(1..));
                }
            }
            Some(b'p') => {
                let Some((position, record)) = decode_publication(payload.slice(1..)) else {
                    tracing::warn!(channel, "unreadable publication on the pub/sub link");
                    return;
                };
                enum Next {
                    Deliver,
                    Skip,
                    CatchUp,
                    Lost,
                }
                let next = match lock(&self.listening).get(&channel) {
                    None => Next::Skip,
                    Some(Listening { last: None, .. }) => Next::Deliver,
                    Some(Listening { last: Some(last), .. }) if last.epoch == position.epoch => {
                        if position.offset <= last.offset {
                            Next::Skip
                        } else if position.offset == last.offset + 1 {
                            Next::Deliver
                        } else {
                            Next::CatchUp
                        }
                    }
                    // A new stream (Redis forgot the old one). Only subscribers that had nothing
                    // yet can simply go on; the others hold offsets of the old epoch and must
                    // recover, or they would skip the new stream's first offsets.
                    Some(Listening { last: Some(last), .. }) if last.offset == 0 && position.offset == 1 => {
                        Next::Deliver
                    }
                    Some(_) => Next::Lost,
                };
                match next {
                    Next::Skip => {}
                    Next::Deliver => self.deliver(&channel, position, &record),
                    Next::CatchUp => {
                        metrics::counter!("herald_redis_gaps_total").increment(1);
                        self.catch_up(&channel).await;
                        let behind = lock(&self.listening)
                            .get(&channel)
                            .is_some_and(|l| l.last.as_ref().is_none_or(|p| p.offset < position.offset));
                        if behind {
                            self.deliver(&channel, position, &record);
                        }
                    }
                    Next::Lost => {
                        self.lose(&channel, None);
                        self.deliver(&channel, position, &record);
                    }
                }
            }
            _ => tracing::warn!(channel, "unknown message on the pub/sub link"),
        }
    }

    fn wanted(&self, channel: &str) -> bool {
        lock(&self.listening).contains_key(channel)
    }

    fn set_up(&self, channel: &str, up: bool) {
        if let Some(l) = lock(&self.listening).get(channel) {
            l.up.send_replace(up);
        }
    }
}

/// The pub/sub link: one connection per node, subscribed to the channels with local
/// subscribers; reconnects (with backoff) and resubscribes, then fills what it missed.
async fn link(inner: Arc<Inner>, mut cmds: mpsc::UnboundedReceiver<Cmd>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(50);
    let mut was_up = false;
    // Warned about the current outage already (one warning per outage, not per retry).
    let mut warned = false;
    loop {
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            r = tokio::time::timeout(inner.timeout, inner.client.get_async_pubsub()) => r,
        };
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                if std::mem::replace(&mut warned, true) {
                    tracing::debug!(error = %e, "redis pub/sub link: cannot connect");
                } else {
                    tracing::warn!(error = %e, "redis pub/sub link: cannot connect; retrying");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(_) => {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        warned = false;
        let (mut sink, mut stream) = pubsub.split();
        // A restarted or flushed Redis may have a new epoch base.
        let _ = inner.bounded(inner.base(true)).await;
        let wanted: Vec<String> = lock(&inner.listening).keys().cloned().collect();
        let mut ok = true;
        for chunk in wanted.chunks(256) {
            let names: Vec<String> = chunk.iter().map(|c| inner.key(c, "pub")).collect();
            if !matches!(tokio::time::timeout(inner.timeout, sink.subscribe(&names)).await, Ok(Ok(()))) {
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        if was_up || !wanted.is_empty() {
            tracing::info!(channels = wanted.len(), "redis pub/sub link up");
        }
        was_up = true;
        for c in &wanted {
            inner.set_up(c, true);
        }
        for c in &wanted {
            inner.catch_up(c).await;
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                cmd = cmds.recv() => {
                    let done = match cmd {
                        None => return,
                        Some(Cmd::Subscribe(c)) if inner.wanted(&c) => {
                            let r = tokio::time::timeout(inner.timeout, sink.subscribe(inner.key(&c, "pub"))).await;
                            let ok = matches!(r, Ok(Ok(())));
                            if ok {
                                inner.set_up(&c, true);
                            }
                            ok
                        }
                        Some(Cmd::Unsubscribe(c)) if !inner.wanted(&c) => {
                            let r = tokio::time::timeout(inner.timeout, sink.unsubscribe(inner.key(&c, "pub"))).await;
                            matches!(r, Ok(Ok(())))
                        }
                        Some(_) => true,
                    };
                    if !done {
                        break;
                    }
                }
                msg = stream.next() => match msg {
                    Some(m) => inner.handle(m).await,
                    None => break,
                },
                _ = ping.tick() => {
                    let r: Result<Result<redis::Value, _>, _> = tokio::time::timeout(inner.timeout, sink.ping()).await;
                    if !matches!(r, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        tracing::warn!("redis pub/sub link lost; reconnecting");
        metrics::counter!("herald_redis_link_losses_total").increment(1);
        for l in lock(&inner.listening).values() {
            l.up.send_replace(false);
        }
    }
}

/// `<info JSON or nothing>\n<data>`: what the stream stores and the pub/sub link carries.
fn encode_body(info: Option<&ClientInfo>, data: &[u8]) -> Vec<u8> {
    let mut out = info.and_then(|i| serde_json::to_vec(i).ok()).unwrap_or_default();
    out.push(b'\n');
    out.extend_from_slice(data);
    out
}

fn decode_body(body: Bytes) -> Option<(Option<ClientInfo>, Bytes)> {
    let nl = body.iter().position(|b| *b == b'\n')?;
    let info = if nl == 0 { None } else { Some(serde_json::from_slice(&body[..nl]).ok()?) };
    Some((info, body.slice(nl + 1..)))
}

/// `<offset>\n<epoch>\n<body>` (after the leading `p`).
fn decode_publication(payload: Bytes) -> Option<(StreamPosition, PublicationRecord)> {
    let nl = payload.iter().position(|b| *b == b'\n')?;
    let offset: u64 = std::str::from_utf8(&payload[..nl]).ok()?.parse().ok()?;
    let rest = payload.slice(nl + 1..);
    let nl = rest.iter().position(|b| *b == b'\n')?;
    let epoch = std::str::from_utf8(&rest[..nl]).ok()?;
    let (info, data) = decode_body(rest.slice(nl + 1..))?;
    Some((
        StreamPosition { epoch: Arc::from(epoch), offset },
        PublicationRecord { offset, data, info, ..Default::default() },
    ))
}

/// A presence entry as stored: `<user length>:<user><info JSON>`.
fn encode_presence(entry: &PresenceEntry) -> Vec<u8> {
    let mut out = format!("{}:{}", entry.user.len(), entry.user).into_bytes();
    if let Some(info) = &entry.info {
        out.extend_from_slice(info);
    }
    out
}

fn decode_presence(client: String, v: &[u8]) -> Option<PresenceEntry> {
    let colon = v.iter().position(|b| *b == b':')?;
    let n: usize = std::str::from_utf8(&v[..colon]).ok()?.parse().ok()?;
    let user = std::str::from_utf8(v.get(colon + 1..colon + 1 + n)?).ok()?.to_owned();
    let info = v.get(colon + 1 + n..).filter(|i| !i.is_empty()).map(Bytes::copy_from_slice);
    Some(PresenceEntry { client, user, info })
}

impl Engine for RedisEngine {
    fn set_delivery(&self, delivery: Arc<dyn Delivery>) {
        let _ = self.inner.delivery.set(delivery);
    }

    /// Stops listening to channels that lost their last local subscriber without
    /// [`Engine::release`] (a slow consumer cut off by the hub), and refreshes the epoch base.
    fn sweep(&self) {
        let Some(d) = self.inner.delivery.get() else { return };
        let names: Vec<String> = lock(&self.inner.listening).keys().cloned().collect();
        for c in names.iter().filter(|c| !d.has_subscribers(c)) {
            self.release(c);
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let _ = inner.bounded(inner.base(true)).await;
        });
    }

    fn listen<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut up = {
                let mut map = lock(&inner.listening);
                match map.get(channel) {
                    Some(l) => l.up.subscribe(),
                    None => {
                        let (tx, rx) = watch::channel(false);
                        map.insert(channel.to_owned(), Listening { up: tx, last: None });
                        let _ = inner.cmds.send(Cmd::Subscribe(channel.to_owned()));
                        rx
                    }
                }
            };
            inner
                .bounded(async {
                    up.wait_for(|up| *up)
                        .await
                        .map(|_| ())
                        .map_err(|_| EngineError::Unavailable("redis pub/sub link stopped".into()))
                })
                .await?;
            let seeded = lock(&inner.listening).get(channel).is_none_or(|l| l.last.is_some());
            if !seeded {
                // Where the link's continuity check starts from.
                let h = inner.bounded(inner.history(channel, HistoryQuery::default())).await?;
                if let Some(l) = lock(&inner.listening).get_mut(channel) {
                    l.last.get_or_insert(h.position);
                }
            }
            Ok(())
        })
    }

    fn release(&self, channel: &str) {
        let Some(d) = self.inner.delivery.get() else { return };
        let mut map = lock(&self.inner.listening);
        if map.contains_key(channel) && !d.has_subscribers(channel) {
            map.remove(channel);
            let _ = self.inner.cmds.send(Cmd::Unsubscribe(channel.to_owned()));
        }
    }

    fn broadcast<'a>(&'a self, channel: &'a str, text: Bytes) -> BoxFuture<'a, Result<(), EngineError>> {
        let inner = &self.inner;
        Box::pin(inner.bounded(async move {
            let mut conn = inner.conn().await?;
            let mut payload = Vec::with_capacity(text.len() + 1);
            payload.push(b'n');
            payload.extend_from_slice(&text);
            let _: i64 = redis::cmd("PUBLISH")
                .arg(inner.key(channel, "pub"))
                .arg(payload)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        }))
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publish,
        policy: HistoryPolicy,
    ) -> BoxFuture<'a, Result<StreamPosition, EngineError>> {
        Box::pin(self.inner.bounded(self.inner.publish(channel, publication, policy)))
    }

    fn history<'a>(&'a self, channel: &'a str, query: HistoryQuery) -> BoxFuture<'a, Result<History, EngineError>> {
        Box::pin(self.inner.bounded(self.inner.history(channel, query)))
    }

    fn presence_add<'a>(
        &'a self,
        channel: &'a str,
        entry: PresenceEntry,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<PresenceChange, EngineError>> {
        let inner = &self.inner;
        Box::pin(inner.bounded(async move {
            let mut conn = inner.conn().await?;
            let ttl_ms = ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
            let joined: u8 = inner
                .presence_keys(&inner.scripts.presence_add, channel)
                .arg(&entry.client)
                .arg(encode_presence(&entry))
                .arg(ttl_ms)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(if joined == 1 { PresenceChange::UserJoined } else { PresenceChange::Unchanged })
        }))
    }

    fn presence_remove<'a>(
        &'a self,
        channel: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<(PresenceChange, Option<PresenceEntry>), EngineError>> {
        let inner = &self.inner;
        Box::pin(inner.bounded(async move {
            let mut conn = inner.conn().await?;
            let (found, left, v): (u8, u8, Vec<u8>) = inner
                .presence_keys(&inner.scripts.presence_remove, channel)
                .arg(client)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let entry = if found == 1 { decode_presence(client.to_owned(), &v) } else { None };
            let change = if left == 1 { PresenceChange::UserLeft } else { PresenceChange::Unchanged };
            Ok((change, entry))
        }))
    }

    fn presence_expire<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<PresenceEntry>, EngineError>> {
        let inner = &self.inner;
        Box::pin(inner.bounded(async move {
            let mut conn = inner.conn().await?;
            let raw: Vec<(String, Vec<u8>)> = inner
                .presence_keys(&inner.scripts.presence_expire, channel)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(raw.into_iter().filter_map(|(c, v)| decode_presence(c, &v)).collect())
        }))
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<PresenceEntry>, EngineError>> {
        Box::pin(self.inner.bounded(self.inner.presence(channel)))
    }

    fn presence_stats<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<PresenceStats, EngineError>> {
        let inner = &self.inner;
        Box::pin(inner.bounded(async move {
            let list = inner.presence(channel).await?;
            let users: std::collections::HashSet<(bool, &str)> = list
                .iter()
                .map(|e| if e.user.is_empty() { (false, e.client.as_str()) } else { (true, e.user.as_str()) })
                .collect();
            Ok(PresenceStats { clients: list.len(), users: users.len() })
        }))
    }

    /// Redis holds everything; this node holds nothing to count.
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }
}

#[cfg(test)]
mod tests {
    use super::test_server::RedisServer;
    use super::*;

    /// One server for this module's tests; each test gets its own prefix.
    /// An engine on its own `redis-server`, which stops with it.
    fn engine() -> RedisEngine {
        let server = RedisServer::start().expect("redis-server (apt-get install -y redis-server)");
        let mut e = RedisEngine::new(RedisSettings::new(server.url(), "t")).expect("engine");
        e.server = Some(server);
        e
    }

    async fn raw(e: &RedisEngine) -> redis::aio::MultiplexedConnection {
        let url = e.server.as_ref().expect("server").url();
        redis::Client::open(url).expect("client").get_multiplexed_async_connection().await.expect("conn")
    }

    crate::engine_conformance!(super::engine());

    #[tokio::test]
    async fn reads_write_no_key() {
        let e = engine();
        let mut raw = raw(&e).await;
        e.history("ghost", HistoryQuery { limit: 10, ..Default::default() }).await.expect("read");
        e.presence("ghost").await.expect("presence");
        e.presence_stats("ghost").await.expect("stats");
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut raw).await.expect("keys");
        assert_eq!(keys, ["{t}:base"], "reads wrote nothing but the prefix's epoch base");
        e.publish(
            "ghost",
            Publish::data(Bytes::from_static(b"1")),
            HistoryPolicy { size: 1, ttl: Duration::from_secs(5) },
        )
        .await
        .expect("publish");
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut raw).await.expect("keys");
        keys.sort();
        assert_eq!(keys, ["{t:ghost}:meta", "{t:ghost}:stream", "{t}:base"]);
    }

    #[tokio::test]
    async fn a_missed_publication_is_filled_from_the_stream() {
        let (e, rec) = {
            let e = engine();
            let rec = Arc::new(crate::engine::conformance::Recorder::default());
            e.set_delivery(rec.clone());
            (e, rec)
        };
        let keep = HistoryPolicy { size: 10, ttl: Duration::from_secs(60) };
        e.listen("g").await.expect("listen");
        e.publish("g", Publish::data(Bytes::from_static(b"1")), keep).await.expect("publish");
        assert_eq!(rec.wait_for(1).await.len(), 1);
        // Offset 2 is stored but its pub/sub message never reaches this node (written straight
        // into Redis, as a message lost on the link would be); 3 arrives normally.
        let mut raw = raw(&e).await;
        let _: i64 = redis::cmd("HINCRBY")
            .arg(e.inner.key("g", "meta"))
            .arg("o")
            .arg(1)
            .query_async(&mut raw)
            .await
            .expect("incr");
        let now: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let _: String = redis::cmd("XADD")
            .arg(e.inner.key("g", "stream"))
            .arg("0-2")
            .arg("b")
            .arg(encode_body(None, b"2"))
            .arg("t")
            .arg(now)
            .query_async(&mut raw)
            .await
            .expect("xadd");
        e.publish("g", Publish::data(Bytes::from_static(b"3")), keep).await.expect("publish");
        let seen = rec.wait_for(3).await;
        let got: Vec<(u64, Bytes)> = seen.iter().map(|(_, _, r)| (r.offset, r.data.clone())).collect();
        assert_eq!(got, [(1, Bytes::from_static(b"1")), (2, Bytes::from_static(b"2")), (3, Bytes::from_static(b"3"))]);
    }

    #[tokio::test]
    async fn expired_presence_is_reported_once_per_user_that_left() {
        let e = engine();
        let entry = |client: &str, user: &str| PresenceEntry { client: client.into(), user: user.into(), info: None };
        let short = Duration::from_millis(100);
        e.presence_add("p", entry("c1", "u1"), short).await.expect("add");
        e.presence_add("p", entry("c2", "u1"), short).await.expect("add");
        e.presence_add("p", entry("c3", "u2"), short).await.expect("add");
        e.presence_add("p", entry("c4", "u2"), Duration::from_secs(60)).await.expect("add");
        assert_eq!(e.presence_expire("p").await, Ok(vec![]), "nothing expired yet");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(e.presence_stats("p").await, Ok(PresenceStats { clients: 1, users: 1 }), "reads skip expired");
        let left = e.presence_expire("p").await.expect("expire");
        assert_eq!(left.len(), 1, "u1 left with its last connection; u2 is still here: {left:?}");
        assert_eq!(left[0].user, "u1");
        assert_eq!(e.presence_expire("p").await, Ok(vec![]), "reported once");
        assert_eq!(
            e.presence_add("p", entry("c5", "u1"), short).await,
            Ok(PresenceChange::UserJoined),
            "u1 counts as gone"
        );
    }

    #[tokio::test]
    async fn a_forgotten_stream_makes_its_subscribers_recover() {
        let e = engine();
        let rec = Arc::new(crate::engine::conformance::Recorder::default());
        e.set_delivery(rec.clone());
        let keep = HistoryPolicy { size: 10, ttl: Duration::from_secs(60) };
        e.listen("f").await.expect("listen");
        for i in 1..=2 {
            e.publish("f", Publish::data(Bytes::from(i.to_string())), keep).await.expect("publish");
        }
        assert_eq!(rec.wait_for(2).await.len(), 2);
        // Redis forgets the channel (as when its keys expire), and a new base makes the next
        // stream's epoch differ: its offset 1 must not look like old offset 1.
        let mut raw = raw(&e).await;
        let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await.expect("flush");
        let fresh = e.inner.base(true).await.expect("base");
        let pos = e.publish("f", Publish::data(Bytes::from_static(b"9")), keep).await.expect("publish");
        assert!(pos.epoch.starts_with(&*fresh) && pos.offset == 1, "{pos:?}");
        for _ in 0..500 {
            if !rec.lost.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*rec.lost.lock().unwrap_or_else(|e| e.into_inner()), ["f"], "subscribers told to recover");
    }

    #[test]
    fn bodies_round_trip() {
        let info = ClientInfo { user: "u\n1".into(), client: "c".into() };
        let body = encode_body(Some(&info), b"{\"a\":\n1}");
        assert_eq!(decode_body(Bytes::from(body)), Some((Some(info), Bytes::from_static(b"{\"a\":\n1}"))));
        let mut p = b"12\nabc-3\n".to_vec();
        p.extend(encode_body(None, b"7"));
        let (pos, rec) = decode_publication(Bytes::from(p)).expect("decodes");
        assert_eq!((pos.offset, &*pos.epoch, rec.data), (12, "abc-3", Bytes::from_static(b"7")));
        assert_eq!(decode_publication(Bytes::from_static(b"x\n")), None);
        let e = PresenceEntry { client: "c".into(), user: "a:b".into(), info: Some(Bytes::from_static(b"{}")) };
        assert_eq!(decode_presence("c".into(), &encode_presence(&e)), Some(e));
    }
}
