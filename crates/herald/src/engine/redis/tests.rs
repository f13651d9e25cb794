//! The Redis engine against real `redis-server`s.

use super::test_server::RedisServer;
use super::*;
use std::path::PathBuf;

use herald_protocol::ClientInfo;

use super::super::link::Backoff;
use crate::engine::Tags;

/// One server for this module's tests; each test gets its own prefix.
/// An engine on its own `redis-server`, which stops with it.
fn engine() -> RedisEngine {
    let server = RedisServer::start().expect("redis-server (apt-get install -y redis-server)");
    let mut e = RedisEngine::new(&RedisConfig::new(server.url(), "t")).expect("engine");
    e.server = Some(server);
    e
}

async fn raw(e: &RedisEngine) -> redis::aio::MultiplexedConnection {
    let url = e.server.as_ref().expect("server").url();
    redis::Client::open(url).expect("client").get_multiplexed_async_connection().await.expect("conn")
}

crate::engine_conformance!(super::engine());

/// The whole suite again over TLS (`rediss://`), with a client certificate, against a
/// `redis-server` that accepts nothing else.
mod tls {
    use super::*;

    /// Writes a CA, a server certificate for 127.0.0.1 and a client certificate (both
    /// signed by the CA) into `dir`.
    pub(super) fn pki(dir: &std::path::Path) -> std::io::Result<(test_server::Tls, PathBuf, PathBuf)> {
        let err = |e: rcgen::Error| std::io::Error::other(e.to_string());
        // Distinct subjects: OpenSSL takes a certificate whose subject is its issuer's for
        // a self-signed one.
        let params = |names: Vec<String>, cn: &str| {
            let mut p = rcgen::CertificateParams::new(names).map_err(err)?;
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            Ok::<_, std::io::Error>(p)
        };
        let ca_key = rcgen::KeyPair::generate().map_err(err)?;
        let mut ca_params = params(Vec::new(), "herald test CA")?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).map_err(err)?;
        let write = |name: &str, pem: String| -> std::io::Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, pem)?;
            Ok(p)
        };
        let server_key = rcgen::KeyPair::generate().map_err(err)?;
        let server =
            params(vec!["127.0.0.1".to_owned()], "redis")?.signed_by(&server_key, &ca, &ca_key).map_err(err)?;
        let client_key = rcgen::KeyPair::generate().map_err(err)?;
        let client =
            params(vec!["herald-node".to_owned()], "herald-node")?.signed_by(&client_key, &ca, &ca_key).map_err(err)?;
        let tls = test_server::Tls {
            cert: write("server.pem", server.pem())?,
            key: write("server-key.pem", server_key.serialize_pem())?,
            ca: write("ca.pem", ca.pem())?,
        };
        Ok((tls, write("client.pem", client.pem())?, write("client-key.pem", client_key.serialize_pem())?))
    }

    pub(super) fn engine() -> RedisEngine {
        let mut client = None;
        let server = RedisServer::start_tls(|dir| {
            let (tls, cert, key) = pki(dir)?;
            client = Some((tls.ca.clone(), cert, key));
            Ok(tls)
        })
        .expect("redis-server with TLS");
        let (ca, cert, key) = client.expect("pki");
        assert!(server.url().starts_with("rediss://"), "{}", server.url());
        let mut settings = RedisConfig::new(server.url(), "t");
        (settings.tls_ca, settings.tls_cert, settings.tls_key) = (ca, cert, key);
        let mut e = RedisEngine::new(&settings).expect("engine");
        e.server = Some(server);
        e
    }

    crate::engine_conformance!(super::engine());

    /// Without the CA Redis's certificate is not trusted; without a client certificate
    /// Redis refuses the node: either way a clear `Unavailable`, in bounded time.
    #[tokio::test]
    async fn an_untrusted_or_anonymous_connection_fails_cleanly() {
        let good = engine();
        let url = good.server.as_ref().expect("server").url();
        let mut no_ca = RedisConfig::new(url.clone(), "t");
        no_ca.timeout = Duration::from_millis(500);
        let e = RedisEngine::new(&no_ca).expect("engine");
        let r = e.history("x", HistoryQuery::default()).await;
        assert!(matches!(r, Err(EngineError::Unavailable(_))), "{r:?}");
        let mut plain = RedisConfig::new(url.replacen("rediss://", "redis://", 1), "t");
        plain.timeout = Duration::from_millis(500);
        let e = RedisEngine::new(&plain).expect("engine");
        let r = e.history("x", HistoryQuery::default()).await;
        assert!(matches!(r, Err(EngineError::Unavailable(_))), "plain TCP to a TLS port: {r:?}");
        good.history("x", HistoryQuery::default()).await.expect("the configured engine reads");
    }
}

