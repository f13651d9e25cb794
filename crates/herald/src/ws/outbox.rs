//! The write side, built for fan-out: a [`Prepared`] message is framed (and compressed) once and
//! its bytes are shared by every connection's [`Outbox`]; each connection's writer drains its
//! queue into vectored writes. Queues are bounded in bytes. One batch in [`SAMPLE_EVERY`] per
//! connection carries the time its first frame was queued, for `herald_queue_write_seconds`.
//!
//! On plain TCP without a write delay, a frame pushed with `direct` while the queue is empty
//! and the writer idle is written by the pusher itself (a non-blocking `write`, under the
//! queue's lock): a big channel's fan-out job then makes 10,000 writes on its own threads, not
//! 10,000 task wake-ups and polls on the runtime's workers, which stay free for the request
//! path. Whatever the socket does not take at once (or any error) goes to the queue and the
//! writer as before.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::close::CloseFrame;
use super::deflate::{self, Negotiated};
use super::frame::{self, OpCode};
use super::io::WriteHalf;
use super::WsMetrics;

/// How one connection wants its data frames: compressed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendMode {
    /// The window to compress with, when permessage-deflate was negotiated.
    pub deflate_bits: Option<u8>,
    /// Messages shorter than this go uncompressed.
    pub threshold: usize,
    /// zlib level.
    pub level: u32,
}

impl SendMode {
    pub const PLAIN: Self = Self { deflate_bits: None, threshold: usize::MAX, level: 0 };

    pub fn new(negotiated: Option<&Negotiated>, threshold: usize, level: u32) -> Self {
        Self { deflate_bits: negotiated.map(|n| n.server_window_bits), threshold, level }
    }
}

/// A data message framed once for every connection. The compressed variant for a given window
/// is made on first use and shared afterwards.
#[derive(Debug)]
pub struct Prepared {
    opcode: OpCode,
    payload: Bytes,
    plain: Bytes,
    /// Per window size 8–15: `None` inside when compression did not make it smaller.
    deflated: [OnceLock<Option<Bytes>>; 8],
}

impl Prepared {
    pub fn text(payload: Bytes) -> Self {
        Self::new(OpCode::Text, payload)
    }

    pub fn binary(payload: Bytes) -> Self {
        Self::new(OpCode::Binary, payload)
    }

    fn new(opcode: OpCode, payload: Bytes) -> Self {
        let plain = frame::encode(true, false, opcode, &payload, None);
        Self { opcode, payload, plain, deflated: Default::default() }
    }

    /// The wire bytes for a connection with `mode`.
    pub fn frame_for(&self, mode: &SendMode) -> Bytes {
        let Some(bits) = mode.deflate_bits else { return self.plain.clone() };
        if self.payload.len() < mode.threshold {
            return self.plain.clone();
        }
        let slot = &self.deflated[usize::from(bits.clamp(8, 15) - 8)];
        let variant = slot.get_or_init(|| {
            let z = deflate::compress(&self.payload, bits, mode.level);
            (z.len() < self.payload.len()).then(|| frame::encode(true, true, self.opcode, &z, None))
        });
        variant.clone().unwrap_or_else(|| self.plain.clone())
    }

