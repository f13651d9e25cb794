//! The client against a scripted stand-in for the server on 127.0.0.1:0: each test plays the
//! server's side frame by frame, so reconnects, recovery and deduplication are exercised
//! exactly. Tests against the real server live in crates/herald/tests.

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_client::{Client, ClientOptions, Error, Event, State, Subscription};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const MS: Duration = Duration::from_millis(1);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

struct MockServer {
    listener: TcpListener,
}

impl MockServer {
    async fn start() -> Self {
        Self { listener: TcpListener::bind("127.0.0.1:0").await.expect("bind") }
    }

    fn url(&self) -> String {
        format!("ws://{}/connect", self.listener.local_addr().expect("addr"))
    }

    /// Accepts the next WebSocket; checks the client asked for herald.v1.
    async fn accept(&self) -> Peer {
        let (tcp, _) = within("accept", self.listener.accept()).await.expect("accept");
        #[allow(clippy::result_large_err)] // the signature is tungstenite's callback
        let check = |req: &Request, mut res: Response| -> Result<Response, ErrorResponse> {
            let offered = req.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok());
            assert_eq!(offered, Some("herald.v1"));
            res.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("herald.v1"));
            Ok(res)
        };
        let ws = within("handshake", tokio_tungstenite::accept_hdr_async(tcp, check)).await.expect("handshake");
        Peer { ws }
    }

    /// Accepts and answers `connect`; returns the `connect` body.
    async fn connected(&self, ping: u32) -> (Peer, Value) {
        let mut peer = self.accept().await;
        let frame = peer.recv().await;
        peer.reply(&frame, "connect", json!({"client": "c1", "version": "0.1.0", "ping": ping})).await;
        (peer, frame["connect"].clone())
    }

    /// Asserts no client connects within `wait`.
    async fn no_connection_within(&self, wait: Duration) {
        let accepted = tokio::time::timeout(wait, self.listener.accept()).await;
        assert!(accepted.is_err(), "the client connected again");
    }
}

/// The server's end of one connection.
struct Peer {
    ws: WebSocketStream<TcpStream>,
}

impl Peer {
    /// The next text frame from the client, as JSON.
    async fn recv(&mut self) -> Value {
        loop {
            match within("a frame from the client", self.ws.next()).await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).expect("client sent JSON"),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Asserts the client sends nothing for `wait`.
    async fn silent_for(&mut self, wait: Duration) {
        if let Ok(frame) = tokio::time::timeout(wait, self.ws.next()).await {
            panic!("expected silence, got {frame:?}");
        }
    }

    async fn send(&mut self, frame: Value) {
        within("send", self.ws.send(Message::text(frame.to_string()))).await.expect("send");
    }

    async fn reply(&mut self, request: &Value, name: &str, result: Value) {
        let id = request["id"].as_u64().expect("request has an id");
        self.send(json!({ "id": id, name: result })).await;
    }

    async fn push(&mut self, channel: &str, offset: u64) {
        self.send(json!({"push": {"channel": channel, "pub": {"offset": offset, "data": {"n": offset}}}})).await;
    }

    /// Closes with `code` and waits for the client's half of the handshake.
    async fn close(mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: code.into(), reason: reason.into() };
        within("close", self.ws.close(Some(frame))).await.expect("close");
        while let Some(Ok(_)) = within("close reply", self.ws.next()).await {}
    }

