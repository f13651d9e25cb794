//! The node-local map channel → subscribers. The hub knows no wire format: each front door
//! (native protocol, raw WebSocket, SSE, Pusher, ...) gives its subscribers an [`Encoder`], and
//! a publication is encoded once per encoder and the same bytes are queued for every subscriber
//! that uses it. One lock per channel keeps a single order per channel; channels are spread
//! over shards so no lock is global. A subscriber whose queue overflows is closed (4001) and
//! removed, never waited for.
//!
//! A channel of a conflated namespace ([`Flow::period`]) is delivered differently: a
//! publication only replaces the channel's `latest` and wakes the channel's flusher task, so a
//! skipped publication costs nothing per subscriber. The flusher, at most once per period,
//! queues the newest publication to every member that does not have it yet; a member whose
//! queue is full is skipped (it gets the newest at a later flush), not closed.
//!
//! A channel that has had more than [`FANOUT_OFFLOAD`] subscribers on this node is fanned out
//! off the publisher's path: `deliver` appends the publication to the channel's backlog and
//! returns; one drain job at a time (on the blocking pool) takes the backlog in order and
//! queues it to the members, split into chunks over the machine's cores. Each member is in
//! exactly one chunk per batch and gets the batch in offset order, and batches follow each
//! other, so the order per channel per subscriber holds.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use herald_protocol::{ClientInfo, CloseCode};
use serde::{Deserialize, Serialize};

use crate::channel::NamespaceOptions;
use crate::engine::{PublicationRecord, StreamPosition};
use crate::ws::{self, CloseFrame, Outbox, Prepared, SendError};

/// How many encoders can exist at once: each has a distinct [`Encoder::slot`] below this.
pub const SLOTS: usize = 8;

/// How one front door puts publications and channel events on its wire. One static value per
/// door; the hub calls it at most once per publication (or event) and shares the result.
pub trait Encoder: Send + Sync + std::fmt::Debug + 'static {
    /// This encoding's cache slot, distinct for every encoder and below [`SLOTS`].
    fn slot(&self) -> usize;
    /// The frame for a stored publication of `channel` in stream `epoch`.
    fn publication(&self, channel: &str, epoch: &str, record: &PublicationRecord) -> Frame;
    /// The frame for a publication of a conflated channel: publications before it may have
    /// been skipped for this subscriber (its offset may jump). By default the same frame as
    /// [`Encoder::publication`]; a door whose wire can say so overrides it.
    fn conflated_publication(&self, channel: &str, epoch: &str, record: &PublicationRecord) -> Frame {
        self.publication(channel, epoch, record)
    }
    /// The frame for an event that is not a publication; `None`: this door does not show it.
    fn event(&self, _channel: &str, _event: &ChannelEvent) -> Option<Frame> {
        None
    }
    /// What kind of connection its subscribers have (how they are closed).
    fn sink(&self) -> Sink {
        Sink::WebSocket
    }
    /// The close code and reason a WebSocket subscriber cut off as a slow consumer gets: 4001
    /// by default; a door whose clients read codes their own way picks one that makes them
    /// reconnect (Pusher clients never reconnect after 4000-4099).
    fn slow_consumer_close(&self) -> (u16, &'static str) {
        (CloseCode::SlowConsumer.as_u16(), CloseCode::SlowConsumer.reason())
    }
    /// The close code and reason a WebSocket subscriber gets when the engine lost publications
    /// it cannot hand over ([`Hub::lost`]): the client must reconnect and recover. 4004 by
    /// default; a door picks one its clients reconnect on.
    fn lost_close(&self) -> (u16, &'static str) {
        (CloseCode::ServerError.as_u16(), "missed publications; reconnect and recover")
    }
}

/// What a subscriber's outbox feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// A WebSocket: messages are frames; it is closed with a close code.
    WebSocket,
    /// A byte stream (SSE): bytes go out as they are; it ends without a code.
    Stream,
}

/// An encoded message, ready to queue.
#[derive(Debug)]
pub enum Frame {
    /// A WebSocket message (prepared once, compressed or not per connection). Boxed: a
    /// publication keeps a cell per encoder, most of them empty.
    Ws(Box<Prepared>),
    /// Bytes written as they are (an event stream).
    Raw(Bytes),
}

impl Frame {
    /// A WebSocket text message.
    pub fn text(text: impl Into<Bytes>) -> Self {
        Self::Ws(Box::new(Prepared::text(text.into())))
    }

    /// Queues this frame; a WebSocket frame may wait up to `delay` to share a write. With
    /// `direct`, an idle connection's socket may be written at once by the caller (see
    /// [`Outbox`]); without, the frame waits for the writer, with the frames queued after it.
    fn queue(&self, outbox: &Outbox, delay: Duration, direct: bool) -> Result<(), SendError> {
        match self {
            Self::Ws(p) => outbox.send_prepared_within_direct(p, delay, direct),
            Self::Raw(b) => outbox.push(b.clone()),
        }
    }
}

/// How a channel's publications flow to its subscribers: its namespace's `conflation`,
/// `max_rate` and `write_delay`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    /// Conflated: the least time between two deliveries of the channel to one subscriber
    /// (1 / `max_rate`), each the newest publication. `None`: every publication.
    pub period: Option<Duration>,
    /// How long a publication may wait in a subscriber's queue to share a write.
    pub write_delay: Duration,
}

impl Flow {
    pub fn of(ns: &NamespaceOptions) -> Self {
        let period = ns.conflated().then(|| Duration::from_secs(1) / ns.max_rate.max(1));
        Self { period, write_delay: ns.write_delay }
    }
}

/// Something that happens on a channel besides a publication: not stored, not numbered, sent
/// to the subscribers of every node (through the engine's broadcast, as [`ChannelEvent::encode`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ChannelEvent {
    /// A user's first connection joined the channel's presence.
    Join {
        client: ClientInfo,
        /// The connection's info (JSON) from its token or channel auth.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        info: Option<String>,
    },
    /// A user's last connection left.
    Leave { client: ClientInfo },
    /// A message one client sends to the others (Pusher's `client-*` events).
    Client {
        event: String,
        /// The event's data (JSON).
        data: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// The sender's connection id: it does not get its own event back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exclude: Option<u64>,
    },
}

