//! Centrifugo's client protocol (JSON), as centrifuge-js 5 and centrifuge-python speak it on
//! `/connection/websocket`, translated to and from protocol v1's types so that one session
//! serves both doors.
//!
//! The two protocols share their shape (`{"id":N,"<command>":{..}}`, pushes under `push`, `{}`
//! pings) but not every field: Centrifugo's clients send fields v1 refuses (`flag`, `data`,
//! `recoverable`, ...), read results under other names (`num_clients`, `presence`, `join.info`),
//! expect `expires` as a flag with a `ttl`, put several commands in one frame (one JSON object
//! per line), and number errors and closes in their own ranges. So this is a dialect, not a
//! superset: unknown fields are ignored here (Centrifugo's clients add fields over time), and
//! refused in v1.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::{
    ChannelRequest, ClientFrame, ClientInfo, CloseCode, Command, ConnectRequest, ErrorCode, FrameError, HistoryRequest,
    Position, Publication, PublishRequest, PushBody, RefreshRequest, ReplyResult, SubRefreshRequest, SubscribeRequest,
    SubscribeResult, UnsubscribeRequest,
};

/// What one line of a Centrifugo frame asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// A v1 frame: a command with an id, or `{}` (the answer to the server's ping).
    Frame(ClientFrame),
    /// `send`: an asynchronous message with no reply; Herald has nowhere to deliver it.
    Send,
}

/// Splits a Centrifugo frame into its commands (one JSON object per line) and parses each.
///
/// ```
/// use herald_protocol::{centrifugo, ClientFrame, Command};
/// let frame = b"{\"id\":1,\"subscribe\":{\"channel\":\"a\",\"flag\":1}}\n{\"id\":2,\"presence\":{\"channel\":\"a\"}}";
/// let lines: Vec<_> = centrifugo::parse_frame(frame).collect();
/// let Ok(centrifugo::Line::Frame(ClientFrame::Request { id: 1, command: Command::Subscribe(s) })) = &lines[0] else { panic!() };
/// assert_eq!((s.channel.as_str(), lines.len()), ("a", 2));
/// ```
pub fn parse_frame(bytes: &[u8]) -> impl Iterator<Item = Result<Line, FrameError>> + '_ {
    bytes.split(|b| *b == b'\n').filter(|line| !line.iter().all(u8::is_ascii_whitespace)).map(parse_line)
}

fn error(id: Option<u32>, code: ErrorCode, message: impl Into<String>) -> FrameError {
    FrameError { id, code, message: message.into() }
}

/// The command names Centrifugo's `Command` carries, in its own order of precedence.
const COMMANDS: [&str; 13] = [
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "presence",
    "presence_stats",
    "history",
    "ping",
    "send",
    "rpc",
    "refresh",
    "sub_refresh",
    "emulation",
];

