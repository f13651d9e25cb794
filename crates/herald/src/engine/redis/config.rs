//! `[engine.redis]`: how to reach Redis. Owned here (the configuration module re-exports it),
//! so the engine needs nothing from `config`; parsed whether or not the `redis` feature is
//! built, so a configuration stays valid either way.

use std::path::PathBuf;
#[cfg(feature = "redis")]
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "redis")]
use redis::IntoConnectionInfo;
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// `[engine.redis]`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis to connect to: `redis://host:port/db`, or `rediss://host:port/db` for TLS (a user
    /// name may go before `@`). Put the password in `engine.redis.password`, never in the URL.
    pub url: String,
    /// The Redis password (`AUTH`), if Redis asks for one. Prefer setting it through
    /// `HERALD_ENGINE__REDIS__PASSWORD` rather than in a file.
    #[schemars(with = "String")]
    pub password: Secret,
    /// Prefix of every Redis key and pub/sub channel Herald uses (letters, digits, `_ - . :`).
    /// Herald clusters with different prefixes share one Redis without seeing each other's
    /// channels, history or presence; every node of one cluster must use the same prefix.
    pub prefix: String,
    /// Longest wait for any one Redis call. Past it, the API answers 503 (error 113) and a
    /// client's command gets an error; nothing waits forever for Redis.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// With `rediss://`: PEM file of the certificate authorities to trust for Redis's
    /// certificate instead of the system's (for a Redis with its own CA). Empty: the system's.
    #[schemars(with = "String")]
    pub tls_ca: PathBuf,
    /// With `rediss://`, when Redis asks for client certificates (`tls-auth-clients`): PEM
    /// file with this node's certificate chain. Set together with `tls_key`.
    #[schemars(with = "String")]
    pub tls_cert: PathBuf,
    /// With `rediss://`: PEM file with the private key of `tls_cert`.
    #[schemars(with = "String")]
    pub tls_key: PathBuf,
    /// Most bytes of publications this node has received from Redis and not yet handed to
    /// its subscribers. When the node falls this far behind, it drops what arrives and reads
    /// those channels back from history instead (their subscribers recover, with
    /// `recovered: false` if history no longer has it): memory stays bounded, nothing is
    /// skipped silently. Counted in `herald_redis_link_overflows_total`.
    pub max_link_bytes: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            password: Secret::default(),
            prefix: "herald".into(),
            timeout: Duration::from_secs(1),
            tls_ca: PathBuf::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            max_link_bytes: 64 << 20,
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url)
            .field("password", &self.password)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("max_link_bytes", &self.max_link_bytes)
            .finish()
    }
}

#[cfg(feature = "redis")]
impl RedisConfig {
    /// These settings for `url` and `prefix`, the rest default (for tests and tools).
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self { url: url.into(), prefix: prefix.into(), ..Self::default() }
    }

    /// A Redis client for these settings (connects nothing yet).
    pub fn client(&self) -> Result<redis::Client, crate::engine::EngineError> {
        let bad = |e: redis::RedisError| crate::engine::EngineError::Unavailable(format!("bad Redis URL: {e}"));
        let mut info = self.url.as_str().into_connection_info().map_err(bad)?;
        if !self.password.is_empty() {
            let settings = info.redis_settings().clone().set_password(self.password.expose());
            info = info.set_redis_settings(settings);
        }
        match self.tls_files().map_err(|(key, e)| crate::engine::EngineError::Unavailable(format!("{key}: {e}")))? {
            // `rediss://` alone: Redis's certificate is checked against the system's CAs.
            None => redis::Client::open(info).map_err(bad),
            Some(files) => redis::Client::build_with_tls(info, files)
                .map_err(|e| crate::engine::EngineError::Unavailable(format!("Redis TLS settings: {e}"))),
        }
    }

    /// Checks the TLS files as rustls will use them when the node connects (a certificate it
    /// refuses, such as X.509 v1, fails here, so `check-config` reports it): the failing
    /// setting's key and why. Messages never quote the files' contents.
    pub fn check_tls_files(&self) -> Result<(), (&'static str, String)> {
        self.tls_files().map(|_| ())
    }

    /// The TLS files, read and checked; `None` when none is set.
    fn tls_files(&self) -> Result<Option<redis::TlsCertificates>, (&'static str, String)> {
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        if !set(&self.tls_ca) && !set(&self.tls_cert) && !set(&self.tls_key) {
            return Ok(None);
        }
        let read = |key: &'static str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| (key, format!("cannot read {}: {e}", p.display())))
        };
        let root_cert = if set(&self.tls_ca) { Some(read("engine.redis.tls_ca", &self.tls_ca)?) } else { None };
        let client_tls = if set(&self.tls_cert) || set(&self.tls_key) {
            Some(redis::ClientTlsConfig {
                client_cert: read("engine.redis.tls_cert", &self.tls_cert)?,
                client_key: read("engine.redis.tls_key", &self.tls_key)?,
            })
        } else {
            None
        };
        check_tls(root_cert.as_deref(), client_tls.as_ref())?;
        Ok(Some(redis::TlsCertificates { client_tls, root_cert }))
    }
}

#[cfg(feature = "redis")]
/// Builds the rustls client configuration the connection will use, from PEM: CAs to trust
/// and this node's certificate and key.
fn check_tls(root: Option<&[u8]>, client: Option<&redis::ClientTlsConfig>) -> Result<(), (&'static str, String)> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = root {
        let key = "engine.redis.tls_ca";
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|_| (key, "not valid PEM".to_owned()))?;
        if certs.is_empty() {
            return Err((key, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| (key, format!("unusable CA certificate: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("engine.redis.url", e.to_string()))?
        .with_root_certificates(roots);
    if let Some(c) = client {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&c.client_cert)
            .collect::<Result<_, _>>()
            .map_err(|_| ("engine.redis.tls_cert", "not valid PEM".to_owned()))?;
        if chain.is_empty() {
            return Err(("engine.redis.tls_cert", "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&c.client_key)
            .map_err(|_| ("engine.redis.tls_key", "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned()))?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| ("engine.redis.tls_cert", format!("unusable with its key: {e}")))?;
    }
    Ok(())
}
