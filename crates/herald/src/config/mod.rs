//! The one typed configuration: defaults, then a TOML file, then `HERALD_*` environment
//! variables, then command-line flags. Unknown keys in the file are errors; unknown `HERALD_*`
//! variables are warnings (see [`load`]). The doc comments on these
//! fields are the user documentation: `docs/configuration.md` and
//! `config/herald.example.toml` are generated from them and checked by a test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use crate::channel::{ChannelsConfig, Conflation, NamespaceOptions};
pub use crate::engine::redis::RedisConfig;
pub use crate::secret::Secret;
use crate::ws;

/// Herald's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address and port to listen on: `host:port`, where host is an IP address or a name
    /// resolved at start-up (`localhost:8080`). Use `0.0.0.0:8080` to accept connections from
    /// other machines (then read docs/security.md, "Before exposing Herald").
    pub listen: String,
    /// On SIGTERM or Ctrl-C, how long to wait for clients to close after they were sent
    /// close 1001 ("going away"), before exiting anyway.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub drain_timeout: Duration,
    /// On SIGTERM or Ctrl-C, each WebSocket is closed with 1001 at a random point of this
    /// window (and SSE streams end likewise), and the close tells the client to wait a random
    /// part of it again before reconnecting (`reconnect_in=<ms>`, see docs/protocol.md). So the
    /// clients of a drained node do not all reconnect at the same moment. `0s` closes all at
    /// once. A spread longer than `drain_timeout` is cut to it (so lowering `drain_timeout`
    /// alone never makes the configuration invalid).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub drain_spread: Duration,
    /// Logging.
    pub log: LogConfig,
    /// Limits on what clients can make the server hold: connections, commands, channels,
    /// history.
    pub limits: LimitsConfig,
    /// Channels: limits, and what each namespace allows.
    pub channels: ChannelsConfig,
    /// Connection tokens (JWT): who the user is.
    pub auth: crate::auth::AuthConfig,
    /// The HTTP API for backends (`POST /api/...`).
    pub api: ApiConfig,
    /// WebSocket limits, timings and compression.
    pub websocket: ws::Settings,
    /// Where channels, history and presence live: this node's memory, or a Redis shared by
    /// several nodes.
    pub engine: EngineConfig,
    /// HTTP: which web origins may use Herald from a browser, and request limits.
    pub http: HttpConfig,
    /// TLS: serve `wss://` and `https://` on the listening port.
    pub tls: crate::tls::TlsConfig,
    /// Pusher Channels compatibility: apps for pusher-js / Laravel Echo on `/app/<key>` and the
    /// Pusher HTTP API on `/apps/<id>/...`.
    pub pusher: crate::doors::pusher::PusherConfig,
    /// Endpoints for testing Herald itself. Keep them off in production.
    pub testing: TestingConfig,
    /// Lifecycle webhooks: channel occupied/vacated, members added/removed, client events,
    /// connects and disconnects, POSTed to your endpoints. See docs/webhooks.md.
    pub webhooks: crate::webhooks::WebhooksConfig,
    /// Set by `herald serve --demo` only (never from a file or the environment): serve
    /// `/demo/token` and run the demo ticker. See `web::apply_demo`.
    #[serde(skip)]
    pub demo: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            drain_timeout: Duration::from_secs(10),
            drain_spread: Duration::from_secs(5),
            log: LogConfig::default(),
            limits: LimitsConfig::default(),
            channels: ChannelsConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            api: ApiConfig::default(),
            websocket: ws::Settings::default(),
            engine: EngineConfig::default(),
            http: HttpConfig::default(),
            tls: crate::tls::TlsConfig::default(),
            pusher: crate::doors::pusher::PusherConfig::default(),
            testing: TestingConfig::default(),
            webhooks: crate::webhooks::WebhooksConfig::default(),
            demo: false,
        }
    }
}

