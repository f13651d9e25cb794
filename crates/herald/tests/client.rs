//! The Rust client against the real server: subscribe, receive in order, and come back from a
//! dropped connection with exactly the publications it missed.

mod common;

use std::time::Duration;

use common::*;
use herald::auth::AuthConfig;
use herald::config::Secret;
use herald::Config;
use herald_client::{Client, ClientOptions, Event};
use serde_json::json;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

async fn next_seq(sub: &mut herald_client::Subscription) -> (u64, u64) {
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("publication in time") {
        Some(Event::Publication(p)) => {
            let data: serde_json::Value = serde_json::from_str(p.data.get()).expect("json");
            (p.offset.expect("offset"), data["seq"].as_u64().expect("seq"))
        }
        other => panic!("expected a publication, got {other:?}"),
    }
}

#[tokio::test]
async fn the_client_reconnects_and_recovers_what_it_missed() {
    let mut c = Config::default();
    c.auth.secret = Secret::new(SECRET);
    let server = TestServer::start(c).await;
    let auth = AuthConfig { secret: Secret::new(SECRET), ..Default::default() };
    let token = herald::auth::mint(&auth, "42", Duration::from_secs(600), None).expect("mint");
    let options = ClientOptions::default().token(token).backoff(Duration::from_millis(50), Duration::from_millis(200));
    let client = Client::connect(server.ws_url("/connect"), options).await.expect("connect");
    let mut sub = client.subscribe("news").await.expect("subscribe");

    for seq in 1..=5 {
        api(server.addr, "publish", &json!({"channel": "news", "data": {"seq": seq}}).to_string(), None).await;
    }
    for seq in 1..=5 {
        assert_eq!(next_seq(&mut sub).await, (seq, seq));
    }
    // The server drops the connection with a code that asks the client to come back.
    let (_, body) = api(server.addr, "disconnect", r#"{"user":"42","code":4000,"reason":"test"}"#, None).await;
    assert_eq!(body["connections"], 1);
    for seq in 6..=12 {
        api(server.addr, "publish", &json!({"channel": "news", "data": {"seq": seq}}).to_string(), None).await;
    }
    // Recovered 6..12, then live 13: contiguous, no duplicates.
    for seq in 6..=12 {
        assert_eq!(next_seq(&mut sub).await, (seq, seq));
    }
    api(server.addr, "publish", r#"{"channel":"news","data":{"seq":13}}"#, None).await;
    assert_eq!(next_seq(&mut sub).await, (13, 13));

    let r = client.publish("news", &json!({"seq": 14})).await;
    assert!(r.is_err(), "client publish is off in the default namespace");
    client.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn clients_of_a_drained_node_come_back_after_their_hint_not_at_once() {
    let mut c = Config::default();
    c.auth.secret = Secret::new(SECRET);
    c.drain_spread = Duration::from_secs(1);
    let server = TestServer::start(c.clone()).await;
    let addr = server.addr;
    let auth = AuthConfig { secret: Secret::new(SECRET), ..Default::default() };
    let token = herald::auth::mint(&auth, "42", Duration::from_secs(600), None).expect("mint");
    // A backoff of at most 5 ms: a client that ignored the hint would be back at once.
    let options = ClientOptions::default().token(token).backoff(Duration::from_millis(1), Duration::from_millis(5));
    let mut clients = Vec::new();
    for _ in 0..10 {
        let client = Client::connect(server.ws_url("/connect"), options.clone()).await.expect("connect");
        let sub = client.subscribe("news").await.expect("subscribe");
        clients.push((client, sub));
    }
    let stopping = tokio::spawn(server.shutdown());
    // The next node on the same address, once the first stopped listening.
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let next = tokio::spawn(herald::server::run(c, listener, async {
        let _ = rx.await;
    }));
    let watches = clients.iter_mut().map(|(client, sub)| async move {
        let mut state = client.state();
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|s| matches!(s, herald_client::State::Connecting)),
        )
        .await
        .expect("closed in time")
        .expect("state");
        let lost = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), state.wait_for(herald_client::State::is_connected))
            .await
            .expect("back in time")
            .expect("state");
        let away = lost.elapsed();
        // The memory engine's history went with the first node: the client is told so.
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("a reset in time") {
            Some(Event::Reset { epoch_changed, .. }) => assert!(epoch_changed),
            other => panic!("expected a reset, got {other:?}"),
        }
        away
    });
    let aways = futures_util::future::join_all(watches).await;
    stopping.await.expect("stopped");
    // Hints are uniform in [0, 1 s]: P(hint < 100 ms) = 1/10 per client.
    let waited = aways.iter().filter(|d| **d >= Duration::from_millis(100)).count();
    assert!(waited >= 5, "most clients waited their hint: {aways:?}");
    let _ = tx.send(());
    next.await.expect("task").expect("next node ok");
}
