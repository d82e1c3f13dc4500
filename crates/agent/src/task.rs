//! Tasks as the agent sees them, and the trait an agent implements to work
//! on them.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::agent::Shared;
use crate::{AgentError, StateHandle};

/// A task assigned to this agent (`task.assigned`'s `params.task`). Unknown
/// fields are ignored and missing or null optional ones take defaults, so a
/// newer gateway does not break an older agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The task's id (`t-…`).
    pub id: String,
    /// The tenant the task belongs to.
    #[serde(default, deserialize_with = "null_as_default")]
    pub tenant: String,
    /// The task's type (`"type"` on the wire).
    #[serde(rename = "type", default, deserialize_with = "null_as_default")]
    pub task_type: String,
    /// A short human-readable title.
    #[serde(default, deserialize_with = "null_as_default")]
    pub title: String,
    /// The task's input, as the submitter gave it.
    #[serde(default)]
    pub payload: Value,
    /// The capabilities the task was routed by.
    #[serde(default, deserialize_with = "null_as_default")]
    pub required_capabilities: Vec<String>,
    /// The task's priority (higher first).
    #[serde(default, deserialize_with = "null_as_default")]
    pub priority: i64,
    /// How long the task may take, in seconds, counted from assignment.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// When the task times out, in milliseconds since the Unix epoch
    /// (`task.extend` moves it).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Which attempt this is, from 1.
    #[serde(default, deserialize_with = "null_as_default")]
    pub attempt: u32,
    /// How many retries the task gets before it is dead-lettered.
    #[serde(default, deserialize_with = "null_as_default")]
    pub max_retries: u32,
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Why a handler could not finish its task; sent as `task.fail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    /// What went wrong, for the submitter and the operator.
    pub message: String,
    /// Whether another attempt (possibly on another agent) may succeed.
    pub retryable: bool,
}

impl TaskFailure {
    /// A failure that another attempt will not fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }

    /// A failure another attempt may not hit (a timeout upstream, a busy
    /// model): the gateway re-queues the task with backoff.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskFailure {}

/// What a handler returns: the result object for `task.complete`, or a failure.
pub type TaskResult = Result<Map<String, Value>, TaskFailure>;

/// The agent's work. Implement `run` (as an `async fn`); the SDK calls it in
/// its own tokio task for every accepted task, so a panic fails that task
/// (not retryable) without harming the agent.
pub trait TaskHandler: Send + Sync + 'static {
    /// Whether to take the task; `Err(reason)` sends `task.reject` with that
    /// reason. Called before the SDK accepts; keep it quick, it runs on the
    /// connection's task. The default takes every task.
    fn accept(&self, task: &Task) -> Result<(), String> {
        let _ = task;
        Ok(())
    }

    /// Works on an accepted task. `ctx` reports progress, asks for more time
    /// and tells when the task was cancelled.
    fn run(&self, task: Task, ctx: TaskContext) -> impl Future<Output = TaskResult> + Send;
}

/// A handler's line to the gateway for one task. Cheap to clone.
#[derive(Clone)]
pub struct TaskContext {
    task_id: Arc<str>,
    token: CancellationToken,
    shared: Arc<Shared>,
}

impl TaskContext {
    pub(crate) fn new(task_id: &str, token: CancellationToken, shared: Arc<Shared>) -> Self {
        Self {
            task_id: task_id.into(),
            token,
            shared,
        }
    }

    /// The task's id.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// Cancelled when the gateway cancels the task (`task.cancel`, also on
    /// timeout) or when graceful shutdown's grace period runs out. A handler
    /// should stop soon after; once the gateway cancelled, its result is not
    /// sent.
    pub fn cancelled(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Whether [`cancelled`](Self::cancelled) has fired.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The agent's configuration as the gateway last sent it (at
    /// registration or by `config.update`).
    pub fn config(&self) -> Value {
        self.shared.config.borrow().clone()
    }

    /// A handle to the tenant's shared CRDT document `doc`; see
    /// [`StateHandle`].
    pub fn state(&self, doc: &str) -> StateHandle {
        StateHandle::new(self.shared.clone(), doc)
    }

    /// The gateway's `protocol.get_info` for the current connection (mode,
    /// compression, checksum, limits, frame counters).
    pub async fn protocol_info(&self) -> Result<Value, AgentError> {
        self.shared.protocol_info().await
    }

    /// Reports progress: `fraction` in 0..=1 (values outside are clamped,
    /// NaN counts as 0) and a message such as "page 4 of 10". Fails with
    /// [`AgentError::NotConnected`] while reconnecting, and with code 4006
    /// once the task was cancelled; a handler may ignore either.
    pub async fn progress(
        &self,
        fraction: f64,
        message: impl Into<String>,
    ) -> Result<(), AgentError> {
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        let session = self
            .shared
            .current_session()
            .ok_or(AgentError::NotConnected)?;
        let params = json!({
            "task_id": &*self.task_id,
            "progress": fraction,
            "message": message.into(),
        });
        session.request("task.progress", params).await.map(|_| ())
    }

    /// Asks for `seconds` more before the deadline; returns the seconds
    /// granted, which the gateway may cut (the total extension of a task is
    /// capped). When nothing is left the gateway answers 4005.
    pub async fn extend(&self, seconds: u64, reason: impl Into<String>) -> Result<u64, AgentError> {
        let session = self
            .shared
            .current_session()
            .ok_or(AgentError::NotConnected)?;
        let params = json!({
            "task_id": &*self.task_id,
            "seconds": seconds,
            "reason": reason.into(),
        });
        let answer = session.request("task.extend", params).await?;
        answer
            .get("granted_secs")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                AgentError::Protocol(format!("task.extend answer without granted_secs: {answer}"))
            })
    }
}

impl fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskContext")
            .field("task_id", &self.task_id)
            .field("cancelled", &self.token.is_cancelled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `task.assigned` exactly as in docs/agent-protocol.md, with the
    /// elided `payload: {…}` filled in so it is JSON.
    const ASSIGNED_EXAMPLE: &str = r#"{"jsonrpc": "2.0", "method": "task.assigned", "params": {"task": {
  "id": "t-…", "tenant": "default", "type": "summarize", "title": "Summarize the report",
  "payload": {"document": "report.pdf", "pages": [1, 2]}, "required_capabilities": ["summarize"], "priority": 0,
  "timeout_secs": 300, "deadline_ms": 1767000000000, "attempt": 1, "max_retries": 3
}}}"#;

    fn task_of(message: &str) -> Result<Task, String> {
        let value: Value = serde_json::from_str(message).map_err(|e| e.to_string())?;
        let task = value
            .pointer("/params/task")
            .cloned()
            .unwrap_or(Value::Null);
        serde_json::from_value(task).map_err(|e| e.to_string())
    }

    #[test]
    fn task_deserializes_from_the_protocol_example() {
        let task = task_of(ASSIGNED_EXAMPLE);
        assert_eq!(
            task,
            Ok(Task {
                id: "t-…".into(),
                tenant: "default".into(),
                task_type: "summarize".into(),
                title: "Summarize the report".into(),
                payload: json!({"document": "report.pdf", "pages": [1, 2]}),
                required_capabilities: vec!["summarize".into()],
                priority: 0,
                timeout_secs: Some(300),
                deadline_ms: Some(1_767_000_000_000),
                attempt: 1,
                max_retries: 3,
            })
        );
    }

    #[test]
    fn task_tolerates_unknown_missing_and_null_fields() {
        let task = serde_json::from_value::<Task>(json!({
            "id": "t-1", "title": null, "required_capabilities": null,
            "future_field": {"x": 1}, "state": "assigned"
        }));
        let task = task.map_err(|e| e.to_string());
        assert_eq!(task.as_ref().map(|t| t.id.as_str()), Ok("t-1"));
        let task = task.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(task.title, "");
        assert!(task.required_capabilities.is_empty());
        assert_eq!(task.payload, Value::Null);
        assert_eq!(task.deadline_ms, None);
    }

    #[test]
    fn task_without_id_is_refused() {
        assert!(serde_json::from_value::<Task>(json!({"type": "x"})).is_err());
    }

    #[test]
    fn task_type_is_type_on_the_wire() {
        let task = serde_json::from_value::<Task>(json!({"id": "t", "type": "review"}));
        let value = task.map(|t| serde_json::to_value(t).unwrap_or_default());
        assert_eq!(
            value.ok().and_then(|v| v.get("type").cloned()),
            Some(json!("review"))
        );
    }

    #[test]
    fn failure_constructors_set_retryable() {
        assert!(!TaskFailure::permanent("bad input").retryable);
        assert!(TaskFailure::retryable("busy").retryable);
        assert_eq!(TaskFailure::retryable("busy").to_string(), "busy");
    }
}