/// Logging (`[log]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`) or a tracing directive
    /// such as `herald=debug,info`. `RUST_LOG`, when set, takes precedence.
    pub level: String,
    /// `text` for people, `json` for log collectors (one object per line).
    pub format: LogFormat,
    /// Most log lines per second for each kind of refusal (refused tokens, origins, API keys,
    /// limits hit, slow consumers, wrong endpoints); the rest are counted and said on the
    /// next line of that kind (`suppressed`). 0 logs no refusal. Metrics count every one.
    pub refusals_per_second: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text, refusals_per_second: crate::ratelog::DEFAULT_PER_SECOND }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Limits (`[limits]`): see `docs/security.md#limits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most TCP connections open at once (WebSocket and HTTP). Further connections are closed
    /// as soon as they are accepted. Keep it below the process's open-file limit.
    pub max_connections: usize,
    /// Most TCP connections open at once from one IP address.
    pub max_connections_per_ip: usize,
    /// Most native-protocol connections one user (the `sub` of a connection token) may have
    /// open at once. A `connect` beyond it gets error 106 and the connection is closed with
    /// 4501. Anonymous connections are bounded by `max_connections_per_ip` instead.
    pub max_connections_per_user: usize,
    /// Commands a connection may send per second, on average (every frame counts, pongs
    /// included). Beyond it a command gets error 115 ("slow down") and is not carried out.
    pub commands_per_second: u32,
    /// Commands a connection may send in a burst above `commands_per_second`.
    pub commands_burst: u32,
    /// Publications a connection may make per second, on average (the HTTP API is not
    /// limited). Beyond it a `publish` gets error 115.
    pub publications_per_second: u32,
    /// Publications a connection may make in a burst above `publications_per_second`.
    pub publications_burst: u32,
    /// Refused commands (error 115) a connection may collect within 10 seconds; one more and
    /// it is closed with 4006.
    pub max_refusals: u32,
    /// Most channels this node keeps a stream (position and history) for. A publication that
    /// would start a new channel beyond it is refused with error 116 (HTTP 429); channels
    /// already known go on. Idle channels are forgotten after their history TTL, freeing room.
    pub max_channels: usize,
    /// Most bytes of publication data kept in history on this node, over all channels. A
    /// publication that would store more is refused with error 116 (HTTP 429) until older
    /// history expires; channels without history are not affected.
    pub max_history_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            max_connections_per_user: 100,
            commands_per_second: 100,
            commands_burst: 200,
            publications_per_second: 50,
            publications_burst: 100,
            max_refusals: 100,
            max_channels: 100_000,
            max_history_bytes: 256 << 20,
        }
    }
}

/// HTTP (`[http]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Web origins whose pages may use Herald from a browser: WebSocket handshakes
    /// (`/connect`, `/ws/<channel>`) and `GET /sse/<channel>` from other origins get 403 (code
    /// 120), and SSE answers CORS for these. Entries are exact (`https://app.example.com`),
    /// wildcards for subdomains (`https://*.example.com`), or `*` for every origin (the
    /// default, for development: set your sites before exposing Herald). Requests without an
    /// `Origin` header (servers, command-line clients) are not affected. The HTTP API also
    /// accepts browser requests (with a key) from these origins and answers their CORS
    /// preflights; requests from other origins get 403.
    pub allowed_origins: Vec<String>,
    /// Largest request head (request line and headers), in bytes, at least 8192. A larger one
    /// gets 431 and the connection is closed.
    pub max_header_size: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { allowed_origins: vec!["*".into()], max_header_size: 16 << 10 }
    }
}

/// The HTTP API (`[api]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// The key backends send as `Authorization: apikey <key>`. When empty, the API answers
    /// only requests from loopback addresses (127.0.0.0/8, ::1), and says so at start. Behind a
    /// reverse proxy on the same host every request comes from loopback: set a key.
    /// Prefer setting it through `HERALD_API__KEY` rather than in a file. `Authorization:
    /// Bearer <key>` is accepted too.
    #[schemars(with = "String")]
    pub key: Secret,
    /// More keys accepted beside `key`, for rotation: add the new key here, move backends
    /// over, then remove the old one. E.g. `HERALD_API__KEYS='["k1","k2"]'`.
    #[schemars(with = "Vec<String>")]
    pub keys: Vec<Secret>,
    /// Largest request body, in bytes. A request whose `Content-Length` is larger gets 413
    /// before its body is read; a body that grows larger is cut off with 413.
    pub max_body_size: usize,
    /// Time allowed for a request's whole body to arrive after its headers. A body that never
    /// comes or trickles in gets 408 (code 121) and the connection is closed.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub body_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { key: Secret::default(), keys: Vec::new(), max_body_size: 1 << 20, body_timeout: Duration::from_secs(10) }
    }
}

impl ApiConfig {
    /// Whether any API key is configured.
    pub fn has_key(&self) -> bool {
        !self.key.is_empty() || self.keys.iter().any(|k| !k.is_empty())
    }
}

