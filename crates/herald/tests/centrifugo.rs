//! Centrifugo's client protocol on `/connection/websocket`, frame by frame over a real socket:
//! the shapes centrifuge-js and centrifuge-python read (the SDKs themselves run in
//! `compat/centrifugo`).

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use herald::auth::AuthConfig;
use herald::config::NamespaceOptions;
use herald::secret::Secret;
use herald::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "centrifugo-compat-test-secret-of-enough-length";

fn config() -> Config {
    let mut c = Config { auth: AuthConfig { secret: Secret::new(SECRET), ..Default::default() }, ..Default::default() };
    c.channels.namespaces.insert(
        "chat".into(),
        NamespaceOptions { publish: true.into(), presence: true, join_leave: true, ..Default::default() },
    );
    c.channels.namespaces.insert("talk".into(), NamespaceOptions { publish: true.into(), ..Default::default() });
    c.channels.namespaces.insert("live".into(), NamespaceOptions { history_size: 0, ..Default::default() });
    c
}

fn token(user: &str, ttl: u64) -> String {
    let auth = AuthConfig { secret: Secret::new(SECRET), ..Default::default() };
    herald::auth::mint(&auth, user, Duration::from_secs(ttl), Some(json!({"name": user}))).expect("mint")
}

/// A token that expired a minute ago (beyond the 5 s leeway).
fn expired_token(user: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let claims = json!({"sub": user, "exp": now - 60});
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("sign")
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A client that speaks Centrifugo's JSON protocol as centrifuge-js does: commands batched one
/// per line, `{}` answered with `{}` (the connect reply says `pong: true`).
struct Cent {
    ws: Ws,
    next_id: u32,
    /// Replies and pushes not asked for yet, in arrival order.
    queue: std::collections::VecDeque<Value>,
    pings: usize,
}

impl Cent {
    async fn open(addr: std::net::SocketAddr) -> Self {
        let url = format!("ws://{addr}/connection/websocket");
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
        Self { ws, next_id: 1, queue: Default::default(), pings: 0 }
    }

    async fn connected(addr: std::net::SocketAddr, token: Option<String>) -> (Self, Value) {
        let mut c = Self::open(addr).await;
        let mut body = json!({"name": "js", "version": "5.7.4", "data": {"app": "test"}});
        if let Some(t) = token {
            body["token"] = t.into();
        }
        let r = c.request("connect", body).await;
        assert!(r.get("connect").is_some(), "{r}");
        (c, r)
    }

    async fn send(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Sends several commands in one frame; returns their ids.
    async fn batch(&mut self, commands: &[(&str, Value)]) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut lines = Vec::new();
        for (name, body) in commands {
            ids.push(self.next_id);
            lines.push(json!({ "id": self.next_id, *name: body }).to_string());
            self.next_id += 1;
        }
        self.send(lines.join("\n")).await;
        ids
    }

    async fn request(&mut self, name: &str, body: Value) -> Value {
        let id = self.batch(&[(name, body)]).await[0];
        self.reply(id).await
    }

    /// The next frame (each line of a frame counts as one), answering pings.
    async fn next(&mut self) -> Result<Value, Option<(u16, String)>> {
        loop {
            if let Some(v) = self.queue.pop_front() {
                return Ok(v);
            }
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await.expect("frame in time");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    for line in t.split('\n') {
                        let v: Value = serde_json::from_str(line).expect("json line");
                        if v.as_object().is_some_and(|o| o.is_empty()) {
                            self.pings += 1;
                            self.send("{}".into()).await;
                        } else {
                            self.queue.push_back(v);
                        }
                    }
                }
                Some(Ok(Message::Close(f))) => return Err(f.map(|f| (u16::from(f.code), f.reason.to_string()))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(None),
            }
        }
    }

    async fn reply(&mut self, id: u32) -> Value {
        let mut skipped = Vec::new();
        let found = loop {
            let f = self.next().await.expect("open");
            if f["id"].as_u64() == Some(u64::from(id)) {
                break f;
            }
            skipped.push(f);
        };
        for f in skipped.into_iter().rev() {
            self.queue.push_front(f);
        }
        found
    }

    async fn push(&mut self) -> Value {
        let f = self.next().await.expect("open");
        assert!(f.get("push").is_some(), "expected a push, got {f}");
        f["push"].clone()
    }
}

