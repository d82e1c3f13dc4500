//! `/mcp/ws`: MCP over WebSocket. The same JSON-RPC messages as Streamable
//! HTTP, one per text frame. Subprotocol `mcp` is accepted when offered.
//!
//! A WebSocket drives the same sessions as Streamable HTTP
//! ([`crate::resume::SequencedSessions`]): `initialize` on a fresh
//! connection opens a session whose sealed id comes back in the result's
//! `_meta["meshgate.io/sessionId"]`; a connection that presents that id
//! (`Mcp-Session-Id`, with `Last-Event-ID` for the last sequence number seen)
//! continues the session, as can a Streamable HTTP client, whichever
//! transport it started on. Every message after `initialize` carries its
//! sequence number in `_meta["meshgate.io/seq"]`.
//!
//! The reader checks each frame (JSON-RPC envelope, then the MCP message
//! types) and answers a bad one with a JSON-RPC error on the same
//! connection. The writer sends the session's messages, pings every
//! `mcp.ws_ping_interval_secs`, and closes with 1000 (the session ended),
//! 1001 (the gateway shuts down), 1008 (silence past
//! `mcp.ws_pong_timeout_secs`, a frame over `mcp.max_request_body_bytes`) or
//! 1011 (the session could not start or resume). A close frame with code
//! 1000 (or none) from the client ends the session, like `DELETE`; any other
//! end of the connection leaves it open for a resumption.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use meshgate_core::Principal;
use meshgate_protocol::check_envelope;
use meshgate_store::{SessionRecord, now_ms};
use rmcp::model::{ClientJsonRpcMessage, ClientRequest, JsonRpcMessage};
use rmcp::service::serve_server_with_ct;
use rmcp::transport::streamable_http_server::SessionManager;
use rmcp::transport::streamable_http_server::session::{
    RestoreOutcome, ServerSseMessage, SessionId,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::auth::{RequestPrincipal, TraceId};
use crate::clients::{PublicSessionId, SessionSlot};
use crate::handler::GatewayHandler;
use crate::http::{AppState, admit_session, jsonrpc_error};
use crate::resume::{SequencedSessions, Via, with_seq};
use crate::session_token::SessionClaims;

/// The `_meta` key of the sealed session id in the `initialize` result.
pub const SESSION_META: &str = "meshgate.io/sessionId";

/// The WebSocket subprotocol of MCP.
pub const SUBPROTOCOL: &str = "mcp";

/// What the writer sends besides the handler's messages.
enum Control {
    /// A JSON-RPC message of the transport itself (an error answer).
    Text(String),
    /// Close with this code and reason, then stop.
    Close(u16, String),
    /// The session's messages, from now on.
    Attach(mpsc::Receiver<ServerSseMessage>),
}

fn rpc_error(id: Option<Value>, code: i32, message: String) -> String {
    json!({"jsonrpc": "2.0", "id": id.unwrap_or(Value::Null), "error": {"code": code, "message": message}})
        .to_string()
}

/// Query parameters of the upgrade (for clients that cannot set headers).
#[derive(Debug, Default, serde::Deserialize)]
pub struct ResumeQuery {
    /// The sealed session id to continue.
    session: Option<String>,
    /// The last sequence number received.
    last_event_id: Option<String>,
}

/// A session this connection continues.
struct Resuming {
    claims: SessionClaims,
    token: String,
    held: bool,
    after: Option<u64>,
}

/// `GET /mcp/ws`.
pub async fn upgrade(
    State(state): State<AppState>,
    principal: Option<axum::Extension<RequestPrincipal>>,
    trace: Option<axum::Extension<TraceId>>,
    headers: HeaderMap,
    Query(query): Query<ResumeQuery>,
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
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let presented = header("mcp-session-id").or(query.session);
    let last = header("last-event-id").or(query.last_event_id);
    let resuming = match presented {
        None => None,
        Some(token) => {
            let (claims, held) = match admit_session(
                &state.sealer,
                &state.gw,
                &state.mcp_sessions,
                &principal,
                &token,
            )
            .await
            {
                Ok(a) => a,
                Err(r) => return r,
            };
            let after = match last.as_deref().map(|l| l.trim().parse::<u64>()) {
                None => None,
                Some(Ok(n)) => Some(n),
                Some(Err(_)) => {
                    return jsonrpc_error(
                        StatusCode::BAD_REQUEST,
                        None,
                        -32600,
                        format!(
                            "Last-Event-ID `{}` is not a sequence number of this gateway; send the last `_meta[\"meshgate.io/seq\"]` (or SSE event id) received, or omit it",
                            last.unwrap_or_default()
                                .chars()
                                .take(64)
                                .collect::<String>()
                        ),
                    );
                }
            };
            Some(Resuming {
                claims,
                token,
                held,
                after,
            })
        }
    };
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
    let parts = base_parts(&headers, &principal, trace.map(|axum::Extension(t)| t));
    let limit = state.gw.config.mcp.max_request_body_bytes;
    ws.protocols([SUBPROTOCOL])
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| run(state, principal, parts, resuming, socket))
        .into_response()
}

