//! `/ws`: the agent endpoint. One WebSocket per agent, JSON-RPC 2.0 in text
//! frames, as `docs/agent-protocol.md` describes.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use meshgate_core::Principal;
use meshgate_core::mesh::{Registration, check_agent_id};
use meshgate_core::ratelimit::{Gcra, Quota};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{AgentTx, Mesh, MeshError, Outbound, code};
use crate::auth::RequestPrincipal;
use crate::gateway::Gateway;
use crate::resilience::mono_now;

fn refuse(status: StatusCode, code: i32, reason: &str, message: String) -> Response {
    metrics::counter!("agent_connections_refused_total", "reason" => reason.to_owned())
        .increment(1);
    (
        status,
        axum::Json(json!({"error": {"code": code, "reason": reason, "message": message}})),
    )
        .into_response()
}

/// `GET /ws`: checks the agent headers, then upgrades.
pub async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    principal: Option<Extension<RequestPrincipal>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some(mesh) = gw.mesh.get().cloned() else {
        return refuse(
            StatusCode::NOT_FOUND,
            code::SERVER_ERROR,
            "mesh_disabled",
            "the agent mesh is disabled on this gateway (mesh.enabled = false)".into(),
        );
    };
    if gw.inflight.is_draining() || mesh.shutdown.is_cancelled() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            code::SERVER_ERROR,
            "shutting_down",
            "the gateway is shutting down; reconnect later".into(),
        );
    }
    let Some(Extension(RequestPrincipal(principal))) = principal else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            code::AUTH_FAILED,
            "unauthenticated",
            "internal: /ws reached without an authenticated principal".into(),
        );
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let agent_id = match header("x-agent-id") {
        None | Some("") => {
            return refuse(
                StatusCode::BAD_REQUEST,
                code::INVALID_PARAMS,
                "missing_agent_id",
                "the X-Agent-ID header is required: the agent's id, as in agent.register".into(),
            );
        }
        Some(id) => id.to_owned(),
    };
    if let Err(e) = check_agent_id(&agent_id) {
        return refuse(
            StatusCode::BAD_REQUEST,
            code::INVALID_PARAMS,
            "invalid_agent_id",
            format!("X-Agent-ID {e}"),
        );
    }
    let agent_type = match header("x-agent-type") {
        Some(t) if !t.is_empty() && t.len() <= 64 => t.to_owned(),
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                code::INVALID_PARAMS,
                "missing_agent_type",
                "the X-Agent-Type header is required (1 to 64 characters), e.g. `summarizer`"
                    .into(),
            );
        }
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                code::INVALID_MESSAGE,
                "not_websocket",
                format!(
                    "/ws is the agent WebSocket endpoint; connect with a WebSocket client ({e})"
                ),
            );
        }
    };
    let limit = mesh.cfg.max_message_bytes;
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            Connection::new(mesh, principal, agent_id, agent_type)
                .run(socket)
                .await
        })
}

struct Connection {
    mesh: Arc<Mesh>,
    principal: Arc<Principal>,
    agent_id: String,
    agent_type: String,
    conn: u64,
    registered: bool,
    quota: Option<Quota>,
    gcra: Gcra,
}

fn rpc_error(id: &Value, e: &MeshError) -> Outbound {
    Outbound::Text(json!({"jsonrpc": "2.0", "id": id, "error": e.to_rpc()}).to_string())
}

fn rpc_result(id: &Value, result: Value) -> Outbound {
    Outbound::Text(json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string())
}

fn invalid_message(message: impl Into<String>) -> MeshError {
    MeshError {
        code: code::INVALID_MESSAGE,
        status: 400,
        message: message.into(),
        data: Value::Null,
    }
}

const AGENT_METHODS: &str = "agent.register, agent.heartbeat, task.accept, task.reject, task.progress, task.extend, task.complete, task.fail";

