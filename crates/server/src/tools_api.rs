//! The tool registry API: `GET /api/v1/tools` (the catalog, filtered and
//! paged), `GET /api/v1/tools/{name}` (one tool with its upstream's health)
//! and `POST /api/v1/tools/{name}/execute` (a call over plain HTTP).
//!
//! Lists show exactly what `tools/list` would show the caller (tenant
//! visibility and tool rules). An execution is a real MCP `tools/call`:
//! it runs through a [`GatewayHandler`] served in-process over an
//! in-memory pipe, bound to the caller's principal, so rules, rate limits,
//! argument validation, caching, forwarding and audit are the very code
//! MCP clients go through, not a second copy. The price is one in-memory
//! MCP handshake per execution (microseconds next to the upstream call).
//! Upstream requests that need a client (sampling, elicitation, roots) are
//! declined: a REST caller cannot answer them.

// Refusals are ready responses, built on the cold path; boxing them would
// only add an allocation to every refusal.
#![allow(clippy::result_large_err)]
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use meshgate_core::Principal;
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, ErrorCode, Tool};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admin::error;
use crate::auth::middleware::RequestPrincipal;
use crate::gateway::{Gateway, Snapshot};
use crate::handler::GatewayHandler;
use crate::http::AppState;

/// The routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/tools", get(list))
        .route("/api/v1/tools/{name}", get(show))
        .route("/api/v1/tools/{name}/execute", post(execute))
}

type Caller = Option<Extension<RequestPrincipal>>;

fn principal(who: &Caller) -> Result<Arc<Principal>, Response> {
    match who {
        Some(Extension(RequestPrincipal(p))) => Ok(p.clone()),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the request carries no credential; send Authorization: Bearer <key>".into(),
        )),
    }
}

/// The tools `p` may use, as (tool, upstream id), in catalog order.
fn usable<'a>(
    s: &'a AppState,
    snap: &'a Snapshot,
    p: &'a Principal,
) -> impl Iterator<Item = (&'a Tool, usize)> + 'a {
    snap.tools
        .iter()
        .zip(&snap.owners.tools)
        .filter(move |(t, i)| {
            s.gw.upstreams
                .get(**i)
                .is_some_and(|u| u.config.shared || u.config.tenant == p.tenant)
                && s.auth.policy.check(p, &t.name).is_ok()
        })
        .map(|(t, i)| (t, *i))
}

fn summary(gw: &Gateway, snap: &Snapshot, t: &Tool, upstream: usize) -> Value {
    let up = gw.upstreams.get(upstream);
    json!({
        "name": t.name,
        "title": t.title,
        "description": t.description,
        "upstream": up.as_ref().map(|u| u.config.name.clone()),
        "original_name": snap.tool_routes.resolve(&t.name).map(|r| r.original.clone()),
        "annotations": t.annotations,
        "upstream_status": up.as_ref().map(|u| u.status().0.label()),
    })
}

/// Query of `GET /api/v1/tools`.
#[derive(Deserialize)]
struct ListQuery {
    /// Only this upstream's tools.
    upstream: Option<String>,
    /// A glob on the exposed name (`*`, `?`, `[ab]`).
    name: Option<String>,
    /// Page size (default 100, at most 500).
    limit: Option<usize>,
    /// Where the page starts: the `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// `GET /api/v1/tools`.
async fn list(State(s): State<AppState>, who: Caller, Query(q): Query<ListQuery>) -> Response {
    let p = match principal(&who) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let glob = match q.name.as_deref().map(globset::Glob::new).transpose() {
        Ok(g) => g.map(|g| g.compile_matcher()),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("`name` is not a valid glob: {e}; e.g. name=github__* or name=*search*"),
            );
        }
    };
    let limit = match crate::admin::page_limit(q.limit) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let start = match q.cursor.as_deref().map(str::parse::<usize>).transpose() {
        Ok(c) => c.unwrap_or(0),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "`cursor` is not one this API gave out; pass the previous page's next_cursor"
                    .into(),
            );
        }
    };
    let snap = s.gw.snapshot();
    let wanted_upstream = match &q.upstream {
        Some(name) => match s.gw.upstream_named(name) {
            Some(u) if u.config.shared || u.config.tenant == p.tenant => Some(u.index),
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no upstream named `{name}`; GET /api/v1/upstreams lists them"),
                );
            }
        },
        None => None,
    };
    let matching: Vec<(&Tool, usize)> = usable(&s, &snap, &p)
        .filter(|(_, i)| wanted_upstream.is_none_or(|w| w == *i))
        .filter(|(t, _)| glob.as_ref().is_none_or(|g| g.is_match(t.name.as_ref())))
        .collect();
    let total = matching.len();
    let page: Vec<Value> = matching
        .iter()
        .skip(start)
        .take(limit)
        .map(|(t, i)| summary(&s.gw, &snap, t, *i))
        .collect();
    let next = start + page.len();
    Json(json!({
        "tools": page,
        "total": total,
        "next_cursor": (next < total).then(|| next.to_string()),
    }))
    .into_response()
}

