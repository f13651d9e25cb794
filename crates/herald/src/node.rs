//! This Herald node: configuration, hub, shared WebSocket context, counters. Everything a
//! session, transport or API handler needs, behind one `Arc`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use herald_protocol::{ClientInfo, ErrorCode};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::channel::{ChannelName, NamespaceOptions};
use crate::config::Config;
use crate::engine::{
    Delivery, Engine, EngineError, EngineLimits, History, HistoryPolicy, HistoryQuery, MemoryEngine, PresenceChange,
    PresenceEntry, PublicationRecord, Publish, StreamPosition,
};
use crate::hub::{ChannelEvent, Flow, Hub, SubscribeError, Subscriber};
use crate::ws::{self, WsContext};

/// Shared state of one node.
///
/// What a reload (SIGHUP) can change is behind [`ArcSwap`]s: the configuration and what is
/// built from it (token verifier, webhooks, origin policy, WebSocket settings). Readers take a
/// snapshot (`node.config()`) and use it to the end of what they are doing; [`Node::reload`]
/// swaps them all and tells every session ([`Node::reloads`]) to re-check its subscriptions.
#[derive(Debug)]
pub struct Node {
    config: ArcSwap<Config>,
    hub: Arc<Hub>,
    engine: Arc<dyn Engine>,
    pub ws: WsContext,
    /// `[websocket]` settings for client connections.
    ws_settings: ArcSwap<ws::Settings>,
    /// Large limits for the Autobahn echo endpoint.
    pub echo_settings: Arc<ws::Settings>,
    pub(crate) prometheus: Option<PrometheusHandle>,
    /// Verifies connection and subscription tokens; `None` when no key is configured.
    verifier: ArcSwapOption<crate::auth::Verifier>,
    /// Lifecycle webhooks (`[webhooks]`); free when no endpoint is configured. Shared with
    /// the hub, which tells the current ones about occupied and vacated channels.
    webhooks: Arc<LiveWebhooks>,
    /// Which web origins may connect (`http.allowed_origins`).
    origins: ArcSwap<crate::origin::OriginPolicy>,
    /// Counts reloads; every session watches it to re-check its subscriptions.
    reloads: tokio::sync::watch::Sender<u64>,
    /// One reload at a time.
    reloading: std::sync::Mutex<()>,
    /// Connected sessions of identified users, for the API's `disconnect` and `unsubscribe`.
    users: std::sync::Mutex<UserSessions>,
    ready: AtomicBool,
    started: Instant,
    /// This node's random number: the high half of every connection id.
    node_number: u32,
    /// The secret permutation behind connection ids.
    ids: IdPermutation,
    next_id: AtomicU64,
    sessions: AtomicUsize,
}

impl Node {
    pub fn new(config: Arc<Config>, ws: WsContext, prometheus: Option<PrometheusHandle>) -> Self {
        let echo_settings = Arc::new(ws::Settings {
            max_frame_size: 64 << 20,
            max_message_size: 64 << 20,
            max_fragments: 1 << 20,
            max_queue_bytes: 256 << 20,
            ..config.websocket.clone()
        });
        let verifier = crate::auth::Verifier::new(&config.auth).unwrap_or_else(|e| {
            // `Config::validate` checks the keys first; this only fires for a config built in code.
            tracing::error!(error = %e, "connection tokens disabled: invalid [auth] settings");
            None
        });
        if let Some(v) = &verifier {
            v.watch();
        }
        let verifier = ArcSwapOption::from(verifier.map(Arc::new));
        let hub = Arc::new(Hub::new());
        let limits = EngineLimits {
            max_channels: config.limits.max_channels,
            max_history_bytes: config.limits.max_history_bytes,
        };
        let engine = make_engine(&config, limits);
        engine.set_delivery(Arc::new(HubDelivery {
            hub: hub.clone(),
            queue_time: metrics::histogram!("herald_publish_queue_seconds"),
        }));
        let webhooks = Arc::new(LiveWebhooks(ArcSwap::from_pointee(crate::webhooks::Webhooks::new(&config.webhooks))));
        hub.set_occupancy(webhooks.clone());
        Self {
            ws_settings: ArcSwap::from_pointee(config.websocket.clone()),
            echo_settings,
            origins: ArcSwap::from_pointee(crate::origin::OriginPolicy::new(&config.http.allowed_origins)),
            config: ArcSwap::new(config),
            hub,
            engine,
            ws,
            prometheus,
            verifier,
            webhooks,
            reloads: tokio::sync::watch::Sender::new(0),
            reloading: std::sync::Mutex::new(()),
            users: Default::default(),
            ready: AtomicBool::new(true),
            started: Instant::now(),
            node_number: rand::random(),
            ids: IdPermutation::new(),
            next_id: AtomicU64::new(1),
            sessions: AtomicUsize::new(0),
        }
    }

