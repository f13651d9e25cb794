//! The Pusher HTTP API (`/apps/<id>/...`), as the `pusher` server SDKs call it: every request
//! signed with the app secret (`auth_key`, `auth_timestamp`, `auth_version`, `body_md5`,
//! `auth_signature`). Errors are Herald's JSON error bodies with a 4xx status.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use herald_protocol::ErrorCode;
use http::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{auth, parse_socket_id, protocol, Kind, PusherApp, MAX_EVENT_NAME};
use crate::engine::Publish;
use crate::http_error::ApiError;
use crate::node::{Control, Node};

/// `/apps/<id>/<rest>`.
pub async fn dispatch(
    State(node): State<Arc<Node>>,
    Path((id, rest)): Path<(String, String)>,
    req: Request,
) -> Response {
    match handle(&node, &id, &rest, req).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn handle(node: &Node, id: &str, rest: &str, req: Request) -> Result<Value, ApiError> {
    let config = node.config();
    let Some(app) = config.pusher.app_by_id(id) else {
        return Err(ApiError::not_found(format!("no Pusher app with id `{id}`")));
    };
    let (parts, body) = req.into_parts();
    let body = crate::doors::http::read_body(node, &parts.headers, body).await?;
    let query = query_pairs(parts.uri.query().unwrap_or(""));
    check_signature(node, app, &parts.method, parts.uri.path(), &query, &body)?;
    let param = |k: &str| query.iter().find(|(key, _)| key == k).map(|(_, v)| percent_decode(v));
    let segments: Vec<&str> = rest.split('/').collect();
    let method = &parts.method;
    let expect = |m: Method| {
        if *method == m {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::MethodNotAllowed, format!("use {m}")))
        }
    };
    match segments.as_slice() {
        ["events"] => {
            expect(Method::POST)?;
            let event: Event = parse(&body)?;
            trigger(node, app, event, false).await?;
            Ok(json!({}))
        }
        ["batch_events"] => {
            expect(Method::POST)?;
            let batch: Batch = parse(&body)?;
            let max = node.config().pusher.max_batch_size;
            if batch.batch.len() > max {
                return Err(ApiError::bad_request(format!("a batch has at most {max} events (pusher.max_batch_size)")));
            }
            // Checked whole before any is published: a bad event publishes nothing.
            for e in &batch.batch {
                check_event(node, app, e, true)?;
            }
            for e in batch.batch {
                trigger(node, app, e, true).await?;
            }
            Ok(json!({}))
        }
        ["channels"] => {
            expect(Method::GET)?;
            let prefix = param("filter_by_prefix").unwrap_or_default();
            let info = param("info").unwrap_or_default();
            let user_count = info.split(',').any(|i| i == "user_count");
            if user_count && !prefix.starts_with("presence-") {
                return Err(ApiError::bad_request("info=user_count needs filter_by_prefix=presence-"));
            }
            let mut channels = serde_json::Map::new();
            let mut listed = node.channels(|c| app.pusher_name(c).is_some_and(|n| n.starts_with(prefix.as_str())));
            listed.sort();
            for (channel, _) in listed {
                let Some(name) = app.pusher_name(&channel) else { continue };
                let mut entry = serde_json::Map::new();
                if user_count {
                    entry.insert("user_count".into(), users(node, &channel).await?.len().into());
                }
                channels.insert(name.into_owned(), entry.into());
            }
            Ok(json!({ "channels": channels }))
        }
        ["channels", name] => {
            expect(Method::GET)?;
            let (channel, _) = app.channel(&node.config().channels, name).map_err(bad_channel)?;
            let info = param("info").unwrap_or_default();
            let subscribers = node.channel_subscribers(channel.as_str());
            let mut out = serde_json::Map::new();
            let mut occupied = subscribers > 0;
            if Kind::of(name) == Kind::Presence {
                let n = users(node, channel.as_str()).await?.len();
                occupied |= n > 0;
                if info.split(',').any(|i| i == "user_count") {
                    out.insert("user_count".into(), n.into());
                }
            } else if info.split(',').any(|i| i == "user_count") {
                return Err(ApiError::bad_request("user_count is only for presence channels"));
            }
            if info.split(',').any(|i| i == "subscription_count") {
                out.insert("subscription_count".into(), subscribers.into());
            }
            out.insert("occupied".into(), occupied.into());
            Ok(Value::Object(out))
        }
        ["channels", name, "users"] => {
            expect(Method::GET)?;
            if Kind::of(name) != Kind::Presence {
                return Err(ApiError::bad_request("users are listed for presence channels only"));
            }
            let (channel, _) = app.channel(&node.config().channels, name).map_err(bad_channel)?;
            let ids = users(node, channel.as_str()).await?;
            Ok(json!({ "users": ids.into_iter().map(|id| json!({ "id": id })).collect::<Vec<_>>() }))
        }
        ["users", user, "terminate_connections"] => {
            expect(Method::POST)?;
            let control = Control::Disconnect {
                code: protocol::close::UNAUTHORIZED,
                reason: "Connections terminated by the app".into(),
            };
            let n = node.control_user(&app.user_key(&percent_decode(user)), control);
            tracing::debug!(app = %app.id, connections = n, "terminate_connections");
            Ok(json!({}))
        }
        _ => Err(ApiError::not_found(format!("no Pusher API endpoint {method} /apps/{id}/{rest}"))),
    }
}