#[tokio::test]
async fn reads_write_no_key() {
    let e = engine();
    let mut raw = raw(&e).await;
    e.history("ghost", HistoryQuery { limit: 10, ..Default::default() }).await.expect("read");
    e.presence("ghost").await.expect("presence");
    e.presence_stats("ghost").await.expect("stats");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut raw).await.expect("keys");
    assert_eq!(keys, ["{t}:base"], "reads wrote nothing but the prefix's epoch base");
    e.publish("ghost", Publish::data(Bytes::from_static(b"1")), HistoryPolicy { size: 1, ttl: Duration::from_secs(5) })
        .await
        .expect("publish");
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut raw).await.expect("keys");
    keys.sort();
    assert_eq!(keys, ["{t:ghost}:meta", "{t:ghost}:stream", "{t}:base"]);
}

#[tokio::test]
async fn a_missed_publication_is_filled_from_the_stream() {
    let (e, rec) = {
        let e = engine();
        let rec = Arc::new(crate::engine::conformance::Recorder::default());
        e.set_delivery(rec.clone());
        (e, rec)
    };
    let keep = HistoryPolicy { size: 10, ttl: Duration::from_secs(60) };
    e.listen("g").await.expect("listen");
    e.publish("g", Publish::data(Bytes::from_static(b"1")), keep).await.expect("publish");
    assert_eq!(rec.wait_for(1).await.len(), 1);
    // Offset 2 is stored but its pub/sub message never reaches this node (written straight
    // into Redis, as a message lost on the link would be); 3 arrives normally.
    let mut raw = raw(&e).await;
    let _: i64 =
        redis::cmd("HINCRBY").arg(e.inner.key("g", "meta")).arg("o").arg(1).query_async(&mut raw).await.expect("incr");
    let now: u64 =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let _: String = redis::cmd("XADD")
        .arg(e.inner.key("g", "stream"))
        .arg("0-2")
        .arg("b")
        .arg(encode_body(None, None, b"2"))
        .arg("t")
        .arg(now)
        .query_async(&mut raw)
        .await
        .expect("xadd");
    e.publish("g", Publish::data(Bytes::from_static(b"3")), keep).await.expect("publish");
    let seen = rec.wait_for(3).await;
    let got: Vec<(u64, Bytes)> = seen.iter().map(|(_, _, r)| (r.offset, r.data.clone())).collect();
    assert_eq!(got, [(1, Bytes::from_static(b"1")), (2, Bytes::from_static(b"2")), (3, Bytes::from_static(b"3"))]);
}

