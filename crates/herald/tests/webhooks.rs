//! Lifecycle webhooks as a receiver sees them: a real HTTP server on 127.0.0.1 that checks
//! signatures, fails on purpose, goes away and comes back, or holds requests to fill the queue.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use herald::auth::AuthConfig;
use herald::config::{NamespaceOptions, Secret};
use herald::webhooks::{EndpointConfig, EventName, WebhookFormat};
use herald::Config;
use hmac::{Hmac, Mac};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";
const HOOK_SECRET: &str = "webhook-signing-secret";

/// One request as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    headers: http::HeaderMap,
    body: Bytes,
    /// The status the receiver answered.
    status: u16,
}

/// What a receiver saw and how it behaves; survives a restart of its server.
#[derive(Default)]
struct Log {
    requests: Mutex<Vec<Received>>,
    /// Answer 500 to this many more requests.
    fail_next: AtomicUsize,
    /// Answer 500 to every other request (the 1st, 3rd, ...).
    fail_odd: AtomicBool,
    /// Hold each request until this turns false.
    hold: AtomicBool,
    released: Notify,
    /// Requests that started (held or not).
    started: AtomicUsize,
}

impl Log {
    fn accepted(&self) -> Vec<Received> {
        self.requests.lock().expect("log").iter().filter(|r| r.status == 200).cloned().collect()
    }

    /// Every event of every accepted request, in arrival order.
    fn events(&self) -> Vec<Value> {
        self.accepted()
            .iter()
            .flat_map(|r| {
                let v: Value = serde_json::from_slice(&r.body).expect("JSON body");
                v["events"].as_array().expect("events").clone()
            })
            .collect()
    }

    /// Events of accepted requests with duplicates (same id) removed, first copy kept.
    fn unique_events(&self) -> Vec<Value> {
        let mut seen = HashSet::new();
        self.events().into_iter().filter(|e| seen.insert(e["id"].as_str().unwrap_or_default().to_owned())).collect()
    }

    fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.released.notify_waiters();
    }
}

/// A webhook receiver: plain hyper on 127.0.0.1. Stopping it closes its listener and every
/// connection it had, like a process that exits.
struct Receiver {
    addr: SocketAddr,
    log: Arc<Log>,
    task: JoinHandle<()>,
}

impl Receiver {
    async fn start(log: Arc<Log>, port: u16) -> Self {
        Self::serve(log, port, None).await
    }

    /// A receiver that speaks HTTPS with `acceptor`.
    async fn serve(log: Arc<Log>, port: u16, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                let mut connections = JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let (log, tls) = (log.clone(), tls.clone());
                    connections.spawn(async move {
                        let service = service_fn(move |req| answer(log.clone(), req));
                        let http = hyper::server::conn::http1::Builder::new();
                        match tls {
                            None => {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                            Some(tls) => {
                                let Ok(stream) = tls.accept(stream).await else { return };
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    });
                }
            }
        });
        Self { addr, log, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    async fn stop(self) -> Arc<Log> {
        self.task.abort();
        let _ = self.task.await;
        self.log
    }
}

async fn answer(
    log: Arc<Log>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<axum::body::Body>, std::convert::Infallible> {
    let n = log.started.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(axum::body::Body::new(body), 1 << 20).await.unwrap_or_default();
    loop {
        let released = log.released.notified();
        if !log.hold.load(Ordering::SeqCst) {
            break;
        }
        released.await;
    }
    let fail = log.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1)).is_ok()
        || (log.fail_odd.load(Ordering::SeqCst) && n % 2 == 0);
    let status = if fail { 500 } else { 200 };
    log.requests.lock().expect("log").push(Received { headers: parts.headers, body, status });
    Ok(http::Response::builder()
        .status(status)
        .body(axum::body::Body::from(Bytes::from_static(b"{}")))
        .expect("response"))
}

fn endpoint(url: String) -> EndpointConfig {
    EndpointConfig { url, secret: Secret::new(HOOK_SECRET), ..Default::default() }
}

