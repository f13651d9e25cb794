//! The `herald` command: process setup (logging, signals, limits) around the `herald` library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use herald::config::{self, LogFormat, Overrides};

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
    CheckConfig(ServeArgs),
    /// Print the version.
    Version,
}

#[derive(Debug, Clone, Args)]
struct ServeArgs {
    /// TOML configuration file (see config/herald.example.toml).
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:8080 (overrides `listen`).
    #[arg(long, value_name = "ADDR", global = true)]
    listen: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(merge(cli.serve, args)),
        Some(Command::CheckConfig(args)) => check_config(merge(cli.serve, args)),
        Some(Command::Version) => {
            println!("herald {}", herald::VERSION);
            Ok(())
        }
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
    ServeArgs { config: inner.config.or(outer.config), listen: inner.listen.or(outer.listen) }
}

fn load(args: &ServeArgs) -> anyhow::Result<config::Loaded> {
    let overrides = Overrides { listen: args.listen };
    Ok(config::load(args.config.as_deref(), &overrides)?)
}

fn check_config(args: ServeArgs) -> anyhow::Result<()> {
    let loaded = load(&args)?;
    print!("{}", loaded.explain());
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let loaded = load(&args)?;
    let config = loaded.config;
    init_logging(&config.log.level, config.log.format)?;
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        if config.testing.echo {
            tracing::warn!("testing.echo is on: /_echo echoes every message (for conformance runs only)");
        }
        herald::server::run(config, listener, shutdown_signal()).await.context("server failed")
    })?;
    tracing::info!("stopped");
    Ok(())
}

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v).context("invalid RUST_LOG")?,
        _ => EnvFilter::try_new(level).context("invalid log.level")?,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
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
