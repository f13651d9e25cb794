//! TLS for the commands that talk to a server (`publish`, `subscribe`, `bench`): which roots
//! they trust (`--ca-file`), the URL schemes they take, and errors a user can act on instead
//! of a rustls debug string.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use herald_client::rustls::pki_types::pem::PemObject as _;
use herald_client::rustls::pki_types::CertificateDer;
use herald_client::rustls::{self, CertificateError, ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite;

/// `--ca-file`, shared by every command that connects to a server.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct TlsArgs {
    /// Also trust the certificates in this PEM file for https:// and wss:// (a private CA's
    /// certificate, or a self-signed server certificate). Repeatable. The system's trusted
    /// roots are always trusted too.
    #[arg(long, value_name = "PATH")]
    ca_file: Vec<PathBuf>,
}

/// Whether the command was given `--ca-file`, for the wording of [`explain`].
static CA_FILES_GIVEN: AtomicBool = AtomicBool::new(false);

/// What a command trusts: the certificates of `--ca-file`, read and checked at start, and the
/// system's roots, read when a TLS connection is made.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trust {
    extra: Vec<CertificateDer<'static>>,
}

impl Trust {
    /// Reads every `--ca-file`; a missing, unreadable or certificate-less file is an error
    /// naming it.
    pub(crate) fn load(args: &TlsArgs) -> anyhow::Result<Self> {
        let mut extra = Vec::new();
        for path in &args.ca_file {
            extra.extend(read_ca_file(path)?);
        }
        CA_FILES_GIVEN.store(!extra.is_empty(), Ordering::Relaxed);
        Ok(Self { extra })
    }

    /// The roots: the system's (`rustls-native-certs`) and those of `--ca-file`.
    fn roots(&self) -> RootCertStore {
        let mut roots = herald_client::tls::native_roots();
        // Each was checked by `read_ca_file`.
        roots.add_parsable_certificates(self.extra.iter().cloned());
        roots
    }

    /// A rustls client configuration (ring provider) trusting [`Trust::roots`].
    pub(crate) fn client_config(&self) -> anyhow::Result<Arc<ClientConfig>> {
        herald_client::tls::client_config(self.roots()).context("cannot set up TLS")
    }

    /// The same trust for `ureq` (`publish`): the system's roots and those of `--ca-file`.
    pub(crate) fn ureq_config(&self) -> ureq::tls::TlsConfig {
        let native = rustls_native_certs::load_native_certs().certs;
        let roots: Vec<ureq::tls::Certificate<'static>> = native
            .iter()
            .chain(&self.extra)
            .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
            .collect();
        ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
            .build()
    }
}

/// The certificates of one PEM file, each checked to be usable as a root.
fn read_ca_file(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read --ca-file {}", path.display()))?;
    let mut certs = Vec::new();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| {
            anyhow::anyhow!("--ca-file {}: certificate {} is not valid PEM: {e}", path.display(), i + 1)
        })?;
        RootCertStore::empty().add(cert.clone()).map_err(|e| {
            anyhow::anyhow!("--ca-file {}: certificate {} cannot be trusted as a root: {e}", path.display(), i + 1)
        })?;
        certs.push(cert);
    }
    anyhow::ensure!(
        !certs.is_empty(),
        "--ca-file {} holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)",
        path.display()
    );
    Ok(certs)
}

/// `url` with its scheme changed to the WebSocket one (`ws` / `wss`) or the HTTP one; `None`
/// for a scheme that is none of `http`, `https`, `ws`, `wss`.
pub(crate) fn with_scheme(url: &str, websocket: bool) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => false,
        "https" | "wss" => true,
        _ => return None,
    };
    let scheme = match (websocket, tls) {
        (true, false) => "ws",
        (true, true) => "wss",
        (false, false) => "http",
        (false, true) => "https",
    };
    Some(format!("{scheme}://{rest}"))
}

/// Whether `url` is a TLS one (`https://`, `wss://`).
pub(crate) fn is_tls(url: &str) -> bool {
    url.split_once("://").is_some_and(|(s, _)| s.eq_ignore_ascii_case("https") || s.eq_ignore_ascii_case("wss"))
}

/// An error a user can act on when `error`'s causes hold a TLS failure or an HTTP answer to a
/// WebSocket upgrade; `error` itself otherwise. Keeps the outermost context (`cannot connect
/// to URL`).
pub(crate) fn explain(error: anyhow::Error) -> anyhow::Error {
    match error.chain().find_map(cause) {
        Some(why) => anyhow::anyhow!("{error}: {why}"),
        None => error,
    }
}