fn config(endpoints: Vec<EndpointConfig>) -> Config {
    let mut c = Config::default();
    c.auth.secret = Secret::new(SECRET);
    c.channels.namespaces.insert(
        "room".into(),
        NamespaceOptions { publish: true.into(), presence: true, join_leave: true, ..Default::default() },
    );
    c.webhooks.endpoints = endpoints;
    c.webhooks.batch_delay = Duration::from_millis(5);
    c.webhooks.retry_initial = Duration::from_millis(20);
    c.webhooks.retry_max = Duration::from_millis(200);
    c.webhooks.shutdown_timeout = Duration::from_secs(2);
    c
}

fn token(user: &str) -> String {
    let auth = AuthConfig { secret: Secret::new(SECRET), ..Default::default() };
    herald::auth::mint(&auth, user, Duration::from_secs(600), None).expect("mint")
}

/// A connected native client of `user`; returns it and its client id.
async fn as_user(addr: SocketAddr, user: &str) -> (Native, String) {
    let mut c = Native::open(addr).await;
    let r = c.request("connect", json!({"token": token(user)})).await;
    let client = r["connect"]["client"].as_str().unwrap_or_else(|| panic!("connected: {r}")).to_owned();
    (c, client)
}

async fn subscribe(c: &mut Native, channel: &str) {
    let r = c.request("subscribe", json!({"channel": channel})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
}

async fn close(mut c: Native) {
    let _ = c.ws.close(None).await;
}

/// Waits (up to 20 s) until `done` holds for the receiver's log.
async fn until(log: &Log, what: &str, done: impl Fn(&Log) -> bool) {
    for _ in 0..1000 {
        if done(log) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}; accepted events: {:#?}", log.events());
}

fn names(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| e["name"].as_str().unwrap_or("?").to_owned()).collect()
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of a counter on the server's `/metrics` (0 when not yet recorded).
async fn counter(addr: SocketAddr, series: &str) -> u64 {
    let (_, mut s) = raw_request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0, |v| v.trim().parse::<f64>().expect("a number") as u64)
}

/// The sequence number of a Herald event id `<node>-<seq>`.
fn seq(event: &Value) -> u64 {
    let id = event["id"].as_str().expect("id");
    id.rsplit_once('-').and_then(|(_, n)| n.parse().ok()).expect("<node>-<seq>")
}

#[tokio::test]
async fn events_arrive_signed_in_herald_and_pusher_formats() {
    let herald_log = Arc::new(Log::default());
    let pusher_log = Arc::new(Log::default());
    let herald_rx = Receiver::start(herald_log.clone(), 0).await;
    let pusher_rx = Receiver::start(pusher_log.clone(), 0).await;
    let pusher = EndpointConfig {
        url: pusher_rx.url(),
        format: WebhookFormat::Pusher,
        key: "app-key".into(),
        secret: Secret::new("pusher-app-secret"),
        ..Default::default()
    };
    let server = TestServer::start(config(vec![endpoint(herald_rx.url()), pusher])).await;

    let (mut c, client) = as_user(server.addr, "42").await;
    subscribe(&mut c, "room:lobby").await;
    let r = c.request("unsubscribe", json!({"channel": "room:lobby"})).await;
    assert!(r.get("unsubscribe").is_some(), "{r}");
    close(c).await;

    let expected = ["connect", "channel_occupied", "member_added", "channel_vacated", "member_removed", "disconnect"];
    until(&herald_log, "every Herald event", |l| l.unique_events().len() >= expected.len()).await;
    until(&pusher_log, "every Pusher event", |l| l.events().len() >= 4).await;

    for r in herald_log.accepted() {
        let sig = r.headers.get("x-herald-signature").expect("signed").to_str().expect("ascii");
        assert_eq!(sig, format!("sha256={}", hmac_hex(HOOK_SECRET, &r.body)));
        assert_eq!(r.headers.get("content-type").map(|v| v.as_bytes()), Some(&b"application/json"[..]));
    }
    let events = herald_log.unique_events();
    assert_eq!(names(&events), expected);
    assert_eq!(events[0]["user"], "42");
    assert_eq!(events[0]["client"], client.as_str());
    assert_eq!(events[0]["transport"], "native");
    assert_eq!(events[1]["channel"], "room:lobby");
    assert_eq!(events[2]["user"], "42");
    assert_eq!(events[5]["client"], client.as_str());
    assert!(events.iter().all(|e| e["time_ms"].as_u64().is_some_and(|t| t > 1_600_000_000_000)), "{events:?}");
    let seqs: Vec<u64> = events.iter().map(seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "ids grow: {seqs:?}");

    for r in pusher_log.accepted() {
        assert_eq!(r.headers.get("x-pusher-key").map(|v| v.as_bytes()), Some(&b"app-key"[..]));
        let sig = r.headers.get("x-pusher-signature").expect("signed").to_str().expect("ascii");
        assert_eq!(sig, hmac_hex("pusher-app-secret", &r.body));
        let body: Value = serde_json::from_slice(&r.body).expect("json");
        assert!(body["time_ms"].as_u64().is_some(), "{body}");
    }
    let events = pusher_log.events();
    assert_eq!(names(&events), ["channel_occupied", "member_added", "channel_vacated", "member_removed"]);
    assert_eq!(events[1], json!({"name": "member_added", "channel": "room:lobby", "user_id": "42"}));
    assert_eq!(events[0], json!({"name": "channel_occupied", "channel": "room:lobby"}));

    server.shutdown().await;
    herald_rx.stop().await;
    pusher_rx.stop().await;
}

#[tokio::test]
async fn refused_requests_are_retried_until_accepted() {
    let log = Arc::new(Log::default());
    log.fail_next.store(3, Ordering::SeqCst);
    let rx = Receiver::start(log.clone(), 0).await;
    let mut hook = endpoint(rx.url());
    hook.events = vec![EventName::Connect];
    let server = TestServer::start(config(vec![hook])).await;

    let (_c, client) = as_user(server.addr, "42").await;
    until(&log, "the connect event", |l| !l.events().is_empty()).await;

    let all = log.requests.lock().expect("log").clone();
    assert_eq!(all.iter().map(|r| r.status).collect::<Vec<_>>(), [500, 500, 500, 200]);
    // The same batch each time: same body, same signature.
    assert!(all.windows(2).all(|w| w[0].body == w[1].body), "a retry resends the batch as it was");
    let events = log.events();
    assert_eq!(events.len(), 1);
    assert_eq!((events[0]["name"].as_str(), events[0]["client"].as_str()), (Some("connect"), Some(client.as_str())));
    assert!(counter(server.addr, "herald_webhook_requests_total{result=\"status\"}").await >= 3);
    server.shutdown().await;
    rx.stop().await;
}

#[tokio::test]
async fn no_event_is_lost_across_a_receiver_restart() {
    let log = Arc::new(Log::default());
    let rx = Receiver::start(log.clone(), 0).await;
    let port = rx.addr.port();
    let mut hook = endpoint(rx.url());
    hook.events = vec![EventName::Connect];
    let server = TestServer::start(config(vec![hook])).await;

    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (c, id) = as_user(server.addr, "42").await;
        clients.push(c);
        ids.push(id);
    }
    until(&log, "the first three", |l| l.unique_events().len() == 3).await;

    let log = rx.stop().await;
    let network_failures = counter(server.addr, "herald_webhook_requests_total{result=\"network\"}").await;
    for _ in 0..5 {
        let (c, id) = as_user(server.addr, "42").await;
        clients.push(c);
        ids.push(id);
    }
    // The endpoint is down: attempts fail, and the events wait.
    for _ in 0..500 {
        if counter(server.addr, "herald_webhook_requests_total{result=\"network\"}").await > network_failures + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(counter(server.addr, "herald_webhook_requests_total{result=\"network\"}").await > network_failures + 1);
    assert_eq!(log.unique_events().len(), 3, "nothing accepted while the receiver is down");

    let rx = Receiver::start(log.clone(), port).await;
    until(&log, "all eight", |l| l.unique_events().len() == 8).await;
    let events = log.unique_events();
    let got: Vec<&str> = events.iter().map(|e| e["client"].as_str().unwrap_or("?")).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>(), "every connect, in order");
    server.shutdown().await;
    rx.stop().await;
}

