//! The Redis engine: several Herald nodes share channels, history and presence through one
//! Redis.
//!
//! **Keys.** Everything of a channel lives under one hash tag, `{<prefix>:<channel>}`, so a
//! Redis Cluster keeps a channel's keys (and its sharded pub/sub channel) in one slot:
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `{p:c}:meta` | hash | `e` epoch, `o` last offset, `l` history policy `<TTL ms>:<size>` |
//! | `{p:c}:stream` | stream | history: entry id `0-<offset>`, fields `b` (body), `t` (ms) |
//! | `{p:c}:pub` | pub/sub channel | publications and join/leave pushes |
//! | `{p:c}:presence` | hash | client → user and connection info |
//! | `{p:c}:presence:exp` | sorted set | client → expiry (ms) |
//! | `{p:c}:presence:users` | hash | user → connections present |
//! | `{p}:base` | string | random input of every new epoch of this prefix (made again if lost) |
//!
//! **Publish** is one Lua script: it assigns the offset, stores the publication (the stream
//! trimmed by size, approximately; reads apply the exact size and the TTL), refreshes the TTLs
//! and PUBLISHes it with its epoch and offset: one round trip, atomic. Deliveries come back
//! through one pub/sub connection per node, subscribed to the channels that have local
//! subscribers ([`Engine::listen`]), and go to the node from one delivery task, which checks
//! every publication's offset against the last one it delivered: a gap (a reconnect, a lost
//! message, a message dropped because the node fell `max_link_bytes` behind) is filled from
//! the stream in order, or, when the stream no longer has it, the local subscribers are told
//! to recover ([`Delivery::lost`]).
//!
//! **Epochs** live with the stream: the publish script that creates a channel's stream
//! decides its epoch and stores it in `meta` (two nodes creating one stream at once get the
//! first script's), and every later publication reads it from there. A new epoch is computed
//! by the script from Redis alone (`EPOCH_LUA`), never from anything a node remembers: a
//! hash of the prefix's base (random, made again by the first script that finds it gone),
//! the Redis process's `run_id`, its `evicted_keys` count and the 5-minute window of Redis's
//! clock. Whatever Redis loses (a restart without persistence or from an older snapshot, a
//! `FLUSHALL`, a failover to a replica that lagged, an eviction), one of those differs when
//! the stream is recreated, so its epoch is new and stale positions never match it. A read
//! of a channel without a stream writes nothing of the channel and reports the epoch a
//! stream created now would get. A stream's metadata outlives its last publication by at
//! least one window, so a stream forgotten by expiry is recreated in a later window. The
//! price: a client that subscribed to an empty channel and got its first publication only
//! after the prediction moved (a later window, a Redis restart or eviction in between) holds
//! the older epoch, so its next recovery says `recovered: false` (never a false recovery).
//!
//! Every call is bounded by `timeout`; failures are [`EngineError::Unavailable`]. A publish
//! that timed out may still have been stored (Redis may have run it): the caller cannot know.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    EPOCH_LUA, HISTORY_LUA, PRESENCE_ADD_LUA, PRESENCE_COMMON_LUA, PRESENCE_EXPIRE_LUA, PRESENCE_LUA,
    PRESENCE_REMOVE_LUA, PUBLISH_LUA,
};
use super::{
    Delivery, Engine, EngineError, EngineStats, History, HistoryPolicy, HistoryQuery, PresenceChange, PresenceEntry,
    PresenceStats, PublicationRecord, Publish, StreamPosition, Tags,
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
    /// TLS (`rediss://`): PEM files of the CAs to trust (empty: the system's), and of this
    /// node's certificate and key when Redis asks for one (empty: none).
    pub tls_ca: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Most bytes of publications received from Redis and not yet delivered on this node.
    pub max_link_bytes: usize,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.url)
            .field("password", &if self.password.is_empty() { "" } else { "<redacted>" })
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("max_link_bytes", &self.max_link_bytes)
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
            tls_ca: c.tls_ca.clone(),
            tls_cert: c.tls_cert.clone(),
            tls_key: c.tls_key.clone(),
            max_link_bytes: c.max_link_bytes,
        }
    }
}

