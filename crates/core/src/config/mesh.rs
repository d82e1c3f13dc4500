//! The `[mesh]` section: the agent endpoint, task defaults and limits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};
use crate::mesh::Strategy;

/// Settings of the agent mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Serves `/ws`, the task API and the mesh MCP tools.
    pub enabled: bool,
    /// How often the gateway pings an agent, in seconds.
    pub heartbeat_interval_secs: u64,
    /// Silence after which an agent is marked offline, in seconds.
    pub heartbeat_timeout_secs: u64,
    /// How long an agent's tasks wait for it to come back (after its
    /// connection dropped, or after a gateway restart) before they are
    /// queued again, in seconds.
    pub reconnect_grace_secs: u64,
    /// A task's timeout when the submitter names none, in seconds.
    pub default_timeout_secs: u64,
    /// Longest timeout a submitter may ask for, in seconds.
    pub max_timeout_secs: u64,
    /// A task's retry limit when the submitter names none.
    pub default_max_retries: u32,
    /// Concurrent tasks of an agent that names no limit.
    pub default_max_concurrent_tasks: u32,
    /// Routing strategy of tasks that name none and whose tenant has no default.
    pub default_strategy: Strategy,
    /// Per-tenant default strategies.
    pub tenant_strategies: BTreeMap<String, Strategy>,
    /// First retry delay of a rejected, failed or timed-out task, in ms.
    pub retry_backoff_initial_ms: u64,
    /// Longest retry delay, in ms.
    pub retry_backoff_max_ms: u64,
    /// Most a task's deadline can be extended in total, in seconds.
    pub max_extension_secs: u64,
    /// Largest `task.complete` message accepted, in bytes.
    pub max_result_bytes: usize,
    /// Results larger than this are stored as blobs, in bytes.
    pub blob_threshold_bytes: usize,
    /// Largest WebSocket message read from an agent, in bytes.
    pub max_message_bytes: usize,
    /// Messages per second one agent connection may send (burst: twice that).
    pub agent_messages_per_sec: u32,
    /// Terminal tasks older than this are purged, in seconds (0 keeps them).
    pub task_retention_secs: u64,
    /// Agents may switch to binary frames (`docs/binary-frames.md`).
    pub binary_enabled: bool,
    /// Binary messages of at least this many bytes are gzip-compressed when
    /// that makes them smaller (0: never), unless the agent asks otherwise.
    pub binary_compression_threshold: usize,
    /// Binary frames carry a CRC32 trailer unless the agent asks otherwise.
    pub binary_checksum: bool,
    /// Largest binary frame payload (on the wire), in bytes.
    pub binary_max_payload_bytes: usize,
    /// Largest binary frame payload after decompression, in bytes.
    pub binary_max_decompressed_bytes: usize,
    /// Bad binary frames one connection may send before it is closed (1008).
    pub binary_max_bad_frames: u32,
    /// Largest shared-state document (its CRDT state as JSON), in bytes.
    pub state_max_doc_bytes: usize,
    /// Most operations in one `state.apply`.
    pub state_max_ops: usize,
    /// Most shared-state documents per tenant.
    pub state_max_docs_per_tenant: usize,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            enabled: true,
            heartbeat_interval_secs: 15,
            heartbeat_timeout_secs: 45,
            reconnect_grace_secs: 10,
            default_timeout_secs: 300,
            max_timeout_secs: 86_400,
            default_max_retries: 3,
            default_max_concurrent_tasks: 4,
            default_strategy: Strategy::CapabilityMatch,
            tenant_strategies: BTreeMap::new(),
            retry_backoff_initial_ms: 1_000,
            retry_backoff_max_ms: 60_000,
            max_extension_secs: 3_600,
            max_result_bytes: 10 * 1024 * 1024,
            blob_threshold_bytes: 256 * 1024,
            max_message_bytes: 16 * 1024 * 1024,
            agent_messages_per_sec: 2_000,
            task_retention_secs: 7 * 86_400,
            binary_enabled: true,
            binary_compression_threshold: 1024,
            binary_checksum: true,
            binary_max_payload_bytes: 1024 * 1024,
            binary_max_decompressed_bytes: 10 * 1024 * 1024,
            binary_max_bad_frames: 5,
            state_max_doc_bytes: 4 * 1024 * 1024,
            state_max_ops: 1000,
            state_max_docs_per_tenant: 1000,
        }
    }
}

