//! Connection tokens: the JWT a client sends in `connect`, checked with the one algorithm the
//! configuration pins, so a token never chooses how it is verified. `mint` makes HMAC tokens
//! for development (`herald token`).

use std::fmt;
use std::time::Duration;

use herald_protocol::ErrorCode;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::secret::Secret;

/// Shortest HMAC secret accepted: RFC 7518 §3.2 asks for a key at least as long as the hash
/// output, and shorter secrets can be brute-forced offline from any one token.
pub const MIN_SECRET_LEN: usize = 32;

/// Largest `info` claim, serialized: it is copied into every presence answer and join push.
pub const MAX_INFO_SIZE: usize = 4096;

/// Largest `leeway`: leeway lengthens the life of every token, including stolen ones.
pub const MAX_LEEWAY: Duration = Duration::from_secs(600);

/// Connection tokens (`[auth]`): the JWT a client may send in its `connect` command. Its `sub`
/// claim is the user id; `exp` is required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The one signature algorithm tokens must use: `HS256`, `HS384` or `HS512` (a secret shared
    /// with your backend, `secret`), or `RS256` or `ES256` (your backend signs with its private
    /// key, Herald checks with `public_key`). A token whose header names any other algorithm,
    /// `none` included, is refused.
    pub algorithm: TokenAlgorithm,
    /// The shared secret for `HS256`, `HS384` and `HS512`, at least 32 bytes (for example the
    /// output of `openssl rand -base64 48`). When empty, Herald accepts no tokens. Prefer setting
    /// it through `HERALD_AUTH__SECRET` rather than in a file.
    #[schemars(with = "String")]
    pub secret: Secret,
    /// The PEM public key (`-----BEGIN PUBLIC KEY-----`) for `RS256` (RSA, 2048 to 4096 bits)
    /// or `ES256` (EC P-256), from `openssl pkey -pubout`. Never the private key. When empty,
    /// Herald accepts no tokens.
    pub public_key: String,
    /// When set, a token must name this audience in its `aud` claim. When empty, `aud` is not
    /// checked.
    pub audience: String,
    /// When set, a token's `iss` claim must be exactly this. When empty, `iss` is not checked.
    pub issuer: String,
    /// Clock difference tolerated when checking `exp` and `nbf`, in whole seconds; at most
    /// 10 minutes.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub leeway: Duration,
    /// Whether a client may connect without a token. When false, a secret or public key must be
    /// configured, or no client could connect.
    pub allow_anonymous: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithm: TokenAlgorithm::default(),
            secret: Secret::default(),
            public_key: String::new(),
            audience: String::new(),
            issuer: String::new(),
            leeway: Duration::from_secs(5),
            allow_anonymous: true,
        }
    }
}

impl AuthConfig {
    /// Checks what types alone cannot express: the key fits the algorithm, the secret is long
    /// enough, the public key parses, and the section as a whole lets someone connect.
    pub fn validate(&self) -> Result<(), AuthError> {
        let verifier = Verifier::new(self)?;
        if verifier.is_none() && !self.allow_anonymous {
            return Err(bad_config(
                "auth.allow_anonymous",
                "is false, but neither `auth.secret` nor `auth.public_key` is set: no client could connect",
            ));
        }
        Ok(())
    }
}

/// The signature algorithm of connection tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum TokenAlgorithm {
    /// HMAC with SHA-256 and a shared secret.
    #[default]
    HS256,
    /// HMAC with SHA-384 and a shared secret.
    HS384,
    /// HMAC with SHA-512 and a shared secret.
    HS512,
    /// RSA PKCS#1 v1.5 with SHA-256; Herald holds the public key.
    RS256,
    /// ECDSA on P-256 with SHA-256; Herald holds the public key.
    ES256,
}

impl TokenAlgorithm {
    /// Whether tokens are checked with the shared secret rather than a public key.
    pub fn is_hmac(self) -> bool {
        matches!(self, Self::HS256 | Self::HS384 | Self::HS512)
    }

    fn jwt(self) -> Algorithm {
        match self {
            Self::HS256 => Algorithm::HS256,
            Self::HS384 => Algorithm::HS384,
            Self::HS512 => Algorithm::HS512,
            Self::RS256 => Algorithm::RS256,
            Self::ES256 => Algorithm::ES256,
        }
    }
}

impl fmt::Display for TokenAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What a valid token says about the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user id (`sub`), never empty.
    pub user: String,
    /// When the token expires (`exp`), in Unix seconds.
    pub expires_at: u64,
    /// Free-form data about the client (`info`, a JSON object), shown to others in presence.
    pub info: Option<Value>,
    /// Channels the token lets the client subscribe to (`channels`), beyond what namespaces allow.
    pub channels: Vec<String>,
}

