//! Unit tests of the pure parts: formats, signatures, queues, bounds, config.

use std::time::Duration;

use super::config::Target;
use super::send::{backoff, sign};
use super::*;
use crate::secret::Secret;

#[test]
fn signatures_are_hex_hmac_sha256() {
    // RFC 4231, test case 2.
    assert_eq!(
        sign("Jefe", b"what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[test]
fn targets_are_parsed_and_bad_urls_refused() {
    let t = Target::parse("http://127.0.0.1:9000/hooks?x=1").expect("parses");
    assert_eq!((t.tls, t.host.as_str(), t.port, t.path.as_str()), (false, "127.0.0.1", 9000, "/hooks?x=1"));
    let t = Target::parse("https://example.com").expect("parses");
    assert_eq!((t.tls, t.port, t.path.as_str(), t.authority.as_str()), (true, 443, "/", "example.com"));
    for bad in ["ftp://x/", "example.com/hook", "", "http://user:pw@example.com/"] {
        assert!(Target::parse(bad).is_err(), "{bad}");
    }
    let t = Target::parse("http://[::1]:8/").expect("parses");
    assert_eq!(t.host, "::1");
}

#[test]
fn backoff_doubles_up_to_the_cap_with_jitter_below() {
    let s = WebhooksConfig {
        retry_initial: Duration::from_millis(100),
        retry_max: Duration::from_secs(1),
        ..Default::default()
    };
    for (attempt, full) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (40, 1000)] {
        let d = backoff(&s, attempt);
        let full = Duration::from_millis(full);
        assert!(d <= full && d >= full / 2, "attempt {attempt}: {d:?}");
    }
}

#[test]
fn pusher_endpoints_need_a_key_and_a_secret_and_no_herald_only_events() {
    let mut c = WebhooksConfig::default();
    c.endpoints.push(EndpointConfig {
        url: "http://127.0.0.1/".into(),
        format: WebhookFormat::Pusher,
        ..Default::default()
    });
    assert!(c.validate().is_err());
    c.endpoints[0].key = "k".into();
    c.endpoints[0].secret = Secret::new("s");
    assert_eq!(c.validate(), Ok(()));
    c.endpoints[0].events = vec![EventName::Connect];
    assert!(c.validate().is_err());
}

#[test]
fn a_full_queue_drops_its_oldest_event() {
    let c = WebhooksConfig {
        queue_size: 2,
        endpoints: vec![EndpointConfig { url: "http://127.0.0.1:1/".into(), ..Default::default() }],
        ..Default::default()
    };
    let w = Webhooks::new(&c);
    for ch in ["a", "b", "c"] {
        w.channel_occupied(ch);
    }
    let queue = w.endpoints[0].queue();
    let seqs: Vec<u64> = queue.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [2, 3]);
}

#[test]
fn a_queue_is_bounded_in_bytes_too() {
    let c = WebhooksConfig {
        queue_bytes: 4096,
        endpoints: vec![EndpointConfig { url: "http://127.0.0.1:1/".into(), ..Default::default() }],
        ..Default::default()
    };
    let w = Webhooks::new(&c);
    let data = "x".repeat(1000);
    for _ in 0..10 {
        w.client_event("private-a", "client-x", &data, None, None);
    }
    let queue = w.endpoints[0].queue();
    assert_eq!(queue.len(), 3, "three events of about 1.1 KB fit in 4 KiB");
    assert!(queue.bytes <= 4096);
    assert_eq!(queue.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [8, 9, 10], "the newest kept");
    drop(queue);
    assert_eq!(w.endpoints[0].queue().take(usize::MAX).len(), 3);
    assert_eq!(w.endpoints[0].queue().bytes, 0);
}

fn endpoint(format: WebhookFormat) -> Arc<Endpoint> {
    let c = WebhooksConfig {
        endpoints: vec![EndpointConfig {
            url: "http://127.0.0.1:1/".into(),
            format,
            key: "app-key".into(),
            secret: Secret::new("s"),
            ..Default::default()
        }],
        ..Default::default()
    };
    Webhooks::new(&c).endpoints[0].clone()
}

#[test]
fn pusher_endpoints_get_their_apps_channels_under_the_apps_names() {
    let c = WebhooksConfig {
        endpoints: vec![
            EndpointConfig {
                url: "http://127.0.0.1:1/a".into(),
                format: WebhookFormat::Pusher,
                key: "key-a".into(),
                secret: Secret::new("s"),
                ..Default::default()
            },
            EndpointConfig { url: "http://127.0.0.1:1/herald".into(), ..Default::default() },
        ],
        ..Default::default()
    };
    let w = Webhooks::new(&c);
    let names = ChannelNames::new(|c: &str| c.strip_prefix("app-a:").map(str::to_owned));
    w.name_channels("key-b", names.clone());
    assert!(w.endpoints[0].names.get().is_none(), "another app's key");
    w.name_channels("key-a", names);
    w.channel_occupied("app-a:presence-room");
    w.channel_occupied("app-b:news");
    w.member_added("app-a:presence-room", "42");
    assert_eq!(w.endpoints[0].queue().len(), 2, "only app a's channels");
    assert_eq!(w.endpoints[1].queue().len(), 3, "the Herald endpoint gets every channel");
    let batch = w.endpoints[0].queue().take(10);
    let body: serde_json::Value = serde_json::from_slice(&encode(&w.endpoints[0], "n", &batch)).expect("json");
    assert_eq!(
        body["events"],
        json!([
            {"name": "channel_occupied", "channel": "presence-room"},
            {"name": "member_added", "channel": "presence-room", "user_id": "42"},
        ])
    );
    let batch = w.endpoints[1].queue().take(10);
    let body: serde_json::Value = serde_json::from_slice(&encode(&w.endpoints[1], "n", &batch)).expect("json");
    assert_eq!(body["events"][0]["channel"], "app-a:presence-room");
}

#[test]
fn events_are_encoded_as_each_format_documents() {
    let event = |seq, body| Arc::new(Event { seq, time_ms: 7, queued: Instant::now(), size: 0, body });
    let batch = [
        event(1, EventBody::Occupied { channel: "presence-a".into() }),
        event(2, EventBody::MemberAdded { channel: "presence-a".into(), user: "42".into() }),
        event(
            3,
            EventBody::Client {
                channel: "presence-a".into(),
                event: "client-typing".into(),
                data: "{\"on\":true}".into(),
                socket_id: Some("1.2".into()),
                user: Some("42".into()),
            },
        ),
        event(4, EventBody::Connect { user: "42".into(), client: "c1".into(), transport: "native" }),
    ];
    let pusher: serde_json::Value =
        serde_json::from_slice(&encode(&endpoint(WebhookFormat::Pusher), "n", &batch[..3])).expect("json");
    assert!(pusher["time_ms"].as_u64().is_some());
    assert_eq!(
        pusher["events"],
        json!([
            {"name": "channel_occupied", "channel": "presence-a"},
            {"name": "member_added", "channel": "presence-a", "user_id": "42"},
            {"name": "client_event", "channel": "presence-a", "event": "client-typing", "data": "{\"on\":true}",
             "socket_id": "1.2", "user_id": "42"},
        ])
    );
    let herald: serde_json::Value =
        serde_json::from_slice(&encode(&endpoint(WebhookFormat::Herald), "n", &batch)).expect("json");
    assert_eq!(
        herald["events"],
        json!([
            {"id": "n-1", "time_ms": 7, "name": "channel_occupied", "channel": "presence-a"},
            {"id": "n-2", "time_ms": 7, "name": "member_added", "channel": "presence-a", "user": "42"},
            {"id": "n-3", "time_ms": 7, "name": "client_event", "channel": "presence-a", "event": "client-typing",
             "data": "{\"on\":true}", "socket_id": "1.2", "user": "42"},
            {"id": "n-4", "time_ms": 7, "name": "connect", "user": "42", "client": "c1", "transport": "native"},
        ])
    );
}

#[test]
fn nothing_is_queued_without_endpoints_or_for_unwanted_events() {
    let w = Webhooks::new(&WebhooksConfig::default());
    w.connect("u", "c", "native");
    assert_eq!(w.queued(), 0);
    let c = WebhooksConfig {
        endpoints: vec![EndpointConfig {
            url: "http://127.0.0.1:1/".into(),
            events: vec![EventName::MemberAdded],
            ..Default::default()
        }],
        ..Default::default()
    };
    let w = Webhooks::new(&c);
    w.connect("u", "c", "native");
    w.channel_occupied("x");
    assert_eq!(w.queued(), 0);
    w.member_added("x", "u");
    assert_eq!(w.queued(), 1);
}

#[test]
fn endpoints_are_tables_in_the_config_file() {
    let config: crate::Config = toml::from_str(
        r#"
        [webhooks]
        batch_size = 10
        [[webhooks.endpoints]]
        url = "https://hooks.example.com/herald"
        secret = "s1"
        [[webhooks.endpoints]]
        url = "http://127.0.0.1:9000/pusher"
        format = "pusher"
        key = "app-key"
        secret = "s2"
        events = ["channel_occupied", "channel_vacated"]
        "#,
    )
    .expect("parses");
    let e = &config.webhooks.endpoints;
    assert_eq!((e.len(), e[0].format, e[1].format), (2, WebhookFormat::Herald, WebhookFormat::Pusher));
    assert_eq!(e[1].events, [EventName::ChannelOccupied, EventName::ChannelVacated]);
    assert_eq!(config.validate().map_err(|e| e.to_string()), Ok(()));
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail closures return its large error type
fn check_config_hides_endpoints_and_env_can_set_them() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "herald.toml",
            "[[webhooks.endpoints]]\nurl = \"https://hooks.example.com/t/abcdef\"\nsecret = \"hunter2\"\n",
        )?;
        let overrides = crate::config::Overrides::default();
        let loaded = crate::config::load(Some(std::path::Path::new("herald.toml")), &overrides).expect("loads");
        assert_eq!(loaded.config.webhooks.endpoints.len(), 1);
        let explained = loaded.explain();
        assert!(explained.contains("webhooks.endpoints = [\"<redacted>\"]"), "{explained}");
        assert!(!explained.contains("hunter2") && !explained.contains("abcdef"), "{explained}");

        jail.set_env("HERALD_WEBHOOKS__ENDPOINTS", r#"[{url="http://127.0.0.1:9/h",format="pusher",key="k"}]"#);
        let e = crate::config::load(Some(std::path::Path::new("herald.toml")), &overrides)
            .and_then(|l| l.config.validate().map(|()| l))
            .expect_err("a pusher endpoint without a secret");
        assert!(e.to_string().contains("`pusher` needs `key` and `secret`"), "{e}");
        Ok(())
    });
}

#[test]
fn debug_output_hides_secrets_and_url_paths() {
    let e = EndpointConfig {
        url: "https://hooks.example.com/t/abcdef?token=xyz".into(),
        secret: Secret::new("hunter2"),
        ..Default::default()
    };
    let s = format!("{e:?}");
    assert!(!s.contains("hunter2") && !s.contains("abcdef") && !s.contains("xyz"), "{s}");
}
