//! The Prometheus recorder: installed once per process, rendered by `GET /metrics`. Every
//! counter is there at 0 from the start (so `increase()` sees the first event), with the
//! standard `process_*` metrics, read when scraped, and `herald_build_info`.

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

/// Reads the `process_*` metrics (CPU, memory, file descriptors, threads) from the OS.
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// A counter's label and its values.
pub type Label = (&'static str, &'static [&'static str]);

/// Every counter Herald increments, with its label and that label's values where it has
/// one: registered at 0 when the recorder is installed. A unit test checks that every
/// `counter!` in the code is here, and `herald-cli`'s tests that docs/operations.md lists
/// no counter that `/metrics` lacks.
pub const COUNTERS: &[(&str, Option<Label>)] = &[
    ("herald_frames_received_total", None),
    ("herald_frames_sent_total", None),
    ("herald_writes_total", None),
    ("herald_bytes_in_total", None),
    ("herald_bytes_out_total", None),
    ("herald_publications_total", None),
    ("herald_recoveries_total", Some(("result", &["recovered", "not_recovered"]))),
    ("herald_wrong_endpoint_total", None),
    ("herald_slow_consumers_total", None),
    ("herald_conflated_total", None),
    ("herald_conflated_behind_total", None),
    (
        "herald_limit_refusals_total",
        Some((
            "limit",
            &[
                "commands_per_second",
                "publications_per_second",
                "max_connections_per_user",
                "max_channels",
                "max_history_bytes",
            ],
        )),
    ),
    ("herald_limit_disconnects_total", Some(("limit", &["max_refusals"]))),
    ("herald_connections_refused_total", Some(("reason", &["max_connections", "max_connections_per_ip"]))),
    (
        "herald_http_refused_total",
        Some(("reason", &["origin", "header_too_large", "header_timeout", "body_too_large", "body_timeout"])),
    ),
    ("herald_token_refusals_total", Some(("reason", TOKEN_REFUSALS))),
    ("herald_tls_handshake_failures_total", None),
    ("herald_tls_reloads_total", Some(("result", &["ok", "failed"]))),
    ("herald_config_reloads_total", Some(("result", &["ok", "failed"]))),
    ("herald_reload_unsubscribes_total", None),
    ("herald_webhook_requests_total", Some(("result", &["ok", "status", "network", "timeout"]))),
    ("herald_webhook_failures_total", None),
    ("herald_webhook_dropped_total", Some(("reason", &["queue_full", "shutdown"]))),
    ("herald_redis_link_losses_total", None),
    ("herald_redis_gaps_total", None),
    ("herald_redis_link_overflows_total", None),
    ("herald_lost_streams_total", None),
];

/// The `reason` values of `herald_token_refusals_total`.
const TOKEN_REFUSALS: &[&str] = &{
    let all = crate::auth::TokenRefusal::ALL;
    let mut out = [""; crate::auth::TokenRefusal::ALL.len()];
    let mut i = 0;
    while i < all.len() {
        out[i] = all[i].as_str();
        i += 1;
    }
    out
};

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
            register();
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

/// Renders `/metrics`: reads the process metrics first, folds the histograms.
pub fn render(handle: &PrometheusHandle) -> String {
    if let Some(process) = PROCESS.get() {
        process.collect();
    }
    handle.run_upkeep();
    handle.render()
}

/// Every counter at 0, the build's version, the process metrics' descriptions.
fn register() {
    for (name, label) in COUNTERS {
        match label {
            None => metrics::counter!(*name).absolute(0),
            Some((label, values)) => {
                for value in *values {
                    metrics::counter!(*name, *label => *value).absolute(0);
                }
            }
        }
    }
    metrics::gauge!("herald_build_info", "version" => crate::VERSION).set(1.0);
    let process = PROCESS.get_or_init(metrics_process::Collector::default);
    process.describe();
    process.collect();
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("herald_build_info", "Always 1; the `version` label is this build's (`herald version`).");
    describe_counter!(
        "herald_token_refusals_total",
        "Connection and subscription tokens refused (and Pusher channel signatures), by reason: expired, \
         not_yet_valid, malformed, bad_signature, algorithm, claims, audience, issuer, unknown_key, missing, \
         no_key, wrong_user, wrong_channel."
    );
    describe_counter!(
        "herald_redis_link_losses_total",
        "Times the pub/sub link to Redis dropped and was connected again."
    );
    describe_counter!(
        "herald_redis_gaps_total",
        "Publications that arrived from Redis out of sequence and were filled from history."
    );
    describe_counter!(
        "herald_redis_link_overflows_total",
        "Messages dropped at engine.redis.max_link_bytes, then read back from history."
    );
    describe_counter!(
        "herald_lost_streams_total",
        "Channels whose subscribers had to be told to recover (their missed publications had left history)."
    );
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
    describe_counter!("herald_config_reloads_total", "Configuration reloads on SIGHUP (result: ok, failed).");
    describe_counter!(
        "herald_reload_unsubscribes_total",
        "Subscriptions a reload ended because the new rules refuse them."
    );
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

#[cfg(test)]
mod tests {
    use super::COUNTERS;

    /// Every `counter!("herald_...")` in the code, with the label value it names when it is
    /// written literally, is registered at 0 in [`COUNTERS`].
    #[test]
    fn every_counter_in_the_code_is_registered() {
        let mut files = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
        let mut seen = 0;
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).expect("read dir").map(|e| e.expect("entry").path()));
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            for call in text.split("counter!(\"").skip(1) {
                let Some((name, rest)) = call.split_once('"') else { continue };
                if !name.starts_with("herald_") || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    continue;
                }
                seen += 1;
                let known = COUNTERS.iter().find(|(n, _)| *n == name);
                let (_, label) = known.unwrap_or_else(|| panic!("{}: {name} is not in COUNTERS", path.display()));
                // `counter!("name", "label" => "value")`: that value must be registered.
                let args = rest.split(')').next().unwrap_or("");
                let literal = args.split_once("=> \"").and_then(|(_, v)| v.split_once('"')).map(|(v, _)| v);
                if let Some(value) = literal {
                    let values = label.map(|(_, v)| v).unwrap_or(&[]);
                    assert!(values.contains(&value), "{}: {name} with {value} is not registered", path.display());
                }
            }
        }
        assert!(seen > 20, "found the counters ({seen})");
    }
}
