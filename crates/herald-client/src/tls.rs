//! TLS for `wss://` URLs: rustls with the ring provider.
//!
//! ```
//! use herald_client::{tls, ClientOptions};
//!
//! // The system's roots plus a private CA (e.g. read from a PEM file).
//! let mut roots = tls::native_roots();
//! # let ca_der: Vec<rustls::pki_types::CertificateDer<'static>> = Vec::new();
//! roots.add_parsable_certificates(ca_der);
//! let options = ClientOptions::default().tls_config(tls::client_config(roots).expect("ring"));
//! # let _ = options;
//! ```

use std::sync::{Arc, OnceLock};

use rustls::{ClientConfig, RootCertStore};

/// The system's trusted root certificates, as `rustls-native-certs` finds them (the
/// operating system's store; the files named by `SSL_CERT_FILE` / `SSL_CERT_DIR` when set).
/// Certificates that cannot be parsed are skipped; the store may be empty (e.g. a container
/// image without CA certificates), then only roots added to it are trusted.
pub fn native_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    roots
}

/// A client configuration that trusts `roots`: rustls with the ring provider, TLS 1.2 and
/// 1.3, no client certificate.
pub fn client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The configuration used when [`ClientOptions::tls_config`](crate::ClientOptions::tls_config)
/// is not set: [`native_roots`], read once per process.
pub(crate) fn default_config() -> Result<Arc<ClientConfig>, rustls::Error> {
    static DEFAULT: OnceLock<Result<Arc<ClientConfig>, rustls::Error>> = OnceLock::new();
    DEFAULT.get_or_init(|| client_config(native_roots())).clone()
}
