//! The `[tools]` section: how the gateway treats the tools it federates
//! (argument and output validation, result caching, discovery at scale).

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// Gateway-wide tool settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolsConfig {
    /// Check `tools/call` arguments against the tool's `inputSchema` before
    /// they leave the gateway.
    pub validate_arguments: bool,
    /// Check structured results against the tool's `outputSchema` (a
    /// mismatch is logged and counted, never refused).
    pub check_output_schema: bool,
    /// When a caller may use more tools than this, `tools/list` also offers
    /// the built-in `tools_search` tool (0: always offer it).
    pub search_threshold: usize,
    /// Most results cached across all tools (the oldest go first).
    pub cache_max_entries: usize,
    /// Most bytes of cached results across all tools.
    pub cache_max_bytes: usize,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        ToolsConfig {
            validate_arguments: true,
            check_output_schema: true,
            search_threshold: 50,
            cache_max_entries: 10_000,
            cache_max_bytes: 64 * 1024 * 1024,
        }
    }
}

impl ToolsConfig {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.cache_max_entries == 0 {
            errors.push(invalid(
                "tools.cache_max_entries",
                "0",
                "must be at least 1 (caching is enabled per tool with an upstream's cache_ttl_secs)",
            ));
        }
        if self.cache_max_bytes < 1024 {
            errors.push(invalid(
                "tools.cache_max_bytes",
                &self.cache_max_bytes.to_string(),
                "must be at least 1024",
            ));
        }
    }
}