impl Connection {
    fn new(
        mesh: Arc<Mesh>,
        principal: Arc<Principal>,
        agent_id: String,
        agent_type: String,
    ) -> Connection {
        let per_sec = u64::from(mesh.cfg.agent_messages_per_sec);
        Connection {
            conn: mesh.connection_id(),
            quota: Quota::new(per_sec, Duration::from_secs(1), per_sec * 2),
            gcra: Gcra::default(),
            mesh,
            principal,
            agent_id,
            agent_type,
            registered: false,
        }
    }

    async fn run(mut self, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let (frame, last) = match m {
                    Outbound::Text(s) => (Message::Text(s.into()), false),
                    Outbound::Ping => (Message::Ping(Default::default()), false),
                    Outbound::Close(code, reason) => (
                        Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })),
                        true,
                    ),
                };
                if sink.send(frame).await.is_err() || last {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        metrics::gauge!("agent_connections").increment(1.0);
        let cfg = &self.mesh.cfg;
        let mut ping = tokio::time::interval(Duration::from_secs(cfg.heartbeat_interval_secs));
        ping.tick().await;
        let register_by =
            tokio::time::Instant::now() + Duration::from_secs(cfg.heartbeat_timeout_secs);
        let shutdown = self.mesh.shutdown.clone();
        let why = loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    None => break "connection closed".to_owned(),
                    Some(Err(e)) => {
                        let text = e.to_string();
                        if text.contains("too long") || text.contains("too big") || text.contains("Space limit") {
                            let _ = tx.send(Outbound::Close(1008, format!(
                                "message exceeds mesh.max_message_bytes ({} bytes)", self.mesh.cfg.max_message_bytes)));
                        }
                        break format!("read failed: {text}");
                    }
                    Some(Ok(Message::Text(t))) => {
                        if self.registered {
                            self.mesh.seen(&self.agent_id, self.conn);
                        }
                        if let Some(close) = self.handle(t.as_str(), &tx).await {
                            let _ = tx.send(close);
                            break "refused".to_owned();
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let _ = tx.send(rpc_error(&Value::Null, &invalid_message(
                            "binary frames are not enabled on this connection; send each JSON-RPC message in a text frame")));
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                        if self.registered {
                            self.mesh.seen(&self.agent_id, self.conn);
                        }
                    }
                    Some(Ok(Message::Close(_))) => break "closed by the agent".to_owned(),
                },
                _ = ping.tick() => {
                    if !self.registered && tokio::time::Instant::now() > register_by {
                        let _ = tx.send(Outbound::Close(1008, format!(
                            "no agent.register within {} s", self.mesh.cfg.heartbeat_timeout_secs)));
                        break "did not register".to_owned();
                    }
                    if tx.send(Outbound::Ping).is_err() {
                        break "writer ended".to_owned();
                    }
                    if let Some(why) = self.credential_gone().await {
                        let _ = tx.send(rpc_error(&Value::Null, &MeshError {
                            code: code::AUTH_FAILED,
                            status: 401,
                            message: format!("{why}; the connection is closed, reconnect with a valid key"),
                            data: Value::Null,
                        }));
                        let _ = tx.send(Outbound::Close(1008, "credential no longer valid".into()));
                        break "credential no longer valid".to_owned();
                    }
                }
                _ = shutdown.cancelled() => {
                    let _ = tx.send(Outbound::Close(1001, "gateway shutting down; reconnect later".into()));
                    break "gateway shutting down".to_owned();
                }
            }
        };
        if self.registered {
            self.mesh.disconnected(&self.agent_id, self.conn, &why);
        }
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        metrics::gauge!("agent_connections").decrement(1.0);
    }

    /// Why the connection's API key is no longer valid (revoked, expired,
    /// deleted), checked every heartbeat interval; `None` while it is.
    async fn credential_gone(&self) -> Option<String> {
        let auth = self.mesh.auth.get()?;
        let key = self.principal.key_id.as_deref()?;
        match auth.live_key_by_id(key).await {
            Ok(_) => None,
            Err(crate::auth::AuthError::Unavailable(_)) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Handles one text frame. Returns a close frame when the connection
    /// must end (a refused registration).
    async fn handle(&mut self, text: &str, tx: &AgentTx) -> Option<Outbound> {
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                let _ = tx.send(rpc_error(
                    &Value::Null,
                    &invalid_message(format!("the message is not valid JSON ({e}); send one JSON-RPC 2.0 object per text frame")),
                ));
                return None;
            }
        };
        let Some(obj) = v.as_object() else {
            let _ = tx.send(rpc_error(
                &Value::Null,
                &invalid_message(
                    "expected one JSON-RPC 2.0 object per frame (batches are not supported)",
                ),
            ));
            return None;
        };
        let id = obj.get("id").cloned();
        let reply_id = id.clone().unwrap_or(Value::Null);
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            let _ = tx.send(rpc_error(
                &reply_id,
                &invalid_message("`jsonrpc` must be \"2.0\""),
            ));
            return None;
        }
        if let Some(id) = &id
            && !(id.is_string() || id.is_i64() || id.is_u64())
        {
            let _ = tx.send(rpc_error(
                &Value::Null,
                &invalid_message("`id` must be a string or an integer"),
            ));
            return None;
        }
        let Some(method) = obj.get("method") else {
            // A response to a request the gateway sent.
            if let Some(Value::String(rid)) = &id
                && (obj.contains_key("result") || obj.contains_key("error"))
            {
                if self.registered {
                    let answer = match obj.get("error") {
                        Some(e) => Err(MeshError {
                            code: e["code"].as_i64().unwrap_or(i64::from(code::SERVER_ERROR))
                                as i32,
                            status: 502,
                            message: format!(
                                "agent `{}` answered with an error: {}",
                                self.agent_id,
                                e["message"].as_str().unwrap_or("(no message)")
                            ),
                            data: e.get("data").cloned().unwrap_or(Value::Null),
                        }),
                        None => Ok(obj.get("result").cloned().unwrap_or(Value::Null)),
                    };
                    self.mesh.answered(&self.agent_id, rid, answer);
                }
                return None;
            }
            let _ = tx.send(rpc_error(&reply_id, &invalid_message(
                "a message needs `method` (a request or notification) or `id` with `result`/`error` (a response)")));
            return None;
        };
        let Some(method) = method.as_str() else {
            let _ = tx.send(rpc_error(
                &reply_id,
                &invalid_message("`method` must be a string"),
            ));
            return None;
        };
        let params = obj.get("params").cloned().unwrap_or(Value::Null);
        if let Some(q) = &self.quota {
            let d = self.gcra.check(q, mono_now());
            if !d.allowed {
                metrics::counter!("agent_messages_limited_total").increment(1);
                if id.is_some() {
                    let retry = d.retry_after.as_millis() as u64;
                    let _ = tx.send(rpc_error(&reply_id, &MeshError {
                        code: code::RATE_LIMITED,
                        status: 429,
                        message: format!("more than {} messages per second (mesh.agent_messages_per_sec); retry in {retry} ms", self.mesh.cfg.agent_messages_per_sec),
                        data: json!({"retry_after_ms": retry}),
                    }));
                }
                return None;
            }
        }
        metrics::counter!("agent_messages_total", "method" => method_label(method)).increment(1);
        if method == "agent.register" {
            return self.register(&params, &reply_id, tx).await;
        }
        if !self.registered {
            if id.is_some() {
                let _ = tx.send(rpc_error(
                    &reply_id,
                    &invalid_message(format!(
                        "register first: the first request must be agent.register, not `{method}`"
                    )),
                ));
            }
            return None;
        }
        let outcome = match method {
            "agent.heartbeat" => {
                if id.is_some() {
                    let _ = tx.send(rpc_result(
                        &reply_id,
                        json!({"server_time_ms": super::now_ms()}),
                    ));
                }
                Ok(())
            }
            "task.complete" => self.complete(params, id.clone(), text.len(), tx).await,
            "task.accept" | "task.reject" | "task.progress" | "task.extend" | "task.fail" => {
                let reply = id.clone().map(|i| (tx.clone(), i));
                self.mesh
                    .agent_call(&self.agent_id, self.conn, method, &params, reply)
            }
            other => Err(MeshError {
                code: code::METHOD_NOT_FOUND,
                status: 404,
                message: format!("unknown method `{other}`; agents may call {AGENT_METHODS}"),
                data: json!({"method": other}),
            }),
        };
        if let Err(e) = outcome
            && id.is_some()
        {
            let _ = tx.send(rpc_error(&reply_id, &e));
        }
        None
    }

    async fn register(&mut self, params: &Value, id: &Value, tx: &AgentTx) -> Option<Outbound> {
        if self.registered {
            let _ = tx.send(rpc_error(id, &MeshError::conflict(
                "this connection is already registered; open a new connection to register again",
                Value::Null,
            )));
            return None;
        }
        let reg = match Registration::parse(
            params,
            &self.agent_id,
            self.mesh.cfg.default_max_concurrent_tasks,
        ) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(rpc_error(id, &MeshError::invalid(&e.field, e.message)));
                return None;
            }
        };
        let name = reg.name.clone();
        match self
            .mesh
            .register(&self.principal.tenant, reg, self.conn, tx.clone(), id)
            .await
        {
            // The mesh sent the answer, ahead of any task for the agent.
            Ok(_) => {
                self.registered = true;
                tracing::info!(agent = %self.agent_id, name = %name, agent_type = %self.agent_type, tenant = %self.principal.tenant, "mesh: agent registered");
                None
            }
            Err(e) => {
                let _ = tx.send(rpc_error(id, &e));
                (e.code == code::CONFLICT)
                    .then(|| Outbound::Close(1008, e.message.chars().take(120).collect()))
            }
        }
    }

    async fn complete(
        &self,
        mut params: Value,
        id: Option<Value>,
        size: usize,
        tx: &AgentTx,
    ) -> Result<(), MeshError> {
        let cfg = &self.mesh.cfg;
        if size > cfg.max_result_bytes {
            return Err(MeshError {
                code: code::TOO_LARGE,
                status: 413,
                message: format!(
                    "task.complete of {size} bytes exceeds mesh.max_result_bytes ({}); put the data elsewhere and return a reference, or fail the task",
                    cfg.max_result_bytes
                ),
                data: json!({"size": size, "limit": cfg.max_result_bytes}),
            });
        }
        if let Some(result) = params.get("result").filter(|r| r.is_object())
            && size > cfg.blob_threshold_bytes
        {
            let bytes = serde_json::to_vec(result)
                .map_err(|e| MeshError::invalid("result", e.to_string()))?;
            if bytes.len() > cfg.blob_threshold_bytes {
                // Only the task's own agent may leave a blob behind.
                let task_id = params
                    .get("task_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                self.mesh.check_held(&self.agent_id, self.conn, task_id)?;
                let reference = self.mesh.store_blob(&self.principal.tenant, bytes).await?;
                params["result"] = reference;
            }
        }
        let reply = id.map(|i| (tx.clone(), i));
        self.mesh
            .agent_call(&self.agent_id, self.conn, "task.complete", &params, reply)
    }
}

fn method_label(m: &str) -> &'static str {
    match m {
        "agent.register" => "agent.register",
        "agent.heartbeat" => "agent.heartbeat",
        "task.accept" => "task.accept",
        "task.reject" => "task.reject",
        "task.progress" => "task.progress",
        "task.extend" => "task.extend",
        "task.complete" => "task.complete",
        "task.fail" => "task.fail",
        _ => "other",
    }
}
