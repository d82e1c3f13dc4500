//! The `meshgate` binary: command-line parsing and wiring, nothing else.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshgate_core::{Config, LogFormat};

mod frame_cmd;
mod import_cmd;
mod stdio_bridge;

/// jemalloc rather than the system allocator: under concurrent calls glibc's
/// malloc spent about a fifth of the gateway's CPU consolidating and
/// unlinking free chunks across threads; jemalloc's per-thread caches and
/// arenas roughly halve the gateway's CPU per proxied call at concurrency 16
/// (ARCHITECTURE.md, "Memory allocator").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Measure agent-mesh task assignment throughput and latency.
    BenchMesh(meshgate_bench::mesh::MeshBenchArgs),
    /// Manage API keys directly in the data directory (works while the gateway runs).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Decode or encode a binary (MCPW) agent frame.
    Frame {
        #[command(subcommand)]
        command: frame_cmd::FrameCommand,
    },
    /// Register every server of a Claude Desktop / Cursor `mcpServers` file as an upstream.
    Import(import_cmd::ImportArgs),
    /// Relay MCP between stdin/stdout (for clients that only speak stdio) and a remote gateway.
    Stdio(stdio_bridge::StdioArgs),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it (the only time it is shown).
    Create(KeysCreateArgs),
    /// List keys (never the keys themselves).
    List(KeysListArgs),
    /// Revoke a key by id (`key_…`); tokens issued from it stop working too.
    Revoke(KeysRevokeArgs),
}

