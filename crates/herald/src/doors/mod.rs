//! The front doors: every way a client or a backend talks to Herald, each a wire format over
//! the same node.
//!
//! - `session`: the native protocol (`/connect`) and Centrifugo's (`/connection/websocket`,
//!   `Dialect::Centrifugo`): one client's commands, tokens, subscriptions, pings.
//! - `centrifugo`: the Centrifugo door's encoder and Centrifugo's server API
//!   (`POST /centrifugo/api/<method>`).
//! - `raw`: `/connect` and `/connection/websocket` upgrades, `/ws/<channel>` and
//!   `/sse/<channel>`.
//! - `pusher`: Pusher protocol 7 on `/app/<key>` and the Pusher HTTP API.
//! - `api`: Herald's HTTP API for backends (`POST /api/<method>`).
//! - `http`: what the HTTP APIs share: the API-key check and the bounded request body.
//! - `wire`: engine records as wire types, shared by the doors that speak Herald's types.
//!
//! A door parses its wire format, asks `rules`, calls `Node`, and encodes. Doors do not
//! import each other except through `http` and `wire`.

pub mod api;
pub mod centrifugo;
pub mod http;
pub mod pusher;
pub mod raw;
pub mod session;
pub mod wire;

#[cfg(test)]
mod tests {
    /// The rule of this room, checked: a door reaches channels, history and presence only
    /// through `Node` (never the hub's map or the engine directly).
    #[test]
    fn no_door_calls_the_hub_or_the_engine() {
        fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).expect("doors/").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    files(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let mut all = Vec::new();
        files(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/doors"), &mut all);
        assert!(all.len() >= 10, "{all:?}");
        // This file names the forbidden patterns; every other one is checked.
        let forbidden = [".hub.", ".engine.", "Hub::", "dyn Engine", "node.hub", "node.engine"];
        for path in all.into_iter().filter(|p| !p.ends_with("doors/mod.rs")) {
            let text = std::fs::read_to_string(&path).expect("read");
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for f in forbidden {
                    assert!(!code.contains(f), "{}:{}: `{f}` in a door: go through `Node`", path.display(), n + 1);
                }
            }
        }
    }
}
