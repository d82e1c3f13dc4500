//! `/ws`: the agent endpoint. One WebSocket per agent, JSON-RPC 2.0 in text
//! frames, or in binary frames (`docs/binary-frames.md`) once negotiated by
//! the `mcpw.v1` subprotocol or `protocol.set_binary`, as
//! `docs/agent-protocol.md` describes.
//!
//! The mode only decides how the gateway sends: it reads text and binary
//! frames at any time, so nothing is lost while the two ends switch. The
//! switch itself travels through the writer's queue (`Outbound::Mode`) right
//! behind the answer to `protocol.set_binary`, so that answer is the last
//! message in the old mode.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
use meshgate_protocol::frame::{self, EncodeOptions, FrameType, Limits, Method};
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
    let cfg = &mesh.cfg;
    let limit = cfg
        .max_message_bytes
        .max(cfg.binary_max_payload_bytes + frame::HEADER_LEN);
    let ws = if cfg.binary_enabled {
        ws.protocols([frame::SUBPROTOCOL])
    } else {
        ws
    };
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            let subprotocol = socket
                .protocol()
                .and_then(|p| p.to_str().ok())
                .map(str::to_owned);
            Connection::new(mesh, principal, agent_id, agent_type, subprotocol)
                .run(socket)
                .await
        })
}

/// How a connection's gateway side sends messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireMode {
    /// Binary frames instead of text frames.
    pub binary: bool,
    /// Compress messages of at least this many bytes (binary mode only).
    pub compress_threshold: Option<usize>,
    /// Append a CRC32 trailer (binary mode only).
    pub checksum: bool,
}

impl WireMode {
    fn text(cfg: &meshgate_core::config::MeshConfig) -> WireMode {
        WireMode {
            binary: false,
            compress_threshold: (cfg.binary_compression_threshold > 0)
                .then_some(cfg.binary_compression_threshold),
            checksum: cfg.binary_checksum,
        }
    }

    fn encode_options(self) -> EncodeOptions {
        EncodeOptions {
            compress_threshold: self.compress_threshold,
            checksum: self.checksum,
            ..EncodeOptions::default()
        }
    }
}

/// Frame counts of one connection, for `protocol.get_info`.
#[derive(Debug, Default)]
struct FrameStats {
    text_in: AtomicU64,
    binary_in: AtomicU64,
    text_out: AtomicU64,
    binary_out: AtomicU64,
    compressed_out: AtomicU64,
    bad_in: AtomicU64,
}

impl FrameStats {
    fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "text_in": get(&self.text_in),
            "binary_in": get(&self.binary_in),
            "text_out": get(&self.text_out),
            "binary_out": get(&self.binary_out),
            "compressed_out": get(&self.compressed_out),
            "bad_in": get(&self.bad_in),
        })
    }
}

/// The writer half of a connection: turns queued messages into frames.
struct FrameWriter {
    mode: WireMode,
    sequence: u64,
    limits: Limits,
    stats: Arc<FrameStats>,
}