/// What the session handler reads from each message's HTTP parts: the
/// principal, the trace id and the headers of the upgrade.
fn base_parts(
    headers: &HeaderMap,
    principal: &Arc<Principal>,
    trace: Option<TraceId>,
) -> http::request::Parts {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("/mcp");
    *req.headers_mut() = headers.clone();
    req.extensions_mut()
        .insert(RequestPrincipal(principal.clone()));
    if let Some(t) = trace {
        req.extensions_mut().insert(t);
    }
    req.into_parts().0
}

/// Names the session in `parts`: the inner id in the header, the sealed one
/// as the public id.
fn name_session(parts: &mut http::request::Parts, sid: &str, token: &str) {
    if let Ok(v) = HeaderValue::from_str(sid) {
        parts.headers.insert("mcp-session-id", v);
    }
    parts.extensions.insert(PublicSessionId(token.to_owned()));
}

/// Serves a session's handler on its transport until the session ends.
fn spawn_service(
    sessions: Arc<SequencedSessions>,
    sid: SessionId,
    handler: GatewayHandler,
    transport: <SequencedSessions as SessionManager>::Transport,
    ct: CancellationToken,
    ready: Option<oneshot::Sender<()>>,
) {
    tokio::spawn(async move {
        match serve_server_with_ct(handler, transport, ct).await {
            Ok(running) => {
                if let Some(r) = ready {
                    let _ = r.send(());
                }
                let _ = running.waiting().await;
            }
            Err(e) => {
                tracing::info!(session = %sid, error = %e, "MCP session ended before initialize")
            }
        }
        let _ = sessions.close_session(&sid).await;
    });
}

