//! Opening one connection: the WebSocket handshake (subprotocol `herald.v1`) and the
//! `connect` exchange. Also the rule for which endings are worth a reconnect.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_protocol::{ClientFrame, Command, ConnectRequest, ConnectResult, ReplyResult, ServerFrame, SUBPROTOCOL};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::{ClientOptions, Error};

pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The id of `connect`, the first request on every connection.
const CONNECT_ID: u32 = 1;

/// Opens the WebSocket and completes `connect`, all within the request timeout.
pub(crate) async fn open(url: &str, options: &ClientOptions) -> Result<(Socket, ConnectResult), Error> {
    let attempt = async {
        let mut request = url.into_client_request().map_err(|e| invalid_url(url, e))?;
        let connector = match request.uri().scheme_str() {
            Some("wss") => {
                let config = match &options.tls {
                    Some(config) => config.clone(),
                    None => crate::tls::default_config()
                        .map_err(|e| Error::InvalidUrl { url: url.to_owned(), reason: format!("TLS setup: {e}") })?,
                };
                Connector::Rustls(config)
            }
            _ => Connector::Plain,
        };
        request.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(SUBPROTOCOL));
        let opened =
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector.clone())).await;
        let mut socket = match opened {
            Ok((socket, _)) => socket,
            Err(tungstenite::Error::Url(e)) => return Err(invalid_url(url, tungstenite::Error::Url(e))),
            // The server upgraded without `herald.v1`: it is not Herald's native endpoint
            // (Herald closes such a connection with 4504); say so, with the server's own close
            // reason when it gives one, instead of "no subprotocol".
            Err(tungstenite::Error::Protocol(tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(_))) => {
                return Err(not_the_endpoint(url, connector).await)
            }
            Err(e) => return Err(Error::transport(url, e)),
        };
        let connect = ConnectRequest {
            token: options.token.clone(),
            name: options.name.clone(),
            version: options.version.clone(),
        };
        let frame = ClientFrame::Request { id: CONNECT_ID, command: Command::Connect(connect) };
        socket.send(Message::text(frame.encode())).await.map_err(|e| Error::transport(url, e))?;
        let result = await_connect_reply(&mut socket, url).await?;
        Ok((socket, result))
    };
    match tokio::time::timeout(options.request_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout { command: "connect", after: options.request_timeout }),
    }
}

async fn await_connect_reply(socket: &mut Socket, url: &str) -> Result<ConnectResult, Error> {
    loop {
        let message = match socket.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(Error::transport(url, e)),
            None => return Err(Error::transport(url, tungstenite::Error::ConnectionClosed)),
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| (f.code.into(), f.reason.to_string()));
                return Err(Error::Closed { code, reason });
            }
            Message::Binary(_) => return Err(Error::protocol("binary frame from the server")),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        let frame = ServerFrame::parse(text.as_bytes())
            .map_err(|e| Error::protocol(format!("unreadable reply to `connect`: {e}")))?;
        match frame {
            ServerFrame::Reply { id: CONNECT_ID, result: ReplyResult::Connect(result) } => return Ok(result),
            ServerFrame::Reply { id: CONNECT_ID, result: ReplyResult::Error(e) } | ServerFrame::Error(e) => {
                return Err(Error::Server { command: "connect", channel: None, code: e.code, message: e.message })
            }
            ServerFrame::Ping => socket.send(Message::text("{}")).await.map_err(|e| Error::transport(url, e))?,
            other => return Err(Error::protocol(format!("expected the reply to `connect`, got {}", other.encode()))),
        }
    }
}

