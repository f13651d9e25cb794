//! Engines: where publications, history and presence live. `MemoryEngine` for one node;
//! `RedisEngine` (cargo feature `redis`) for many nodes sharing one Redis. Both pass the same
//! conformance suite (`conformance`).
//!
//! The engine never knows the hub: it hands publications upward through a [`Delivery`]
//! handler, in the channel's offset order, and asks it whether the node still has local
//! subscribers of a channel.

pub mod memory;
pub mod redis;

#[cfg(test)]
pub(crate) mod conformance;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use herald_protocol::{ClientInfo, ErrorCode};

pub use self::redis::RedisConfig;
#[cfg(feature = "redis")]
pub use self::redis::RedisEngine;
pub use memory::MemoryEngine;

/// A channel's position: the offset of its last publication within an epoch. The epoch
/// changes whenever the engine lost the channel's history (a restart of a memory engine, an
/// expired or flushed stream), so an old `(epoch, offset)` never matches a new stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamPosition {
    pub epoch: Arc<str>,
    pub offset: u64,
}

/// One stored publication.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublicationRecord {
    pub offset: u64,
    /// The publication's JSON.
    pub data: Bytes,
    pub info: Option<ClientInfo>,
    /// Key/value metadata stored with the publication (a door's event name, app tags).
    pub tags: Option<Arc<Tags>>,
    /// A connection id (`Node::next_id`) that must not receive this publication live (the
    /// publisher's own connection). Travels with the publication, is never stored in history.
    pub exclude: Option<u64>,
}

/// A publication's key/value metadata.
pub type Tags = std::collections::BTreeMap<String, String>;

/// What a door asks an engine to publish.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publish {
    /// Valid JSON.
    pub data: Bytes,
    pub info: Option<ClientInfo>,
    pub tags: Option<Arc<Tags>>,
    pub exclude: Option<u64>,
}

impl Publish {
    /// A publication of `data` (valid JSON) with nothing else.
    pub fn data(data: Bytes) -> Self {
        Self { data, ..Self::default() }
    }

    /// The record it becomes at `offset`.
    pub fn into_record(self, offset: u64) -> PublicationRecord {
        PublicationRecord { offset, data: self.data, info: self.info, tags: self.tags, exclude: self.exclude }
    }
}

/// How a channel keeps history (from its namespace's options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    /// Publications kept; 0 keeps none (positions are then kept only while someone listens).
    pub size: usize,
    /// How long a publication stays in history; also how long an idle channel's position is
    /// kept.
    pub ttl: Duration,
}

impl HistoryPolicy {
    pub const NONE: Self = Self { size: 0, ttl: Duration::ZERO };
}

/// Which part of history to read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryQuery {
    /// Publications after this position (exclusive); `None` for the newest.
    pub since: Option<StreamPosition>,
    /// At most this many publications (0: none, only the position).
    pub limit: usize,
    /// Newest first.
    pub reverse: bool,
}

/// A history read: the channel's current position and the publications asked for, in offset
/// order (or reverse order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub position: StreamPosition,
    pub publications: Vec<PublicationRecord>,
    /// `since` was given and every publication after it is in `publications` (not cut by the
    /// history window, an epoch change or `limit`).
    pub complete: bool,
}

/// One client present on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEntry {
    pub client: String,
    pub user: String,
    /// Connection info from the client's token, as JSON.
    pub info: Option<Bytes>,
}

/// What a presence change means at user level: several connections of one user count once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// The user's first connection on the channel arrived.
    UserJoined,
    /// The user's last connection on the channel left.
    UserLeft,
    /// Another connection of a user already present came or went (or nothing changed).
    Unchanged,
}

/// Counts of who is present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PresenceStats {
    pub clients: usize,
    pub users: usize,
}