    /// Bytes of the uncompressed frame (what the queue bound is charged when uncompressed).
    pub fn plain_len(&self) -> usize {
        self.plain.len()
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The connection is closing or closed.
    #[error("connection closed")]
    Closed,
    /// The queue is over its byte limit: the client is not reading fast enough.
    #[error("outgoing queue full")]
    Full,
}

/// One batch in this many (per connection) is timed from queue to socket: the clock is read
/// for 1/64 of the batches, never per frame, so the cost per delivery stays flat.
pub(crate) const SAMPLE_EVERY: u32 = 64;

/// Spreads the connections' sampling phases, so that not every connection times its first
/// batch (the connect reply) and the samples of many connections fall on different frames.
static PHASE: AtomicU32 = AtomicU32::new(0);

/// The time, for sampled batches only. Counted in tests, which prove that unsampled frames
/// never read the clock.
#[inline]
fn clock() -> Instant {
    #[cfg(test)]
    tests::CLOCK_READS.with(|c| c.set(c.get() + 1));
    Instant::now()
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// When every queued frame may still wait (each was queued with a delay), the earliest of
    /// their deadlines; `None` when empty or when something must go out at once.
    due: Option<Instant>,
    /// A close frame is queued as the last frame; nothing more is accepted.
    closing: bool,
    /// The writer has finished (close written or the socket failed).
    done: bool,
    /// Batches started (frames pushed into an empty queue), for sampling.
    batches: u32,
    /// When the first frame of the queued batch was pushed, if this batch is sampled.
    stamp: Option<Instant>,
    /// The writer holds a batch it has not finished writing: pushers must queue behind it.
    writing: bool,
    /// Plain TCP with no connection-wide write delay: pushers may write an idle connection's
    /// socket themselves. Cleared when the writer ends.
    direct: Option<Direct>,
}

/// The socket's write half, shared by the writer task and the pushers' direct writes.
struct Direct {
    io: Arc<OwnedWriteHalf>,
    metrics: WsMetrics,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Direct")
    }
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    wake_writer: Notify,
    /// Wakes the connection's reader when a close is initiated from elsewhere or the writer ends.
    wake_reader: Notify,
    limit: usize,
    mode: SendMode,
}

/// A handle to one connection's outgoing queue: cheap to clone, usable from any task.
#[derive(Debug, Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

