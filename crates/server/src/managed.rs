//! Changing the upstream set of a running gateway: upstreams created,
//! replaced and deleted through `/api/v1/upstreams` (kept in the store as
//! source `api`), and the configuration file's upstreams applied again on a
//! reload (source `config`).
//!
//! Every change runs under one lock. An API change writes the store first
//! (so a failed write changes nothing); a reload applies the file (the
//! file, not the store, is the source of configured upstreams) and then
//! records it. The change swaps the upstream in the set, closes the old
//! upstream's connections (its stdio processes end), rebuilds the catalog
//! and tells every session its lists changed. Sessions keep their
//! connections to every other upstream: a change touches only the upstream
//! it names.

use std::sync::Arc;

use meshgate_core::{ConfigError, Namer, UpstreamConfig};
use meshgate_store::{UpstreamRecord, now_ms};
use thiserror::Error;

use crate::gateway::{Gateway, Upstream, UpstreamSource};
use crate::upstream::ListKind;

/// What stands in for a secret value (header, environment) in API output.
pub const MASK: &str = "***";

/// Why a change of the upstream set was refused.
#[derive(Debug, Error)]
pub enum ManageError {
    /// The definition has invalid settings.
    #[error("{0}")]
    Invalid(ConfigError),
    /// Another upstream has the name.
    #[error(
        "an upstream named `{0}` already exists; choose another name, or change that one with PUT/PATCH /api/v1/upstreams/{0}"
    )]
    Exists(String),
    /// No upstream has the name.
    #[error("no upstream named `{0}`; GET /api/v1/upstreams lists them")]
    NotFound(String),
    /// The upstream comes from the configuration file.
    #[error(
        "upstream `{0}` is defined in the configuration file; change it there and reload (SIGHUP, or save the file: it is watched)"
    )]
    FromConfig(String),
    /// The store refused the write; nothing changed.
    #[error("cannot store the upstream definition: {0}; nothing was changed")]
    Store(String),
}

/// What a configuration reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// Upstreams that appeared.
    pub added: Vec<String>,
    /// Upstreams whose definition changed (reconnected).
    pub changed: Vec<String>,
    /// Upstreams that disappeared.
    pub removed: Vec<String>,
    /// Upstreams left as they were.
    pub unchanged: usize,
    /// Configuration upstreams not applied because a managed upstream
    /// holds the name.
    pub conflicts: Vec<String>,
}

/// `up` with every header and environment value replaced by [`MASK`].
pub fn masked(up: &UpstreamConfig) -> UpstreamConfig {
    let mut up = up.clone();
    for v in up.headers.values_mut().chain(up.env.values_mut()) {
        *v = MASK.into();
    }
    up
}

/// `new` with every header or environment value that is [`MASK`] taken
/// from `old` (a client that read a masked definition and sends it back
/// keeps the secrets it could not see). Refused when the secrets would go
/// somewhere else: a masked value with a changed `url`, `command`,
/// `transport` or `cwd` (else whoever may edit an upstream could point it
/// at their own server and receive the stored credentials).
pub fn unmask(mut new: UpstreamConfig, old: &UpstreamConfig) -> Result<UpstreamConfig, String> {
    let masked_any = new
        .headers
        .values()
        .chain(new.env.values())
        .any(|v| v == MASK);
    let moved = new.url != old.url
        || new.command != old.command
        || new.transport != old.transport
        || new.cwd != old.cwd;
    if masked_any && moved {
        return Err(
            "the definition changes where the upstream is (url, command, transport or cwd) but sends masked (`***`) header or env values: send those secrets again in full, so stored credentials never follow the upstream elsewhere".into(),
        );
    }
    for (k, v) in new.headers.iter_mut() {
        if v == MASK
            && let Some(kept) = old.headers.get(k)
        {
            v.clone_from(kept);
        }
    }
    for (k, v) in new.env.iter_mut() {
        if v == MASK
            && let Some(kept) = old.env.get(k)
        {
            v.clone_from(kept);
        }
    }
    Ok(new)
}

