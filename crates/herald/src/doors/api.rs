//! The HTTP API for backends: `POST /api/<method>` with a JSON body, answered with JSON.
//! Authenticated by `Authorization: Bearer <key>` (or `apikey <key>`); without a configured
//! key, loopback only, and never for a browser request from another origin (see `origin`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Extension, Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use herald_protocol::{ErrorCode, PublishResult};
use http::{HeaderMap, Method};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::channel::{glob_match, ChannelName, NamespaceOptions};
use crate::engine::{EngineError, Publish, StreamPosition};
use crate::http_error::ApiError;
use crate::node::{Control, Node};
use crate::origin::RequestOrigin;

const METHODS: &[&str] = &[
    "publish",
    "broadcast",
    "channels",
    "info",
    "history",
    "presence",
    "presence_stats",
    "disconnect",
    "unsubscribe",
    "config_check",
];

/// Most channels one broadcast may name.
const MAX_BROADCAST_CHANNELS: usize = 1000;

/// Middleware of the HTTP APIs (`/api`, `/centrifugo/api`, the Pusher API): each request at
/// debug level, with its method, path (without the query, where Pusher's signature is),
/// status and duration; never a header or the body.
pub async fn log_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return next.run(req).await;
    }
    let (method, path, peer) = (req.method().clone(), req.uri().path().to_owned(), crate::doors::raw::peer_of(&req));
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let peer = peer.map(|p| p.to_string());
    tracing::debug!(
        peer = peer.as_deref().unwrap_or(""),
        %method,
        path,
        status = resp.status().as_u16(),
        duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "api request"
    );
    resp
}

/// `POST /api/<method>`.
pub async fn dispatch(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(origin): Extension<RequestOrigin>,
    Path(method): Path<String>,
    http_method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match handle(&node, peer, origin, &method, &http_method, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(
    node: &Node,
    peer: SocketAddr,
    origin: RequestOrigin,
    method: &str,
    http_method: &Method,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    super::http::authorize(node, peer, origin, headers)?;
    if !METHODS.contains(&method) {
        return Err(ApiError::new(ErrorCode::UnknownCommand, format!("unknown API method `{method}`")));
    }
    if http_method != Method::POST {
        return Err(ApiError::new(ErrorCode::MethodNotAllowed, "API methods are called with POST"));
    }
    let body = super::http::read_body(node, headers, body).await?;
    Ok(match method {
        "publish" => Json(publish(node, parse(&body)?).await?).into_response(),
        "broadcast" => Json(broadcast(node, parse(&body)?).await?).into_response(),
        "channels" => Json(channels(node, parse_or_default(&body)?)).into_response(),
        "history" => Json(history(node, parse(&body)?).await?).into_response(),
        "presence" => Json(presence(node, parse(&body)?, false).await?).into_response(),
        "presence_stats" => Json(presence(node, parse(&body)?, true).await?).into_response(),
        "disconnect" => Json(disconnect(node, parse(&body)?)?).into_response(),
        "unsubscribe" => Json(unsubscribe(node, parse(&body)?)?).into_response(),
        "config_check" => Json(config_check(node, &body)?).into_response(),
        _ => Json(info(node)).into_response(),
    })
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

fn parse_or_default<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse(body)
    }
}

fn channel<'a>(config: &'a crate::config::Config, name: &str) -> Result<(ChannelName, &'a NamespaceOptions), ApiError> {
    config.channels.resolve(name).map_err(|e| ApiError::new(ErrorCode::InvalidChannel, format!("`{name}`: {e}")))
}

/// `config_check`: what reloading this node with the configuration in the body (as
/// `herald check-config --url` sends it: the loaded configuration as JSON) would change. The
/// same comparison a reload makes; nothing is applied. Secrets are shown as `"<redacted>"`.
fn config_check(node: &Node, body: &[u8]) -> Result<crate::reload::Report, ApiError> {
    let candidate: crate::config::Config = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a Herald configuration: {e}")))?;
    crate::reload::plan(&node.config(), candidate)
        .map(|(_, report)| report)
        .map_err(|e| ApiError::bad_request(format!("the configuration is not valid: {e}")))
}

fn refusal((code, message): crate::rules::Refusal) -> ApiError {
    ApiError::new(code, message)
}

fn engine_error(e: EngineError) -> ApiError {
    let (code, message) = crate::rules::engine_refusal(&e);
    ApiError::new(code, message)
}