/// Why a token was refused, or why the `[auth]` section cannot be used. Messages never contain
/// the token or the secret, so they may be logged and sent to the client.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Past its `exp` (plus the leeway): the client should get a new token.
    #[error("token expired")]
    Expired,
    /// Malformed, badly signed, of the wrong algorithm, or with unacceptable claims.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Neither a secret nor a public key is configured, so no token can be checked.
    #[error("this server does not accept connection tokens")]
    NotConfigured,
    /// A value in `[auth]` is unusable; `key` is its dotted name.
    #[error("invalid value for `{key}`: {message}")]
    BadKey { key: &'static str, message: String },
    /// `mint` only signs with a shared secret.
    #[error("minting {0} tokens needs the private key, which Herald never holds: sign them in your backend")]
    MintUnsupported(TokenAlgorithm),
}

impl AuthError {
    /// The protocol error code for a refused `connect` or `refresh`.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Unauthorized
    }
}

fn bad_config(key: &'static str, message: impl Into<String>) -> AuthError {
    AuthError::BadKey { key, message: message.into() }
}

fn invalid(message: impl Into<String>) -> AuthError {
    AuthError::Invalid(message.into())
}

/// Checks connection tokens; built once from the configuration, shared by every session.
#[derive(Clone)]
pub struct Verifier {
    algorithm: TokenAlgorithm,
    key: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for Verifier {
    // Written by hand so the key can never reach a log, whatever the dependency prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

impl Verifier {
    /// The verifier for `config`, or `None` when neither a secret nor a public key is set.
    pub fn new(config: &AuthConfig) -> Result<Option<Self>, AuthError> {
        if config.leeway > MAX_LEEWAY {
            return Err(bad_config("auth.leeway", "must be at most 10m"));
        }
        let Some(key) = decoding_key(config)? else { return Ok(None) };

        // Only the pinned algorithm: the header's `alg` is the attacker's choice, not ours.
        let mut validation = Validation::new(config.algorithm.jwt());
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // jsonwebtoken compares `aud` and `iss` only when the token has them: when configured,
        // they must also be required, or leaving them out would pass.
        let mut required = vec!["exp", "sub"];
        if config.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&config.audience]);
            required.push("aud");
        }
        if !config.issuer.is_empty() {
            validation.set_issuer(&[&config.issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(Self { algorithm: config.algorithm, key, validation }))
    }

    /// The pinned algorithm.
    pub fn algorithm(&self) -> TokenAlgorithm {
        self.algorithm
    }

    /// Checks a token's signature and claims, and returns what it says about the client.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation).map_err(refusal)?;
        claims_from(data.claims)
    }
}

/// A generic reason for a jsonwebtoken error. Its own messages can quote claim values, so
/// none of them is passed on.
fn refusal(e: jsonwebtoken::errors::Error) -> AuthError {
    let why = match e.kind() {
        ErrorKind::ExpiredSignature => return AuthError::Expired,
        ErrorKind::ImmatureSignature => "not valid yet (`nbf` is in the future)".to_owned(),
        ErrorKind::InvalidAlgorithm => "algorithm not accepted".to_owned(),
        ErrorKind::InvalidSignature => "bad signature".to_owned(),
        // The claim names come from our own list, not from the token.
        ErrorKind::MissingRequiredClaim(claim) => format!("missing or malformed `{claim}` claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("malformed `{claim}` claim"),
        ErrorKind::InvalidIssuer => "issuer not accepted".to_owned(),
        ErrorKind::InvalidAudience => "audience not accepted".to_owned(),
        _ => "malformed token".to_owned(),
    };
    AuthError::Invalid(why)
}

/// Herald's claims from a payload whose signature, `exp`, `nbf`, `aud` and `iss` are checked.
fn claims_from(mut payload: Map<String, Value>) -> Result<Claims, AuthError> {
    let user = match payload.remove("sub") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        _ => return Err(invalid("`sub` claim (the user id) must be a non-empty string")),
    };
    let expires_at =
        payload.get("exp").and_then(numeric_date).ok_or_else(|| invalid("missing or malformed `exp` claim"))?;
    let info = check_info(payload.remove("info"))?;
    let channels = match payload.remove("channels") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                _ => Err(invalid("`channels` claim must be a list of channel names")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("`channels` claim must be a list of channel names")),
    };
    Ok(Claims { user, expires_at, info, channels })
}

/// A JWT NumericDate; some issuers write fractions (`Date.now() / 1000`), which jsonwebtoken
/// accepts and rounds, so this does too.
fn numeric_date(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        let f = v.as_f64()?;
        (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then(|| f.round() as u64)
    })
}

/// `info` must be an object of bounded size; `null` means none.
fn check_info(info: Option<Value>) -> Result<Option<Value>, AuthError> {
    match info {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(_)) => {
            let size = serde_json::to_vec(&v).map_or(usize::MAX, |b| b.len());
            if size > MAX_INFO_SIZE {
                return Err(invalid(format!("`info` claim is {size} bytes, more than {MAX_INFO_SIZE}")));
            }
            Ok(Some(v))
        }
        Some(_) => Err(invalid("`info` claim must be a JSON object")),
    }
}

