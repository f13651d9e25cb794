//! Opening the load generator's WebSockets: from many loopback source addresses (so one run
//! can pass the 64k ports of one address), with small buffers, no compression.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use herald_client::rustls;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

pub(super) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connections per source address when the count is not given (Herald's default
/// `limits.max_connections_per_ip` is 10,000).
const PER_SOURCE: usize = 5000;

/// How long opening one connection (TCP, upgrade, session) may take.
pub(super) const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// Source addresses 127.0.0.2, 127.0.0.3, ... for a loopback target; none otherwise.
#[derive(Debug, Clone)]
pub(super) struct Sources(Vec<IpAddr>);

impl Sources {
    pub(super) fn new(target: SocketAddr, connections: usize, count: Option<usize>) -> Self {
        let count = count.unwrap_or(connections.div_ceil(PER_SOURCE)).min(250);
        match target.ip() {
            IpAddr::V4(ip) if ip.is_loopback() && count > 0 => {
                Self((0..count).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8))).collect())
            }
            _ => Self(Vec::new()),
        }
    }

    pub(super) fn pick(&self, i: usize) -> Option<IpAddr> {
        (!self.0.is_empty()).then(|| self.0[i % self.0.len()])
    }
}

/// TCP connect (from `source`), TLS for a wss:// `url` (with `tls`), and WebSocket upgrade to
/// `url` at `addr`.
pub(super) async fn open(
    addr: SocketAddr,
    source: Option<IpAddr>,
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> anyhow::Result<Ws> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.context("socket")?;
    if let Some(ip) = source {
        // Choose the port at connect time, by the whole 4-tuple: a bind to port 0 alone must
        // find a port unused on that address, and back-to-back runs leave tens of thousands
        // in TIME_WAIT, which made connects crawl.
        #[cfg(target_os = "linux")]
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .context("IP_BIND_ADDRESS_NO_PORT")?;
        socket.bind(SocketAddr::new(ip, 0)).with_context(|| format!("cannot bind to {ip}"))?;
    }
    let stream = socket.connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    // tungstenite reserves 128 KiB per connection for reading by default.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let connector = tls.map_or(Connector::Plain, |c| Connector::Rustls(c.clone()));
    let (ws, _) = tokio_tungstenite::client_async_tls_with_config(url, stream, Some(config), Some(connector))
        .await
        .with_context(|| format!("WebSocket upgrade of {url} failed"))?;
    Ok(ws)
}

/// Sends one native-protocol command and waits for its reply, answering pings meanwhile.
pub(super) async fn command(ws: &mut Ws, id: u32, frame: String) -> anyhow::Result<String> {
    ws.send(Message::text(frame)).await.context("sending a command")?;
    let prefix = format!("{{\"id\":{id},");
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let t = t.as_str();
                if t == "{}" {
                    ws.send(Message::text("{}")).await.context("answering a ping")?;
                } else if t.starts_with(&prefix) {
                    anyhow::ensure!(!t.contains("\"error\":{"), "the server refused: {t}");
                    return Ok(t.to_owned());
                }
            }
            Some(Ok(Message::Close(frame))) => anyhow::bail!("closed by the server: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("the connection failed"),
            None => anyhow::bail!("the connection ended"),
        }
    }
}

/// The native protocol's `connect` command.
pub(super) async fn herald_connect(ws: &mut Ws) -> anyhow::Result<()> {
    command(ws, 1, r#"{"id":1,"connect":{"name":"herald-bench"}}"#.to_owned()).await.map(drop)
}

pub(super) async fn herald_subscribe(ws: &mut Ws, id: u32, channel: &str) -> anyhow::Result<()> {
    let frame = serde_json::json!({"id": id, "subscribe": {"channel": channel}}).to_string();
    command(ws, id, frame).await.with_context(|| format!("cannot subscribe to `{channel}`")).map(drop)
}

/// Waits for Pusher's `connection_established`, then subscribes to `channel` (if any) and waits
/// for `subscription_succeeded`, as pusher-js does.
pub(super) async fn pusher_subscribe(ws: &mut Ws, channel: Option<&str>) -> anyhow::Result<()> {
    pusher_expect(ws, "pusher:connection_established").await?;
    if let Some(channel) = channel {
        let frame = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string();
        ws.send(Message::text(frame)).await?;
        pusher_expect(ws, "pusher_internal:subscription_succeeded")
            .await
            .with_context(|| format!("cannot subscribe to `{channel}`"))?;
    }
    Ok(())
}

/// Reads until the Pusher event `event`; fails on an error event or the end of the connection.
async fn pusher_expect(ws: &mut Ws, event: &str) -> anyhow::Result<()> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if v["event"] == event {
                    return Ok(());
                }
                anyhow::ensure!(!v["event"].as_str().unwrap_or("").contains("error"), "refused: {t}");
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("closed before {event}"),
        }
    }
}
