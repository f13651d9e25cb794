//! Delivery: one task per endpoint sends a batch at a time over a kept-alive HTTP/1.1
//! connection (plain or rustls), retrying it with jittered exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{encode, Endpoint, Shared, WebhookFormat, WebhooksConfig};

/// One endpoint's delivery loop: a batch at a time, each retried until delivered or given up,
/// so events arrive in the order they were queued.
pub(super) async fn deliver(ep: Arc<Endpoint>, shared: Arc<Shared>, node: String) {
    let settings = &shared.settings;
    let mut conn: Option<SendRequest<Body>> = None;
    loop {
        // Wait for an event (or for shutdown with nothing left to send).
        loop {
            if !ep.queue().is_empty() {
                break;
            }
            if shared.closing.is_cancelled() {
                return;
            }
            tokio::select! {
                () = ep.wake.notified() => {}
                () = shared.closing.cancelled() => {}
            }
        }
        if ep.queue().len() < settings.batch_size && !shared.closing.is_cancelled() {
            tokio::select! {
                () = tokio::time::sleep(settings.batch_delay) => {}
                () = shared.closing.cancelled() => {}
            }
        }
        let batch = ep.queue().take(settings.batch_size);
        let Some(first) = batch.first() else { continue };
        let body = Bytes::from(encode(&ep, &node, &batch));
        let signature = (!ep.config.secret.is_empty()).then(|| sign(ep.config.secret.expose(), &body));
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let sent = tokio::select! {
                r = tokio::time::timeout(settings.request_timeout, post(&ep, &mut conn, &body, signature.as_deref())) => r,
                () = shared.abort.cancelled() => {
                    give_up(&ep, batch.len(), "shutdown bound reached");
                    return;
                }
            };
            let result = match &sent {
                Ok(Ok(status)) if status.is_success() => "ok",
                Ok(Ok(_)) => "status",
                Ok(Err(_)) => "network",
                Err(_) => "timeout",
            };
            metrics::counter!("herald_webhook_requests_total", "result" => result).increment(1);
            if result == "ok" {
                tracing::trace!(endpoint = ep.index + 1, events = batch.len(), "webhook batch delivered");
                break;
            }
            // A connection that failed or answered an error is not reused.
            conn = None;
            match &sent {
                Ok(Ok(status)) => tracing::debug!(endpoint = ep.index + 1, %status, attempt, "webhook refused"),
                Ok(Err(e)) => tracing::debug!(endpoint = ep.index + 1, error = %e, attempt, "webhook not sent"),
                Err(_) => tracing::debug!(endpoint = ep.index + 1, attempt, "webhook request timed out"),
            }
            let too_many = settings.max_attempts > 0 && attempt >= settings.max_attempts;
            if too_many || first.queued.elapsed() >= settings.max_age {
                give_up(&ep, batch.len(), if too_many { "max_attempts reached" } else { "max_age reached" });
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff(settings, attempt)) => {}
                () = shared.abort.cancelled() => {
                    give_up(&ep, batch.len(), "shutdown bound reached");
                    return;
                }
            }
        }
    }
}

fn give_up(ep: &Endpoint, events: usize, why: &str) {
    metrics::counter!("herald_webhook_failures_total").increment(events as u64);
    tracing::warn!(endpoint = ep.index + 1, events, why, "webhook events given up");
}

/// The wait after failed attempt `attempt` (1-based): `retry_initial` doubled per attempt,
/// capped at `retry_max`, then a random part of up to half of it taken off.
pub(super) fn backoff(settings: &WebhooksConfig, attempt: u32) -> Duration {
    let base = settings.retry_initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(settings.retry_max);
    let jitter = rand::random::<f64>() * 0.5;
    base.mul_f64(1.0 - jitter)
}

