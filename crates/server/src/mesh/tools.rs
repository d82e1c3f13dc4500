//! The mesh as MCP tools on the gateway's own endpoint, so that any MCP
//! client can delegate work: `agents_list`, `task_submit` (optionally
//! waiting, with the agent's progress relayed as MCP progress), `task_get`
//! and `task_cancel`.

use std::sync::Arc;
use std::time::Duration;

use meshgate_core::Principal;
use meshgate_core::auth::scope;
use rmcp::ErrorData as McpError;
use rmcp::model::{CallToolResult, ErrorCode, ProgressNotificationParam, ProgressToken, Tool};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{Mesh, MeshError};
use crate::outbox::Outbox;

/// Names of the mesh tools.
pub const NAMES: [&str; 4] = ["agents_list", "task_submit", "task_get", "task_cancel"];

/// Longest a `task_submit` call waits, in seconds.
pub const MAX_WAIT_SECS: u64 = 3600;

fn schema(v: Value) -> Arc<Map<String, Value>> {
    Arc::new(match v {
        Value::Object(m) => m,
        _ => Map::new(),
    })
}

/// The tool definitions, for `tools/list`.
pub fn definitions() -> Vec<Tool> {
    vec![
        Tool::new(
            "agents_list",
            "List the AI agents of the meshgate agent mesh in your tenant: their capabilities, status (online, reconnecting, offline), load and recorded performance.",
            schema(json!({"type": "object", "properties": {
                "online_only": {"type": "boolean", "description": "Only agents connected now (default false)."}
            }, "additionalProperties": false})),
        ),
        Tool::new(
            "task_submit",
            "Delegate a task to the agent mesh. It is routed to an agent that has every required capability. With wait=true the call returns when the task ends (relaying the agent's progress), otherwise at once with the task id to poll with task_get.",
            schema(json!({"type": "object", "properties": {
                "type": {"type": "string", "description": "Task type, e.g. `summarize`."},
                "title": {"type": "string"},
                "payload": {"description": "Input for the agent (any JSON)."},
                "required_capabilities": {"type": "array", "items": {"type": "string"}, "description": "Capabilities the agent must have, e.g. `summarize`, `lang:python`, `tool:git`."},
                "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
                "timeout_secs": {"type": "integer", "minimum": 1},
                "max_retries": {"type": "integer", "minimum": 0, "maximum": 100},
                "idempotency_key": {"type": "string", "description": "Resubmitting with the same key returns the first task instead of creating another."},
                "strategy": {"type": "string", "enum": ["capability_match", "least_loaded", "round_robin", "performance_based", "cost_optimized"]},
                "wait": {"type": "boolean", "description": "Wait for the task to end (default false)."},
                "wait_timeout_secs": {"type": "integer", "minimum": 1, "maximum": MAX_WAIT_SECS, "description": "Longest wait (default: the task's timeout)."}
            }, "required": ["type"], "additionalProperties": false})),
        ),
        Tool::new(
            "task_get",
            "Get a mesh task: its state, agent, progress, result or error, and why it waits if it is pending.",
            schema(json!({"type": "object", "properties": {
                "task_id": {"type": "string"}
            }, "required": ["task_id"], "additionalProperties": false})),
        ),
        Tool::new(
            "task_cancel",
            "Cancel a mesh task that has not finished; its agent is told to stop.",
            schema(json!({"type": "object", "properties": {
                "task_id": {"type": "string"},
                "reason": {"type": "string"}
            }, "required": ["task_id"], "additionalProperties": false})),
        ),
    ]
}

/// The scope a tool needs.
pub fn needed_scope(name: &str) -> &'static str {
    match name {
        "task_submit" | "task_cancel" => scope::TASKS_WRITE,
        _ => scope::TASKS_READ,
    }
}

fn tool_error(e: MeshError) -> CallToolResult {
    CallToolResult::structured_error(json!({"code": e.code, "message": e.message, "data": e.data}))
}

fn task_id(args: &Map<String, Value>) -> Result<String, CallToolResult> {
    match args.get("task_id") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(tool_error(MeshError::invalid(
            "task_id",
            "is required: the id task_submit returned",
        ))),
    }
}

/// Where a waiting `task_submit` sends progress.
pub struct ProgressSink {
    /// The client's progress token.
    pub token: ProgressToken,
    /// The session's outbound queue.
    pub outbox: Arc<Outbox>,
}