/// Keys whose values `check-config` must not print.
const SECRET_KEYS: &[&str] =
    &["api.key", "api.keys", "auth.secret", "engine.redis.password", "pusher.apps", "webhooks.endpoints"];

/// The engine (`[engine]`): see `docs/operations.md#running-several-nodes-with-redis`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// `memory`: one node keeps everything in its own memory (lost on restart). `redis`:
    /// several nodes share publications, history and presence through the Redis at
    /// `engine.redis.url`, so a client may connect to any of them.
    pub kind: EngineKind,
    /// The Redis engine's settings (used when `kind = "redis"`).
    pub redis: RedisConfig,
}

/// Which engine a node uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Memory,
    Redis,
}

/// Test endpoints (`[testing]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TestingConfig {
    /// Serve `/_echo`: a WebSocket endpoint that sends every message back, with limits large
    /// enough for the Autobahn|Testsuite (64 MiB messages). For conformance runs only.
    pub echo: bool,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a `#[source]`: the message already says everything, once.
    #[error("{}", describe_errors(.0))]
    Load(Box<figment::Error>),
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl From<Box<figment::Error>> for ConfigError {
    fn from(e: Box<figment::Error>) -> Self {
        Self::Load(e)
    }
}

/// Values given as command-line flags; they override every other source.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// A loaded configuration and where each value came from.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    figment: Figment,
    /// `HERALD_*` environment variables that set nothing, each with a hint: print them once
    /// logging is up (`serve`) or on stderr (`check-config`).
    pub warnings: Vec<String>,
    /// The `HERALD_*` environment variables that set something, by name (for the start-up
    /// summary; their values may be secrets).
    pub env: Vec<String>,
}

/// Loads the configuration from the sources in order of precedence (lowest first): defaults,
/// the TOML file, `HERALD_*` environment variables (`__` separates sections, e.g.
/// `HERALD_WEBSOCKET__MAX_FRAME_SIZE`), flags.
///
/// A `HERALD_*` variable that names no setting is not an error (Kubernetes alone injects
/// several, see [`is_ignored_env`]): it is left out, with a warning in [`Loaded::warnings`].
/// Unknown keys in the file stay errors, as do bad values of known variables.
pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Loaded, ConfigError> {
    let names: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.get(..ENV_PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(ENV_PREFIX)))
        .map(|k| k[ENV_PREFIX.len()..].to_owned())
        .collect();
    let (unknown, warnings) = unknown_env(&names);
    let used = names.iter().filter(|n| !unknown.contains(n)).map(|n| format!("{ENV_PREFIX}{n}")).collect();
    let env = Env::prefixed(ENV_PREFIX).filter(move |k| !unknown.iter().any(|u| k == u.as_str())).split("__");
    let mut loaded = load_from(file, overrides, env)?;
    loaded.warnings = warnings;
    loaded.env = used;
    Ok(loaded)
}

const ENV_PREFIX: &str = "HERALD_";

/// Variables (named without the `HERALD_` prefix) that are not Herald settings and are left
/// out silently: the service links Kubernetes injects into every pod of a namespace with a
/// Service named `herald` (`HERALD_PORT`, `HERALD_SERVICE_HOST`, `HERALD_SERVICE_PORT*`,
/// `HERALD_PORT_8080_TCP*`), and `HERALD_BIN` (the test harness's path to the binary).
pub fn is_ignored_env(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    if name == "PORT" || name == "BIN" || name.starts_with("SERVICE_") {
        return true;
    }
    let Some(rest) = name.strip_prefix("PORT_") else { return false };
    let Some((port, rest)) = rest.split_once('_') else { return false };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let proto = rest.split_once('_').map_or(rest, |(p, _)| p);
    let suffix = &rest[proto.len()..];
    matches!(proto, "TCP" | "UDP" | "SCTP") && matches!(suffix, "" | "_ADDR" | "_PORT" | "_PROTO")
}

