//! A scripted gateway: tests accept connections one at a time and play the
//! gateway's side of the protocol by hand, checking what the agent sends.
//! It speaks text and binary frames, and keeps CRDT documents the way the
//! real gateway does.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use meshgate_agent::{
    Agent, AgentError, AgentEvent, AgentHandle, AgentOptions, CancellationToken, Capability, Task,
    TaskContext, TaskFailure, TaskHandler, TaskResult,
};
use meshgate_core::crdt::{Document, parse_ops};
use meshgate_protocol::frame::{self, EncodeOptions, FrameType, Header, Limits, Method};
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

    /// Accepts the next connection's upgrade, recording its headers; a
    /// subprotocol offer is not taken.
    pub async fn accept(&self) -> GatewayConn {
        self.accept_with(false).await
    }

    /// Accepts the next upgrade, taking the binary subprotocol if
    /// `subprotocol` and the agent offers it (then the connection is binary).
    pub async fn accept_with(&self, subprotocol: bool) -> GatewayConn {
        let tcp = self.accept_tcp().await;
        let (tx, rx) = std::sync::mpsc::channel();
        // The callback's error type is tungstenite's, large or not.
        #[allow(clippy::result_large_err)]
        let callback = move |request: &Request, mut response: Response| {
            let offered = request
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|p| p.trim() == frame::SUBPROTOCOL));
            if subprotocol && offered {
                response.headers_mut().insert(
                    "sec-websocket-protocol",
                    frame::SUBPROTOCOL.parse().expect("header value"),
                );
            }
            let _ = tx.send((request.headers().clone(), subprotocol && offered));
            Ok::<_, ErrorResponse>(response)
        };
        let ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
            .await
            .expect("upgrade");
        let (headers, binary) = rx.recv().expect("headers");
        GatewayConn {
            ws,
            headers,
            binary,
            encode: EncodeOptions::default(),
            sequence: 0,
            pending: VecDeque::new(),
            last_frame: None,
            pongs: Vec::new(),
        }
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
    /// Whether the gateway sends binary frames.
    pub binary: bool,
    /// How the gateway encodes its binary frames.
    pub encode: EncodeOptions,
    /// The gateway's last frame number.
    sequence: u64,
    /// Messages read but not yet returned, with their frame's header (`None`
    /// for text).
    pending: VecDeque<(Value, Option<Header>)>,
    /// The header of the frame that carried the message `recv` returned
    /// last; `None` when it came as text.
    pub last_frame: Option<Header>,
    /// The headers of the pong frames the agent sent.
    pub pongs: Vec<Header>,
}

impl GatewayConn {
    /// The next JSON message, text or binary, skipping heartbeats.
    pub async fn recv(&mut self) -> Value {
        loop {
            if let Some((value, header)) = self.pending.pop_front() {
                assert_eq!(value["jsonrpc"], "2.0", "{value}");
                if value["method"] != "agent.heartbeat" {
                    self.last_frame = header;
                    return value;
                }
                continue;
            }
            let frame = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no message from the agent in time")
                .expect("the connection ended")
                .expect("read");
            match frame {
                Message::Text(text) => {
                    let value = serde_json::from_str(text.as_str()).expect("agent sent JSON");
                    self.pending.push_back((value, None));
                }
                Message::Binary(bytes) => {
                    let frame = frame::decode(&bytes, &Limits::default())
                        .unwrap_or_else(|e| panic!("the agent sent a bad frame: {e}"));
                    if frame.header.frame_type == FrameType::Pong {
                        self.pongs.push(frame.header);
                        continue;
                    }
                    for message in frame.messages() {
                        let value = serde_json::from_slice(message).expect("agent sent JSON");
                        self.pending.push_back((value, Some(frame.header)));
                    }
                }
                _ => {}
            }
        }
    }