fn bad_channel(e: crate::channel::ChannelError) -> ApiError {
    ApiError::new(ErrorCode::InvalidChannel, e.to_string())
}

fn parse<'a, T: Deserialize<'a>>(body: &'a Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// The distinct user ids present on `channel`.
async fn users(node: &Node, channel: &str) -> Result<Vec<String>, ApiError> {
    let list = node.presence(channel).await.map_err(|(code, message)| ApiError::new(code, message))?;
    let mut ids: Vec<String> = list.into_iter().map(|e| e.user).filter(|u| !u.is_empty()).collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// The query as sent: `(key, value)` pairs, values not decoded (the signature covers them as
/// they are).
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.to_owned(), String::new()),
        })
        .collect()
}

/// `%XX` and `+` decoding for the values Herald reads (prefixes, user ids).
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks the request's signature, key, timestamp window and body digest. The messages say
/// what is wrong, never what was expected (no signature or secret is echoed).
fn check_signature(
    node: &Node,
    app: &PusherApp,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
) -> Result<(), ApiError> {
    let unauthorized = |m: &str| ApiError::new(ErrorCode::Unauthorized, m.to_owned());
    let get = |k: &str| query.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let (Some(key), Some(timestamp), Some(signature)) = (get("auth_key"), get("auth_timestamp"), get("auth_signature"))
    else {
        return Err(unauthorized("missing auth_key, auth_timestamp or auth_signature"));
    };
    if key != app.key {
        return Err(unauthorized("auth_key is not this app's key"));
    }
    if get("auth_version").is_some_and(|v| v != "1.0") {
        return Err(unauthorized("auth_version must be 1.0"));
    }
    let Ok(at) = timestamp.parse::<u64>() else { return Err(unauthorized("auth_timestamp is not a number")) };
    let window = node.config().pusher.timestamp_window.as_secs();
    if unix_now().abs_diff(at) > window {
        return Err(unauthorized(&format!(
            "auth_timestamp is more than {window} s from the server's time (pusher.timestamp_window): check the clock"
        )));
    }
    if !body.is_empty() || get("body_md5").is_some() {
        match get("body_md5") {
            Some(md5) if md5.eq_ignore_ascii_case(&auth::body_md5(body)) => {}
            Some(_) => return Err(unauthorized("body_md5 does not match the body")),
            None => return Err(unauthorized("a request with a body needs body_md5")),
        }
    }
    let message = auth::request_message(method.as_str(), path, query);
    if !auth::verify(&app.secret, &message, signature) {
        return Err(unauthorized(
            "invalid auth_signature: expected HMAC-SHA256 of METHOD\\nPATH\\nsorted query with the app secret",
        ));
    }
    Ok(())
}

