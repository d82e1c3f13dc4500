//! The legacy HTTP+SSE transport of MCP 2024-11-05: `GET /sse` opens the
//! server-to-client event stream and announces `/messages?sessionId=…` in an
//! `endpoint` event; clients POST their messages there and get `202 Accepted`.
//! rmcp dropped this transport, so it is ours: each session is an rmcp server
//! over a pair of bounded channels, so a slow client slows its own session
//! instead of growing the gateway's memory.

// Handlers return a ready axum `Response` as their error: it is what they send.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use meshgate_store::{SessionRecord, now_ms};
use rmcp::model::ClientJsonRpcMessage;
use rmcp::service::serve_server_with_ct;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, PollSender};

use crate::auth::{RequestPrincipal, TraceId};
use crate::handler::GatewayHandler;
use crate::http::{AppState, jsonrpc_error, read_checked_body};

/// Capacity of each direction's queue, in messages.
const QUEUE: usize = 256;

/// Open legacy sessions: id → the inbound queue of the session's server.
#[derive(Default)]
pub struct LegacySessions {
    open: Mutex<HashMap<String, mpsc::Sender<ClientJsonRpcMessage>>>,
}

impl LegacySessions {
    fn insert(&self, id: &str, tx: mpsc::Sender<ClientJsonRpcMessage>) {
        if let Ok(mut m) = self.open.lock() {
            m.insert(id.to_owned(), tx);
        }
    }
    fn remove(&self, id: &str) {
        if let Ok(mut m) = self.open.lock() {
            m.remove(id);
        }
    }
    fn get(&self, id: &str) -> Option<mpsc::Sender<ClientJsonRpcMessage>> {
        self.open.lock().ok().and_then(|m| m.get(id).cloned())
    }
    /// Number of open legacy sessions.
    pub fn len(&self) -> usize {
        self.open.lock().map(|m| m.len()).unwrap_or(0)
    }
    /// True when no legacy session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Ends a legacy session when its event stream is dropped (client gone).
struct StreamGuard {
    id: String,
    sessions: Arc<LegacySessions>,
    ct: CancellationToken,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.sessions.remove(&self.id);
        self.ct.cancel();
    }
}