/// The key tokens are checked with, or `None` when none is configured.
fn decoding_key(config: &AuthConfig) -> Result<Option<DecodingKey>, AuthError> {
    let alg = config.algorithm;
    if alg.is_hmac() {
        // A key for the other family would be ignored silently; say so instead.
        if !config.public_key.trim().is_empty() {
            return Err(bad_config(
                "auth.public_key",
                format!("is set, but `auth.algorithm` is {alg}, which checks tokens with `auth.secret`"),
            ));
        }
        if config.secret.is_empty() {
            return Ok(None);
        }
        check_secret(&config.secret)?;
        return Ok(Some(DecodingKey::from_secret(config.secret.expose().as_bytes())));
    }
    if !config.secret.is_empty() {
        return Err(bad_config(
            "auth.secret",
            format!("is set, but `auth.algorithm` is {alg}, which checks tokens with `auth.public_key`"),
        ));
    }
    let pem = config.public_key.trim();
    if pem.is_empty() {
        return Ok(None);
    }
    let label = pem_label(pem).ok_or_else(|| bad_config("auth.public_key", "is not a PEM key (`-----BEGIN ...`)"))?;
    if label.contains("PRIVATE") {
        return Err(bad_config(
            "auth.public_key",
            "is a private key; give Herald only the public half (`openssl pkey -pubout`)",
        ));
    }
    match alg {
        TokenAlgorithm::RS256 => {
            let not_rsa = || bad_config("auth.public_key", "is not an RSA public key in PEM form, as RS256 needs");
            if label != "PUBLIC KEY" && label != "RSA PUBLIC KEY" {
                return Err(not_rsa());
            }
            let key = DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| not_rsa())?;
            match key.kind() {
                DecodingKeyKind::SecretOrDer(der) => {
                    check_rsa_public_key(der).map_err(|message| bad_config("auth.public_key", message))?
                }
                DecodingKeyKind::RsaModulusExponent { .. } => return Err(not_rsa()),
            }
            Ok(Some(key))
        }
        _ => {
            let not_p256 =
                || bad_config("auth.public_key", "is not an EC P-256 public key in PEM form, as ES256 needs");
            if label != "PUBLIC KEY" {
                return Err(not_p256());
            }
            let key = DecodingKey::from_ec_pem(pem.as_bytes()).map_err(|_| not_p256())?;
            // Building a verifier parses the point on the pinned curve (a P-384 key fails here);
            // with an empty signature the answer is `Ok(false)` for any key that parses.
            jsonwebtoken::crypto::verify("", b"", &key, alg.jwt()).map_err(|_| not_p256())?;
            Ok(Some(key))
        }
    }
}

fn check_secret(secret: &Secret) -> Result<(), AuthError> {
    let len = secret.expose().len();
    if len < MIN_SECRET_LEN {
        return Err(bad_config("auth.secret", format!("is {len} bytes; use at least {MIN_SECRET_LEN}")));
    }
    Ok(())
}

/// The label of the first PEM block (`PUBLIC KEY` in `-----BEGIN PUBLIC KEY-----`).
fn pem_label(pem: &str) -> Option<&str> {
    const BEGIN: &str = "-----BEGIN ";
    let rest = &pem[pem.find(BEGIN)? + BEGIN.len()..];
    Some(&rest[..rest.find("-----")?])
}

/// Checks a PKCS#1 RSAPublicKey (`SEQUENCE { modulus INTEGER, publicExponent INTEGER }`)
/// against the bounds the `rsa` crate applies when verifying. jsonwebtoken parses the key only
/// then, so without this a bad key would pass start-up and refuse every token.
fn check_rsa_public_key(der: &[u8]) -> Result<(), String> {
    let malformed = || "is not a well-formed RSA public key".to_owned();
    let (body, rest) = der_read(der, 0x30).ok_or_else(malformed)?;
    let (n, body) = der_read(body, 0x02).ok_or_else(malformed)?;
    let (e, body) = der_read(body, 0x02).ok_or_else(malformed)?;
    if !rest.is_empty() || !body.is_empty() {
        return Err(malformed());
    }
    let (n, e) = (unsigned(n).ok_or_else(malformed)?, unsigned(e).ok_or_else(malformed)?);
    let bits = match n.first() {
        Some(&top) => n.len() * 8 - top.leading_zeros() as usize,
        None => 0,
    };
    if bits < 2048 {
        return Err(format!("is a {bits}-bit RSA key; use at least 2048 bits"));
    }
    if bits > 4096 {
        return Err(format!("is a {bits}-bit RSA key; at most 4096 bits are supported"));
    }
    if n.last().is_some_and(|b| b % 2 == 0) || e.len() > 8 {
        return Err(malformed());
    }
    let e = e.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    if e % 2 == 0 || !(3..=(1 << 33) - 1).contains(&e) {
        return Err("has an RSA public exponent out of range".to_owned());
    }
    Ok(())
}

