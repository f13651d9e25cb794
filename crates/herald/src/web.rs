//! What a browser finds: the JS SDK at `/herald.js`, the demo pages under `/` (embedded at
//! compile time), `herald serve --demo`'s setup and ticker, and a close code instead of a dead
//! end for a WebSocket opened on a path that is not a WebSocket endpoint.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use herald_protocol::ErrorCode;
use http::{header, HeaderMap, HeaderValue, StatusCode};

use crate::config::{Config, NamespaceOptions};
use crate::http_error::ApiError;
use crate::node::Node;
use crate::ws::{self, CloseCode};

/// One embedded file with its validator, computed at compile time.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    etag: u64,
}

const fn asset(body: &'static [u8], content_type: &'static str) -> Asset {
    Asset { body, content_type, etag: fnv1a(body) }
}

/// FNV-1a over the bytes: a strong-enough validator for files that change only with the binary.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

const HTML: &str = "text/html; charset=utf-8";
static SDK: Asset = asset(include_bytes!("../../../clients/js/herald.js"), "text/javascript; charset=utf-8");
static INDEX: Asset = asset(include_bytes!("../../../web/index.html"), HTML);
static CHAT: Asset = asset(include_bytes!("../../../web/chat.html"), HTML);
static NOTIFICATIONS: Asset = asset(include_bytes!("../../../web/notifications.html"), HTML);
static TICKER: Asset = asset(include_bytes!("../../../web/ticker.html"), HTML);
static PLAIN: Asset = asset(include_bytes!("../../../web/plain.html"), HTML);
static STYLE: Asset = asset(include_bytes!("../../../web/style.css"), "text/css; charset=utf-8");
static DEMO_JS: Asset = asset(include_bytes!("../../../web/demo.js"), "text/javascript; charset=utf-8");

/// The browser-facing routes: `/herald.js` and `/` always; the demo pages and `/demo/token`
/// only under `herald serve --demo` (without it `/` says what the server is).
pub fn routes(node: &Node) -> Router<Arc<Node>> {
    // The SDK is public code: any origin may import it (`import { Herald } from
    // "http://herald:8080/herald.js"` from a page or dev server on another origin).
    let sdk = |h: HeaderMap| async move {
        let mut resp = serve(&SDK, &h);
        resp.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        resp
    };
    let r = Router::new().route("/herald.js", get(sdk));
    if !node.config().demo {
        return r.route("/", get(home));
    }
    r.route("/", get(index))
        .route("/demo/chat", get(|h: HeaderMap| async move { serve(&CHAT, &h) }))
        .route("/demo/notifications", get(|h: HeaderMap| async move { serve(&NOTIFICATIONS, &h) }))
        .route("/demo/ticker", get(|h: HeaderMap| async move { serve(&TICKER, &h) }))
        .route("/demo/plain", get(|h: HeaderMap| async move { serve(&PLAIN, &h) }))
        .route("/demo/style.css", get(|h: HeaderMap| async move { serve(&STYLE, &h) }))
        .route("/demo/demo.js", get(|h: HeaderMap| async move { serve(&DEMO_JS, &h) }))
        .route("/demo/token", get(demo_token))
}

/// `GET /` without `--demo`: what this server is, its version, its endpoints and where the
/// docs are. Nothing on it is secret: the same as `/api/info` minus the counts.
async fn home() -> Response {
    let version = crate::VERSION;
    let page = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Herald {version}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:44rem;margin:3rem auto;padding:0 1rem;color:#1d2330}}
code{{background:#eef1f6;padding:.1rem .3rem;border-radius:4px}}td{{padding:.2rem .8rem .2rem 0;vertical-align:top}}</style>
</head><body>
<h1>Herald {version}</h1>
<p>A real-time push server: clients keep a WebSocket (or an event stream) open, subscribe to
channels, and receive what a backend publishes.</p>
<table>
<tr><td><code>/connect</code></td><td>WebSocket, Herald's protocol (<code>herald.v1</code>); the JS SDK is at <a href="/herald.js"><code>/herald.js</code></a></td></tr>
<tr><td><code>/connection/websocket</code></td><td>WebSocket, Centrifugo's protocol</td></tr>
<tr><td><code>/app/&lt;key&gt;</code></td><td>WebSocket, Pusher protocol 7 (pusher-js, Laravel Echo)</td></tr>
<tr><td><code>/ws/&lt;channel&gt;</code>, <code>/sse/&lt;channel&gt;</code></td><td>one channel as raw WebSocket frames or Server-Sent Events</td></tr>
<tr><td><code>POST /api/&lt;method&gt;</code></td><td>the HTTP API for backends</td></tr>
<tr><td><code>/health</code>, <code>/ready</code>, <code>/metrics</code></td><td>liveness, readiness, Prometheus metrics</td></tr>
</table>
<p>The documentation is in the <code>docs/</code> folder of Herald's repository (start with
<code>README.md</code>). To try the demo pages (chat, notifications, a ticker), run
<code>herald serve --demo</code> on your own machine.</p>
</body></html>
"#
    );
    ([(header::CONTENT_TYPE, HTML), (header::CACHE_CONTROL, "no-cache")], page).into_response()
}

