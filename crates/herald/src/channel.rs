//! Channel names: `[namespace:]name[#user1,user2]`, validated once at the edge. The namespace
//! selects options from the configuration; `#users` limits who may subscribe.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A validated channel name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelName {
    full: Arc<str>,
    /// Byte index of the `:` ending the namespace.
    colon: Option<usize>,
    /// Byte index of the `#` starting the user list.
    hash: Option<usize>,
}

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {max} bytes")]
    TooLong { max: usize },
    #[error("channel name contains {ch:?}; allowed: letters, digits and _ - . : @ # , = /")]
    BadChar { ch: char },
    #[error("channel namespace is empty (nothing before ':')")]
    EmptyNamespace,
    #[error("channel name is empty after the namespace")]
    EmptyName,
    #[error("channel user list is empty or has an empty user (after '#')")]
    EmptyUser,
    #[error("unknown namespace `{0}`")]
    UnknownNamespace(String),
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@' | '#' | ',' | '=' | '/')
}

impl ChannelName {
    /// Validates `s` as a channel name of at most `max_len` bytes.
    pub fn parse(s: &str, max_len: usize) -> Result<Self, ChannelError> {
        if s.is_empty() {
            return Err(ChannelError::Empty);
        }
        if s.len() > max_len {
            return Err(ChannelError::TooLong { max: max_len });
        }
        if let Some(ch) = s.chars().find(|c| !allowed(*c)) {
            return Err(ChannelError::BadChar { ch });
        }
        let hash = s.find('#');
        let base = &s[..hash.unwrap_or(s.len())];
        let colon = base.find(':');
        if let Some(i) = colon {
            if i == 0 {
                return Err(ChannelError::EmptyNamespace);
            }
            if i + 1 == base.len() {
                return Err(ChannelError::EmptyName);
            }
        }
        if let Some(h) = hash {
            if h == 0 {
                return Err(ChannelError::EmptyName);
            }
            if s[h + 1..].split(',').any(str::is_empty) {
                return Err(ChannelError::EmptyUser);
            }
        }
        Ok(Self { full: Arc::from(s), colon, hash })
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The shared name, cheap to clone into maps.
    pub fn shared(&self) -> &Arc<str> {
        &self.full
    }

    /// The namespace, when the name has one.
    pub fn namespace(&self) -> Option<&str> {
        self.colon.map(|i| &self.full[..i])
    }

    /// The users allowed on a user-limited channel (`name#42,43`), or `None` for a channel
    /// open to anyone the namespace allows.
    pub fn users(&self) -> Option<impl Iterator<Item = &str>> {
        self.hash.map(|h| self.full[h + 1..].split(','))
    }

    /// Whether `user` may use this channel as far as its user list goes.
    pub fn allows_user(&self, user: &str) -> bool {
        match self.users() {
            None => true,
            Some(mut users) => !user.is_empty() && users.any(|u| u == user),
        }
    }
}

impl std::fmt::Display for ChannelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.full)
    }
}

/// Who may do something in a namespace: `true` or `false` (as before), or one of
/// `"anonymous"` (any client), `"authenticated"` (a client that connected with a token),
/// `"token"` (a client holding a subscription token for the channel), `"none"` (no client;
/// the HTTP API still can).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Rule {
    /// `true`: the rule's usual meaning (see each key); `false`: no client.
    Flag(bool),
    /// One of the named levels.
    Level(Access),
}

/// A named level of [`Rule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Any client, with or without a connection token.
    Anonymous,
    /// A client that connected with a valid token (it has a user id).
    Authenticated,
    /// A client holding a valid subscription token for the channel: given in `subscribe`
    /// (for the subscribe rule), or already subscribed with one (for the other rules).
    Token,
    /// No client.
    None,
}

impl Rule {
    /// The level this rule stands for; `true` means `when_true`.
    pub fn level(self, when_true: Access) -> Access {
        match self {
            Self::Flag(true) => when_true,
            Self::Flag(false) => Access::None,
            Self::Level(access) => access,
        }
    }
}

