//! `herald bench` against a real `herald serve`: a short fan-out loses nothing, on one node and
//! spread over two Redis-backed nodes. And against a server that stalls: the stall shows up as
//! latency (no coordinated omission).
#![allow(clippy::disallowed_methods)] // plain #[test]s wait for child processes; no runtime here

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{herald, Pki};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `herald serve` on a free port with these extra variables, once it listens.
fn serve(env: &[(&str, &str)]) -> (Server, String) {
    serve_with(&[], env)
}

/// [`serve`] with extra arguments (`--config FILE`).
fn serve_with(args: &[&str], env: &[(&str, &str)]) -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server(
        herald()
            .args(["serve", "--listen", &addr])
            .args(args)
            .env("HERALD_LOG__LEVEL", "error")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "herald serve did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, addr)
}

/// `herald bench fanout` against these nodes (20 subscribers, 2 channels, 20/s for 2.5 s); its
/// JSON line.
fn fanout(nodes: &[&str]) -> serde_json::Value {
    let mut bench = herald();
    bench.args(["bench", "fanout", "--subscribers", "20", "--channels", "2"]);
    for addr in nodes {
        bench.args(["--url", &format!("ws://{addr}")]);
    }
    let out = bench.args(["--rate", "20", "--duration", "2", "--warmup", "0.5"]).output().expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(last).expect("JSON")
}

#[test]
fn fanout_over_two_redis_nodes_loses_nothing() {
    let redis = herald::engine::redis::test_server::RedisServer::start().expect("redis-server");
    let url = redis.url();
    let env = [("HERALD_ENGINE__KIND", "redis"), ("HERALD_ENGINE__REDIS__URL", url.as_str())];
    let (_a, a) = serve(&env);
    let (_b, b) = serve(&env);
    let v = fanout(&[&a, &b]);
    assert_eq!(v["nodes"], 2, "{v}");
    assert_eq!(v["subscribers_failed"], 0, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["duplicated"], 0, "{v}");
    assert_eq!(v["reordered"], 0, "{v}");
    assert_eq!(v["publish_errors"], 0, "{v}");
    assert!(v["received"].as_u64().expect("received") >= 800, "{v}");

    // Two nodes that share nothing: the subscribers on the second one get nothing, so the
    // spread is real (half of each channel's subscribers are there).
    let (_c, c) = serve(&[]);
    let (_d, d) = serve(&[]);
    let v = fanout(&[&c, &d]);
    let (received, lost) = (v["received"].as_u64().expect("received"), v["lost"].as_u64().expect("lost"));
    assert!(received >= 400 && lost >= 400, "{v}");
    assert_eq!(v["subscribers_with_loss"], 10, "{v}");
}

#[test]
fn fanout_against_herald_loses_nothing() {
    let (_server, addr) = serve(&[]);
    let v = fanout(&[&addr]);
    assert_eq!(v["scenario"], "fanout");
    assert_eq!(v["nodes"], 1, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["duplicated"], 0, "{v}");
    assert_eq!(v["reordered"], 0, "{v}");
    assert_eq!(v["publish_errors"], 0, "{v}");
    // 2 channels × 20/s × 2.5 s on an open-loop schedule: 100 publications are due, each
    // either published or counted as unsent; each published one reaches 10 subscribers.
    let (published, unsent) = (v["publications"].as_u64().expect("n"), v["unsent"].as_u64().expect("unsent"));
    assert_eq!(published + unsent, 100, "{v}");
    assert!(published >= 80, "{v}");
    assert_eq!(v["received"].as_u64().expect("received"), published * 10, "{v}");
    assert_eq!(v["subscribers_unfinished"], 0, "{v}");
    assert_eq!(v["latency_from"], "schedule", "{v}");
    assert!(v["latency_ms"]["count"].as_u64().expect("count") > 0, "{v}");
    // The three times from the client's side.
    assert_eq!(v["connect_ms"]["count"], 20, "{v}");
    assert_eq!(v["subscribed_ms"]["count"], 20, "{v}");
    assert!(v["publish_ms"]["count"].as_u64().expect("count") >= 60, "{v}");
}

