//! One client of the native protocol (`/connect`) or of Centrifugo's (`/connection/websocket`,
//! the same rules in another wire format: [`Dialect`]): decodes commands, enforces what
//! namespaces allow, keeps its subscriptions, answers on its outbox, and runs app-level pings a
//! browser can see.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use herald_protocol::centrifugo::{self, ReplyContext};
use herald_protocol::{
    ChannelRequest, ClientFrame, ClientInfo, CloseCode, Command, ConnectRequest, ConnectResult, ErrorCode,
    HistoryRequest, HistoryResult, PresenceStatsResult, PublishRequest, PublishResult, PushBody, RefreshRequest,
    RefreshResult, ReplyResult, ServerFrame, SubRefreshRequest, SubRefreshResult, SubscribeRequest, SubscribeResult,
    UnsubscribeRequest, Unsubscribed,
};
use tokio::time::Instant;

use crate::channel::{Access, ChannelError, ChannelName, NamespaceOptions};
use crate::engine::{PresenceChange, PresenceEntry, PublicationRecord, Publish, StreamPosition};
use crate::hub::{ChannelEvent, Encoder, Frame, SubscribeError, Subscriber};
use crate::limits::{ConnectionLimiter, Verdict};
use crate::node::{Control, Node, SubscribeFailure};
use crate::ws::{self, Message, Outbox, WebSocket};

use crate::rules::{refuse, Identity, Refusal};

impl From<ChannelError> for (ErrorCode, String) {
    fn from(e: ChannelError) -> Self {
        (ErrorCode::InvalidChannel, e.to_string())
    }
}

/// The wire format a session speaks. Both run the same commands under the same rules; they
/// differ in field names, error and close numbers, and framing (see `herald_protocol::centrifugo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Herald's protocol v1 (`/connect`).
    Native,
    /// Centrifugo's client protocol, JSON (`/connection/websocket`), for centrifuge-js and its
    /// sibling SDKs.
    Centrifugo,
}

impl Dialect {
    /// The transport's name in webhooks (`connect` and `disconnect` events).
    fn transport(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Centrifugo => "centrifugo",
        }
    }

    /// Encodes a reply.
    fn reply(self, id: u32, result: ReplyResult, ctx: &ReplyContext<'_>) -> Vec<u8> {
        match self {
            Self::Native => native_reply(id, &result),
            Self::Centrifugo => centrifugo::encode_reply(id, &result, ctx),
        }
    }

    /// Encodes a push that is not a publication.
    fn push(self, channel: &str, body: PushBody, ctx: &ReplyContext<'_>) -> Vec<u8> {
        match self {
            Self::Native => ServerFrame::Push { channel: channel.to_owned(), body }.encode().into_bytes(),
            Self::Centrifugo => centrifugo::encode_push(channel, &body, ctx),
        }
    }

    /// Encodes an error reply (without an id for a frame that had none).
    fn error(self, id: Option<u32>, code: ErrorCode, message: &str) -> Vec<u8> {
        match self {
            Self::Native => herald_protocol::encode_error(id, code, message),
            Self::Centrifugo => centrifugo::encode_error(id, code, message),
        }
    }

    /// How this dialect's subscribers get publications and channel events.
    fn encoder(self) -> &'static dyn Encoder {
        match self {
            Self::Native => &NATIVE,
            Self::Centrifugo => &crate::doors::centrifugo::CENTRIFUGO,
        }
    }

    /// The close code and reason for a Herald close.
    fn close(self, code: CloseCode) -> (u16, &'static str) {
        match self {
            Self::Native => (code.as_u16(), code.reason()),
            Self::Centrifugo => centrifugo::close_code(code),
        }
    }
}

/// A native reply, written straight into its buffer (as before dialects: no intermediate string).
fn native_reply(id: u32, result: &ReplyResult) -> Vec<u8> {
    use herald_protocol::encode_reply;
    match result {
        ReplyResult::Connect(r) => encode_reply(id, "connect", r),
        ReplyResult::Subscribe(r) => encode_reply(id, "subscribe", r),
        ReplyResult::Unsubscribe => encode_reply(id, "unsubscribe", &serde_json::json!({})),
        ReplyResult::Publish(r) => encode_reply(id, "publish", r),
        ReplyResult::History(r) => encode_reply(id, "history", r),
        ReplyResult::Presence(r) => encode_reply(id, "presence", r),
        ReplyResult::PresenceStats(r) => encode_reply(id, "presence_stats", r),
        ReplyResult::Refresh(r) => encode_reply(id, "refresh", r),
        ReplyResult::SubRefresh(r) => encode_reply(id, "sub_refresh", r),
        ReplyResult::Error(e) => encode_reply(id, "error", e),
    }
}

/// The context of a reply that is not about the connection itself (a subscription's).
fn channel_context(recoverable: bool) -> ReplyContext<'static> {
    ReplyContext { now: unix_now(), client: "", version: crate::VERSION, expires_at: 0, recoverable, tags: &[] }
}

/// A client's state, independent of the socket: tested by feeding it frames.
#[derive(Debug)]
pub struct Session {
    node: Arc<Node>,
    dialect: Dialect,
    /// Subscriber id in the hub.
    id: u64,
    outbox: Outbox,
    /// Set by `connect`: the client id announced to the client.
    client: Option<String>,
    user: String,
    /// The `info` claim of the token, as JSON, attached to presence.
    info: Option<Bytes>,
    /// When the token expires (Unix seconds); 0 without a token.
    expires_at: u64,
    subscriptions: HashSet<Arc<str>>,
    /// Subscriptions made with a subscription token.
    token_subscriptions: TokenSubscriptions,
    /// The channels of the connection token's `channels` claim (subscribed by the server).
    claimed: Box<[Arc<str>]>,
    /// Commands and publications per second.
    limiter: ConnectionLimiter,
    /// Set when a command's outcome ends the connection (a limit): the caller closes with it.
    close_with: Option<CloseCode>,
    /// The client's address, for the log lines of its refusals.
    peer: Option<std::net::SocketAddr>,
}

