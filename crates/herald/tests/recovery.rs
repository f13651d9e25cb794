//! Recovery after a reconnect: exactly what was missed, in order, then the live stream with no
//! gap and no duplicate — or a plain `recovered: false` when that is impossible.

mod common;

use std::time::Duration;

use common::*;
use herald::config::NamespaceOptions;
use herald::Config;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

fn config() -> Config {
    let mut c = Config::default();
    c.channels.namespaces.insert("tiny".into(), NamespaceOptions { history_size: 5, ..Default::default() });
    c
}

async fn publish(addr: std::net::SocketAddr, channel: &str, seq: u64) -> Value {
    let (status, body) =
        api(addr, "publish", &json!({"channel": channel, "data": {"seq": seq}}).to_string(), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn a_client_that_reconnects_gets_exactly_what_it_missed_then_live() {
    let server = TestServer::start(config()).await;
    let mut c = Native::connected(server.addr).await;
    let r = c.request("subscribe", json!({"channel": "news"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().expect("epoch").to_owned();
    for seq in 1..=3 {
        publish(server.addr, "news", seq).await;
    }
    let mut last = 0;
    for _ in 0..3 {
        last = c.push().await["push"]["pub"]["offset"].as_u64().expect("offset");
    }
    drop(c); // the network drops

    for seq in 4..=10 {
        publish(server.addr, "news", seq).await;
    }
    let mut c = Native::connected(server.addr).await;
    let r = c.request("subscribe", json!({"channel": "news", "recover": true, "epoch": epoch, "offset": last})).await;
    let s = &r["subscribe"];
    assert_eq!(s["recovered"], true, "{r}");
    assert_eq!((s["epoch"].as_str(), s["offset"].as_u64()), (Some(epoch.as_str()), Some(10)));
    let got: Vec<u64> =
        s["publications"].as_array().expect("publications").iter().map(|p| p["offset"].as_u64().unwrap_or(0)).collect();
    assert_eq!(got, (4..=10).collect::<Vec<_>>(), "exactly the 7 missed, in order");
    assert_eq!(s["publications"][0]["data"]["seq"], 4);
    publish(server.addr, "news", 11).await;
    assert_eq!(c.push().await["push"]["pub"]["offset"], 11, "then live, no gap");
    server.shutdown().await;
}

#[tokio::test]
async fn publications_racing_with_the_resubscribe_are_neither_lost_nor_doubled() {
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    let first = publish(addr, "race", 0).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    // Publish 60 more while the client resubscribes from offset 1.
    let publisher = tokio::spawn(async move {
        for seq in 1..=60 {
            publish(addr, "race", seq).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut c = Native::connected(addr).await;
    let r = c.request("subscribe", json!({"channel": "race", "recover": true, "epoch": epoch, "offset": 1})).await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let mut offsets: Vec<u64> = r["subscribe"]["publications"]
        .as_array()
        .expect("list")
        .iter()
        .map(|p| p["offset"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        r["subscribe"]["offset"].as_u64(),
        offsets.last().copied().or(Some(1)),
        "the reply's position is its last publication"
    );
    publisher.await.expect("publisher");
    while offsets.last().copied().unwrap_or(1) < 61 {
        offsets.push(c.push().await["push"]["pub"]["offset"].as_u64().expect("offset"));
    }
    assert_eq!(offsets, (2..=61).collect::<Vec<_>>(), "contiguous: recovered then live");
    server.shutdown().await;
}

#[tokio::test]
async fn a_gap_larger_than_history_is_reported_not_papered_over() {
    let server = TestServer::start(config()).await;
    let first = publish(server.addr, "tiny:x", 1).await;
    for seq in 2..=9 {
        publish(server.addr, "tiny:x", seq).await;
    }
    let mut c = Native::connected(server.addr).await;
    let r = c
        .request("subscribe", json!({"channel": "tiny:x", "recover": true, "epoch": first["epoch"], "offset": 1}))
        .await;
    let s = &r["subscribe"];
    assert_eq!(s["recovered"], false, "offsets 2..4 left the 5-entry history: {r}");
    assert!(s.get("publications").is_none(), "no partial recovery: {r}");
    assert_eq!(s["offset"], 9, "the current position, to reload from");
    // Within the window it works.
    let r = c.request("unsubscribe", json!({"channel": "tiny:x"})).await;
    assert!(r.get("unsubscribe").is_some());
    let r = c
        .request("subscribe", json!({"channel": "tiny:x", "recover": true, "epoch": first["epoch"], "offset": 4}))
        .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_restarted_server_has_a_new_epoch_and_says_so() {
    let server = TestServer::start(config()).await;
    let before = publish(server.addr, "news", 1).await;
    server.shutdown().await;
    let server = TestServer::start(config()).await;
    let mut c = Native::connected(server.addr).await;
    let r = c
        .request("subscribe", json!({"channel": "news", "recover": true, "epoch": before["epoch"], "offset": 1}))
        .await;
    assert_eq!(r["subscribe"]["recovered"], false, "{r}");
    assert_ne!(r["subscribe"]["epoch"], before["epoch"]);
    // `recover: true` with no position yet: accepted, "not recovered", the current position.
    let r = c.request("subscribe", json!({"channel": "other", "recover": true})).await;
    assert_eq!(r["subscribe"]["recovered"], false, "{r}");
    let r = c.request("subscribe", json!({"channel": "third", "recover": true, "offset": 3})).await;
    assert_eq!(r["error"]["code"], 107, "half a position is malformed: {r}");
    server.shutdown().await;
}

async fn read_sse_until(s: &mut tokio::net::TcpStream, got: &mut String, needle: &str) {
    while !got.contains(needle) {
        let mut buf = [0u8; 2048];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("in time").expect("read");
        assert!(n > 0, "stream ended: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test]
async fn sse_resumes_from_last_event_id() {
    let server = TestServer::start(config()).await;
    let first = publish(server.addr, "feed", 1).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    for seq in 2..=4 {
        publish(server.addr, "feed", seq).await;
    }
    let req = format!("GET /sse/feed HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {epoch}:2\r\n\r\n");
    let (head, mut s) = raw_request(server.addr, &req).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut got = String::new();
    read_sse_until(&mut s, &mut got, &format!("id: {epoch}:4\n")).await;
    assert!(!got.contains(&format!("id: {epoch}:2\n")), "nothing it already had: {got}");
    assert!(got.contains(&format!("id: {epoch}:3\ndata: {{\"seq\":3}}")), "{got}");
    publish(server.addr, "feed", 5).await;
    read_sse_until(&mut s, &mut got, &format!("id: {epoch}:5\n")).await;

    let req = "GET /sse/feed HTTP/1.1\r\nHost: x\r\nLast-Event-ID: stale:1\r\n\r\n";
    let (_, mut s) = raw_request(server.addr, req).await;
    let mut got = String::new();
    read_sse_until(&mut s, &mut got, "event: herald-reset\n").await;
    server.shutdown().await;
}
