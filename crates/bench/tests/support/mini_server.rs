//! A trivial in-process MCP server over Streamable HTTP, for tests and for
//! checking that the load tool itself is not the bottleneck.
//!
//! It answers `initialize` (with a session id), accepts notifications with 202,
//! answers `tools/call` for `echo` (text result), `fail` (`isError: true`) and
//! anything else (JSON-RPC error), and counts `DELETE`s. Replies are either
//! `application/json` or `text/event-stream` (with a priming event first).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// How replies are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `application/json` bodies.
    Json,
    /// `text/event-stream` bodies.
    Sse,
}

/// What the server has seen.
#[derive(Debug, Default)]
pub struct Counters {
    /// `initialize` requests.
    pub initialize: AtomicU64,
    /// `tools/call` requests.
    pub calls: AtomicU64,
    /// `DELETE` requests.
    pub deletes: AtomicU64,
}

struct App {
    mode: Mode,
    token: Option<String>,
    counters: Arc<Counters>,
}

/// Binds 127.0.0.1 on `port` (0 = any), serves in the background, returns the MCP URL.
pub async fn spawn(
    mode: Mode,
    token: Option<&str>,
    port: u16,
) -> std::io::Result<(String, Arc<Counters>)> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let addr = listener.local_addr()?;
    let counters = Arc::new(Counters::default());
    let app = Arc::new(App {
        mode,
        token: token.map(str::to_owned),
        counters: Arc::clone(&counters),
    });
    let router = Router::new()
        .route("/mcp", post(handle_post).delete(handle_delete))
        .with_state(app);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((format!("http://{addr}/mcp"), counters))
}

fn authorized(app: &App, headers: &HeaderMap) -> bool {
    match &app.token {
        None => true,
        Some(t) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.strip_prefix("Bearer ") == Some(t.as_str())),
    }
}

async fn handle_delete(State(app): State<Arc<App>>, headers: HeaderMap) -> StatusCode {
    if headers.get("mcp-session-id").is_none() {
        return StatusCode::BAD_REQUEST;
    }
    app.counters.deletes.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

async fn handle_post(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&app, &headers) {
        return (StatusCode::UNAUTHORIZED, "unauthorized").into_response();
    }
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "bad json").into_response();
    };
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    let reply = match method {
        "initialize" => {
            let n = app.counters.initialize.fetch_add(1, Ordering::Relaxed);
            let body = json!({"jsonrpc":"2.0","id":id,"result":{
                "protocolVersion":"2025-06-18","capabilities":{"tools":{}},
                "serverInfo":{"name":"mini","version":"0"}}});
            let mut resp = frame(app.mode, &body);
            if let Ok(v) = HeaderValue::from_str(&format!("session-{n}")) {
                resp.headers_mut().insert("mcp-session-id", v);
            }
            return resp;
        }
        m if m.starts_with("notifications/") => return StatusCode::ACCEPTED.into_response(),
        "tools/call" => {
            if headers.get("mcp-session-id").is_none() {
                return (StatusCode::BAD_REQUEST, "missing session").into_response();
            }
            app.counters.calls.fetch_add(1, Ordering::Relaxed);
            let params = msg.get("params").cloned().unwrap_or(Value::Null);
            match params.get("name").and_then(Value::as_str) {
                Some("echo") => {
                    let text = params
                        .pointer("/arguments/message")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    json!({"jsonrpc":"2.0","id":id,"result":{
                        "content":[{"type":"text","text":format!("Echo: {text}")}]}})
                }
                Some("fail") => json!({"jsonrpc":"2.0","id":id,"result":{
                    "isError":true,"content":[{"type":"text","text":"boom"}]}}),
                other => json!({"jsonrpc":"2.0","id":id,"error":{
                    "code":-32602,"message":format!("Unknown tool: {}", other.unwrap_or(""))}}),
            }
        }
        _ => json!({"jsonrpc":"2.0","id":id,"error":{"code":-32601,"message":"Method not found"}}),
    };
    frame(app.mode, &reply)
}

fn frame(mode: Mode, body: &Value) -> Response {
    match mode {
        Mode::Json => (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response(),
        Mode::Sse => (
            [(header::CONTENT_TYPE, "text/event-stream")],
            format!("id: prime\ndata:\n\nevent: message\nid: 1\ndata: {body}\n\n"),
        )
            .into_response(),
    }
}