// By hand rather than `untagged`, so a wrong value says what would be right.
impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Rule;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false, \"anonymous\", \"authenticated\", \"token\" or \"none\"")
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Rule, E> {
                Ok(Rule::Flag(b))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Rule, E> {
                match s {
                    "anonymous" => Ok(Rule::Level(Access::Anonymous)),
                    "authenticated" => Ok(Rule::Level(Access::Authenticated)),
                    "token" => Ok(Rule::Level(Access::Token)),
                    "none" => Ok(Rule::Level(Access::None)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl From<bool> for Rule {
    fn from(b: bool) -> Self {
        Self::Flag(b)
    }
}

impl From<Access> for Rule {
    fn from(a: Access) -> Self {
        Self::Level(a)
    }
}

/// What a namespace allows (`[channels.default]`, `[channels.namespaces.<name>]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceOptions {
    /// Who may subscribe to channels of this namespace: `true` (= `"anonymous"`, any client),
    /// `"authenticated"`, `"token"` (the `subscribe` command must carry a subscription token
    /// for the user and channel; the subscription ends when it expires unless refreshed with
    /// `sub_refresh`), or `false` / `"none"`. A user-limited channel (`name#42`) admits only its
    /// users in any case.
    pub subscribe: Rule,
    /// Who may publish to channels of this namespace over their connection: `true`
    /// (= `"anonymous"`), `"authenticated"`, `"token"` (the client is subscribed to the channel
    /// with a subscription token), or `false` / `"none"`. The HTTP API can always publish.
    pub publish: Rule,
    /// Who may read a channel's history with the `history` command: `true` (= whoever may
    /// subscribe, by the `subscribe` rule), `"anonymous"`, `"authenticated"`, `"token"`, or
    /// `false` / `"none"`. History is kept for recovery either way.
    pub history_access: Rule,
    /// Who may ask for presence (`presence`, `presence_stats`) where `presence` is on: `true`
    /// (= whoever may subscribe), `"anonymous"`, `"authenticated"`, `"token"`, or
    /// `false` / `"none"`.
    pub presence_access: Rule,
    /// Publications kept per channel, so that a client that reconnects receives exactly what
    /// it missed. 0 keeps none (recovery then fails whenever something was missed).
    pub history_size: usize,
    /// How long a publication stays in history.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub history_ttl: std::time::Duration,
    /// Track who is subscribed (`presence` and `presence_stats`, for clients and the API).
    pub presence: bool,
    /// Push `join` and `leave` to subscribers when a user's first connection subscribes and
    /// its last one leaves (needs `presence`).
    pub join_leave: bool,
    /// Most publications per second each subscriber receives from one channel of this
    /// namespace; 0 (the default) means no limit. Only used with `conflation = "latest"`.
    pub max_rate: u32,
    /// `"none"` (the default): every subscriber receives every publication, and one too slow to
    /// keep up is disconnected (close code 4001). `"latest"`: a subscriber receives at most
    /// `max_rate` publications per second per channel (`max_rate` must be set), each the
    /// newest of the channel when it is sent; the publications in between are skipped for it
    /// (history keeps them all), so offsets jump, and pushes carry `"conflated": true`. A
    /// subscriber too slow to keep up is not disconnected: it receives the newest publication
    /// once its queue has room. For dashboards, tickers, positions: values where only the
    /// newest matters. Recovery after a reconnect then returns only the newest missed one.
    pub conflation: Conflation,
    /// How long publications of this namespace may wait in a connection's queue so that
    /// several share one write (one system call and, over TLS, one record). 0 (the default)
    /// writes them at once. A connection with channels of several namespaces writes when its
    /// earliest deadline is due, and at once as soon as anything without a delay (a reply, a
    /// publication of an immediate namespace) is queued, taking along what waits. The merge
    /// shows as `herald_frames_sent_total / herald_writes_total`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub write_delay: std::time::Duration,
}

/// How a namespace's subscribers that cannot receive every publication are served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Conflation {
    /// Every publication to every subscriber; slow consumers are disconnected.
    #[default]
    None,
    /// The newest publication per channel, at most `max_rate` per second per subscriber.
    Latest,
}

impl NamespaceOptions {
    /// Whether subscribers get the newest publication at `max_rate` instead of every one.
    pub fn conflated(&self) -> bool {
        self.conflation == Conflation::Latest && self.max_rate > 0
    }
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        Self {
            subscribe: Rule::Flag(true),
            publish: Rule::Flag(false),
            history_access: Rule::Flag(true),
            presence_access: Rule::Flag(true),
            history_size: 1000,
            history_ttl: std::time::Duration::from_secs(300),
            presence: false,
            join_leave: false,
            max_rate: 0,
            conflation: Conflation::None,
            write_delay: std::time::Duration::ZERO,
        }
    }
}

/// Channel limits and namespaces (`[channels]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsConfig {
    /// Longest channel name, in bytes.
    pub max_channel_length: usize,
    /// Most channels one connection may be subscribed to at once.
    pub max_subscriptions: usize,
    /// Largest publication `data`, in bytes of JSON. Larger publications are refused with
    /// error 112 (HTTP 413); the connection stays open.
    pub max_publication_size: usize,
    /// Options for channels whose name has no namespace (no `:`).
    pub default: NamespaceOptions,
    /// Namespaces by name, each with the same keys as `[channels.default]`, e.g.
    /// `[channels.namespaces.chat]` then `publish = true`. A channel `chat:room1` uses the
    /// `chat` namespace; a name with an unconfigured namespace is refused (error 102).
    pub namespaces: BTreeMap<String, NamespaceOptions>,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        Self {
            max_channel_length: 255,
            max_subscriptions: 128,
            max_publication_size: 64 << 10,
            default: NamespaceOptions::default(),
            namespaces: BTreeMap::new(),
        }
    }
}

