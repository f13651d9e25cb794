//! The Rust client for Herald: subscribe to channels, publish, and stay connected.
//!
//! A [`Client`] holds one WebSocket (subprotocol `herald.v1`) owned by a background task. It
//! answers the server's pings, reconnects when the connection drops and resubscribes with
//! recovery, so a [`Subscription`] yields every publication once and in order across
//! reconnects, or says plainly ([`Event::Reset`]) when some were lost.
//!
//! ```no_run
//! use herald_client::{Client, ClientOptions, Event};
//!
//! # async fn run() -> Result<(), herald_client::Error> {
//! let client = Client::connect("ws://127.0.0.1:8080/connect", ClientOptions::default()).await?;
//! let mut news = client.subscribe("news").await?;
//! client.publish("news", &serde_json::json!({"title": "hello"})).await?;
//! while let Some(event) = news.next().await {
//!     match event {
//!         Event::Publication(p) => println!("{:?}: {}", p.offset, p.data.get()),
//!         Event::Reset { .. } => println!("missed some; reload"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Reconnecting and recovery
//!
//! The client reconnects when the connection drops, when the server closes it with a code
//! other than 1000 or 4500–4999 (4000–4499, 1001, 1006, 1011, 1012, 1013, ...), or when
//! nothing at all arrives for the server's ping interval (from the `connect` reply) plus
//! [`ClientOptions::ping_margin`]. Attempts wait with exponential backoff and full jitter
//! ([`ClientOptions::backoff`]), except after a shutdown close 1001 whose reason carries
//! `reconnect_in=<ms>` (docs/protocol.md): then the first attempt waits that hint, capped at
//! 60 s, plus up to a tenth of it (at least 100 ms) of jitter. After `connect` succeeds again, every live subscription is
//! resubscribed with `recover` from its last delivered `(epoch, offset)`: recovered
//! publications are delivered first, then live ones, skipping offsets already delivered. When
//! the server cannot recover, the subscription yields [`Event::Reset`] and continues. Requests
//! in flight when the connection drops fail with [`Error::Disconnected`]; new ones wait for
//! the reconnect, within [`ClientOptions::request_timeout`].
//!
//! The client stops for good, and its [`State`] becomes [`State::Closed`], after
//! [`Client::close`], a server close with 1000 or 4500–4999, a `connect` refused with a code
//! that retrying cannot fix (e.g. an invalid token), or when every `Client` and
//! `Subscription` handle is dropped.
//!
//! # TLS
//!
//! `wss://` URLs use rustls with the ring provider and trust the system's root certificates
//! (`rustls-native-certs`); to trust a private CA or a self-signed certificate, give a
//! configuration with [`ClientOptions::tls_config`] (see [`tls`]).
//!
//! # Backpressure
//!
//! Each subscription buffers up to [`ClientOptions::subscription_buffer`] events. When the
//! application does not read and that buffer is full, the background task waits: it reads
//! nothing more from the connection until there is room. Nothing is dropped by the client;
//! a server that runs out of patience closes the connection as a slow consumer, and the
//! client reconnects and recovers.
//!
//! Layout: `client` (the [`Client`] handle and [`State`]), `subscription` ([`Subscription`],
//! [`Event`]), `options` ([`ClientOptions`]), `error` ([`Error`]), `worker` (the background
//! task that owns the connection), `connection` (opening one connection, and which endings
//! are worth a reconnect), `recovery` (resubscribe positions and deduplication), `backoff`
//! (exponential backoff with full jitter), `tls` (`wss://`: rustls with ring, the system's
//! roots by default).

mod backoff;
mod client;
mod connection;
mod error;
mod options;
mod recovery;
mod subscription;
pub mod tls;
mod worker;

pub use client::{Client, State};
pub use error::Error;
pub use herald_protocol::{ClientInfo, ConnectResult, ErrorCode, Publication, PublishResult};
pub use options::ClientOptions;
/// The rustls this client uses, for building a [`ClientOptions::tls_config`].
pub use rustls;
pub use subscription::{Event, Subscription};
