//! The in-memory engine: one node, nothing to install. Per-channel history bounded by size and
//! age, node-wide limits on channels and history bytes, epochs that never repeat for a channel
//! (so a restart, or an idle channel forgotten by the sweeper, never matches an old position),
//! and presence with expiry. Reading a channel that has no stream creates nothing.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{self, BoxFuture};

use super::{
    Delivery, Engine, EngineError, EngineLimits, EngineStats, History, HistoryPolicy, HistoryQuery, PresenceChange,
    PresenceEntry, PresenceStats, PublicationRecord, Publish, StreamPosition,
};

/// How long a channel with no history keeps its position after its last publication or read.
const IDLE_POSITION_TTL: Duration = Duration::from_secs(300);

const SHARDS: usize = 64;

/// Forgotten channels remembered per shard (a hash and a count each, about 32 bytes). Past
/// this, the shard takes a new base epoch and starts over: every epoch it hands out from then
/// on differs from every earlier one.
const FORGOTTEN_PER_SHARD: usize = 2048;

#[derive(Debug)]
struct Stored {
    record: PublicationRecord,
    at: Instant,
    /// What this publication counts against `max_history_bytes`.
    bytes: usize,
}

#[derive(Debug)]
struct Stream {
    epoch: Arc<str>,
    /// How many streams of this channel (by hash) were forgotten before this one.
    incarnation: u32,
    offset: u64,
    history: VecDeque<Stored>,
    /// Sum of `bytes` over `history`.
    bytes: usize,
    ttl: Duration,
    touched: Instant,
    /// Cleared when the sweeper removes the stream: a publisher that looked it up just before
    /// must look again.
    live: bool,
}

impl Stream {
    /// Drops expired publications; returns the bytes freed.
    fn expire(&mut self, now: Instant) -> usize {
        let mut freed = 0;
        while self.history.front().is_some_and(|s| now.duration_since(s.at) >= self.ttl) {
            freed += self.pop_front();
        }
        freed
    }

    fn pop_front(&mut self) -> usize {
        let freed = self.history.pop_front().map_or(0, |s| s.bytes);
        self.bytes -= freed;
        freed
    }

    fn position(&self) -> StreamPosition {
        StreamPosition { epoch: self.epoch.clone(), offset: self.offset }
    }
}

/// One shard of the channel → stream map, with what it remembers of forgotten streams.
#[derive(Debug)]
struct StreamShard {
    streams: HashMap<Arc<str>, Arc<Mutex<Stream>>>,
    /// Channel hash → incarnation of the next stream of that channel (absent: 0).
    forgotten: HashMap<u64, u32>,
    /// Prefix of every epoch this shard hands out; random, so a restart never matches.
    base: Arc<str>,
}

impl StreamShard {
    fn new() -> Self {
        Self { streams: HashMap::new(), forgotten: HashMap::new(), base: new_epoch() }
    }

    /// The epoch and incarnation the channel's next stream will have: what a read of a
    /// channel without a stream reports, so that its subscribers recover from `(epoch, 0)`.
    fn next_epoch(&self, key: u64) -> (Arc<str>, u32) {
        match self.forgotten.get(&key).copied().unwrap_or(0) {
            0 => (self.base.clone(), 0),
            n => (Arc::from(format!("{}-{n}", self.base).as_str()), n),
        }
    }

    /// Remembers that a stream was forgotten, so its channel's next stream gets a new epoch.
    fn forget(&mut self, key: u64, incarnation: u32) {
        if !self.forgotten.contains_key(&key) && self.forgotten.len() >= FORGOTTEN_PER_SHARD {
            // A new base differs from every epoch handed out so far: nothing old can match.
            self.base = new_epoch();
            self.forgotten.clear();
        }
        let next = self.forgotten.entry(key).or_insert(0);
        *next = (*next).max(incarnation.saturating_add(1));
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its collections consistent at each step, so a poisoned
    // lock (a panic elsewhere while holding it) is still safe to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type PresenceShard = Mutex<HashMap<Arc<str>, ChannelPresence>>;

/// The in-memory engine.
pub struct MemoryEngine {
    streams: Box<[Mutex<StreamShard>]>,
    presence: Box<[PresenceShard]>,
    hasher: std::collections::hash_map::RandomState,
    delivery: OnceLock<Arc<dyn Delivery>>,
    limits: EngineLimits,
    /// Streams in `streams`.
    channels: AtomicUsize,
    /// Sum of every stream's `bytes`.
    history_bytes: AtomicUsize,
}

impl std::fmt::Debug for MemoryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryEngine").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl Default for MemoryEngine {
    fn default() -> Self {
        Self::new()
    }
}

/// What a publication counts against `max_history_bytes`: its data and its info.
fn record_bytes(p: &Publish) -> usize {
    let tags = p.tags.as_ref().map_or(0, |t| t.iter().map(|(k, v)| k.len() + v.len()).sum());
    p.data.len() + p.info.as_ref().map_or(0, |i| i.user.len() + i.client.len()) + tags
}

impl MemoryEngine {
    /// An engine without node-wide limits.
    pub fn new() -> Self {
        Self::with_limits(EngineLimits::NONE)
    }

