//! Herald's wire protocol: the frames clients and servers exchange, and the one table of error
//! and close codes. No I/O.
//!
//! Layout: `centrifugo` (Centrifugo's client protocol, translated to and from v1's types),
//! `message` (protocol v1 frames: parse and encode, both directions), `codes` (error
//! and close codes with their meaning and retry advice), `error` (the JSON error body shared by
//! the protocol and the HTTP API).

pub mod centrifugo;
mod codes;
mod error;
mod message;

pub use codes::{CloseCode, ErrorCode};
pub use error::{ErrorBody, ErrorDetail};
pub use message::{
    encode_conflated_pub_push, encode_error, encode_pub_push, encode_reply, ChannelRequest, ClientFrame, ClientInfo,
    Command, ConnectRequest, ConnectResult, FrameError, HistoryRequest, HistoryResult, Position, PresenceClient,
    PresenceResult, PresenceStatsResult, Publication, PublishRequest, PublishResult, PushBody, RefreshRequest,
    RefreshResult, ReplyResult, ServerFrame, SubRefreshRequest, SubRefreshResult, SubscribeRequest, SubscribeResult,
    UnsubscribeRequest, Unsubscribed,
};

/// The protocol version, also the WebSocket subprotocol name.
pub const SUBPROTOCOL: &str = "herald.v1";
