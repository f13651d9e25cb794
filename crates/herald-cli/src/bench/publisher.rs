//! The publisher: HTTP/1.1 `POST`s pipelined over a few keep-alive connections, written and
//! read with a plain `TcpStream` (in TLS for https://) so the publisher is not what limits a
//! run.
//!
//! A connection owns a fixed list of channels and publishes to them in turn, so the k-th
//! request (and the k-th response, HTTP/1.1 answers in order) of a connection is for channel
//! `channels[k % len]` with seq `k / len`: no bookkeeping per request.
//!
//! At a fixed rate the schedule is open-loop: request k is due at `start + k / rate` and its
//! payload carries that time, not the time it was written. A publisher held back by a slow
//! server writes late but keeps the due times, so the stall shows up as latency instead of
//! vanishing (coordinated omission); what was due but never written is counted as unsent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};

use herald_client::rustls;

use super::hist::AtomicHistogram;
use super::{now_ns, payload, Target};

/// Requests written at once.
const BATCH: u64 = 64;
/// Requests awaiting their response, per connection.
const WINDOW: usize = 512;

/// How fast to publish.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pace {
    /// Publications per second per channel.
    Rate(f64),
    /// As fast as the server takes them, while each channel's subscribers lag behind by at
    /// most this many messages on average (so the run measures what the whole path sustains,
    /// not a growing queue). Each publisher connection watches only its own channels, so none
    /// is starved by the others.
    Max { lag: u64 },
}

/// When a run publishes: `start` and `end` of the schedule, and `start` as nanoseconds since
/// the Unix epoch (the clock the subscribers subtract from).
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    pub(super) start: Instant,
    pub(super) start_ns: u64,
    /// Responses to requests written from here on are timed (`Shared::api`).
    pub(super) measure_from: Instant,
    pub(super) end: Instant,
}

/// An open-loop schedule: `rate` requests per second on one connection, request `k` due
/// `k / rate` after the start whatever happened to the ones before.
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    rate: f64,
}

impl Schedule {
    pub(super) fn new(rate: f64) -> Self {
        Self { rate }
    }

    /// When request `k` is due, after the start.
    pub(super) fn due(&self, k: u64) -> Duration {
        Duration::from_secs_f64(k as f64 / self.rate)
    }

    /// How many requests are due `elapsed` after the start (those with `due(k) <= elapsed`).
    pub(super) fn due_by(&self, elapsed: Duration) -> u64 {
        (elapsed.as_secs_f64() * self.rate).floor() as u64 + 1
    }

    /// How many requests the schedule holds before `length` (those with `due(k) < length`).
    pub(super) fn total(&self, length: Duration) -> u64 {
        (length.as_secs_f64() * self.rate).ceil() as u64
    }
}

/// When each written request went out, by batches, so its response can be timed: requests
/// `..end` of a batch were written at one instant. Responses come in request order.
#[derive(Debug, Default)]
pub(super) struct SendTimes {
    batches: VecDeque<(u64, Instant)>,
}

impl SendTimes {
    /// Requests up to (not including) `end` were written at `at`.
    pub(super) fn sent(&mut self, end: u64, at: Instant) {
        self.batches.push_back((end, at));
    }

    /// When request `k` was written; forgets the batches before it. `None` for a request not
    /// written (a response the server sent on its own).
    pub(super) fn answered(&mut self, k: u64) -> Option<Instant> {
        while self.batches.front().is_some_and(|&(end, _)| end <= k) {
            self.batches.pop_front();
        }
        self.batches.front().map(|&(_, at)| at)
    }
}

/// Counters shared by publishers, subscribers and the progress line.
#[derive(Debug)]
pub(super) struct Shared {
    /// Deliveries seen by subscribers, per channel.
    pub(super) delivered: Vec<AtomicU64>,
    /// Publications accepted (2xx), per channel.
    pub(super) accepted: Vec<AtomicU64>,
    /// Publications written, per channel.
    sent: Vec<AtomicU64>,
    /// Subscribers per channel (for the `Max` backlog).
    pub(super) subscribers: Vec<u64>,
    pub(super) errors: AtomicU64,
    pub(super) first_error: std::sync::Mutex<Option<String>>,
    /// Publish round trips (request written → response read), ns, after the warm-up.
    pub(super) api: AtomicHistogram,
    /// Requests due in the schedule but never written: the server held the publisher back
    /// (or this machine could not keep up) until the end.
    pub(super) unsent: AtomicU64,
    /// The latest a request was written after its due time, ns.
    pub(super) behind_max_ns: AtomicU64,
}