    /// The configuration now: a snapshot, unchanged by a later reload.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// `[websocket]` settings for a new client connection.
    pub fn ws_settings(&self) -> Arc<ws::Settings> {
        self.ws_settings.load_full()
    }

    /// The token verifier now; `None` when no key is configured.
    pub fn verifier(&self) -> Option<Arc<crate::auth::Verifier>> {
        self.verifier.load_full()
    }

    /// The webhooks now.
    pub fn webhooks(&self) -> Arc<crate::webhooks::Webhooks> {
        self.webhooks.0.load_full()
    }

    /// Which web origins may connect, now.
    pub fn origins(&self) -> Arc<crate::origin::OriginPolicy> {
        self.origins.load_full()
    }

    /// Changes each time a reload is applied: a session waits on it to re-check what it holds.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Applies `new` (a configuration read again on SIGHUP): what can change live is swapped
    /// in at once, what cannot ([`crate::reload::RESTART_ONLY`]) keeps its running value and is
    /// reported. Refused as a whole, with nothing changed, when the result is not valid.
    /// Sessions then re-check their subscriptions against the new rules.
    pub fn reload(&self, new: Config) -> Result<crate::reload::Report, String> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.config();
        let (next, report) = crate::reload::plan(&old, new)?;
        if report.changed.is_empty() {
            return Ok(report);
        }
        let next = Arc::new(next);
        // Everything that can fail is built before anything is swapped.
        let verifier = if next.auth == old.auth {
            None
        } else {
            Some(crate::auth::Verifier::new(&next.auth).map_err(|e| e.to_string())?.map(Arc::new))
        };
        let webhooks = (next.webhooks != old.webhooks || next.pusher.apps != old.pusher.apps)
            .then(|| crate::webhooks::Webhooks::new(&next.webhooks));
        if let Some(Some(v)) = &verifier {
            v.watch();
        }
        self.config.store(next.clone());
        if next.websocket != old.websocket {
            self.ws_settings.store(Arc::new(next.websocket.clone()));
        }
        if next.http.allowed_origins != old.http.allowed_origins {
            self.origins.store(Arc::new(crate::origin::OriginPolicy::new(&next.http.allowed_origins)));
        }
        if let Some(v) = verifier {
            self.verifier.store(v);
        }
        if let Some(webhooks) = webhooks {
            let webhooks = Arc::new(webhooks);
            webhooks.name_pusher_apps(&next.pusher.apps);
            webhooks.start();
            let old = self.webhooks.0.swap(webhooks);
            // The old endpoints deliver what they hold (within their shutdown timeout).
            if old.enabled() {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move { old.shutdown().await });
                }
            }
        }
        self.reloads.send_modify(|n| *n += 1);
        Ok(report)
    }

    /// An id for a connection (and each of its subscriptions): unique on this node (the
    /// count of its connections, with its random node number, through a keyed permutation) and
    /// unguessable, so a client cannot compute another connection's id (Pusher's socket id,
    /// which a backend may pass back as `X-Socket-ID` to leave that connection out). Across
    /// nodes, two ids are as likely to meet as two random 64-bit numbers.
    pub fn next_id(&self) -> u64 {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff;
        self.ids.permute((u64::from(self.node_number) << 32) | n)
    }

    /// Publishes to `channel` (`publication.data` is valid JSON): the single path for every
    /// door and the API.
    pub async fn publish(
        &self,
        channel: &ChannelName,
        ns: &NamespaceOptions,
        publication: Publish,
    ) -> Result<StreamPosition, EngineError> {
        let result = self.engine.publish(channel.as_str(), publication, policy(ns)).await;
        match &result {
            Ok(_) => metrics::counter!("herald_publications_total").increment(1),
            Err(e) => {
                if let Some(limit) = e.limit() {
                    metrics::counter!("herald_limit_refusals_total", "limit" => limit).increment(1);
                }
            }
        }
        result
    }

    /// Subscribes `sub` to `channel` with no gap and no duplicate between what it is told in
    /// its reply and what it receives live: the subscriber is registered (live publications
    /// held), the channel's position or the history to recover is read, then `reply` is sent
    /// and the held publications newer than the reply follow.
    ///
    /// `recover` asks for the publications after that position; `reply` gets the history read
    /// and whether recovery was complete (`None` when not asked).
    pub async fn subscribe(
        &self,
        channel: &ChannelName,
        ns: &NamespaceOptions,
        sub: Subscriber,
        recover: Option<StreamPosition>,
        reply: impl FnOnce(&History, Option<bool>) -> Option<Bytes>,
    ) -> Result<History, SubscribeFailure> {
        let id = sub.id;
        self.hub.subscribe_with(channel.shared(), sub, Flow::of(ns)).map_err(SubscribeFailure::Hub)?;
        // Listening first: whatever is published after the position read below reaches us.
        if let Err(e) = self.engine.listen(channel.as_str()).await {
            self.unsubscribe(channel.as_str(), id);
            return Err(SubscribeFailure::Engine(e));
        }
        let asked = recover.is_some();
        let query = HistoryQuery { since: recover, limit: if asked { ns.history_size } else { 0 }, reverse: false };
        let mut history = match self.engine.history(channel.as_str(), query).await {
            Ok(h) => h,
            Err(e) => {
                self.unsubscribe(channel.as_str(), id);
                return Err(SubscribeFailure::Engine(e));
            }
        };
        if !history.complete {
            // Partial recovery would leave a hole the app cannot see: all or nothing.
            history.publications.clear();
        }
        if ns.conflated() && history.publications.len() > 1 {
            // A conflated channel never hands out a backlog: the newest missed one is enough.
            history.publications.drain(..history.publications.len() - 1);
        }
        if asked {
            let result = if history.complete { "recovered" } else { "not_recovered" };
            metrics::counter!("herald_recoveries_total", "result" => result).increment(1);
        }
        let text = reply(&history, asked.then_some(history.complete));
        self.hub.activate(channel.as_str(), id, text, history.position.offset).map_err(SubscribeFailure::Hub)?;
        Ok(history)
    }

    /// Removes subscriber `id` from `channel`; the engine stops listening to the channel when
    /// it was the node's last subscriber.
    pub fn unsubscribe(&self, channel: &str, id: u64) -> bool {
        let removed = self.hub.unsubscribe(channel, id);
        if !self.hub.has_channel(channel) {
            self.engine.release(channel);
        }
        removed
    }

    /// A channel's history for a door: refused (109) when its namespace keeps none; `limit`
    /// is clamped to the namespace's `history_size` (`None`: all it keeps); with `since`, an
    /// epoch that is not the channel's is refused (122) with a message naming the current
    /// position, so no door can hand out publications of another epoch as a continuation.
    pub async fn history(
        &self,
        channel: &ChannelName,
        ns: &NamespaceOptions,
        since: Option<StreamPosition>,
        limit: Option<usize>,
        reverse: bool,
    ) -> Result<History, crate::rules::Refusal> {
        if ns.history_size == 0 {
            return Err(crate::rules::refuse(ErrorCode::NotAvailable, "this namespace keeps no history"));
        }
        let limit = limit.map_or(ns.history_size, |l| l.min(ns.history_size));
        let asked = since.as_ref().map(|p| p.epoch.clone());
        let query = HistoryQuery { since, limit, reverse };
        let h = self.engine.history(channel.as_str(), query).await.map_err(|e| crate::rules::engine_refusal(&e))?;
        if let Some(message) = asked.and_then(|e| epoch_mismatch(&e, &h.position)) {
            return Err(crate::rules::refuse(ErrorCode::EpochMismatch, message));
        }
        Ok(h)
    }

    /// Who is present on `channel` (every node's connections).
    pub async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, crate::rules::Refusal> {
        self.engine.presence(channel).await.map_err(|e| crate::rules::engine_refusal(&e))
    }

    /// How many connections and distinct users are present on `channel`.
    pub async fn presence_stats(&self, channel: &str) -> Result<crate::engine::PresenceStats, crate::rules::Refusal> {
        self.engine.presence_stats(channel).await.map_err(|e| crate::rules::engine_refusal(&e))
    }

    /// The channels with subscribers on this node that `keep` accepts, with their counts.
    pub fn channels(&self, keep: impl Fn(&str) -> bool) -> Vec<(Arc<str>, usize)> {
        self.hub.channels(keep)
    }

    /// This node's subscribers of `channel`.
    pub fn channel_subscribers(&self, channel: &str) -> usize {
        self.hub.channels(|c| c == channel).first().map_or(0, |(_, n)| *n)
    }

    /// What this node holds now, for the APIs' `info`.
    pub fn info(&self) -> NodeInfo {
        let stats = self.engine.stats();
        NodeInfo {
            connections: self.session_count(),
            channels: self.hub.channel_count(),
            subscriptions: self.hub.subscription_count(),
            stored_channels: stats.channels,
            history_bytes: stats.history_bytes,
            uptime_seconds: self.uptime_seconds(),
        }
    }

    /// The periodic upkeep: the engine forgets idle channels, expired presence is announced.
    pub(crate) async fn sweep(&self) {
        self.engine.sweep();
        self.expire_presence().await;
    }

    /// Why the engine cannot serve now (for `/ready`), if it cannot.
    pub fn engine_unavailable(&self) -> Option<&'static str> {
        self.engine.unavailable()
    }

    /// Sends `event` (a join, a leave, a client event) to `channel`'s subscribers on every node.
    pub async fn broadcast(&self, channel: &str, event: &ChannelEvent) {
        if let Err(e) = self.engine.broadcast(channel, event.encode()).await {
            tracing::warn!(channel, error = %e, "channel event not sent");
        }
    }

    /// Adds (or refreshes) a client's presence on `channel`: the single path for every door,
    /// so a user's first connection there is announced to webhooks (`member_added`) once.
    pub async fn presence_add(
        &self,
        channel: &str,
        entry: PresenceEntry,
        ttl: std::time::Duration,
    ) -> Result<PresenceChange, EngineError> {
        let webhooks = self.webhooks();
        let user = webhooks.enabled().then(|| entry.user.clone());
        let change = self.engine.presence_add(channel, entry, ttl).await;
        if let (Ok(PresenceChange::UserJoined), Some(user)) = (&change, user) {
            webhooks.member_added(channel, &user);
        }
        change
    }

    /// Removes a client's presence from `channel`; a user's last connection there leaving is
    /// announced to webhooks (`member_removed`).
    pub async fn presence_remove(
        &self,
        channel: &str,
        client: &str,
    ) -> Result<(PresenceChange, Option<PresenceEntry>), EngineError> {
        let change = self.engine.presence_remove(channel, client).await;
        if let Ok((PresenceChange::UserLeft, Some(entry))) = &change {
            self.webhooks().member_removed(channel, &entry.user);
        }
        change
    }

    /// Announces the `leave` of users whose presence expired without a goodbye (their node
    /// died), on the channels this node has subscribers of. Called by the sweeper.
    pub async fn expire_presence(&self) {
        // Only a shared engine keeps presence that outlives its sessions' node.
        let config = self.config();
        let shared = config.engine.kind != crate::config::EngineKind::Memory;
        let namespaces = &config.channels;
        if !shared || !(namespaces.default.presence || namespaces.namespaces.values().any(|ns| ns.presence)) {
            return;
        }
        for (channel, _) in self.hub.channels(|_| true) {
            let Ok((_, ns)) = namespaces.resolve(&channel) else { continue };
            if !ns.presence {
                continue;
            }
            let left = match self.engine.presence_expire(&channel).await {
                Ok(left) => left,
                Err(e) => {
                    tracing::debug!(channel = %channel, error = %e, "expired presence not swept");
                    continue;
                }
            };
            let webhooks = self.webhooks();
            for entry in &left {
                webhooks.member_removed(&channel, &entry.user);
            }
            if !ns.join_leave {
                continue;
            }
            for entry in left {
                let client = ClientInfo { user: entry.user, client: entry.client };
                self.broadcast(&channel, &ChannelEvent::Leave { client }).await;
            }
        }
    }

    /// Registers a session of `user` so the API can reach it; returns its control inbox.
    pub(crate) fn register_user(&self, user: &str, session: u64) -> tokio::sync::mpsc::Receiver<Control> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        self.users_lock().entry(user.to_owned()).or_default().push((session, tx));
        rx
    }

    pub(crate) fn unregister_user(&self, user: &str, session: u64) {
        let mut users = self.users_lock();
        if let Some(list) = users.get_mut(user) {
            list.retain(|(id, _)| *id != session);
            if list.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Sends `control` to every connected session of `user`; returns how many were reached.
    pub fn control_user(&self, user: &str, control: Control) -> usize {
        let users = self.users_lock();
        let Some(list) = users.get(user) else { return 0 };
        // A session whose inbox is full is already being told things; it still counts.
        list.iter()
            .filter(|(_, tx)| {
                !matches!(tx.try_send(control.clone()), Err(tokio::sync::mpsc::error::TrySendError::Closed(_)))
            })
            .count()
    }

    /// Connected native-protocol sessions of `user`.
    pub fn user_connection_count(&self, user: &str) -> usize {
        self.users_lock().get(user).map_or(0, Vec::len)
    }

    /// Sets the gauges that describe what this node holds (read when `/metrics` is rendered).
    pub(crate) fn record_gauges(&self) {
        let stats = self.engine.stats();
        metrics::gauge!("herald_stored_channels").set(stats.channels as f64);
        metrics::gauge!("herald_history_bytes").set(stats.history_bytes as f64);
        metrics::gauge!("herald_subscriptions").set(self.hub.subscription_count() as f64);
        let webhooks = self.webhooks();
        if webhooks.enabled() {
            metrics::gauge!("herald_webhook_queue").set(webhooks.queued() as f64);
        }
    }

    fn users_lock(&self) -> std::sync::MutexGuard<'_, UserSessions> {
        // Entries are inserted and removed whole; a poisoned lock is still consistent.
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Open client sessions of every transport.
    pub fn session_count(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Counts a session for as long as the returned guard lives.
    pub(crate) fn session_guard(self: &Arc<Self>) -> SessionCount {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        SessionCount(self.clone())
    }
}

/// A keyed permutation of 64-bit numbers: a four-round Feistel network over the two 32-bit
/// halves whose round function is SipHash with a random 128-bit key (`RandomState`). A
/// permutation, so distinct counts give distinct ids; keyed, so an id says nothing about the
/// next one without the key.
#[derive(Debug)]
struct IdPermutation(std::hash::RandomState);

impl IdPermutation {
    fn new() -> Self {
        Self(std::hash::RandomState::new())
    }

    fn permute(&self, x: u64) -> u64 {
        use std::hash::BuildHasher as _;
        let (mut left, mut right) = ((x >> 32) as u32, x as u32);
        for round in 0..4u8 {
            let f = self.0.hash_one((round, right)) as u32;
            (left, right) = (right, left ^ f);
        }
        (u64::from(left) << 32) | u64::from(right)
    }
}

/// The node's current webhooks, as the hub's occupancy listener: a reload swaps them.
#[derive(Debug)]
struct LiveWebhooks(ArcSwap<crate::webhooks::Webhooks>);

impl crate::hub::Occupancy for LiveWebhooks {
    fn occupied(&self, channel: &str) {
        let w = self.0.load();
        if w.enabled() {
            w.channel_occupied(channel);
        }
    }

    fn vacated(&self, channel: &str) {
        let w = self.0.load();
        if w.enabled() {
            w.channel_vacated(channel);
        }
    }
}

/// What a node holds, for the APIs' `info` (Herald's and Centrifugo's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeInfo {
    pub connections: usize,
    /// Channels with subscribers on this node.
    pub channels: usize,
    pub subscriptions: usize,
    /// Channels the engine keeps a position (and maybe history) for.
    pub stored_channels: usize,
    /// Bytes of publications kept in history.
    pub history_bytes: usize,
    pub uptime_seconds: u64,
}

/// User id → (session id, control inbox) of each of its connections.
type UserSessions = std::collections::HashMap<String, Vec<(u64, tokio::sync::mpsc::Sender<Control>)>>;

/// What the API can ask of a connected session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Close the connection with this code and reason.
    Disconnect { code: u16, reason: String },
    /// Leave this channel and tell the client with an `unsubscribe` push.
    Unsubscribe { channel: String },
}