/// An engine failure. Memory engines fail only on their limits; networked engines also when
/// the network does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The publication would start a new channel beyond [`EngineLimits::max_channels`].
    #[error("this node keeps at most {max} channels (limits.max_channels); try again later")]
    TooManyChannels { max: usize },
    /// The publication would store more than [`EngineLimits::max_history_bytes`].
    #[error("this node keeps at most {max} bytes of history (limits.max_history_bytes); try again later")]
    HistoryFull { max: usize },
}

impl EngineError {
    /// The configuration key of the limit this error comes from, if it is a limit.
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            Self::Unavailable(_) => None,
            Self::TooManyChannels { .. } => Some("max_channels"),
            Self::HistoryFull { .. } => Some("max_history_bytes"),
        }
    }

    /// The code every door answers with: a node limit (116, retry later) or an engine that
    /// does not answer (113). The one mapping, for WebSocket replies and HTTP answers alike.
    pub fn code(&self) -> ErrorCode {
        if self.limit().is_some() {
            ErrorCode::NodeLimit
        } else {
            ErrorCode::Unavailable
        }
    }
}

/// Node-wide bounds on what publications can make an engine hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// Most channels with a stream (a position, maybe history).
    pub max_channels: usize,
    /// Most bytes of publications (data and info) kept in history, over all channels.
    pub max_history_bytes: usize,
}

impl EngineLimits {
    pub const NONE: Self = Self { max_channels: usize::MAX, max_history_bytes: usize::MAX };
}

/// What an engine holds now, for `/api/info` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Channels with a stream.
    pub channels: usize,
    /// Bytes of publications in history.
    pub history_bytes: usize,
}

/// Receives publications from the engine, for local fan-out. Called in offset order per
/// channel, never twice for one publication.
pub trait Delivery: Send + Sync + 'static {
    fn deliver(&self, channel: &str, position: &StreamPosition, publication: &PublicationRecord);

    /// A frame that is not a publication (a join or leave push) for the channel's local
    /// subscribers; see [`Engine::broadcast`].
    fn notify(&self, _channel: &str, _text: Bytes) {}

    /// Whether this node still has local subscribers of `channel`; see [`Engine::release`].
    fn has_subscribers(&self, _channel: &str) -> bool {
        true
    }

    /// The engine missed publications of `channel` that it cannot hand over any more (its
    /// link was down longer than the history keeps them): the local subscribers must
    /// reconnect and recover, which tells them `recovered: false`. Never a silent gap.
    fn lost(&self, _channel: &str) {}
}