/// Hex HMAC-SHA256 of `body` under `secret`: Pusher's `X-Pusher-Signature`, and Herald's
/// `X-Herald-Signature` after `sha256=`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    crate::secret::hmac_sha256_hex(secret.as_bytes(), body)
}

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("TLS: no trusted root certificates (system store or ca_file)")]
    NoRoots,
    #[error("TLS: `{0}` is not a valid server name")]
    ServerName(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// POSTs `body` on the endpoint's kept-alive connection (made first when there is none).
async fn post(
    ep: &Endpoint,
    conn: &mut Option<SendRequest<Body>>,
    body: &Bytes,
    signature: Option<&str>,
) -> Result<http::StatusCode, PostError> {
    if let Some(sender) = conn.as_mut().filter(|s| !s.is_closed()) {
        match send(ep, sender, body, signature).await {
            Ok(status) => return Ok(status),
            // A kept-alive connection the receiver closed while idle (its keep-alive timeout):
            // once more on a new one. The receiver may have seen the first one (duplicates
            // are allowed, losses are not).
            Err(PostError::Http(e)) => {
                tracing::trace!(endpoint = ep.index + 1, error = %e, "kept-alive connection failed")
            }
            Err(e) => return Err(e),
        }
    }
    *conn = None;
    let sender = conn.insert(open(ep).await?);
    send(ep, sender, body, signature).await.inspect_err(|_| {
        *conn = None;
    })
}

/// One request on `sender`.
async fn send(
    ep: &Endpoint,
    sender: &mut SendRequest<Body>,
    body: &Bytes,
    signature: Option<&str>,
) -> Result<http::StatusCode, PostError> {
    sender.ready().await?;
    let mut req = http::Request::post(ep.target.path.as_str())
        .header(http::header::HOST, ep.target.authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, concat!("herald/", env!("CARGO_PKG_VERSION")));
    match ep.config.format {
        WebhookFormat::Pusher => {
            req = req.header("X-Pusher-Key", ep.config.key.as_str());
            if let Some(s) = signature {
                req = req.header("X-Pusher-Signature", s);
            }
        }
        WebhookFormat::Herald => {
            if let Some(s) = signature {
                req = req.header("X-Herald-Signature", format!("sha256={s}"));
            }
        }
    }
    let response = sender.send_request(req.body(Body::from(body.clone()))?).await?;
    let status = response.status();
    // Read (a bounded part of) the answer so the connection can carry the next request; a
    // connection whose answer could not be read closes, and the next request opens another.
    let _ = axum::body::to_bytes(Body::new(response.into_body()), 64 << 10).await;
    Ok(status)
}

async fn open(ep: &Endpoint) -> Result<SendRequest<Body>, PostError> {
    let target = &ep.target;
    let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if target.tls {
        let Some(config) = ep.tls.get_or_init(|| client_tls(&ep.config.ca_file)).clone() else {
            return Err(PostError::NoRoots);
        };
        let name = rustls_pki_types::ServerName::try_from(target.host.clone())
            .map_err(|_| PostError::ServerName(target.host.clone()))?;
        Box::new(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?)
    } else {
        Box::new(tcp)
    };
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the peer closes.
        let _ = connection.await;
    });
    Ok(sender)
}

/// The certificate authorities in PEM file `path`; the error names the file, never its content.
pub(super) fn trusted_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("ca_file {} is not valid PEM: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("ca_file {} holds no PEM certificate", path.display()));
    }
    Ok(roots)
}

/// TLS for an `https://` endpoint: the roots of `ca_file`, or else the system's; rustls with
/// ring.
fn client_tls(ca_file: &std::path::Path) -> Option<Arc<rustls::ClientConfig>> {
    let roots = if ca_file.as_os_str().is_empty() {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "a system certificate could not be read");
        }
        roots.add_parsable_certificates(found.certs);
        roots
    } else {
        trusted_roots(ca_file).unwrap_or_else(|message| {
            tracing::error!(%message, "webhook ca_file not loaded");
            rustls::RootCertStore::empty()
        })
    };
    if roots.is_empty() {
        tracing::error!("no trusted root certificates found: https:// webhooks cannot be sent");
        return None;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some(Arc::new(config))
}
