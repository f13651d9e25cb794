//! The HTTP edge over real sockets: origins on every WebSocket door and SSE, CORS, the API's
//! CSRF rule and keys, and the limits on request heads and bodies (each with its counter).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{http, raw_request, read_to_close, upgrade_request, TestServer};
use herald::config::Secret;
use herald::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn restricted() -> Config {
    let mut c = Config::default();
    c.http.allowed_origins = vec!["https://app.example.com".into(), "https://*.example.org".into()];
    c
}

fn status(head: &str) -> u16 {
    head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status")
}

/// Reads the JSON body after a head (the connection ends after it or the length says so).
async fn json_body(head: &str, s: &mut TcpStream) -> serde_json::Value {
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
        .and_then(|v| v.parse().ok())
        .expect("content-length");
    let mut body = vec![0; len];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut body)).await.expect("body in time").expect("body");
    serde_json::from_slice(&body).expect("json body")
}

/// The sum of a counter's samples whose line contains `label` (e.g. `reason="origin"`).
async fn counter(addr: SocketAddr, name: &str, label: &str) -> u64 {
    let (head, mut s) = raw_request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&head), 200);
    let text = String::from_utf8_lossy(&read_to_close(&mut s, Duration::from_secs(5)).await).into_owned();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test]
async fn every_websocket_door_checks_the_origin() {
    let server = TestServer::start(restricted()).await;
    let before = counter(server.addr, "herald_http_refused_total", "reason=\"origin\"").await;
    for path in ["/connect", "/ws/news"] {
        for (origin, expect) in [
            (Some("https://evil.example.com"), 403),
            (Some("https://app.example.com.evil.com"), 403),
            (Some("null"), 403),
            (Some("https://app.example.com"), 101),
            (Some("https://a.b.example.org"), 101),
            (None, 101),
        ] {
            let extra = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
            let (head, mut s) = raw_request(server.addr, &upgrade_request(path, &extra)).await;
            assert_eq!(status(&head), expect, "{path} from {origin:?}: {head}");
            if expect == 403 {
                let body = json_body(&head, &mut s).await;
                assert_eq!(body["error"]["code"], 120, "{body}");
                assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("allowed_origins")), "{body}");
            }
        }
    }
    let after = counter(server.addr, "herald_http_refused_total", "reason=\"origin\"").await;
    assert!(after >= before + 6, "each refusal counted: {before} -> {after}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_default_policy_lets_any_origin_connect() {
    let server = TestServer::start(Config::default()).await;
    let (head, _s) = raw_request(server.addr, &upgrade_request("/connect", "Origin: https://anything.test\r\n")).await;
    assert_eq!(status(&head), 101, "{head}");
    let req = "GET /sse/news HTTP/1.1\r\nHost: x\r\nOrigin: http://localhost:5173\r\n\r\n";
    let (head, _s) = raw_request(server.addr, req).await;
    assert_eq!(status(&head), 200, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("access-control-allow-origin: http://localhost:5173"), "{head}");
    assert!(lower.contains("vary: origin"), "{head}");
    server.shutdown().await;
}

