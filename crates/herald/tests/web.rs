//! What a browser finds: the SDK and demo pages served by the binary, a close code and reason
//! (not a dead end) for a WebSocket on a wrong path, raw `/ws/<channel>` publishing, and the
//! `--demo` token endpoint.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use herald::config::NamespaceOptions;
use herald::Config;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

fn config() -> Config {
    let mut c = Config::default();
    c.channels.namespaces.insert("chat".into(), NamespaceOptions { publish: true.into(), ..Default::default() });
    c
}

/// The next close frame on `ws` (skipping anything else), as (code, reason).
async fn close_of<S>(ws: &mut S) -> (u16, String)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("close in time") {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before the close frame: {e}"),
        }
    }
}

async fn get(addr: std::net::SocketAddr, path: &str, extra: &str) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n");
    let (head, mut s) = raw_request(addr, &req).await;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body)).await.expect("body in time").expect("body");
    (head, body)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn the_sdk_is_served_verbatim_with_a_validator() {
    let server = TestServer::start(config()).await;
    let (head, body) = get(server.addr, "/herald.js", "").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(header(&head, "content-type").is_some_and(|v| v.starts_with("text/javascript")), "{head}");
    assert_eq!(header(&head, "cache-control"), Some("no-cache"));
    let sdk = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../clients/js/herald.js")).expect("sdk file");
    assert_eq!(body, sdk, "the SDK file, byte for byte");
    let etag = header(&head, "etag").expect("etag").to_owned();
    let (head, body) = get(server.addr, "/herald.js", &format!("If-None-Match: {etag}\r\n")).await;
    assert!(head.starts_with("HTTP/1.1 304"), "{head}");
    assert!(body.is_empty());
    let (head, _) = get(server.addr, "/herald.js", "If-None-Match: \"stale\"\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_plain_server_says_what_it_is_and_serves_no_demo_pages() {
    let server = TestServer::start(config()).await;
    let (head, body) = get(server.addr, "/", "").await;
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/html"), "{head}");
    let home = String::from_utf8(body).expect("utf-8");
    assert!(home.contains(&format!("Herald {}", herald::VERSION)), "{home}");
    assert!(home.contains("/connect") && home.contains("/api/") && home.contains("/herald.js"), "{home}");
    assert!(home.contains("--demo") && !home.contains("href=\"/demo/"), "{home}");
    for path in ["/demo/chat", "/demo/ticker", "/demo/demo.js", "/demo/token?user=ada"] {
        let (head, _) = get(server.addr, path, "").await;
        assert!(head.starts_with("HTTP/1.1 404"), "{path}: {head}");
    }
    let (head, _) = get(server.addr, "/herald.js", "Origin: http://localhost:5173\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "the SDK is always served: {head}");
    assert_eq!(header(&head, "access-control-allow-origin"), Some("*"), "importable from another origin: {head}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_index_links_every_demo_page_and_each_is_served() {
    let mut demo = config();
    demo.demo = true;
    let server = TestServer::start(demo).await;
    let (head, body) = get(server.addr, "/", "").await;
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/html"), "{head}");
    let index = String::from_utf8(body).expect("utf-8");
    for page in ["/demo/chat", "/demo/notifications", "/demo/ticker", "/demo/plain"] {
        assert!(index.contains(&format!("href=\"{page}\"")), "index links {page}");
        let (head, body) = get(server.addr, page, "").await;
        assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/html"), "{page}: {head}");
        let html = String::from_utf8(body).expect("utf-8");
        assert!(
            html.contains("/demo/style.css") && html.contains("id=\"state\""),
            "{page} has the shared CSS and a state"
        );
    }
    for (path, kind) in [("/demo/style.css", "text/css"), ("/demo/demo.js", "text/javascript")] {
        let (head, _) = get(server.addr, path, "").await;
        assert!(head.starts_with("HTTP/1.1 200") && head.contains(kind), "{path}: {head}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_websocket_on_a_wrong_path_is_closed_with_4504_and_the_right_endpoints() {
    let server = TestServer::start(config()).await;
    for path in ["/", "/foo", "/ws", "/api/publish", "/sse/news", "/herald.js"] {
        let (mut ws, resp) =
            tokio_tungstenite::connect_async(server.ws_url(path)).await.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(resp.status(), 101, "{path}");
        let (code, reason) = close_of(&mut ws).await;
        assert_eq!(code, 4504, "{path}");
        assert!(reason.contains("/ws/<channel>") && reason.contains("/connect"), "{path}: {reason}");
        assert!(reason.len() <= 123);
    }
    // A plain GET on a wrong path is still a JSON 404.
    let (status, body) = http(server.addr, "GET /foo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!((status, body["error"]["code"].as_u64()), (404, Some(111)));
    server.shutdown().await;
}

#[tokio::test]
async fn raw_websocket_clients_publish_where_the_namespace_allows_it() {
    let server = TestServer::start(config()).await;
    let (mut a, _) = tokio_tungstenite::connect_async(server.ws_url("/ws/chat:room")).await.expect("a");
    let (mut b, _) = tokio_tungstenite::connect_async(server.ws_url("/ws/chat:room")).await.expect("b");
    for _ in 0..100 {
        let (_, info) = api(server.addr, "info", "", None).await;
        if info["subscriptions"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.send(Message::text(r#"{"text":"hi"}"#)).await.expect("send json");
    a.send(Message::text("plain words")).await.expect("send text");
    for ws in [&mut a, &mut b] {
        assert_eq!(ws.next().await.expect("frame").expect("ok"), Message::text(r#"{"text":"hi"}"#));
        assert_eq!(ws.next().await.expect("frame").expect("ok"), Message::text(r#""plain words""#));
    }
    // Both are in the channel's history, so SDK clients recover them too.
    let (status, history) = api(server.addr, "history", r#"{"channel":"chat:room","limit":10}"#, None).await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["publications"].as_array().map(Vec::len), Some(2), "{history}");

    // Where clients may not publish: a close code and a reason, never silence.
    let (mut news, _) = tokio_tungstenite::connect_async(server.ws_url("/ws/news")).await.expect("news");
    news.send(Message::text("hello?")).await.expect("send");
    let (code, reason) = close_of(&mut news).await;
    assert_eq!(code, 4505);
    assert!(reason.contains("publish"), "{reason}");
    // A binary frame is refused with 1003 where publishing is allowed.
    a.send(Message::binary(vec![1u8, 2, 3])).await.expect("send binary");
    let (code, _) = close_of(&mut a).await;
    assert_eq!(code, u16::from(CloseCode::Unsupported));
    server.shutdown().await;
}

#[tokio::test]
async fn demo_mode_mints_tokens_that_connect_as_that_user() {
    let mut c = Config::default();
    assert!(herald::web::apply_demo(&mut c).expect("demo setup"), "a secret is generated");
    let server = TestServer::start(c).await;
    let (status, body) =
        http(server.addr, "GET /demo/token?user=ada HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().expect("token").to_owned();
    let mut client = Native::open(server.addr).await;
    let r = client.request("connect", serde_json::json!({ "token": token })).await;
    assert!(r.get("connect").is_some(), "{r}");
    let r = client.request("subscribe", serde_json::json!({"channel": "chat:lobby"})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    let r = client.request("presence", serde_json::json!({"channel": "chat:lobby"})).await;
    let clients = r["presence"]["clients"].as_object().expect("presence").clone();
    assert_eq!(clients.values().map(|c| c["user"].clone()).collect::<Vec<_>>(), [serde_json::json!("ada")], "{r}");
    let (status, body) =
        http(server.addr, "GET /demo/token?user=a%20b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!((status, body["error"]["code"].as_u64()), (400, Some(107)));
    // The demo namespaces came from the TOML snippet: chat allows client publishing.
    let r = client.request("publish", serde_json::json!({"channel": "chat:lobby", "data": {"text": "hi"}})).await;
    assert!(r.get("publish").is_some(), "{r}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_refused_raw_websocket_gets_a_close_reason_not_a_bare_1006() {
    let mut c = config();
    c.channels.namespaces.insert("private".into(), NamespaceOptions { subscribe: false.into(), ..Default::default() });
    let server = TestServer::start(c).await;
    for (path, code, says) in [
        ("/ws/nope:x", 4506, "unknown namespace"),
        ("/ws/private:x", 4506, "`private:x`"),
        ("/ws/bad%20name", 4506, "`bad name`"),
        ("/ws/", 4504, "/ws/<channel>"),
    ] {
        let (mut ws, resp) =
            tokio_tungstenite::connect_async(server.ws_url(path)).await.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(resp.status(), 101, "{path}");
        let (got, reason) = close_of(&mut ws).await;
        assert_eq!(got, code, "{path}: {reason}");
        assert!(reason.contains(says) && reason.len() <= 123, "{path}: {reason}");
    }
    // A plain GET still gets the HTTP error with its JSON body.
    let (status, body) = http(server.addr, "GET /ws/nope:x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!((status, body["error"]["code"].as_u64()), (400, Some(102)), "{body}");
    server.shutdown().await;
}