/// Brings a session this process does not hold back from its claims, by
/// replaying its `initialize` (as Streamable HTTP does).
async fn restore(
    state: &AppState,
    claims: &SessionClaims,
    parts: &http::request::Parts,
) -> Result<(), String> {
    let sid: SessionId = claims.sid.clone().into();
    let transport = match state.mcp_sessions.restore_session(sid.clone()).await {
        Ok(RestoreOutcome::Restored(t)) => t,
        Ok(RestoreOutcome::AlreadyPresent) => return Ok(()),
        Ok(_) => return Err("the session manager cannot restore sessions".into()),
        Err(e) => return Err(e.to_string()),
    };
    let handler = GatewayHandler::new(state.gw.clone(), state.auth.clone(), "websocket");
    let (ready_tx, ready_rx) = oneshot::channel();
    spawn_service(
        state.mcp_sessions.clone(),
        sid.clone(),
        handler,
        transport,
        state.gw.shutdown.child_token(),
        Some(ready_tx),
    );
    let mut init: ClientJsonRpcMessage = serde_json::from_value(json!({
        "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": claims.init,
    }))
    .map_err(|e| format!("the session's initialize parameters do not parse: {e}"))?;
    init.insert_extension(parts.clone());
    state
        .mcp_sessions
        .initialize_session(&sid, init)
        .await
        .map_err(|e| e.to_string())?;
    let mut initialized: ClientJsonRpcMessage =
        serde_json::from_value(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .map_err(|e| e.to_string())?;
    initialized.insert_extension(parts.clone());
    state
        .mcp_sessions
        .accept_message(&sid, initialized)
        .await
        .map_err(|e| e.to_string())?;
    ready_rx
        .await
        .map_err(|_| "the session handler did not start".to_owned())
}

/// Opens a new session with the client's `initialize`; returns the session
/// id, its sealed id, and the answer to send (with the sealed id in `_meta`).
async fn open(
    state: &AppState,
    principal: &Principal,
    parts: &http::request::Parts,
    mut message: ClientJsonRpcMessage,
) -> Result<(SessionId, SessionClaims, String, Value), String> {
    let JsonRpcMessage::Request(req) = &message else {
        return Err("not a request".into());
    };
    let ClientRequest::InitializeRequest(init) = &req.request else {
        return Err("not initialize".into());
    };
    let params = init.params.clone();
    let (sid, transport) = state
        .mcp_sessions
        .create_session()
        .await
        .map_err(|e| e.to_string())?;
    let handler = GatewayHandler::new(state.gw.clone(), state.auth.clone(), "websocket");
    spawn_service(
        state.mcp_sessions.clone(),
        sid.clone(),
        handler,
        transport,
        state.gw.shutdown.child_token(),
        None,
    );
    let slot = SessionSlot::default();
    let mut p = parts.clone();
    p.extensions.insert(slot.clone());
    message.insert_extension(p);
    let answer = state
        .mcp_sessions
        .initialize_session(&sid, message)
        .await
        .map_err(|e| e.to_string())?;
    let claims = state.sealer.claims(
        &sid,
        &principal.tenant,
        &principal.subject,
        params.clone(),
        crate::upstream::unix_now(),
    );
    let token = state.sealer.seal(&claims)?;
    slot.bind(&token, &sid);
    let mut answer = serde_json::to_value(&answer).map_err(|e| e.to_string())?;
    if let Some(result) = answer.get_mut("result").and_then(Value::as_object_mut) {
        let meta = result.entry("_meta").or_insert_with(|| json!({}));
        if let Some(m) = meta.as_object_mut() {
            m.insert(SESSION_META.into(), json!(token));
        }
    }
    let now = now_ms();
    let record = SessionRecord {
        id: sid.to_string(),
        transport: "websocket".into(),
        protocol_version: params.protocol_version.to_string(),
        client_name: params.client_info.name.clone(),
        client_version: params.client_info.version.clone(),
        state: json!({}),
        created_at: now,
        last_seen_at: now,
    };
    if let Err(e) = state.gw.store.put_session(&record).await {
        tracing::warn!(error = %e, "could not record the WebSocket session");
    }
    Ok((sid, claims, token, answer))
}

/// The session a connection drives, once known.
struct Bound {
    sid: SessionId,
    claims: SessionClaims,
    att: u64,
}

async fn run(
    state: AppState,
    principal: Arc<Principal>,
    mut parts: http::request::Parts,
    resuming: Option<Resuming>,
    socket: WebSocket,
) {
    let cfg = &state.gw.config.mcp;
    let limit = cfg.max_request_body_bytes;
    let ping_every = Duration::from_secs(cfg.ws_ping_interval_secs.max(1));
    let silence = Duration::from_secs(cfg.ws_pong_timeout_secs.max(2));
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Control>();
    let ct = state.gw.shutdown.child_token();
    let (mut sink, mut stream) = socket.split();

    let writer_ct = ct.clone();
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(ping_every);
        ping.tick().await;
        let mut session: Option<mpsc::Receiver<ServerSseMessage>> = None;
        loop {
            let (frame, last) = tokio::select! {
                // The transport's own messages (a close) go first.
                biased;
                c = ctl_rx.recv() => match c {
                    Some(Control::Text(t)) => (Message::Text(t.into()), false),
                    Some(Control::Close(code, reason)) => (Message::Close(Some(CloseFrame { code, reason: reason.into() })), true),
                    Some(Control::Attach(rx)) => { session = Some(rx); continue; }
                    None => break,
                },
                m = async { match session.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => match m {
                    Some(ev) => {
                        let Some(message) = ev.message else { continue };
                        (Message::Text(with_seq(&message, ev.event_id.as_deref()).to_string().into()), false)
                    }
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

    let mut bound: Option<Bound> = None;
    if let Some(r) = resuming {
        name_session(&mut parts, &r.claims.sid, &r.token);
        let restored = if r.held {
            Ok(())
        } else {
            restore(&state, &r.claims, &parts).await
        };
        let sid: SessionId = r.claims.sid.clone().into();
        let attached = match restored {
            Ok(()) => state
                .mcp_sessions
                .attach_fallback(&sid, Via::WebSocket, r.after)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match attached {
            Ok((att, rx)) => {
                let _ = ctl_tx.send(Control::Attach(rx));
                bound = Some(Bound {
                    sid,
                    claims: r.claims,
                    att,
                });
            }
            Err(e) => {
                tracing::info!(session = %sid, error = %e, "could not resume an MCP session over WebSocket");
                // A close reason holds at most 123 bytes.
                let mut reason = format!("cannot resume the MCP session: {e}");
                if reason.len() > 120 {
                    let mut cut = 117;
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    reason.truncate(cut);
                    reason.push_str("...");
                }
                let _ = ctl_tx.send(Control::Close(1011, reason));
            }
        }
    }

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
                        let mut m = match serde_json::from_str::<ClientJsonRpcMessage>(t.as_str()) {
                            Ok(m) => m,
                            Err(e) => {
                                let id = serde_json::from_str::<Value>(t.as_str()).ok().and_then(|v| v.get("id").cloned());
                                let _ = ctl_tx.send(Control::Text(rpc_error(id, -32600, format!("not an MCP message: {e}"))));
                                continue;
                            }
                        };
                        let Some(b) = &bound else {
                            // No session yet: the first request must be initialize.
                            let id = serde_json::from_str::<Value>(t.as_str()).ok().and_then(|v| v.get("id").cloned());
                            match open(&state, &principal, &parts, m).await {
                                Ok((sid, claims, token, answer)) => {
                                    name_session(&mut parts, &sid, &token);
                                    let _ = ctl_tx.send(Control::Text(answer.to_string()));
                                    match state.mcp_sessions.attach_fallback(&sid, Via::WebSocket, None).await {
                                        Ok((att, rx)) => {
                                            let _ = ctl_tx.send(Control::Attach(rx));
                                            bound = Some(Bound { sid, claims, att });
                                        }
                                        Err(e) => {
                                            tracing::warn!(error = %e, "could not attach a new WebSocket session");
                                            let _ = ctl_tx.send(Control::Close(1011, "the MCP session could not start; reconnect and initialize again".into()));
                                            break "could not attach";
                                        }
                                    }
                                }
                                Err(e) if e == "not a request" || e == "not initialize" => {
                                    let _ = ctl_tx.send(Control::Text(rpc_error(id, -32600,
                                        "no session yet: send initialize first (or connect with Mcp-Session-Id to continue a session)".into())));
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "could not open an MCP session over WebSocket");
                                    let _ = ctl_tx.send(Control::Close(1011, "the MCP session could not start; send initialize first".into()));
                                    break "could not open";
                                }
                            }
                            continue;
                        };
                        m.insert_extension(parts.clone());
                        let sent = if matches!(m, JsonRpcMessage::Request(_)) {
                            state.mcp_sessions.submit(&b.sid, m, b.att).await
                        } else {
                            state.mcp_sessions.accept_message(&b.sid, m).await
                        };
                        if let Err(e) = sent {
                            tracing::debug!(session = %b.sid, error = %e, "message for an ended session");
                            let _ = ctl_tx.send(Control::Close(1000, "MCP session ended; connect without Mcp-Session-Id and initialize".into()));
                            break "session ended";
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let _ = ctl_tx.send(Control::Text(rpc_error(None, -32600,
                            "binary frames are not used on /mcp/ws; send each JSON-RPC message in a text frame".into())));
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(frame))) => {
                        break match frame.map(|f| f.code) {
                            None | Some(1000) => "ended by the client",
                            Some(_) => "closed by the client",
                        };
                    }
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
    tracing::debug!(why, "MCP WebSocket connection ended");
    if let Some(b) = &bound {
        state.mcp_sessions.detach(&b.sid, b.att);
        if why == "ended by the client" {
            // A normal close ends the session, like DELETE.
            let _ = state.mcp_sessions.close_session(&b.sid).await;
            let until = (b.claims.exp as i64).saturating_mul(1000);
            if let Err(e) = state.gw.store.end_session(&b.sid, until).await {
                tracing::warn!(error = %e, "could not record an ended session");
            }
            let _ = state.gw.store.delete_session(&b.sid).await;
            let _ = ctl_tx.send(Control::Close(1000, "MCP session ended".into()));
        }
    }
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
    drop(ctl_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// Checks one frame's JSON-RPC envelope; `Err` holds the error answer.
fn accept(bytes: &[u8]) -> Result<(), String> {
    check_envelope(bytes)
        .map(|_| ())
        .map_err(|(e, id)| rpc_error(id, e.code().code(), e.to_string()))
}