/// Over TLS: subscribers on wss://, the publisher on https://, trusting a private CA given
/// with --ca-file; nothing is lost. Without --ca-file no connection is made, and the bench says
/// why.
#[test]
fn fanout_over_tls_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::issue(dir.path(), false);
    let tls = pki.serve_args();
    let (_server, addr) = serve_with(&tls.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let url = format!("wss://{addr}");
    let out = herald()
        .args(["bench", "fanout", "--url", &url, "--ca-file", pki.ca.to_str().expect("utf-8 path")])
        .args(["--subscribers", "2", "--channels", "1", "--rate", "10", "--duration", "1", "--warmup", "0.2"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    assert_eq!(v["subscribers_failed"], 0, "{v}");
    assert_eq!(v["publish_errors"], 0, "{v}");
    assert_eq!((v["lost"].as_u64(), v["duplicated"].as_u64()), (Some(0), Some(0)), "{v}");
    let published = v["publications"].as_u64().expect("publications");
    assert!(published >= 8, "{v}");
    assert_eq!(v["received"].as_u64(), Some(published * 2), "{v}");

    let out = herald().args(["bench", "connect", "--url", &url, "--connections", "2"]).output().expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    assert_eq!((v["ok"].as_u64(), v["failed"].as_u64()), (Some(0), Some(2)), "{v}");
    let first = v["first_error"].as_str().expect("first_error");
    assert!(first.contains("certificate is not trusted; pass --ca-file"), "{first}");
}

/// A minimal raw pub/sub server on 127.0.0.1: a WebSocket on any path subscribes, a `POST`
/// publishes its body to every subscriber. After its `after`-th publication it stops reading
/// the publisher's connection for `stall`, as a server stalled by a GC pause or a full core
/// would: the load generator's requests pile up unanswered and it is held back.
fn stalling_server(after: u64, stall: Duration) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let (tx, _) = tokio::sync::broadcast::channel::<String>(1 << 16);
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut first = [0u8; 4];
                    if stream.peek(&mut first).await.is_err() {
                        return;
                    }
                    if &first == b"GET " {
                        subscriber(stream, tx.subscribe()).await;
                    } else {
                        publisher(stream, tx, after, stall).await;
                    }
                });
            }
        });
    });
    addr
}

async fn subscriber(stream: tokio::net::TcpStream, mut rx: tokio::sync::broadcast::Receiver<String>) {
    use futures_util::SinkExt as _;
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
    while let Ok(text) = rx.recv().await {
        if ws.send(tokio_tungstenite::tungstenite::Message::text(text)).await.is_err() {
            return;
        }
    }
}

async fn publisher(
    mut stream: tokio::net::TcpStream,
    tx: tokio::sync::broadcast::Sender<String>,
    after: u64,
    stall: Duration,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut buf, mut chunk, mut count) = (Vec::new(), vec![0u8; 64 << 10], 0u64);
    loop {
        let Ok(n) = stream.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut answers = Vec::new();
        // Every complete request in the buffer: head, then a Content-Length body.
        while let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() < head_end + 4 + length {
                break;
            }
            let body = String::from_utf8_lossy(&buf[head_end + 4..head_end + 4 + length]).into_owned();
            buf.drain(..head_end + 4 + length);
            let _ = tx.send(body);
            answers.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            count += 1;
            if count == after {
                if stream.write_all(&answers).await.is_err() {
                    return;
                }
                answers.clear();
                tokio::time::sleep(stall).await;
            }
        }
        if stream.write_all(&answers).await.is_err() {
            return;
        }
    }
}

