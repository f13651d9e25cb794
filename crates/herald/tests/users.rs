//! Who the user is: connection tokens, user-limited channels, presence with several tabs of
//! one user, join/leave pushes, and the API acting on a user's connections.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use herald::auth::AuthConfig;
use herald::config::{NamespaceOptions, Secret};
use herald::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

fn config() -> Config {
    let mut c = Config::default();
    c.auth.secret = Secret::new(SECRET);
    c.channels.namespaces.insert(
        "room".into(),
        NamespaceOptions { publish: true.into(), presence: true, join_leave: true, ..Default::default() },
    );
    c
}

fn token(user: &str) -> String {
    let auth = AuthConfig { secret: Secret::new(SECRET), ..Default::default() };
    herald::auth::mint(&auth, user, Duration::from_secs(600), Some(json!({"name": format!("user {user}")})))
        .expect("mint")
}

async fn as_user(addr: std::net::SocketAddr, user: &str) -> (Native, String) {
    let mut c = Native::open(addr).await;
    let r = c.request("connect", json!({"token": token(user)})).await;
    let client = r["connect"]["client"].as_str().unwrap_or_else(|| panic!("connected: {r}")).to_owned();
    (c, client)
}

#[tokio::test]
async fn tokens_are_verified_and_bad_ones_refused() {
    let server = TestServer::start(config()).await;
    let mut c = Native::open(server.addr).await;
    let other = AuthConfig { secret: Secret::new("another-secret-that-is-long-enough!!"), ..Default::default() };
    let forged = herald::auth::mint(&other, "42", Duration::from_secs(60), None).expect("mint");
    for bad in [forged, "not.a.jwt".to_owned(), format!("{}x", token("42"))] {
        let r = c.request("connect", json!({"token": bad})).await;
        assert_eq!(r["error"]["code"], 101, "{r}");
    }
    let r = c.request("connect", json!({"token": token("42")})).await;
    assert!(r.get("connect").is_some(), "{r}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_user_channel_admits_only_its_users() {
    let server = TestServer::start(config()).await;
    let (mut ada, _) = as_user(server.addr, "42").await;
    let (mut bob, _) = as_user(server.addr, "7").await;
    let mut anon = Native::connected(server.addr).await;
    let r = ada.request("subscribe", json!({"channel": "notifications#42"})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    for (c, who) in [(&mut bob, "another user"), (&mut anon, "anonymous")] {
        let r = c.request("subscribe", json!({"channel": "notifications#42"})).await;
        assert_eq!(r["error"]["code"], 103, "{who}: {r}");
    }
    api(server.addr, "publish", r#"{"channel":"notifications#42","data":{"n":1}}"#, None).await;
    assert_eq!(ada.push().await["push"]["pub"]["data"]["n"], 1);
    server.shutdown().await;
}

#[tokio::test]
async fn presence_counts_a_user_with_three_tabs_once_and_join_leave_follow_users() {
    let server = TestServer::start(config()).await;
    let (mut watcher, _) = as_user(server.addr, "1").await;
    watcher.request("subscribe", json!({"channel": "room:a"})).await;
    let own = watcher.push().await;
    assert_eq!(own["push"]["join"]["user"], "1", "a joiner sees its own join: {own}");
    let mut tabs = Vec::new();
    for _ in 0..3 {
        let (mut tab, client) = as_user(server.addr, "42").await;
        tab.request("subscribe", json!({"channel": "room:a"})).await;
        tabs.push((tab, client));
    }
    // One join for user 42, not three.
    let join = watcher.push().await;
    assert_eq!(join["push"]["join"]["user"], "42", "{join}");
    let (_, stats) = api(server.addr, "presence_stats", r#"{"channel":"room:a"}"#, None).await;
    assert_eq!(stats, json!({"clients": 4, "users": 2}));
    let r = watcher.request("presence", json!({"channel": "room:a"})).await;
    let clients = r["presence"]["clients"].as_object().expect("clients");
    assert_eq!(clients.len(), 4, "{r}");
    let tab_client = &tabs[0].1;
    assert_eq!(clients[tab_client]["user"], "42");
    assert_eq!(clients[tab_client]["info"]["name"], "user 42", "token info attached");

    // Two tabs close: no leave yet. The last one closes: one leave.
    for (tab, _) in tabs.drain(..2) {
        drop(tab);
    }
    let (mut last, _) = tabs.pop().expect("one tab");
    let r = last.request("presence_stats", json!({"channel": "room:a"})).await;
    let mut users = r["presence_stats"]["users"].clone();
    for _ in 0..100 {
        let r = last.request("presence_stats", json!({"channel": "room:a"})).await;
        users = r["presence_stats"]["clients"].clone();
        if users == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(users, 2, "two tabs gone");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watcher.ws.next()).await.is_err(),
        "no leave while a tab remains"
    );
    last.request("unsubscribe", json!({"channel": "room:a"})).await;
    let leave = watcher.push().await;
    assert_eq!(leave["push"]["leave"]["user"], "42", "{leave}");
    server.shutdown().await;
}

#[tokio::test]
async fn api_disconnect_closes_every_connection_of_the_user() {
    let server = TestServer::start(config()).await;
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(as_user(server.addr, "42").await.0);
    }
    let (mut other, _) = as_user(server.addr, "7").await;
    let (status, body) = api(server.addr, "disconnect", r#"{"user":"42"}"#, None).await;
    assert_eq!((status, body["connections"].as_u64()), (200, Some(3)), "{body}");
    for mut c in mine {
        match tokio::time::timeout(Duration::from_secs(5), c.ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 4503),
            other => panic!("expected 4503, got {other:?}"),
        }
    }
    let r = other.request("subscribe", json!({"channel": "news"})).await;
    assert!(r.get("subscribe").is_some(), "others unaffected: {r}");
    let (status, _) = api(server.addr, "disconnect", r#"{"user":"42","code":1000}"#, None).await;
    assert_eq!(status, 400, "only 4000-4999");
    server.shutdown().await;
}

#[tokio::test]
async fn api_unsubscribe_history_and_presence() {
    let server = TestServer::start(config()).await;
    let (mut c, _) = as_user(server.addr, "42").await;
    c.request("subscribe", json!({"channel": "room:b"})).await;
    assert!(c.push().await["push"].get("join").is_some(), "its own join first");
    for i in 1..=3 {
        api(server.addr, "publish", &json!({"channel": "room:b", "data": i}).to_string(), None).await;
    }
    for _ in 0..3 {
        c.push().await;
    }
    let (_, h) = api(server.addr, "history", r#"{"channel":"room:b","limit":2,"reverse":true}"#, None).await;
    let offsets: Vec<Value> = h["publications"].as_array().expect("list").iter().map(|p| p["offset"].clone()).collect();
    assert_eq!(offsets, [json!(3), json!(2)], "{h}");
    let (_, p) = api(server.addr, "presence", r#"{"channel":"room:b"}"#, None).await;
    assert_eq!(p["clients"].as_object().map(|o| o.len()), Some(1), "{p}");
    let (status, body) = api(server.addr, "presence", r#"{"channel":"news"}"#, None).await;
    assert_eq!((status, body["error"]["code"].as_u64()), (409, Some(109)));

    let (_, body) = api(server.addr, "unsubscribe", r#"{"user":"42","channel":"room:b"}"#, None).await;
    assert_eq!(body["connections"], 1);
    let push = c.push().await;
    assert_eq!(push, json!({"push": {"channel": "room:b", "unsubscribe": {}}}));
    api(server.addr, "publish", r#"{"channel":"room:b","data":4}"#, None).await;
    assert!(tokio::time::timeout(Duration::from_millis(300), c.ws.next()).await.is_err(), "no longer subscribed");
    let r = c.request("subscribe", json!({"channel": "room:b"})).await;
    assert!(r.get("subscribe").is_some(), "may subscribe again: {r}");
    server.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_closes_the_connection_unless_refreshed() {
    let mut c = config();
    c.websocket.ping_interval = Duration::from_millis(200);
    c.auth.leeway = Duration::ZERO;
    let server = TestServer::start(c).await;
    let auth = AuthConfig { secret: Secret::new(SECRET), ..Default::default() };
    let short = |user: &str| herald::auth::mint(&auth, user, Duration::from_secs(2), None).expect("mint");
    let (mut expiring, mut refreshed) = (Native::open(server.addr).await, Native::open(server.addr).await);
    for n in [&mut expiring, &mut refreshed] {
        let r = n.request("connect", json!({"token": short("42")})).await;
        assert!(r.get("connect").is_some(), "{r}");
    }
    let r = refreshed.request("refresh", json!({"token": token("42")})).await;
    assert!(r["refresh"]["expires"].as_u64().is_some(), "{r}");
    let r = refreshed.request("refresh", json!({"token": token("7")})).await;
    assert_eq!(r["error"]["code"], 101, "another user's token: {r}");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), expiring.ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 4005);
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected 4005, got {other:?}"),
        }
    }
    let r = refreshed.request("subscribe", json!({"channel": "news"})).await;
    assert!(r.get("subscribe").is_some(), "the refreshed connection stays: {r}");
    server.shutdown().await;
}