/// One DER element with `tag`: its contents and what follows it.
fn der_read(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if t != tag {
        return None;
    }
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (len, rest) = rest.split_at(count);
        (len.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b)), rest)
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A DER INTEGER's magnitude without leading zeros; `None` when negative.
fn unsigned(int: &[u8]) -> Option<&[u8]> {
    if int.first().is_some_and(|b| b & 0x80 != 0) {
        return None;
    }
    let start = int.iter().position(|&b| b != 0).unwrap_or(int.len());
    Some(&int[start..])
}

/// A token for `user`, valid for `ttl`, signed with the configured secret: for development
/// (`herald token`). It carries the configured `aud` and `iss`, so the same configuration
/// accepts it. Only HMAC algorithms: Herald never holds a private key.
pub fn mint(config: &AuthConfig, user: &str, ttl: Duration, info: Option<Value>) -> Result<String, AuthError> {
    let alg = config.algorithm;
    if !alg.is_hmac() {
        return Err(AuthError::MintUnsupported(alg));
    }
    if config.secret.is_empty() {
        return Err(AuthError::NotConfigured);
    }
    check_secret(&config.secret)?;
    if user.trim().is_empty() {
        return Err(invalid("`sub` claim (the user id) must be a non-empty string"));
    }
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = Map::new();
    claims.insert("sub".into(), user.into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), now.saturating_add(ttl.as_secs()).into());
    if !config.audience.is_empty() {
        claims.insert("aud".into(), config.audience.clone().into());
    }
    if !config.issuer.is_empty() {
        claims.insert("iss".into(), config.issuer.clone().into());
    }
    if let Some(info) = check_info(info)? {
        claims.insert("info".into(), info);
    }
    let key = EncodingKey::from_secret(config.secret.expose().as_bytes());
    jsonwebtoken::encode(&Header::new(alg.jwt()), &claims, &key)
        .map_err(|_| bad_config("auth.secret", "could not sign a token with it"))
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde_json::json;

    use super::*;

    // Test-only keys, generated for these tests with openssl; they protect nothing.
    const TEST_RSA_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDK23dXKtnP0R2E
b/7BptqAH0oR1OfkSCWAbUbjjQfvbngfeHFWYTf4rHkR7P5hd0rlgKdydTE0JU1h
eJpfkacyKTzyhEDjts8Z1h2EyRNzm4a8uAOrwaRV3ztSY2dEzibdZs+TkAkyyWkI
YX+eXByFo4YEqKfHglPXfJsZyLr6O5IQ4kTaD8HH0urkdHI5e0g01Fbs0m8l2zcQ
OSwP8ghdb/7DOh9JTLWWb71t//grlnWrF0+kwf0zHZ047TzD4M9fWf4jizzWB5t9
yWzgmz9stJIeZVfNpG+0KSIYIDWh7Hr/OgGYW7RhWsfFVU08b5DZi9ZKU19mC3wu
8iElGkMDAgMBAAECggEARjuJq/I4Cw1ZbNrhluZPzAAJQvc1egHIihhLbMkNMEZM
7IhkpQVvvXbpS92DjPciRScv0h7k9CreCZsZx3DENEe2xDgpxy0pssZA3hJH28TC
91+2VabrYJezECk+PcIqDolj4LEDnkPBS5eF+avmbBZbdg12WUq0AG0xvdGTesK7
Js1CgRp25vjssd5UPjDHHn/uvjb86xx05MV7a+qemHh877M/izpy+lvk6g0taGdN
iozXQuaxCGoo2X1d5LU8oXOsbocpK91966YaX8ZNVRGkLUoZyKyvYZqSHBlz2hbp
G9BzLmDJ/uSLEQCsRKcOEKcd/F4hxgCsk4//KM5gkQKBgQDvk3hF0FcRPKvIuxQq
g38g7xub42eV19vYuSKnFA9faLuEB17IvvMr+VjVwf1f6MFIkQFvHCbstOy5pe/1
flCWW9gVllqkcwrM6TfPUMMLjEUDu0JgTF9/SteP8/JHU7Z7Nb7z4g4qVxtAiV/+
TWJ+5DI9pMz82Bt459yut+YH3wKBgQDYw5Yp7hGBY5kuRSReZ8kkR4PS/8j/9Rk0
lMD+9F7rcVG93NJ6gPCyvZK/+w3n65agaSYgQpZICRZzeaV8JATeYoZ3xPPaiSMx
RE4IdCZPacFiqxfgEuBA3/0Rcg5is3OWjugqrR6IN0JfNYHxEit6zHivA6oxrVfO
KC+RsU95XQKBgQCor9xSw+RaVa7bEqabXKVpyhJVjCQGhMveaFT28Y/1bOgDibD6
hkDwaIxdTk8adeeKMdehpV/e8XFxMl6oK32QsTCP2qMOAZbMOzY5ujLrcaOygeq1
pXDkTw1C5dBk2pO1Y12FmVjCBT1CDrhRdalxkTmy39QaAAwv8IoZV5EXXwKBgDSQ
GRXJ2QzbLgX+VjdeS3Q0s06zH/aRZK9Pcw1gDLRjIkM8DP4Pzk5JkhBjvJeElV4I
oWopO2/0ZDFUSkC0K0oR8jGQ3OEdaB9GRPXf1HplVrOqcXuwmBijOCbG1Z4xjdHw
jXPrzv+RBtM3km72zPxWIN2vsdGiCyy+qepWaMMxAoGBAL/yey/n8fVgGk5vTTs+
zxrKh/vIUvlvVSSbQbFsE9PBVuOMQ+IpG9m0G7UQsPIZjirH0BQZOCxR8/+Hsa5V
1TZlQw41ymp3IW1XlXTYP3yUPCyYvRb6VP7lOuGvx8tyrp1BsRinphU95HjvdPpH
B99kepHoApS9mlpyrzKaaE5x
-----END PRIVATE KEY-----
";
    const TEST_RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAytt3VyrZz9EdhG/+waba
