//! Tokens: the JWT a client sends in `connect` (who the user is) and in `subscribe` (that it
//! may read one channel), checked with the one algorithm the configuration pins, so a token
//! never chooses how it is verified. `keys` loads and checks the keys (PEM or a JWKS file that
//! is reloaded); `mint` makes HMAC tokens for development (`herald token`).

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use herald_protocol::ErrorCode;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::secret::Secret;

mod keys;

use keys::Keys;

/// Shortest HMAC secret accepted: RFC 7518 §3.2 asks for a key at least as long as the hash
/// output, and shorter secrets can be brute-forced offline from any one token.
pub const MIN_SECRET_LEN: usize = 32;

/// Largest `info` claim, serialized: it is copied into every presence answer and join push.
pub const MAX_INFO_SIZE: usize = 4096;

/// Largest `leeway`: leeway lengthens the life of every token, including stolen ones.
pub const MAX_LEEWAY: Duration = Duration::from_secs(600);

/// Most channels a connection token's `channels` claim may name.
pub const MAX_CLAIMED_CHANNELS: usize = 128;

/// Tokens (`[auth]`): the JWT a client may send in its `connect` command (its `sub` claim is
/// the user id; `exp` is required), and subscription tokens for namespaces whose `subscribe`
/// rule is `"token"`. Both are checked with the same algorithm and keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The one signature algorithm tokens must use: `HS256`, `HS384` or `HS512` (a secret
    /// shared with your backend, `secret`); `RS256`, `RS384`, `RS512`, `PS256`, `PS384`,
    /// `PS512` (RSA), `ES256` (EC P-256), `ES384` (EC P-384) or `EdDSA` (Ed25519): your backend
    /// signs with its private key, Herald checks with `public_key` or the keys of `jwks_file`.
    /// A token whose header names any other algorithm, `none` included, is refused.
    pub algorithm: TokenAlgorithm,
    /// The shared secret for `HS256`, `HS384` and `HS512`, at least 32 bytes (for example the
    /// output of `openssl rand -base64 48`). When no key is set at all, Herald accepts no
    /// tokens. Prefer setting it through `HERALD_AUTH__SECRET` rather than in a file.
    #[schemars(with = "String")]
    pub secret: Secret,
    /// The PEM public key (`-----BEGIN PUBLIC KEY-----`) for the RSA (2048 to 4096 bits), EC
    /// and EdDSA algorithms, from `openssl pkey -pubout`. Never the private key. Set either this
    /// or `jwks_file`.
    pub public_key: String,
    /// A JSON Web Key Set file (`{"keys":[...]}`, as identity providers publish at
    /// `/.well-known/jwks.json`): a token's `kid` header selects its key; a token without `kid`
    /// is accepted only when the set holds one key. Keys of another type or with another `alg`
    /// are skipped. The file is read again when it changes (checked every
    /// `jwks_check_interval`) and on SIGHUP; a file that does not load keeps the previous keys
    /// and logs why. Set either this or `public_key` (or `secret`).
    pub jwks_file: String,
    /// How often to check `jwks_file` for changes.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub jwks_check_interval: Duration,
    /// When set, a token must name this audience in its `aud` claim. When empty, `aud` is not
    /// checked.
    pub audience: String,
    /// When set, a token's `iss` claim must be exactly this. When empty, `iss` is not checked.
    pub issuer: String,
    /// Clock difference tolerated when checking `exp` and `nbf`, in whole seconds; at most
    /// 10 minutes. A connection (or a subscription made with a token) ends at `exp` plus this.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub leeway: Duration,
    /// Whether a client may connect without a token. When false, a key must be configured, or
    /// no client could connect.
    pub allow_anonymous: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithm: TokenAlgorithm::default(),
            secret: Secret::default(),
            public_key: String::new(),
            jwks_file: String::new(),
            jwks_check_interval: Duration::from_secs(5),
            audience: String::new(),
            issuer: String::new(),
            leeway: Duration::from_secs(5),
            allow_anonymous: true,
        }
    }
}

impl AuthConfig {
    /// Checks what types alone cannot express: the key fits the algorithm, the secret is long
    /// enough, the public key (or every usable key of the JWKS file) parses, and the section as
    /// a whole lets someone connect.
    pub fn validate(&self) -> Result<(), AuthError> {
        let verifier = Verifier::new(self)?;
        if verifier.is_none() && !self.allow_anonymous {
            return Err(bad_config(
                "auth.allow_anonymous",
                "is false, but none of `auth.secret`, `auth.public_key`, `auth.jwks_file` is set: no client could connect",
            ));
        }
        if self.jwks_check_interval.is_zero() {
            return Err(bad_config("auth.jwks_check_interval", "must be greater than zero"));
        }
        Ok(())
    }
}

