//! The start-up summary: one `listening` line at info with what an operator checks first
//! (version, address, TLS, engine, how the API and tokens are protected, namespaces, doors),
//! and never a secret: no key, no password, no URL's user part.

use std::net::SocketAddr;

use crate::config::{Config, EngineKind};

/// Logs the `listening` line for a server on `addr`.
pub fn log_listening(config: &Config, addr: SocketAddr, tls: bool) {
    let s = Summary::new(config, addr);
    tracing::info!(
        version = crate::VERSION,
        %addr,
        tls,
        engine = s.engine,
        redis = s.redis.as_deref().unwrap_or(""),
        api = s.api,
        tokens = s.tokens,
        namespaces = s.namespaces.as_str(),
        doors = s.doors.as_str(),
        "listening"
    );
}

/// What the line says, as text (tested without a subscriber).
#[derive(Debug)]
struct Summary {
    engine: &'static str,
    redis: Option<String>,
    api: &'static str,
    tokens: String,
    namespaces: String,
    doors: String,
}

impl Summary {
    fn new(config: &Config, addr: SocketAddr) -> Self {
        let (engine, redis) = match config.engine.kind {
            EngineKind::Memory => ("memory", None),
            EngineKind::Redis => ("redis", Some(redact_url(&config.engine.redis.url))),
        };
        let loopback = addr.ip().is_loopback() || addr.ip().to_canonical().is_loopback();
        let api = match (config.api.has_key(), loopback) {
            (true, _) => "key required",
            (false, true) => "no key: loopback clients only",
            (false, false) => "no key: loopback clients only (listening beyond loopback: set api.key)",
        };
        let auth = &config.auth;
        let key = if !auth.jwks_file.trim().is_empty() {
            "jwks_file"
        } else if !auth.public_key.trim().is_empty() {
            "public_key"
        } else if !auth.secret.is_empty() {
            "secret"
        } else {
            ""
        };
        let tokens = match (key, auth.allow_anonymous) {
            ("", true) => "none (anonymous clients only)".to_owned(),
            ("", false) => "none, and anonymous clients refused: nobody can connect".to_owned(),
            (key, true) => format!("{} with auth.{key}, anonymous allowed", auth.algorithm),
            (key, false) => format!("{} with auth.{key}, required", auth.algorithm),
        };
        let mut namespaces: Vec<&str> = config.channels.namespaces.keys().map(String::as_str).collect();
        if namespaces.is_empty() {
            namespaces.push("(default only)");
        }
        let mut doors = vec!["/connect", "/connection/websocket (centrifugo)", "/ws", "/sse"];
        let pusher;
        if !config.pusher.apps.is_empty() {
            pusher = format!("/app (pusher: {} apps)", config.pusher.apps.len());
            doors.push(&pusher);
        }
        let webhooks;
        if !config.webhooks.endpoints.is_empty() {
            webhooks = format!("webhooks: {} endpoints", config.webhooks.endpoints.len());
            doors.push(&webhooks);
        }
        if config.demo {
            doors.push("demo pages");
        }
        if config.testing.echo {
            doors.push("/_echo (testing)");
        }
        Self { engine, redis, api, tokens, namespaces: namespaces.join(","), doors: doors.join(",") }
    }
}

/// `url` without its user part (`redis://user:pass@host:6379/0` → `redis://host:6379/0`),
/// and without a query (which may carry credentials too).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let path = path.split(['?', '#']).next().unwrap_or("");
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}"),
        None => format!("{host}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_user_part_and_query() {
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact_url("redis://u:p%40ss@redis.internal:6379/2"), "redis://redis.internal:6379/2");
        assert_eq!(redact_url("rediss://:secret@10.0.0.5:6380"), "rediss://10.0.0.5:6380");
        assert_eq!(redact_url("redis://h:1/0?password=x"), "redis://h:1/0");
        assert_eq!(redact_url("user@host:1"), "host:1");
    }

    #[test]
    fn the_summary_names_engine_api_tokens_namespaces_and_doors_without_secrets() {
        let mut config: Config = toml::from_str(
            r#"
            [api]
            key = "api-k3y-secret"
            [auth]
            secret = "token-s3cret-token-s3cret-token-s3cret"
            allow_anonymous = false
            [engine]
            kind = "redis"
            [engine.redis]
            url = "redis://ops@redis.internal:6379/1"
            password = "redis-pa55"
            [channels.namespaces.chat]
            [channels.namespaces.ticker]
            [[pusher.apps]]
            id = "1"
            key = "k"
            secret = "pusher-s3cret"
            "#,
        )
        .expect("config");
        config.demo = false;
        let s = Summary::new(&config, "0.0.0.0:8080".parse().expect("addr"));
        let text = format!("{s:?}");
        for secret in ["api-k3y-secret", "token-s3cret", "redis-pa55", "pusher-s3cret", "ops@"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(s.engine, "redis");
        assert_eq!(s.redis.as_deref(), Some("redis://redis.internal:6379/1"));
        assert_eq!(s.api, "key required");
        assert_eq!(s.tokens, "HS256 with auth.secret, required");
        assert_eq!(s.namespaces, "chat,ticker");
        assert!(s.doors.contains("/app (pusher: 1 apps)"), "{}", s.doors);

        let s = Summary::new(&Config::default(), "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!((s.engine, s.redis, s.api), ("memory", None, "no key: loopback clients only"));
        assert_eq!(s.namespaces, "(default only)");
        assert_eq!(s.tokens, "none (anonymous clients only)");
    }
}
