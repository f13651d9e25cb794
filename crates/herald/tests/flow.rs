//! Flow control over real sockets: latest-value conflation (`conflation = "latest"`,
//! `max_rate`) and per-namespace write merging (`write_delay`). Counts and bounds, not speed.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use herald::config::{Conflation, NamespaceOptions};
use herald::Config;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

/// The tests read process-wide counters from `/metrics`: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MAX_RATE: u32 = 10;

fn config() -> Config {
    let mut c = Config::default();
    let ns = &mut c.channels.namespaces;
    ns.insert(
        "ticks".into(),
        NamespaceOptions { conflation: Conflation::Latest, max_rate: MAX_RATE, ..Default::default() },
    );
    ns.insert("chat".into(), NamespaceOptions::default());
    ns.insert("dash".into(), NamespaceOptions { write_delay: Duration::from_secs(2), ..Default::default() });
    c
}

async fn publish(addr: SocketAddr, channel: &str, seq: u64) {
    let (status, body) =
        api(addr, "publish", &json!({"channel": channel, "data": {"seq": seq}}).to_string(), None).await;
    assert_eq!(status, 200, "{body}");
}

/// A counter from `/metrics` (summed over its labels).
async fn counter(addr: SocketAddr, name: &str) -> u64 {
    let (head, mut s) = raw_request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("metrics");
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// (channel, offset, data.seq, conflated) of a pub push.
fn pub_of(push: &Value) -> (String, u64, u64, bool) {
    let p = &push["push"];
    let publication = &p["pub"];
    (
        p["channel"].as_str().unwrap_or_default().to_owned(),
        publication["offset"].as_u64().unwrap_or(0),
        publication["data"]["seq"].as_u64().unwrap_or(0),
        publication["conflated"] == true,
    )
}

#[tokio::test]
async fn a_conflated_subscriber_gets_the_newest_at_max_rate_while_other_namespaces_get_everything() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    let mut c = Native::connected(addr).await;
    let r = c.request("subscribe", json!({"channel": "ticks:eurusd"})).await;
    assert_eq!(r["subscribe"]["conflated"], true, "{r}");
    let r = c.request("subscribe", json!({"channel": "chat:room"})).await;
    assert!(r["subscribe"].get("conflated").is_none(), "{r}");

    const TICKS: u64 = 300;
    const CHATS: u64 = 40;
    let started = Instant::now();
    let ticker = tokio::spawn(async move {
        for seq in 1..=TICKS {
            publish(addr, "ticks:eurusd", seq).await;
        }
    });
    let chat = tokio::spawn(async move {
        for seq in 1..=CHATS {
            publish(addr, "chat:room", seq).await;
        }
    });
    ticker.await.expect("ticker");
    chat.await.expect("chat");
    let published_in = started.elapsed();

    let (mut ticks, mut chats) = (Vec::new(), Vec::new());
    while ticks.last().map(|t: &(String, u64, u64, bool)| t.1) != Some(TICKS) || (chats.len() as u64) < CHATS {
        let p = pub_of(&c.push().await);
        if p.0 == "ticks:eurusd" {
            ticks.push(p)
        } else {
            chats.push(p)
        }
    }
    let received_in = started.elapsed();

    // Conflated: increasing offsets, each value the one published at that offset, marked, and
    // the last one is the newest.
    assert!(ticks.windows(2).all(|w| w[0].1 < w[1].1), "increasing offsets: {ticks:?}");
    assert!(ticks.iter().all(|t| t.2 == t.1 && t.3), "each the value at its offset, marked conflated: {ticks:?}");
    assert_eq!(ticks.last().map(|t| t.2), Some(TICKS), "the last value is the newest");
    // At most one per period (plus the first, sent at once), never the backlog.
    let bound = received_in.as_secs_f64() * f64::from(MAX_RATE) + 2.0;
    assert!(
        (ticks.len() as f64) <= bound,
        "{} deliveries in {received_in:?} (published in {published_in:?}): more than max_rate allows ({bound})",
        ticks.len()
    );
    assert!((ticks.len() as u64) < TICKS, "conflated: {} of {TICKS}", ticks.len());

    // The other namespace on the same connection: every offset once, in order, not marked.
    let offsets: Vec<u64> = chats.iter().map(|c| c.1).collect();
    assert_eq!(offsets, (1..=CHATS).collect::<Vec<_>>());
    assert!(chats.iter().all(|c| !c.3));

    // History keeps everything.
    let (status, h) = api(addr, "history", &json!({"channel": "ticks:eurusd"}).to_string(), None).await;
    assert_eq!(status, 200, "{h}");
    let stored: Vec<u64> =
        h["publications"].as_array().expect("publications").iter().filter_map(|p| p["offset"].as_u64()).collect();
    assert_eq!(stored, (1..=TICKS).collect::<Vec<_>>(), "history holds every publication");
    assert!(counter(addr, "herald_conflated_total").await >= TICKS - ticks.len() as u64);
    server.shutdown().await;
}

