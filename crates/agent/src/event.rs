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