/// `POST /apps/<id>/events` (one event, several channels) and an entry of `batch_events`.
#[derive(Debug, Deserialize)]
struct Event {
    name: String,
    data: Value,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
    /// Asked-for channel attributes in the answer; Herald answers `{}` (see the docs).
    #[serde(default)]
    #[allow(dead_code)]
    info: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Batch {
    batch: Vec<Event>,
}

impl Event {
    fn channels(&self) -> Vec<&str> {
        match (&self.channels, &self.channel) {
            (Some(list), _) => list.iter().map(String::as_str).collect(),
            (None, Some(c)) => vec![c.as_str()],
            (None, None) => Vec::new(),
        }
    }

    /// The event data as Pusher carries it: a string (other JSON is taken as its text).
    fn text(&self) -> std::borrow::Cow<'_, str> {
        match &self.data {
            Value::String(s) => s.as_str().into(),
            other => other.to_string().into(),
        }
    }
}

fn check_event(node: &Node, app: &PusherApp, e: &Event, single: bool) -> Result<(), ApiError> {
    let channels = e.channels();
    let max = if single { 1 } else { node.config().pusher.max_event_channels };
    if channels.is_empty() || channels.len() > max {
        let what = if single {
            "exactly one `channel`".to_owned()
        } else {
            format!("1 to {max} `channels` (pusher.max_event_channels)")
        };
        return Err(ApiError::bad_request(format!("an event names {what}")));
    }
    if e.name.is_empty() || e.name.len() > MAX_EVENT_NAME {
        return Err(ApiError::bad_request(format!("event `name` must be 1 to {MAX_EVENT_NAME} bytes")));
    }
    let size = e.text().len();
    if size > app.max_event_size {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("event data is {size} bytes, more than {} (pusher.apps.max_event_size)", app.max_event_size),
        ));
    }
    if e.socket_id.as_deref().is_some_and(|s| parse_socket_id(s).is_none()) {
        return Err(ApiError::bad_request("socket_id must look like 123.456"));
    }
    for c in channels {
        app.channel(&node.config().channels, c)
            .map_err(|err| ApiError::new(ErrorCode::InvalidChannel, format!("`{c}`: {err}")))?;
    }
    Ok(())
}

/// Publishes `e` to each of its channels (through `Node::publish`: history, other nodes,
/// subscribers of every door), excluding the connection `socket_id` names.
async fn trigger(node: &Node, app: &PusherApp, e: Event, single: bool) -> Result<(), ApiError> {
    check_event(node, app, &e, single)?;
    let config = node.config();
    let data = protocol::store_data(&e.text());
    // The app's limit is Pusher's; the namespace's holds too, as on every door.
    crate::rules::check_publication_size(&config.channels, data.len())
        .map_err(|(code, message)| ApiError::new(code, message))?;
    let tags = Arc::new(BTreeMap::from([("event".to_owned(), e.name.clone())]));
    let exclude = e.socket_id.as_deref().and_then(parse_socket_id);
    for c in e.channels() {
        let (channel, ns) = app.channel(&config.channels, c).map_err(bad_channel)?;
        let publish = Publish { data: data.clone(), info: None, tags: Some(tags.clone()), exclude };
        node.publish(&channel, ns, publish).await.map_err(|err| ApiError::new(err.code(), err.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_decode_for_use_and_stay_raw_for_signing() {
        let q = query_pairs("auth_key=k&filter_by_prefix=presence-&info=user_count%2Csubscription_count&x");
        assert_eq!(q[2].1, "user_count%2Csubscription_count");
        assert_eq!(percent_decode(&q[2].1), "user_count,subscription_count");
        assert_eq!(percent_decode("a+b%zz%4"), "a b%zz%4");
        assert_eq!(q[3], ("x".to_owned(), String::new()));
    }
}
