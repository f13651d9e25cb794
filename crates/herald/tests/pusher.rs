//! The Pusher door (`/app/<key>`) and the Pusher HTTP API (`/apps/<id>/...`) over real
//! sockets: what pusher-js and the `pusher` SDKs rely on, frame by frame. The unmodified
//! SDKs themselves run in `compat/pusher/`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use herald::config::Secret;
use herald::doors::pusher::{auth, PusherApp};
use herald::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "app-key";
const SECRET: &str = "app-secret";

fn app(id: &str, key: &str, namespace: &str) -> PusherApp {
    PusherApp {
        id: id.into(),
        key: key.into(),
        secret: Secret::new(SECRET),
        namespace: namespace.into(),
        client_events: true,
        max_event_size: 10 << 10,
        max_user_info_size: 1 << 10,
        max_presence_members: 100,
        user_authentication: false,
        event_name: "message".into(),
    }
}

fn config() -> Config {
    let mut c = Config::default();
    c.pusher.apps.push(app("1", KEY, ""));
    c
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw Pusher client: JSON frames as pusher-js sends them.
struct Client {
    ws: Ws,
    socket_id: String,
}

impl Client {
    async fn open(addr: SocketAddr, key: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/app/{key}?protocol=7&client=js&version=8"))
            .await
            .expect("connect");
        let mut c = Self { ws, socket_id: String::new() };
        let hello = c.next().await;
        assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
        let data: Value = serde_json::from_str(hello["data"].as_str().expect("data is a string")).expect("json");
        assert_eq!(data["activity_timeout"], 120);
        c.socket_id = data["socket_id"].as_str().expect("socket_id").to_owned();
        c
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.expect("send");
    }

    /// The next message (pings from the server included).
    async fn next(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                .await
                .expect("a message in time")
                .expect("open")
                .expect("frame");
            if let Message::Text(t) = msg {
                return serde_json::from_str(&t).expect("json");
            }
        }
    }

    /// Nothing arrives within `wait`.
    async fn silent(&mut self, wait: Duration) {
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(wait, self.ws.next()).await {
            panic!("unexpected message: {t}");
        }
    }

    /// The close code the server ends with.
    async fn closed(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await.expect("close in time") {
                Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    }

    fn sign(&self, channel: &str, channel_data: Option<&str>) -> String {
        let msg = auth::channel_message(&self.socket_id, channel, channel_data);
        format!("{KEY}:{}", auth::sign(&Secret::new(SECRET), &msg))
    }

    async fn subscribe(&mut self, channel: &str, user: Option<(&str, Value)>) -> Value {
        let data = match user {
            None if channel.starts_with("private-") => json!({"channel": channel, "auth": self.sign(channel, None)}),
            None => json!({"channel": channel}),
            Some((id, info)) => {
                let cd = json!({"user_id": id, "user_info": info}).to_string();
                json!({"channel": channel, "auth": self.sign(channel, Some(&cd)), "channel_data": cd})
            }
        };
        self.send(json!({"event": "pusher:subscribe", "data": data})).await;
        self.next().await
    }
}

/// A Pusher API request signed like the SDKs sign it.
async fn pusher_api(addr: SocketAddr, method: &str, path: &str, query: &str, body: &str) -> (u16, Value) {
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    pusher_api_at(addr, method, path, query, body, ts, SECRET).await
}

async fn pusher_api_at(
    addr: SocketAddr,
    method: &str,
    path: &str,
    query: &str,
    body: &str,
    ts: u64,
    secret: &str,
) -> (u16, Value) {
    let mut q = format!("auth_key={KEY}&auth_timestamp={ts}&auth_version=1.0");
    if !body.is_empty() {
        q.push_str(&format!("&body_md5={}", auth::body_md5(body.as_bytes())));
    }
    if !query.is_empty() {
        q.push('&');
        q.push_str(query);
    }
    let pairs: Vec<(String, String)> = q
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let sig = auth::sign(&Secret::new(secret), &auth::request_message(method, path, &pairs));
    let req = format!(
        "{method} {path}?{q}&auth_signature={sig} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    http(addr, &req).await
}

async fn trigger(addr: SocketAddr, body: Value) -> (u16, Value) {
    pusher_api(addr, "POST", "/apps/1/events", "", &body.to_string()).await
}

#[tokio::test]
async fn public_channel_gets_events_from_both_apis_as_strings() {
    let server = TestServer::start(config()).await;
    let mut c = Client::open(server.addr, KEY).await;
    let ok = c.subscribe("news", None).await;
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded", "{ok}");
    assert_eq!(ok["channel"], "news");

    // Through the Pusher API: the event name and the data string come back exactly.
    let (status, body) = trigger(server.addr, json!({"name": "story", "channel": "news", "data": "{\"t\":1}"})).await;
    assert_eq!((status, &body), (200, &json!({})), "{body}");
    let got = c.next().await;
    assert_eq!(
        (got["event"].as_str(), got["channel"].as_str(), got["data"].as_str()),
        (Some("story"), Some("news"), Some("{\"t\":1}"))
    );
    let (status, _) = trigger(server.addr, json!({"name": "plain", "channels": ["news"], "data": "not json"})).await;
    assert_eq!(status, 200);
    assert_eq!(c.next().await["data"], "not json");

    // Through Herald's own API: the app's default event name, JSON data as its text.
    let (status, body) = api(server.addr, "publish", r#"{"channel":"news","data":{"a":[1,2]}}"#, None).await;
    assert_eq!(status, 200, "{body}");
    let got = c.next().await;
    assert_eq!(got["event"], "message");
    assert_eq!(serde_json::from_str::<Value>(got["data"].as_str().expect("string")).expect("json"), json!({"a":[1,2]}));

    // The Pusher publication is in Herald's history, readable by native clients as JSON.
    let (_, h) = api(server.addr, "history", r#"{"channel":"news","limit":10}"#, None).await;
    assert_eq!(h["offset"], 3, "{h}");

    c.send(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(c.next().await["event"], "pusher:pong");
    c.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "news"}})).await;
    c.send(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(c.next().await["event"], "pusher:pong", "unsubscribed: the pong comes first");
    trigger(server.addr, json!({"name": "x", "channel": "news", "data": "1"})).await;
    c.silent(Duration::from_millis(300)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn private_channels_need_the_backends_signature() {
    let server = TestServer::start(config()).await;
    let mut c = Client::open(server.addr, KEY).await;
    c.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-a", "auth": format!("{KEY}:00")}})).await;
    let err = c.next().await;
    assert_eq!(err["event"], "pusher:subscription_error", "{err}");
    assert_eq!(err["data"]["status"], 401);
    // Signed for another socket: refused too.
    let other = auth::sign(&Secret::new(SECRET), &auth::channel_message("1.2", "private-a", None));
    c.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-a", "auth": format!("{KEY}:{other}")}}))
        .await;
    assert_eq!(c.next().await["data"]["status"], 401);
    c.send(json!({"event": "pusher:subscribe", "data": {"channel": "presence-a", "auth": c.sign("presence-a", None)}}))
        .await;
    assert_eq!(c.next().await["event"], "pusher:subscription_error", "presence without channel_data");
    let ok = c.subscribe("private-a", None).await;
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded", "{ok}");
    c.send(json!({"event": "pusher:subscribe", "data": {"channel": "bad;name"}})).await;
    assert_eq!(c.next().await["data"]["status"], 400);
    server.shutdown().await;
}

/// A presence member's `user_info` is bounded (`max_user_info_size`, Pusher's 1 KB) and so is
/// the member count (`max_presence_members`): the member list a subscriber gets is bounded.
#[tokio::test]
async fn presence_user_info_and_member_count_are_bounded() {
    let mut c = config();
    c.pusher.apps[0].max_presence_members = 3;
    let server = TestServer::start(c).await;
    let mut big = Client::open(server.addr, KEY).await;
    // A JSON string of 1023 characters plus its quotes: 1025 bytes, one more than the limit.
    let err = big.subscribe("presence-room", Some(("9", json!("x".repeat(1023))))).await;
    assert_eq!(err["event"], "pusher:subscription_error", "{err}");
    assert_eq!(err["data"]["status"], 400, "{err}");
    assert!(err["data"]["error"].as_str().is_some_and(|e| e.contains("max_user_info_size")), "{err}");
    let ok = big.subscribe("presence-room", Some(("9", json!("x".repeat(1022))))).await;
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded", "1024 bytes fit: {ok}");

    let mut members = Vec::new();
    for user in ["1", "2"] {
        let mut m = Client::open(server.addr, KEY).await;
        let ok = m.subscribe("presence-room", Some((user, json!({"name": user})))).await;
        assert_eq!(ok["event"], "pusher_internal:subscription_succeeded", "{ok}");
        members.push(m);
    }
    // Hears the join of user 2.
    assert_eq!(members[0].next().await["event"], "pusher_internal:member_added");
    let mut fourth = Client::open(server.addr, KEY).await;
    let err = fourth.subscribe("presence-room", Some(("4", json!(null)))).await;
    assert_eq!(err["event"], "pusher:subscription_error", "{err}");
    assert_eq!(err["data"]["status"], 400, "{err}");
    assert!(err["data"]["error"].as_str().is_some_and(|e| e.contains("max_presence_members")), "{err}");
    // A second tab of a member is no new member.
    let mut tab = Client::open(server.addr, KEY).await;
    let ok = tab.subscribe("presence-room", Some(("1", json!({"name": "1"})))).await;
    let data: Value = serde_json::from_str(ok["data"].as_str().expect("string")).expect("json");
    assert_eq!(data["presence"]["count"], 3, "{data}");
    assert!(data["presence"]["hash"].get("4").is_none(), "the refused user is no member: {data}");
    let (_, users) = pusher_api(server.addr, "GET", "/apps/1/channels/presence-room/users", "", "").await;
    assert_eq!(users["users"].as_array().map(Vec::len), Some(3), "{users}");
    members[0].silent(Duration::from_millis(200)).await;

    // Once a member leaves there is room again.
    big.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "presence-room"}})).await;
    assert_eq!(members[0].next().await["event"], "pusher_internal:member_removed");
    let ok = fourth.subscribe("presence-room", Some(("4", json!(null)))).await;
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded", "{ok}");
    server.shutdown().await;
}

