//! `/app/<key>`: one Pusher protocol 7 connection. Subscriptions go through `Node::subscribe`
//! with [`PusherEncoder`], client events through `Node::broadcast`, presence through the
//! engine: a Pusher client and a native client on the same channel see each other's
//! publications and members.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Request, State};
use axum::response::Response;
use bytes::Bytes;
use herald_protocol::ClientInfo;
use tokio::time::Instant;

use super::protocol::{self, close, ChannelData, ClientMessage, Signin, Subscribe, Unsubscribe, UserData};
use super::{auth, socket_id, Kind, PusherApp};
use crate::channel::{Access, ChannelName};
use crate::engine::{PresenceChange, PresenceEntry, PublicationRecord};
use crate::hub::{ChannelEvent, Encoder, Frame, Sink, Subscriber};
use crate::limits::{ConnectionLimiter, Verdict};
use crate::node::{Control, Node, SubscribeFailure};
use crate::ws::{self, Message, Outbox, WebSocket};

/// The encoder of Pusher subscribers: `{"event":..,"channel":..,"data":"<string>"}`.
#[derive(Debug)]
pub struct PusherEncoder {
    /// Event name of publications without an `event` tag (the app's `event_name`).
    event_name: String,
}

/// The Pusher name of a Herald channel: without its namespace (Pusher names have no `:`).
fn pusher_channel(channel: &str) -> std::borrow::Cow<'_, str> {
    super::pusher_form(channel.split_once(':').map_or(channel, |(_, name)| name))
}

impl Encoder for PusherEncoder {
    fn slot(&self) -> usize {
        3
    }

    fn publication(&self, channel: &str, _epoch: &str, record: &PublicationRecord) -> Frame {
        let event = record.tags.as_ref().and_then(|t| t.get("event")).map_or(self.event_name.as_str(), String::as_str);
        let text = protocol::event(event, Some(&pusher_channel(channel)), &protocol::data_text(&record.data));
        Frame::text(text)
    }

    fn event(&self, channel: &str, event: &ChannelEvent) -> Option<Frame> {
        let name = &*pusher_channel(channel);
        // Members exist on presence channels only; elsewhere joins and leaves are not shown.
        let presence = Kind::of(name) == Kind::Presence;
        let text = match event {
            ChannelEvent::Join { client, info } if presence && !client.user.is_empty() => {
                let info = info.as_deref().and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok());
                let mut data = serde_json::json!({ "user_id": client.user });
                if let Some(info) = info {
                    data["user_info"] = info;
                }
                protocol::event("pusher_internal:member_added", Some(name), &data.to_string())
            }
            ChannelEvent::Leave { client } if presence && !client.user.is_empty() => {
                let data = serde_json::json!({ "user_id": client.user }).to_string();
                protocol::event("pusher_internal:member_removed", Some(name), &data)
            }
            ChannelEvent::Client { event, data, user, .. } => {
                protocol::event_raw(event, Some(name), data, user.as_deref().filter(|_| presence))
            }
            _ => return None,
        };
        Some(Frame::text(text))
    }

    fn sink(&self) -> Sink {
        Sink::WebSocket
    }

    fn slow_consumer_close(&self) -> (u16, &'static str) {
        (close::OVER_CAPACITY, SLOW)
    }

    /// pusher-js reconnects at once on 4200-4299 (it would give up on Herald's 4004, which
    /// Pusher uses for "over connection quota").
    fn lost_close(&self) -> (u16, &'static str) {
        (close::GENERIC_RECONNECT, "missed publications; reconnect")
    }
}

/// Why a Pusher client that does not read fast enough is closed (4100: reconnect after a
/// back-off; Herald's own 4001 would tell pusher-js never to reconnect).
const SLOW: &str = "Over capacity: this connection did not read its messages fast enough";