impl RedisSettings {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: String::new(),
            prefix: prefix.into(),
            timeout: Duration::from_secs(1),
            tls_ca: PathBuf::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            max_link_bytes: 64 << 20,
        }
    }

    /// A Redis client for these settings (connects nothing yet).
    pub fn client(&self) -> Result<redis::Client, EngineError> {
        let bad = |e: redis::RedisError| EngineError::Unavailable(format!("bad Redis URL: {e}"));
        let mut info = self.url.as_str().into_connection_info().map_err(bad)?;
        if !self.password.is_empty() {
            let settings = info.redis_settings().clone().set_password(&self.password);
            info = info.set_redis_settings(settings);
        }
        match self.tls_files().map_err(|(key, e)| EngineError::Unavailable(format!("{key}: {e}")))? {
            // `rediss://` alone: Redis's certificate is checked against the system's CAs.
            None => redis::Client::open(info).map_err(bad),
            Some(files) => redis::Client::build_with_tls(info, files)
                .map_err(|e| EngineError::Unavailable(format!("Redis TLS settings: {e}"))),
        }
    }

    /// Checks the TLS files as rustls will use them when the node connects (a certificate it
    /// refuses, such as X.509 v1, fails here, so `check-config` reports it): the failing
    /// setting's key and why. Messages never quote the files' contents.
    pub fn check_tls_files(&self) -> Result<(), (&'static str, String)> {
        self.tls_files().map(|_| ())
    }

    /// The TLS files, read and checked; `None` when none is set.
    fn tls_files(&self) -> Result<Option<redis::TlsCertificates>, (&'static str, String)> {
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        if !set(&self.tls_ca) && !set(&self.tls_cert) && !set(&self.tls_key) {
            return Ok(None);
        }
        let read = |key: &'static str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| (key, format!("cannot read {}: {e}", p.display())))
        };
        let root_cert = if set(&self.tls_ca) { Some(read("engine.redis.tls_ca", &self.tls_ca)?) } else { None };
        let client_tls = if set(&self.tls_cert) || set(&self.tls_key) {
            Some(redis::ClientTlsConfig {
                client_cert: read("engine.redis.tls_cert", &self.tls_cert)?,
                client_key: read("engine.redis.tls_key", &self.tls_key)?,
            })
        } else {
            None
        };
        check_tls(root_cert.as_deref(), client_tls.as_ref())?;
        Ok(Some(redis::TlsCertificates { client_tls, root_cert }))
    }
}