/// Runs a mesh tool.
pub async fn call(
    mesh: &Arc<Mesh>,
    p: &Principal,
    name: &str,
    args: Option<Map<String, Value>>,
    progress: Option<ProgressSink>,
    cancelled: CancellationToken,
) -> Result<CallToolResult, McpError> {
    let needed = needed_scope(name);
    if !p.has_scope(needed) {
        return Err(McpError::new(
            ErrorCode(-32003),
            format!("tool `{name}` needs scope `{needed}`, which your credential lacks"),
            Some(json!({"reason": "missing_scope", "scope": needed})),
        ));
    }
    let args = args.unwrap_or_default();
    Ok(match name {
        "agents_list" => {
            let online_only = args
                .get("online_only")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            match mesh.agents(p).await {
                Ok(a) => {
                    let a: Vec<_> = a
                        .into_iter()
                        .filter(|a| !online_only || a.status == "online")
                        .collect();
                    CallToolResult::structured(json!({"agents": a}))
                }
                Err(e) => tool_error(e),
            }
        }
        "task_get" => match task_id(&args) {
            Ok(id) => match mesh.get(p, &id).await {
                Ok(t) => CallToolResult::structured(json!(t)),
                Err(e) => tool_error(e),
            },
            Err(r) => r,
        },
        "task_cancel" => match task_id(&args) {
            Ok(id) => {
                let reason = args
                    .get("reason")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                match mesh.cancel(p, &id, reason).await {
                    Ok(t) => CallToolResult::structured(json!(t)),
                    Err(e) => tool_error(e),
                }
            }
            Err(r) => r,
        },
        "task_submit" => submit(mesh, p, args, progress, cancelled).await,
        other => tool_error(MeshError::invalid(
            "name",
            format!("`{other}` is not a mesh tool"),
        )),
    })
}

async fn submit(
    mesh: &Arc<Mesh>,
    p: &Principal,
    mut args: Map<String, Value>,
    progress: Option<ProgressSink>,
    cancelled: CancellationToken,
) -> CallToolResult {
    let wait = match args.remove("wait") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return tool_error(MeshError::invalid("wait", "must be true or false")),
    };
    let wait_secs = match args.remove("wait_timeout_secs") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(s) if (1..=MAX_WAIT_SECS).contains(&s) => Some(s),
            _ => {
                return tool_error(MeshError::invalid(
                    "wait_timeout_secs",
                    format!("must be a whole number within 1..={MAX_WAIT_SECS}"),
                ));
            }
        },
    };
    let mut rx = wait.then(|| mesh.subscribe());
    let (task, _) = match mesh.submit(p, &Value::Object(args)).await {
        Ok(t) => t,
        Err(e) => return tool_error(e),
    };
    let Some(rx) = rx.as_mut() else {
        return CallToolResult::structured(json!(task));
    };
    if task.state.is_terminal() {
        return CallToolResult::structured(json!(task));
    }
    let limit = Duration::from_secs(wait_secs.unwrap_or(task.timeout_secs.min(MAX_WAIT_SECS)));
    let deadline = tokio::time::Instant::now() + limit;
    let mut last_progress = -1.0f64;
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = tokio::time::sleep_until(deadline) => break,
            _ = cancelled.cancelled() => break,
        };
        match ev {
            Ok(u) if u.task_id == task.id => {
                if let Some(sink) = &progress {
                    let value = u.progress.unwrap_or(0.0) * 100.0;
                    let note = match (u.kind, &u.message) {
                        ("progress", Some(m)) => Some(m.clone()),
                        ("state", _) => Some(format!("task {}", u.state.as_str())),
                        _ => None,
                    };
                    // A state change at the same progress nudges it up to
                    // stay strictly increasing, but never past the total.
                    let next = if value > last_progress {
                        value
                    } else {
                        last_progress + 0.001
                    };
                    if (value > last_progress || (u.kind == "state" && value >= last_progress))
                        && next <= 100.0
                    {
                        last_progress = next;
                        let mut param =
                            ProgressNotificationParam::new(sink.token.clone(), last_progress)
                                .with_total(100.0);
                        if let Some(n) = note {
                            param = param.with_message(n);
                        }
                        sink.outbox.progress(param).await;
                    }
                }
                if u.kind == "state" && u.state.is_terminal() {
                    break;
                }
            }
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => break,
        }
    }
    match mesh.get(p, &task.id).await {
        Ok(t) => {
            let failed = matches!(
                t.state,
                meshgate_core::mesh::TaskState::Failed | meshgate_core::mesh::TaskState::Timeout
            );
            let mut r = CallToolResult::structured(json!(t));
            if failed {
                r.is_error = Some(true);
            }
            r
        }
        Err(e) => tool_error(e),
    }
}