impl ChannelEvent {
    /// The bytes the engine carries between nodes.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Reads [`ChannelEvent::encode`]'s bytes back; `None` for bytes that are not an event.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    fn exclude(&self) -> Option<u64> {
        match self {
            Self::Client { exclude, .. } => *exclude,
            _ => None,
        }
    }
}

/// One subscription: where to queue, with which encoder.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The connection's id ([`crate::node::Node::next_id`]), the same for all its subscriptions.
    pub id: u64,
    pub outbox: Outbox,
    pub encoder: &'static dyn Encoder,
}

impl Subscriber {
    fn sink(&self) -> Sink {
        self.encoder.sink()
    }
}

/// A publication with its encodings, each made on first use and shared afterwards.
#[derive(Debug)]
pub struct Delivery {
    channel: Arc<str>,
    epoch: Arc<str>,
    record: PublicationRecord,
    /// Encoded with [`Encoder::conflated_publication`].
    conflated: bool,
    encoded: [OnceLock<Frame>; SLOTS],
}

impl Delivery {
    fn new(channel: &str, position: &StreamPosition, record: &PublicationRecord, conflated: bool) -> Self {
        Self {
            channel: Arc::from(channel),
            epoch: position.epoch.clone(),
            record: record.clone(),
            conflated,
            encoded: Default::default(),
        }
    }

    fn offset(&self) -> u64 {
        self.record.offset
    }

    fn queue(&self, sub: &Subscriber, delay: Duration, direct: bool) -> Result<(), SendError> {
        self.with_frame(sub, |frame| frame.queue(&sub.outbox, delay, direct))
    }

    /// Calls `f` with this publication encoded for `sub`'s door (once per door, shared).
    fn with_frame<R>(&self, sub: &Subscriber, f: impl FnOnce(&Frame) -> R) -> R {
        let encode = || match self.conflated {
            true => sub.encoder.conflated_publication(&self.channel, &self.epoch, &self.record),
            false => sub.encoder.publication(&self.channel, &self.epoch, &self.record),
        };
        match self.encoded.get(sub.encoder.slot()) {
            Some(cell) => f(cell.get_or_init(encode)),
            None => f(&encode()),
        }
    }
}

#[derive(Debug)]
struct ChannelState {
    /// Its namespace's flow, fixed when the channel is created (its first subscriber's).
    flow: Flow,
    inner: Mutex<ChannelInner>,
    /// Conflated channels: the newest publication, which the flusher hands out. Apart from the
    /// members so that publishing never waits for a flush.
    latest: Mutex<Option<Arc<Delivery>>>,
    /// Wakes a conflated channel's flusher: a publication arrived, or the channel died.
    wake: tokio::sync::Notify,
    /// Has had more than [`FANOUT_OFFLOAD`] members: fanned out off the publisher's path.
    big: AtomicBool,
    /// Publications waiting for the drain job of a big channel, in offset order.
    backlog: Mutex<Backlog>,
}

#[derive(Debug, Default)]
struct Backlog {
    queue: VecDeque<Arc<Delivery>>,
    /// A drain job is running (or about to): publications must queue behind it.
    draining: bool,
}

impl ChannelState {
    fn new(flow: Flow) -> Self {
        Self {
            flow,
            inner: Mutex::new(ChannelInner::default()),
            latest: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            big: AtomicBool::new(false),
            backlog: Mutex::new(Backlog::default()),
        }
    }

    /// The drain job of a big channel: fans the backlog out, batch after batch, until it is
    /// empty. An emptied channel is dropped by the unsubscribe of its last member.
    fn drain(&self, subscriptions: &AtomicUsize) {
        loop {
            let mut backlog = lock(&self.backlog);
            if backlog.queue.is_empty() {
                backlog.draining = false;
                return;
            }
            self.fan_out_backlog(backlog, true, subscriptions);
        }
    }

    /// Takes the whole backlog and fans it out. The channel's lock is taken before the
    /// backlog's is released, so batches reach the members in the order they left the backlog
    /// (the drain job's and an overloaded publisher's alike). Returns whether no member is left.
    ///
    /// `direct` (the drain job): a lone publication is written to each idle member's socket by
    /// the job itself ([`Outbox`]'s direct write), so the runtime's workers, which serve the
    /// publishers' requests, are not woken 10,000 times. Several (the job fell behind) go to
    /// the writers, which merge them into one `writev` per member.
    fn fan_out_backlog(&self, mut backlog: MutexGuard<'_, Backlog>, direct: bool, subscriptions: &AtomicUsize) -> bool {
        let batch: Vec<Arc<Delivery>> = backlog.queue.drain(..).collect();
        let mut inner = lock(&self.inner);
        drop(backlog);
        fan_out_locked(&mut inner, &batch, self.flow.write_delay, direct, subscriptions)
    }

    /// Queues the channel's newest publication to every live member that does not have it.
    /// A member whose queue is full keeps its place and gets the newest at a later flush.
    fn flush(&self, channel: &str) -> Flushed {
        let latest = lock(&self.latest).clone();
        let mut inner = lock(&self.inner);
        if inner.dead {
            return Flushed::Dead;
        }
        let Some(latest) = latest else { return Flushed::All };
        let (offset, delay) = (latest.offset(), self.flow.write_delay);
        let (mut skipped, mut behind) = (0u64, 0u64);
        for m in inner.members.iter_mut().filter(|m| m.pending.is_none() && m.floor < offset) {
            if latest.record.exclude == Some(m.sub.id) {
                m.floor = offset;
                continue;
            }
            match latest.queue(&m.sub, delay, false) {
                Ok(()) => {
                    skipped += offset - m.floor - 1;
                    m.floor = offset;
                }
                Err(SendError::Full) => behind += 1,
                // Gone: its unsubscribe removes it.
                Err(SendError::Closed) => {}
            }
        }
        drop(inner);
        if skipped > 0 {
            metrics::counter!("herald_conflated_total").increment(skipped);
        }
        if behind > 0 {
            metrics::counter!("herald_conflated_behind_total").increment(behind);
            tracing::trace!(channel, behind, "conflated subscribers with a full queue wait for the next flush");
            return Flushed::Behind;
        }
        Flushed::All
    }
}

