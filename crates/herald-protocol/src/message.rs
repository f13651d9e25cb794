//! Protocol v1 frames: one JSON object per WebSocket text frame.
//!
//! A client command is `{"id":N,"<command>":{...}}`; the reply carries the same `id` and
//! either `"<command>":{...result...}` or `"error":{...}`. Pushes have no `id`:
//! `{"push":{"channel":"..","pub":{..}}}`. An empty object `{}` is the app-level ping
//! (server → client) and pong (client → server).
//!
//! Parsing goes through a map of raw values, so publication data is never parsed into a tree
//! and an unknown command still yields its `id` for the error reply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{ErrorCode, ErrorDetail};

/// `connect`: the first command on a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    /// A connection token (JWT); absent for anonymous clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The client's name (for logs and presence), e.g. "web".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The client's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `subscribe`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeRequest {
    pub channel: String,
    /// Ask for the publications missed since `(epoch, offset)`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recover: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// A subscription token (JWT naming the user and this channel), for namespaces whose
    /// `subscribe` rule is `"token"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `sub_refresh`: a new subscription token before the current one expires.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubRefreshRequest {
    pub channel: String,
    pub token: String,
}

/// `unsubscribe`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsubscribeRequest {
    pub channel: String,
}

/// `publish`: any JSON value as `data`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub channel: String,
    pub data: Box<RawValue>,
}

impl PartialEq for PublishRequest {
    fn eq(&self, other: &Self) -> bool {
        self.channel == other.channel && self.data.get() == other.data.get()
    }
}

/// A channel position, as clients pass it back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// `history`: read a channel's kept publications.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRequest {
    pub channel: String,
    /// At most this many publications (default and maximum: the namespace's history size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only publications after this position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Position>,
    /// Newest first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reverse: bool,
}

/// `presence` and `presence_stats`: who is subscribed to a channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRequest {
    pub channel: String,
}

/// `refresh`: a new connection token before the current one expires.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub token: String,
}

/// A client command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Connect(ConnectRequest),
    Subscribe(SubscribeRequest),
    Unsubscribe(UnsubscribeRequest),
    Publish(PublishRequest),
    History(HistoryRequest),
    Presence(ChannelRequest),
    PresenceStats(ChannelRequest),
    Refresh(RefreshRequest),
    SubRefresh(SubRefreshRequest),
}

impl Command {
    /// The command's key on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Subscribe(_) => "subscribe",
            Self::Unsubscribe(_) => "unsubscribe",
            Self::Publish(_) => "publish",
            Self::History(_) => "history",
            Self::Presence(_) => "presence",
            Self::PresenceStats(_) => "presence_stats",
            Self::Refresh(_) => "refresh",
            Self::SubRefresh(_) => "sub_refresh",
        }
    }
}

/// What a client sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// `{}`: the answer to the server's ping.
    Pong,
    Request {
        id: u32,
        command: Command,
    },
}

/// A client frame that could not be understood. `id` is set when the frame had a usable
/// one, so the error reply can name the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FrameError {
    pub id: Option<u32>,
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    fn new(id: Option<u32>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self { id, code, message: message.into() }
    }
}

type RawMap<'a> = BTreeMap<&'a str, &'a RawValue>;

fn raw_map(bytes: &[u8]) -> Result<RawMap<'_>, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("not a JSON object: {e}"))
}

