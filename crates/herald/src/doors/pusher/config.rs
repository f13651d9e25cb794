//! `[pusher]`: the apps, their limits, and how a Pusher channel name maps to a Herald channel.
//! Pure configuration (the configuration module re-exports it; webhooks use the mapping).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::channel::{ChannelError, ChannelName, ChannelsConfig, NamespaceOptions};
use crate::secret::Secret;

/// Pusher Channels compatibility (`[pusher]`): see `docs/migrating-from-pusher.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PusherConfig {
    /// The Pusher apps this server answers for, as `[[pusher.apps]]` tables; none by default
    /// (then `/app/<key>` closes with 4001 and `/apps/<id>/...` answers 404). Keys of an app:
    /// `id` (the app id, in API paths), `key` (public, in the client's URL), `secret` (signs
    /// channel and user authentication and API requests; prefer an environment variable such
    /// as `HERALD_PUSHER__APPS='[{id="1",key="k",secret="s"}]'`), `namespace` (the Herald
    /// namespace the app's channels live in: empty (the default) maps Pusher channel `foo` to
    /// Herald channel `foo`; with several apps each needs its own, configured under
    /// `[channels.namespaces]`), `client_events` (allow `client-*` events on private and
    /// presence channels; default true), `max_event_size` (largest event data in bytes, from
    /// clients and the API; default 10240), `max_user_info_size` (largest presence `user_info`
    /// in bytes; default 1024), `max_presence_members` (most users in one presence channel;
    /// default 100), `user_authentication` (require `pusher:signin`
    /// within `pusher.signin_timeout`, else close 4009; default false), `event_name` (the event
    /// name Pusher clients see for publications made through Herald's own API or
    /// protocol; default `message`).
    pub apps: Vec<PusherApp>,
    /// The `activity_timeout` told to Pusher clients: a client silent this long is sent
    /// `pusher:ping`, and closed with 4201 if no answer comes within
    /// `websocket.pong_timeout`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub activity_timeout: Duration,
    /// With `user_authentication = true`, how long a connection may stay without a successful
    /// `pusher:signin` before it is closed with 4009.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub signin_timeout: Duration,
    /// Most channels one `POST /apps/<id>/events` may name (Pusher's limit is 100).
    pub max_event_channels: usize,
    /// Most events in one `POST /apps/<id>/batch_events` (Pusher's limit is 10).
    pub max_batch_size: usize,
    /// How far an API request's `auth_timestamp` may be from this server's clock.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timestamp_window: Duration,
}

impl Default for PusherConfig {
    fn default() -> Self {
        Self {
            apps: Vec::new(),
            activity_timeout: Duration::from_secs(120),
            signin_timeout: Duration::from_secs(30),
            max_event_channels: 100,
            max_batch_size: 10,
            timestamp_window: Duration::from_secs(600),
        }
    }
}

/// One Pusher app (`[[pusher.apps]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PusherApp {
    /// The app id (in `/apps/<id>/...`).
    pub id: String,
    /// The public key (in `/app/<key>`, and before the `:` of every auth signature).
    pub key: String,
    /// Signs channel and user authentication and API requests.
    #[schemars(with = "String")]
    pub secret: Secret,
    /// The Herald namespace of this app's channels; empty: none (Pusher `foo` = Herald `foo`).
    #[serde(default)]
    pub namespace: String,
    /// Allow `client-*` events on private and presence channels.
    #[serde(default = "yes")]
    pub client_events: bool,
    /// Largest event data, in bytes.
    #[serde(default = "default_event_size")]
    pub max_event_size: usize,
    /// Largest `user_info` of a presence member (its JSON in `channel_data`), in bytes; a
    /// larger one is refused with `pusher:subscription_error` status 400 (Pusher's 1 KB).
    #[serde(default = "default_user_info_size")]
    pub max_user_info_size: usize,
    /// Most members (distinct users) of one presence channel; the subscription of a user that
    /// would be one more is refused with `pusher:subscription_error` status 400 (Pusher's
    /// 100). With `max_user_info_size` it bounds the member list a subscriber receives.
    #[serde(default = "default_presence_members")]
    pub max_presence_members: usize,
    /// Require `pusher:signin` within `pusher.signin_timeout`.
    #[serde(default)]
    pub user_authentication: bool,
    /// Event name for publications that carry none (made through Herald's own API).
    #[serde(default = "default_event_name")]
    pub event_name: String,
}

fn yes() -> bool {
    true
}

fn default_event_size() -> usize {
    10 << 10
}

fn default_user_info_size() -> usize {
    1 << 10
}

fn default_presence_members() -> usize {
    100
}

fn default_event_name() -> String {
    "message".into()
}

/// Pusher's per-user channel prefix.
pub const USER_CHANNEL: &str = "#server-to-user-";

/// A Herald channel name without its namespace, as Pusher names it.
pub fn pusher_form(local: &str) -> std::borrow::Cow<'_, str> {
    match local.strip_prefix("server-to-user#") {
        Some(user) => format!("{USER_CHANNEL}{user}").into(),
        None => local.into(),
    }
}

/// Longest Pusher channel name (Pusher's own limit).
pub const MAX_CHANNEL_NAME: usize = 164;

/// Longest event name, in bytes, for HTTP API events and `client-*` events alike (Pusher's
/// limit of 200 characters, counted here in bytes).
pub const MAX_EVENT_NAME: usize = 200;

