//! The server: one listener, HTTP/1.1 with upgrades, the routes, connection limits, and a
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
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::Config;
use crate::http_error::ApiError;
use crate::node::Node;
use crate::ws::{self, AcceptedAt, Message, WsContext};
use crate::{api, transport};

/// Runs Herald on `listener` until `shutdown` resolves, then closes every WebSocket with 1001
/// and waits up to `drain_timeout` for connections to finish.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let prometheus = crate::metrics::install();
    let config = Arc::new(config);
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ws = WsContext { shutdown: stop.clone(), tracker: tracker.clone(), metrics: ws::WsMetrics::new() };
    let node = Arc::new(Node::new(config.clone(), ws, prometheus));
    let app = router(node.clone());
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
                        node.engine.sweep();
                        node.expire_presence().await;
                    }
                    () = stop.cancelled() => break,
                }
            }
        }
    });
    if config.demo {
        tokio::spawn(crate::web::run_ticker(node.clone(), stop.clone()));
    }
    let limits = Arc::new(ConnLimits::new(config.limits.max_connections, config.limits.max_connections_per_ip));

    tracing::info!(addr = %listener.local_addr()?, "listening");
    if config.api.key.is_empty() {
        tracing::warn!(
            "api.key is not set: the HTTP API answers only loopback clients. Behind a reverse proxy on this \
             host every request looks local: set HERALD_API__KEY before exposing Herald"
        );
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(guard) = limits.admit(peer.ip()) else { continue };
                    let conn = serve_connection(stream, peer, guard, app.clone(), config.clone(), stop.clone());
                    tracker.spawn(conn);
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
    tracing::info!(connections = open, drain_timeout = ?config.drain_timeout, "shutting down: closing connections");
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(config.drain_timeout, tracker.wait()).await.is_err() {
        tracing::warn!(left = tracker.len(), "drain timeout reached; dropping remaining connections");
    }
    Ok(())
}

fn router(node: Arc<Node>) -> Router {
    let mut r = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/connect", any(transport::connect))
        .route("/ws/{*channel}", any(transport::raw_ws))
        .route("/sse/{*channel}", get(transport::sse))
        .route("/api/{method}", any(api::dispatch));
    if node.config.testing.echo {
        r = r.route("/_echo", any(echo));
    }
    r.merge(crate::web::routes(&node))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(node.clone(), crate::web::websocket_gate))
        .with_state(node)
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
    app: Router,
    config: Arc<Config>,
    stop: CancellationToken,
) {
    let accepted_at = Instant::now();
    let _ = stream.set_nodelay(true);
    let guard = Arc::new(guard);
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(AcceptedAt(accepted_at));
        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        req.extensions_mut().insert(ws::Held(guard.clone()));
        app.clone().oneshot(req.map(Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(config.websocket.handshake_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "http connection ended with an error");
            }
        }
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn ready(State(node): State<Arc<Node>>) -> Response {
    if node.is_ready() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        ApiError::new(herald_protocol::ErrorCode::Unavailable, "shutting down").into_response()
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    match &node.prometheus {
        Some(handle) => {
            node.record_gauges();
            handle.run_upkeep();
            ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
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
#[derive(Debug)]
struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnLimits {
    fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self { max_total, max_per_ip, total: AtomicUsize::new(0), per_ip: Mutex::new(HashMap::new()) }
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("herald_connections_refused_total", "reason" => "max_connections").increment(1);
            tracing::debug!(%ip, "connection refused: max_connections");
            return None;
        }
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            drop(map);
            self.total.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("herald_connections_refused_total", "reason" => "max_connections_per_ip").increment(1);
            tracing::debug!(%ip, "connection refused: max_connections_per_ip");
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
