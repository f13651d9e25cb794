//! Pusher Channels compatibility: protocol 7 on `/app/<key>` (pusher-js, Laravel Echo) and the
//! Pusher HTTP API on `/apps/<id>/...` (the `pusher` server SDKs), over Herald's own channels.
//!
//! A Pusher channel is a Herald channel: with an app whose `namespace` is empty, Pusher
//! channel `foo` is Herald channel `foo`; with `namespace = "b"`, it is `b:foo`. Apps with
//! different namespaces never see each other's channels, members or users.

pub mod api;
pub mod auth;
pub mod door;
pub mod protocol;

mod config;
pub use config::{pusher_form, Kind, PusherApp, PusherConfig, MAX_CHANNEL_NAME, MAX_EVENT_NAME, USER_CHANNEL};

/// Pusher's socket id for connection `id`: `<high 32 bits>.<low 32 bits>` (ids are
/// unguessable: see `Node::next_id`).
pub fn socket_id(id: u64) -> String {
    format!("{}.{}", id >> 32, id & 0xffff_ffff)
}

/// The connection id behind a socket id, if it is well formed.
pub fn parse_socket_id(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('.')?;
    let (hi, lo): (u32, u32) = (hi.parse().ok()?, lo.parse().ok()?);
    Some(u64::from(hi) << 32 | u64::from(lo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelsConfig;
    use crate::secret::Secret;

    fn app(namespace: &str) -> PusherApp {
        PusherApp {
            id: "1".into(),
            key: "k".into(),
            secret: Secret::new("s"),
            namespace: namespace.into(),
            client_events: true,
            max_event_size: 10240,
            max_user_info_size: 1024,
            max_presence_members: 100,
            user_authentication: false,
            event_name: "message".into(),
        }
    }

    #[test]
    fn a_pusher_channel_is_a_herald_channel() {
        let mut channels = ChannelsConfig::default();
        channels.namespaces.insert("b".into(), Default::default());
        let (c, _) = app("").channel(&channels, "private-foo").expect("ok");
        assert_eq!(c.as_str(), "private-foo");
        let (c, _) = app("b").channel(&channels, "presence-x@y,z=1.2").expect("ok");
        assert_eq!(c.as_str(), "b:presence-x@y,z=1.2");
        assert_eq!(app("b").pusher_name("b:foo").as_deref(), Some("foo"));
        assert_eq!(app("b").pusher_name("foo"), None);
        assert_eq!(app("").pusher_name("b:foo"), None, "another app's channel is not this one's");
        let (c, _) = app("").channel(&channels, "#server-to-user-42").expect("ok");
        assert_eq!(c.as_str(), "server-to-user#42");
        assert!(c.allows_user("42") && !c.allows_user("43"));
        assert_eq!(app("").pusher_name("server-to-user#42").as_deref(), Some("#server-to-user-42"));
        for bad in ["a:b", "a#1", "#1", "#server-to-user-", "#server-to-user-1,2", "a/b", "a;b", "", &"x".repeat(165)] {
            assert!(app("").channel(&channels, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn socket_ids_round_trip() {
        for id in [1u64, 0xdead_beef_0000_0007, u64::MAX] {
            assert_eq!(parse_socket_id(&socket_id(id)), Some(id));
        }
        for bad in ["1", "a.b", "1.2.3", "99999999999.1", ""] {
            assert_eq!(parse_socket_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn apps_must_be_isolated() {
        let mut channels = ChannelsConfig::default();
        channels.namespaces.insert("b".into(), Default::default());
        let mut cfg = PusherConfig {
            apps: vec![app(""), PusherApp { id: "2".into(), key: "k2".into(), ..app("") }],
            ..Default::default()
        };
        assert!(cfg.validate(&channels).expect_err("shared").contains("share a namespace"));
        cfg.apps[1].namespace = "b".into();
        cfg.validate(&channels).expect("valid");
        cfg.apps[1].namespace = "nope".into();
        assert!(cfg.validate(&channels).is_err());
    }
}
