//! The application's handle: requests go to the background task over a queue, replies come
//! back on one-shot channels, bounded by the request timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use herald_protocol::{ConnectResult, PublishResult};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};

use crate::subscription::SubHandle;
use crate::{connection, worker, ClientOptions, Error, Subscription};

/// Requests waiting for the background task; a full queue makes callers wait (within their
/// timeout).
const COMMAND_QUEUE: usize = 64;

/// The connection's state, as [`Client::state`] reports it.
///
/// ```no_run
/// # async fn run(client: herald_client::Client) {
/// use herald_client::State;
///
/// let mut state = client.state();
/// while state.changed().await.is_ok() {
///     match &*state.borrow() {
///         State::Connecting => eprintln!("reconnecting"),
///         State::Connected(info) => eprintln!("connected as {}", info.client),
///         State::Closed(why) => eprintln!("closed: {why}"),
///         _ => {}
///     }
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum State {
    /// Waiting to reconnect, opening the WebSocket, or waiting for the `connect` reply.
    Connecting,
    /// Connected; the server's `connect` reply (connection id, server version, ping interval).
    Connected(ConnectResult),
    /// Closed for good; the client will not reconnect. Requests fail with this error.
    Closed(Error),
}

impl State {
    /// Whether the client is connected now.
    pub fn is_connected(&self) -> bool {
        matches!(self, Self::Connected(_))
    }

    /// Whether the client is closed for good.
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Closed(_))
    }
}

/// A request to the background task.
#[derive(Debug)]
pub(crate) enum Command {
    Subscribe { sub: SubHandle, reply: oneshot::Sender<Result<(), Error>> },
    Unsubscribe { id: u64, channel: String, reply: Option<oneshot::Sender<Result<(), Error>>> },
    Publish { channel: String, data: Box<RawValue>, reply: oneshot::Sender<Result<PublishResult, Error>> },
}

/// What every handle (client or subscription) shares. The background task runs while any
/// handle lives.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) commands: mpsc::Sender<Command>,
    close: watch::Sender<bool>,
    state: watch::Receiver<State>,
    request_timeout: Duration,
    subscription_buffer: usize,
    next_subscription: AtomicU64,
}

impl Shared {
    /// Sends a command and waits for its reply, all within the request timeout.
    pub(crate) async fn request<T>(
        &self,
        command: &'static str,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            self.commands.send(make(reply)).await.map_err(|_| self.closed_error())?;
            answer.await.map_err(|_| self.closed_error())?
        };
        match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout { command, after: self.request_timeout }),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.borrow().is_closed()
    }

    /// The error for a request that found the background task gone.
    fn closed_error(&self) -> Error {
        match &*self.state.borrow() {
            State::Closed(e) => e.clone(),
            _ => Error::Closed { code: 1006, reason: "the client's background task ended".into() },
        }
    }
}

