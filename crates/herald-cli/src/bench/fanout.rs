//! `herald bench fanout`: subscribers spread over channels, a publisher at a fixed rate (or as
//! fast as the path sustains), and what arrived: how fast, how late, lost, twice, out of order.
//!
//! Honest by construction: at a fixed rate, latency is measured from each message's scheduled
//! send time (a stalled server shows up, see `publisher`); a message counts as delivered once
//! per subscriber (duplicates are counted apart, never as deliveries); and whatever a
//! subscriber had not received when the bounded drain ends is lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::conn::{Sources, Ws};
use super::hist::AtomicHistogram;
use super::publisher::{self, Pace, Plan, Shared};
use super::seq::{SeqReport, SeqTracker};
use super::{latency_json, latency_line, now_ns, open_many, parse_payload, procfs, round1, Target, TargetArgs};

#[derive(Debug, Clone, Args)]
pub(super) struct FanoutArgs {
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 10)]
    channels: usize,
    /// Publications per second on each channel.
    #[arg(long, default_value_t = 10.0, conflicts_with = "max")]
    rate: f64,
    /// Publish as fast as the server (and this load generator) sustain.
    #[arg(long)]
    max: bool,
    /// Measured time, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    duration: Duration,
    /// Publishing before the measurement starts (its latencies are not counted).
    #[arg(long, default_value = "2s", value_parser = super::parse_duration)]
    warmup: Duration,
    /// Size of each message (the JSON payload), in bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// HTTP connections the publisher uses (each owns some of the channels).
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Subscriber connections being opened at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Longest wait for late deliveries after publishing ends.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    drain: Duration,
    /// The server's process id(s), for its CPU time per delivery (several are summed).
    #[arg(long, value_name = "PID")]
    pid: Vec<u32>,
    /// The channels are in a conflated namespace (`conflation = "latest"`): values a
    /// subscriber did not get are `skipped`, and it lost only if it never got the newest.
    #[arg(long)]
    conflated: bool,
    #[command(flatten)]
    target: TargetArgs,
}

/// What subscribers share.
#[derive(Debug)]
struct Ctx {
    shared: Arc<Shared>,
    /// Scheduled send time → delivery, ns, after the warm-up.
    latency: AtomicHistogram,
    /// Subscribers' TCP connect and WebSocket upgrade, ns.
    handshake: AtomicHistogram,
    /// Publications stamped before this (ns since the epoch) are warm-up.
    measure_from_ns: AtomicU64,
}

/// How a subscriber ended.
#[derive(Debug)]
struct Ended {
    seqs: SeqTracker,
    /// Why the connection ended before the run did.
    dropped: Option<String>,
}

