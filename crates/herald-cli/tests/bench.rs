//! `herald bench` against a real `herald serve`: a short fan-out loses nothing, on one node and
//! spread over two Redis-backed nodes.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::herald;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `herald serve` on a free port with these extra variables, once it listens.
fn serve(env: &[(&str, &str)]) -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server(
        herald()
            .args(["serve", "--listen", &addr])
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