/// What one cause in an error chain means, when it is one this module knows.
fn cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(e) = e.downcast_ref::<rustls::Error>() {
        return Some(tls_error(e));
    }
    if let Some(e) = e.downcast_ref::<std::io::Error>() {
        return io_error(e);
    }
    if let Some(e) = e.downcast_ref::<tungstenite::Error>() {
        return websocket_error(e);
    }
    if let Some(e) = e.downcast_ref::<Arc<tungstenite::Error>>() {
        return websocket_error(e);
    }
    if let Some(herald_client::Error::Transport { source, .. }) = e.downcast_ref::<herald_client::Error>() {
        return websocket_error(source);
    }
    if let Some(e) = e.downcast_ref::<ureq::Error>() {
        return match e {
            ureq::Error::Rustls(e) => Some(tls_error(e)),
            ureq::Error::Io(e) => io_error(e),
            ureq::Error::Protocol(e) => Some(not_http(e)),
            _ => None,
        };
    }
    None
}

fn io_error(e: &std::io::Error) -> Option<String> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).map(tls_error)
}

fn websocket_error(e: &tungstenite::Error) -> Option<String> {
    match e {
        tungstenite::Error::Io(e) => io_error(e),
        tungstenite::Error::Tls(tungstenite::error::TlsError::Rustls(e)) => Some(tls_error(e)),
        tungstenite::Error::Protocol(tungstenite::error::ProtocolError::HttparseError(e)) => Some(not_http(e)),
        tungstenite::Error::Http(response) => {
            let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let body: String = body.trim().chars().take(300).collect();
            let status = response.status();
            Some(if body.is_empty() {
                format!("the server answered HTTP {status} instead of upgrading to a WebSocket")
            } else {
                format!("the server answered HTTP {status} instead of upgrading to a WebSocket: {body}")
            })
        }
        _ => None,
    }
}

/// An answer that does not parse as HTTP: most often a TLS server reached with a plain URL.
fn not_http(e: &dyn std::fmt::Display) -> String {
    format!("the server's answer is not HTTP ({e}); if it serves TLS, use an https:// or wss:// URL")
}

fn tls_error(e: &rustls::Error) -> String {
    use CertificateError as C;
    match e {
        // No trusted root issued it (a root of the same name that did not sign it shows up
        // as a bad or unsupported signature).
        rustls::Error::InvalidCertificate(
            C::UnknownIssuer
            | C::BadSignature
            | C::UnsupportedSignatureAlgorithmContext { .. }
            | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. },
        ) => {
            if CA_FILES_GIVEN.load(Ordering::Relaxed) {
                "the server's certificate is not trusted: neither the system's roots nor --ca-file issued it; \
                 pass --ca-file PATH with the PEM certificate of the CA that signed it (or the certificate \
                 itself, if self-signed)"
                    .to_owned()
            } else {
                "the server's certificate is not trusted; pass --ca-file PATH with the PEM certificate of the CA \
                 that signed it (or the certificate itself, if self-signed)"
                    .to_owned()
            }
        }
        rustls::Error::InvalidCertificate(C::Other(other)) if other.0.to_string().contains("CaUsedAsEndEntity") => {
            "the server's certificate is a CA certificate (basicConstraints CA:TRUE), which TLS clients refuse \
             as a server certificate; issue one with CA:FALSE (openssl: -addext basicConstraints=critical,CA:FALSE)"
                .to_owned()
        }
        rustls::Error::InvalidCertificate(_) => format!("the server's certificate was rejected: {e}"),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("the server did not answer TLS ({e}); if it serves plain HTTP, use an http:// or ws:// URL")
        }
        _ => format!("TLS failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_convert_and_keep_tls() {
        assert_eq!(with_scheme("http://h:1/connect", true).as_deref(), Some("ws://h:1/connect"));
        assert_eq!(with_scheme("HTTPS://h", true).as_deref(), Some("wss://h"));
        assert_eq!(with_scheme("wss://h/x", false).as_deref(), Some("https://h/x"));
        assert_eq!(with_scheme("ws://h", true).as_deref(), Some("ws://h"));
        assert_eq!(with_scheme("ftp://h", true), None);
        assert_eq!(with_scheme("127.0.0.1:8080", false), None);
        assert!(is_tls("wss://h") && is_tls("https://h") && !is_tls("ws://h") && !is_tls("h"));
    }

    #[test]
    fn an_unknown_issuer_says_what_to_do() {
        let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let err = explain(anyhow::Error::new(tungstenite::Error::Io(io)).context("cannot connect to wss://h"));
        let text = format!("{err:#}");
        assert!(text.starts_with("cannot connect to wss://h: the server's certificate is not trusted"), "{text}");
        assert!(text.contains("pass --ca-file") && !text.contains("UnknownIssuer"), "{text}");
    }
}