#[tokio::test]
async fn a_full_queue_drops_the_oldest_events_and_counts_them() {
    let log = Arc::new(Log::default());
    log.hold.store(true, Ordering::SeqCst);
    let rx = Receiver::start(log.clone(), 0).await;
    let mut hook = endpoint(rx.url());
    hook.events = vec![EventName::Connect];
    let mut c = config(vec![hook]);
    c.webhooks.queue_size = 5;
    c.webhooks.batch_size = 1;
    let server = TestServer::start(c).await;
    let dropped = r#"herald_webhook_dropped_total{reason="queue_full"}"#;
    let before = counter(server.addr, dropped).await;

    // The first event is being sent (the receiver holds it): the next ones wait in the queue.
    let (first, first_id) = as_user(server.addr, "42").await;
    until(&log, "the first request", |l| l.started.load(Ordering::SeqCst) == 1).await;
    let mut clients = vec![first];
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (c, id) = as_user(server.addr, "42").await;
        clients.push(c);
        ids.push(id);
    }
    assert_eq!(counter(server.addr, dropped).await - before, 15, "20 queued, room for 5");

    log.release();
    until(&log, "the six kept", |l| l.unique_events().len() == 6).await;
    let events = log.unique_events();
    let got: Vec<&str> = events.iter().map(|e| e["client"].as_str().unwrap_or("?")).collect();
    let mut want = vec![first_id.as_str()];
    want.extend(ids[15..].iter().map(String::as_str));
    assert_eq!(got, want, "the oldest waiting were dropped, the newest kept");
    server.shutdown().await;
    rx.stop().await;
}