    /// The close frame the client sends.
    async fn expect_close(&mut self) -> CloseFrame {
        loop {
            match within("a close frame", self.ws.next()).await {
                Some(Ok(Message::Close(Some(frame)))) => return frame,
                Some(Ok(Message::Text(t))) if t.as_str() == "{}" => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

fn fast_options() -> ClientOptions {
    ClientOptions::default().backoff(MS, 20 * MS).request_timeout(Duration::from_secs(3))
}

/// Starts `Client::connect` and plays the server's side of it.
async fn connect(server: &MockServer, options: ClientOptions) -> (Client, Peer) {
    let connecting = tokio::spawn(Client::connect(server.url(), options));
    let (peer, _) = server.connected(25).await;
    let client = within("connect", connecting).await.expect("task").expect("connected");
    (client, peer)
}

/// Subscribes and answers with `(epoch, offset)`.
async fn subscribe(client: &Client, peer: &mut Peer, channel: &str, epoch: &str, offset: u64) -> Subscription {
    let c = client.clone();
    let channel_owned = channel.to_owned();
    let subscribing = tokio::spawn(async move { c.subscribe(channel_owned).await });
    let request = peer.recv().await;
    assert_eq!(request["subscribe"], json!({"channel": channel}));
    peer.reply(&request, "subscribe", json!({"epoch": epoch, "offset": offset})).await;
    within("subscribe", subscribing).await.expect("task").expect("subscribed")
}

/// What a subscription yields next, compactly: "7" for offset 7, "reset e@3".
async fn next(sub: &mut Subscription) -> String {
    match within("an event", sub.next()).await {
        Some(Event::Publication(p)) => {
            let n: Value = serde_json::from_str(p.data.get()).expect("data");
            assert_eq!(n["n"].as_u64(), p.offset, "data travels with its offset");
            p.offset.map_or("-".into(), |o| o.to_string())
        }
        Some(Event::Reset { epoch, offset, .. }) => format!("reset {epoch}@{offset}"),
        Some(other) => format!("{other:?}"),
        None => "end".into(),
    }
}

async fn nexts(sub: &mut Subscription, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(next(sub).await);
    }
    out
}

#[tokio::test]
async fn reconnects_resubscribes_and_recovers_without_duplicates() {
    let server = MockServer::start().await;
    let options = fast_options().token("t0k").name("test").version("9");
    let connecting = tokio::spawn(Client::connect(server.url(), options));
    let (mut peer, connect_body) = server.connected(25).await;
    assert_eq!(connect_body, json!({"token": "t0k", "name": "test", "version": "9"}));
    let client = within("connect", connecting).await.expect("task").expect("connected");
    assert!(client.state().borrow().is_connected());

    let mut news = subscribe(&client, &mut peer, "news", "e1", 10).await;
    peer.push("news", 11).await;
    peer.push("news", 12).await;
    peer.push("news", 13).await;
    assert_eq!(nexts(&mut news, 3).await, ["11", "12", "13"]);

    // The server drops us as a slow consumer: a code that asks for a reconnect.
    peer.close(4001, "slow consumer").await;
    let (mut peer, _) = server.connected(25).await;
    let resubscribe = peer.recv().await;
    assert_eq!(resubscribe["subscribe"], json!({"channel": "news", "recover": true, "epoch": "e1", "offset": 13}));
    // 16 is pushed live before the reply; the reply recovers 13 (already delivered) to 16;
    // 16 is pushed again after it. Each must come out once, in order.
    peer.push("news", 16).await;
    let recovered: Vec<Value> = (13..=16).map(|o| json!({"offset": o, "data": {"n": o}})).collect();
    peer.reply(
        &resubscribe,
        "subscribe",
        json!({"epoch": "e1", "offset": 16, "recovered": true, "publications": recovered}),
    )
    .await;
    peer.push("news", 16).await;
    peer.push("news", 17).await;
    assert_eq!(nexts(&mut news, 4).await, ["14", "15", "16", "17"]);

    // The connection just dies (no close frame), and the history is gone meanwhile.
    drop(peer);
    let (mut peer, _) = server.connected(25).await;
    let resubscribe = peer.recv().await;
    assert_eq!(resubscribe["subscribe"]["offset"], 17);
    peer.reply(&resubscribe, "subscribe", json!({"epoch": "e2", "offset": 3, "recovered": false})).await;
    peer.push("news", 4).await;
    assert_eq!(nexts(&mut news, 2).await, ["reset e2@3", "4"]);
    assert!(client.state().borrow().is_connected());

    // Publishing goes over the same connection.
    let c = client.clone();
    let publishing = tokio::spawn(async move { c.publish("news", &json!({"x": 1})).await });
    let request = peer.recv().await;
    assert_eq!(request["publish"], json!({"channel": "news", "data": {"x": 1}}));
    peer.reply(&request, "publish", json!({"epoch": "e2", "offset": 5})).await;
    let at = within("publish", publishing).await.expect("task").expect("published");
    assert_eq!((at.epoch.as_str(), at.offset), ("e2", 5));

    // A close code from the "do not reconnect" range ends everything.
    peer.close(4503, "disconnected by the server").await;
    assert_eq!(next(&mut news).await, "end");
    assert!(matches!(news.end_reason(), Some(Error::Closed { code: 4503, .. })), "{:?}", news.end_reason());
    let mut state = client.state();
    within("closed state", state.wait_for(State::is_closed)).await.expect("state");
    let err = client.publish("news", &1).await.expect_err("closed");
    assert!(matches!(err, Error::Closed { code: 4503, .. }), "{err:?}");
    server.no_connection_within(100 * MS).await;
}

#[tokio::test]
async fn answers_pings_and_reconnects_when_the_server_goes_silent() {
    let server = MockServer::start().await;
    let options = fast_options().ping_margin(200 * MS);
    let connecting = tokio::spawn(Client::connect(server.url(), options));
    let (mut peer, _) = server.connected(1).await;
    let client = within("connect", connecting).await.expect("task").expect("connected");
    let mut news = subscribe(&client, &mut peer, "news", "e1", 0).await;

    peer.send(json!({})).await;
    assert_eq!(peer.recv().await, json!({}), "a ping is answered with a pong");

    // Now the server says nothing: after ping (1 s) + margin the client gives up on it.
    let silent_since = tokio::time::Instant::now();
    let mut state = client.state();
    within("connecting", state.wait_for(|s| matches!(s, State::Connecting))).await.expect("state");
    assert!(silent_since.elapsed() >= Duration::from_millis(1000), "{:?}", silent_since.elapsed());
    let (mut peer, _) = server.connected(25).await;
    let resubscribe = peer.recv().await;
    assert_eq!(resubscribe["subscribe"]["recover"], true);
    peer.reply(&resubscribe, "subscribe", json!({"epoch": "e1", "offset": 0, "recovered": true})).await;
    peer.push("news", 1).await;
    assert_eq!(next(&mut news).await, "1");
    within("connected", state.wait_for(State::is_connected)).await.expect("state");
}

#[tokio::test]
async fn refusals_timeouts_and_duplicates_are_errors() {
    let server = MockServer::start().await;
    let (client, mut peer) = connect(&server, fast_options().request_timeout(Duration::from_secs(1))).await;

    let c = client.clone();
    let subscribing = tokio::spawn(async move { c.subscribe("secret").await });
    let request = peer.recv().await;
    peer.reply(&request, "error", json!({"code": 103, "message": "permission denied"})).await;
    let err = within("refusal", subscribing).await.expect("task").expect_err("refused");
    assert!(
        matches!(&err, Error::Server { command: "subscribe", code: 103, channel: Some(c), .. } if c == "secret"),
        "{err:?}"
    );
    assert_eq!(err.error_code(), Some(herald_protocol::ErrorCode::PermissionDenied));

    // Nobody answers: the request times out, and the client stays usable.
    let err = client.publish("news", &"hi").await.expect_err("no reply");
    assert!(matches!(err, Error::Timeout { command: "publish", .. }), "{err:?}");
    assert_eq!(peer.recv().await["publish"]["data"], "hi");

    let news = subscribe(&client, &mut peer, "news", "e1", 0).await;
    let err = client.subscribe("news").await.expect_err("twice");
    assert!(matches!(err, Error::AlreadySubscribed { .. }), "{err:?}");

    // Dropping a subscription unsubscribes; then subscribing again works.
    drop(news);
    let request = peer.recv().await;
    assert_eq!(request["unsubscribe"], json!({"channel": "news"}));
    peer.reply(&request, "unsubscribe", json!({})).await;
    let news = subscribe(&client, &mut peer, "news", "e1", 0).await;

    // An explicit unsubscribe waits for the reply.
    let unsubscribing = tokio::spawn(news.unsubscribe());
    let request = peer.recv().await;
    assert_eq!(request["unsubscribe"], json!({"channel": "news"}));
    peer.reply(&request, "unsubscribe", json!({})).await;
    within("unsubscribe", unsubscribing).await.expect("task").expect("unsubscribed");
}

#[tokio::test]
async fn a_refused_connect_is_reported_and_a_refused_resubscribe_ends_the_stream() {
    let server = MockServer::start().await;
    let connecting = tokio::spawn(Client::connect(server.url(), fast_options()));
    let mut peer = server.accept().await;
    let request = peer.recv().await;
    peer.reply(&request, "error", json!({"code": 101, "message": "invalid token"})).await;
    let err = within("connect", connecting).await.expect("task").expect_err("refused");
    assert!(matches!(err, Error::Server { command: "connect", code: 101, .. }), "{err:?}");

    let (client, mut peer) = connect(&server, fast_options()).await;
    let mut secret = subscribe(&client, &mut peer, "secret", "e1", 0).await;
    let mut news = subscribe(&client, &mut peer, "news", "e1", 0).await;
    peer.close(4004, "server error").await;
    let (mut peer, _) = server.connected(25).await;
    // Resubscribes go out in channel order.
    let news_again = peer.recv().await;
    let secret_again = peer.recv().await;
    assert_eq!(
        (news_again["subscribe"]["channel"].as_str(), secret_again["subscribe"]["channel"].as_str()),
        (Some("news"), Some("secret"))
    );
    peer.reply(&secret_again, "error", json!({"code": 103, "message": "permission denied"})).await;
    peer.reply(&news_again, "subscribe", json!({"epoch": "e1", "offset": 0, "recovered": true})).await;
    assert_eq!(next(&mut secret).await, "end");
    assert!(matches!(secret.end_reason(), Some(Error::Server { code: 103, .. })), "{:?}", secret.end_reason());
    peer.push("news", 1).await;
    assert_eq!(next(&mut news).await, "1");
}

#[tokio::test]
async fn a_slow_reader_holds_back_the_connection_without_losing_anything() {
    let server = MockServer::start().await;
    let (client, mut peer) = connect(&server, fast_options().subscription_buffer(2)).await;
    let mut news = subscribe(&client, &mut peer, "news", "e1", 0).await;
    for offset in 1..=4 {
        peer.push("news", offset).await;
    }
    // Two fit in the buffer, the third waits: the client reads nothing more, so the ping
    // behind the pushes goes unanswered for now.
    peer.send(json!({})).await;
    peer.silent_for(200 * MS).await;
    assert_eq!(nexts(&mut news, 4).await, ["1", "2", "3", "4"]);
    assert_eq!(peer.recv().await, json!({}), "the pong once the application caught up");
}

#[tokio::test]
async fn close_says_goodbye_with_1000_and_stays_closed() {
    let server = MockServer::start().await;
    let (client, mut peer) = connect(&server, fast_options()).await;
    let mut news = subscribe(&client, &mut peer, "news", "e1", 0).await;
    let closing = tokio::spawn({
        let c = client.clone();
        async move { c.close().await }
    });
    let frame = peer.expect_close().await;
    assert_eq!(u16::from(frame.code), 1000);
    drop(peer);
    within("close", closing).await.expect("task");
    assert!(client.state().borrow().is_closed());
    assert_eq!(next(&mut news).await, "end");
    let err = client.subscribe("other").await.expect_err("closed");
    assert!(matches!(err, Error::Closed { code: 1000, .. }), "{err:?}");
    server.no_connection_within(100 * MS).await;
}

#[tokio::test]
async fn a_shutdown_close_with_a_hint_waits_the_hint_before_reconnecting() {
    let server = MockServer::start().await;
    // The backoff alone would reconnect within 20 ms.
    let (client, mut peer) = connect(&server, fast_options()).await;
    let mut news = subscribe(&client, &mut peer, "news", "e1", 0).await;
    let closed = tokio::time::Instant::now();
    peer.close(1001, "server shutting down; reconnect_in=1500").await;
    server.no_connection_within(1400 * MS).await;
    let (mut peer, _) = server.connected(25).await;
    assert!(closed.elapsed() >= 1500 * MS, "not before its hint: {:?}", closed.elapsed());
    let resubscribe = peer.recv().await;
    assert_eq!(resubscribe["subscribe"]["recover"], true);
    peer.reply(&resubscribe, "subscribe", json!({"epoch": "e1", "offset": 0, "recovered": true})).await;
    peer.push("news", 1).await;
    assert_eq!(next(&mut news).await, "1");

    // A hint too big for a number is a long wait (capped at 60 s), not an overflow or a
    // reconnect at once.
    peer.close(1001, "server shutting down; reconnect_in=18446744073709551616").await;
    server.no_connection_within(500 * MS).await;
    drop(client);
}
