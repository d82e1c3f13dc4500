//! A scripted gateway: tests accept connections one at a time and play the
//! gateway's side of the protocol by hand, checking what the agent sends.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use meshgate_agent::{
    Agent, AgentError, AgentEvent, AgentOptions, CancellationToken, Capability, Task, TaskContext,
    TaskFailure, TaskHandler, TaskResult,
};
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, broadcast};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderMap;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How long any single expectation may take.
pub const WAIT: Duration = Duration::from_secs(5);

/// A listening fake gateway.
pub struct FakeGateway {
    listener: TcpListener,
    /// `ws://127.0.0.1:<port>/ws`.
    pub url: String,
}

impl FakeGateway {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        Self {
            listener,
            url: format!("ws://127.0.0.1:{port}/ws"),
        }
    }

    async fn accept_tcp(&self) -> TcpStream {
        let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("the agent did not connect in time")
            .expect("accept");
        tcp
    }

    /// Accepts the next connection's upgrade, recording its headers.
    pub async fn accept(&self) -> GatewayConn {
        let tcp = self.accept_tcp().await;
        let (tx, rx) = std::sync::mpsc::channel();
        // The callback's error type is tungstenite's, large or not.
        #[allow(clippy::result_large_err)]
        let callback = move |request: &Request, response: Response| {
            let _ = tx.send(request.headers().clone());
            Ok::<_, ErrorResponse>(response)
        };
        let ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
            .await
            .expect("upgrade");
        let headers = rx.recv().expect("headers");
        GatewayConn { ws, headers }
    }

    /// Accepts the next connection and registers it with the default answer.
    pub async fn accept_registered(&self) -> (GatewayConn, Value) {
        let mut conn = self.accept().await;
        let params = conn.register(json!([])).await;
        (conn, params)
    }

    /// Answers the next upgrade with an HTTP refusal and a JSON error body.
    pub async fn refuse(&self, status: u16, code: i64, message: &str) {
        let tcp = self.accept_tcp().await;
        let body = json!({"error": {"code": code, "message": message}}).to_string();
        // The callback's error type is tungstenite's, large or not.
        #[allow(clippy::result_large_err)]
        let callback = move |_: &Request, _: Response| {
            let refusal = tokio_tungstenite::tungstenite::http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .header("content-length", body.len().to_string())
                .body(Some(body))
                .expect("response");
            Err::<Response, _>(refusal)
        };
        let _ = tokio_tungstenite::accept_hdr_async(tcp, callback).await;
    }
}

/// The gateway's side of one accepted connection.
pub struct GatewayConn {
    ws: WebSocketStream<TcpStream>,
    /// The upgrade request's headers.
    pub headers: HeaderMap,
}

impl GatewayConn {
    /// The next JSON message, skipping heartbeats.
    pub async fn recv(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no message from the agent in time")
                .expect("the connection ended")
                .expect("read");
            if let Message::Text(text) = frame {
                let value: Value = serde_json::from_str(text.as_str()).expect("agent sent JSON");
                assert_eq!(value["jsonrpc"], "2.0", "{value}");
                if value["method"] != "agent.heartbeat" {
                    return value;
                }
            }
        }
    }

    /// The next message, which must be a request for `method`; returns its
    /// id and params.
    pub async fn expect_request(&mut self, method: &str) -> (Value, Value) {
        let message = self.recv().await;
        assert_eq!(message["method"], method, "{message}");
        assert!(
            message.get("id").is_some(),
            "{method} must be a request: {message}"
        );
        (message["id"].clone(), message["params"].clone())
    }

    /// Expects `method` and answers it with `result`; returns the params.
    pub async fn expect_and_answer(&mut self, method: &str, result: Value) -> Value {
        let (id, params) = self.expect_request(method).await;
        self.answer(&id, result).await;
        params
    }

    /// Expects `agent.register` as request 1 and answers it.
    pub async fn register(&mut self, resumed: Value) -> Value {
        let (id, params) = self.expect_request("agent.register").await;
        assert_eq!(id, json!(1));
        self.answer(
            &id,
            json!({
                "agent_id": params["id"], "session_id": "as-test", "tenant": "default",
                "heartbeat_interval_secs": 60, "heartbeat_timeout_secs": 180,
                "config": {"model": "small"}, "config_version": 3,
                "resumed_tasks": resumed, "server": {"name": "meshgate", "version": "0.1.0"}
            }),
        )
        .await;
        params
    }

    pub async fn send(&mut self, value: Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .expect("send");
    }

    pub async fn answer(&mut self, id: &Value, result: Value) {
        self.send(json!({"jsonrpc": "2.0", "id": id, "result": result}))
            .await;
    }

    pub async fn answer_error(&mut self, id: &Value, code: i64, message: &str) {
        self.send(json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))
            .await;
    }

    pub async fn notify(&mut self, method: &str, params: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params}))
            .await;
    }

    /// Sends a request from the gateway and returns the agent's answer.
    pub async fn call(&mut self, id: &str, method: &str) -> Value {
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method}))
            .await;
        let answer = self.recv().await;
        assert_eq!(answer["id"], id, "{answer}");
        answer
    }

    /// Assigns a task with this id and payload.
    pub async fn assign(&mut self, id: &str, payload: Value) {
        self.notify(
            "task.assigned",
            json!({"task": {
                "id": id, "tenant": "default", "type": "summarize", "title": "test task",
                "payload": payload, "required_capabilities": ["summarize"], "priority": 0,
                "timeout_secs": 300, "deadline_ms": 1767000000000u64, "attempt": 1, "max_retries": 3
            }}),
        )
        .await;
    }

    /// Assigns a task and answers its `task.accept`.
    pub async fn assign_accepted(&mut self, id: &str, payload: Value) {
        self.assign(id, payload).await;
        let params = self
            .expect_and_answer("task.accept", json!({"task_id": id, "state": "accepted"}))
            .await;
        assert_eq!(params, json!({"task_id": id}));
    }

    /// Closes from the gateway's side with a close code.
    pub async fn close(&mut self, code: CloseCode, reason: &str) {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = self.ws.send(Message::Close(Some(frame))).await;
    }

    /// Reads until the agent closes; returns the close code (skipping
    /// anything else) or `None` when the stream ends without one.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the agent did not close in time");
            match frame {
                Some(Ok(Message::Close(frame))) => {
                    // Reading on sends tungstenite's queued close reply.
                    let drain = async { while let Some(Ok(_)) = self.ws.next().await {} };
                    let _ = tokio::time::timeout(WAIT, drain).await;
                    return frame.map(|f| u16::from(f.code));
                }
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    }
}

