//! The `herald` command: process setup (logging, signals, limits) around the `herald` library,
//! and `publish` / `subscribe` for trying a server from a shell.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use herald::config::{self, LogFormat, Overrides};
use herald_client::{Client, ClientOptions, Event, Publication, State};
use serde_json::value::RawValue;

mod bench;
mod tls;

#[derive(Debug, Parser)]
#[command(name = "herald", version = herald::VERSION, about = "Herald: a real-time push server")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default when no command is given).
    Serve(ServeArgs),
    /// Print the effective configuration and where each value came from; fail on a bad one.
    CheckConfig(CheckArgs),
    /// Print the version.
    Version,
    /// Write a starter configuration with a freshly generated API key and token secret to
    /// PATH (default `herald.toml`; `-` for stdout). Never overwrites an existing file.
    Genconfig(GenconfigArgs),
    /// Publish a message on a channel through the HTTP API; print the answer.
    Publish(PublishArgs),
    /// Subscribe to channels over WebSocket and print each publication as one JSON line
    /// (`{"channel":..,"offset":..,"data":..}`), reconnecting when needed. Ctrl-C stops.
    Subscribe(SubscribeArgs),
    /// Mint a connection token (or, with `--channel`, a subscription token) for development,
    /// signed with the configured HMAC secret (`auth.secret`, e.g. from `HERALD_AUTH__SECRET`).
    /// Prints the token.
    Token(TokenArgs),
    /// Load a server and measure it: connect, fanout, idle, roundtrip (see docs/benchmarks.md).
    Bench(bench::BenchArgs),
}

#[derive(Debug, Clone, Args)]
struct GenconfigArgs {
    /// Where to write the configuration; `-` writes it to stdout.
    #[arg(value_name = "PATH", default_value = "herald.toml")]
    path: PathBuf,
}

#[derive(Debug, Clone, Args)]
struct TokenArgs {
    /// The user id (the token's `sub`).
    #[arg(long)]
    user: String,
    /// How long the token is valid, e.g. `1h`, `30m`, `7d`.
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Connection info attached to presence: a JSON object, e.g. '{"name":"Ada"}'.
    #[arg(long)]
    info: Option<String>,
    /// Mint a subscription token for this channel (for namespaces with `subscribe = "token"`)
    /// instead of a connection token.
    #[arg(long)]
    channel: Option<String>,
    #[command(flatten)]
    config: ServeArgs,
}

#[derive(Debug, Clone, Args)]
struct CheckArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Also ask the Herald running at URL (its HTTP address) what reloading it with this
    /// configuration (SIGHUP) would change; nothing is applied.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// The running server's API key, for --url (default: the `api.key` of this configuration).
    #[arg(long, value_name = "KEY", env = "HERALD_API__KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Debug, Clone, Args)]