impl ClientFrame {
    /// Parses a client frame.
    ///
    /// ```
    /// use herald_protocol::{ClientFrame, Command};
    /// let f = ClientFrame::parse(br#"{"id":2,"subscribe":{"channel":"news"}}"#).unwrap();
    /// let ClientFrame::Request { id: 2, command: Command::Subscribe(s) } = f else { panic!() };
    /// assert_eq!(s.channel, "news");
    /// assert_eq!(ClientFrame::parse(b"{}").unwrap(), ClientFrame::Pong);
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<Self, FrameError> {
        let map = raw_map(bytes).map_err(|m| FrameError::new(None, ErrorCode::BadRequest, m))?;
        if map.is_empty() {
            return Ok(Self::Pong);
        }
        let id = match map.get("id") {
            Some(raw) => match serde_json::from_str::<u32>(raw.get()) {
                Ok(0) | Err(_) => {
                    return Err(FrameError::new(
                        None,
                        ErrorCode::BadRequest,
                        "`id` must be an integer from 1 to 4294967295",
                    ))
                }
                Ok(id) => id,
            },
            None => return Err(FrameError::new(None, ErrorCode::BadRequest, "missing `id`")),
        };
        let mut commands = map.iter().filter(|(k, _)| **k != "id");
        let (Some((&name, raw)), None) = (commands.next(), commands.next()) else {
            return Err(FrameError::new(Some(id), ErrorCode::BadRequest, "a request has `id` and exactly one command"));
        };
        fn body<'de, T: Deserialize<'de>>(id: u32, name: &str, raw: &'de RawValue) -> Result<T, FrameError> {
            serde_json::from_str(raw.get())
                .map_err(|e| FrameError::new(Some(id), ErrorCode::BadRequest, format!("invalid `{name}`: {e}")))
        }
        let command = match name {
            "connect" => Command::Connect(body(id, name, raw)?),
            "subscribe" => Command::Subscribe(body(id, name, raw)?),
            "unsubscribe" => Command::Unsubscribe(body(id, name, raw)?),
            "publish" => Command::Publish(body(id, name, raw)?),
            "history" => Command::History(body(id, name, raw)?),
            "presence" => Command::Presence(body(id, name, raw)?),
            "presence_stats" => Command::PresenceStats(body(id, name, raw)?),
            "refresh" => Command::Refresh(body(id, name, raw)?),
            "sub_refresh" => Command::SubRefresh(body(id, name, raw)?),
            other => {
                return Err(FrameError::new(Some(id), ErrorCode::UnknownCommand, format!("unknown command `{other}`")))
            }
        };
        Ok(Self::Request { id, command })
    }

    /// Encodes a request (what a client library sends).
    pub fn encode(&self) -> String {
        match self {
            Self::Pong => "{}".into(),
            Self::Request { id, command } => {
                let body = match command {
                    Command::Connect(c) => serde_json::to_string(c),
                    Command::Subscribe(c) => serde_json::to_string(c),
                    Command::Unsubscribe(c) => serde_json::to_string(c),
                    Command::Publish(c) => serde_json::to_string(c),
                    Command::History(c) => serde_json::to_string(c),
                    Command::Presence(c) | Command::PresenceStats(c) => serde_json::to_string(c),
                    Command::Refresh(c) => serde_json::to_string(c),
                    Command::SubRefresh(c) => serde_json::to_string(c),
                }
                .unwrap_or_else(|_| "{}".into());
                format!("{{\"id\":{id},\"{}\":{body}}}", command.name())
            }
        }
    }
}

/// Who published or joined: set when the publisher was an identified client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client: String,
}

/// One publication as pushed and as returned in recovery.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Publication {
    /// The channel position of this publication (absent on channels without positions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    pub data: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfo>,
}

impl PartialEq for Publication {
    fn eq(&self, other: &Self) -> bool {
        self.offset == other.offset && self.data.get() == other.data.get() && self.info == other.info
    }
}

/// Result of `connect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectResult {
    /// This connection's id.
    pub client: String,
    /// The server's version.
    pub version: String,
    /// Seconds between the server's pings; answer each with `{}`.
    pub ping: u32,
    /// Channels the server subscribed this connection to (the token's `channels` claim); a
    /// `subscribe` push for each follows, then their publications.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<String>,
}

/// Result of `subscribe`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscribeResult {
    /// The channel's epoch: changes when its history was lost.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    /// The channel's current offset: the last publication's.
    #[serde(default)]
    pub offset: u64,
    /// Present when the client asked to recover: whether every missed publication is below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<Publication>,
    /// For a subscription made with a token: when it ends (Unix seconds, before the server's
    /// leeway) unless refreshed with `sub_refresh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// The channel's namespace is conflated: pushes bring the newest publication at a bounded
    /// rate, so offsets jump (not a gap), and recovery returns only the newest missed one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conflated: bool,
}