#[derive(clap::Args)]
struct StoreArgs {
    /// Configuration file (TOML); only `data_dir` is used. Default: ./meshgate.toml when it exists.
    #[arg(long, env = "MESHGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct KeysCreateArgs {
    /// A name that says who or what uses the key.
    #[arg(long)]
    name: String,
    /// admin, operator, developer, agent or viewer.
    #[arg(long, default_value = "developer")]
    role: String,
    /// Tenant the key belongs to.
    #[arg(long, default_value = meshgate_core::DEFAULT_TENANT)]
    tenant: String,
    /// A scope (repeatable); default: every scope of the role.
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Lifetime, e.g. 3600, 90m, 12h, 30d; default: no expiry.
    #[arg(long)]
    expires_in: Option<String>,
    /// Requests per minute allowed for this key.
    #[arg(long)]
    rate_limit: Option<u32>,
    /// Print the key record as JSON (with the key) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(clap::Args)]
struct KeysListArgs {
    /// Only this tenant's keys.
    #[arg(long)]
    tenant: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(clap::Args)]
struct KeysRevokeArgs {
    /// The key id (`key_…`, as `meshgate keys list` shows).
    id: String,
    #[command(flatten)]
    store: StoreArgs,
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

/// The configuration file: `--config`, else `./meshgate.toml` when it exists.
fn config_path(args: &ServeArgs) -> Option<PathBuf> {
    match &args.config {
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from("meshgate.toml")).filter(|p| p.exists()),
    }
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let path = config_path(args);
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

/// Relative stdio `cwd` entries and `jwks_file` paths are relative to the
/// config file's folder.
fn resolve_relative(config: &mut Config, file: &Path) {
    let base = file.parent().unwrap_or(Path::new("."));
    for issuer in &mut config.auth.oauth.issuers {
        if let Some(f) = &issuer.jwks_file
            && f.is_relative()
        {
            issuer.jwks_file = Some(base.join(f));
        }
    }
    for up in &mut config.upstreams {
        if let Some(cwd) = &up.cwd
            && cwd.is_relative()
        {
            up.cwd = Some(base.join(cwd));
        }
    }
}

fn init_logging(config: &Config) {
    // rmcp logs every message it receives at info; unless the operator
    // says otherwise, only its warnings reach the gateway's log.
    let level = if config.log.level.contains("rmcp") {
        config.log.level.clone()
    } else {
        format!("{},rmcp=warn", config.log.level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level).unwrap_or_else(|e| {
        eprintln!(
            "log.level {:?} is not a valid filter ({e}); using info",
            config.log.level
        );
        tracing_subscriber::EnvFilter::new("info")
    });
    let initial = filter.to_string();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => {
            let builder = builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_filter_reloading();
            install_log_control(&initial, builder.reload_handle());
            builder.init()
        }
        LogFormat::Human => {
            let builder = builder.with_filter_reloading();
            install_log_control(&initial, builder.reload_handle());
            builder.init()
        }
    }
}

/// Lets `PUT /admin/log-level` replace the filter of the running subscriber.
fn install_log_control<S: 'static>(
    initial: &str,
    handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
) {
    meshgate_server::admin::install_log_control(
        initial,
        Box::new(move |new| {
            let filter = tracing_subscriber::EnvFilter::try_new(new).map_err(|e| e.to_string())?;
            let shown = filter.to_string();
            handle.reload(filter).map_err(|e| e.to_string())?;
            Ok(shown)
        }),
    );
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
        Command::BenchMesh(args) => {
            runtime().and_then(|rt| rt.block_on(meshgate_bench::mesh::run_cli(args)))
        }
        Command::Keys { command } => runtime().and_then(|rt| rt.block_on(keys(command))),
        Command::Frame { command } => return frame_cmd::run(command),
        Command::Stdio(args) => stdio_bridge::run(args),
        Command::Import(args) => runtime().and_then(|rt| rt.block_on(import_cmd::run(args))),
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
    let reloader = meshgate_server::reload::Reloader {
        file: config_path(&args),
        load: std::sync::Arc::new(move || load_config(&args)),
    };
    runtime()?.block_on(meshgate_server::serve::run_with(
        config,
        metrics,
        Some(reloader),
    ))
}

/// The data directory named by `--data-dir`, or by the configuration.
fn data_dir_of(args: &StoreArgs) -> anyhow::Result<PathBuf> {
    if let Some(d) = &args.data_dir {
        return Ok(d.clone());
    }
    let serve = ServeArgs {
        config: args.config.clone(),
        listen: None,
        data_dir: None,
        log_format: None,
    };
    Ok(load_config(&serve)?.data_dir)
}

/// Parses `3600`, `90s`, `90m`, `12h`, `30d` into seconds.
fn parse_duration_secs(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| {
        anyhow::anyhow!(
            "--expires-in {s:?}: expected a number with an optional unit s, m, h or d (e.g. 30d)"
        )
    })?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => anyhow::bail!("--expires-in {s:?}: unknown unit {other:?}; use s, m, h or d"),
    };
    if n == 0 {
        anyhow::bail!("--expires-in must be more than 0 (omit it for a key that never expires)");
    }
    Ok(n.saturating_mul(mult))
}