/// The encoder for apps whose default event name is `event_name`: one per distinct name for
/// the life of the process (a handful, from the configuration), so subscribers can hold a
/// `&'static` one. Apps never share a channel (their namespaces differ), so two encoders never
/// meet in one channel's slot.
pub fn encoder(event_name: &str) -> &'static PusherEncoder {
    static ENCODERS: Mutex<Vec<&'static PusherEncoder>> = Mutex::new(Vec::new());
    let mut list = ENCODERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = list.iter().find(|e| e.event_name == event_name) {
        return e;
    }
    let e: &'static PusherEncoder = Box::leak(Box::new(PusherEncoder { event_name: event_name.to_owned() }));
    list.push(e);
    e
}

/// `GET /app/<key>?protocol=7`: the WebSocket is accepted whatever the key or protocol, then
/// refused with a `pusher:error` and Pusher's close code (as Pusher does), so pusher-js knows
/// not to retry.
pub async fn connect(State(node): State<Arc<Node>>, Path(key): Path<String>, req: Request) -> Response {
    let protocol =
        req.uri().query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("protocol=")).map(str::to_owned);
    let settings = node.ws_settings();
    let ctx = node.ws.clone();
    ws::upgrade(req, &ctx, settings, &[], move |socket| run(node, key, protocol, socket))
}

fn refuse_connection(socket: &mut WebSocket, code: u16, message: &str) {
    let _ = socket.outbox().send_text(protocol::error(Some(code), message));
    socket.close(ws::CloseCode(code), message);
}

async fn run(node: Arc<Node>, key: String, protocol: Option<String>, mut socket: WebSocket) {
    let _count = node.session_guard();
    socket.disable_keepalive();
    let config = node.config();
    let app = config.pusher.apps.iter().position(|a| a.key == key);
    let refused = match (&app, protocol.as_deref()) {
        (None, _) => Some((close::APP_NOT_FOUND, format!("App key {key} does not exist"))),
        (_, None) => Some((close::NO_PROTOCOL, "No protocol version supplied (?protocol=7)".to_owned())),
        (_, Some(p)) if p.parse::<u32>().map_or(true, |v| !(5..=7).contains(&v)) => {
            Some((close::UNSUPPORTED_PROTOCOL, format!("Unsupported protocol version {p}: this server speaks 7")))
        }
        _ => None,
    };
    let (Some(app), None) = (app, &refused) else {
        let (code, message) = refused.unwrap_or((close::APP_NOT_FOUND, String::new()));
        refuse_connection(&mut socket, code, &message);
        while let Ok(Some(_)) = socket.recv().await {}
        return;
    };
    metrics::gauge!("herald_pusher_connections").increment(1.0);
    let mut reloads = node.reloads();
    let mut conn = Connection::new(node.clone(), config.clone(), app, socket.outbox().clone());
    let established = serde_json::json!({
        "socket_id": conn.socket_id,
        "activity_timeout": config.pusher.activity_timeout.as_secs(),
    });
    node.webhooks().connect("", &conn.socket_id, "pusher");
    conn.send(protocol::event("pusher:connection_established", None, &established.to_string()));
    let activity = config.pusher.activity_timeout;
    let pong_timeout = config.websocket.pong_timeout;
    let every = config.websocket.ping_interval.min(activity).min(pong_timeout);
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    // When the server's `pusher:ping` went out, while no message has come since.
    let mut pinged: Option<Instant> = None;
    let mut closing = false;
    let mut signin_by =
        conn.app().user_authentication.then(|| Box::pin(tokio::time::sleep(config.pusher.signin_timeout)));
    drop(config);
    let mut inbox: Option<tokio::sync::mpsc::Receiver<Control>> = None;
    loop {
        if inbox.is_none() {
            if let Some(user) = &conn.registered {
                inbox = Some(node.register_user(user, conn.id));
                signin_by = None;
            }
        }
        tokio::select! {
            Some(control) = async { inbox.as_mut()?.recv().await }, if inbox.is_some() && !closing => {
                match control {
                    Control::Disconnect { code, reason } => {
                        socket.close(ws::CloseCode(code), &reason);
                        closing = true;
                    }
                    Control::Unsubscribe { channel } => conn.leave(&channel).await,
                }
            }
            Ok(()) = reloads.changed(), if !closing => {
                if let Some((code, reason)) = Box::pin(conn.reconfigure(node.config())).await {
                    refuse_connection(&mut socket, code, &reason);
                    closing = true;
                }
            }
            received = socket.recv() => match received {
                Ok(Some(Message::Text(bytes))) => {
                    pinged = None;
                    Box::pin(conn.handle(&bytes)).await;
                    if let Some((code, reason)) = conn.close_with.take() {
                        socket.close(ws::CloseCode(code), &reason);
                        closing = true;
                    }
                }
                Ok(Some(Message::Binary(_))) => {
                    conn.send(protocol::error(None, "Pusher messages are JSON in text frames"));
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(socket_id = %conn.socket_id, error = %e, "pusher connection ended");
                    break;
                }
            },
            _ = tick.tick(), if !closing => {
                let silent = socket.last_seen().elapsed();
                let unanswered = pinged.is_some_and(|at| at.elapsed() >= pong_timeout && socket.last_seen() <= at);
                if unanswered || silent >= activity + pong_timeout {
                    socket.close(ws::CloseCode(close::PONG_TIMEOUT), "Pong reply not received");
                    closing = true;
                } else if silent >= activity && pinged.is_none() {
                    conn.send(protocol::event("pusher:ping", None, "{}"));
                    pinged = Some(Instant::now());
                }
                Box::pin(conn.refresh_presence()).await;
            }
            Some(()) = async { signin_by.as_mut()?.await; Some(()) }, if signin_by.is_some() && !closing => {
                signin_by = None;
                refuse_connection(&mut socket, close::UNAUTHORIZED, "Connection not signed in within the signin timeout");
                closing = true;
            }
        }
    }
    if inbox.is_some() {
        if let Some(user) = &conn.registered {
            node.unregister_user(user, conn.id);
        }
    }
    Box::pin(conn.end()).await;
    node.webhooks().disconnect(conn.user.as_deref().unwrap_or(""), &conn.socket_id, "pusher");
    metrics::gauge!("herald_pusher_connections").decrement(1.0);
}

