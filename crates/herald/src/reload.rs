//! What a reload (SIGHUP) changes: the running configuration compared with the one read
//! again, key by key. Settings that cannot change in a running node ([`RESTART_ONLY`]) keep
//! their running value and are reported; everything else is applied by [`Node::reload`].
//!
//! Pure: [`plan`] compares two configurations; it is also what `herald check-config --url`
//! asks a running node (`POST /api/config/check`), so the check and the reload cannot
//! disagree.
//!
//! [`Node::reload`]: crate::node::Node::reload

use serde::Serialize;

use crate::config::Config;

/// Keys (a key, or a prefix ending in `.`) that a running node keeps until it restarts: the
/// listening socket, the shutdown spread (set up with the connections' context), the engine and its limits (a different Redis or engine would be a
/// different node), TLS on or off and its file names (the certificate's contents are read
/// again on every SIGHUP), the log format, the testing endpoints (routes are built at
/// start-up), and `--demo`.
pub const RESTART_ONLY: &[&str] = &[
    "listen",
    "drain_spread",
    "engine.",
    "limits.max_channels",
    "limits.max_history_bytes",
    "tls.",
    "log.format",
    "testing.",
];

/// One setting that differs, with both values as TOML literals; a secret's values are shown
/// as `"<redacted>"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub key: String,
    pub from: String,
    pub to: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.from, self.to)
    }
}

/// What a reload did, or would do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Applied at once.
    pub changed: Vec<Change>,
    /// Differ in the configuration read, but keep their running value until a restart.
    pub restart_only: Vec<Change>,
}

impl Report {
    /// One line for the log.
    pub fn summary(&self) -> String {
        let keys = |c: &[Change]| c.iter().map(|c| c.key.as_str()).collect::<Vec<_>>().join(", ");
        match (self.changed.is_empty(), self.restart_only.is_empty()) {
            (true, true) => "nothing changed".into(),
            (false, true) => format!("changed: {}", keys(&self.changed)),
            (true, false) => format!("nothing applied; needs a restart: {}", keys(&self.restart_only)),
            (false, false) => {
                format!(
                    "changed: {}; needs a restart (running value kept): {}",
                    keys(&self.changed),
                    keys(&self.restart_only)
                )
            }
        }
    }
}

fn is_restart_only(key: &str) -> bool {
    RESTART_ONLY.iter().any(|p| match p.strip_suffix('.') {
        Some(section) => key == section || key.starts_with(p),
        None => key == *p,
    })
}

/// The configuration a running node with `running` moves to when `read` is read again, and
/// what that changes. Fails, changing nothing, when the result is not a valid configuration.
pub fn plan(running: &Config, read: Config) -> Result<(Config, Report), String> {
    let mut next = read;
    let wanted = next.clone();
    // What only a restart changes keeps its running value.
    next.listen.clone_from(&running.listen);
    next.drain_spread = running.drain_spread;
    next.engine = running.engine.clone();
    next.limits.max_channels = running.limits.max_channels;
    next.limits.max_history_bytes = running.limits.max_history_bytes;
    next.tls = running.tls.clone();
    next.log.format = running.log.format;
    next.testing = running.testing.clone();
    next.demo = running.demo;
    next.validate().map_err(|e| e.to_string())?;
    let changed = diff(running, &next);
    let restart_only: Vec<Change> = diff(&next, &wanted).into_iter().filter(|c| is_restart_only(&c.key)).collect();
    debug_assert!(changed.iter().all(|c| !is_restart_only(&c.key)), "{changed:?}");
    Ok((next, Report { changed, restart_only }))
}

/// The settings whose values differ between `a` and `b`, in declaration order. A table
/// present on one side only (a namespace added or removed) is one change.
pub fn diff(a: &Config, b: &Config) -> Vec<Change> {
    let (a, b) = (serde_json::to_value(a).unwrap_or_default(), serde_json::to_value(b).unwrap_or_default());
    let mut out = Vec::new();
    walk("", Some(&a), Some(&b), &mut out);
    out
}

fn walk(key: &str, a: Option<&serde_json::Value>, b: Option<&serde_json::Value>, out: &mut Vec<Change>) {
    use serde_json::Value;
    if a == b {
        return;
    }
    let show = |v: Option<&Value>| match v {
        None => "(unset)".to_owned(),
        Some(Value::Object(_)) => "(a table)".to_owned(),
        Some(v) => crate::config::shown(key, v),
    };
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().collect();
            keys.extend(y.keys().filter(|k| !x.contains_key(*k)));
            for k in keys {
                let child = if key.is_empty() { k.clone() } else { format!("{key}.{k}") };
                walk(&child, x.get(k), y.get(k), out);
            }
        }
        _ => out.push(Change { key: key.to_owned(), from: show(a), to: show(b) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EngineKind, NamespaceOptions, Secret};

    #[test]
    fn live_settings_change_and_restart_only_ones_keep_their_running_value() {
        let running = Config::default();
        let mut read = Config::default();
        read.channels.namespaces.insert("chat".into(), NamespaceOptions::default());
        read.api.key = Secret::new("a-new-api-key-of-enough-length");
        read.listen = "127.0.0.1:9999".into();
        read.engine.kind = EngineKind::Redis;
        read.limits.max_connections_per_ip = 7;
        let (next, report) = plan(&running, read).expect("valid");
        assert_eq!(next.listen, running.listen);
        assert_eq!(next.engine, running.engine);
        assert_eq!(next.limits.max_connections_per_ip, 7);
        assert!(next.channels.namespaces.contains_key("chat"));
        let changed: Vec<&str> = report.changed.iter().map(|c| c.key.as_str()).collect();
        assert!(changed.contains(&"api.key") && changed.contains(&"limits.max_connections_per_ip"), "{changed:?}");
        let chat = report.changed.iter().find(|c| c.key == "channels.namespaces.chat").expect("one change");
        assert_eq!((chat.from.as_str(), chat.to.as_str()), ("(unset)", "(a table)"));
        let later: Vec<&str> = report.restart_only.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(later, ["listen", "engine.kind"], "{report:?}");
        let key = report.changed.iter().find(|c| c.key == "api.key").expect("api.key");
        assert_eq!((key.from.as_str(), key.to.as_str()), ("\"\"", "\"<redacted>\""));
        let text = format!("{report:?}{}", report.summary());
        assert!(!text.contains("a-new-api-key"), "secrets are never shown: {text}");
    }

    #[test]
    fn the_same_configuration_changes_nothing() {
        let (_, report) = plan(&Config::default(), Config::default()).expect("valid");
        assert_eq!(report, Report::default());
        assert_eq!(report.summary(), "nothing changed");
    }

    #[test]
    fn restart_only_prefixes_match_whole_sections_only() {
        assert!(is_restart_only("engine.redis.url") && is_restart_only("tls.cert") && is_restart_only("listen"));
        assert!(
            !is_restart_only("listener") && !is_restart_only("limits.max_connections") && !is_restart_only("log.level")
        );
    }
}
