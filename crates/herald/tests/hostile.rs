//! Hostile clients over real sockets. Each attack gets its documented answer (error reply,
//! close code or refused connection, see `docs/security.md#limits`); a healthy subscriber
//! connected throughout receives every publication in order; and the counts the server exposes
//! (`/api/info`: sessions, channels, subscriptions, stored channels, history bytes) return to
//! their baseline afterwards. Bounds on counts only, never on time.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use herald::auth::AuthConfig;
use herald::config::{NamespaceOptions, Secret};
use herald::ws::{deflate, frame, frame::OpCode};
use herald::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const MASK: Option<[u8; 4]> = Some([9, 8, 7, 6]);
/// The healthy subscriber's channel: no history, so what the attack leaves is the attack's.
const HEALTHY: &str = "calm:healthy";

fn config() -> Config {
    let mut c = Config::default();
    let ns = NamespaceOptions { publish: true.into(), presence: true, ..Default::default() };
    c.channels.namespaces.insert("chat".into(), ns);
    let calm = NamespaceOptions { presence: true, history_size: 0, ..Default::default() };
    c.channels.namespaces.insert("calm".into(), calm);
    // Where attacks that must succeed publish: forgotten by the first sweep after.
    let brief =
        NamespaceOptions { publish: true.into(), history_ttl: Duration::from_millis(200), ..Default::default() };
    c.channels.namespaces.insert("brief".into(), brief);
    c
}

/// The counts to return to: taken once the healthy channel has its position (kept 5 minutes).
async fn baseline(addr: SocketAddr) -> [u64; 5] {
    let (status, body) = api(addr, "publish", &json!({"channel": HEALTHY, "data": {"seq": 0}}).to_string(), None).await;
    assert_eq!(status, 200, "{body}");
    counts(&info(addr).await)
}

/// Limits out of the way, for attacks that are about something else.
fn unlimited(mut c: Config) -> Config {
    c.limits.commands_per_second = 1_000_000;
    c.limits.commands_burst = 1_000_000;
    c.limits.publications_per_second = 1_000_000;
    c.limits.publications_burst = 1_000_000;
    c
}

