//! One task's life on the agent after it was taken: accept it, run the
//! handler in its own tokio task, and deliver the outcome, across
//! reconnects if need be.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agent::Shared;
use crate::{AgentError, AgentEvent, Task, TaskContext, TaskHandler, codes};

/// How often a request answered with "server error" or not answered at all
/// is tried before its task is given up.
const MAX_TRANSIENT_FAILURES: u32 = 5;

/// Accepts the task, runs the handler and delivers its outcome; the task
/// leaves the table when this returns.
pub(crate) async fn drive_task<H: TaskHandler>(
    shared: Arc<Shared>,
    handler: Arc<H>,
    task: Task,
    token: CancellationToken,
) {
    let id = task.id.clone();
    drive(&shared, handler, task, token).await;
    shared.tasks.remove(&id);
}

async fn drive<H: TaskHandler>(
    shared: &Arc<Shared>,
    handler: Arc<H>,
    task: Task,
    token: CancellationToken,
) {
    let id = task.id.clone();
    if let Err(err) = call_reliably(shared, "task.accept", json!({"task_id": &id})).await {
        if err.code() == Some(codes::OPERATION_CANCELLED) {
            shared.emit(AgentEvent::TaskCancelled { id });
        } else {
            warn!(task_id = %id, error = %err, "the gateway did not take the acceptance; dropping the task");
            shared.emit(AgentEvent::TaskFailed {
                id,
                message: format!("accepting failed: {err}"),
            });
        }
        return;
    }
    if shared.tasks.was_cancelled_by_gateway(&id) {
        shared.emit(AgentEvent::TaskCancelled { id });
        return;
    }

    let ctx = TaskContext::new(&id, token, shared.clone());
    let running = shared
        .tracker
        .spawn(async move { handler.run(task, ctx).await });
    shared.tasks.set_handler(&id, running.abort_handle());
    let outcome = running.await;

    if shared.tasks.was_cancelled_by_gateway(&id) {
        info!(task_id = %id, "handler stopped after the gateway cancelled the task");
        shared.emit(AgentEvent::TaskCancelled { id });
        return;
    }
    let report = match outcome {
        Ok(Ok(result)) => Report::Complete(Value::Object(result)),
        Ok(Err(failure)) => Report::Fail {
            message: failure.message,
            retryable: failure.retryable,
        },
        Err(join) if join.is_panic() => {
            warn!(task_id = %id, "the task's handler panicked");
            Report::Fail {
                message: "handler panicked".to_string(),
                retryable: false,
            }
        }
        Err(_) => Report::Fail {
            message: "agent shut down before the task finished".to_string(),
            retryable: true,
        },
    };
    deliver(shared, &id, report).await;
}

/// A handler's outcome on its way to the gateway.
enum Report {
    Complete(Value),
    Fail { message: String, retryable: bool },
}

async fn deliver(shared: &Shared, id: &str, mut report: Report) {
    shared.tasks.mark_finishing(id);
    loop {
        let (method, params) = match &report {
            Report::Complete(result) => ("task.complete", json!({"task_id": id, "result": result})),
            Report::Fail { message, retryable } => (
                "task.fail",
                json!({"task_id": id, "error": message, "retryable": retryable}),
            ),
        };
        let err = match call_reliably(shared, method, params).await {
            Ok(_) => {
                shared.emit(match report {
                    Report::Complete(_) => AgentEvent::TaskCompleted { id: id.to_string() },
                    Report::Fail { message, .. } => AgentEvent::TaskFailed {
                        id: id.to_string(),
                        message,
                    },
                });
                return;
            }
            Err(err) => err,
        };
        match err.code() {
            // The task stays with the agent after 4007, which may fail it
            // instead; a result the gateway cannot take never will be.
            Some(codes::CONTEXT_TOO_LARGE) if matches!(report, Report::Complete(_)) => {
                warn!(task_id = %id, error = %err, "result too large for the gateway; failing the task instead");
                report = Report::Fail {
                    message: format!("the result was too large for the gateway: {err}"),
                    retryable: false,
                };
            }
            Some(codes::OPERATION_CANCELLED) => {
                debug!(task_id = %id, "the gateway had cancelled the task; its result is dropped");
                shared.emit(AgentEvent::TaskCancelled { id: id.to_string() });
                return;
            }
            _ => {
                warn!(task_id = %id, method, error = %err, "the task's outcome could not be delivered");
                shared.emit(AgentEvent::TaskFailed {
                    id: id.to_string(),
                    message: format!("{method} not delivered: {err}"),
                });
                return;
            }
        }
    }
}

/// Sends a request about a task until the gateway answers it: a lost
/// connection waits for the next one, rate limits and server errors wait and
/// try again. Fails with the gateway's error, or `Closed` once the agent stops.
async fn call_reliably(shared: &Shared, method: &str, params: Value) -> Result<Value, AgentError> {
    let mut transient_failures = 0;
    loop {
        let session = shared.wait_for_session().await.ok_or(AgentError::Closed)?;
        let err = match session.request(method, params.clone()).await {
            Ok(answer) => return Ok(answer),
            Err(err) => err,
        };
        let pause = match &err {
            AgentError::Closed | AgentError::NotConnected | AgentError::Connection(_) => {
                debug!(
                    method,
                    "connection lost while sending; waiting for the next one"
                );
                tokio::select! {
                    () = session.wait_closed() => {}
                    () = shared.stopped.cancelled() => {}
                }
                continue;
            }
            AgentError::Rpc { code, data, .. } if *code == codes::RATE_LIMITED => {
                let after = data
                    .as_ref()
                    .and_then(|d| d.get("retry_after_ms"))
                    .and_then(Value::as_u64)
                    .unwrap_or(1000)
                    .clamp(10, 60_000);
                Duration::from_millis(after)
            }
            AgentError::Rpc { code, .. } if *code == codes::SERVER_ERROR => {
                transient_failures += 1;
                Duration::from_secs(u64::from(transient_failures))
            }
            AgentError::Timeout { .. } => {
                transient_failures += 1;
                Duration::ZERO
            }
            _ => return Err(err),
        };
        if transient_failures > MAX_TRANSIENT_FAILURES {
            return Err(err);
        }
        debug!(method, error = %err, ?pause, "trying again");
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shared.stopped.cancelled() => return Err(AgentError::Closed),
        }
    }
}