impl Shared {
    pub(super) fn new(subscribers: Vec<u64>) -> Self {
        Self {
            delivered: subscribers.iter().map(|_| AtomicU64::new(0)).collect(),
            accepted: subscribers.iter().map(|_| AtomicU64::new(0)).collect(),
            sent: subscribers.iter().map(|_| AtomicU64::new(0)).collect(),
            subscribers,
            errors: AtomicU64::new(0),
            first_error: std::sync::Mutex::new(None),
            api: AtomicHistogram::new(),
            unsent: AtomicU64::new(0),
            behind_max_ns: AtomicU64::new(0),
        }
    }

    pub(super) fn accepted_total(&self) -> u64 {
        self.accepted.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    pub(super) fn delivered_total(&self) -> u64 {
        self.delivered.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// Deliveries owed on `channels` for everything written to them so far (answered or not).
    fn backlog(&self, channels: &[usize]) -> u64 {
        channels
            .iter()
            .map(|&c| {
                let owed = self.sent[c].load(Ordering::Relaxed) * self.subscribers[c];
                owed.saturating_sub(self.delivered[c].load(Ordering::Relaxed))
            })
            .sum()
    }

    fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert(message);
        }
    }
}

/// Publishes to `channels` (indexes into `names`) from `plan.start` until `plan.end`, then
/// waits (up to 10 s) for the last responses.
pub(super) async fn run(
    target: &Target,
    names: &[String],
    channels: Vec<usize>,
    pace: Pace,
    payload_size: usize,
    plan: Plan,
    shared: &Shared,
) -> anyhow::Result<()> {
    let (addr, tls) = target.publish_endpoint();
    let mut stream =
        TcpStream::connect(addr).await.with_context(|| format!("cannot connect the publisher to {addr}"))?;
    stream.set_nodelay(true)?;
    let Some((config, name)) = tls else {
        let (read, write) = stream.split();
        return publish(read, write, target, names, channels, pace, payload_size, plan, shared).await;
    };
    let name = rustls::pki_types::ServerName::try_from(name.to_owned())
        .with_context(|| format!("`{name}` is not a host name TLS can check"))?;
    let stream = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, stream)
        .await
        .with_context(|| format!("TLS with the publish endpoint {addr} failed"))?;
    let (read, write) = tokio::io::split(stream);
    publish(read, write, target, names, channels, pace, payload_size, plan, shared).await
}

/// [`run`] on one connection, plain or TLS.
#[allow(clippy::too_many_arguments)]
async fn publish(
    read: impl AsyncRead + Unpin,
    write: impl AsyncWrite + Unpin,
    target: &Target,
    names: &[String],
    channels: Vec<usize>,
    pace: Pace,
    payload_size: usize,
    plan: Plan,
    shared: &Shared,
) -> anyhow::Result<()> {
    let window = Semaphore::new(WINDOW);
    let sent = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let wake = Notify::new();
    let times = Mutex::new(SendTimes::default());
    let link = Link { window: &window, sent: &sent, times: &times };
    let writer = write_requests(write, target, names, &channels, pace, payload_size, plan, shared, &link);
    let writer = async {
        let r = writer.await;
        done.store(true, Ordering::Release);
        wake.notify_one();
        r
    };
    let reader = read_responses(read, &channels, shared, &link, plan.measure_from, &done, &wake);
    let reader = async { tokio::time::timeout_at((plan.end + Duration::from_secs(10)).into(), reader).await };
    let (w, r) = tokio::join!(writer, reader);
    w?;
    r.context("the server did not answer every publish in time")?
}

/// What the writer and the reader of one publisher connection share.
struct Link<'a> {
    /// Requests awaiting their response.
    window: &'a Semaphore,
    /// Requests written.
    sent: &'a AtomicU64,
    times: &'a Mutex<SendTimes>,
}

