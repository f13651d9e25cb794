//! Client-facing endpoints: `/connect` (native protocol over WebSocket), `/connection/websocket`
//! (Centrifugo's client protocol), `/ws/<channel>` (raw
//! WebSocket: each publication's data, no envelope) and `/sse/<channel>` (Server-Sent Events).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Path, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use herald_protocol::ErrorCode;
use http::{header, HeaderMap};

use crate::channel::{Access, ChannelName, NamespaceOptions};
use crate::engine::StreamPosition;
use crate::engine::{PublicationRecord, Publish};
use crate::http_error::ApiError;
use crate::hub::{Encoder, Frame, Sink, Subscriber};
use crate::node::{Node, SubscriptionGuard};
use crate::origin::Origins;
use crate::rules::Identity;
use crate::ws::{self, Outbox, SendMode};

/// `GET /connect`: the native protocol.
pub async fn connect(State(node): State<Arc<Node>>, req: Request) -> Response {
    let settings = node.ws_settings();
    let ctx = node.ws.clone();
    let peer = peer_of(&req);
    ws::upgrade(req, &ctx, settings, &[herald_protocol::SUBPROTOCOL], move |socket| {
        crate::doors::session::run_from(node, socket, crate::doors::session::Dialect::Native, peer)
    })
}

/// The client's address, as the accept loop put it in the request.
pub(crate) fn peer_of<B>(req: &http::Request<B>) -> Option<std::net::SocketAddr> {
    req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0)
}

/// `GET /connection/websocket`: Centrifugo's client protocol (JSON), so centrifuge-js,
/// centrifuge-python and their sibling SDKs connect unmodified. Same sessions and rules as
/// `/connect`, another wire format.
pub async fn centrifugo(State(node): State<Arc<Node>>, req: Request) -> Response {
    let settings = node.ws_settings();
    let ctx = node.ws.clone();
    let peer = peer_of(&req);
    // A protobuf client is accepted only to be told why it cannot stay: a browser would
    // otherwise fail the handshake with no reason to show.
    ws::upgrade(req, &ctx, settings, &["centrifuge-protobuf"], move |mut socket| async move {
        if socket.protocol() == Some("centrifuge-protobuf") {
            socket
                .close(ws::CloseCode::UNSUPPORTED_DATA, "Herald speaks Centrifugo's JSON protocol only, not protobuf");
            while let Ok(Some(_)) = socket.recv().await {}
            return;
        }
        crate::doors::session::run_from(node, socket, crate::doors::session::Dialect::Centrifugo, peer).await
    })
}

/// Checks that an anonymous client may subscribe to `name` (the raw transports have no
/// `connect`, so no identity and no token: only namespaces open to `"anonymous"`).
fn anonymous_subscribe<'a>(
    config: &'a crate::config::Config,
    name: &str,
) -> Result<(ChannelName, &'a NamespaceOptions), ApiError> {
    let (channel, ns) =
        config.channels.resolve(name).map_err(|e| ApiError::new(ErrorCode::InvalidChannel, e.to_string()))?;
    // A raw client can present no token: whatever is not open to anyone is refused.
    let access = match ns.subscribe.level(Access::Anonymous) {
        Access::Anonymous => Access::Anonymous,
        _ => Access::None,
    };
    crate::rules::check(access, &channel, Identity::ANONYMOUS)
        .map_err(|(code, message)| ApiError::new(code, message))?;
    Ok((channel, ns))
}

/// Parses an SSE event id (`<epoch>:<offset>`) back into a position.
fn parse_event_id(id: &str) -> Option<StreamPosition> {
    let (epoch, offset) = id.trim().rsplit_once(':')?;
    Some(StreamPosition { epoch: Arc::from(epoch), offset: offset.parse().ok()? })
}