/// What a flush of a conflated channel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flushed {
    /// Every live member has the newest publication.
    All,
    /// Some members' queues were full: flush again after a period, publication or not.
    Behind,
    /// The channel is gone.
    Dead,
}

/// Members above which a channel is fanned out off the publisher's path, and the least members
/// per parallel chunk.
pub const FANOUT_OFFLOAD: usize = 1000;

/// Most publications waiting in a big channel's backlog; beyond, the publisher fans the backlog
/// out itself (back-pressure instead of unbounded memory).
const MAX_BACKLOG: usize = 1000;

/// Queues `batch` (in offset order) to every member, in parallel chunks for a big channel,
/// and removes the members that are gone. Under the channel's lock: one batch at a time.
/// Returns whether no member is left.
fn fan_out_locked(
    inner: &mut ChannelInner,
    batch: &[Arc<Delivery>],
    delay: Duration,
    direct: bool,
    subscriptions: &AtomicUsize,
) -> bool {
    if inner.dead {
        return false;
    }
    let gone = fan_out_parallel(&mut inner.members, batch, delay, direct);
    for id in gone {
        if inner.remove(id) {
            subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
    }
    inner.members.is_empty()
}

/// How much lower a drain job runs than the runtime's workers (a nice value: about a tenth of
/// a core's time against a worker's when both want it).
const DRAIN_NICE: i32 = 10;

/// Lowers the calling thread (a big channel's drain job, and the chunk threads it starts,
/// which inherit it) below the runtime's workers: when a 10,000-write fan-out and a request
/// (a publish's response, a subscribe) want the same core, the request goes first, so the
/// API's round trip does not grow with the subscriber count. Best effort: if it fails, the
/// job runs at the normal priority.
fn below_the_runtime() {
    // Linux: `None` is the calling thread (the nice value is per thread, setpriority(2)
    // NOTES); raising one's own nice value needs no privilege.
    let _ = rustix::process::setpriority_process(None, DRAIN_NICE);
}

/// Threads one fan-out may use: the machine's cores.
fn workers() -> usize {
    static WORKERS: OnceLock<usize> = OnceLock::new();
    *WORKERS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// [`fan_out`] over chunks of `members` in parallel (scoped threads: the chunks borrow the
/// members under the channel's lock), when there are enough of them.
fn fan_out_parallel(members: &mut [Member], batch: &[Arc<Delivery>], delay: Duration, direct: bool) -> Vec<u64> {
    let chunks = workers().min(members.len() / FANOUT_OFFLOAD).max(1);
    if chunks == 1 {
        return fan_out(members, batch, delay, direct);
    }
    let size = members.len().div_ceil(chunks);
    // Each chunk is taken exactly once: by its thread, or here when the thread could not start
    // (or had not taken it yet when this thread got to it).
    let parts: Vec<Mutex<Option<&mut [Member]>>> = members.chunks_mut(size).map(|p| Mutex::new(Some(p))).collect();
    std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for cell in parts.iter().skip(1) {
            let run = move || lock(cell).take().map(|p| fan_out(p, batch, delay, direct)).unwrap_or_default();
            if let Ok(t) = std::thread::Builder::new().name("herald-fanout".into()).spawn_scoped(scope, run) {
                threads.push(t);
            }
        }
        let mut gone = Vec::new();
        for cell in &parts {
            if let Some(p) = lock(cell).take() {
                gone.extend(fan_out(p, batch, delay, direct));
            }
        }
        for t in threads {
            gone.extend(t.join().unwrap_or_default());
        }
        gone
    })
}

/// Queues each publication of `batch` (in offset order) to each of `members`; returns the ids
/// of members that are gone (closed, or cut off as slow consumers). With `direct`, a lone
/// publication is written to each idle member's socket at once (see [`Outbox`]).
fn fan_out(members: &mut [Member], batch: &[Arc<Delivery>], delay: Duration, direct: bool) -> Vec<u64> {
    let mut gone = Vec::new();
    // Several publications go to the writers, which merge them into one `writev` per member.
    let direct = direct && batch.len() == 1;
    'members: for m in members.iter_mut() {
        for delivery in batch {
            let offset = delivery.offset();
            if let Some(held) = m.pending.as_mut() {
                if held.len() < MAX_PENDING {
                    held.push(delivery.clone());
                    continue;
                }
                slow_consumer(&m.sub, &delivery.channel);
                gone.push(m.sub.id);
                continue 'members;
            }
            if offset <= m.floor {
                continue;
            }
            if delivery.record.exclude == Some(m.sub.id) {
                m.floor = offset;
                continue;
            }
            match delivery.queue(&m.sub, delay, direct) {
                Ok(()) => m.floor = offset,
                Err(SendError::Full) => {
                    slow_consumer(&m.sub, &delivery.channel);
                    gone.push(m.sub.id);
                    continue 'members;
                }
                Err(SendError::Closed) => {
                    gone.push(m.sub.id);
                    continue 'members;
                }
            }
        }
    }
    gone
}

/// A conflated channel's flusher: after a publication, flushes the newest to the members, then
/// waits a period before the next flush, so each member gets at most one per period. Ends when
/// the channel dies ([`Hub::drop_if_empty`] wakes it).
async fn flusher(state: Arc<ChannelState>, channel: Arc<str>, period: Duration) {
    loop {
        state.wake.notified().await;
        let flushed = state.flush(&channel);
        if flushed == Flushed::Dead {
            return;
        }
        tokio::time::sleep(period).await;
        if flushed == Flushed::Behind {
            // Once its queue drains, a member that was behind gets the newest even if nothing
            // more is published.
            state.wake.notify_one();
        }
    }
}

/// A subscriber and where it is in the channel's stream.
#[derive(Debug)]
struct Member {
    sub: Subscriber,
    /// The last offset this subscriber has (from its subscribe reply or a delivery): older
    /// deliveries are skipped, so nothing arrives twice.
    floor: u64,
    /// While the subscribe reply is being prepared, live deliveries wait here.
    pending: Option<Vec<Arc<Delivery>>>,
}

