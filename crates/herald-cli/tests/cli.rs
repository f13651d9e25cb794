//! The `herald` binary as an operator runs it.
#![allow(clippy::disallowed_methods)] // plain #[test]s wait for child processes; no runtime here

use std::io::{Read, Write};
use std::thread::JoinHandle;
use std::time::Duration;

mod common;
use common::{herald, Pki};

#[test]
fn version_prints_the_crate_version() {
    let out = herald().arg("version").output().expect("runs");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("herald {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_config_names_each_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, "[websocket]\nmax_fragments = 7\n").expect("write");
    let out = herald()
        .args(["check-config", "--listen", "127.0.0.1:9999", "--config"])
        .arg(&file)
        .env("HERALD_LOG__LEVEL", "debug")
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("listen = \"127.0.0.1:9999\"  # command-line flag"), "{text}");
    assert!(text.contains("log.level = \"debug\"  # environment variable HERALD_LOG__LEVEL"), "{text}");
    assert!(text.contains("websocket.max_fragments = 7  # file "), "{text}");
    assert!(text.contains("drain_timeout = \"10s\"  # default"), "{text}");
}

#[test]
fn check_config_fails_precisely_on_unknown_keys_and_bad_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, "[websocket]\nmax_fram_size = 7\n").expect("write");
    let out = herald().arg("check-config").arg("--config").arg(&file).output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_fram_size"), "{err}");

    let out = herald().arg("check-config").env("HERALD_WEBSOCKET__PING_INTERVAL", "often").output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ping_interval"), "{err}");
}

#[test]
fn serve_reports_a_busy_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let out = herald().args(["serve", "--listen", &addr.to_string()]).output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

/// A one-request HTTP server on 127.0.0.1:0 answering `status` with `body`; joining the
/// thread gives the request it received (head and body).
fn http_once(status: &'static str, body: &'static str) -> (String, JoinHandle<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).expect("read head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let length = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
            .expect("content-length")
            .expect("a number");
        let mut request_body = vec![0; length];
        s.read_exact(&mut request_body).expect("read body");
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(answer.as_bytes()).expect("write");
        head + &String::from_utf8_lossy(&request_body)
    });
    (url, server)
}