/// The store row of an upstream: a managed upstream's whole definition (it
/// is rebuilt from it at start-up), a configured one's masked (the file
/// holds the secrets).
pub fn record(up: &UpstreamConfig, source: UpstreamSource) -> Result<UpstreamRecord, ManageError> {
    let definition = match source {
        UpstreamSource::Api => serde_json::to_value(up),
        UpstreamSource::Config => serde_json::to_value(masked(up)),
    }
    .map_err(|e| ManageError::Store(e.to_string()))?;
    let now = now_ms();
    Ok(UpstreamRecord {
        name: up.name.clone(),
        source: source.label().into(),
        definition,
        created_at: now,
        updated_at: now,
    })
}

impl Gateway {
    /// Checks one upstream definition with the configuration's rules.
    pub fn check_upstream(&self, up: &UpstreamConfig) -> Result<(), ManageError> {
        let mut errors = Vec::new();
        up.check("upstream", &self.config.namespacing.separator, &mut errors);
        match errors.len() {
            0 => Ok(()),
            1 => Err(ManageError::Invalid(errors.remove(0))),
            _ => Err(ManageError::Invalid(ConfigError::Many(errors))),
        }
    }

    /// Adds a managed upstream; it connects in the background.
    pub async fn create_upstream(
        self: &Arc<Self>,
        cfg: UpstreamConfig,
    ) -> Result<Arc<Upstream>, ManageError> {
        self.check_upstream(&cfg)?;
        let _change = self.changing.lock().await;
        if self.upstreams.named(&cfg.name).is_some() {
            return Err(ManageError::Exists(cfg.name));
        }
        self.store
            .upsert_upstream(&record(&cfg, UpstreamSource::Api)?)
            .await
            .map_err(|e| ManageError::Store(e.to_string()))?;
        let up = self
            .upstreams
            .add(|id| Upstream::new(id, cfg, UpstreamSource::Api));
        tracing::info!(upstream = %up.config.name, "managed upstream created");
        self.upstreams_changed();
        Ok(up)
    }

    /// Replaces the definition of managed upstream `name` (reconnecting it).
    pub async fn update_upstream(
        self: &Arc<Self>,
        name: &str,
        cfg: UpstreamConfig,
    ) -> Result<Arc<Upstream>, ManageError> {
        self.check_upstream(&cfg)?;
        let _change = self.changing.lock().await;
        let old = self
            .upstreams
            .named(name)
            .ok_or_else(|| ManageError::NotFound(name.into()))?;
        if old.source == UpstreamSource::Config {
            return Err(ManageError::FromConfig(name.into()));
        }
        if cfg.name != name && self.upstreams.named(&cfg.name).is_some() {
            return Err(ManageError::Exists(cfg.name));
        }
        let mut row = record(&cfg, UpstreamSource::Api)?;
        if let Ok(rows) = self.store.list_upstreams().await
            && let Some(before) = rows.iter().find(|r| r.name == name)
        {
            row.created_at = before.created_at;
        }
        let stored = if cfg.name == name {
            self.store.upsert_upstream(&row).await
        } else {
            self.store.rename_upstream(name, &row).await
        };
        stored.map_err(|e| ManageError::Store(e.to_string()))?;
        let up = self.swap(&old, cfg, UpstreamSource::Api).await;
        tracing::info!(upstream = %up.config.name, "managed upstream updated");
        Ok(up)
    }

    /// Deletes managed upstream `name`: its connections close, its tools
    /// leave every session's lists.
    pub async fn delete_upstream(self: &Arc<Self>, name: &str) -> Result<(), ManageError> {
        let _change = self.changing.lock().await;
        let old = self
            .upstreams
            .named(name)
            .ok_or_else(|| ManageError::NotFound(name.into()))?;
        if old.source == UpstreamSource::Config {
            return Err(ManageError::FromConfig(name.into()));
        }
        self.forget_managed(name).await?;
        self.retire(&old).await;
        tracing::info!(upstream = %name, "managed upstream deleted");
        self.upstreams_changed();
        Ok(())
    }

