//! `herald bench`: a load generator for Herald, or for any server that subscribes by WebSocket
//! URL and publishes by HTTP POST. Each scenario prints a summary, then one JSON line.

mod conn;
mod fanout;
mod floor;
mod hist;
mod procfs;
mod publisher;
mod seq;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use conn::{Sources, Ws};
use herald_client::rustls::ClientConfig;
use hist::Histogram;

use crate::tls::{self as cli_tls, TlsArgs, Trust};

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Open N connections (at most C at a time); handshakes/s and connect latency.
    Connect(ConnectArgs),
    /// N subscribers over C channels, a publisher posting through HTTP; deliveries/s,
    /// publish-to-delivery latency, lost, duplicated and reordered messages.
    Fanout(fanout::FanoutArgs),
    /// The floor of a fan-out here: one thread writing one message to each of N sockets per
    /// round, no server around it; round time and latency from the schedule.
    Floor(floor::FloorArgs),
    /// The receiving half of `floor` (started by it).
    #[command(hide = true)]
    FloorReceive(floor::ReceiveArgs),
    /// Hold N subscribed connections; the server's resident memory per connection.
    Idle(IdleArgs),
    /// A native client publishing to a channel it is subscribed to; latency to its own delivery.
    Roundtrip(RoundtripArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetKind {
    /// Herald's native protocol on `<url>/connect`, publishing through `POST /api/publish`.
    Herald,
    /// Subscribe with a WebSocket to `--sub-url`, publish with `POST --pub-url`; each message is
    /// the payload itself (Nchan, a Node `ws` server, Herald's `/ws/<channel>`...).
    Raw,
    /// Herald's Pusher door: subscribe as pusher-js does on `<url>/app/<--pusher-key>`, publish
    /// through `POST /api/publish` as `herald` does: the same fan-out through the other door.
    Pusher,
}

/// Which server, and how to talk to it.
#[derive(Debug, Clone, Args)]
struct TargetArgs {
    #[arg(long, value_enum, default_value = "herald")]
    target: TargetKind,
    /// Herald's address (`--target herald`): ws://HOST:PORT, or wss://HOST:PORT for TLS
    /// (publications then go over https://). Repeat it for several nodes sharing one engine
    /// (Redis): connections go to the nodes in turn, each channel's subscribers spread over all
    /// of them, and publications go through the first.
    #[arg(long, value_name = "URL", default_value = "ws://127.0.0.1:8080")]
    url: Vec<String>,
    /// Subscribe URL with `{channel}` (`--target raw`), e.g. 'ws://127.0.0.1:8091/sub/{channel}'.
    #[arg(long, value_name = "URL")]
    sub_url: Option<String>,
    /// Publish URL with `{channel}` (`--target raw`), e.g. 'http://127.0.0.1:8091/pub/{channel}'.
    #[arg(long, value_name = "URL")]
    pub_url: Option<String>,
    /// Herald's API key, when it has one.
    #[arg(long, value_name = "KEY", env = "HERALD_API__KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Loopback source addresses to spread connections over (127.0.0.2 and up; 0: none).
    /// Default: one per 5,000 connections.
    #[arg(long, value_name = "N")]
    source_ips: Option<usize>,
    /// Channel names are this prefix and a number.
    #[arg(long, value_name = "PREFIX", default_value = "bench-")]
    channel_prefix: String,
    /// The Pusher app key (`--target pusher`): one of Herald's `[[pusher.apps]]`.
    #[arg(long, value_name = "KEY", default_value = "bench-key")]
    pusher_key: String,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Debug, Clone, Args)]