/// The signature algorithm of tokens.
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
    /// RSA PKCS#1 v1.5 with SHA-384.
    RS384,
    /// RSA PKCS#1 v1.5 with SHA-512.
    RS512,
    /// RSA-PSS with SHA-256.
    PS256,
    /// RSA-PSS with SHA-384.
    PS384,
    /// RSA-PSS with SHA-512.
    PS512,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
}

impl TokenAlgorithm {
    /// Every algorithm, for documentation and tests.
    pub const ALL: [TokenAlgorithm; 12] = [
        Self::HS256,
        Self::HS384,
        Self::HS512,
        Self::RS256,
        Self::RS384,
        Self::RS512,
        Self::PS256,
        Self::PS384,
        Self::PS512,
        Self::ES256,
        Self::ES384,
        Self::EdDSA,
    ];

    /// Whether tokens are checked with the shared secret rather than a public key.
    pub fn is_hmac(self) -> bool {
        self.family() == AlgorithmFamily::Hmac
    }

    fn family(self) -> AlgorithmFamily {
        self.jwt().family()
    }

    fn jwt(self) -> Algorithm {
        match self {
            Self::HS256 => Algorithm::HS256,
            Self::HS384 => Algorithm::HS384,
            Self::HS512 => Algorithm::HS512,
            Self::RS256 => Algorithm::RS256,
            Self::RS384 => Algorithm::RS384,
            Self::RS512 => Algorithm::RS512,
            Self::PS256 => Algorithm::PS256,
            Self::PS384 => Algorithm::PS384,
            Self::PS512 => Algorithm::PS512,
            Self::ES256 => Algorithm::ES256,
            Self::ES384 => Algorithm::ES384,
            Self::EdDSA => Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for TokenAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What a valid connection token says about the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user id (`sub`), never empty.
    pub user: String,
    /// When the token expires (`exp`), in Unix seconds.
    pub expires_at: u64,
    /// Free-form data about the client (`info`, a JSON object), shown to others in presence.
    pub info: Option<Value>,
    /// Channels the connection is subscribed to by the server on `connect` (`channels`).
    pub channels: Vec<String>,
}

/// What a valid subscription token says: `user` may read `channel` until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionClaims {
    /// The user id (`sub`); must be the connection's user.
    pub user: String,
    /// The channel (`channel`); must be the channel subscribed to.
    pub channel: String,
    /// When the subscription ends (`exp`), in Unix seconds.
    pub expires_at: u64,
    /// Free-form data (`info`, a JSON object) for this subscription's presence.
    pub info: Option<Value>,
}

/// Why a token was refused, or why the `[auth]` section cannot be used. Messages never contain
/// the token or the secret, so they may be logged and sent to the client.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Past its `exp` (plus the leeway): the client should get a new token.
    #[error("token expired")]
    Expired,
    /// Malformed, badly signed, of the wrong algorithm, or with unacceptable claims.
    #[error("invalid token: {1}")]
    Invalid(TokenRefusal, String),
    /// No key is configured, so no token can be checked or minted.
    #[error(
        "no `auth.secret` is configured to sign with; set one, the same for the server, e.g. \
         `HERALD_AUTH__SECRET=\"$(openssl rand -base64 48)\" herald token --user 42`"
    )]
    NotConfigured,
    /// A value in `[auth]` is unusable; `key` is its dotted name.
    #[error("invalid value for `{key}`: {message}")]
    BadKey { key: &'static str, message: String },
    /// `mint` only signs with a shared secret.
    #[error("minting {0} tokens needs the private key, which Herald never holds: sign them in your backend")]
    MintUnsupported(TokenAlgorithm),
}

impl AuthError {
    /// The protocol error code for a refused `connect`, `refresh`, or subscription token.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Unauthorized
    }

    /// Why a token was refused (for the metric and the log); `None` for a configuration error.
    pub fn refusal(&self) -> Option<TokenRefusal> {
        match self {
            Self::Expired => Some(TokenRefusal::Expired),
            Self::Invalid(reason, _) => Some(*reason),
            Self::NotConfigured | Self::BadKey { .. } | Self::MintUnsupported(_) => None,
        }
    }
}

/// Why a token was refused: the `reason` label of `herald_token_refusals_total` and the
/// `reason` field of the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Past its `exp` (plus `auth.leeway`).
    Expired,
    /// Its `nbf` is in the future.
    NotYetValid,
    /// Not a JWT at all (not three base64 parts of JSON).
    Malformed,
    /// The signature does not match the key.
    BadSignature,
    /// Signed with another algorithm than `auth.algorithm`.
    Algorithm,
    /// A claim missing or of the wrong form (`sub`, `exp`, `info`, `channels`, `channel`), or
    /// a connection token used as a subscription token or the other way round.
    Claims,
    /// `aud` is not `auth.audience`.
    Audience,
    /// `iss` is not `auth.issuer`.
    Issuer,
    /// Its `kid` names no key of the JWKS file (or it has none and the file has several).
    UnknownKey,
    /// No token where one is required.
    Missing,
    /// A token given to a server without `auth.secret`, `auth.public_key` or `auth.jwks_file`.
    NoKey,
    /// A valid token for another user than the connection's (refresh, subscription token).
    WrongUser,
    /// A valid subscription token for another channel.
    WrongChannel,
}