#[allow(clippy::too_many_arguments)]
async fn write_requests(
    mut write: impl AsyncWrite + Unpin,
    target: &Target,
    names: &[String],
    channels: &[usize],
    pace: Pace,
    payload_size: usize,
    plan: Plan,
    shared: &Shared,
    link: &Link<'_>,
) -> anyhow::Result<()> {
    let Plan { start, start_ns, end, .. } = plan;
    let schedule = match pace {
        Pace::Rate(r) => Some(Schedule::new(r * channels.len() as f64)),
        Pace::Max { .. } => None,
    };
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut body = Vec::with_capacity(payload_size + 64);
    let mut k: u64 = 0;
    // Whatever the schedule held that was not written by the end.
    let unsent = |k: u64| {
        if let Some(s) = schedule {
            shared.unsent.fetch_add(s.total(end - start).saturating_sub(k), Ordering::Relaxed);
        }
    };
    loop {
        let now = Instant::now();
        if now >= end {
            unsent(k);
            return Ok(());
        }
        let want = match pace {
            Pace::Rate(r) => {
                let schedule = Schedule::new(r * channels.len() as f64);
                let due = schedule.due_by(now.saturating_duration_since(start));
                if now < start || due <= k {
                    // The timer's resolution is 1 ms; a late wake-up is made up by a batch.
                    tokio::time::sleep_until((start + schedule.due(k)).min(end).into()).await;
                    continue;
                }
                (due - k).min(BATCH)
            }
            Pace::Max { lag } => {
                if shared.backlog(channels) > lag * channels.iter().map(|&c| shared.subscribers[c]).sum::<u64>() {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                    continue;
                }
                BATCH
            }
        };
        let n = (link.window.available_permits() as u64).clamp(1, want);
        match tokio::time::timeout_at(end.into(), link.window.acquire_many(n as u32)).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => {
                unsent(k);
                return Ok(());
            }
        }
        buf.clear();
        let written_ns = now_ns();
        for _ in 0..n {
            let ch = channels[(k % channels.len() as u64) as usize];
            let seq = k / channels.len() as u64;
            // The due time, or (as fast as possible: no schedule) the time of writing.
            let ts = schedule.map_or(written_ns, |s| start_ns + s.due(k).as_nanos() as u64);
            shared.behind_max_ns.fetch_max(written_ns.saturating_sub(ts), Ordering::Relaxed);
            body.clear();
            payload(&mut body, seq, ts, payload_size);
            target.publish_request(&mut buf, &names[ch], &body);
            shared.sent[ch].fetch_add(1, Ordering::Relaxed);
            k += 1;
        }
        // Before the write: a server too slow to read is part of the round trip.
        link.times.lock().unwrap_or_else(|e| e.into_inner()).sent(k, Instant::now());
        write.write_all(&buf).await.context("the publisher's connection failed")?;
        link.sent.store(k, Ordering::Release);
    }
}

async fn read_responses(
    mut read: impl AsyncRead + Unpin,
    channels: &[usize],
    shared: &Shared,
    link: &Link<'_>,
    measure_from: Instant,
    done: &AtomicBool,
    wake: &Notify,
) -> anyhow::Result<()> {
    let (window, sent) = (link.window, link.sent);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut start = 0;
    let mut k: u64 = 0;
    loop {
        if done.load(Ordering::Acquire) && k >= sent.load(Ordering::Acquire) {
            return Ok(());
        }
        if buf.len() == buf.capacity() {
            buf.drain(..start);
            start = 0;
            if buf.len() == buf.capacity() {
                buf.reserve(buf.capacity());
            }
        }
        let len = buf.len();
        buf.resize(buf.capacity(), 0);
        let got = tokio::select! {
            r = read.read(&mut buf[len..]) => r,
            () = wake.notified() => { buf.truncate(len); continue; }
        };
        let n = got.context("reading the publisher's responses")?;
        buf.truncate(len + n);
        if n == 0 {
            anyhow::bail!("the server closed the publisher's connection after {k} responses");
        }
        let now = Instant::now();
        while let Some(response) = parse_response(&buf[start..])? {
            let ch = channels[(k % channels.len() as u64) as usize];
            let written = link.times.lock().unwrap_or_else(|e| e.into_inner()).answered(k);
            if let Some(at) = written.filter(|&at| at >= measure_from) {
                shared.api.record(now.saturating_duration_since(at).as_nanos() as u64);
            }
            if (200..300).contains(&response.status) {
                shared.accepted[ch].fetch_add(1, Ordering::Relaxed);
            } else {
                let body = String::from_utf8_lossy(&buf[start + response.body.0..start + response.body.1]);
                shared.error(format!("HTTP {}: {}", response.status, body.trim()));
            }
            start += response.len;
            k += 1;
            window.add_permits(1);
        }
        if start == buf.len() {
            buf.clear();
            start = 0;
        }
    }
}

/// One complete HTTP/1.1 response at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    /// Its whole length in the buffer.
    len: usize,
    /// Where its body is (for Content-Length bodies; chunked ones are not kept).
    body: (usize, usize),
}

