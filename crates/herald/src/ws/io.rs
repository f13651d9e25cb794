//! The byte stream under a WebSocket: plain TCP (the fan-out path, kept on tokio's own split
//! halves and readiness-based reads) or any other `AsyncRead + AsyncWrite` (TLS, an in-memory
//! pipe), boxed and split.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Any byte stream a WebSocket can run over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The stream a [`super::WebSocket`] takes over.
pub enum Stream {
    /// Plain TCP: reads wait for readiness first, so an idle connection holds no read buffer.
    Tcp(TcpStream),
    /// Anything else (TLS, `tokio::io::duplex`, hyper's upgraded stream).
    Other(Box<dyn Io>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp(_) => "Stream::Tcp",
            Self::Other(_) => "Stream::Other",
        })
    }
}

impl Stream {
    /// Boxes any stream; a [`TcpStream`] should use [`Stream::Tcp`] to keep its fast path.
    pub fn other(io: impl Io) -> Self {
        Self::Other(Box::new(io))
    }

    pub(crate) fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Self::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Self::Other(s) => {
                let (r, w) = tokio::io::split(s);
                (ReadHalf::Other(r), WriteHalf::Other(w))
            }
        }
    }
}

/// The reading side of a [`Stream`].
pub(crate) enum ReadHalf {
    Tcp(OwnedReadHalf),
    Other(tokio::io::ReadHalf<Box<dyn Io>>),
}

impl std::fmt::Debug for ReadHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadHalf")
    }
}

impl ReadHalf {
    /// Waits for data and appends what is there to `buf`, first making room for about `want`
    /// bytes. `Ok(None)`: woken without data (try again); `Ok(Some(0))`: end of stream.
    /// Cancel-safe: when dropped before completing, nothing was read.
    pub(crate) async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> std::io::Result<Option<usize>> {
        match self {
            Self::Tcp(r) => {
                r.readable().await?;
                reserve(buf, want);
                match r.try_read_buf(buf) {
                    Ok(n) => Ok(Some(n)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Self::Other(r) => {
                reserve(buf, want);
                r.read_buf(buf).await.map(Some)
            }
        }
    }
}

fn reserve(buf: &mut BytesMut, want: usize) {
    if buf.capacity() - buf.len() < want / 2 {
        buf.reserve(want);
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            Self::Other(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// The writing side of a [`Stream`], handed to [`super::Outbox::spawn_writer`], which runs a
/// writer compiled for each kind.
pub(crate) enum WriteHalf {
    Tcp(OwnedWriteHalf),
    Other(tokio::io::WriteHalf<Box<dyn Io>>),
}

impl std::fmt::Debug for WriteHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteHalf")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::Role as ClientRole;
    use tokio_tungstenite::tungstenite::Message as ClientMessage;
    use tokio_tungstenite::WebSocketStream;
    use tokio_util::sync::CancellationToken;

    use super::super::{Message, Settings, WebSocket, WsMetrics};
    use super::*;

    /// A server WebSocket over one end of an in-memory pipe, a client over the other.
    async fn pipe(settings: Settings) -> (WebSocket, WebSocketStream<tokio::io::DuplexStream>) {
        let (server, client) = tokio::io::duplex(64 << 10);
        let ws = WebSocket::start(
            Stream::other(server),
            Bytes::new(),
            Arc::new(settings),
            None,
            None,
            CancellationToken::new(),
            std::time::Duration::ZERO,
            WsMetrics::new(),
        );
        (ws, WebSocketStream::from_raw_socket(client, ClientRole::Client, None).await)
    }

    async fn next_text(client: &mut WebSocketStream<tokio::io::DuplexStream>) -> String {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), client.next())
                .await
                .expect("a message in time")
                .expect("open")
                .expect("valid");
            if let ClientMessage::Text(t) = msg {
                return t.to_string();
            }
        }
    }

    #[tokio::test]
    async fn plain_tcp_keeps_its_own_halves_and_vectored_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (read, write) = Stream::Tcp(server).split();
        assert!(matches!(read, ReadHalf::Tcp(_)));
        let WriteHalf::Tcp(write) = write else { panic!("TCP keeps tokio's own write half") };
        assert!(write.is_write_vectored(), "the outbox's writev reaches the socket");
    }

    #[tokio::test]
    async fn a_websocket_runs_over_an_in_memory_pipe() {
        let (mut ws, mut client) = pipe(Settings::default()).await;
        let echo = tokio::spawn(async move {
            let mut n = 0;
            while let Ok(Some(msg)) = ws.recv().await {
                if let Message::Text(t) = msg {
                    ws.outbox().send_text(t).expect("queue");
                    n += 1;
                }
            }
            n
        });
        // Larger than one read and than the pipe's buffer: reads and writes go round many times.
        let big = "x".repeat(100_000);
        for text in ["hello", big.as_str(), "bye"] {
            client.send(ClientMessage::text(text)).await.expect("send");
            assert_eq!(next_text(&mut client).await, text);
        }
        client.close(None).await.expect("close");
        while let Some(Ok(_)) = client.next().await {}
        assert_eq!(echo.await.expect("server task"), 3, "three messages, then a clean close");
    }

    #[tokio::test]
    async fn a_native_session_runs_over_an_in_memory_pipe() {
        use crate::config::{Config, NamespaceOptions};
        use crate::node::Node;
        use crate::ws::WsContext;
        let mut config = Config::default();
        config
            .channels
            .namespaces
            .insert("chat".into(), NamespaceOptions { publish: true.into(), ..Default::default() });
        let ctx = WsContext {
            shutdown: Default::default(),
            drain_spread: Default::default(),
            tracker: Default::default(),
            metrics: WsMetrics::new(),
        };
        let node = Arc::new(Node::new(Arc::new(config), ctx, None));
        let (ws, mut client) = pipe(Settings::default()).await;
        let session =
            tokio::spawn(crate::doors::session::run(node.clone(), ws, crate::doors::session::Dialect::Native));
        let reply = |c: &'static str| ClientMessage::text(c);
        client.send(reply(r#"{"id":1,"connect":{}}"#)).await.expect("send");
        let connected: serde_json::Value = serde_json::from_str(&next_text(&mut client).await).expect("json");
        assert!(connected["connect"]["client"].is_string(), "{connected}");
        client.send(reply(r#"{"id":2,"subscribe":{"channel":"chat:pipe"}}"#)).await.expect("send");
        let subscribed: serde_json::Value = serde_json::from_str(&next_text(&mut client).await).expect("json");
        assert_eq!(subscribed["id"], 2, "{subscribed}");
        client.send(reply(r#"{"id":3,"publish":{"channel":"chat:pipe","data":{"n":7}}}"#)).await.expect("send");
        let push: serde_json::Value = serde_json::from_str(&next_text(&mut client).await).expect("json");
        assert_eq!(push["push"]["pub"]["data"]["n"], 7, "{push}");
        assert_eq!(node.info().subscriptions, 1);
        drop(client);
        tokio::time::timeout(Duration::from_secs(10), session).await.expect("session ends").expect("task");
        assert_eq!(node.info().subscriptions, 0, "the session left its channel");
    }
}
