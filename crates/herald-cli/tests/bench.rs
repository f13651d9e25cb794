//! `herald bench` against a real `herald serve`: a short fan-out loses nothing.

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

#[test]
fn fanout_against_herald_loses_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server(
        herald()
            .args(["serve", "--listen", &addr])
            .env("HERALD_LOG__LEVEL", "error")
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
    let out = herald()
        .args(["bench", "fanout", "--url", &format!("ws://{addr}"), "--subscribers", "20", "--channels", "2"])
        .args(["--rate", "20", "--duration", "2", "--warmup", "0.5"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON");
    assert_eq!(v["scenario"], "fanout");
    assert_eq!(v["lost"], 0, "{last}");
    assert_eq!(v["duplicated"], 0, "{last}");
    assert_eq!(v["reordered"], 0, "{last}");
    assert_eq!(v["publish_errors"], 0, "{last}");
    // 2 channels × 20/s × 2.5 s, each to 10 subscribers.
    assert!(v["received"].as_u64().expect("received") >= 800, "{last}");
    assert!(v["latency_ms"]["count"].as_u64().expect("count") > 0, "{last}");
}