impl Outbox {
    /// A queue of at most `limit` bytes (one frame may exceed it when the queue is empty).
    pub fn new(limit: usize, mode: SendMode) -> Self {
        let batches = PHASE.fetch_add(1, Ordering::Relaxed);
        let shared = Shared {
            queue: Mutex::new(Queue { batches, ..Queue::default() }),
            wake_writer: Notify::new(),
            wake_reader: Notify::new(),
            limit,
            mode,
        };
        Self { shared: Arc::new(shared) }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent (every critical
        // section is a few field updates), so a poisoned lock is still usable.
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn mode(&self) -> &SendMode {
        &self.shared.mode
    }

    /// Queues an encoded frame. Fails with `Full` when the queue holds more than its byte
    /// limit; the caller decides what that means (Herald closes slow consumers).
    pub fn push(&self, frame: Bytes) -> Result<(), SendError> {
        self.push_until(frame, None, false)
    }

    /// [`Outbox::push`] for a frame that may wait up to `delay` so that frames queued
    /// meanwhile share its write. The WebSocket writer writes when the earliest deadline of
    /// what it holds is due, or at once when a frame without a delay is queued (everything
    /// waiting goes along). An SSE body does not wait.
    pub fn push_within(&self, frame: Bytes, delay: Duration) -> Result<(), SendError> {
        self.push_within_direct(frame, delay, false)
    }

    /// [`Outbox::push_within`]; with `direct`, when the frame need not wait, the queue is empty
    /// and the writer idle, the caller writes it to the socket itself (non-blocking; what the
    /// socket does not take goes to the queue). For a fan-out running on its own threads: on
    /// a runtime worker, 10,000 writes would hold the worker for tens of milliseconds.
    pub fn push_within_direct(&self, frame: Bytes, delay: Duration, direct: bool) -> Result<(), SendError> {
        self.push_until(frame, (!delay.is_zero()).then(|| Instant::now() + delay), direct)
    }

    fn push_until(&self, mut frame: Bytes, deadline: Option<Instant>, direct: bool) -> Result<(), SendError> {
        let mut q = self.lock();
        if q.closing {
            return Err(SendError::Closed);
        }
        if q.bytes > 0 && q.bytes + frame.len() > self.shared.limit {
            return Err(SendError::Full);
        }
        let was_empty = q.frames.is_empty();
        if was_empty {
            q.batches = q.batches.wrapping_add(1);
            if q.batches % SAMPLE_EVERY == 0 {
                q.stamp = Some(clock());
            }
            if direct && deadline.is_none() && !q.writing {
                let q = &mut *q;
                if let Some(d) = &q.direct {
                    // Non-blocking: `WouldBlock` (or any error, which the writer then meets)
                    // leaves the frame to the queue below.
                    if let Ok(n) = d.io.try_write(&frame) {
                        if n == frame.len() {
                            d.metrics.sent(1, 1, n as u64);
                            if let Some(queued) = q.stamp.take() {
                                d.metrics.queue_write_took(queued.elapsed());
                            }
                            return Ok(());
                        }
                        // The rest is the writer's; the frame is counted when it is finished.
                        d.metrics.sent(0, 1, n as u64);
                        frame.advance(n);
                    }
                }
            }
        }
        // The writer is woken when the queue's deadline moves earlier (or to now).
        let wake = match (was_empty, q.due, deadline) {
            (true, _, d) => {
                q.due = d;
                true
            }
            (false, None, _) => false,
            (false, Some(_), None) => {
                q.due = None;
                true
            }
            (false, Some(due), Some(d)) => {
                q.due = Some(due.min(d));
                d < due
            }
        };
        q.bytes += frame.len();
        q.frames.push_back(frame);
        drop(q);
        if wake {
            self.shared.wake_writer.notify_one();
        }
        Ok(())
    }

    /// Queues a prepared message in the variant this connection negotiated.
    pub fn send_prepared(&self, p: &Prepared) -> Result<(), SendError> {
        self.push(p.frame_for(&self.shared.mode))
    }

    /// [`Outbox::send_prepared`] with [`Outbox::push_within`]'s `delay`.
    pub fn send_prepared_within(&self, p: &Prepared, delay: Duration) -> Result<(), SendError> {
        self.send_prepared_within_direct(p, delay, false)
    }

    /// [`Outbox::send_prepared_within`] with [`Outbox::push_within_direct`]'s `direct`.
    pub fn send_prepared_within_direct(&self, p: &Prepared, delay: Duration, direct: bool) -> Result<(), SendError> {
        self.push_within_direct(p.frame_for(&self.shared.mode), delay, direct)
    }

    /// Frames and queues one message for this connection only.
    pub fn send_text(&self, payload: Bytes) -> Result<(), SendError> {
        self.send_prepared(&Prepared::text(payload))
    }

    pub fn send_binary(&self, payload: Bytes) -> Result<(), SendError> {
        self.send_prepared(&Prepared::binary(payload))
    }

    pub(crate) fn send_control(&self, opcode: OpCode, payload: &[u8]) -> Result<(), SendError> {
        self.push(frame::encode(true, false, opcode, payload, None))
    }

    /// Starts the closing handshake after everything already queued. Returns false if the
    /// connection was already closing.
    pub fn close(&self, frame: Option<CloseFrame>) -> bool {
        self.close_inner(frame, false)
    }

    /// Closes without sending what is still queued: for a client that is not reading.
    pub fn close_now(&self, frame: Option<CloseFrame>) -> bool {
        self.close_inner(frame, true)
    }

    fn close_inner(&self, frame: Option<CloseFrame>, discard: bool) -> bool {
        let mut q = self.lock();
        if q.closing {
            return false;
        }
        if discard {
            q.frames.clear();
            q.bytes = 0;
            q.stamp = None;
        }
        q.closing = true;
        q.due = None;
        let bytes = frame::encode_close(frame.as_ref(), None);
        q.bytes += bytes.len();
        q.frames.push_back(bytes);
        // Nothing more is pushed, so nothing more is written directly: the socket is the
        // writer's alone, and closes when the writer ends or is aborted, whoever still holds
        // this outbox.
        let direct = q.direct.take();
        drop(q);
        drop(direct);
        self.shared.wake_writer.notify_one();
        self.shared.wake_reader.notify_one();
        true
    }

    pub fn is_closing(&self) -> bool {
        self.lock().closing
    }

    /// Bytes queued and not yet taken by the writer.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    pub(crate) async fn reader_woken(&self) {
        self.shared.wake_reader.notified().await;
    }

    pub(crate) fn writer_done(&self) -> bool {
        self.lock().done
    }

    /// Waits for queued frames and moves them into `batch` (which must be empty). Returns
    /// `false` when nothing more will ever come: the close frame (if any) was taken before.
    /// One consumer at a time: the WebSocket writer, or an SSE response body.
    pub async fn next_batch(&self, batch: &mut VecDeque<Bytes>) -> bool {
        let mut stamp = None;
        loop {
            if let Some(more) = self.try_take(batch, &mut stamp) {
                return more;
            }
            self.shared.wake_writer.notified().await;
        }
    }

    /// [`Outbox::next_batch`] without the wait: `None` when nothing is queued yet. A plain
    /// function, so the writer loop gets it inlined whatever the stream type. `stamp` gets the
    /// time the batch's first frame was queued when the batch is sampled, `None` otherwise.
    #[inline]
    fn try_take(&self, batch: &mut VecDeque<Bytes>, stamp: &mut Option<Instant>) -> Option<bool> {
        match self.take(batch, false, stamp) {
            Take::Batch(more) => Some(more),
            Take::Empty | Take::Wait(_) => None,
        }
    }

    /// Moves everything queued into `batch`; with `hold`, only once the queue's deadline is due.
    /// `stamp` as for [`Outbox::try_take`].
    #[inline]
    fn take(&self, batch: &mut VecDeque<Bytes>, hold: bool, stamp: &mut Option<Instant>) -> Take {
        let mut q = self.lock();
        if !q.frames.is_empty() {
            if let Some(due) = q.due.filter(|_| hold) {
                if due > Instant::now() {
                    return Take::Wait(due);
                }
            }
            std::mem::swap(&mut q.frames, batch);
            *stamp = q.stamp.take();
            q.bytes = 0;
            q.due = None;
            q.writing = true;
            if q.closing {
                q.done = true;
            }
            return Take::Batch(true);
        }
        q.writing = false;
        if q.closing || q.done {
            q.done = true;
            return Take::Batch(false);
        }
        Take::Empty
    }

    /// Marks the consumer gone: later pushes fail and the reader is told.
    pub(crate) fn finish(&self) {
        let mut q = self.lock();
        q.done = true;
        q.closing = true;
        q.frames.clear();
        q.bytes = 0;
        q.stamp = None;
        q.due = None;
        let direct = q.direct.take();
        drop(q);
        drop(direct);
        self.shared.wake_reader.notify_one();
    }

    /// Moves whatever is queued now to the end of `batch`, without waiting. A stamp already
    /// held is older (it is the batch's first frame) and wins.
    fn take_more(&self, batch: &mut VecDeque<Bytes>, stamp: &mut Option<Instant>) {
        let mut q = self.lock();
        batch.append(&mut q.frames);
        let later = q.stamp.take();
        if stamp.is_none() {
            *stamp = later;
        }
        q.bytes = 0;
        q.due = None;
        if q.closing {
            q.done = true;
        }
    }

    /// Spawns the writer task for `io`. It is monomorphic per stream type, so plain TCP runs
    /// exactly the code it ran before other streams existed (no dispatch, no flush).
    pub(crate) fn spawn_writer(
        self,
        io: WriteHalf,
        delay: Duration,
        metrics: WsMetrics,
    ) -> tokio::task::JoinHandle<()> {
        match io {
            WriteHalf::Tcp(w) if delay.is_zero() => {
                let w = Arc::new(w);
                let direct = Direct { io: w.clone(), metrics: metrics.clone() };
                self.lock().direct = Some(direct);
                tokio::spawn(self.write_loop(SharedTcp(w), false, delay, metrics))
            }
            WriteHalf::Tcp(w) => tokio::spawn(self.write_loop(w, false, delay, metrics)),
            WriteHalf::Other(w) => tokio::spawn(self.write_loop(w, true, delay, metrics)),
        }
    }

    /// The writer task: drains the queue into vectored writes until the close frame is written
    /// (then half-closes the socket) or the socket fails. With a `delay`, it waits that long
    /// after the first frame of a batch so that the frames queued meanwhile share its writes.
    /// `flush`: the stream may hold written bytes in a buffer (TLS records).
    // An `async fn` would keep each argument twice in the task (measured: 392 bytes against
    // about half that); this future lives as long as the connection.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn write_loop<W: AsyncWrite + Unpin + Send>(
        self,
        mut io: W,
        flush: bool,
        delay: Duration,
        metrics: WsMetrics,
    ) -> impl std::future::Future<Output = ()> + Send {
        async move {
            let mut batch: VecDeque<Bytes> = VecDeque::new();
            let mut stamp = None;
            loop {
                let more = match self.take(&mut batch, true, &mut stamp) {
                    Take::Batch(more) => more,
                    Take::Empty => {
                        self.shared.wake_writer.notified().await;
                        continue;
                    }
                    Take::Wait(due) => {
                        // Until the deadline, or earlier when something more urgent is queued.
                        let due = tokio::time::Instant::from_std(due);
                        let _ = tokio::time::timeout_at(due, self.shared.wake_writer.notified()).await;
                        continue;
                    }
                };
                if !more {
                    break;
                }
                if !delay.is_zero() && !self.writer_done() {
                    tokio::time::sleep(delay).await;
                    self.take_more(&mut batch, &mut stamp);
                }
                let frames = batch.len() as u64;
                match write_all(&mut io, &mut batch).await {
                    Ok((bytes, writes)) => metrics.sent(frames, writes, bytes as u64),
                    Err(_) => break,
                }
                if flush && io.flush().await.is_err() {
                    break;
                }
                if let Some(queued) = stamp.take() {
                    metrics.queue_write_took(queued.elapsed());
                }
                if self.writer_done() {
                    // The close frame was in this batch.
                    let _ = io.shutdown().await;
                    break;
                }
                // Give back a large batch buffer after a burst, so idle connections stay small.
                if batch.capacity() > 64 {
                    batch = VecDeque::new();
                }
            }
            self.finish();
        }
    }
}

