//! Which web origins may use Herald from a browser: one policy (`http.allowed_origins`) for
//! WebSocket handshakes, SSE and CORS, and the API's CSRF rule (a browser request from
//! another origin is refused unless that origin is allowed, and never gets the loopback trust).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use herald_protocol::ErrorCode;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

use crate::http_error::ApiError;

/// One entry of `http.allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Any,
    Exact(String),
    /// `scheme://*.domain[:port]`: `prefix` is `scheme://`, `suffix` is `.domain[:port]`.
    Wildcard {
        prefix: String,
        suffix: String,
    },
}

/// The compiled `http.allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    rules: Vec<Rule>,
}

impl Default for OriginPolicy {
    fn default() -> Self {
        Self { rules: vec![Rule::Any] }
    }
}

/// Checks one configured entry; the message says what is wrong with it.
pub fn check_entry(entry: &str) -> Result<(), String> {
    compile(entry).map(|_| ())
}

fn compile(entry: &str) -> Result<Rule, String> {
    if entry == "*" {
        return Ok(Rule::Any);
    }
    let e = entry.trim_end_matches('/').to_ascii_lowercase();
    let Some((scheme, host)) = e.split_once("://") else {
        return Err(format!("`{entry}` is not an origin: write scheme://host[:port], e.g. https://app.example.com"));
    };
    if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
        return Err(format!("`{entry}`: bad scheme"));
    }
    if host.is_empty() || host.contains(['/', '?', '#', '@']) {
        return Err(format!("`{entry}`: an origin has no path, query or user (scheme://host[:port])"));
    }
    match host.strip_prefix("*.") {
        Some(rest) if !rest.is_empty() && !rest.contains('*') => {
            Ok(Rule::Wildcard { prefix: format!("{scheme}://"), suffix: format!(".{rest}") })
        }
        Some(_) => Err(format!("`{entry}`: a wildcard needs a domain after `*.`")),
        None if host.contains('*') => {
            Err(format!("`{entry}`: `*` is allowed only as the first label (`*.example.com`)"))
        }
        None => Ok(Rule::Exact(e)),
    }
}

impl OriginPolicy {
    /// Compiles the configured list (checked at load, see [`check_entry`]; bad entries are
    /// skipped here).
    pub fn new(entries: &[String]) -> Self {
        Self { rules: entries.iter().filter_map(|e| compile(e).ok()).collect() }
    }

    /// Whether every origin is allowed (`*`).
    pub fn is_open(&self) -> bool {
        self.rules.contains(&Rule::Any)
    }

    /// Whether a browser page from `origin` may connect.
    pub fn allows(&self, origin: &str) -> bool {
        let o = origin.to_ascii_lowercase();
        self.rules.iter().any(|r| match r {
            Rule::Any => true,
            Rule::Exact(e) => *e == o,
            Rule::Wildcard { prefix, suffix } => o
                .strip_prefix(prefix.as_str())
                .and_then(|host| host.strip_suffix(suffix.as_str()))
                .is_some_and(|label| !label.is_empty() && !label.contains(['/', ':'])),
        })
    }

    /// For a WebSocket handshake or an SSE request: no `Origin` (a non-browser client) or an
    /// allowed one passes; anything else gets the 403 to send.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match headers.get(header::ORIGIN) {
            None => Ok(()),
            Some(v) => match v.to_str() {
                Ok(o) if self.allows(o) => Ok(()),
                _ => Err(refused(v)),
            },
        }
    }
}

/// Logs (rate-limited) a request refused for its origin: `refused`'s answer names it.
pub(crate) fn log_refused(peer: Option<std::net::SocketAddr>, answer: &ApiError) {
    let peer = peer.map(|p| p.to_string());
    crate::ratelog::refusal!(
        info,
        crate::ratelog::Kind::Origin,
        peer = peer.as_deref().unwrap_or(""),
        "request refused: {}",
        answer.message()
    );
}

fn refused(origin: &HeaderValue) -> ApiError {
    metrics::counter!("herald_http_refused_total", "reason" => "origin").increment(1);
    let shown = String::from_utf8_lossy(origin.as_bytes()).chars().take(200).collect::<String>();
    ApiError::new(ErrorCode::OriginNotAllowed, format!("origin `{shown}` is not allowed (http.allowed_origins)"))
}

/// Where a request comes from, as far as the browser's `Origin` header tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOrigin {
    /// No `Origin`: not a browser, or a same-origin GET.
    None,
    /// The page was served by this Herald (same scheme, host and port).
    Same,
    /// Another origin, one that `http.allowed_origins` allows.
    Cross,
}

