//! The pub/sub link: one connection per node, subscribed to the channels with local
//! subscribers, reconnected with jittered backoff; and the delivery task that hands its
//! messages to the node in order and fills gaps from the streams.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::engine::{lock, Cmd, Inner};

/// How often the pub/sub link is pinged, to notice a silent network failure.
pub(super) const PING_EVERY: Duration = Duration::from_secs(2);

/// The delivery task: hands the link's messages to the node in order, and reads back from
/// the streams what the link may have missed (`dirty`). The only caller of `handle` and
/// `catch_up`, so a channel's deliveries keep one order.
pub(super) async fn deliver_loop(
    inner: Arc<Inner>,
    mut work: mpsc::UnboundedReceiver<redis::Msg>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            msg = work.recv() => match msg {
                Some(m) => {
                    inner.queued_bytes.fetch_sub(msg_bytes(&m), Ordering::Relaxed);
                    inner.handle(m).await;
                }
                None => return,
            },
            () = inner.wake.notified() => {}
        }
        let dirty: Vec<String> = lock(&inner.dirty).drain().collect();
        for c in dirty {
            inner.catch_up(&c).await;
        }
    }
}

pub(super) fn msg_bytes(m: &redis::Msg) -> usize {
    // The payload and channel name, plus what `Msg` holds around them.
    m.get_payload_bytes().len() + m.get_channel_name().len() + 64
}

/// How long the pub/sub link waits between attempts to reach Redis: exponential backoff with
/// decorrelated jitter. Each delay is drawn uniformly between `floor` and three times the
/// previous one, capped at `cap`: delays grow while Redis stays away, and nodes that lost
/// Redis at the same moment spread their reconnections out instead of arriving together
/// when it comes back.
#[derive(Debug, Clone, Copy)]
pub(super) struct Backoff {
    floor: Duration,
    cap: Duration,
    last: Duration,
}

/// The least and the most the link waits before trying Redis again.
const RECONNECT_FLOOR: Duration = Duration::from_millis(50);
const RECONNECT_CAP: Duration = Duration::from_secs(1);

impl Backoff {
    pub(super) fn new(floor: Duration, cap: Duration) -> Self {
        let cap = cap.max(floor);
        Self { floor, cap, last: floor }
    }

    /// The next delay: uniform in `[floor, min(cap, 3 × previous)]`.
    pub(super) fn next(&mut self, rng: &mut impl rand::Rng) -> Duration {
        let floor = self.floor.as_nanos().min(u64::MAX as u128) as u64;
        let high = self.last.saturating_mul(3).min(self.cap).as_nanos().min(u64::MAX as u128) as u64;
        let d = Duration::from_nanos(rng.random_range(floor..=high.max(floor)));
        self.last = d;
        d
    }

    /// Redis answered: the next outage starts from the floor again.
    pub(super) fn reset(&mut self) {
        self.last = self.floor;
    }
}

/// A connected, subscribed pub/sub link, and the channels it subscribed to.
pub(super) type Linked = (redis::aio::PubSubSink, redis::aio::PubSubStream, Vec<String>);

/// Connects the pub/sub link and subscribes it to every channel this node listens to; why
/// not, when it cannot.
pub(super) async fn connect(inner: &Inner) -> Result<Linked, String> {
    let pubsub = match tokio::time::timeout(inner.timeout, inner.client.get_async_pubsub()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(format!("cannot connect: {e}")),
        Err(_) => return Err(format!("no answer within {:?}", inner.timeout)),
    };
    let (mut sink, stream) = pubsub.split();
    let wanted: Vec<String> = lock(&inner.listening).keys().cloned().collect();
    for chunk in wanted.chunks(256) {
        let names: Vec<String> = chunk.iter().map(|c| inner.key(c, "pub")).collect();
        match tokio::time::timeout(inner.timeout, sink.subscribe(&names)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("cannot subscribe: {e}")),
            Err(_) => return Err(format!("SUBSCRIBE unanswered within {:?}", inner.timeout)),
        }
    }
    Ok((sink, stream, wanted))
}

/// The pub/sub link: one connection per node, subscribed to the channels with local
/// subscribers; reconnects (with jittered backoff, [`Backoff`]) and resubscribes, then fills
/// what it missed.
pub(super) async fn link(
    inner: Arc<Inner>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    work: mpsc::UnboundedSender<redis::Msg>,
    stop: CancellationToken,
) {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let mut backoff = Backoff::new(RECONNECT_FLOOR, RECONNECT_CAP);
    let mut was_up = false;
    // Warned about the current outage already (one warning per outage, not per retry).
    let mut warned = false;
    let mut first = true;
    loop {
        // The one retry path: every attempt but the very first waits its jittered delay, so
        // nodes that lost Redis together do not come back in lockstep.
        if !std::mem::replace(&mut first, false) {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next(&mut rng)) => {}
            }
        }
        let linked = tokio::select! {
            () = stop.cancelled() => return,
            r = connect(&inner) => r,
        };
        let (mut sink, mut stream, wanted) = match linked {
            Ok(l) => l,
            Err(why) => {
                if std::mem::replace(&mut warned, true) {
                    tracing::debug!(error = %why, "redis pub/sub link: still down");
                } else {
                    tracing::warn!(error = %why, "redis pub/sub link: down; retrying with backoff");
                }
                continue;
            }
        };
        backoff.reset();
        warned = false;
        if was_up || !wanted.is_empty() {
            tracing::info!(channels = wanted.len(), "redis pub/sub link up");
        }
        was_up = true;
        inner.link_up.store(true, Ordering::SeqCst);
        for c in &wanted {
            inner.set_up(c, true);
        }
        // What was published while the link was down is read back by the delivery task.
        lock(&inner.dirty).extend(wanted);
        inner.wake.notify_one();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                cmd = cmds.recv() => {
                    let done = match cmd {
                        None => return,
                        Some(Cmd::Subscribe(c)) if inner.wanted(&c) => {
                            let r = tokio::time::timeout(inner.timeout, sink.subscribe(inner.key(&c, "pub"))).await;
                            let ok = matches!(r, Ok(Ok(())));
                            if ok {
                                inner.set_up(&c, true);
                            }
                            ok
                        }
                        Some(Cmd::Unsubscribe(c)) if !inner.wanted(&c) => {
                            let r = tokio::time::timeout(inner.timeout, sink.unsubscribe(inner.key(&c, "pub"))).await;
                            matches!(r, Ok(Ok(())))
                        }
                        Some(_) => true,
                    };
                    if !done {
                        break;
                    }
                }
                msg = stream.next() => match msg {
                    Some(m) => inner.enqueue(m, &work),
                    None => break,
                },
                _ = ping.tick() => {
                    let r: Result<Result<redis::Value, _>, _> = tokio::time::timeout(inner.timeout, sink.ping()).await;
                    if !matches!(r, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        inner.link_up.store(false, Ordering::SeqCst);
        tracing::warn!("redis pub/sub link lost; reconnecting");
        metrics::counter!("herald_redis_link_losses_total").increment(1);
        for l in lock(&inner.listening).values() {
            l.up.send_replace(false);
        }
    }
}
