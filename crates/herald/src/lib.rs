//! Herald: a real-time push server.
//!
//! Layout:
//! - `config`: the typed configuration (file, environment, flags) and its generated docs.
//! - `auth`: connection and subscription tokens (JWT) verified with a pinned algorithm; keys from
//!   PEM or a reloaded JWKS file; minting for development.
//! - `channel`: channel names, namespaces and what they allow.
//! - `engine`: where publications, history and presence live (`MemoryEngine`, `RedisEngine`; trait +
//!   conformance suite).
//! - `hub`: channel → subscribers; encode once, fan out, cut off slow consumers.
//! - `node`: this node's shared state (config, hub, counters); `Node::reload` applies a new
//!   configuration live.
//! - `reload`: what a reload changes, key by key, and what only a restart changes.
//! - `rules`: what every door shares: permission checks, the publication size limit, the code an
//!   engine failure gets.
//! - `limits`: per-connection rate limits (token buckets, refusals that end in a close).
//! - `session`: one client of the native or the Centrifugo protocol: commands, permissions,
//!   subscriptions, pings.
//! - `centrifugo`: the Centrifugo door's encoder (its wire translation is in `herald-protocol`).
//! - `transport`: `/connect`, `/connection/websocket`, `/ws/<channel>`, `/sse/<channel>`.
//! - `pusher`: Pusher Channels protocol 7 on `/app/<key>` (pusher-js, Laravel Echo) and the Pusher
//!   HTTP API on `/apps/<id>/...` (the `pusher` server SDKs).
//! - `api`: the HTTP API for backends (`POST /api/<method>`).
//! - `ws`: our WebSocket layer (RFC 6455 framing, RFC 7692 deflate, prepared frames).
//! - `web`: `/herald.js`, the demo pages, `--demo` setup, the close for non-endpoint WebSockets.
//! - `server`: the listener (TCP or TLS), routes, connection and request limits, graceful shutdown.
//! - `startup`: the start-up summary line (`listening`), with secrets and URL credentials left out.
//! - `tls`: certificates from PEM files (rustls), reloaded on SIGHUP.
//! - `origin`: `http.allowed_origins` for WebSocket, SSE and CORS; the API's CSRF rule.
//! - `metrics`: the Prometheus recorder behind `/metrics`: every counter at 0 from the start,
//!   process metrics read when scraped, build info.
//! - `ratelog`: refusals in the log, at most `log.refusals_per_second` lines per kind.
//! - `http_error`: JSON error answers shared by every HTTP endpoint.
//! - `webhooks`: lifecycle events (occupied/vacated, members, client events, connects) POSTed to
//!   endpoints in batches, in order, retried until delivered; bounded queues.
//! - `secret`: `Secret`, a configuration value never printed (a leaf, used by `config` and `auth`).

pub mod auth;
pub mod channel;
pub mod config;
pub mod doors;
pub mod engine;
pub mod http_error;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod origin;
pub mod ratelog;
pub mod reload;
pub mod rules;
pub mod secret;
pub mod server;
pub mod startup;
pub mod tls;
pub mod web;
pub mod webhooks;
pub mod ws;

pub use config::Config;

/// Herald's version, as reported by `herald version` and the protocol.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
