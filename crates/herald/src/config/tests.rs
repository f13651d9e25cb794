#![allow(clippy::result_large_err)] // figment's Jail closures return its large error type

use std::path::{Path, PathBuf};

use figment::Jail;

use super::*;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

#[test]
fn defaults_are_valid() {
    Config::default().validate().expect("defaults validate");
}

#[test]
fn file_then_env_then_flags() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "herald.toml",
            "listen = \"127.0.0.1:9000\"\n[channels]\nmax_publication_size = 500\n\
             [websocket]\nmax_frame_size = 1000\nmax_message_size = 2000\n",
        )?;
        jail.set_env("HERALD_WEBSOCKET__MAX_FRAME_SIZE", "1500");
        let flags = Overrides { listen: Some("127.0.0.1:9001".into()), ..Default::default() };
        let loaded = load(Some(Path::new("herald.toml")), &flags).expect("loads");
        assert_eq!(loaded.config.listen, "127.0.0.1:9001");
        assert_eq!(loaded.config.websocket.max_frame_size, 1500);
        assert_eq!(loaded.config.websocket.max_message_size, 2000);
        let explained = loaded.explain();
        assert!(explained.contains("listen = \"127.0.0.1:9001\"  # command-line flag"), "{explained}");
        assert!(
            explained
                .contains("websocket.max_frame_size = 1500  # environment variable HERALD_WEBSOCKET__MAX_FRAME_SIZE"),
            "{explained}"
        );
        assert!(explained.contains("websocket.max_message_size = 2000  # file "), "{explained}");
        assert!(explained.contains("websocket.max_fragments = 128  # default"), "{explained}");
        Ok(())
    });
}

#[test]
fn unknown_keys_are_errors_wherever_they_come_from() {
    Jail::expect_with(|jail| {
        jail.create_file("typo.toml", "[websocket]\nmax_frame = 1\n")?;
        let err = load(Some(Path::new("typo.toml")), &Overrides::default()).expect_err("unknown key").to_string();
        assert!(err.contains("max_frame"), "{err}");
        Ok(())
    });
}

#[test]
fn unknown_env_variables_are_warnings_with_a_hint() {
    Jail::expect_with(|jail| {
        jail.set_env("HERALD_WEBSOKET__MAX_FRAME_SIZE", "1");
        jail.set_env("HERALD_API_KEY", "secret-value");
        jail.set_env("HERALD_WEBSOCKET__MAX_FRAME_SIZ", "1");
        jail.set_env("HERALD_NONSENSE", "x");
        jail.set_env("HERALD_WEBSOCKET__MAX_MESSAGE_SIZE", "4194304");
        let loaded = load(None, &Overrides::default()).expect("unknown env keys are not fatal");
        assert_eq!(loaded.config.websocket.max_message_size, 4_194_304, "known variables still apply");
        let w = loaded.warnings.join("\n");
        assert_eq!(loaded.warnings.len(), 4, "{w}");
        assert!(w.contains("HERALD_API_KEY is not a Herald setting; ignored (did you mean HERALD_API__KEY?)"), "{w}");
        assert!(
            w.contains("HERALD_WEBSOKET__MAX_FRAME_SIZE") && w.contains("HERALD_WEBSOCKET__MAX_FRAME_SIZE?"),
            "{w}"
        );
        assert!(
            w.contains("HERALD_WEBSOCKET__MAX_FRAME_SIZ is") && w.contains("mean HERALD_WEBSOCKET__MAX_FRAME_SIZE?")
        );
        assert!(w.contains("HERALD_NONSENSE is not a Herald setting; ignored") && !w.contains("NONSENSE ("), "{w}");
        assert!(!w.contains("secret-value"), "values are never shown: {w}");
        Ok(())
    });
}