    /// The next message, which must be a request for `method`; returns its
    /// id and params.
    pub async fn expect_request(&mut self, method: &str) -> (Value, Value) {
        let mut message = self.recv().await;
        // Answers `protocol.get_info` on the way, as the gateway does (the
        // agent asks for the frame limits after a subprotocol upgrade).
        while method != "protocol.get_info" && message["method"] == "protocol.get_info" {
            let info = mode_info(
                self.binary,
                self.encode.compress_threshold.is_some(),
                self.encode.compress_threshold.unwrap_or(0) as u64,
                self.encode.checksum,
            );
            let id = message["id"].clone();
            self.answer(&id, info).await;
            message = self.recv().await;
        }
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

    /// Expects `agent.register` and answers it.
    pub async fn register(&mut self, resumed: Value) -> Value {
        let (id, params) = self.expect_request("agent.register").await;
        assert!(id.is_u64(), "{id}");
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

    /// Sends a message as text or as a binary frame, per `binary`.
    pub async fn send(&mut self, value: Value) {
        if !self.binary {
            return self.send_text(value).await;
        }
        let text = value.to_string();
        let (frame_type, method) = frame::classify(text.as_bytes());
        self.sequence += 1;
        let bytes = frame::encode(
            frame_type,
            method,
            self.sequence,
            text.as_bytes(),
            &self.encode,
            &Limits::default(),
        )
        .expect("encode");
        self.send_bytes(bytes).await;
    }

    /// Sends a message as text whatever the mode.
    pub async fn send_text(&mut self, value: Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .expect("send");
    }

    /// Sends raw bytes as a binary WebSocket message.
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .expect("send");
    }

    /// Sends a ping frame with this sequence id.
    pub async fn send_ping(&mut self, sequence: u64) {
        let bytes = frame::encode(
            FrameType::Ping,
            Method::Ping,
            sequence,
            b"{}",
            &self.encode,
            &Limits::default(),
        )
        .expect("encode");
        self.send_bytes(bytes).await;
    }

    /// Expects `protocol.set_binary`, answers it as the gateway does (in
    /// the old mode), then sends binary itself; returns the params.
    pub async fn expect_set_binary(&mut self) -> Value {
        let (id, params) = self.expect_request("protocol.set_binary").await;
        let compression = &params["compression"];
        let threshold = compression["threshold"].as_u64().unwrap_or(1024);
        let enabled = compression["enabled"].as_bool().unwrap_or(true);
        let checksum = params["checksum"].as_bool().unwrap_or(true);
        self.answer(&id, mode_info(true, enabled, threshold, checksum))
            .await;
        self.binary = true;
        self.encode = EncodeOptions {
            compress_threshold: enabled.then_some(threshold as usize),
            checksum,
            ..EncodeOptions::default()
        };
        params
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

/// `protocol.get_info`'s (and `protocol.set_binary`'s) result.
pub fn mode_info(binary: bool, compression: bool, threshold: u64, checksum: bool) -> Value {
    json!({
        "mode": if binary { "binary" } else { "text" }, "version": 1,
        "compression": {"enabled": compression, "threshold": threshold, "algorithm": "gzip"},
        "checksum": checksum, "subprotocol": null,
        "limits": {"max_payload_bytes": 1048576, "max_decompressed_bytes": 10485760},
        "frames": {}
    })
}

/// A shared document as the gateway keeps it.
pub struct FakeDoc {
    pub name: String,
    pub doc: Document,
    now_ms: u64,
}

impl FakeDoc {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            doc: Document::new(),
            now_ms: 1,
        }
    }

    /// Applies ops (JSON, as `state.apply` takes them) as replica `by`;
    /// returns the delta.
    pub fn apply(&mut self, by: &str, ops: &Value) -> Document {
        let ops = parse_ops(ops, 100).unwrap_or_else(|e| panic!("ops: {e}"));
        self.now_ms += 1;
        self.doc
            .apply(by, &ops, self.now_ms)
            .unwrap_or_else(|e| panic!("apply: {e}"))
    }

    /// The answer to `state.subscribe` and `state.sync`.
    pub fn snapshot(&self) -> Value {
        json!({"doc": self.name, "state": self.doc.to_json(), "hash": self.doc.hash(), "value": self.doc.value()})
    }

    /// The params of the `state.delta` that pushes `delta`.
    pub fn delta(&self, delta: &Document) -> Value {
        json!({"doc": self.name, "delta": delta.to_json(), "hash": self.doc.hash()})
    }

    /// Serves one `state.apply` (pushing its delta first, as the gateway
    /// does for a subscriber); returns the ops.
    pub async fn serve_apply(&mut self, conn: &mut GatewayConn, subscribed: bool) -> Value {
        let (id, params) = conn.expect_request("state.apply").await;
        assert_eq!(params["doc"], self.name.as_str());
        let delta = self.apply("agent", &params["ops"]);
        if subscribed {
            conn.notify("state.delta", self.delta(&delta)).await;
        }
        let applied = params["ops"].as_array().map_or(0, Vec::len);
        conn.answer(
            &id,
            json!({"doc": self.name, "applied": applied, "hash": self.doc.hash(),
                   "delta": delta.to_json(), "value": self.doc.value()}),
        )
        .await;
        params["ops"].clone()
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
    pub handle: AgentHandle,
    pub shutdown: CancellationToken,
    pub release: Arc<Semaphore>,
    pub join: JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    pub fn start(opts: AgentOptions) -> Self {
        let agent = Agent::new(opts);
        let events = agent.events();
        let handle = agent.handle();
        let shutdown = CancellationToken::new();
        let release = Arc::new(Semaphore::new(0));
        let handler = Arc::new(ScriptedHandler {
            release: release.clone(),
        });
        let join = tokio::spawn(agent.run(handler, shutdown.clone()));
        Self {
            events,
            handle,
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
