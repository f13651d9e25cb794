//! The WebSocket layer over real sockets: handshake answers, echo, compression, protocol
//! errors, pings, limits and graceful shutdown.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use herald::ws::{deflate, frame, frame::OpCode};
use herald::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const MASK: Option<[u8; 4]> = Some([1, 2, 3, 4]);

#[tokio::test]
async fn echo_round_trips_text_and_binary() {
    let server = TestServer::echo().await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(server.ws_url("/_echo")).await.expect("connect");
    assert_eq!(resp.status(), 101);
    for i in 0..50 {
        ws.send(Message::text(format!("hello {i} ✓"))).await.expect("send");
        assert_eq!(ws.next().await.expect("reply").expect("ok"), Message::text(format!("hello {i} ✓")));
    }
    let big = vec![7u8; 300_000];
    ws.send(Message::binary(big.clone())).await.expect("send");
    assert_eq!(ws.next().await.expect("reply").expect("ok"), Message::binary(big));
    ws.close(None).await.expect("close");
    server.shutdown().await;
}

#[tokio::test]
async fn handshake_errors_are_clear() {
    let server = TestServer::echo().await;
    let (head, _) = raw_request(server.addr, "GET /_echo HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    let (head, _) = raw_request(
        server.addr,
        "GET /_echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(head.to_ascii_lowercase().contains("sec-websocket-version: 13"), "{head}");
    let (head, mut s) = raw_request(
        server.addr,
        "GET /_echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let mut body = vec![0u8; 256];
    let n = s.read(&mut body).await.expect("body");
    let body: serde_json::Value = serde_json::from_slice(&body[..n]).expect("json body");
    assert_eq!(body["error"]["code"], 107);
    let (head, _) = raw_request(server.addr, "POST /_echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    server.shutdown().await;
}

#[tokio::test]
async fn permessage_deflate_is_negotiated_and_used_both_ways() {
    let server = TestServer::echo().await;
    let (head, mut s) = raw_request(
        server.addr,
        &upgrade_request("/_echo", "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("permessage-deflate; server_no_context_takeover; client_no_context_takeover"), "{head}");
    let text = "compressible text, compressible text, compressible text! ".repeat(20);
    let z = deflate::compress(text.as_bytes(), 15, 6);
    s.write_all(&frame::encode(true, true, OpCode::Text, &z, MASK)).await.expect("write");
    let mut buf = Vec::new();
    let (b0, payload) = loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        if let Some((b0, payload, _)) = parse_server_frame(&buf) {
            break (b0, payload);
        }
    };
    assert_eq!(b0, 0x80 | 0x40 | 0x1, "FIN + RSV1 + text: the echo is compressed");
    assert!(payload.len() < text.len() / 4);
    let back = deflate::Inflater::Shared.inflate(&payload, 1 << 20).expect("inflates");
    assert_eq!(back, text.as_bytes());
    server.shutdown().await;
}

#[tokio::test]
async fn protocol_errors_close_with_the_rfc_code_and_release_the_socket() {
    let server = TestServer::echo().await;
    for (frame_bytes, code) in [
        (frame::encode(true, false, OpCode::Text, b"unmasked", None).to_vec(), 1002u16),
        (frame::encode(true, false, OpCode::Text, &[0xff, 0xfe], MASK).to_vec(), 1007),
        (frame::encode(true, true, OpCode::Text, b"rsv1", MASK).to_vec(), 1002),
    ] {
        let (head, mut s) = raw_request(server.addr, &upgrade_request("/_echo", "")).await;
        assert!(head.starts_with("HTTP/1.1 101"));
        s.write_all(&frame_bytes).await.expect("write");
        let bytes = read_to_close(&mut s, Duration::from_secs(10)).await;
        let (b0, payload, _) = parse_server_frame(&bytes).expect("a close frame");
        assert_eq!(b0, 0x88, "close frame");
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_silent_peer_is_pinged_then_dropped() {
    let mut c = Config::default();
    c.testing.echo = true;
    c.websocket.ping_interval = Duration::from_millis(200);
    c.websocket.pong_timeout = Duration::from_millis(200);
    let server = TestServer::start(c).await;
    let (head, mut s) = raw_request(server.addr, &upgrade_request("/_echo", "")).await;
    assert!(head.starts_with("HTTP/1.1 101"));
    let bytes = read_to_close(&mut s, Duration::from_secs(10)).await;
    let (b0, _, used) = parse_server_frame(&bytes).expect("a ping");
    assert_eq!(b0, 0x89, "ping first");
    let (b0, payload, _) = parse_server_frame(&bytes[used..]).expect("then a close");
    assert_eq!(b0, 0x88);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
    server.shutdown().await;
}

#[tokio::test]
async fn a_peer_that_answers_pings_stays() {
    let mut c = Config::default();
    c.testing.echo = true;
    c.websocket.ping_interval = Duration::from_millis(100);
    c.websocket.pong_timeout = Duration::from_millis(100);
    let server = TestServer::start(c).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("/_echo")).await.expect("connect");
    let mut pings = 0;
    // tungstenite answers pings while we read; after several intervals the echo still works.
    while pings < 4 {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("ping in time") {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    ws.send(Message::text("still here")).await.expect("send");
    loop {
        match ws.next().await.expect("reply").expect("ok") {
            Message::Ping(_) => continue,
            m => {
                assert_eq!(m, Message::text("still here"));
                break;
            }
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_closes_every_websocket_with_1001() {
    let server = TestServer::echo().await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(tokio_tungstenite::connect_async(server.ws_url("/_echo")).await.expect("connect").0);
    }
    let stopping = tokio::spawn(server.shutdown());
    for mut ws in clients {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("close in time");
        match msg {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Away),
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    stopping.await.expect("stopped");
}

#[tokio::test]
async fn shutdown_spreads_the_closes_and_hints_when_to_reconnect() {
    let mut c = Config::default();
    c.testing.echo = true;
    c.drain_spread = Duration::from_secs(2);
    let server = TestServer::start(c).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(tokio_tungstenite::connect_async(server.ws_url("/_echo")).await.expect("connect").0);
    }
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    let mut waits = Vec::new();
    let mut hints = Vec::new();
    let reads = clients.into_iter().map(|mut ws| async move {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("close in time");
        (msg, std::time::Instant::now())
    });
    for (msg, at) in futures_util::future::join_all(reads).await {
        let f = match msg {
            Some(Ok(Message::Close(Some(f)))) => f,
            other => panic!("expected close 1001, got {other:?}"),
        };
        assert_eq!(f.code, CloseCode::Away);
        let reason = f.reason.to_string();
        let hint: u64 = reason
            .strip_prefix("server shutting down; reconnect_in=")
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(|| panic!("a reconnect hint in {reason:?}"));
        assert!(hint <= 2000, "the hint is a part of drain_spread: {hint}");
        hints.push(hint);
        waits.push(at.duration_since(started));
    }
    stopping.await.expect("stopped");
    hints.sort_unstable();
    hints.dedup();
    assert!(hints.len() > 1, "hints are random, not one number for all: {hints:?}");
    let (first, last) = (waits.iter().min().expect("some"), waits.iter().max().expect("some"));
    // Uniform over 2 s: 20 closes all within 200 ms of each other would mean no spread.
    assert!(*last - *first >= Duration::from_millis(200), "closes spread over the window: {first:?}..{last:?}");
}

#[tokio::test]
async fn connections_per_ip_are_limited() {
    let mut c = Config::default();
    c.testing.echo = true;
    c.limits.max_connections_per_ip = 2;
    let server = TestServer::start(c).await;
    let a = tokio_tungstenite::connect_async(server.ws_url("/_echo")).await.expect("first");
    let b = tokio_tungstenite::connect_async(server.ws_url("/_echo")).await.expect("second");
    assert!(tokio_tungstenite::connect_async(server.ws_url("/_echo")).await.is_err(), "third is refused");
    drop(a);
    // The place is released once the server notices the first connection is gone.
    let mut ok = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if tokio_tungstenite::connect_async(server.ws_url("/_echo")).await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "a place frees up after a disconnect");
    drop(b);
    server.shutdown().await;
}

#[tokio::test]
async fn a_silent_tcp_connection_hits_the_handshake_timeout() {
    let mut c = Config::default();
    c.websocket.handshake_timeout = Duration::from_millis(300);
    let server = TestServer::start(c).await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    let bytes = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(bytes.is_empty() || String::from_utf8_lossy(&bytes).starts_with("HTTP/1.1 408"), "{bytes:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn health_ready_metrics_and_json_404() {
    let server = TestServer::echo().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("/_echo")).await.expect("connect");
    ws.send(Message::text("count me")).await.expect("send");
    ws.next().await.expect("echo").expect("ok");
    for (path, status) in [("/health", "200"), ("/ready", "200"), ("/nope", "404")] {
        let (head, _) = raw_request(server.addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{path}: {head}");
        assert!(head.contains("application/json"), "{path}: {head}");
    }
    let (head, mut s) = raw_request(server.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("body");
    for name in [
        "herald_connections",
        "herald_handshake_seconds_bucket",
        "herald_frames_received_total",
        "herald_frames_sent_total",
        "herald_bytes_in_total",
        "herald_bytes_out_total",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
    server.shutdown().await;
}
