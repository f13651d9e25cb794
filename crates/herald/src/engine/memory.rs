//! The in-memory engine: one node, nothing to install. Per-channel history bounded by size and
//! age, a fresh random epoch for every stream it creates (so a restart, or an idle channel
//! forgotten by the sweeper, never matches an old position), and presence with expiry.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{self, BoxFuture};
use herald_protocol::ClientInfo;

use super::{
    Delivery, Engine, EngineError, History, HistoryPolicy, HistoryQuery, PresenceChange, PresenceEntry, PresenceStats,
    PublicationRecord, StreamPosition,
};

/// How long a channel with no history keeps its position after its last publication or read.
const IDLE_POSITION_TTL: Duration = Duration::from_secs(300);

const SHARDS: usize = 64;

#[derive(Debug)]
struct Stored {
    record: PublicationRecord,
    at: Instant,
}

#[derive(Debug)]
struct Stream {
    epoch: Arc<str>,
    offset: u64,
    history: VecDeque<Stored>,
    ttl: Duration,
    touched: Instant,
}

impl Stream {
    fn new(now: Instant) -> Self {
        Self { epoch: new_epoch(), offset: 0, history: VecDeque::new(), ttl: IDLE_POSITION_TTL, touched: now }
    }

    fn expire(&mut self, now: Instant) {
        while self.history.front().is_some_and(|s| now.duration_since(s.at) >= self.ttl) {
            self.history.pop_front();
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition { epoch: self.epoch.clone(), offset: self.offset }
    }
}

#[derive(Debug, Default)]
struct ChannelPresence {
    clients: HashMap<String, (PresenceEntry, Instant)>,
    /// Connections per user key (anonymous clients count as their own user).
    users: HashMap<String, usize>,
}

fn user_key(e: &PresenceEntry) -> &str {
    if e.user.is_empty() {
        &e.client
    } else {
        &e.user
    }
}

impl ChannelPresence {
    fn expire(&mut self, now: Instant) {
        let expired: Vec<String> =
            self.clients.iter().filter(|(_, (_, until))| *until <= now).map(|(c, _)| c.clone()).collect();
        for c in expired {
            self.remove(&c);
        }
    }

    fn remove(&mut self, client: &str) -> (PresenceChange, Option<PresenceEntry>) {
        let Some((entry, _)) = self.clients.remove(client) else { return (PresenceChange::Unchanged, None) };
        let key = user_key(&entry).to_owned();
        let change = match self.users.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                PresenceChange::Unchanged
            }
            _ => {
                self.users.remove(&key);
                PresenceChange::UserLeft
            }
        };
        (change, Some(entry))
    }
}

type Shards<T> = Box<[Mutex<HashMap<Arc<str>, T>>]>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its collections consistent at each step, so a poisoned
    // lock (a panic elsewhere while holding it) is still safe to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The in-memory engine.
pub struct MemoryEngine {
    streams: Shards<Arc<Mutex<Stream>>>,
    presence: Shards<ChannelPresence>,
    hasher: std::collections::hash_map::RandomState,
    delivery: OnceLock<Arc<dyn Delivery>>,
}

impl std::fmt::Debug for MemoryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryEngine").finish_non_exhaustive()
    }
}

impl Default for MemoryEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryEngine {
    pub fn new() -> Self {
        Self { streams: shards(), presence: shards(), hasher: Default::default(), delivery: OnceLock::new() }
    }