/// Answers `asset`, or 304 when the client already has this version. `no-cache` makes
/// browsers revalidate, so a new binary's SDK is picked up at once.
fn serve(asset: &Asset, headers: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], Bytes::from_static(asset.body)).into_response()
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `GET /`: the index of demos.
async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

/// Whether `headers` ask for a WebSocket.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Middleware: a WebSocket upgrade on any path but the WebSocket endpoints gets the 4504
/// close (instead of whatever that path answers a GET, which a browser never shows).
pub async fn websocket_gate(State(node): State<Arc<Node>>, req: Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path();
    let endpoint = path == "/connect"
        || path == "/connection/websocket"
        || (path.starts_with("/ws/") && path.len() > "/ws/".len())
        || path.starts_with("/app/")
        || (path == "/_echo" && node.config().testing.echo);
    if is_upgrade(req.headers()) && !endpoint {
        return not_an_endpoint(&node, req);
    }
    next.run(req).await
}

/// Accepts a WebSocket on a path that is not an endpoint and closes it at once with 4504 and
/// a reason naming the endpoints: browsers show a close reason, never a 404 body.
pub fn not_an_endpoint(node: &Node, req: Request) -> Response {
    metrics::counter!("herald_wrong_endpoint_total").increment(1);
    let peer = crate::doors::raw::peer_of(&req).map(|p| p.to_string());
    let path: String = req.uri().path().chars().take(200).collect();
    crate::ratelog::refusal!(
        info,
        crate::ratelog::Kind::WrongEndpoint,
        peer = peer.as_deref().unwrap_or(""),
        path,
        "WebSocket on a path that is not an endpoint: closed with 4504"
    );
    let code = herald_protocol::CloseCode::NotAnEndpoint;
    ws::upgrade(req, &node.ws, node.ws_settings(), &[], move |mut socket| async move {
        socket.close(CloseCode(code.as_u16()), code.reason());
        while let Ok(Some(_)) = socket.recv().await {}
    })
}

/// The namespaces the demo pages use, as a user would write them in `herald.toml`.
const DEMO_NAMESPACES: &str = r#"
[chat]
publish = true
presence = true
join_leave = true
history_size = 1000
history_ttl = "10m"

[ticker]
publish = false
history_size = 600
history_ttl = "2m"
"#;

/// The channel the demo ticker publishes to.
pub const TICKER_CHANNEL: &str = "ticker:prices";

/// Why `--demo` could not set Herald up.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the demo namespaces do not parse: {0}")]
    Namespaces(#[from] toml::de::Error),
    #[error(
        "--demo serves /demo/token, which mints a token for any user: it listens only on loopback \
         (e.g. --listen 127.0.0.1:8080), not on {0}"
    )]
    NotLoopback(String),
}

/// What `herald serve --demo` changes: the demo namespaces (`chat`, `ticker`) where the
/// configuration has none of that name, and a development HMAC secret for this run when
/// none is configured (so `/demo/token` can mint tokens). Production defaults stay as they are.
/// Refused unless Herald listens on a loopback address. Returns whether a secret was generated.
pub fn apply_demo(config: &mut Config) -> Result<bool, DemoError> {
    // `listen` may be a host name: every address it resolves to must be loopback (one that
    // does not resolve is refused here too; `serve` would fail to bind it anyway).
    let loopback = std::net::ToSocketAddrs::to_socket_addrs(config.listen.as_str())
        .map(|mut addrs| addrs.all(|a| a.ip().is_loopback()))
        .unwrap_or(false);
    if !loopback {
        return Err(DemoError::NotLoopback(config.listen.clone()));
    }
    config.demo = true;
    let namespaces: std::collections::BTreeMap<String, NamespaceOptions> = toml::from_str(DEMO_NAMESPACES)?;
    for (name, options) in namespaces {
        config.channels.namespaces.entry(name).or_insert(options);
    }
    if config.auth.algorithm.is_hmac() && config.auth.secret.is_empty() {
        use rand::Rng as _;
        let bytes: [u8; 48] = rand::rng().random();
        use base64::Engine as _;
        config.auth.secret = crate::config::Secret::new(base64::engine::general_purpose::STANDARD.encode(bytes));
        return Ok(true);
    }
    Ok(false)
}