/// `GET /ws/<channel>`: every publication's data as a text frame. A text message from the
/// client is published to the channel where its namespace allows clients to publish (JSON as
/// is, other text as a JSON string); where it does not, the connection closes with 4505.
pub async fn raw_ws(State(node): State<Arc<Node>>, Path(name): Path<String>, req: Request) -> Response {
    let config = node.config();
    if let Err(e) = anonymous_subscribe(&config, &name) {
        if !crate::web::is_upgrade(req.headers()) {
            return e.into_response();
        }
        // A browser never shows an HTTP error to a WebSocket: accept, and close with 4506
        // and the reason.
        let code = herald_protocol::CloseCode::SubscribeRefused;
        let reason = close_reason(&format!("`{name}`: {}", e.message()));
        return ws::upgrade(req, &node.ws, node.ws_settings(), &[], move |mut socket| async move {
            socket.close(ws::CloseCode(code.as_u16()), &reason);
            while let Ok(Some(_)) = socket.recv().await {}
        });
    }
    let settings = node.ws_settings();
    let ctx = node.ws.clone();
    ws::upgrade(req, &ctx, settings, &[], move |mut socket| async move {
        let Ok((channel, ns)) = anonymous_subscribe(&config, &name) else { return };
        let _count = node.session_guard();
        let id = node.next_id();
        let sub = Subscriber { id, outbox: socket.outbox().clone(), encoder: &RAW };
        if node.subscribe(&channel, ns, sub, None, |_, _| None).await.is_err() {
            return;
        }
        let _guard = SubscriptionGuard { node: node.clone(), channel: channel.shared().clone(), id };
        let (mut reloads, mut config) = (node.reloads(), config.clone());
        loop {
            tokio::select! {
                received = socket.recv() => {
                    let Ok(Some(msg)) = received else { break };
                    // Under the rules in force now.
                    let Ok((_, ns)) = config.channels.resolve(&name) else { continue };
                    if let Err((code, reason)) = raw_publish(&node, &channel, ns, msg).await {
                        socket.close(code, reason);
                    }
                }
                Ok(()) = reloads.changed() => {
                    config = node.config();
                    if let Err(e) = anonymous_subscribe(&config, &name) {
                        tracing::info!(channel = %channel, reason = %e.message(), "configuration reloaded: raw subscription ended");
                        socket.close(ws::CloseCode(herald_protocol::CloseCode::ForceDisconnect.as_u16()), "configuration reloaded: channel no longer open");
                    }
                }
            }
        }
    })
}

/// `text` cut to fit a close frame's reason (123 bytes), on a character boundary.
fn close_reason(text: &str) -> String {
    let mut end = text.len().min(123);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Publishes one message a raw `/ws/<channel>` client sent, or says how to close.
async fn raw_publish(
    node: &Node,
    channel: &ChannelName,
    ns: &NamespaceOptions,
    msg: ws::Message,
) -> Result<(), (ws::CloseCode, &'static str)> {
    let refused = herald_protocol::CloseCode::PublishNotAllowed;
    // A raw client has no identity: only an anonymous publish rule lets it publish.
    if crate::rules::check(ns.publish.level(Access::Anonymous), channel, Identity::ANONYMOUS).is_err() {
        return Err((ws::CloseCode(refused.as_u16()), refused.reason()));
    }
    let ws::Message::Text(text) = msg else {
        return Err((ws::CloseCode::UNSUPPORTED_DATA, "send text: JSON, or any text to publish as a JSON string"));
    };
    let data = if serde_json::from_slice::<serde::de::IgnoredAny>(&text).is_ok() {
        text
    } else {
        // The frame is valid UTF-8 (the WebSocket layer checked), so this is lossless.
        Bytes::from(serde_json::Value::String(String::from_utf8_lossy(&text).into_owned()).to_string())
    };
    if crate::rules::check_publication_size(&node.config().channels, data.len()).is_err() {
        return Err((ws::CloseCode::MESSAGE_TOO_BIG, "publication larger than channels.max_publication_size"));
    }
    match node.publish(channel, ns, Publish::data(data)).await {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(channel = %channel, error = %e, "raw websocket publish failed");
            let code = herald_protocol::CloseCode::ServerError;
            Err((ws::CloseCode(code.as_u16()), code.reason()))
        }
    }
}

