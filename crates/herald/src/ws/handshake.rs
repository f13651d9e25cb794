//! The opening handshake (RFC 6455 §4.2): validate the upgrade request, compute the accept
//! key, pick a subprotocol and negotiate permessage-deflate. Pure functions over `http` types;
//! the upgrade itself happens in `transport`.

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Version};
use sha1::{Digest, Sha1};

use super::deflate::{self, DeflatePolicy, Negotiated};

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A request that may be upgraded, and what to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub accept_key: String,
    pub protocol: Option<&'static str>,
    pub deflate: Option<Negotiated>,
}

/// Why a request cannot be upgraded; each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("WebSocket upgrades must use GET")]
    NotGet,
    #[error("WebSocket upgrades need HTTP/1.1")]
    OldHttp,
    #[error("this endpoint only speaks WebSocket: send Upgrade: websocket")]
    NotUpgrade,
    #[error("the Connection header must contain \"Upgrade\"")]
    NoConnectionUpgrade,
    #[error("unsupported WebSocket version; this server speaks version 13")]
    BadVersion,
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
    #[error("Sec-WebSocket-Key must be 16 bytes in base64")]
    BadKey,
}

impl HandshakeError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotGet => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotUpgrade | Self::BadVersion => StatusCode::UPGRADE_REQUIRED,
            Self::OldHttp | Self::NoConnectionUpgrade | Self::MissingKey | Self::BadKey => StatusCode::BAD_REQUEST,
        }
    }

    /// Headers the answer must carry (RFC 6455 §4.4: the versions we speak on a mismatch).
    pub fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        match self {
            Self::BadVersion => vec![(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"))],
            Self::NotUpgrade => vec![
                (header::UPGRADE, HeaderValue::from_static("websocket")),
                (header::CONNECTION, HeaderValue::from_static("Upgrade")),
            ],
            Self::NotGet => vec![(header::ALLOW, HeaderValue::from_static("GET"))],
            _ => Vec::new(),
        }
    }
}

/// Checks an upgrade request. `protocols` are the subprotocols this endpoint speaks, in our
/// order of preference; a client that offers none of them is still accepted, with none.
pub fn check(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    protocols: &[&'static str],
    policy: &DeflatePolicy,
) -> Result<Accepted, HandshakeError> {
    if method != Method::GET {
        return Err(HandshakeError::NotGet);
    }
    if version < Version::HTTP_11 {
        return Err(HandshakeError::OldHttp);
    }
    if !has_token(headers, &header::UPGRADE, "websocket") {
        return Err(HandshakeError::NotUpgrade);
    }
    if !has_token(headers, &header::CONNECTION, "upgrade") {
        return Err(HandshakeError::NoConnectionUpgrade);
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(HandshakeError::BadVersion);
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or(HandshakeError::MissingKey)?;
    let key = key.as_bytes().trim_ascii();
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    let protocol = tokens(headers, &header::SEC_WEBSOCKET_PROTOCOL)
        .find_map(|offered| protocols.iter().copied().find(|p| p.eq_ignore_ascii_case(offered)));
    let extensions = headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter().filter_map(|v| v.to_str().ok());
    Ok(Accepted { accept_key: accept_key(key), protocol, deflate: deflate::negotiate(extensions, policy) })
}

/// `base64(sha1(key ++ GUID))`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The headers of the 101 answer, beside the status.
pub fn response_headers(a: &Accepted) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&a.accept_key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = a.protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    if let Some(n) = &a.deflate {
        if let Ok(v) = HeaderValue::from_str(&n.response_header()) {
            h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
        }
    }
    h
}

fn tokens<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn has_token(headers: &HeaderMap, name: &header::HeaderName, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]
    }

    fn run(pairs: &[(&'static str, &'static str)]) -> Result<Accepted, HandshakeError> {
        check(&Method::GET, Version::HTTP_11, &request(pairs), &["herald.v1"], &DeflatePolicy::default())
    }

    #[test]
    fn rfc_sample_key() {
        let a = run(&good()).expect("valid");
        assert_eq!(a.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(a.protocol, None);
        assert_eq!(a.deflate, None);
    }

    #[test]
    fn subprotocol_and_deflate_are_negotiated() {
        let mut p = good();
        p.push(("sec-websocket-protocol", "chat, herald.v1"));
        p.push(("sec-websocket-extensions", "permessage-deflate; client_max_window_bits"));
        let a = run(&p).expect("valid");
        assert_eq!(a.protocol, Some("herald.v1"));
        let h = response_headers(&a);
        assert_eq!(h["sec-websocket-protocol"], "herald.v1");
        assert_eq!(
            h["sec-websocket-extensions"],
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }

    #[test]
    fn each_bad_request_gets_its_status() {
        let without = |name: &str| good().into_iter().filter(|(k, _)| *k != name).collect::<Vec<_>>();
        let with = |name: &'static str, v: &'static str| {
            let mut p = without(name);
            p.push((name, v));
            p
        };
        assert_eq!(run(&without("upgrade")), Err(HandshakeError::NotUpgrade));
        assert_eq!(run(&without("connection")), Err(HandshakeError::NoConnectionUpgrade));
        assert_eq!(run(&with("sec-websocket-version", "8")), Err(HandshakeError::BadVersion));
        assert_eq!(run(&without("sec-websocket-key")), Err(HandshakeError::MissingKey));
        assert_eq!(run(&with("sec-websocket-key", "c2hvcnQ=")), Err(HandshakeError::BadKey));
        assert_eq!(run(&with("sec-websocket-key", "not base64!!")), Err(HandshakeError::BadKey));
        assert_eq!(HandshakeError::BadVersion.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(HandshakeError::BadKey.status(), StatusCode::BAD_REQUEST);
        let post = check(&Method::POST, Version::HTTP_11, &request(&good()), &[], &DeflatePolicy::default());
        assert_eq!(post, Err(HandshakeError::NotGet));
        let old = check(&Method::GET, Version::HTTP_10, &request(&good()), &[], &DeflatePolicy::default());
        assert_eq!(old, Err(HandshakeError::OldHttp));
    }
}