/// A publication is one round trip: one `EVALSHA`, and no other command, once the script
/// is loaded and the stream exists (only the publication that creates a stream reads the
/// epoch's inputs).
#[tokio::test]
async fn a_publication_is_one_evalsha() {
    let e = engine();
    let keep = HistoryPolicy { size: 10, ttl: Duration::from_secs(60) };
    e.publish("r", Publish::data(Bytes::from_static(b"0")), keep).await.expect("warm up");
    let mut raw = raw(&e).await;
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut raw).await.expect("reset");
    for i in 1..=50 {
        e.publish("r", Publish::data(Bytes::from(i.to_string())), keep).await.expect("publish");
    }
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut raw).await.expect("info");
    let calls = |line: &str| -> u64 {
        line.split("calls=").nth(1).and_then(|r| r.split(',').next()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let mut seen: Vec<(String, u64)> = info
        .lines()
        .filter_map(|l| Some((l.strip_prefix("cmdstat_")?.split(':').next()?.to_owned(), calls(l))))
        .filter(|(c, _)| !matches!(c.as_str(), "info" | "config|resetstat" | "ping"))
        .collect();
    seen.sort();
    let want: Vec<(String, u64)> = [
        // The one round trip per publication; the rest run inside it.
        ("evalsha", 50),
        ("hincrby", 50),
        ("hmget", 50),
        ("pexpire", 100),
        ("publish", 50),
        ("time", 50),
        ("xadd", 50),
    ]
    .iter()
    .map(|(c, n)| (c.to_string(), *n))
    .collect();
    assert_eq!(seen, want, "{info}");
}

/// Two nodes on one Redis: what one publishes reaches the other with its tags and its
/// exclusion, and a channel event's bytes cross unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_exclusions_and_events_cross_nodes() {
    let a = engine();
    let b = RedisEngine::new(&RedisConfig::new(a.server.as_ref().expect("server").url(), "t")).expect("b");
    let rec = Arc::new(crate::engine::conformance::Recorder::default());
    b.set_delivery(rec.clone());
    b.listen("x").await.expect("listen");
    let tags: Arc<Tags> = Arc::new([("event".to_owned(), "client-typing".to_owned())].into());
    let p = Publish { data: Bytes::from_static(b"{}"), tags: Some(tags.clone()), exclude: Some(42), info: None };
    a.publish("x", p, HistoryPolicy { size: 10, ttl: Duration::from_secs(60) }).await.expect("publish");
    let seen = rec.wait_for(1).await;
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].2.tags.clone(), seen[0].2.exclude), (Some(tags), Some(42)));
    let event = crate::hub::ChannelEvent::Client {
        event: "client-typing".into(),
        data: "{\"a\":1}".into(),
        user: Some("u".into()),
        exclude: Some(42),
    };
    a.broadcast("x", event.encode()).await.expect("broadcast");
    for _ in 0..500 {
        if !rec.notes.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let notes = rec.notes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(notes.len(), 1);
    assert_eq!(crate::hub::ChannelEvent::decode(&notes[0].1), Some(event));
}

/// A delivery handler that takes its time (a node too busy to keep up with Redis).
struct Slow(Arc<crate::engine::conformance::Recorder>);

impl Delivery for Slow {
    fn deliver(&self, channel: &str, position: &StreamPosition, publication: &PublicationRecord) {
        #[allow(clippy::disallowed_methods)] // on purpose: a delivery that blocks its caller
        std::thread::sleep(Duration::from_millis(2));
        self.0.deliver(channel, position, publication);
    }

    fn lost(&self, channel: &str) {
        self.0.lost(channel);
    }
}

/// An engine whose link holds at most 4 KiB of undelivered messages, and a slow handler.
fn slow_engine() -> (RedisEngine, Arc<crate::engine::conformance::Recorder>) {
    let server = RedisServer::start().expect("redis-server");
    let mut settings = RedisConfig::new(server.url(), "t");
    settings.max_link_bytes = 4096;
    let mut e = RedisEngine::new(&settings).expect("engine");
    e.server = Some(server);
    let rec = Arc::new(crate::engine::conformance::Recorder::default());
    e.set_delivery(Arc::new(Slow(rec.clone())));
    (e, rec)
}