    pub fn with_limits(limits: EngineLimits) -> Self {
        Self {
            streams: (0..SHARDS).map(|_| Mutex::new(StreamShard::new())).collect(),
            presence: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            delivery: OnceLock::new(),
            limits,
            channels: AtomicUsize::new(0),
            history_bytes: AtomicUsize::new(0),
        }
    }

    fn key(&self, channel: &str) -> u64 {
        self.hasher.hash_one(channel)
    }

    fn stream_shard(&self, key: u64) -> &Mutex<StreamShard> {
        &self.streams[(key as usize) % self.streams.len()]
    }

    fn presence_shard(&self, channel: &str) -> &PresenceShard {
        &self.presence[(self.key(channel) as usize) % self.presence.len()]
    }

    /// The channel's stream, created if needed (within `max_channels`); the `bool` says
    /// whether this call created it.
    fn stream(&self, channel: &str, now: Instant) -> Result<(Arc<Mutex<Stream>>, bool), EngineError> {
        let key = self.key(channel);
        let mut shard = lock(self.stream_shard(key));
        if let Some(s) = shard.streams.get(channel) {
            return Ok((s.clone(), false));
        }
        let max = self.limits.max_channels;
        if self.channels.fetch_add(1, Ordering::Relaxed) >= max {
            self.channels.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::TooManyChannels { max });
        }
        let (epoch, incarnation) = shard.next_epoch(key);
        let stream = Stream {
            epoch,
            incarnation,
            offset: 0,
            history: VecDeque::new(),
            bytes: 0,
            ttl: IDLE_POSITION_TTL,
            touched: now,
            live: true,
        };
        let s = Arc::new(Mutex::new(stream));
        shard.streams.insert(Arc::from(channel), s.clone());
        Ok((s, true))
    }

    /// Removes a stream this engine created for a publication that was then refused: it
    /// handed out no position but `(epoch, 0)`, which its next incarnation repeats.
    fn undo_create(&self, channel: &str, stream: &Arc<Mutex<Stream>>) {
        let mut shard = lock(self.stream_shard(self.key(channel)));
        let unused = shard.streams.get(channel).is_some_and(|s| Arc::ptr_eq(s, stream)) && lock(stream).offset == 0;
        if unused {
            shard.streams.remove(channel);
            self.channels.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.history_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Accounts `add` more bytes and `free` fewer, unless the total would pass the limit.
    fn reserve(&self, add: usize, free: usize) -> Result<(), EngineError> {
        let max = self.limits.max_history_bytes;
        self.history_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                let next = cur.saturating_add(add).saturating_sub(free);
                (next <= max || add <= free).then_some(next)
            })
            .map(|_| ())
            .map_err(|_| EngineError::HistoryFull { max })
    }

    fn publish_now(
        &self,
        channel: &str,
        publication: Publish,
        policy: HistoryPolicy,
    ) -> Result<StreamPosition, EngineError> {
        let now = Instant::now();
        let (stream, created) = self.stream(channel, now)?;
        let mut s = lock(&stream);
        if !s.live {
            // Forgotten by the sweeper right after we looked it up: look again.
            drop(s);
            return self.publish_now(channel, publication, policy);
        }
        s.ttl = policy.ttl.max(if policy.size == 0 { IDLE_POSITION_TTL } else { Duration::ZERO });
        let freed = s.expire(now);
        self.release(freed);
        let size = record_bytes(&publication);
        // What keeping this publication pushes out of the channel's own history.
        let drop_n = if policy.size == 0 { s.history.len() } else { (s.history.len() + 1).saturating_sub(policy.size) };
        let freeing: usize = s.history.iter().take(drop_n).map(|x| x.bytes).sum();
        let keep = if policy.size > 0 { size } else { 0 };
        if let Err(e) = self.reserve(keep, freeing) {
            drop(s);
            if created {
                self.undo_create(channel, &stream);
            }
            return Err(e);
        }
        for _ in 0..drop_n {
            s.pop_front();
        }
        s.offset += 1;
        s.touched = now;
        let record = publication.into_record(s.offset);
        if policy.size > 0 {
            // The exclusion is for the live delivery only.
            let stored = PublicationRecord { exclude: None, ..record.clone() };
            s.history.push_back(Stored { record: stored, at: now, bytes: size });
            s.bytes += size;
        }
        let position = s.position();
        // Delivered under the stream's lock: deliveries of one channel happen in offset order.
        if let Some(d) = self.delivery.get() {
            d.deliver(channel, &position, &record);
        }
        Ok(position)
    }

