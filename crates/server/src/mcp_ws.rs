//! `/mcp/ws`: MCP over WebSocket. The same JSON-RPC messages as Streamable
//! HTTP, one per text frame, for one MCP session per connection (the
//! connection is the session). Subprotocol `mcp` is accepted when offered.
//!
//! The reader checks each frame (JSON-RPC envelope, then the MCP message
//! types) and answers a bad one with a JSON-RPC error on the same
//! connection; good ones go to a `GatewayHandler` served by rmcp over a
//! channel pair, as the legacy SSE transport does. The writer sends the
//! handler's messages, pings every `mcp.ws_ping_interval_secs`, and closes
//! with 1000 (the session ended), 1001 (the gateway shuts down), 1008
//! (silence past `mcp.ws_pong_timeout_secs`, a frame over
//! `mcp.max_request_body_bytes`) or 1011 (the session could not start).

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use meshgate_protocol::check_envelope;
use meshgate_store::{SessionRecord, now_ms};
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::service::serve_server_with_ct;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, PollSender};

use crate::auth::RequestPrincipal;
use crate::handler::GatewayHandler;
use crate::http::{AppState, jsonrpc_error};

/// The WebSocket subprotocol of MCP.
pub const SUBPROTOCOL: &str = "mcp";
/// Messages queued each way.
const QUEUE: usize = 256;

/// What the writer sends besides the handler's messages.
enum Control {
    /// A JSON-RPC message of the transport itself (an error answer).
    Text(String),
    /// Close with this code and reason, then stop.
    Close(u16, String),
}

fn rpc_error(id: Option<Value>, code: i32, message: String) -> String {
    json!({"jsonrpc": "2.0", "id": id.unwrap_or(Value::Null), "error": {"code": code, "message": message}})
        .to_string()
}

/// `GET /mcp/ws`.
pub async fn upgrade(
    State(state): State<AppState>,
    principal: Option<axum::Extension<RequestPrincipal>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Err(r) = crate::legacy::host_allowed(&state, &headers) {
        return r;
    }
    let Some(axum::Extension(RequestPrincipal(principal))) = principal else {
        return jsonrpc_error(
            StatusCode::UNAUTHORIZED,
            None,
            -32600,
            "internal: /mcp/ws reached without an authenticated principal".into(),
        );
    };
    if state.gw.inflight.is_draining() {
        return jsonrpc_error(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            -32004,
            "the gateway is shutting down and opens no new sessions; connect to another instance or retry after it restarts".into(),
        );
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return jsonrpc_error(
                StatusCode::BAD_REQUEST,
                None,
                -32600,
                format!(
                    "/mcp/ws is MCP over WebSocket; connect with a WebSocket client (subprotocol `mcp`), or use POST /mcp for Streamable HTTP ({e})"
                ),
            );
        }
    };
    let limit = state.gw.config.mcp.max_request_body_bytes;
    ws.protocols([SUBPROTOCOL])
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| run(state, principal, socket))
        .into_response()
}