impl ChannelsConfig {
    /// Parses a channel name and finds its namespace's options.
    pub fn resolve(&self, name: &str) -> Result<(ChannelName, &NamespaceOptions), ChannelError> {
        let channel = ChannelName::parse(name, self.max_channel_length)?;
        let options = match channel.namespace() {
            None => &self.default,
            Some(ns) => self.namespaces.get(ns).ok_or_else(|| ChannelError::UnknownNamespace(ns.to_owned()))?,
        };
        Ok((channel, options))
    }
}

/// A `*` glob over channel names, for listing channels.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_into_their_parts() {
        let c = ChannelName::parse("chat:lobby", 255).expect("valid");
        assert_eq!(c.namespace(), Some("chat"));
        assert!(c.users().is_none());
        let c = ChannelName::parse("notifications#42,43", 255).expect("valid");
        assert_eq!(c.namespace(), None);
        assert_eq!(c.users().expect("users").collect::<Vec<_>>(), ["42", "43"]);
        assert!(c.allows_user("43") && !c.allows_user("44") && !c.allows_user(""));
        let c = ChannelName::parse("dm:room#7", 255).expect("valid");
        assert_eq!(c.namespace(), Some("dm"));
        assert!(c.allows_user("7"));
        assert_eq!(ChannelName::parse("a:b:c", 255).expect("valid").namespace(), Some("a"));
    }

    #[test]
    fn bad_names_say_why() {
        assert_eq!(ChannelName::parse("", 10), Err(ChannelError::Empty));
        assert_eq!(ChannelName::parse("abcdefghijk", 10), Err(ChannelError::TooLong { max: 10 }));
        assert_eq!(ChannelName::parse("a b", 10), Err(ChannelError::BadChar { ch: ' ' }));
        assert_eq!(ChannelName::parse("é", 10), Err(ChannelError::BadChar { ch: 'é' }));
        assert_eq!(ChannelName::parse(":x", 10), Err(ChannelError::EmptyNamespace));
        assert_eq!(ChannelName::parse("x:", 10), Err(ChannelError::EmptyName));
        assert_eq!(ChannelName::parse("#1", 10), Err(ChannelError::EmptyName));
        assert_eq!(ChannelName::parse("x#", 10), Err(ChannelError::EmptyUser));
        assert_eq!(ChannelName::parse("x#1,,2", 10), Err(ChannelError::EmptyUser));
    }

    #[test]
    fn namespaces_resolve_to_their_options() {
        let mut cfg = ChannelsConfig::default();
        cfg.namespaces.insert("chat".into(), NamespaceOptions { publish: true.into(), ..Default::default() });
        assert_eq!(cfg.resolve("news").expect("default").1.publish, Rule::Flag(false));
        assert_eq!(cfg.resolve("chat:x").expect("chat").1.publish, Rule::Flag(true));
        assert_eq!(cfg.resolve("nope:x").map(|_| ()), Err(ChannelError::UnknownNamespace("nope".into())));
    }

    #[test]
    fn rules_read_as_booleans_or_level_names() {
        let ns: NamespaceOptions = toml::from_str(
            "subscribe = \"token\"\npublish = true\nhistory_access = \"authenticated\"\npresence_access = false\n",
        )
        .expect("parses");
        assert_eq!(ns.subscribe.level(Access::Anonymous), Access::Token);
        assert_eq!(ns.publish.level(Access::Anonymous), Access::Anonymous);
        assert_eq!(ns.history_access.level(Access::Anonymous), Access::Authenticated);
        assert_eq!(ns.presence_access.level(Access::Anonymous), Access::None);
        let ns: NamespaceOptions = toml::from_str("subscribe = \"none\"\npublish = \"anonymous\"\n").expect("parses");
        assert_eq!(ns.subscribe.level(Access::Anonymous), Access::None);
        assert_eq!(ns.publish.level(Access::None), Access::Anonymous);
        for bad in ["subscribe = \"everyone\"", "publish = 1", "subscribe = \"True\""] {
            let err = toml::from_str::<NamespaceOptions>(bad).expect_err(bad).to_string();
            assert!(err.contains("\"authenticated\""), "says what is accepted: {err}");
        }
        // Defaults serialize as the booleans they were.
        let defaults = serde_json::to_value(NamespaceOptions::default()).expect("json");
        assert_eq!((defaults["subscribe"].clone(), defaults["publish"].clone()), (true.into(), false.into()));
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("chat:*", "chat:lobby"));
        assert!(!glob_match("chat:*", "news"));
        assert!(glob_match("*:lobby", "chat:lobby"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-c"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