/// The writer's side of a write half shared with direct pushers: writes wait for readiness
/// and then use the non-blocking `try_write`, which take `&self`.
struct SharedTcp(Arc<OwnedWriteHalf>);

impl SharedTcp {
    fn stream(&self) -> &TcpStream {
        (*self.0).as_ref()
    }

    /// Waits for write readiness and runs `write` (a `try_write`), again while it would block.
    fn poll_with(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&TcpStream) -> std::io::Result<usize>,
    ) -> Poll<std::io::Result<usize>> {
        let s = self.stream();
        loop {
            ready!(s.poll_write_ready(cx))?;
            match write(s) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.poll_with(cx, |s| s.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_with(cx, |s| s.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-closes the socket (after the close frame), as `OwnedWriteHalf` does.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(self.stream()).shutdown(std::net::Shutdown::Write))
    }
}

/// What the writer finds in the queue.
enum Take {
    /// Frames were moved into the batch (`true`), or the queue is finished (`false`).
    Batch(bool),
    /// Nothing queued.
    Empty,
    /// Frames that may wait until then.
    Wait(Instant),
}

/// Most slices handed to one `writev` (Linux accepts 1024; 64 frames are plenty per call).
const MAX_SLICES: usize = 64;

/// Writes every frame in `batch`, up to [`MAX_SLICES`] per `writev`; returns the bytes written
/// and the number of writes. A lone frame (the usual case at moderate rates) is written
/// without building a slice list.
async fn write_all<W: AsyncWrite + Unpin>(io: &mut W, batch: &mut VecDeque<Bytes>) -> std::io::Result<(usize, u64)> {
    let mut total = 0;
    let mut writes = 0;
    while let Some(front) = batch.front() {
        let mut n = if batch.len() == 1 {
            io.write(front).await?
        } else {
            let slices: Vec<IoSlice<'_>> = batch.iter().take(MAX_SLICES).map(|b| IoSlice::new(b)).collect();
            io.write_vectored(&slices).await?
        };
        writes += 1;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        total += n;
        while n > 0 {
            let Some(front) = batch.front_mut() else { break };
            if n >= front.len() {
                n -= front.len();
                batch.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
    Ok((total, writes))
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Clock reads by [`clock`] on this thread.
        pub(super) static CLOCK_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn only_one_batch_in_sample_every_reads_the_clock() {
        let o = Outbox::new(1 << 20, SendMode::PLAIN);
        let before = CLOCK_READS.with(std::cell::Cell::get);
        let (mut batch, mut stamped) = (VecDeque::new(), 0);
        let batches = 100 * u64::from(SAMPLE_EVERY);
        for _ in 0..batches {
            // The second frame joins a batch already started: never a clock read.
            o.push(Bytes::from_static(b"a")).expect("queue");
            o.push(Bytes::from_static(b"b")).expect("queue");
            let mut stamp = None;
            assert_eq!(o.try_take(&mut batch, &mut stamp), Some(true));
            assert_eq!(batch.len(), 2);
            stamped += u64::from(stamp.is_some());
            batch.clear();
        }
        let reads = CLOCK_READS.with(std::cell::Cell::get) - before;
        assert_eq!(stamped, 100, "one batch in {SAMPLE_EVERY} carries a time");
        assert_eq!(reads, 100, "{reads} clock reads for {} frames", 2 * batches);
    }

    #[test]
    fn a_discarded_batch_takes_its_stamp_along() {
        let o = Outbox::new(1 << 20, SendMode::PLAIN);
        let mut batch = VecDeque::new();
        // Find the batch that is sampled, then throw it away with a close.
        loop {
            o.push(Bytes::from_static(b"a")).expect("queue");
            if o.lock().stamp.is_some() {
                break;
            }
            let mut stamp = None;
            o.try_take(&mut batch, &mut stamp);
            batch.clear();
        }
        o.close_now(None);
        let mut stamp = None;
        assert_eq!(o.try_take(&mut batch, &mut stamp), Some(true));
        assert_eq!(batch.len(), 1, "only the close frame");
        assert_eq!(stamp, None, "the dropped frames' time is not the close frame's");
    }

    #[test]
    fn a_prepared_message_is_compressed_once_and_shared() {
        let p = Prepared::text(Bytes::from("x".repeat(1000)));
        let mode = SendMode { deflate_bits: Some(15), threshold: 10, level: 6 };
        let a = p.frame_for(&mode);
        let b = p.frame_for(&mode);
        assert_eq!(a.as_ptr(), b.as_ptr(), "same bytes, not a second compression");
        assert_eq!(a[0] & 0x40, 0x40, "RSV1 set");
        assert!(a.len() < 100);
        let plain = p.frame_for(&SendMode::PLAIN);
        assert_eq!(plain.len(), p.plain_len());
        assert_eq!(plain[0], 0x81);
    }

    #[test]
    fn small_or_incompressible_messages_go_plain() {
        let mode = SendMode { deflate_bits: Some(15), threshold: 100, level: 6 };
        let small = Prepared::text(Bytes::from_static(b"hello"));
        assert_eq!(small.frame_for(&mode)[0], 0x81);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let noise: Vec<u8> = (0..400)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let p = Prepared::binary(Bytes::from(noise));
        assert_eq!(p.frame_for(&mode)[0], 0x82);
    }

    /// Direct writes from a fan-out thread, queued pushes from another, and the writer task on
    /// one socket whose reader keeps stalling (so writes go partial and would block): every
    /// frame arrives whole, each pusher's in its order, nothing lost or interleaved.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_writes_and_the_writer_never_lose_or_interleave_frames() {
        use tokio::io::AsyncReadExt;
        const EACH: u32 = 100_000;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (_read, write) = server.into_split();
        let outbox = Outbox::new(1 << 30, SendMode::PLAIN);
        let writer = outbox.clone().spawn_writer(WriteHalf::Tcp(write), Duration::ZERO, WsMetrics::new());
        let pusher = |tag: u8, direct: bool| {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let text = format!("{}{i:09}", tag as char);
                    let frame = frame::encode(true, false, OpCode::Text, text.as_bytes(), None);
                    outbox.push_within_direct(frame, Duration::ZERO, direct).expect("queued");
                    if i % 1000 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let (a, b) = (pusher(b'a', true), pusher(b'b', false));
        let mut next = [0u32; 2];
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 4096];
        let mut reads = 0u64;
        while next != [EACH, EACH] {
            let n = client.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the stream ended early at {next:?}");
            buf.extend_from_slice(&chunk[..n]);
            reads += 1;
            if reads % 64 == 0 {
                // Stall now and then, so the server's socket buffer fills up.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut at = 0;
            while buf.len() - at >= 12 {
                assert_eq!(&buf[at..at + 2], b"\x81\x0a", "a whole text frame at byte {at}");
                let body = &buf[at + 2..at + 12];
                let which = usize::from(body[0] - b'a');
                let i: u32 = std::str::from_utf8(&body[1..]).expect("digits").parse().expect("a number");
                assert_eq!(i, next[which], "pusher {} in order", body[0] as char);
                next[which] += 1;
                at += 12;
            }
            buf.drain(..at);
        }
        a.join().expect("pusher a");
        b.join().expect("pusher b");
        outbox.close(None);
        assert!(outbox.lock().direct.is_none(), "a closing outbox holds no socket");
        writer.await.expect("writer");
    }

    /// Frames and writes counted by a writer with `delay`: one frame queued, taken by the
    /// writer, then four more queued while it waits.
    async fn writes_for(delay: Duration) -> (u64, u64) {
        use metrics_exporter_prometheus::PrometheusBuilder;
        use tokio::io::AsyncReadExt;
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let metrics = metrics::with_local_recorder(&recorder, super::super::WsMetrics::new);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (_read, write) = server.into_split();
        let outbox = Outbox::new(1 << 20, SendMode::PLAIN);
        let writer = outbox.clone().spawn_writer(WriteHalf::Tcp(write), delay, metrics);
        outbox.send_text(Bytes::from_static(b"1")).expect("queue");
        while outbox.queued_bytes() > 0 {
            tokio::task::yield_now().await;
        }
        for text in ["2", "3", "4", "5"] {
            outbox.send_text(Bytes::from(text)).expect("queue");
        }
        let mut got = [0u8; 15];
        client.read_exact(&mut got).await.expect("five frames");
        assert_eq!(&got, b"\x81\x011\x81\x012\x81\x013\x81\x014\x81\x015", "in order");
        outbox.close(None);
        writer.await.expect("writer");
        let text = handle.render();
        let value = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
        };
        // The close frame is one more frame and one more write.
        (value("herald_frames_sent_total") - 1, value("herald_writes_total") - 1)
    }

    #[tokio::test]
    async fn the_writer_times_one_batch_in_sample_every_from_queue_to_socket() {
        use metrics_exporter_prometheus::PrometheusBuilder;
        use tokio::io::AsyncReadExt;
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let metrics = metrics::with_local_recorder(&recorder, super::super::WsMetrics::new);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (_read, write) = server.into_split();
        let outbox = Outbox::new(1 << 20, SendMode::PLAIN);
        let writer = outbox.clone().spawn_writer(WriteHalf::Tcp(write), Duration::ZERO, metrics);
        let batches = 2 * SAMPLE_EVERY as usize;
        for _ in 0..batches {
            outbox.send_text(Bytes::from_static(b"1")).expect("queue");
            // Taken by the writer: the next frame starts a new batch.
            while outbox.queued_bytes() > 0 {
                tokio::task::yield_now().await;
            }
        }
        let mut got = vec![0u8; 3 * batches];
        client.read_exact(&mut got).await.expect("every frame");
        outbox.close(None);
        writer.await.expect("writer");
        let text = handle.render();
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix("herald_queue_write_seconds_count ")?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no herald_queue_write_seconds in\n{text}"));
        assert_eq!(count, 2, "{batches} batches, one in {SAMPLE_EVERY} timed");
    }

    #[tokio::test]
    async fn a_write_delay_merges_what_is_queued_meanwhile_into_one_write() {
        assert_eq!(writes_for(Duration::from_secs(2)).await, (5, 1));
        let (frames, writes) = writes_for(Duration::ZERO).await;
        assert_eq!(frames, 5);
        assert!(writes >= 2, "without a delay the first frame goes out alone ({writes} writes)");
    }

    /// Frames and writes when frames are queued with per-frame delays (a namespace's
    /// `write_delay`) on a connection without a global one.
    async fn writes_for_delays(delays: &[u64]) -> (u64, u64) {
        use metrics_exporter_prometheus::PrometheusBuilder;
        use tokio::io::AsyncReadExt;
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let metrics = metrics::with_local_recorder(&recorder, super::super::WsMetrics::new);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (_read, write) = server.into_split();
        let outbox = Outbox::new(1 << 20, SendMode::PLAIN);
        let writer = outbox.clone().spawn_writer(WriteHalf::Tcp(write), Duration::ZERO, metrics);
        for (i, ms) in delays.iter().enumerate() {
            let text = Bytes::from(((b'a' + i as u8) as char).to_string());
            outbox.send_prepared_within(&Prepared::text(text), Duration::from_millis(*ms)).expect("queue");
            tokio::task::yield_now().await;
        }
        let mut got = vec![0u8; 3 * delays.len()];
        client.read_exact(&mut got).await.expect("every frame");
        let expected: Vec<u8> = (0..delays.len()).flat_map(|i| [0x81, 1, b'a' + i as u8]).collect();
        assert_eq!(got, expected, "in order");
        outbox.close(None);
        writer.await.expect("writer");
        let text = handle.render();
        let value = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
        };
        (value("herald_frames_sent_total") - 1, value("herald_writes_total") - 1)
    }

    #[tokio::test]
    async fn delayed_frames_share_one_write_and_an_immediate_one_takes_them_along() {
        // Five frames that may wait long: one write when the first deadline is due.
        assert_eq!(writes_for_delays(&[300, 300, 300, 300, 300]).await, (5, 1));
        // Four that may wait, then one that may not: it goes at once with the four.
        assert_eq!(writes_for_delays(&[60_000, 60_000, 60_000, 60_000, 0]).await, (5, 1));
        // Without delays each frame is written as it comes (the writer is idle in between).
        let (frames, writes) = writes_for_delays(&[0, 0, 0, 0, 0]).await;
        assert_eq!(frames, 5);
        assert!(writes >= 2, "{writes} writes");
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_close_is_final() {
        let o = Outbox::new(100, SendMode::PLAIN);
        // A single frame larger than the limit is accepted into an empty queue.
        assert_eq!(o.push(Bytes::from(vec![0; 150])), Ok(()));
        assert_eq!(o.push(Bytes::from(vec![0; 1])), Err(SendError::Full));
        assert!(o.close_now(None));
        assert_eq!(o.queued_bytes(), 2, "pending frames dropped, close frame queued");
        assert!(!o.close(None));
        assert_eq!(o.push(Bytes::from_static(b"x")), Err(SendError::Closed));
    }
}