/// Parses one command.
pub fn parse_line(bytes: &[u8]) -> Result<Line, FrameError> {
    let map: BTreeMap<&str, &RawValue> = serde_json::from_slice(bytes)
        .map_err(|e| error(None, ErrorCode::BadRequest, format!("not a JSON object: {e}")))?;
    if map.is_empty() {
        return Ok(Line::Frame(ClientFrame::Pong));
    }
    let id = match map.get("id") {
        None => 0,
        Some(raw) => serde_json::from_str::<u32>(raw.get())
            .map_err(|_| error(None, ErrorCode::BadRequest, "`id` must be an integer from 0 to 4294967295"))?,
    };
    let Some((name, raw)) = COMMANDS.iter().find_map(|name| map.get(name).map(|raw| (*name, *raw))) else {
        let keys: Vec<&str> = map.keys().copied().filter(|k| *k != "id").collect();
        return Err(error((id != 0).then_some(id), ErrorCode::UnknownCommand, format!("unknown command {keys:?}")));
    };
    if name == "send" {
        return Ok(Line::Send);
    }
    if id == 0 {
        return Err(error(None, ErrorCode::BadRequest, format!("`{name}` needs an `id` from 1 to 4294967295")));
    }
    fn body<'de, T: Deserialize<'de>>(id: u32, name: &str, raw: &'de RawValue) -> Result<T, FrameError> {
        serde_json::from_str(raw.get())
            .map_err(|e| error(Some(id), ErrorCode::BadRequest, format!("invalid `{name}`: {e}")))
    }
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let command = match name {
        "connect" => {
            let c: Connect = body(id, name, raw)?;
            Command::Connect(ConnectRequest { token: nonempty(c.token), name: c.name, version: c.version })
        }
        "subscribe" => {
            let s: Subscribe = body(id, name, raw)?;
            // centrifuge-js leaves out an offset of 0 and an empty epoch: recovering from
            // nothing, which answers `recovered: false` with the current position.
            let (epoch, offset) = if s.recover { (Some(s.epoch), Some(s.offset)) } else { (None, None) };
            Command::Subscribe(SubscribeRequest {
                channel: s.channel,
                recover: s.recover,
                epoch,
                offset,
                token: nonempty(s.token),
            })
        }
        "unsubscribe" => Command::Unsubscribe(UnsubscribeRequest { channel: body::<Channel>(id, name, raw)?.channel }),
        "publish" => {
            let p: Publish = body(id, name, raw)?;
            Command::Publish(PublishRequest { channel: p.channel, data: p.data })
        }
        "presence" => Command::Presence(ChannelRequest { channel: body::<Channel>(id, name, raw)?.channel }),
        "presence_stats" => Command::PresenceStats(ChannelRequest { channel: body::<Channel>(id, name, raw)?.channel }),
        "history" => {
            let h: History = body(id, name, raw)?;
            // Centrifugo: no limit (or 0) asks for the position only, a negative one for all.
            let limit = match h.limit {
                l if l < 0 => None,
                l => Some(u32::try_from(l).unwrap_or(u32::MAX)),
            };
            let since = h.since.map(|s| Position { epoch: s.epoch, offset: s.offset });
            Command::History(HistoryRequest { channel: h.channel, limit, since, reverse: h.reverse })
        }
        "refresh" => Command::Refresh(RefreshRequest { token: body::<Token>(id, name, raw)?.token }),
        "sub_refresh" => {
            let r: SubRefresh = body(id, name, raw)?;
            Command::SubRefresh(SubRefreshRequest { channel: r.channel, token: r.token })
        }
        "rpc" => {
            return Err(error(
                Some(id),
                ErrorCode::NotAvailable,
                "RPC is not available on Herald: call your backend over HTTP instead",
            ))
        }
        // `ping` (client pings, before protocol v2) and `emulation` (HTTP-streaming transports).
        other => return Err(error(Some(id), ErrorCode::NotAvailable, format!("`{other}` is not available on Herald"))),
    };
    Ok(Line::Frame(ClientFrame::Request { id, command }))
}

#[derive(Deserialize)]
struct Connect {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    version: Option<String>,
}

#[derive(Deserialize)]
struct Subscribe {
    channel: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    recover: bool,
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    offset: u64,
}

#[derive(Deserialize)]
struct Channel {
    channel: String,
}

#[derive(Deserialize)]
struct Publish {
    channel: String,
    data: Box<RawValue>,
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    epoch: String,
}

#[derive(Deserialize)]
struct History {
    channel: String,
    #[serde(default)]
    limit: i64,
    #[serde(default)]
    since: Option<Since>,
    #[serde(default)]
    reverse: bool,
}

#[derive(Deserialize)]
struct Token {
    token: String,
}

#[derive(Deserialize)]
struct SubRefresh {
    channel: String,
    token: String,
}

/// What a Centrifugo result needs beyond the v1 result.
#[derive(Debug, Clone, Copy)]
pub struct ReplyContext<'a> {
    /// Unix seconds now (turns v1's `expires` instants into Centrifugo's `ttl`).
    pub now: u64,
    /// This connection's client id and the server's version (in `refresh` results).
    pub client: &'a str,
    pub version: &'a str,
    /// When the connection token expires (Unix seconds), 0 without one.
    pub expires_at: u64,
    /// Whether the subscribed channel keeps history: Herald positions and recovers every
    /// such channel (Centrifugo's `force_recovery` and `force_positioning`).
    pub recoverable: bool,
    /// The tags of the result's publications, by index (v1's publications carry none); empty
    /// when there are none.
    pub tags: &'a [Option<&'a BTreeMap<String, String>>],
}