/// How long [`not_the_endpoint`] waits for the server's close frame.
const CLOSE_REASON_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The error for a server that upgraded `url` without Herald's subprotocol. The handshake
/// check fails before any frame is read, so a second WebSocket, without the subprotocol, reads
/// what the server says first: Herald closes a path that is not an endpoint with 4504 and a
/// reason naming the endpoints.
async fn not_the_endpoint(url: &str, connector: Connector) -> Error {
    let probe = async {
        let (mut socket, _) =
            tokio_tungstenite::connect_async_tls_with_config(url, None, true, Some(connector)).await.ok()?;
        while let Some(Ok(message)) = socket.next().await {
            match message {
                Message::Close(frame) => return frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                Message::Text(_) | Message::Binary(_) => return None,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        None
    };
    let said = match tokio::time::timeout(CLOSE_REASON_WAIT, probe).await {
        Ok(Some((code, reason))) if !reason.is_empty() => format!("; the server closed it with {code}: {reason}"),
        Ok(Some((code, _))) => format!("; the server closed it with {code}"),
        _ => String::new(),
    };
    let example = url.split_once("://").map_or("ws", |(scheme, _)| scheme);
    let example = if example == "wss" { "wss://herald.example.com/connect" } else { "ws://127.0.0.1:8080/connect" };
    Error::protocol(format!(
        "{url} is not Herald's native protocol endpoint (the server did not accept the `{SUBPROTOCOL}` \
         subprotocol){said}. Is the path `/connect`, e.g. {example}?"
    ))
}

fn invalid_url(url: &str, e: tungstenite::Error) -> Error {
    Error::InvalidUrl { url: url.to_owned(), reason: e.to_string() }
}

/// Whether the client reconnects after the server closed with `code`: not after 1000
/// (normal closure) nor 4500–4999 (Herald's "do not reconnect" range); after everything
/// else, notably 4000–4499 (Herald's "reconnect and recover"), 1001 (going away), 1006
/// (dropped), 1011–1013 (server trouble, restart, try again later). Codes that point at a bug
/// in this client (1002, 1003, 1007) reconnect too: with backoff that costs little, and the
/// alternative is a client that silently stays offline.
pub(crate) fn reconnects_after(code: u16) -> bool {
    !(code == 1000 || (4500..=4999).contains(&code))
}

/// The longest reconnect hint honoured: a server's number never makes the client wait longer.
pub(crate) const MAX_RECONNECT_HINT: Duration = Duration::from_secs(60);

/// The reconnect hint of a shutdown close: `reconnect_in=<ms>` in the reason of a 1001 (see
/// docs/protocol.md), capped at [`MAX_RECONNECT_HINT`]. None for other codes or reasons.
pub(crate) fn reconnect_hint(code: u16, reason: &str) -> Option<Duration> {
    if code != 1001 {
        return None;
    }
    let (_, rest) = reason.split_once("reconnect_in=")?;
    let digits: &str = &rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())];
    if digits.is_empty() {
        return None;
    }
    // Too many digits for a u64 is a long wait too: cap it rather than ignore it.
    let ms = digits.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_millis(ms).min(MAX_RECONNECT_HINT))
}

/// Whether a failed reconnect attempt is worth another try: not when the URL is wrong, the
/// server closed with a final code, or refused `connect` for good (e.g. an invalid token).
pub(crate) fn worth_retrying(error: &Error) -> bool {
    match error {
        Error::InvalidUrl { .. } => false,
        Error::Closed { code, .. } => reconnects_after(*code),
        Error::Server { .. } => error.is_retryable(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shutdown_hint_is_read_and_capped() {
        let ms = Duration::from_millis;
        assert_eq!(reconnect_hint(1001, "server shutting down; reconnect_in=1234"), Some(ms(1234)));
        assert_eq!(reconnect_hint(1001, "reconnect_in=0"), Some(ms(0)));
        assert_eq!(reconnect_hint(1001, "reconnect_in=99999999"), Some(MAX_RECONNECT_HINT));
        assert_eq!(reconnect_hint(1001, "reconnect_in=99999999999999999999999999"), Some(MAX_RECONNECT_HINT));
        assert_eq!(reconnect_hint(1001, "reconnect_in=12ms and more"), Some(ms(12)));
        assert_eq!(reconnect_hint(1001, "reconnect_in=-5"), None);
        assert_eq!(reconnect_hint(1001, "reconnect_in="), None);
        assert_eq!(reconnect_hint(1001, "server shutting down"), None);
        assert_eq!(reconnect_hint(4001, "reconnect_in=1000"), None, "only on 1001");
    }

    #[test]
    fn close_codes_decide_reconnects() {
        for code in [1001, 1006, 1011, 1012, 1013, 4000, 4001, 4002, 4003, 4004, 4499] {
            assert!(reconnects_after(code), "{code}");
        }
        for code in [1000, 4500, 4503, 4999] {
            assert!(!reconnects_after(code), "{code}");
        }
        for c in herald_protocol::CloseCode::ALL {
            assert_eq!(reconnects_after(c.as_u16()), c.reconnect(), "{c:?} agrees with the protocol table");
        }
    }

    #[test]
    fn refused_connects_are_final_unless_the_code_is_retryable() {
        let refused = |code| Error::Server { command: "connect", channel: None, code, message: String::new() };
        assert!(!worth_retrying(&refused(101)), "unauthorized: the same token fails again");
        assert!(worth_retrying(&refused(113)), "unavailable");
        assert!(worth_retrying(&Error::Timeout { command: "connect", after: Duration::from_secs(1) }));
        assert!(!worth_retrying(&Error::Closed { code: 4503, reason: String::new() }));
        assert!(worth_retrying(&Error::Closed { code: 4004, reason: String::new() }));
    }

    #[tokio::test]
    async fn a_bad_url_is_reported_as_such() {
        let err = open("http://[::1", &ClientOptions::default()).await.expect_err("bad url");
        assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
        let err = open("ftp://example.invalid/", &ClientOptions::default()).await.expect_err("bad scheme");
        assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
    }
}