/// The history policy of a namespace.
pub fn policy(ns: &NamespaceOptions) -> HistoryPolicy {
    HistoryPolicy { size: ns.history_size, ttl: ns.history_ttl }
}

/// Why a subscription could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeFailure {
    #[error(transparent)]
    Hub(SubscribeError),
    #[error(transparent)]
    Engine(EngineError),
}

/// Hands the engine's publications to the local hub, timing each fan-out.
struct HubDelivery {
    hub: Arc<Hub>,
    /// `herald_publish_queue_seconds`: a handle, so no registry look-up per publication.
    queue_time: metrics::Histogram,
}

impl Delivery for HubDelivery {
    /// The engine calls this as soon as it has the publication (the memory engine inside
    /// `publish`, the Redis engine when pub/sub brings it), so the time around the hub's
    /// fan-out is "accepted → queued for every local subscriber". One clock pair per
    /// publication, none per subscriber; channels with no subscriber here are not timed.
    /// If the fan-out ever returns before every subscriber is queued (work handed to other
    /// tasks), this timing must move to where the last one is queued.
    fn deliver(&self, channel: &str, position: &StreamPosition, publication: &PublicationRecord) {
        if !self.hub.has_channel(channel) {
            return;
        }
        let started = Instant::now();
        self.hub.deliver(channel, position, publication);
        self.queue_time.record(started.elapsed().as_secs_f64());
    }

