//! The node-local map channel → subscribers. A publication is encoded once per format (native
//! envelope, raw data, SSE event) and the same bytes are queued for every subscriber. One lock
//! per channel keeps a single order per channel; channels are spread over shards so no lock is
//! global. A subscriber whose queue overflows is closed (4001) and removed, never waited for.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use herald_protocol::{ClientInfo, CloseCode};

use crate::engine::{PublicationRecord, StreamPosition};
use crate::ws::{self, CloseFrame, Outbox, Prepared, SendError};

/// How a subscriber wants publications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Native protocol: `{"push":{"channel":..,"pub":{..}}}` in a WebSocket text frame.
    Native,
    /// The publication's data alone, in a WebSocket text frame (`/ws/<channel>`).
    Raw,
    /// A Server-Sent Event with `id:` = offset (`/sse/<channel>`).
    Sse,
}

/// One subscription: where to queue, in which format.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub id: u64,
    pub outbox: Outbox,
    pub format: Format,
}

/// A publication with its encodings, each made on first use and shared afterwards.
#[derive(Debug)]
pub struct Delivery {
    channel: Arc<str>,
    epoch: Arc<str>,
    offset: u64,
    data: Bytes,
    info: Option<ClientInfo>,
    native: OnceLock<Prepared>,
    raw: OnceLock<Prepared>,
    sse: OnceLock<Bytes>,
}

impl Delivery {
    fn new(channel: &str, position: &StreamPosition, record: &PublicationRecord) -> Self {
        Self {
            channel: Arc::from(channel),
            epoch: position.epoch.clone(),
            offset: record.offset,
            data: record.data.clone(),
            info: record.info.clone(),
            native: OnceLock::new(),
            raw: OnceLock::new(),
            sse: OnceLock::new(),
        }
    }

    fn queue(&self, sub: &Subscriber) -> Result<(), SendError> {
        match sub.format {
            Format::Native => sub.outbox.send_prepared(self.native.get_or_init(|| {
                let push =
                    herald_protocol::encode_pub_push(&self.channel, Some(self.offset), &self.data, self.info.as_ref());
                Prepared::text(Bytes::from(push))
            })),
            Format::Raw => sub.outbox.send_prepared(self.raw.get_or_init(|| Prepared::text(self.data.clone()))),
            Format::Sse => {
                sub.outbox.push(self.sse.get_or_init(|| sse_event(&self.epoch, self.offset, &self.data)).clone())
            }
        }
    }
}

/// `id: <epoch>:<offset>` and the data, one `data:` line per line of JSON (SSE cannot carry
/// raw newlines; EventSource joins the lines back with `\n`). The id carries the epoch so that
/// `Last-Event-ID` can resume exactly, or tell that it cannot.
pub fn sse_event(epoch: &str, offset: u64, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 32);
    out.extend_from_slice(format!("id: {epoch}:{offset}\n").as_bytes());
    for line in data.split(|b| *b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.push(b'\n');
    }
    out.push(b'\n');
    Bytes::from(out)
}