/// Subscriptions made with a token, by channel: one pointer for the many connections that
/// have none (a bare `HashMap` is 48 bytes in every session).
#[derive(Debug, Default)]
#[allow(clippy::box_collection)]
struct TokenSubscriptions(Option<Box<HashMap<Arc<str>, TokenSubscription>>>);

impl TokenSubscriptions {
    fn get(&self, channel: &str) -> Option<&TokenSubscription> {
        self.0.as_ref()?.get(channel)
    }

    fn contains_key(&self, channel: &str) -> bool {
        self.get(channel).is_some()
    }

    fn insert(&mut self, channel: Arc<str>, granted: TokenSubscription) {
        self.0.get_or_insert_with(Default::default).insert(channel, granted);
    }

    fn remove(&mut self, channel: &str) {
        if let Some(map) = &mut self.0 {
            map.remove(channel);
            if map.is_empty() {
                self.0 = None;
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &TokenSubscription)> {
        self.0.iter().flat_map(|map| map.iter())
    }
}

/// What a subscription token granted.
#[derive(Debug, Clone)]
struct TokenSubscription {
    /// When the token expires (Unix seconds).
    expires_at: u64,
    /// Its `info` claim, as JSON: this connection's presence entry on that channel.
    info: Option<Bytes>,
}

impl Session {
    pub fn new(node: Arc<Node>, outbox: Outbox) -> Self {
        Self::with_dialect(node, outbox, Dialect::Native)
    }

    pub fn with_dialect(node: Arc<Node>, outbox: Outbox, dialect: Dialect) -> Self {
        let id = node.next_id();
        Self {
            dialect,
            limiter: ConnectionLimiter::new(&node.config().limits, Instant::now()),
            close_with: None,
            node,
            id,
            outbox,
            client: None,
            user: String::new(),
            info: None,
            expires_at: 0,
            subscriptions: HashSet::new(),
            token_subscriptions: TokenSubscriptions::default(),
            claimed: Box::default(),
            peer: None,
        }
    }

    /// Counts a refused token, logs it (rate-limited), and makes the error reply.
    fn token_refused(&self, reason: crate::auth::TokenRefusal, message: String) -> Refusal {
        reason.count();
        let peer = self.peer.map(|p| p.to_string());
        crate::ratelog::refusal!(
            info,
            crate::ratelog::Kind::Token,
            peer = peer.as_deref().unwrap_or(""),
            user = self.user.as_str(),
            reason = reason.as_str(),
            session = self.id,
            door = self.dialect.transport(),
            "token refused: {message}"
        );
        refuse(ErrorCode::Unauthorized, message)
    }

    /// [`Self::token_refused`] for an error of the verifier.
    fn auth_refused(&self, e: crate::auth::AuthError) -> Refusal {
        match e.refusal() {
            Some(reason) => self.token_refused(reason, e.to_string()),
            None => refuse(e.code(), e.to_string()),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    /// Handles one text frame; errors are answered on the outbox and the connection goes on.
    /// A Centrifugo frame may carry several commands, one per line.
    pub async fn handle(&mut self, bytes: &[u8]) {
        match self.dialect {
            Dialect::Native => self.handle_one(ClientFrame::parse(bytes)).await,
            Dialect::Centrifugo => {
                for line in centrifugo::parse_frame(bytes) {
                    match line {
                        // Centrifugo's asynchronous messages go to an app's own handler; Herald
                        // has none, and `send` has no reply to carry an error. It still counts
                        // as a command, so a flood of them ends in a close like any other.
                        Ok(centrifugo::Line::Send) => {
                            let verdict = self.limiter.command(Instant::now());
                            let _ = self.rate_limited(verdict);
                        }
                        Ok(centrifugo::Line::Frame(frame)) => self.handle_one(Ok(frame)).await,
                        Err(e) => self.handle_one(Err(e)).await,
                    }
                    if self.close_with.is_some() {
                        break;
                    }
                }
            }
        }
    }

    async fn handle_one(&mut self, parsed: Result<ClientFrame, herald_protocol::FrameError>) {
        let verdict = self.limiter.command(Instant::now());
        if let Err((code, message)) = self.rate_limited(verdict) {
            let id = match &parsed {
                Ok(ClientFrame::Request { id, .. }) => Some(*id),
                Ok(ClientFrame::Pong) => return,
                Err(e) => e.id,
            };
            self.send(self.dialect.error(id, code, &message));
            return;
        }
        match parsed {
            Ok(ClientFrame::Pong) => {}
            Ok(ClientFrame::Request { id, command }) => {
                let name = command.name();
                let result = match command {
                    Command::Connect(c) => self.connect(id, c).await,
                    _ if !self.is_connected() => Err(refuse(ErrorCode::NotConnected, "send `connect` first")),
                    Command::Subscribe(s) => self.subscribe(id, s).await,
                    Command::Unsubscribe(u) => self.unsubscribe(id, u).await,
                    Command::Publish(p) => self.publish(id, p).await,
                    Command::History(h) => self.history(id, h).await,
                    Command::Presence(p) => self.presence(id, p, false).await,
                    Command::PresenceStats(p) => self.presence(id, p, true).await,
                    Command::Refresh(r) => self.refresh(id, r).await,
                    Command::SubRefresh(r) => self.sub_refresh(id, r),
                };
                if let Err((code, message)) = result {
                    tracing::debug!(session = self.id, command = name, code = code.as_u16(), %message, "refused");
                    self.send(self.dialect.error(Some(id), code, &message));
                }
            }
            Err(e) => {
                tracing::debug!(session = self.id, error = %e.message, "unreadable frame");
                self.send(self.dialect.error(e.id, e.code, &e.message));
            }
        }
    }

    /// Sends a reply in this session's dialect.
    fn reply(&self, id: u32, result: ReplyResult) {
        self.reply_tagged(id, result, &[]);
    }

    /// Sends a reply whose publications have these tags (by index; Centrifugo shows them).
    fn reply_tagged(&self, id: u32, result: ReplyResult, tags: &[Option<&crate::engine::Tags>]) {
        let ctx = ReplyContext {
            tags,
            now: unix_now(),
            client: self.client.as_deref().unwrap_or(""),
            version: crate::VERSION,
            expires_at: self.expires_at,
            recoverable: false,
        };
        self.send(self.dialect.reply(id, result, &ctx));
    }

    fn send(&self, frame: Vec<u8>) {
        // A client that does not read its replies is cut off (4001; 3008 on the Centrifugo
        // door), never left open with a reply missing. A closed outbox means the connection is
        // going away already.
        if self.outbox.send_text(Bytes::from(frame)) == Err(ws::SendError::Full) {
            crate::hub::close_slow_consumer_with(&self.outbox, self.dialect.close(CloseCode::SlowConsumer));
        }
    }

    /// The close code a command's outcome calls for (a limit), once.
    pub fn take_close(&mut self) -> Option<CloseCode> {
        self.close_with.take()
    }

    /// Turns a rate-limit verdict into a refusal (error 115), and into a close (4006) when the
    /// client was refused too often.
    fn rate_limited(&mut self, verdict: Verdict) -> Result<(), Refusal> {
        let limit = match verdict {
            Verdict::Allow => return Ok(()),
            Verdict::Refuse(limit) => limit,
            Verdict::Close(limit) => {
                if self.close_with.is_none() {
                    metrics::counter!("herald_limit_disconnects_total", "limit" => "max_refusals").increment(1);
                }
                self.close_with = Some(CloseCode::RateLimited);
                limit
            }
        };
        let l = &self.node.config().limits;
        let rate = match limit {
            crate::limits::Limit::Commands => l.commands_per_second,
            crate::limits::Limit::Publications => l.publications_per_second,
        };
        let key = limit.key();
        self.limit_hit(key, self.close_with.is_some());
        Err(refuse(ErrorCode::RateLimited, format!("slow down: at most {rate} a second (limits.{key})")))
    }

    /// Logs (rate-limited) a command refused by `limits.<key>`, and the close it led to.
    fn limit_hit(&self, key: &'static str, closing: bool) {
        let peer = self.peer.map(|p| p.to_string());
        let what = if closing { "too many refusals: closing (limits.max_refusals)" } else { "command refused" };
        crate::ratelog::refusal!(
            info,
            crate::ratelog::Kind::RateLimit,
            peer = peer.as_deref().unwrap_or(""),
            user = self.user.as_str(),
            limit = key,
            session = self.id,
            "{what}: over limits.{key}"
        );
    }

    /// Refuses a user's connection beyond `limits.max_connections_per_user` (error 106, then
    /// close 4501).
    fn check_user_connections(&mut self, user: &str) -> Result<(), Refusal> {
        let max = self.node.config().limits.max_connections_per_user;
        if user.is_empty() || self.node.user_connection_count(user) < max {
            return Ok(());
        }
        metrics::counter!("herald_limit_refusals_total", "limit" => "max_connections_per_user").increment(1);
        self.close_with = Some(CloseCode::TooManyConnections);
        let (peer, session) = (self.peer.map(|p| p.to_string()), self.id);
        crate::ratelog::refusal!(
            info,
            crate::ratelog::Kind::RateLimit,
            peer = peer.as_deref().unwrap_or(""),
            user,
            limit = "max_connections_per_user",
            session,
            "connection refused: limits.max_connections_per_user reached"
        );
        Err(refuse(
            ErrorCode::LimitExceeded,
            format!("at most {max} connections per user (limits.max_connections_per_user)"),
        ))
    }

    async fn connect(&mut self, id: u32, req: ConnectRequest) -> Result<(), Refusal> {
        if self.is_connected() {
            return Err(refuse(ErrorCode::BadRequest, "already connected"));
        }
        let (node, config) = (self.node.clone(), self.node.config());
        let mut claimed = Vec::new();
        match req.token.as_deref() {
            Some(token) => {
                let claims = self.verify(token)?;
                self.check_user_connections(&claims.user)?;
                claimed = self.claimed_channels(&config, &claims.user, &claims.channels)?;
                self.user = claims.user;
                self.expires_at = claims.expires_at;
                self.info = claims.info.map(|v| Bytes::from(v.to_string()));
            }
            None if !config.auth.allow_anonymous => {
                let missing = crate::auth::TokenRefusal::Missing;
                return Err(self.token_refused(missing, "a connection token is required".into()));
            }
            None => {}
        }
        let client = uuid::Uuid::new_v4().to_string();
        let ping = config.websocket.ping_interval.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
        let subscriptions = claimed.iter().map(|(c, _)| c.to_string()).collect();
        let reply = ConnectResult { client: client.clone(), version: crate::VERSION.to_owned(), ping, subscriptions };
        tracing::debug!(session = self.id, %client, name = req.name.as_deref().unwrap_or(""), "connected");
        // Queued before the reply: a client that saw its reply knows the event is on its way.
        node.webhooks().connect(&self.user, &client, self.dialect.transport());
        self.client = Some(client);
        self.reply(id, ReplyResult::Connect(reply));
        // Server-side subscriptions: each announced by a `subscribe` push sent under the
        // channel's lock, so it precedes the channel's first publication.
        self.claimed = claimed.iter().map(|(c, _)| c.shared().clone()).collect();
        for (channel, ns) in claimed {
            let name = channel.to_string();
            let (dialect, ctx) = (self.dialect, channel_context(ns.history_size > 0));
            let joined = self
                .join(&channel, ns, None, |result, tags| {
                    Bytes::from(dialect.push(&name, PushBody::Subscribe(result), &ReplyContext { tags, ..ctx }))
                })
                .await;
            if let Err((_, message)) = joined {
                tracing::warn!(session = self.id, channel = %channel, %message, "server-side subscription failed");
            }
        }
        Ok(())
    }

    /// The channels of a token's `channels` claim, checked before anything is subscribed: a
    /// claim naming a bad channel or another user's channel makes the whole token invalid.
    fn claimed_channels<'c>(
        &self,
        config: &'c crate::config::Config,
        user: &str,
        names: &[String],
    ) -> Result<Vec<(ChannelName, &'c NamespaceOptions)>, Refusal> {
        let cfg = &config.channels;
        let mut out: Vec<(ChannelName, &NamespaceOptions)> = Vec::new();
        for name in names {
            let claims = crate::auth::TokenRefusal::Claims;
            let (channel, ns) = cfg
                .resolve(name)
                .map_err(|e| self.token_refused(claims, format!("invalid token: `channels` claim: {e}")))?;
            if !channel.allows_user(user) {
                return Err(
                    self.token_refused(claims, "invalid token: `channels` claim names another user's channel".into())
                );
            }
            if !out.iter().any(|(c, _)| c == &channel) {
                out.push((channel, ns));
            }
        }
        if out.len() > cfg.max_subscriptions {
            let max = cfg.max_subscriptions;
            return Err(refuse(ErrorCode::LimitExceeded, format!("`channels` claim names more than {max} channels")));
        }
        Ok(out)
    }

    async fn subscribe(&mut self, id: u32, req: SubscribeRequest) -> Result<(), Refusal> {
        let node = self.node.clone();
        let cfg = &node.config().channels;
        let (channel, ns) = cfg.resolve(&req.channel)?;
        let access = ns.subscribe.level(Access::Anonymous);
        let expires = match req.token.as_deref() {
            Some(token) if access != Access::None => Some(self.subscription_token(token, &channel)?),
            None if access == Access::Token => {
                return Err(refuse(ErrorCode::TokenRequired, "this namespace needs a subscription token"));
            }
            _ => None,
        };
        if expires.is_none() {
            self.allowed(access, &channel)?;
        } else if !channel.allows_user(&self.user) {
            return Err(refuse(ErrorCode::PermissionDenied, "permission denied"));
        }
        if self.subscriptions.contains(channel.as_str()) {
            return Err(refuse(ErrorCode::AlreadySubscribed, "already subscribed"));
        }
        if self.subscriptions.len() >= cfg.max_subscriptions {
            let max = cfg.max_subscriptions;
            return Err(refuse(ErrorCode::LimitExceeded, format!("at most {max} subscriptions per connection")));
        }
        let recover = match (req.recover, req.epoch, req.offset) {
            (false, _, _) => None,
            (true, Some(epoch), Some(offset)) => Some(StreamPosition { epoch: Arc::from(epoch.as_str()), offset }),
            // No position yet (an app that always sends `recover: true`): nothing to recover,
            // so the reply says `recovered: false` with the current position.
            (true, None, None) => Some(crate::node::no_position()),
            (true, _, _) => return Err(refuse(ErrorCode::BadRequest, "`recover` needs both `epoch` and `offset`")),
        };
        let expires = expires.map(|granted| {
            let at = granted.expires_at;
            self.token_subscriptions.insert(channel.shared().clone(), granted);
            at
        });
        let (dialect, ctx) = (self.dialect, channel_context(ns.history_size > 0));
        let joined = self
            .join(&channel, ns, recover, |result, tags| {
                let result = ReplyResult::Subscribe(SubscribeResult { expires, ..result });
                Bytes::from(dialect.reply(id, result, &ReplyContext { tags, ..ctx }))
            })
            .await;
        if joined.is_err() {
            self.token_subscriptions.remove(channel.as_str());
        }
        joined
    }

    /// Checks a subscription token for `channel` and this connection's user.
    fn subscription_token(&self, token: &str, channel: &ChannelName) -> Result<TokenSubscription, Refusal> {
        use crate::auth::TokenRefusal;
        let Some(verifier) = self.node.verifier() else {
            let message = "this server has no key to verify subscription tokens".into();
            return Err(self.token_refused(TokenRefusal::NoKey, message));
        };
        let claims = verifier.verify_subscription(token).map_err(|e| self.auth_refused(e))?;
        if claims.user != self.user {
            let message = "the subscription token is for another user".into();
            return Err(self.token_refused(TokenRefusal::WrongUser, message));
        }
        if claims.channel != channel.as_str() {
            let message = "the subscription token is for another channel".into();
            return Err(self.token_refused(TokenRefusal::WrongChannel, message));
        }
        Ok(TokenSubscription { expires_at: claims.expires_at, info: claims.info.map(|v| Bytes::from(v.to_string())) })
    }

    /// Whether this client may do what `access` asks on `channel` (beside the channel's own
    /// user list).
    fn allowed(&self, access: Access, channel: &ChannelName) -> Result<(), Refusal> {
        let who =
            Identity { user: &self.user, has_channel_token: self.token_subscriptions.contains_key(channel.as_str()) };
        crate::rules::check(access, channel, who)
    }

    /// Subscribes this connection to `channel`; `frame` makes the first frame the client gets
    /// for it (a reply or a push) from the channel's position.
    async fn join(
        &mut self,
        channel: &ChannelName,
        ns: &NamespaceOptions,
        recover: Option<StreamPosition>,
        frame: impl FnOnce(SubscribeResult, &[Option<&crate::engine::Tags>]) -> Bytes,
    ) -> Result<(), Refusal> {
        let node = self.node.clone();
        let sub = Subscriber { id: self.id, outbox: self.outbox.clone(), encoder: self.dialect.encoder() };
        // Recorded before awaiting, so a session cancelled mid-subscribe still leaves the
        // channel when it is dropped.
        self.subscriptions.insert(channel.shared().clone());
        let result = node
            .subscribe(channel, ns, sub, recover, |history, recovered| {
                let tags: Vec<_> = history.publications.iter().map(|p| p.tags.as_deref()).collect();
                let result = SubscribeResult {
                    epoch: history.position.epoch.to_string(),
                    offset: history.position.offset,
                    recovered,
                    publications: history.publications.iter().map(super::wire::to_wire).collect(),
                    expires: None,
                    conflated: ns.conflated(),
                };
                Some(frame(result, &tags))
            })
            .await;
        match result {
            Ok(_) => {
                if ns.presence {
                    self.presence_add(channel, ns.join_leave).await;
                }
                Ok(())
            }
            Err(failure) => {
                self.subscriptions.remove(channel.as_str());
                match failure {
                    SubscribeFailure::Hub(SubscribeError::AlreadySubscribed) => {
                        Err(refuse(ErrorCode::AlreadySubscribed, "already subscribed"))
                    }
                    SubscribeFailure::Hub(SubscribeError::Closed) => Ok(()),
                    SubscribeFailure::Engine(e) => Err(refuse(e.code(), e.to_string())),
                }
            }
        }
    }

    async fn presence_add(&self, channel: &ChannelName, join_leave: bool) {
        let entry = self.presence_entry(channel.as_str());
        let ttl = self.presence_ttl();
        let client = ClientInfo { user: entry.user.clone(), client: entry.client.clone() };
        let info = entry.info.as_ref().map(|i| String::from_utf8_lossy(i).into_owned());
        match self.node.presence_add(channel.as_str(), entry, ttl).await {
            Ok(PresenceChange::UserJoined) if join_leave => {
                self.node.broadcast(channel.as_str(), &ChannelEvent::Join { client, info }).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(channel = %channel, error = %e, "presence not recorded"),
        }
    }

    async fn presence_remove(&self, channel: &str) {
        let Some(client) = self.client.as_deref() else { return };
        let config = self.node.config();
        let ns = config.channels.resolve(channel).ok().map(|(_, ns)| ns);
        // A namespace a reload removed may have had presence: the entry is removed all the same.
        if ns.is_some_and(|ns| !ns.presence) {
            return;
        }
        match self.node.presence_remove(channel, client).await {
            Ok((PresenceChange::UserLeft, Some(entry))) if ns.is_some_and(|ns| ns.join_leave) => {
                let client = ClientInfo { user: entry.user, client: entry.client };
                self.node.broadcast(channel, &ChannelEvent::Leave { client }).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(channel, error = %e, "presence not removed"),
        }
    }

    /// This client's presence entry on `channel`: the subscription token's `info` where one
    /// gave it, else the connection token's.
    fn presence_entry(&self, channel: &str) -> PresenceEntry {
        let info = self.token_subscriptions.get(channel).and_then(|t| t.info.clone()).or_else(|| self.info.clone());
        PresenceEntry { client: self.client.clone().unwrap_or_default(), user: self.user.clone(), info }
    }

    /// Presence lives three ping intervals unless refreshed (each ping refreshes it).
    fn presence_ttl(&self) -> std::time::Duration {
        self.node.config().websocket.ping_interval * 3
    }

    /// Refreshes this client's presence on its channels (called every ping interval).
    pub async fn refresh_presence(&self) {
        let config = self.node.config();
        for channel in &self.subscriptions {
            let Ok((name, ns)) = config.channels.resolve(channel) else { continue };
            if ns.presence {
                let entry = self.presence_entry(name.as_str());
                let _ = self.node.presence_add(name.as_str(), entry, self.presence_ttl()).await;
            }
        }
    }

    async fn unsubscribe(&mut self, id: u32, req: UnsubscribeRequest) -> Result<(), Refusal> {
        let (channel, _) = self.node.config().channels.resolve(&req.channel)?;
        self.token_subscriptions.remove(channel.as_str());
        if self.subscriptions.remove(channel.as_str()) {
            self.node.unsubscribe(channel.as_str(), self.id);
            self.presence_remove(channel.as_str()).await;
        }
        self.reply(id, ReplyResult::Unsubscribe);
        Ok(())
    }

    async fn publish(&mut self, id: u32, req: PublishRequest) -> Result<(), Refusal> {
        let node = self.node.clone();
        let cfg = &node.config().channels;
        let (channel, ns) = cfg.resolve(&req.channel)?;
        self.allowed(ns.publish.level(Access::Anonymous), &channel)?;
        let data = req.data.get();
        crate::rules::check_publication_size(cfg, data.len())?;
        let verdict = self.limiter.publication(Instant::now());
        self.rate_limited(verdict)?;
        let info = self.client.as_ref().map(|c| ClientInfo { user: self.user.clone(), client: c.clone() });
        let pos = node
            .publish(&channel, ns, Publish { info, ..Publish::data(Bytes::copy_from_slice(data.as_bytes())) })
            .await
            .map_err(|e| crate::rules::engine_refusal(&e))?;
        self.reply(id, ReplyResult::Publish(PublishResult { epoch: pos.epoch.to_string(), offset: pos.offset }));
        Ok(())
    }

    fn verify(&self, token: &str) -> Result<crate::auth::Claims, Refusal> {
        let Some(verifier) = self.node.verifier() else {
            let message = "this server has no key to verify connection tokens".into();
            return Err(self.token_refused(crate::auth::TokenRefusal::NoKey, message));
        };
        verifier.verify(token).map_err(|e| self.auth_refused(e))
    }

    async fn refresh(&mut self, id: u32, req: RefreshRequest) -> Result<(), Refusal> {
        let claims = self.verify(&req.token)?;
        if claims.user != self.user {
            let message = "a refreshed token must be for the same user".into();
            return Err(self.token_refused(crate::auth::TokenRefusal::WrongUser, message));
        }
        self.expires_at = claims.expires_at;
        self.reply(id, ReplyResult::Refresh(RefreshResult { expires: claims.expires_at }));
        Ok(())
    }

    fn sub_refresh(&mut self, id: u32, req: SubRefreshRequest) -> Result<(), Refusal> {
        let (channel, _) = self.node.config().channels.resolve(&req.channel)?;
        if !self.token_subscriptions.contains_key(channel.as_str()) {
            return Err(refuse(ErrorCode::NotSubscribed, "not subscribed to this channel with a token"));
        }
        let granted = self.subscription_token(&req.token, &channel)?;
        let expires = granted.expires_at;
        // The new `info` shows in presence from the next refresh (every ping interval).
        self.token_subscriptions.insert(channel.shared().clone(), granted);
        self.reply(id, ReplyResult::SubRefresh(SubRefreshResult { expires }));
        Ok(())
    }

    /// Whether the connection's token has expired, leeway included (and was not refreshed).
    pub fn token_expired(&self) -> bool {
        self.expires_at != 0 && unix_now() >= self.expires_at.saturating_add(self.leeway())
    }

    fn leeway(&self) -> u64 {
        self.node.config().auth.leeway.as_secs()
    }

    /// The next moment (Unix seconds) a token of this connection runs out, leeway included:
    /// the connection's own, or a subscription's.
    pub fn next_expiry(&self) -> Option<u64> {
        let connection = (self.expires_at != 0).then_some(self.expires_at);
        let subscription = self.token_subscriptions.iter().map(|(_, t)| t.expires_at).min();
        connection.into_iter().chain(subscription).min().map(|at| at.saturating_add(self.leeway()))
    }

    /// Ends what has run out: returns `true` when the connection's token has (the caller
    /// closes with 4005); otherwise ends each expired subscription with an `unsubscribe` push
    /// carrying code 117.
    pub async fn expire(&mut self) -> bool {
        if self.token_expired() {
            return true;
        }
        let (now, leeway) = (unix_now(), self.leeway());
        let due: Vec<Arc<str>> = self
            .token_subscriptions
            .iter()
            .filter(|(_, t)| now >= t.expires_at.saturating_add(leeway))
            .map(|(channel, _)| channel.clone())
            .collect();
        for channel in due {
            self.token_subscriptions.remove(&channel);
            if self.subscriptions.remove(&channel) {
                self.node.unsubscribe(&channel, self.id);
                self.presence_remove(&channel).await;
                let code = ErrorCode::SubscriptionExpired;
                let body =
                    PushBody::Unsubscribe(Unsubscribed { code: Some(code.as_u16()), reason: code.message().into() });
                self.send(self.dialect.push(&channel, body, &channel_context(false)));
                tracing::debug!(session = self.id, channel = %channel, "subscription token expired");
            }
        }
        false
    }

    /// Checks that this client may read `name` by the namespace's `rule` (`true` meaning:
    /// whoever may subscribe).
    fn readable(
        &self,
        name: &str,
        rule: impl Fn(&NamespaceOptions) -> crate::channel::Rule,
    ) -> Result<(ChannelName, NamespaceOptions), Refusal> {
        let config = self.node.config();
        let (channel, ns) = config.channels.resolve(name)?;
        self.allowed(rule(ns).level(ns.subscribe.level(Access::Anonymous)), &channel)?;
        Ok((channel, ns.clone()))
    }

    async fn history(&mut self, id: u32, req: HistoryRequest) -> Result<(), Refusal> {
        let (channel, ns) = self.readable(&req.channel, |ns| ns.history_access)?;
        let since = req.since.map(|p| StreamPosition { epoch: Arc::from(p.epoch.as_str()), offset: p.offset });
        let limit = req.limit.map(|l| l as usize);
        let h = self.node.history(&channel, &ns, since, limit, req.reverse).await?;
        let result = HistoryResult {
            epoch: h.position.epoch.to_string(),
            offset: h.position.offset,
            publications: h.publications.iter().map(super::wire::to_wire).collect(),
        };
        let tags: Vec<_> = h.publications.iter().map(|p| p.tags.as_deref()).collect();
        self.reply_tagged(id, ReplyResult::History(result), &tags);
        Ok(())
    }

    async fn presence(&mut self, id: u32, req: ChannelRequest, stats: bool) -> Result<(), Refusal> {
        let (channel, ns) = self.readable(&req.channel, |ns| ns.presence_access)?;
        if !ns.presence {
            return Err(refuse(ErrorCode::NotAvailable, "presence is off in this namespace"));
        }
        if stats {
            let s = self.node.presence_stats(channel.as_str()).await?;
            let result = PresenceStatsResult { clients: s.clients as u64, users: s.users as u64 };
            self.reply(id, ReplyResult::PresenceStats(result));
        } else {
            let list = self.node.presence(channel.as_str()).await?;
            self.reply(id, ReplyResult::Presence(super::wire::presence_result(list)));
        }
        Ok(())
    }

    /// Carries out what the API asked.
    pub async fn control(&mut self, control: Control) -> Option<(u16, String)> {
        match control {
            Control::Disconnect { code, reason } => Some((code, reason)),
            Control::Unsubscribe { channel } => {
                if let Some(name) = self.subscriptions.take(channel.as_str()) {
                    self.token_subscriptions.remove(&name);
                    self.node.unsubscribe(&name, self.id);
                    self.presence_remove(&name).await;
                    let body = PushBody::Unsubscribe(Unsubscribed::default());
                    self.send(self.dialect.push(&name, body, &channel_context(false)));
                }
                None
            }
        }
    }

    /// After a reload: ends, with an `unsubscribe` push carrying the refusal's code, each
    /// subscription the new rules would refuse now (namespace gone, subscribing no longer
    /// allowed to this connection, another user's channel). Subscriptions a token granted (a
    /// subscription token, the connection token's `channels` claim) stay while their
    /// namespace exists and allows subscribing at all.
    pub async fn recheck(&mut self) {
        let config = self.node.config();
        let ended: Vec<(Arc<str>, Refusal)> = self
            .subscriptions
            .iter()
            .filter_map(|channel| self.still_allowed(&config, channel).err().map(|r| (channel.clone(), r)))
            .collect();
        for (channel, (code, reason)) in ended {
            self.subscriptions.remove(&channel);
            self.token_subscriptions.remove(&channel);
            self.node.unsubscribe(&channel, self.id);
            self.presence_remove(&channel).await;
            metrics::counter!("herald_reload_unsubscribes_total").increment(1);
            tracing::info!(session = self.id, channel = %channel, %reason, "configuration reloaded: subscription ended");
            let reason = format!("configuration reloaded: {reason}");
            let body = PushBody::Unsubscribe(Unsubscribed { code: Some(code.as_u16()), reason });
            self.send(self.dialect.push(&channel, body, &channel_context(false)));
        }
    }

    fn still_allowed(&self, config: &crate::config::Config, channel: &str) -> Result<(), Refusal> {
        let (name, ns) = config.channels.resolve(channel)?;
        let access = ns.subscribe.level(Access::Anonymous);
        let granted = self.token_subscriptions.contains_key(channel) || self.claimed.iter().any(|c| &**c == channel);
        if !granted {
            return self.allowed(access, &name);
        }
        if access == Access::None {
            return Err(refuse(ErrorCode::PermissionDenied, "this namespace no longer allows subscribing"));
        }
        if !name.allows_user(&self.user) {
            return Err(refuse(ErrorCode::PermissionDenied, "permission denied"));
        }
        Ok(())
    }

    /// Leaves every channel. Called when the connection ends.
    pub async fn end(&mut self) {
        let channels: Vec<Arc<str>> = self.subscriptions.drain().collect();
        for channel in channels {
            self.node.unsubscribe(&channel, self.id);
            self.presence_remove(&channel).await;
        }
        if let Some(client) = self.client.take() {
            self.node.webhooks().disconnect(&self.user, &client, self.dialect.transport());
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Longest wait armed for a token's expiry. A token's `exp` is whatever its signer wrote (up
/// to 2^64 - 1 s): a later one waits this long, finds nothing due (`Session::expire` checks the
/// wall clock) and waits again, so a far-future `exp` never overflows the runtime's clock.
const MAX_EXPIRY_WAIT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// When `at` (Unix seconds) comes, on the runtime's clock, or [`MAX_EXPIRY_WAIT`] from now if
/// that is sooner.
fn instant_at(at: u64) -> Instant {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let wait = std::time::Duration::from_secs(at).saturating_sub(now).min(MAX_EXPIRY_WAIT);
    let start = Instant::now();
    start.checked_add(wait).unwrap_or(start)
}

/// The native protocol's encoding: `{"push":{"channel":..,"pub":{..}}}` in a text frame; join
/// and leave pushes; client events are not part of it.
#[derive(Debug)]
pub struct NativeEncoder;

/// The native protocol's encoder, shared by every native subscription.
pub static NATIVE: NativeEncoder = NativeEncoder;

impl Encoder for NativeEncoder {
    fn slot(&self) -> usize {
        0
    }

    fn publication(&self, channel: &str, _epoch: &str, record: &PublicationRecord) -> Frame {
        let push = herald_protocol::encode_pub_push(channel, Some(record.offset), &record.data, record.info.as_ref());
        Frame::text(push)
    }

    fn conflated_publication(&self, channel: &str, _epoch: &str, record: &PublicationRecord) -> Frame {
        let push =
            herald_protocol::encode_conflated_pub_push(channel, record.offset, &record.data, record.info.as_ref());
        Frame::text(push)
    }

    fn event(&self, channel: &str, event: &ChannelEvent) -> Option<Frame> {
        let body = match event {
            ChannelEvent::Join { client, .. } => PushBody::Join(client.clone()),
            ChannelEvent::Leave { client } => PushBody::Leave(client.clone()),
            ChannelEvent::Client { .. } => return None,
        };
        Some(Frame::text(ServerFrame::Push { channel: channel.to_owned(), body }.encode()))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // `end` normally ran already; this is the safety net for a task that was cancelled
        // (presence then expires by itself).
        for channel in self.subscriptions.drain() {
            self.node.unsubscribe(&channel, self.id);
        }
        if let Some(client) = self.client.take() {
            self.node.webhooks().disconnect(&self.user, &client, self.dialect.transport());
        }
    }
}

/// Runs a native-protocol connection to its end.
/// Runs a native-protocol connection to its end.
///
/// This future lives as long as the connection, so what it holds while idle is paid once per
/// connection (about 1 KiB, see `docs/benchmarks.md`): it is an `async` block over its
/// arguments (an `async fn` would keep a second copy of the socket), the rarely reached
/// futures (command handling, control messages, the end) are boxed, and the connect deadline
/// is freed once the client has connected.
pub fn run(node: Arc<Node>, socket: WebSocket, dialect: Dialect) -> impl std::future::Future<Output = ()> + Send {
    run_from(node, socket, dialect, None)
}

/// [`run`] for a client at `peer` (named in the log lines of its refusals).
// An `async fn` here measured 392 bytes larger: it kept the socket argument twice.
#[allow(clippy::manual_async_fn)]
pub fn run_from(
    node: Arc<Node>,
    mut socket: WebSocket,
    dialect: Dialect,
    peer: Option<std::net::SocketAddr>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let _count = node.session_guard();
        socket.disable_keepalive();
        let mut session = Session::with_dialect(node.clone(), socket.outbox().clone(), dialect);
        session.peer = peer;
        let every = node.config().websocket.ping_interval;
        let pong_timeout = node.config().websocket.pong_timeout;
        let mut ping = tokio::time::interval_at(Instant::now() + every, every);
        let mut connect_by = Some(Box::pin(tokio::time::sleep(node.config().websocket.handshake_timeout)));
        let mut closing = false;
        let mut reloads = node.reloads();
        let close = |socket: &mut WebSocket, code: CloseCode| {
            let (code, reason) = dialect.close(code);
            socket.close(ws::CloseCode(code), reason);
        };
        let mut inbox: Option<tokio::sync::mpsc::Receiver<Control>> = None;
        let mut registered = String::new();
        // When the next token (the connection's or a subscription's) runs out; only
        // connections with a token pay for the timer.
        let mut expiry: Option<(u64, std::pin::Pin<Box<tokio::time::Sleep>>)> = None;
        loop {
            let due = session.next_expiry();
            if due != expiry.as_ref().map(|(at, _)| *at) {
                expiry = due.map(|at| (at, Box::pin(tokio::time::sleep_until(instant_at(at)))));
            }
            if inbox.is_none() && !session.user.is_empty() {
                registered = session.user.clone();
                inbox = Some(node.register_user(&registered, session.id));
            }
            if connect_by.is_some() && session.is_connected() {
                connect_by = None;
            }
            tokio::select! {
                Some(control) = async { inbox.as_mut()?.recv().await }, if inbox.is_some() && !closing => {
                    if let Some((code, reason)) = Box::pin(session.control(control)).await {
                        let (code, reason) = match dialect {
                            Dialect::Native => (code, reason),
                            Dialect::Centrifugo => centrifugo::close_number(code, &reason),
                        };
                        socket.close(ws::CloseCode(code), &reason);
                        closing = true;
                    }
                }
                Ok(()) = reloads.changed(), if !closing => Box::pin(session.recheck()).await,
                received = socket.recv() => match received {
                    Ok(Some(Message::Text(bytes))) => {
                        Box::pin(session.handle(&bytes)).await;
                        if let Some(code) = session.take_close() {
                            close(&mut socket, code);
                            closing = true;
                        } else if socket.outbox().queued_bytes() > node.config().websocket.max_queue_bytes / 2 {
                            // Commands already buffered are handled without a pause: let this
                            // connection's writer drain the replies before the queue overflows.
                            tokio::task::yield_now().await;
                        }
                    }
                    Ok(Some(Message::Binary(_))) => {
                        let reason = match dialect {
                            Dialect::Native => "herald.v1 is JSON in text frames",
                            Dialect::Centrifugo => "Herald speaks Centrifugo's JSON protocol only, not protobuf",
                        };
                        socket.close(ws::CloseCode::UNSUPPORTED_DATA, reason);
                        closing = true;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(session = session.id, error = %e, "connection ended");
                        break;
                    }
                },
                _ = ping.tick(), if !closing => {
                    if socket.last_seen().elapsed() >= every + pong_timeout {
                        close(&mut socket, CloseCode::NoPong);
                        closing = true;
                    } else if session.token_expired() {
                        close(&mut socket, CloseCode::TokenExpired);
                        closing = true;
                    } else if session.is_connected() {
                        session.send(b"{}".to_vec());
                        Box::pin(session.refresh_presence()).await;
                    }
                }
                Some(()) = async { expiry.as_mut()?.1.as_mut().await; Some(()) }, if !closing && expiry.is_some() => {
                    expiry = None;
                    if Box::pin(session.expire()).await {
                        close(&mut socket, CloseCode::TokenExpired);
                        closing = true;
                    }
                }
                Some(()) = async { connect_by.as_mut()?.await; Some(()) }, if !closing && connect_by.is_some() => {
                    close(&mut socket, CloseCode::ConnectTimeout);
                    closing = true;
                }
            }
        }
        if inbox.is_some() {
            node.unregister_user(&registered, session.id);
        }
        Box::pin(session.end()).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::config::{Config, NamespaceOptions};
    use crate::ws::{SendMode, WsContext, WsMetrics};

    #[test]
    fn a_far_future_expiry_waits_at_most_a_day_without_overflowing() {
        for at in [u64::MAX, u64::MAX / 2, 1 << 40] {
            let wait = instant_at(at).saturating_duration_since(Instant::now());
            assert!(wait <= MAX_EXPIRY_WAIT && wait > MAX_EXPIRY_WAIT / 2, "{at}: {wait:?}");
        }
        let soon = unix_now() + 60;
        assert!(instant_at(soon).saturating_duration_since(Instant::now()) <= std::time::Duration::from_secs(61));
        assert!(instant_at(0) <= Instant::now(), "a past expiry is due now");
    }

    fn node() -> Arc<Node> {
        let mut config = Config::default();
        config
            .channels
            .namespaces
            .insert("chat".into(), NamespaceOptions { publish: true.into(), ..Default::default() });
        let ws = WsContext {
            shutdown: Default::default(),
            drain_spread: Default::default(),
            tracker: Default::default(),
            metrics: WsMetrics::new(),
        };
        Arc::new(Node::new(Arc::new(config), ws, None))
    }

    /// The JSON texts queued on `outbox` (each a small unmasked text frame).
    async fn sent(outbox: &Outbox) -> Vec<serde_json::Value> {
        let mut batch = VecDeque::new();
        if outbox.queued_bytes() > 0 {
            outbox.next_batch(&mut batch).await;
        }
        batch
            .iter()
            .map(|f| {
                let at = if f[1] & 0x7f == 126 { 4 } else { 2 };
                serde_json::from_slice(&f[at..]).expect("json")
            })
            .collect()
    }

    #[tokio::test]
    async fn a_session_is_driven_by_frames_alone() {
        let node = node();
        let (a_out, b_out) = (Outbox::new(1 << 20, SendMode::PLAIN), Outbox::new(1 << 20, SendMode::PLAIN));
        let mut a = Session::new(node.clone(), a_out.clone());
        let mut b = Session::new(node.clone(), b_out.clone());
        a.handle(br#"{"id":1,"subscribe":{"channel":"chat:x"}}"#).await;
        assert_eq!(sent(&a_out).await[0]["error"]["code"], 108);
        for s in [&mut a, &mut b] {
            s.handle(br#"{"id":2,"connect":{}}"#).await;
            s.handle(br#"{"id":3,"subscribe":{"channel":"chat:x"}}"#).await;
        }
        a.handle(br#"{"id":4,"publish":{"channel":"chat:x","data":[1,2]}}"#).await;
        let got = sent(&b_out).await;
        assert_eq!(got[0]["connect"]["ping"], 25);
        assert_eq!(got[1]["subscribe"]["offset"], 0);
        assert_eq!(got[2]["push"]["pub"]["data"], serde_json::json!([1, 2]));
        let got = sent(&a_out).await;
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[2]["push"]["pub"]["offset"], 1, "push queued under the channel lock, before the reply");
        assert_eq!(got[3]["publish"]["offset"], 1);
        assert_eq!(node.info().subscriptions, 2);
        a.end().await;
        assert_eq!(node.info().subscriptions, 1, "ending a session leaves its channels");
    }
}