    fn notify(&self, channel: &str, text: Bytes) {
        match ChannelEvent::decode(&text) {
            Some(event) => self.hub.notify(channel, &event),
            None => tracing::warn!(channel, "unreadable channel event from the engine dropped"),
        }
    }

    fn has_subscribers(&self, channel: &str) -> bool {
        self.hub.has_channel(channel)
    }

    fn lost(&self, channel: &str) {
        let n = self.hub.lost(channel);
        tracing::warn!(
            channel,
            subscribers = n,
            "publications missed while the engine link was down; subscribers told to recover"
        );
    }
}

/// The engine `[engine]` asks for. `Config::validate` checks the Redis settings first; a
/// config built in code with bad ones falls back to memory, loudly.
fn make_engine(config: &Config, limits: EngineLimits) -> Arc<dyn Engine> {
    match config.engine.kind {
        crate::config::EngineKind::Memory => Arc::new(MemoryEngine::with_limits(limits)),
        #[cfg(feature = "redis")]
        crate::config::EngineKind::Redis => match crate::engine::RedisEngine::new(&config.engine.redis) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                tracing::error!(error = %e, "invalid [engine.redis] settings: using the memory engine");
                Arc::new(MemoryEngine::with_limits(limits))
            }
        },
        #[cfg(not(feature = "redis"))]
        crate::config::EngineKind::Redis => {
            tracing::error!("this build has no Redis engine (cargo feature `redis`): using the memory engine");
            Arc::new(MemoryEngine::with_limits(limits))
        }
    }
}