/// A connection to a Herald server that reconnects by itself.
///
/// One background task owns the WebSocket: it answers the server's pings, matches replies
/// to requests, delivers publications to [`Subscription`]s and reconnects when the
/// connection drops (see the crate docs). `Client` is a cheap handle: clone it freely. The
/// task runs while any `Client` or `Subscription` of it lives, or until [`Client::close`].
///
/// ```no_run
/// # async fn run() -> Result<(), herald_client::Error> {
/// use herald_client::{Client, ClientOptions};
///
/// let client = Client::connect("ws://127.0.0.1:8080/connect", ClientOptions::default()).await?;
/// let at = client.publish("news", &serde_json::json!({"title": "hello"})).await?;
/// println!("published at offset {}", at.offset);
/// client.close().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl Client {
    /// Connects to `url` (`ws://host:port/connect`), sends `connect` and waits for the reply,
    /// then starts the background task. Must be called within a Tokio runtime.
    ///
    /// Only this first attempt reports its error (there is no retry here); once connected,
    /// the client reconnects by itself.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), herald_client::Error> {
    /// use herald_client::{Client, ClientOptions};
    /// let options = ClientOptions::default().token("eyJhbGciOiJIUzI1NiJ9.e30.sig").name("worker");
    /// let client = Client::connect("ws://127.0.0.1:8080/connect", options).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: impl Into<String>, options: ClientOptions) -> Result<Self, Error> {
        let url = url.into();
        let (socket, info) = connection::open(&url, &options).await?;
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let (close, close_rx) = watch::channel(false);
        let (state_tx, state) = watch::channel(State::Connected(info.clone()));
        let shared = Arc::new(Shared {
            commands,
            close,
            state,
            request_timeout: options.request_timeout,
            subscription_buffer: options.subscription_buffer,
            next_subscription: AtomicU64::new(1),
        });
        let worker = worker::Worker::new(url, options, command_rx, close_rx, state_tx);
        tokio::spawn(worker.run(socket, info));
        Ok(Self { shared })
    }

    /// Subscribes to `channel` and waits for the server's reply.
    ///
    /// Fails with [`Error::Server`] when the server refuses (e.g. code 103, permission
    /// denied), [`Error::AlreadySubscribed`] when this client already holds a subscription to
    /// the channel, [`Error::Timeout`] or [`Error::Disconnected`].
    ///
    /// ```no_run
    /// # async fn run(client: herald_client::Client) -> Result<(), herald_client::Error> {
    /// use herald_client::Event;
    /// let mut news = client.subscribe("news").await?;
    /// while let Some(event) = news.next().await {
    ///     if let Event::Publication(p) = event {
    ///         println!("{}", p.data.get());
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, channel: impl Into<String>) -> Result<Subscription, Error> {
        let channel = channel.into();
        let id = self.shared.next_subscription.fetch_add(1, Ordering::Relaxed);
        let (events, event_rx) = mpsc::channel(self.shared.subscription_buffer);
        let ended = Arc::new(OnceLock::new());
        let sub = SubHandle { id, channel: channel.clone(), events, ended: ended.clone() };
        self.shared.request("subscribe", |reply| Command::Subscribe { sub, reply }).await?;
        Ok(Subscription::new(id, channel, event_rx, ended, self.shared.clone()))
    }

    /// Publishes `data` (anything that serializes to JSON) on `channel` over the WebSocket
    /// and waits for the server's reply: the publication's epoch and offset.
    ///
    /// At most once: after [`Error::Disconnected`] or [`Error::Timeout`] the publication may
    /// or may not have been made.
    ///
    /// ```no_run
    /// # async fn run(client: herald_client::Client) -> Result<(), herald_client::Error> {
    /// #[derive(serde::Serialize)]
    /// struct Tick { price: f64 }
    /// let at = client.publish("prices", &Tick { price: 101.5 }).await?;
    /// assert!(at.offset > 0);
    /// # Ok(()) }
    /// ```
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        channel: impl Into<String>,
        data: &T,
    ) -> Result<PublishResult, Error> {
        let channel = channel.into();
        let data = serde_json::value::to_raw_value(data)
            .map_err(|e| Error::Encode { channel: channel.clone(), source: Arc::new(e) })?;
        self.shared.request("publish", |reply| Command::Publish { channel, data, reply }).await
    }

    /// The connection state, to read now or to watch for changes.
    pub fn state(&self) -> watch::Receiver<State> {
        self.shared.state.clone()
    }

    /// Closes the connection with code 1000 and stops reconnecting; waits (up to the request
    /// timeout) for the closing handshake. Every clone of this client and every subscription
    /// is closed too: their requests fail with [`Error::Closed`] and their streams end.
    pub async fn close(&self) {
        self.shared.close.send_replace(true);
        let mut state = self.shared.state.clone();
        let closed = state.wait_for(State::is_closed);
        // The task answers within the request timeout; the extra second covers a slow
        // teardown without hanging the caller forever.
        let _ = tokio::time::timeout(self.shared.request_timeout + Duration::from_secs(1), closed).await;
    }
}
