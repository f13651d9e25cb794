use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::json;

use super::*;

// Test-only keys, generated for these tests with openssl; they protect nothing.
const TEST_RSA_PRIVATE: &str = include_str!("../../tests/fixtures/test-only-rsa-2048-private.pem");
const TEST_RSA_PUBLIC: &str = include_str!("../../tests/fixtures/test-only-rsa-2048-public.pem");
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

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, AuthError>, what: &str) {
    match result {
        Err(AuthError::Invalid(_, message)) => assert!(message.contains(what), "{message:?} lacks {what:?}"),
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
    assert!(matches!(too_big, Err(AuthError::Invalid(..))), "{too_big:?}");
}

#[test]
fn alg_none_is_refused() {
    let header = b64(&json!({"alg": "none", "typ": "JWT"}));
    let payload = b64(&json!({"sub": "admin", "exp": now() + 600}));
    let token = format!("{header}.{payload}.");
    for config in [hs(TokenAlgorithm::HS256), with_key(TokenAlgorithm::RS256, TEST_RSA_PUBLIC)] {
        assert!(matches!(verifier(&config).verify(&token), Err(AuthError::Invalid(..))));
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
    let config = AuthConfig { audience: "herald".into(), issuer: "https://app".into(), ..hs(TokenAlgorithm::HS256) };
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

    let public_as_secret = AuthConfig { secret: Secret::new(TEST_RSA_PUBLIC), ..AuthConfig::default() };
    assert_eq!(invalid_key(public_as_secret), "auth.secret");
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
    assert!(matches!(empty_user, Err(AuthError::Invalid(..))));
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

/// A fresh key pair for `alg` (EC or Ed25519): (signing key, public PEM, public JWK).
fn generated_jwk(alg: TokenAlgorithm) -> (EncodingKey, String, Value) {
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let seed: [u8; 32] = rand::random();
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    match alg {
        TokenAlgorithm::ES256 => {
            let secret = p256::SecretKey::from_slice(&seed).expect("a random scalar is a key");
            let der = secret.to_pkcs8_der().expect("pkcs8");
            let public = secret.public_key();
            let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&public, false);
            let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64(&point.as_bytes()[1..33]), "y": b64(&point.as_bytes()[33..])});
            (EncodingKey::from_ec_der(der.as_bytes()), public.to_public_key_pem(Default::default()).expect("pem"), jwk)
        }
        TokenAlgorithm::ES384 => {
            let seed48: [u8; 48] = std::array::from_fn(|i| seed[i % 32] ^ (i as u8));
            let secret = p384::SecretKey::from_slice(&seed48).expect("a random scalar is a key");
            let der = secret.to_pkcs8_der().expect("pkcs8");
            let public = secret.public_key();
            let point = p384::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&public, false);
            let jwk = json!({"kty": "EC", "crv": "P-384", "x": b64(&point.as_bytes()[1..49]), "y": b64(&point.as_bytes()[49..])});
            (EncodingKey::from_ec_der(der.as_bytes()), public.to_public_key_pem(Default::default()).expect("pem"), jwk)
        }
        TokenAlgorithm::EdDSA => {
            let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
            let der = signing.to_pkcs8_der().expect("pkcs8");
            let public = signing.verifying_key();
            let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64(public.as_bytes())});
            (EncodingKey::from_ed_der(der.as_bytes()), public.to_public_key_pem(Default::default()).expect("pem"), jwk)
        }
        other => panic!("no generated keys for {other}"),
    }
}

fn generated(alg: TokenAlgorithm) -> (EncodingKey, String) {
    let (key, pem, _) = generated_jwk(alg);
    (key, pem)
}

