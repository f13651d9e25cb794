//! The HTTP side of the opening handshake: answer 101 through hyper's upgrade, then run the
//! handler on our [`WebSocket`] over the raw stream (TCP, or TLS through hyper's upgrade).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{Request, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handshake;
use super::{Settings, Stream, WebSocket, WsMetrics};
use crate::http_error::ApiError;

/// When the TCP connection was accepted; put in request extensions by the accept loop so the
/// handshake histogram covers the whole handshake.
#[derive(Debug, Clone, Copy)]
pub struct AcceptedAt(pub Instant);

/// Anything a connection must keep alive for as long as it lasts (its place in the
/// connection limits): the accept loop puts it in the request, the upgrade moves it into the
/// WebSocket's task.
#[derive(Clone)]
pub struct Held(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Held")
    }
}

/// What every WebSocket of a server shares: shutdown signal, task tracking, metrics.
#[derive(Debug, Clone)]
pub struct WsContext {
    pub shutdown: CancellationToken,
    /// On shutdown, each WebSocket's 1001 comes at a random point of this window.
    pub drain_spread: std::time::Duration,
    pub tracker: TaskTracker,
    pub metrics: WsMetrics,
}

/// Validates an upgrade request and answers it. On success the returned response is the 101
/// and `handler` runs on the connection in a tracked task; on failure it is a 4xx with a JSON
/// error body and the matching headers (e.g. `Sec-WebSocket-Version: 13` on 426).
pub fn upgrade<F, Fut>(
    mut req: Request<Body>,
    ctx: &WsContext,
    settings: Arc<Settings>,
    protocols: &[&'static str],
    handler: F,
) -> Response
where
    F: FnOnce(WebSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Every WebSocket door passes here: a browser page from an origin the policy does not
    // allow is refused before the upgrade.
    if let Some(origins) = req.extensions().get::<crate::origin::Origins>() {
        if let Err(e) = origins.0.check(req.headers()) {
            crate::origin::log_refused(crate::doors::raw::peer_of(&req), &e);
            return e.into_response();
        }
    }
    let accepted = match handshake::check(req.method(), req.version(), req.headers(), protocols, &settings.compression)
    {
        Ok(a) => a,
        Err(e) => {
            let mut resp = ApiError::bad_request(e.to_string()).with_status(e.status()).into_response();
            resp.headers_mut().extend(e.headers());
            return resp;
        }
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<OnUpgrade>() else {
        return ApiError::bad_request("this connection cannot be upgraded").into_response();
    };
    let accepted_at = req.extensions().get::<AcceptedAt>().map(|a| a.0);
    let held = req.extensions_mut().remove::<Held>();
    let headers = handshake::response_headers(&accepted);
    let ctx = ctx.clone();
    ctx.tracker.clone().spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        // Plain TCP keeps its fast path; anything else (TLS) goes on through hyper's
        // upgraded stream, which also replays the bytes read past the handshake.
        let (stream, leftover) = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(p) => (Stream::Tcp(p.io.into_inner()), p.read_buf),
            Err(upgraded) => (Stream::other(TokioIo::new(upgraded)), bytes::Bytes::new()),
        };
        if let Some(at) = accepted_at {
            ctx.metrics.handshake_took(at.elapsed());
        }
        let ws = WebSocket::start(
            stream,
            leftover,
            settings,
            accepted.deflate,
            accepted.protocol,
            ctx.shutdown.clone(),
            ctx.drain_spread,
            ctx.metrics.clone(),
        );
        handler(ws).await;
        drop(held);
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = headers;
    resp
}
