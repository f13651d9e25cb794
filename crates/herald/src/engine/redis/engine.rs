//! The Redis engine itself: the [`Engine`] calls as scripts and commands, and the state the
//! pub/sub link and the delivery task share with it (`Inner`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::codec::{decode_body, decode_presence, decode_publication, encode_body, encode_presence};
use super::link::{deliver_loop, link, msg_bytes};
use super::scripts::{
    EPOCH_LUA, HISTORY_LUA, PRESENCE_ADD_LUA, PRESENCE_COMMON_LUA, PRESENCE_EXPIRE_LUA, PRESENCE_LUA,
    PRESENCE_REMOVE_LUA, PUBLISH_LUA,
};
#[cfg(test)]
use super::test_server;
use super::RedisConfig;
use crate::engine::{
    Delivery, Engine, EngineError, EngineStats, History, HistoryPolicy, HistoryQuery, PresenceChange, PresenceEntry,
    PresenceStats, PublicationRecord, Publish, StreamPosition,
};

/// Length of an epoch window, and the least time a channel's metadata outlives its last
/// publication (the second makes recreated streams land in a later window).
pub(super) const EPOCH_WINDOW_SECS: u64 = 300;

/// A fresh random value for one script call: the prefix's new base if Redis lost it (or the
/// epoch itself where Redis does not allow `INFO`). Never kept: each call draws its own.
fn fresh_random() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Most publications the link reads back from a stream to fill one gap.
pub(super) const CATCH_UP_MAX: usize = 10_000;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Entries are inserted, changed and removed whole; a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A channel this node listens to.
#[derive(Debug)]
pub(super) struct Listening {
    /// Whether the pub/sub link is subscribed to it now.
    pub(super) up: watch::Sender<bool>,
    /// The last position delivered (or, before the first delivery, read): the next
    /// publication must continue it.
    pub(super) last: Option<StreamPosition>,
}

#[derive(Debug)]
pub(super) enum Cmd {
    Subscribe(String),
    Unsubscribe(String),
}

pub(super) struct Inner {
    pub(super) client: redis::Client,
    pub(super) prefix: String,
    pub(super) timeout: Duration,
    pub(super) conn: Mutex<Option<ConnectionManager>>,
    pub(super) connecting: tokio::sync::Mutex<()>,
    pub(super) delivery: OnceLock<Arc<dyn Delivery>>,
    pub(super) listening: Mutex<HashMap<String, Listening>>,
    pub(super) cmds: mpsc::UnboundedSender<Cmd>,
    pub(super) scripts: Scripts,
    /// Messages the pub/sub link received and the delivery task has not handled yet: their
    /// bytes, bounded by `max_link_bytes`.
    pub(super) queued_bytes: AtomicUsize,
    pub(super) max_link_bytes: usize,
    /// Whether the pub/sub link is connected and subscribed now: it pings Redis every
    /// `PING_EVERY`, so a lost Redis turns this off within that plus `timeout`.
    pub(super) link_up: AtomicBool,
    /// Channels whose publications may have been missed (a message dropped at the bound, a
    /// reconnect): the delivery task reads them back from the stream.
    pub(super) dirty: Mutex<HashSet<String>>,
    pub(super) wake: tokio::sync::Notify,
    /// Messages dropped at the bound (for tests; also the metric
    /// `herald_redis_link_overflows_total`).
    pub(super) overflows: AtomicU64,
}

pub(super) struct Scripts {
    pub(super) publish: Script,
    pub(super) history: Script,
    pub(super) presence_add: Script,
    pub(super) presence_remove: Script,
    pub(super) presence_expire: Script,
    pub(super) presence: Script,
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

pub(super) fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(format!("redis: {e}"))
}