#[test]
fn every_public_key_algorithm_verifies_and_refuses_the_others() {
    let claims = json!({"sub": "42", "exp": now() + 60});
    let rsa = EncodingKey::from_rsa_pem(TEST_RSA_PRIVATE.as_bytes()).expect("test RSA key");
    let mut cases: Vec<(TokenAlgorithm, EncodingKey, String)> = [
        TokenAlgorithm::RS256,
        TokenAlgorithm::RS384,
        TokenAlgorithm::RS512,
        TokenAlgorithm::PS256,
        TokenAlgorithm::PS384,
        TokenAlgorithm::PS512,
    ]
    .into_iter()
    .map(|alg| (alg, rsa.clone(), TEST_RSA_PUBLIC.to_owned()))
    .collect();
    for alg in [TokenAlgorithm::ES256, TokenAlgorithm::ES384, TokenAlgorithm::EdDSA] {
        let (key, public) = generated(alg);
        cases.push((alg, key, public));
    }
    let tokens: Vec<String> = cases.iter().map(|(alg, key, _)| sign(alg.jwt(), key, &claims)).collect();
    for (i, (alg, _, public)) in cases.iter().enumerate() {
        let v = verifier(&with_key(*alg, public));
        assert_eq!(v.verify(&tokens[i]).unwrap_or_else(|e| panic!("{alg}: {e}")).user, "42");
        for (_, other) in tokens.iter().enumerate().filter(|(j, _)| *j != i) {
            assert_invalid(v.verify(other), "algorithm");
        }
        // Algorithm confusion: the public key's PEM as an HMAC secret.
        let forged = sign(Algorithm::HS256, &EncodingKey::from_secret(public.as_bytes()), &claims);
        assert_invalid(v.verify(&forged), "algorithm");
    }
}

#[test]
fn keys_of_the_wrong_kind_or_curve_are_refused_at_start() {
    let (_, p256_public) = generated(TokenAlgorithm::ES256);
    let (_, p384_public) = generated(TokenAlgorithm::ES384);
    let (_, ed_public) = generated(TokenAlgorithm::EdDSA);
    for (alg, pem) in [
        (TokenAlgorithm::ES384, p256_public.as_str()),
        (TokenAlgorithm::ES256, p384_public.as_str()),
        (TokenAlgorithm::EdDSA, p256_public.as_str()),
        (TokenAlgorithm::EdDSA, TEST_RSA_PUBLIC),
        (TokenAlgorithm::PS256, ed_public.as_str()),
        (TokenAlgorithm::PS256, TEST_RSA_1024_PUBLIC),
    ] {
        match with_key(alg, pem).validate() {
            Err(AuthError::BadKey { key: "auth.public_key", .. }) => {}
            other => panic!("{alg} with {pem}: {other:?}"),
        }
    }
}

fn jwks_file(dir: &tempfile::TempDir, keys: &[Value]) -> std::path::PathBuf {
    let path = dir.path().join(format!("jwks-{}.json", rand::random::<u32>()));
    std::fs::write(&path, json!({ "keys": keys }).to_string()).expect("write");
    let target = dir.path().join("jwks.json");
    // A rename replaces the file at once, as deployment tools do.
    std::fs::rename(&path, &target).expect("rename");
    target
}

fn jwk(public: &Value, kid: &str) -> Value {
    let mut jwk = public.clone();
    jwk["kid"] = kid.into();
    jwk
}

fn signed_with_kid(alg: TokenAlgorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg.jwt());
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("signs")
}

#[test]
fn jwks_keys_are_selected_by_kid_and_reloaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, _, ja) = generated_jwk(TokenAlgorithm::ES256);
    let (b, _, jb) = generated_jwk(TokenAlgorithm::ES256);
    let (c, _, jc) = generated_jwk(TokenAlgorithm::ES256);
    let (ed, _, jed) = generated_jwk(TokenAlgorithm::EdDSA);
    let alg = TokenAlgorithm::ES256;
    let path = jwks_file(&dir, &[jwk(&ja, "a"), jwk(&jb, "b"), jwk(&jed, "ed")]);
    let config = AuthConfig { algorithm: alg, jwks_file: path.display().to_string(), ..AuthConfig::default() };
    config.validate().expect("valid JWKS");
    let v = verifier(&config);
    let claims = json!({"sub": "42", "exp": now() + 60});
    v.verify(&signed_with_kid(alg, &a, Some("a"), &claims)).expect("key a");
    v.verify(&signed_with_kid(alg, &b, Some("b"), &claims)).expect("key b");
    assert_invalid(v.verify(&signed_with_kid(alg, &a, Some("b"), &claims)), "signature");
    assert_invalid(v.verify(&signed_with_kid(alg, &c, Some("c"), &claims)), "`kid`");
    assert_invalid(v.verify(&signed_with_kid(alg, &a, None, &claims)), "`kid`");
    let ed_token = signed_with_kid(TokenAlgorithm::EdDSA, &ed, Some("ed"), &claims);
    assert_invalid(v.verify(&ed_token), "algorithm");

    // Rotation: c replaces a.
    jwks_file(&dir, &[jwk(&jb, "b"), jwk(&jc, "c")]);
    assert_eq!(v.reload().expect("reloads"), 2);
    v.verify(&signed_with_kid(alg, &c, Some("c"), &claims)).expect("key c after reload");
    assert_invalid(v.verify(&signed_with_kid(alg, &a, Some("a"), &claims)), "`kid`");

    // A bad file keeps the keys in use.
    std::fs::write(&path, "{\"keys\": [").expect("write");
    assert!(matches!(v.reload(), Err(AuthError::BadKey { key: "auth.jwks_file", .. })));
    v.verify(&signed_with_kid(alg, &c, Some("c"), &claims)).expect("still key c");
    jwks_file(&dir, &[jwk(&jed, "ed")]);
    assert!(v.reload().is_err(), "no usable key: refused");
    v.verify(&signed_with_kid(alg, &b, Some("b"), &claims)).expect("still key b");

    // A single key needs no kid.
    jwks_file(&dir, &[jwk(&ja, "a")]);
    v.reload().expect("one key");
    v.verify(&signed_with_kid(alg, &a, None, &claims)).expect("the only key");
}