impl TokenRefusal {
    /// Every reason, for registering the metric's labels at 0.
    pub const ALL: [Self; 13] = [
        Self::Expired,
        Self::NotYetValid,
        Self::Malformed,
        Self::BadSignature,
        Self::Algorithm,
        Self::Claims,
        Self::Audience,
        Self::Issuer,
        Self::UnknownKey,
        Self::Missing,
        Self::NoKey,
        Self::WrongUser,
        Self::WrongChannel,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Algorithm => "algorithm",
            Self::Claims => "claims",
            Self::Audience => "audience",
            Self::Issuer => "issuer",
            Self::UnknownKey => "unknown_key",
            Self::Missing => "missing",
            Self::NoKey => "no_key",
            Self::WrongUser => "wrong_user",
            Self::WrongChannel => "wrong_channel",
        }
    }

    /// Counts one refused token in `herald_token_refusals_total`.
    pub fn count(self) {
        metrics::counter!("herald_token_refusals_total", "reason" => self.as_str()).increment(1);
    }
}

fn bad_config(key: &'static str, message: impl Into<String>) -> AuthError {
    AuthError::BadKey { key, message: message.into() }
}

/// A token refused for its claims.
fn invalid(message: impl Into<String>) -> AuthError {
    AuthError::Invalid(TokenRefusal::Claims, message.into())
}

/// A token refused for `reason`.
fn refused(reason: TokenRefusal, message: impl Into<String>) -> AuthError {
    AuthError::Invalid(reason, message.into())
}

/// Checks tokens; built once from the configuration, shared by every session. With a JWKS
/// file its keys can change under it (see [`Verifier::watch`]).
pub struct Verifier {
    algorithm: TokenAlgorithm,
    keys: Arc<RwLock<Arc<Keys>>>,
    jwks: Option<(PathBuf, Duration)>,
    validation: Validation,
}

impl fmt::Debug for Verifier {
    // Written by hand so the key can never reach a log, whatever the dependency prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

impl Verifier {
    /// The verifier for `config`, or `None` when no secret, public key or JWKS file is set.
    pub fn new(config: &AuthConfig) -> Result<Option<Self>, AuthError> {
        if config.leeway > MAX_LEEWAY {
            return Err(bad_config("auth.leeway", "must be at most 10m"));
        }
        let Some(keys) = keys::from_config(config)? else { return Ok(None) };

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
        let jwks = (!config.jwks_file.trim().is_empty())
            .then(|| (PathBuf::from(&config.jwks_file), config.jwks_check_interval));
        Ok(Some(Self { algorithm: config.algorithm, keys: Arc::new(RwLock::new(Arc::new(keys))), jwks, validation }))
    }

    /// The pinned algorithm.
    pub fn algorithm(&self) -> TokenAlgorithm {
        self.algorithm
    }

    /// With a JWKS file: starts a task that reloads it when it changes or on SIGHUP, for as
    /// long as this verifier lives. Does nothing without a JWKS file or outside a runtime.
    pub fn watch(&self) {
        let Some((path, every)) = self.jwks.clone() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(keys::watch(path, every, self.algorithm, Arc::downgrade(&self.keys)));
    }

    /// Reads the JWKS file again now; on failure the previous keys stay. Returns how many keys
    /// are in use.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let Some((path, _)) = &self.jwks else { return Ok(1) };
        let set = keys::load_jwks(path, self.algorithm).map_err(|m| bad_config("auth.jwks_file", m))?;
        let n = set.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        Ok(n)
    }

