//! The server: one listener (plain TCP, or TLS), a SIGHUP handler that reloads,
//! HTTP/1.1 with upgrades, the routes, origin checks, connection and request limits, and a
//! graceful shutdown that closes every WebSocket with 1001 and drains within a deadline.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::Config;
use crate::doors::{api, raw as transport};
use crate::http_error::ApiError;
use crate::node::Node;
use crate::origin;
use crate::origin::{OriginPolicy, Origins, Secure};
use crate::tls::Tls;
use crate::ws::{self, AcceptedAt, Message, WsContext};

/// Runs Herald on `listener` until `shutdown` resolves, then closes every WebSocket with 1001
/// and waits up to `drain_timeout` for connections to finish. Fails at once (before serving
/// anything) when the TLS files cannot be loaded; the error names the file.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    run_with_reload(config, listener, shutdown, None).await
}

/// [`run`], with `reload` to read the configuration again on SIGHUP and apply it (`herald
/// serve` passes the same loader it started with). Without it SIGHUP still reloads the TLS
/// certificate and never ends the process.
pub async fn run_with_reload(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    reload: Option<Reload>,
) -> std::io::Result<()> {
    let tls = Tls::load(&config.tls).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let prometheus = crate::metrics::install();
    let config = Arc::new(config);
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ws = WsContext {
        shutdown: stop.clone(),
        drain_spread: config.drain_spread.min(config.drain_timeout),
        tracker: tracker.clone(),
        metrics: ws::WsMetrics::new(),
    };
    let node = Arc::new(Node::new(config.clone(), ws, prometheus));
    let app = router(node.clone());
    node.webhooks().name_pusher_apps(&config.pusher.apps);
    node.webhooks().start();
    tokio::spawn({
        // Forget idle channels and expired presence, until shutdown.
        let (node, stop, config) = (node.clone(), stop.clone(), config.clone());
        async move {
            // Often enough that a dead node's presence leaves soon after it expires.
            let period = config.websocket.ping_interval.clamp(Duration::from_millis(100), Duration::from_secs(10));
            let mut every = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        node.sweep().await;
                    }
                    () = stop.cancelled() => break,
                }
            }
        }
    });
    if config.demo {
        tokio::spawn(crate::web::run_ticker(node.clone(), stop.clone()));
    }
    let limits = Arc::new(ConnLimits::default());

    let addr = listener.local_addr()?;
    crate::ratelog::set_limit(config.log.refusals_per_second);
    crate::startup::log_listening(&config, addr, tls.is_some());
    for warning in exposure_warnings(&config, addr.ip()) {
        tracing::warn!("{warning}");
    }
    spawn_hangup(node.clone(), tls.clone(), reload.map(Arc::new), stop.clone());
    let conn = Arc::new(ConnSettings { node: node.clone(), secure: tls.is_some() });
    drop(config);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let current = node.config();
                    let Some(guard) = limits.admit(peer.ip(), &current.limits) else { continue };
                    let _ = stream.set_nodelay(true);
                    let (app, conn, stop) = (app.clone(), conn.clone(), stop.clone());
                    match &tls {
                        None => {
                            tracker.spawn(serve_connection(stream, peer, guard, app, conn, stop));
                        }
                        Some(tls) => {
                            let acceptor = tls.acceptor().clone();
                            let timeout = current.websocket.handshake_timeout;
                            tracker.spawn(async move {
                                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                                    Ok(Ok(stream)) => serve_connection(stream, peer, guard, app, conn, stop).await,
                                    Ok(Err(e)) => {
                                        metrics::counter!("herald_tls_handshake_failures_total").increment(1);
                                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    }
                                    Err(_) => {
                                        metrics::counter!("herald_tls_handshake_failures_total").increment(1);
                                        tracing::debug!(%peer, "TLS handshake timed out");
                                    }
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors or a transient network error: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }

    drop(listener);
    node.set_ready(false);
    let open = tracker.len();
    let drain_timeout = node.config().drain_timeout;
    tracing::info!(connections = open, ?drain_timeout, "shutting down: closing connections");
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(drain_timeout, tracker.wait()).await.is_err() {
        tracing::warn!(left = tracker.len(), "drain timeout reached; dropping remaining connections");
    }
    // After the sessions ended, so their `disconnect` and `member_removed` events go too.
    node.webhooks().shutdown().await;
    Ok(())
}

fn router(node: Arc<Node>) -> Router {
    let api = Router::new()
        .route("/api/{method}", any(api::dispatch))
        .route("/centrifugo/api/{method}", any(crate::doors::centrifugo::api))
        .layer(axum::middleware::from_fn_with_state(node.clone(), origin::api_layer))
        .layer(axum::middleware::from_fn(api::log_request));
    let mut r = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/connect", any(transport::connect))
        .route("/connection/websocket", any(transport::centrifugo))
        .route("/ws/{*channel}", any(transport::raw_ws))
        .route("/sse/{*channel}", get(transport::sse))
        .route("/app/{key}", any(crate::doors::pusher::door::connect))
        .route(
            "/apps/{id}/{*rest}",
            any(crate::doors::pusher::api::dispatch).layer(axum::middleware::from_fn(api::log_request)),
        )
        .merge(api);
    if node.config().testing.echo {
        r = r.route("/_echo", any(echo));
    }
    r.merge(crate::web::routes(&node))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(node.clone(), crate::web::websocket_gate))
        .with_state(node)
}

/// What every connection's HTTP service needs besides the router.
#[derive(Debug)]
struct ConnSettings {
    node: Arc<Node>,
    secure: bool,
}

async fn serve_connection<I>(
    stream: I,
    peer: SocketAddr,
    guard: ConnGuard,
    app: Router,
    conn: Arc<ConnSettings>,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let accepted_at = Instant::now();
    let guard = Arc::new(guard);
    let (node, secure) = (conn.node.clone(), Secure(conn.secure));
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(AcceptedAt(accepted_at));
        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        req.extensions_mut().insert(ws::Held(guard.clone()));
        // The policy in force when the request arrives (a reload may have changed it).
        req.extensions_mut().insert(Origins(node.origins()));
        req.extensions_mut().insert(secure);
        app.clone().oneshot(req.map(Body::new))
    });
    let config = conn.node.config();
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(config.websocket.handshake_timeout)
        .max_buf_size(config.http.max_header_size.max(8192))
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                if e.is_parse_too_large() {
                    metrics::counter!("herald_http_refused_total", "reason" => "header_too_large").increment(1);
                } else if e.is_timeout() {
                    metrics::counter!("herald_http_refused_total", "reason" => "header_timeout").increment(1);
                }
                tracing::debug!(%peer, error = %e, "http connection ended with an error");
            }
        }
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// What start-up warns about when Herald listens beyond loopback (also printed by
/// `herald check-config`, which cannot know the resolved address and passes `None`).
pub fn exposure_warnings(config: &Config, ip: IpAddr) -> Vec<String> {
    let mut out = Vec::new();
    if ip.is_loopback() || ip.to_canonical().is_loopback() {
        return out;
    }
    if OriginPolicy::new(&config.http.allowed_origins).is_open() {
        out.push(format!(
            "SECURITY: listening on {ip} (beyond loopback) with http.allowed_origins = [\"*\"]: any web page may \
             connect its visitors' browsers to Herald. List your sites' origins before exposing Herald"
        ));
    }
    if !config.api.has_key() {
        out.push(format!(
            "SECURITY: listening on {ip} (beyond loopback) with no API key: the HTTP API answers only loopback \
             clients, and behind a reverse proxy on this host every request looks local. Set HERALD_API__KEY"
        ));
    }
    out
}