struct ConnectArgs {
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Debug, Clone, Args)]
struct IdleArgs {
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    #[arg(long, default_value_t = 10)]
    channels: usize,
    /// The server's process id(s) (`/proc/<pid>/status`); several are summed (nginx master and
    /// worker). Without one, only the load generator's memory is reported.
    #[arg(long, value_name = "PID")]
    pid: Vec<u32>,
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Wait this long after the last subscription before reading memory.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    settle: Duration,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Debug, Clone, Args)]
struct RoundtripArgs {
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// A channel in a namespace that lets clients publish (`publish = true`).
    #[arg(long, default_value = "bench:roundtrip")]
    channel: String,
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Herald's address: ws://HOST:PORT, or wss://HOST:PORT for TLS.
    #[arg(long, value_name = "URL", default_value = "ws://127.0.0.1:8080")]
    url: String,
    #[command(flatten)]
    tls: TlsArgs,
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("herald bench: could not raise the open file limit: {e}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let summary = runtime.block_on(async {
        match args.scenario {
            Scenario::Connect(a) => connect(a).await,
            Scenario::Fanout(a) => fanout::run(a).await,
            Scenario::Floor(a) => floor::run(a).await,
            Scenario::FloorReceive(a) => floor::receive(a).await,
            Scenario::Idle(a) => idle(a).await,
            Scenario::Roundtrip(a) => roundtrip(a).await,
        }
    })?;
    // Do not wait for the tasks still holding connections.
    runtime.shutdown_timeout(Duration::from_secs(1));
    println!("{summary}");
    Ok(())
}

/// The resolved target.
#[derive(Debug)]
struct Target {
    kind: TargetKind,
    /// Where connections go, in turn (at least one): the address, and Herald's `/connect` URL
    /// or the raw template.
    nodes: Vec<(SocketAddr, String)>,
    pub_addr: SocketAddr,
    pub_host: String,
    /// Herald: `/api/publish`; raw: the path template.
    pub_path: String,
    /// Whether publications go over https://.
    pub_tls: bool,
    api_key: Option<String>,
    prefix: String,
    /// The TLS settings, when any URL is a TLS one.
    tls: Option<Arc<ClientConfig>>,
}

impl Target {
    async fn resolve(args: &TargetArgs) -> anyhow::Result<Self> {
        let trust = Trust::load(&args.tls)?;
        let (ws_urls, pub_url) = match args.target {
            TargetKind::Herald | TargetKind::Pusher => {
                let mut bases = Vec::with_capacity(args.url.len());
                for url in &args.url {
                    let (tls, host, _) = split_url(url)?;
                    bases.push((if tls { "wss" } else { "ws" }, host));
                }
                let (scheme, host) = bases.first().context("--url is missing")?;
                let path = match args.target {
                    TargetKind::Pusher => format!("/app/{}?protocol=7&client=herald-bench", args.pusher_key),
                    _ => "/connect".to_owned(),
                };
                let http = if *scheme == "wss" { "https" } else { "http" };
                (
                    bases.iter().map(|(s, h)| format!("{s}://{h}{path}")).collect(),
                    format!("{http}://{host}/api/publish"),
                )
            }
            TargetKind::Raw => {
                let sub = args.sub_url.as_deref().context("--target raw needs --sub-url")?;
                let publish = args.pub_url.as_deref().context("--target raw needs --pub-url")?;
                let sub = cli_tls::with_scheme(sub, true).with_context(|| not_a_url(sub))?;
                (vec![sub], cli_tls::with_scheme(publish, false).with_context(|| not_a_url(publish))?)
            }
        };
        let mut nodes = Vec::with_capacity(ws_urls.len());
        for url in ws_urls {
            let (_, host, _) = split_url(&url)?;
            nodes.push((lookup(&host).await?, url));
        }
        let (pub_tls, pub_host, pub_path) = split_url(&pub_url)?;
        let any_tls = pub_tls || nodes.iter().any(|(_, u)| cli_tls::is_tls(u));
        Ok(Self {
            kind: args.target,
            nodes,
            pub_addr: lookup(&pub_host).await?,
            pub_host,
            pub_path,
            pub_tls,
            api_key: args.api_key.clone(),
            prefix: args.channel_prefix.clone(),
            tls: if any_tls { Some(trust.client_config()?) } else { None },
        })
    }