/// Of the given variable names (without the prefix), those that set no configuration key
/// (to leave out), and a warning for each one that is not ignored silently.
fn unknown_env(names: &[String]) -> (Vec<String>, Vec<String>) {
    let mut unknown = Vec::new();
    let mut warnings = Vec::new();
    for name in names {
        if is_ignored_env(name) {
            unknown.push(name.clone());
            continue;
        }
        // Extract with this variable alone: an unknown field means it names no setting. A bad
        // value of a real setting is left in, for `load_from` to report.
        let only = name.clone();
        let env = Env::prefixed(ENV_PREFIX).filter(move |k| k == only.as_str()).split("__");
        let probe = Figment::from(Serialized::defaults(Config::default())).merge(env);
        let names_nothing = match probe.extract::<Config>() {
            Ok(_) => false,
            Err(e) => e.into_iter().any(|e| matches!(e.kind, figment::error::Kind::UnknownField(..))),
        };
        if names_nothing {
            unknown.push(name.clone());
            let full = format!("{ENV_PREFIX}{name}");
            let mut warning = format!("environment variable {full} is not a Herald setting; ignored");
            if let Some(hint) = suggest_env(&full) {
                warning.push_str(&format!(" (did you mean {hint}?)"));
            }
            warnings.push(warning);
        }
    }
    (unknown, warnings)
}