async fn subscriber(mut ws: Ws, channel: usize, herald: bool, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) -> Ended {
    let mut seqs = SeqTracker::default();
    let dropped = loop {
        let m = tokio::select! {
            _ = stop.changed() => break None,
            m = ws.next() => m,
        };
        match m {
            Some(Ok(Message::Text(t))) => {
                let t = t.as_str();
                if herald && t == "{}" {
                    if let Err(e) = ws.send(Message::text("{}")).await {
                        break Some(format!("answering a ping: {e}"));
                    }
                } else if let Some((seq, ts)) = parse_payload(t) {
                    let now = now_ns();
                    // A duplicate is neither a delivery nor a latency sample.
                    if seqs.record(seq) {
                        ctx.shared.delivered[channel].fetch_add(1, Ordering::Relaxed);
                        if ts >= ctx.measure_from_ns.load(Ordering::Relaxed) {
                            ctx.latency.record(now.saturating_sub(ts));
                        }
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => break Some(format!("closed by the server: {frame:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => break Some(format!("{e}")),
            None => break Some("the connection ended".to_owned()),
        }
    };
    Ended { seqs, dropped }
}

pub(super) async fn run(args: FanoutArgs) -> anyhow::Result<String> {
    anyhow::ensure!(args.channels > 0 && args.subscribers > 0, "--subscribers and --channels must be at least 1");
    anyhow::ensure!(args.max || args.rate > 0.0, "--rate must be positive");
    let target = Target::resolve(&args.target).await?;
    let herald = target.kind == super::TargetKind::Herald;
    let sources = Sources::new(target.ws_addr(), args.subscribers, args.target.source_ips);
    let names: Vec<String> = (0..args.channels).map(|c| target.channel(c)).collect();
    let per_channel: Vec<u64> =
        (0..args.channels).map(|c| ((args.subscribers + args.channels - 1 - c) / args.channels) as u64).collect();
    let ctx = Arc::new(Ctx {
        shared: Arc::new(Shared::new(per_channel)),
        latency: AtomicHistogram::new(),
        handshake: AtomicHistogram::new(),
        measure_from_ns: AtomicU64::new(u64::MAX),
    });
    let pace = if args.max { Pace::Max { lag: 20 } } else { Pace::Rate(args.rate) };
    let rate_text =
        if args.max { "as fast as sustained".to_owned() } else { format!("{} publications/s each", args.rate) };
    eprintln!(
        "fanout ({}): {} subscribers over {} channels and {} node(s), {rate_text}, {} B, {:?} + {:?} warm-up",
        target.name(),
        args.subscribers,
        args.channels,
        target.nodes.len(),
        args.payload,
        args.duration,
        args.warmup
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let opened = open_many(args.subscribers, args.concurrency, "subscribers", |i| {
        let (target, names, ctx, stop) = (&target, &names, ctx.clone(), stop_rx.clone());
        let source = sources.pick(i);
        let channel = i % names.len();
        async move {
            let (ws, handshake) =
                target.open_timed(target.node_of(i, names.len()), source, Some(&names[channel])).await?;
            ctx.handshake.record(handshake.as_nanos() as u64);
            Ok((channel, tokio::spawn(subscriber(ws, channel, herald, ctx, stop))))
        }
    })
    .await;
    anyhow::ensure!(
        !opened.opened.is_empty(),
        "no subscriber could connect: {}",
        opened.first_error.as_deref().unwrap_or("?")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The schedule, on both clocks: the monotonic one for pacing, the wall clock (which the
    // subscribers subtract from) for the stamps.
    let (now, wall) = (Instant::now(), now_ns());
    let start = now + Duration::from_millis(100);
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let start_ns = wall + (start - now).as_nanos() as u64;
    ctx.measure_from_ns.store(start_ns + args.warmup.as_nanos() as u64, Ordering::Relaxed);
    let plan = Plan { start, start_ns, measure_from, end };
    let shared = &*ctx.shared;

    let publishers = args.publishers.clamp(1, args.channels);
    let publishing = futures_util::future::join_all((0..publishers).map(|p| {
        let channels: Vec<usize> = (p..args.channels).step_by(publishers).collect();
        publisher::run(&target, &names, channels, pace, args.payload, plan, shared)
    }));
    let watching = async {
        tokio::time::sleep_until(measure_from.into()).await;
        let (d0, p0, cpu0) = (shared.delivered_total(), shared.accepted_total(), procfs::CpuSample::take(&args.pid));
        let mut last = (Instant::now(), d0);
        while Instant::now() + Duration::from_millis(10) < end {
            tokio::time::sleep_until((Instant::now() + Duration::from_secs(5)).min(end).into()).await;
            let d = shared.delivered_total();
            let rate = (d - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "  {:>5.1} s: {rate:.0} deliveries/s, {} publications accepted, {} errors",
                (Instant::now() - measure_from).as_secs_f64(),
                shared.accepted_total(),
                shared.errors.load(Ordering::Relaxed)
            );
            last = (Instant::now(), d);
        }
        let (d1, p1, cpu1) = (shared.delivered_total(), shared.accepted_total(), procfs::CpuSample::take(&args.pid));
        (d1 - d0, p1 - p0, cpu0.until(&cpu1))
    };
    let (published, (window_deliveries, window_publications, (own_cpu, server_cpu))) =
        tokio::join!(publishing, watching);
    let publish_failure = published.into_iter().find_map(Result::err).map(|e| format!("{:#}", crate::tls::explain(e)));

    // Late deliveries: wait until all arrived, or none came for a second.
    let drain_until = Instant::now() + args.drain;
    // Subscribers still connected, per channel: each owes one delivery per accepted publication.
    let mut connected = vec![0u64; args.channels];
    for (channel, h) in &opened.opened {
        connected[*channel] += u64::from(!h.is_finished());
    }
    let all_connected = connected.iter().sum::<u64>() == args.subscribers as u64;
    let mut last = (Instant::now(), shared.delivered_total());
    while Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let d = shared.delivered_total();
        let expected: u64 = shared.accepted.iter().zip(&connected).map(|(a, n)| a.load(Ordering::Relaxed) * n).sum();
        if d >= expected && all_connected {
            break;
        }
        if d != last.1 {
            last = (Instant::now(), d);
        } else if last.0.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
    let _ = stop_tx.send(true);

    let mut total = SeqReport::default();
    let (mut with_loss, mut dropped, mut unfinished, mut first_drop) = (0u64, 0u64, 0u64, None);
    for (channel, mut handle) in opened.opened {
        let accepted = shared.accepted[channel].load(Ordering::Relaxed);
        let r = match tokio::time::timeout(Duration::from_secs(5), &mut handle).await {
            Ok(Ok(ended)) => {
                if let Some(why) = ended.dropped {
                    dropped += 1;
                    first_drop.get_or_insert(why);
                }
                ended.seqs.report_as(accepted, args.conflated)
            }
            // Stuck or failed: what it received cannot be read, so it counts as receiving nothing.
            _ => {
                handle.abort();
                unfinished += 1;
                match args.conflated {
                    true => SeqReport::unfinished_conflated(accepted),
                    false => SeqReport::unfinished(accepted),
                }
            }
        };
        if r.lost > 0 {
            with_loss += 1;
        }
        total.add(r);
    }

    let secs = args.duration.as_secs_f64();
    let deliveries_per_s = window_deliveries as f64 / secs;
    let latency = ctx.latency.snapshot();
    let (handshake, api) = (ctx.handshake.snapshot(), shared.api.snapshot());
    let unsent = shared.unsent.load(Ordering::Relaxed);
    let behind_max_ns = shared.behind_max_ns.load(Ordering::Relaxed);
    let cpu_us_per_delivery = server_cpu.map(|c| c * 1e6 / window_deliveries.max(1) as f64);
    let server_cpu_pct = server_cpu.map(|c| 100.0 * c / secs);
    let offered = if args.max { None } else { Some(args.rate * args.subscribers as f64) };

    println!(
        "fanout ({}): {} subscribers ({} failed to connect) over {} channels, {rate_text}, {} B",
        target.name(),
        args.subscribers - opened.failed as usize,
        opened.failed,
        args.channels,
        args.payload
    );
    println!(
        "  deliveries/s: {deliveries_per_s:.0}{} over {:.1} s; publications/s: {:.0}",
        offered.map(|o| format!(" (offered {o:.0})")).unwrap_or_default(),
        secs,
        window_publications as f64 / secs
    );
    let from = if args.max { "publish" } else { "scheduled send" };
    println!("  latency ({from} -> delivered): {}", latency_line(&latency));
    println!("  publish -> accepted (API round trip): {}", latency_line(&api));
    println!("  connect (TCP + WebSocket upgrade): {}", latency_line(&handshake));
    println!("  connect to subscribed: {}", latency_line(&opened.latencies));
    println!(
        "  lost {} (subscribers with loss: {with_loss}, unfinished: {unfinished}), duplicated {}, reordered {}, \
         dropped connections {dropped}",
        total.lost, total.duplicated, total.reordered
    );
    if args.conflated {
        println!(
            "  conflated: {} values skipped by design; lost counts subscribers that never got the newest",
            total.skipped
        );
    }
    if unsent > 0 || behind_max_ns > 100_000_000 {
        println!(
            "  publisher behind schedule: up to {:.1} ms late, {unsent} publications due but never sent \
             (the server, or this machine, could not take them)",
            behind_max_ns as f64 / 1e6
        );
    }
    if let (Some(us), Some(pct)) = (cpu_us_per_delivery, server_cpu_pct) {
        println!("  server CPU: {pct:.0}%, {us:.2} µs per delivery");
    }
    println!("  load generator CPU: {own_cpu:.0}%");
    let errors = shared.errors.load(Ordering::Relaxed);
    let first_error = shared.first_error.lock().ok().and_then(|e| e.clone()).or(publish_failure);
    if errors > 0 || first_error.is_some() {
        println!("  publish errors: {errors}; first problem: {}", first_error.as_deref().unwrap_or("?"));
    }
    if let Some(why) = &first_drop {
        println!("  first dropped connection: {why}");
    }
    Ok(json!({
        "scenario": "fanout",
        "target": target.name(),
        "subscribers": args.subscribers,
        "subscribers_failed": opened.failed,
        "nodes": target.nodes.len(),
        "channels": args.channels,
        "rate": if args.max { json!("max") } else { json!(args.rate) },
        "duration_s": secs,
        "warmup_s": args.warmup.as_secs_f64(),
        "payload_bytes": args.payload,
        "publications": shared.accepted_total(),
        "publications_per_s": (window_publications as f64 / secs).round(),
        "publish_errors": errors,
        "offered_deliveries_per_s": offered,
        "deliveries_per_s": deliveries_per_s.round(),
        "latency_from": if args.max { "publish" } else { "schedule" },
        "latency_ms": latency_json(&latency),
        "publish_ms": latency_json(&api),
        "connect_ms": latency_json(&handshake),
        "subscribed_ms": latency_json(&opened.latencies),
        "unsent": unsent,
        "publisher_behind_max_ms": super::ms(behind_max_ns),
        "received": total.received,
        "lost": total.lost,
        "conflated": args.conflated,
        "skipped": total.skipped,
        "subscribers_with_loss": with_loss,
        "subscribers_unfinished": unfinished,
        "duplicated": total.duplicated,
        "reordered": total.reordered,
        "dropped_connections": dropped,
        "server_cpu_pct": server_cpu_pct.map(round1),
        "server_cpu_us_per_delivery": cpu_us_per_delivery.map(|c| (c * 1000.0).round() / 1000.0),
        "generator_cpu_pct": round1(own_cpu),
        "first_error": first_error,
        "first_dropped": first_drop,
    })
    .to_string())
}