#[test]
fn kubernetes_service_links_and_herald_bin_are_ignored_silently() {
    Jail::expect_with(|jail| {
        for (k, v) in [
            ("HERALD_PORT", "tcp://10.96.0.12:8080"),
            ("HERALD_SERVICE_HOST", "10.96.0.12"),
            ("HERALD_SERVICE_PORT", "8080"),
            ("HERALD_SERVICE_PORT_HTTP", "8080"),
            ("HERALD_PORT_8080_TCP", "tcp://10.96.0.12:8080"),
            ("HERALD_PORT_8080_TCP_ADDR", "10.96.0.12"),
            ("HERALD_PORT_8080_TCP_PORT", "8080"),
            ("HERALD_PORT_8080_TCP_PROTO", "tcp"),
            ("HERALD_PORT_53_UDP_ADDR", "10.96.0.12"),
            ("HERALD_BIN", "/usr/local/bin/herald"),
        ] {
            jail.set_env(k, v);
        }
        let loaded = load(None, &Overrides::default()).expect("loads");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        Ok(())
    });
    for not_a_link in ["PORT_8080_HTTP", "PORT_X_TCP", "PORT_8080_TCP_HOST", "PORTS", "BINARY"] {
        assert!(!is_ignored_env(not_a_link), "{not_a_link}");
    }
}

#[test]
fn a_known_env_variable_with_a_bad_value_is_still_an_error() {
    Jail::expect_with(|jail| {
        jail.set_env("HERALD_WEBSOCKET__MAX_FRAME_SIZE", "lots");
        let err = load(None, &Overrides::default()).expect_err("bad value").to_string();
        assert!(err.contains("websocket.max_frame_size"), "{err}");
        assert!(err.contains("HERALD_WEBSOCKET__MAX_FRAME_SIZE"), "{err}");
        Ok(())
    });
}

#[test]
fn bad_values_name_the_key() {
    Jail::expect_with(|jail| {
        jail.create_file("bad.toml", "[websocket]\nping_interval = \"soon\"\n")?;
        let err = load(Some(Path::new("bad.toml")), &Overrides::default()).expect_err("bad duration").to_string();
        assert!(err.contains("ping_interval"), "{err}");
        jail.create_file("level.toml", "[websocket.compression]\nlevel = 12\n")?;
        let err = load(Some(Path::new("level.toml")), &Overrides::default()).expect_err("bad level").to_string();
        assert!(err.contains("websocket.compression.level"), "{err}");
        jail.create_file("log.toml", "[log]\nlevel = \"loud\"\n")?;
        let err = load(Some(Path::new("log.toml")), &Overrides::default()).expect_err("bad level").to_string();
        assert!(err.contains("log.level"), "{err}");
        jail.create_file("flow.toml", "[channels.namespaces.ticks]\nconflation = \"latest\"\n")?;
        let err = load(Some(Path::new("flow.toml")), &Overrides::default()).expect_err("no max_rate").to_string();
        assert!(err.contains("channels.conflation") && err.contains("`ticks`"), "{err}");
        jail.create_file("flow.toml", "[channels.namespaces.ticks]\nconflation = \"latest\"\nmax_rate = 10\n")?;
        load(Some(Path::new("flow.toml")), &Overrides::default()).expect("conflated with a rate");
        Ok(())
    });
    let err = load(Some(Path::new("/nonexistent/herald.toml")), &Overrides::default()).expect_err("missing file");
    assert!(err.to_string().contains("does not exist"));
}

#[test]
fn example_file_and_reference_are_generated_from_the_source() {
    let expected =
        [("config/herald.example.toml", docs::example_toml()), ("docs/configuration.md", docs::reference_markdown())];
    for (rel, text) in &expected {
        let path = repo_file(rel);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, text).expect("write golden");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(committed == *text, "{rel} is out of date: run `UPDATE_GOLDEN=1 cargo test -p herald config`");
    }
    // Every key is documented, and the example parses back to exactly the defaults.
    let example = &expected[0].1;
    for key in docs::keys() {
        let leaf = key.rsplit('.').next().unwrap_or(&key);
        assert!(example.contains(&format!("\n{leaf} = ")), "{key} missing from the example");
    }
    let parsed: Config = Figment::from(Toml::string(example)).extract().expect("example parses");
    assert_eq!(parsed, Config::default());
}