/// Centrifugo's error codes (100–199, its own table): a Herald code's nearest, and whether the
/// client may retry (`temporary`).
///
/// ```
/// use herald_protocol::{centrifugo, ErrorCode};
/// assert_eq!(centrifugo::error_code(ErrorCode::NotAvailable, ""), (108, false));
/// assert_eq!(centrifugo::error_code(ErrorCode::Unauthorized, "token expired"), (109, false));
/// ```
pub fn error_code(code: ErrorCode, message: &str) -> (u16, bool) {
    let n = match code {
        ErrorCode::Internal | ErrorCode::Unavailable | ErrorCode::RequestTimeout => 100,
        // An expired token is 109 ("token expired"): the SDKs then fetch a new one by themselves.
        ErrorCode::Unauthorized if message == "token expired" => 109,
        ErrorCode::Unauthorized => 101,
        ErrorCode::InvalidChannel => 102,
        ErrorCode::PermissionDenied | ErrorCode::TokenRequired | ErrorCode::OriginNotAllowed => 103,
        ErrorCode::UnknownCommand | ErrorCode::NotFound | ErrorCode::MethodNotAllowed => 104,
        ErrorCode::AlreadySubscribed => 105,
        ErrorCode::LimitExceeded | ErrorCode::NodeLimit | ErrorCode::TooLarge => 106,
        ErrorCode::BadRequest | ErrorCode::NotConnected | ErrorCode::NotSubscribed => 107,
        ErrorCode::NotAvailable => 108,
        ErrorCode::SubscriptionExpired => 109,
        ErrorCode::RateLimited => 111,
        ErrorCode::EpochMismatch => 112,
    };
    (n, code.retryable())
}

/// Centrifugo's disconnect code for a Herald close: 3000–3499 reconnect, 3500–3999 do not.
///
/// ```
/// use herald_protocol::{centrifugo, CloseCode};
/// assert_eq!(centrifugo::close_code(CloseCode::SlowConsumer).0, 3008);
/// ```
pub fn close_code(code: CloseCode) -> (u16, &'static str) {
    match code {
        CloseCode::SlowConsumer => (3008, "slow"),
        CloseCode::NoPong => (3012, "no pong"),
        CloseCode::ConnectTimeout => (3011, "connect timeout"),
        CloseCode::ServerError => (3004, "internal server error"),
        CloseCode::TokenExpired => (3005, "connection expired"),
        CloseCode::RateLimited => (3013, "too many requests"),
        CloseCode::ProtocolViolation => (3501, "bad request"),
        CloseCode::TooManyConnections => (3504, "connection limit"),
        CloseCode::ForceDisconnect => (3503, "force disconnect"),
        CloseCode::NotAnEndpoint | CloseCode::PublishNotAllowed | CloseCode::SubscribeRefused => (3501, "bad request"),
    }
}

/// A Herald close code number (as the API's `disconnect` may carry) in Centrifugo's ranges;
/// numbers that are not Herald's pass unchanged.
pub fn close_number(code: u16, reason: &str) -> (u16, String) {
    match CloseCode::ALL.into_iter().find(|c| c.as_u16() == code) {
        Some(c) => {
            let (n, default) = close_code(c);
            (n, if reason.is_empty() { default.to_owned() } else { reason.to_owned() })
        }
        None => (code, reason.to_owned()),
    }
}

/// Encodes an error reply: `{"id":N,"error":{"code":C,"message":M,"temporary":true}}`.
pub fn encode_error(id: Option<u32>, code: ErrorCode, message: &str) -> Vec<u8> {
    let (n, temporary) = error_code(code, message);
    let mut error = json!({ "code": n, "message": message });
    if temporary {
        error["temporary"] = Value::Bool(true);
    }
    let frame = match id {
        Some(id) => json!({ "id": id, "error": error }),
        None => json!({ "error": error }),
    };
    frame.to_string().into_bytes()
}

