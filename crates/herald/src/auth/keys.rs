//! The keys tokens are checked with: a shared secret, one PEM public key, or a JWKS file
//! (reloaded when it changes). Every public key is parsed by the crypto crate that will verify
//! with it, at load time, so a bad key fails at start-up rather than refusing every token.

use std::path::{Path, PathBuf};
use std::sync::{RwLock, Weak};
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{AlgorithmFamily, DecodingKey, DecodingKeyKind};
use rsa::traits::PublicKeyParts;

use super::{bad_config, refused, AuthConfig, AuthError, TokenAlgorithm, TokenRefusal, MIN_SECRET_LEN};
use crate::secret::Secret;

/// Largest JWKS file read: real ones are a few KiB.
const MAX_JWKS_SIZE: u64 = 1 << 20;

/// The keys in use.
pub(super) enum Keys {
    /// The secret or the public key from the configuration.
    One(DecodingKey),
    /// A JWKS file's usable keys, by `kid` (`None` for a key without one).
    Set(Vec<(Option<String>, DecodingKey)>),
}

impl Keys {
    pub(super) fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Set(keys) => keys.len(),
        }
    }

    /// The key for a token whose header names `kid`.
    pub(super) fn select(&self, kid: Option<&str>) -> Result<&DecodingKey, AuthError> {
        match (self, kid) {
            (Self::One(key), _) => Ok(key),
            (Self::Set(keys), Some(kid)) => keys
                .iter()
                .find(|(k, _)| k.as_deref() == Some(kid))
                .map(|(_, key)| key)
                .ok_or_else(|| refused(TokenRefusal::UnknownKey, "unknown `kid`")),
            (Self::Set(keys), None) => match keys.as_slice() {
                [(_, only)] => Ok(only),
                _ => {
                    Err(refused(TokenRefusal::UnknownKey, "the token has no `kid` and the key set holds several keys"))
                }
            },
        }
    }
}

/// The keys `config` names, or `None` when it names none.
pub(super) fn from_config(config: &AuthConfig) -> Result<Option<Keys>, AuthError> {
    let alg = config.algorithm;
    let pem = config.public_key.trim();
    let jwks = config.jwks_file.trim();
    let sources = [!config.secret.is_empty(), !pem.is_empty(), !jwks.is_empty()];
    if sources.iter().filter(|set| **set).count() > 1 {
        let key = if jwks.is_empty() { "auth.public_key" } else { "auth.jwks_file" };
        return Err(bad_config(key, "set only one of `auth.secret`, `auth.public_key`, `auth.jwks_file`"));
    }
    if !jwks.is_empty() {
        let set = load_jwks(Path::new(jwks), alg).map_err(|m| bad_config("auth.jwks_file", m))?;
        return Ok(Some(set));
    }
    if alg.is_hmac() {
        // A key for the other family would be ignored silently; say so instead.
        if !pem.is_empty() {
            return Err(bad_config(
                "auth.public_key",
                format!("is set, but `auth.algorithm` is {alg}, which checks tokens with `auth.secret`"),
            ));
        }
        if config.secret.is_empty() {
            return Ok(None);
        }
        check_secret(&config.secret)?;
        return Ok(Some(Keys::One(DecodingKey::from_secret(config.secret.expose().as_bytes()))));
    }
    if !config.secret.is_empty() {
        return Err(bad_config(
            "auth.secret",
            format!("is set, but `auth.algorithm` is {alg}, which checks tokens with `auth.public_key`"),
        ));
    }
    if pem.is_empty() {
        return Ok(None);
    }
    let key = from_pem(pem, alg).map_err(|m| bad_config("auth.public_key", m))?;
    Ok(Some(Keys::One(key)))
}

pub(super) fn check_secret(secret: &Secret) -> Result<(), AuthError> {
    // Anyone may know a public key: as an HMAC secret it lets anyone sign tokens.
    if secret.expose().contains("-----BEGIN") {
        return Err(bad_config(
            "auth.secret",
            "is a PEM key; an HMAC secret must be secret (for a public key, use an RS/PS/ES/EdDSA algorithm and `auth.public_key`)",
        ));
    }
    let len = secret.expose().len();
    if len < MIN_SECRET_LEN {
        return Err(bad_config("auth.secret", format!("is {len} bytes; use at least {MIN_SECRET_LEN}")));
    }
    Ok(())
}