async fn info(addr: SocketAddr) -> Value {
    let (status, body) = api(addr, "info", "{}", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The counts that must come back after an attack.
fn counts(info: &Value) -> [u64; 5] {
    ["connections", "channels", "subscriptions", "stored_channels", "history_bytes"]
        .map(|k| info[k].as_u64().unwrap_or_else(|| panic!("{k} in {info}")))
}

/// Waits (bounded) until the server's counts are back to `baseline`.
async fn back_to(addr: SocketAddr, baseline: [u64; 5]) {
    let mut now = [0; 5];
    for _ in 0..300 {
        now = counts(&info(addr).await);
        if now == baseline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("counts {now:?} did not return to {baseline:?} (connections, channels, subscriptions, stored, bytes)");
}

async fn metric(addr: SocketAddr, name_and_labels: &str) -> f64 {
    let (head, mut s) = raw_request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("metrics");
    body.lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A well-behaved subscriber, connected through an attack, that must see every publication.
struct Healthy {
    client: Native,
    published: u64,
}

impl Healthy {
    async fn join(addr: SocketAddr) -> Self {
        let mut client = Native::connected(addr).await;
        let r = client.request("subscribe", json!({"channel": HEALTHY})).await;
        assert!(r.get("subscribe").is_some(), "{r}");
        Self { client, published: r["subscribe"]["offset"].as_u64().expect("offset") }
    }

    /// Publishes the next sequence number through the API.
    async fn publish(&mut self, addr: SocketAddr) {
        self.published += 1;
        let body = json!({"channel": HEALTHY, "data": {"seq": self.published}}).to_string();
        let (status, r) = api(addr, "publish", &body, None).await;
        assert_eq!(status, 200, "{r}");
    }

    /// Every publication arrived, once, in order.
    async fn check(mut self, from: u64) {
        for seq in from..=self.published {
            let p = self.client.push().await;
            assert_eq!(p["push"]["pub"]["data"]["seq"], seq, "{p}");
        }
        let r = self.client.request("presence_stats", json!({"channel": HEALTHY})).await;
        assert!(r.get("presence_stats").is_some(), "still connected: {r}");
    }
}

/// Runs `attack` while publishing to the healthy subscriber before, during and after it.
async fn survive<F: std::future::Future<Output = ()>>(addr: SocketAddr, attack: F) {
    let mut healthy = Healthy::join(addr).await;
    let from = healthy.published + 1;
    healthy.publish(addr).await;
    let publisher = async {
        for _ in 0..20 {
            healthy.publish(addr).await;
            tokio::task::yield_now().await;
        }
    };
    tokio::join!(attack, publisher);
    healthy.publish(addr).await;
    healthy.check(from).await;
}

/// Writes `commands` on a fresh connection without reading, then reads: the ids answered in
/// order, the error codes among them, and the close code if the server closed.
async fn pipeline(addr: SocketAddr, commands: Vec<String>) -> (Vec<u64>, Vec<u64>, Option<u16>) {
    pipeline_with(addr, "/connect", commands, None, false).await
}

/// [`pipeline`] with a fixed socket receive buffer (so the kernel holds little for us), and
/// with `hold`, not reading either until the server counted a slow consumer (bounded wait),
/// on the door at `path` (`/connect`, or Centrifugo's `/connection/websocket`: same commands).
async fn pipeline_with(
    addr: SocketAddr,
    path: &str,
    commands: Vec<String>,
    recv_buffer: Option<u32>,
    hold: bool,
) -> (Vec<u64>, Vec<u64>, Option<u16>) {
    let slow_before = metric(addr, "herald_slow_consumers_total").await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    let stream = socket.connect(addr).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), stream).await.expect("upgrade");
    let (mut tx, mut rx) = ws.split();
    let last = commands.len() as u64 + 1;
    let writer = tokio::spawn(async move {
        let _ = tx.feed(Message::text(r#"{"id":1,"connect":{}}"#)).await;
        for cmd in commands {
            if tx.feed(Message::text(cmd)).await.is_err() {
                break;
            }
        }
        let _ = tx.flush().await;
        tx
    });
    // Not reading until everything is written.
    let _tx = writer.await.expect("writer");
    for _ in 0..if hold { 200 } else { 0 } {
        if metric(addr, "herald_slow_consumers_total").await > slow_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut ids, mut errors) = (Vec::new(), Vec::new());
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
            Err(_) => panic!("no reply, no close: {} replies of {last} and the connection open", ids.len()),
            Ok(None | Some(Err(_))) => return (ids, errors, None),
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                if let Some(id) = v.get("id").and_then(Value::as_u64) {
                    ids.push(id);
                    if let Some(code) = v["error"]["code"].as_u64() {
                        errors.push(code);
                    }
                    if id == last {
                        return (ids, errors, None);
                    }
                }
            }
            Ok(Some(Ok(Message::Close(f)))) => return (ids, errors, f.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn in_order_from_1(ids: &[u64]) -> bool {
    ids.iter().enumerate().all(|(i, id)| *id == i as u64 + 1)
}

// Two workers, so that the server's writer runs beside the session, as in production.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_gets_every_reply_or_is_closed_as_slow_consumer() {
    let server = TestServer::start(unlimited(config())).await;
    let baseline = baseline(server.addr).await;
    let slow_before = metric(server.addr, "herald_slow_consumers_total").await;
    let n = 100_000u32;
    let commands = (2..=n + 1).map(|id| format!(r#"{{"id":{id},"unsubscribe":{{"channel":"chat:x"}}}}"#)).collect();
    let mut result = None;
    survive(server.addr, async { result = Some(pipeline(server.addr, commands).await) }).await;
    let (ids, errors, close) = result.expect("ran");
    eprintln!("pipelined {n} commands: {} replies, close {close:?}", ids.len());
    assert!(in_order_from_1(&ids), "replies in order with no gap ({} replies)", ids.len());
    assert!(errors.is_empty(), "{errors:?}");
    assert!(ids.len() as u32 == n + 1 || close == Some(4001), "{} replies of {}, close {close:?}", ids.len(), n + 1);
    if close == Some(4001) {
        assert!(metric(server.addr, "herald_slow_consumers_total").await > slow_before, "counted");
    }
    back_to(server.addr, baseline).await;
    server.shutdown().await;
}

/// Native clients get 4001; the Centrifugo door closes with its own code for a slow client
/// (3008 "slow"), as centrifuge-js expects. One after the other: the slow-consumer counter the
/// pipeline waits on is the process's, shared by servers running at once.
#[tokio::test]
async fn a_client_that_does_not_read_large_replies_is_closed_with_its_doors_slow_code() {
    does_not_read_large_replies("/connect", 4001).await;
    does_not_read_large_replies("/connection/websocket", 3008).await;
}

async fn does_not_read_large_replies(path: &str, code: u16) {
    let mut c = unlimited(config());
    c.websocket.max_queue_bytes = 64 << 10;
    let server = TestServer::start(c).await;
    let kb = "x".repeat(1000);
    for _ in 0..100 {
        let (status, _) =
            api(server.addr, "publish", &json!({"channel": "chat:big", "data": kb}).to_string(), None).await;
        assert_eq!(status, 200);
    }
    let baseline = baseline(server.addr).await;
    let slow_before = metric(server.addr, "herald_slow_consumers_total").await;
    // Each reply carries 10 KB of history: 10 MB in all, far more than a 64 KiB socket
    // receive buffer and the queue hold.
    let n = 1_000u32;
    let commands =
        (2..=n + 1).map(|id| format!(r#"{{"id":{id},"history":{{"channel":"chat:big","limit":10}}}}"#)).collect();
    let mut result = None;
    survive(server.addr, async {
        result = Some(pipeline_with(server.addr, path, commands, Some(64 << 10), true).await)
    })
    .await;
    let (ids, errors, close) = result.expect("ran");
    eprintln!("pipelined {n} history commands on {path}: {} replies, close {close:?}", ids.len());
    assert!(in_order_from_1(&ids), "replies in order with no gap ({} replies)", ids.len());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(close, Some(code), "{} replies", ids.len());
    assert!((ids.len() as u32) < n + 1);
    assert!(metric(server.addr, "herald_slow_consumers_total").await > slow_before, "counted");
    back_to(server.addr, baseline).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_command_flood_is_told_to_slow_down_then_closed() {
    let server = TestServer::start(config()).await;
    let baseline = baseline(server.addr).await;
    let limits = Config::default().limits;
    let n = 2_000u64;
    let commands = (2..=n + 1).map(|id| format!(r#"{{"id":{id},"presence_stats":{{"channel":"chat:x"}}}}"#)).collect();
    let mut result = None;
    survive(server.addr, async { result = Some(pipeline(server.addr, commands).await) }).await;
    let (ids, errors, close) = result.expect("ran");
    eprintln!("flood of {n}: {} answered, {} refused, close {close:?}", ids.len(), errors.len());
    assert!(in_order_from_1(&ids), "every command answered until the close");
    assert_eq!(close, Some(4006), "closed for not slowing down");
    assert!(errors.iter().all(|c| *c == 115), "{errors:?}");
    assert_eq!(errors.len() as u32, limits.max_refusals + 1, "max_refusals refusals, then the close");
    let allowed = ids.len() - errors.len();
    assert!(allowed >= limits.commands_burst as usize, "the burst is allowed: {allowed}");
    assert!(allowed < n as usize / 2, "most of the flood was refused: {allowed}");
    assert!(metric(server.addr, "herald_limit_refusals_total{limit=\"commands_per_second\"}").await >= 101.0);
    back_to(server.addr, baseline).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_publication_flood_is_refused_past_its_own_rate() {
    let mut c = config();
    c.limits.max_refusals = 1_000_000;
    let server = TestServer::start(c).await;
    let limits = Config::default().limits;
    let n = 1_000u64;
    let commands =
        (2..=n + 1).map(|id| format!(r#"{{"id":{id},"publish":{{"channel":"chat:flood","data":{id}}}}}"#)).collect();
    let (ids, errors, close) = pipeline(server.addr, commands).await;
    assert_eq!(close, None);
    assert!(in_order_from_1(&ids) && ids.len() as u64 == n + 1);
    let published = ids.len() - 1 - errors.len();
    assert!(errors.iter().all(|c| *c == 115), "{errors:?}");
    assert!(published >= limits.publications_burst as usize, "{published}");
    assert!(published < n as usize / 2, "most refused: {published}");
    assert!(metric(server.addr, "herald_limit_refusals_total{limit=\"publications_per_second\"}").await > 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn reading_channels_that_do_not_exist_leaves_no_state() {
    let server = TestServer::start(unlimited(config())).await;
    let addr = server.addr;
    let baseline = baseline(addr).await;
    survive(addr, async {
        let mut c = Native::connected(addr).await;
        for i in 0..300 {
            let ch = format!("chat:ghost-{i}-{}", rand_suffix(i));
            let r = c.request("subscribe", json!({"channel": ch, "recover": true, "epoch": "x", "offset": 3})).await;
            assert_eq!(r["subscribe"]["offset"], 0, "{r}");
            assert_eq!(r["subscribe"]["recovered"], false, "{r}");
            c.request("unsubscribe", json!({"channel": ch})).await;
            let r = c.request("history", json!({"channel": format!("chat:h{i}")})).await;
            assert_eq!(r["history"]["offset"], 0, "{r}");
            let r = c.request("presence", json!({"channel": format!("chat:p{i}")})).await;
            assert!(r.get("presence").is_some(), "{r}");
        }
        for i in 0..30 {
            let (mut ws, _) =
                tokio_tungstenite::connect_async(format!("ws://{addr}/ws/ghost-raw-{i}")).await.expect("raw ws");
            ws.close(None).await.expect("close");
            let req = format!("GET /sse/ghost-sse-{i} HTTP/1.1\r\nHost: x\r\n\r\n");
            let (head, s) = raw_request(addr, &req).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            drop(s);
            let (status, _) =
                api(addr, "history", &json!({"channel": format!("api-ghost-{i}")}).to_string(), None).await;
            assert_eq!(status, 200);
        }
    })
    .await;
    back_to(addr, baseline).await;
    server.shutdown().await;
}

fn rand_suffix(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40
}

#[tokio::test]
async fn a_subscriber_of_an_empty_channel_recovers_its_first_publications() {
    let server = TestServer::start(config()).await;
    let mut c = Native::connected(server.addr).await;
    let r = c.request("subscribe", json!({"channel": "chat:later"})).await;
    let (epoch, offset) = (r["subscribe"]["epoch"].clone(), r["subscribe"]["offset"].clone());
    assert_eq!(offset, 0);
    drop(c);
    for i in 1..=3 {
        api(server.addr, "publish", &json!({"channel": "chat:later", "data": i}).to_string(), None).await;
    }
    let mut c = Native::connected(server.addr).await;
    let req = json!({"channel": "chat:later", "recover": true, "epoch": epoch, "offset": 0});
    let r = c.request("subscribe", req).await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    assert_eq!(r["subscribe"]["epoch"], epoch, "{r}");
    let data: Vec<&Value> =
        r["subscribe"]["publications"].as_array().expect("list").iter().map(|p| &p["data"]).collect();
    assert_eq!(data, [&json!(1), &json!(2), &json!(3)]);
    server.shutdown().await;
}

#[tokio::test]
async fn publishing_to_new_channels_stops_at_the_node_limits_and_memory_returns() {
    let mut c = unlimited(config());
    c.limits.max_channels = 40;
    c.limits.max_history_bytes = 32 << 10;
    let short =
        NamespaceOptions { publish: true.into(), history_ttl: Duration::from_millis(500), ..Default::default() };
    c.channels.namespaces.insert("burst".into(), short);
    let server = TestServer::start(c).await;
    let addr = server.addr;
    let baseline = baseline(addr).await;
    let by_limit = |l: &str| format!("herald_limit_refusals_total{{limit=\"{l}\"}}");
    let before = [metric(addr, &by_limit("max_history_bytes")).await, metric(addr, &by_limit("max_channels")).await];
    let kb = "x".repeat(1000);
    let mut refused = [Vec::new(), Vec::new()];
    survive(addr, async {
        let mut c = Native::connected(addr).await;
        // 1 KB each: history bytes run out first; then tiny ones: channels run out.
        for (phase, data, n) in [(0, json!(kb), 200), (1, json!(1), 100)] {
            for i in 0..n {
                let r = c.request("publish", json!({"channel": format!("burst:{phase}-{i}"), "data": data})).await;
                if let Some(code) = r["error"]["code"].as_u64() {
                    refused[phase].push(code);
                }
                let i = info(addr).await;
                assert!(i["stored_channels"].as_u64() <= Some(40), "{i}");
                assert!(i["history_bytes"].as_u64() <= Some(32 << 10), "{i}");
            }
        }
        let (status, body) = api(addr, "publish", &json!({"channel": "burst:api", "data": 1}).to_string(), None).await;
        assert_eq!((status, &body["error"]["code"]), (429, &json!(116)), "{body}");
    })
    .await;
    assert!(refused.iter().flatten().all(|c| *c == 116), "{refused:?}");
    assert!(refused[0].len() >= 150 && refused[1].len() >= 50, "{} {}", refused[0].len(), refused[1].len());
    let after = [metric(addr, &by_limit("max_history_bytes")).await, metric(addr, &by_limit("max_channels")).await];
    assert!(after[0] - before[0] >= 150.0 && after[1] - before[1] >= 50.0, "{before:?} {after:?}");
    // History expires, the sweeper forgets the channels, and new channels can start again.
    back_to(addr, baseline).await;
    let (status, body) = api(addr, "publish", &json!({"channel": "burst:again", "data": 1}).to_string(), None).await;
    assert_eq!(status, 200, "{body}");
    server.shutdown().await;
}

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

#[tokio::test]
async fn a_user_past_max_connections_is_refused_at_connect() {
    let mut c = config();
    c.auth.secret = Secret::new(SECRET);
    c.limits.max_connections_per_user = 2;
    let server = TestServer::start(c).await;
    let auth = AuthConfig { secret: Secret::new(SECRET), ..Default::default() };
    let token = herald::auth::mint(&auth, "mallory", Duration::from_secs(600), None).expect("mint");
    let connect = |addr| {
        let token = token.clone();
        async move {
            let mut c = Native::open(addr).await;
            let r = c.request("connect", json!({"token": token})).await;
            (c, r)
        }
    };
    let (first, r) = connect(server.addr).await;
    assert!(r.get("connect").is_some(), "{r}");
    let (_second, r) = connect(server.addr).await;
    assert!(r.get("connect").is_some(), "{r}");
    let (mut third, r) = connect(server.addr).await;
    assert_eq!(r["error"]["code"], 106, "{r}");
    let close = tokio::time::timeout(Duration::from_secs(10), third.ws.next()).await.expect("closed in time");
    match close {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 4501),
        other => panic!("expected close 4501, got {other:?}"),
    }
    // Another user is not affected; once a connection ends, the user may connect again.
    let other = herald::auth::mint(&auth, "alice", Duration::from_secs(600), None).expect("mint");
    let mut alice = Native::open(server.addr).await;
    assert!(alice.request("connect", json!({"token": other})).await.get("connect").is_some());
    drop(first);
    let mut again = None;
    for _ in 0..100 {
        let (c, r) = connect(server.addr).await;
        if r.get("connect").is_some() {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "a slot came free");
    server.shutdown().await;
}

#[tokio::test]
async fn bad_json_gets_an_error_reply_and_the_connection_goes_on() {
    let server = TestServer::start(config()).await;
    let baseline = baseline(server.addr).await;
    survive(server.addr, async {
        let mut c = Native::connected(server.addr).await;
        let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
        // Deep nesting inside `data` is carried as it is (validated, bounded by size).
        let deep_data =
            format!(r#"{{"id":5,"publish":{{"channel":"brief:x","data":{}1{}}}}}"#, "[".repeat(5000), "]".repeat(5000));
        c.send_raw(&deep_data).await;
        let r = c.frame().await;
        assert_eq!(r["publish"]["offset"], 1, "{r}");
        // (frame, whether the error names the command's id; None: either)
        let cases: Vec<(String, Option<bool>)> = vec![
            (r#"{"id":2,"#.into(), Some(false)),
            ("not json at all".into(), Some(false)),
            ("[]".into(), Some(false)),
            ("null".into(), Some(false)),
            (deep, Some(false)),
            (r#"{"id":"2","subscribe":{"channel":"chat:x"}}"#.into(), Some(false)),
            (r#"{"id":99999999999999999999999,"subscribe":{"channel":"chat:x"}}"#.into(), Some(false)),
            (r#"{"id":-1,"subscribe":{"channel":"chat:x"}}"#.into(), Some(false)),
            (r#"{"id":6,"subscribe":{"channel":5}}"#.into(), Some(true)),
            (r#"{"id":7,"subscribe":{"channel":"chat:x","offset":1e400}}"#.into(), Some(true)),
            (r#"{"id":8,"history":{"channel":"chat:x","limit":-5}}"#.into(), Some(true)),
            (r#"{"id":9,"history":{"channel":"chat:x","limit":18446744073709551616}}"#.into(), Some(true)),
            (r#"{"id":10,"subscribe":{"channel":"chat:\u0000"}}"#.into(), Some(true)),
            (format!(r#"{{"id":11,"subscribe":{{"channel":"{}"}}}}"#, "a".repeat(10_000)), Some(true)),
            (r#"{"id":12,"subscribe":{"channel":"chat:x"},"publish":{}}"#.into(), Some(true)),
            (r#"{"id":13,"frobnicate":{}}"#.into(), Some(true)),
        ];
        for (text, has_id) in cases {
            c.send_raw(&text).await;
            let f = c.frame().await;
            let code = f["error"]["code"].as_u64().unwrap_or_else(|| panic!("error for {:.80}: {f}", text));
            assert!([102, 104, 107].contains(&code), "{code} for {:.80}", text);
            if let Some(has_id) = has_id {
                assert_eq!(f.get("id").is_some(), has_id, "{f} for {:.80}", text);
            }
        }
        let r = c.request("subscribe", json!({"channel": "chat:still-here"})).await;
        assert!(r.get("subscribe").is_some(), "still open: {r}");
    })
    .await;
    back_to(server.addr, baseline).await;
    server.shutdown().await;
}

/// Opens `/connect` at the frame level; `extensions` is an extra header line or "".
async fn raw_connect(addr: SocketAddr, extra: &str) -> TcpStream {
    let (head, s) = raw_request(addr, &upgrade_request("/connect", extra)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// Reads frames until the server's close frame; returns its code.
async fn close_code(s: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let mut at = 0;
        while let Some((b0, payload, used)) = parse_server_frame(&buf[at..]) {
            if b0 == 0x88 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
            at += used;
        }
        buf.drain(..at);
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("a close frame in time")
            .expect("read");
        assert!(n > 0, "closed without a close frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn frame_level_attacks_close_with_their_rfc_code() {
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    let baseline = baseline(addr).await;
    let limits = Config::default().websocket;
    survive(addr, async {
        // Invalid UTF-8 in a text frame: 1007.
        let mut s = raw_connect(addr, "").await;
        s.write_all(&frame::encode(true, false, OpCode::Text, b"{\"id\":1,\xff}", MASK)).await.expect("write");
        assert_eq!(close_code(&mut s).await, 1007);
        // A frame over max_frame_size: 1009 (announced by its header, before its payload).
        let mut s = raw_connect(addr, "").await;
        let big = vec![b' '; limits.max_frame_size + 1];
        let _ = s.write_all(&frame::encode(true, false, OpCode::Text, &big, MASK)).await;
        assert_eq!(close_code(&mut s).await, 1009);
        // A message over max_message_size in small fragments: 1009.
        let mut s = raw_connect(addr, "").await;
        let part = vec![b' '; limits.max_message_size / 4 + 1];
        let mut flood = Vec::new();
        flood.extend_from_slice(&frame::encode(false, false, OpCode::Text, &part, MASK));
        for _ in 0..4 {
            flood.extend_from_slice(&frame::encode(false, false, OpCode::Continuation, &part, MASK));
        }
        let _ = s.write_all(&flood).await;
        assert_eq!(close_code(&mut s).await, 1009);
        // A fragment flood: more fragments than max_fragments, each tiny: 1009.
        let mut s = raw_connect(addr, "").await;
        let mut flood = frame::encode(false, false, OpCode::Text, b"[", MASK).to_vec();
        for _ in 0..limits.max_fragments + 10 {
            flood.extend_from_slice(&frame::encode(false, false, OpCode::Continuation, b" ", MASK));
        }
        let _ = s.write_all(&flood).await;
        assert_eq!(close_code(&mut s).await, 1009);
        // A compression bomb: 16 MiB of zeros in a few KiB, inflated only up to the limit: 1009.
        let mut s = raw_connect(addr, "Sec-WebSocket-Extensions: permessage-deflate\r\n").await;
        let bomb = deflate::compress(&vec![0u8; 16 << 20], 15, 9);
        assert!(bomb.len() < 128 << 10, "{}", bomb.len());
        let _ = s.write_all(&frame::encode(true, true, OpCode::Text, &bomb, MASK)).await;
        assert_eq!(close_code(&mut s).await, 1009);
        // A binary frame on the JSON protocol: 1003.
        let mut s = raw_connect(addr, "").await;
        s.write_all(&frame::encode(true, false, OpCode::Binary, b"\x00\x01", MASK)).await.expect("write");
        assert_eq!(close_code(&mut s).await, 1003);
    })
    .await;
    back_to(addr, baseline).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_ping_flood_is_answered_and_costs_nothing_that_stays() {
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    let baseline = baseline(addr).await;
    survive(addr, async {
        // A reader: every ping gets its pong.
        let mut s = raw_connect(addr, "").await;
        let n = 5_000;
        let mut pings = Vec::new();
        for i in 0..n {
            pings.extend_from_slice(&frame::encode(true, false, OpCode::Ping, format!("{i}").as_bytes(), MASK));
        }
        s.write_all(&pings).await.expect("write");
        let mut got = 0;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 64 << 10];
        while got < n {
            let k =
                tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await.expect("pongs").expect("read");
            assert!(k > 0, "closed after {got} pongs");
            buf.extend_from_slice(&chunk[..k]);
            let mut at = 0;
            while let Some((b0, payload, used)) = parse_server_frame(&buf[at..]) {
                assert_eq!(b0, 0x8A, "pong");
                assert_eq!(payload, format!("{got}").as_bytes());
                got += 1;
                at += used;
            }
            buf.drain(..at);
        }
        // A client that pings without reading is closed once its pongs fill the queue (1008).
        let mut s = raw_connect(addr, "").await;
        let ping = frame::encode(true, false, OpCode::Ping, &[7u8; 125], MASK);
        let mut closed = false;
        for _ in 0..200 {
            let batch: Vec<u8> = (0..1000).flat_map(|_| ping.iter().copied()).collect();
            if s.write_all(&batch).await.is_err() {
                closed = true;
                break;
            }
        }
        if !closed {
            assert_eq!(close_code(&mut s).await, 1008);
        }
    })
    .await;
    back_to(addr, baseline).await;
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_churn_over_random_channels_returns_to_baseline() {
    let server = TestServer::start(unlimited(config())).await;
    let addr = server.addr;
    let baseline = baseline(addr).await;
    survive(addr, async {
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            tasks.push(tokio::spawn(async move {
                let mut c = Native::connected(addr).await;
                for i in 0..250u64 {
                    let ch = format!("chat:churn-{}", rand_suffix(t * 1000 + i));
                    assert!(c.request("subscribe", json!({"channel": ch})).await.get("subscribe").is_some());
                    assert!(c.request("unsubscribe", json!({"channel": ch})).await.get("unsubscribe").is_some());
                }
                // Leave some subscribed: they must go when the connection does.
                for i in 0..100u64 {
                    let ch = format!("chat:left-{t}-{i}");
                    let r = c.request("subscribe", json!({"channel": ch})).await;
                    assert!(r.get("subscribe").is_some(), "{r}");
                }
            }));
        }
        for t in tasks {
            t.await.expect("churn");
        }
    })
    .await;
    back_to(addr, baseline).await;
    server.shutdown().await;
}

#[tokio::test]
async fn five_thousand_connections_from_one_ip_are_bounded() {
    let (_, hard) = rlimit::Resource::NOFILE.get().expect("rlimit");
    rlimit::Resource::NOFILE.set(hard.min(20_000), hard).expect("raise the open-file limit");
    let mut c = config();
    c.limits.max_connections_per_ip = 1_000;
    let server = TestServer::start(c).await;
    let addr = server.addr;
    let baseline = baseline(addr).await;
    let refused_before = metric(addr, "herald_connections_refused_total{reason=\"max_connections_per_ip\"}").await;
    let mut open = Vec::new();
    // The attacker comes from 127.0.0.2; the healthy subscriber and the API from 127.0.0.1.
    survive(addr, async {
        for _ in 0..5_000 {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind("127.0.0.2:0".parse().expect("addr")).expect("bind 127.0.0.2");
            open.push(socket.connect(addr).await.expect("connect"));
        }
    })
    .await;
    // Each connection either upgrades or is closed by the server at once.
    let mut upgraded = 0;
    let mut kept = Vec::new();
    for mut s in open {
        if s.write_all(upgrade_request("/connect", "").as_bytes()).await.is_err() {
            continue;
        }
        let mut head = [0u8; 12];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut head)).await.expect("answer or close") {
            Ok(12) if head.starts_with(b"HTTP/1.1 101") => {
                upgraded += 1;
                kept.push(s);
            }
            _ => {}
        }
    }
    assert!(upgraded <= 1_000, "at most max_connections_per_ip: {upgraded}");
    assert!(upgraded >= 500, "{upgraded}");
    let refused = metric(addr, "herald_connections_refused_total{reason=\"max_connections_per_ip\"}").await;
    assert!(refused - refused_before >= 3_900.0, "{refused} - {refused_before}");
    drop(kept);
    back_to(addr, baseline).await;
    server.shutdown().await;
}