fn client_info(info: &ClientInfo) -> Value {
    json!({ "user": info.user, "client": info.client })
}

fn publication(p: &Publication, tags: Option<&BTreeMap<String, String>>) -> Value {
    let mut out = Map::new();
    out.insert("data".into(), serde_json::from_str(p.data.get()).unwrap_or(Value::Null));
    if let Some(o) = p.offset {
        out.insert("offset".into(), o.into());
    }
    if let Some(i) = &p.info {
        out.insert("info".into(), client_info(i));
    }
    if let Some(t) = tags.filter(|t| !t.is_empty()) {
        out.insert("tags".into(), json!(t));
    }
    Value::Object(out)
}

fn publications(list: &[Publication], ctx: &ReplyContext<'_>) -> Value {
    list.iter().enumerate().map(|(i, p)| publication(p, ctx.tags.get(i).copied().flatten())).collect()
}

fn ttl(expires_at: u64, now: u64) -> u64 {
    expires_at.saturating_sub(now).max(1)
}

/// The body of a `subscribe` reply or push.
fn subscribe_result(r: &SubscribeResult, ctx: &ReplyContext<'_>) -> Value {
    let mut out = Map::new();
    if ctx.recoverable {
        out.insert("recoverable".into(), true.into());
        out.insert("positioned".into(), true.into());
    }
    out.insert("epoch".into(), r.epoch.clone().into());
    out.insert("offset".into(), r.offset.into());
    if let Some(recovered) = r.recovered {
        out.insert("was_recovering".into(), true.into());
        out.insert("recovered".into(), recovered.into());
    }
    if !r.publications.is_empty() {
        out.insert("publications".into(), publications(&r.publications, ctx));
    }
    if let Some(at) = r.expires {
        out.insert("expires".into(), true.into());
        out.insert("ttl".into(), ttl(at, ctx.now).into());
    }
    Value::Object(out)
}

/// Encodes a reply in Centrifugo's shape.
pub fn encode_reply(id: u32, result: &ReplyResult, ctx: &ReplyContext<'_>) -> Vec<u8> {
    let expiry = |at: u64| if at == 0 { json!({}) } else { json!({ "expires": true, "ttl": ttl(at, ctx.now) }) };
    let merge = |mut a: Value, b: Value| {
        if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
            a.extend(b);
        }
        a
    };
    let (name, body) = match result {
        ReplyResult::Connect(c) => (
            "connect",
            merge(
                json!({ "client": c.client, "version": c.version, "ping": c.ping, "pong": true }),
                expiry(ctx.expires_at),
            ),
        ),
        ReplyResult::Subscribe(r) => ("subscribe", subscribe_result(r, ctx)),
        ReplyResult::Unsubscribe => ("unsubscribe", json!({})),
        ReplyResult::Publish(_) => ("publish", json!({})),
        ReplyResult::History(h) => (
            "history",
            json!({
                "epoch": h.epoch,
                "offset": h.offset,
                "publications": publications(&h.publications, ctx),
            }),
        ),
        ReplyResult::Presence(p) => {
            let clients: Map<String, Value> = p
                .clients
                .iter()
                .map(|(id, c)| {
                    let mut v = json!({ "client": c.client, "user": c.user });
                    if let Some(info) = &c.info {
                        v["conn_info"] = info.clone();
                    }
                    (id.clone(), v)
                })
                .collect();
            ("presence", json!({ "presence": clients }))
        }
        ReplyResult::PresenceStats(s) => ("presence_stats", json!({ "num_clients": s.clients, "num_users": s.users })),
        ReplyResult::Refresh(r) => {
            ("refresh", merge(json!({ "client": ctx.client, "version": ctx.version }), expiry(r.expires)))
        }
        ReplyResult::SubRefresh(r) => ("sub_refresh", expiry(r.expires)),
        ReplyResult::Error(e) => {
            let code = ErrorCode::from_u16(e.code).unwrap_or(ErrorCode::Internal);
            return encode_error(Some(id), code, &e.message);
        }
    };
    let mut out = Map::new();
    out.insert("id".into(), id.into());
    out.insert(name.into(), body);
    Value::Object(out).to_string().into_bytes()
}

