//! A real Herald on 127.0.0.1:0 for integration tests, and small raw-socket helpers.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use herald::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(mut config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        config.listen = addr.to_string();
        // Tests shut servers down often: spread the closes over 100 ms, not the default 5 s,
        // unless the test chose a spread itself.
        if config.drain_spread == Config::default().drain_spread {
            config.drain_spread = Duration::from_millis(100);
        }
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(herald::server::run(config, listener, async {
            let _ = rx.await;
        }));
        Self { addr, stop: Some(tx), task: Some(task) }
    }

    /// A server with the echo endpoint on.
    pub async fn echo() -> Self {
        let mut c = Config::default();
        c.testing.echo = true;
        Self::start(c).await
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Triggers graceful shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("server stops within the drain timeout")
                .expect("server task")
                .expect("server ok");
        }
    }
}

/// Sends a raw HTTP request and returns the whole response head (up to the blank line) and
/// the stream, positioned after the head.
pub async fn raw_request(addr: SocketAddr, request: &str) -> (String, TcpStream) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "connection closed mid-response: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    (String::from_utf8_lossy(&head).into_owned(), s)
}

/// A WebSocket upgrade request with the given extra header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Reads until the peer closes the connection (or `limit` elapses), returning all bytes.
pub async fn read_to_close(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await.expect("peer closes in time");
    out
}

/// Parses one unmasked server frame at the start of `buf`: (first byte, payload).
pub fn parse_server_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, at) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 => (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    Some((buf[0], buf[at..at + len].to_vec(), at + len))
}

/// Calls the HTTP API with a raw HTTP/1.1 request; returns the status and the JSON body.
pub async fn api(addr: SocketAddr, method: &str, body: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let auth = key.map(|k| format!("Authorization: apikey {k}\r\n")).unwrap_or_default();
    let req = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    http(addr, &req).await
}

/// Sends any raw request with `Connection: close` and returns (status, JSON body).
pub async fn http(addr: SocketAddr, req: &str) -> (u16, serde_json::Value) {
    let (head, mut s) = raw_request(addr, req).await;
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status");
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut body)).await.expect("body in time").expect("body");
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A minimal native-protocol client over tungstenite, for tests that look at raw frames.
pub struct Native {
    pub ws: Ws,
    next_id: u32,
    /// Pushes that arrived while waiting for a reply.
    pub pushes: std::collections::VecDeque<serde_json::Value>,
}

impl Native {
    pub async fn open(addr: SocketAddr) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/connect")).await.expect("connect");
        Self { ws, next_id: 1, pushes: Default::default() }
    }

    /// Opens and sends `connect`.
    pub async fn connected(addr: SocketAddr) -> Self {
        let mut c = Self::open(addr).await;
        let r = c.request("connect", serde_json::json!({"name": "test"})).await;
        assert!(r.get("connect").is_some(), "{r}");
        c
    }

    pub async fn send_raw(&mut self, text: &str) {
        use futures_util::SinkExt;
        self.ws.send(tokio_tungstenite::tungstenite::Message::text(text)).await.expect("send");
    }

    /// The next JSON frame from the server (pings answered and skipped).
    pub async fn frame(&mut self) -> serde_json::Value {
        use futures_util::StreamExt;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("frame in time")
                .expect("open")
                .expect("ok");
            match msg {
                tokio_tungstenite::tungstenite::Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("json frame");
                    if v.as_object().is_some_and(|o| o.is_empty()) {
                        self.send_raw("{}").await;
                        continue;
                    }
                    return v;
                }
                tokio_tungstenite::tungstenite::Message::Close(f) => panic!("closed: {f:?}"),
                _ => continue,
            }
        }
    }

    /// Sends a command and returns its reply (queueing pushes seen meanwhile).
    pub async fn request(&mut self, command: &str, body: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send_raw(&serde_json::json!({ "id": id, command: body }).to_string()).await;
        self.reply(id).await
    }

    pub async fn reply(&mut self, id: u32) -> serde_json::Value {
        loop {
            let f = self.frame().await;
            if f.get("id").and_then(|v| v.as_u64()) == Some(u64::from(id)) {
                return f;
            }
            assert!(f.get("push").is_some(), "unexpected frame {f}");
            self.pushes.push_back(f);
        }
    }

    pub async fn push(&mut self) -> serde_json::Value {
        if let Some(p) = self.pushes.pop_front() {
            return p;
        }
        let f = self.frame().await;
        assert!(f.get("push").is_some(), "expected a push, got {f}");
        f
    }
}