/// What kind of channel a Pusher name is, by prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Public,
    /// `private-` (including `private-encrypted-`: Herald carries the ciphertext as is).
    Private,
    Presence,
}

impl Kind {
    pub fn of(name: &str) -> Self {
        if name.starts_with("presence-") {
            Self::Presence
        } else if name.starts_with("private-") {
            Self::Private
        } else {
            Self::Public
        }
    }

    /// Whether subscribing needs a signature from the app's backend.
    pub fn needs_auth(self) -> bool {
        self != Self::Public
    }
}

impl PusherApp {
    /// The Herald channel behind Pusher channel `name`, with its namespace options. Pusher
    /// names allow `[A-Za-z0-9_\-=@,.;]`; Herald names have no `;` (refused here), and `:`
    /// and `#` (which Pusher names never have) keep their Herald meaning out of reach.
    ///
    /// Pusher's user channel `#server-to-user-<id>` (what `sendToUser` publishes to, and what
    /// pusher-js subscribes to after `signin`) is Herald's user-limited channel
    /// `server-to-user#<id>`.
    pub fn channel<'c>(
        &self,
        channels: &'c ChannelsConfig,
        name: &str,
    ) -> Result<(ChannelName, &'c NamespaceOptions), ChannelError> {
        if name.len() > MAX_CHANNEL_NAME {
            return Err(ChannelError::TooLong { max: MAX_CHANNEL_NAME });
        }
        let (herald, checked) = match name.strip_prefix(USER_CHANNEL) {
            Some(user) if !user.is_empty() => (format!("server-to-user#{user}"), user),
            _ => (name.to_owned(), name),
        };
        // `,` would list several users in a user channel.
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_-=@.".contains(c) || (c == ',' && checked == name);
        if let Some(ch) = checked.chars().find(|c| !allowed(*c)) {
            return Err(ChannelError::BadChar { ch });
        }
        if self.namespace.is_empty() {
            channels.resolve(&herald)
        } else {
            channels.resolve(&format!("{}:{herald}", self.namespace))
        }
    }

    /// The Pusher name of Herald channel `channel`, if it belongs to this app.
    pub fn pusher_name<'a>(&self, channel: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        let local = if self.namespace.is_empty() {
            (!channel.contains(':')).then_some(channel)?
        } else {
            channel.strip_prefix(self.namespace.as_str())?.strip_prefix(':')?
        };
        Some(pusher_form(local))
    }

    /// The key a signed-in user of this app is known by to `Node`'s user registry (so that
    /// `terminate_connections` and Herald's `disconnect` reach it): the user id itself for an
    /// app without namespace, else `<namespace>:<id>`.
    pub fn user_key(&self, user: &str) -> String {
        if self.namespace.is_empty() {
            user.to_owned()
        } else {
            format!("{}:{user}", self.namespace)
        }
    }
}

impl PusherConfig {
    pub fn app_by_key(&self, key: &str) -> Option<&PusherApp> {
        self.apps.iter().find(|a| a.key == key)
    }

    pub fn app_by_id(&self, id: &str) -> Option<&PusherApp> {
        self.apps.iter().find(|a| a.id == id)
    }

    /// Checks what types cannot: unique ids, keys and namespaces; namespaces that exist.
    pub fn validate(&self, channels: &ChannelsConfig) -> Result<(), String> {
        for (i, a) in self.apps.iter().enumerate() {
            let name = if a.id.is_empty() { format!("#{}", i + 1) } else { format!("`{}`", a.id) };
            if a.id.is_empty() || a.key.is_empty() || a.secret.is_empty() {
                return Err(format!("app {name}: `id`, `key` and `secret` must not be empty"));
            }
            let token = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
            if !token(&a.id) || !token(&a.key) {
                return Err(format!("app {name}: `id` and `key` may only have letters, digits, _ - ."));
            }
            if a.event_name.is_empty() || a.event_name.starts_with("pusher") || a.event_name.starts_with("client-") {
                return Err(format!("app {name}: `event_name` must not be empty nor start with `pusher` or `client-`"));
            }
            if a.max_event_size == 0 {
                return Err(format!("app {name}: `max_event_size` must be at least 1"));
            }
            if a.max_user_info_size == 0 || a.max_presence_members == 0 {
                return Err(format!("app {name}: `max_user_info_size` and `max_presence_members` must be at least 1"));
            }
            if !a.namespace.is_empty() && !channels.namespaces.contains_key(&a.namespace) {
                return Err(format!(
                    "app {name}: namespace `{}` is not configured under [channels.namespaces]",
                    a.namespace
                ));
            }
            for b in &self.apps[..i] {
                if a.id == b.id || a.key == b.key {
                    return Err(format!("app {name}: another app has the same `id` or `key`"));
                }
                if a.namespace == b.namespace {
                    let ns = if a.namespace.is_empty() { "none".to_owned() } else { format!("`{}`", a.namespace) };
                    return Err(format!(
                        "apps `{}` and `{}` share a namespace ({ns}): each app needs its own (set `namespace`) so \
                         that apps never see each other's channels",
                        b.id, a.id
                    ));
                }
            }
        }
        for (key, n) in [("max_event_channels", self.max_event_channels), ("max_batch_size", self.max_batch_size)] {
            if n == 0 {
                return Err(format!("`{key}` must be at least 1"));
            }
        }
        if self.activity_timeout.is_zero() || self.signin_timeout.is_zero() || self.timestamp_window.is_zero() {
            return Err("durations must be greater than zero".into());
        }
        Ok(())
    }
}
