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

mod config;
pub use self::config::RedisConfig;

#[cfg(feature = "redis")]
mod codec;
#[cfg(feature = "redis")]
mod engine;
#[cfg(feature = "redis")]
mod link;
#[cfg(feature = "redis")]
mod scripts;
#[cfg(feature = "redis")]
#[doc(hidden)]
pub mod test_server;

#[cfg(feature = "redis")]
pub use self::engine::RedisEngine;