/// Past `max_link_bytes` the link drops messages; what it dropped is read back from the
/// stream, so every publication is still delivered once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_falls_behind_refills_from_history() {
    let (e, rec) = slow_engine();
    let keep = HistoryPolicy { size: 1000, ttl: Duration::from_secs(60) };
    e.listen("b").await.expect("listen");
    let body = Bytes::from(vec![b'x'; 200]);
    for _ in 0..200 {
        e.publish("b", Publish::data(body.clone()), keep).await.expect("publish");
    }
    let seen = rec.wait_for(200).await;
    let offsets: Vec<u64> = seen.iter().map(|(_, _, r)| r.offset).collect();
    assert_eq!(offsets, (1..=200).collect::<Vec<_>>(), "once each, in order");
    assert!(e.inner.overflows.load(Ordering::Relaxed) > 0, "the bound was reached");
    assert!(e.inner.queued_bytes.load(Ordering::Relaxed) <= 4096);
    assert!(rec.lost.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
}

/// Without history to read back from, the subscribers are told to recover: no silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_falls_behind_without_history_makes_subscribers_recover() {
    let (e, rec) = slow_engine();
    e.listen("z").await.expect("listen");
    let body = Bytes::from(vec![b'x'; 200]);
    for _ in 0..200 {
        e.publish("z", Publish::data(body.clone()), HistoryPolicy::NONE).await.expect("publish");
    }
    for _ in 0..500 {
        if !rec.lost.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(e.inner.overflows.load(Ordering::Relaxed) > 0, "the bound was reached");
    let lost = rec.lost.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(!lost.is_empty() && lost.iter().all(|c| c == "z"), "{lost:?}");
}

/// Concurrent publications share the node's one command connection (pipelined by the
/// multiplexer): a node holds two connections to Redis, whatever the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publications_share_one_connection() {
    let e = Arc::new(engine());
    let keep = HistoryPolicy { size: 10, ttl: Duration::from_secs(60) };
    e.listen("p0").await.expect("listen");
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let e = e.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    e.publish(&format!("p{}", i % 8), Publish::data(Bytes::from_static(b"1")), keep)
                        .await
                        .expect("publish");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let mut raw = raw(&e).await;
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut raw).await.expect("client list");
    assert_eq!(list.lines().count(), 3, "the command connection, the pub/sub link, this test's: {list}");
}

#[tokio::test]
async fn expired_presence_is_reported_once_per_user_that_left() {
    let e = engine();
    let entry = |client: &str, user: &str| PresenceEntry { client: client.into(), user: user.into(), info: None };
    let short = Duration::from_millis(100);
    e.presence_add("p", entry("c1", "u1"), short).await.expect("add");
    e.presence_add("p", entry("c2", "u1"), short).await.expect("add");
    e.presence_add("p", entry("c3", "u2"), short).await.expect("add");
    e.presence_add("p", entry("c4", "u2"), Duration::from_secs(60)).await.expect("add");
    assert_eq!(e.presence_expire("p").await, Ok(vec![]), "nothing expired yet");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(e.presence_stats("p").await, Ok(PresenceStats { clients: 1, users: 1 }), "reads skip expired");
    let left = e.presence_expire("p").await.expect("expire");
    assert_eq!(left.len(), 1, "u1 left with its last connection; u2 is still here: {left:?}");
    assert_eq!(left[0].user, "u1");
    assert_eq!(e.presence_expire("p").await, Ok(vec![]), "reported once");
    assert_eq!(
        e.presence_add("p", entry("c5", "u1"), short).await,
        Ok(PresenceChange::UserJoined),
        "u1 counts as gone"
    );
}