async fn publish(addr: std::net::SocketAddr, channel: &str, data: Value) -> Value {
    let (status, body) = api(addr, "publish", &json!({"channel": channel, "data": data}).to_string(), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn connect_subscribe_and_receive_in_centrifugos_shapes() {
    let server = TestServer::start(config()).await;
    let (mut c, r) = Cent::connected(server.addr, Some(token("42", 600))).await;
    let connect = &r["connect"];
    assert!(connect["client"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
    assert_eq!((connect["ping"].as_u64(), connect["pong"].as_bool()), (Some(25), Some(true)), "{r}");
    assert_eq!(connect["expires"], true, "{r}");
    assert!((590..=600).contains(&connect["ttl"].as_u64().expect("ttl")), "{r}");

    publish(server.addr, "news", json!({"n": 0})).await;
    // What centrifuge-js 5.7.4 sends: `flag`, `recoverable`, `positioned`, in one frame with
    // another command.
    let sub = json!({"channel": "news", "flag": 1, "recoverable": true, "positioned": true, "data": {"x": 1}});
    let ids = c.batch(&[("subscribe", sub), ("history", json!({"channel": "news", "limit": -1}))]).await;
    let s = c.reply(ids[0]).await;
    let s = &s["subscribe"];
    assert_eq!((s["recoverable"].as_bool(), s["positioned"].as_bool()), (Some(true), Some(true)), "{s}");
    assert_eq!(s["offset"], 1, "{s}");
    let epoch = s["epoch"].as_str().expect("epoch").to_owned();
    let h = c.reply(ids[1]).await;
    assert_eq!(h["history"]["publications"][0]["data"], json!({"n": 0}), "{h}");
    assert_eq!(h["history"]["epoch"], epoch.as_str());

    let body = publish(server.addr, "news", json!({"n": 1})).await;
    assert_eq!(body["offset"], 2);
    let p = c.push().await;
    assert_eq!(p["channel"], "news");
    assert_eq!(p["pub"], json!({"offset": 2, "data": {"n": 1}}));

    // A channel without history is neither positioned nor recoverable.
    let r = c.request("subscribe", json!({"channel": "live:a"})).await;
    assert!(r["subscribe"].get("recoverable").is_none(), "{r}");

    // Client publications carry who sent them; the publish result is `{}`.
    let r = c.request("subscribe", json!({"channel": "talk:room"})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    let r = c.request("publish", json!({"channel": "talk:room", "data": {"text": "hi"}})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    let p = c.push().await;
    assert_eq!(p["pub"]["info"]["user"], "42", "{p}");
    assert_eq!(p["pub"]["data"], json!({"text": "hi"}));
    server.shutdown().await;
}

#[tokio::test]
async fn a_reconnecting_client_recovers_what_it_missed() {
    let server = TestServer::start(config()).await;
    let (mut c, _) = Cent::connected(server.addr, None).await;
    let r = c.request("subscribe", json!({"channel": "news", "recoverable": true})).await;
    let epoch = r["subscribe"]["epoch"].as_str().expect("epoch").to_owned();
    publish(server.addr, "news", json!(1)).await;
    let offset = c.push().await["pub"]["offset"].as_u64().expect("offset");
    drop(c);
    for n in 2..=4 {
        publish(server.addr, "news", json!(n)).await;
    }
    let (mut c, _) = Cent::connected(server.addr, None).await;
    let r = c
        .request("subscribe", json!({"channel": "news", "recover": true, "epoch": epoch, "offset": offset, "flag": 1}))
        .await;
    let s = &r["subscribe"];
    assert_eq!((s["was_recovering"].as_bool(), s["recovered"].as_bool()), (Some(true), Some(true)), "{r}");
    let got: Vec<(u64, Value)> = s["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| (p["offset"].as_u64().expect("offset"), p["data"].clone()))
        .collect();
    assert_eq!(got, vec![(2, json!(2)), (3, json!(3)), (4, json!(4))]);

    // A wrong epoch cannot be recovered from, and says so.
    let (mut d, _) = Cent::connected(server.addr, None).await;
    let r = d.request("subscribe", json!({"channel": "news", "recover": true, "epoch": "other", "offset": 1})).await;
    let s = &r["subscribe"];
    assert_eq!((s["was_recovering"].as_bool(), s["recovered"].as_bool()), (Some(true), Some(false)), "{r}");
    assert_eq!(s["offset"], 4);
    server.shutdown().await;
}

#[tokio::test]
async fn presence_history_and_refresh() {
    let server = TestServer::start(config()).await;
    let (mut a, _) = Cent::connected(server.addr, Some(token("ada", 600))).await;
    let (mut b, _) = Cent::connected(server.addr, Some(token("bob", 600))).await;
    for c in [&mut a, &mut b] {
        let r = c.request("subscribe", json!({"channel": "chat:room", "join_leave": true})).await;
        assert!(r.get("subscribe").is_some(), "{r}");
    }
    // Bob's join reaches Ada in Centrifugo's shape (`join.info`, with the token's info).
    let join = loop {
        let p = a.push().await;
        if p["join"]["info"]["user"] == "bob" {
            break p;
        }
    };
    assert_eq!(join["join"]["info"]["conn_info"], json!({"name": "bob"}), "{join}");
    let r = a.request("presence", json!({"channel": "chat:room"})).await;
    let presence = r["presence"]["presence"].as_object().expect("presence map");
    let mut users: Vec<&str> = presence.values().map(|c| c["user"].as_str().expect("user")).collect();
    users.sort_unstable();
    assert_eq!(users, ["ada", "bob"], "{r}");
    assert!(presence.values().all(|c| c["conn_info"]["name"] == c["user"]), "{r}");
    let r = a.request("presence_stats", json!({"channel": "chat:room"})).await;
    assert_eq!(r["presence_stats"], json!({"num_clients": 2, "num_users": 2}));

    for n in 1..=3 {
        publish(server.addr, "chat:room", json!(n)).await;
    }
    let r = a.request("history", json!({"channel": "chat:room"})).await;
    assert_eq!(r["history"]["offset"], 3, "{r}");
    assert!(r["history"]["publications"].as_array().is_none_or(Vec::is_empty), "no limit: position only: {r}");
    let r = a.request("history", json!({"channel": "chat:room", "limit": 2, "reverse": true})).await;
    let offsets: Vec<u64> = r["history"]["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["offset"].as_u64().expect("offset"))
        .collect();
    assert_eq!(offsets, [3, 2], "{r}");
    let r = a.request("history", json!({"channel": "live:x", "limit": 1})).await;
    assert_eq!(r["error"]["code"], 108, "not available: {r}");

    let r = b.request("unsubscribe", json!({"channel": "chat:room"})).await;
    assert_eq!(r["unsubscribe"], json!({}), "{r}");
    let leave = loop {
        let p = a.push().await;
        if p.get("leave").is_some() {
            break p;
        }
    };
    assert_eq!(leave["leave"]["info"]["user"], "bob", "{leave}");

    let r = a.request("refresh", json!({"token": token("ada", 900)})).await;
    let refresh = &r["refresh"];
    assert_eq!((refresh["expires"].as_bool(), refresh["client"].is_string()), (Some(true), true), "{r}");
    assert!(refresh["ttl"].as_u64().expect("ttl") > 600, "{r}");
    let r = a.request("refresh", json!({"token": token("bob", 900)})).await;
    assert_eq!(r["error"]["code"], 101, "another user's token: {r}");
    server.shutdown().await;
}

#[tokio::test]
async fn errors_use_centrifugos_numbers() {
    let server = TestServer::start(config()).await;
    let mut c = Cent::open(server.addr).await;
    let r = c.request("subscribe", json!({"channel": "news"})).await;
    assert_eq!(r["error"]["code"], 107, "before connect: {r}");
    let r = c.request("connect", json!({"token": expired_token("42")})).await;
    assert_eq!(r["error"]["code"], 109, "expired token, so the SDK fetches a new one: {r}");
    let r = c.request("connect", json!({"token": "not.a.jwt"})).await;
    assert_eq!(r["error"]["code"], 101, "{r}");
    let r = c.request("connect", json!({})).await;
    assert!(r.get("connect").is_some(), "{r}");
    let r = c.request("rpc", json!({"method": "getUser", "data": {}})).await;
    assert_eq!(r["error"]["code"], 108, "{r}");
    assert!(r["error"]["message"].as_str().is_some_and(|m| m.contains("RPC")), "{r}");
    let r = c.request("frobnicate", json!({})).await;
    assert_eq!(r["error"]["code"], 104, "{r}");
    let r = c.request("publish", json!({"channel": "news", "data": 1})).await;
    assert_eq!(r["error"]["code"], 103, "publish is off by default: {r}");
    let r = c.request("subscribe", json!({"channel": "nope:x"})).await;
    assert_eq!(r["error"]["code"], 102, "unknown namespace: {r}");
    c.request("subscribe", json!({"channel": "news"})).await;
    let r = c.request("subscribe", json!({"channel": "news"})).await;
    assert_eq!(r["error"]["code"], 105, "{r}");
    // `send` has no reply; the connection goes on.
    c.send(r#"{"send":{"data":{"x":1}}}"#.into()).await;
    let r = c.request("presence_stats", json!({"channel": "news"})).await;
    assert_eq!(r["error"]["code"], 108, "presence is off by default: {r}");
    server.shutdown().await;
}

#[tokio::test]
async fn server_unsubscribe_and_disconnect_use_centrifugos_codes() {
    let mut cfg = config();
    cfg.api.key = Secret::new("k");
    let server = TestServer::start(cfg).await;
    let (mut c, _) = Cent::connected(server.addr, Some(token("42", 600))).await;
    c.request("subscribe", json!({"channel": "news"})).await;
    let (status, body) =
        api(server.addr, "unsubscribe", &json!({"user": "42", "channel": "news"}).to_string(), Some("k")).await;
    assert_eq!(status, 200, "{body}");
    let p = c.push().await;
    assert_eq!(p["unsubscribe"]["code"], 2000, "for good (below 2500): {p}");
    let (status, body) = api(server.addr, "disconnect", &json!({"user": "42"}).to_string(), Some("k")).await;
    assert_eq!(status, 200, "{body}");
    let closed = loop {
        match c.next().await {
            Ok(_) => continue,
            Err(close) => break close,
        }
    };
    assert_eq!(closed.map(|(code, _)| code), Some(3503), "force disconnect: do not reconnect");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_does_not_answer_pings_is_closed_with_3012() {
    let mut cfg = config();
    cfg.websocket.ping_interval = Duration::from_secs(1);
    cfg.websocket.pong_timeout = Duration::from_secs(1);
    let server = TestServer::start(cfg).await;
    let (mut c, r) = Cent::connected(server.addr, None).await;
    assert_eq!(r["connect"]["ping"], 1);
    // Answering: still open after a few pings.
    while c.pings < 3 {
        tokio::time::timeout(Duration::from_secs(5), c.next()).await.expect_err("only pings arrive");
    }
    assert!(c.pings >= 3);
    // Silent: closed.
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), c.ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            _ => break None,
        }
    };
    assert_eq!(closed, Some(3012));
    server.shutdown().await;
}

/// Calls Centrifugo's server API shape with `X-API-Key`, as `cent` does.
async fn cent_api(addr: std::net::SocketAddr, method: &str, body: Value, key: &str) -> (u16, Value) {
    let body = body.to_string();
    let req = format!(
        "POST /centrifugo/api/{method} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    http(addr, &req).await
}

#[tokio::test]
async fn centrifugos_server_api_shape_publishes_with_tags_and_answers_in_result() {
    let mut cfg = config();
    cfg.api.key = Secret::new("k");
    let server = TestServer::start(cfg).await;
    let (mut c, _) = Cent::connected(server.addr, Some(token("42", 600))).await;
    c.request("subscribe", json!({"channel": "chat:room"})).await;
    let (status, r) =
        cent_api(server.addr, "publish", json!({"channel": "chat:room", "data": {"a": 1}, "tags": {"k": "v"}}), "k")
            .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["result"]["offset"], 1, "{r}");
    let p = loop {
        let p = c.push().await;
        if p.get("pub").is_some() {
            break p; // after the connection's own join
        }
    };
    assert_eq!(p["pub"], json!({"offset": 1, "data": {"a": 1}, "tags": {"k": "v"}}), "tags reach the subscriber");

    // Tags stay with the publication in history and recovery too.
    let r = c.request("history", json!({"channel": "chat:room", "limit": -1})).await;
    assert_eq!(r["history"]["publications"][0]["tags"], json!({"k": "v"}), "{r}");
    let (mut late, _) = Cent::connected(server.addr, None).await;
    let epoch = r["history"]["epoch"].clone();
    let r = late.request("subscribe", json!({"channel": "news", "recover": true, "epoch": "x"})).await;
    assert_eq!(r["subscribe"]["recovered"], false, "{r}");
    let body = json!({"channel": "chat:room", "recover": true, "epoch": epoch, "offset": 0});
    let r = late.request("subscribe", body).await;
    assert_eq!(r["subscribe"]["publications"][0]["tags"], json!({"k": "v"}), "{r}");
    drop(late);
    let (_, r) = cent_api(server.addr, "presence_stats", json!({"channel": "chat:room"}), "k").await;
    assert_eq!(r["result"], json!({"num_clients": 1, "num_users": 1}));
    let (_, r) = cent_api(server.addr, "presence", json!({"channel": "chat:room"}), "k").await;
    let clients: Vec<&Value> = r["result"]["presence"].as_object().expect("presence").values().collect();
    assert_eq!((clients.len(), &clients[0]["user"]), (1, &json!("42")), "{r}");
    let (_, r) = cent_api(server.addr, "history", json!({"channel": "chat:room", "limit": -1}), "k").await;
    assert_eq!(r["result"]["publications"][0]["tags"], json!({"k": "v"}), "{r}");
    let (_, r) = cent_api(server.addr, "broadcast", json!({"channels": ["news", "chat:room"], "data": 2}), "k").await;
    assert_eq!(r["result"]["responses"][1]["result"]["offset"], 2, "{r}");
    let (_, r) = cent_api(server.addr, "channels", json!({}), "k").await;
    assert_eq!(r["result"]["channels"]["chat:room"]["num_clients"], 1, "{r}");

    // Errors: HTTP 200 with Centrifugo's numbers, except a wrong key (401).
    let (status, r) = cent_api(server.addr, "presence", json!({"channel": "news"}), "k").await;
    assert_eq!((status, &r["error"]["code"]), (200, &json!(108)), "{r}");
    let (status, r) = cent_api(server.addr, "rpc", json!({}), "k").await;
    assert_eq!((status, &r["error"]["code"]), (200, &json!(104)), "{r}");
    let (status, r) = cent_api(server.addr, "publish", json!({"channel": "news"}), "k").await;
    assert_eq!((status, &r["error"]["code"]), (200, &json!(107)), "no data: {r}");
    let body = json!({"channel": "news", "data": 1, "idempotency_key": "x"});
    let (status, r) = cent_api(server.addr, "publish", body, "k").await;
    assert_eq!((status, &r["error"]["code"]), (200, &json!(108)), "refused, not ignored: {r}");
    let (status, _) = cent_api(server.addr, "publish", json!({"channel": "news", "data": 1}), "wrong").await;
    assert_eq!(status, 401);

    let (_, r) = cent_api(server.addr, "disconnect", json!({"user": "42"}), "k").await;
    assert_eq!(r["result"], json!({}), "{r}");
    let closed = loop {
        match c.next().await {
            Ok(_) => continue,
            Err(close) => break close,
        }
    };
    assert_eq!(closed.map(|(code, _)| code), Some(3503));
    server.shutdown().await;
}

#[tokio::test]
async fn api_tags_count_with_the_data_against_max_publication_size() {
    let mut cfg = config();
    cfg.api.key = Secret::new("k");
    cfg.channels.max_publication_size = 1000;
    let server = TestServer::start(cfg).await;
    // Small data, 2000 bytes of tags (keys and values both count): over the 1000-byte limit.
    let tags = json!({"k".repeat(1000): "v".repeat(1000)});
    for (method, body) in [
        ("publish", json!({"channel": "chat:room", "data": 1, "tags": tags})),
        ("broadcast", json!({"channels": ["chat:room"], "data": 1, "tags": tags})),
    ] {
        let (status, r) = cent_api(server.addr, method, body, "k").await;
        let error = if method == "publish" { &r["error"] } else { &r["result"]["responses"][0]["error"] };
        assert_eq!(status, 200, "{r}");
        assert_eq!(error["code"], 106, "refused as Centrifugo refuses a too-large publication: {r}");
        assert!(error["message"].as_str().is_some_and(|m| m.contains("tags")), "{r}");
    }
    let (_, r) = cent_api(server.addr, "history", json!({"channel": "chat:room", "limit": -1}), "k").await;
    assert_eq!(r["result"]["publications"], json!([]), "nothing was stored: {r}");
    // Within the limit together, it is published with its tags.
    let body = json!({"channel": "chat:room", "data": "x".repeat(400), "tags": {"k".repeat(100): "v".repeat(400)}});
    let (_, r) = cent_api(server.addr, "publish", body, "k").await;
    assert_eq!(r["result"]["offset"], 1, "{r}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_frame_of_many_commands_is_rate_limited_per_command_then_closed() {
    let server = TestServer::start(config()).await;
    let (mut c, _) = Cent::connected(server.addr, None).await;
    // One frame, 1000 commands: each line counts against `limits.commands_per_second`.
    let lines: Vec<String> =
        (2..1002).map(|id| json!({"id": id, "history": {"channel": "news"}}).to_string()).collect();
    c.send(lines.join("\n")).await;
    let (mut answered, mut refused) = (0, 0);
    let closed = loop {
        match c.next().await {
            Ok(f) if f.get("history").is_some() => answered += 1,
            Ok(f) if f["error"]["code"] == 111 => refused += 1,
            Ok(f) => panic!("unexpected {f}"),
            Err(close) => break close,
        }
    };
    assert_eq!(closed.map(|(code, _)| code), Some(3013), "too many requests");
    assert!((190..=210).contains(&answered), "about the burst of 200 carried out: {answered}");
    assert!((90..=110).contains(&refused), "then max_refusals told to slow down: {refused}");

    // `send` has no reply, but a flood of them is limited all the same.
    let (mut c, _) = Cent::connected(server.addr, None).await;
    let sends: Vec<String> = (0..1000).map(|n| json!({"send": {"data": n}}).to_string()).collect();
    c.send(sends.join("\n")).await;
    let closed = loop {
        match c.next().await {
            Ok(_) => continue,
            Err(close) => break close,
        }
    };
    assert_eq!(closed.map(|(code, _)| code), Some(3013));
    server.shutdown().await;
}

#[tokio::test]
async fn a_protobuf_client_is_told_json_only() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = TestServer::start(config()).await;
    let mut req = format!("ws://{}/connection/websocket", server.addr).into_client_request().expect("request");
    req.headers_mut().insert("sec-websocket-protocol", "centrifuge-protobuf".parse().expect("header"));
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.expect("handshake");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "centrifuge-protobuf");
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("in time") {
            Some(Ok(Message::Close(f))) => break f.expect("close frame"),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1003);
    assert!(close.reason.contains("JSON"), "{}", close.reason);
    server.shutdown().await;
}