/// One subscription of a Pusher connection.
#[derive(Debug)]
struct Joined {
    kind: Kind,
    /// The member's user id on a presence channel.
    member: Option<String>,
    /// The member's `user_info`, as JSON.
    info: Option<String>,
}

/// A Pusher connection's state, independent of the socket.
#[derive(Debug)]
struct Connection {
    node: Arc<Node>,
    /// The configuration this connection follows: the node's, replaced on each reload.
    config: Arc<crate::config::Config>,
    /// Its app, in `config.pusher.apps`.
    app: usize,
    id: u64,
    socket_id: String,
    outbox: Outbox,
    /// Herald channel → what this connection is there.
    subscriptions: HashMap<Arc<str>, Joined>,
    /// The signed-in user id.
    user: Option<String>,
    /// The key under which the signed-in user is registered with the node.
    registered: Option<String>,
    limiter: ConnectionLimiter,
    close_with: Option<(u16, String)>,
}

impl Connection {
    fn new(node: Arc<Node>, config: Arc<crate::config::Config>, app: usize, outbox: Outbox) -> Self {
        let id = node.next_id();
        Self {
            limiter: ConnectionLimiter::new(&config.limits, Instant::now()),
            socket_id: socket_id(id),
            node,
            config,
            app,
            id,
            outbox,
            subscriptions: HashMap::new(),
            user: None,
            registered: None,
            close_with: None,
        }
    }

    fn app(&self) -> &PusherApp {
        &self.config.pusher.apps[self.app]
    }