impl MeshConfig {
    /// The strategy for a task of `tenant` that names none.
    pub fn strategy_for(&self, tenant: &str) -> Strategy {
        self.tenant_strategies
            .get(tenant)
            .copied()
            .unwrap_or(self.default_strategy)
    }

    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        let mut at_least = |key: &str, v: u64, min: u64| {
            if v < min {
                errors.push(invalid(
                    &format!("mesh.{key}"),
                    &v.to_string(),
                    &format!("must be at least {min}"),
                ));
            }
        };
        at_least("heartbeat_interval_secs", self.heartbeat_interval_secs, 1);
        at_least("default_timeout_secs", self.default_timeout_secs, 1);
        at_least("max_timeout_secs", self.max_timeout_secs, 1);
        at_least(
            "default_max_concurrent_tasks",
            u64::from(self.default_max_concurrent_tasks),
            1,
        );
        at_least("retry_backoff_initial_ms", self.retry_backoff_initial_ms, 1);
        at_least("max_result_bytes", self.max_result_bytes as u64, 1024);
        at_least("max_message_bytes", self.max_message_bytes as u64, 1024);
        at_least(
            "agent_messages_per_sec",
            u64::from(self.agent_messages_per_sec),
            1,
        );
        at_least(
            "binary_max_payload_bytes",
            self.binary_max_payload_bytes as u64,
            1024,
        );
        at_least(
            "binary_max_bad_frames",
            u64::from(self.binary_max_bad_frames),
            1,
        );
        at_least("state_max_doc_bytes", self.state_max_doc_bytes as u64, 1024);
        at_least("state_max_ops", self.state_max_ops as u64, 1);
        at_least(
            "state_max_docs_per_tenant",
            self.state_max_docs_per_tenant as u64,
            1,
        );
        if self.binary_max_decompressed_bytes < self.binary_max_payload_bytes {
            errors.push(invalid(
                "mesh.binary_max_decompressed_bytes",
                &self.binary_max_decompressed_bytes.to_string(),
                &format!(
                    "must be at least mesh.binary_max_payload_bytes ({})",
                    self.binary_max_payload_bytes
                ),
            ));
        }
        if self.heartbeat_timeout_secs <= self.heartbeat_interval_secs {
            errors.push(invalid(
                "mesh.heartbeat_timeout_secs",
                &self.heartbeat_timeout_secs.to_string(),
                &format!(
                    "must be greater than mesh.heartbeat_interval_secs ({})",
                    self.heartbeat_interval_secs
                ),
            ));
        }
        if self.default_timeout_secs > self.max_timeout_secs {
            errors.push(invalid(
                "mesh.default_timeout_secs",
                &self.default_timeout_secs.to_string(),
                &format!(
                    "must not exceed mesh.max_timeout_secs ({})",
                    self.max_timeout_secs
                ),
            ));
        }
        if self.retry_backoff_max_ms < self.retry_backoff_initial_ms {
            errors.push(invalid(
                "mesh.retry_backoff_max_ms",
                &self.retry_backoff_max_ms.to_string(),
                "must be at least mesh.retry_backoff_initial_ms",
            ));
        }
        if self.max_message_bytes < self.max_result_bytes {
            errors.push(invalid(
                "mesh.max_message_bytes",
                &self.max_message_bytes.to_string(),
                &format!(
                    "must be at least mesh.max_result_bytes ({}) so an oversized result can be refused with 4007 rather than a closed connection",
                    self.max_result_bytes
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let mut errors = Vec::new();
        MeshConfig::default().validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn heartbeat_timeout_must_exceed_interval() {
        let c = MeshConfig {
            heartbeat_interval_secs: 10,
            heartbeat_timeout_secs: 10,
            ..MeshConfig::default()
        };
        let mut errors = Vec::new();
        c.validate(&mut errors);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .contains("mesh.heartbeat_timeout_secs"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn tenant_strategy_overrides_default() {
        let c: MeshConfig = toml::from_str(
            "default_strategy = \"round_robin\"\n[tenant_strategies]\nacme = \"least_loaded\"\n",
        )
        .unwrap_or_default();
        assert_eq!(c.strategy_for("acme"), Strategy::LeastLoaded);
        assert_eq!(c.strategy_for("other"), Strategy::RoundRobin);
    }
}