#[tokio::test]
async fn a_forgotten_stream_makes_its_subscribers_recover() {
    let e = engine();
    let rec = Arc::new(crate::engine::conformance::Recorder::default());
    e.set_delivery(rec.clone());
    let keep = HistoryPolicy { size: 10, ttl: Duration::from_secs(60) };
    e.listen("f").await.expect("listen");
    let mut old = None;
    for i in 1..=2 {
        old = Some(e.publish("f", Publish::data(Bytes::from(i.to_string())), keep).await.expect("publish"));
    }
    let old = old.expect("published");
    assert_eq!(rec.wait_for(2).await.len(), 2);
    // Redis forgets everything while the node runs: the next stream's epoch differs
    // (the base is made again), so its offset 1 cannot look like old offset 1.
    let mut raw = raw(&e).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await.expect("flush");
    let pos = e.publish("f", Publish::data(Bytes::from_static(b"9")), keep).await.expect("publish");
    assert!(pos.epoch != old.epoch && pos.offset == 1, "{pos:?} after {old:?}");
    for _ in 0..500 {
        if !rec.lost.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*rec.lost.lock().unwrap_or_else(|e| e.into_inner()), ["f"], "subscribers told to recover");
}

/// Whatever part of Redis's state goes, the epoch a new stream gets changes: the prefix's
/// base (a `FLUSHALL`), the channel's own keys (an eviction: `evicted_keys` moves; here
/// the count is what an eviction leaves, simulated by deleting the keys and evicting
/// another key), and never does a node's memory bring an old epoch back.
#[tokio::test]
async fn a_recreated_stream_never_gets_an_old_epoch() {
    let e = engine();
    let keep = HistoryPolicy { size: 10, ttl: Duration::from_secs(60) };
    let mut raw = raw(&e).await;
    let mut seen = HashSet::new();
    let first = e.publish("r", Publish::data(Bytes::from_static(b"1")), keep).await.expect("publish");
    assert!(seen.insert(first.epoch.clone()));
    assert_eq!(first.epoch.len(), 16, "an opaque string: {first:?}");

    // Only the base goes: the next new stream's epoch differs.
    let channel_keys = [e.inner.key("r", "meta"), e.inner.key("r", "stream")];
    let _: () = redis::cmd("DEL").arg("{t}:base").arg(&channel_keys).query_async(&mut raw).await.expect("del");
    let p = e.publish("r", Publish::data(Bytes::from_static(b"1")), keep).await.expect("publish");
    assert!(p.offset == 1 && seen.insert(p.epoch.clone()), "{p:?}");

    // The base stays, the channel is evicted: Redis counts the eviction, the epoch moves.
    let base: String = redis::cmd("GET").arg("{t}:base").query_async(&mut raw).await.expect("get");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-random")
        .query_async(&mut raw)
        .await
        .expect("policy");
    let _: () = redis::cmd("SET").arg("filler").arg(vec![b'x'; 1 << 20]).query_async(&mut raw).await.expect("set");
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut raw).await.expect("info");
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory");
    let before: String = redis::cmd("INFO").arg("stats").query_async(&mut raw).await.expect("info");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used - (512 << 10))
        .query_async(&mut raw)
        .await
        .expect("maxmemory");
    // Any command that may allocate makes Redis evict down to the bound.
    let _: () = redis::cmd("SET").arg("poke").arg("1").query_async(&mut raw).await.expect("poke");
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0).query_async(&mut raw).await.expect("unbounded");
    let after: String = redis::cmd("INFO").arg("stats").query_async(&mut raw).await.expect("info");
    let evicted = |i: &str| i.lines().find_map(|l| l.strip_prefix("evicted_keys:")).map(|v| v.trim().to_owned());
    assert_ne!(evicted(&before), evicted(&after), "Redis evicted something");
    // Whatever the eviction took, the channel is gone and the base is as it was: only the
    // count differs.
    let _: () = redis::cmd("DEL").arg(&channel_keys).query_async(&mut raw).await.expect("del");
    let _: () = redis::cmd("SET").arg("{t}:base").arg(base).query_async(&mut raw).await.expect("set");
    let p = e.publish("r", Publish::data(Bytes::from_static(b"1")), keep).await.expect("publish");
    assert!(p.offset == 1 && seen.insert(p.epoch.clone()), "{p:?} repeats one of {seen:?}");
}