#[derive(Debug, Default)]
struct ChannelInner {
    members: Vec<Member>,
    /// Subscriber id → index in `members`.
    index: HashMap<u64, usize>,
    /// Removed from the map: whoever still holds it must look the channel up again.
    dead: bool,
}

impl ChannelInner {
    fn remove(&mut self, id: u64) -> bool {
        let Some(i) = self.index.remove(&id) else { return false };
        self.members.swap_remove(i);
        if let Some(moved) = self.members.get(i) {
            self.index.insert(moved.sub.id, i);
        }
        true
    }
}

/// Most live publications held for one subscriber while its reply is prepared.
const MAX_PENDING: usize = 10_000;

type Shard = Mutex<HashMap<Arc<str>, Arc<ChannelState>>>;

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("already subscribed")]
    AlreadySubscribed,
    #[error("connection closed")]
    Closed,
}

/// Told when a channel gets its first subscriber on this node and when it loses its last
/// (webhooks' `channel_occupied` / `channel_vacated`). Called under the channel's shard lock,
/// so per channel the calls alternate and arrive in order: keep them short, never call back
/// into the hub.
pub trait Occupancy: Send + Sync + std::fmt::Debug {
    fn occupied(&self, channel: &str);
    fn vacated(&self, channel: &str);
}