pub(crate) fn host_allowed(
    state: &AppState,
    headers: &axum::http::HeaderMap,
) -> Result<(), Response> {
    let allowed = &state.gw.config.mcp.allowed_hosts;
    if allowed.iter().any(|h| h == "*") {
        return Ok(());
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    if allowed.iter().any(|a| a == host || a == bare) {
        Ok(())
    } else {
        Err((
            StatusCode::FORBIDDEN,
            format!("Host `{host}` is not allowed (DNS-rebinding protection); add it to mcp.allowed_hosts"),
        )
            .into_response())
    }
}

/// `GET /sse`: opens a session and its event stream.
pub async fn open_stream(
    State(state): State<AppState>,
    principal: Option<axum::Extension<RequestPrincipal>>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(r) = host_allowed(&state, &headers) {
        return r;
    }
    let Some(axum::Extension(RequestPrincipal(principal))) = principal else {
        return jsonrpc_error(
            StatusCode::UNAUTHORIZED,
            None,
            -32600,
            "internal: GET /sse reached without an authenticated principal".into(),
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
    let id = uuid::Uuid::new_v4().simple().to_string();
    state.auth.remember_session_owner(&id, &principal).await;
    let (in_tx, in_rx) = mpsc::channel::<ClientJsonRpcMessage>(QUEUE);
    let (out_tx, out_rx) = mpsc::channel(QUEUE);
    let ct = state.gw.shutdown.child_token();
    state.legacy.insert(&id, in_tx);
    let handler = GatewayHandler::new(state.gw.clone(), state.auth.clone(), "sse")
        .with_principal(principal.clone())
        .with_session(&id, ct.clone());
    let auth = state.auth.clone();
    let gw = state.gw.clone();
    let sessions = state.legacy.clone();
    let session_id = id.clone();
    let service_ct = ct.clone();
    tokio::spawn(async move {
        let transport = (PollSender::new(out_tx), tokio_stream_from(in_rx));
        match serve_server_with_ct(handler, transport, service_ct).await {
            Ok(running) => {
                if let Some(info) = running.peer().peer_info() {
                    let now = now_ms();
                    let record = SessionRecord {
                        id: session_id.clone(),
                        transport: "sse".into(),
                        protocol_version: info.protocol_version.to_string(),
                        client_name: info.client_info.name.clone(),
                        client_version: info.client_info.version.clone(),
                        state: serde_json::json!({}),
                        created_at: now,
                        last_seen_at: now,
                    };
                    if let Err(e) = gw.store.put_session(&record).await {
                        tracing::warn!(error = %e, "could not record legacy SSE session");
                    }
                }
                let _ = running.waiting().await;
                let _ = gw.store.delete_session(&session_id).await;
                auth.forget_session(&session_id);
            }
            Err(e) => {
                tracing::info!(session = %session_id, error = %e, "legacy SSE session ended before initialize")
            }
        }
        sessions.remove(&session_id);
    });
    let guard = StreamGuard {
        id: id.clone(),
        sessions: state.legacy.clone(),
        ct,
    };
    let endpoint = futures::stream::once(futures::future::ready(Ok::<Event, Infallible>(
        Event::default()
            .event("endpoint")
            .data(format!("/messages?sessionId={id}")),
    )));
    let messages = tokio_stream_from(out_rx).map(move |msg| {
        let _keep = &guard;
        let data = serde_json::to_string(&msg).unwrap_or_else(|e| {
            format!(r#"{{"jsonrpc":"2.0","method":"notifications/message","params":{{"level":"error","data":"meshgate could not encode a message: {e}"}}}}"#)
        });
        Ok(Event::default().event("message").data(data))
    });
    // When the session ends because the gateway is shutting down, the
    // client gets a last event saying so before the stream closes.
    let gw = state.gw.clone();
    let farewell = futures::stream::once(async move { gw.inflight.is_draining() })
        .filter_map(|draining| {
            futures::future::ready(draining.then(|| {
                Ok(Event::default().event("shutdown").data(
                    r#"{"reason":"shutting_down","message":"meshgate is shutting down; reconnect to another instance or after it restarts"}"#,
                ))
            }))
        });
    let keep_alive = state.gw.config.mcp.sse_keep_alive_secs.max(1);
    Sse::new(endpoint.chain(messages).chain(farewell))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(keep_alive)))
        .into_response()
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Query of `POST /messages`.
#[derive(Deserialize)]
pub struct MessageQuery {
    #[serde(rename = "sessionId")]
    session_id: Option<String>,
}

/// `POST /messages?sessionId=…`: hands one client message to its session.
pub async fn post_message(
    State(state): State<AppState>,
    Query(q): Query<MessageQuery>,
    principal: Option<axum::Extension<RequestPrincipal>>,
    trace: Option<axum::Extension<TraceId>>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    if let Err(r) = host_allowed(&state, &headers) {
        return r;
    }
    let Some(id) = q.session_id else {
        return jsonrpc_error(
            StatusCode::BAD_REQUEST,
            None,
            -32600,
            "missing sessionId query parameter; POST to the endpoint announced by GET /sse".into(),
        );
    };
    let bytes = match read_checked_body(body, state.gw.config.mcp.max_request_body_bytes).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(axum::Extension(RequestPrincipal(principal))) = principal else {
        return jsonrpc_error(
            StatusCode::UNAUTHORIZED,
            None,
            -32600,
            "internal: POST /messages reached without an authenticated principal".into(),
        );
    };
    // Only the principal that opened the stream may post to it; anyone else
    // is told what they would be told of a session that does not exist.
    if state.auth.enabled() && !state.auth.session_owned_by(&id, &principal).await {
        return jsonrpc_error(
            StatusCode::NOT_FOUND,
            None,
            -32600,
            format!("unknown or closed session `{id}`; open a new one with GET /sse"),
        );
    }
    let mut message: ClientJsonRpcMessage = match serde_json::from_slice(&bytes) {
        Ok(m) => m,
        Err(e) => {
            let id = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("id").cloned());
            return jsonrpc_error(
                StatusCode::BAD_REQUEST,
                id,
                -32602,
                format!("message does not match the MCP schema: {e}"),
            );
        }
    };
    if let ClientJsonRpcMessage::Request(req) = &mut message {
        use rmcp::model::GetExtensions;
        let ext = req.request.extensions_mut();
        ext.insert(RequestPrincipal(principal));
        if let Some(axum::Extension(t)) = trace {
            ext.insert(t);
        }
    }
    let Some(tx) = state.legacy.get(&id) else {
        return jsonrpc_error(
            StatusCode::NOT_FOUND,
            None,
            -32600,
            format!("unknown or closed session `{id}`; open a new one with GET /sse"),
        );
    };
    match tx.send(message).await {
        Ok(()) => (StatusCode::ACCEPTED, "Accepted").into_response(),
        Err(_) => jsonrpc_error(
            StatusCode::NOT_FOUND,
            None,
            -32600,
            format!("session `{id}` has ended; open a new one with GET /sse"),
        ),
    }
}
