//! The Centrifugo door's server side: its encoder (publications and join/leave in Centrifugo's
//! shapes, encoded once per publication for every centrifuge-js subscriber) and Centrifugo's
//! server API shape on `POST /centrifugo/api/<method>` (for `cent` and the other HTTP API
//! clients). The client commands run in `session` under `Dialect::Centrifugo`; their wire
//! translation is `herald_protocol::centrifugo`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Extension, Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_protocol::centrifugo::{encode_pub_push, encode_push, error_code, ReplyContext};
use herald_protocol::{ErrorCode, PushBody};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::channel::{glob_match, ChannelName, NamespaceOptions};
use crate::engine::{PublicationRecord, Publish, StreamPosition, Tags};
use crate::hub::{ChannelEvent, Encoder, Frame};
use crate::node::{Control, Node};
use crate::origin::RequestOrigin;
use crate::rules::Refusal;

/// Encodes for subscribers on `/connection/websocket`.
#[derive(Debug)]
pub struct CentrifugoEncoder;

/// The one Centrifugo encoder, shared by every Centrifugo subscription.
pub static CENTRIFUGO: CentrifugoEncoder = CentrifugoEncoder;

impl Encoder for CentrifugoEncoder {
    fn slot(&self) -> usize {
        4
    }

    /// Centrifugo's own "slow" (3008): centrifuge-js reconnects.
    fn slow_consumer_close(&self) -> (u16, &'static str) {
        (3008, "slow")
    }

    /// Centrifugo's "insufficient state" (3010): the client reconnects and recovers, as
    /// Centrifugo asks when it lost publications.
    fn lost_close(&self) -> (u16, &'static str) {
        (3010, "insufficient state")
    }

    fn publication(&self, channel: &str, _epoch: &str, record: &PublicationRecord) -> Frame {
        let tags = record.tags.as_deref();
        Frame::text(encode_pub_push(channel, Some(record.offset), &record.data, record.info.as_ref(), tags))
    }

    fn event(&self, channel: &str, event: &ChannelEvent) -> Option<Frame> {
        let (body, info) = match event {
            ChannelEvent::Join { client, info } => (PushBody::Join(client.clone()), info.as_deref()),
            ChannelEvent::Leave { client } => (PushBody::Leave(client.clone()), None),
            // Pusher's client events have no Centrifugo counterpart.
            ChannelEvent::Client { .. } => return None,
        };
        let ctx = ReplyContext { now: 0, client: "", version: "", expires_at: 0, recoverable: false, tags: &[] };
        let mut push = encode_push(channel, &body, &ctx);
        // The joining connection's info, as Centrifugo's `conn_info`.
        if let Some(info) = info.and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok()) {
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&push) {
                v["push"]["join"]["info"]["conn_info"] = info;
                push = v.to_string().into_bytes();
            }
        }
        Some(Frame::text(push))
    }
}

/// `POST /centrifugo/api/<method>`: Centrifugo's server API shape. Requests as Centrifugo takes
/// them; answers `{"result":{..}}`, or `{"error":{"code":..,"message":..}}` with HTTP 200 and
/// Centrifugo's error numbers (HTTP 401 for a missing or wrong key). The key goes in
/// `X-API-Key: <key>` or `Authorization: apikey <key>`, as Centrifugo's clients send it; the
/// same keys and rules as `/api/<method>`.
#[allow(clippy::too_many_arguments)]
pub async fn api(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(origin): Extension<RequestOrigin>,
    Path(method): Path<String>,
    http_method: http::Method,
    mut headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        if let Ok(value) = HeaderValue::from_str(&format!("apikey {key}")) {
            headers.insert(http::header::AUTHORIZATION, value);
        }
    }
    if let Err(e) = super::http::authorize(&node, peer, origin, &headers) {
        return e.into_response();
    }
    if http_method != http::Method::POST {
        return failure((ErrorCode::MethodNotAllowed, "API methods are called with POST".into()));
    }
    let body = match super::http::read_body(&node, &headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match call(&node, &method, &body).await {
        Ok(result) => Json(json!({ "result": result })).into_response(),
        Err(refusal) => failure(refusal),
    }
}

/// An error as Centrifugo answers it: HTTP 200, its own numbers.
fn failure((code, message): Refusal) -> Response {
    let (number, _) = error_code(code, &message);
    (StatusCode::OK, Json(json!({ "error": { "code": number, "message": message } }))).into_response()
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Refusal> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|e| (ErrorCode::BadRequest, format!("invalid request body: {e}")))
}

fn resolve<'a>(config: &'a crate::config::Config, name: &str) -> Result<(ChannelName, &'a NamespaceOptions), Refusal> {
    config.channels.resolve(name).map_err(|e| (ErrorCode::InvalidChannel, format!("`{name}`: {e}")))
}

