//! The rules every front door shares, in one place: who may do what on a channel, how large a
//! publication may be, and which code a failure gets. A door parses its own wire format, then
//! asks here; it never re-implements a check, so the native protocol, the raw WebSocket and SSE
//! endpoints, the HTTP API and the compatibility doors refuse the same things with the same
//! codes.

use herald_protocol::ErrorCode;

use crate::channel::{Access, ChannelName, ChannelsConfig};
use crate::engine::EngineError;

/// Why something was refused: a code from the shared table and a message for the client.
pub type Refusal = (ErrorCode, String);

pub fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    (code, message.into())
}

/// Who is asking, as far as permissions go.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity<'a> {
    /// The connection's user ("" when anonymous).
    pub user: &'a str,
    /// The connection holds a valid subscription token for the channel in question.
    pub has_channel_token: bool,
}

impl Identity<'_> {
    /// A connection with no token (raw WebSocket, SSE).
    pub const ANONYMOUS: Identity<'static> = Identity { user: "", has_channel_token: false };
}

/// Whether `who` may do what `access` (a namespace rule's level) asks on `channel`, beside the
/// channel's own user list (`chat#alice,bob`).
pub fn check(access: Access, channel: &ChannelName, who: Identity<'_>) -> Result<(), Refusal> {
    if !channel.allows_user(who.user) {
        return Err(refuse(ErrorCode::PermissionDenied, "permission denied"));
    }
    match access {
        Access::Anonymous => Ok(()),
        Access::Authenticated if !who.user.is_empty() => Ok(()),
        Access::Authenticated => Err(refuse(ErrorCode::PermissionDenied, "permission denied: connect with a token")),
        Access::Token if who.has_channel_token => Ok(()),
        Access::Token => {
            Err(refuse(ErrorCode::TokenRequired, "this namespace needs a subscription token: subscribe with one first"))
        }
        Access::None => Err(refuse(ErrorCode::PermissionDenied, "permission denied")),
    }
}

/// Refuses publication data larger than `channels.max_publication_size`.
pub fn check_publication_size(cfg: &ChannelsConfig, len: usize) -> Result<(), Refusal> {
    let max = cfg.max_publication_size;
    if len > max {
        return Err(refuse(
            ErrorCode::TooLarge,
            format!("publication data is larger than {max} bytes (channels.max_publication_size)"),
        ));
    }
    Ok(())
}

/// Refuses a publication whose data and tags together (every key and value, in bytes) are
/// larger than `channels.max_publication_size`: tags are stored in history and pushed with the
/// data, so they count against the same limit.
pub fn check_publication_size_with_tags(
    cfg: &ChannelsConfig,
    data_len: usize,
    tags: Option<&crate::engine::Tags>,
) -> Result<(), Refusal> {
    let tags_len = tags.map_or(0, |t| t.iter().fold(0usize, |n, (k, v)| n.saturating_add(k.len() + v.len())));
    if tags_len == 0 {
        return check_publication_size(cfg, data_len);
    }
    let max = cfg.max_publication_size;
    if data_len.saturating_add(tags_len) > max {
        return Err(refuse(
            ErrorCode::TooLarge,
            format!("publication data and tags are larger than {max} bytes (channels.max_publication_size)"),
        ));
    }
    Ok(())
}

/// The refusal for an engine failure, the same on every door (see [`EngineError::code`]).
pub fn engine_refusal(e: &EngineError) -> Refusal {
    (e.code(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ChannelName {
        ChannelsConfig::default().resolve(s).expect("valid").0
    }

    #[test]
    fn each_level_admits_whom_it_says() {
        let anon = Identity::ANONYMOUS;
        let ann = Identity { user: "ann", has_channel_token: false };
        let token = Identity { user: "ann", has_channel_token: true };
        let ch = name("news");
        assert!(check(Access::Anonymous, &ch, anon).is_ok());
        assert_eq!(check(Access::Authenticated, &ch, anon).map_err(|e| e.0), Err(ErrorCode::PermissionDenied));
        assert!(check(Access::Authenticated, &ch, ann).is_ok());
        assert_eq!(check(Access::Token, &ch, ann).map_err(|e| e.0), Err(ErrorCode::TokenRequired));
        assert!(check(Access::Token, &ch, token).is_ok());
        assert_eq!(check(Access::None, &ch, token).map_err(|e| e.0), Err(ErrorCode::PermissionDenied));
        let private = name("inbox#ann");
        assert!(check(Access::Anonymous, &private, ann).is_ok());
        assert_eq!(check(Access::Anonymous, &private, anon).map_err(|e| e.0), Err(ErrorCode::PermissionDenied));
    }

    #[test]
    fn sizes_and_engine_failures_get_one_code_everywhere() {
        let cfg = ChannelsConfig::default();
        assert!(check_publication_size(&cfg, cfg.max_publication_size).is_ok());
        assert_eq!(
            check_publication_size(&cfg, cfg.max_publication_size + 1).map_err(|e| e.0),
            Err(ErrorCode::TooLarge)
        );
        let max = cfg.max_publication_size;
        let tags = crate::engine::Tags::from([("k".repeat(10), "v".repeat(10))]);
        assert!(check_publication_size_with_tags(&cfg, max - 20, Some(&tags)).is_ok());
        let over = check_publication_size_with_tags(&cfg, max - 19, Some(&tags));
        assert_eq!(over.map_err(|e| e.0), Err(ErrorCode::TooLarge));
        assert!(check_publication_size_with_tags(&cfg, max, None).is_ok());
        let down = EngineError::Unavailable("redis: timeout".into());
        assert_eq!(engine_refusal(&down).0, down.code());
    }
}