fn cli_audit(
    tenant: &str,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> meshgate_store::AuditRecord {
    meshgate_store::AuditRecord {
        id: 0,
        at: meshgate_store::now_ms(),
        tenant: tenant.to_owned(),
        actor: std::env::var("USER").unwrap_or_else(|_| "cli".into()),
        actor_kind: "cli".into(),
        action: action.to_owned(),
        target: target.to_owned(),
        args_hash: None,
        outcome: "ok".into(),
        latency_ms: None,
        trace_id: None,
        detail,
    }
}

async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    use meshgate_server::auth::{NewKey, create_key, rfc3339};
    use meshgate_store::Store;
    let args = match &command {
        KeysCommand::Create(a) => &a.store,
        KeysCommand::List(a) => &a.store,
        KeysCommand::Revoke(a) => &a.store,
    };
    let dir = data_dir_of(args)?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let store = meshgate_store::SqliteStore::open(&dir).await?;
    match command {
        KeysCommand::Create(a) => {
            let role = meshgate_core::Role::parse(&a.role).ok_or_else(|| {
                anyhow::anyhow!(
                    "--role {:?} is unknown; use one of {}",
                    a.role,
                    meshgate_core::auth::Role::ALLOWED
                )
            })?;
            let expires_at = match &a.expires_in {
                Some(e) => Some(
                    meshgate_store::now_ms()
                        .saturating_add((parse_duration_secs(e)? * 1000) as i64),
                ),
                None => None,
            };
            let (key, record) = create_key(
                &store,
                NewKey {
                    name: a.name,
                    tenant: a.tenant,
                    role,
                    scopes: (!a.scopes.is_empty()).then_some(a.scopes),
                    expires_at,
                    rate_limit_per_minute: a.rate_limit,
                    created_by: "cli".into(),
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
            store
                .append_audit(&[cli_audit(
                    &record.tenant,
                    "key.create",
                    &record.id,
                    serde_json::json!({"role": record.role, "scopes": record.scopes, "name": record.name}),
                )])
                .await?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"key": key, "id": record.id, "name": record.name, "tenant": record.tenant, "role": record.role, "scopes": record.scopes, "expires_at": record.expires_at.map(rfc3339)})
                );
            } else {
                println!("{key}");
                eprintln!(
                    "created {} ({}, tenant {}, role {}, scopes {}{}); the key above is shown only once",
                    record.id,
                    record.name,
                    record.tenant,
                    record.role,
                    record.scopes.join(" "),
                    record
                        .expires_at
                        .map(|e| format!(", expires {}", rfc3339(e)))
                        .unwrap_or_default()
                );
            }
        }
        KeysCommand::List(a) => {
            let keys = store.list_api_keys(a.tenant.as_deref()).await?;
            let now = meshgate_store::now_ms();
            let status = |k: &meshgate_store::ApiKeyRecord| {
                if k.revoked_at.is_some() {
                    "revoked"
                } else if k.expires_at.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                }
            };
            if a.json {
                let rows: Vec<_> = keys
                    .iter()
                    .map(|k| serde_json::json!({"id": k.id, "name": k.name, "prefix": k.prefix, "tenant": k.tenant, "role": k.role, "scopes": k.scopes, "status": status(k), "created_at": rfc3339(k.created_at), "expires_at": k.expires_at.map(rfc3339), "revoked_at": k.revoked_at.map(rfc3339), "last_used_at": k.last_used_at.map(rfc3339)}))
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<21} {:<8} {:<12} {:<10} {:<9} {:<10} NAME",
                    "ID", "STATUS", "TENANT", "ROLE", "PREFIX", "LAST USED"
                );
                for k in &keys {
                    println!(
                        "{:<21} {:<8} {:<12} {:<10} {:<9} {:<10} {}",
                        k.id,
                        status(k),
                        k.tenant,
                        k.role,
                        k.prefix,
                        k.last_used_at
                            .map(|t| rfc3339(t)[..10].to_owned())
                            .unwrap_or_else(|| "never".into()),
                        k.name
                    );
                }
            }
        }
        KeysCommand::Revoke(a) => {
            let Some(record) = store.get_api_key(&a.id).await? else {
                anyhow::bail!(
                    "no key {:?} in {}; `meshgate keys list` shows the ids",
                    a.id,
                    dir.display()
                );
            };
            let now = meshgate_store::now_ms();
            let revoked = store.revoke_api_key(&a.id, now).await?;
            let families = store.revoke_refresh_families_of_key(&a.id, now).await?;
            store
                .append_audit(&[cli_audit(
                    &record.tenant,
                    "key.revoke",
                    &record.id,
                    serde_json::json!({"token_families_revoked": families.len()}),
                )])
                .await?;
            if revoked {
                println!(
                    "revoked {} ({}); a running gateway refuses it within 5 seconds",
                    record.id, record.name
                );
            } else {
                println!("{} was already revoked", record.id);
            }
        }
    }
    Ok(())
}
