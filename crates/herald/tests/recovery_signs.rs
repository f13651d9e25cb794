//! When history cannot help, Herald says so: `recover: true` without a position answers
//! `recovered: false` with the current position, `history` with a lost epoch answers 122,
//! a malformed `Last-Event-ID` starts with `herald-reset`, and every recovery is counted.

mod common;

use std::time::Duration;

use common::*;
use herald::Config;
use serde_json::json;
use tokio::io::AsyncReadExt;

async fn publish(addr: std::net::SocketAddr, channel: &str, n: u64) -> serde_json::Value {
    let (status, body) = api(addr, "publish", &json!({"channel": channel, "data": {"n": n}}).to_string(), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn recover_without_a_position_answers_not_recovered_with_the_current_position() {
    let server = TestServer::start(Config::default()).await;
    let last = publish(server.addr, "news", 1).await;
    publish(server.addr, "news", 2).await;
    let mut c = Native::connected(server.addr).await;
    let r = c.request("subscribe", json!({"channel": "news", "recover": true})).await;
    let s = &r["subscribe"];
    assert_eq!(
        (s["recovered"].clone(), s["offset"].clone(), s["epoch"].clone()),
        (json!(false), json!(2), last["epoch"].clone()),
        "{r}"
    );
    assert!(s.get("publications").is_none_or(|p| p.as_array().is_some_and(Vec::is_empty)), "nothing replayed: {r}");
    // Live publications follow as usual.
    publish(server.addr, "news", 3).await;
    let push = c.push().await;
    assert_eq!(push["push"]["pub"]["offset"], 3, "{push}");
    server.shutdown().await;
}

#[tokio::test]
async fn history_since_a_lost_epoch_is_error_122_not_an_empty_list() {
    let server = TestServer::start(Config::default()).await;
    let first = publish(server.addr, "news", 1).await;
    publish(server.addr, "news", 2).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    let mut c = Native::connected(server.addr).await;
    let r = c.request("history", json!({"channel": "news", "since": {"epoch": epoch, "offset": 1}})).await;
    assert_eq!(r["history"]["publications"].as_array().map(Vec::len), Some(1), "the right epoch works: {r}");
    let r = c.request("history", json!({"channel": "news", "since": {"epoch": "gone", "offset": 1}})).await;
    assert_eq!(r["error"]["code"], 122, "{r}");
    let message = r["error"]["message"].as_str().expect("message");
    assert!(message.contains(&epoch) && message.contains("offset 2"), "names the current position: {message}");
    let (status, body) =
        api(server.addr, "history", r#"{"channel":"news","since":{"epoch":"gone","offset":1}}"#, None).await;
    assert_eq!((status, body["error"]["code"].as_u64()), (409, Some(122)), "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_malformed_last_event_id_starts_with_herald_reset_and_recoveries_are_counted() {
    let server = TestServer::start(Config::default()).await;
    publish(server.addr, "feed", 1).await;
    let req = "GET /sse/feed HTTP/1.1\r\nHost: x\r\nLast-Event-ID: not-a-position\r\n\r\n";
    let (head, mut s) = raw_request(server.addr, req).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut got = String::new();
    while !got.contains("event: herald-reset\n") {
        let mut buf = [0u8; 2048];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("in time").expect("read");
        assert!(n > 0, "stream ended: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains(":1\ndata: {\"epoch\":"), "the reset names the current position: {got}");
    let (_, mut m) = raw_request(server.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let mut metrics = String::new();
    m.read_to_string(&mut metrics).await.expect("metrics");
    assert!(metrics.contains("herald_recoveries_total{result=\"not_recovered\"}"), "{metrics}");
    server.shutdown().await;
}
