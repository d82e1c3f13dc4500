//! `meshgate import <file>`: registers every server of a Claude Desktop /
//! Cursor style `mcpServers` file as a managed upstream, through a running
//! gateway's `/api/v1/upstreams` (`--url`), or straight into the data
//! directory's store (used at the gateway's next start).

use std::path::PathBuf;

use anyhow::Context;
use meshgate_core::import::{ImportOptions, parse_mcp_servers};
use meshgate_core::{Config, UpstreamConfig};

/// Arguments of `meshgate import`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// The `mcpServers` JSON file (e.g. claude_desktop_config.json, .cursor/mcp.json).
    pub file: PathBuf,
    /// A running gateway to register them with (e.g. http://127.0.0.1:8080);
    /// without it they are written to the data directory.
    #[arg(long)]
    pub url: Option<String>,
    /// API key for --url (scope upstreams:write; stdio servers need tenants:*).
    #[arg(long, env = "MESHGATE_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Tenant of the upstreams (default: the key's tenant, or `default`).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Offer the upstreams to every tenant.
    #[arg(long)]
    pub shared: bool,
    /// Prepended to every upstream name.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Replace upstreams that already exist with the same name.
    #[arg(long)]
    pub replace: bool,
    /// Show what would be imported and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Configuration file (TOML) for `data_dir` and the namespacing separator.
    #[arg(long, env = "MESHGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`; without --url).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

fn load(args: &ImportArgs) -> anyhow::Result<Config> {
    let path = match &args.config {
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from("meshgate.toml")).filter(|p| p.exists()),
    };
    let mut config = match &path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            Config::from_toml(&text, &p.display().to_string())?
        }
        None => Config::default(),
    };
    // As `meshgate serve` reads it, so both use the same data directory.
    config.apply_env(std::env::vars())?;
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    Ok(config)
}

/// Runs the import; the summary goes to stdout, one line per server.
pub async fn run(args: ImportArgs) -> anyhow::Result<()> {
    let config = load(&args)?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let opts = ImportOptions {
        tenant: args.tenant.clone(),
        shared: args.shared,
        prefix: args.prefix.clone(),
        separator: config.namespacing.separator.clone(),
    };
    let items = parse_mcp_servers(&text, &opts)
        .with_context(|| format!("cannot import {}", args.file.display()))?;
    let mut ready = Vec::new();
    let mut failed = 0;
    for item in items {
        let up = item.upstream.and_then(|up| {
            let mut errors = Vec::new();
            up.check("upstream", &config.namespacing.separator, &mut errors);
            match errors.first() {
                None => Ok(up),
                Some(e) => Err(e.to_string()),
            }
        });
        match up {
            Ok(up) => {
                for n in &item.notes {
                    println!("  note: {}: {n}", item.source_name);
                }
                ready.push((item.source_name, up));
            }
            Err(e) => {
                failed += 1;
                println!("skipped {}: {e}", item.source_name);
            }
        }
    }
    if args.dry_run {
        for (source, up) in &ready {
            println!(
                "would import {source} as `{}` ({})",
                up.name,
                serde_json::to_value(up.transport)?.as_str().unwrap_or("?")
            );
        }
        return Ok(());
    }
    let imported = match &args.url {
        Some(url) => via_api(&args, url, &ready).await?,
        None => into_store(&args, &config, &ready).await?,
    };
    println!(
        "imported {imported} of {} server(s) from {}{}",
        ready.len() + failed,
        args.file.display(),
        if failed > 0 {
            format!("; {failed} skipped (see above)")
        } else {
            String::new()
        }
    );
    if imported < ready.len() || failed > 0 {
        anyhow::bail!("not every server was imported");
    }
    Ok(())
}

async fn via_api(
    args: &ImportArgs,
    url: &str,
    ready: &[(String, UpstreamConfig)],
) -> anyhow::Result<usize> {
    let base = url.trim_end_matches('/');
    let client = reqwest::Client::new();
    let auth = |r: reqwest::RequestBuilder| match &args.key {
        Some(k) => r.bearer_auth(k),
        None => r,
    };
    let mut imported = 0;
    for (source, up) in ready {
        let mut body = serde_json::to_value(up)?;
        if args.tenant.is_none()
            && let Some(o) = body.as_object_mut()
        {
            // The gateway fills in the caller's tenant.
            o.remove("tenant");
        }
        let sent = auth(client.post(format!("{base}/api/v1/upstreams")))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {base}"))?;
        let sent = if sent.status() == reqwest::StatusCode::CONFLICT && args.replace {
            auth(client.put(format!("{base}/api/v1/upstreams/{}", up.name)))
                .json(&body)
                .send()
                .await
                .with_context(|| format!("cannot reach the gateway at {base}"))?
        } else {
            sent
        };
        let status = sent.status();
        let answer: serde_json::Value = sent.json().await.unwrap_or_default();
        if status.is_success() {
            imported += 1;
            println!("imported {source} as `{}`", up.name);
        } else {
            let why = answer["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| answer.to_string());
            println!("failed {source} (`{}`): {status}: {why}", up.name);
        }
    }
    Ok(imported)
}

async fn into_store(
    args: &ImportArgs,
    config: &Config,
    ready: &[(String, UpstreamConfig)],
) -> anyhow::Result<usize> {
    use meshgate_store::Store;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let store = meshgate_store::SqliteStore::open(&config.data_dir).await?;
    let existing = store.list_upstreams().await?;
    let mut imported = 0;
    for (source, up) in ready {
        if let Some(row) = existing.iter().find(|r| r.name == up.name) {
            if row.source != "api" {
                println!(
                    "failed {source} (`{}`): the configuration file defines an upstream with this name; use --prefix",
                    up.name
                );
                continue;
            }
            if !args.replace {
                println!(
                    "failed {source} (`{}`): a managed upstream has this name; use --replace or --prefix",
                    up.name
                );
                continue;
            }
        }
        let row =
            meshgate_server::managed::record(up, meshgate_server::gateway::UpstreamSource::Api)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        store.upsert_upstream(&row).await?;
        imported += 1;
        println!("imported {source} as `{}`", up.name);
    }
    if imported > 0 {
        println!(
            "written to {}; a running gateway picks them up when it restarts (or import with --url to add them now)",
            config.data_dir.display()
        );
    }
    Ok(imported)
}
