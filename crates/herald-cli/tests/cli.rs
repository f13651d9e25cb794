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
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..50 {
            let out = herald().args(["publish", channel, data, "--url", &url]).output().expect("publish");
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
    server.wait_for("SIGHUP: reloaded").unwrap_or_else(|seen| panic!("no reload logged: {seen:?}"));
    assert!(server.child.try_wait().expect("status").is_none(), "SIGHUP ended the server");
    // The connection made before the signal is still served.
    assert!(sub.receives(port, "news", r#"{"n":2}"#), "publication after SIGHUP not received");
    // And a second SIGHUP too.
    server.hangup();
    server.wait_for("SIGHUP: reloaded").unwrap_or_else(|seen| panic!("no second reload logged: {seen:?}"));
    assert!(server.child.try_wait().expect("status").is_none(), "a second SIGHUP ended the server");
}