/// `GET /sse/<channel>`: Server-Sent Events, `id:` = `<epoch>:<offset>`, a comment every 15 s
/// to keep proxies from timing the stream out. A `Last-Event-ID` header (sent by EventSource
/// when it reconnects) resumes from history: the missed events come first, or a
/// `herald-reset` event says they could not be recovered.
pub async fn sse(
    State(node): State<Arc<Node>>,
    Extension(origins): Extension<Origins>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let config = node.config();
    // Browsers on other origins: refused unless allowed, and allowed ones get CORS headers.
    if let Err(e) = origins.0.check(&headers) {
        crate::origin::log_refused(Some(peer), &e);
        return e.into_response();
    }
    let (channel, ns) = match anonymous_subscribe(&config, &name) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    // A Last-Event-ID that is not one of ours cannot be resumed from: the stream starts with a
    // `herald-reset` event (as for a lost epoch), never silently live-only.
    let resume = headers
        .get("last-event-id")
        .map(|v| v.to_str().ok().and_then(parse_event_id).unwrap_or_else(crate::node::no_position));
    let id = node.next_id();
    let outbox = Outbox::new(node.config().websocket.max_queue_bytes, SendMode::PLAIN);
    let sub = Subscriber { id, outbox: outbox.clone(), encoder: &SSE };
    let subscribed = node
        .subscribe(&channel, ns, sub, resume, |history, recovered| {
            let mut out = BytesMut::from(&b"retry: 1000\n: subscribed\n\n"[..]);
            let epoch = &history.position.epoch;
            match recovered {
                Some(true) => {
                    for p in &history.publications {
                        out.extend_from_slice(&sse_event(epoch, p.offset, &p.data));
                    }
                }
                Some(false) => out.extend_from_slice(
                    format!(
                        "event: herald-reset\nid: {epoch}:{}\ndata: {{\"epoch\":\"{epoch}\",\"offset\":{}}}\n\n",
                        history.position.offset, history.position.offset
                    )
                    .as_bytes(),
                ),
                None => {}
            }
            Some(out.freeze())
        })
        .await;
    match subscribed {
        Ok(_) => {}
        Err(crate::node::SubscribeFailure::Engine(e)) => {
            return ApiError::new(e.code(), e.to_string()).into_response();
        }
        Err(_) => return ApiError::new(ErrorCode::Internal, "subscription failed").into_response(),
    }
    metrics::gauge!("herald_connections", "transport" => "sse").increment(1.0);
    let state = SseStream {
        outbox,
        batch: VecDeque::new(),
        keepalive: tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(15),
            Duration::from_secs(15),
        ),
        shutdown: node.ws.shutdown.clone(),
        drain_spread: node.ws.drain_spread,
        drain: None,
        reloads: node.reloads(),
        node: node.clone(),
        name,
        ended: false,
        _guard: SubscriptionGuard { node: node.clone(), channel: channel.shared().clone(), id },
        _count: node.session_guard(),
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        let chunk = st.next().await?;
        Some((Ok::<_, Infallible>(chunk), st))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    if let Some(origin) = headers.get(header::ORIGIN) {
        crate::origin::cors_headers(h, origin.clone());
    }
    resp
}

/// The state behind an SSE body: the subscription lives as long as the body does.
struct SseStream {
    outbox: Outbox,
    batch: VecDeque<Bytes>,
    keepalive: tokio::time::Interval,
    shutdown: tokio_util::sync::CancellationToken,
    /// On shutdown the stream ends at a random point of this window (`drain_spread`).
    drain_spread: Duration,
    drain: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// A reload ends the stream when the channel is no longer open to anyone.
    reloads: tokio::sync::watch::Receiver<u64>,
    node: Arc<Node>,
    name: String,
    ended: bool,
    _guard: SubscriptionGuard,
    _count: crate::node::SessionCount,
}