/// Result of `publish`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResult {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[serde(default)]
    pub offset: u64,
}

/// Result of `history`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryResult {
    pub epoch: String,
    pub offset: u64,
    #[serde(default)]
    pub publications: Vec<Publication>,
}

/// One client in a presence list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceClient {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    pub client: String,
    /// The `info` claim of the client's connection token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// Result of `presence`: the clients subscribed, by client id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceResult {
    pub clients: BTreeMap<String, PresenceClient>,
}

/// Result of `presence_stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceStatsResult {
    /// Connections subscribed.
    pub clients: u64,
    /// Distinct users among them (each anonymous connection counts as one user).
    pub users: u64,
}

/// Result of `refresh`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshResult {
    /// When the new token expires (Unix seconds).
    pub expires: u64,
}

/// Result of `sub_refresh`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubRefreshResult {
    /// When the subscription now ends (Unix seconds).
    pub expires: u64,
}

/// Why the server ended a subscription (`unsubscribe` push). Both fields are absent when the
/// backend ended it through the API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsubscribed {
    /// An error code from the table, e.g. 117 when the subscription token expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// The result part of a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyResult {
    Connect(ConnectResult),
    Subscribe(SubscribeResult),
    Unsubscribe,
    Publish(PublishResult),
    History(HistoryResult),
    Presence(PresenceResult),
    PresenceStats(PresenceStatsResult),
    Refresh(RefreshResult),
    SubRefresh(SubRefreshResult),
    Error(ErrorDetail),
}

/// A push: something that happened on a channel.
#[derive(Debug, Clone, PartialEq)]
pub enum PushBody {
    Pub(Publication),
    Join(ClientInfo),
    Leave(ClientInfo),
    /// The server ended this subscription (API `unsubscribe`, or an expired subscription
    /// token); do not resubscribe by itself.
    Unsubscribe(Unsubscribed),
    /// The server subscribed this connection (a channel of the token's `channels` claim): the
    /// channel's position, before its first publication.
    Subscribe(SubscribeResult),
}

/// What a server sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerFrame {
    /// `{}`: answer with `{}`.
    Ping,
    Reply {
        id: u32,
        result: ReplyResult,
    },
    Push {
        channel: String,
        body: PushBody,
    },
    /// An error for a frame the server could not read at all (so it had no `id`).
    Error(ErrorDetail),
}