impl FrameWriter {
    /// The WebSocket message for one JSON-RPC message. A message too large
    /// for a binary frame goes out as text: the agent reads both.
    fn message(&mut self, text: String) -> Message {
        if self.mode.binary {
            self.sequence += 1;
            let (kind, method) = frame::classify(text.as_bytes());
            match frame::encode(
                kind,
                method,
                self.sequence,
                text.as_bytes(),
                &self.mode.encode_options(),
                &self.limits,
            ) {
                Ok(bytes) => {
                    self.stats.binary_out.fetch_add(1, Ordering::Relaxed);
                    if bytes.len() >= frame::HEADER_LEN
                        && u16::from_be_bytes([bytes[6], bytes[7]]) & frame::flags::COMPRESSED != 0
                    {
                        self.stats.compressed_out.fetch_add(1, Ordering::Relaxed);
                    }
                    metrics::counter!("agent_frames_total", "direction" => "out", "kind" => "binary")
                        .increment(1);
                    return Message::Binary(bytes.into());
                }
                Err(e) => {
                    tracing::debug!(error = %e, size = text.len(), "mesh: message too large for a binary frame; sent as text");
                }
            }
        }
        self.stats.text_out.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("agent_frames_total", "direction" => "out", "kind" => "text")
            .increment(1);
        Message::Text(text.into())
    }
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
    /// The subprotocol agreed at the upgrade (`mcpw.v1` or none).
    subprotocol: Option<String>,
    /// How the gateway sends, as of the last message queued.
    mode: WireMode,
    limits: Limits,
    stats: Arc<FrameStats>,
    bad_frames: u32,
    /// Shared documents this connection subscribes to.
    subscriptions: BTreeSet<String>,
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

const AGENT_METHODS: &str = "agent.register, agent.heartbeat, task.accept, task.reject, task.progress, task.extend, task.complete, task.fail, state.get, state.apply, state.subscribe, state.unsubscribe, state.hash, state.sync, protocol.set_binary, protocol.get_info";

impl Connection {
    fn new(
        mesh: Arc<Mesh>,
        principal: Arc<Principal>,
        agent_id: String,
        agent_type: String,
        subprotocol: Option<String>,
    ) -> Connection {
        let per_sec = u64::from(mesh.cfg.agent_messages_per_sec);
        let mut mode = WireMode::text(&mesh.cfg);
        mode.binary = subprotocol.as_deref() == Some(frame::SUBPROTOCOL);
        let limits = Limits {
            max_payload: mesh.cfg.binary_max_payload_bytes,
            max_decompressed: mesh.cfg.binary_max_decompressed_bytes,
        };
        Connection {
            subprotocol,
            mode,
            limits,
            stats: Arc::new(FrameStats::default()),
            bad_frames: 0,
            subscriptions: BTreeSet::new(),
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
        let mut frames = FrameWriter {
            mode: self.mode,
            sequence: 0,
            limits: self.limits,
            stats: self.stats.clone(),
        };
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let (frame, last) = match m {
                    Outbound::Text(s) => (frames.message(s), false),
                    Outbound::Mode(mode) => {
                        frames.mode = mode;
                        continue;
                    }
                    Outbound::Frame(bytes) => (Message::Binary(bytes.into()), false),
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
                        self.stats.text_in.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("agent_frames_total", "direction" => "in", "kind" => "text").increment(1);
                        if self.registered {
                            self.mesh.seen(&self.agent_id, self.conn);
                        }
                        if let Some(close) = self.handle(t.as_str(), &tx).await {
                            let _ = tx.send(close);
                            break "refused".to_owned();
                        }
                    }
                    Some(Ok(Message::Binary(b))) => {
                        if self.registered {
                            self.mesh.seen(&self.agent_id, self.conn);
                        }
                        if let Some((close, why)) = self.binary(&b, &tx).await {
                            let _ = tx.send(close);
                            break why;
                        }
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
        for doc in std::mem::take(&mut self.subscriptions) {
            self.mesh
                .shared
                .unsubscribe(&self.principal.tenant, &doc, self.conn)
                .await;
        }
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

    /// Handles one binary frame: decodes it and handles each message in it
    /// as if it had come in a text frame. Returns a close frame and the
    /// reason when the connection must end.
    async fn binary(&mut self, bytes: &[u8], tx: &AgentTx) -> Option<(Outbound, String)> {
        self.stats.binary_in.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("agent_frames_total", "direction" => "in", "kind" => "binary")
            .increment(1);
        let decoded = if self.mesh.cfg.binary_enabled {
            frame::decode(bytes, &self.limits).map_err(|e| (e.kind(), e.to_string()))
        } else {
            Err((
                "binary_disabled",
                "binary frames are disabled on this gateway (mesh.binary_enabled = false); send each JSON-RPC message in a text frame".to_owned(),
            ))
        };
        let decoded = match decoded {
            Ok(f) => f,
            Err((kind, e)) => {
                self.bad_frames += 1;
                self.stats.bad_in.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("agent_bad_frames_total", "kind" => kind).increment(1);
                let limit = self.mesh.cfg.binary_max_bad_frames;
                let _ = tx.send(rpc_error(&Value::Null, &MeshError {
                    code: code::BAD_FRAME,
                    status: 400,
                    message: format!(
                        "bad binary frame: {e}; see docs/binary-frames.md ({} of {limit} bad frames allowed on this connection)",
                        self.bad_frames
                    ),
                    data: json!({"kind": kind, "bad_frames": self.bad_frames, "limit": limit}),
                }));
                if self.bad_frames >= limit {
                    let reason: String = format!(
                        "too many bad binary frames ({}); last: {e}",
                        self.bad_frames
                    )
                    .chars()
                    .take(120)
                    .collect();
                    return Some((
                        Outbound::Close(1008, reason),
                        "too many bad frames".to_owned(),
                    ));
                }
                return None;
            }
        };
        match decoded.header.frame_type {
            FrameType::Ping => {
                // Pings count against the message rate like anything else,
                // so a flood of them cannot grow the send queue.
                if let Some(q) = &self.quota
                    && !self.gcra.check(q, mono_now()).allowed
                {
                    metrics::counter!("agent_messages_limited_total").increment(1);
                    return None;
                }
                let pong = frame::encode(
                    FrameType::Pong,
                    Method::Pong,
                    decoded.header.sequence,
                    &[],
                    &self.mode.encode_options(),
                    &self.limits,
                );
                if let Ok(pong) = pong {
                    let _ = tx.send(Outbound::Frame(pong));
                }
                return None;
            }
            FrameType::Pong => return None,
            _ => {}
        }
        for message in decoded.messages() {
            let Ok(text) = std::str::from_utf8(message) else {
                let _ = tx.send(rpc_error(
                    &Value::Null,
                    &invalid_message(
                        "the binary frame's payload is not UTF-8 JSON; each message must be one JSON-RPC 2.0 object",
                    ),
                ));
                continue;
            };
            if let Some(close) = self.handle(text, tx).await {
                return Some((close, "refused".to_owned()));
            }
        }
        None
    }

    /// What `protocol.get_info` reports.
    fn protocol_info(&self) -> Value {
        let m = self.mode;
        json!({
            "mode": if m.binary { "binary" } else { "text" },
            "version": frame::VERSION,
            "binary_enabled": self.mesh.cfg.binary_enabled,
            "compression": {
                "enabled": m.compress_threshold.is_some(),
                "threshold": m.compress_threshold.unwrap_or(0),
                "algorithm": "gzip",
            },
            "checksum": m.checksum,
            "subprotocol": self.subprotocol,
            "limits": {
                "max_payload_bytes": self.limits.max_payload,
                "max_decompressed_bytes": self.limits.max_decompressed,
                "max_bad_frames": self.mesh.cfg.binary_max_bad_frames,
            },
            "frames": self.stats.to_json(),
        })
    }

    /// `protocol.set_binary`: validates, answers in the old mode, then
    /// queues the switch.
    fn set_binary(&mut self, params: &Value, id: &Value, tx: &AgentTx) -> Result<(), MeshError> {
        let cfg = &self.mesh.cfg;
        let Some(obj) = params.as_object() else {
            return Err(MeshError::invalid(
                "params",
                "expected {\"enabled\": true|false, \"compression\": {\"enabled\": bool, \"threshold\": bytes}, \"checksum\": bool}",
            ));
        };
        if let Some(k) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "enabled" | "compression" | "checksum"))
        {
            return Err(MeshError::invalid(
                k,
                "unknown field; protocol.set_binary takes enabled, compression and checksum",
            ));
        }
        let Some(enabled) = obj.get("enabled").and_then(Value::as_bool) else {
            return Err(MeshError::invalid("enabled", "required, true or false"));
        };
        if enabled && !cfg.binary_enabled {
            return Err(MeshError::invalid(
                "enabled",
                "binary frames are disabled on this gateway (mesh.binary_enabled = false); stay in text mode",
            ));
        }
        let mut mode = WireMode::text(cfg);
        mode.binary = enabled;
        if let Some(c) = obj.get("compression") {
            let Some(c) = c.as_object() else {
                return Err(MeshError::invalid(
                    "compression",
                    "expected {\"enabled\": bool, \"threshold\": bytes}",
                ));
            };
            if let Some(k) = c
                .keys()
                .find(|k| !matches!(k.as_str(), "enabled" | "threshold"))
            {
                return Err(MeshError::invalid(
                    &format!("compression.{k}"),
                    "unknown field; compression takes enabled and threshold",
                ));
            }
            let on = match c.get("enabled") {
                None => true,
                Some(v) => v.as_bool().ok_or_else(|| {
                    MeshError::invalid("compression.enabled", "must be true or false")
                })?,
            };
            let threshold = match c.get("threshold") {
                None => mode.compress_threshold.unwrap_or(1024),
                Some(v) => v
                    .as_u64()
                    .and_then(|t| usize::try_from(t).ok())
                    .ok_or_else(|| {
                        MeshError::invalid(
                            "compression.threshold",
                            "must be a whole number of bytes (0 compresses every message)",
                        )
                    })?,
            };
            mode.compress_threshold = on.then_some(threshold);
        }
        if let Some(v) = obj.get("checksum") {
            mode.checksum = v
                .as_bool()
                .ok_or_else(|| MeshError::invalid("checksum", "must be true or false"))?;
        }
        self.mode = mode;
        let _ = tx.send(rpc_result(id, self.protocol_info()));
        let _ = tx.send(Outbound::Mode(mode));
        tracing::debug!(agent = %self.agent_id, binary = mode.binary, "mesh: wire mode changed");
        Ok(())
    }

    /// The `state.*` methods. `state.subscribe` and `state.sync` answer
    /// from inside the document's lock (so no delta overtakes the
    /// snapshot) and return `None`; the others return their result.
    async fn state_call(
        &mut self,
        method: &str,
        params: &Value,
        id: Option<&Value>,
        tx: &AgentTx,
    ) -> Result<Option<Value>, MeshError> {
        let doc = match params.get("doc") {
            Some(Value::String(d)) => d.clone(),
            Some(_) => {
                return Err(MeshError::invalid(
                    "doc",
                    "must be a string, the document's name",
                ));
            }
            None => return Err(MeshError::invalid("doc", "required: the document's name")),
        };
        let tenant = self.principal.tenant.clone();
        let shared = &self.mesh.shared;
        let answer = |result: Value| {
            if let Some(id) = id {
                let _ = tx.send(rpc_result(id, result));
            }
        };
        match method {
            "state.get" => shared.get(&tenant, &doc).await.map(Some),
            "state.sync" => shared.sync(&tenant, &doc, answer).await.map(|()| None),
            "state.hash" => shared.hash(&tenant, &doc).await.map(Some),
            "state.apply" => {
                let ops = params.get("ops").unwrap_or(&Value::Null);
                let a = shared.apply(&tenant, &doc, ops, &self.agent_id).await?;
                Ok(Some(json!({
                    "doc": doc,
                    "applied": a.applied,
                    "hash": a.hash,
                    "version": a.version,
                    "delta": a.delta,
                    "value": a.value,
                })))
            }
            "state.subscribe" => {
                let limit = self.mesh.cfg.state_max_docs_per_tenant;
                if !self.subscriptions.contains(&doc) && self.subscriptions.len() >= limit {
                    return Err(MeshError {
                        code: code::TOO_LARGE,
                        status: 413,
                        message: format!(
                            "this connection already subscribes to {limit} documents (mesh.state_max_docs_per_tenant); unsubscribe from one first"
                        ),
                        data: json!({"limit": limit}),
                    });
                }
                shared
                    .subscribe(&tenant, &doc, self.conn, tx, answer)
                    .await?;
                self.subscriptions.insert(doc);
                Ok(None)
            }
            _ => {
                let was = shared.unsubscribe(&tenant, &doc, self.conn).await;
                self.subscriptions.remove(&doc);
                Ok(Some(
                    json!({"doc": doc, "subscribed": false, "was_subscribed": was}),
                ))
            }
        }
    }

    /// Handles one message. Returns a close frame when the connection
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
        match method {
            "protocol.get_info" => {
                if id.is_some() {
                    let _ = tx.send(rpc_result(&reply_id, self.protocol_info()));
                }
                return None;
            }
            "protocol.set_binary" => {
                if let Err(e) = self.set_binary(&params, &reply_id, tx) {
                    let _ = tx.send(rpc_error(&reply_id, &e));
                }
                return None;
            }
            _ => {}
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
            "state.get" | "state.sync" | "state.hash" | "state.apply" | "state.subscribe"
            | "state.unsubscribe" => {
                match self.state_call(method, &params, id.as_ref(), tx).await {
                    Ok(Some(result)) => {
                        if id.is_some() {
                            let _ = tx.send(rpc_result(&reply_id, result));
                        }
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                }
            }
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
        "state.get" => "state.get",
        "state.apply" => "state.apply",
        "state.subscribe" => "state.subscribe",
        "state.unsubscribe" => "state.unsubscribe",
        "state.hash" => "state.hash",
        "state.sync" => "state.sync",
        "protocol.set_binary" => "protocol.set_binary",
        "protocol.get_info" => "protocol.get_info",
        _ => "other",
    }
}