#[tokio::test]
async fn events_arrive_in_order_through_failures_and_batches() {
    let log = Arc::new(Log::default());
    log.fail_odd.store(true, Ordering::SeqCst);
    let rx = Receiver::start(log.clone(), 0).await;
    let mut hook = endpoint(rx.url());
    hook.events = vec![EventName::Connect];
    let mut c = config(vec![hook]);
    c.webhooks.batch_size = 3;
    let server = TestServer::start(c).await;

    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..30 {
        let (c, id) = as_user(server.addr, "42").await;
        clients.push(c);
        ids.push(id);
    }
    until(&log, "thirty connects", |l| l.unique_events().len() == 30).await;
    // Every accepted request carried at most three events, each batch after the one before.
    let mut last = 0;
    for r in log.accepted() {
        let body: Value = serde_json::from_slice(&r.body).expect("json");
        let events = body["events"].as_array().expect("events");
        assert!((1..=3).contains(&events.len()), "{body}");
        for e in events {
            assert_eq!(seq(e), last + 1, "consecutive, never reordered: {body}");
            last = seq(e);
        }
    }
    let events = log.unique_events();
    let got: Vec<&str> = events.iter().map(|e| e["client"].as_str().unwrap_or("?")).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
    let refused = log.requests.lock().expect("log").iter().filter(|r| r.status == 500).count();
    assert!(refused >= log.accepted().len() - 1, "every other request was refused and retried");
    server.shutdown().await;
    rx.stop().await;
}

