//! The `meshgate` binary: command-line parsing and wiring, nothing else.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshgate_core::{Config, LogFormat};

/// MCP gateway and agent mesh in one binary.
#[derive(Parser)]
#[command(name = "meshgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Load the configuration, validate it, and print the effective settings.
    CheckConfig(ServeArgs),
    /// Measure tools/call throughput and latency against an MCP endpoint.
    Bench(meshgate_bench::BenchArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML). Default: ./meshgate.toml when it exists.
    #[arg(long, env = "MESHGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log format: json or human (overrides `log.format`).
    #[arg(long)]
    log_format: Option<String>,
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let path = match &args.config {
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from("meshgate.toml")).filter(|p| p.exists()),
    };
    let mut config = match &path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| {
                format!(
                    "cannot read config file {} (from --config or MESHGATE_CONFIG)",
                    p.display()
                )
            })?;
            Config::from_toml(&text, &p.display().to_string())?
        }
        None => Config::default(),
    };
    config.apply_env(std::env::vars())?;
    if let Some(l) = &args.listen {
        config.listen = l.clone();
    }
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(f) = &args.log_format {
        config.log.format = LogFormat::parse(f).ok_or_else(|| {
            anyhow::anyhow!("--log-format {f:?} is not allowed; use json or human")
        })?;
    }
    if let Some(p) = &path {
        resolve_relative(&mut config, p);
    }
    config.validate()?;
    Ok(config)
}

/// Relative stdio `cwd` entries are relative to the config file's folder.
fn resolve_relative(config: &mut Config, file: &Path) {
    let base = file.parent().unwrap_or(Path::new("."));
    for up in &mut config.upstreams {
        if let Some(cwd) = &up.cwd
            && cwd.is_relative()
        {
            up.cwd = Some(base.join(cwd));
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level).unwrap_or_else(|e| {
        eprintln!(
            "log.level {:?} is not a valid filter ({e}); using info",
            config.log.level
        );
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Human => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::CheckConfig(args) => load_config(&args).and_then(|c| {
            println!("{}", toml_like(&c)?);
            Ok(())
        }),
        Command::Bench(args) => runtime().and_then(|rt| rt.block_on(meshgate_bench::run_cli(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn toml_like(c: &Config) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(c)?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    init_logging(&config);
    let metrics = meshgate_server::serve::install_metrics()?;
    runtime()?.block_on(meshgate_server::serve::run(config, metrics))
}