#[test]
fn publish_posts_to_the_api_with_the_key_from_the_environment() {
    let (url, server) = http_once("200 OK", r#"{"epoch":"e1","offset":7}"#);
    let out = herald()
        .args(["publish", "news", r#"{"title": "hi"}"#, "--url", &url])
        .env("HERALD_API__KEY", "sekret")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"epoch":"e1","offset":7}"#);
    let request = server.join().expect("server");
    assert!(request.starts_with("POST /api/publish HTTP/1.1\r\n"), "{request}");
    assert!(request.to_ascii_lowercase().contains("\r\nauthorization: apikey sekret\r\n"), "{request}");
    assert!(request.ends_with(r#"{"channel":"news","data":{"title": "hi"}}"#), "{request}");
}

#[test]
fn publish_prints_the_servers_error_and_exits_1() {
    let (url, server) =
        http_once("403 Forbidden", r#"{"error":{"code":103,"message":"publishing is not allowed here"}}"#);
    let out =
        herald().args(["publish", "news", "1", "--api-key", "k", "--url", &format!("{url}/")]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("publishing is not allowed here (code 103, HTTP 403)"), "{err}");
    assert!(server.join().expect("server").contains("apikey k"));
}

#[test]
fn publish_checks_the_json_before_sending() {
    let out = herald().args(["publish", "news", "{oops", "--url", "http://127.0.0.1:9"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not valid JSON"), "{err}");
}

#[test]
fn subscribe_reports_an_unreachable_server() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}/connect", closed.local_addr().expect("addr"));
    drop(closed);
    let out = herald().args(["subscribe", "news", "--url", &url]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot connect to {url}")), "{err}");
}

#[test]
fn token_mints_with_the_configured_secret_and_refuses_without_one() {
    let out = herald()
        .args(["token", "--user", "42", "--ttl", "10m", "--info", r#"{"name":"Ada"}"#])
        .env("HERALD_AUTH__SECRET", "a-development-secret-of-32-bytes-or-more")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let out = herald().args(["token", "--user", "42"]).output().expect("runs");
    assert!(!out.status.success(), "no secret configured");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HERALD_AUTH__SECRET=") && err.contains("herald token --user 42"), "says how: {err}");
}

#[test]
fn token_mints_subscription_tokens_with_channel() {
    let secret = "a-development-secret-of-32-bytes-or-more";
    let out = herald()
        .args(["token", "--user", "42", "--channel", "private:room"])
        .env("HERALD_AUTH__SECRET", secret)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let auth = herald::auth::AuthConfig { secret: herald::config::Secret::new(secret), ..Default::default() };
    let verifier = herald::auth::Verifier::new(&auth).expect("valid").expect("a key");
    let claims = verifier.verify_subscription(&token).expect("a subscription token");
    assert_eq!((claims.user.as_str(), claims.channel.as_str()), ("42", "private:room"));
}

/// A `herald serve` child on `port`, killed when dropped.
struct Served(std::process::Child);

impl Served {
    fn start(port: u16, demo: bool) -> Self {
        let mut cmd = herald();
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")]).env("HERALD_LOG__LEVEL", "warn");
        if demo {
            cmd.arg("--demo");
        }
        // Owned by `Served` at once, so it is killed and waited for on every path.
        let served = Self(cmd.stderr(std::process::Stdio::null()).spawn().expect("serve"));
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return served;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("herald serve did not listen on {port}");
    }
}

impl Served {
    /// `herald serve` with TLS (`--tls-cert`, `--tls-key`) on `port`.
    fn start_tls(port: u16, pki: &Pki) -> Self {
        let mut child = herald()
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(pki.serve_args())
            .env("HERALD_LOG__LEVEL", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("serve");
        Self::from_child(&mut child, port);
        Self(child)
    }

    /// Waits until the already spawned `child` listens on `port` (the caller kills it).
    fn from_child(child: &mut std::process::Child, port: u16) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("herald serve exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("herald serve did not listen on {port}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

#[test]
fn subscribe_marks_a_lost_history_with_a_json_line_and_says_the_server_restarted() {
    use std::io::BufRead;
    let port = free_port();
    let server = Served::start(port, false);
    let mut sub = herald()
        .args(["subscribe", "news", "--url", &format!("ws://127.0.0.1:{port}/connect")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("subscribe");
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = sub.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let url = format!("http://127.0.0.1:{port}");
    // Publish until the subscriber has subscribed and printed one.
    let mut first = None;
    for _ in 0..50 {
        let out = herald().args(["publish", "news", r#"{"n":1}"#, "--url", &url]).output().expect("publish");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            first = Some(line);
            break;
        }
    }
    assert!(first.expect("a publication line").contains(r#""data":{"n":1}"#));
    drop(server); // killed: its memory history is gone
    let _server = Served::start(port, false);
    let line = lines.recv_timeout(Duration::from_secs(30)).expect("a reset line after the restart");
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    assert_eq!(v["channel"], "news", "{line}");
    assert_eq!(v["reset"]["reason"], "epoch_changed", "{line}");
    let _ = sub.kill();
    let mut err = String::new();
    let _ = sub.stderr.take().expect("stderr").read_to_string(&mut err);
    let _ = sub.wait();
    assert!(err.contains("lost this channel's history") && !err.contains("were missed"), "{err}");
}

#[test]
fn serve_demo_serves_the_pages_and_a_token() {
    let port = free_port();
    let _server = Served::start(port, true);
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        text
    };
    let index = get("/");
    assert!(index.starts_with("HTTP/1.1 200") && index.contains("/demo/chat"), "{index}");
    let token = get("/demo/token?user=ada");
    assert!(token.starts_with("HTTP/1.1 200") && token.contains("\"token\":\"ey"), "{token}");
}

#[test]
fn check_config_warns_when_exposed_and_never_prints_keys() {
    let out = herald()
        .args(["check-config", "--listen", "0.0.0.0:8080"])
        .env_remove("HERALD_API__KEY")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SECURITY") && err.contains("allowed_origins"), "{err}");
    assert!(err.contains("no API key"), "{err}");

    let out = herald()
        .args(["check-config", "--listen", "0.0.0.0:8080"])
        .env("HERALD_API__KEY", "first-s3cret-value")
        .env("HERALD_API__KEYS", r#"["second-s3cret-value"]"#)
        .env("HERALD_HTTP__ALLOWED_ORIGINS", r#"["https://app.example.com"]"#)
        .output()
        .expect("runs");
    let (text, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}{err}");
    assert!(!text.contains("s3cret") && !err.contains("s3cret"), "{text}{err}");
    assert!(text.contains("api.key = \"<redacted>\""), "{text}");
    assert!(text.contains("api.keys = [\"<redacted>\"]"), "{text}");
    assert!(text.contains("http.allowed_origins = [\"https://app.example.com\"]"), "{text}");
    assert!(!err.contains("SECURITY"), "configured: no warning\n{err}");

    // Loopback: no warning even with the open defaults.
    let out = herald().args(["check-config", "--listen", "localhost:8080"]).output().expect("runs");
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("SECURITY"));
}

#[test]
fn serve_accepts_a_host_name_and_names_a_bad_tls_file() {
    let mut child = herald()
        .args(["serve", "--listen", "localhost:0"])
        .env("HERALD_LOG__FORMAT", "text")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut listening = None;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        if line.contains("listening") {
            listening = Some(line);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = listening.expect("serve starts on localhost:0");
    assert!(line.contains("127.0.0.1:") || line.contains("[::1]:"), "{line}");

    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").expect("write");
    let missing = dir.path().join("missing-cert.pem");
    let out = herald()
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&missing)
        .arg("--tls-key")
        .arg(&key)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing-cert.pem") && err.contains("cannot read TLS certificate"), "{err}");
    assert!(!err.contains("AAAA"), "key contents never printed: {err}");
}

#[test]
fn keys_never_reach_the_log() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut child = herald()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("HERALD_API__KEY", "configured-k3y-value")
        .env("HERALD_LOG__LEVEL", "debug")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    let mut answers = Vec::new();
    for auth in ["Bearer configured-k3y-value", "Bearer wr0ng-k3y-value", "wr0ng-k3y-value"] {
        let mut stream = None;
        for _ in 0..100 {
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                stream = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut s = stream.expect("server up");
        let body = r#"{"channel":"news","data":1}"#;
        write!(
            s,
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("read");
        answers.push(answer);
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("stderr");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(answers[0].starts_with("HTTP/1.1 200"), "{}", answers[0]);
    assert!(answers[1].starts_with("HTTP/1.1 401") && answers[2].starts_with("HTTP/1.1 401"));
    for a in &answers {
        assert!(!a.contains("k3y-value"), "{a}");
    }
    assert!(log.contains("listening"), "{log}");
    assert!(!log.contains("k3y-value"), "{log}");
}

#[test]
fn version_flag_prints_the_version_too() {
    let out = herald().arg("--version").output().expect("runs");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("herald {}", env!("CARGO_PKG_VERSION")));
}

/// The `secret = "..."` and `key = "..."` values of a generated configuration.
fn generated_secrets(text: &str) -> (String, String) {
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = \"")).and_then(|v| v.strip_suffix('"')))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    (value("secret"), value("key"))
}

#[test]
fn genconfig_writes_a_config_that_checks_and_serves_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("herald.toml");
    let out = herald().arg("genconfig").arg(&file).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&file).expect("written");
    let (secret, key) = generated_secrets(&text);
    assert!(secret.len() >= 64 && key.len() >= 32, "{text}");
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!printed.contains(&secret) && !printed.contains(&key), "secrets not printed: {printed}");

    let out = herald().arg("check-config").arg("--config").arg(&file).output().expect("runs");
    let checked = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{checked}{}", String::from_utf8_lossy(&out.stderr));
    assert!(checked.contains("auth.algorithm = \"HS256\"  # file "), "{checked}");
    assert!(checked.contains("api.key = \"<redacted>\""), "{checked}");

    // A second run refuses and leaves the file as it was.
    let out = herald().arg("genconfig").arg(&file).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("still there"), text);

    // `serve --config` starts with it and takes the generated key for the API.
    let port = free_port();
    let mut child = herald()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(&file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    Served::from_child(&mut child, port);
    let url = format!("http://127.0.0.1:{port}");
    let out = herald().args(["publish", "news", "1", "--url", &url, "--api-key", "wrong"]).output().expect("runs");
    assert!(!out.status.success(), "a wrong key is refused");
    let out = herald().args(["publish", "news", "1", "--url", &url, "--api-key", &key]).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = herald().args(["token", "--user", "42", "--config"]).arg(&file).output().expect("runs");
    assert!(out.status.success(), "the generated secret signs tokens: {}", String::from_utf8_lossy(&out.stderr));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn genconfig_to_stdout_makes_different_secrets_each_time() {
    let run = || {
        let out = herald().args(["genconfig", "-"]).output().expect("runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        generated_secrets(&String::from_utf8_lossy(&out.stdout))
    };
    let (a, b) = (run(), run());
    assert_ne!(a.0, b.0);
    assert_ne!(a.1, b.1);
    assert_ne!(a.0, a.1);
}

#[test]
fn each_subcommands_help_shows_only_its_own_options() {
    let help = |args: &[&str]| {
        let out = herald().args(args).output().expect("runs");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let publish = help(&["publish", "--help"]);
    assert!(
        publish.contains("--api-key") && !publish.contains("--tls-cert") && !publish.contains("--demo"),
        "{publish}"
    );
    let subscribe = help(&["subscribe", "--help"]);
    assert!(subscribe.contains("--token") && !subscribe.contains("--listen"), "{subscribe}");
    let serve = help(&["serve", "--help"]);
    assert!(serve.contains("--tls-cert") && serve.contains("--demo"), "{serve}");
}

#[test]
fn a_refused_publish_says_how_to_give_the_api_key() {
    let (url, server) = http_once("401 Unauthorized", r#"{"error":{"code":101,"message":"unauthorized"}}"#);
    let out = herald().args(["publish", "news", "1", "--url", &url]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unauthorized (code 101, HTTP 401)"), "{err}");
    assert!(err.contains("--api-key") && err.contains("HERALD_API__KEY"), "{err}");
    assert!(!server.join().expect("server").to_ascii_lowercase().contains("authorization:"));
}

#[test]
fn subscribe_to_a_url_without_connect_says_what_is_wrong() {
    let port = free_port();
    let _server = Served::start(port, false);
    let url = format!("ws://127.0.0.1:{port}/");
    let out = herald().args(["subscribe", "news", "--url", &url]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Is the path `/connect`"), "{err}");
    assert!(!err.contains("Server sent no subprotocol"), "{err}");
    // The server's own words: Herald closes a path that is not an endpoint with 4504.
    assert!(err.contains("the server closed it with 4504: not a WebSocket endpoint"), "{err}");

    // The HTTP address where a WebSocket one is expected, and the reverse, are converted.
    let out = herald()
        .args(["publish", "news", "1", "--url", &format!("ws://127.0.0.1:{port}/connect")])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("publishing through http://127.0.0.1:{port}/api/publish")), "{err}");
    for (command, url) in [("subscribe", "ftp://127.0.0.1/"), ("publish", "127.0.0.1:8080")] {
        let mut cmd = herald();
        cmd.arg(command).arg("news");
        if command == "publish" {
            cmd.arg("1");
        }
        let out = cmd.args(["--url", url]).output().expect("runs");
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("`{url}` is not a")), "{err}");
    }
}

/// A `herald subscribe --url URL` child whose output lines arrive on a channel.
fn subscribe_lines(args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = herald()
        .arg("subscribe")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("subscribe");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, lines)
}

#[test]
fn publish_and_subscribe_reach_a_tls_server_that_the_ca_file_trusts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::issue(dir.path(), true);
    let ca = pki.ca.to_str().expect("utf-8 path");
    let port = free_port();
    let _server = Served::start_tls(port, &pki);
    let (wss, https) = (format!("wss://127.0.0.1:{port}/connect"), format!("https://127.0.0.1:{port}"));

    // wss:// as given, and the https:// address (taken as its wss://.../connect).
    let (mut a, a_lines) = subscribe_lines(&["news", "--url", &wss, "--ca-file", ca]);
    let (mut b, b_lines) = subscribe_lines(&["news", "--url", &https, "--ca-file", ca]);
    let mut got = (false, false);
    for n in 0..50 {
        let data = format!(r#"{{"n":{n}}}"#);
        let out = herald().args(["publish", "news", &data, "--url", &https, "--ca-file", ca]).output().expect("runs");
        assert!(out.status.success(), "publish over https: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"offset\""), "the server's answer is printed");
        let seen = |lines: &std::sync::mpsc::Receiver<String>| {
            lines.recv_timeout(Duration::from_millis(200)).is_ok_and(|l| l.contains(r#""data":{"n":"#))
        };
        got = (got.0 || seen(&a_lines), got.1 || seen(&b_lines));
        if got == (true, true) {
            break;
        }
    }
    for child in [&mut a, &mut b] {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(got, (true, true), "both subscribers received a publication over wss");

    // Without --ca-file the certificate is not trusted, and both say so plainly.
    let out = herald().args(["publish", "news", "1", "--url", &https]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate is not trusted; pass --ca-file"), "{err}");
    assert!(!err.contains("UnknownIssuer") && !err.contains("InvalidCertificate"), "{err}");
    let out = herald().args(["subscribe", "news", "--url", &wss]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot connect to {wss}: the server's certificate is not trusted; pass --ca-file")),
        "{err}"
    );
    assert!(!err.contains("UnknownIssuer"), "{err}");

    // A plain URL to the TLS port says to use TLS.
    let out =
        herald().args(["publish", "news", "1", "--url", &format!("http://127.0.0.1:{port}")]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("if it serves TLS, use an https:// or wss:// URL"), "{err}");
}

#[test]
fn a_bad_ca_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing-ca.pem");
    let key_only = dir.path().join("key-only.pem");
    let pki = Pki::issue(dir.path(), true);
    std::fs::copy(&pki.key, &key_only).expect("copy");
    for (file, says) in [(&missing, "cannot read --ca-file"), (&key_only, "holds no certificate")] {
        let file = file.to_str().expect("utf-8 path");
        let publish = herald()
            .args(["publish", "news", "1", "--url", "https://127.0.0.1:9", "--ca-file", file])
            .output()
            .expect("runs");
        let subscribe = herald()
            .args(["subscribe", "news", "--url", "wss://127.0.0.1:9/connect", "--ca-file", file])
            .output()
            .expect("runs");
        for out in [publish, subscribe] {
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(says) && err.contains(file), "{err}");
            assert!(!err.contains("PRIVATE KEY"), "{err}");
        }
    }
}

/// What Kubernetes puts in every pod of a namespace with a Service named `herald`.
const KUBERNETES_LINKS: [(&str, &str); 7] = [
    ("HERALD_PORT", "tcp://10.96.0.12:8080"),
    ("HERALD_SERVICE_HOST", "10.96.0.12"),
    ("HERALD_SERVICE_PORT", "8080"),
    ("HERALD_PORT_8080_TCP", "tcp://10.96.0.12:8080"),
    ("HERALD_PORT_8080_TCP_ADDR", "10.96.0.12"),
    ("HERALD_PORT_8080_TCP_PORT", "8080"),
    ("HERALD_PORT_8080_TCP_PROTO", "tcp"),
];

#[test]
fn serve_starts_in_a_kubernetes_environment_and_warns_about_a_typo() {
    let port = free_port();
    let mut cmd = herald();
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .envs(KUBERNETES_LINKS)
        .env("HERALD_BIN", "/usr/local/bin/herald")
        .env("HERALD_API_KEY", "typo-k3y-value")
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("runs");
    let mut health = None;
    for _ in 0..200 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            write!(s, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
            let mut text = String::new();
            s.read_to_string(&mut text).expect("read");
            health = Some(text);
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("herald serve exited with {status}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("stderr");
    let log = String::from_utf8_lossy(&out.stderr);
    let health = health.expect("herald serve listened");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(log.contains("HERALD_API_KEY is not a Herald setting; ignored (did you mean HERALD_API__KEY?)"), "{log}");
    assert!(!log.contains("k3y-value"), "{log}");
    for (name, _) in KUBERNETES_LINKS {
        assert!(!log.contains(&format!("{name} ")), "{name} is ignored silently: {log}");
    }
    assert!(!log.contains("HERALD_BIN"), "{log}");
}

#[test]
fn check_config_shows_unknown_environment_variables() {
    let out = herald()
        .arg("check-config")
        .envs(KUBERNETES_LINKS)
        .env("HERALD_WEBSOCKET_MAX_FRAME_SIZE", "1000")
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: environment variable HERALD_WEBSOCKET_MAX_FRAME_SIZE is not a Herald setting; ignored (did you mean HERALD_WEBSOCKET__MAX_FRAME_SIZE?)"),
        "{err}"
    );
    assert!(!err.contains("HERALD_PORT"), "{err}");
}

/// `herald serve --config <file>` with its log (stderr) read line by line; killed when dropped.
struct Logged {
    child: std::process::Child,
    log: std::sync::mpsc::Receiver<String>,
}

impl Logged {
    fn start(port: u16, file: &std::path::Path) -> Self {
        use std::io::BufRead;
        let mut child = herald()
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(file)
            .env_remove("HERALD_LOG__LEVEL")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let served = Self { child, log };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return served;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("herald serve did not listen on {port}");
    }

    fn hangup(&self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP sent");
    }

    /// The first log line containing `needle` within 20 s, or every line read when none did.
    fn wait_for(&self, needle: &str) -> Result<String, Vec<String>> {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        Err(seen)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `herald subscribe` child whose output lines arrive on the receiver; killed when dropped.
struct Subscribed(std::process::Child, std::sync::mpsc::Receiver<String>);

impl Subscribed {
    fn start(port: u16, channel: &str) -> Self {
        use std::io::BufRead;
        let mut child = herald()
            .args(["subscribe", channel, "--url", &format!("ws://127.0.0.1:{port}/connect")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("subscribe");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self(child, lines)
    }

    /// Publishes `data` to `channel` until this subscriber prints it (at most ~10 s).
    fn receives(&self, port: u16, channel: &str, data: &str) -> bool {
        self.receives_with_key(port, channel, data, "")
    }

    /// [`Self::receives`], publishing with API key `key` (none when empty).
    fn receives_with_key(&self, port: u16, channel: &str, data: &str, key: &str) -> bool {
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..50 {
            let mut publish = herald();
            publish.args(["publish", channel, data, "--url", &url]).env_remove("HERALD_API__KEY");
            if !key.is_empty() {
                publish.args(["--api-key", key]);
            }
            let out = publish.output().expect("publish");
            if out.status.success() {
                while let Ok(line) = self.1.recv_timeout(Duration::from_millis(200)) {
                    if line.contains(&format!(r#""data":{data}"#)) {
                        return true;
                    }
                }
            } else {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        false
    }
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sighup_reloads_and_never_ends_the_server() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, "[log]\nlevel = \"info\"\n").expect("write");
    let port = free_port();
    let mut server = Logged::start(port, &file);
    let sub = Subscribed::start(port, "news");
    assert!(sub.receives(port, "news", r#"{"n":1}"#), "subscribed before the signal");
    server.hangup();
    server.wait_for("SIGHUP: configuration reloaded").unwrap_or_else(|seen| panic!("no reload logged: {seen:?}"));
    assert!(server.child.try_wait().expect("status").is_none(), "SIGHUP ended the server");
    // The connection made before the signal is still served.
    assert!(sub.receives(port, "news", r#"{"n":2}"#), "publication after SIGHUP not received");
    // And a second SIGHUP too.
    server.hangup();
    server
        .wait_for("SIGHUP: configuration reloaded")
        .unwrap_or_else(|seen| panic!("no second reload logged: {seen:?}"));
    assert!(server.child.try_wait().expect("status").is_none(), "a second SIGHUP ended the server");
}

/// A native-protocol client over a plain blocking socket: connects, subscribes to
/// `channel`, and reads what the server pushes.
struct Native(tokio_tungstenite::tungstenite::WebSocket<std::net::TcpStream>);

impl Native {
    fn subscribe(port: u16, channel: &str) -> Self {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut request = format!("ws://127.0.0.1:{port}/connect").into_client_request().expect("request");
        request.headers_mut().insert("Sec-WebSocket-Protocol", "herald.v1".parse().expect("header"));
        let (socket, _) = tokio_tungstenite::tungstenite::client(request, stream).expect("handshake");
        let mut native = Self(socket);
        native.send(r#"{"id":1,"connect":{}}"#);
        assert!(native.next().get("connect").is_some());
        native.send(&format!(r#"{{"id":2,"subscribe":{{"channel":"{channel}"}}}}"#));
        let reply = native.next();
        assert!(reply.get("subscribe").is_some(), "{reply}");
        native
    }

    fn send(&mut self, text: &str) {
        self.0.send(tokio_tungstenite::tungstenite::Message::text(text)).expect("send");
    }

    /// The next JSON frame (pings, `{}`, are skipped).
    fn next(&mut self) -> serde_json::Value {
        loop {
            match self.0.read().expect("a frame within 20 s") {
                tokio_tungstenite::tungstenite::Message::Text(t) if t.as_str() != "{}" => {
                    return serde_json::from_str(t.as_str()).expect("JSON");
                }
                tokio_tungstenite::tungstenite::Message::Close(c) => panic!("closed: {c:?}"),
                _ => {}
            }
        }
    }
}

fn metrics_text(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    text
}

#[test]
fn sighup_applies_an_edited_configuration_and_keeps_every_connection() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("herald.toml");
    let base = "[log]\nlevel = \"info\"\n\n[channels.namespaces.room]\nsubscribe = \"anonymous\"\n";
    std::fs::write(&file, base).expect("write");
    let port = free_port();
    let server = Logged::start(port, &file);
    let url = format!("http://127.0.0.1:{port}");
    let publish = |channel: &str, key: Option<&str>| {
        let mut cmd = herald();
        cmd.args(["publish", channel, r#"{"n":1}"#, "--url", &url]).env_remove("HERALD_API__KEY");
        if let Some(key) = key {
            cmd.args(["--api-key", key]);
        }
        cmd.output().expect("publish")
    };
    let news = Subscribed::start(port, "news");
    assert!(news.receives(port, "news", r#"{"n":1}"#), "subscribed before the reload");
    let mut room = Native::subscribe(port, "room:a");
    let out = publish("chat:x", None);
    assert!(!out.status.success(), "no namespace chat yet");

    // Add a namespace, require an API key, drop `room`, and ask for JSON logs.
    let edited = "[log]\nlevel = \"info\"\nformat = \"json\"\n\n[api]\nkey = \"a-reloaded-api-key-0123456789\"\n\n\
                  [channels.namespaces.chat]\nsubscribe = \"anonymous\"\n";
    std::fs::write(&file, edited).expect("edit");
    let check = herald()
        .args(["check-config", "--config"])
        .arg(&file)
        .args(["--url", &url, "--api-key", ""])
        .env_remove("HERALD_API__KEY")
        .output()
        .expect("check-config");
    let shown = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{shown}{}", String::from_utf8_lossy(&check.stderr));
    assert!(shown.contains("would apply:") && shown.contains("#   api.key: \"\" -> \"<redacted>\""), "{shown}");
    assert!(shown.contains("#   channels.namespaces.chat: (unset) -> (a table)"), "{shown}");
    assert!(shown.contains("#   channels.namespaces.room: (a table) -> (unset)"), "{shown}");
    assert!(shown.contains("only a restart") && shown.contains("#   log.format: \"text\" -> \"json\""), "{shown}");
    assert!(!shown.contains("a-reloaded-api-key"), "{shown}");

    server.hangup();
    let seen = server.wait_for("log.format changed but takes effect only after a restart");
    assert!(seen.is_ok(), "the restart-only setting is named first: {seen:?}");
    let line = server.wait_for("SIGHUP: configuration reloaded").unwrap_or_else(|seen| panic!("{seen:?}"));
    assert!(line.contains("api.key") && line.contains("channels.namespaces.chat"), "{line}");
    assert!(!line.contains("a-reloaded-api-key"), "{line}");

    // The subscriber of a namespace that no longer exists is told, with code 102.
    let push = room.next();
    assert_eq!(push["push"]["channel"], "room:a", "{push}");
    assert_eq!(push["push"]["unsubscribe"]["code"], 102, "{push}");
    assert!(push["push"]["unsubscribe"]["reason"].as_str().unwrap_or("").contains("configuration reloaded"), "{push}");

    // The new rules are in force, on the same port, and `news` kept its connection.
    assert!(!publish("chat:x", None).status.success(), "the API now needs the key");
    let out = publish("chat:x", Some("a-reloaded-api-key-0123456789"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(news.receives_with_key(port, "news", r#"{"n":2}"#, "a-reloaded-api-key-0123456789"));

    // A broken file keeps the running configuration and says why.
    std::fs::write(&file, "[api\nkey = 1").expect("break");
    server.hangup();
    let line = server.wait_for("configuration not reloaded").unwrap_or_else(|seen| panic!("{seen:?}"));
    assert!(line.contains("still running the previous one"), "{line}");
    assert!(news.receives_with_key(port, "news", r#"{"n":3}"#, "a-reloaded-api-key-0123456789"));
    let metrics = metrics_text(port);
    assert!(metrics.contains("herald_config_reloads_total{result=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("herald_config_reloads_total{result=\"failed\"} 1"), "{metrics}");
    drop(server);
}

/// A `herald serve` child whose stderr lines are collected, killed when dropped.
struct Watched {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    port: u16,
}

impl Watched {
    /// Starts `cmd` (a `herald()` with its environment) as `serve` on a free port, JSON logs.
    fn start(mut cmd: std::process::Command) -> Self {
        let port = free_port();
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("HERALD_LOG__FORMAT", "json")
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("serve");
        let stderr = child.stderr.take().expect("stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        Served::from_child(&mut child, port);
        Self { child, lines, port }
    }

    /// The log lines so far, parsed (each is one JSON object).
    fn json(&self) -> Vec<serde_json::Value> {
        let lines = self.lines.lock().expect("lines").clone();
        lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// The raw log so far.
    fn text(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    fn get(&self, path: &str) -> String {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let mut answer = ureq::get(&url).call().unwrap_or_else(|e| panic!("{url}: {e}"));
        answer.body_mut().read_to_string().expect("body")
    }

    /// The value of the sample `name_and_labels` (as written in the exposition) in `/metrics`.
    fn metric(&self, name_and_labels: &str) -> Option<f64> {
        metric_value(&self.get("/metrics"), name_and_labels)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The counters of docs/operations.md's metric tables, with their label name if any:
/// every backquoted name ending in `_total` in a table row whose type column says counter.
fn documented_counters() -> Vec<(String, Option<String>)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/operations.md")).expect("doc");
    let mut out = Vec::new();
    for row in doc.lines().filter(|l| l.starts_with("| `herald_") || l.starts_with("| `process_")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (names, kind) = (cells[1], cells.get(2).copied().unwrap_or(""));
        if !kind.contains("counter") {
            continue;
        }
        for name in names.split('`').skip(1).step_by(2) {
            let (base, label) = match name.split_once('{') {
                Some((base, label)) => (base, Some(label.trim_end_matches('}').to_owned())),
                None => (name, None),
            };
            if base.ends_with("_total") {
                out.push((base.to_owned(), label));
            }
        }
    }
    out
}

#[test]
fn metrics_show_every_documented_counter_at_zero_and_the_process() {
    let served = Watched::start(herald());
    let text = served.get("/metrics");
    let documented = documented_counters();
    assert!(documented.len() >= 25, "parsed the tables: {documented:?}");
    for (name, label) in &documented {
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
            .collect();
        assert!(!samples.is_empty(), "{name} documented but not in /metrics:\n{text}");
        for s in &samples {
            // (CPU seconds may have begun.)
            assert!(s.ends_with(" 0") || name.starts_with("process_"), "a fresh server: {s}");
            if let Some(label) = label {
                assert!(s.starts_with(&format!("{name}{{{label}=\"")), "{name} has the label {label}: {s}");
            }
        }
    }
    // A few label values every alert needs before the first event.
    for sample in [
        r#"herald_token_refusals_total{reason="expired"}"#,
        r#"herald_token_refusals_total{reason="bad_signature"}"#,
        r#"herald_limit_refusals_total{limit="commands_per_second"}"#,
        r#"herald_connections_refused_total{reason="max_connections_per_ip"}"#,
        r#"herald_recoveries_total{result="not_recovered"}"#,
    ] {
        assert_eq!(metric_value(&text, sample), Some(0.0), "{sample}");
    }
    let version = format!(r#"herald_build_info{{version="{}"}}"#, env!("CARGO_PKG_VERSION"));
    assert_eq!(metric_value(&text, &version), Some(1.0), "{text}");
    #[cfg(target_os = "linux")]
    {
        let rss = metric_value(&text, "process_resident_memory_bytes").expect("rss");
        assert!(rss > 1e6, "{rss}");
        assert!(metric_value(&text, "process_virtual_memory_bytes").expect("vsz") >= rss);
        assert!(metric_value(&text, "process_open_fds").expect("fds") >= 3.0);
        assert!(metric_value(&text, "process_max_fds").expect("max fds") >= 1024.0);
        assert!(metric_value(&text, "process_threads").expect("threads") >= 2.0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
        let start = metric_value(&text, "process_start_time_seconds").expect("start");
        assert!(start <= now + 1.0 && start > now - 600.0, "{start} vs {now}");
        assert!(metric_value(&text, "process_cpu_seconds_total").is_some(), "{text}");
    }
}

#[test]
fn the_start_up_summary_says_what_is_served_and_no_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("herald.toml");
    let closed = free_port(); // nothing listens: the node starts and waits for Redis
    std::fs::write(
        &file,
        format!(
            r#"
            [api]
            key = "api-k3y-value-0123456789"
            [auth]
            secret = "token-s3cret-value-0123456789abcdef"
            [engine]
            kind = "redis"
            [engine.redis]
            url = "redis://ops@127.0.0.1:{closed}/3"
            [channels.namespaces.chat]
            [channels.namespaces.ticker]
            "#
        ),
    )
    .expect("write");
    let mut cmd = herald();
    cmd.arg("--config")
        .arg(&file)
        .env("HERALD_ENGINE__REDIS__PASSWORD", "redis-pa55word")
        .env("HERALD_LOG__LEVEL", "debug");
    let served = Watched::start(cmd);
    // A request of each kind, so their lines are in the log too.
    let _ = ureq::get(&format!("http://127.0.0.1:{}/api/info", served.port)).call();
    std::thread::sleep(Duration::from_millis(300));
    let log = served.json();
    let line = |message: &str| {
        log.iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message} line in {log:#?}"))["fields"]
            .clone()
    };
    let starting = line("starting");
    assert_eq!(starting["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(starting["config"], file.display().to_string());
    assert_eq!(starting["env"], "HERALD_ENGINE__REDIS__PASSWORD,HERALD_LOG__FORMAT,HERALD_LOG__LEVEL");
    let listening = line("listening");
    assert_eq!(listening["addr"], format!("127.0.0.1:{}", served.port));
    assert_eq!(listening["tls"], false);
    assert_eq!(listening["engine"], "redis");
    assert_eq!(listening["redis"], format!("redis://127.0.0.1:{closed}/3"), "user part left out");
    assert_eq!(listening["api"], "key required");
    assert_eq!(listening["tokens"], "HS256 with auth.secret, anonymous allowed");
    assert_eq!(listening["namespaces"], "chat,ticker");
    assert!(listening["doors"].as_str().expect("doors").starts_with("/connect,"), "{listening}");
    // The refused API call (no key) is in the log at info, the request at debug.
    let refused = line("API request refused: missing header `Authorization: Bearer <key>`");
    assert_eq!(refused["kind"], "api_key");
    assert!(refused["peer"].as_str().expect("peer").starts_with("127.0.0.1:"), "{refused}");
    let api = line("api request");
    assert_eq!(
        (api["method"].as_str(), api["path"].as_str(), api["status"].as_u64()),
        (Some("GET"), Some("/api/info"), Some(401))
    );
    let text = served.text();
    for secret in ["api-k3y-value", "token-s3cret-value", "redis-pa55word", "ops@"] {
        assert!(!text.contains(secret), "{secret} in the log:\n{text}");
    }
}

#[test]
fn a_thousand_refused_tokens_are_all_counted_and_a_few_logged() {
    use tokio_tungstenite::tungstenite::{connect, Message};
    let mut cmd = herald();
    cmd.env("HERALD_AUTH__SECRET", "token-s3cret-value-0123456789abcdef")
        .env("HERALD_LIMITS__COMMANDS_PER_SECOND", "100000")
        .env("HERALD_LIMITS__COMMANDS_BURST", "100000");
    let served = Watched::start(cmd);
    let url = format!("ws://127.0.0.1:{}/connect", served.port);
    let other = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiIsImV4cCI6OTk5OTk5OTk5OX0.c2lnbmVkLXdpdGgtYW5vdGhlci1rZXk";
    let refuse = |n: u32| {
        let (mut ws, _) = connect(url.as_str()).expect("connect");
        for id in 1..=n {
            let frame = format!(r#"{{"id":{id},"connect":{{"token":"{other}"}}}}"#);
            ws.send(Message::text(frame)).expect("send");
        }
        let mut replies = 0;
        while replies < n {
            match ws.read().expect("read") {
                Message::Text(t) => {
                    assert!(t.contains("\"error\"") && t.contains("bad signature"), "{t}");
                    replies += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        let _ = ws.close(None);
    };
    let started = std::time::Instant::now();
    refuse(1000);
    let seconds = started.elapsed().as_secs_f64();
    let reason = r#"herald_token_refusals_total{reason="bad_signature"}"#;
    assert_eq!(served.metric(reason), Some(1000.0), "every refusal counted");
    // After a second, one more: its line says how many were left out.
    std::thread::sleep(Duration::from_millis(1100));
    refuse(1);
    assert_eq!(served.metric(reason), Some(1001.0));
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = served.json().into_iter().filter(|l| l["fields"]["kind"] == "token").collect();
        if lines.iter().filter(|l| l["fields"]["reason"] == "bad_signature").count() > 1
            && lines.last().is_some_and(|l| l["fields"]["reason"] == "bad_signature")
            && lines.iter().any(|l| l["fields"]["suppressed"].is_u64())
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let logged = lines.iter().filter(|l| l["fields"]["reason"] == "bad_signature").count() as u64;
    let suppressed: u64 = lines.iter().filter_map(|l| l["fields"]["suppressed"].as_u64()).sum();
    // 10 lines a second of each kind by default, in the windows the run spanned.
    let bound = 10 * (seconds.ceil() as u64 + 3);
    assert!(logged >= 2 && logged <= bound, "{logged} lines in {seconds:.1} s (bound {bound})");
    assert_eq!(logged + suppressed, 1001, "each refusal is logged or counted as left out: {lines:#?}");
    let first = &lines[0]["fields"];
    assert!(first["peer"].as_str().expect("peer").starts_with("127.0.0.1:"), "{first}");
    assert_eq!(first["message"], "token refused: invalid token: bad signature");
    assert!(!served.text().contains(other), "the token itself is never logged");
}
