//! Herald: a real-time push server.
//!
//! Layout:
//! - `config`: the typed configuration (file, environment, flags) and its generated docs.
//! - `ws`: our WebSocket layer (RFC 6455 framing, RFC 7692 deflate, prepared frames).
//! - `server`: the listener, routes, connection limits and graceful shutdown.
//! - `metrics`: the Prometheus recorder behind `/metrics`.
//! - `http_error`: JSON error answers shared by every HTTP endpoint.

pub mod config;
pub mod http_error;
pub mod metrics;
pub mod server;
pub mod ws;

pub use config::Config;

/// Herald's version, as reported by `herald version` and the protocol.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