impl ServerFrame {
    /// Parses a server frame (what a client library receives).
    ///
    /// ```
    /// use herald_protocol::{PushBody, ServerFrame};
    /// let f = ServerFrame::parse(br#"{"push":{"channel":"news","pub":{"offset":3,"data":{"a":1}}}}"#).unwrap();
    /// let ServerFrame::Push { channel, body: PushBody::Pub(p) } = f else { panic!() };
    /// assert_eq!((channel.as_str(), p.offset, p.data.get()), ("news", Some(3), r#"{"a":1}"#));
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let map = raw_map(bytes)?;
        if map.is_empty() {
            return Ok(Self::Ping);
        }
        fn de<'de, T: Deserialize<'de>>(raw: &'de RawValue) -> Result<T, String> {
            serde_json::from_str(raw.get()).map_err(|e| e.to_string())
        }
        if let Some(push) = map.get("push") {
            #[derive(Deserialize)]
            struct PushRaw<'a> {
                channel: String,
                #[serde(borrow, rename = "pub")]
                publication: Option<&'a RawValue>,
                #[serde(borrow)]
                join: Option<&'a RawValue>,
                #[serde(borrow)]
                leave: Option<&'a RawValue>,
                #[serde(borrow)]
                unsubscribe: Option<&'a RawValue>,
                #[serde(borrow)]
                subscribe: Option<&'a RawValue>,
            }
            let p: PushRaw<'_> = de(push)?;
            let body = match (p.publication, p.join, p.leave, p.unsubscribe, p.subscribe) {
                (Some(raw), None, None, None, None) => PushBody::Pub(de(raw)?),
                (None, Some(raw), None, None, None) => PushBody::Join(de(raw)?),
                (None, None, Some(raw), None, None) => PushBody::Leave(de(raw)?),
                (None, None, None, Some(raw), None) => PushBody::Unsubscribe(de(raw)?),
                (None, None, None, None, Some(raw)) => PushBody::Subscribe(de(raw)?),
                _ => return Err("a push has exactly one of pub, join, leave, unsubscribe, subscribe".into()),
            };
            return Ok(Self::Push { channel: p.channel, body });
        }
        if let (None, Some(raw)) = (map.get("id"), map.get("error")) {
            return Ok(Self::Error(de(raw)?));
        }
        let id: u32 = de(map.get("id").ok_or("missing `id`")?)?;
        let mut rest = map.iter().filter(|(k, _)| **k != "id");
        let (Some((&name, raw)), None) = (rest.next(), rest.next()) else {
            return Err("a reply has `id` and exactly one result".into());
        };
        let result = match name {
            "connect" => ReplyResult::Connect(de(raw)?),
            "subscribe" => ReplyResult::Subscribe(de(raw)?),
            "unsubscribe" => ReplyResult::Unsubscribe,
            "publish" => ReplyResult::Publish(de(raw)?),
            "history" => ReplyResult::History(de(raw)?),
            "presence" => ReplyResult::Presence(de(raw)?),
            "presence_stats" => ReplyResult::PresenceStats(de(raw)?),
            "refresh" => ReplyResult::Refresh(de(raw)?),
            "sub_refresh" => ReplyResult::SubRefresh(de(raw)?),
            "error" => ReplyResult::Error(de(raw)?),
            other => return Err(format!("unknown result `{other}`")),
        };
        Ok(Self::Reply { id, result })
    }

    /// Encodes a server frame. The server's hot path uses [`encode_pub_push`] instead.
    pub fn encode(&self) -> String {
        let to = |v: &dyn erased::Ser| v.json();
        match self {
            Self::Ping => "{}".into(),
            Self::Reply { id, result } => {
                let (name, body) = match result {
                    ReplyResult::Connect(r) => ("connect", to(r)),
                    ReplyResult::Subscribe(r) => ("subscribe", to(r)),
                    ReplyResult::Unsubscribe => ("unsubscribe", "{}".into()),
                    ReplyResult::Publish(r) => ("publish", to(r)),
                    ReplyResult::History(r) => ("history", to(r)),
                    ReplyResult::Presence(r) => ("presence", to(r)),
                    ReplyResult::PresenceStats(r) => ("presence_stats", to(r)),
                    ReplyResult::Refresh(r) => ("refresh", to(r)),
                    ReplyResult::SubRefresh(r) => ("sub_refresh", to(r)),
                    ReplyResult::Error(e) => ("error", to(e)),
                };
                format!("{{\"id\":{id},\"{name}\":{body}}}")
            }
            Self::Push { channel, body } => {
                let (name, body) = match body {
                    PushBody::Pub(p) => ("pub", to(p)),
                    PushBody::Join(i) => ("join", to(i)),
                    PushBody::Leave(i) => ("leave", to(i)),
                    PushBody::Unsubscribe(u) => ("unsubscribe", to(u)),
                    PushBody::Subscribe(r) => ("subscribe", to(r)),
                };
                format!("{{\"push\":{{\"channel\":{},\"{name}\":{body}}}}}", to(channel))
            }
            Self::Error(e) => format!("{{\"error\":{}}}", to(e)),
        }
    }
}

mod erased {
    /// Serialize behind a `dyn`, for the encoder's table above.
    pub(super) trait Ser {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|_| "null".into())
        }
    }
}

/// Encodes a publication push without building a tree: `data` must already be valid JSON.
/// Called once per publication; every subscriber gets the same bytes.
pub fn encode_pub_push(channel: &str, offset: Option<u64>, data: &[u8], info: Option<&ClientInfo>) -> Vec<u8> {
    pub_push(channel, offset, data, info, false)
}

/// [`encode_pub_push`] for a conflated channel: the publication carries `"conflated":true`
/// (publications before it may have been skipped for this subscriber; its offset may jump).
pub fn encode_conflated_pub_push(channel: &str, offset: u64, data: &[u8], info: Option<&ClientInfo>) -> Vec<u8> {
    pub_push(channel, Some(offset), data, info, true)
}

