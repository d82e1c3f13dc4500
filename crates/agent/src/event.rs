//! What an agent reports to observers (logs, dashboards, tests) while it runs.

use serde_json::Value;

/// One thing that happened to the agent; see [`Agent::events`](crate::Agent::events).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AgentEvent {
    /// The WebSocket upgrade succeeded; registration follows.
    Connected,
    /// The gateway accepted `agent.register`.
    Registered {
        /// The gateway's name for this connection (`as-…`).
        session_id: String,
        /// The version of the configuration the gateway holds for the agent.
        config_version: u64,
        /// The agent's configuration as the gateway holds it.
        config: Value,
        /// Tasks from before a reconnect that stay with this agent.
        resumed_tasks: Vec<String>,
    },
    /// The gateway assigned a task (it may still be rejected).
    TaskAssigned {
        /// The task's id.
        id: String,
    },
    /// The agent rejected an assigned task.
    TaskRejected {
        /// The task's id.
        id: String,
        /// Why, as sent to the gateway.
        reason: String,
    },
    /// The gateway took the task's result.
    TaskCompleted {
        /// The task's id.
        id: String,
    },
    /// The task failed: the handler failed or panicked (and the gateway was
    /// told), or its result could not be delivered.
    TaskFailed {
        /// The task's id.
        id: String,
        /// What went wrong.
        message: String,
    },
    /// The gateway cancelled the task and its handler has stopped.
    TaskCancelled {
        /// The task's id.
        id: String,
    },
    /// The gateway sent a new configuration (`config.update`).
    ConfigUpdated {
        /// The configuration's version.
        version: u64,
        /// The new configuration.
        config: Value,
    },
    /// The connection ended; unless the agent is shutting down it reconnects.
    Disconnected {
        /// Why, in words.
        reason: String,
    },
    /// The connection's wire mode was set (on every connection, before
    /// registration): binary frames or JSON text, and for binary whether
    /// the gateway compresses and checksums (aligned with the agent's own
    /// [`BinaryOptions`](crate::BinaryOptions)).
    ProtocolMode {
        /// Whether the agent sends binary frames.
        binary: bool,
        /// Whether payloads above the threshold are compressed.
        compression: bool,
        /// Whether frames carry a CRC32 checksum.
        checksum: bool,
    },
    /// A binary frame from the gateway did not decode and was dropped.
    BadFrame {
        /// Why, as the frame codec says.
        error: String,
    },
    /// A subscribed document's replica was (re)started from the gateway's
    /// snapshot: at `subscribe` and after every registration.
    StateSubscribed {
        /// The document.
        doc: String,
        /// The replica's hash.
        hash: String,
    },
    /// A delta pushed by the gateway was merged into a replica.
    StateChanged {
        /// The document.
        doc: String,
        /// The replica's hash after the merge.
        hash: String,
    },
    /// A replica was replaced by the whole document (`state.sync`), after
    /// its hash differed from the gateway's or on request.
    StateResynced {
        /// The document.
        doc: String,
        /// The replica's hash.
        hash: String,
    },
    /// The gateway refused the connection or the registration.
    Refused {
        /// The HTTP status, when the upgrade was refused.
        status: Option<u16>,
        /// The meshgate error code, when there was one.
        code: Option<i64>,
        /// The gateway's message.
        message: String,
    },
}