#[derive(Deserialize)]
struct PublishBody {
    channel: String,
    data: Box<RawValue>,
    #[serde(default)]
    tags: Option<Tags>,
}

#[derive(Deserialize)]
struct BroadcastBody {
    channels: Vec<String>,
    data: Box<RawValue>,
    #[serde(default)]
    tags: Option<Tags>,
}

#[derive(Deserialize)]
struct ChannelBody {
    channel: String,
}

#[derive(Deserialize, Default)]
struct Since {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    epoch: String,
}

#[derive(Deserialize)]
struct HistoryBody {
    channel: String,
    #[serde(default)]
    limit: i64,
    #[serde(default)]
    since: Option<Since>,
    #[serde(default)]
    reverse: bool,
}

#[derive(Deserialize)]
struct UserBody {
    user: String,
    #[serde(default)]
    channel: String,
    #[serde(default)]
    disconnect: Option<DisconnectCode>,
}

#[derive(Deserialize)]
struct DisconnectCode {
    code: u16,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize, Default)]
struct ChannelsBody {
    #[serde(default)]
    pattern: String,
}

/// Most channels one broadcast may name (as `/api/broadcast`).
const MAX_BROADCAST_CHANNELS: usize = 1000;

async fn publish(node: &Node, channel: &str, data: &RawValue, tags: &Option<Tags>) -> Result<Value, Refusal> {
    let config = node.config();
    let (channel, ns) = resolve(&config, channel)?;
    crate::rules::check_publication_size_with_tags(&node.config().channels, data.get().len(), tags.as_ref())?;
    let publish = Publish {
        tags: tags.clone().filter(|t| !t.is_empty()).map(Arc::new),
        ..Publish::data(bytes::Bytes::copy_from_slice(data.get().as_bytes()))
    };
    let p = node.publish(&channel, ns, publish).await.map_err(|e| crate::rules::engine_refusal(&e))?;
    Ok(json!({ "offset": p.offset, "epoch": p.epoch.as_ref() }))
}

/// Centrifugo publish options Herald does not have: refused rather than ignored, since each
/// changes what is delivered or kept.
fn unsupported_publish_options(body: &[u8]) -> Result<(), Refusal> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else { return Ok(()) };
    let set = |v: &Value| !matches!(v, Value::Null | Value::Bool(false)) && v != &json!("") && v != &json!(0);
    for key in ["skip_history", "idempotency_key", "b64data", "delta", "version", "version_epoch"] {
        if map.get(key).is_some_and(set) {
            return Err((ErrorCode::NotAvailable, format!("`{key}` is not available on Herald")));
        }
    }
    Ok(())
}