#[tokio::test]
async fn two_tabs_of_one_user_make_one_member_added_and_one_member_removed() {
    let log = Arc::new(Log::default());
    let rx = Receiver::start(log.clone(), 0).await;
    let mut hook = endpoint(rx.url());
    hook.events = vec![EventName::MemberAdded, EventName::MemberRemoved];
    let server = TestServer::start(config(vec![hook])).await;

    let (mut tab1, tab1_id) = as_user(server.addr, "42").await;
    let (mut tab2, _) = as_user(server.addr, "42").await;
    subscribe(&mut tab1, "room:lobby").await;
    subscribe(&mut tab2, "room:lobby").await;
    close(tab1).await;
    // Wait until the server has removed the first tab's presence.
    for _ in 0..500 {
        let (_, r) = api(server.addr, "presence", r#"{"channel":"room:lobby"}"#, None).await;
        if r["clients"].get(&tab1_id).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another user joins: its member_added comes after anything the first tab's leaving queued.
    let (mut other, _) = as_user(server.addr, "7").await;
    subscribe(&mut other, "room:lobby").await;
    until(&log, "user 7 added", |l| l.events().iter().any(|e| e["user"] == "7")).await;
    let events = log.unique_events();
    assert_eq!(names(&events), ["member_added", "member_added"], "{events:?}");
    assert_eq!((events[0]["user"].as_str(), events[1]["user"].as_str()), (Some("42"), Some("7")));

    close(tab2).await;
    until(&log, "user 42 removed", |l| l.unique_events().len() == 3).await;
    let events = log.unique_events();
    assert_eq!((events[2]["name"].as_str(), events[2]["user"].as_str()), (Some("member_removed"), Some("42")));
    server.shutdown().await;
    rx.stop().await;
}

/// Pusher's format has no anonymous member: an anonymous connection's presence reaches a
/// Herald-format endpoint (`user: ""`) and never a Pusher-format one (no `user_id: ""`).
#[tokio::test]
async fn anonymous_members_are_not_sent_in_pusher_format() {
    let herald_log = Arc::new(Log::default());
    let pusher_log = Arc::new(Log::default());
    let herald_rx = Receiver::start(herald_log.clone(), 0).await;
    let pusher_rx = Receiver::start(pusher_log.clone(), 0).await;
    let events = vec![EventName::MemberAdded, EventName::MemberRemoved];
    let mut herald = endpoint(herald_rx.url());
    herald.events = events.clone();
    let pusher = EndpointConfig {
        url: pusher_rx.url(),
        format: WebhookFormat::Pusher,
        key: "app-key".into(),
        secret: Secret::new("pusher-app-secret"),
        events,
        ..Default::default()
    };
    let server = TestServer::start(config(vec![herald, pusher])).await;

    let mut anonymous = Native::open(server.addr).await;
    let r = anonymous.request("connect", json!({})).await;
    assert!(r.get("connect").is_some(), "anonymous connect: {r}");
    subscribe(&mut anonymous, "room:lobby").await;
    close(anonymous).await;
    until(&herald_log, "the anonymous member removed", |l| l.unique_events().len() >= 2).await;
    // A named user after: its events come after anything the anonymous one queued.
    let (mut named, _) = as_user(server.addr, "42").await;
    subscribe(&mut named, "room:lobby").await;
    close(named).await;
    until(&herald_log, "user 42 removed", |l| l.unique_events().len() >= 4).await;
    until(&pusher_log, "user 42 removed", |l| l.events().len() >= 2).await;

    let events = herald_log.unique_events();
    assert_eq!(names(&events), ["member_added", "member_removed", "member_added", "member_removed"]);
    let users: Vec<&str> = events.iter().map(|e| e["user"].as_str().unwrap_or("?")).collect();
    assert_eq!(users, ["", "", "42", "42"]);
    let events = pusher_log.events();
    assert_eq!(
        events,
        [
            json!({"name": "member_added", "channel": "room:lobby", "user_id": "42"}),
            json!({"name": "member_removed", "channel": "room:lobby", "user_id": "42"}),
        ]
    );
    server.shutdown().await;
    herald_rx.stop().await;
    pusher_rx.stop().await;
}

#[tokio::test]
async fn shutdown_delivers_the_disconnects_of_the_sessions_it_closes() {
    let log = Arc::new(Log::default());
    let rx = Receiver::start(log.clone(), 0).await;
    let mut hook = endpoint(rx.url());
    hook.events = vec![EventName::Disconnect];
    let server = TestServer::start(config(vec![hook])).await;
    let mut clients = Vec::new();
    let mut ids = HashSet::new();
    for _ in 0..4 {
        let (c, id) = as_user(server.addr, "42").await;
        clients.push(c);
        ids.insert(id);
    }
    // Clients that read, so they answer the server's close handshake.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                use futures_util::StreamExt;
                while let Some(Ok(_)) = c.ws.next().await {}
            })
        })
        .collect();
    server.shutdown().await;
    // `shutdown` returned: what it flushed has been accepted.
    let got: HashSet<String> =
        log.unique_events().iter().map(|e| e["client"].as_str().unwrap_or("?").to_owned()).collect();
    assert_eq!(got, ids);
    for r in readers {
        let _ = r.await;
    }
    rx.stop().await;
}

