//! Tokens over real sockets: every way a connection token can be bad, expiry at `exp` +
//! leeway, per-namespace rules, subscription tokens (allow, expire, refresh), and the
//! `channels` claim.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use herald::auth::{AuthConfig, TokenAlgorithm};
use herald::channel::{Access, Rule};
use herald::config::{NamespaceOptions, Secret};
use herald::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";
// Test-only RSA keys (RSA key generation is slow in debug builds); they protect nothing.
const TEST_RSA_PRIVATE: &str = include_str!("fixtures/test-only-rsa-2048-private.pem");
const TEST_RSA_PUBLIC: &str = include_str!("fixtures/test-only-rsa-2048-public.pem");

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs_auth() -> AuthConfig {
    AuthConfig { secret: Secret::new(SECRET), ..Default::default() }
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("signs")
}

fn hs256(claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET.as_bytes()), claims)
}

fn token(user: &str, ttl: u64) -> String {
    herald::auth::mint(&hs_auth(), user, Duration::from_secs(ttl), None).expect("mint")
}

fn sub_token(user: &str, channel: &str, ttl: u64) -> String {
    herald::auth::mint_subscription(&hs_auth(), user, channel, Duration::from_secs(ttl), None).expect("mint")
}

async fn as_user(addr: std::net::SocketAddr, token: &str) -> Native {
    let mut c = Native::open(addr).await;
    let r = c.request("connect", json!({ "token": token })).await;
    assert!(r.get("connect").is_some(), "connected: {r}");
    c
}