    fn name(&self) -> &'static str {
        match self.kind {
            TargetKind::Herald => "herald",
            TargetKind::Raw => "raw",
            TargetKind::Pusher => "pusher",
        }
    }

    fn channel(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    /// The first node's address (publications go there; it decides the source addresses).
    fn ws_addr(&self) -> SocketAddr {
        self.nodes[0].0
    }

    /// The node of the `i`-th connection when connections are spread over `channels`
    /// channels (`i % channels`): the k-th subscriber of a channel goes to node `k % nodes`, so
    /// every channel has subscribers on every node whatever the counts.
    fn node_of(&self, i: usize, channels: usize) -> usize {
        (i / channels.max(1)) % self.nodes.len()
    }

    /// Opens a connection to `node` (modulo the node count) that is ready to receive
    /// `channel`'s messages; `None`: just connected.
    async fn open(&self, node: usize, source: Option<std::net::IpAddr>, channel: Option<&str>) -> anyhow::Result<Ws> {
        self.open_timed(node, source, channel).await.map(|(ws, _)| ws)
    }

    /// [`Target::open`], also telling how long the TCP connect and WebSocket upgrade took
    /// (the rest is Herald's `connect` and `subscribe` commands).
    async fn open_timed(
        &self,
        node: usize,
        source: Option<std::net::IpAddr>,
        channel: Option<&str>,
    ) -> anyhow::Result<(Ws, Duration)> {
        let (addr, url) = &self.nodes[node % self.nodes.len()];
        let ready = async {
            let started = Instant::now();
            match self.kind {
                TargetKind::Herald => {
                    let mut ws = conn::open(*addr, source, url, self.tls.as_ref()).await?;
                    let handshake = started.elapsed();
                    conn::herald_connect(&mut ws).await?;
                    if let Some(channel) = channel {
                        conn::herald_subscribe(&mut ws, 2, channel).await?;
                    }
                    Ok((ws, handshake))
                }
                TargetKind::Raw => {
                    let url = url.replace("{channel}", channel.unwrap_or("connect"));
                    let ws = conn::open(*addr, source, &url, self.tls.as_ref()).await?;
                    Ok((ws, started.elapsed()))
                }
                TargetKind::Pusher => {
                    let mut ws = conn::open(*addr, source, url, self.tls.as_ref()).await?;
                    let handshake = started.elapsed();
                    conn::pusher_subscribe(&mut ws, channel).await?;
                    Ok((ws, handshake))
                }
            }
        };
        tokio::time::timeout(conn::OPEN_TIMEOUT, ready).await.context("timed out opening a connection")?
    }

    /// Where publications go, and the TLS settings and server name when over https://.
    fn publish_endpoint(&self) -> (SocketAddr, Option<(&Arc<ClientConfig>, &str)>) {
        let tls = self.tls.as_ref().filter(|_| self.pub_tls).map(|c| (c, host_name(&self.pub_host)));
        (self.pub_addr, tls)
    }

    /// Appends one `POST` publishing `payload` on `channel`.
    fn publish_request(&self, out: &mut Vec<u8>, channel: &str, payload: &[u8]) {
        use std::io::Write as _;
        let (path, prefix, suffix): (std::borrow::Cow<'_, str>, String, &str) = match self.kind {
            TargetKind::Herald | TargetKind::Pusher => {
                (self.pub_path.as_str().into(), format!(r#"{{"channel":"{channel}","data":"#), "}")
            }
            TargetKind::Raw => (self.pub_path.replace("{channel}", channel).into(), String::new(), ""),
        };
        let len = prefix.len() + payload.len() + suffix.len();
        // Writing to a Vec cannot fail.
        let _ = write!(
            out,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n",
            self.pub_host
        );
        if let Some(key) = &self.api_key {
            let _ = write!(out, "Authorization: apikey {key}\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(payload);
        out.extend_from_slice(suffix.as_bytes());
    }
}

/// `scheme://host:port/path` → (TLS, `host:port`, `/path`), for ws://, wss://, http:// and
/// https:// (the port defaults to 80 or 443).
fn split_url(url: &str) -> anyhow::Result<(bool, String, String)> {
    let (scheme, rest) = url.split_once("://").with_context(|| not_a_url(url))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "ws" | "http" => false,
        "wss" | "https" => true,
        _ => anyhow::bail!(not_a_url(url)),
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    anyhow::ensure!(!host.is_empty(), "`{url}` has no host");
    let default_port = if tls { 443 } else { 80 };
    let host = if host.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    };
    Ok((tls, host, path.to_owned()))
}

fn not_a_url(url: &str) -> String {
    format!("`{url}` is not a ws://, wss://, http:// or https:// URL")
}

/// The host of `host:port` (what TLS checks the certificate against), without IPv6 brackets.
fn host_name(host_port: &str) -> &str {
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

async fn lookup(host: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(host).await.with_context(|| format!("cannot resolve {host}"))?.next().context("no address")
}

/// `20` (seconds), `1.5`, or with a unit: `500ms`, `2m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(s) if s >= 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
        Ok(_) => Err(format!("`{text}` is not a duration")),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string()),
    }
}

/// Nanoseconds since the Unix epoch: the publisher stamps it, the subscriber subtracts.
fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// `{"seq":N,"ts":T,"pad":"xx.."}`, padded to `size` bytes when it is that long.
fn payload(out: &mut Vec<u8>, seq: u64, ts: u64, size: usize) {
    use std::io::Write as _;
    let _ = write!(out, r#"{{"seq":{seq},"ts":{ts},"pad":""#);
    let pad = size.saturating_sub(out.len() + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
}

/// (seq, ts) from a message carrying a payload, wherever it sits in the JSON (also inside a
/// JSON string, as Pusher's `data` carries it).
fn parse_payload(text: &str) -> Option<(u64, u64)> {
    fn number_after(text: &str, key: &str) -> Option<u64> {
        let at = text.find(key)? + key.len();
        let digits = text[at..].bytes().take_while(u8::is_ascii_digit).count();
        text[at..at + digits].parse().ok()
    }
    let plain = || Some((number_after(text, "\"seq\":")?, number_after(text, "\"ts\":")?));
    let escaped = || Some((number_after(text, "\\\"seq\\\":")?, number_after(text, "\\\"ts\\\":")?));
    plain().or_else(escaped)
}

/// Milliseconds with microsecond resolution, for JSON.
fn ms(ns: u64) -> f64 {
    (ns as f64 / 1000.0).round() / 1000.0
}

fn latency_json(h: &Histogram) -> Value {
    json!({
        "count": h.count(),
        "p50": ms(h.quantile(0.5)),
        "p90": ms(h.quantile(0.9)),
        "p99": ms(h.quantile(0.99)),
        "p999": ms(h.quantile(0.999)),
        "max": ms(h.max()),
    })
}

fn latency_line(h: &Histogram) -> String {
    format!(
        "p50 {:.3} ms, p90 {:.3}, p99 {:.3}, p99.9 {:.3}, max {:.3} ({} samples)",
        ms(h.quantile(0.5)),
        ms(h.quantile(0.9)),
        ms(h.quantile(0.99)),
        ms(h.quantile(0.999)),
        ms(h.max()),
        h.count()
    )
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Opens `n` connections, at most `concurrency` at a time, calling `ready` on each; prints
/// progress. Returns the connections, the connect latencies and the failures.
async fn open_many<F, Fut, T>(n: usize, concurrency: usize, what: &str, open: F) -> OpenResult<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let started = Instant::now();
    let mut latencies = Histogram::new();
    let mut opened = Vec::with_capacity(n);
    let mut failed = 0u64;
    let mut first_error = None;
    let mut progress = Instant::now();
    let mut attempts = futures_util::stream::iter(0..n)
        .map(|i| {
            let fut = open(i);
            async move {
                let t = Instant::now();
                (fut.await, t.elapsed())
            }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((result, took)) = attempts.next().await {
        match result {
            Ok(c) => {
                latencies.record(took.as_nanos() as u64);
                opened.push(c);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{:#}", cli_tls::explain(e)));
            }
        }
        if progress.elapsed() >= Duration::from_secs(3) {
            progress = Instant::now();
            eprintln!("  {what}: {} open, {failed} failed, {:.1} s", opened.len(), started.elapsed().as_secs_f64());
        }
    }
    OpenResult { opened, latencies, failed, first_error, elapsed: started.elapsed() }
}

struct OpenResult<T> {
    opened: Vec<T>,
    latencies: Histogram,
    failed: u64,
    first_error: Option<String>,
    elapsed: Duration,
}

async fn connect(args: ConnectArgs) -> anyhow::Result<String> {
    let target = Target::resolve(&args.target).await?;
    let sources = Sources::new(target.ws_addr(), args.connections, args.target.source_ips);
    let urls: Vec<&str> = target.nodes.iter().map(|(_, u)| u.as_str()).collect();
    eprintln!("connect: {} connections to {} ({} at a time)", args.connections, urls.join(", "), args.concurrency);
    let cpu = procfs::CpuSample::take(&[]);
    let r = open_many(args.connections, args.concurrency, "connect", |i| target.open(i, sources.pick(i), None)).await;
    let (own_cpu, _) = cpu.until(&procfs::CpuSample::take(&[]));
    let ok = r.opened.len();
    let rate = ok as f64 / r.elapsed.as_secs_f64().max(1e-9);
    // Close them all: a close frame each, then drop.
    let closing =
        futures_util::stream::iter(r.opened).for_each_concurrent(args.concurrency.max(1), |mut ws: Ws| async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        });
    let _ = tokio::time::timeout(Duration::from_secs(20), closing).await;

    println!("connect ({}): {ok} opened, {} failed in {:.2} s", target.name(), r.failed, r.elapsed.as_secs_f64());
    println!("  handshakes/s: {rate:.0}");
    println!("  latency: {}", latency_line(&r.latencies));
    if let Some(e) = &r.first_error {
        println!("  first failure: {e}");
    }
    println!("  load generator CPU: {own_cpu:.0}%");
    Ok(json!({
        "scenario": "connect",
        "target": target.name(),
        "url": urls,
        "connections": args.connections,
        "concurrency": args.concurrency,
        "ok": ok,
        "failed": r.failed,
        "elapsed_s": (r.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "handshakes_per_s": rate.round(),
        "latency_ms": latency_json(&r.latencies),
        "generator_cpu_pct": round1(own_cpu),
        "first_error": r.first_error,
    })
    .to_string())
}

/// Keeps a connection alive (answers Herald's pings) until `stop`.
async fn hold(mut ws: Ws, herald: bool, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) if herald && t.as_str() == "{}" => {
                    if ws.send(Message::text("{}")).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    }
}

async fn idle(args: IdleArgs) -> anyhow::Result<String> {
    let target = Target::resolve(&args.target).await?;
    let sources = Sources::new(target.ws_addr(), args.connections, args.target.source_ips);
    let channels = args.channels.max(1);
    let names: Vec<String> = (0..channels).map(|c| target.channel(c)).collect();
    let server_before = if args.pid.is_empty() { None } else { Some(procfs::rss_kib_sum(&args.pid)?) };
    let own_before = procfs::rss_kib("self")?;
    eprintln!("idle: {} subscribed connections over {channels} channels", args.connections);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let r = open_many(args.connections, args.concurrency, "idle", |i| {
        let (target, names, stop) = (&target, &names, stop_rx.clone());
        let source = sources.pick(i);
        async move {
            let ws = target.open(target.node_of(i, channels), source, Some(&names[i % names.len()])).await?;
            Ok(tokio::spawn(hold(ws, target.kind == TargetKind::Herald, stop)))
        }
    })
    .await;
    tokio::time::sleep(args.settle).await;
    let held = r.opened.iter().filter(|h| !h.is_finished()).count();
    let server_after = if args.pid.is_empty() { None } else { Some(procfs::rss_kib_sum(&args.pid)?) };
    let own_after = procfs::rss_kib("self")?;
    let _ = stop_tx.send(true);
    for h in r.opened {
        let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
    }

    let per = |before: u64, after: u64| (after as f64 - before as f64) / held.max(1) as f64;
    let server_per = server_before.zip(server_after).map(|(b, a)| per(b, a));
    let own_per = per(own_before, own_after);
    println!("idle ({}): {held} connections held ({} failed)", target.name(), r.failed);
    if let (Some(b), Some(a), Some(p)) = (server_before, server_after, server_per) {
        println!("  server RSS: {b} KiB -> {a} KiB, {p:.2} KiB per connection");
    }
    println!("  load generator: {own_per:.2} KiB per connection");
    if let Some(e) = &r.first_error {
        println!("  first failure: {e}");
    }
    Ok(json!({
        "scenario": "idle",
        "target": target.name(),
        "connections": args.connections,
        "held": held,
        "failed": r.failed,
        "channels": channels,
        "server_rss_before_kib": server_before,
        "server_rss_after_kib": server_after,
        "server_kib_per_connection": server_per.map(|p| (p * 100.0).round() / 100.0),
        "generator_kib_per_connection": (own_per * 100.0).round() / 100.0,
        "first_error": r.first_error,
    })
    .to_string())
}

async fn roundtrip(args: RoundtripArgs) -> anyhow::Result<String> {
    let (tls, host, _) = split_url(&args.url)?;
    let url = format!("{}://{host}/connect", if tls { "wss" } else { "ws" });
    let trust = Trust::load(&args.tls)?;
    let config = if tls { Some(trust.client_config()?) } else { None };
    let mut ws = conn::open(lookup(&host).await?, None, &url, config.as_ref()).await?;
    conn::herald_connect(&mut ws).await?;
    conn::herald_subscribe(&mut ws, 2, &args.channel).await?;
    let warmup = (args.count / 10).min(100);
    eprintln!("roundtrip: {} publications on `{}` ({warmup} more to warm up)", args.count, args.channel);
    let mut latencies = Histogram::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = Instant::now();
    let mut body = Vec::new();
    for i in 0..args.count + warmup {
        anyhow::ensure!(Instant::now() < deadline, "roundtrip: still running after 60 s; stopped at {i}");
        body.clear();
        payload(&mut body, i, now_ns(), args.payload);
        let id = (i % u64::from(u32::MAX - 3)) as u32 + 3;
        let data = String::from_utf8_lossy(&body);
        let frame = format!(r#"{{"id":{id},"publish":{{"channel":"{}","data":{data}}}}}"#, args.channel);
        let sent = Instant::now();
        ws.send(Message::text(frame)).await.context("sending a publish")?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .context("no delivery within 10 s")?
                .context("the connection ended")?
                .context("the connection failed")?;
            let Message::Text(t) = m else { continue };
            let t = t.as_str();
            if t == "{}" {
                ws.send(Message::text("{}")).await?;
            } else if t.starts_with(&format!("{{\"id\":{id},")) {
                anyhow::ensure!(!t.contains("\"error\":{"), "the server refused the publish: {t}");
            } else if t.starts_with("{\"push\"") && parse_payload(t).is_some_and(|(s, _)| s == i) {
                if i >= warmup {
                    latencies.record(sent.elapsed().as_nanos() as u64);
                }
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    let _ = ws.close(None).await;
    println!("roundtrip: {} publications in {:.2} s", args.count, elapsed.as_secs_f64());
    println!("  latency: {}", latency_line(&latencies));
    Ok(json!({
        "scenario": "roundtrip",
        "target": "herald",
        "count": args.count,
        "channel": args.channel,
        "latency_ms": latency_json(&latencies),
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_padded_and_parses_back() {
        let mut p = Vec::new();
        payload(&mut p, 42, 1_700_000_000_123_456_789, 100);
        assert_eq!(p.len(), 100);
        let text = std::str::from_utf8(&p).expect("utf8");
        let v: Value = serde_json::from_str(text).expect("json");
        assert_eq!(v["seq"], 42);
        assert_eq!(parse_payload(text), Some((42, 1_700_000_000_123_456_789)));
        // Inside a Herald push.
        let push = format!(r#"{{"push":{{"channel":"bench-1","pub":{{"offset":7,"data":{text}}}}}}}"#);
        assert_eq!(parse_payload(&push), Some((42, 1_700_000_000_123_456_789)));
        // Inside a Pusher event, where data is a string holding the JSON.
        let event = json!({"event": "message", "channel": "bench-1", "data": text}).to_string();
        assert_eq!(parse_payload(&event), Some((42, 1_700_000_000_123_456_789)));
        // Too small to pad: still valid JSON.
        p.clear();
        payload(&mut p, 1, 2, 10);
        assert!(serde_json::from_slice::<Value>(&p).is_ok());
        assert_eq!(parse_payload("{}"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(
            split_url("ws://127.0.0.1:8080/connect").expect("ok"),
            (false, "127.0.0.1:8080".into(), "/connect".into())
        );
        assert_eq!(split_url("http://localhost").expect("ok"), (false, "localhost:80".into(), "/".into()));
        assert_eq!(split_url("wss://x").expect("ok"), (true, "x:443".into(), "/".into()));
        assert_eq!(split_url("HTTPS://[::1]:8443/a").expect("ok"), (true, "[::1]:8443".into(), "/a".into()));
        assert!(split_url("ftp://x").is_err() && split_url("x:80").is_err() && split_url("ws:///x").is_err());
        assert_eq!(host_name("[::1]:8443"), "::1");
        assert_eq!(host_name("herald.example.com:443"), "herald.example.com");
    }

    #[test]
    fn requests_for_herald_and_raw() {
        let mut t = Target {
            kind: TargetKind::Herald,
            nodes: vec![("127.0.0.1:8080".parse().expect("addr"), "ws://127.0.0.1:8080/connect".into())],
            pub_addr: "127.0.0.1:8080".parse().expect("addr"),
            pub_host: "127.0.0.1:8080".into(),
            pub_path: "/api/publish".into(),
            pub_tls: false,
            api_key: Some("k".into()),
            prefix: "bench-".into(),
            tls: None,
        };
        let mut out = Vec::new();
        t.publish_request(&mut out, "bench-0", b"{\"seq\":0}");
        let text = String::from_utf8(out).expect("utf8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head");
        assert!(head.starts_with("POST /api/publish HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("Authorization: apikey k"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(body, r#"{"channel":"bench-0","data":{"seq":0}}"#);

        t.kind = TargetKind::Raw;
        t.pub_path = "/pub/{channel}".into();
        let mut out = Vec::new();
        t.publish_request(&mut out, "c1", b"hello");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.starts_with("POST /pub/c1 HTTP/1.1\r\n"));
        assert!(text.ends_with("Content-Length: 5\r\nAuthorization: apikey k\r\n\r\nhello"));
    }

    #[test]
    fn each_channel_spreads_over_every_node() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let t = Target {
            kind: TargetKind::Herald,
            nodes: (0..3).map(|n| (addr, format!("ws://node{n}/connect"))).collect(),
            pub_addr: addr,
            pub_host: "127.0.0.1:1".into(),
            pub_path: "/api/publish".into(),
            pub_tls: false,
            api_key: None,
            prefix: "bench-".into(),
            tls: None,
        };
        // 900 subscribers over 100 channels (subscriber i is on channel i % 100).
        let mut per = vec![[0u32; 3]; 100];
        for i in 0..900 {
            per[i % 100][t.node_of(i, 100)] += 1;
        }
        assert!(per.iter().all(|nodes| *nodes == [3, 3, 3]), "{per:?}");
        // Channels a multiple of the nodes: still every node.
        let mut per = vec![[0u32; 3]; 3];
        for i in 0..9 {
            per[i % 3][t.node_of(i, 3)] += 1;
        }
        assert!(per.iter().all(|nodes| *nodes == [1, 1, 1]), "{per:?}");
    }

    #[test]
    fn sources_spread_over_loopback_only() {
        let lo: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let s = Sources::new(lo, 12_000, None);
        assert_eq!(s.pick(0), Some("127.0.0.2".parse().expect("ip")));
        assert_eq!(s.pick(2), Some("127.0.0.4".parse().expect("ip")));
        assert_eq!(s.pick(3), Some("127.0.0.2".parse().expect("ip")));
        assert_eq!(Sources::new(lo, 10, Some(0)).pick(5), None);
        assert_eq!(Sources::new("10.0.0.1:1".parse().expect("addr"), 10, None).pick(0), None);
    }
}