struct PublishArgs {
    /// The channel, e.g. `news` or `chat:lobby`.
    channel: String,
    /// The data: any JSON value, e.g. '{"title":"hello"}' or '"plain text"'.
    json: String,
    /// The server's HTTP address: http://HOST:PORT, or https://HOST:PORT when it serves TLS
    /// (a ws:// or wss:// URL is taken as the same address).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    #[command(flatten)]
    tls: tls::TlsArgs,
    /// The API key (the server's `api.key`); without one, only a server without a key on
    /// the same machine accepts the request.
    #[arg(long, value_name = "KEY", env = "HERALD_API__KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Debug, Clone, Args)]
struct SubscribeArgs {
    /// One or more channels.
    #[arg(required = true, value_name = "CHANNEL")]
    channels: Vec<String>,
    /// The server's WebSocket endpoint: ws://HOST:PORT/connect, or wss://HOST:PORT/connect
    /// when it serves TLS (an http:// or https:// address without a path means its /connect).
    #[arg(long, value_name = "URL", default_value = "ws://127.0.0.1:8080/connect")]
    url: String,
    #[command(flatten)]
    tls: tls::TlsArgs,
    /// A connection token (JWT), when the server requires one.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
}

#[derive(Debug, Clone, Args)]
struct ServeArgs {
    /// TOML configuration file (see config/herald.example.toml).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:8080 or localhost:8080 (overrides `listen`).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// PEM certificate chain: serve wss:// and https:// (overrides `tls.cert`; needs --tls-key).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (overrides `tls.key`).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Set up the demo pages at `/`: namespaces `chat` and `ticker` (unless configured), a
    /// development secret for this run (unless configured), `/demo/token` and a ticker
    /// publisher. For trying Herald on your machine; never in production.
    #[arg(long)]
    demo: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(merge(cli.serve, args)),
        Some(Command::CheckConfig(args)) => {
            check_config(merge(cli.serve, args.serve), args.url.as_deref(), args.api_key)
        }
        Some(Command::Version) => {
            println!("herald {}", herald::VERSION);
            Ok(())
        }
        Some(Command::Genconfig(args)) => genconfig(&args),
        // These talk to a server: TLS failures and refused upgrades are explained.
        Some(Command::Publish(args)) => publish(&args).map_err(tls::explain),
        Some(Command::Subscribe(args)) => subscribe(args).map_err(tls::explain),
        Some(Command::Token(args)) => token(args),
        Some(Command::Bench(args)) => bench::run(args).map_err(tls::explain),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn merge(outer: ServeArgs, inner: ServeArgs) -> ServeArgs {
    ServeArgs {
        config: inner.config.or(outer.config),
        listen: inner.listen.or(outer.listen),
        demo: inner.demo || outer.demo,
        tls_cert: inner.tls_cert.or(outer.tls_cert),
        tls_key: inner.tls_key.or(outer.tls_key),
    }
}

fn load(args: &ServeArgs) -> anyhow::Result<config::Loaded> {
    Ok(load_demo(args)?.0)
}

/// Loads the configuration, with `--demo`'s additions; says whether a secret was generated.
fn load_demo(args: &ServeArgs) -> anyhow::Result<(config::Loaded, bool)> {
    let overrides =
        Overrides { listen: args.listen.clone(), tls_cert: args.tls_cert.clone(), tls_key: args.tls_key.clone() };
    let mut loaded = config::load(args.config.as_deref(), &overrides)?;
    let generated = if args.demo { herald::web::apply_demo(&mut loaded.config)? } else { false };
    Ok((loaded, generated))
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let config = load(&args.config)?.config;
    let ttl = humantime::parse_duration(&args.ttl).with_context(|| format!("invalid --ttl `{}`", args.ttl))?;
    let info = args
        .info
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
        .transpose()
        .context("--info must be JSON")?;
    let token = match &args.channel {
        Some(channel) => herald::auth::mint_subscription(&config.auth, &args.user, channel, ttl, info)?,
        None => herald::auth::mint(&config.auth, &args.user, ttl, info)?,
    };
    println!("{token}");
    Ok(())
}

/// A random secret of `bytes` bytes, as hex (printable, TOML-safe, no quoting issues).
fn random_hex(bytes: usize) -> String {
    use rand::RngCore as _;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().fold(String::with_capacity(bytes * 2), |mut s, b| {
        use std::fmt::Write as _;
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The starter configuration `genconfig` writes, with fresh secrets.
fn starter_config() -> String {
    let api_key = random_hex(32);
    let secret = random_hex(48);
    format!(
        r#"# Herald configuration written by `herald genconfig` (herald {version}).
# Every key with its default and its meaning: config/herald.example.toml and
# docs/configuration.md. Check this file with `herald check-config --config <this file>`.
# This file holds secrets: keep it readable by the user Herald runs as only.

# Loopback only. Use "0.0.0.0:8080" to accept other machines (read docs/security.md first).
listen = "127.0.0.1:8080"

[auth]
# Connection tokens (JWT) are signed by your backend with this shared secret (HS256).
# Mint one for development with `herald token --config <this file> --user 42`.
algorithm = "HS256"
secret = "{secret}"
# Whether clients may connect without a token.
allow_anonymous = true

[api]
# Backends send `Authorization: apikey <key>`; `herald publish` reads it from --api-key
# or HERALD_API__KEY.
key = "{api_key}"

[http]
# Web origins whose pages may connect from a browser, e.g. ["https://app.example.com"].
allowed_origins = ["*"]

# Channels without a namespace: anyone may subscribe; only the API publishes.
[channels.default]
subscribe = true
publish = false

# To serve wss:// and https:// directly, set both:
# [tls]
# cert = "/etc/herald/cert.pem"
# key = "/etc/herald/key.pem"
"#,
        version = herald::VERSION
    )
}

fn genconfig(args: &GenconfigArgs) -> anyhow::Result<()> {
    let text = starter_config();
    if args.path.as_os_str() == "-" {
        print!("{text}");
        return io::stdout().flush().context("cannot write to stdout");
    }
    let path = &args.path;
    let mut options = std::fs::OpenOptions::new();
    // `create_new` refuses an existing file (or symlink) atomically: nothing is overwritten.
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = match options.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => anyhow::bail!(
            "{} already exists; not overwriting it (remove it first, or choose another path)",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    };
    file.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "herald: wrote {} with a new API key and token secret (not printed); check it with `herald check-config --config {}`",
        path.display(),
        path.display()
    );
    Ok(())
}

fn check_config(args: ServeArgs, url: Option<&str>, api_key: Option<String>) -> anyhow::Result<()> {
    let loaded = load(&args)?;
    print!("{}", loaded.explain());
    let config = &loaded.config;
    herald::tls::Tls::load(&config.tls)?;
    // Resolve `listen` as `serve` would, and warn about every address beyond loopback.
    let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(config.listen.as_str())
        .with_context(|| format!("cannot resolve listen address `{}`", config.listen))?
        .collect();
    let mut warnings: Vec<String> = loaded.warnings.clone();
    warnings.extend(addrs.iter().flat_map(|a| herald::server::exposure_warnings(config, a.ip())));
    warnings.dedup();
    for w in warnings {
        eprintln!("warning: {w}");
    }
    if let Some(url) = url {
        let key = api_key.or_else(|| {
            let api = &config.api;
            std::iter::once(&api.key).chain(&api.keys).find(|k| !k.is_empty()).map(|k| k.expose().to_owned())
        });
        print_reload_check(url, key.as_deref(), config)?;
    }
    Ok(())
}

/// Asks a running Herald (`POST /api/config_check`) what a reload with `config` would
/// change, and prints it.
fn print_reload_check(url: &str, key: Option<&str>, config: &herald::Config) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Change {
        key: String,
        from: String,
        to: String,
    }
    #[derive(serde::Deserialize)]
    struct Report {
        changed: Vec<Change>,
        restart_only: Vec<Change>,
    }
    let endpoint = format!("{}/api/config_check", url.trim_end_matches('/'));
    let agent = api_agent(&endpoint, &tls::Trust::default());
    let mut request = agent.post(&endpoint);
    if let Some(key) = key {
        request = request.header("Authorization", format!("apikey {key}"));
    }
    let mut response = request.send_json(config).with_context(|| format!("cannot reach {endpoint}"))?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().context("reading the answer")?;
    if status != 200 {
        anyhow::bail!("{endpoint} answered HTTP {status}: {text}");
    }
    let report: Report = serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))?;
    println!();
    if report.changed.is_empty() && report.restart_only.is_empty() {
        println!("# a reload of {url} would change nothing");
    }
    if !report.changed.is_empty() {
        println!("# a reload of {url} (SIGHUP) would apply:");
        for c in &report.changed {
            println!("#   {}: {} -> {}", c.key, c.from, c.to);
        }
    }
    if !report.restart_only.is_empty() {
        println!("# changed, but only a restart applies it (a reload keeps the running value):");
        for c in &report.restart_only {
            println!("#   {}: {} -> {}", c.key, c.from, c.to);
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (loaded, generated_secret) = load_demo(&args)?;
    let config = loaded.config;
    let log_filter = init_logging(&config.log.level, config.log.format)?;
    let file = args.config.as_ref().map_or_else(|| "none (defaults)".to_owned(), |p| p.display().to_string());
    let mut env = loaded.env.clone();
    env.sort();
    // Names only: values may be secrets.
    tracing::info!(version = herald::VERSION, config = %file, env = %env.join(","), "starting");
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        // A host name is resolved here; the first of its addresses that binds is used.
        let listener = tokio::net::TcpListener::bind(config.listen.as_str())
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        if config.demo {
            let addr = listener.local_addr().map_or_else(|_| config.listen.clone(), |a| a.to_string());
            let scheme = if config.tls.enabled() { "https" } else { "http" };
            tracing::warn!(
                "demo mode (--demo): demo namespaces, /demo/token and a ticker publisher are on. Not for production"
            );
            if generated_secret {
                tracing::info!("demo mode: generated a development token secret for this run (not printed)");
            }
            tracing::info!("demo pages: {scheme}://{addr}/");
        }
        if config.testing.echo {
            tracing::warn!("testing.echo is on: /_echo echoes every message (for conformance runs only)");
        }
        // SIGHUP reads the configuration again the way it was read now. A token secret
        // `--demo` generated is kept: tokens minted before the reload stay valid.
        let demo_secret = generated_secret.then(|| config.auth.secret.clone());
        let load = move || {
            let (mut loaded, generated) = load_demo(&args).map_err(|e| format!("{e:#}"))?;
            if let (true, Some(secret)) = (generated, &demo_secret) {
                loaded.config.auth.secret = secret.clone();
            }
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            Ok(loaded.config)
        };
        let applied = move |config: &herald::Config| {
            let Some(handle) = &log_filter else { return };
            match tracing_subscriber::EnvFilter::try_new(&config.log.level) {
                Ok(filter) => {
                    if let Err(e) = handle.reload(filter) {
                        tracing::warn!(error = %e, "log.level not changed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "log.level not changed"),
            }
        };
        let reload = herald::server::Reload { load: Box::new(load), applied: Box::new(applied) };
        herald::server::run_with_reload(config, listener, shutdown_signal(), Some(reload))
            .await
            .context("server failed")
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// An HTTP client for the API at `url`: answers of every status are read (the error body says
/// why), bounded by [`PUBLISH_TIMEOUT`], TLS with `trust` for https.
fn api_agent(url: &str, trust: &tls::Trust) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(PUBLISH_TIMEOUT));
    if tls::is_tls(url) {
        config = config.tls_config(trust.ureq_config());
    }
    config.build().into()
}

/// How long `publish` waits for the server, in all.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

fn publish(args: &PublishArgs) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        channel: &'a str,
        data: &'a RawValue,
    }
    #[derive(serde::Deserialize)]
    struct ErrorAnswer {
        error: ErrorDetail,
    }
    #[derive(serde::Deserialize)]
    struct ErrorDetail {
        code: u16,
        message: String,
    }

    let data = RawValue::from_string(args.json.clone()).context("the data is not valid JSON")?;
    let url = format!("{}/api/publish", publish_base(&args.url)?);
    let agent = api_agent(&url, &tls::Trust::load(&args.tls)?);
    let mut request = agent.post(&url);
    if let Some(key) = &args.api_key {
        request = request.header("Authorization", format!("apikey {key}"));
    }
    let body = serde_json::to_string(&Body { channel: &args.channel, data: &data }).context("encoding the request")?;
    let mut response = request
        .content_type("application/json")
        .send(body.as_str())
        .with_context(|| format!("cannot publish through {url}"))?;
    let status = response.status();
    let answer = response.body_mut().read_to_string().with_context(|| format!("cannot read the answer of {url}"))?;
    if status.is_success() {
        println!("{}", answer.trim_end());
        return Ok(());
    }
    let hint = match status.as_u16() {
        401 | 403 if args.api_key.is_none() => {
            "; the server wants an API key: pass --api-key KEY or set HERALD_API__KEY (the server's `api.key`)"
        }
        401 | 403 => "; check the key given with --api-key or HERALD_API__KEY against the server's `api.key`",
        _ => "",
    };
    match serde_json::from_str::<ErrorAnswer>(&answer) {
        Ok(ErrorAnswer { error }) => {
            anyhow::bail!("{} (code {}, HTTP {}){hint}", error.message, error.code, status.as_u16())
        }
        Err(_) => anyhow::bail!("{url} answered HTTP {}: {}{hint}", status.as_u16(), answer.trim()),
    }
}

/// The HTTP address `publish` posts to (`/api/publish` is appended): `url` itself, or the
/// HTTP address of a WebSocket URL (`ws://h/connect` → `http://h`).
fn publish_base(url: &str) -> anyhow::Result<String> {
    let http = tls::with_scheme(url, false).with_context(|| {
        format!("`{url}` is not an http:// or https:// URL (e.g. http://127.0.0.1:8080 or https://herald.example.com)")
    })?;
    let base = http.trim_end_matches('/');
    let base = base.strip_suffix("/api/publish").or_else(|| base.strip_suffix("/connect")).unwrap_or(base);
    if !url.starts_with(base) {
        eprintln!("herald: publishing through {base}/api/publish (the HTTP address of {url})");
    }
    Ok(base.to_owned())
}

/// The WebSocket URL `subscribe` connects to: `url` itself, or for an http:// or https://
/// address the same address in ws:// or wss://, with `/connect` when it has no path.
fn subscribe_url(url: &str) -> anyhow::Result<String> {
    let ws = tls::with_scheme(url, true).with_context(|| {
        format!("`{url}` is not a ws:// or wss:// URL (e.g. ws://127.0.0.1:8080/connect or wss://herald.example.com/connect)")
    })?;
    if url
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("ws") || scheme.eq_ignore_ascii_case("wss"))
    {
        return Ok(ws);
    }
    let rest = ws.split_once("://").map_or("", |(_, rest)| rest);
    let ws = match rest.find('/') {
        None => format!("{ws}/connect"),
        Some(i) if &rest[i..] == "/" => format!("{ws}connect"),
        Some(_) => ws,
    };
    eprintln!("herald: subscribing through {ws} (the WebSocket endpoint of {url})");
    Ok(ws)
}

fn subscribe(mut args: SubscribeArgs) -> anyhow::Result<()> {
    // Reconnects are worth seeing on stderr; stdout carries only publications.
    init_logging("warn,herald_client=info", LogFormat::Text)?;
    args.url = subscribe_url(&args.url)?;
    let trust = tls::Trust::load(&args.tls)?;
    let tls_config = if tls::is_tls(&args.url) { Some(trust.client_config()?) } else { None };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        // Ctrl-C (or SIGTERM) ends the command successfully at any point.
        let stop = shutdown_signal();
        tokio::pin!(stop);
        let mut options = ClientOptions::default().name("herald-cli").version(herald::VERSION);
        if let Some(token) = &args.token {
            options = options.token(token);
        }
        if let Some(config) = tls_config {
            options = options.tls_config(config);
        }
        let client = tokio::select! {
            () = &mut stop => return Ok(()),
            client = Client::connect(args.url.as_str(), options) => {
                client.with_context(|| format!("cannot connect to {}", args.url))?
            }
        };
        let printed = tokio::select! {
            () = &mut stop => Ok(()),
            printed = print_publications(&client, &args.channels) => printed,
        };
        client.close().await;
        printed
    })
}