/// Two nodes publishing to a new channel at once agree on one epoch: the script that
/// creates the stream decides it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_creating_one_stream_at_once_agree_on_its_epoch() {
    let a = Arc::new(engine());
    let b = Arc::new(RedisEngine::new(&RedisConfig::new(a.server.as_ref().expect("server").url(), "t")).expect("b"));
    let keep = HistoryPolicy { size: 100, ttl: Duration::from_secs(60) };
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let e = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..10 {
                    out.push(e.publish("new", Publish::data(Bytes::from_static(b"1")), keep).await.expect("publish"));
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let epochs: HashSet<_> = all.iter().map(|p| p.epoch.clone()).collect();
    assert_eq!(epochs.len(), 1, "{epochs:?}");
    let mut offsets: Vec<u64> = all.iter().map(|p| p.offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=80).collect::<Vec<_>>());
}

/// The backoff schedule, as pure logic with seeded generators standing in for nodes.
#[test]
fn reconnect_delays_grow_within_bounds_and_are_jittered() {
    use rand::SeedableRng;
    let (floor, cap) = (Duration::from_millis(50), Duration::from_secs(1));
    let schedule = |seed: u64, n: usize| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut b = Backoff::new(floor, cap);
        (0..n).map(|_| b.next(&mut rng)).collect::<Vec<_>>()
    };
    // Bounds: never under the floor, never over the cap, never over 3 × the previous.
    for seed in 0..200 {
        let s = schedule(seed, 40);
        let mut prev = floor;
        for d in &s {
            assert!(*d >= floor && *d <= cap, "seed {seed}: {d:?}");
            assert!(*d <= (prev * 3).min(cap).max(floor), "seed {seed}: {d:?} after {prev:?}");
            prev = *d;
        }
        assert_eq!(s, schedule(seed, 40), "a seed gives one schedule");
    }
    // Growth: averaged over many nodes, later delays are longer, up to near the cap.
    let mean = |attempt: usize| {
        let total: Duration = (0..500).map(|seed| schedule(seed, attempt + 1)[attempt]).sum();
        total / 500
    };
    let (m0, m3, m15) = (mean(0), mean(3), mean(15));
    assert!(m0 <= Duration::from_millis(150), "the first retry is quick: {m0:?}");
    assert!(m3 > m0 * 2, "grows: {m0:?} then {m3:?}");
    // (Decorrelated jitter settles around 40 % of the cap: each delay is drawn from up
    // to three times the one before, which may itself have been short.)
    assert!(m15 > cap / 4 && m15 > m0 * 3 && m15 <= cap, "settles in the cap's range: {m15:?}");
    // Jitter: nodes that started together are spread, at every attempt.
    for attempt in [0, 5, 20] {
        let at: Vec<Duration> = (0..100).map(|seed| schedule(seed, attempt + 1)[attempt]).collect();
        let distinct: HashSet<_> = at.iter().collect();
        assert!(distinct.len() > 90, "attempt {attempt}: {} distinct of 100", distinct.len());
        let (lo, hi) = (at.iter().min().copied().unwrap_or_default(), at.iter().max().copied().unwrap_or_default());
        assert!(hi - lo > Duration::from_millis(50), "attempt {attempt}: spread {lo:?}..{hi:?}");
    }
    // After Redis answered, the next outage starts from the floor's range again.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut b = Backoff::new(floor, cap);
    for _ in 0..20 {
        b.next(&mut rng);
    }
    b.reset();
    assert!(b.next(&mut rng) <= floor * 3);
    // A cap under the floor is the floor.
    let mut b = Backoff::new(floor, Duration::ZERO);
    assert_eq!(b.next(&mut rng), floor);
}