    /// Follows a reloaded configuration: the app is found again by its key (gone: the
    /// connection is to be closed with 4001, returned), and each subscription the app or its
    /// namespace no longer allows ends with a `pusher:subscription_error` (status 403).
    async fn reconfigure(&mut self, config: Arc<crate::config::Config>) -> Option<(u16, String)> {
        let key = self.app().key.clone();
        let Some(index) = config.pusher.apps.iter().position(|a| a.key == key) else {
            return Some((close::APP_NOT_FOUND, format!("App key {key} was removed from the configuration")));
        };
        let app = &config.pusher.apps[index];
        let mut ended = Vec::new();
        for channel in self.subscriptions.keys() {
            match app.pusher_name(channel) {
                None => ended.push((channel.clone(), None)),
                Some(name) => {
                    if let Err(why) = self.still_allowed(&config, app, &name) {
                        ended.push((channel.clone(), Some((name.into_owned(), why))));
                    }
                }
            }
        }
        // Left under the old configuration, which still resolves their names.
        for (channel, told) in ended {
            self.leave(&channel).await;
            if let Some((name, why)) = told {
                self.subscription_error(&name, 403, "PermissionDenied", &format!("Configuration reloaded: {why}"));
            }
        }
        (self.config, self.app) = (config, index);
        None
    }

    /// Whether this connection may still be subscribed to Pusher channel `name` under
    /// `config` (the checks of `subscribe` that do not need the client's signature).
    fn still_allowed(&self, config: &crate::config::Config, app: &PusherApp, name: &str) -> Result<(), String> {
        let (channel, ns) = app.channel(&config.channels, name).map_err(|e| e.to_string())?;
        if channel.users().is_some() && !channel.allows_user(self.user.as_deref().unwrap_or("")) {
            return Err("this channel is another user's".into());
        }
        if may_subscribe(ns, Kind::of(name), self.user.is_some()) {
            Ok(())
        } else {
            Err("this channel's namespace no longer allows it".into())
        }
    }

    fn send(&self, frame: Bytes) {
        if self.outbox.send_text(frame) == Err(ws::SendError::Full) {
            crate::hub::close_slow_consumer_with(&self.outbox, (close::OVER_CAPACITY, SLOW));
        }
    }

    fn error(&self, code: Option<u16>, message: &str) {
        tracing::debug!(socket_id = %self.socket_id, code, message, "pusher error");
        self.send(protocol::error(code, message));
    }

    fn subscription_error(&self, channel: &str, status: u16, kind: &str, message: &str) {
        let data = serde_json::json!({ "type": kind, "error": message, "status": status }).to_string();
        self.send(protocol::event_raw("pusher:subscription_error", Some(channel), &data, None));
    }