/// A PEM public key for `alg`, checked.
fn from_pem(pem: &str, alg: TokenAlgorithm) -> Result<DecodingKey, String> {
    let label = pem_label(pem).ok_or("is not a PEM key (`-----BEGIN ...`)")?;
    if label.contains("PRIVATE") {
        return Err("is a private key; give Herald only the public half (`openssl pkey -pubout`)".into());
    }
    let (what, parsed) = match family(alg) {
        AlgorithmFamily::Rsa => ("an RSA public key", DecodingKey::from_rsa_pem(pem.as_bytes())),
        AlgorithmFamily::Ec if alg == TokenAlgorithm::ES384 => {
            ("an EC P-384 public key", DecodingKey::from_ec_pem(pem.as_bytes()))
        }
        AlgorithmFamily::Ec => ("an EC P-256 public key", DecodingKey::from_ec_pem(pem.as_bytes())),
        _ => ("an Ed25519 public key", DecodingKey::from_ed_pem(pem.as_bytes())),
    };
    let not_it = |why: String| format!("is not {what} in PEM form, as {alg} needs{why}");
    let key = parsed.map_err(|_| not_it(String::new()))?;
    check_key(&key, alg).map_err(|why| not_it(format!(": {why}")))?;
    Ok(key)
}

fn family(alg: TokenAlgorithm) -> AlgorithmFamily {
    alg.family()
}

/// The label of the first PEM block (`PUBLIC KEY` in `-----BEGIN PUBLIC KEY-----`).
fn pem_label(pem: &str) -> Option<&str> {
    const BEGIN: &str = "-----BEGIN ";
    let rest = &pem[pem.find(BEGIN)? + BEGIN.len()..];
    Some(&rest[..rest.find("-----")?])
}

/// Parses `key` with the crypto crate that verifies `alg`, with the bounds it applies then:
/// jsonwebtoken parses keys only when verifying, so without this a bad key would pass
/// start-up and refuse every token (or, for a short Ed25519 key, fail inside the library).
pub(super) fn check_key(key: &DecodingKey, alg: TokenAlgorithm) -> Result<(), String> {
    if key.family() != family(alg) {
        return Err("a key of another type".into());
    }
    match (family(alg), key.kind()) {
        (AlgorithmFamily::Hmac, DecodingKeyKind::SecretOrDer(secret)) => {
            if secret.len() < MIN_SECRET_LEN {
                return Err(format!("a secret of {} bytes; use at least {MIN_SECRET_LEN}", secret.len()));
            }
        }
        (AlgorithmFamily::Rsa, kind) => {
            let parsed = match kind {
                DecodingKeyKind::SecretOrDer(der) => {
                    <rsa::RsaPublicKey as rsa::pkcs1::DecodeRsaPublicKey>::from_pkcs1_der(der)
                        .map_err(|e| e.to_string())
                }
                DecodingKeyKind::RsaModulusExponent { n, e } => {
                    rsa::RsaPublicKey::new(rsa::BigUint::from_bytes_be(n), rsa::BigUint::from_bytes_be(e))
                        .map_err(|e| e.to_string())
                }
            };
            let rsa = parsed.map_err(|e| format!("a malformed RSA key ({e})"))?;
            let bits = rsa.n().bits();
            if bits < 2048 {
                return Err(format!("a {bits}-bit RSA key; use at least 2048 bits"));
            }
        }
        (AlgorithmFamily::Ec, DecodingKeyKind::SecretOrDer(point)) => {
            let ok = if alg == TokenAlgorithm::ES384 {
                p384::PublicKey::from_sec1_bytes(point).is_ok()
            } else {
                p256::PublicKey::from_sec1_bytes(point).is_ok()
            };
            if !ok {
                return Err("not a point on the curve".into());
            }
        }
        (AlgorithmFamily::Ed, DecodingKeyKind::SecretOrDer(bytes)) => {
            let bytes: &[u8; 32] = bytes.as_slice().try_into().map_err(|_| "not a 32-byte Ed25519 key")?;
            ed25519_dalek::VerifyingKey::from_bytes(bytes).map_err(|_| "not a valid Ed25519 point")?;
        }
        _ => return Err("a key of another type".into()),
    }
    Ok(())
}