fn pub_push(channel: &str, offset: Option<u64>, data: &[u8], info: Option<&ClientInfo>, conflated: bool) -> Vec<u8> {
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
        let _ = serde_json::to_writer(&mut out, i);
    }
    if conflated {
        out.extend_from_slice(b",\"conflated\":true");
    }
    out.extend_from_slice(b"}}}");
    out
}

/// Encodes a reply with a result (`{"id":N,"<name>":<result>}`).
pub fn encode_reply<T: Serialize>(id: u32, name: &str, result: &T) -> Vec<u8> {
    let mut out = format!("{{\"id\":{id},\"{name}\":").into_bytes();
    let _ = serde_json::to_writer(&mut out, result);
    out.push(b'}');
    out
}

/// Encodes an error reply; without an id when the request had none.
pub fn encode_error(id: Option<u32>, code: ErrorCode, message: &str) -> Vec<u8> {
    let detail = ErrorDetail { code: code.as_u16(), message: message.to_owned() };
    match id {
        Some(id) => encode_reply(id, "error", &detail),
        None => {
            let mut out = b"{\"error\":".to_vec();
            let _ = serde_json::to_writer(&mut out, &detail);
            out.push(b'}');
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_frames_keep_their_id_when_they_have_one() {
        let e = ClientFrame::parse(br#"{"id":7,"subscrib":{}}"#).expect_err("unknown");
        assert_eq!((e.id, e.code), (Some(7), ErrorCode::UnknownCommand));
        let e = ClientFrame::parse(br#"{"id":8,"subscribe":{"chanel":"x"}}"#).expect_err("bad field");
        assert_eq!((e.id, e.code), (Some(8), ErrorCode::BadRequest));
        let e = ClientFrame::parse(br#"{"id":9,"subscribe":{"channel":"x"},"publish":{}}"#).expect_err("two");
        assert_eq!((e.id, e.code), (Some(9), ErrorCode::BadRequest));
        let e = ClientFrame::parse(b"[1,2]").expect_err("not an object");
        assert_eq!((e.id, e.code), (None, ErrorCode::BadRequest));
        let e = ClientFrame::parse(br#"{"id":0,"connect":{}}"#).expect_err("id 0");
        assert_eq!(e.id, None);
        let e = ClientFrame::parse(br#"{"connect":{}}"#).expect_err("no id");
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn a_conflated_push_says_so_and_still_parses_as_a_publication() {
        let push = encode_conflated_pub_push("ticks", 9, b"1", None);
        assert_eq!(push, br#"{"push":{"channel":"ticks","pub":{"offset":9,"data":1,"conflated":true}}}"#);
        let ServerFrame::Push { body: PushBody::Pub(p), .. } = ServerFrame::parse(&push).expect("parses") else {
            panic!("not a pub push")
        };
        assert_eq!(p.offset, Some(9));
    }

    #[test]
    fn the_fast_push_encoder_matches_the_general_one() {
        let info = ClientInfo { user: "42".into(), client: "c1".into() };
        let fast = encode_pub_push("chat:\"q\"", Some(5), br#"{"t":"hi"}"#, Some(&info));
        let general = ServerFrame::Push {
            channel: "chat:\"q\"".into(),
            body: PushBody::Pub(Publication {
                offset: Some(5),
                data: RawValue::from_string(r#"{"t":"hi"}"#.into()).expect("raw"),
                info: Some(info),
            }),
        }
        .encode();
        assert_eq!(String::from_utf8(fast).expect("utf8"), general);
    }

    #[test]
    fn errors_encode_with_and_without_id() {
        assert_eq!(
            String::from_utf8(encode_error(Some(3), ErrorCode::PermissionDenied, "permission denied")).expect("utf8"),
            r#"{"id":3,"error":{"code":103,"message":"permission denied"}}"#
        );
        assert_eq!(
            String::from_utf8(encode_error(None, ErrorCode::BadRequest, "x")).expect("utf8"),
            r#"{"error":{"code":107,"message":"x"}}"#
        );
    }
}
