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
        config.listen = addr;
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