/// The keys of a JWKS file usable with `alg`. Keys of other types, with another `alg`, or for
/// encryption are skipped (and logged); a file with no usable key is an error.
pub(super) fn load_jwks(path: &Path, alg: TokenAlgorithm) -> Result<Keys, String> {
    let shown = path.display();
    let size = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?.len();
    if size > MAX_JWKS_SIZE {
        return Err(format!("{shown} is {size} bytes, more than {MAX_JWKS_SIZE}"));
    }
    let text = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set =
        serde_json::from_slice(&text).map_err(|e| format!("{shown} is not a JWKS (`{{\"keys\":[...]}}`): {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, raw) in set.keys.into_iter().enumerate() {
        let kid = raw.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
        let name = kid.clone().unwrap_or_else(|| format!("#{i}"));
        match usable(raw, alg) {
            Ok(key) => {
                if keys.iter().any(|(k, _)| *k == kid) {
                    return Err(format!("{shown}: two keys have the `kid` {name:?}"));
                }
                keys.push((kid, key));
            }
            Err(why) => skipped.push(format!("{name}: {why}")),
        }
    }
    if !skipped.is_empty() {
        tracing::warn!(file = %shown, skipped = %skipped.join("; "), "JWKS keys not usable with {alg}, skipped");
    }
    if keys.is_empty() {
        return Err(format!("{shown} holds no key usable with {alg} ({})", skipped.join("; ")));
    }
    if keys.len() > 1 && keys.iter().any(|(kid, _)| kid.is_none()) {
        return Err(format!("{shown}: with several keys, every key needs a `kid`"));
    }
    Ok(Keys::Set(keys))
}

fn usable(raw: serde_json::Value, alg: TokenAlgorithm) -> Result<DecodingKey, String> {
    let jwk: Jwk = serde_json::from_value(raw).map_err(|_| "not a key this server knows".to_owned())?;
    if let Some(key_alg) = jwk.common.key_algorithm {
        if key_alg.to_string() != alg.to_string() {
            return Err(format!("for {key_alg}"));
        }
    }
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("for encryption".into());
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| "malformed".to_owned())?;
    check_key(&key, alg)?;
    Ok(key)
}

/// What identifies a version of a file without reading it.
fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Reloads the JWKS file at `path` into `keys` when it changes or on SIGHUP, until the
/// verifier owning `keys` is dropped. A file that does not load keeps the previous keys.
pub(super) fn watch(
    path: PathBuf,
    every: Duration,
    alg: TokenAlgorithm,
    keys: Weak<RwLock<std::sync::Arc<Keys>>>,
) -> impl std::future::Future<Output = ()> + Send {
    // The version loaded now, taken before the task first runs, so no change is missed.
    let last = stamp(&path);
    watching(path, every, alg, keys, last)
}

async fn watching(
    path: PathBuf,
    every: Duration,
    alg: TokenAlgorithm,
    keys: Weak<RwLock<std::sync::Arc<Keys>>>,
    mut last: Option<(std::time::SystemTime, u64, u64)>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { hangup.as_mut()?.recv().await } => true,
        };
        let Some(keys) = keys.upgrade() else { break };
        let now = stamp(&path);
        if !forced && now == last {
            continue;
        }
        last = now;
        match load_jwks(&path, alg) {
            Ok(set) => {
                tracing::info!(file = %path.display(), keys = set.len(), "JWKS reloaded");
                *keys.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(set);
            }
            Err(error) => tracing::warn!(%error, "JWKS not reloaded; the previous keys stay in use"),
        }
    }
}