impl RedisEngine {
    /// Starts the engine (its pub/sub link connects in the background; calls fail with
    /// `Unavailable` until Redis answers). Needs a tokio runtime.
    pub fn new(settings: &RedisConfig) -> Result<Self, EngineError> {
        let client = settings.client()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| EngineError::Unavailable("the Redis engine needs a tokio runtime".into()))?;
        let (cmds, rx) = mpsc::unbounded_channel();
        // Bounded in bytes by `max_link_bytes` (the link drops what would pass it).
        let (work, work_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            client,
            prefix: settings.prefix.clone(),
            timeout: settings.timeout,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            delivery: OnceLock::new(),
            listening: Mutex::new(HashMap::new()),
            queued_bytes: AtomicUsize::new(0),
            link_up: AtomicBool::new(false),
            max_link_bytes: settings.max_link_bytes,
            dirty: Mutex::new(HashSet::new()),
            wake: tokio::sync::Notify::new(),
            overflows: AtomicU64::new(0),
            cmds,
            scripts: Scripts {
                publish: Script::new(&format!("{EPOCH_LUA}{PUBLISH_LUA}")),
                history: Script::new(&format!("{EPOCH_LUA}{HISTORY_LUA}")),
                presence_add: Script::new(&format!("{PRESENCE_COMMON_LUA}{PRESENCE_ADD_LUA}")),
                presence_remove: Script::new(&format!("{PRESENCE_COMMON_LUA}{PRESENCE_REMOVE_LUA}")),
                presence_expire: Script::new(&format!("{PRESENCE_COMMON_LUA}{PRESENCE_EXPIRE_LUA}")),
                presence: Script::new(PRESENCE_LUA),
            },
        });
        let stop = CancellationToken::new();
        runtime.spawn(link(inner.clone(), rx, work, stop.clone()));
        runtime.spawn(deliver_loop(inner.clone(), work_rx, stop.clone()));
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
    pub(super) fn key(&self, channel: &str, suffix: &str) -> String {
        format!("{{{}:{}}}:{}", self.prefix, channel, suffix)
    }

    pub(super) fn channel_of<'a>(&self, pubsub: &'a str) -> Option<&'a str> {
        pubsub.strip_prefix('{')?.strip_prefix(self.prefix.as_str())?.strip_prefix(':')?.strip_suffix("}:pub")
    }

    /// Runs `f` within the timeout.
    pub(super) async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(EngineError::Unavailable(format!("redis did not answer within {:?}", self.timeout))),
        }
    }

    pub(super) async fn conn(&self) -> Result<ConnectionManager, EngineError> {
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

    /// The prefix's epoch base key: read (and, when Redis lost it, made again) by the scripts
    /// that may need a new epoch, never remembered by a node.
    pub(super) fn base_key(&self) -> String {
        format!("{{{}}}:base", self.prefix)
    }

    pub(super) async fn publish(
        &self,
        channel: &str,
        publication: Publish,
        policy: HistoryPolicy,
    ) -> Result<StreamPosition, EngineError> {
        let Publish { data, info, tags, exclude } = publication;
        let mut conn = self.conn().await?;
        let life_ms = policy.ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
        let (epoch, offset): (String, u64) = self
            .scripts
            .publish
            .key(self.key(channel, "meta"))
            .key(self.key(channel, "stream"))
            .key(self.base_key())
            .arg(fresh_random())
            .arg(EPOCH_WINDOW_SECS)
            .arg(policy.size)
            .arg(life_ms)
            .arg(EPOCH_WINDOW_SECS * 1000)
            .arg(encode_body(info.as_ref(), tags.as_deref(), &data))
            .arg(self.key(channel, "pub"))
            .arg(exclude.map(|x| x.to_string()).unwrap_or_default())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(StreamPosition { epoch: Arc::from(epoch.as_str()), offset })
    }

    pub(super) async fn history(&self, channel: &str, query: HistoryQuery) -> Result<History, EngineError> {
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
            .key(self.base_key())
            .arg(fresh_random())
            .arg(EPOCH_WINDOW_SECS)
            .arg(since_epoch)
            .arg(since_offset)
            .arg(query.limit)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut publications = Vec::with_capacity(entries.len());
        for (offset, body) in entries {
            let (info, tags, data) = decode_body(Bytes::from(body))
                .ok_or_else(|| EngineError::Unavailable(format!("redis: unreadable history entry in `{channel}`")))?;
            publications.push(PublicationRecord { offset, data, info, tags, exclude: None });
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

    pub(super) fn presence_keys<'a>(&self, script: &'a Script, channel: &str) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(self.key(channel, "presence"))
            .key(self.key(channel, "presence:exp"))
            .key(self.key(channel, "presence:users"));
        inv
    }

    pub(super) async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, EngineError> {
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
    pub(super) async fn catch_up(&self, channel: &str) {
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

    pub(super) fn deliver(&self, channel: &str, position: StreamPosition, record: &PublicationRecord) {
        if let Some(l) = lock(&self.listening).get_mut(channel) {
            l.last = Some(position.clone());
        }
        if let Some(d) = self.delivery.get() {
            d.deliver(channel, &position, record);
        }
    }

    pub(super) fn lose(&self, channel: &str, now: Option<StreamPosition>) {
        if let Some(l) = lock(&self.listening).get_mut(channel) {
            l.last = now;
        }
        if let Some(d) = self.delivery.get() {
            d.lost(channel);
        }
    }

    /// One message from the pub/sub link.
    pub(super) async fn handle(&self, msg: redis::Msg) {
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

    /// Queues a message from the link for the delivery task, or, past `max_link_bytes`, drops
    /// it and marks its channel to be read back from the stream: memory stays bounded when
    /// the node falls behind, and nothing is skipped silently.
    pub(super) fn enqueue(&self, m: redis::Msg, work: &mpsc::UnboundedSender<redis::Msg>) {
        let n = msg_bytes(&m);
        if self.queued_bytes.load(Ordering::Relaxed) + n > self.max_link_bytes {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("herald_redis_link_overflows_total").increment(1);
            if let Some(c) = self.channel_of(m.get_channel_name()) {
                if lock(&self.dirty).insert(c.to_owned()) {
                    tracing::debug!(channel = c, "redis pub/sub link: delivery behind; will read back from history");
                }
            }
            self.wake.notify_one();
            return;
        }
        self.queued_bytes.fetch_add(n, Ordering::Relaxed);
        let _ = work.send(m);
    }

    pub(super) fn wanted(&self, channel: &str) -> bool {
        lock(&self.listening).contains_key(channel)
    }

    pub(super) fn set_up(&self, channel: &str, up: bool) {
        if let Some(l) = lock(&self.listening).get(channel) {
            l.up.send_replace(up);
        }
    }
}

impl Engine for RedisEngine {
    fn set_delivery(&self, delivery: Arc<dyn Delivery>) {
        let _ = self.inner.delivery.set(delivery);
    }

    /// Stops listening to channels that lost their last local subscriber without
    /// [`Engine::release`] (a slow consumer cut off by the hub).
    fn sweep(&self) {
        let Some(d) = self.inner.delivery.get() else { return };
        let names: Vec<String> = lock(&self.inner.listening).keys().cloned().collect();
        for c in names.iter().filter(|c| !d.has_subscribers(c)) {
            self.release(c);
        }
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

    fn unavailable(&self) -> Option<&'static str> {
        if self.inner.link_up.load(Ordering::SeqCst) {
            None
        } else {
            Some("redis unreachable: the pub/sub link is down")
        }
    }

    /// Redis holds everything; this node holds nothing to count.
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