/// The setting a mistyped variable probably meant: the same name with `__` where `_` was
/// written (or the other way), or one a few edits away.
fn suggest_env(full: &str) -> Option<String> {
    let value = serde_json::to_value(Config::default()).ok()?;
    let mut leaves = Vec::new();
    flatten("", &value, &mut leaves);
    let wanted = full.to_ascii_uppercase();
    let squash = |s: &str| s.replace('_', "");
    let candidates: Vec<String> = leaves.iter().map(|(k, _)| docs::env_name(k)).collect();
    if let Some(c) = candidates.iter().find(|c| squash(c) == squash(&wanted)) {
        return Some(c.clone());
    }
    candidates
        .into_iter()
        .map(|c| (edit_distance(&c, &wanted), c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, by bytes (variable names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn load_from(file: Option<&Path>, overrides: &Overrides, env: Env) -> Result<Loaded, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.to_owned()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(env);
    if let Some(listen) = &overrides.listen {
        figment = figment.merge(Flag("listen", listen.clone()));
    }
    if let Some(cert) = &overrides.tls_cert {
        figment = figment.merge(Flag("tls.cert", cert.display().to_string()));
    }
    if let Some(key) = &overrides.tls_key {
        figment = figment.merge(Flag("tls.key", key.display().to_string()));
    }
    let config: Config = figment.extract().map_err(Box::new)?;
    config.validate()?;
    Ok(Loaded { config, figment, warnings: Vec::new(), env: Vec::new() })
}

/// A command-line flag as a figment provider, so `check-config` can name it as the source.
struct Flag(&'static str, String);

impl figment::Provider for Flag {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("command-line flag")
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let dict = match figment::util::nest(self.0, self.1.clone().into()) {
            figment::value::Value::Dict(_, d) => d,
            _ => figment::value::Dict::new(),
        };
        Ok(figment::Profile::Default.collect(dict))
    }
}

impl Config {
    /// Checks what types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ws = &self.websocket;
        let check = |ok: bool, key: &'static str, message: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid { key, message: message.into() })
            }
        };
        check(ws.max_frame_size >= 125, "websocket.max_frame_size", "must be at least 125 bytes")?;
        check(
            ws.max_message_size >= ws.max_frame_size,
            "websocket.max_message_size",
            "must be at least max_frame_size",
        )?;
        check(ws.max_fragments >= 1, "websocket.max_fragments", "must be at least 1")?;
        check(ws.max_queue_bytes >= 1024, "websocket.max_queue_bytes", "must be at least 1024 bytes")?;
        for (key, d) in [
            ("websocket.handshake_timeout", ws.handshake_timeout),
            ("websocket.ping_interval", ws.ping_interval),
            ("websocket.pong_timeout", ws.pong_timeout),
            ("websocket.close_timeout", ws.close_timeout),
        ] {
            check(!d.is_zero(), key, "must be greater than zero")?;
        }
        check(ws.compression.level <= 9, "websocket.compression.level", "must be between 0 and 9")?;
        check(self.channels.max_channel_length >= 1, "channels.max_channel_length", "must be at least 1")?;
        check(
            self.channels.max_publication_size < ws.max_message_size,
            "channels.max_publication_size",
            "must be smaller than websocket.max_message_size (a publish command carries the data plus its envelope)",
        )?;
        for ns in self.channels.namespaces.keys() {
            let ok = !ns.is_empty() && ns.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            check(ok, "channels.namespaces", &format!("`{ns}` is not a namespace name (letters, digits, _ and -)"))?;
        }
        for (name, ns) in std::iter::once(("default", &self.channels.default))
            .chain(self.channels.namespaces.iter().map(|(k, v)| (k.as_str(), v)))
        {
            let ok = ns.conflation == crate::channel::Conflation::None || ns.max_rate > 0;
            check(ok, "channels.conflation", &format!("`{name}`: conflation = \"latest\" needs max_rate > 0"))?;
        }
        self.auth.validate().map_err(|e| match e {
            crate::auth::AuthError::BadKey { key, message } => ConfigError::Invalid { key, message },
            other => ConfigError::Invalid { key: "auth", message: other.to_string() },
        })?;
        check(self.api.max_body_size >= 1024, "api.max_body_size", "must be at least 1024 bytes")?;
        check(!self.api.body_timeout.is_zero(), "api.body_timeout", "must be greater than zero")?;
        check(self.http.max_header_size >= 8192, "http.max_header_size", "must be at least 8192 bytes")?;
        for o in &self.http.allowed_origins {
            crate::origin::check_entry(o)
                .map_err(|message| ConfigError::Invalid { key: "http.allowed_origins", message })?;
        }
        check_listen(&self.listen)?;
        check(self.limits.max_connections >= 1, "limits.max_connections", "must be at least 1")?;
        check(self.limits.max_connections_per_ip >= 1, "limits.max_connections_per_ip", "must be at least 1")?;
        let l = &self.limits;
        check(l.max_connections_per_user >= 1, "limits.max_connections_per_user", "must be at least 1")?;
        check(l.commands_per_second >= 1, "limits.commands_per_second", "must be at least 1")?;
        check(l.commands_burst >= 1, "limits.commands_burst", "must be at least 1")?;
        check(l.publications_per_second >= 1, "limits.publications_per_second", "must be at least 1")?;
        check(l.publications_burst >= 1, "limits.publications_burst", "must be at least 1")?;
        check(l.max_channels >= 1, "limits.max_channels", "must be at least 1")?;
        if self.engine.kind == EngineKind::Redis {
            let r = &self.engine.redis;
            check(cfg!(feature = "redis"), "engine.kind", "this build has no Redis engine (cargo feature `redis`)")?;
            check(!r.timeout.is_zero(), "engine.redis.timeout", "must be greater than zero")?;
            check(r.max_link_bytes >= 64 << 10, "engine.redis.max_link_bytes", "must be at least 65536 bytes")?;
            let ok = !r.prefix.is_empty()
                && r.prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
            check(ok, "engine.redis.prefix", "must be letters, digits, _ - . or : (it goes inside Redis hash tags)")?;
            let rest = r.url.strip_prefix("redis://").or_else(|| r.url.strip_prefix("rediss://"));
            check(rest.is_some(), "engine.redis.url", "must start with redis:// or rediss:// (TLS)")?;
            let tls = r.url.starts_with("rediss://");
            for (key, path) in [
                ("engine.redis.tls_ca", &r.tls_ca),
                ("engine.redis.tls_cert", &r.tls_cert),
                ("engine.redis.tls_key", &r.tls_key),
            ] {
                check(
                    tls || path.as_os_str().is_empty(),
                    key,
                    "is for TLS: engine.redis.url must start with rediss://",
                )?;
                if let (false, Err(e)) = (path.as_os_str().is_empty(), std::fs::File::open(path)) {
                    return Err(ConfigError::Invalid { key, message: format!("cannot read {}: {e}", path.display()) });
                }
            }
            check(
                r.tls_cert.as_os_str().is_empty() == r.tls_key.as_os_str().is_empty(),
                "engine.redis.tls_cert",
                "must be set together with engine.redis.tls_key",
            )?;
            let userinfo = rest.unwrap_or("").split(['/', '?']).next().unwrap_or("").rsplit_once('@');
            check(
                !userinfo.is_some_and(|(u, _)| u.contains(':')),
                "engine.redis.url",
                "has a password: put it in engine.redis.password (HERALD_ENGINE__REDIS__PASSWORD) instead",
            )?;
            #[cfg(feature = "redis")]
            if let Err((key, message)) = r.check_tls_files() {
                return Err(ConfigError::Invalid { key, message });
            }
            #[cfg(feature = "redis")]
            if let Err(e) = r.client() {
                return Err(ConfigError::Invalid { key: "engine.redis.url", message: e.to_string() });
            }
        }
        self.pusher.validate(&self.channels).map_err(|message| ConfigError::Invalid { key: "pusher", message })?;
        self.webhooks.validate().map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        check_log_filter(&self.log.level)
    }
}