#[tokio::test]
async fn recovery_in_a_conflated_namespace_returns_only_the_newest_missed() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(config()).await;
    let mut c = Native::connected(server.addr).await;
    let r = c.request("subscribe", json!({"channel": "ticks:btc"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().expect("epoch").to_owned();
    drop(c);
    for seq in 1..=20 {
        publish(server.addr, "ticks:btc", seq).await;
    }
    let mut c = Native::connected(server.addr).await;
    let r = c.request("subscribe", json!({"channel": "ticks:btc", "recover": true, "epoch": epoch, "offset": 0})).await;
    let s = &r["subscribe"];
    assert_eq!(
        (s["recovered"].as_bool(), s["offset"].as_u64(), s["conflated"].as_bool()),
        (Some(true), Some(20), Some(true)),
        "{r}"
    );
    let pubs = s["publications"].as_array().expect("publications");
    assert_eq!(pubs.len(), 1, "no backlog: {r}");
    assert_eq!((pubs[0]["offset"].as_u64(), pubs[0]["data"]["seq"].as_u64()), (Some(20), Some(20)));
    publish(server.addr, "ticks:btc", 21).await;
    assert_eq!(pub_of(&c.push().await), ("ticks:btc".into(), 21, 21, true), "then live");
    server.shutdown().await;
}

#[tokio::test]
async fn a_namespace_write_delay_merges_its_publications_into_few_writes() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    let mut c = Native::connected(addr).await;
    c.request("subscribe", json!({"channel": "dash:cpu"})).await;
    c.request("subscribe", json!({"channel": "chat:ops"})).await;
    const N: u64 = 20;

    // Immediate namespace, each push read before the next publish: one write each.
    let (frames0, writes0) =
        (counter(addr, "herald_frames_sent_total").await, counter(addr, "herald_writes_total").await);
    for seq in 1..=N {
        publish(addr, "chat:ops", seq).await;
        assert_eq!(pub_of(&c.push().await).1, seq);
    }
    let (frames1, writes1) =
        (counter(addr, "herald_frames_sent_total").await, counter(addr, "herald_writes_total").await);
    assert_eq!(frames1 - frames0, N);
    assert_eq!(writes1 - writes0, N, "no delay: a write per publication");

    // The dashboard namespace (write_delay = 2s): publications wait for each other.
    let started = Instant::now();
    for seq in 1..=N {
        publish(addr, "dash:cpu", seq).await;
    }
    let published_in = started.elapsed();
    for seq in 1..=N {
        assert_eq!(pub_of(&c.push().await).1, seq, "every one, in order");
    }
    let (frames2, writes2) =
        (counter(addr, "herald_frames_sent_total").await, counter(addr, "herald_writes_total").await);
    assert_eq!(frames2 - frames1, N);
    // Published within one delay, they share one write (a second if publishing took longer).
    let bound = 1 + published_in.as_secs() / 2;
    assert!(writes2 - writes1 <= bound, "{} writes for {N} delayed frames (bound {bound})", writes2 - writes1);

    // A publication of the immediate namespace takes waiting ones along at once.
    publish(addr, "dash:cpu", N + 1).await;
    publish(addr, "chat:ops", N + 1).await;
    let a = pub_of(&c.push().await);
    let b = pub_of(&c.push().await);
    assert_eq!((a.0.as_str(), b.0.as_str()), ("dash:cpu", "chat:ops"));
    let writes3 = counter(addr, "herald_writes_total").await;
    assert_eq!(writes3 - writes2, 1, "the waiting frame went out with the immediate one");
    server.shutdown().await;
}

/// Offsets a subscriber saw for `channel`: its subscribe reply's recovered publications, then
/// pushes, until `last`.
async fn offsets_until(c: &mut Native, reply: &Value, last: u64) -> Vec<u64> {
    let mut got: Vec<u64> = reply["subscribe"]["publications"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["offset"].as_u64()).collect())
        .unwrap_or_default();
    while got.last().copied().unwrap_or(0) < last {
        got.push(pub_of(&c.push().await).1);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_channel_fanned_out_off_the_publishers_path_delivers_every_offset_once_in_order() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    // More subscribers than the hub fans out on the publisher's path.
    let members = herald::hub::FANOUT_OFFLOAD + 100;
    let mut clients = Vec::new();
    for _ in 0..members {
        let mut c = Native::connected(addr).await;
        let r = c.request("subscribe", json!({"channel": "big"})).await;
        clients.push((c, r));
    }
    const PER_PUBLISHER: u64 = 30;
    const PUBLISHERS: u64 = 3;
    const TOTAL: u64 = PER_PUBLISHER * PUBLISHERS;
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            tokio::spawn(async move {
                for i in 0..PER_PUBLISHER {
                    publish(addr, "big", p * 1000 + i).await;
                }
            })
        })
        .collect();
    // Some subscribe while publications flow, recovering from the start.
    let epoch = clients[0].1["subscribe"]["epoch"].as_str().expect("epoch").to_owned();
    let mut late = Vec::new();
    for _ in 0..5 {
        let mut c = Native::connected(addr).await;
        let r = c.request("subscribe", json!({"channel": "big", "recover": true, "epoch": epoch, "offset": 0})).await;
        assert_eq!(r["subscribe"]["recovered"], true, "{r}");
        late.push((c, r));
    }
    for p in publishers {
        p.await.expect("publisher");
    }
    for (c, r) in clients.iter_mut().chain(late.iter_mut()) {
        let got = offsets_until(c, r, TOTAL).await;
        assert_eq!(got, (1..=TOTAL).collect::<Vec<_>>(), "every offset once, in order");
    }
    server.shutdown().await;
}