/// Subscribes, then prints events until stdout closes or the client ends.
async fn print_publications(client: &Client, channels: &[String]) -> anyhow::Result<()> {
    use futures_util::StreamExt as _;

    let mut subscriptions = Vec::with_capacity(channels.len());
    for channel in channels {
        let subscription =
            client.subscribe(channel.as_str()).await.with_context(|| format!("cannot subscribe to `{channel}`"))?;
        subscriptions.push(subscription);
    }
    let mut events = futures_util::stream::select_all(subscriptions.into_iter().map(|s| {
        let channel = s.channel().to_owned();
        s.map(move |event| (channel.clone(), event))
    }));
    while let Some((channel, event)) = events.next().await {
        match event {
            Event::Publication(p) => match print_publication(&mut io::stdout().lock(), &channel, &p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e).context("cannot write to stdout"),
            },
            Event::Reset { epoch, offset, epoch_changed } => {
                if epoch_changed {
                    eprintln!(
                        "herald: `{channel}`: the server lost this channel's history (new epoch {epoch}, e.g. it \
                         restarted); what was published meanwhile is unknown. Continuing after offset {offset}"
                    );
                } else {
                    eprintln!(
                        "herald: `{channel}`: publications were missed while reconnecting (more than the server's \
                         history keeps); continuing after offset {offset} of epoch {epoch}"
                    );
                }
                let reason = if epoch_changed { "epoch_changed" } else { "history_exceeded" };
                match print_reset(&mut io::stdout().lock(), &channel, &epoch, offset, reason) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
                    Err(e) => return Err(e).context("cannot write to stdout"),
                }
            }
            _ => {}
        }
    }
    let state = client.state().borrow().clone();
    match state {
        State::Closed(e) => Err(anyhow::Error::new(e).context("the connection ended")),
        _ => Err(anyhow::anyhow!("every subscription ended")),
    }
}