/// Waits for the server's close frame and returns its code.
async fn close_code(c: &mut Native, limit: Duration) -> u16 {
    loop {
        match tokio::time::timeout(limit, c.ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
            Some(Ok(Message::Text(t))) if t.as_str() == "{}" => {
                use futures_util::SinkExt;
                let _ = c.ws.send(Message::text("{}")).await;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn bad_connection_tokens_are_refused_with_101() {
    let auth = AuthConfig {
        algorithm: TokenAlgorithm::RS256,
        public_key: TEST_RSA_PUBLIC.into(),
        audience: "herald".into(),
        issuer: "https://app.example".into(),
        leeway: Duration::from_secs(5),
        ..Default::default()
    };
    let c = Config { auth, ..Default::default() };
    let server = TestServer::start(c).await;
    let rsa = EncodingKey::from_rsa_pem(TEST_RSA_PRIVATE.as_bytes()).expect("test key");
    let good = json!({"sub": "42", "exp": now() + 600, "aud": "herald", "iss": "https://app.example"});
    let with = |patch: Value| {
        let mut claims = good.clone();
        for (k, v) in patch.as_object().expect("object") {
            claims[k] = v.clone();
        }
        claims
    };
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let valid = sign(Algorithm::RS256, &rsa, &good);
    let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
    parts[1] = b64(&with(json!({"sub": "admin"})));
    let tampered = parts.join(".");
    let (ec_key, _) = {
        use p256::pkcs8::EncodePrivateKey;
        let secret = p256::SecretKey::from_slice(&rand::random::<[u8; 32]>()).expect("key");
        (EncodingKey::from_ec_der(secret.to_pkcs8_der().expect("der").as_bytes()), ())
    };
    let cases = [
        ("tampered payload", tampered),
        ("expired beyond the leeway", sign(Algorithm::RS256, &rsa, &with(json!({"exp": now() - 60})))),
        ("not valid yet", sign(Algorithm::RS256, &rsa, &with(json!({"nbf": now() + 300})))),
        ("wrong audience", sign(Algorithm::RS256, &rsa, &with(json!({"aud": "other"})))),
        ("wrong issuer", sign(Algorithm::RS256, &rsa, &with(json!({"iss": "https://evil.example"})))),
        (
            "no audience",
            sign(Algorithm::RS256, &rsa, &json!({"sub": "42", "exp": now() + 600, "iss": "https://app.example"})),
        ),
        ("alg none", format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&good))),
        ("another algorithm (RS512)", sign(Algorithm::RS512, &rsa, &good)),
        ("another algorithm (ES256)", sign(Algorithm::ES256, &ec_key, &good)),
        (
            "the RSA public key as an HMAC secret",
            sign(Algorithm::HS256, &EncodingKey::from_secret(TEST_RSA_PUBLIC.as_bytes()), &good),
        ),
        ("a subscription token", sign(Algorithm::RS256, &rsa, &with(json!({"channel": "news"})))),
        ("not a JWT", "not.a.jwt".to_owned()),
    ];
    let mut conn = Native::open(server.addr).await;
    for (what, bad) in cases {
        let r = conn.request("connect", json!({ "token": bad })).await;
        assert_eq!(r["error"]["code"], 101, "{what}: {r}");
        let message = r["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.contains(&bad), "{what}: the token is not echoed");
    }
    let r = conn.request("connect", json!({ "token": valid })).await;
    assert!(r.get("connect").is_some(), "the valid token still works on the same connection: {r}");
    server.shutdown().await;
}

#[tokio::test]
async fn an_expired_connection_token_ends_the_connection_at_exp_plus_leeway_not_at_the_next_ping() {
    let mut c = Config { auth: AuthConfig { leeway: Duration::from_secs(1), ..hs_auth() }, ..Default::default() };
    // Far beyond the expiry: only the session's own timer can close in time.
    c.websocket.ping_interval = Duration::from_secs(120);
    let leeway = c.auth.leeway.as_secs();
    let server = TestServer::start(c).await;
    let minted = now();
    let mut expiring = as_user(server.addr, &token("42", 2)).await;
    let mut refreshed = as_user(server.addr, &token("42", 2)).await;
    let r = expiring.request("subscribe", json!({"channel": "news"})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    // A refresh with a later expiry moves the timer.
    let r = refreshed.request("refresh", json!({"token": token("42", 6)})).await;
    let expires = r["refresh"]["expires"].as_u64().expect("refreshed");
    assert!(expires >= now() + 5, "{r}");

    let started = std::time::Instant::now();
    assert_eq!(close_code(&mut expiring, Duration::from_secs(30)).await, 4005);
    // Bounds, not speed: not before exp + leeway, and well before the 120 s ping could have
    // noticed.
    assert!(now() >= minted + 2 + leeway, "closed before exp + leeway");
    assert!(started.elapsed() < Duration::from_secs(60), "closed by the timer, not by a ping");
    eprintln!("closed {:?} after connecting, token exp = connect + 2 s, leeway 1 s", started.elapsed());
    let r = refreshed.request("subscribe", json!({"channel": "news"})).await;
    assert!(r.get("subscribe").is_some(), "the refreshed connection is still open: {r}");
    assert_eq!(close_code(&mut refreshed, Duration::from_secs(30)).await, 4005, "then its new expiry ends it too");
    server.shutdown().await;
}

fn rules_config() -> Config {
    let mut c = Config { auth: hs_auth(), ..Default::default() };
    let ns = |subscribe: Rule, publish: Rule, history: Rule, presence: Rule| NamespaceOptions {
        subscribe,
        publish,
        history_access: history,
        presence: true,
        presence_access: presence,
        ..Default::default()
    };
    let (any, members, token) = (Access::Anonymous.into(), Access::Authenticated.into(), Access::Token.into());
    c.channels.namespaces.insert("open".into(), ns(true.into(), any, true.into(), true.into()));
    c.channels.namespaces.insert("members".into(), ns(members, members, members, members));
    c.channels.namespaces.insert("private".into(), ns(token, token, true.into(), true.into()));
    c.channels.namespaces.insert("closed".into(), ns(Access::None.into(), false.into(), false.into(), false.into()));
    c
}

async fn code(c: &mut Native, command: &str, body: Value) -> Value {
    let r = c.request(command, body).await;
    match r.get("error") {
        Some(e) => e["code"].clone(),
        None => json!("ok"),
    }
}

#[tokio::test]
async fn each_namespace_rule_allows_what_it_should_and_refuses_the_rest() {
    let server = TestServer::start(rules_config()).await;
    let mut anon = Native::connected(server.addr).await;
    let mut user = as_user(server.addr, &token("42", 600)).await;
    let data = json!({"x": 1});
    // (client, command, channel, expected) — "ok" or the error code.
    let ch = |c: &str| json!({ "channel": c });
    let publish = |c: &str| json!({ "channel": c, "data": data.clone() });
    for (who, command, body, want) in [
        ("anon", "subscribe", ch("open:a"), json!("ok")),
        ("anon", "publish", publish("open:a"), json!("ok")),
        ("anon", "history", ch("open:a"), json!("ok")),
        ("anon", "presence", ch("open:a"), json!("ok")),
        ("anon", "subscribe", ch("members:a"), json!(103)),
        ("anon", "publish", publish("members:a"), json!(103)),
        ("anon", "history", ch("members:a"), json!(103)),
        ("anon", "presence_stats", ch("members:a"), json!(103)),
        ("anon", "subscribe", ch("private:a"), json!(119)),
        ("anon", "publish", publish("private:a"), json!(119)),
        ("anon", "history", ch("private:a"), json!(119)),
        ("anon", "subscribe", ch("closed:a"), json!(103)),
        ("user", "subscribe", ch("members:a"), json!("ok")),
        ("user", "publish", publish("members:a"), json!("ok")),
        ("user", "history", ch("members:a"), json!("ok")),
        ("user", "presence", ch("members:a"), json!("ok")),
        ("user", "subscribe", ch("private:a"), json!(119)),
        ("user", "publish", publish("private:a"), json!(119)),
        ("user", "presence", ch("private:a"), json!(119)),
        ("user", "publish", publish("closed:a"), json!(103)),
        ("user", "history", ch("closed:a"), json!(103)),
        ("user", "subscribe", ch("open:room#7"), json!(103)),
        ("user", "subscribe", json!({"channel": "private:a", "token": sub_token("7", "private:a", 60)}), json!(101)),
        ("user", "subscribe", json!({"channel": "private:a", "token": sub_token("42", "private:b", 60)}), json!(101)),
        ("user", "subscribe", json!({"channel": "private:a", "token": token("42", 60)}), json!(101)),
        ("user", "subscribe", json!({"channel": "private:a", "token": sub_token("42", "private:a", 60)}), json!("ok")),
        ("user", "publish", publish("private:a"), json!("ok")),
        ("user", "history", ch("private:a"), json!("ok")),
        ("user", "presence", ch("private:a"), json!("ok")),
        ("user", "subscribe", json!({"channel": "closed:a", "token": sub_token("42", "closed:a", 60)}), json!(103)),
        ("anon", "subscribe", json!({"channel": "private:a", "token": sub_token("42", "private:a", 60)}), json!(101)),
    ] {
        let c = if who == "anon" { &mut anon } else { &mut user };
        assert_eq!(code(c, command, body.clone()).await, want, "{who} {command} {body}");
    }
    // The raw transports are anonymous: only namespaces open to anyone.
    // A WebSocket is accepted and closed with 4506 and the reason (a browser shows no HTTP
    // error); a plain GET still gets the 403.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws/members:a", server.addr)).await.expect("ws");
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("in time") {
            Some(Ok(Message::Close(Some(f)))) => break f,
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 4506, "{close:?}");
    assert!(close.reason.contains("members:a"), "{close:?}");
    let (status, body) = http(server.addr, "GET /ws/members:a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!((status, body["error"]["code"].as_u64()), (403, Some(103)));
    let (status, body) = http(server.addr, "GET /sse/private:a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!((status, body["error"]["code"].as_u64()), (403, Some(103)));
    // The API can always publish.
    let (status, body) = api(server.addr, "publish", r#"{"channel":"closed:a","data":1}"#, None).await;
    assert_eq!(status, 200, "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscription_ends_when_its_token_expires_unless_refreshed() {
    let mut c = rules_config();
    c.auth.leeway = Duration::from_secs(1);
    c.websocket.ping_interval = Duration::from_secs(120);
    let server = TestServer::start(c).await;
    let mut lapsing = as_user(server.addr, &token("42", 600)).await;
    let mut renewed = as_user(server.addr, &token("42", 600)).await;
    for n in [&mut lapsing, &mut renewed] {
        let r = n.request("subscribe", json!({"channel": "private:a", "token": sub_token("42", "private:a", 2)})).await;
        assert!(r["subscribe"]["expires"].as_u64().is_some(), "the reply says when it ends: {r}");
    }
    let r = renewed
        .request("sub_refresh", json!({"channel": "private:b", "token": sub_token("42", "private:b", 60)}))
        .await;
    assert_eq!(r["error"]["code"], 118, "not subscribed: {r}");
    let r =
        renewed.request("sub_refresh", json!({"channel": "private:a", "token": sub_token("7", "private:a", 60)})).await;
    assert_eq!(r["error"]["code"], 101, "another user's token: {r}");
    let r = renewed
        .request("sub_refresh", json!({"channel": "private:a", "token": sub_token("42", "private:a", 600)}))
        .await;
    assert!(r["sub_refresh"]["expires"].as_u64().is_some_and(|e| e >= now() + 590), "{r}");

    let push = tokio::time::timeout(Duration::from_secs(30), lapsing.push()).await.expect("push in time");
    assert_eq!(push["push"]["channel"], "private:a", "{push}");
    assert_eq!(push["push"]["unsubscribe"]["code"], 117, "{push}");
    // The connection stays; the subscription is gone, and with it the rights it gave.
    assert_eq!(code(&mut lapsing, "publish", json!({"channel": "private:a", "data": 1})).await, json!(119));
    let (status, _) = api(server.addr, "publish", r#"{"channel":"private:a","data":"after"}"#, None).await;
    assert_eq!(status, 200);
    let got = renewed.push().await;
    assert_eq!(got["push"]["pub"]["data"], "after", "the refreshed subscription still receives: {got}");
    // Nothing for the lapsed one: its next frame is the reply to this request.
    let r = lapsing.request("presence_stats", json!({"channel": "open:a"})).await;
    assert!(r.get("presence_stats").is_some() && lapsing.pushes.is_empty(), "{r} {:?}", lapsing.pushes);
    server.shutdown().await;
}

#[tokio::test]
async fn the_channels_claim_subscribes_the_connection_on_connect() {
    let server = TestServer::start(rules_config()).await;
    let claims = |channels: Value| json!({"sub": "42", "exp": now() + 600, "channels": channels});
    let mut c = Native::open(server.addr).await;
    let r = c.request("connect", json!({"token": hs256(&claims(json!(["closed:feed", "open:inbox#42"])))})).await;
    assert_eq!(r["connect"]["subscriptions"], json!(["closed:feed", "open:inbox#42"]), "{r}");
    let mut announced = Vec::new();
    for _ in 0..2 {
        let p = c.push().await;
        assert!(p["push"]["subscribe"]["epoch"].is_string(), "{p}");
        announced.push(p["push"]["channel"].as_str().unwrap_or_default().to_owned());
    }
    announced.sort();
    assert_eq!(announced, ["closed:feed", "open:inbox#42"]);
    // Server-side subscriptions receive like any other, even where clients may not subscribe.
    let (status, _) = api(server.addr, "publish", r#"{"channel":"closed:feed","data":"hello"}"#, None).await;
    assert_eq!(status, 200);
    let p = c.push().await;
    assert_eq!(
        (p["push"]["channel"].clone(), p["push"]["pub"]["data"].clone()),
        (json!("closed:feed"), json!("hello"))
    );
    assert_eq!(
        code(&mut c, "subscribe", json!({"channel": "closed:feed"})).await,
        json!(103),
        "the client itself may not"
    );

    for bad in [json!(["open:inbox#7"]), json!(["nope:x"]), json!("news"), json!([1])] {
        let mut c = Native::open(server.addr).await;
        let r = c.request("connect", json!({"token": hs256(&claims(bad.clone()))})).await;
        assert_eq!(r["error"]["code"], 101, "{bad}: {r}");
    }
    server.shutdown().await;
}

/// A fresh Ed25519 key: (signing key, public JWK with `kid`).
fn ed25519(kid: &str) -> (EncodingKey, Value) {
    use base64::Engine;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let signing = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let der = signing.to_pkcs8_der().expect("pkcs8");
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signing.verifying_key().as_bytes());
    (EncodingKey::from_ed_der(der.as_bytes()), json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": x}))
}

fn write_jwks(path: &std::path::Path, keys: &[&Value]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "keys": keys }).to_string()).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test]
async fn a_rotated_jwks_file_is_used_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    let (old_key, old_jwk) = ed25519("2026-old");
    let (new_key, new_jwk) = ed25519("2026-new");
    write_jwks(&path, &[&old_jwk]);
    let auth = AuthConfig {
        algorithm: TokenAlgorithm::EdDSA,
        jwks_file: path.display().to_string(),
        jwks_check_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let server = TestServer::start(Config { auth, ..Default::default() }).await;
    let signed = |key: &EncodingKey, kid: &str| {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &json!({"sub": "42", "exp": now() + 600}), key).expect("signs")
    };
    let try_connect = |token: String| async move {
        let mut c = Native::open(server.addr).await;
        c.request("connect", json!({ "token": token })).await
    };
    assert!(try_connect(signed(&old_key, "2026-old")).await.get("connect").is_some());
    assert_eq!(try_connect(signed(&new_key, "2026-new")).await["error"]["code"], 101, "not published yet");

    write_jwks(&path, &[&new_jwk]);
    let mut tries = 0;
    while try_connect(signed(&new_key, "2026-new")).await.get("connect").is_none() {
        tries += 1;
        assert!(tries < 100, "the new key was never picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(try_connect(signed(&old_key, "2026-old")).await["error"]["code"], 101, "the old key is gone");
    // A broken file keeps the keys in use.
    std::fs::write(&path, "{\"keys\":").expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(try_connect(signed(&new_key, "2026-new")).await.get("connect").is_some(), "still the new key");
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscription_tokens_info_is_this_connections_presence_on_that_channel() {
    let server = TestServer::start(rules_config()).await;
    let connection = herald::auth::mint(&hs_auth(), "42", Duration::from_secs(600), Some(json!({"name": "Ada"})));
    let mut c = as_user(server.addr, &connection.expect("mint")).await;
    let seat = json!({"seat": 3});
    let token =
        herald::auth::mint_subscription(&hs_auth(), "42", "private:a", Duration::from_secs(60), Some(seat.clone()));
    let r = c.request("subscribe", json!({"channel": "private:a", "token": token.expect("mint")})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    let r = c.request("subscribe", json!({"channel": "members:a"})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    let infos = |r: &Value, ch: &str| -> Vec<Value> {
        let clients = r["presence"]["clients"].as_object().unwrap_or_else(|| panic!("{ch}: {r}"));
        clients.values().map(|e| e["info"].clone()).collect()
    };
    let r = c.request("presence", json!({"channel": "private:a"})).await;
    assert_eq!(infos(&r, "private:a"), [seat]);
    let r = c.request("presence", json!({"channel": "members:a"})).await;
    assert_eq!(infos(&r, "members:a"), [json!({"name": "Ada"})]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_token_with_a_far_future_exp_connects_and_subscribes_like_any_other() {
    let server = TestServer::start(rules_config()).await;
    // Correctly signed, so only the numbers are hostile: the largest NumericDate a JSON
    // integer can carry, and a huge `iat`.
    for exp in [json!(u64::MAX), json!(1u64 << 40), json!(1.8e19)] {
        let connection = hs256(&json!({"sub": "42", "exp": exp, "iat": u64::MAX}));
        let mut c = as_user(server.addr, &connection).await;
        let r = c.request("subscribe", json!({"channel": "open:a"})).await;
        assert!(r.get("subscribe").is_some(), "exp {exp}: {r}");
        let sub = hs256(&json!({"sub": "42", "channel": "private:a", "exp": exp}));
        let r = c.request("subscribe", json!({"channel": "private:a", "token": sub})).await;
        assert!(r["subscribe"]["expires"].as_u64().is_some(), "exp {exp}: {r}");
        let r = c.request("refresh", json!({"token": connection})).await;
        assert!(r["refresh"]["expires"].as_u64().is_some(), "exp {exp}: {r}");
        // The session is alive after arming its timers: it still answers.
        let r = c.request("presence_stats", json!({"channel": "open:a"})).await;
        assert!(r.get("presence_stats").is_some(), "exp {exp}: {r}");
    }
    server.shutdown().await;
}