    /// Checks a connection token's signature and claims, and returns what it says about the
    /// client. A subscription token (one with a `channel` claim) is refused here.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let mut payload = self.decode(token)?;
        if payload.contains_key("channel") {
            return Err(invalid("a subscription token (with a `channel` claim) is not a connection token"));
        }
        let (user, expires_at, info) = common_claims(&mut payload)?;
        let channels = match payload.remove("channels") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) if items.len() <= MAX_CLAIMED_CHANNELS => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s),
                    _ => Err(invalid("`channels` claim must be a list of channel names")),
                })
                .collect::<Result<_, _>>()?,
            Some(Value::Array(_)) => {
                return Err(invalid(format!("`channels` claim names more than {MAX_CLAIMED_CHANNELS} channels")))
            }
            Some(_) => return Err(invalid("`channels` claim must be a list of channel names")),
        };
        Ok(Claims { user, expires_at, info, channels })
    }

    /// Checks a subscription token: signed like connection tokens, with `sub`, `channel` and
    /// `exp`. The caller compares `user` and `channel` with the connection and the request.
    pub fn verify_subscription(&self, token: &str) -> Result<SubscriptionClaims, AuthError> {
        let mut payload = self.decode(token)?;
        let channel = match payload.remove("channel") {
            Some(Value::String(s)) if !s.is_empty() => s,
            None => return Err(invalid("a connection token is not a subscription token (no `channel` claim)")),
            Some(_) => return Err(invalid("`channel` claim must be a non-empty string")),
        };
        let (user, expires_at, info) = common_claims(&mut payload)?;
        Ok(SubscriptionClaims { user, channel, expires_at, info })
    }

    /// The checked payload of a token.
    fn decode(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(refusal)?;
        if header.alg != self.algorithm.jwt() {
            return Err(refused(TokenRefusal::Algorithm, "algorithm not accepted"));
        }
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let key = keys.select(header.kid.as_deref())?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation).map_err(refusal)?;
        Ok(data.claims)
    }
}

/// A generic reason for a jsonwebtoken error. Its own messages can quote claim values, so
/// none of them is passed on.
fn refusal(e: jsonwebtoken::errors::Error) -> AuthError {
    use TokenRefusal as R;
    let (reason, why) = match e.kind() {
        ErrorKind::ExpiredSignature => return AuthError::Expired,
        ErrorKind::ImmatureSignature => (R::NotYetValid, "not valid yet (`nbf` is in the future)".to_owned()),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
            (R::Algorithm, "algorithm not accepted".to_owned())
        }
        ErrorKind::InvalidSignature => (R::BadSignature, "bad signature".to_owned()),
        // The claim names come from our own list, not from the token.
        ErrorKind::MissingRequiredClaim(claim) => (R::Claims, format!("missing or malformed `{claim}` claim")),
        ErrorKind::InvalidClaimFormat(claim) => (R::Claims, format!("malformed `{claim}` claim")),
        ErrorKind::InvalidIssuer => (R::Issuer, "issuer not accepted".to_owned()),
        ErrorKind::InvalidAudience => (R::Audience, "audience not accepted".to_owned()),
        _ => (R::Malformed, "malformed token".to_owned()),
    };
    AuthError::Invalid(reason, why)
}

/// `sub`, `exp` and `info` from a payload whose signature, `exp`, `nbf`, `aud` and `iss` are
/// checked.
fn common_claims(payload: &mut Map<String, Value>) -> Result<(String, u64, Option<Value>), AuthError> {
    let user = match payload.remove("sub") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        _ => return Err(invalid("`sub` claim (the user id) must be a non-empty string")),
    };
    let expires_at =
        payload.get("exp").and_then(numeric_date).ok_or_else(|| invalid("missing or malformed `exp` claim"))?;
    let info = check_info(payload.remove("info"))?;
    Ok((user, expires_at, info))
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

/// A connection token for `user`, valid for `ttl`, signed with the configured secret: for
/// development (`herald token`). It carries the configured `aud` and `iss`, so the same
/// configuration accepts it. Only HMAC algorithms: Herald never holds a private key.
pub fn mint(config: &AuthConfig, user: &str, ttl: Duration, info: Option<Value>) -> Result<String, AuthError> {
    mint_claims(config, user, ttl, info, Map::new())
}

/// A subscription token for `user` on `channel`, valid for `ttl` (`herald token --channel`).
pub fn mint_subscription(
    config: &AuthConfig,
    user: &str,
    channel: &str,
    ttl: Duration,
    info: Option<Value>,
) -> Result<String, AuthError> {
    if channel.is_empty() {
        return Err(invalid("`channel` claim must be a non-empty string"));
    }
    let mut extra = Map::new();
    extra.insert("channel".into(), channel.into());
    mint_claims(config, user, ttl, info, extra)
}

fn mint_claims(
    config: &AuthConfig,
    user: &str,
    ttl: Duration,
    info: Option<Value>,
    mut claims: Map<String, Value>,
) -> Result<String, AuthError> {
    let alg = config.algorithm;
    if !alg.is_hmac() {
        return Err(AuthError::MintUnsupported(alg));
    }
    if config.secret.is_empty() {
        return Err(AuthError::NotConfigured);
    }
    keys::check_secret(&config.secret)?;
    if user.trim().is_empty() {
        return Err(invalid("`sub` claim (the user id) must be a non-empty string"));
    }
    let now = jsonwebtoken::get_current_timestamp();
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
mod tests;