/// Longest user id `/demo/token` mints a token for.
const MAX_DEMO_USER: usize = 32;

/// `GET /demo/token?user=<id>` (only under `--demo`): a one-hour connection token for `user`,
/// with `{"name": user}` as connection info.
async fn demo_token(State(node): State<Arc<Node>>, req: Request) -> Response {
    let user = req.uri().query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("user=")).unwrap_or("");
    let valid = !user.is_empty()
        && user.len() <= MAX_DEMO_USER
        && user.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !valid {
        return ApiError::bad_request(format!("`user` must be 1 to {MAX_DEMO_USER} letters, digits, `_`, `-` or `.`"))
            .into_response();
    }
    let info = serde_json::json!({ "name": user });
    match crate::auth::mint(&node.config().auth, user, Duration::from_secs(3600), Some(info)) {
        Ok(token) => axum::Json(serde_json::json!({ "user": user, "token": token })).into_response(),
        Err(e) => ApiError::new(ErrorCode::NotAvailable, format!("no demo token: {e}")).into_response(),
    }
}

/// Publishes made-up prices to [`TICKER_CHANNEL`] four times a second until `stop`, for the
/// ticker demo. Runs only under `herald serve --demo`.
pub async fn run_ticker(node: Arc<Node>, stop: tokio_util::sync::CancellationToken) {
    let config = node.config();
    let Ok((channel, ns)) = config.channels.resolve(TICKER_CHANNEL) else {
        tracing::warn!(channel = TICKER_CHANNEL, "demo ticker not started: its namespace is not configured");
        return;
    };
    let ns = ns.clone();
    let mut prices = [("HRLD", 142.10), ("WSKT", 87.45), ("SSEV", 23.90), ("PUSH", 310.00), ("JWTK", 56.25)];
    let opens: Vec<f64> = prices.iter().map(|p| p.1).collect();
    let mut every = tokio::time::interval(Duration::from_millis(250));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => return,
        }
        let quotes: Vec<serde_json::Value> = {
            use rand::Rng as _;
            let mut rng = rand::rng();
            prices
                .iter_mut()
                .zip(&opens)
                .map(|((symbol, price), open)| {
                    // A random walk that drifts back towards the opening price.
                    let step = rng.random_range(-0.004..0.004) + (open - *price) / open * 0.02;
                    *price = (*price * (1.0 + step)).max(0.01);
                    let change = (*price - open) / open * 100.0;
                    serde_json::json!({
                        "symbol": symbol,
                        "price": (*price * 100.0).round() / 100.0,
                        "change": (change * 100.0).round() / 100.0,
                    })
                })
                .collect()
        };
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let data = serde_json::json!({ "time": ms as u64, "quotes": quotes });
        if let Err(e) = node.publish(&channel, &ns, crate::engine::Publish::data(Bytes::from(data.to_string()))).await {
            tracing::warn!(error = %e, "demo ticker: publish failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_setup_adds_namespaces_and_a_secret_without_overriding_the_user() {
        let mut config = Config::default();
        config
            .channels
            .namespaces
            .insert("chat".into(), NamespaceOptions { publish: false.into(), ..Default::default() });
        assert!(apply_demo(&mut config).expect("demo"));
        assert!(config.demo);
        assert_eq!(config.channels.namespaces["chat"].publish, false.into(), "the user's own `chat` namespace is kept");
        assert!(config.channels.resolve(TICKER_CHANNEL).is_ok());
        assert!(config.auth.secret.expose().len() >= 32);
        assert!(config.validate().is_ok());
        let mut public = Config { listen: "0.0.0.0:8080".into(), ..Default::default() };
        assert!(matches!(apply_demo(&mut public), Err(DemoError::NotLoopback(_))));
        assert!(!public.demo);
        let defaults = Config::default();
        assert!(!defaults.demo && defaults.channels.namespaces.is_empty() && defaults.auth.secret.is_empty());
    }

    #[test]
    fn validators_change_with_the_content() {
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        assert_eq!(SDK.etag, fnv1a(SDK.body));
    }
}
