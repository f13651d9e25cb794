//! The `herald` binary as an operator runs it.

use std::process::Command;

fn herald() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    // A developer's HERALD_* variables must not leak into these runs.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HERALD_") {
            c.env_remove(k);
        }
    }
    c
}

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
