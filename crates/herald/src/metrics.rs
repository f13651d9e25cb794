//! The Prometheus recorder: installed once per process, rendered by `GET /metrics`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Handshake durations: sub-millisecond on loopback, seconds on a bad mobile network.
const HANDSHAKE_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Times inside the server of a push: tens of microseconds for a small channel, tens of
/// milliseconds for a fan-out to 10,000 subscribers, seconds only when something is wrong.
const PUSH_BUCKETS: &[f64] =
    &[0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// How often recorded histogram samples are folded into their buckets when nobody scrapes
/// `/metrics` (the exporter keeps each sample until then).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder on first call and returns its handle. `None` when another
/// recorder was installed first (an embedding application's); Herald then records into it.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("herald_handshake_seconds".into()), HANDSHAKE_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full("herald_publish_queue_seconds".into()), PUSH_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full("herald_queue_write_seconds".into()), PUSH_BUCKETS)
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            let upkeep = handle.clone();
            // Without it, a server nobody scrapes would keep every sample in memory. A thread,
            // not a task: the recorder outlives any one runtime (tests start many).
            let spawned = std::thread::Builder::new().name("herald-metrics".into()).spawn(move || loop {
                #[allow(clippy::disallowed_methods)] // the metrics upkeep thread, not a runtime worker
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no metrics upkeep thread: histograms are folded only when scraped");
            }
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("herald_connections", "Open client connections, by transport.");
    describe_histogram!(
        "herald_handshake_seconds",
        Unit::Seconds,
        "Time from accepting a TCP connection to completing its WebSocket upgrade."
    );
    describe_histogram!(
        "herald_publish_queue_seconds",
        Unit::Seconds,
        "Time from the engine handing a publication to this node (memory: as it is stored; Redis: as it \
         arrives from pub/sub) to its frame being queued for every local subscriber. Publications to \
         channels without local subscribers are not counted."
    );
    describe_histogram!(
        "herald_queue_write_seconds",
        Unit::Seconds,
        "Time from a frame being queued for a WebSocket connection to it being written to the socket, \
         sampled: one batch of frames in 64 per connection, timed from its first (oldest) frame."
    );
    describe_counter!("herald_frames_received_total", "WebSocket frames received from clients.");
    describe_counter!("herald_frames_sent_total", "WebSocket frames written to clients.");
    describe_counter!(
        "herald_writes_total",
        "Write system calls to WebSocket clients; frames sent / writes = frames merged per write."
    );
    describe_counter!("herald_bytes_in_total", Unit::Bytes, "Bytes read from WebSocket clients.");
    describe_counter!("herald_bytes_out_total", Unit::Bytes, "Bytes written to WebSocket clients.");
    describe_counter!("herald_publications_total", "Publications accepted, from the API and from clients.");
    describe_counter!(
        "herald_recoveries_total",
        "Subscriptions that asked to recover from a position (native recover, SSE Last-Event-ID), by result: \
         recovered, or not_recovered (epoch changed, or the gap left history)."
    );
    describe_counter!(
        "herald_wrong_endpoint_total",
        "WebSockets opened on a path that is not a WebSocket endpoint, closed with 4504."
    );
    describe_counter!(
        "herald_slow_consumers_total",
        "Connections closed because their outgoing queue overflowed (close 4001): subscribers that \
         fall behind, and clients that send commands without reading their replies."
    );
    describe_counter!(
        "herald_conflated_total",
        "Publications skipped for a subscriber of a conflated namespace because a newer one was sent \
         instead (one per subscriber per skipped publication)."
    );
    describe_counter!(
        "herald_conflated_behind_total",
        "Flushes of a conflated channel that found a subscriber's queue full: it gets the newest later \
         instead of being disconnected."
    );
    describe_counter!(
        "herald_limit_refusals_total",
        "Commands, publications and connects refused by a limit (limit: commands_per_second, \
         publications_per_second, max_connections_per_user, max_channels, max_history_bytes)."
    );
    describe_counter!(
        "herald_limit_disconnects_total",
        "Connections closed for exceeding a limit (limit: max_refusals, close 4006)."
    );
    describe_gauge!("herald_stored_channels", "Channels the engine keeps a position or history for.");
    describe_gauge!("herald_history_bytes", Unit::Bytes, "Bytes of publications kept in history.");
    describe_gauge!("herald_subscriptions", "Subscriptions of every connection on this node.");
    describe_counter!(
        "herald_connections_refused_total",
        "TCP connections refused by a limit (reason: max_connections, max_connections_per_ip)."
    );
    describe_counter!(
        "herald_http_refused_total",
        "HTTP requests refused at the edge (reason: origin, header_too_large, header_timeout, body_too_large, \
         body_timeout)."
    );
    describe_counter!("herald_tls_handshake_failures_total", "TLS handshakes that failed or timed out.");
    describe_counter!("herald_tls_reloads_total", "Certificate reloads on SIGHUP (result: ok, failed).");
    describe_counter!(
        "herald_webhook_requests_total",
        "Webhook requests sent, by result: ok (2xx), status (another status), network, timeout."
    );
    describe_counter!(
        "herald_webhook_failures_total",
        "Webhook events given up after webhooks.max_attempts or webhooks.max_age (or at the shutdown bound)."
    );
    describe_counter!(
        "herald_webhook_dropped_total",
        "Webhook events dropped before being sent (reason: queue_full, shutdown)."
    );
    describe_gauge!("herald_webhook_queue", "Webhook events waiting to be sent, over every endpoint.");
}