gB9KEdTn5EglgG1G440H7254H3hxVmE3+Kx5Eez+YXdK5YCncnUxNCVNYXiaX5Gn
Mik88oRA47bPGdYdhMkTc5uGvLgDq8GkVd87UmNnRM4m3WbPk5AJMslpCGF/nlwc
haOGBKinx4JT13ybGci6+juSEOJE2g/Bx9Lq5HRyOXtINNRW7NJvJds3EDksD/II
XW/+wzofSUy1lm+9bf/4K5Z1qxdPpMH9Mx2dOO08w+DPX1n+I4s81gebfcls4Js/
bLSSHmVXzaRvtCkiGCA1oex6/zoBmFu0YVrHxVVNPG+Q2YvWSlNfZgt8LvIhJRpD
AwIDAQAB
-----END PUBLIC KEY-----
";
    const TEST_RSA_PUBLIC_PKCS1: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAytt3VyrZz9EdhG/+wabagB9KEdTn5EglgG1G440H7254H3hxVmE3
+Kx5Eez+YXdK5YCncnUxNCVNYXiaX5GnMik88oRA47bPGdYdhMkTc5uGvLgDq8Gk
Vd87UmNnRM4m3WbPk5AJMslpCGF/nlwchaOGBKinx4JT13ybGci6+juSEOJE2g/B
x9Lq5HRyOXtINNRW7NJvJds3EDksD/IIXW/+wzofSUy1lm+9bf/4K5Z1qxdPpMH9
Mx2dOO08w+DPX1n+I4s81gebfcls4Js/bLSSHmVXzaRvtCkiGCA1oex6/zoBmFu0
YVrHxVVNPG+Q2YvWSlNfZgt8LvIhJRpDAwIDAQAB
-----END RSA PUBLIC KEY-----
";
    const TEST_EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgliEULNTXT+HTDg7W
UxLYEfujJiJtK91W3cImrscu4XWhRANCAARCHzL5OwpUCBDXWmco+UYuwejSVxPK
tsbvtoIB/g9u34XVlcUQ87JrQTHiL5AaemSIO1DPJQgE3fao34867Jsg
-----END PRIVATE KEY-----
";
    const TEST_EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEQh8y+TsKVAgQ11pnKPlGLsHo0lcT
yrbG77aCAf4Pbt+F1ZXFEPOya0Ex4i+QGnpkiDtQzyUIBN32qN+POuybIA==
-----END PUBLIC KEY-----
";
    const TEST_EC_P384_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEG8P1nXrhhrrh9v/1f9Y9nzNKrilMX05I
2AGgjyui/He9j/MD60OatZ75ZDJbIxPGvTZ4/Hq1VaVPEhP+HBTKhhJVzbSgRd+r
bWP0lQXqbXlt/VIJ0cEZhEmdWF/iB/Xy
-----END PUBLIC KEY-----
";
    const TEST_RSA_1024_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDO6r0baSz/w8zsLPbMBTzrTM+r