/// The marker line for lost history, so a program reading the JSON lines can reload:
/// `{"channel":..,"reset":{"epoch":..,"offset":..,"reason":"epoch_changed"|"history_exceeded"}}`.
fn print_reset(out: &mut impl Write, channel: &str, epoch: &str, offset: u64, reason: &str) -> io::Result<()> {
    let line =
        serde_json::json!({ "channel": channel, "reset": { "epoch": epoch, "offset": offset, "reason": reason } });
    writeln!(out, "{line}")?;
    out.flush()
}

/// One JSON line per publication. Data the publisher sent across several lines is compacted
/// so the output stays one line per publication.
fn print_publication(out: &mut impl Write, channel: &str, p: &Publication) -> io::Result<()> {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        channel: &'a str,
        offset: Option<u64>,
        data: &'a RawValue,
    }
    let compacted;
    let data = if p.data.get().contains(['\n', '\r']) {
        let value: serde_json::Value = serde_json::from_str(p.data.get()).map_err(io::Error::other)?;
        compacted = serde_json::value::to_raw_value(&value).map_err(io::Error::other)?;
        &compacted
    } else {
        &p.data
    };
    let mut line = serde_json::to_vec(&Line { channel, offset: p.offset, data }).map_err(io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

/// Changes the log filter of a running `herald serve` (on reload); `None` when `RUST_LOG`
/// set it, which then stays.
type LogFilter =
    Option<tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>>;

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<LogFilter> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::EnvFilter;
    let (filter, from_env) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => (EnvFilter::try_new(v).context("invalid RUST_LOG")?, true),
        _ => (EnvFilter::try_new(level).context("invalid log.level")?, false),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    use std::io::IsTerminal as _;
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    Ok((!from_env).then_some(handle))
}

/// Every connection is a file descriptor: lift the soft limit to the hard one.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("interrupt received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_history_is_a_json_line_a_program_can_see() {
        let mut out = Vec::new();
        print_reset(&mut out, "news", "e2", 7, "epoch_changed").expect("write");
        let line: serde_json::Value = serde_json::from_slice(&out).expect("one JSON line");
        assert_eq!(
            line,
            serde_json::json!({"channel": "news", "reset": {"epoch": "e2", "offset": 7, "reason": "epoch_changed"}})
        );
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    }
}
