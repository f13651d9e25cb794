//! One server-side WebSocket connection after the handshake: reads and decodes frames, answers
//! pings, runs the closing handshake, detects dead peers, and hands data messages up.

use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::close::{CloseCode, CloseFrame};
use super::decoder::{Decoder, Event, Limits, Message, ProtocolError, Role};
use super::deflate::{Inflater, Negotiated};
use super::frame::OpCode;
use super::io::{ReadHalf, Stream};
use super::outbox::{Outbox, SendMode};
use super::{Settings, WsMetrics};

/// Why `recv` ended without a message.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The peer broke the protocol; we sent it a close frame with the code.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The socket failed or the peer vanished without a close frame.
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    /// No pong (nor anything else) within the pong timeout.
    #[error("peer did not answer ping")]
    PingTimeout,
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// We queued a close frame; waiting for the peer's close frame.
    Closing,
    /// Close frames were exchanged (or decoding failed): waiting for the peer's FIN.
    Draining,
}

/// A server-side WebSocket. Call [`WebSocket::recv`] until it returns `Ok(None)` or an error;
/// send through [`WebSocket::outbox`], from any task.
#[derive(Debug)]
pub struct WebSocket {
    read: ReadHalf,
    buf: BytesMut,
    read_size: usize,
    decoder: Decoder,
    outbox: Outbox,
    writer: JoinHandle<()>,
    /// Armed for pings (with keepalive) and for the closing deadline; none otherwise, so that
    /// idle connections of protocols with their own pings hold no timer.
    timer: Option<Pin<Box<Sleep>>>,
    last_seen: Instant,
    ping_sent: bool,
    phase: Phase,
    deadline: Option<Instant>,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
    /// On shutdown the close waits a random part of this, so a drained node's clients do not
    /// all come back at once (`drain_spread`).
    drain_spread: std::time::Duration,
    /// Armed when shutdown starts: when this connection gets its 1001.
    drain: Option<Pin<Box<Sleep>>>,
    metrics: WsMetrics,
    protocol: Option<&'static str>,
    peer_close: Option<CloseFrame>,
    /// Send WebSocket pings to idle peers (off when the protocol above has its own pings).
    keepalive: bool,
}

const MIN_READ: usize = 4 << 10;
const MAX_READ: usize = 256 << 10;