/// How `herald serve` reloads on SIGHUP: read the configuration again from the sources it
/// started with (file, environment, command-line flags), and what to do once a new one is in
/// use (set the log filter).
pub struct Reload {
    /// Reads and validates the configuration; the error is logged as is.
    pub load: Box<dyn Fn() -> Result<Config, String> + Send + Sync>,
    /// Called with the configuration in use after a reload applied changes.
    pub applied: Box<dyn Fn(&Config) + Send + Sync>,
}

impl std::fmt::Debug for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reload").finish_non_exhaustive()
    }
}

/// Installs the one SIGHUP handler of the server, before it accepts anything, so SIGHUP
/// never takes its default action (ending the process). Each SIGHUP reloads: the
/// configuration (when `reload` is given) and the TLS certificate; a failed reload keeps what
/// is in use. Runs until shutdown.
fn spawn_hangup(node: Arc<Node>, tls: Option<Tls>, reload: Option<Arc<Reload>>, stop: CancellationToken) {
    #[cfg(unix)]
    {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: nothing will be reloaded");
                return;
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = hup.recv() => {
                        if got.is_none() {
                            break;
                        }
                        on_hangup(&node, tls.as_ref(), reload.as_ref()).await;
                    }
                    () = stop.cancelled() => break,
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (node, tls, reload, stop);
}

/// One reload (on SIGHUP): the configuration, then the certificate.
async fn on_hangup(node: &Node, tls: Option<&Tls>, reload: Option<&Arc<Reload>>) {
    if let Some(reload) = reload {
        // Reading files is blocking work: off the runtime's workers.
        let loader = reload.clone();
        let read = tokio::task::spawn_blocking(move || (loader.load)())
            .await
            .unwrap_or_else(|e| Err(format!("the configuration loader failed: {e}")));
        match read.and_then(|config| node.reload(config)) {
            Ok(report) => {
                metrics::counter!("herald_config_reloads_total", "result" => "ok").increment(1);
                for c in &report.restart_only {
                    tracing::warn!(
                        key = %c.key,
                        running = %c.from,
                        read = %c.to,
                        "SIGHUP: {} changed but takes effect only after a restart; keeping the running value",
                        c.key
                    );
                }
                for c in &report.changed {
                    tracing::info!(key = %c.key, from = %c.from, to = %c.to, "SIGHUP: applied {}", c.key);
                }
                if !report.changed.is_empty() {
                    let config = node.config();
                    crate::ratelog::set_limit(config.log.refusals_per_second);
                    (reload.applied)(&config);
                }
                tracing::info!(changed = report.changed.len(), "SIGHUP: configuration reloaded ({})", report.summary());
            }
            Err(e) => {
                metrics::counter!("herald_config_reloads_total", "result" => "failed").increment(1);
                tracing::error!("SIGHUP: configuration not reloaded, still running the previous one: {e}");
            }
        }
    }
    if let Some(tls) = tls {
        match tls.reload() {
            Ok(()) => {
                metrics::counter!("herald_tls_reloads_total", "result" => "ok").increment(1);
                tracing::info!("SIGHUP: TLS certificate reloaded");
            }
            Err(e) => {
                metrics::counter!("herald_tls_reloads_total", "result" => "failed").increment(1);
                tracing::error!(error = %e, "SIGHUP: TLS reload failed; still serving the previous certificate");
            }
        }
    }
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn ready(State(node): State<Arc<Node>>) -> Response {
    // 503 with the reason: draining (shutdown started), or the engine is unreachable.
    if !node.is_ready() {
        return ApiError::new(herald_protocol::ErrorCode::Unavailable, "shutting down").into_response();
    }
    match node.engine_unavailable() {
        None => Json(serde_json::json!({"status": "ready"})).into_response(),
        Some(why) => ApiError::new(herald_protocol::ErrorCode::Unavailable, why).into_response(),
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    match &node.prometheus {
        Some(handle) => {
            node.record_gauges();
            ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render(handle))
                .into_response()
        }
        None => {
            ApiError::new(herald_protocol::ErrorCode::Unavailable, "metrics are recorded by the embedding application")
                .into_response()
        }
    }
}

async fn not_found(req: Request) -> Response {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path())).into_response()
}