/// `GET /api/v1/tools/{name}`.
async fn show(State(s): State<AppState>, who: Caller, Path(name): Path<String>) -> Response {
    let p = match principal(&who) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let snap = s.gw.snapshot();
    let Some((tool, upstream)) = usable(&s, &snap, &p).find(|(t, _)| t.name == name) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no tool named `{name}` that you may use; GET /api/v1/tools lists them"),
        );
    };
    let mut v = summary(&s.gw, &snap, tool, upstream);
    v["inputSchema"] = json!(tool.input_schema);
    v["outputSchema"] = json!(tool.output_schema);
    if let Some(up) = s.gw.upstreams.get(upstream) {
        let (status, since) = up.status();
        v["health"] = json!({
            "status": status.label(),
            "detail": status.detail(),
            "since": since,
            "breaker": up.traffic.breaker_json(),
            "revision": up.era.revision().map(|r| r.to_string()),
        });
    }
    Json(v).into_response()
}

/// Body of `POST /api/v1/tools/{name}/execute`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecuteBody {
    /// The tool's arguments.
    #[serde(default)]
    arguments: Option<serde_json::Map<String, Value>>,
}

/// The HTTP status of a JSON-RPC error of a call.
fn status_of(e: &rmcp::ErrorData) -> StatusCode {
    // Only error statuses, and not from errors an upstream passed through
    // unchanged (those carry no `reason` of the gateway's).
    let ours = e
        .data
        .as_ref()
        .is_some_and(|d| d.get("reason").is_some_and(Value::is_string));
    if let Some(code) = e
        .data
        .as_ref()
        .and_then(|d| d.get("http_status"))
        .and_then(Value::as_u64)
        .filter(|c| ours && (400..=599).contains(c))
        .and_then(|c| u16::try_from(c).ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        return code;
    }
    match e.code {
        crate::handler::FORBIDDEN => StatusCode::FORBIDDEN,
        crate::limits::RATE_LIMITED => StatusCode::TOO_MANY_REQUESTS,
        crate::handler::SHUTTING_DOWN => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::INVALID_PARAMS if e.message.starts_with("unknown tool") => StatusCode::NOT_FOUND,
        ErrorCode::INVALID_PARAMS => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::METHOD_NOT_FOUND => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// `POST /api/v1/tools/{name}/execute`: `{"arguments": {...}}` in, the
/// `CallToolResult` out (200, also for a tool error, which has
/// `isError: true`); a refused or failed call is an error object with the
/// JSON-RPC code, message and data.
async fn execute(
    State(s): State<AppState>,
    who: Caller,
    Path(name): Path<String>,
    body: Result<Json<ExecuteBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let p = match principal(&who) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!(
                    "the body must be a JSON object {{\"arguments\": {{...}}}}: {}",
                    e.body_text()
                ),
            );
        }
    };
    let handler = GatewayHandler::new(s.gw.clone(), s.auth.clone(), "rest").with_principal(p);
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        match handler.serve(server_io).await {
            Ok(running) => {
                let _ = running.waiting().await;
            }
            Err(e) => tracing::warn!(error = %e, "in-process MCP session for /execute failed"),
        }
    });
    let client = match ().serve(client_io).await {
        Ok(c) => c,
        Err(e) => {
            server.abort();
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot open the in-process MCP session: {e}"),
            );
        }
    };
    let mut params = CallToolRequestParams::new(name);
    params.arguments = body.arguments;
    let result = client.call_tool(params).await;
    let _ = client.cancel().await;
    server.abort();
    match result {
        Ok(r) => Json(r).into_response(),
        Err(rmcp::ServiceError::McpError(e)) => (
            status_of(&e),
            Json(json!({"error": {"code": e.code.0, "message": e.message, "data": e.data}})),
        )
            .into_response(),
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "call_failed",
            format!("the call did not complete: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_errors_map_to_http_statuses() {
        let e = |code, msg: &str, data| rmcp::ErrorData::new(code, msg.to_owned(), data);
        assert_eq!(
            status_of(&e(ErrorCode::INVALID_PARAMS, "unknown tool `x`", None)),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status_of(&e(ErrorCode::INVALID_PARAMS, "arguments of tool", None)),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status_of(&e(crate::limits::RATE_LIMITED, "slow down", None)),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            status_of(&e(
                ErrorCode::INTERNAL_ERROR,
                "x",
                Some(json!({"reason": "upstream_timeout", "http_status": 504}))
            )),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            status_of(&e(ErrorCode::INTERNAL_ERROR, "upstream down", None)),
            StatusCode::BAD_GATEWAY
        );
        // An upstream's own error cannot pick the status.
        assert_eq!(
            status_of(&e(
                ErrorCode::INTERNAL_ERROR,
                "x",
                Some(json!({"http_status": 204}))
            )),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            status_of(&e(
                ErrorCode::INTERNAL_ERROR,
                "x",
                Some(json!({"reason": "r", "http_status": 70000}))
            )),
            StatusCode::BAD_GATEWAY
        );
    }
}