/// The channel → subscribers map of this node.
#[derive(Debug)]
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    subscriptions: Arc<AtomicUsize>,
    /// Set only when someone listens (webhooks configured): otherwise nothing is called.
    occupancy: OnceLock<Arc<dyn Occupancy>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections here only move entries between collections; a panic inside one cannot
    // leave a half-made entry behind, so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const SHARDS: usize = 64;

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            subscriptions: Arc::new(AtomicUsize::new(0)),
            occupancy: OnceLock::new(),
        }
    }

    /// Tells `occupancy` about channels gaining their first and losing their last subscriber
    /// from now on. Only the first call has an effect.
    pub fn set_occupancy(&self, occupancy: Arc<dyn Occupancy>) {
        let _ = self.occupancy.set(occupancy);
    }

    fn shard(&self, channel: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(channel) as usize) % self.shards.len()]
    }

    /// Adds `sub` to `channel` in the waiting state: live publications are held for it until
    /// [`Hub::activate`] sends its subscribe reply. Read the channel's position (or the history
    /// to recover) in between: whatever was published before this call is in it, whatever
    /// comes after is held, and [`Hub::activate`] drops the overlap.
    pub fn subscribe(&self, channel: &Arc<str>, sub: Subscriber) -> Result<(), SubscribeError> {
        self.subscribe_with(channel, sub, Flow::default())
    }

    /// [`Hub::subscribe`] to a channel whose namespace has `flow` (the channel keeps the flow
    /// it was created with, i.e. its first subscriber's).
    pub fn subscribe_with(&self, channel: &Arc<str>, sub: Subscriber, flow: Flow) -> Result<(), SubscribeError> {
        loop {
            let mut created = None;
            let state = lock(self.shard(channel))
                .entry(channel.clone())
                .or_insert_with(|| {
                    if let Some(o) = self.occupancy.get() {
                        o.occupied(channel);
                    }
                    let runtime = tokio::runtime::Handle::try_current().ok();
                    // No runtime to flush on (a test of the hub alone): every publication.
                    let flow = Flow { period: flow.period.filter(|_| runtime.is_some()), ..flow };
                    let state = Arc::new(ChannelState::new(flow));
                    created = runtime.zip(flow.period).map(|(rt, period)| (rt, period, state.clone()));
                    state
                })
                .clone();
            if let Some((rt, period, state)) = created {
                drop(rt.spawn(flusher(state, channel.clone(), period)));
            }
            let mut inner = lock(&state.inner);
            if inner.dead {
                continue;
            }
            if inner.index.contains_key(&sub.id) {
                return Err(SubscribeError::AlreadySubscribed);
            }
            let i = inner.members.len();
            inner.index.insert(sub.id, i);
            inner.members.push(Member { sub, floor: 0, pending: Some(Vec::new()) });
            if inner.members.len() > FANOUT_OFFLOAD {
                state.big.store(true, Ordering::Relaxed);
            }
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
    }

    /// Ends the waiting state of subscriber `id`: sends `reply` (a text message, e.g. the
    /// subscribe reply with recovered publications, or for SSE the first events; `None` sends
    /// nothing), then every held publication newer than `offset` (the last one the reply
    /// covers), and goes live.
    pub fn activate(&self, channel: &str, id: u64, reply: Option<Bytes>, offset: u64) -> Result<(), SubscribeError> {
        let Some(state) = lock(self.shard(channel)).get(channel).cloned() else {
            return Err(SubscribeError::Closed);
        };
        let mut inner = lock(&state.inner);
        let Some(&i) = inner.index.get(&id) else { return Err(SubscribeError::Closed) };
        let delay = state.flow.write_delay;
        // A conflated channel holds nothing per member: it gets the newest, if the reply lacks it.
        let latest = lock(&state.latest).clone().filter(|l| l.offset() > offset);
        let member = &mut inner.members[i];
        member.floor = offset;
        let held = member.pending.take().unwrap_or_default();
        let sent = reply
            .map_or(Ok(()), |text| match member.sub.sink() {
                // An event stream carries the text as it is; WebSockets get a text frame.
                Sink::Stream => member.sub.outbox.push(text),
                Sink::WebSocket => member.sub.outbox.send_text(text),
            })
            .and_then(|()| {
                for d in held.iter().chain(latest.as_ref()).filter(|d| d.offset() > offset) {
                    if d.record.exclude != Some(member.sub.id) {
                        // Behind the reply, in the writer's next `writev`.
                        d.queue(&member.sub, delay, false)?;
                    }
                    member.floor = d.offset();
                }
                Ok(())
            });
        match sent {
            Ok(()) => Ok(()),
            Err(e) => {
                let sub = member.sub.clone();
                if inner.remove(id) {
                    self.subscriptions.fetch_sub(1, Ordering::Relaxed);
                }
                drop(inner);
                if e == SendError::Full {
                    slow_consumer(&sub, channel);
                }
                Err(SubscribeError::Closed)
            }
        }
    }

    /// Removes subscriber `id` from `channel`; drops the channel when it was the last one.
    pub fn unsubscribe(&self, channel: &str, id: u64) -> bool {
        let Some(state) = lock(self.shard(channel)).get(channel).cloned() else { return false };
        let (removed, empty) = {
            let mut inner = lock(&state.inner);
            let removed = inner.remove(id);
            (removed, inner.members.is_empty())
        };
        if removed {
            self.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        if empty {
            self.drop_if_empty(channel);
        }
        removed
    }

    fn drop_if_empty(&self, channel: &str) {
        let mut shard = lock(self.shard(channel));
        if let Some(state) = shard.get(channel) {
            let mut inner = lock(&state.inner);
            if inner.members.is_empty() {
                inner.dead = true;
                drop(inner);
                // A conflated channel's flusher sees it is dead and ends.
                state.wake.notify_one();
                shard.remove(channel);
                if let Some(o) = self.occupancy.get() {
                    o.vacated(channel);
                }
            }
        }
    }

    /// Delivers a stored publication to every subscriber of `channel` on this node. Called by
    /// the engine in offset order per channel.
    pub fn deliver(&self, channel: &str, position: &StreamPosition, record: &PublicationRecord) {
        let Some(state) = lock(self.shard(channel)).get(channel).cloned() else { return };
        if state.flow.period.is_some() {
            // Conflated: the newest replaces the previous; the flusher hands it out.
            let mut latest = lock(&state.latest);
            if latest.as_ref().is_none_or(|l| l.offset() < record.offset) {
                *latest = Some(Arc::new(Delivery::new(channel, position, record, true)));
            }
            drop(latest);
            state.wake.notify_one();
            return;
        }
        let delivery = Arc::new(Delivery::new(channel, position, record, false));
        if !state.big.load(Ordering::Relaxed) {
            let mut inner = lock(&state.inner);
            // Checked again under the lock: a channel turns big under it.
            if !state.big.load(Ordering::Relaxed) {
                let delay = state.flow.write_delay;
                // On the publisher's path: queue and wake the writers (measured: writing here
                // costs the publisher its response time and saves no CPU).
                let batch = std::slice::from_ref(&delivery);
                if fan_out_locked(&mut inner, batch, delay, false, &self.subscriptions) {
                    drop(inner);
                    self.drop_if_empty(channel);
                }
                return;
            }
        }
        // A big channel: behind the backlog, which one drain job at a time fans out.
        let mut backlog = lock(&state.backlog);
        backlog.queue.push_back(delivery);
        if backlog.queue.len() <= MAX_BACKLOG {
            if backlog.draining {
                return;
            }
            let (job_state, subscriptions) = (state.clone(), self.subscriptions.clone());
            let job = std::thread::Builder::new().name("herald-fanout".into()).spawn(move || {
                below_the_runtime();
                job_state.drain(&subscriptions);
            });
            if job.is_ok() {
                backlog.draining = true;
                return;
            }
        }
        // The drain job is behind (or no thread could be started for one): the publisher fans
        // the backlog out itself, in order after what the job holds.
        if state.fan_out_backlog(backlog, false, &self.subscriptions) {
            self.drop_if_empty(channel);
        }
    }

    /// Sends `event` (not stored, not numbered) to the channel's live subscribers whose door
    /// shows it, encoded once per encoder.
    pub fn notify(&self, channel: &str, event: &ChannelEvent) {
        let Some(state) = lock(self.shard(channel)).get(channel).cloned() else { return };
        let inner = lock(&state.inner);
        let delay = state.flow.write_delay;
        let encoded: [OnceLock<Option<Frame>>; SLOTS] = Default::default();
        let exclude = event.exclude();
        for m in inner.members.iter().filter(|m| m.pending.is_none() && Some(m.sub.id) != exclude) {
            let encode = || m.sub.encoder.event(channel, event);
            let uncached;
            let frame = match encoded.get(m.sub.encoder.slot()) {
                Some(cell) => cell.get_or_init(encode),
                None => {
                    uncached = encode();
                    &uncached
                }
            };
            if let Some(frame) = frame {
                if frame.queue(&m.sub.outbox, delay, false) == Err(SendError::Full) {
                    slow_consumer(&m.sub, channel);
                }
            }
        }
    }

    /// Whether `channel` has subscribers on this node (waiting or live).
    pub fn has_channel(&self, channel: &str) -> bool {
        lock(self.shard(channel)).contains_key(channel)
    }

    /// Cuts off every subscriber of `channel` because the engine lost publications it cannot
    /// hand over: WebSockets are closed with 4004 (the client reconnects and recovers, or is
    /// told `recovered: false`), event streams end. Returns how many were cut off.
    pub fn lost(&self, channel: &str) -> usize {
        let Some(state) = lock(self.shard(channel)).get(channel).cloned() else { return 0 };
        let members: Vec<Subscriber> = {
            let mut inner = lock(&state.inner);
            let subs: Vec<Subscriber> = inner.members.iter().map(|m| m.sub.clone()).collect();
            for s in &subs {
                if inner.remove(s.id) {
                    self.subscriptions.fetch_sub(1, Ordering::Relaxed);
                }
            }
            subs
        };
        self.drop_if_empty(channel);
        for sub in &members {
            match sub.sink() {
                Sink::Stream => sub.outbox.finish(),
                Sink::WebSocket => {
                    let (code, reason) = sub.encoder.lost_close();
                    sub.outbox.close_now(Some(CloseFrame::new(ws::CloseCode(code), reason)));
                }
            }
        }
        metrics::counter!("herald_lost_streams_total").increment(1);
        members.len()
    }

    /// Active channels matching `filter`, with their subscriber counts.
    pub fn channels(&self, filter: impl Fn(&str) -> bool) -> Vec<(Arc<str>, usize)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (name, state) in lock(shard).iter() {
                if filter(name) {
                    out.push((name.clone(), lock(&state.inner).members.len()));
                }
            }
        }
        out.sort();
        out
    }

    pub fn channel_count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }
}