/// A handler whose behaviour each task's payload picks: `progress` (report
/// 0.5 first), `hold` (wait for a permit from `release` or cancellation),
/// `fail`, `panic`, `reject`.
pub struct ScriptedHandler {
    pub release: Arc<Semaphore>,
}

impl TaskHandler for ScriptedHandler {
    fn accept(&self, task: &Task) -> Result<(), String> {
        match task.payload.get("reject").and_then(Value::as_str) {
            Some(reason) => Err(reason.to_string()),
            None => Ok(()),
        }
    }

    async fn run(&self, task: Task, ctx: TaskContext) -> TaskResult {
        let payload = &task.payload;
        if payload["progress"] == true {
            ctx.progress(0.5, "half way").await.expect("progress");
        }
        if payload["hold"] == true {
            let cancelled = ctx.cancelled();
            tokio::select! {
                permit = self.release.acquire() => permit.expect("semaphore").forget(),
                () = cancelled.cancelled() => return Err(TaskFailure::retryable("cancelled")),
            }
        }
        if payload["panic"] == true {
            panic!("scripted panic");
        }
        if let Some(message) = payload["fail"].as_str() {
            return Err(TaskFailure::permanent(message));
        }
        let mut result = Map::new();
        result.insert("echo".into(), payload.clone());
        result.insert("config".into(), ctx.config());
        Ok(result)
    }
}

/// Options for a test agent against `url`, with quick reconnects.
pub fn options(url: &str) -> AgentOptions {
    let mut opts = AgentOptions::new(url, "mg_test_key", "test-agent-1", "tester");
    opts.name = "Test Agent".into();
    opts.version = "9.9.9".into();
    opts.capabilities = vec![
        Capability::detailed("summarize")
            .with_confidence(0.9)
            .with_task_types(["summarize"])
            .with_languages(["en", "de"]),
        Capability::named("lang:rust"),
    ];
    opts.max_concurrent_tasks = 2;
    opts.config = json!({"model": "tiny"});
    opts.metadata = json!({"host": "test"});
    opts.reconnect_initial = Duration::from_millis(10);
    opts.reconnect_max = Duration::from_millis(50);
    opts.shutdown_grace = Duration::from_secs(5);
    opts.request_timeout = Duration::from_secs(5);
    opts
}

/// An agent running in the background.
pub struct RunningAgent {
    pub events: broadcast::Receiver<AgentEvent>,
    pub shutdown: CancellationToken,
    pub release: Arc<Semaphore>,
    pub join: JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    pub fn start(opts: AgentOptions) -> Self {
        let agent = Agent::new(opts);
        let events = agent.events();
        let shutdown = CancellationToken::new();
        let release = Arc::new(Semaphore::new(0));
        let handler = Arc::new(ScriptedHandler {
            release: release.clone(),
        });
        let join = tokio::spawn(agent.run(handler, shutdown.clone()));
        Self {
            events,
            shutdown,
            release,
            join,
        }
    }

    /// Waits for the first event `pick` accepts.
    pub async fn event<T>(&mut self, mut pick: impl FnMut(&AgentEvent) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("the expected event did not come")
                .expect("event channel");
            if let Some(found) = pick(&event) {
                return found;
            }
        }
    }

    /// Waits for `run` to return.
    pub async fn finished(self) -> Result<(), AgentError> {
        tokio::time::timeout(WAIT, self.join)
            .await
            .expect("run did not return in time")
            .expect("run panicked")
    }
}
