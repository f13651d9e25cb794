//! Several Herald nodes sharing one real `redis-server` (`[engine] kind = "redis"`): every
//! subscriber on every node gets each publication once and in order, a client recovers on
//! another node, presence is the same everywhere, prefixes are isolated, and a Redis that
//! dies and comes back leaves the nodes running, answering 503 meanwhile, and makes
//! subscribers recover.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use herald::config::{EngineKind, NamespaceOptions};
use herald::engine::redis::test_server::RedisServer;
use herald::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn config(redis: &RedisServer, prefix: &str) -> Config {
    let mut c = Config::default();
    c.engine.kind = EngineKind::Redis;
    c.engine.redis.url = redis.url();
    c.engine.redis.prefix = prefix.into();
    c.engine.redis.timeout = Duration::from_millis(500);
    c.channels.namespaces.insert("tiny".into(), NamespaceOptions { history_size: 5, ..Default::default() });
    c.channels
        .namespaces
        .insert("room".into(), NamespaceOptions { presence: true, join_leave: true, ..Default::default() });
    c
}

async fn nodes(redis: &RedisServer, prefix: &str, n: usize) -> Vec<TestServer> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TestServer::start(config(redis, prefix)).await);
    }
    out
}

async fn publish(addr: SocketAddr, channel: &str, seq: u64) -> Value {
    let (status, body) =
        api(addr, "publish", &json!({"channel": channel, "data": {"seq": seq}}).to_string(), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn offsets(list: &Value) -> Vec<u64> {
    list.as_array().expect("list").iter().map(|p| p["offset"].as_u64().unwrap_or(0)).collect()
}

/// Reads frames until the server closes; returns the close code.
async fn close_code(c: &mut Native, within: Duration) -> Option<u16> {
    let deadline = Instant::now() + within;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline.into(), c.ws.next()).await {
        if let Message::Close(f) = msg {
            return f.map(|f| u16::from(f.code));
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_through_one_node_reaches_every_subscriber_on_every_node_once_and_in_order() {
    let redis = RedisServer::start().expect("redis-server");
    let n = nodes(&redis, "herald", 3).await;
    let mut subs = Vec::new();
    for node in &n {
        for _ in 0..2 {
            let mut c = Native::connected(node.addr).await;
            let r = c.request("subscribe", json!({"channel": "news"})).await;
            assert_eq!(r["subscribe"]["offset"], 0, "{r}");
            subs.push(c);
        }
    }
    for seq in 1..=50 {
        publish(n[0].addr, "news", seq).await;
    }
    // The sentinel right after 50 proves nothing arrived twice in between.
    publish(n[0].addr, "news", 51).await;
    for (i, c) in subs.iter_mut().enumerate() {
        for want in 1..=51u64 {
            let p = c.push().await;
            assert_eq!(p["push"]["pub"]["offset"], want, "subscriber {i}: {p}");
            assert_eq!(p["push"]["pub"]["data"]["seq"], want);
        }
    }
    for node in n {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_to_another_node_recovers_exactly_what_it_missed() {
    let redis = RedisServer::start().expect("redis-server");
    let n = nodes(&redis, "herald", 3).await;
    let mut c = Native::connected(n[0].addr).await;
    let r = c.request("subscribe", json!({"channel": "news"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().expect("epoch").to_owned();
    for seq in 1..=3 {
        publish(n[1].addr, "news", seq).await;
    }
    let mut last = 0;
    for _ in 0..3 {
        last = c.push().await["push"]["pub"]["offset"].as_u64().expect("offset");
    }
    drop(c);
    for seq in 4..=10 {
        publish(n[1].addr, "news", seq).await;
    }
    let mut c = Native::connected(n[2].addr).await;
    let r = c.request("subscribe", json!({"channel": "news", "recover": true, "epoch": epoch, "offset": last})).await;
    let s = &r["subscribe"];
    assert_eq!(s["recovered"], true, "{r}");
    assert_eq!((s["epoch"].as_str(), s["offset"].as_u64()), (Some(epoch.as_str()), Some(10)));
    assert_eq!(offsets(&s["publications"]), (4..=10).collect::<Vec<_>>(), "exactly the 7 missed");
    publish(n[0].addr, "news", 11).await;
    assert_eq!(c.push().await["push"]["pub"]["offset"], 11, "then live, no gap");

    // Past the history window (5 kept): told it cannot recover, never a silent gap.
    let mut c = Native::connected(n[0].addr).await;
    let r = c.request("subscribe", json!({"channel": "tiny:t"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().expect("epoch").to_owned();
    drop(c);
    for seq in 1..=8 {
        publish(n[1].addr, "tiny:t", seq).await;
    }
    let mut c = Native::connected(n[2].addr).await;
    let r = c.request("subscribe", json!({"channel": "tiny:t", "recover": true, "epoch": epoch, "offset": 0})).await;
    assert_eq!(r["subscribe"]["recovered"], false, "{r}");
    assert_eq!(r["subscribe"]["offset"], 8);
    for node in n {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_join_leave_are_the_same_from_every_node() {
    let redis = RedisServer::start().expect("redis-server");
    let n = nodes(&redis, "herald", 3).await;
    // Each subscriber hears its own join, then those of later subscribers on any node.
    // (Join pushes are not ordered with subscribes, so each join is awaited before the next.)
    let joined = |p: Value| p["push"]["join"]["client"].as_str().map(str::to_owned).expect("a join push");
    let mut a = Native::connected(n[0].addr).await;
    a.request("subscribe", json!({"channel": "room:1"})).await;
    let ja = joined(a.push().await);
    let mut b = Native::connected(n[1].addr).await;
    b.request("subscribe", json!({"channel": "room:1"})).await;
    let jb = joined(b.push().await);
    assert_eq!(joined(a.push().await), jb, "A (node 0) hears B (node 1) join");
    let mut c = Native::connected(n[2].addr).await;
    c.request("subscribe", json!({"channel": "room:1"})).await;
    let jc = joined(c.push().await);
    assert_eq!(joined(a.push().await), jc, "A hears C (node 2) join");
    assert_eq!(joined(b.push().await), jc, "B hears C join");
    let heard_a = [ja, jb, jc.clone()];
    let heard_c = jc;

    let mut seen = Vec::new();
    for node in &n {
        let (status, body) = api(node.addr, "presence", &json!({"channel": "room:1"}).to_string(), None).await;
        assert_eq!(status, 200, "{body}");
        let (status, stats) = api(node.addr, "presence_stats", &json!({"channel": "room:1"}).to_string(), None).await;
        assert_eq!((status, stats["clients"].as_u64()), (200, Some(3)), "{stats}");
        seen.push(body);
    }
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    for client in &heard_a {
        assert!(seen[0].to_string().contains(client.as_str()), "{client} in {}", seen[0]);
    }

    drop(c);
    let left = a.push().await;
    assert_eq!(left["push"]["leave"]["client"].as_str(), Some(heard_c.as_str()), "A hears C leave: {left}");
    let (_, stats) = api(n[1].addr, "presence_stats", &json!({"channel": "room:1"}).to_string(), None).await;
    assert_eq!(stats["clients"], 2, "{stats}");
    for node in n {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefixes_on_one_redis_never_see_each_other() {
    let redis = RedisServer::start().expect("redis-server");
    let x = TestServer::start(config(&redis, "x")).await;
    let y = TestServer::start(config(&redis, "y")).await;
    let mut on_y = Native::connected(y.addr).await;
    on_y.request("subscribe", json!({"channel": "news"})).await;
    for seq in 1..=3 {
        publish(x.addr, "news", seq).await;
    }
    let p = publish(y.addr, "news", 100).await;
    assert_eq!(p["offset"], 1, "y's channel has its own stream: {p}");
    let push = on_y.push().await;
    assert_eq!(
        (push["push"]["pub"]["offset"].as_u64(), push["push"]["pub"]["data"]["seq"].as_u64()),
        (Some(1), Some(100))
    );
    let (_, h) = api(y.addr, "history", &json!({"channel": "news", "limit": 10}).to_string(), None).await;
    assert_eq!(offsets(&h["publications"]), [1], "{h}");
    let (_, h) = api(x.addr, "history", &json!({"channel": "news", "limit": 10}).to_string(), None).await;
    assert_eq!(offsets(&h["publications"]), [1, 2, 3], "{h}");
    x.shutdown().await;
    y.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_back_nodes_survive_answer_503_and_subscribers_recover() {
    let mut redis = RedisServer::start().expect("redis-server");
    let n = nodes(&redis, "herald", 2).await;
    let mut sub = Native::connected(n[0].addr).await;
    let r = sub.request("subscribe", json!({"channel": "news"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().expect("epoch").to_owned();
    for seq in 1..=3 {
        publish(n[1].addr, "news", seq).await;
    }
    for want in 1..=3 {
        assert_eq!(sub.push().await["push"]["pub"]["offset"], want);
    }

    redis.kill();
    for node in &n {
        let started = Instant::now();
        let (status, body) = api(node.addr, "publish", &json!({"channel": "news", "data": 1}).to_string(), None).await;
        assert_eq!((status, body["error"]["code"].as_u64()), (503, Some(113)), "{body}");
        assert!(started.elapsed() < Duration::from_secs(5), "bounded: {:?}", started.elapsed());
        let (status, _) = api(node.addr, "history", &json!({"channel": "news"}).to_string(), None).await;
        assert_eq!(status, 503);
    }
    // The WebSocket stays open and answers meanwhile: error 113, unavailable.
    let r = sub.request("history", json!({"channel": "news"})).await;
    assert_eq!(r["error"]["code"], 113, "{r}");
    let r = sub.request("subscribe", json!({"channel": "other"})).await;
    assert_eq!(r["error"]["code"], 113, "{r}");
    let (status, _) = http(n[1].addr, "GET /sse/other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 503, "an event stream that cannot start says why");

    // Redis comes back empty: the history is gone, so the subscriber is told to reconnect
    // (4004) and its recovery says `recovered: false`.
    redis.resume().expect("redis back");
    assert_eq!(close_code(&mut sub, Duration::from_secs(15)).await, Some(4004));
    let mut again = None;
    for _ in 0..50 {
        let mut c = Native::connected(n[1].addr).await;
        let r = c.request("subscribe", json!({"channel": "news", "recover": true, "epoch": epoch, "offset": 3})).await;
        if r.get("subscribe").is_some() {
            assert_eq!(r["subscribe"]["recovered"], false, "{r}");
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = again.expect("subscribed again after Redis came back");
    let p = publish(n[0].addr, "news", 1).await;
    assert_eq!(p["offset"], 1, "a new stream: {p}");
    assert_eq!(c.push().await["push"]["pub"]["offset"], 1, "live across nodes again");
    for node in n {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_pub_sub_link_is_filled_from_history_without_a_gap() {
    let redis = RedisServer::start().expect("redis-server");
    let n = nodes(&redis, "herald", 2).await;
    let mut sub = Native::connected(n[0].addr).await;
    sub.request("subscribe", json!({"channel": "news"})).await;
    publish(n[1].addr, "news", 1).await;
    assert_eq!(sub.push().await["push"]["pub"]["offset"], 1);
    // Cut every pub/sub connection (the data stays), then publish while the links reconnect.
    let mut raw =
        redis::Client::open(redis.url()).expect("client").get_multiplexed_async_connection().await.expect("conn");
    let killed: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut raw).await.expect("client kill");
    assert_eq!(killed, 1, "the listening node's link cut");
    for seq in 2..=30 {
        publish(n[1].addr, "news", seq).await;
    }
    for want in 2..=30u64 {
        let p = sub.push().await;
        assert_eq!(p["push"]["pub"]["offset"], want, "{p}");
    }
    for node in n {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_of_a_node_that_dies_leave_when_their_presence_expires() {
    let redis = RedisServer::start().expect("redis-server");
    let mut fast = config(&redis, "herald");
    // Presence lives three ping intervals: 3 s here.
    fast.websocket.ping_interval = Duration::from_secs(1);
    let a = TestServer::start(fast.clone()).await;
    let mut watcher = Native::connected(a.addr).await;
    watcher.request("subscribe", json!({"channel": "room:1"})).await;
    watcher.push().await; // its own join

    // Node B runs on its own runtime, which is then dropped: it dies without a goodbye.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let b_addr = std_listener.local_addr().expect("addr");
    {
        let _in_rt = rt.enter();
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        let mut c = fast.clone();
        c.listen = b_addr.to_string();
        rt.spawn(herald::server::run(c, listener, std::future::pending::<()>()));
    }
    let mut doomed = Native::connected(b_addr).await;
    doomed.request("subscribe", json!({"channel": "room:1"})).await;
    let joined = watcher.push().await;
    let client = joined["push"]["join"]["client"].as_str().expect("join").to_owned();
    rt.shutdown_background();
    drop(doomed);

    let started = Instant::now();
    let left = watcher.push().await;
    assert_eq!(left["push"]["leave"]["client"].as_str(), Some(client.as_str()), "{left}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(1), "announced by expiry, not by a goodbye: {waited:?}");
    assert!(waited < Duration::from_secs(8), "within the TTL and a sweep: {waited:?}");
    let (_, stats) = api(a.addr, "presence_stats", &json!({"channel": "room:1"}).to_string(), None).await;
    assert_eq!(stats["clients"], 1, "{stats}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_every_node_give_every_subscriber_one_order() {
    let redis = RedisServer::start().expect("redis-server");
    let n = nodes(&redis, "herald", 3).await;
    let channels = ["a", "b", "c"];
    // 20 subscribers per node, each on every channel.
    let mut subs = Vec::new();
    for node in &n {
        for _ in 0..20 {
            let mut c = Native::connected(node.addr).await;
            for ch in channels {
                c.request("subscribe", json!({"channel": ch})).await;
            }
            subs.push(c);
        }
    }
    // Three publishers, one per node, each publishing 40 times to every channel, at once.
    let publishers: Vec<_> = n
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let addr = node.addr;
            tokio::spawn(async move {
                for k in 0..40u64 {
                    for ch in ["a", "b", "c"] {
                        publish(addr, ch, i as u64 * 1000 + k).await;
                    }
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.expect("publisher");
    }
    // Every subscriber: 120 publications per channel, offsets 1..=120 in order, and the same
    // sequence of data as every other subscriber.
    let mut reference: Option<Vec<(String, u64, u64)>> = None;
    for (i, c) in subs.iter_mut().enumerate() {
        let mut got = Vec::new();
        for _ in 0..360 {
            let p = c.push().await;
            let pubv = &p["push"]["pub"];
            got.push((
                p["push"]["channel"].as_str().unwrap_or("").to_owned(),
                pubv["offset"].as_u64().unwrap_or(0),
                pubv["data"]["seq"].as_u64().unwrap_or(u64::MAX),
            ));
        }
        for ch in channels {
            let offsets: Vec<u64> = got.iter().filter(|g| g.0 == ch).map(|g| g.1).collect();
            assert_eq!(offsets, (1..=120).collect::<Vec<_>>(), "subscriber {i}, channel {ch}");
        }
        let mut per_channel = got.clone();
        per_channel.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
        match &reference {
            None => reference = Some(per_channel),
            Some(r) => assert_eq!(&per_channel, r, "subscriber {i} saw another order"),
        }
    }
    for node in n {
        node.shutdown().await;
    }
}

/// Writes a CA, a certificate for 127.0.0.1 (for Redis) and one for the nodes, signed by
/// the CA, into `dir`; returns Redis's files and the nodes' certificate and key.
fn pki(dir: &std::path::Path) -> std::io::Result<(herald::engine::redis::test_server::Tls, PathBuf, PathBuf)> {
    let err = |e: rcgen::Error| std::io::Error::other(e.to_string());
    let params = |names: Vec<String>, cn: &str| {
        let mut p = rcgen::CertificateParams::new(names).map_err(err)?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        Ok::<_, std::io::Error>(p)
    };
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let mut ca_params = params(Vec::new(), "test CA")?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let write = |name: &str, pem: String| -> std::io::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, pem)?;
        Ok(p)
    };
    let redis_key = rcgen::KeyPair::generate().map_err(err)?;
    let redis = params(vec!["127.0.0.1".into()], "redis")?.signed_by(&redis_key, &ca, &ca_key).map_err(err)?;
    let node_key = rcgen::KeyPair::generate().map_err(err)?;
    let node = params(vec!["node".into()], "node")?.signed_by(&node_key, &ca, &ca_key).map_err(err)?;
    let tls = herald::engine::redis::test_server::Tls {
        cert: write("redis.pem", redis.pem())?,
        key: write("redis-key.pem", redis_key.serialize_pem())?,
        ca: write("ca.pem", ca.pem())?,
    };
    Ok((tls, write("node.pem", node.pem())?, write("node-key.pem", node_key.serialize_pem())?))
}

/// `rediss://` through the configuration: two nodes on a Redis that accepts only TLS with
/// client certificates share a channel and its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_a_redis_over_tls() {
    let mut files = None;
    let redis = RedisServer::start_tls(|dir| {
        let (tls, cert, key) = pki(dir)?;
        files = Some((tls.ca.clone(), cert, key));
        Ok(tls)
    })
    .expect("redis-server with TLS (Debian's build has --tls-port)");
    let (ca, cert, key) = files.expect("pki");
    assert!(redis.url().starts_with("rediss://"));
    let mut n = Vec::new();
    for _ in 0..2 {
        let mut c = config(&redis, "herald");
        (c.engine.redis.tls_ca, c.engine.redis.tls_cert, c.engine.redis.tls_key) =
            (ca.clone(), cert.clone(), key.clone());
        c.validate().expect("valid");
        n.push(TestServer::start(c).await);
    }
    let mut sub = Native::connected(n[1].addr).await;
    let r = sub.request("subscribe", json!({"channel": "news"})).await;
    assert_eq!(r["subscribe"]["offset"], 0, "{r}");
    for seq in 1..=3 {
        publish(n[0].addr, "news", seq).await;
    }
    for seq in 1..=3 {
        let p = sub.push().await;
        assert_eq!(
            (p["push"]["pub"]["offset"].as_u64(), p["push"]["pub"]["data"]["seq"].as_u64()),
            (Some(seq), Some(seq))
        );
    }
    let (status, body) = api(n[1].addr, "history", &json!({"channel": "news", "limit": 10}).to_string(), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(offsets(&body["publications"]), [1, 2, 3]);
    for node in n {
        node.shutdown().await;
    }
}

/// Polls `/ready` until it answers `want`, for at most `within`; returns the last body.
async fn ready_becomes(addr: SocketAddr, want: u16, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = http(addr, "GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        if status == want {
            return body;
        }
        assert!(Instant::now() < deadline, "/ready still {status} (want {want}): {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_redis_is_down_and_health_stays_200() {
    let mut redis = RedisServer::start().expect("redis-server");
    let node = TestServer::start(config(&redis, "ready")).await;
    let health = "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let body = ready_becomes(node.addr, 200, Duration::from_secs(10)).await;
    assert_eq!(body["status"], "ready", "{body}");

    redis.kill();
    // The link pings every 2 s with a 500 ms timeout; a killed Redis closes it at once.
    let body = ready_becomes(node.addr, 503, Duration::from_secs(10)).await;
    assert_eq!(body["error"]["code"], 113, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("redis unreachable"), "{body}");
    let (status, body) = http(node.addr, health).await;
    assert_eq!(status, 200, "liveness is not readiness: {body}");

    redis.resume().expect("redis back");
    let body = ready_becomes(node.addr, 200, Duration::from_secs(15)).await;
    assert_eq!(body["status"], "ready", "{body}");
    node.shutdown().await;
}

/// Publishes `seq` through `addr`, retrying while the node cannot reach Redis yet (it was
/// just restarted): the offset it got.
async fn publish_once_back(addr: SocketAddr, channel: &str, seq: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body = json!({"channel": channel, "data": {"seq": seq}}).to_string();
        let (status, reply) = api(addr, "publish", &body, None).await;
        if status == 200 {
            return reply["offset"].as_u64().expect("offset");
        }
        assert_eq!(status, 503, "only unavailable while Redis comes back: {reply}");
        assert!(Instant::now() < deadline, "Redis did not come back for {addr}: {reply}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What every door tells a client holding `(epoch, 3)` of a stream that Redis lost, once the
/// channel's new stream has offsets 1..=6: never `recovered: true` with the new history.
/// Checked through the native protocol (subscribe with `recover`), the HTTP API (`history`
/// with `since`) and Server-Sent Events (`Last-Event-ID`).
async fn an_old_position_is_refused(addr: SocketAddr, epoch: &str) {
    let mut c = Native::connected(addr).await;
    let r = c.request("subscribe", json!({"channel": "news", "recover": true, "epoch": epoch, "offset": 3})).await;
    let s = &r["subscribe"];
    assert_eq!(s["recovered"], false, "a lost stream's position never recovers: {r}");
    assert_ne!(s["epoch"].as_str(), Some(epoch), "the new stream has a new epoch: {r}");
    assert_eq!(s["offset"], 6, "{r}");
    assert!(s["publications"].as_array().is_none_or(|p| p.is_empty()), "no part of the new history: {r}");

    let since = json!({"channel": "news", "limit": 10, "since": {"epoch": epoch, "offset": 3}});
    let (status, body) = api(addr, "history", &since.to_string(), None).await;
    assert_eq!((status, body["error"]["code"].as_u64()), (409, Some(122)), "epoch mismatch, not new4..new6: {body}");

    let req = format!("GET /sse/news HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {epoch}:3\r\n\r\n");
    let (head, mut s) = raw_request(addr, &req).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    // The first event decides: a reset, or (the bug) the new stream's events under the old id.
    while !got.contains("event: herald-reset\n") && !got.contains(&format!("id: {epoch}:")) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 2048];
        let n =
            tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await.expect("an event in time").expect("read");
        assert!(n > 0, "stream ended: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains("event: herald-reset\n"), "the lost position is announced: {got}");
    assert!(!got.contains(&format!("id: {epoch}:4\n")), "never new4 under the old epoch: {got}");
}

/// Issue 19: Redis restarts empty (no persistence) under one node. The channel's stream is
/// recreated with offsets 1..=6; a client holding `(epoch, 3)` of the old stream must not be
/// handed new4..new6 as if it had new1..new3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_never_recovers_an_old_position_on_one_node() {
    let mut redis = RedisServer::start().expect("redis-server");
    let node = TestServer::start(config(&redis, "herald")).await;
    let mut sub = Native::connected(node.addr).await;
    let r = sub.request("subscribe", json!({"channel": "news"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().expect("epoch").to_owned();
    for seq in 1..=3 {
        publish(node.addr, "news", seq).await;
    }
    for want in 1..=3 {
        assert_eq!(sub.push().await["push"]["pub"]["offset"], want);
    }
    drop(sub);
    redis.kill();
    redis.resume().expect("redis back, empty");
    assert_eq!(publish_once_back(node.addr, "news", 101).await, 1, "a new stream");
    for seq in 102..=106 {
        publish(node.addr, "news", seq).await;
    }
    an_old_position_is_refused(node.addr, &epoch).await;
    node.shutdown().await;
}

/// The same across two nodes: published through A, Redis restarted empty, published through
/// B; neither node recovers the old position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_never_recovers_an_old_position_across_nodes() {
    let mut redis = RedisServer::start().expect("redis-server");
    let n = nodes(&redis, "herald", 2).await;
    let first = publish(n[0].addr, "news", 1).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    for seq in 2..=3 {
        publish(n[0].addr, "news", seq).await;
    }
    redis.kill();
    redis.resume().expect("redis back, empty");
    // Both nodes reach the new Redis before the new history is written.
    publish_once_back(n[0].addr, "warm", 0).await;
    assert_eq!(publish_once_back(n[1].addr, "news", 101).await, 1, "a new stream");
    for seq in 102..=106 {
        publish(n[1].addr, "news", seq).await;
    }
    for node in &n {
        an_old_position_is_refused(node.addr, &epoch).await;
    }
    for node in n {
        node.shutdown().await;
    }
}

/// `FLUSHALL` while the nodes run: the recreated stream gets a new epoch, a live subscriber
/// is made to recover (4004) instead of skipping new1..new3, and the old position is refused
/// by every door on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_while_nodes_run_never_recovers_an_old_position() {
    let redis = RedisServer::start().expect("redis-server");
    let n = nodes(&redis, "herald", 2).await;
    let mut live = Native::connected(n[0].addr).await;
    live.request("subscribe", json!({"channel": "news"})).await;
    let first = publish(n[0].addr, "news", 1).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    for seq in 2..=3 {
        publish(n[0].addr, "news", seq).await;
    }
    for want in 1..=3 {
        assert_eq!(live.push().await["push"]["pub"]["offset"], want);
    }
    let mut raw =
        redis::Client::open(redis.url()).expect("client").get_multiplexed_async_connection().await.expect("conn");
    let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await.expect("flushall");
    for seq in 101..=106 {
        let p = publish(n[1].addr, "news", seq).await;
        assert_ne!(p["epoch"].as_str(), Some(epoch.as_str()), "a new epoch: {p}");
        assert_eq!(p["offset"], seq - 100, "{p}");
    }
    // The live subscriber on A held (epoch, 3): it must not be handed new4 as the next one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        match tokio::time::timeout_at(deadline.into(), live.ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                assert!(v.get("push").is_none() || v["push"].get("pub").is_none(), "no silent gap: {v}");
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("the live subscriber was neither closed nor told: {other:?}"),
        }
    };
    assert_eq!(code, Some(4004), "told to reconnect and recover");
    drop(live);
    for node in &n {
        an_old_position_is_refused(node.addr, &epoch).await;
    }
    for node in n {
        node.shutdown().await;
    }
}

/// Redis comes back from an older snapshot (a restart from its last RDB, or what a failover
/// to a replica that lagged looks like): the prefix's epoch base is there, the channel's
/// stream is not. The recreated stream still gets a new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_back_from_an_older_snapshot_never_recovers_an_old_position() {
    let mut redis = RedisServer::start().expect("redis-server");
    let n = nodes(&redis, "herald", 2).await;
    publish(n[0].addr, "warm", 1).await;
    let mut raw =
        redis::Client::open(redis.url()).expect("client").get_multiplexed_async_connection().await.expect("conn");
    let _: () = redis::cmd("SAVE").query_async(&mut raw).await.expect("save");
    let first = publish(n[0].addr, "news", 1).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    for seq in 2..=3 {
        publish(n[0].addr, "news", seq).await;
    }
    redis.kill();
    redis.resume().expect("redis back, from the snapshot");
    assert_eq!(publish_once_back(n[0].addr, "warm", 2).await, 2, "the snapshot was loaded");
    assert_eq!(publish_once_back(n[1].addr, "news", 101).await, 1, "the stream is not in it");
    for seq in 102..=106 {
        publish(n[1].addr, "news", seq).await;
    }
    for node in &n {
        an_old_position_is_refused(node.addr, &epoch).await;
    }
    for node in n {
        node.shutdown().await;
    }
}