/// Decrements the session count when a session ends.
#[derive(Debug)]
pub(crate) struct SessionCount(Arc<Node>);

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Unsubscribes when dropped: ties a subscription to the life of a transport's task or body.
#[derive(Debug)]
pub(crate) struct SubscriptionGuard {
    pub(crate) node: Arc<Node>,
    pub(crate) channel: Arc<str>,
    pub(crate) id: u64,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.node.unsubscribe(&self.channel, self.id);
    }
}

/// A position that matches no stream (epochs are never empty): recovering from it answers
/// "not recovered" with the channel's current position. For `recover: true` without a
/// position, and for an SSE `Last-Event-ID` that is not `<epoch>:<offset>`.
pub(crate) fn no_position() -> StreamPosition {
    StreamPosition { epoch: Arc::from(""), offset: 0 }
}

/// When a `history` query's `since.epoch` is not the channel's epoch (its history was lost),
/// the message for error 122; `None` when it matches.
pub(crate) fn epoch_mismatch(asked: &str, current: &StreamPosition) -> Option<String> {
    (asked != &*current.epoch).then(|| {
        format!(
            "since.epoch `{asked}` is not this channel's epoch: its history was lost (e.g. a restart); \
             reload, then continue from epoch `{}` offset {}",
            current.epoch, current.offset
        )
    })
}

#[cfg(test)]
mod id_tests {
    use super::IdPermutation;

    #[test]
    fn connection_ids_are_distinct_and_do_not_count_up() {
        let p = IdPermutation::new();
        let base = 0x1234_5678_0000_0000u64;
        let ids: Vec<u64> = (1..=200_000u64).map(|n| p.permute(base | n)).collect();
        let distinct: std::collections::HashSet<u64> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ids.len(), "a permutation never repeats");
        // Neither half moves by a constant step from one connection to the next.
        let steps: std::collections::HashSet<u64> = ids.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
        assert!(steps.len() > 199_000, "{} distinct steps", steps.len());
        let high: std::collections::HashSet<u64> = ids.iter().map(|i| i >> 32).collect();
        assert!(high.len() > 190_000, "the high half is not a node constant: {}", high.len());
        // Another key, another sequence.
        let q = IdPermutation::new();
        assert_ne!(p.permute(base | 1), q.permute(base | 1));
    }
}