/// `Ok(None)` until the whole response is in `buf`.
fn parse_response(buf: &[u8]) -> anyhow::Result<Option<Response>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        anyhow::ensure!(buf.len() < 64 * 1024, "an HTTP response head over 64 KiB");
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("a response head that is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("not an HTTP status line: `{status_line}`"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().with_context(|| format!("bad Content-Length `{value}`"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let body_start = head_end + 4;
    if chunked {
        return Ok(chunked_end(buf, body_start)?.map(|len| Response { status, len, body: (body_start, body_start) }));
    }
    let length = match (length, status) {
        (Some(n), _) => n,
        (None, 204 | 304) | (None, 100..=199) => 0,
        (None, _) => anyhow::bail!("an HTTP response without Content-Length (HTTP {status}) cannot be pipelined"),
    };
    if buf.len() < body_start + length {
        return Ok(None);
    }
    Ok(Some(Response { status, len: body_start + length, body: (body_start, body_start + length) }))
}

/// The end of a chunked body that starts at `at`, once all of it is in `buf`.
fn chunked_end(buf: &[u8], mut at: usize) -> anyhow::Result<Option<usize>> {
    loop {
        let Some(line_end) = find(&buf[at..], b"\r\n") else { return Ok(None) };
        let line = std::str::from_utf8(&buf[at..at + line_end]).context("a chunk size that is not UTF-8")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).with_context(|| format!("bad chunk size `{line}`"))?;
        at += line_end + 2;
        if size == 0 {
            // No trailers expected: the terminating empty line.
            return Ok((buf.len() >= at + 2).then_some(at + 2));
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        at += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_responses_back_to_back() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig";
        let first = parse_response(two).expect("ok").expect("complete");
        assert_eq!(first, Response { status: 200, len: 40, body: (38, 40) });
        let second = parse_response(&two[first.len..]).expect("ok").expect("complete");
        assert_eq!(second.status, 413);
        assert_eq!(&two[first.len + second.body.0..first.len + second.body.1], b"big");
        // Any prefix is incomplete, never an error.
        for cut in 0..first.len {
            assert_eq!(parse_response(&two[..cut]).expect("ok"), None, "cut at {cut}");
        }
    }

    #[test]
    fn chunked_responses() {
        let r = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nHTTP/1.1";
        let parsed = parse_response(r).expect("ok").expect("complete");
        assert_eq!(parsed.status, 201);
        assert_eq!(parsed.len, r.len() - "HTTP/1.1".len());
        for cut in 0..parsed.len {
            assert_eq!(parse_response(&r[..cut]).expect("ok"), None, "cut at {cut}");
        }
    }

    #[test]
    fn the_schedule_is_open_loop() {
        // 4 requests per second: due at 0, 250, 500, 750 ms, ...
        let s = Schedule::new(4.0);
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(3), Duration::from_millis(750));
        assert_eq!(s.due_by(Duration::ZERO), 1);
        assert_eq!(s.due_by(Duration::from_millis(749)), 3);
        assert_eq!(s.due_by(Duration::from_millis(750)), 4);
        // A writer that stalled for 2 s owes everything due meanwhile, each with its own due
        // time: the stall is in the stamps, not forgiven.
        assert_eq!(s.due_by(Duration::from_millis(2_000)) - 1, 8);
        assert_eq!(s.due(8), Duration::from_secs(2));
        // 10 s hold 40 requests (0 to 9.75 s); 1.1 s hold 5.
        assert_eq!(s.total(Duration::from_secs(10)), 40);
        assert_eq!(s.total(Duration::from_millis(1100)), 5);
        for k in 0..1000 {
            assert!(s.due(k) < Duration::from_secs(250) || k >= s.total(Duration::from_secs(250)));
            assert_eq!(s.due_by(s.due(k)), k + 1, "request {k} is due at its own time");
        }
    }

    #[test]
    fn each_response_is_timed_from_the_write_of_its_request() {
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_millis(1), t0 + Duration::from_millis(2));
        let mut times = SendTimes::default();
        times.sent(3, t0); // requests 0, 1, 2
        times.sent(4, t1); // 3
        times.sent(10, t2); // 4 to 9
        assert_eq!(times.answered(0), Some(t0));
        assert_eq!(times.answered(2), Some(t0));
        assert_eq!(times.answered(3), Some(t1));
        assert_eq!(times.answered(9), Some(t2));
        assert_eq!(times.answered(10), None, "never written");
        assert!(times.batches.is_empty(), "answered batches are forgotten");
    }

    #[test]
    fn nonsense_is_an_error() {
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