VBlUYAB47TyT4i1ZPpJiad48QJyC0khTDYcWammsmzJA36o0A+geit/CLobbt9zD
Ng5QOlHMn0jIc+BxWJ61BfgiVaU9c8c5/pWnfWFI77BYQUkl3WXn5J1CYOAl9lbC
RnH0+U5xgjTNIA4B+wIDAQAB
-----END PUBLIC KEY-----
";
    const SECRET: &str = "test-secret-0123456789abcdef-0123456789";

    fn hs(alg: TokenAlgorithm) -> AuthConfig {
        AuthConfig { algorithm: alg, secret: Secret::new(SECRET), ..AuthConfig::default() }
    }

    fn with_key(alg: TokenAlgorithm, public_key: &str) -> AuthConfig {
        AuthConfig { algorithm: alg, public_key: public_key.into(), ..AuthConfig::default() }
    }

    fn verifier(config: &AuthConfig) -> Verifier {
        Verifier::new(config).expect("valid config").expect("a key is configured")
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).expect("signs")
    }

    fn hs256(claims: &Value) -> String {
        sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET.as_bytes()), claims)
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn assert_invalid(result: Result<Claims, AuthError>, what: &str) {
        match result {
            Err(AuthError::Invalid(message)) => assert!(message.contains(what), "{message:?} lacks {what:?}"),
            other => panic!("expected Invalid({what}), got {other:?}"),
        }
    }

    #[test]
    fn mint_then_verify_round_trips_for_every_hmac_algorithm() {
        for alg in [TokenAlgorithm::HS256, TokenAlgorithm::HS384, TokenAlgorithm::HS512] {
            let config = hs(alg);
            config.validate().expect("valid");
            let info = json!({"name": "Ada"});
            let token = mint(&config, "42", Duration::from_secs(60), Some(info.clone())).expect("mints");
            let claims = verifier(&config).verify(&token).expect("verifies");
            assert_eq!(claims.user, "42");
            assert_eq!(claims.info, Some(info));
            assert!(claims.channels.is_empty());
            assert!((now() + 59..=now() + 61).contains(&claims.expires_at), "{alg}: {}", claims.expires_at);
        }
    }

    #[test]
    fn a_token_of_another_hmac_strength_is_refused() {
        let token = mint(&hs(TokenAlgorithm::HS512), "42", Duration::from_secs(60), None).expect("mints");
        assert_invalid(verifier(&hs(TokenAlgorithm::HS256)).verify(&token), "algorithm");
    }

    #[test]
    fn optional_claims_are_carried_through() {
        let token = hs256(&json!({"sub": "u1", "exp": now() + 60, "channels": ["news", "chat:a"], "other": 1}));
        let claims = verifier(&hs(TokenAlgorithm::HS256)).verify(&token).expect("verifies");
        assert_eq!(claims.channels, ["news", "chat:a"]);
        assert_eq!(claims.info, None);
    }

    #[test]
    fn fractional_exp_is_accepted() {
        let exp = now() as f64 + 60.4;
        let claims = verifier(&hs(TokenAlgorithm::HS256)).verify(&hs256(&json!({"sub": "u", "exp": exp}))).expect("ok");
        assert!((now() + 59..=now() + 61).contains(&claims.expires_at), "{}", claims.expires_at);
    }

    #[test]
    fn expired_tokens_are_refused_beyond_the_leeway() {
        let v = verifier(&hs(TokenAlgorithm::HS256));
        let late = hs256(&json!({"sub": "42", "exp": now() - 60}));
        assert!(matches!(v.verify(&late), Err(AuthError::Expired)));
        let within_leeway = hs256(&json!({"sub": "42", "exp": now() - 2}));
        v.verify(&within_leeway).expect("within the 5 s leeway");
        let token = mint(&hs(TokenAlgorithm::HS256), "42", Duration::ZERO, None).expect("mints");
        v.verify(&token).expect("exp = now is within the leeway");
    }

    #[test]
    fn exp_is_required() {
        let token = hs256(&json!({"sub": "42"}));
        assert_invalid(verifier(&hs(TokenAlgorithm::HS256)).verify(&token), "`exp`");
        let token = hs256(&json!({"sub": "42", "exp": "tomorrow"}));
        assert_invalid(verifier(&hs(TokenAlgorithm::HS256)).verify(&token), "`exp`");
    }

    #[test]
    fn nbf_in_the_future_is_refused() {
        let token = hs256(&json!({"sub": "42", "exp": now() + 600, "nbf": now() + 300}));
        assert_invalid(verifier(&hs(TokenAlgorithm::HS256)).verify(&token), "nbf");
        let token = hs256(&json!({"sub": "42", "exp": now() + 600, "nbf": now() - 1}));
        verifier(&hs(TokenAlgorithm::HS256)).verify(&token).expect("nbf in the past is fine");
    }

    #[test]
    fn sub_must_be_a_non_empty_string() {
        let v = verifier(&hs(TokenAlgorithm::HS256));
        assert_invalid(v.verify(&hs256(&json!({"exp": now() + 60}))), "`sub`");
        assert_invalid(v.verify(&hs256(&json!({"sub": "", "exp": now() + 60}))), "`sub`");
        assert_invalid(v.verify(&hs256(&json!({"sub": "  ", "exp": now() + 60}))), "`sub`");
        assert_invalid(v.verify(&hs256(&json!({"sub": 42, "exp": now() + 60}))), "`sub`");
    }

    #[test]
    fn info_must_be_a_small_object() {
        let v = verifier(&hs(TokenAlgorithm::HS256));
        let big = json!({"sub": "42", "exp": now() + 60, "info": {"pad": "x".repeat(MAX_INFO_SIZE)}});
        assert_invalid(v.verify(&hs256(&big)), "`info`");
        assert_invalid(v.verify(&hs256(&json!({"sub": "42", "exp": now() + 60, "info": [1]}))), "`info`");
        assert_invalid(v.verify(&hs256(&json!({"sub": "42", "exp": now() + 60, "channels": "news"}))), "`channels`");
        let too_big = mint(&hs(TokenAlgorithm::HS256), "42", Duration::from_secs(60), big.get("info").cloned());
        assert!(matches!(too_big, Err(AuthError::Invalid(_))), "{too_big:?}");
    }

    #[test]
    fn alg_none_is_refused() {
        let header = b64(&json!({"alg": "none", "typ": "JWT"}));
        let payload = b64(&json!({"sub": "admin", "exp": now() + 600}));
        let token = format!("{header}.{payload}.");
        for config in [hs(TokenAlgorithm::HS256), with_key(TokenAlgorithm::RS256, TEST_RSA_PUBLIC)] {
            assert!(matches!(verifier(&config).verify(&token), Err(AuthError::Invalid(_))));
        }
    }

    #[test]
    fn hs256_is_refused_when_a_public_key_algorithm_is_pinned() {
        let claims = json!({"sub": "admin", "exp": now() + 600});
        for (alg, public_pem) in [(TokenAlgorithm::RS256, TEST_RSA_PUBLIC), (TokenAlgorithm::ES256, TEST_EC_PUBLIC)] {
            let v = verifier(&with_key(alg, public_pem));
            assert_invalid(v.verify(&hs256(&claims)), "algorithm");
            // Algorithm confusion: the attacker knows the public key and uses its PEM bytes as
            // the HMAC secret, hoping the server does the same.
            let forged = sign(Algorithm::HS256, &EncodingKey::from_secret(public_pem.as_bytes()), &claims);
            assert_invalid(v.verify(&forged), "algorithm");
            let forged = sign(Algorithm::HS256, &EncodingKey::from_secret(public_pem.trim().as_bytes()), &claims);
            assert_invalid(v.verify(&forged), "algorithm");
        }
    }

    #[test]
    fn a_token_signed_with_another_secret_is_refused() {
        let other = EncodingKey::from_secret(b"another-secret-0123456789abcdef-0123456789");
        let token = sign(Algorithm::HS256, &other, &json!({"sub": "42", "exp": now() + 60}));
        assert_invalid(verifier(&hs(TokenAlgorithm::HS256)).verify(&token), "signature");
    }

    #[test]
    fn a_tampered_payload_is_refused() {
        let token = hs256(&json!({"sub": "42", "exp": now() + 60}));
        let mut parts: Vec<&str> = token.split('.').collect();
        let admin = b64(&json!({"sub": "admin", "exp": now() + 60}));
        parts[1] = &admin;
        assert_invalid(verifier(&hs(TokenAlgorithm::HS256)).verify(&parts.join(".")), "signature");
        assert_invalid(verifier(&hs(TokenAlgorithm::HS256)).verify("not a token"), "malformed");
    }

    #[test]
    fn rs256_and_es256_verify_with_their_public_keys() {
        let claims = json!({"sub": "42", "exp": now() + 60});
        let rsa = EncodingKey::from_rsa_pem(TEST_RSA_PRIVATE.as_bytes()).expect("test RSA key");
        let rs_token = sign(Algorithm::RS256, &rsa, &claims);
        let rs = verifier(&with_key(TokenAlgorithm::RS256, TEST_RSA_PUBLIC));
        assert_eq!(rs.verify(&rs_token).expect("RS256 verifies").user, "42");
        let pkcs1 = verifier(&with_key(TokenAlgorithm::RS256, TEST_RSA_PUBLIC_PKCS1));
        assert_eq!(pkcs1.verify(&rs_token).expect("PKCS#1 form verifies").user, "42");

        let ec = EncodingKey::from_ec_pem(TEST_EC_PRIVATE.as_bytes()).expect("test EC key");
        let es_token = sign(Algorithm::ES256, &ec, &claims);
        let es = verifier(&with_key(TokenAlgorithm::ES256, TEST_EC_PUBLIC));
        assert_eq!(es.verify(&es_token).expect("ES256 verifies").user, "42");

        // Each pinned algorithm refuses the other's tokens.
        assert_invalid(rs.verify(&es_token), "algorithm");
        assert_invalid(es.verify(&rs_token), "algorithm");
    }

    #[test]
    fn audience_and_issuer_are_required_when_configured() {
        let config =
            AuthConfig { audience: "herald".into(), issuer: "https://app".into(), ..hs(TokenAlgorithm::HS256) };
        let v = verifier(&config);
        let token = mint(&config, "42", Duration::from_secs(60), None).expect("mints");
        v.verify(&token).expect("minted tokens carry aud and iss");
        let exp = now() + 60;
        assert_invalid(v.verify(&hs256(&json!({"sub": "4", "exp": exp, "iss": "https://app"}))), "`aud`");
        assert_invalid(v.verify(&hs256(&json!({"sub": "4", "exp": exp, "aud": "herald"}))), "`iss`");
        let wrong_aud = json!({"sub": "4", "exp": exp, "aud": "other", "iss": "https://app"});
        assert_invalid(v.verify(&hs256(&wrong_aud)), "audience");
        let wrong_iss = json!({"sub": "4", "exp": exp, "aud": ["x", "herald"], "iss": "https://evil"});
        assert_invalid(v.verify(&hs256(&wrong_iss)), "issuer");
        // Not configured: not checked.
        verifier(&hs(TokenAlgorithm::HS256)).verify(&hs256(&wrong_aud)).expect("aud ignored");
    }

    #[test]
    fn config_checks() {
        let invalid_key = |config: AuthConfig| match config.validate() {
            Err(AuthError::BadKey { key, .. }) => key,
            other => panic!("expected BadKey, got {other:?}"),
        };
        AuthConfig::default().validate().expect("defaults are valid");
        assert!(Verifier::new(&AuthConfig::default()).expect("valid").is_none());
        with_key(TokenAlgorithm::RS256, TEST_RSA_PUBLIC).validate().expect("RSA key");
        with_key(TokenAlgorithm::ES256, TEST_EC_PUBLIC).validate().expect("EC key");

        let short = AuthConfig { secret: Secret::new("0123456789abcdef0123456789abcde"), ..AuthConfig::default() };
        assert_eq!(invalid_key(short), "auth.secret");
        let closed = AuthConfig { allow_anonymous: false, ..AuthConfig::default() };
        assert_eq!(invalid_key(closed), "auth.allow_anonymous");
        let secret_for_rsa = AuthConfig { secret: Secret::new(SECRET), ..with_key(TokenAlgorithm::RS256, "") };
        assert_eq!(invalid_key(secret_for_rsa), "auth.secret");
        let key_for_hmac = AuthConfig { public_key: TEST_RSA_PUBLIC.into(), ..hs(TokenAlgorithm::HS256) };
        assert_eq!(invalid_key(key_for_hmac), "auth.public_key");
        let long_leeway = AuthConfig { leeway: Duration::from_secs(3600), ..hs(TokenAlgorithm::HS256) };
        assert_eq!(invalid_key(long_leeway), "auth.leeway");
        for (alg, pem) in [
            (TokenAlgorithm::RS256, TEST_RSA_PRIVATE),
            (TokenAlgorithm::RS256, TEST_RSA_1024_PUBLIC),
            (TokenAlgorithm::RS256, TEST_EC_PUBLIC),
            (TokenAlgorithm::RS256, "not a key"),
            (TokenAlgorithm::ES256, TEST_EC_PRIVATE),
            (TokenAlgorithm::ES256, TEST_EC_P384_PUBLIC),
            (TokenAlgorithm::ES256, TEST_RSA_PUBLIC),
            (TokenAlgorithm::ES256, "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
        ] {
            assert_eq!(invalid_key(with_key(alg, pem)), "auth.public_key", "{alg} {pem}");
        }
    }

    #[test]
    fn mint_needs_a_secret() {
        let rs = with_key(TokenAlgorithm::RS256, TEST_RSA_PUBLIC);
        let err = mint(&rs, "42", Duration::from_secs(60), None).expect_err("no private key");
        assert!(matches!(err, AuthError::MintUnsupported(TokenAlgorithm::RS256)));
        assert!(err.to_string().contains("private key"), "{err}");
        let none = mint(&AuthConfig::default(), "42", Duration::from_secs(60), None);
        assert!(matches!(none, Err(AuthError::NotConfigured)));
        let empty_user = mint(&hs(TokenAlgorithm::HS256), "", Duration::from_secs(60), None);
        assert!(matches!(empty_user, Err(AuthError::Invalid(_))));
    }

    #[test]
    fn secrets_and_tokens_stay_out_of_debug_and_messages() {
        let config = hs(TokenAlgorithm::HS256);
        let debug = format!("{config:?} {:?}", verifier(&config));
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");

        let token = hs256(&json!({"sub": "42", "exp": now() + 60, "info": "sensitive-value"}));
        for bad in [token.clone(), format!("{token}x"), token.replace('.', ",")] {
            let err = verifier(&config).verify(&bad).expect_err("refused");
            let message = err.to_string();
            assert!(!message.contains(&bad) && !message.contains(SECRET), "{message}");
            assert!(!message.contains("sensitive-value"), "{message}");
            assert_eq!(err.code(), ErrorCode::Unauthorized);
        }
    }

    #[test]
    fn config_reads_from_toml() {
        let config: AuthConfig =
            toml::from_str("algorithm = \"ES256\"\nleeway = \"30s\"\naudience = \"herald\"\n").expect("parses");
        assert_eq!(config.algorithm, TokenAlgorithm::ES256);
        assert_eq!(config.leeway, Duration::from_secs(30));
        assert!(config.allow_anonymous);
        assert!(toml::from_str::<AuthConfig>("algorithm = \"none\"").is_err());
        assert!(toml::from_str::<AuthConfig>("algoritm = \"HS256\"").is_err());
        let defaults = serde_json::to_value(AuthConfig::default()).expect("serializes");
        assert_eq!(defaults["algorithm"], "HS256");
        assert_eq!(defaults["leeway"], "5s");
    }
}
