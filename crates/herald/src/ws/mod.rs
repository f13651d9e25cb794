//! Our WebSocket layer (RFC 6455, RFC 7692), owned because fan-out needs prepared frames:
//! encoded and compressed once, written to many connections (ARCHITECTURE.md says why).
//!
//! Layout: `frame` (wire format), `decoder` (bytes → messages), `utf8`, `deflate`,
//! `handshake` (upgrade request checks), `outbox` (bounded send queue and writer),
//! `io` (the byte stream: TCP or any other), `socket` (one connection), `upgrade` (the hyper upgrade into a [`WebSocket`]).

mod close;
pub mod decoder;
pub mod deflate;
pub mod frame;
pub mod handshake;
mod io;
mod outbox;
mod socket;
mod upgrade;
mod utf8;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use close::{CloseCode, CloseFrame};
pub use decoder::{Decoder, Event, Limits, Message, ProtocolError, Role};
pub use deflate::DeflatePolicy;
pub use io::{Io, Stream};
pub use outbox::{Outbox, Prepared, SendError, SendMode};
pub use socket::{random_up_to, WebSocket, WsError};
pub use upgrade::{upgrade, AcceptedAt, Held, WsContext};
pub use utf8::{InvalidUtf8, Utf8Validator};

/// WebSocket limits and timings (`[websocket]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Largest payload of a single frame a client may send, in bytes. Larger frames close the
    /// connection with 1009.
    pub max_frame_size: usize,
    /// Largest message a client may send, in bytes, after reassembling fragments and after
    /// decompression. Larger messages close the connection with 1009.
    pub max_message_size: usize,
    /// Most frames a single message may be split into.
    pub max_fragments: usize,
    /// Bytes of outgoing frames queued per connection before the client counts as too slow
    /// and is disconnected.
    pub max_queue_bytes: usize,
    /// Time allowed for a client to send an HTTP request's headers: the upgrade request after
    /// connecting, and each next request on a kept-alive HTTP connection (an idle keep-alive
    /// connection is closed after this long; HTTP clients with connection pools reconnect).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub handshake_timeout: Duration,
    /// After this long without hearing from a client, the server pings it: a WebSocket ping,
    /// or on native protocol connections an app-level `{}` that browsers can see (its seconds
    /// are announced in the `connect` reply).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub ping_interval: Duration,
    /// How long a client has to answer a ping (with anything) before it is disconnected.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub pong_timeout: Duration,
    /// How long the closing handshake may take before the TCP connection is dropped.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub close_timeout: Duration,
    /// Holds a connection's outgoing messages for up to this long after the first one is
    /// queued, so that those that follow go out in the same system call and TCP segment.
    /// `0s` (the default) writes at once. Where each client receives many messages a second,
    /// a delay of the order of the gap between them lowers the server's CPU per delivery
    /// (`herald_frames_sent_total` / `herald_writes_total` shows the merging), at the price
    /// of up to that much latency.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub write_delay: Duration,
    /// permessage-deflate compression (RFC 7692).
    pub compression: DeflatePolicy,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_frame_size: 128 << 10,
            max_message_size: 128 << 10,
            max_fragments: 128,
            max_queue_bytes: 1 << 20,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(3),
            write_delay: Duration::ZERO,
            compression: DeflatePolicy::default(),
        }
    }
}

/// Counters shared by every connection (Prometheus names in `crate::metrics`). One pointer:
/// every connection holds a copy in its reader and its writer.
#[derive(Clone)]
pub struct WsMetrics(std::sync::Arc<MetricHandles>);

struct MetricHandles {
    connections: metrics::Gauge,
    frames_received: metrics::Counter,
    frames_sent: metrics::Counter,
    writes: metrics::Counter,
    bytes_in: metrics::Counter,
    bytes_out: metrics::Counter,
    handshake: metrics::Histogram,
    queue_write: metrics::Histogram,
}

impl std::fmt::Debug for WsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WsMetrics")
    }
}

impl WsMetrics {
    /// Handles to the global recorder; install the recorder first.
    pub fn new() -> Self {
        Self(std::sync::Arc::new(MetricHandles {
            connections: metrics::gauge!("herald_connections", "transport" => "websocket"),
            frames_received: metrics::counter!("herald_frames_received_total"),
            frames_sent: metrics::counter!("herald_frames_sent_total"),
            writes: metrics::counter!("herald_writes_total"),
            bytes_in: metrics::counter!("herald_bytes_in_total"),
            bytes_out: metrics::counter!("herald_bytes_out_total"),
            handshake: metrics::histogram!("herald_handshake_seconds"),
            queue_write: metrics::histogram!("herald_queue_write_seconds"),
        }))
    }

    fn opened(&self) {
        self.0.connections.increment(1.0);
    }

    fn closed(&self) {
        self.0.connections.decrement(1.0);
    }

    fn received_frame(&self) {
        self.0.frames_received.increment(1);
    }

    fn received_bytes(&self, n: u64) {
        self.0.bytes_in.increment(n);
    }

    fn sent(&self, frames: u64, writes: u64, bytes: u64) {
        self.0.frames_sent.increment(frames);
        self.0.writes.increment(writes);
        self.0.bytes_out.increment(bytes);
    }

    fn handshake_took(&self, d: Duration) {
        self.0.handshake.record(d.as_secs_f64());
    }

    /// A sampled batch: from its first frame being queued to all of it being written.
    fn queue_write_took(&self, d: Duration) {
        self.0.queue_write.record(d.as_secs_f64());
    }
}

impl Default for WsMetrics {
    fn default() -> Self {
        Self::new()
    }
}
