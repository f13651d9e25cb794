//! What the HTTP APIs share (Herald's, Centrifugo's, Pusher's): who may call a keyless API,
//! the API-key check, and the bounded request body.

use std::net::SocketAddr;

use axum::body::Body;
use bytes::Bytes;
use herald_protocol::ErrorCode;
use http::HeaderMap;

use crate::http_error::ApiError;
use crate::node::Node;
use crate::origin::RequestOrigin;

/// Headers a reverse proxy adds: a request carrying one came through a proxy, so its
/// loopback address says nothing about who sent it.
const FORWARDING_HEADERS: &[&str] = &["forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip", "via"];

/// Whether a request may call the API; a refusal is logged (rate-limited) with the
/// client's address, never with what it sent.
pub fn authorize(node: &Node, peer: SocketAddr, origin: RequestOrigin, headers: &HeaderMap) -> Result<(), ApiError> {
    let result = check_authorization(node, peer, origin, headers);
    if let Err(e) = &result {
        crate::ratelog::refusal!(info, crate::ratelog::Kind::ApiKey, peer = %peer, "API request refused: {}", e.message());
    }
    result
}

fn check_authorization(
    node: &Node,
    peer: SocketAddr,
    origin: RequestOrigin,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let api = &node.config().api;
    if !api.has_key() {
        if origin == RequestOrigin::Cross {
            // A page on another origin could otherwise post to a loopback Herald (CSRF).
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "no API key is configured: the API does not answer browser requests from other origins",
            ));
        }
        if let Some(h) = FORWARDING_HEADERS.iter().find(|h| headers.contains_key(**h)) {
            // Behind a proxy on the same machine every client would look like loopback.
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                format!(
                    "no API key is configured: the API does not answer requests that came through a proxy \
                     (`{h}` header); set api.key"
                ),
            ));
        }
        return if peer.ip().is_loopback() || peer.ip().to_canonical().is_loopback() {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Unauthorized,
                "no API key is configured: the API answers only loopback clients",
            ))
        };
    }
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(ApiError::new(ErrorCode::Unauthorized, "missing header `Authorization: Bearer <key>`"));
    };
    // Never quote the header back: a key sent without its scheme would be echoed.
    let given = value.to_str().ok().and_then(|v| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("apikey")).then(|| rest.trim())
    });
    let Some(given) = given else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "the Authorization header must be `Bearer <key>` (or `apikey <key>`)",
        ));
    };
    if key_matches(api, given) {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::Unauthorized, "invalid API key"))
    }
}

/// Compares `given` with every configured key in constant time (per key length), without
/// stopping at the first match, so timing reveals neither a key nor which one matched.
fn key_matches(api: &crate::config::ApiConfig, given: &str) -> bool {
    use subtle::ConstantTimeEq;
    let mut ok = subtle::Choice::from(0);
    for key in std::iter::once(&api.key).chain(&api.keys).filter(|k| !k.is_empty()) {
        ok |= key.expose().as_bytes().ct_eq(given.as_bytes());
    }
    ok.into()
}

/// The request body, bounded in size (a declared `Content-Length` over the limit is refused
/// before anything is read) and in time (`api.body_timeout`).
pub async fn read_body(node: &Node, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = node.config().api.max_body_size;
    let too_large = || {
        metrics::counter!("herald_http_refused_total", "reason" => "body_too_large").increment(1);
        ApiError::new(ErrorCode::TooLarge, format!("request body is larger than {limit} bytes (api.max_body_size)"))
    };
    let declared = headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let timeout = node.config().api.body_timeout;
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(_)) => Err(too_large()),
        Err(_) => {
            metrics::counter!("herald_http_refused_total", "reason" => "body_timeout").increment(1);
            Err(ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "request body did not arrive within {} (api.body_timeout)",
                    humantime::format_duration(timeout)
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_configured_key_matches_and_empty_keys_never_do() {
        use crate::config::{ApiConfig, Secret};
        let api = ApiConfig {
            key: Secret::new("old"),
            keys: vec![Secret::new("new"), Secret::default()],
            ..Default::default()
        };
        assert!(key_matches(&api, "old"));
        assert!(key_matches(&api, "new"));
        assert!(!key_matches(&api, "ne"));
        assert!(!key_matches(&api, "newer"));
        assert!(!key_matches(&api, ""), "an empty entry is no key");
        let only_list = ApiConfig { keys: vec![Secret::new("k2")], ..Default::default() };
        assert!(only_list.has_key() && key_matches(&only_list, "k2") && !key_matches(&only_list, ""));
    }
}