/// Encodes a push other than a publication (those go through [`encode_pub_push`]).
pub fn encode_push(channel: &str, body: &PushBody, ctx: &ReplyContext<'_>) -> Vec<u8> {
    let (name, body) = match body {
        PushBody::Pub(p) => ("pub", publication(p, None)),
        PushBody::Join(i) => ("join", json!({ "info": client_info(i) })),
        PushBody::Leave(i) => ("leave", json!({ "info": client_info(i) })),
        // 2000–2499: unsubscribed for good; 2500 and up: the SDK subscribes again (after an
        // expired subscription token, with a new one from its `getToken`).
        PushBody::Unsubscribe(u) => match u.code {
            Some(c) if c == ErrorCode::SubscriptionExpired.as_u16() => {
                ("unsubscribe", json!({ "code": 2501, "reason": "subscription expired" }))
            }
            _ => ("unsubscribe", json!({ "code": 2000, "reason": "server unsubscribe" })),
        },
        PushBody::Subscribe(r) => ("subscribe", subscribe_result(r, ctx)),
    };
    let mut push = Map::new();
    push.insert("channel".into(), channel.into());
    push.insert(name.into(), body);
    json!({ "push": push }).to_string().into_bytes()
}

/// Encodes a publication push, once per publication: `{"push":{"channel":..,"pub":{..}}}` with
/// `offset`, `data` (valid JSON, copied as is), `info` and `tags`.
pub fn encode_pub_push(
    channel: &str,
    offset: Option<u64>,
    data: &[u8],
    info: Option<&ClientInfo>,
    tags: Option<&BTreeMap<String, String>>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + channel.len() + data.len());
    out.extend_from_slice(b"{\"push\":{\"channel\":");
    let _ = serde_json::to_writer(&mut out, channel);
    out.extend_from_slice(b",\"pub\":{");
    if let Some(o) = offset {
        out.extend_from_slice(b"\"offset\":");
        out.extend_from_slice(o.to_string().as_bytes());
        out.push(b',');
    }
    out.extend_from_slice(b"\"data\":");
    out.extend_from_slice(data);
    if let Some(i) = info {
        out.extend_from_slice(b",\"info\":");
        let _ = serde_json::to_writer(&mut out, &client_info(i));
    }
    if let Some(t) = tags.filter(|t| !t.is_empty()) {
        out.extend_from_slice(b",\"tags\":");
        let _ = serde_json::to_writer(&mut out, t);
    }
    out.extend_from_slice(b"}}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ReplyContext<'static> {
        ReplyContext { now: 1000, client: "c1", version: "1", expires_at: 1060, recoverable: true, tags: &[] }
    }

    #[test]
    fn centrifuge_js_subscribe_fields_are_accepted() {
        let line = br#"{"id":3,"subscribe":{"channel":"chat:a","flag":1,"recoverable":true,"positioned":true,"join_leave":true,"recover":true,"epoch":"e1"}}"#;
        let Ok(Line::Frame(ClientFrame::Request { id: 3, command: Command::Subscribe(s) })) = parse_line(line) else {
            panic!("not a subscribe")
        };
        assert_eq!((s.recover, s.epoch.as_deref(), s.offset), (true, Some("e1"), Some(0)));
        let plain = parse_line(br#"{"id":4,"subscribe":{"channel":"a"}}"#).expect("parse");
        let Line::Frame(ClientFrame::Request { command: Command::Subscribe(s), .. }) = plain else { panic!() };
        assert_eq!((s.recover, s.epoch, s.offset), (false, None, None));
    }

    #[test]
    fn bad_lines_keep_their_id_and_rpc_is_refused_clearly() {
        let e = parse_line(br#"{"id":5,"rpc":{"method":"m"}}"#).expect_err("rpc");
        assert_eq!((e.id, e.code), (Some(5), ErrorCode::NotAvailable));
        let e = parse_line(br#"{"id":6,"subscribe":{}}"#).expect_err("no channel");
        assert_eq!((e.id, e.code), (Some(6), ErrorCode::BadRequest));
        let e = parse_line(br#"{"id":7,"frobnicate":{}}"#).expect_err("unknown");
        assert_eq!((e.id, e.code), (Some(7), ErrorCode::UnknownCommand));
        assert_eq!(parse_line(br#"{"send":{"data":1}}"#).expect("send"), Line::Send);
        assert_eq!(parse_line(b"{}").expect("pong"), Line::Frame(ClientFrame::Pong));
        assert!(parse_line(br#"{"connect":{}}"#).is_err(), "a command other than send needs an id");
        assert_eq!(parse_frame(b"{}\n\n{}\n").count(), 2, "blank lines are skipped");
    }

    #[test]
    fn history_limits_follow_centrifugo() {
        let limit = |l: &str| {
            let line = format!(r#"{{"id":1,"history":{{"channel":"a"{l}}}}}"#);
            match parse_line(line.as_bytes()) {
                Ok(Line::Frame(ClientFrame::Request { command: Command::History(h), .. })) => h.limit,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(limit(""), Some(0), "no limit: the position only");
        assert_eq!(limit(r#","limit":-1"#), None, "negative: everything kept");
        assert_eq!(limit(r#","limit":10"#), Some(10));
    }

    #[test]
    fn results_use_centrifugo_names() {
        let r = SubscribeResult { epoch: "e".into(), offset: 4, recovered: Some(true), ..Default::default() };
        let v: Value = serde_json::from_slice(&encode_reply(2, &ReplyResult::Subscribe(r), &ctx())).expect("json");
        assert_eq!(
            v,
            json!({"id":2,"subscribe":{"recoverable":true,"positioned":true,"epoch":"e","offset":4,"was_recovering":true,"recovered":true}})
        );
        let stats = ReplyResult::PresenceStats(crate::PresenceStatsResult { clients: 3, users: 2 });
        let v: Value = serde_json::from_slice(&encode_reply(3, &stats, &ctx())).expect("json");
        assert_eq!(v, json!({"id":3,"presence_stats":{"num_clients":3,"num_users":2}}));
        let connect = ReplyResult::Connect(crate::ConnectResult {
            client: "c1".into(),
            version: "1".into(),
            ping: 25,
            subscriptions: vec![],
        });
        let v: Value = serde_json::from_slice(&encode_reply(1, &connect, &ctx())).expect("json");
        assert_eq!(v["connect"], json!({"client":"c1","version":"1","ping":25,"pong":true,"expires":true,"ttl":60}));
        let v: Value = serde_json::from_slice(&encode_error(Some(9), ErrorCode::RateLimited, "slow")).expect("json");
        assert_eq!(v, json!({"id":9,"error":{"code":111,"message":"slow","temporary":true}}));
    }

    #[test]
    fn pushes_use_centrifugo_shapes() {
        let info = ClientInfo { user: "u".into(), client: "c".into() };
        let v: Value = serde_json::from_slice(&encode_push("a", &PushBody::Join(info.clone()), &ctx())).expect("json");
        assert_eq!(v, json!({"push":{"channel":"a","join":{"info":{"user":"u","client":"c"}}}}));
        let tags = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
        let v: Value = serde_json::from_slice(&encode_pub_push("a", Some(7), br#"{"x":1}"#, Some(&info), Some(&tags)))
            .expect("json");
        assert_eq!(
            v,
            json!({"push":{"channel":"a","pub":{"offset":7,"data":{"x":1},"info":{"user":"u","client":"c"},"tags":{"k":"v"}}}})
        );
    }

    #[test]
    fn every_close_code_maps_into_centrifugos_ranges() {
        for c in CloseCode::ALL {
            let (n, reason) = close_code(c);
            assert!((3000..4000).contains(&n), "{c:?}");
            assert_eq!(n < 3500, c.reconnect(), "{c:?}: same advice to reconnect");
            assert!(!reason.is_empty());
        }
        assert_eq!(close_number(4503, "bye").0, 3503);
        assert_eq!(close_number(4100, "custom"), (4100, "custom".to_owned()));
    }
}