/// The engine contract.
///
/// - **Order and atomicity:** `publish` assigns the channel's next offset (previous + 1, no
///   gaps), stores the publication in history when the policy keeps any, and only then hands
///   it to the delivery handler: anything delivered is already readable by `history`.
///   Concurrent publishers to one channel get distinct offsets and deliveries happen in offset
///   order.
/// - **Epochs:** a channel's epoch stays the same as long as its history is continuous. When
///   history is lost (restart, expiry of an idle channel; for a shared engine, whatever its
///   backend lost), the next publication starts a new epoch at offset 1. An epoch is never
///   made from anything a node remembers, so no node can bring an old one back.
/// - **Failure:** an error means the publication was not stored and not delivered; the
///   caller may retry. Reads fail without side effects.
/// - **Presence** entries expire after their TTL unless refreshed by `presence_add` again.
///   Reads never show an expired entry; [`Engine::presence_expire`] removes them and reports
///   the users who left with them.
/// - **Reading creates nothing.** `history`, `presence` and `presence_stats` of a channel that
///   has no stream leave no state behind: a hostile client reading random channel names costs
///   nothing that lingers. Such a read answers the position `(epoch, 0)` that the channel's
///   first publication will continue from: the stream it creates keeps that epoch, so a
///   subscriber told `(epoch, 0)` recovers it exactly. A stream that is forgotten and later
///   recreated never reuses an epoch an earlier stream of that channel handed out, so a stale
///   position never recovers falsely (`complete` stays false).
/// - **Limits** ([`EngineLimits`]): a publication that would start a channel beyond
///   `max_channels`, or store history beyond `max_history_bytes`, fails with
///   [`EngineError::TooManyChannels`] or [`EngineError::HistoryFull`] and changes nothing.
///   (Node-local memory limits: a shared engine such as Redis is bounded by Redis itself.)
/// - **Listening (the broker part):** an engine shared by several nodes delivers a channel's
///   publications to a node only while that node listens to it. The node calls
///   [`Engine::listen`] for every local subscription *before* reading the position it
///   subscribes at; once `listen` resolves, every later publication reaches the delivery
///   handler. After a local unsubscribe the node calls [`Engine::release`]; the engine stops
///   listening once [`Delivery::has_subscribers`] says no one is left (so one listener per
///   channel per node, not per client). Publications a listening engine missed (a broken
///   link) are recovered from history in order, or reported with [`Delivery::lost`].
/// - **Broadcasts** ([`Engine::broadcast`]: join and leave pushes) reach the listening nodes
///   best effort: not stored, not numbered, not ordered with publications.
///
/// The trait has a broker part (publish, history, listen, release, broadcast) and a
/// presence part (the `presence_*` methods). Both engines implement both on one store, so
/// they stay one trait; a presence-only backend would be the reason to split it.
pub trait Engine: Send + Sync + std::fmt::Debug + 'static {
    /// Sets where publications go after they are stored. Called once, before the first publish.
    fn set_delivery(&self, delivery: Arc<dyn Delivery>);

    /// Housekeeping (forget idle channels, expire presence); called periodically.
    fn sweep(&self) {}

    /// Publishes to `channel`; returns the position it got.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publish,
        policy: HistoryPolicy,
    ) -> BoxFuture<'a, Result<StreamPosition, EngineError>>;

    /// Makes sure this node receives `channel`'s publications; resolves once it does (see the
    /// trait's contract). Idempotent; a single-node engine always does.
    fn listen<'a>(&'a self, _channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(futures_util::future::ready(Ok(())))
    }

    /// The node may have lost its last local subscriber of `channel`.
    fn release(&self, _channel: &str) {}

    /// Sends `text` (an encoded [`crate::hub::ChannelEvent`]: a join, a leave, a client event)
    /// to `channel`'s subscribers on every node through [`Delivery::notify`]. The engine
    /// carries the bytes as they are.
    fn broadcast<'a>(&'a self, channel: &'a str, text: Bytes) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Reads history (see [`HistoryQuery`]).
    fn history<'a>(&'a self, channel: &'a str, query: HistoryQuery) -> BoxFuture<'a, Result<History, EngineError>>;

    /// Adds or refreshes a client's presence.
    fn presence_add<'a>(
        &'a self,
        channel: &'a str,
        entry: PresenceEntry,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<PresenceChange, EngineError>>;

    /// Removes a client's presence.
    fn presence_remove<'a>(
        &'a self,
        channel: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<(PresenceChange, Option<PresenceEntry>), EngineError>>;

    /// Removes `channel`'s expired presence entries (clients of a node that died, which
    /// nobody removed) and returns those whose user left with them, for `leave` pushes. Each
    /// expired entry is returned once, to one caller, whichever node calls. An engine whose
    /// presence cannot outlive its node's sessions returns nothing.
    fn presence_expire<'a>(&'a self, _channel: &'a str) -> BoxFuture<'a, Result<Vec<PresenceEntry>, EngineError>> {
        Box::pin(futures_util::future::ready(Ok(Vec::new())))
    }

    /// Everyone present on `channel`.
    fn presence<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<PresenceEntry>, EngineError>>;

    /// How many clients and distinct users are present.
    fn presence_stats<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<PresenceStats, EngineError>>;

    /// What this engine holds on this node now.
    fn stats(&self) -> EngineStats;

    /// Why this node cannot serve channels through the engine now (for `/ready`), or `None`
    /// when it can. Cheap: it reads state the engine tracks anyway, never asks the backend.
    fn unavailable(&self) -> Option<&'static str> {
        None
    }
}