#[tokio::test]
async fn a_changed_jwks_file_is_picked_up_by_the_watcher() {
    let dir = tempfile::tempdir().expect("tempdir");
    let alg = TokenAlgorithm::EdDSA;
    let (_, _, ja) = generated_jwk(alg);
    let (b, _, jb) = generated_jwk(alg);
    let path = jwks_file(&dir, &[jwk(&ja, "a")]);
    let config = AuthConfig {
        algorithm: alg,
        jwks_file: path.display().to_string(),
        jwks_check_interval: Duration::from_millis(50),
        ..AuthConfig::default()
    };
    let v = verifier(&config);
    v.watch();
    let claims = json!({"sub": "42", "exp": now() + 60});
    let with_b = signed_with_kid(alg, &b, Some("b"), &claims);
    assert!(v.verify(&with_b).is_err());
    jwks_file(&dir, &[jwk(&jb, "b")]);
    let mut tries = 0;
    while v.verify(&with_b).is_err() {
        tries += 1;
        assert!(tries < 200, "the watcher did not reload the file");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[test]
fn jwks_files_that_cannot_be_used_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let alg = TokenAlgorithm::ES256;
    let bad_key = |config: AuthConfig| match config.validate() {
        Err(AuthError::BadKey { key, message }) => (key, message),
        other => panic!("expected BadKey, got {other:?}"),
    };
    let config = |path: &std::path::Path| AuthConfig {
        algorithm: alg,
        jwks_file: path.display().to_string(),
        ..AuthConfig::default()
    };
    assert_eq!(bad_key(config(&dir.path().join("missing.json"))).0, "auth.jwks_file");
    let short_ed = json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "short"});
    let path = jwks_file(&dir, std::slice::from_ref(&short_ed));
    assert_eq!(bad_key(AuthConfig { algorithm: TokenAlgorithm::EdDSA, ..config(&path) }).0, "auth.jwks_file");
    let off_curve = json!({"kty": "EC", "crv": "P-256", "x": "AQ", "y": "AQ", "kid": "off"});
    let path = jwks_file(&dir, &[off_curve]);
    assert_eq!(bad_key(config(&path)).0, "auth.jwks_file");
    let (_, _, ja) = generated_jwk(alg);
    let both = AuthConfig { public_key: TEST_EC_PUBLIC.into(), ..config(&jwks_file(&dir, &[jwk(&ja, "a")])) };
    assert_eq!(bad_key(both).0, "auth.jwks_file");
}

#[test]
fn subscription_tokens_name_a_user_and_a_channel() {
    let config = hs(TokenAlgorithm::HS256);
    let v = verifier(&config);
    let token = mint_subscription(&config, "42", "private:room", Duration::from_secs(60), Some(json!({"a": 1})))
        .expect("mints");
    let claims = v.verify_subscription(&token).expect("verifies");
    assert_eq!((claims.user.as_str(), claims.channel.as_str()), ("42", "private:room"));
    assert_eq!(claims.info, Some(json!({"a": 1})));
    // Neither kind passes for the other.
    assert_invalid(v.verify(&token), "subscription token");
    let connection = mint(&config, "42", Duration::from_secs(60), None).expect("mints");
    assert_invalid(v.verify_subscription(&connection), "`channel`");
    assert_invalid(v.verify_subscription(&hs256(&json!({"sub": "4", "exp": now() + 9, "channel": 7}))), "`channel`");
    let expired = hs256(&json!({"sub": "4", "exp": now() - 60, "channel": "x"}));
    assert!(matches!(v.verify_subscription(&expired), Err(AuthError::Expired)));
}

