//! The background task: the one owner of the connection. It writes requests and matches
//! replies by id, answers pings, watches liveness, delivers publications, and on a drop
//! reconnects with backoff and resubscribes with recovery.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_protocol::{
    ClientFrame, Command as Wire, ConnectResult, ErrorDetail, Publication, PublishRequest, PushBody, ReplyResult,
    ServerFrame, UnsubscribeRequest,
};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::backoff::Backoff;
use crate::client::Command;
use crate::connection::{self, Socket};
use crate::recovery::Tracker;
use crate::subscription::SubHandle;
use crate::{ClientOptions, Error, Event, State};

/// The longest wait for the server's half of a closing handshake it started.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);

/// One subscription as the task tracks it.
#[derive(Debug)]
struct Sub {
    handle: SubHandle,
    tracker: Tracker,
    /// `Some` while a (re)subscribe waits for its reply: live publications that arrive
    /// meanwhile wait here, to be delivered after the recovered ones.
    early: Option<Vec<Publication>>,
}

/// A request waiting for its reply.
#[derive(Debug)]
enum Pending {
    /// `reply` is `None` for a resubscribe after a reconnect (nobody waits for it).
    Subscribe {
        channel: String,
        sub: u64,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    Unsubscribe {
        channel: String,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    Publish {
        channel: String,
        reply: oneshot::Sender<Result<herald_protocol::PublishResult, Error>>,
    },
}

/// Why serving one connection stopped.
#[derive(Debug)]
enum Ended {
    /// Reconnect after backoff, for this reason.
    Reconnect(String),
    /// Stop for good.
    Stop(Error),
}

#[derive(Debug)]
pub(crate) struct Worker {
    url: String,
    options: ClientOptions,
    commands: mpsc::Receiver<Command>,
    close: watch::Receiver<bool>,
    state: watch::Sender<State>,
    subs: HashMap<String, Sub>,
    pending: HashMap<u32, Pending>,
    /// Request deadlines in sending order (all requests share one timeout, so the front is
    /// always the earliest). Entries whose request was answered are skipped.
    expiries: VecDeque<(Instant, u32)>,
    next_id: u32,
    backoff: Backoff,
    /// The server's shutdown close said when to come back: the first reconnect waits that
    /// (plus jitter) instead of the backoff.
    hint: Option<Duration>,
}

impl Worker {
    pub(crate) fn new(
        url: String,
        options: ClientOptions,
        commands: mpsc::Receiver<Command>,
        close: watch::Receiver<bool>,
        state: watch::Sender<State>,
    ) -> Self {
        let backoff = Backoff::new(options.backoff_base, options.backoff_max);
        Self {
            url,
            options,
            commands,
            close,
            state,
            subs: HashMap::new(),
            pending: HashMap::new(),
            expiries: VecDeque::new(),
            // 1 was `connect`'s.
            next_id: 2,
            backoff,
            hint: None,
        }
    }

    /// Serves connections until the client is closed, for good.
    pub(crate) async fn run(mut self, mut socket: Socket, mut info: ConnectResult) {
        tracing::debug!(url = %self.url, client = %info.client, "connected");
        let error = loop {
            let connected_at = Instant::now();
            let reason = match self.serve(&mut socket, &info).await {
                Ended::Stop(error) => break error,
                Ended::Reconnect(reason) => reason,
            };
            drop(socket);
            tracing::info!(url = %self.url, reason, "disconnected; reconnecting");
            self.state.send_replace(State::Connecting);
            self.disconnected(&reason);
            // A connection that held for a while earns a fresh backoff; one that keeps dropping
            // right after connecting does not get to reconnect in a tight loop.
            if connected_at.elapsed() >= self.options.backoff_max {
                self.backoff.reset();
            }
            match self.reconnect().await {
                Ok((s, i)) => (socket, info) = (s, i),
                Err(error) => break error,
            }
            tracing::info!(url = %self.url, client = %info.client, "reconnected");
            self.state.send_replace(State::Connected(info.clone()));
        };
        self.finish(error);
    }

    /// Serves one connection: resubscribes, then handles frames, commands and timers.
    async fn serve(&mut self, socket: &mut Socket, info: &ConnectResult) -> Ended {
        if let Err(ended) = self.resubscribe(socket).await {
            return ended;
        }
        let liveness = (info.ping > 0).then(|| Duration::from_secs(info.ping.into()) + self.options.ping_margin);
        let mut last_frame = Instant::now();
        loop {
            let silent_until = liveness.map(|l| last_frame + l);
            let next_expiry = self.expiries.front().map(|(at, _)| *at);
            let step = tokio::select! {
                () = closing(&mut self.close) => return self.close_socket(socket, "closed by the client").await,
                command = self.commands.recv() => match command {
                    Some(command) => self.command(socket, command).await,
                    None => return self.close_socket(socket, "every handle to the client was dropped").await,
                },
                message = socket.next() => match message {
                    Some(Ok(message)) => {
                        let handled = self.message(socket, message).await;
                        // After the frame is handled: delivering it may have waited for the
                        // application, and that time is not the server's silence.
                        last_frame = Instant::now();
                        handled
                    }
                    Some(Err(e)) => Err(Ended::Reconnect(format!("read failed: {e}"))),
                    None => Err(Ended::Reconnect("connection lost".into())),
                },
                () = sleep_until(silent_until) => {
                    let l = liveness.unwrap_or_default();
                    Err(Ended::Reconnect(format!("no frame from the server for {l:?}")))
                }
                () = sleep_until(next_expiry) => self.expire(socket).await,
            };
            if let Err(ended) = step {
                return ended;
            }
        }
    }

    /// After a (re)connect: subscribes again to every live subscription, asking to recover
    /// from its last position. The connection's first subscribes have nothing to do here.
    async fn resubscribe(&mut self, socket: &mut Socket) -> Result<(), Ended> {
        self.subs.retain(|_, s| !s.handle.events.is_closed());
        let mut channels: Vec<(String, u64)> = self.subs.iter().map(|(c, s)| (c.clone(), s.handle.id)).collect();
        channels.sort_unstable();
        for (channel, sub) in channels {
            let Some(s) = self.subs.get_mut(&channel) else { continue };
            s.early = Some(Vec::new());
            let request = s.tracker.request(&channel);
            tracing::debug!(channel, recover = request.recover, epoch = ?request.epoch, offset = ?request.offset, "resubscribing");
            self.send_request(socket, Wire::Subscribe(request), Pending::Subscribe { channel, sub, reply: None })
                .await?;
        }
        Ok(())
    }

    async fn command(&mut self, socket: &mut Socket, command: Command) -> Result<(), Ended> {
        match command {
            Command::Subscribe { sub, reply } => {
                let channel = sub.channel.clone();
                if let Some(existing) = self.subs.get(&channel) {
                    if !existing.handle.events.is_closed() {
                        let _ = reply.send(Err(Error::AlreadySubscribed { channel }));
                        return Ok(());
                    }
                    // Dropped, but its unsubscribe did not fit in the queue: do it now.
                    self.drop_subscription(socket, &channel).await?;
                }
                let tracker = Tracker::default();
                let request = tracker.request(&channel);
                let pending = Pending::Subscribe { channel: channel.clone(), sub: sub.id, reply: Some(reply) };
                self.send_request(socket, Wire::Subscribe(request), pending).await?;
                self.subs.insert(channel, Sub { handle: sub, tracker, early: Some(Vec::new()) });
                Ok(())
            }
            Command::Unsubscribe { id, channel, reply } => {
                if !self.holds(&channel, id) {
                    // Already gone (it ended, or this is a late duplicate).
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(()));
                    }
                    return Ok(());
                }
                self.subs.remove(&channel);
                let request = Wire::Unsubscribe(UnsubscribeRequest { channel: channel.clone() });
                self.send_request(socket, request, Pending::Unsubscribe { channel, reply }).await
            }
            Command::Publish { channel, data, reply } => {
                let request = Wire::Publish(PublishRequest { channel: channel.clone(), data });
                self.send_request(socket, request, Pending::Publish { channel, reply }).await
            }
        }
    }