#[tokio::test]
async fn presence_members_come_and_go_by_user() {
    let server = TestServer::start(config()).await;
    let mut a = Client::open(server.addr, KEY).await;
    let ok = a.subscribe("presence-room", Some(("1", json!({"name": "Ann"})))).await;
    let data: Value = serde_json::from_str(ok["data"].as_str().expect("string")).expect("json");
    assert_eq!(data["presence"]["count"], 1, "{data}");
    assert_eq!(data["presence"]["hash"]["1"]["name"], "Ann");

    let mut b = Client::open(server.addr, KEY).await;
    let ok = b.subscribe("presence-room", Some(("2", json!({"name": "Bob"})))).await;
    let data: Value = serde_json::from_str(ok["data"].as_str().expect("string")).expect("json");
    assert_eq!(data["presence"]["count"], 2, "{data}");
    let mut ids: Vec<&str> =
        data["presence"]["ids"].as_array().expect("ids").iter().filter_map(Value::as_str).collect();
    ids.sort();
    assert_eq!(ids, ["1", "2"]);
    let added = a.next().await;
    assert_eq!(added["event"], "pusher_internal:member_added", "{added}");
    let member: Value = serde_json::from_str(added["data"].as_str().expect("string")).expect("json");
    assert_eq!(member, json!({"user_id": "2", "user_info": {"name": "Bob"}}));

    // A second connection of user 2 is not a new member; its leaving is not a departure.
    let mut b2 = Client::open(server.addr, KEY).await;
    b2.subscribe("presence-room", Some(("2", json!({"name": "Bob"})))).await;
    b2.ws.close(None).await.expect("close");
    drop(b2);
    a.silent(Duration::from_millis(300)).await;

    let (status, users) = pusher_api(server.addr, "GET", "/apps/1/channels/presence-room/users", "", "").await;
    assert_eq!(status, 200, "{users}");
    assert_eq!(users, json!({"users": [{"id": "1"}, {"id": "2"}]}));
    // b2's connection ends once its close handshake is over: poll, bounded.
    let mut info = Value::Null;
    for _ in 0..50 {
        info =
            pusher_api(server.addr, "GET", "/apps/1/channels/presence-room", "info=user_count,subscription_count", "")
                .await
                .1;
        if info["subscription_count"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(info, json!({"user_count": 2, "subscription_count": 2, "occupied": true}));
    let (_, list) =
        pusher_api(server.addr, "GET", "/apps/1/channels", "filter_by_prefix=presence-&info=user_count", "").await;
    assert_eq!(list, json!({"channels": {"presence-room": {"user_count": 2}}}));

    b.ws.close(None).await.expect("close");
    let removed = a.next().await;
    assert_eq!(removed["event"], "pusher_internal:member_removed", "{removed}");
    assert_eq!(removed["data"], "{\"user_id\":\"2\"}");
    server.shutdown().await;
}

#[tokio::test]
async fn client_events_reach_the_others_only_where_allowed() {
    let mut c = config();
    c.pusher.apps[0].max_event_size = 100;
    let server = TestServer::start(c).await;
    let mut a = Client::open(server.addr, KEY).await;
    let mut b = Client::open(server.addr, KEY).await;
    a.subscribe("presence-chat", Some(("1", json!(null)))).await;
    b.subscribe("presence-chat", Some(("2", json!(null)))).await;
    assert_eq!(a.next().await["event"], "pusher_internal:member_added");
    a.send(json!({"event": "client-typing", "channel": "presence-chat", "data": {"on": true}})).await;
    let got = b.next().await;
    assert_eq!(
        got,
        json!({"event": "client-typing", "channel": "presence-chat", "data": {"on": true}, "user_id": "1"})
    );
    a.silent(Duration::from_millis(200)).await;

    a.send(json!({"event": "client-big", "channel": "presence-chat", "data": "x".repeat(200)})).await;
    let err = a.next().await;
    assert_eq!((err["event"].as_str(), err["data"]["code"].as_u64()), (Some("pusher:error"), Some(4301)), "{err}");
    a.subscribe("public", None).await;
    a.send(json!({"event": "client-x", "channel": "public", "data": {}})).await;
    assert_eq!(a.next().await["event"], "pusher:error", "not on public channels");
    a.send(json!({"event": "client-x", "channel": "private-never", "data": {}})).await;
    assert_eq!(a.next().await["event"], "pusher:error", "not on channels it is not subscribed to");
    b.silent(Duration::from_millis(200)).await;
    server.shutdown().await;

    let mut c = config();
    c.pusher.apps[0].client_events = false;
    let server = TestServer::start(c).await;
    let mut a = Client::open(server.addr, KEY).await;
    a.subscribe("private-x", None).await;
    a.send(json!({"event": "client-x", "channel": "private-x", "data": {}})).await;
    assert_eq!(a.next().await["event"], "pusher:error", "disabled for the app");
    server.shutdown().await;
}

#[tokio::test]
async fn client_event_names_longer_than_200_bytes_are_refused_with_4301() {
    let server = TestServer::start(config()).await;
    let mut a = Client::open(server.addr, KEY).await;
    let mut b = Client::open(server.addr, KEY).await;
    a.subscribe("private-chat", None).await;
    b.subscribe("private-chat", None).await;
    for len in [201, 120_000] {
        let event = format!("client-{}", "n".repeat(len - "client-".len()));
        a.send(json!({"event": event, "channel": "private-chat", "data": {}})).await;
        let err = a.next().await;
        assert_eq!((err["event"].as_str(), err["data"]["code"].as_u64()), (Some("pusher:error"), Some(4301)), "{len}");
        assert!(err["data"]["message"].as_str().is_some_and(|m| m.contains("200")), "{err}");
    }
    b.silent(Duration::from_millis(200)).await;
    // The longest allowed name still goes through, and the connection is unharmed.
    let event = format!("client-{}", "n".repeat(200 - "client-".len()));
    a.send(json!({"event": event, "channel": "private-chat", "data": {}})).await;
    assert_eq!(b.next().await["event"].as_str(), Some(event.as_str()));
    server.shutdown().await;
}

#[tokio::test]
async fn socket_id_exclusion_and_batches() {
    let server = TestServer::start(config()).await;
    let mut a = Client::open(server.addr, KEY).await;
    let mut b = Client::open(server.addr, KEY).await;
    a.subscribe("feed", None).await;
    b.subscribe("feed", None).await;
    let (status, _) =
        trigger(server.addr, json!({"name": "e", "channel": "feed", "data": "1", "socket_id": a.socket_id})).await;
    assert_eq!(status, 200);
    assert_eq!(b.next().await["data"], "1");
    a.silent(Duration::from_millis(300)).await;

    let batch = json!({"batch": [
        {"name": "one", "channel": "feed", "data": "a"},
        {"name": "two", "channel": "feed", "data": "b"},
    ]});
    let (status, body) = pusher_api(server.addr, "POST", "/apps/1/batch_events", "", &batch.to_string()).await;
    assert_eq!(status, 200, "{body}");
    for name in ["one", "two"] {
        assert_eq!(a.next().await["event"], name);
    }
    let bad = json!({"batch": [{"name": "ok", "channel": "feed", "data": "a"}, {"name": "bad", "channel": "a;b", "data": "b"}]});
    let (status, body) = pusher_api(server.addr, "POST", "/apps/1/batch_events", "", &bad.to_string()).await;
    assert_eq!((status, body["error"]["code"].as_u64()), (400, Some(102)), "{body}");
    a.silent(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn api_requests_must_be_signed_fresh_and_whole() {
    let mut c = config();
    c.pusher.apps[0].max_event_size = 50;
    let server = TestServer::start(c).await;
    let a = server.addr;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let body = json!({"name": "e", "channel": "x", "data": "1"}).to_string();
    let cases = [
        ("wrong secret", pusher_api_at(a, "POST", "/apps/1/events", "", &body, now, "nope").await, 401, 101),
        ("stale", pusher_api_at(a, "POST", "/apps/1/events", "", &body, now - 601, SECRET).await, 401, 101),
        ("no app", pusher_api(a, "POST", "/apps/9/events", "", &body).await, 404, 111),
        ("not json", pusher_api(a, "POST", "/apps/1/events", "", "{").await, 400, 107),
        (
            "too big",
            pusher_api(
                a,
                "POST",
                "/apps/1/events",
                "",
                &json!({"name":"e","channel":"x","data":"x".repeat(51)}).to_string(),
            )
            .await,
            413,
            112,
        ),
        ("users of a public channel", pusher_api(a, "GET", "/apps/1/channels/x/users", "", "").await, 400, 107),
        ("unknown", pusher_api(a, "GET", "/apps/1/nothing", "", "").await, 404, 111),
    ];
    for (what, (status, body), want_status, want_code) in cases {
        assert_eq!(status, want_status, "{what}: {body}");
        assert_eq!(body["error"]["code"], want_code, "{what}: {body}");
        assert!(!body.to_string().contains(SECRET), "{what}: the secret is never echoed");
    }
    // A body changed after signing: body_md5 no longer matches.
    let q = format!("auth_key={KEY}&auth_timestamp={now}&auth_version=1.0&body_md5={}", auth::body_md5(b"{}"));
    let req = format!(
        "POST /apps/1/events?{q}&auth_signature=00 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, got) = http(a, &req).await;
    assert_eq!(status, 401, "{got}");
    server.shutdown().await;
}

#[tokio::test]
async fn refusals_close_with_pushers_codes() {
    let server = TestServer::start(config()).await;
    for (path, code) in [
        ("/app/nope?protocol=7".to_owned(), 4001u16),
        (format!("/app/{KEY}"), 4008),
        (format!("/app/{KEY}?protocol=3"), 4007),
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url(&path)).await.expect("upgrade");
        let first = ws.next().await.expect("frame").expect("ok");
        let err: Value = serde_json::from_str(first.to_text().expect("text")).expect("json");
        assert_eq!(
            (err["event"].as_str(), err["data"]["code"].as_u64()),
            (Some("pusher:error"), Some(u64::from(code))),
            "{path}"
        );
        let Some(Ok(Message::Close(Some(f)))) = ws.next().await else { panic!("{path}: no close") };
        assert_eq!(u16::from(f.code), code, "{path}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn signin_and_terminate_connections() {
    let mut c = config();
    c.pusher.apps[0].user_authentication = true;
    c.pusher.signin_timeout = Duration::from_millis(500);
    let server = TestServer::start(c).await;

    let mut late = Client::open(server.addr, KEY).await;
    let mut c = Client::open(server.addr, KEY).await;
    c.send(json!({"event": "pusher:signin", "data": {"user_data": "{\"id\":\"7\"}", "auth": format!("{KEY}:00")}}))
        .await;
    assert_eq!(c.next().await["data"]["code"], 4009);
    assert_eq!(c.closed().await, 4009, "a bad signin closes");
    assert_eq!(late.next().await["data"]["code"], 4009, "no signin within the timeout");
    assert_eq!(late.closed().await, 4009);

    let mut c = Client::open(server.addr, KEY).await;
    let user_data = "{\"id\":\"7\",\"name\":\"Sue\"}";
    let sig = auth::sign(&Secret::new(SECRET), &auth::user_message(&c.socket_id, user_data));
    c.send(json!({"event": "pusher:signin", "data": {"user_data": user_data, "auth": format!("{KEY}:{sig}")}})).await;
    let ok = c.next().await;
    assert_eq!(ok["event"], "pusher:signin_success", "{ok}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.send(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(c.next().await["event"], "pusher:pong", "signed in: stays past the timeout");
    let (status, body) = pusher_api(server.addr, "POST", "/apps/1/users/7/terminate_connections", "", "{}").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.closed().await, 4009);
    server.shutdown().await;
}

#[tokio::test]
async fn a_silent_client_is_pinged_then_closed_4201() {
    let mut c = config();
    c.pusher.activity_timeout = Duration::from_secs(1);
    c.websocket.pong_timeout = Duration::from_secs(1);
    let server = TestServer::start(c).await;
    let (ws, _) = tokio_tungstenite::connect_async(server.ws_url(&format!("/app/{KEY}?protocol=7"))).await.expect("ws");
    let mut c = Client { ws, socket_id: String::new() };
    let hello = c.next().await;
    assert!(hello["data"].as_str().expect("string").contains("\"activity_timeout\":1"), "{hello}");
    assert_eq!(c.next().await["event"], "pusher:ping");
    assert_eq!(c.closed().await, 4201);
    server.shutdown().await;
}

#[tokio::test]
async fn apps_do_not_see_each_others_channels() {
    let mut c = Config::default();
    c.channels.namespaces.insert("a".into(), Default::default());
    c.channels.namespaces.insert("b".into(), Default::default());
    c.pusher.apps.push(app("1", KEY, "a"));
    c.pusher.apps.push(app("2", "other-key", "b"));
    let server = TestServer::start(c).await;
    let mut one = Client::open(server.addr, KEY).await;
    let mut two = Client::open(server.addr, "other-key").await;
    one.subscribe("news", None).await;
    two.subscribe("news", None).await;
    let (status, body) = trigger(server.addr, json!({"name": "e", "channel": "news", "data": "for app 1"})).await;
    assert_eq!(status, 200, "{body}");
    let got = one.next().await;
    assert_eq!((got["channel"].as_str(), got["data"].as_str()), (Some("news"), Some("for app 1")));
    two.silent(Duration::from_millis(300)).await;
    // App 1's channels are Herald's `a:` channels; its listing shows only its own.
    let (_, h) = api(server.addr, "history", r#"{"channel":"a:news","limit":1}"#, None).await;
    assert_eq!(h["offset"], 1, "{h}");
    let (_, list) = pusher_api(server.addr, "GET", "/apps/1/channels", "", "").await;
    assert_eq!(list, json!({"channels": {"news": {}}}));
    server.shutdown().await;
}

#[tokio::test]
async fn a_pusher_client_that_does_not_read_is_closed_4100_so_it_reconnects() {
    let mut c = config();
    c.websocket.max_queue_bytes = 64 << 10;
    let server = TestServer::start(c).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(64 << 10).expect("SO_RCVBUF");
    let stream = socket.connect(server.addr).await.expect("connect");
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{}/app/{KEY}?protocol=7", server.addr), stream)
        .await
        .expect("upgrade");
    let mut c = Client { ws, socket_id: String::new() };
    assert_eq!(c.next().await["event"], "pusher:connection_established");
    assert_eq!(c.subscribe("flood", None).await["event"], "pusher_internal:subscription_succeeded");
    // 18 MB of publications while the client reads nothing: far beyond the socket buffers
    // (the kernel may grow the server's send buffer to a few MB) and the 64 KiB queue.
    let data = json!({"channel": "flood", "data": "x".repeat(60_000)}).to_string();
    for _ in 0..300 {
        let (status, _) = api(server.addr, "publish", &data, None).await;
        assert_eq!(status, 200);
    }
    // Pusher's 4000-4099 would tell pusher-js never to come back; 4100 means "back off, retry".
    assert_eq!(c.closed().await, 4100);
    server.shutdown().await;
}

fn redis_config(redis: &herald::engine::redis::test_server::RedisServer) -> Config {
    let mut c = config();
    c.engine.kind = herald::config::EngineKind::Redis;
    c.engine.redis.url = redis.url();
    c.engine.redis.timeout = Duration::from_millis(500);
    c
}

/// Two nodes sharing one real `redis-server`: members, client events and publications cross
/// nodes.
#[tokio::test]
async fn across_two_nodes_with_redis() {
    let redis = herald::engine::redis::test_server::RedisServer::start().expect("redis-server");
    let (one, two) = (TestServer::start(redis_config(&redis)).await, TestServer::start(redis_config(&redis)).await);
    let mut a = Client::open(one.addr, KEY).await;
    let mut b = Client::open(two.addr, KEY).await;
    assert_ne!(a.socket_id, b.socket_id);
    a.subscribe("presence-x", Some(("1", json!({"n": 1})))).await;
    let ok = b.subscribe("presence-x", Some(("2", json!({"n": 2})))).await;
    let data: Value = serde_json::from_str(ok["data"].as_str().expect("string")).expect("json");
    assert_eq!(data["presence"]["count"], 2, "shared presence: {data}");
    assert_eq!(a.next().await["event"], "pusher_internal:member_added", "through Redis");

    b.send(json!({"event": "client-hi", "channel": "presence-x", "data": {"from": 2}})).await;
    let got = a.next().await;
    assert_eq!((got["event"].as_str(), got["user_id"].as_str()), (Some("client-hi"), Some("2")), "{got}");
    b.silent(Duration::from_millis(200)).await;

    let body = json!({"name": "f", "channel": "presence-x", "data": "2"}).to_string();
    let (status, _) = pusher_api(two.addr, "POST", "/apps/1/events", "", &body).await;
    assert_eq!(status, 200);
    for c in [&mut a, &mut b] {
        let got = c.next().await;
        assert_eq!((got["channel"].as_str(), got["data"].as_str()), (Some("presence-x"), Some("2")), "{got}");
    }

    b.ws.close(None).await.expect("close");
    let removed = a.next().await;
    assert_eq!(removed["event"], "pusher_internal:member_removed", "{removed}");
    one.shutdown().await;
    two.shutdown().await;
}

/// A publication's tags (the Pusher event name) and its excluded connection travel through
/// Redis: the event keeps its name on every node and the excluded socket, on another node,
/// does not get it.
#[tokio::test]
async fn event_names_and_socket_id_exclusion_survive_redis() {
    let redis = herald::engine::redis::test_server::RedisServer::start().expect("redis-server");
    let (one, two) = (TestServer::start(redis_config(&redis)).await, TestServer::start(redis_config(&redis)).await);
    let mut a = Client::open(one.addr, KEY).await;
    let mut b = Client::open(two.addr, KEY).await;
    a.subscribe("x", None).await;
    b.subscribe("x", None).await;
    let body = json!({"name": "e", "channel": "x", "data": "1", "socket_id": b.socket_id}).to_string();
    let (status, _) = pusher_api(one.addr, "POST", "/apps/1/events", "", &body).await;
    assert_eq!(status, 200);
    assert_eq!(a.next().await["event"], "e");
    b.silent(Duration::from_millis(300)).await;
    one.shutdown().await;
    two.shutdown().await;
}

#[tokio::test]
async fn the_namespace_publication_limit_holds_on_the_pusher_api_too() {
    let mut c = config();
    c.pusher.apps[0].max_event_size = 50_000;
    c.channels.max_publication_size = 1000;
    let server = TestServer::start(c).await;
    let body = json!({"name": "e", "channel": "x", "data": "x".repeat(2000)}).to_string();
    let (status, got) = pusher_api(server.addr, "POST", "/apps/1/events", "", &body).await;
    assert_eq!((status, got["error"]["code"].as_u64()), (413, Some(112)), "{got}");
    assert!(got["error"]["message"].as_str().is_some_and(|m| m.contains("channels.max_publication_size")), "{got}");
    server.shutdown().await;
}

/// A webhook request as received: its `X-Pusher-Signature` and its body.
type Hook = (Option<String>, bytes::Bytes);

/// A Pusher-format webhook receiver sees the app's events under the app's channel names:
/// members and client events of the door, signed with the app's secret.
#[tokio::test]
async fn webhooks_in_pushers_format_carry_the_apps_channel_names() {
    use std::sync::{Arc, Mutex};
    // A receiver: every request body, answered 200.
    let bodies: Arc<Mutex<Vec<Hook>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hooks", listener.local_addr().expect("addr"));
    let receiver = tokio::spawn({
        let bodies = bodies.clone();
        async move {
            while let Ok((stream, _)) = listener.accept().await {
                let bodies = bodies.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let bodies = bodies.clone();
                        async move {
                            let sig = req
                                .headers()
                                .get("x-pusher-signature")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            let body = axum::body::to_bytes(axum::body::Body::new(req.into_body()), 1 << 20)
                                .await
                                .unwrap_or_default();
                            bodies.lock().expect("log").push((sig, body));
                            Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        }
    });
    let mut c = Config::default();
    c.channels.namespaces.insert("shop".into(), Default::default());
    c.pusher.apps.push(app("1", KEY, "shop"));
    c.webhooks.endpoints.push(herald::webhooks::EndpointConfig {
        url,
        format: herald::webhooks::WebhookFormat::Pusher,
        key: KEY.into(),
        secret: Secret::new(SECRET),
        ..Default::default()
    });
    let server = TestServer::start(c).await;
    let mut a = Client::open(server.addr, KEY).await;
    let mut b = Client::open(server.addr, KEY).await;
    a.subscribe("presence-room", Some(("1", json!(null)))).await;
    b.subscribe("presence-room", Some(("2", json!(null)))).await;
    b.send(json!({"event": "client-typing", "channel": "presence-room", "data": {"on": true}})).await;
    assert_eq!(a.next().await["event"], "pusher_internal:member_added");
    assert_eq!(a.next().await["event"], "client-typing");

    let mut events: Vec<Value> = Vec::new();
    for _ in 0..100 {
        events = bodies
            .lock()
            .expect("log")
            .iter()
            .flat_map(|(sig, body)| {
                let expected = auth::sign(&Secret::new(SECRET), std::str::from_utf8(body).expect("utf8"));
                assert_eq!(sig.as_deref(), Some(expected.as_str()), "signed with the app secret");
                serde_json::from_slice::<Value>(body).expect("json")["events"].as_array().cloned().unwrap_or_default()
            })
            .collect();
        if events.iter().any(|e| e["name"] == "client_event")
            && events.iter().filter(|e| e["name"] == "member_added").count() == 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = events.iter().find(|e| e["name"] == "client_event").expect("a client_event");
    assert_eq!(client["channel"], "presence-room", "the app's name, not Herald's shop:presence-room");
    assert_eq!((client["event"].as_str(), client["user_id"].as_str()), (Some("client-typing"), Some("2")));
    assert_eq!(client["socket_id"], b.socket_id.as_str());
    assert_eq!(
        serde_json::from_str::<Value>(client["data"].as_str().expect("string")).expect("json"),
        json!({"on": true})
    );
    let mut added: Vec<&str> =
        events.iter().filter(|e| e["name"] == "member_added").filter_map(|e| e["user_id"].as_str()).collect();
    added.sort();
    assert_eq!(added, ["1", "2"]);
    assert!(events.iter().all(|e| e["channel"] == "presence-room"), "{events:?}");
    server.shutdown().await;
    receiver.abort();
}

#[tokio::test]
async fn socket_ids_do_not_tell_the_next_connections_id() {
    let server = TestServer::start(config()).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let c = Client::open(server.addr, KEY).await;
        let (high, low) = c.socket_id.split_once('.').expect("high.low");
        ids.push((high.parse::<u64>().expect("number"), low.parse::<u64>().expect("number")));
    }
    // Before, the high half was the node's number and the low half counted up by one per
    // connection: the id before one's own was one less.
    let same_high = ids.windows(2).filter(|w| w[0].0 == w[1].0).count();
    let counting = ids.windows(2).filter(|w| w[1].1.wrapping_sub(w[0].1) <= 2).count();
    assert!(same_high == 0 && counting == 0, "{ids:?}");
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    server.shutdown().await;
}