    /// Deletes the stored row of a managed upstream this process did not
    /// load (its definition was invalid at start-up, or `meshgate import`
    /// wrote it while the gateway ran); true when there was one.
    pub async fn delete_unloaded_upstream(&self, name: &str) -> Result<bool, ManageError> {
        let _change = self.changing.lock().await;
        if self.upstreams.named(name).is_some() {
            return Ok(false);
        }
        let stored = self
            .store
            .list_upstreams()
            .await
            .map_err(|e| ManageError::Store(e.to_string()))?
            .iter()
            .any(|r| r.name == name && r.source == UpstreamSource::Api.label());
        if stored {
            self.forget_managed(name).await?;
            tracing::info!(upstream = %name, "deleted a stored managed upstream that was not loaded");
        }
        Ok(stored)
    }

    /// Applies the configuration file's upstreams after a reload: adds the
    /// new ones, reconnects the changed ones, removes the ones that are gone,
    /// and leaves the rest (and their sessions' connections) alone.
    pub async fn apply_config_upstreams(
        self: &Arc<Self>,
        wanted: &[UpstreamConfig],
    ) -> Result<ReloadReport, ManageError> {
        let mut errors = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, up) in wanted.iter().enumerate() {
            up.check(
                &format!("upstreams[{i}]"),
                &self.config.namespacing.separator,
                &mut errors,
            );
            if !seen.insert(up.name.as_str()) {
                errors.push(ConfigError::Invalid {
                    key: format!("upstreams[{i}].name"),
                    value: format!("{:?}", up.name),
                    allowed: "is used by another upstream; names must be unique".into(),
                });
            }
        }
        if !errors.is_empty() {
            return Err(ManageError::Invalid(if errors.len() == 1 {
                errors.remove(0)
            } else {
                ConfigError::Many(errors)
            }));
        }
        let _change = self.changing.lock().await;
        let mut report = ReloadReport::default();
        let current: Vec<Arc<Upstream>> = self.upstreams.iter().collect();
        for old in current
            .iter()
            .filter(|u| u.source == UpstreamSource::Config)
        {
            if !wanted.iter().any(|w| w.name == old.config.name) {
                self.retire(old).await;
                report.removed.push(old.config.name.clone());
            }
        }
        for cfg in wanted {
            match current.iter().find(|u| u.config.name == cfg.name) {
                Some(old) if old.source == UpstreamSource::Api => {
                    tracing::warn!(upstream = %cfg.name, "the configuration file names an upstream that a managed (API) upstream already holds; the managed one stays: rename or delete one of them");
                    report.conflicts.push(cfg.name.clone());
                }
                Some(old) if old.config == *cfg => report.unchanged += 1,
                Some(old) => {
                    self.swap(old, cfg.clone(), UpstreamSource::Config).await;
                    report.changed.push(cfg.name.clone());
                }
                None => {
                    self.upstreams
                        .add(|id| Upstream::new(id, cfg.clone(), UpstreamSource::Config));
                    report.added.push(cfg.name.clone());
                }
            }
        }
        for cfg in wanted
            .iter()
            .filter(|c| !report.conflicts.contains(&c.name))
        {
            if let Err(e) = self
                .store
                .upsert_upstream(&record(cfg, UpstreamSource::Config)?)
                .await
            {
                tracing::warn!(upstream = %cfg.name, error = %e, "cannot record the configured upstream in the store");
            }
        }
        let keep: Vec<String> = wanted.iter().map(|u| u.name.clone()).collect();
        if let Err(e) = self
            .store
            .prune_upstreams(UpstreamSource::Config.label(), &keep)
            .await
        {
            tracing::warn!(error = %e, "cannot prune removed configured upstreams from the store");
        }
        if !(report.added.is_empty() && report.changed.is_empty() && report.removed.is_empty()) {
            self.upstreams_changed();
        }
        Ok(report)
    }

    /// Deletes the stored row of managed upstream `name` and no other
    /// (rows this process never loaded, e.g. written by `meshgate import`
    /// while it runs, stay).
    async fn forget_managed(&self, name: &str) -> Result<(), ManageError> {
        self.store
            .delete_upstream(name, UpstreamSource::Api.label())
            .await
            .map_err(|e| ManageError::Store(e.to_string()))?;
        Ok(())
    }

    /// Replaces `old` by a new upstream built from `cfg` (a new id, new
    /// connections); the old one is retired.
    async fn swap(
        self: &Arc<Self>,
        old: &Arc<Upstream>,
        cfg: UpstreamConfig,
        source: UpstreamSource,
    ) -> Arc<Upstream> {
        self.retire(old).await;
        let up = self.upstreams.add(|id| Upstream::new(id, cfg, source));
        self.upstreams_changed();
        up
    }

    /// Takes `old` out of the set and closes everything it holds.
    async fn retire(&self, old: &Arc<Upstream>) {
        self.upstreams.remove(old.index);
        old.retire().await;
        self.cache
            .invalidate_upstream(&old.config.name, "upstream_changed");
        let closed = self.clients.drop_upstream_connections(old.index).await;
        tracing::debug!(upstream = %old.config.name, closed, "closed the sessions' connections of a retired upstream");
    }

    /// After the set changed: naming rules, catalog, sessions' lists.
    fn upstreams_changed(&self) {
        let enabled = self.upstreams.iter().filter(|u| u.config.enabled).count();
        let prefixing = self.namer.set(Namer::new(
            self.config.namespacing.prefix_mode,
            &self.config.namespacing.separator,
            enabled,
        ));
        if prefixing {
            tracing::info!(
                upstreams = enabled,
                "prefix mode `conditional`: the number of enabled upstreams crossed one, so every exposed name changes"
            );
        }
        self.rebuild_snapshot();
        for kind in [ListKind::Tools, ListKind::Prompts, ListKind::Resources] {
            let _ = self.changes.send(kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(name: &str) -> UpstreamConfig {
        let text = format!(
            "[[upstreams]]\nname = \"{name}\"\ntransport = \"streamable_http\"\nurl = \"http://127.0.0.1:1/mcp\"\n[upstreams.headers]\nAuthorization = \"Bearer s3cret\"\n[upstreams.env]\n"
        );
        meshgate_core::Config::from_toml(&text, "t.toml")
            .expect("parses")
            .upstreams
            .remove(0)
    }

    #[test]
    fn masked_definitions_hide_secrets_and_unmask_keeps_them() {
        let up = http("a");
        let shown = masked(&up);
        assert_eq!(shown.headers["Authorization"], MASK);
        let mut sent_back = shown.clone();
        sent_back.headers.insert("X-New".into(), "v".into());
        let merged = unmask(sent_back.clone(), &up).expect("same place");
        assert_eq!(merged.headers["Authorization"], "Bearer s3cret");
        assert_eq!(merged.headers["X-New"], "v");
        let mut moved = sent_back;
        moved.url = Some("https://attacker.example/mcp".into());
        let refused = unmask(moved, &up).expect_err("secrets must not follow a new url");
        assert!(refused.contains("send those secrets again"), "{refused}");
    }

    #[test]
    fn managed_records_keep_secrets_and_config_records_mask_them() {
        let up = http("a");
        let api = record(&up, UpstreamSource::Api).expect("record");
        assert_eq!(api.definition["headers"]["Authorization"], "Bearer s3cret");
        let cfg = record(&up, UpstreamSource::Config).expect("record");
        assert_eq!(cfg.definition["headers"]["Authorization"], MASK);
        assert_eq!(cfg.source, "config");
    }
}