#[test]
fn a_stalled_server_shows_up_as_latency() {
    // 1,000 publications/s; the server stops reading them for a second after the 1,500th
    // (1.5 s into the schedule, 1 s into the measured window). More than the publisher's
    // 512 requests in flight are due meanwhile, so it is held back.
    let addr = stalling_server(1500, Duration::from_secs(1));
    let out = herald()
        .args(["bench", "fanout", "--target", "raw", "--source-ips", "0"])
        .args(["--sub-url", &format!("ws://{addr}/sub/{{channel}}")])
        .args(["--pub-url", &format!("http://{addr}/pub/{{channel}}")])
        .args(["--subscribers", "2", "--channels", "1", "--publishers", "1"])
        .args(["--rate", "1000", "--duration", "3", "--warmup", "0.5"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("JSON line")).expect("JSON");
    // Written late, stamped on time: the messages due during the stall carry it as latency.
    let behind = v["publisher_behind_max_ms"].as_f64().expect("behind");
    assert!(behind >= 400.0, "the publisher was held back by the stall: {v}");
    let max = v["latency_ms"]["max"].as_f64().expect("max");
    assert!(max >= 400.0, "the stall is in the latencies: {v}");
    // Everything due was published or counted as unsent; nothing published was lost.
    let (published, unsent) = (v["publications"].as_u64().expect("n"), v["unsent"].as_u64().expect("unsent"));
    assert_eq!(published + unsent, 3500, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["received"].as_u64().expect("received"), 2 * published, "{v}");
}

/// `herald bench floor`: the sender and its receiver process (a real second `herald`) agree
/// on what was written: every measured message arrives, once per socket per round.
#[test]
fn the_floor_counts_every_message_it_wrote() {
    let out = herald()
        .args(["bench", "floor", "--connections", "50", "--rate", "40", "--duration", "0.5", "--warmup", "0.25"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    assert_eq!(json["scenario"], "floor");
    assert_eq!(json["rounds"], 20, "0.5 s at 40/s measured: {json}");
    assert_eq!(json["round_ms"]["count"], 20);
    assert_eq!(json["received"], 50 * 20, "every measured message, once per socket: {json}");
    assert_eq!(json["latency_ms"]["count"], 50 * 20);
    assert!(json["floor_ms"].as_f64().is_some_and(|f| f > 0.0), "{json}");
}

/// `--conflated` against a conflated namespace: values a subscriber did not get are skipped,
/// not lost; every subscriber got the newest, in order, once.
#[test]
fn a_conflated_run_counts_skipped_values_not_lost_ones() {
    let dir = std::env::temp_dir().join(format!("herald-bench-conflated-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("herald.toml");
    std::fs::write(&config, "[channels.namespaces.tick]\nconflation = \"latest\"\nmax_rate = 5\n").expect("config");
    let (_server, addr) = serve_with(&["--config", config.to_str().expect("utf-8 path")], &[]);
    let out = herald()
        .args(["bench", "fanout", "--url", &format!("ws://{addr}"), "--channel-prefix", "tick:"])
        .args(["--subscribers", "10", "--channels", "1", "--rate", "50", "--duration", "2", "--warmup", "0.5"])
        .arg("--conflated")
        .output()
        .expect("runs");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    let n = |k: &str| json[k].as_u64().unwrap_or_else(|| panic!("{k} in {json}"));
    assert_eq!(json["conflated"], true);
    assert_eq!(n("lost"), 0, "every subscriber got the newest: {json}");
    assert_eq!((n("duplicated"), n("reordered"), n("dropped_connections")), (0, 0, 0), "{json}");
    // 50/s published, at most 5/s per subscriber delivered: most values are skipped.
    let published = n("publications");
    assert!(n("skipped") > published * 10 / 2, "{json}");
    // Each accepted value either arrived or was skipped (publications still in flight at the
    // end may arrive too, beyond the accepted count).
    assert!(n("received") + n("skipped") >= published * 10, "{json}");
}
