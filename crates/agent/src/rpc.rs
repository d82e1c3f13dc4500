//! JSON-RPC over one WebSocket connection: the messages the agent queues
//! for the writer, and the `Session` that numbers the agent's requests and
//! matches the gateway's answers to them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;

use crate::AgentError;

/// What the agent queues for the connection's writer, which sends it in the
/// connection's current mode (text or binary frames).
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// One serialized JSON-RPC message.
    Json(String),
    /// A binary pong frame answering the gateway's ping frame `sequence`.
    Pong {
        /// The ping's sequence id, echoed.
        sequence: u64,
        /// The ping's payload, echoed.
        payload: Vec<u8>,
    },
    /// A close frame; the writer stops after it.
    Close(CloseFrame),
}

/// Runs on the reader's task when the answer arrives, before any later
/// message from the gateway is handled, so state kept beside the connection
/// (the mode, CRDT replicas) follows the gateway's order of events.
pub(crate) type AnswerHook = Box<dyn FnOnce(&Result<Value, AgentError>) + Send>;

struct Waiter {
    answer: oneshot::Sender<Result<Value, AgentError>>,
    hook: Option<AnswerHook>,
}

/// The agent's half of one registered connection. Requests go out through
/// the writer's channel; the reader calls [`Session::resolve`] with answers.
/// Closing it fails every request still waiting with [`AgentError::Closed`].
pub(crate) struct Session {
    out: mpsc::Sender<Outgoing>,
    /// `None` once closed, so no waiter can be added that nobody resolves.
    pending: Mutex<Option<HashMap<u64, Waiter>>>,
    next_id: AtomicU64,
    timeout: Duration,
    closed: CancellationToken,
}

impl Session {
    /// A session whose first request gets `first_id`.
    pub(crate) fn new(out: mpsc::Sender<Outgoing>, first_id: u64, timeout: Duration) -> Self {
        Self {
            out,
            pending: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(first_id),
            timeout,
            closed: CancellationToken::new(),
        }
    }

    /// Sends a request and waits for its answer (at most the timeout).
    pub(crate) async fn request(&self, method: &str, params: Value) -> Result<Value, AgentError> {
        self.request_with(method, params, None).await
    }