/// TLS files rustls would refuse at connect time are refused up front, by key: a
/// certificate that does not belong to the key, an X.509 v1 certificate (what `openssl
/// x509 -req` makes without `-extfile`; a fixture made that way), files that are not PEM.
#[test]
fn unusable_tls_files_are_named_before_connecting() {
    let dir = tempfile::tempdir().expect("dir");
    let (tls, cert, key) = tls::pki(dir.path()).expect("pki");
    let with = |ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path| {
        let mut s = RedisConfig::new("rediss://127.0.0.1:1", "t");
        (s.tls_ca, s.tls_cert, s.tls_key) = (ca.into(), cert.into(), key.into());
        s.check_tls_files().map_err(|(k, m)| (k, m.to_lowercase()))
    };
    with(&tls.ca, &cert, &key).expect("a good set");
    let (k, m) = with(&tls.ca, &cert, &tls.key).expect_err("another key");
    assert_eq!(k, "engine.redis.tls_cert", "{m}");
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let v1 = (fixtures.join("test-only-x509-v1-cert.pem"), fixtures.join("test-only-x509-v1-key.pem"));
    let (k, m) = with(&tls.ca, &v1.0, &v1.1).expect_err("X.509 v1");
    assert!(k == "engine.redis.tls_cert" && m.contains("version"), "{k}: {m}");
    assert_eq!(with(&tls.key, &cert, &key).map_err(|e| e.0), Err("engine.redis.tls_ca"), "a key is no CA");
    assert_eq!(with(&tls.ca, &key, &key).map_err(|e| e.0), Err("engine.redis.tls_cert"), "a key is no cert");
    assert_eq!(with(&tls.ca, &cert, &cert).map_err(|e| e.0), Err("engine.redis.tls_key"), "a cert is no key");
    let (_, m) = with(&tls.ca, &cert, &tls.ca).expect_err("no key");
    assert!(!m.contains("begin certificate-----\nmii"), "never quotes the file: {m}");
}

#[test]
fn bodies_round_trip() {
    let info = ClientInfo { user: "u\n1".into(), client: "c".into() };
    let body = encode_body(Some(&info), None, b"{\"a\":\n1}");
    assert_eq!(decode_body(Bytes::from(body)), Some((Some(info.clone()), None, Bytes::from_static(b"{\"a\":\n1}"))));
    let tags: Tags = [("event".to_owned(), "a\nb#{".to_owned()), ("k\n".to_owned(), String::new())].into();
    let body = encode_body(Some(&info), Some(&tags), b"#\n");
    let tags = Some(Arc::new(tags));
    assert_eq!(decode_body(Bytes::from(body)), Some((Some(info), tags.clone(), Bytes::from_static(b"#\n"))));
    let body = encode_body(None, tags.as_deref(), b"{}");
    assert_eq!(decode_body(Bytes::from(body)), Some((None, tags.clone(), Bytes::from_static(b"{}"))));
    let mut p = b"12\nabc-3\n\n".to_vec();
    p.extend(encode_body(None, None, b"7"));
    let (pos, rec) = decode_publication(Bytes::from(p)).expect("decodes");
    assert_eq!((pos.offset, &*pos.epoch, rec.data, rec.exclude), (12, "abc-3", Bytes::from_static(b"7"), None));
    let mut p = b"12\nabc-3\n4294967297\n".to_vec();
    p.extend(encode_body(None, tags.as_deref(), b"7"));
    let (_, rec) = decode_publication(Bytes::from(p)).expect("decodes");
    assert_eq!((rec.exclude, rec.tags), (Some(4_294_967_297), tags));
    assert_eq!(decode_publication(Bytes::from_static(b"x\n")), None);
    assert_eq!(decode_publication(Bytes::from_static(b"1\ne\nnope\n\n{}")), None);
    assert_eq!(decode_body(Bytes::from_static(b"#{\"a\":1}\n\n{}")), None, "tags are strings");
    let e = PresenceEntry { client: "c".into(), user: "a:b".into(), info: Some(Bytes::from_static(b"{}")) };
    assert_eq!(decode_presence("c".into(), &encode_presence(&e)), Some(e));
}