    async fn message(&mut self, socket: &mut Socket, message: Message) -> Result<(), Ended> {
        match message {
            Message::Text(text) => match ServerFrame::parse(text.as_bytes()) {
                Ok(frame) => self.frame(socket, frame).await,
                Err(e) => self.unreadable(text.as_str(), &e),
            },
            Message::Binary(_) => {
                tracing::warn!(url = %self.url, "ignoring a binary frame: herald.v1 is text only");
                Ok(())
            }
            Message::Close(frame) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| (f.code.into(), f.reason.to_string()));
                // Send our half of the closing handshake (tungstenite queued it).
                let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, socket.close(None)).await;
                if connection::reconnects_after(code) {
                    self.hint = connection::reconnect_hint(code, &reason);
                    Err(Ended::Reconnect(format!("the server closed the connection ({code}: {reason})")))
                } else {
                    tracing::warn!(url = %self.url, code, reason, "the server closed the connection for good");
                    Err(Ended::Stop(Error::Closed { code, reason }))
                }
            }
            // tungstenite answers pings itself; any frame counts for liveness.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
        }
    }

    async fn frame(&mut self, socket: &mut Socket, frame: ServerFrame) -> Result<(), Ended> {
        match frame {
            ServerFrame::Ping => self.write(socket, ClientFrame::Pong.encode()).await,
            ServerFrame::Reply { id, result } => self.reply(socket, id, result).await,
            ServerFrame::Push { channel, body: PushBody::Pub(publication) } => {
                self.publication(socket, channel, publication).await
            }
            ServerFrame::Push { channel, body: PushBody::Join(_) | PushBody::Leave(_) } => {
                tracing::trace!(channel, "ignoring a presence push");
                Ok(())
            }
            ServerFrame::Push { channel, body: PushBody::Subscribe(_) } => {
                tracing::trace!(channel, "ignoring a server-side subscription");
                Ok(())
            }
            ServerFrame::Push { channel, body: PushBody::Unsubscribe(_) } => {
                // The backend ended this subscription: its stream ends, and it is not renewed.
                tracing::debug!(channel, "unsubscribed by the server");
                if let Some(s) = self.subs.remove(&channel) {
                    let _ = s.handle.ended.set(Error::Closed { code: 0, reason: "unsubscribed by the server".into() });
                }
                Ok(())
            }
            ServerFrame::Error(e) => {
                tracing::warn!(url = %self.url, code = e.code, message = e.message, "the server reported an error");
                Ok(())
            }
        }
    }

    /// A frame that does not parse: fail the request it answers, if it names one.
    fn unreadable(&mut self, text: &str, error: &str) -> Result<(), Ended> {
        #[derive(serde::Deserialize)]
        struct Id {
            id: Option<u32>,
        }
        let id = serde_json::from_str::<Id>(text).ok().and_then(|f| f.id);
        let error = Error::protocol(format!("unreadable frame from the server: {error}"));
        tracing::warn!(url = %self.url, ?id, %error, "ignoring a frame");
        if let Some(pending) = id.and_then(|id| self.pending.remove(&id)) {
            match pending {
                Pending::Subscribe { channel, sub, reply: Some(reply) } => {
                    self.forget(&channel, sub);
                    let _ = reply.send(Err(error));
                }
                Pending::Subscribe { channel, reply: None, .. } => {
                    return Err(Ended::Reconnect(format!("unreadable reply to resubscribing `{channel}`")));
                }
                Pending::Unsubscribe { reply, .. } => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(error));
                    }
                }
                Pending::Publish { reply, .. } => {
                    let _ = reply.send(Err(error));
                }
            }
        }
        Ok(())
    }

    async fn reply(&mut self, socket: &mut Socket, id: u32, result: ReplyResult) -> Result<(), Ended> {
        let Some(pending) = self.pending.remove(&id) else {
            tracing::debug!(id, "a reply to no waiting request (it timed out)");
            return Ok(());
        };
        match pending {
            Pending::Subscribe { channel, sub, reply } => self.subscribed(socket, channel, sub, reply, result).await,
            Pending::Unsubscribe { channel, reply } => {
                let outcome = match result {
                    ReplyResult::Unsubscribe => Ok(()),
                    other => Err(refused("unsubscribe", &channel, other)),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
                Ok(())
            }
            Pending::Publish { channel, reply } => {
                let outcome = match result {
                    ReplyResult::Publish(r) => Ok(r),
                    other => Err(refused("publish", &channel, other)),
                };
                let _ = reply.send(outcome);
                Ok(())
            }
        }
    }

    async fn subscribed(
        &mut self,
        socket: &mut Socket,
        channel: String,
        sub: u64,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
        result: ReplyResult,
    ) -> Result<(), Ended> {
        if !self.holds(&channel, sub) {
            // Unsubscribed meanwhile (that unsubscribe went out after this subscribe), or
            // replaced after its caller stopped waiting: nobody to tell.
            return Ok(());
        }
        let result = match result {
            ReplyResult::Subscribe(result) => result,
            other => {
                let error = refused("subscribe", &channel, other);
                return match reply {
                    Some(reply) => {
                        self.forget(&channel, sub);
                        let _ = reply.send(Err(error));
                        Ok(())
                    }
                    None if error.is_retryable() => {
                        Err(Ended::Reconnect(format!("resubscribing to `{channel}` failed: {error}")))
                    }
                    None => {
                        tracing::warn!(channel, %error, "resubscribe refused; the subscription ends");
                        if let Some(s) = self.subs.remove(&channel) {
                            let _ = s.handle.ended.set(error);
                        }
                        Ok(())
                    }
                };
            }
        };
        if let Some(reply) = reply {
            if reply.send(Ok(())).is_err() {
                // The caller gave up waiting; nobody will read this subscription.
                return self.drop_subscription(socket, &channel).await;
            }
        }
        let Some(s) = self.subs.get_mut(&channel) else { return Ok(()) };
        let early = s.early.take().unwrap_or_default();
        tracing::debug!(channel, epoch = result.epoch, offset = result.offset, recovered = ?result.recovered, "subscribed");
        let events = s.tracker.subscribed(result, early);
        self.deliver(socket, &channel, events).await
    }

    async fn publication(
        &mut self,
        socket: &mut Socket,
        channel: String,
        publication: Publication,
    ) -> Result<(), Ended> {
        let Some(s) = self.subs.get_mut(&channel) else {
            tracing::trace!(channel, "a publication for no subscription (unsubscribed meanwhile)");
            return Ok(());
        };
        if let Some(early) = &mut s.early {
            if early.len() >= self.options.subscription_buffer {
                return Err(Ended::Reconnect(format!(
                    "too many publications on `{channel}` before its subscribe reply"
                )));
            }
            early.push(publication);
            return Ok(());
        }
        match s.tracker.live(publication) {
            Some(event) => self.deliver(socket, &channel, Some(event)).await,
            None => {
                tracing::trace!(channel, "skipping a publication already delivered");
                Ok(())
            }
        }
    }

    /// Hands events to a subscription, in order, waiting while its buffer is full: the
    /// backpressure the crate docs describe. Stops early if the application drops it.
    async fn deliver(
        &mut self,
        socket: &mut Socket,
        channel: &str,
        events: impl IntoIterator<Item = Event>,
    ) -> Result<(), Ended> {
        for event in events {
            let Some(s) = self.subs.get(channel) else { return Ok(()) };
            let delivered = match s.handle.events.try_send(event) {
                Ok(()) => true,
                Err(TrySendError::Closed(_)) => false,
                Err(TrySendError::Full(event)) => {
                    tracing::trace!(channel, "subscription buffer full: waiting for the application");
                    tokio::select! {
                        sent = s.handle.events.send(event) => sent.is_ok(),
                        () = closing(&mut self.close) => {
                            return Err(self.close_socket(socket, "closed by the client").await);
                        }
                    }
                }
            };
            if !delivered {
                return self.drop_subscription(socket, channel).await;
            }
        }
        Ok(())
    }

    /// Forgets a subscription the application dropped and tells the server.
    async fn drop_subscription(&mut self, socket: &mut Socket, channel: &str) -> Result<(), Ended> {
        if self.subs.remove(channel).is_none() {
            return Ok(());
        }
        tracing::debug!(channel, "subscription dropped; unsubscribing");
        let request = Wire::Unsubscribe(UnsubscribeRequest { channel: channel.to_owned() });
        self.send_request(socket, request, Pending::Unsubscribe { channel: channel.to_owned(), reply: None }).await
    }

    /// Whether the subscription to `channel` is still the one with this id.
    fn holds(&self, channel: &str, sub: u64) -> bool {
        self.subs.get(channel).is_some_and(|s| s.handle.id == sub)
    }

    /// Removes a subscription that never started (its first subscribe failed).
    fn forget(&mut self, channel: &str, sub: u64) {
        if self.holds(channel, sub) {
            self.subs.remove(channel);
        }
    }

    async fn send_request(&mut self, socket: &mut Socket, command: Wire, pending: Pending) -> Result<(), Ended> {
        let id = self.next_id();
        self.pending.insert(id, pending);
        self.expiries.push_back((Instant::now() + self.options.request_timeout, id));
        self.write(socket, ClientFrame::Request { id, command }.encode()).await
    }

    fn next_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    async fn write(&self, socket: &mut Socket, text: String) -> Result<(), Ended> {
        tracing::trace!(frame = text, "sending");
        match tokio::time::timeout(self.options.request_timeout, socket.send(Message::text(text))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Ended::Reconnect(format!("write failed: {e}"))),
            Err(_) => Err(Ended::Reconnect("a write timed out: the server is not reading".into())),
        }
    }

    /// Fails requests that got no reply in time. Their callers normally gave up already (their
    /// clock started first); the explicit error covers the tie.
    async fn expire(&mut self, socket: &mut Socket) -> Result<(), Ended> {
        let now = Instant::now();
        let after = self.options.request_timeout;
        while let Some(&(at, id)) = self.expiries.front() {
            if at > now {
                break;
            }
            self.expiries.pop_front();
            match self.pending.remove(&id) {
                None | Some(Pending::Unsubscribe { reply: None, .. }) => {}
                Some(Pending::Publish { reply, .. }) => {
                    let _ = reply.send(Err(Error::Timeout { command: "publish", after }));
                }
                Some(Pending::Unsubscribe { reply: Some(reply), .. }) => {
                    let _ = reply.send(Err(Error::Timeout { command: "unsubscribe", after }));
                }
                Some(Pending::Subscribe { reply: None, channel, .. }) => {
                    return Err(Ended::Reconnect(format!("no reply to resubscribing `{channel}`")));
                }
                Some(Pending::Subscribe { reply: Some(reply), channel, sub }) => {
                    let _ = reply.send(Err(Error::Timeout { command: "subscribe", after }));
                    // The server may still subscribe; unsubscribe so it stops sending.
                    if self.holds(&channel, sub) {
                        self.drop_subscription(socket, &channel).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The connection dropped: fail what was in flight. Subscriptions stay, to be resumed.
    fn disconnected(&mut self, reason: &str) {
        self.expiries.clear();
        for (_, pending) in std::mem::take(&mut self.pending) {
            match pending {
                Pending::Subscribe { channel, sub, reply: Some(reply) } => {
                    self.forget(&channel, sub);
                    let _ = reply.send(Err(Error::Disconnected { command: "subscribe", reason: reason.to_owned() }));
                }
                Pending::Subscribe { reply: None, .. } => {}
                // The server forgets a connection's subscriptions with it: done.
                Pending::Unsubscribe { reply, .. } => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(()));
                    }
                }
                Pending::Publish { reply, .. } => {
                    let _ = reply.send(Err(Error::Disconnected { command: "publish", reason: reason.to_owned() }));
                }
            }
        }
    }

    /// Waits out the backoff and connects again, until it works, the client is closed, or
    /// the server refuses for good.
    async fn reconnect(&mut self) -> Result<(Socket, ConnectResult), Error> {
        loop {
            if self.commands.is_closed() {
                return Err(Error::Closed { code: 1000, reason: "every handle to the client was dropped".into() });
            }
            let attempt = self.backoff.attempt();
            let delay = match self.hint.take() {
                // The hint plus up to a tenth of it (at least 100 ms) of jitter of our own.
                Some(hint) => {
                    let spread = u64::try_from((hint / 10).max(Duration::from_millis(100)).as_millis()).unwrap_or(0);
                    hint + Duration::from_millis(rand::Rng::random_range(&mut rand::rng(), 0..=spread))
                }
                None => self.backoff.next_delay(&mut rand::rng()),
            };
            tracing::debug!(url = %self.url, attempt, ?delay, "reconnecting after a delay");
            let (url, options) = (&self.url, &self.options);
            let connect = async move {
                tokio::time::sleep(delay).await;
                connection::open(url, options).await
            };
            let outcome = tokio::select! {
                () = closing(&mut self.close) => {
                    return Err(Error::Closed { code: 1000, reason: "closed by the client".into() });
                }
                outcome = connect => outcome,
            };
            match outcome {
                Ok(connected) => return Ok(connected),
                Err(error) if connection::worth_retrying(&error) => {
                    tracing::info!(url = %self.url, attempt, error = %Chain(&error), "reconnect failed");
                }
                Err(error) => {
                    tracing::warn!(url = %self.url, error = %Chain(&error), "reconnect refused for good");
                    return Err(error);
                }
            }
        }
    }

    /// Closes with 1000 and waits (within the request timeout) for the server's answer.
    async fn close_socket(&mut self, socket: &mut Socket, reason: &str) -> Ended {
        let frame = CloseFrame { code: WsCloseCode::Normal, reason: reason.into() };
        let handshake = async {
            socket.close(Some(frame)).await?;
            while let Some(message) = socket.next().await {
                message?;
            }
            Ok::<_, tokio_tungstenite::tungstenite::Error>(())
        };
        match tokio::time::timeout(self.options.request_timeout, handshake).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(url = %self.url, error = %e, "closing handshake incomplete"),
            Err(_) => tracing::debug!(url = %self.url, "closing handshake timed out"),
        }
        Ended::Stop(Error::Closed { code: 1000, reason: reason.to_owned() })
    }

    /// Closed for good: report it, fail everything waiting, end every subscription.
    fn finish(mut self, error: Error) {
        tracing::debug!(url = %self.url, %error, "client closed");
        self.state.send_replace(State::Closed(error.clone()));
        for (_, pending) in self.pending.drain() {
            match pending {
                Pending::Subscribe { reply: Some(reply), .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
                // Closed, the subscription is gone: what the unsubscribe wanted.
                Pending::Unsubscribe { reply: Some(reply), .. } => {
                    let _ = reply.send(Ok(()));
                }
                Pending::Subscribe { reply: None, .. } | Pending::Unsubscribe { reply: None, .. } => {}
                Pending::Publish { reply, .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
        for (_, s) in self.subs.drain() {
            let _ = s.handle.ended.set(error.clone());
        }
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Subscribe { reply, .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
                Command::Unsubscribe { reply, .. } => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(()));
                    }
                }
                Command::Publish { reply, .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Resolves once the application asked to close (or every handle is gone).
async fn closing(close: &mut watch::Receiver<bool>) {
    let _ = close.wait_for(|closing| *closing).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// An error with its sources, for logs: "websocket to ws://.. failed: IO error: Connection
/// refused (os error 111)".
struct Chain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            let text = s.to_string();
            // Some errors repeat their source in their own message; say it once.
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            source = s.source();
        }
        Ok(())
    }
}

/// The error for a reply that is not the expected result.
fn refused(command: &'static str, channel: &str, result: ReplyResult) -> Error {
    match result {
        ReplyResult::Error(ErrorDetail { code, message }) => {
            Error::Server { command, channel: Some(channel.to_owned()), code, message }
        }
        other => Error::protocol(format!("`{command}` on `{channel}` answered with {other:?}")),
    }
}
