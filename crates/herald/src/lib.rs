//! Herald: a real-time push server.
//!
//! Layout:
//! - `config`: the typed configuration (file, environment, flags) and its generated docs.
//! - `auth`: connection tokens (JWT) verified with a pinned algorithm; minting for development.
//! - `channel`: channel names, namespaces and what they allow.
//! - `engine`: where publications, history and presence live (`MemoryEngine`; trait + conformance suite).
//! - `hub`: channel → subscribers; encode once, fan out, cut off slow consumers.
//! - `node`: this node's shared state (config, hub, counters).
//! - `session`: one native-protocol client: commands, permissions, subscriptions, pings.
//! - `transport`: `/connect`, `/ws/<channel>`, `/sse/<channel>`.
//! - `api`: the HTTP API for backends (`POST /api/<method>`).
//! - `ws`: our WebSocket layer (RFC 6455 framing, RFC 7692 deflate, prepared frames).
//! - `server`: the listener (TCP or TLS), routes, connection and request limits, graceful shutdown.
//! - `tls`: certificates from PEM files (rustls), reloaded on SIGHUP.
//! - `origin`: `http.allowed_origins` for WebSocket, SSE and CORS; the API's CSRF rule.
//! - `metrics`: the Prometheus recorder behind `/metrics`.
//! - `http_error`: JSON error answers shared by every HTTP endpoint.

pub mod api;
pub mod auth;
pub mod channel;
pub mod config;
pub mod engine;
pub mod http_error;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod origin;
pub mod server;
pub mod session;
pub mod tls;
pub mod transport;
pub mod ws;

pub use config::Config;

/// Herald's version, as reported by `herald version` and the protocol.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
