//! Reloading the configuration file's upstreams while the gateway runs: on
//! `SIGHUP`, and when the file's content changes (checked every 2 s).
//!
//! The file is loaded exactly as at start-up (file, `MESHGATE_*`
//! variables, flags, validation); an invalid file changes nothing and is
//! reported in the log and in `gateway_config_reloads_total{outcome}`. Only
//! `[[upstreams]]` take effect at run time (see
//! [`Gateway::apply_config_upstreams`]); other changed settings are named
//! in a warning and apply at the next start.
//!
//! Why polling rather than inotify (the `notify` crate): one small file,
//! read every 2 s, costs nothing, works the same on every platform and
//! through editors' rename-on-save and Kubernetes' symlinked ConfigMaps,
//! and adds no dependency.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshgate_core::Config;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

/// Loads the configuration again, the way the binary did at start-up.
pub type LoadConfig = Arc<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// What the reload task needs.
pub struct Reloader {
    /// The configuration file, watched for changes (none: only `SIGHUP`).
    pub file: Option<PathBuf>,
    /// Loads the whole configuration.
    pub load: LoadConfig,
}

fn fingerprint(file: &PathBuf) -> Option<[u8; 32]> {
    std::fs::read(file).ok().map(|b| Sha256::digest(&b).into())
}

/// Runs until `shutdown`.
pub async fn run(gw: Arc<Gateway>, reloader: Reloader, shutdown: CancellationToken) {
    let mut last = reloader.file.as_ref().and_then(fingerprint);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<()>();
        let why = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup => "SIGHUP",
            _ = tick.tick() => {
                let Some(file) = &reloader.file else { continue };
                let now = fingerprint(file);
                // A file that vanished for a moment (an editor replacing
                // it) is not a change to apply.
                if now.is_none() || now == last {
                    continue;
                }
                "the file changed"
            }
        };
        last = reloader.file.as_ref().and_then(fingerprint);
        reload(&gw, &reloader, why).await;
    }
}

/// Loads and applies the configuration once.
pub async fn reload(gw: &Arc<Gateway>, reloader: &Reloader, why: &str) {
    let new = match (reloader.load)() {
        Ok(c) => c,
        Err(e) => {
            metrics::counter!("gateway_config_reloads_total", "outcome" => "invalid").increment(1);
            tracing::error!(trigger = why, error = %format!("{e:#}"), "configuration reload refused; the running configuration stays in force: fix the file and save it again (or send SIGHUP)");
            return;
        }
    };
    let restart_only = changed_sections(&gw.config, &new);
    if !restart_only.is_empty() {
        tracing::warn!(
            sections = %restart_only.join(", "),
            "these settings changed in the file but apply only at the next start; [[upstreams]] apply now"
        );
    }
    match gw.apply_config_upstreams(&new.upstreams).await {
        Ok(report) => {
            metrics::counter!("gateway_config_reloads_total", "outcome" => "applied").increment(1);
            tracing::info!(
                trigger = why,
                added = ?report.added,
                changed = ?report.changed,
                removed = ?report.removed,
                unchanged = report.unchanged,
                conflicts = ?report.conflicts,
                "configuration reloaded"
            );
        }
        Err(e) => {
            metrics::counter!("gateway_config_reloads_total", "outcome" => "invalid").increment(1);
            tracing::error!(trigger = why, error = %e, "configuration reload refused; the running upstreams stay as they are");
        }
    }
}

/// The top-level settings other than `upstreams` that differ.
fn changed_sections(old: &Config, new: &Config) -> Vec<&'static str> {
    // Exhaustive, so that a new section has to be listed here.
    let Config {
        listen: _,
        data_dir: _,
        log: _,
        mcp: _,
        namespacing: _,
        upstreams: _,
        shutdown_grace_secs: _,
        auth: _,
        rate_limits: _,
        backpressure: _,
        mesh: _,
        tools: _,
        virtual_servers: _,
    } = new;
    let mut out = Vec::new();
    let mut check = |name: &'static str, same: bool| {
        if !same {
            out.push(name);
        }
    };
    check("listen", old.listen == new.listen);
    check("data_dir", old.data_dir == new.data_dir);
    check("log", old.log == new.log);
    check("mcp", old.mcp == new.mcp);
    check("namespacing", old.namespacing == new.namespacing);
    check(
        "shutdown_grace_secs",
        old.shutdown_grace_secs == new.shutdown_grace_secs,
    );
    check("auth", old.auth == new.auth);
    check("rate_limits", old.rate_limits == new.rate_limits);
    check("backpressure", old.backpressure == new.backpressure);
    check("mesh", old.mesh == new.mesh);
    check("tools", old.tools == new.tools);
    check(
        "virtual_servers",
        old.virtual_servers == new.virtual_servers,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sections_other_than_upstreams_are_named_as_needing_a_restart() {
        let old = Config::default();
        let mut new = Config::default();
        assert!(changed_sections(&old, &new).is_empty());
        new.listen = "127.0.0.1:9".into();
        new.tools.search_threshold = 3;
        assert_eq!(changed_sections(&old, &new), vec!["listen", "tools"]);
    }
}