#[tokio::test]
async fn sse_answers_cors_for_allowed_origins_and_403_for_others() {
    let server = TestServer::start(restricted()).await;
    let req = |o: &str| format!("GET /sse/news HTTP/1.1\r\nHost: x\r\nOrigin: {o}\r\n\r\n");
    let (head, _s) = raw_request(server.addr, &req("https://x.example.org")).await;
    assert_eq!(status(&head), 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("access-control-allow-origin: https://x.example.org"), "{head}");
    let (head, mut s) = raw_request(server.addr, &req("https://evil.test")).await;
    assert_eq!(status(&head), 403, "{head}");
    assert!(!head.to_ascii_lowercase().contains("access-control-allow-origin"), "{head}");
    assert_eq!(json_body(&head, &mut s).await["error"]["code"], 120);
    // Without an Origin (curl, a backend) SSE is unaffected.
    let (head, _s) = raw_request(server.addr, "GET /sse/news HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status(&head), 200, "{head}");
    server.shutdown().await;
}

fn post(addr: SocketAddr, extra: &str, body: &str) -> String {
    format!(
        "POST /api/publish HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\n{extra}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

const NEWS: &str = r#"{"channel":"news","data":1}"#;

#[tokio::test]
async fn a_cross_origin_post_to_a_keyless_loopback_api_is_refused() {
    // The default (open) policy: the origin may connect, but gets no loopback trust.
    let server = TestServer::start(Config::default()).await;
    let addr = server.addr;
    let (code, body) = http(addr, &post(addr, "Origin: https://evil.test\r\n", NEWS)).await;
    assert_eq!(code, 401, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("other origins")), "{body}");
    // Same origin (a page Herald served) and no Origin at all keep the loopback trust.
    let same = format!("Origin: http://{addr}\r\n");
    assert_eq!(http(addr, &post(addr, &same, NEWS)).await.0, 200);
    assert_eq!(http(addr, &post(addr, "", NEWS)).await.0, 200);
    server.shutdown().await;

    // A restricted policy: other origins get 403 before anything else.
    let server = TestServer::start(restricted()).await;
    let addr = server.addr;
    let (code, body) = http(addr, &post(addr, "Origin: https://evil.test\r\n", NEWS)).await;
    assert_eq!((code, body["error"]["code"].as_u64()), (403, Some(120)), "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_keyless_api_never_trusts_a_request_that_came_through_a_proxy() {
    let server = TestServer::start(Config::default()).await;
    let addr = server.addr;
    // What nginx, Caddy, HAProxy or a cloud load balancer add in front of a loopback Herald.
    for header in [
        "X-Forwarded-For: 203.0.113.9\r\n",
        "X-Real-IP: 203.0.113.9\r\n",
        "Forwarded: for=203.0.113.9;proto=https\r\n",
        "X-Forwarded-Host: push.example.com\r\n",
        "Via: 1.1 proxy\r\n",
    ] {
        let (code, body) = http(addr, &post(addr, header, NEWS)).await;
        assert_eq!((code, body["error"]["code"].as_u64()), (401, Some(101)), "{header}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("through a proxy") && message.contains("api.key"), "{message}");
        // The Centrifugo-compatible API shares the rule.
        let centrifugo = format!(
            "POST /centrifugo/api/publish HTTP/1.1\r\nHost: {addr}\r\n{header}Content-Length: {}\r\nConnection: close\r\n\r\n{NEWS}",
            NEWS.len()
        );
        assert_eq!(http(addr, &centrifugo).await.0, 401, "{header}");
    }
    // Direct from loopback, without forwarding headers: still answered.
    assert_eq!(http(addr, &post(addr, "", NEWS)).await.0, 200);
    server.shutdown().await;

    // With a key the headers do not matter: the key decides.
    let mut config = Config::default();
    config.api.key = Secret::new("k3y-through-a-proxy");
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let keyed = "X-Forwarded-For: 203.0.113.9\r\nAuthorization: Bearer k3y-through-a-proxy\r\n";
    assert_eq!(http(addr, &post(addr, keyed, NEWS)).await.0, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn preflights_are_answered_only_for_allowed_origins() {
    let mut config = restricted();
    config.api.key = Secret::new("k1");
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let preflight = |o: &str| {
        format!(
            "OPTIONS /api/publish HTTP/1.1\r\nHost: {addr}\r\nOrigin: {o}\r\nAccess-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: authorization, content-type\r\nConnection: close\r\n\r\n"
        )
    };
    let (head, _s) = raw_request(addr, &preflight("https://app.example.com")).await;
    assert_eq!(status(&head), 204, "{head}");
    let lower = head.to_ascii_lowercase();
    for h in [
        "access-control-allow-origin: https://app.example.com",
        "access-control-allow-methods: post",
        "access-control-allow-headers: authorization, content-type",
        "vary: origin",
    ] {
        assert!(lower.contains(h), "{h} missing: {head}");
    }
    let (head, _s) = raw_request(addr, &preflight("https://evil.test")).await;
    assert_eq!(status(&head), 403, "{head}");

    // The real request from the allowed origin, with its key: answered, with CORS.
    let (head, mut s) =
        raw_request(addr, &post(addr, "Origin: https://app.example.com\r\nAuthorization: Bearer k1\r\n", NEWS)).await;
    assert_eq!(status(&head), 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("access-control-allow-origin: https://app.example.com"), "{head}");
    let _ = read_to_close(&mut s, Duration::from_secs(5)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn several_keys_bearer_or_apikey_and_clear_refusals() {
    let mut config = Config::default();
    config.api.key = Secret::new("old-key-123");
    config.api.keys = vec![Secret::new("new-key-456")];
    let server = TestServer::start(config).await;
    let addr = server.addr;
    for auth in ["Bearer old-key-123", "bearer new-key-456", "apikey old-key-123", "apikey new-key-456"] {
        let (code, body) = http(addr, &post(addr, &format!("Authorization: {auth}\r\n"), NEWS)).await;
        assert_eq!(code, 200, "{auth}: {body}");
    }
    let refused = [
        ("", "missing header `Authorization: Bearer <key>`"),
        ("Authorization: Basic b2xkLWtleS0xMjM=\r\n", "must be `Bearer <key>`"),
        ("Authorization: new-key-456\r\n", "must be `Bearer <key>`"),
        ("Authorization: Bearer new-key-45\r\n", "invalid API key"),
        ("Authorization: Bearer wrong\r\n", "invalid API key"),
    ];
    for (header, message) in refused {
        let (code, body) = http(addr, &post(addr, header, NEWS)).await;
        assert_eq!(code, 401, "{header}: {body}");
        let text = body.to_string();
        assert!(text.contains(message), "{header}: {text}");
        assert!(!text.contains("key-456") && !text.contains("key-123"), "a key is never echoed: {text}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_headers_get_431_and_are_counted() {
    let server = TestServer::start(Config::default()).await;
    let before = counter(server.addr, "herald_http_refused_total", "reason=\"header_too_large\"").await;
    let big = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20 << 10));
    let (head, _s) = raw_request(server.addr, &big).await;
    assert_eq!(status(&head), 431, "{head}");
    // Just under the default 16 KiB passes.
    let fits =
        format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(15 << 10));
    let (head, _s) = raw_request(server.addr, &fits).await;
    assert_eq!(status(&head), 200, "{head}");
    let after = counter(server.addr, "herald_http_refused_total", "reason=\"header_too_large\"").await;
    assert!(after > before, "counted: {before} -> {after}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off() {
    let mut config = Config::default();
    config.websocket.handshake_timeout = Duration::from_secs(1);
    let server = TestServer::start(config).await;
    let before = counter(server.addr, "herald_http_refused_total", "reason=\"header_timeout\"").await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ").await.expect("write");
    // One byte every 100 ms: the whole header would take 20 s; the server must close long
    // before (it allows 1 s for the head).
    let mut sent = 0;
    let mut closed = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(b"a").await.is_err() {
            closed = true;
            break;
        }
        sent += 1;
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    assert!(closed, "the connection was closed");
    assert!(sent < 60, "closed after {sent} trickled bytes (about 10 expected for a 1 s limit)");
    let mut after = 0;
    for _ in 0..50 {
        after = counter(server.addr, "herald_http_refused_total", "reason=\"header_timeout\"").await;
        if after > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(after > before, "counted: {before} -> {after}");

    // A connection that sends nothing at all is closed the same way.
    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    let got = read_to_close(&mut idle, Duration::from_secs(10)).await;
    assert!(got.is_empty(), "closed without an answer: {}", String::from_utf8_lossy(&got));
    server.shutdown().await;
}

#[tokio::test]
async fn a_declared_oversized_body_is_refused_before_it_is_sent() {
    let server = TestServer::start(Config::default()).await;
    let before = counter(server.addr, "herald_http_refused_total", "reason=\"body_too_large\"").await;
    // Only the head goes out: the answer must come without any body byte.
    let req = "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
               Content-Length: 50000000\r\n\r\n";
    let (head, mut s) = raw_request(server.addr, req).await;
    assert_eq!(status(&head), 413, "{head}");
    let body = json_body(&head, &mut s).await;
    assert_eq!(body["error"]["code"], 112, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("api.max_body_size")), "{body}");
    let after = counter(server.addr, "herald_http_refused_total", "reason=\"body_too_large\"").await;
    assert!(after > before, "counted: {before} -> {after}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_body_that_never_arrives_or_trickles_gets_408() {
    let mut config = Config::default();
    config.api.body_timeout = Duration::from_secs(1);
    let server = TestServer::start(config).await;
    let before = counter(server.addr, "herald_http_refused_total", "reason=\"body_timeout\"").await;

    // Never arrives: 100 bytes promised, none sent.
    let req = "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n";
    let (head, mut s) = raw_request(server.addr, req).await;
    assert_eq!(status(&head), 408, "{head}");
    assert_eq!(json_body(&head, &mut s).await["error"]["code"], 121);
    let _ = read_to_close(&mut s, Duration::from_secs(5)).await;

    // Trickles: a byte every 100 ms of 100 promised; the answer comes before half is sent.
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    s.write_all(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n").await.expect("write");
    let mut answer = Vec::new();
    let mut sent = 0;
    while sent < 100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(b" ").await.is_err() {
            break;
        }
        sent += 1;
        let mut buf = [0u8; 1024];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(sent < 50, "answered after {sent} of 100 body bytes");
    let after = counter(server.addr, "herald_http_refused_total", "reason=\"body_timeout\"").await;
    assert!(after >= before + 2, "both counted: {before} -> {after}");
    server.shutdown().await;
}
