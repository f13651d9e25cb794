//! Channels end to end: subscribers over real WebSockets, publications through the HTTP API
//! and from clients, errors that leave the connection open, slow consumers, SSE and raw
//! WebSocket delivery.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use herald::config::NamespaceOptions;
use herald::Config;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn config() -> Config {
    let mut c = Config::default();
    c.channels.namespaces.insert("chat".into(), NamespaceOptions { publish: true.into(), ..Default::default() });
    c.channels.namespaces.insert("locked".into(), NamespaceOptions { subscribe: false.into(), ..Default::default() });
    c
}

fn data_of(push: &serde_json::Value) -> &serde_json::Value {
    &push["push"]["pub"]["data"]
}

#[tokio::test]
async fn every_subscriber_gets_every_publication_once_in_order() {
    let server = TestServer::start(config()).await;
    let channels = ["news", "chat:a", "chat:b", "prices"];
    let mut clients = Vec::new();
    for i in 0..12 {
        let mut c = Native::connected(server.addr).await;
        // Each client subscribes to two channels.
        for ch in [channels[i % 4], channels[(i + 1) % 4]] {
            let r = c.request("subscribe", json!({"channel": ch})).await;
            assert_eq!(r["subscribe"]["offset"], 0, "{r}");
        }
        clients.push(c);
    }
    const N: u64 = 40;
    for seq in 1..=N {
        for ch in channels {
            let (status, body) =
                api(server.addr, "publish", &json!({"channel": ch, "data": {"seq": seq, "ch": ch}}).to_string(), None)
                    .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["offset"], seq);
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mine = [channels[i % 4], channels[(i + 1) % 4]];
        let mut next = [1u64, 1u64];
        for _ in 0..2 * N {
            let p = c.push().await;
            let ch = p["push"]["channel"].as_str().expect("channel");
            let k = mine.iter().position(|m| *m == ch).unwrap_or_else(|| panic!("client {i} got {ch}"));
            assert_eq!(data_of(&p)["seq"], next[k], "client {i} channel {ch}: in order, no gap, no duplicate");
            assert_eq!(p["push"]["pub"]["offset"], next[k]);
            next[k] += 1;
        }
    }
    // Nothing more arrives: exactly once.
    for c in clients.iter_mut() {
        assert!(tokio::time::timeout(Duration::from_millis(200), c.ws.next()).await.is_err());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_client_publish_reaches_others() {
    let server = TestServer::start(config()).await;
    let mut alice = Native::connected(server.addr).await;
    let mut bob = Native::connected(server.addr).await;
    for c in [&mut alice, &mut bob] {
        c.request("subscribe", json!({"channel": "chat:room"})).await;
    }
    let r = alice.request("publish", json!({"channel": "chat:room", "data": {"text": "hi"}})).await;
    assert_eq!(r["publish"]["offset"], 1, "{r}");
    assert_eq!(data_of(&bob.push().await)["text"], "hi");
    assert_eq!(data_of(&alice.push().await)["text"], "hi", "the publisher is a subscriber too");

    let r = bob.request("unsubscribe", json!({"channel": "chat:room"})).await;
    assert!(r.get("unsubscribe").is_some(), "{r}");
    alice.request("publish", json!({"channel": "chat:room", "data": "second"})).await;
    assert_eq!(data_of(&alice.push().await), "second");
    assert!(tokio::time::timeout(Duration::from_millis(300), bob.ws.next()).await.is_err(), "bob hears nothing");
    server.shutdown().await;
}

#[tokio::test]
async fn bad_commands_get_their_error_and_the_connection_continues() {
    let mut c = config();
    c.channels.max_publication_size = 1000;
    c.channels.max_subscriptions = 2;
    let server = TestServer::start(c).await;
    let mut client = Native::open(server.addr).await;

    let r = client.request("subscribe", json!({"channel": "news"})).await;
    assert_eq!(r["error"]["code"], 108, "connect first: {r}");
    client.request("connect", json!({})).await;

    client.send_raw("this is not json").await;
    let f = client.frame().await;
    assert_eq!(f["error"]["code"], 107, "{f}");
    assert!(f.get("id").is_none());

    client.send_raw(r#"{"id":50,"subscrib":{"channel":"news"}}"#).await;
    let f = client.reply(50).await;
    assert_eq!(f["error"]["code"], 104, "unknown command keeps its id: {f}");

    for (body, code) in [
        (json!({"channel": "bad channel"}), 102),
        (json!({"channel": "nope:x"}), 102),
        (json!({"channel": "locked:x"}), 103),
        (json!({"channel": "inbox#42"}), 103),
        (json!({"chanel": "news"}), 107),
    ] {
        let r = client.request("subscribe", body.clone()).await;
        assert_eq!(r["error"]["code"], code, "{body} → {r}");
    }
    let big = "x".repeat(2000);
    let r = client.request("publish", json!({"channel": "chat:x", "data": big})).await;
    assert_eq!(r["error"]["code"], 112, "{r}");
    let r = client.request("publish", json!({"channel": "news", "data": 1})).await;
    assert_eq!(r["error"]["code"], 103, "client publish is off in the default namespace: {r}");

    client.request("subscribe", json!({"channel": "a"})).await;
    let r = client.request("subscribe", json!({"channel": "a"})).await;
    assert_eq!(r["error"]["code"], 105, "{r}");
    client.request("subscribe", json!({"channel": "b"})).await;
    let r = client.request("subscribe", json!({"channel": "c"})).await;
    assert_eq!(r["error"]["code"], 106, "{r}");

    // Still alive and working after all that.
    api(server.addr, "publish", r#"{"channel":"a","data":"ok"}"#, None).await;
    assert_eq!(data_of(&client.push().await), "ok");
    server.shutdown().await;
}

#[tokio::test]
async fn a_binary_frame_closes_with_1003_and_a_silent_client_gets_4003() {
    let mut c = config();
    c.websocket.handshake_timeout = Duration::from_millis(300);
    let server = TestServer::start(c).await;
    let mut client = Native::connected(server.addr).await;
    use futures_util::SinkExt;
    client.ws.send(Message::binary(vec![1, 2, 3])).await.expect("send");
    match client.ws.next().await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1003),
        other => panic!("expected close 1003, got {other:?}"),
    }
    let mut silent = Native::open(server.addr).await;
    match tokio::time::timeout(Duration::from_secs(5), silent.ws.next()).await.expect("closed in time") {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 4003),
        other => panic!("expected close 4003, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_cut_off_and_the_others_get_everything() {
    let mut c = config();
    c.websocket.max_queue_bytes = 64 << 10;
    c.websocket.close_timeout = Duration::from_millis(500);
    let server = TestServer::start(c).await;
    // The slow one: a raw socket that subscribes and then never reads again.
    let (head, mut slow) = raw_request(server.addr, &upgrade_request("/connect", "")).await;
    assert!(head.starts_with("HTTP/1.1 101"));
    for cmd in [json!({"id":1,"connect":{}}), json!({"id":2,"subscribe":{"channel":"firehose"}})] {
        let text = cmd.to_string();
        slow.write_all(&herald::ws::frame::encode(
            true,
            false,
            herald::ws::frame::OpCode::Text,
            text.as_bytes(),
            Some([1, 2, 3, 4]),
        ))
        .await
        .expect("write");
    }
    let mut fast = Native::connected(server.addr).await;
    fast.request("subscribe", json!({"channel": "firehose"})).await;
    let (_, info) = api(server.addr, "info", "", None).await;
    assert_eq!(info["subscriptions"], 2, "{info}");

    let blob = "z".repeat(8000);
    const N: usize = 600; // ~4.8 MB: far beyond the slow client's socket buffers and queue
    let reader = tokio::spawn(async move {
        for i in 0..N {
            let p = fast.push().await;
            assert_eq!(data_of(&p)["i"], i, "fast subscriber in order");
        }
        fast
    });
    for i in 0..N {
        let (status, _) = api(
            server.addr,
            "publish",
            &json!({"channel": "firehose", "data": {"i": i, "blob": blob}}).to_string(),
            None,
        )
        .await;
        assert_eq!(status, 200);
    }
    let _fast = reader.await.expect("fast subscriber got all");
    let (_, info) = api(server.addr, "info", "", None).await;
    assert_eq!(info["subscriptions"], 1, "the slow subscriber was removed: {info}");
    // Its connection is released: reading what was buffered ends in close/EOF.
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "slow connection closed");
    // The kernel's loopback buffers hold megabytes; what matters is that it was cut off
    // before receiving everything (Herald's own queue is bounded: see hub's unit tests).
    assert!(sink.len() < N * blob.len(), "cut off early: {} bytes", sink.len());
    let (head, mut m) = raw_request(server.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"));
    let mut text = String::new();
    m.read_to_string(&mut text).await.expect("metrics");
    assert!(text.contains("herald_slow_consumers_total"), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn sse_and_raw_websocket_deliver_the_data() {
    let server = TestServer::start(config()).await;
    let (head, mut sse) = raw_request(server.addr, "GET /sse/news HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    let (mut raw, _) = tokio_tungstenite::connect_async(server.ws_url("/ws/news")).await.expect("raw ws");
    // Wait until both are subscribed.
    for _ in 0..100 {
        let (_, info) = api(server.addr, "info", "", None).await;
        if info["subscriptions"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api(server.addr, "publish", r#"{"channel":"news","data":{"title":"hi"}}"#, None).await;
    assert_eq!(raw.next().await.expect("frame").expect("ok"), Message::text(r#"{"title":"hi"}"#));
    let mut got = String::new();
    while !got.contains("data: {\"title\":\"hi\"}") {
        let mut buf = [0u8; 1024];
        let n =
            tokio::time::timeout(Duration::from_secs(5), sse.read(&mut buf)).await.expect("sse in time").expect("read");
        assert!(n > 0);
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains(":1\n"), "id is <epoch>:<offset>: {got}");
    let (status, body) = http(server.addr, "GET /sse/locked:x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!((status, body["error"]["code"].as_u64()), (403, Some(103)));
    let (status, _) = http(server.addr, "GET /sse/bad%20name HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 400);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_native_clients_with_1001() {
    let server = TestServer::start(config()).await;
    let mut c = Native::connected(server.addr).await;
    c.request("subscribe", json!({"channel": "news"})).await;
    let stopping = tokio::spawn(server.shutdown());
    match tokio::time::timeout(Duration::from_secs(10), c.ws.next()).await.expect("in time") {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1001),
        other => panic!("expected 1001, got {other:?}"),
    }
    stopping.await.expect("stopped");
}

/// A value of `/metrics` (0 when absent).
async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let (head, mut s) = raw_request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("metrics");
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

#[tokio::test]
async fn the_times_of_a_push_are_measured_inside_the_server() {
    let server = TestServer::start(config()).await;
    let mut sub = Native::connected(server.addr).await;
    sub.request("subscribe", json!({"channel": "timed"})).await;
    // Counters are process-wide and other tests run meanwhile: compare growth, not values.
    let queued_before = metric(server.addr, "herald_publish_queue_seconds_count").await;
    let written_before = metric(server.addr, "herald_queue_write_seconds_count").await;
    // One at a time, each read before the next: every push is a batch of its own.
    let n = 3 * 64;
    for seq in 0..n {
        let (status, _) =
            api(server.addr, "publish", &json!({"channel": "timed", "data": seq}).to_string(), None).await;
        assert_eq!(status, 200);
        assert_eq!(data_of(&sub.push().await), &json!(seq));
    }
    // Publications to a channel nobody here subscribes to are not fan-outs and are not timed.
    api(server.addr, "publish", r#"{"channel":"untimed","data":1}"#, None).await;
    let queued = metric(server.addr, "herald_publish_queue_seconds_count").await - queued_before;
    let written = metric(server.addr, "herald_queue_write_seconds_count").await - written_before;
    assert!(queued >= f64::from(n), "{queued} fan-outs timed for {n} publications");
    // 192 batches on this connection: 3 of them sampled (others' connections may add more).
    assert!(written >= 3.0, "{written} writes timed for {n} single-frame batches");
    let (_, mut s) = raw_request(server.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("metrics");
    for bucket in
        [r#"herald_publish_queue_seconds_bucket{le="0.0001"}"#, r#"herald_queue_write_seconds_bucket{le="0.001"}"#]
    {
        assert!(body.contains(bucket), "{bucket} missing from /metrics:\n{body}");
    }
    server.shutdown().await;
}