/// The server's policy, put in every request's extensions so that each WebSocket upgrade
/// (whatever its route) is checked in [`crate::ws::upgrade`].
#[derive(Debug, Clone)]
pub struct Origins(pub Arc<OriginPolicy>);

/// Whether the connection is TLS, put in request extensions by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secure(pub bool);

/// Whether `origin` is this server: `scheme://<Host header>`, default ports ignored.
fn same_origin(origin: &str, headers: &HeaderMap, secure: bool) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else { return false };
    let scheme = if secure { "https" } else { "http" };
    let default_port = if secure { ":443" } else { ":80" };
    let strip = |s: &str| s.strip_suffix(default_port).unwrap_or(s).to_ascii_lowercase();
    let Some(rest) = origin.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")) else { return false };
    strip(rest) == strip(host)
}

/// The API's front: answers CORS preflights, refuses browser requests from origins that are
/// neither this server nor allowed (403), marks the rest with a [`RequestOrigin`] for the
/// key check, and adds `Access-Control-Allow-Origin` to cross-origin answers.
pub async fn api_layer(State(node): State<Arc<crate::node::Node>>, mut req: Request, next: Next) -> Response {
    let policy = node.origins();
    let secure = req.extensions().get::<Secure>().is_some_and(|s| s.0);
    let origin = req.headers().get(header::ORIGIN).cloned();
    let kind = match &origin {
        None => RequestOrigin::None,
        Some(v) => match v.to_str() {
            Ok(o) if same_origin(o, req.headers(), secure) => RequestOrigin::Same,
            Ok(o) if policy.allows(o) => RequestOrigin::Cross,
            _ => {
                let answer = refused(v);
                log_refused(crate::doors::raw::peer_of(&req), &answer);
                return answer.into_response();
            }
        },
    };
    if req.method() == Method::OPTIONS {
        return preflight(origin.as_ref());
    }
    req.extensions_mut().insert(kind);
    let mut resp = next.run(req).await;
    if let (RequestOrigin::Cross, Some(o)) = (kind, origin) {
        cors_headers(resp.headers_mut(), o);
    }
    resp
}

fn preflight(origin: Option<&HeaderValue>) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
    if let Some(o) = origin {
        cors_headers(h, o.clone());
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST, OPTIONS"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("Authorization, Content-Type"));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    resp
}

/// `Access-Control-Allow-Origin` naming the origin (never `*`, so one answer is never reused
/// for another origin) and `Vary: Origin` for caches.
pub fn cors_headers(h: &mut HeaderMap, origin: HeaderValue) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> OriginPolicy {
        for e in entries {
            check_entry(e).expect("valid entry");
        }
        OriginPolicy::new(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn exact_wildcard_and_any() {
        let p = policy(&["https://app.example.com", "https://*.example.org", "http://localhost:3000/"]);
        assert!(p.allows("https://app.example.com"));
        assert!(p.allows("HTTPS://APP.EXAMPLE.COM"));
        assert!(!p.allows("http://app.example.com"), "scheme matters");
        assert!(!p.allows("https://app.example.com:8443"), "port matters");
        assert!(p.allows("https://a.example.org"));
        assert!(p.allows("https://a.b.example.org"));
        assert!(!p.allows("https://example.org"), "the wildcard needs a label");
        assert!(!p.allows("https://evilexample.org"));
        assert!(!p.allows("https://a.example.org:444"));
        assert!(!p.allows("https://a.example.org.evil.com"));
        assert!(p.allows("http://localhost:3000"));
        assert!(!p.allows("null"));
        assert!(!p.is_open());
        let any = policy(&["*"]);
        assert!(any.is_open() && any.allows("null") && any.allows("https://x.y"));
        assert!(!policy(&[]).allows("https://x.y"), "an empty list allows no browser origin");
    }

    #[test]
    fn bad_entries_are_explained() {
        for bad in ["example.com", "https://a.com/path", "https://*", "https://a.*.com", "://x"] {
            assert!(check_entry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn same_origin_compares_scheme_host_and_port() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("localhost:8080"));
        assert!(same_origin("http://localhost:8080", &h, false));
        assert!(!same_origin("https://localhost:8080", &h, false));
        assert!(same_origin("https://localhost:8080", &h, true));
        assert!(!same_origin("http://localhost:8081", &h, false));
        assert!(!same_origin("http://evil.com", &h, false));
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        assert!(same_origin("https://example.com", &h, true));
        h.insert(header::HOST, HeaderValue::from_static("example.com:443"));
        assert!(same_origin("https://example.com", &h, true));
    }
}