#[tokio::test]
async fn https_endpoints_are_verified_against_their_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("cert");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write ca");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));

    let (trusted_log, untrusted_log) = (Arc::new(Log::default()), Arc::new(Log::default()));
    let trusted = Receiver::serve(trusted_log.clone(), 0, Some(acceptor.clone())).await;
    let untrusted = Receiver::serve(untrusted_log.clone(), 0, Some(acceptor)).await;
    let mut with_ca = endpoint(format!("https://localhost:{}/hooks", trusted.addr.port()));
    with_ca.ca_file = ca_file;
    with_ca.events = vec![EventName::Connect];
    // The system's store does not know the test CA: the handshake fails, nothing is accepted.
    let mut without_ca = endpoint(format!("https://localhost:{}/hooks", untrusted.addr.port()));
    without_ca.events = vec![EventName::Connect];
    let server = TestServer::start(config(vec![with_ca, without_ca])).await;

    let (_c, client) = as_user(server.addr, "42").await;
    until(&trusted_log, "the connect over HTTPS", |l| !l.events().is_empty()).await;
    let events = trusted_log.events();
    assert_eq!(events[0]["client"], client.as_str());
    let sig = trusted_log.accepted()[0].headers.get("x-herald-signature").cloned().expect("signed");
    assert_eq!(
        sig.to_str().expect("ascii"),
        format!("sha256={}", hmac_hex(HOOK_SECRET, &trusted_log.accepted()[0].body))
    );
    assert_eq!(untrusted_log.started.load(Ordering::SeqCst), 0, "no request past an untrusted certificate");
    server.shutdown().await;
    trusted.stop().await;
    untrusted.stop().await;
}

/// Two nodes sharing a real `redis-server`: presence is cluster-wide, so one user on both
/// nodes is added and removed once; occupancy is per node (docs/webhooks.md says so).
#[tokio::test]
async fn with_two_nodes_members_are_cluster_wide_and_occupancy_per_node() {
    use herald::engine::redis::test_server::RedisServer;
    let redis = RedisServer::start().expect("redis-server (Debian package redis-server)");
    let log = Arc::new(Log::default());
    let rx = Receiver::start(log.clone(), 0).await;
    let node_config = || {
        let mut hook = endpoint(rx.url());
        hook.events = vec![
            EventName::ChannelOccupied,
            EventName::ChannelVacated,
            EventName::MemberAdded,
            EventName::MemberRemoved,
        ];
        let mut c = config(vec![hook]);
        c.engine.kind = herald::config::EngineKind::Redis;
        c.engine.redis.url = redis.url();
        c.engine.redis.prefix = "webhooks".into();
        c
    };
    let (a, b) = (TestServer::start(node_config()).await, TestServer::start(node_config()).await);

    let (mut tab1, _) = as_user(a.addr, "42").await;
    let (mut tab2, _) = as_user(b.addr, "42").await;
    subscribe(&mut tab1, "room:lobby").await;
    subscribe(&mut tab2, "room:lobby").await;
    until(&log, "both nodes occupied and one member", |l| l.unique_events().len() >= 3).await;
    close(tab1).await;
    close(tab2).await;
    until(&log, "both nodes vacated and the member removed", |l| l.unique_events().len() >= 6).await;
    // Give a wrongly repeated member event time to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let events = log.unique_events();
    let count = |name: &str| events.iter().filter(|e| e["name"] == name).count();
    assert_eq!(
        (count("channel_occupied"), count("member_added"), count("channel_vacated"), count("member_removed")),
        (2, 1, 2, 1),
        "{events:#?}"
    );
    let nodes: HashSet<&str> =
        events.iter().filter_map(|e| e["id"].as_str()?.rsplit_once('-').map(|(node, _)| node)).collect();
    assert_eq!(nodes.len(), 2, "each node sends its own events, with its own id prefix");
    a.shutdown().await;
    b.shutdown().await;
    rx.stop().await;
}
