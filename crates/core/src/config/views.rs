//! `[[virtual_servers]]`: named, tenant-scoped views over the upstreams,
//! served at `/servers/{name}/mcp`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// One virtual server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualServerConfig {
    /// Its name: the `{name}` of `/servers/{name}/mcp`.
    pub name: String,
    /// The tenant whose principals may use it.
    #[serde(default = "super::default_tenant")]
    pub tenant: String,
    /// Offered to every tenant (each still sees only the upstreams it may use).
    #[serde(default)]
    pub shared: bool,
    /// Upstreams it draws from (names); empty: every upstream the caller may use.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Globs on the gateway's exposed tool names; a tool is in the view only
    /// when it matches one (empty: every tool).
    #[serde(default)]
    pub include: Vec<String>,
    /// Globs on exposed tool names taken out of the view (exclude wins).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Exposed tool name → the name clients of this view see and call.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Exposed tool name → the description clients of this view see.
    #[serde(default)]
    pub descriptions: BTreeMap<String, String>,
    /// Most tools `tools/list` shows (in name order); the rest stay
    /// callable and findable with `tools_search`.
    #[serde(default)]
    pub max_tools: Option<usize>,
}

fn valid_tool_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Checks every virtual server.
pub(super) fn validate(views: &[VirtualServerConfig], errors: &mut Vec<ConfigError>) {
    let mut seen = std::collections::HashSet::new();
    for (i, v) in views.iter().enumerate() {
        let k = |f: &str| format!("virtual_servers[{i}].{f}");
        let name_ok = !v.name.is_empty()
            && v.name.len() <= 64
            && v.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            errors.push(invalid(
                &k("name"),
                &v.name,
                "must be 1 to 64 characters from A-Z a-z 0-9 - _ (it is a URL path segment)",
            ));
        } else if !seen.insert(v.name.as_str()) {
            errors.push(invalid(
                &k("name"),
                &v.name,
                "is used by another virtual server; names must be unique",
            ));
        }
        if !super::valid_tenant(&v.tenant) {
            errors.push(invalid(&k("tenant"), &v.tenant, super::TENANT_RULE));
        }
        for (field, globs) in [("include", &v.include), ("exclude", &v.exclude)] {
            for (j, g) in globs.iter().enumerate() {
                if let Err(e) = globset::Glob::new(g) {
                    errors.push(invalid(
                        &k(&format!("{field}[{j}]")),
                        g,
                        &format!("is not a valid glob ({e}); use *, ?, [abc]"),
                    ));
                }
            }
        }
        let mut targets = std::collections::HashSet::new();
        for (from, to) in &v.rename {
            if !valid_tool_name(to) {
                errors.push(invalid(
                    &k(&format!("rename.{from}")),
                    to,
                    "must be a valid MCP tool name: 1 to 128 of A-Z a-z 0-9 _ - .",
                ));
            }
            if !targets.insert(to.as_str()) {
                errors.push(invalid(
                    &k(&format!("rename.{from}")),
                    to,
                    "is the new name of another tool too; each new name must be unique",
                ));
            }
        }
        if v.max_tools == Some(0) {
            errors.push(invalid(
                &k("max_tools"),
                "0",
                "must be at least 1 (leave it out for no limit)",
            ));
        }
    }
}