#[test]
fn redis_settings_are_checked_and_the_password_never_shows() {
    Jail::expect_with(|jail| {
        jail.set_env("HERALD_ENGINE__KIND", "redis");
        jail.set_env("HERALD_ENGINE__REDIS__PASSWORD", "hunter2-redis");
        let loaded = load(None, &Overrides::default()).expect("loads");
        assert_eq!(loaded.config.engine.kind, EngineKind::Redis);
        let explained = loaded.explain();
        assert!(explained.contains("engine.redis.password = \"<redacted>\""), "{explained}");
        assert!(!explained.contains("hunter2"), "{explained}");
        assert!(!format!("{:?}", loaded.config).contains("hunter2"));
        Ok(())
    });
    let with = |f: &dyn Fn(&mut RedisConfig)| {
        let mut c = Config::default();
        c.engine.kind = EngineKind::Redis;
        f(&mut c.engine.redis);
        c.validate()
    };
    with(&|_| {}).expect("defaults validate");
    with(&|r| r.url = "redis://user@10.0.0.5:6380/2".into()).expect("a user name is fine");
    let key = |e: Result<(), ConfigError>| match e {
        Err(ConfigError::Invalid { key, message }) => (key, message),
        other => panic!("{other:?}"),
    };
    let (k, m) = key(with(&|r| r.url = "redis://:hunter2@10.0.0.5".into()));
    assert_eq!(k, "engine.redis.url");
    assert!(m.contains("engine.redis.password") && !m.contains("hunter2"), "{m}");
    with(&|r| r.url = "rediss://redis.internal:6380".into()).expect("TLS with the system's CAs");
    assert_eq!(key(with(&|r| r.url = "http://10.0.0.5".into())).0, "engine.redis.url");
    assert_eq!(key(with(&|r| r.tls_ca = "ca.pem".into())).0, "engine.redis.tls_ca", "TLS files need rediss://");
    let half = |r: &mut RedisConfig| {
        r.url = "rediss://10.0.0.5".into();
        r.tls_cert = "node.pem".into();
    };
    assert_eq!(key(with(&half)).0, "engine.redis.tls_cert", "a certificate without its key");
    let (k, m) = key(with(&|r| {
        r.url = "rediss://10.0.0.5".into();
        r.tls_ca = "/nonexistent/ca.pem".into();
    }));
    assert!(k == "engine.redis.tls_ca" && m.contains("/nonexistent/ca.pem"), "{k}: {m}");
    assert_eq!(key(with(&|r| r.url = "redis://".into())).0, "engine.redis.url");
    assert_eq!(key(with(&|r| r.prefix = String::new())).0, "engine.redis.prefix");
    assert_eq!(key(with(&|r| r.prefix = "a}b".into())).0, "engine.redis.prefix");
    with(&|r| r.prefix = "app-1.staging".into()).expect("a plain prefix");
    assert_eq!(key(with(&|r| r.timeout = Duration::ZERO)).0, "engine.redis.timeout");
}

#[test]
fn a_badly_typed_secret_is_refused_without_quoting_it() {
    for (var, value) in [("HERALD_API__KEYS", "s3cret-api-key-value"), ("HERALD_AUTH__SECRET", "123456789")] {
        Jail::expect_with(|jail| {
            jail.set_env(var, value);
            let err = load(None, &Overrides::default()).expect_err("wrong type").to_string();
            assert!(!err.contains(value), "{err}");
            assert!(err.contains("not shown: it is a secret") && err.contains(var), "{err}");
            Ok(())
        });
    }
}

#[test]
fn a_short_drain_timeout_alone_is_valid() {
    // The spread is cut to the drain timeout where it is used (`server::run_with_reload`).
    let mut c = Config::default();
    assert!(c.drain_spread <= c.drain_timeout, "the defaults fit");
    c.drain_timeout = Duration::from_secs(2);
    c.validate().expect("a drain timeout below the default spread is fine");
}
