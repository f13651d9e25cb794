//! TLS on the listening port: a certificate chain and private key from PEM files, served with
//! rustls (the `ring` provider), so `wss://` and `https://` share the port. The certified key
//! sits behind a lock as an `Arc`; [`Tls::reload`] swaps it (on SIGHUP), and a reload that
//! fails keeps the old one. Errors name the file, never its contents.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;

/// TLS (`[tls]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server's certificate chain (the server's certificate first, then the
    /// intermediates). With `key`, Herald serves TLS only on its port: `wss://` and
    /// `https://`. Empty: plain TCP (put a TLS-terminating proxy in front before exposing
    /// Herald). Both files are read again on SIGHUP.
    #[schemars(with = "String")]
    pub cert: PathBuf,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1). Readable by the
    /// user Herald runs as only.
    #[schemars(with = "String")]
    pub key: PathBuf,
}

impl TlsConfig {
    /// Whether TLS is configured (both files named).
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty() || !self.key.as_os_str().is_empty()
    }
}

/// Why certificates could not be loaded. Messages name the file and never quote its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert and tls.key must be set together (only {0} is set)")]
    Half(&'static str),
    #[error("cannot read TLS {what} file {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("TLS certificate file {0} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCert(PathBuf),
    #[error("TLS certificate file {path} is not valid PEM: {reason}")]
    BadCert { path: PathBuf, reason: String },
    #[error("TLS key file {0} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey(PathBuf),
    #[error("TLS key file {path} cannot be used: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// The certified key every handshake uses; swapped by a reload.
#[derive(Debug)]
struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// A loaded TLS configuration: the acceptor for new connections and the reloadable key.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    store: Arc<CertStore>,
    config: TlsConfig,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("cert", &self.config.cert).field("key", &self.config.key).finish()
    }
}

impl Tls {
    /// Loads the files named in `config`; `Ok(None)` when TLS is not configured.
    pub fn load(config: &TlsConfig) -> Result<Option<Self>, TlsError> {
        if !config.enabled() {
            return Ok(None);
        }
        if config.cert.as_os_str().is_empty() {
            return Err(TlsError::Half("tls.key"));
        }
        if config.key.as_os_str().is_empty() {
            return Err(TlsError::Half("tls.cert"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = certified_key(config, &provider)?;
        let store = Arc::new(CertStore { current: RwLock::new(Arc::new(key)) });
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::BadKey { path: config.key.clone(), reason: e.to_string() })?
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(server));
        Ok(Some(Self { acceptor, store, config: config.clone(), provider }))
    }

    /// Accepts TLS connections with the current certificate.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads both files again and, when they are good, serves the new certificate to the
    /// handshakes that follow. On error the old certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = certified_key(&self.config, &self.provider)?;
        *self.store.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(())
    }
}

fn certified_key(config: &TlsConfig, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(&config.cert)?;
    let key = read_key(&config.key)?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey { path: config.key.clone(), reason: e.to_string() })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err(TlsError::Mismatch { cert: config.cert.clone(), key: config.key.clone() })
        }
        Err(e) => Err(TlsError::BadCert { path: config.cert.clone(), reason: e.to_string() }),
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read("certificate", path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCert { path: path.to_owned(), reason: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert(path.to_owned()));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = zeroize_on_drop(read("key", path)?);
    // The parser's messages can quote a line of the file: report only that it failed.
    PrivateKeyDer::from_pem_slice(&pem.0).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey(path.to_owned()),
        _ => TlsError::BadKey { path: path.to_owned(), reason: "not a valid PEM private key".into() },
    })
}

/// The key file's bytes, overwritten when dropped.
struct Wiped(Vec<u8>);

fn zeroize_on_drop(v: Vec<u8>) -> Wiped {
    Wiped(v)
}

impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn generated(dir: &Path, prefix: &str) -> TlsConfig {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
        TlsConfig {
            cert: write(dir, &format!("{prefix}cert.pem"), &c.cert.pem()),
            key: write(dir, &format!("{prefix}key.pem"), &c.key_pair.serialize_pem()),
        }
    }

    fn err(config: &TlsConfig) -> String {
        Tls::load(config).expect_err("must fail").to_string()
    }

    #[test]
    fn good_files_load_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = generated(dir.path(), "a");
        assert!(Tls::load(&good).expect("loads").is_some());
        assert!(Tls::load(&TlsConfig::default()).expect("off").is_none());

        let missing = TlsConfig { cert: dir.path().join("nope.pem"), ..good.clone() };
        let e = err(&missing);
        assert!(e.contains("certificate") && e.contains("nope.pem"), "{e}");

        let junk = write(dir.path(), "junk.pem", "hello\n");
        let e = err(&TlsConfig { cert: junk.clone(), ..good.clone() });
        assert!(e.contains("no PEM certificate") && e.contains("junk.pem"), "{e}");
        let e = err(&TlsConfig { key: junk, ..good.clone() });
        assert!(e.contains("no PEM private key") && e.contains("junk.pem"), "{e}");

        let other = generated(dir.path(), "b");
        let e = err(&TlsConfig { cert: good.cert.clone(), key: other.key.clone() });
        assert!(e.contains("does not belong"), "{e}");

        let e = err(&TlsConfig { key: PathBuf::new(), ..good.clone() });
        assert!(e.contains("must be set together"), "{e}");
    }

    #[test]
    fn a_failed_reload_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = generated(dir.path(), "");
        let tls = Tls::load(&config).expect("loads").expect("on");
        let before = tls.store.current.read().expect("lock").cert[0].clone();
        std::fs::write(&config.cert, "garbage").expect("write");
        assert!(tls.reload().is_err());
        assert_eq!(tls.store.current.read().expect("lock").cert[0], before, "old certificate kept");
        let fresh = generated(dir.path(), "");
        assert_eq!(fresh, config, "same paths, new contents");
        tls.reload().expect("reload");
        assert_ne!(tls.store.current.read().expect("lock").cert[0], before, "new certificate served");
    }
}