async fn run(
    state: AppState,
    principal: std::sync::Arc<meshgate_core::Principal>,
    socket: WebSocket,
) {
    let cfg = &state.gw.config.mcp;
    let limit = cfg.max_request_body_bytes;
    let ping_every = Duration::from_secs(cfg.ws_ping_interval_secs.max(1));
    let silence = Duration::from_secs(cfg.ws_pong_timeout_secs.max(2));
    let id = format!("ws-{}", uuid::Uuid::new_v4().simple());
    let (in_tx, in_rx) = mpsc::channel::<ClientJsonRpcMessage>(QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<ServerJsonRpcMessage>(QUEUE);
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Control>();
    let ct = state.gw.shutdown.child_token();
    let session_ct = CancellationToken::new();
    let handler = GatewayHandler::new(state.gw.clone(), state.auth.clone(), "websocket")
        .with_principal(principal.clone())
        .with_session(&id, session_ct.clone());
    state.auth.remember_session_owner(&id, &principal).await;

    // The MCP session, served over the channel pair.
    let gw = state.gw.clone();
    let auth = state.auth.clone();
    let service_ct = session_ct.clone();
    let session_id = id.clone();
    let ctl = ctl_tx.clone();
    let service = tokio::spawn(async move {
        let mut in_rx = in_rx;
        let transport = (
            PollSender::new(out_tx),
            futures::stream::poll_fn(move |cx| in_rx.poll_recv(cx)),
        );
        match serve_server_with_ct(handler, transport, service_ct).await {
            Ok(running) => {
                if let Some(info) = running.peer().peer_info() {
                    let now = now_ms();
                    let record = SessionRecord {
                        id: session_id.clone(),
                        transport: "websocket".into(),
                        protocol_version: info.protocol_version.to_string(),
                        client_name: info.client_info.name.clone(),
                        client_version: info.client_info.version.clone(),
                        state: json!({}),
                        created_at: now,
                        last_seen_at: now,
                    };
                    if let Err(e) = gw.store.put_session(&record).await {
                        tracing::warn!(error = %e, "could not record the WebSocket session");
                    }
                }
                let _ = running.waiting().await;
                let _ = gw.store.delete_session(&session_id).await;
            }
            Err(e) => {
                tracing::info!(session = %session_id, error = %e, "MCP WebSocket session ended before initialize");
                let _ = ctl.send(Control::Close(
                    1011,
                    "the MCP session could not start; send initialize first".into(),
                ));
            }
        }
        auth.forget_session(&session_id);
    });

    let (mut sink, mut stream) = socket.split();
    let writer_ct = ct.clone();
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(ping_every);
        ping.tick().await;
        loop {
            let (frame, last) = tokio::select! {
                // The transport's own messages (a close) go first.
                biased;
                c = ctl_rx.recv() => match c {
                    Some(Control::Text(t)) => (Message::Text(t.into()), false),
                    Some(Control::Close(code, reason)) => (Message::Close(Some(CloseFrame { code, reason: reason.into() })), true),
                    None => break,
                },
                m = out_rx.recv() => match m {
                    Some(m) => match serde_json::to_string(&m) {
                        Ok(text) => (Message::Text(text.into()), false),
                        Err(e) => (Message::Text(rpc_error(None, -32603, format!("meshgate could not encode a message: {e}")).into()), false),
                    },
                    // The session ended: a normal close.
                    None => (Message::Close(Some(CloseFrame { code: 1000, reason: "MCP session ended".into() })), true),
                },
                _ = ping.tick() => (Message::Ping(Default::default()), false),
                _ = writer_ct.cancelled() => (Message::Close(Some(CloseFrame {
                    code: 1001,
                    reason: "gateway shutting down; reconnect to another instance or after it restarts".into(),
                })), true),
            };
            if sink.send(frame).await.is_err() || last {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let mut heard = tokio::time::Instant::now();
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let why = loop {
        tokio::select! {
            msg = stream.next() => {
                heard = tokio::time::Instant::now();
                match msg {
                    None => break "closed",
                    Some(Err(e)) => {
                        let text = e.to_string();
                        if text.contains("too long") || text.contains("too big") || text.contains("Space limit") {
                            let _ = ctl_tx.send(Control::Close(1008, format!("message exceeds mcp.max_request_body_bytes ({limit} bytes)")));
                        }
                        break "read failed";
                    }
                    Some(Ok(Message::Text(t))) => {
                        if let Err(answer) = accept(t.as_bytes()) {
                            let _ = ctl_tx.send(Control::Text(answer));
                            continue;
                        }
                        match serde_json::from_str::<ClientJsonRpcMessage>(t.as_str()) {
                            Ok(m) => {
                                if in_tx.send(m).await.is_err() {
                                    break "session ended";
                                }
                            }
                            Err(e) => {
                                let id = serde_json::from_str::<Value>(t.as_str()).ok().and_then(|v| v.get("id").cloned());
                                let _ = ctl_tx.send(Control::Text(rpc_error(id, -32600, format!("not an MCP message: {e}"))));
                            }
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let _ = ctl_tx.send(Control::Text(rpc_error(None, -32600,
                            "binary frames are not used on /mcp/ws; send each JSON-RPC message in a text frame".into())));
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) => break "closed by the client",
                }
            }
            _ = check.tick() => {
                if heard.elapsed() > silence {
                    let _ = ctl_tx.send(Control::Close(1008, format!(
                        "no frame or pong for {} s (mcp.ws_pong_timeout_secs)", silence.as_secs())));
                    break "silent";
                }
            }
            _ = ct.cancelled() => break "shutting down",
        }
    };
    tracing::debug!(session = %id, why, "MCP WebSocket connection ended");
    if matches!(why, "silent" | "read failed" | "shutting down") {
        // The gateway closed: read on until the client's close answer (or
        // 2 s), so the close frame is not lost to a reset connection.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    drop(in_tx);
    session_ct.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), service).await;
}

/// Checks one frame's JSON-RPC envelope; `Err` holds the error answer.
fn accept(bytes: &[u8]) -> Result<(), String> {
    check_envelope(bytes)
        .map(|_| ())
        .map_err(|(e, id)| rpc_error(id, e.code().code(), e.to_string()))
}