impl WebSocket {
    /// Takes over an upgraded stream. `leftover` holds bytes the HTTP layer read past the
    /// handshake; `shutdown` makes the connection close with 1001.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        stream: Stream,
        leftover: Bytes,
        settings: Arc<Settings>,
        negotiated: Option<Negotiated>,
        protocol: Option<&'static str>,
        shutdown: CancellationToken,
        drain_spread: std::time::Duration,
        metrics: WsMetrics,
    ) -> Self {
        let (read, write) = stream.split();
        let mode = SendMode::new(negotiated.as_ref(), settings.compression.threshold, settings.compression.level);
        let outbox = Outbox::new(settings.max_queue_bytes, mode);
        let writer = outbox.clone().spawn_writer(write, settings.write_delay, metrics.clone());
        let limits = Limits {
            max_frame_size: settings.max_frame_size,
            max_message_size: settings.max_message_size,
            max_fragments: settings.max_fragments,
        };
        let decoder = Decoder::new(Role::Server, limits, negotiated.as_ref().map(Inflater::for_negotiated));
        let now = Instant::now();
        metrics.opened();
        Self {
            read,
            buf: BytesMut::from(&leftover[..]),
            read_size: MIN_READ,
            decoder,
            outbox,
            writer,
            timer: Some(Box::pin(tokio::time::sleep_until(now + settings.ping_interval))),
            last_seen: now,
            ping_sent: false,
            phase: Phase::Open,
            deadline: None,
            settings,
            shutdown,
            drain_spread,
            drain: None,
            metrics,
            protocol,
            peer_close: None,
            keepalive: true,
        }
    }

    /// The queue this connection's frames go out through.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Turns WebSocket-level pings off, for protocols that run their own liveness check
    /// (see [`WebSocket::last_seen`]).
    pub fn disable_keepalive(&mut self) {
        self.keepalive = false;
        if self.deadline.is_none() {
            self.timer = None;
        }
    }

    /// When the peer last sent anything.
    pub fn last_seen(&self) -> Instant {
        self.last_seen
    }

    /// The subprotocol agreed in the handshake.
    pub fn protocol(&self) -> Option<&'static str> {
        self.protocol
    }

    /// What the peer said in its close frame, once it sent one.
    pub fn peer_close(&self) -> Option<&CloseFrame> {
        self.peer_close.as_ref()
    }

    /// Starts the closing handshake with `code` after what is queued.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        self.outbox.close(Some(CloseFrame::new(code, reason)));
        self.enter(Phase::Closing);
    }

    /// The next data message. `Ok(None)` once the connection has closed cleanly (either side
    /// initiated); errors say why it ended otherwise. Either way the socket is released when
    /// this returns something other than a message.
    ///
    /// Idle connections sit in this future, so the closing paths (`drain`, `finish_writer`,
    /// which need a scratch buffer and timeouts) are boxed to keep it small.
    pub async fn recv(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            if self.phase != Phase::Draining {
                match self.decoder.decode(&mut self.buf) {
                    Ok(Some(ev)) => {
                        self.metrics.received_frame();
                        if let Some(msg) = self.on_event(ev) {
                            return Ok(Some(msg));
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.outbox.close(Some(CloseFrame::new(e.code, e.reason)));
                        self.enter(Phase::Draining);
                        Box::pin(self.drain()).await;
                        return Err(e.into());
                    }
                }
            } else {
                Box::pin(self.drain()).await;
                return Ok(None);
            }
            if self.buf.is_empty() && self.buf.capacity() > 0 {
                // Idle connections hold no read buffer.
                self.buf = BytesMut::new();
            }
            let closing = self.phase != Phase::Open;
            tokio::select! {
                biased;
                read = self.read.read_into(&mut self.buf, self.read_size) => {
                    if self.filled(read?) {
                        // The peer is gone: nothing more we write can reach it.
                        self.writer.abort();
                        return if closing { Ok(None) } else {
                            Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
                        };
                    }
                }
                () = fired(&mut self.timer) => {
                    if let Some(err) = self.on_timer() {
                        Box::pin(self.finish_writer()).await;
                        return match err {
                            TimerEnd::PingTimeout => Err(WsError::PingTimeout),
                            TimerEnd::CloseTimeout => Ok(None),
                        };
                    }
                }
                () = self.shutdown.cancelled(), if !closing && self.drain.is_none() => {
                    let at = random_up_to(self.drain_spread);
                    self.drain = Some(Box::pin(tokio::time::sleep(at)));
                }
                () = fired(&mut self.drain), if !closing => {
                    self.drain = None;
                    let reason = going_away_reason(random_up_to(self.drain_spread));
                    self.close(CloseCode::GOING_AWAY, &reason);
                }
                () = self.outbox.reader_woken(), if !closing => {
                    if self.outbox.is_closing() {
                        self.enter(Phase::Closing);
                    }
                }
            }
        }
    }

    /// Accounts for what a read appended to the buffer; returns true at end of stream.
    fn filled(&mut self, read: Option<usize>) -> bool {
        match read {
            None => false,
            Some(0) => true,
            Some(n) => {
                self.last_seen = Instant::now();
                self.ping_sent = false;
                self.metrics.received_bytes(n as u64);
                // Grow reads for big messages (this one filled the buffer), shrink back for
                // small ones.
                let full = self.buf.len() == self.buf.capacity();
                self.read_size = if full { (self.read_size * 2).min(MAX_READ) } else { MIN_READ };
                false
            }
        }
    }

    fn on_event(&mut self, ev: Event) -> Option<Message> {
        match ev {
            Event::Message(m) => (self.phase == Phase::Open).then_some(m),
            Event::Ping(p) => {
                if self.phase == Phase::Open && self.outbox.send_control(OpCode::Pong, &p).is_err() {
                    self.slow_consumer();
                }
                None
            }
            Event::Pong(_) => None,
            Event::Close(frame) => {
                if self.phase == Phase::Open {
                    // Echo the code (RFC 6455 §5.5.1); an empty close gets an empty close.
                    let reply = frame.as_ref().map(|f| CloseFrame::new(f.code, ""));
                    self.outbox.close(reply);
                }
                self.peer_close = frame;
                self.enter(Phase::Draining);
                None
            }
        }
    }

    fn slow_consumer(&mut self) {
        self.outbox.close_now(Some(CloseFrame::new(CloseCode::POLICY_VIOLATION, "outgoing queue full")));
        self.enter(Phase::Closing);
    }

    fn enter(&mut self, phase: Phase) {
        if self.phase == Phase::Open || phase == Phase::Draining {
            self.phase = phase;
        }
        if self.deadline.is_none() {
            let at = Instant::now() + self.settings.close_timeout;
            self.deadline = Some(at);
            self.arm(at);
        }
    }

    fn arm(&mut self, at: Instant) {
        match self.timer.as_mut() {
            Some(t) => t.as_mut().reset(at),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    fn on_timer(&mut self) -> Option<TimerEnd> {
        let now = Instant::now();
        if let Some(at) = self.deadline {
            if now >= at {
                return Some(TimerEnd::CloseTimeout);
            }
            self.arm(at);
            return None;
        }
        let idle_until = self.last_seen + self.settings.ping_interval;
        if !self.keepalive {
            self.timer = None;
            return None;
        }
        if now < idle_until {
            self.arm(idle_until);
            return None;
        }
        if self.ping_sent {
            if now >= self.last_seen + self.settings.ping_interval + self.settings.pong_timeout {
                // The peer is gone; do not wait for a closing handshake it cannot answer.
                self.outbox.close_now(Some(CloseFrame::new(CloseCode::GOING_AWAY, "ping timeout")));
                return Some(TimerEnd::PingTimeout);
            }
        } else {
            self.ping_sent = true;
            if self.outbox.send_control(OpCode::Ping, b"").is_err() {
                self.slow_consumer();
                return None;
            }
        }
        self.arm(self.last_seen + self.settings.ping_interval + self.settings.pong_timeout);
        None
    }

    /// After the close frames: wait (bounded) for our close to be written and for the peer to
    /// close its side, discarding anything else it sends.
    async fn drain(&mut self) {
        let deadline = self.deadline.unwrap_or_else(|| Instant::now() + self.settings.close_timeout);
        let mut scratch = [0u8; 512];
        let _ = tokio::time::timeout_at(deadline, async {
            while let Ok(n) = self.read.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        self.finish_writer().await;
    }

    /// Lets the writer flush the close frame (bounded by the close timeout), then stops it.
    async fn finish_writer(&mut self) {
        let deadline = self.deadline.unwrap_or_else(|| Instant::now() + self.settings.close_timeout);
        if !self.outbox.writer_done() {
            let _ = tokio::time::timeout_at(deadline, &mut self.writer).await;
        }
        self.writer.abort();
    }
}

/// Completes when the timer fires; never without a timer.
/// A uniformly random duration in `[0, max]` (millisecond steps).
pub fn random_up_to(max: std::time::Duration) -> std::time::Duration {
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    std::time::Duration::from_millis(if ms == 0 { 0 } else { rand::random_range(0..=ms) })
}

/// The reason of the shutdown close: `server shutting down; reconnect_in=<ms>`, the hint
/// clients wait (plus their own jitter) before reconnecting. See docs/protocol.md.
pub(super) fn going_away_reason(hint: std::time::Duration) -> String {
    format!("server shutting down; reconnect_in={}", hint.as_millis())
}

async fn fired(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

enum TimerEnd {
    PingTimeout,
    CloseTimeout,
}

impl Drop for WebSocket {
    fn drop(&mut self) {
        self.writer.abort();
        self.outbox.close_now(None);
        self.metrics.closed();
    }
}
