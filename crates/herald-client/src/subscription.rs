//! A subscription as the application holds it: a bounded stream of [`Event`]s.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures_util::Stream;
use herald_protocol::Publication;
use tokio::sync::mpsc;

use crate::client::{Command, Shared};
use crate::Error;

/// What a [`Subscription`] yields.
///
/// ```
/// use herald_client::Event;
///
/// fn handle(event: Event) {
///     match event {
///         Event::Publication(p) => {
///             let value: serde_json::Value = serde_json::from_str(p.data.get()).unwrap_or_default();
///             println!("#{:?}: {value}", p.offset);
///         }
///         Event::Reset { epoch, offset, .. } => {
///             println!("missed publications; resuming at {epoch}/{offset}: reload state");
///         }
///         _ => {}
///     }
/// }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A publication. Publications with an offset arrive in offset order and never twice, also
    /// across reconnects: those recovered after a reconnect come before newer live ones.
    Publication(Publication),
    /// After a reconnect, the publications missed while disconnected could not be recovered
    /// (the server's history no longer has them, the channel's epoch changed, or the channel
    /// keeps no history): some are lost. Publications continue after `offset` in `epoch`.
    /// Reload whatever state the application derives from this channel. `epoch_changed` is
    /// true when the channel's epoch changed (the server restarted or forgot the channel: its
    /// history is new, whatever was published in between is unknown), false when the gap was
    /// longer than the history the server keeps.
    Reset { epoch: String, offset: u64, epoch_changed: bool },
}

/// The state the client's background task shares with one subscription.
#[derive(Debug)]
pub(crate) struct SubHandle {
    pub(crate) id: u64,
    pub(crate) channel: String,
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) ended: Arc<OnceLock<Error>>,
}

/// A live subscription to one channel, from [`Client::subscribe`](crate::Client::subscribe).
///
/// Read it with [`next`](Self::next) or as a [`Stream`] of [`Event`]s. Across reconnects
/// the client resubscribes by itself and recovers what was missed.
///
/// **Backpressure.** Events wait in a bounded buffer
/// ([`ClientOptions::subscription_buffer`](crate::ClientOptions::subscription_buffer)). When
/// it is full the client's background task waits for the application to read, and meanwhile
/// reads nothing from the connection, for any subscription, and answers no pings. A consumer
/// that stays behind long enough is disconnected by the server (close code 4001 or 4002);
/// the client then reconnects and recovers the missed publications, or yields
/// [`Event::Reset`] when the server no longer has them. Nothing is dropped silently.
///
/// The stream ends when the subscription cannot go on: the client was closed, or the server
/// refused to resubscribe after a reconnect. [`end_reason`](Self::end_reason) says why.
///
/// Dropping the subscription unsubscribes (without waiting for the server);
/// [`unsubscribe`](Self::unsubscribe) does the same and waits for the reply.
///
/// ```no_run
/// # async fn run(client: herald_client::Client) -> Result<(), herald_client::Error> {
/// use futures_util::StreamExt;
///
/// let news = client.subscribe("news").await?;
/// let mut firsts = news.take(10);
/// while let Some(event) = firsts.next().await {
///     println!("{event:?}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    channel: String,
    events: mpsc::Receiver<Event>,
    ended: Arc<OnceLock<Error>>,
    shared: Arc<Shared>,
    unsubscribed: bool,
}

impl Subscription {
    pub(crate) fn new(
        id: u64,
        channel: String,
        events: mpsc::Receiver<Event>,
        ended: Arc<OnceLock<Error>>,
        shared: Arc<Shared>,
    ) -> Self {
        Self { id, channel, events, ended, shared, unsubscribed: false }
    }

    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next event, or `None` once the subscription has ended (see
    /// [`end_reason`](Self::end_reason)).
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Why the subscription ended, once [`next`](Self::next) has returned `None`.
    pub fn end_reason(&self) -> Option<&Error> {
        self.ended.get()
    }

    /// Unsubscribes and waits for the server's reply. Events still buffered are discarded.
    /// On a closed client there is nothing to undo, and this succeeds.
    pub async fn unsubscribe(mut self) -> Result<(), Error> {
        self.unsubscribed = true;
        self.events.close();
        let (id, channel) = (self.id, self.channel.clone());
        let outcome =
            self.shared.request("unsubscribe", |reply| Command::Unsubscribe { id, channel, reply: Some(reply) }).await;
        match outcome {
            Err(_) if self.shared.is_closed() => Ok(()),
            outcome => outcome,
        }
    }
}

impl Stream for Subscription {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().events.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.unsubscribed {
            return;
        }
        // Closing the receiver first lets the background task see the subscription is gone
        // even if the command below does not fit in the queue.
        self.events.close();
        let command = Command::Unsubscribe { id: self.id, channel: std::mem::take(&mut self.channel), reply: None };
        let _ = self.shared.commands.try_send(command);
    }
}