#[test]
fn the_channels_claim_is_bounded() {
    let v = verifier(&hs(TokenAlgorithm::HS256));
    let many: Vec<String> = (0..=MAX_CLAIMED_CHANNELS).map(|i| format!("c{i}")).collect();
    assert_invalid(v.verify(&hs256(&json!({"sub": "4", "exp": now() + 9, "channels": many}))), "`channels`");
}

#[test]
fn minting_without_a_secret_says_how_to_set_one() {
    let message = mint(&AuthConfig::default(), "42", Duration::from_secs(60), None).expect_err("no secret").to_string();
    assert!(message.contains("HERALD_AUTH__SECRET=") && message.contains("herald token --user 42"), "{message}");
}

#[tokio::test]
async fn sighup_reloads_the_jwks_file_at_once() {
    use tokio::signal::unix::{signal, SignalKind};
    // Our own listener first: from now on SIGHUP cannot end the test process.
    let mut ours = signal(SignalKind::hangup()).expect("a SIGHUP listener");
    let dir = tempfile::tempdir().expect("tempdir");
    let alg = TokenAlgorithm::EdDSA;
    let (_, _, ja) = generated_jwk(alg);
    let (b, _, jb) = generated_jwk(alg);
    let path = jwks_file(&dir, &[jwk(&ja, "a")]);
    let config = AuthConfig {
        algorithm: alg,
        jwks_file: path.display().to_string(),
        // Polling alone would not see the change within this test.
        jwks_check_interval: Duration::from_secs(3600),
        ..AuthConfig::default()
    };
    let v = verifier(&config);
    v.watch();
    // Let the watcher start and register its own listener.
    tokio::time::sleep(Duration::from_millis(200)).await;
    jwks_file(&dir, &[jwk(&jb, "b")]);
    let with_b = signed_with_kid(alg, &b, Some("b"), &json!({"sub": "42", "exp": now() + 60}));
    assert!(v.verify(&with_b).is_err());
    let status =
        std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().expect("kill runs");
    assert!(status.success());
    ours.recv().await;
    let mut tries = 0;
    while v.verify(&with_b).is_err() {
        tries += 1;
        assert!(tries < 200, "SIGHUP did not reload the file");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[test]
fn each_refusal_says_its_reason() {
    let config = AuthConfig { audience: "herald".into(), issuer: "https://app".into(), ..hs(TokenAlgorithm::HS256) };
    let v = verifier(&config);
    let reason = |token: &str| v.verify(token).err().and_then(|e| e.refusal()).map(TokenRefusal::as_str);
    let (exp, good) = (now() + 60, json!({"aud": "herald", "iss": "https://app"}));
    let with = |extra: Value| {
        let mut claims = json!({"sub": "4", "exp": exp});
        for (k, val) in good.as_object().into_iter().flatten().chain(extra.as_object().into_iter().flatten()) {
            claims[k] = val.clone();
        }
        hs256(&claims)
    };
    assert_eq!(reason(&with(json!({"exp": now() - 60}))), Some("expired"));
    assert_eq!(reason(&with(json!({"nbf": now() + 600}))), Some("not_yet_valid"));
    assert_eq!(reason("not a token"), Some("malformed"));
    let other = EncodingKey::from_secret(b"another-secret-0123456789abcdef-0123456789");
    let forged =
        sign(Algorithm::HS256, &other, &json!({"sub": "4", "exp": exp, "aud": "herald", "iss": "https://app"}));
    assert_eq!(reason(&forged), Some("bad_signature"));
    let strong = mint(&hs(TokenAlgorithm::HS512), "4", Duration::from_secs(60), None).expect("mints");
    assert_eq!(reason(&strong), Some("algorithm"));
    assert_eq!(reason(&with(json!({"info": [1]}))), Some("claims"));
    assert_eq!(reason(&with(json!({"aud": "other"}))), Some("audience"));
    assert_eq!(reason(&with(json!({"iss": "https://evil"}))), Some("issuer"));
    assert_eq!(reason(&with(json!({}))), None, "a good token");
    // Every reason has its own label.
    let labels: std::collections::HashSet<_> = TokenRefusal::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(labels.len(), TokenRefusal::ALL.len());
}