    fn history_now(&self, channel: &str, query: HistoryQuery) -> History {
        let now = Instant::now();
        let key = self.key(channel);
        let stream = {
            let shard = lock(self.stream_shard(key));
            match shard.streams.get(channel) {
                Some(s) => s.clone(),
                None => {
                    // No stream: answer the position its first publication will continue from,
                    // and create nothing.
                    let (epoch, _) = shard.next_epoch(key);
                    let complete = query.since.as_ref().is_some_and(|p| p.epoch == epoch && p.offset == 0);
                    return History {
                        position: StreamPosition { epoch, offset: 0 },
                        publications: Vec::new(),
                        complete,
                    };
                }
            }
        };
        let mut s = lock(&stream);
        s.touched = now;
        let freed = s.expire(now);
        self.release(freed);
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
        // A stream that someone on this node listens to is kept: forgetting it would start a
        // new epoch at offset 1 under live subscribers, whose next offsets would look old (a
        // silent gap). Its history still expires; only the position stays.
        let listened = |name: &str| self.delivery.get().is_some_and(|d| d.has_subscribers(name));
        for shard in self.streams.iter() {
            let mut shard = lock(shard);
            let mut gone = Vec::new();
            shard.streams.retain(|name, s| {
                let mut s = lock(s);
                let freed = s.expire(now);
                self.release(freed);
                let idle = s.history.is_empty() && now.duration_since(s.touched) >= s.ttl && !listened(name);
                if idle {
                    s.live = false;
                    gone.push((self.key(name), s.incarnation));
                }
                !idle
            });
            self.channels.fetch_sub(gone.len(), Ordering::Relaxed);
            for (key, incarnation) in gone {
                shard.forget(key, incarnation);
            }
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
        self.channels.load(Ordering::Relaxed)
    }

    fn with_presence<R>(&self, channel: &str, f: impl FnOnce(&mut ChannelPresence) -> R) -> R {
        let mut shard = lock(self.presence_shard(channel));
        let p = shard.entry(Arc::from(channel)).or_default();
        p.expire(Instant::now());
        let r = f(p);
        if p.clients.is_empty() {
            shard.remove(channel);
        }
        r
    }
}

fn new_epoch() -> Arc<str> {
    let n: u64 = rand::random();
    Arc::from(format!("{n:016x}").as_str())
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
        publication: Publish,
        policy: HistoryPolicy,
    ) -> BoxFuture<'a, Result<StreamPosition, EngineError>> {
        Box::pin(future::ready(self.publish_now(channel, publication, policy)))
    }

    fn history<'a>(&'a self, channel: &'a str, query: HistoryQuery) -> BoxFuture<'a, Result<History, EngineError>> {
        Box::pin(future::ready(Ok(self.history_now(channel, query))))
    }

    fn broadcast<'a>(&'a self, channel: &'a str, text: Bytes) -> BoxFuture<'a, Result<(), EngineError>> {
        if let Some(d) = self.delivery.get() {
            d.notify(channel, text);
        }
        Box::pin(future::ready(Ok(())))
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

    fn stats(&self) -> EngineStats {
        EngineStats {
            channels: self.channels.load(Ordering::Relaxed),
            history_bytes: self.history_bytes.load(Ordering::Relaxed),
        }
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
        let first = e.publish_now("c", Publish::data(Bytes::from_static(b"1")), policy).expect("publish");
        #[allow(clippy::disallowed_methods)] // a plain #[test], no runtime
        std::thread::sleep(Duration::from_millis(5));
        // History expired; the stream is still touched recently, then idle past its TTL.
        e.sweep_now();
        assert_eq!(e.stream_count(), 0);
        assert_eq!(e.stats().history_bytes, 0);
        let second = e.publish_now("c", Publish::data(Bytes::from_static(b"1")), policy).expect("publish");
        assert_eq!(second.offset, 1);
        assert_ne!(second.epoch, first.epoch);
    }

    /// Says every channel but `quiet` has subscribers.
    struct Listening;

    impl Delivery for Listening {
        fn deliver(&self, _: &str, _: &StreamPosition, _: &PublicationRecord) {}

        fn has_subscribers(&self, channel: &str) -> bool {
            channel != "quiet"
        }
    }

    #[test]
    fn a_stream_with_subscribers_keeps_its_position_when_its_history_expires() {
        let e = MemoryEngine::new();
        e.set_delivery(Arc::new(Listening));
        let policy = HistoryPolicy { size: 10, ttl: Duration::from_millis(1) };
        let first = e.publish_now("c", Publish::data(Bytes::from_static(b"1")), policy).expect("publish");
        e.publish_now("quiet", Publish::data(Bytes::from_static(b"1")), policy).expect("publish");
        #[allow(clippy::disallowed_methods)] // a plain #[test], no runtime
        std::thread::sleep(Duration::from_millis(5));
        e.sweep_now();
        assert_eq!(e.stats().history_bytes, 0, "history expires all the same");
        assert_eq!(e.stream_count(), 1, "only the stream nobody listens to is forgotten");
        let second = e.publish_now("c", Publish::data(Bytes::from_static(b"2")), policy).expect("publish");
        assert_eq!((second.epoch, second.offset), (first.epoch, 2), "live subscribers see no new epoch");
    }

    #[tokio::test]
    async fn a_publication_creates_one_stream() {
        let e = MemoryEngine::new();
        e.history("s", HistoryQuery::default()).await.expect("read");
        assert_eq!(e.stats().channels, 0, "reading creates nothing");
        e.publish("s", Publish::data(Bytes::from_static(b"1")), HistoryPolicy::NONE).await.expect("publish");
        assert_eq!(e.stats().channels, 1);
    }

    #[test]
    fn limits_refuse_and_change_nothing() {
        let limits = EngineLimits { max_channels: 2, max_history_bytes: 10 };
        let e = MemoryEngine::with_limits(limits);
        let keep = HistoryPolicy { size: 3, ttl: Duration::from_secs(60) };
        let four = || Bytes::from_static(b"1234");
        e.publish_now("a", Publish::data(four()), keep).expect("a");
        e.publish_now("b", Publish::data(four()), keep).expect("b");
        assert_eq!(e.publish_now("c", Publish::data(four()), keep), Err(EngineError::TooManyChannels { max: 2 }));
        assert_eq!(e.stats(), EngineStats { channels: 2, history_bytes: 8 });
        // 8 + 4 > 10: refused, and channel `a` keeps its position.
        assert_eq!(e.publish_now("a", Publish::data(four()), keep), Err(EngineError::HistoryFull { max: 10 }));
        let h = e.history_now("a", HistoryQuery { limit: 10, ..Default::default() });
        assert_eq!((h.position.offset, h.publications.len()), (1, 1));
        // A channel without history is not limited by bytes.
        e.publish_now("b", Publish::data(four()), HistoryPolicy::NONE).expect("no history");
        assert_eq!(e.stats(), EngineStats { channels: 2, history_bytes: 4 }, "b's history was dropped");
        // Room made by a channel's own size bound counts.
        let one = HistoryPolicy { size: 1, ..keep };
        for _ in 0..5 {
            e.publish_now("a", Publish::data(four()), one).expect("replaces its own");
        }
        assert_eq!(e.stats().history_bytes, 4);
    }

    #[test]
    fn a_refused_new_channel_leaves_no_stream() {
        let e = MemoryEngine::with_limits(EngineLimits { max_channels: 10, max_history_bytes: 3 });
        let keep = HistoryPolicy { size: 3, ttl: Duration::from_secs(60) };
        let before = e.history_now("x", HistoryQuery::default()).position;
        assert!(e.publish_now("x", Publish::data(Bytes::from_static(b"1234")), keep).is_err());
        assert_eq!(e.stats(), EngineStats::default());
        let pos = e.publish_now("x", Publish::data(Bytes::from_static(b"1")), keep).expect("fits");
        assert_eq!(pos, StreamPosition { epoch: before.epoch, offset: 1 }, "the position read before continues");
    }

    #[test]
    fn forgotten_channels_past_the_memory_bound_still_never_repeat_an_epoch() {
        let mut shard = StreamShard::new();
        let mut handed_out = std::collections::HashSet::new();
        // Channel 0 lives and is forgotten three times, then many others are forgotten, past
        // what the shard remembers; channel 0's next epoch is still new.
        for _ in 0..3 {
            let (epoch, incarnation) = shard.next_epoch(0);
            assert!(handed_out.insert(epoch), "a new epoch each time");
            shard.forget(0, incarnation);
        }
        for key in 1..=FORGOTTEN_PER_SHARD as u64 {
            let (epoch, incarnation) = shard.next_epoch(key);
            handed_out.insert(epoch);
            shard.forget(key, incarnation);
        }
        assert!(shard.forgotten.len() <= FORGOTTEN_PER_SHARD, "bounded");
        let (epoch, _) = shard.next_epoch(0);
        assert!(!handed_out.contains(&epoch), "{epoch} was handed out before");
    }
}