/// `/_echo`: sends every message back. For the Autobahn|Testsuite; off unless configured.
async fn echo(State(node): State<Arc<Node>>, req: Request) -> Response {
    ws::upgrade(req, &node.ws, node.echo_settings.clone(), &[], |mut socket| async move {
        while let Ok(Some(msg)) = socket.recv().await {
            let sent = match msg {
                Message::Text(b) => socket.outbox().send_text(b),
                Message::Binary(b) => socket.outbox().send_binary(b),
            };
            if sent.is_err() {
                socket.close(ws::CloseCode::POLICY_VIOLATION, "outgoing queue full");
            }
        }
    })
}

/// Counts open TCP connections, in total and per IP address.
#[derive(Debug, Default)]
struct ConnLimits {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnLimits {
    /// A place for a new connection from `ip` under `limits` (the current ones: a reload can
    /// lower them; connections already open stay).
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &crate::config::LimitsConfig) -> Option<ConnGuard> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.total.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("herald_connections_refused_total", "reason" => "max_connections").increment(1);
            let max = limits.max_connections;
            crate::ratelog::refusal!(warn, crate::ratelog::Kind::ConnectionLimit, peer = %ip, limit = "max_connections", "connection refused: {max} open (limits.max_connections)");
            return None;
        }
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= limits.max_connections_per_ip {
            drop(map);
            self.total.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("herald_connections_refused_total", "reason" => "max_connections_per_ip").increment(1);
            let max = limits.max_connections_per_ip;
            crate::ratelog::refusal!(info, crate::ratelog::Kind::ConnectionLimit, peer = %ip, limit = "max_connections_per_ip", "connection refused: {max} open from this address (limits.max_connections_per_ip)");
            return None;
        }
        *n += 1;
        Some(ConnGuard { limits: self.clone(), ip })
    }
}

/// Releases a connection's place in the limits when the connection (HTTP or WebSocket) ends.
#[derive(Debug)]
struct ConnGuard {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        let mut map = self.limits.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}