    fn shard<'a, T>(&self, shards: &'a Shards<T>, channel: &str) -> &'a Mutex<HashMap<Arc<str>, T>> {
        &shards[(self.hasher.hash_one(channel) as usize) % shards.len()]
    }

    fn stream(&self, channel: &str, now: Instant) -> Arc<Mutex<Stream>> {
        let mut shard = lock(self.shard(&self.streams, channel));
        if let Some(s) = shard.get(channel) {
            return s.clone();
        }
        let s = Arc::new(Mutex::new(Stream::new(now)));
        shard.insert(Arc::from(channel), s.clone());
        s
    }

    fn publish_now(
        &self,
        channel: &str,
        data: Bytes,
        info: Option<ClientInfo>,
        policy: HistoryPolicy,
    ) -> StreamPosition {
        let now = Instant::now();
        let stream = self.stream(channel, now);
        let mut s = lock(&stream);
        s.offset += 1;
        s.touched = now;
        s.ttl = policy.ttl.max(if policy.size == 0 { IDLE_POSITION_TTL } else { Duration::ZERO });
        let record = PublicationRecord { offset: s.offset, data, info };
        if policy.size > 0 {
            s.history.push_back(Stored { record: record.clone(), at: now });
            while s.history.len() > policy.size {
                s.history.pop_front();
            }
        } else {
            s.history.clear();
        }
        s.expire(now);
        let position = s.position();
        // Delivered under the stream's lock: deliveries of one channel happen in offset order.
        if let Some(d) = self.delivery.get() {
            d.deliver(channel, &position, &record);
        }
        position
    }

    fn history_now(&self, channel: &str, query: HistoryQuery) -> History {
        let now = Instant::now();
        let stream = self.stream(channel, now);
        let mut s = lock(&stream);
        s.touched = now;
        s.expire(now);
        let position = s.position();
        let limit = query.limit;
        let (publications, complete) = match &query.since {
            None => {
                let skip = s.history.len().saturating_sub(limit);
                (s.history.iter().skip(skip).map(|x| x.record.clone()).collect::<Vec<_>>(), false)
            }
            Some(since) if since.epoch != s.epoch || since.offset > s.offset => (Vec::new(), false),
            Some(since) => {
                let first_kept = s.history.front().map_or(s.offset + 1, |x| x.record.offset);
                let reachable = since.offset + 1 >= first_kept;
                let missed: Vec<_> = s.history.iter().filter(|x| x.record.offset > since.offset).collect();
                let complete = reachable && missed.len() <= limit;
                (missed.into_iter().take(limit).map(|x| x.record.clone()).collect(), complete)
            }
        };
        let mut publications = publications;
        if query.reverse {
            publications.reverse();
        }
        History { position, publications, complete }
    }

    /// Forgets channels idle past their TTL (their next publication starts a new epoch) and
    /// expired presence.
    fn sweep_now(&self) {
        let now = Instant::now();
        for shard in self.streams.iter() {
            lock(shard).retain(|_, s| {
                let mut s = lock(s);
                s.expire(now);
                !(s.history.is_empty() && now.duration_since(s.touched) >= s.ttl)
            });
        }
        for shard in self.presence.iter() {
            lock(shard).retain(|_, p| {
                p.expire(now);
                !p.clients.is_empty()
            });
        }
    }

    /// Channels with a stream, for tests and diagnostics.
    pub fn stream_count(&self) -> usize {
        self.streams.iter().map(|s| lock(s).len()).sum()
    }

    fn with_presence<R>(&self, channel: &str, f: impl FnOnce(&mut ChannelPresence) -> R) -> R {
        let mut shard = lock(self.shard(&self.presence, channel));
        let p = shard.entry(Arc::from(channel)).or_default();
        p.expire(Instant::now());
        let r = f(p);
        if p.clients.is_empty() {
            shard.remove(channel);
        }
        r
    }
}

fn shards<T>() -> Shards<T> {
    (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect()
}

fn new_epoch() -> Arc<str> {
    let n: u32 = rand::random();
    Arc::from(format!("{n:08x}").as_str())
}

impl Engine for MemoryEngine {
    fn set_delivery(&self, delivery: Arc<dyn Delivery>) {
        let _ = self.delivery.set(delivery);
    }

    fn sweep(&self) {
        self.sweep_now();
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        data: Bytes,
        info: Option<ClientInfo>,
        policy: HistoryPolicy,
    ) -> BoxFuture<'a, Result<StreamPosition, EngineError>> {
        Box::pin(future::ready(Ok(self.publish_now(channel, data, info, policy))))
    }

    fn history<'a>(&'a self, channel: &'a str, query: HistoryQuery) -> BoxFuture<'a, Result<History, EngineError>> {
        Box::pin(future::ready(Ok(self.history_now(channel, query))))
    }

    fn presence_add<'a>(
        &'a self,
        channel: &'a str,
        entry: PresenceEntry,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<PresenceChange, EngineError>> {
        let change = self.with_presence(channel, |p| {
            let until = Instant::now() + ttl;
            if let Some(existing) = p.clients.get_mut(&entry.client) {
                existing.1 = until;
                return PresenceChange::Unchanged;
            }
            let key = user_key(&entry).to_owned();
            p.clients.insert(entry.client.clone(), (entry, until));
            let n = p.users.entry(key).or_insert(0);
            *n += 1;
            if *n == 1 {
                PresenceChange::UserJoined
            } else {
                PresenceChange::Unchanged
            }
        });
        Box::pin(future::ready(Ok(change)))
    }

    fn presence_remove<'a>(
        &'a self,
        channel: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<(PresenceChange, Option<PresenceEntry>), EngineError>> {
        Box::pin(future::ready(Ok(self.with_presence(channel, |p| p.remove(client)))))
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<PresenceEntry>, EngineError>> {
        let mut list = self.with_presence(channel, |p| p.clients.values().map(|(e, _)| e.clone()).collect::<Vec<_>>());
        list.sort_by(|a, b| a.client.cmp(&b.client));
        Box::pin(future::ready(Ok(list)))
    }

    fn presence_stats<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<PresenceStats, EngineError>> {
        let stats = self.with_presence(channel, |p| PresenceStats { clients: p.clients.len(), users: p.users.len() });
        Box::pin(future::ready(Ok(stats)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::engine_conformance!(MemoryEngine::new());

    #[test]
    fn idle_channels_are_forgotten_and_come_back_with_a_new_epoch() {
        let e = MemoryEngine::new();
        let policy = HistoryPolicy { size: 10, ttl: Duration::from_millis(1) };
        let first = e.publish_now("c", Bytes::from_static(b"1"), None, policy);
        std::thread::sleep(Duration::from_millis(5));
        // History expired; the stream is still touched recently, then idle past its TTL.
        e.sweep_now();
        assert_eq!(e.stream_count(), 0);
        let second = e.publish_now("c", Bytes::from_static(b"1"), None, policy);
        assert_eq!(second.offset, 1);
        assert_ne!(second.epoch, first.epoch);
    }
}