impl SseStream {
    async fn next(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        loop {
            tokio::select! {
                Ok(()) = self.reloads.changed() => {
                    if let Err(e) = anonymous_subscribe(&self.node.config(), &self.name) {
                        let why = e.message().replace('\n', " ");
                        tracing::info!(channel = %self.name, reason = %why, "configuration reloaded: SSE stream ended");
                        self.ended = true;
                        return Some(Bytes::from(format!(": configuration reloaded: {why}\n\n")));
                    }
                }
                more = self.outbox.next_batch(&mut self.batch) => {
                    if !more {
                        return None;
                    }
                    let mut out = BytesMut::new();
                    for b in self.batch.drain(..) {
                        out.extend_from_slice(&b);
                    }
                    return Some(out.freeze());
                }
                _ = self.keepalive.tick() => return Some(Bytes::from_static(b": keep-alive\n\n")),
                () = self.shutdown.cancelled(), if self.drain.is_none() => {
                    let at = crate::ws::random_up_to(self.drain_spread);
                    self.drain = Some(Box::pin(tokio::time::sleep(at)));
                }
                () = async { if let Some(d) = self.drain.as_mut() { d.as_mut().await } else { std::future::pending().await } } => {
                    // EventSource waits `retry` before reconnecting: the hint, spread again.
                    self.ended = true;
                    let hint = crate::ws::random_up_to(self.drain_spread).as_millis().max(1);
                    return Some(Bytes::from(format!("retry: {hint}\n: server shutting down\n\n")));
                }
            }
        }
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        metrics::gauge!("herald_connections", "transport" => "sse").decrement(1.0);
    }
}

/// `/ws/<channel>`'s encoding: the publication's data alone in a text frame; no events.
#[derive(Debug)]
pub struct RawEncoder;

/// The raw WebSocket door's encoder.
pub static RAW: RawEncoder = RawEncoder;

impl Encoder for RawEncoder {
    fn slot(&self) -> usize {
        1
    }

    fn publication(&self, _channel: &str, _epoch: &str, record: &PublicationRecord) -> Frame {
        Frame::text(record.data.clone())
    }
}

/// `/sse/<channel>`'s encoding: one Server-Sent Event per publication; no other events.
#[derive(Debug)]
pub struct SseEncoder;

/// The SSE door's encoder.
pub static SSE: SseEncoder = SseEncoder;

impl Encoder for SseEncoder {
    fn slot(&self) -> usize {
        2
    }

    fn publication(&self, _channel: &str, epoch: &str, record: &PublicationRecord) -> Frame {
        Frame::Raw(sse_event(epoch, record.offset, &record.data))
    }

    fn sink(&self) -> Sink {
        Sink::Stream
    }
}

/// `id: <epoch>:<offset>` and the data, one `data:` line per line of JSON (SSE cannot carry
/// raw newlines; EventSource joins the lines back with `\n`). The id carries the epoch so that
/// `Last-Event-ID` can resume exactly, or tell that it cannot.
pub fn sse_event(epoch: &str, offset: u64, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 32);
    out.extend_from_slice(format!("id: {epoch}:{offset}\n").as_bytes());
    for line in data.split(|b| *b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.push(b'\n');
    }
    out.push(b'\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_sse_event_splits_lines_and_carries_the_position() {
        let record = PublicationRecord { offset: 1, data: Bytes::from_static(b"{\n\"a\":1}"), ..Default::default() };
        let Frame::Raw(bytes) = SSE.publication("t", "e", &record) else { panic!("SSE is a byte stream") };
        assert_eq!(bytes, Bytes::from_static(b"id: e:1\ndata: {\ndata: \"a\":1}\n\n"));
    }
}