/// Builds the rustls client configuration the connection will use, from PEM: CAs to trust
/// and this node's certificate and key.
fn check_tls(root: Option<&[u8]>, client: Option<&redis::ClientTlsConfig>) -> Result<(), (&'static str, String)> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = root {
        let key = "engine.redis.tls_ca";
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|_| (key, "not valid PEM".to_owned()))?;
        if certs.is_empty() {
            return Err((key, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| (key, format!("unusable CA certificate: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("engine.redis.url", e.to_string()))?
        .with_root_certificates(roots);
    if let Some(c) = client {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&c.client_cert)
            .collect::<Result<_, _>>()
            .map_err(|_| ("engine.redis.tls_cert", "not valid PEM".to_owned()))?;
        if chain.is_empty() {
            return Err(("engine.redis.tls_cert", "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&c.client_key)
            .map_err(|_| ("engine.redis.tls_key", "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned()))?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| ("engine.redis.tls_cert", format!("unusable with its key: {e}")))?;
    }
    Ok(())
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
    delivery: OnceLock<Arc<dyn Delivery>>,
    listening: Mutex<HashMap<String, Listening>>,
    cmds: mpsc::UnboundedSender<Cmd>,
    scripts: Scripts,
    /// Messages the pub/sub link received and the delivery task has not handled yet: their
    /// bytes, bounded by `max_link_bytes`.
    queued_bytes: AtomicUsize,
    max_link_bytes: usize,
    /// Whether the pub/sub link is connected and subscribed now: it pings Redis every
    /// `PING_EVERY`, so a lost Redis turns this off within that plus `timeout`.
    link_up: AtomicBool,
    /// Channels whose publications may have been missed (a message dropped at the bound, a
    /// reconnect): the delivery task reads them back from the stream.
    dirty: Mutex<HashSet<String>>,
    wake: tokio::sync::Notify,
    /// Messages dropped at the bound (for tests; also the metric
    /// `herald_redis_link_overflows_total`).
    overflows: AtomicU64,
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
        // Bounded in bytes by `max_link_bytes` (the link drops what would pass it).
        let (work, work_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            client,
            prefix: settings.prefix,
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

    /// The prefix's epoch base key: read (and, when Redis lost it, made again) by the scripts
    /// that may need a new epoch, never remembered by a node.
    fn base_key(&self) -> String {
        format!("{{{}}}:base", self.prefix)
    }

    async fn publish(
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

    async fn history(&self, channel: &str, query: HistoryQuery) -> Result<History, EngineError> {
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

    /// Queues a message from the link for the delivery task, or, past `max_link_bytes`, drops
    /// it and marks its channel to be read back from the stream: memory stays bounded when
    /// the node falls behind, and nothing is skipped silently.
    fn enqueue(&self, m: redis::Msg, work: &mpsc::UnboundedSender<redis::Msg>) {
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

    fn wanted(&self, channel: &str) -> bool {
        lock(&self.listening).contains_key(channel)
    }

    fn set_up(&self, channel: &str, up: bool) {
        if let Some(l) = lock(&self.listening).get(channel) {
            l.up.send_replace(up);
        }
    }
}

/// The delivery task: hands the link's messages to the node in order, and reads back from
/// the streams what the link may have missed (`dirty`). The only caller of `handle` and
/// `catch_up`, so a channel's deliveries keep one order.
async fn deliver_loop(inner: Arc<Inner>, mut work: mpsc::UnboundedReceiver<redis::Msg>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            msg = work.recv() => match msg {
                Some(m) => {
                    inner.queued_bytes.fetch_sub(msg_bytes(&m), Ordering::Relaxed);
                    inner.handle(m).await;
                }
                None => return,
            },
            () = inner.wake.notified() => {}
        }
        let dirty: Vec<String> = lock(&inner.dirty).drain().collect();
        for c in dirty {
            inner.catch_up(&c).await;
        }
    }
}

/// A fresh random value for one script call: the prefix's new base if Redis lost it (or the
/// epoch itself where Redis does not allow `INFO`). Never kept: each call draws its own.
fn fresh_random() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn msg_bytes(m: &redis::Msg) -> usize {
    // The payload and channel name, plus what `Msg` holds around them.
    m.get_payload_bytes().len() + m.get_channel_name().len() + 64
}

/// How long the pub/sub link waits between attempts to reach Redis: exponential backoff with
/// decorrelated jitter. Each delay is drawn uniformly between `floor` and three times the
/// previous one, capped at `cap`: delays grow while Redis stays away, and nodes that lost
/// Redis at the same moment spread their reconnections out instead of arriving together
/// when it comes back.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    floor: Duration,
    cap: Duration,
    last: Duration,
}

/// The least and the most the link waits before trying Redis again.
const RECONNECT_FLOOR: Duration = Duration::from_millis(50);
const RECONNECT_CAP: Duration = Duration::from_secs(1);

impl Backoff {
    fn new(floor: Duration, cap: Duration) -> Self {
        let cap = cap.max(floor);
        Self { floor, cap, last: floor }
    }

    /// The next delay: uniform in `[floor, min(cap, 3 × previous)]`.
    fn next(&mut self, rng: &mut impl rand::Rng) -> Duration {
        let floor = self.floor.as_nanos().min(u64::MAX as u128) as u64;
        let high = self.last.saturating_mul(3).min(self.cap).as_nanos().min(u64::MAX as u128) as u64;
        let d = Duration::from_nanos(rng.random_range(floor..=high.max(floor)));
        self.last = d;
        d
    }

    /// Redis answered: the next outage starts from the floor again.
    fn reset(&mut self) {
        self.last = self.floor;
    }
}

/// A connected, subscribed pub/sub link, and the channels it subscribed to.
type Linked = (redis::aio::PubSubSink, redis::aio::PubSubStream, Vec<String>);

/// Connects the pub/sub link and subscribes it to every channel this node listens to; why
/// not, when it cannot.
async fn connect(inner: &Inner) -> Result<Linked, String> {
    let pubsub = match tokio::time::timeout(inner.timeout, inner.client.get_async_pubsub()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(format!("cannot connect: {e}")),
        Err(_) => return Err(format!("no answer within {:?}", inner.timeout)),
    };
    let (mut sink, stream) = pubsub.split();
    let wanted: Vec<String> = lock(&inner.listening).keys().cloned().collect();
    for chunk in wanted.chunks(256) {
        let names: Vec<String> = chunk.iter().map(|c| inner.key(c, "pub")).collect();
        match tokio::time::timeout(inner.timeout, sink.subscribe(&names)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("cannot subscribe: {e}")),
            Err(_) => return Err(format!("SUBSCRIBE unanswered within {:?}", inner.timeout)),
        }
    }
    Ok((sink, stream, wanted))
}

/// The pub/sub link: one connection per node, subscribed to the channels with local
/// subscribers; reconnects (with jittered backoff, [`Backoff`]) and resubscribes, then fills
/// what it missed.
async fn link(
    inner: Arc<Inner>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    work: mpsc::UnboundedSender<redis::Msg>,
    stop: CancellationToken,
) {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let mut backoff = Backoff::new(RECONNECT_FLOOR, RECONNECT_CAP);
    let mut was_up = false;
    // Warned about the current outage already (one warning per outage, not per retry).
    let mut warned = false;
    let mut first = true;
    loop {
        // The one retry path: every attempt but the very first waits its jittered delay, so
        // nodes that lost Redis together do not come back in lockstep.
        if !std::mem::replace(&mut first, false) {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next(&mut rng)) => {}
            }
        }
        let linked = tokio::select! {
            () = stop.cancelled() => return,
            r = connect(&inner) => r,
        };
        let (mut sink, mut stream, wanted) = match linked {
            Ok(l) => l,
            Err(why) => {
                if std::mem::replace(&mut warned, true) {
                    tracing::debug!(error = %why, "redis pub/sub link: still down");
                } else {
                    tracing::warn!(error = %why, "redis pub/sub link: down; retrying with backoff");
                }
                continue;
            }
        };
        backoff.reset();
        warned = false;
        if was_up || !wanted.is_empty() {
            tracing::info!(channels = wanted.len(), "redis pub/sub link up");
        }
        was_up = true;
        inner.link_up.store(true, Ordering::SeqCst);
        for c in &wanted {
            inner.set_up(c, true);
        }
        // What was published while the link was down is read back by the delivery task.
        lock(&inner.dirty).extend(wanted);
        inner.wake.notify_one();
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
                    Some(m) => inner.enqueue(m, &work),
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
        inner.link_up.store(false, Ordering::SeqCst);
        tracing::warn!("redis pub/sub link lost; reconnecting");
        metrics::counter!("herald_redis_link_losses_total").increment(1);
        for l in lock(&inner.listening).values() {
            l.up.send_replace(false);
        }
    }
}

/// What the stream stores and the pub/sub link carries: `[#<tags JSON>\n]<info JSON or
/// nothing>\n<data>`. Neither JSON line holds a raw newline (JSON escapes them in strings),
/// and info JSON starts with `{`, so the `#` line is unambiguous; without tags the body is
/// as short as it can be.
fn encode_body(info: Option<&ClientInfo>, tags: Option<&Tags>, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    if let Some(tags) = tags {
        out.push(b'#');
        out.extend(serde_json::to_vec(tags).unwrap_or_else(|_| b"{}".to_vec()));
        out.push(b'\n');
    }
    if let Some(info) = info.and_then(|i| serde_json::to_vec(i).ok()) {
        out.extend(info);
    }
    out.push(b'\n');
    out.extend_from_slice(data);
    out
}

type Body = (Option<ClientInfo>, Option<Arc<Tags>>, Bytes);

fn decode_body(mut body: Bytes) -> Option<Body> {
    let mut tags = None;
    if body.first() == Some(&b'#') {
        let nl = body.iter().position(|b| *b == b'\n')?;
        tags = Some(Arc::new(serde_json::from_slice::<Tags>(&body[1..nl]).ok()?));
        body = body.slice(nl + 1..);
    }
    let nl = body.iter().position(|b| *b == b'\n')?;
    let info = if nl == 0 { None } else { Some(serde_json::from_slice(&body[..nl]).ok()?) };
    Some((info, tags, body.slice(nl + 1..)))
}

/// `<offset>\n<epoch>\n<exclude or nothing>\n<body>` (after the leading `p`); the exclusion
/// (a connection id) travels live only, it is not in the stream.
fn decode_publication(payload: Bytes) -> Option<(StreamPosition, PublicationRecord)> {
    let mut lines = payload.splitn(4, |b| *b == b'\n');
    let offset: u64 = std::str::from_utf8(lines.next()?).ok()?.parse().ok()?;
    let epoch = std::str::from_utf8(lines.next()?).ok()?;
    let exclude = match lines.next()? {
        [] => None,
        x => Some(std::str::from_utf8(x).ok()?.parse().ok()?),
    };
    let rest = lines.next()?;
    let body = payload.slice_ref(rest);
    let (info, tags, data) = decode_body(body)?;
    Some((StreamPosition { epoch: Arc::from(epoch), offset }, PublicationRecord { offset, data, info, tags, exclude }))
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

    /// The whole suite again over TLS (`rediss://`), with a client certificate, against a
    /// `redis-server` that accepts nothing else.
    mod tls {
        use super::*;

        /// Writes a CA, a server certificate for 127.0.0.1 and a client certificate (both
        /// signed by the CA) into `dir`.
        pub(super) fn pki(dir: &std::path::Path) -> std::io::Result<(test_server::Tls, PathBuf, PathBuf)> {
            let err = |e: rcgen::Error| std::io::Error::other(e.to_string());
            // Distinct subjects: OpenSSL takes a certificate whose subject is its issuer's for
            // a self-signed one.
            let params = |names: Vec<String>, cn: &str| {
                let mut p = rcgen::CertificateParams::new(names).map_err(err)?;
                p.distinguished_name = rcgen::DistinguishedName::new();
                p.distinguished_name.push(rcgen::DnType::CommonName, cn);
                Ok::<_, std::io::Error>(p)
            };
            let ca_key = rcgen::KeyPair::generate().map_err(err)?;
            let mut ca_params = params(Vec::new(), "herald test CA")?;
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).map_err(err)?;
            let write = |name: &str, pem: String| -> std::io::Result<PathBuf> {
                let p = dir.join(name);
                std::fs::write(&p, pem)?;
                Ok(p)
            };
            let server_key = rcgen::KeyPair::generate().map_err(err)?;
            let server =
                params(vec!["127.0.0.1".to_owned()], "redis")?.signed_by(&server_key, &ca, &ca_key).map_err(err)?;
            let client_key = rcgen::KeyPair::generate().map_err(err)?;
            let client = params(vec!["herald-node".to_owned()], "herald-node")?
                .signed_by(&client_key, &ca, &ca_key)
                .map_err(err)?;
            let tls = test_server::Tls {
                cert: write("server.pem", server.pem())?,
                key: write("server-key.pem", server_key.serialize_pem())?,
                ca: write("ca.pem", ca.pem())?,
            };
            Ok((tls, write("client.pem", client.pem())?, write("client-key.pem", client_key.serialize_pem())?))
        }

        pub(super) fn engine() -> RedisEngine {
            let mut client = None;
            let server = RedisServer::start_tls(|dir| {
                let (tls, cert, key) = pki(dir)?;
                client = Some((tls.ca.clone(), cert, key));
                Ok(tls)
            })
            .expect("redis-server with TLS");
            let (ca, cert, key) = client.expect("pki");
            assert!(server.url().starts_with("rediss://"), "{}", server.url());
            let mut settings = RedisSettings::new(server.url(), "t");
            (settings.tls_ca, settings.tls_cert, settings.tls_key) = (ca, cert, key);
            let mut e = RedisEngine::new(settings).expect("engine");
            e.server = Some(server);
            e
        }

        crate::engine_conformance!(super::engine());

        /// Without the CA Redis's certificate is not trusted; without a client certificate
        /// Redis refuses the node: either way a clear `Unavailable`, in bounded time.
        #[tokio::test]
        async fn an_untrusted_or_anonymous_connection_fails_cleanly() {
            let good = engine();
            let url = good.server.as_ref().expect("server").url();
            let mut no_ca = RedisSettings::new(url.clone(), "t");
            no_ca.timeout = Duration::from_millis(500);
            let e = RedisEngine::new(no_ca).expect("engine");
            let r = e.history("x", HistoryQuery::default()).await;
            assert!(matches!(r, Err(EngineError::Unavailable(_))), "{r:?}");
            let mut plain = RedisSettings::new(url.replacen("rediss://", "redis://", 1), "t");
            plain.timeout = Duration::from_millis(500);
            let e = RedisEngine::new(plain).expect("engine");
            let r = e.history("x", HistoryQuery::default()).await;
            assert!(matches!(r, Err(EngineError::Unavailable(_))), "plain TCP to a TLS port: {r:?}");
            good.history("x", HistoryQuery::default()).await.expect("the configured engine reads");
        }
    }

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
            .arg(encode_body(None, None, b"2"))
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

    /// A publication is one round trip: one `EVALSHA`, and no other command, once the script
    /// is loaded and the stream exists (only the publication that creates a stream reads the
    /// epoch's inputs).
    #[tokio::test]
    async fn a_publication_is_one_evalsha() {
        let e = engine();
        let keep = HistoryPolicy { size: 10, ttl: Duration::from_secs(60) };
        e.publish("r", Publish::data(Bytes::from_static(b"0")), keep).await.expect("warm up");
        let mut raw = raw(&e).await;
        let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut raw).await.expect("reset");
        for i in 1..=50 {
            e.publish("r", Publish::data(Bytes::from(i.to_string())), keep).await.expect("publish");
        }
        let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut raw).await.expect("info");
        let calls = |line: &str| -> u64 {
            line.split("calls=").nth(1).and_then(|r| r.split(',').next()).and_then(|n| n.parse().ok()).unwrap_or(0)
        };
        let mut seen: Vec<(String, u64)> = info
            .lines()
            .filter_map(|l| Some((l.strip_prefix("cmdstat_")?.split(':').next()?.to_owned(), calls(l))))
            .filter(|(c, _)| !matches!(c.as_str(), "info" | "config|resetstat" | "ping"))
            .collect();
        seen.sort();
        let want: Vec<(String, u64)> = [
            // The one round trip per publication; the rest run inside it.
            ("evalsha", 50),
            ("hincrby", 50),
            ("hmget", 50),
            ("pexpire", 100),
            ("publish", 50),
            ("time", 50),
            ("xadd", 50),
        ]
        .iter()
        .map(|(c, n)| (c.to_string(), *n))
        .collect();
        assert_eq!(seen, want, "{info}");
    }

    /// Two nodes on one Redis: what one publishes reaches the other with its tags and its
    /// exclusion, and a channel event's bytes cross unchanged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tags_exclusions_and_events_cross_nodes() {
        let a = engine();
        let b = RedisEngine::new(RedisSettings::new(a.server.as_ref().expect("server").url(), "t")).expect("b");
        let rec = Arc::new(crate::engine::conformance::Recorder::default());
        b.set_delivery(rec.clone());
        b.listen("x").await.expect("listen");
        let tags: Arc<Tags> = Arc::new([("event".to_owned(), "client-typing".to_owned())].into());
        let p = Publish { data: Bytes::from_static(b"{}"), tags: Some(tags.clone()), exclude: Some(42), info: None };
        a.publish("x", p, HistoryPolicy { size: 10, ttl: Duration::from_secs(60) }).await.expect("publish");
        let seen = rec.wait_for(1).await;
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].2.tags.clone(), seen[0].2.exclude), (Some(tags), Some(42)));
        let event = crate::hub::ChannelEvent::Client {
            event: "client-typing".into(),
            data: "{\"a\":1}".into(),
            user: Some("u".into()),
            exclude: Some(42),
        };
        a.broadcast("x", event.encode()).await.expect("broadcast");
        for _ in 0..500 {
            if !rec.notes.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let notes = rec.notes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(notes.len(), 1);
        assert_eq!(crate::hub::ChannelEvent::decode(&notes[0].1), Some(event));
    }

    /// A delivery handler that takes its time (a node too busy to keep up with Redis).
    struct Slow(Arc<crate::engine::conformance::Recorder>);

    impl Delivery for Slow {
        fn deliver(&self, channel: &str, position: &StreamPosition, publication: &PublicationRecord) {
            #[allow(clippy::disallowed_methods)] // on purpose: a delivery that blocks its caller
            std::thread::sleep(Duration::from_millis(2));
            self.0.deliver(channel, position, publication);
        }

        fn lost(&self, channel: &str) {
            self.0.lost(channel);
        }
    }

    /// An engine whose link holds at most 4 KiB of undelivered messages, and a slow handler.
    fn slow_engine() -> (RedisEngine, Arc<crate::engine::conformance::Recorder>) {
        let server = RedisServer::start().expect("redis-server");
        let mut settings = RedisSettings::new(server.url(), "t");
        settings.max_link_bytes = 4096;
        let mut e = RedisEngine::new(settings).expect("engine");
        e.server = Some(server);
        let rec = Arc::new(crate::engine::conformance::Recorder::default());
        e.set_delivery(Arc::new(Slow(rec.clone())));
        (e, rec)
    }

    /// Past `max_link_bytes` the link drops messages; what it dropped is read back from the
    /// stream, so every publication is still delivered once and in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_falls_behind_refills_from_history() {
        let (e, rec) = slow_engine();
        let keep = HistoryPolicy { size: 1000, ttl: Duration::from_secs(60) };
        e.listen("b").await.expect("listen");
        let body = Bytes::from(vec![b'x'; 200]);
        for _ in 0..200 {
            e.publish("b", Publish::data(body.clone()), keep).await.expect("publish");
        }
        let seen = rec.wait_for(200).await;
        let offsets: Vec<u64> = seen.iter().map(|(_, _, r)| r.offset).collect();
        assert_eq!(offsets, (1..=200).collect::<Vec<_>>(), "once each, in order");
        assert!(e.inner.overflows.load(Ordering::Relaxed) > 0, "the bound was reached");
        assert!(e.inner.queued_bytes.load(Ordering::Relaxed) <= 4096);
        assert!(rec.lost.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
    }

    /// Without history to read back from, the subscribers are told to recover: no silent gap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_falls_behind_without_history_makes_subscribers_recover() {
        let (e, rec) = slow_engine();
        e.listen("z").await.expect("listen");
        let body = Bytes::from(vec![b'x'; 200]);
        for _ in 0..200 {
            e.publish("z", Publish::data(body.clone()), HistoryPolicy::NONE).await.expect("publish");
        }
        for _ in 0..500 {
            if !rec.lost.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(e.inner.overflows.load(Ordering::Relaxed) > 0, "the bound was reached");
        let lost = rec.lost.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert!(!lost.is_empty() && lost.iter().all(|c| c == "z"), "{lost:?}");
    }

    /// Concurrent publications share the node's one command connection (pipelined by the
    /// multiplexer): a node holds two connections to Redis, whatever the load.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_publications_share_one_connection() {
        let e = Arc::new(engine());
        let keep = HistoryPolicy { size: 10, ttl: Duration::from_secs(60) };
        e.listen("p0").await.expect("listen");
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let e = e.clone();
                tokio::spawn(async move {
                    for _ in 0..10 {
                        e.publish(&format!("p{}", i % 8), Publish::data(Bytes::from_static(b"1")), keep)
                            .await
                            .expect("publish");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        let mut raw = raw(&e).await;
        let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut raw).await.expect("client list");
        assert_eq!(list.lines().count(), 3, "the command connection, the pub/sub link, this test's: {list}");
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
        let mut old = None;
        for i in 1..=2 {
            old = Some(e.publish("f", Publish::data(Bytes::from(i.to_string())), keep).await.expect("publish"));
        }
        let old = old.expect("published");
        assert_eq!(rec.wait_for(2).await.len(), 2);
        // Redis forgets everything while the node runs: the next stream's epoch differs
        // (the base is made again), so its offset 1 cannot look like old offset 1.
        let mut raw = raw(&e).await;
        let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await.expect("flush");
        let pos = e.publish("f", Publish::data(Bytes::from_static(b"9")), keep).await.expect("publish");
        assert!(pos.epoch != old.epoch && pos.offset == 1, "{pos:?} after {old:?}");
        for _ in 0..500 {
            if !rec.lost.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*rec.lost.lock().unwrap_or_else(|e| e.into_inner()), ["f"], "subscribers told to recover");
    }

    /// Whatever part of Redis's state goes, the epoch a new stream gets changes: the prefix's
    /// base (a `FLUSHALL`), the channel's own keys (an eviction: `evicted_keys` moves; here
    /// the count is what an eviction leaves, simulated by deleting the keys and evicting
    /// another key), and never does a node's memory bring an old epoch back.
    #[tokio::test]
    async fn a_recreated_stream_never_gets_an_old_epoch() {
        let e = engine();
        let keep = HistoryPolicy { size: 10, ttl: Duration::from_secs(60) };
        let mut raw = raw(&e).await;
        let mut seen = HashSet::new();
        let first = e.publish("r", Publish::data(Bytes::from_static(b"1")), keep).await.expect("publish");
        assert!(seen.insert(first.epoch.clone()));
        assert_eq!(first.epoch.len(), 16, "an opaque string: {first:?}");

        // Only the base goes: the next new stream's epoch differs.
        let channel_keys = [e.inner.key("r", "meta"), e.inner.key("r", "stream")];
        let _: () = redis::cmd("DEL").arg("{t}:base").arg(&channel_keys).query_async(&mut raw).await.expect("del");
        let p = e.publish("r", Publish::data(Bytes::from_static(b"1")), keep).await.expect("publish");
        assert!(p.offset == 1 && seen.insert(p.epoch.clone()), "{p:?}");

        // The base stays, the channel is evicted: Redis counts the eviction, the epoch moves.
        let base: String = redis::cmd("GET").arg("{t}:base").query_async(&mut raw).await.expect("get");
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("allkeys-random")
            .query_async(&mut raw)
            .await
            .expect("policy");
        let _: () = redis::cmd("SET").arg("filler").arg(vec![b'x'; 1 << 20]).query_async(&mut raw).await.expect("set");
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut raw).await.expect("info");
        let used: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory");
        let before: String = redis::cmd("INFO").arg("stats").query_async(&mut raw).await.expect("info");
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(used - (512 << 10))
            .query_async(&mut raw)
            .await
            .expect("maxmemory");
        // Any command that may allocate makes Redis evict down to the bound.
        let _: () = redis::cmd("SET").arg("poke").arg("1").query_async(&mut raw).await.expect("poke");
        let _: () =
            redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0).query_async(&mut raw).await.expect("unbounded");
        let after: String = redis::cmd("INFO").arg("stats").query_async(&mut raw).await.expect("info");
        let evicted = |i: &str| i.lines().find_map(|l| l.strip_prefix("evicted_keys:")).map(|v| v.trim().to_owned());
        assert_ne!(evicted(&before), evicted(&after), "Redis evicted something");
        // Whatever the eviction took, the channel is gone and the base is as it was: only the
        // count differs.
        let _: () = redis::cmd("DEL").arg(&channel_keys).query_async(&mut raw).await.expect("del");
        let _: () = redis::cmd("SET").arg("{t}:base").arg(base).query_async(&mut raw).await.expect("set");
        let p = e.publish("r", Publish::data(Bytes::from_static(b"1")), keep).await.expect("publish");
        assert!(p.offset == 1 && seen.insert(p.epoch.clone()), "{p:?} repeats one of {seen:?}");
    }

    /// Two nodes publishing to a new channel at once agree on one epoch: the script that
    /// creates the stream decides it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_creating_one_stream_at_once_agree_on_its_epoch() {
        let a = Arc::new(engine());
        let b =
            Arc::new(RedisEngine::new(RedisSettings::new(a.server.as_ref().expect("server").url(), "t")).expect("b"));
        let keep = HistoryPolicy { size: 100, ttl: Duration::from_secs(60) };
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let e = if i % 2 == 0 { a.clone() } else { b.clone() };
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for _ in 0..10 {
                        out.push(
                            e.publish("new", Publish::data(Bytes::from_static(b"1")), keep).await.expect("publish"),
                        );
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        let epochs: HashSet<_> = all.iter().map(|p| p.epoch.clone()).collect();
        assert_eq!(epochs.len(), 1, "{epochs:?}");
        let mut offsets: Vec<u64> = all.iter().map(|p| p.offset).collect();
        offsets.sort_unstable();
        assert_eq!(offsets, (1..=80).collect::<Vec<_>>());
    }

    /// The backoff schedule, as pure logic with seeded generators standing in for nodes.
    #[test]
    fn reconnect_delays_grow_within_bounds_and_are_jittered() {
        use rand::SeedableRng;
        let (floor, cap) = (Duration::from_millis(50), Duration::from_secs(1));
        let schedule = |seed: u64, n: usize| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut b = Backoff::new(floor, cap);
            (0..n).map(|_| b.next(&mut rng)).collect::<Vec<_>>()
        };
        // Bounds: never under the floor, never over the cap, never over 3 × the previous.
        for seed in 0..200 {
            let s = schedule(seed, 40);
            let mut prev = floor;
            for d in &s {
                assert!(*d >= floor && *d <= cap, "seed {seed}: {d:?}");
                assert!(*d <= (prev * 3).min(cap).max(floor), "seed {seed}: {d:?} after {prev:?}");
                prev = *d;
            }
            assert_eq!(s, schedule(seed, 40), "a seed gives one schedule");
        }
        // Growth: averaged over many nodes, later delays are longer, up to near the cap.
        let mean = |attempt: usize| {
            let total: Duration = (0..500).map(|seed| schedule(seed, attempt + 1)[attempt]).sum();
            total / 500
        };
        let (m0, m3, m15) = (mean(0), mean(3), mean(15));
        assert!(m0 <= Duration::from_millis(150), "the first retry is quick: {m0:?}");
        assert!(m3 > m0 * 2, "grows: {m0:?} then {m3:?}");
        // (Decorrelated jitter settles around 40 % of the cap: each delay is drawn from up
        // to three times the one before, which may itself have been short.)
        assert!(m15 > cap / 4 && m15 > m0 * 3 && m15 <= cap, "settles in the cap's range: {m15:?}");
        // Jitter: nodes that started together are spread, at every attempt.
        for attempt in [0, 5, 20] {
            let at: Vec<Duration> = (0..100).map(|seed| schedule(seed, attempt + 1)[attempt]).collect();
            let distinct: HashSet<_> = at.iter().collect();
            assert!(distinct.len() > 90, "attempt {attempt}: {} distinct of 100", distinct.len());
            let (lo, hi) = (at.iter().min().copied().unwrap_or_default(), at.iter().max().copied().unwrap_or_default());
            assert!(hi - lo > Duration::from_millis(50), "attempt {attempt}: spread {lo:?}..{hi:?}");
        }
        // After Redis answered, the next outage starts from the floor's range again.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(floor, cap);
        for _ in 0..20 {
            b.next(&mut rng);
        }
        b.reset();
        assert!(b.next(&mut rng) <= floor * 3);
        // A cap under the floor is the floor.
        let mut b = Backoff::new(floor, Duration::ZERO);
        assert_eq!(b.next(&mut rng), floor);
    }

    /// TLS files rustls would refuse at connect time are refused up front, by key: a
    /// certificate that does not belong to the key, an X.509 v1 certificate (what `openssl
    /// x509 -req` makes without `-extfile`; a fixture made that way), files that are not PEM.
    #[test]
    fn unusable_tls_files_are_named_before_connecting() {
        let dir = tempfile::tempdir().expect("dir");
        let (tls, cert, key) = tls::pki(dir.path()).expect("pki");
        let with = |ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path| {
            let mut s = RedisSettings::new("rediss://127.0.0.1:1", "t");
            (s.tls_ca, s.tls_cert, s.tls_key) = (ca.into(), cert.into(), key.into());
            s.check_tls_files().map_err(|(k, m)| (k, m.to_lowercase()))
        };
        with(&tls.ca, &cert, &key).expect("a good set");
        let (k, m) = with(&tls.ca, &cert, &tls.key).expect_err("another key");
        assert_eq!(k, "engine.redis.tls_cert", "{m}");
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let v1 = (fixtures.join("test-only-x509-v1-cert.pem"), fixtures.join("test-only-x509-v1-key.pem"));
        let (k, m) = with(&tls.ca, &v1.0, &v1.1).expect_err("X.509 v1");
        assert!(k == "engine.redis.tls_cert" && m.contains("version"), "{k}: {m}");
        assert_eq!(with(&tls.key, &cert, &key).map_err(|e| e.0), Err("engine.redis.tls_ca"), "a key is no CA");
        assert_eq!(with(&tls.ca, &key, &key).map_err(|e| e.0), Err("engine.redis.tls_cert"), "a key is no cert");
        assert_eq!(with(&tls.ca, &cert, &cert).map_err(|e| e.0), Err("engine.redis.tls_key"), "a cert is no key");
        let (_, m) = with(&tls.ca, &cert, &tls.ca).expect_err("no key");
        assert!(!m.contains("begin certificate-----\nmii"), "never quotes the file: {m}");
    }

    #[test]
    fn bodies_round_trip() {
        let info = ClientInfo { user: "u\n1".into(), client: "c".into() };
        let body = encode_body(Some(&info), None, b"{\"a\":\n1}");
        assert_eq!(
            decode_body(Bytes::from(body)),
            Some((Some(info.clone()), None, Bytes::from_static(b"{\"a\":\n1}")))
        );
        let tags: Tags = [("event".to_owned(), "a\nb#{".to_owned()), ("k\n".to_owned(), String::new())].into();
        let body = encode_body(Some(&info), Some(&tags), b"#\n");
        let tags = Some(Arc::new(tags));
        assert_eq!(decode_body(Bytes::from(body)), Some((Some(info), tags.clone(), Bytes::from_static(b"#\n"))));
        let body = encode_body(None, tags.as_deref(), b"{}");
        assert_eq!(decode_body(Bytes::from(body)), Some((None, tags.clone(), Bytes::from_static(b"{}"))));
        let mut p = b"12\nabc-3\n\n".to_vec();
        p.extend(encode_body(None, None, b"7"));
        let (pos, rec) = decode_publication(Bytes::from(p)).expect("decodes");
        assert_eq!((pos.offset, &*pos.epoch, rec.data, rec.exclude), (12, "abc-3", Bytes::from_static(b"7"), None));
        let mut p = b"12\nabc-3\n4294967297\n".to_vec();
        p.extend(encode_body(None, tags.as_deref(), b"7"));
        let (_, rec) = decode_publication(Bytes::from(p)).expect("decodes");
        assert_eq!((rec.exclude, rec.tags), (Some(4_294_967_297), tags));
        assert_eq!(decode_publication(Bytes::from_static(b"x\n")), None);
        assert_eq!(decode_publication(Bytes::from_static(b"1\ne\nnope\n\n{}")), None);
        assert_eq!(decode_body(Bytes::from_static(b"#{\"a\":1}\n\n{}")), None, "tags are strings");
        let e = PresenceEntry { client: "c".into(), user: "a:b".into(), info: Some(Bytes::from_static(b"{}")) };
        assert_eq!(decode_presence("c".into(), &encode_presence(&e)), Some(e));
    }
}