/// Cuts off a subscriber whose queue overflowed: close 4001 (WebSocket), or the end of the
/// stream (SSE has no close frame). It reconnects and recovers.
fn slow_consumer(sub: &Subscriber, channel: &str) {
    match sub.sink() {
        Sink::Stream => {
            sub.outbox.finish();
            metrics::counter!("herald_slow_consumers_total").increment(1);
            log_slow_consumer(channel, "event stream ended");
        }
        Sink::WebSocket => close_slow_consumer_with(&sub.outbox, sub.encoder.slow_consumer_close()),
    }
    tracing::debug!(subscriber = sub.id, channel, "slow consumer disconnected");
}

/// Logs (rate-limited) a slow consumer's close (`channel` when it is a subscriber's).
fn log_slow_consumer(channel: &str, what: &str) {
    crate::ratelog::refusal!(
        info,
        crate::ratelog::Kind::SlowConsumer,
        channel,
        "slow consumer: {what} (its queue reached websocket.max_queue_bytes)"
    );
}

/// Closes a WebSocket whose queue overflowed with the door's code (4001 native, 3008
/// Centrifugo, 4100 Pusher), dropping what it had not read, and counts it. For replies as for
/// publications: a reply is never dropped on an open connection.
pub(crate) fn close_slow_consumer_with(outbox: &Outbox, (code, reason): (u16, &str)) {
    if outbox.close_now(Some(CloseFrame::new(ws::CloseCode(code), reason))) {
        metrics::counter!("herald_slow_consumers_total").increment(1);
        log_slow_consumer("", &format!("WebSocket closed with {code}"));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::ws::SendMode;

    /// The data alone in a text frame; join/leave as `join <user>`.
    #[derive(Debug)]
    struct Text;
    impl Encoder for Text {
        fn slot(&self) -> usize {
            0
        }
        fn publication(&self, _: &str, _: &str, record: &PublicationRecord) -> Frame {
            Frame::text(record.data.clone())
        }
        fn event(&self, _: &str, event: &ChannelEvent) -> Option<Frame> {
            match event {
                ChannelEvent::Join { client, .. } => Some(Frame::text(format!("join {}", client.user))),
                _ => None,
            }
        }
    }

    /// `<epoch>:<offset> <data>` as bytes on a stream; shows client events.
    #[derive(Debug)]
    struct Stream;
    impl Encoder for Stream {
        fn slot(&self) -> usize {
            1
        }
        fn publication(&self, _: &str, epoch: &str, record: &PublicationRecord) -> Frame {
            let mut out = format!("{epoch}:{} ", record.offset).into_bytes();
            out.extend_from_slice(&record.data);
            Frame::Raw(Bytes::from(out))
        }
        fn event(&self, _: &str, event: &ChannelEvent) -> Option<Frame> {
            match event {
                ChannelEvent::Client { data, .. } => Some(Frame::Raw(Bytes::from(data.clone()))),
                _ => None,
            }
        }
        fn sink(&self) -> Sink {
            Sink::Stream
        }
    }

    fn sub(id: u64, limit: usize, encoder: &'static dyn Encoder) -> Subscriber {
        Subscriber { id, outbox: Outbox::new(limit, SendMode::PLAIN), encoder }
    }

    fn frames(o: &Outbox) -> Vec<Bytes> {
        let mut batch = VecDeque::new();
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        if o.queued_bytes() > 0 {
            rt.block_on(o.next_batch(&mut batch));
        }
        batch.into_iter().collect()
    }

    fn payload(frame: &Bytes) -> &[u8] {
        let len = (frame[1] & 0x7f) as usize;
        assert!(len < 126);
        &frame[2..2 + len]
    }

    fn publish(hub: &Hub, channel: &str, offset: u64, data: &'static [u8]) {
        let pos = StreamPosition { epoch: Arc::from("e"), offset };
        hub.deliver(channel, &pos, &PublicationRecord { offset, data: Bytes::from_static(data), ..Default::default() });
    }

    fn join(hub: &Hub, ch: &Arc<str>, s: &Subscriber, offset: u64) {
        hub.subscribe(ch, s.clone()).expect("subscribe");
        hub.activate(ch, s.id, Some(Bytes::from(format!("reply {offset}"))), offset).expect("activate");
    }

    #[derive(Debug, Default)]
    struct Seen(Mutex<Vec<String>>);
    impl Occupancy for Seen {
        fn occupied(&self, channel: &str) {
            lock(&self.0).push(format!("+{channel}"));
        }
        fn vacated(&self, channel: &str) {
            lock(&self.0).push(format!("-{channel}"));
        }
    }

    #[test]
    fn occupancy_is_told_of_the_first_and_last_subscriber_only() {
        let hub = Hub::new();
        let seen = Arc::new(Seen::default());
        hub.set_occupancy(seen.clone());
        let ch: Arc<str> = Arc::from("news");
        let (a, b) = (sub(1, 1 << 20, &Text), sub(2, 1 << 20, &Text));
        join(&hub, &ch, &a, 0);
        join(&hub, &ch, &b, 0);
        hub.unsubscribe("news", 1);
        hub.unsubscribe("news", 1);
        hub.unsubscribe("news", 2);
        join(&hub, &ch, &a, 0);
        // A subscriber cut off as a slow consumer empties the channel too.
        hub.lost("news");
        assert_eq!(*lock(&seen.0), ["+news", "-news", "+news", "-news"]);
    }

    #[test]
    fn each_subscriber_gets_the_same_bytes_in_order_after_its_reply() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("news");
        let (a, b) = (sub(1, 1 << 20, &Text), sub(2, 1 << 20, &Text));
        join(&hub, &ch, &a, 0);
        join(&hub, &ch, &b, 0);
        for i in 1..=3 {
            publish(&hub, "news", i, b"1");
        }
        let (fa, fb) = (frames(&a.outbox), frames(&b.outbox));
        assert_eq!(fa.len(), 4);
        assert_eq!(payload(&fa[0]), b"reply 0");
        assert_eq!(payload(&fa[1]), b"1");
        assert_eq!(fa[3].as_ptr(), fb[3].as_ptr(), "encoded once, shared");
        assert_eq!(hub.subscription_count(), 2);
    }

    #[test]
    fn publications_during_the_reply_are_held_and_deduplicated() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("c");
        let s = sub(1, 1 << 20, &Text);
        hub.subscribe(&ch, s.clone()).expect("subscribe");
        // Published while the history was being read: 5 is covered by the reply, 6 and 7 not.
        publish(&hub, "c", 5, b"5");
        publish(&hub, "c", 6, b"6");
        assert!(frames(&s.outbox).is_empty(), "nothing before the reply");
        hub.activate("c", 1, Some(Bytes::from_static(b"reply")), 5).expect("activate");
        publish(&hub, "c", 7, b"7");
        publish(&hub, "c", 7, b"7");
        let got: Vec<Vec<u8>> = frames(&s.outbox).iter().map(|f| payload(f).to_vec()).collect();
        assert_eq!(got, [b"reply".to_vec(), b"6".to_vec(), b"7".to_vec()], "no gap, no duplicate");
    }

    #[test]
    fn each_encoder_encodes_once_for_its_subscribers() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("t");
        let (raw, sse) = (sub(1, 1 << 20, &Text), sub(2, 1 << 20, &Stream));
        for s in [&raw, &sse] {
            hub.subscribe(&ch, s.clone()).expect("subscribe");
            hub.activate("t", s.id, None, 0).expect("activate");
        }
        publish(&hub, "t", 1, b"{\n\"a\":1}");
        assert_eq!(payload(&frames(&raw.outbox)[0]), b"{\n\"a\":1}");
        assert_eq!(frames(&sse.outbox)[0], Bytes::from_static(b"e:1 {\n\"a\":1}"));
        let sse2 = sub(3, 1 << 20, &Stream);
        hub.subscribe(&ch, sse2.clone()).expect("subscribe");
        hub.activate("t", 3, None, 1).expect("activate");
        publish(&hub, "t", 2, b"2");
        let (a, b) = (frames(&sse.outbox), frames(&sse2.outbox));
        assert_eq!(a[0].as_ptr(), b[0].as_ptr(), "one encoding per encoder, shared");
    }

    #[test]
    fn the_excluded_connection_skips_a_publication_and_its_own_event() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("x");
        let (a, b) = (sub(1, 1 << 20, &Stream), sub(2, 1 << 20, &Stream));
        join(&hub, &ch, &a, 0);
        join(&hub, &ch, &b, 0);
        let pos = StreamPosition { epoch: Arc::from("e"), offset: 1 };
        let record =
            PublicationRecord { offset: 1, data: Bytes::from_static(b"1"), exclude: Some(1), ..Default::default() };
        hub.deliver("x", &pos, &record);
        let event = ChannelEvent::Client { event: "client-x".into(), data: "{}".into(), user: None, exclude: Some(2) };
        hub.notify("x", &event);
        hub.notify("x", &ChannelEvent::Join { client: ClientInfo::default(), info: None });
        let (fa, fb) = (frames(&a.outbox), frames(&b.outbox));
        assert_eq!(fa.iter().skip(1).map(|f| f.to_vec()).collect::<Vec<_>>(), [b"{}".to_vec()]);
        assert_eq!(fb.iter().skip(1).map(|f| f.to_vec()).collect::<Vec<_>>(), [b"e:1 1".to_vec()]);
    }

    #[test]
    fn channel_events_cross_nodes_as_bytes_and_back() {
        let join = ChannelEvent::Join {
            client: ClientInfo { user: "u".into(), client: "c".into() },
            info: Some(r#"{"name":"Ann"}"#.into()),
        };
        assert_eq!(ChannelEvent::decode(&join.encode()), Some(join));
        assert_eq!(ChannelEvent::decode(b"not an event"), None);
    }

    /// Text, but its clients reconnect on other close codes.
    #[derive(Debug)]
    struct OwnCodes;
    impl Encoder for OwnCodes {
        fn slot(&self) -> usize {
            2
        }
        fn publication(&self, _: &str, _: &str, record: &PublicationRecord) -> Frame {
            Frame::text(record.data.clone())
        }
        fn lost_close(&self) -> (u16, &'static str) {
            (3010, "insufficient state")
        }
    }

    fn close_code(outbox: &Outbox) -> Option<u16> {
        let last = frames(outbox).pop()?;
        (last[0] == 0x88).then(|| u16::from_be_bytes([last[2], last[3]]))
    }

    #[test]
    fn lost_publications_close_each_subscriber_with_its_doors_code() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("gap");
        let (native, own) = (sub(1, 1 << 20, &Text), sub(2, 1 << 20, &OwnCodes));
        join(&hub, &ch, &native, 0);
        join(&hub, &ch, &own, 0);
        assert_eq!(hub.lost("gap"), 2);
        assert_eq!(close_code(&native.outbox), Some(CloseCode::ServerError.as_u16()));
        assert_eq!(close_code(&own.outbox), Some(3010));
        assert_eq!(hub.channel_count(), 0);
    }

    #[test]
    fn a_slow_subscriber_is_closed_and_removed_without_affecting_others() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("fast");
        let slow = sub(1, 100, &Text);
        let fast = sub(2, 1 << 20, &Text);
        for s in [&slow, &fast] {
            hub.subscribe(&ch, s.clone()).expect("subscribe");
            hub.activate("fast", s.id, None, 0).expect("activate");
        }
        for i in 1..=20 {
            publish(&hub, "fast", i, &[b'1'; 40]);
        }
        assert!(slow.outbox.is_closing());
        assert!(slow.outbox.queued_bytes() < 200, "bounded: {}", slow.outbox.queued_bytes());
        assert_eq!(frames(&fast.outbox).len(), 20);
        assert_eq!(hub.channels(|_| true), vec![(ch.clone(), 1)]);
    }

    async fn frames_now(o: &Outbox) -> Vec<Bytes> {
        let mut batch = VecDeque::new();
        if o.queued_bytes() > 0 {
            o.next_batch(&mut batch).await;
        }
        batch.into_iter().collect()
    }

    /// Lets the flusher run, for longer than its period.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(120)).await;
    }

    const CONFLATED: Flow = Flow { period: Some(Duration::from_millis(50)), write_delay: Duration::ZERO };

    #[tokio::test]
    async fn a_conflated_subscriber_gets_the_newest_not_a_backlog() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("ticker");
        let s = sub(1, 1 << 20, &Text);
        hub.subscribe_with(&ch, s.clone(), CONFLATED).expect("subscribe");
        hub.activate("ticker", 1, None, 0).expect("activate");
        for i in 1..=100 {
            publish(&hub, "ticker", i, if i == 100 { b"100" } else { b"x" });
        }
        settle().await;
        let got = frames_now(&s.outbox).await;
        assert_eq!(got.iter().map(|f| payload(f).to_vec()).collect::<Vec<_>>(), [b"100".to_vec()]);
        // A later subscriber whose reply is older than the newest gets the newest after it.
        let late = sub(2, 1 << 20, &Text);
        hub.subscribe_with(&ch, late.clone(), CONFLATED).expect("subscribe");
        hub.activate("ticker", 2, Some(Bytes::from_static(b"reply")), 40).expect("activate");
        let got = frames_now(&late.outbox).await;
        assert_eq!(got.iter().map(|f| payload(f).to_vec()).collect::<Vec<_>>(), [b"reply".to_vec(), b"100".to_vec()]);
        publish(&hub, "ticker", 101, b"101");
        settle().await;
        for o in [&s.outbox, &late.outbox] {
            assert_eq!(frames_now(o).await.iter().map(|f| payload(f).to_vec()).collect::<Vec<_>>(), [b"101".to_vec()]);
        }
        assert!(hub.unsubscribe("ticker", 1) && hub.unsubscribe("ticker", 2));
        assert_eq!(hub.channel_count(), 0);
    }

    #[tokio::test]
    async fn a_conflated_subscriber_with_a_full_queue_waits_instead_of_being_closed() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("dash");
        let s = sub(1, 8, &Text);
        hub.subscribe_with(&ch, s.clone(), CONFLATED).expect("subscribe");
        hub.activate("dash", 1, None, 0).expect("activate");
        publish(&hub, "dash", 1, b"first");
        settle().await;
        // Not read: the next newest does not fit.
        publish(&hub, "dash", 2, b"second");
        settle().await;
        assert!(!s.outbox.is_closing(), "not cut off");
        assert_eq!(
            frames_now(&s.outbox).await.iter().map(|f| payload(f).to_vec()).collect::<Vec<_>>(),
            [b"first".to_vec()]
        );
        // Its queue drained: the newest follows without another publication.
        settle().await;
        assert_eq!(
            frames_now(&s.outbox).await.iter().map(|f| payload(f).to_vec()).collect::<Vec<_>>(),
            [b"second".to_vec()]
        );
        publish(&hub, "dash", 3, b"third");
        settle().await;
        assert_eq!(
            frames_now(&s.outbox).await.iter().map(|f| payload(f).to_vec()).collect::<Vec<_>>(),
            [b"third".to_vec()]
        );
        assert_eq!(hub.subscription_count(), 1);
    }

    /// `channels` channels of `members` each, `pubs` publications to each from one publisher
    /// thread per channel at once; every member must get every offset once, in order.
    async fn big_fan_out(channels: u64, members: u64, pubs: u64) {
        let hub = Arc::new(Hub::new());
        let mut subs = Vec::new();
        let names: Vec<String> = (0..channels).map(|c| format!("c{c}")).collect();
        for (c, name) in names.iter().enumerate() {
            let ch: Arc<str> = Arc::from(name.as_str());
            for i in 0..members {
                let s = sub(c as u64 * members + i, 1 << 24, &Text);
                hub.subscribe(&ch, s.clone()).expect("subscribe");
                hub.activate(name, s.id, None, 0).expect("activate");
                subs.push(s);
            }
        }
        let publishers: Vec<_> = names
            .iter()
            .map(|name| {
                let (hub, rt, name) = (hub.clone(), tokio::runtime::Handle::current(), name.clone());
                std::thread::spawn(move || {
                    let _rt = rt.enter();
                    for offset in 1..=pubs {
                        let pos = StreamPosition { epoch: Arc::from("e"), offset };
                        let data = Bytes::from(offset.to_string());
                        hub.deliver(&name, &pos, &PublicationRecord { offset, data, ..Default::default() });
                    }
                })
            })
            .collect();
        for p in publishers {
            p.join().expect("publisher");
        }
        for s in &subs {
            let mut got = Vec::new();
            while got.len() < pubs as usize {
                let mut batch = VecDeque::new();
                tokio::time::timeout(Duration::from_secs(30), s.outbox.next_batch(&mut batch)).await.expect("in time");
                got.extend(batch.iter().map(|f| String::from_utf8_lossy(payload(f)).parse::<u64>().unwrap_or(0)));
            }
            assert_eq!(got, (1..=pubs).collect::<Vec<_>>(), "subscriber {}", s.id);
        }
        assert_eq!(hub.subscription_count(), (channels * members) as usize);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_big_fan_out_off_the_publishers_path_keeps_every_offset_once_in_order() {
        big_fan_out(2, FANOUT_OFFLOAD as u64 * 2 + 500, 300).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publisher_ahead_of_the_drain_job_fans_out_itself_and_keeps_the_order() {
        // More publications than the backlog holds, published faster than 1,001 members take
        // them: the publisher drains the backlog itself at times.
        big_fan_out(1, FANOUT_OFFLOAD as u64 + 1, MAX_BACKLOG as u64 + 500).await;
    }

    #[test]
    fn the_last_unsubscribe_drops_the_channel() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("x");
        join(&hub, &ch, &sub(1, 1024, &Text), 0);
        assert_eq!(hub.subscribe(&ch, sub(1, 1024, &Text)), Err(SubscribeError::AlreadySubscribed));
        assert!(hub.unsubscribe("x", 1));
        assert!(!hub.unsubscribe("x", 1));
        assert_eq!(hub.channel_count(), 0);
        assert_eq!(hub.activate("x", 1, None, 0), Err(SubscribeError::Closed));
    }
}