    /// Sends a request and waits for its answer; `hook` sees the answer on
    /// the reader's task first. A request that times out or whose connection
    /// closes never runs its hook.
    pub(crate) async fn request_with(
        &self,
        method: &str,
        params: Value,
        hook: Option<AnswerHook>,
    ) -> Result<Value, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.lock_pending().as_mut() {
            Some(pending) => pending.insert(id, Waiter { answer: tx, hook }),
            None => return Err(AgentError::Closed),
        };
        if self
            .out
            .send(request_frame(id, method, params))
            .await
            .is_err()
        {
            self.forget(id);
            return Err(AgentError::Closed);
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(AgentError::Closed),
            Err(_) => {
                self.forget(id);
                Err(AgentError::Timeout {
                    method: method.to_string(),
                    timeout: self.timeout,
                })
            }
        }
    }

    /// Sends a notification (no answer).
    pub(crate) async fn notify(&self, method: &str, params: Value) -> Result<(), AgentError> {
        self.send(notification_frame(method, params)).await
    }

    /// Sends a ready message (an answer to the gateway's request, a close).
    pub(crate) async fn send(&self, message: Outgoing) -> Result<(), AgentError> {
        self.out.send(message).await.map_err(|_| AgentError::Closed)
    }

    /// Hands an answer to the request waiting for it; false when no request
    /// with that id is waiting (late, after a timeout, or not ours).
    pub(crate) fn resolve(&self, id: &Value, answer: Result<Value, AgentError>) -> bool {
        let Some(id) = id.as_u64() else {
            return false;
        };
        let waiter = self.lock_pending().as_mut().and_then(|p| p.remove(&id));
        match waiter {
            Some(Waiter { answer: tx, hook }) => {
                if let Some(hook) = hook {
                    hook(&answer);
                }
                // The requester may have given up; nothing to do then.
                let _ = tx.send(answer);
                true
            }
            None => false,
        }
    }

    /// Marks the connection gone and fails every waiting request.
    pub(crate) fn close(&self) {
        self.closed.cancel();
        // Dropping the waiters wakes their requests with `Closed`.
        drop(self.lock_pending().take());
    }

    /// Whether [`close`](Self::close) was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves once the session is closed.
    pub(crate) async fn wait_closed(&self) {
        self.closed.cancelled().await;
    }

    fn forget(&self, id: u64) {
        if let Some(pending) = self.lock_pending().as_mut() {
            pending.remove(&id);
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Option<HashMap<u64, Waiter>>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every operation is a single insert or remove), so poison is ignored.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A request.
pub(crate) fn request_frame(id: u64, method: &str, params: Value) -> Outgoing {
    json_message(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
}

/// A notification.
pub(crate) fn notification_frame(method: &str, params: Value) -> Outgoing {
    json_message(json!({"jsonrpc": "2.0", "method": method, "params": params}))
}

/// A success answer to the gateway's request `id`.
pub(crate) fn result_frame(id: &Value, result: Value) -> Outgoing {
    json_message(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

/// An error answer to the gateway's request `id`.
pub(crate) fn error_frame(id: &Value, code: i64, message: &str, data: Value) -> Outgoing {
    json_message(json!({
        "jsonrpc": "2.0", "id": id,
        "error": {"code": code, "message": message, "data": data},
    }))
}

fn json_message(value: Value) -> Outgoing {
    Outgoing::Json(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_json(message: Option<Outgoing>) -> Value {
        match message {
            Some(Outgoing::Json(text)) => serde_json::from_str(&text).unwrap_or_default(),
            other => panic!("expected a JSON message, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn requests_are_numbered_and_answers_matched_by_id() {
        let (tx, mut rx) = mpsc::channel(8);
        let session = std::sync::Arc::new(Session::new(tx, 2, Duration::from_secs(5)));
        let s = session.clone();
        let first = tokio::spawn(async move { s.request("a", json!({})).await });
        let s = session.clone();
        let sent = frame_json(rx.recv().await);
        assert_eq!(sent["id"], json!(2));
        assert_eq!(sent["method"], json!("a"));
        let second = tokio::spawn(async move { s.request("b", json!({})).await });
        let sent = frame_json(rx.recv().await);
        assert_eq!(sent["id"], json!(3));
        assert!(session.resolve(&json!(3), Ok(json!("three"))));
        assert!(session.resolve(&json!(2), Ok(json!("two"))));
        assert!(!session.resolve(&json!(2), Ok(json!("again"))));
        assert_eq!(first.await.ok().and_then(Result::ok), Some(json!("two")));
        assert_eq!(second.await.ok().and_then(Result::ok), Some(json!("three")));
    }

    #[tokio::test]
    async fn closing_fails_waiting_and_later_requests() {
        let (tx, mut rx) = mpsc::channel(8);
        let session = std::sync::Arc::new(Session::new(tx, 1, Duration::from_secs(5)));
        let s = session.clone();
        let waiting = tokio::spawn(async move { s.request("a", json!({})).await });
        let _ = rx.recv().await;
        session.close();
        assert!(matches!(waiting.await, Ok(Err(AgentError::Closed))));
        assert!(matches!(
            session.request("b", json!({})).await,
            Err(AgentError::Closed)
        ));
    }

    #[tokio::test]
    async fn answer_hook_runs_before_the_requester_wakes() {
        let (tx, mut rx) = mpsc::channel(8);
        let session = std::sync::Arc::new(Session::new(tx, 1, Duration::from_secs(5)));
        let seen = std::sync::Arc::new(Mutex::new(None));
        let hook_seen = seen.clone();
        let hook: AnswerHook = Box::new(move |answer| {
            *hook_seen.lock().unwrap_or_else(|p| p.into_inner()) = answer.as_ref().ok().cloned();
        });
        let s = session.clone();
        let waiting = tokio::spawn(async move { s.request_with("a", json!({}), Some(hook)).await });
        let _ = rx.recv().await;
        assert!(session.resolve(&json!(1), Ok(json!("one"))));
        assert_eq!(
            *seen.lock().unwrap_or_else(|p| p.into_inner()),
            Some(json!("one"))
        );
        assert_eq!(waiting.await.ok().and_then(Result::ok), Some(json!("one")));
    }

    #[tokio::test]
    async fn unanswered_request_times_out() {
        let (tx, _rx) = mpsc::channel(8);
        let session = Session::new(tx, 1, Duration::from_millis(20));
        let err = session.request("slow", json!({})).await;
        assert!(matches!(err, Err(AgentError::Timeout { ref method, .. }) if method == "slow"));
    }
}