    /// Applies a rate-limit verdict; `false` when the message must be dropped.
    fn limited(&mut self, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Allow => false,
            Verdict::Refuse(limit) => {
                let key = limit.key();
                crate::ratelog::refusal!(
                    info,
                    crate::ratelog::Kind::RateLimit,
                    socket_id = self.socket_id.as_str(),
                    limit = key,
                    door = "pusher",
                    "message refused: over limits.{key}"
                );
                self.error(
                    Some(protocol::error::CLIENT_EVENT_REJECTED),
                    &format!("Rate limit exceeded (limits.{key})"),
                );
                true
            }
            Verdict::Close(_) => {
                metrics::counter!("herald_limit_disconnects_total", "limit" => "max_refusals").increment(1);
                self.close_with = Some((close::OVER_CAPACITY, "Too many messages refused: slow down".into()));
                true
            }
        }
    }

    async fn handle(&mut self, text: &[u8]) {
        let verdict = self.limiter.command(Instant::now());
        if self.limited(verdict) {
            return;
        }
        let msg = match ClientMessage::parse(text) {
            Ok(m) => m,
            Err(e) => return self.error(None, &e),
        };
        match msg.event.as_str() {
            "pusher:ping" => self.send(protocol::event("pusher:pong", None, "{}")),
            "pusher:pong" => {}
            "pusher:subscribe" => match msg.data_as::<Subscribe>() {
                Ok(s) => self.subscribe(s).await,
                Err(e) => self.error(None, &e),
            },
            "pusher:unsubscribe" => match msg.data_as::<Unsubscribe>() {
                Ok(u) => {
                    if let Ok((channel, _)) = self.app().channel(&self.config.channels, &u.channel) {
                        self.leave(channel.as_str()).await;
                    }
                }
                Err(e) => self.error(None, &e),
            },
            "pusher:signin" => match msg.data_as::<Signin>() {
                Ok(s) => self.signin(s),
                Err(e) => self.error(None, &e),
            },
            event if event.starts_with("client-") => {
                let data = msg.data.map_or("null", |d| d.get()).to_owned();
                self.client_event(event.to_owned(), msg.channel, data).await;
            }
            other => self.error(None, &format!("Unsupported event `{other}`")),
        }
    }

    async fn subscribe(&mut self, req: Subscribe) {
        let (node, config) = (self.node.clone(), self.config.clone());
        let app = &config.pusher.apps[self.app];
        let name = req.channel.as_str();
        let (channel, ns) = match app.channel(&config.channels, name) {
            Ok(c) => c,
            Err(e) => return self.subscription_error(name, 400, "InvalidChannel", &e.to_string()),
        };
        if self.subscriptions.contains_key(channel.as_str()) {
            return self.error(None, &format!("Existing subscription to channel {name}"));
        }
        if channel.users().is_some() && !channel.allows_user(self.user.as_deref().unwrap_or("")) {
            return self.subscription_error(name, 403, "PermissionDenied", "Sign in as this user first");
        }
        let kind = Kind::of(name);
        if !may_subscribe(ns, kind, self.user.is_some()) {
            return self.subscription_error(
                name,
                403,
                "PermissionDenied",
                "This channel's namespace does not allow it",
            );
        }
        if self.subscriptions.len() >= config.channels.max_subscriptions {
            let max = config.channels.max_subscriptions;
            return self.subscription_error(name, 400, "LimitExceeded", &format!("At most {max} subscriptions"));
        }
        let mut member = None;
        if kind.needs_auth() {
            let channel_data = if kind == Kind::Presence { req.channel_data.as_deref() } else { None };
            if kind == Kind::Presence && channel_data.is_none() {
                return self.subscription_error(name, 400, "AuthError", "Presence channels need channel_data");
            }
            let message = auth::channel_message(&self.socket_id, name, channel_data);
            let ok = req.auth.as_deref().is_some_and(|a| auth::check_auth(&app.key, &app.secret, &message, a));
            if !ok {
                let reason = match req.auth {
                    None => crate::auth::TokenRefusal::Missing,
                    Some(_) => crate::auth::TokenRefusal::BadSignature,
                };
                reason.count();
                crate::ratelog::refusal!(
                    info,
                    crate::ratelog::Kind::Token,
                    reason = reason.as_str(),
                    socket_id = self.socket_id.as_str(),
                    door = "pusher",
                    "channel authorization refused for {name}"
                );
                return self.subscription_error(
                    name,
                    401,
                    "AuthError",
                    "Invalid signature: expected HMAC-SHA256 \
                     hex digest of socket_id:channel[:channel_data] with the app secret, as `key:signature`",
                );
            }
            if let Some(data) = channel_data {
                match serde_json::from_str::<ChannelData>(data) {
                    Ok(cd) => {
                        let info = cd.user_info.map(|i| i.get().to_owned());
                        let size = info.as_ref().map_or(0, String::len);
                        if size > app.max_user_info_size {
                            let max = app.max_user_info_size;
                            let message =
                                format!("user_info is {size} bytes, more than {max} (pusher.apps.max_user_info_size)");
                            return self.subscription_error(name, 400, "LimitExceeded", &message);
                        }
                        member = Some((cd.user_id.0, info))
                    }
                    Err(e) => {
                        return self.subscription_error(name, 400, "AuthError", &format!("Bad channel_data: {e}"))
                    }
                }
            }
        }
        let encoder: &'static dyn Encoder = encoder(&app.event_name);
        let sub = Subscriber { id: self.id, outbox: self.outbox.clone(), encoder };
        let (user, info) = member.map_or((None, None), |(u, i)| (Some(u), i));
        self.subscriptions.insert(channel.shared().clone(), Joined { kind, member: user.clone(), info: info.clone() });
        // A member is recorded before the reply is made, so the list it carries includes it.
        let mut reply = protocol::event("pusher_internal:subscription_succeeded", Some(name), "{}");
        if let Some(user) = &user {
            let entry = PresenceEntry {
                client: self.socket_id.clone(),
                user: user.clone(),
                info: info.clone().map(Bytes::from),
            };
            let joined = match node.presence_add(channel.as_str(), entry, self.presence_ttl()).await {
                Ok(change) => change == PresenceChange::UserJoined,
                Err(e) => {
                    self.subscriptions.remove(channel.as_str());
                    return self.subscription_error(name, 503, "Unavailable", &e.to_string());
                }
            };
            match node.presence(channel.as_str()).await {
                Ok(list) => {
                    let (list, count) = members(list);
                    let max = app.max_presence_members;
                    if joined && count > max {
                        // One user too many (counted after joining, so two joining at once
                        // cannot both slip in): leaves again, unannounced to members.
                        self.subscriptions.remove(channel.as_str());
                        let _ = node.presence_remove(channel.as_str(), &self.socket_id).await;
                        let message =
                            format!("At most {max} members in a presence channel (pusher.apps.max_presence_members)");
                        return self.subscription_error(name, 400, "LimitExceeded", &message);
                    }
                    reply = protocol::event("pusher_internal:subscription_succeeded", Some(name), &list)
                }
                Err((_, message)) => {
                    self.subscriptions.remove(channel.as_str());
                    let _ = node.presence_remove(channel.as_str(), &self.socket_id).await;
                    return self.subscription_error(name, 503, "Unavailable", &message);
                }
            }
            if joined {
                // Announced before this connection is in the hub, so it does not hear itself.
                let client = ClientInfo { user: user.clone(), client: self.socket_id.clone() };
                node.broadcast(channel.as_str(), &ChannelEvent::Join { client, info }).await;
            }
        }
        let result = node.subscribe(&channel, ns, sub, None, |_, _| Some(reply)).await;
        if let Err(failure) = result {
            self.subscriptions.remove(channel.as_str());
            self.presence_remove(&channel, user.as_deref()).await;
            if let SubscribeFailure::Engine(e) = failure {
                self.subscription_error(name, 503, "Unavailable", &e.to_string());
            }
        }
    }

    fn signin(&mut self, req: Signin) {
        let config = self.config.clone();
        let app = &config.pusher.apps[self.app];
        let message = auth::user_message(&self.socket_id, &req.user_data);
        let user = serde_json::from_str::<UserData>(&req.user_data).map(|u| u.id.0);
        match user {
            Ok(user) if auth::check_auth(&app.key, &app.secret, &message, &req.auth) => {
                if self.user.as_deref().is_some_and(|u| u != user) {
                    self.error(None, "Already signed in as another user");
                    return;
                }
                let data = serde_json::json!({ "user_data": req.user_data }).to_string();
                self.registered.get_or_insert_with(|| app.user_key(&user));
                self.user = Some(user);
                self.send(protocol::event("pusher:signin_success", None, &data));
            }
            _ => {
                let message = "Invalid signin: user_data needs an `id`, and auth must be `key:HMAC-SHA256 of \
                               socket_id::user::user_data`";
                self.error(Some(close::UNAUTHORIZED), message);
                self.close_with = Some((close::UNAUTHORIZED, "Invalid signin".into()));
            }
        }
    }

    async fn client_event(&mut self, event: String, channel: Option<String>, data: String) {
        let (node, config) = (self.node.clone(), self.config.clone());
        let app = &config.pusher.apps[self.app];
        if event.len() > super::MAX_EVENT_NAME {
            let message = format!("Client event name is longer than {} bytes", super::MAX_EVENT_NAME);
            return self.error(Some(protocol::error::CLIENT_EVENT_REJECTED), &message);
        }
        let Some(name) = channel else { return self.error(None, "Client events need a `channel`") };
        let Ok((channel, _)) = app.channel(&config.channels, &name) else {
            return self.error(None, &format!("Invalid channel {name}"));
        };
        let Some(joined) = self.subscriptions.get(channel.as_str()) else {
            return self.error(None, &format!("Client event on {name}: not subscribed to it"));
        };
        if !joined.kind.needs_auth() {
            return self.error(None, "Client events are allowed on private and presence channels only");
        }
        if !app.client_events {
            return self.error(None, "Client events are disabled for this app (pusher.apps.client_events)");
        }
        if data.len() > app.max_event_size {
            let max = app.max_event_size;
            let message = format!("Client event data is larger than {max} bytes (pusher.apps.max_event_size)");
            return self.error(Some(protocol::error::CLIENT_EVENT_REJECTED), &message);
        }
        let user = joined.member.clone();
        let verdict = self.limiter.publication(Instant::now());
        if self.limited(verdict) {
            return;
        }
        node.webhooks().client_event(channel.as_str(), &event, &data, Some(&self.socket_id), user.as_deref());
        let event = ChannelEvent::Client { event, data, user, exclude: Some(self.id) };
        node.broadcast(channel.as_str(), &event).await;
    }

    /// Leaves Herald channel `channel` if subscribed.
    async fn leave(&mut self, channel: &str) {
        if let Some(joined) = self.subscriptions.remove(channel) {
            self.node.unsubscribe(channel, self.id);
            if let Ok((name, _)) = self.config.channels.resolve(channel) {
                self.presence_remove(&name, joined.member.as_deref()).await;
            }
        }
    }

    async fn presence_remove(&self, channel: &ChannelName, member: Option<&str>) {
        if member.is_none() {
            return;
        }
        match self.node.presence_remove(channel.as_str(), &self.socket_id).await {
            Ok((PresenceChange::UserLeft, Some(entry))) => {
                let client = ClientInfo { user: entry.user, client: entry.client };
                self.node.broadcast(channel.as_str(), &ChannelEvent::Leave { client }).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(channel = %channel, error = %e, "presence not removed"),
        }
    }

    fn presence_ttl(&self) -> std::time::Duration {
        self.config.websocket.ping_interval * 3
    }

    async fn refresh_presence(&self) {
        for (channel, joined) in &self.subscriptions {
            if let Some(user) = &joined.member {
                let entry = PresenceEntry {
                    client: self.socket_id.clone(),
                    user: user.clone(),
                    info: joined.info.clone().map(Bytes::from),
                };
                let _ = self.node.presence_add(channel, entry, self.presence_ttl()).await;
            }
        }
    }

    async fn end(&mut self) {
        let channels: Vec<Arc<str>> = self.subscriptions.keys().cloned().collect();
        for channel in channels {
            self.leave(&channel).await;
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // `end` normally ran; this covers a cancelled task (presence then expires by itself).
        for channel in self.subscriptions.keys() {
            self.node.unsubscribe(channel, self.id);
        }
    }
}

/// Whether a namespace lets a Pusher connection subscribe to a channel of `kind`: the app's
/// backend vouches for private and presence subscriptions (their signature is checked apart);
/// public ones are anonymous unless signed in. Subscription tokens do not exist here.
fn may_subscribe(ns: &crate::channel::NamespaceOptions, kind: Kind, signed_in: bool) -> bool {
    match ns.subscribe.level(Access::Anonymous) {
        Access::None => false,
        _ if kind.needs_auth() => true,
        Access::Anonymous => true,
        Access::Authenticated => signed_in,
        Access::Token => false,
    }
}

/// The `data` of a presence `subscription_succeeded`: members by user (a user with several
/// connections counts once), anonymous native clients left out.
/// The `{presence:{ids,hash,count}}` of a member list, and its count of distinct users.
fn members(list: Vec<PresenceEntry>) -> (String, usize) {
    let mut ids: Vec<String> = Vec::new();
    let mut hash = serde_json::Map::new();
    for e in list {
        if e.user.is_empty() || hash.contains_key(&e.user) {
            continue;
        }
        let info = e.info.as_deref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(serde_json::Value::Null);
        hash.insert(e.user.clone(), info);
        ids.push(e.user);
    }
    let count = ids.len();
    (serde_json::json!({ "presence": { "ids": ids, "hash": hash, "count": count } }).to_string(), count)
}
