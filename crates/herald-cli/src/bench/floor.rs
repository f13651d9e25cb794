//! `herald bench floor`: the floor of a fan-out on this machine. A minimal sender (one thread,
//! blocking `write`s of ready-made bytes, no server around it) writes one message to each of N
//! sockets per round, on the same schedule as `herald bench fanout --rate`, and a minimal
//! receiver process reads them. A round's duration is "the time one core needs to write one
//! message to N sockets"; the receiver's latency from the schedule is what the same load costs
//! with nothing but the kernel's work.
//!
//! Two processes, because N connections are 2N open files in one process: the sender (this
//! process, to be pinned with `taskset` like a server) and the receiver, started as
//! `herald bench floor-receive` (pinned with `--receiver-cpus`, like the load generator).

use std::io::{BufRead as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt as _;

use super::hist::{AtomicHistogram, Histogram};
use super::{latency_json, latency_line, ms, now_ns, parse_duration, procfs, round1};

#[derive(Debug, Clone, Args)]
pub(crate) struct FloorArgs {
    /// Sockets written per round.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Rounds per second (as `herald bench fanout --rate`, with one channel).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Rounds before this much time are not measured.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Bytes per message: 163 is Herald's push frame for `herald bench fanout`'s 100-byte
    /// payload on `plain:0` (a 4-byte WebSocket header and 159 bytes of JSON).
    #[arg(long, default_value_t = 163)]
    bytes: usize,
    /// Run the receiver process on these CPUs (`taskset -c LIST`), e.g. 1; default: anywhere.
    #[arg(long, value_name = "LIST")]
    receiver_cpus: Option<String>,
}

/// The receiver process (`herald bench floor-receive`, started by `herald bench floor`).
#[derive(Debug, Clone, Args)]
pub(crate) struct ReceiveArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    connections: usize,
    #[arg(long)]
    bytes: usize,
    /// Messages with a lower sequence number are not measured (warm-up).
    #[arg(long)]
    measure_from: u64,
}

/// The first 16 bytes of a message: its round and its scheduled time (ns since the epoch).
const HEADER: usize = 16;

pub(crate) async fn run(args: FloorArgs) -> anyhow::Result<String> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be positive");
    anyhow::ensure!(args.bytes >= HEADER, "--bytes must be at least {HEADER}");
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let warmup_rounds = (args.warmup.as_secs_f64() * args.rate).round() as u64;
    let rounds = warmup_rounds + (args.duration.as_secs_f64() * args.rate).round() as u64;

    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut command = match &args.receiver_cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    command
        .args(["bench", "floor-receive", "--addr", &addr.to_string()])
        .args(["--connections", &args.connections.to_string(), "--bytes", &args.bytes.to_string()])
        .args(["--measure-from", &warmup_rounds.to_string()])
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = command.spawn().with_context(|| format!("starting the receiver ({exe:?})"))?;
    let stdout = child.stdout.take().context("the receiver's stdout")?;
    let cpus = args.receiver_cpus.clone();

    // The sender is a plain thread doing blocking writes: the runtime only waits for it.
    let sender = tokio::task::spawn_blocking(move || send(&listener, &args, period, rounds));
    let sent = sender.await.context("the sender thread")?;
    let receiver = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).context("reading the receiver's result")?;
        serde_json::from_str(&line).with_context(|| format!("the receiver's result: {line:?}"))
    });
    let sent = match sent {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            return Err(e);
        }
    };
    let received = receiver.await.context("the receiver thread")??;
    let _ = child.wait();
    Ok(summary(&sent, &received, cpus.as_deref()))
}

/// What the sender measured.
struct Sent {
    connections: usize,
    rate: f64,
    bytes: usize,
    rounds: u64,
    /// Duration of each measured round: writing one message to every socket.
    round_ns: Histogram,
    /// Measured rounds that started after their scheduled time (the previous one overran).
    late: u64,
    /// CPU time of this process over the measured rounds, per write.
    cpu_us_per_write: f64,
    cpu_pct: f64,
}

fn send(listener: &TcpListener, args: &FloorArgs, period: Duration, rounds: u64) -> anyhow::Result<Sent> {
    let mut sockets = Vec::with_capacity(args.connections);
    while sockets.len() < args.connections {
        let (s, _) = listener.accept().context("accepting the receiver's connections")?;
        // As Herald sets it: each message goes out at once.
        s.set_nodelay(true)?;
        sockets.push(s);
    }
    let warmup_rounds = (args.warmup.as_secs_f64() * args.rate).round() as u64;
    let mut message = vec![b'x'; args.bytes];
    let round_ns = AtomicHistogram::new();
    let mut late = 0;
    let start = Instant::now() + Duration::from_millis(100);
    let epoch_at_start = now_ns() + 100_000_000;
    let (mut cpu_from, mut measured_from) = (None, None);
    for round in 0..rounds {
        let due = start + period.mul_f64(round as f64);
        let now = Instant::now();
        if due > now {
            #[allow(clippy::disallowed_methods)] // the floor's sender is a plain thread by design
            std::thread::sleep(due - now);
        } else if round >= warmup_rounds {
            late += 1;
        }
        if round == warmup_rounds {
            cpu_from = procfs::cpu_seconds("self").ok();
            measured_from = Some(Instant::now());
        }
        let scheduled = epoch_at_start + (period.as_nanos() as u64) * round;
        message[..8].copy_from_slice(&round.to_le_bytes());
        message[8..HEADER].copy_from_slice(&scheduled.to_le_bytes());
        let began = Instant::now();
        for s in &mut sockets {
            s.write_all(&message).context("writing to a receiver's socket")?;
        }
        if round >= warmup_rounds {
            round_ns.record(began.elapsed().as_nanos() as u64);
        }
    }
    let measured = measured_from.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let cpu = match (cpu_from, procfs::cpu_seconds("self").ok()) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
    let writes = (rounds - warmup_rounds) as f64 * args.connections as f64;
    drop(sockets); // the receiver reads to the end of each stream, then reports
    Ok(Sent {
        connections: args.connections,
        rate: args.rate,
        bytes: args.bytes,
        rounds: rounds - warmup_rounds,
        round_ns: round_ns.snapshot(),
        late,
        cpu_us_per_write: if writes > 0.0 { cpu * 1e6 / writes } else { 0.0 },
        cpu_pct: if measured > 0.0 { cpu * 100.0 / measured } else { 0.0 },
    })
}