async fn call(node: &Node, method: &str, body: &[u8]) -> Result<Value, Refusal> {
    let config = node.config();
    let _engine = |e: crate::engine::EngineError| crate::rules::engine_refusal(&e);
    if method == "publish" || method == "broadcast" {
        unsupported_publish_options(body)?;
    }
    match method {
        "publish" => {
            let b: PublishBody = parse(body)?;
            publish(node, &b.channel, &b.data, &b.tags).await
        }
        "broadcast" => {
            let b: BroadcastBody = parse(body)?;
            if b.channels.is_empty() || b.channels.len() > MAX_BROADCAST_CHANNELS {
                let message = format!("`channels` must name 1 to {MAX_BROADCAST_CHANNELS} channels");
                return Err((ErrorCode::BadRequest, message));
            }
            for c in &b.channels {
                resolve(&config, c)?;
            }
            let mut responses = Vec::with_capacity(b.channels.len());
            for c in &b.channels {
                responses.push(match publish(node, c, &b.data, &b.tags).await {
                    Ok(result) => json!({ "result": result }),
                    Err((code, message)) => {
                        json!({ "error": { "code": error_code(code, &message).0, "message": message } })
                    }
                });
            }
            Ok(json!({ "responses": responses }))
        }
        "presence" | "presence_stats" => {
            let b: ChannelBody = parse(body)?;
            let (channel, ns) = resolve(&config, &b.channel)?;
            if !ns.presence {
                return Err((ErrorCode::NotAvailable, "presence is off in this namespace".into()));
            }
            if method == "presence_stats" {
                let s = node.presence_stats(channel.as_str()).await?;
                return Ok(json!({ "num_clients": s.clients, "num_users": s.users }));
            }
            let list = node.presence(channel.as_str()).await?;
            let presence: Map<String, Value> = list
                .into_iter()
                .map(|e| {
                    let mut v = json!({ "client": e.client, "user": e.user });
                    if let Some(info) = e.info.as_deref().and_then(|b| serde_json::from_slice::<Value>(b).ok()) {
                        v["conn_info"] = info;
                    }
                    (e.client, v)
                })
                .collect();
            Ok(json!({ "presence": presence }))
        }
        "history" => {
            let b: HistoryBody = parse(body)?;
            let (channel, ns) = resolve(&config, &b.channel)?;
            // Centrifugo: no limit (or 0) answers the position only, a negative one everything.
            let limit = usize::try_from(b.limit).ok();
            let since = b.since.map(|s| StreamPosition { epoch: Arc::from(s.epoch.as_str()), offset: s.offset });
            let h = node.history(&channel, ns, since, limit, b.reverse).await?;
            let publications: Vec<Value> = h
                .publications
                .iter()
                .map(|p| {
                    let tags = p.tags.as_deref();
                    let push = encode_pub_push("", Some(p.offset), &p.data, p.info.as_ref(), tags);
                    serde_json::from_slice::<Value>(&push).map(|v| v["push"]["pub"].clone()).unwrap_or(Value::Null)
                })
                .collect();
            Ok(json!({ "publications": publications, "epoch": h.position.epoch.as_ref(), "offset": h.position.offset }))
        }
        "unsubscribe" => {
            let b: UserBody = parse(body)?;
            let (channel, _) = resolve(&config, &b.channel)?;
            node.control_user(&b.user, Control::Unsubscribe { channel: channel.to_string() });
            Ok(json!({}))
        }
        "disconnect" => {
            let b: UserBody = parse(body)?;
            if b.user.is_empty() {
                return Err((ErrorCode::BadRequest, "`user` must not be empty".into()));
            }
            let default = herald_protocol::CloseCode::ForceDisconnect;
            let (code, reason) = match b.disconnect {
                Some(d) if (3000..=4999).contains(&d.code) => (d.code, d.reason),
                Some(_) => return Err((ErrorCode::BadRequest, "`disconnect.code` must be from 3000 to 4999".into())),
                None => (default.as_u16(), default.reason().to_owned()),
            };
            node.control_user(&b.user, Control::Disconnect { code, reason });
            Ok(json!({}))
        }
        "channels" => {
            let b: ChannelsBody = parse(body)?;
            let pattern = if b.pattern.is_empty() { "*".to_owned() } else { b.pattern };
            let channels: Map<String, Value> = node
                .channels(|name| glob_match(&pattern, name))
                .into_iter()
                .map(|(c, n)| (c.to_string(), json!({ "num_clients": n })))
                .collect();
            Ok(json!({ "channels": channels }))
        }
        "info" => {
            let info = node.info();
            Ok(json!({ "nodes": [{
            "name": "herald",
            "version": crate::VERSION,
            "num_clients": info.connections,
            "num_channels": info.channels,
            "num_subs": info.subscriptions,
            "uptime": info.uptime_seconds,
        }] }))
        }
        other => Err((ErrorCode::UnknownCommand, format!("`{other}` is not available on Herald's Centrifugo API"))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use bytes::Bytes;
    use herald_protocol::ClientInfo;

    use super::*;

    fn text(frame: Frame) -> serde_json::Value {
        let Frame::Ws(prepared) = frame else { panic!("a WebSocket frame") };
        let wire = prepared.frame_for(&crate::ws::SendMode::PLAIN);
        let at = if wire[1] & 0x7f == 126 { 4 } else { 2 };
        serde_json::from_slice(&wire[at..]).expect("json")
    }

    #[test]
    fn publications_carry_offset_info_and_tags() {
        let record = PublicationRecord {
            offset: 3,
            data: Bytes::from_static(br#"{"a":1}"#),
            info: Some(ClientInfo { user: "u".into(), client: "c".into() }),
            tags: Some(Arc::new(BTreeMap::from([("event".to_owned(), "x".to_owned())]))),
            exclude: None,
        };
        let v = text(CENTRIFUGO.publication("ch", "e", &record));
        assert_eq!(
            v,
            serde_json::json!({"push":{"channel":"ch","pub":{"offset":3,"data":{"a":1},"info":{"user":"u","client":"c"},"tags":{"event":"x"}}}})
        );
    }

    #[test]
    fn joins_carry_conn_info_and_client_events_are_not_shown() {
        let client = ClientInfo { user: "u".into(), client: "c".into() };
        let join = ChannelEvent::Join { client: client.clone(), info: Some(r#"{"name":"U"}"#.into()) };
        let v = text(CENTRIFUGO.event("ch", &join).expect("join"));
        assert_eq!(v["push"]["join"]["info"], serde_json::json!({"user":"u","client":"c","conn_info":{"name":"U"}}));
        let leave = text(CENTRIFUGO.event("ch", &ChannelEvent::Leave { client }).expect("leave"));
        assert_eq!(leave["push"]["leave"]["info"]["user"], "u");
        let event = ChannelEvent::Client { event: "client-x".into(), data: "1".into(), user: None, exclude: None };
        assert!(CENTRIFUGO.event("ch", &event).is_none());
    }
}