/// `host:port` (an IPv6 address in brackets: `[::1]:8080`); the host is resolved at start-up.
fn check_listen(listen: &str) -> Result<(), ConfigError> {
    let bad = |message: String| Err(ConfigError::Invalid { key: "listen", message });
    if listen.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    match listen.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') && port.parse::<u16>().is_ok() => Ok(()),
        _ => bad(format!("`{listen}` is not host:port (e.g. 127.0.0.1:8080, localhost:8080, [::1]:8080)")),
    }
}

fn check_log_filter(level: &str) -> Result<(), ConfigError> {
    // EnvFilter reads a bare word as a target name; here a bare word must be a level.
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    if let Some(word) = level
        .split(',')
        .map(str::trim)
        .find(|d| !d.contains(['=', '[', ':']) && !LEVELS.contains(&d.to_ascii_lowercase().as_str()))
    {
        let message = format!("`{word}` is not a level (one of {})", LEVELS.join(", "));
        return Err(ConfigError::Invalid { key: "log.level", message });
    }
    match tracing_subscriber::EnvFilter::try_new(level) {
        Ok(_) if !level.trim().is_empty() => Ok(()),
        Ok(_) => Err(ConfigError::Invalid { key: "log.level", message: "must not be empty".into() }),
        Err(e) => Err(ConfigError::Invalid { key: "log.level", message: format!("`{level}`: {e}") }),
    }
}

impl Loaded {
    /// The effective configuration as TOML, each value followed by where it came from.
    pub fn explain(&self) -> String {
        let value = serde_json::to_value(&self.config).unwrap_or_default();
        let mut leaves = Vec::new();
        flatten("", &value, &mut leaves);
        let mut out = String::new();
        for (key, v) in leaves {
            let literal = shown(&key, &v);
            let source = match self.figment.find_metadata(&key) {
                Some(m) => describe_source(m, &key),
                None => "default".into(),
            };
            out.push_str(&format!("{key} = {literal}  # {source}\n"));
        }
        out
    }
}

/// The value at `key` as a TOML literal, or `"<redacted>"` for each secret in it.
pub(crate) fn shown(key: &str, v: &serde_json::Value) -> String {
    match v {
        _ if !SECRET_KEYS.contains(&key) => toml_literal(v),
        serde_json::Value::String(s) if !s.is_empty() => "\"<redacted>\"".to_owned(),
        serde_json::Value::Array(a) => {
            format!("[{}]", a.iter().map(|_| "\"<redacted>\"").collect::<Vec<_>>().join(", "))
        }
        _ => toml_literal(v),
    }
}

/// One line per problem: the key, what is wrong, and which source said it.
fn describe_errors(err: &figment::Error) -> String {
    let lines: Vec<String> = err
        .clone()
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = e.metadata.as_ref().map(|m| describe_source(m, &key));
            let kind = describe_kind(&key, &e.kind);
            match (key.is_empty(), source) {
                (false, Some(src)) => format!("`{key}`: {kind} (from {src})"),
                (false, None) => format!("`{key}`: {kind}"),
                (true, Some(src)) => format!("{kind} (from {src})"),
                (true, None) => kind,
            }
        })
        .collect();
    lines.join("\n")
}

/// What is wrong with a value; for a secret, without the value (serde's messages quote it).
fn describe_kind(key: &str, kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    let secret = SECRET_KEYS.iter().any(|s| key == *s || key.strip_prefix(s).is_some_and(|rest| rest.starts_with('.')));
    if !secret {
        return kind.to_string();
    }
    match kind {
        Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) => {
            format!("invalid value, expected {expected} (not shown: it is a secret)")
        }
        Kind::InvalidLength(..) | Kind::MissingField(_) | Kind::UnknownField(..) | Kind::DuplicateField(_) => {
            kind.to_string()
        }
        _ => "invalid value (not shown: it is a secret)".into(),
    }
}

fn describe_source(m: &figment::Metadata, key: &str) -> String {
    if m.name.contains("environment") {
        return format!("environment variable {}", docs::env_name(key));
    }
    match &m.source {
        Some(figment::Source::File(p)) => format!("file {}", p.display()),
        _ if m.name == std::any::type_name::<Config>() => "default".into(),
        _ => m.name.to_string(),
    }
}

/// Dotted keys to leaf values, in declaration order.
pub(crate) fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, child, out);
            }
        }
        _ => out.push((prefix.to_owned(), v.clone())),
    }
}

/// A JSON scalar written as a TOML literal.
pub(crate) fn toml_literal(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

pub mod docs;
#[cfg(test)]
mod tests;