fn summary(sent: &Sent, received: &Value, receiver_cpus: Option<&str>) -> String {
    let floor = sent.round_ns.quantile(0.5);
    let json = json!({
        "scenario": "floor",
        "connections": sent.connections,
        "rate": sent.rate,
        "bytes": sent.bytes,
        "rounds": sent.rounds,
        "floor_ms": ms(floor),
        "round_ms": latency_json(&sent.round_ns),
        "late_rounds": sent.late,
        "sender_cpu_pct": round1(sent.cpu_pct),
        "sender_cpu_us_per_write": (sent.cpu_us_per_write * 1000.0).round() / 1000.0,
        "receiver_cpus": receiver_cpus,
        "latency_from": "schedule",
        "latency_ms": received["latency_ms"],
        "received": received["received"],
        "receiver_cpu_pct": received["cpu_pct"],
    });
    format!(
        "floor: one thread writing {} bytes to {} sockets, {} rounds/s ({} measured)\n\
         round (the floor): {}\n\
         late rounds: {}; sender CPU {:.1} % ({:.3} µs per write)\n\
         receiver latency from the schedule: {}\n{json}",
        sent.bytes,
        sent.connections,
        sent.rate,
        sent.rounds,
        latency_line(&sent.round_ns),
        sent.late,
        sent.cpu_pct,
        sent.cpu_us_per_write,
        received["latency_line"].as_str().unwrap_or("?"),
    )
}

/// The receiver: connects, reads every message, records its latency from the schedule, and
/// prints one JSON line when every stream has ended.
pub(crate) async fn receive(args: ReceiveArgs) -> anyhow::Result<String> {
    let latency = Arc::new(AtomicHistogram::new());
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut streams = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let s = tokio::net::TcpStream::connect(args.addr).await.context("connecting to the sender")?;
        streams.push(s);
    }
    let cpu_from = procfs::cpu_seconds("self").ok();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(streams.len());
    for mut s in streams {
        let (latency, received, bytes, from) = (latency.clone(), received.clone(), args.bytes, args.measure_from);
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; bytes * 64];
            let mut filled = 0;
            loop {
                let n = match s.read(&mut buf[filled..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                filled += n;
                let now = now_ns();
                let whole = filled / bytes * bytes;
                for m in buf[..whole].chunks_exact(bytes) {
                    let round = u64::from_le_bytes(m[..8].try_into().unwrap_or_default());
                    let scheduled = u64::from_le_bytes(m[8..HEADER].try_into().unwrap_or_default());
                    if round >= from {
                        latency.record(now.saturating_sub(scheduled));
                        received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                buf.copy_within(whole..filled, 0);
                filled -= whole;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = match (cpu_from, procfs::cpu_seconds("self").ok()) {
        (Some(a), Some(b)) if elapsed > 0.0 => (b - a) * 100.0 / elapsed,
        _ => 0.0,
    };
    let h = latency.snapshot();
    Ok(json!({
        "latency_ms": latency_json(&h),
        "latency_line": latency_line(&h),
        "received": received.load(std::sync::atomic::Ordering::Relaxed),
        "cpu_pct": round1(cpu),
    })
    .to_string())
}

/// Reads a whole stream: used by the tests to check the record layout.
#[cfg(test)]
fn parse_all(mut r: impl std::io::Read, bytes: usize) -> Vec<(u64, u64)> {
    let mut all = Vec::new();
    let _ = std::io::Read::read_to_end(&mut r, &mut all);
    all.chunks_exact(bytes)
        .map(|m| {
            let round = u64::from_le_bytes(m[..8].try_into().unwrap_or_default());
            (round, u64::from_le_bytes(m[8..HEADER].try_into().unwrap_or_default()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    #[test]
    fn the_sender_writes_every_round_to_every_socket_on_schedule() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let s = TcpStream::connect(addr).expect("connect");
                std::thread::spawn(move || parse_all(s, 20))
            })
            .collect();
        let args = FloorArgs {
            connections: 3,
            rate: 100.0,
            duration: Duration::from_millis(50),
            warmup: Duration::from_millis(20),
            bytes: 20,
            receiver_cpus: None,
        };
        let sent = send(&listener, &args, Duration::from_millis(10), 7).expect("send");
        assert_eq!(sent.rounds, 5, "7 rounds, the first 2 warm-up");
        assert_eq!(sent.round_ns.count(), 5);
        for r in readers {
            let got = r.join().expect("reader");
            let rounds: Vec<u64> = got.iter().map(|m| m.0).collect();
            assert_eq!(rounds, (0..7).collect::<Vec<_>>());
            // Scheduled 10 ms apart, whatever the time each was written.
            assert!(got.windows(2).all(|w| w[1].1 - w[0].1 == 10_000_000), "{got:?}");
        }
    }
}