fn check_size(node: &Node, data: &RawValue) -> Result<Bytes, ApiError> {
    crate::rules::check_publication_size(&node.config().channels, data.get().len())
        .map_err(|(code, message)| ApiError::new(code, message))?;
    Ok(Bytes::copy_from_slice(data.get().as_bytes()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: String,
    data: Box<RawValue>,
}

async fn publish(node: &Node, body: PublishBody) -> Result<PublishResult, ApiError> {
    let config = node.config();
    let (channel, ns) = channel(&config, &body.channel)?;
    let data = check_size(node, &body.data)?;
    let p = node.publish(&channel, ns, Publish::data(data)).await.map_err(engine_error)?;
    Ok(PublishResult { epoch: p.epoch.to_string(), offset: p.offset })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    channels: Vec<String>,
    data: Box<RawValue>,
}

#[derive(Debug, Serialize)]
struct BroadcastResult {
    results: Vec<ChannelResult>,
}

#[derive(Debug, Serialize)]
struct ChannelResult {
    channel: String,
    #[serde(flatten)]
    position: PublishResult,
}

async fn broadcast(node: &Node, body: BroadcastBody) -> Result<BroadcastResult, ApiError> {
    let config = node.config();
    if body.channels.is_empty() || body.channels.len() > MAX_BROADCAST_CHANNELS {
        return Err(ApiError::bad_request(format!("`channels` must name 1 to {MAX_BROADCAST_CHANNELS} channels")));
    }
    // Validate everything before publishing anything: a bad request changes nothing.
    let channels = body.channels.iter().map(|c| channel(&config, c)).collect::<Result<Vec<_>, _>>()?;
    let data = check_size(node, &body.data)?;
    let mut results = Vec::with_capacity(channels.len());
    for (c, ns) in channels {
        let p = node.publish(&c, ns, Publish::data(data.clone())).await.map_err(engine_error)?;
        results.push(ChannelResult {
            channel: c.to_string(),
            position: PublishResult { epoch: p.epoch.to_string(), offset: p.offset },
        });
    }
    Ok(BroadcastResult { results })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsBody {
    /// `*` matches any run of characters; absent means every channel.
    #[serde(default)]
    pattern: Option<String>,
}

#[derive(Debug, Serialize)]
struct ChannelsResult {
    channels: Vec<ChannelCount>,
}

#[derive(Debug, Serialize)]
struct ChannelCount {
    channel: String,
    subscribers: usize,
}

fn channels(node: &Node, body: ChannelsBody) -> ChannelsResult {
    let pattern = body.pattern.unwrap_or_else(|| "*".into());
    let channels = node
        .channels(|name| glob_match(&pattern, name))
        .into_iter()
        .map(|(c, n)| ChannelCount { channel: c.to_string(), subscribers: n })
        .collect();
    ChannelsResult { channels }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryBody {
    channel: String,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    since: Option<herald_protocol::Position>,
    #[serde(default)]
    reverse: bool,
}

async fn history(node: &Node, body: HistoryBody) -> Result<herald_protocol::HistoryResult, ApiError> {
    let config = node.config();
    let (channel, ns) = channel(&config, &body.channel)?;
    let since = body.since.map(|p| StreamPosition { epoch: Arc::from(p.epoch.as_str()), offset: p.offset });
    let h = node.history(&channel, ns, since, body.limit, body.reverse).await.map_err(refusal)?;
    Ok(herald_protocol::HistoryResult {
        epoch: h.position.epoch.to_string(),
        offset: h.position.offset,
        publications: h.publications.iter().map(super::wire::to_wire).collect(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelBody {
    channel: String,
}

async fn presence(node: &Node, body: ChannelBody, stats: bool) -> Result<serde_json::Value, ApiError> {
    let config = node.config();
    let (channel, ns) = channel(&config, &body.channel)?;
    if !ns.presence {
        return Err(ApiError::new(ErrorCode::NotAvailable, "presence is off in this namespace"));
    }
    let value = if stats {
        let s = node.presence_stats(channel.as_str()).await.map_err(refusal)?;
        serde_json::json!({"clients": s.clients, "users": s.users})
    } else {
        let list = node.presence(channel.as_str()).await.map_err(refusal)?;
        serde_json::to_value(super::wire::presence_result(list)).unwrap_or_default()
    };
    Ok(value)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    user: String,
    /// A close code from 4000 to 4999; 4503 ("disconnected by the server") by default.
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Serialize)]
struct CountResult {
    /// Connections reached.
    connections: usize,
}

fn disconnect(node: &Node, body: DisconnectBody) -> Result<CountResult, ApiError> {
    if body.user.is_empty() {
        return Err(ApiError::bad_request("`user` must not be empty"));
    }
    let default = herald_protocol::CloseCode::ForceDisconnect;
    let code = body.code.unwrap_or(default.as_u16());
    if !(4000..=4999).contains(&code) {
        return Err(ApiError::bad_request("`code` must be from 4000 to 4999 (4000-4499: the client reconnects)"));
    }
    let reason = body.reason.unwrap_or_else(|| default.reason().to_owned());
    let connections = node.control_user(&body.user, Control::Disconnect { code, reason });
    Ok(CountResult { connections })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeBody {
    user: String,
    channel: String,
}

fn unsubscribe(node: &Node, body: UnsubscribeBody) -> Result<CountResult, ApiError> {
    let config = node.config();
    let (channel, _) = channel(&config, &body.channel)?;
    let connections = node.control_user(&body.user, Control::Unsubscribe { channel: channel.to_string() });
    Ok(CountResult { connections })
}

#[derive(Debug, Serialize)]
struct InfoResult {
    version: &'static str,
    uptime_seconds: u64,
    connections: usize,
    /// Channels with subscribers on this node.
    channels: usize,
    subscriptions: usize,
    /// Channels the engine keeps a position (and maybe history) for.
    stored_channels: usize,
    /// Bytes of publications kept in history.
    history_bytes: usize,
}

fn info(node: &Node) -> InfoResult {
    let i = node.info();
    InfoResult {
        stored_channels: i.stored_channels,
        history_bytes: i.history_bytes,
        version: crate::VERSION,
        uptime_seconds: i.uptime_seconds,
        connections: i.connections,
        channels: i.channels,
        subscriptions: i.subscriptions,
    }
}