#[derive(Debug)]
struct ChannelState {
    inner: Mutex<ChannelInner>,
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

/// The channel → subscribers map of this node.
#[derive(Debug)]
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    subscriptions: AtomicUsize,
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
            subscriptions: AtomicUsize::new(0),
        }
    }

    fn shard(&self, channel: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(channel) as usize) % self.shards.len()]
    }

    /// Adds `sub` to `channel` in the waiting state: live publications are held for it until
    /// [`Hub::activate`] sends its subscribe reply. Read the channel's position (or the history
    /// to recover) in between: whatever was published before this call is in it, whatever
    /// comes after is held, and [`Hub::activate`] drops the overlap.
    pub fn subscribe(&self, channel: &Arc<str>, sub: Subscriber) -> Result<(), SubscribeError> {
        loop {
            let state = lock(self.shard(channel))
                .entry(channel.clone())
                .or_insert_with(|| Arc::new(ChannelState { inner: Mutex::new(ChannelInner::default()) }))
                .clone();
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
        let member = &mut inner.members[i];
        member.floor = offset;
        let held = member.pending.take().unwrap_or_default();
        let sent = reply
            .map_or(Ok(()), |text| match member.sub.format {
                // An event stream carries the text as it is; WebSockets get a text frame.
                Format::Sse => member.sub.outbox.push(text),
                _ => member.sub.outbox.send_text(text),
            })
            .and_then(|()| {
                for d in held.iter().filter(|d| d.offset > offset) {
                    d.queue(&member.sub)?;
                    member.floor = d.offset;
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
                shard.remove(channel);
            }
        }
    }

    /// Delivers a stored publication to every subscriber of `channel` on this node. Called by
    /// the engine in offset order per channel.
    pub fn deliver(&self, channel: &str, position: &StreamPosition, record: &PublicationRecord) {
        let Some(state) = lock(self.shard(channel)).get(channel).cloned() else { return };
        let mut inner = lock(&state.inner);
        if inner.dead {
            return;
        }
        let delivery = Arc::new(Delivery::new(channel, position, record));
        let mut gone = Vec::new();
        for m in inner.members.iter_mut() {
            if let Some(held) = m.pending.as_mut() {
                if held.len() < MAX_PENDING {
                    held.push(delivery.clone());
                } else {
                    slow_consumer(&m.sub, channel);
                    gone.push(m.sub.id);
                }
                continue;
            }
            if record.offset <= m.floor {
                continue;
            }
            match delivery.queue(&m.sub) {
                Ok(()) => m.floor = record.offset,
                Err(SendError::Full) => {
                    slow_consumer(&m.sub, channel);
                    gone.push(m.sub.id);
                }
                Err(SendError::Closed) => gone.push(m.sub.id),
            }
        }
        for id in gone {
            if inner.remove(id) {
                self.subscriptions.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let empty = inner.members.is_empty();
        drop(inner);
        if empty {
            self.drop_if_empty(channel);
        }
    }

    /// Sends a frame that is not a publication (a join or leave push) to the channel's live
    /// native-protocol subscribers. Not stored, not numbered.
    pub fn notify(&self, channel: &str, text: Bytes) {
        let Some(state) = lock(self.shard(channel)).get(channel).cloned() else { return };
        let inner = lock(&state.inner);
        let prepared = Prepared::text(text);
        for m in inner.members.iter().filter(|m| m.pending.is_none() && m.sub.format == Format::Native) {
            if m.sub.outbox.send_prepared(&prepared) == Err(SendError::Full) {
                slow_consumer(&m.sub, channel);
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
            match sub.format {
                Format::Sse => sub.outbox.finish(),
                _ => {
                    let code = CloseCode::ServerError;
                    let frame =
                        CloseFrame::new(ws::CloseCode(code.as_u16()), "missed publications; reconnect and recover");
                    sub.outbox.close_now(Some(frame));
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
    match sub.format {
        Format::Sse => {
            sub.outbox.finish();
            metrics::counter!("herald_slow_consumers_total").increment(1);
        }
        _ => close_slow_consumer(&sub.outbox),
    }
    tracing::debug!(subscriber = sub.id, channel, "slow consumer disconnected");
}

/// Closes a WebSocket whose queue overflowed with 4001, dropping what it had not read, and
/// counts it. For replies as for publications: a reply is never dropped on an open connection.
pub(crate) fn close_slow_consumer(outbox: &Outbox) {
    let code = CloseCode::SlowConsumer;
    if outbox.close_now(Some(CloseFrame::new(ws::CloseCode(code.as_u16()), code.reason()))) {
        metrics::counter!("herald_slow_consumers_total").increment(1);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::ws::SendMode;

    fn sub(id: u64, limit: usize, format: Format) -> Subscriber {
        Subscriber { id, outbox: Outbox::new(limit, SendMode::PLAIN), format }
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
        hub.deliver(channel, &pos, &PublicationRecord { offset, data: Bytes::from_static(data), info: None });
    }

    fn join(hub: &Hub, ch: &Arc<str>, s: &Subscriber, offset: u64) {
        hub.subscribe(ch, s.clone()).expect("subscribe");
        hub.activate(ch, s.id, Some(Bytes::from(format!("reply {offset}"))), offset).expect("activate");
    }

    #[test]
    fn each_subscriber_gets_the_same_bytes_in_order_after_its_reply() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("news");
        let (a, b) = (sub(1, 1 << 20, Format::Native), sub(2, 1 << 20, Format::Native));
        join(&hub, &ch, &a, 0);
        join(&hub, &ch, &b, 0);
        for i in 1..=3 {
            publish(&hub, "news", i, b"1");
        }
        let (fa, fb) = (frames(&a.outbox), frames(&b.outbox));
        assert_eq!(fa.len(), 4);
        assert_eq!(payload(&fa[0]), b"reply 0");
        assert_eq!(payload(&fa[1]), br#"{"push":{"channel":"news","pub":{"offset":1,"data":1}}}"#);
        assert_eq!(fa[3].as_ptr(), fb[3].as_ptr(), "encoded once, shared");
        assert_eq!(hub.subscription_count(), 2);
    }

    #[test]
    fn publications_during_the_reply_are_held_and_deduplicated() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("c");
        let s = sub(1, 1 << 20, Format::Raw);
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
    fn formats_are_encoded_per_kind() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("t");
        let (raw, sse) = (sub(1, 1 << 20, Format::Raw), sub(2, 1 << 20, Format::Sse));
        for s in [&raw, &sse] {
            hub.subscribe(&ch, s.clone()).expect("subscribe");
            hub.activate("t", s.id, None, 0).expect("activate");
        }
        publish(&hub, "t", 1, b"{\n\"a\":1}");
        assert_eq!(payload(&frames(&raw.outbox)[0]), b"{\n\"a\":1}");
        assert_eq!(frames(&sse.outbox)[0], Bytes::from_static(b"id: e:1\ndata: {\ndata: \"a\":1}\n\n"));
    }

    #[test]
    fn a_slow_subscriber_is_closed_and_removed_without_affecting_others() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("fast");
        let slow = sub(1, 100, Format::Raw);
        let fast = sub(2, 1 << 20, Format::Raw);
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

    #[test]
    fn the_last_unsubscribe_drops_the_channel() {
        let hub = Hub::new();
        let ch: Arc<str> = Arc::from("x");
        join(&hub, &ch, &sub(1, 1024, Format::Raw), 0);
        assert_eq!(hub.subscribe(&ch, sub(1, 1024, Format::Raw)), Err(SubscribeError::AlreadySubscribed));
        assert!(hub.unsubscribe("x", 1));
        assert!(!hub.unsubscribe("x", 1));
        assert_eq!(hub.channel_count(), 0);
        assert_eq!(hub.activate("x", 1, None, 0), Err(SubscribeError::Closed));
    }
}
