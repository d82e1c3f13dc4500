//! The REST API of the mesh: tasks (submit, get, list, cancel, an SSE
//! stream of events), agents (list, get, configuration, health check,
//! capability query), result blobs and shared state documents.

// Handlers return a ready axum `Response` as their error: it is what they send.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use futures::StreamExt;
use meshgate_core::mesh::TaskState;
use meshgate_store::TaskQuery;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::{Mesh, MeshError};
use crate::auth::RequestPrincipal;
use crate::gateway::Gateway;

/// The mesh routes (mounted when the mesh is enabled).
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/ws", get(super::ws::upgrade))
        .route("/api/v1/tasks", post(submit).get(list))
        .route("/api/v1/tasks/{id}", get(get_task).delete(cancel_delete))
        .route("/api/v1/tasks/{id}/cancel", post(cancel))
        .route("/api/v1/tasks/{id}/events", get(events))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/agents/{id}", get(agent))
        .route("/api/v1/agents/{id}/config", put(set_config))
        .route("/api/v1/agents/{id}/health-check", post(health_check))
        .route(
            "/api/v1/agents/{id}/capability-query",
            post(capability_query),
        )
        .route("/api/v1/blobs/{id}", get(blob))
        .route("/api/v1/state", get(state_list))
        .route(
            "/api/v1/state/{doc}",
            get(state_get).post(state_apply).delete(state_clear),
        )
        .route("/api/v1/mesh", get(stats))
}

fn error(e: MeshError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut body = json!({"error": {"code": e.code, "message": e.message}});
    if !e.data.is_null() {
        body["error"]["data"] = e.data;
    }
    (status, Json(body)).into_response()
}

fn mesh(gw: &Gateway) -> Result<Arc<Mesh>, Response> {
    gw.mesh.get().cloned().ok_or_else(|| {
        error(MeshError {
            code: super::code::SERVER_ERROR,
            status: 404,
            message: "the agent mesh is disabled on this gateway (mesh.enabled = false)".into(),
            data: Value::Null,
        })
    })
}

/// The JSON answer of a mesh operation, or its error.
fn reply<T: serde::Serialize>(r: Result<T, MeshError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}

/// The mesh, or the 404 that says it is disabled.
struct Enabled(Arc<Mesh>);

impl axum::extract::FromRequestParts<Arc<Gateway>> for Enabled {
    type Rejection = Response;

    async fn from_request_parts(
        _parts: &mut axum::http::request::Parts,
        gw: &Arc<Gateway>,
    ) -> Result<Self, Response> {
        mesh(gw).map(Enabled)
    }
}

fn parse_body(body: &Bytes) -> Result<Value, Response> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| {
        error(MeshError::invalid(
            "body",
            format!("is not valid JSON ({e}); send a JSON object"),
        ))
    })
}

type Principal = Extension<RequestPrincipal>;

async fn submit(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut body = match parse_body(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Value::Array(items) = &body {
        return submit_batch(&mesh, &p, items).await;
    }
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok())
        && let Some(o) = body.as_object_mut()
    {
        o.entry("idempotency_key").or_insert_with(|| json!(key));
    }
    match mesh.submit(&p, &body).await {
        Ok((task, replay)) => {
            let status = if replay {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let mut r = (status, Json(task)).into_response();
            if replay {
                r.headers_mut()
                    .insert("idempotent-replay", HeaderValue::from_static("true"));
            }
            r
        }
        Err(e) => error(e),
    }
}

/// Most tasks in one batch submission.
pub const MAX_BATCH: usize = 1000;

/// `POST /api/v1/tasks` with an array: every task stored in one
/// transaction; 200 with one entry per task, in order (`task` and `created`,
/// or `error`).
async fn submit_batch(mesh: &Mesh, p: &meshgate_core::Principal, items: &[Value]) -> Response {
    if items.is_empty() || items.len() > MAX_BATCH {
        return error(MeshError::invalid(
            "body",
            format!("a batch holds 1 to {MAX_BATCH} tasks, got {}", items.len()),
        ));
    }
    let results = mesh.submit_many(p, items).await;
    let out: Vec<Value> = results
        .into_iter()
        .map(|r| match r {
            Ok((t, replay)) => json!({"created": !replay, "task": t}),
            Err(e) => {
                let mut err = json!({"code": e.code, "message": e.message});
                if !e.data.is_null() {
                    err["data"] = e.data;
                }
                json!({"error": err})
            }
        })
        .collect();
    Json(json!({"results": out})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    state: Option<String>,
    #[serde(rename = "type")]
    task_type: Option<String>,
    agent_id: Option<String>,
    tenant: Option<String>,
    cursor: Option<i64>,
    limit: Option<u32>,
}

async fn list(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    q: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => {
            return error(MeshError::invalid(
                "query",
                format!("{e}; allowed parameters: state, type, agent_id, tenant, cursor, limit"),
            ));
        }
    };
    if let Some(s) = &q.state
        && TaskState::parse(s).is_none()
    {
        return error(MeshError::invalid(
            "state",
            format!(
                "unknown state `{s}`; allowed: pending, assigned, accepted, in_progress, completed, failed, cancelled, timeout"
            ),
        ));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return error(MeshError::invalid("limit", "must be within 1..=1000"));
    }
    let query = TaskQuery {
        tenant: q.tenant,
        state: q.state,
        task_type: q.task_type,
        agent_id: q.agent_id,
        before_seq: q.cursor,
        limit,
    };
    match mesh.list(&p, query).await {
        Ok((tasks, next)) => Json(json!({"tasks": tasks, "next_cursor": next})).into_response(),
        Err(e) => error(e),
    }
}

async fn get_task(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(id): Path<String>,
) -> Response {
    reply(mesh.get(&p, &id).await)
}

async fn cancel(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let body = match parse_body(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let reason = match body.get("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return error(MeshError::invalid("reason", "must be a string")),
    };
    reply(mesh.cancel(&p, &id, reason).await)
}

async fn cancel_delete(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(id): Path<String>,
) -> Response {
    reply(mesh.cancel(&p, &id, None).await)
}

/// `GET /api/v1/tasks/{id}/events`: the current state first, then every
/// state change and progress report, ending after a terminal state.
async fn events(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(id): Path<String>,
) -> Response {
    // Subscribe before reading the state, so nothing falls in between.
    let mut rx = mesh.subscribe();
    let task = match mesh.get(&p, &id).await {
        Ok(t) => t,
        Err(e) => return error(e),
    };
    let (tx, out) = tokio::sync::mpsc::channel::<Event>(256);
    let first = Event::default()
        .event("state")
        .json_data(json!({"task_id": id, "kind": "state", "state": task.state, "task": task}));
    let shutdown = mesh.shutdown.clone();
    tokio::spawn(async move {
        let Ok(first) = first else { return };
        if tx.send(first).await.is_err() || task.state.is_terminal() {
            return;
        }
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = shutdown.cancelled() => {
                    let _ = tx.send(Event::default().event("shutdown").data("gateway shutting down; reconnect to resume")).await;
                    return;
                }
                _ = tx.closed() => return,
            };
            match ev {
                Ok(u) if u.task_id == id => {
                    let terminal = u.state.is_terminal() && u.kind == "state";
                    let Ok(e) = Event::default().event(u.kind).json_data(&*u) else {
                        continue;
                    };
                    if tx.send(e).await.is_err() || terminal {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    // Fell behind: send the current state again.
                    let Ok(t) = mesh.get(&p, &id).await else {
                        return;
                    };
                    let terminal = t.state.is_terminal();
                    let Ok(e) = Event::default().event("state").json_data(
                        json!({"task_id": id, "kind": "state", "state": t.state, "task": t}),
                    ) else {
                        return;
                    };
                    if tx.send(e).await.is_err() || terminal {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    let stream = tokio_stream_from(out).map(Ok::<Event, Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn agents(Enabled(mesh): Enabled, Extension(RequestPrincipal(p)): Principal) -> Response {
    match mesh.agents(&p).await {
        Ok(a) => Json(json!({"agents": a})).into_response(),
        Err(e) => error(e),
    }
}

async fn agent(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(id): Path<String>,
) -> Response {
    reply(mesh.agent(&p, &id).await)
}

async fn set_config(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let body = match parse_body(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(config) = body.get("config").cloned() else {
        return error(MeshError::invalid(
            "config",
            "is required: send {\"config\": {…}}",
        ));
    };
    reply(mesh.set_agent_config(&p, &id, config).await)
}

async fn health_check(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(id): Path<String>,
) -> Response {
    reply(mesh.ask_agent(&p, &id, "health.check").await)
}

async fn capability_query(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(id): Path<String>,
) -> Response {
    reply(mesh.ask_agent(&p, &id, "capability.query").await)
}

async fn blob(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(id): Path<String>,
) -> Response {
    match mesh.blob(&p, &id).await {
        Ok(b) => {
            let mut r = (StatusCode::OK, b.data).into_response();
            let h = r.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&b.content_type) {
                h.insert(axum::http::header::CONTENT_TYPE, v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", b.sha256)) {
                h.insert(axum::http::header::ETAG, v);
            }
            r
        }
        Err(e) => error(e),
    }
}

async fn stats(Enabled(mesh): Enabled) -> Response {
    Json(mesh.stats()).into_response()
}

#[derive(Deserialize)]
struct StateParams {
    /// `true` adds the full CRDT state (what `state.sync` returns).
    #[serde(default)]
    full: bool,
}

/// The writer name of a REST caller in logs: its key or subject.
fn rest_writer(p: &meshgate_core::Principal) -> String {
    format!("api:{}", p.key_id.as_deref().unwrap_or(&p.subject))
}

/// `GET /api/v1/state`: the caller's documents.
async fn state_list(Enabled(mesh): Enabled, Extension(RequestPrincipal(p)): Principal) -> Response {
    reply(
        mesh.shared
            .list(&p.tenant)
            .await
            .map(|docs| json!({"documents": docs})),
    )
}

/// `GET /api/v1/state/{doc}[?full=true]`.
async fn state_get(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(doc): Path<String>,
    Query(q): Query<StateParams>,
) -> Response {
    if q.full {
        let mut snapshot = Value::Null;
        let done = mesh.shared.sync(&p.tenant, &doc, |v| snapshot = v).await;
        reply(done.map(|()| snapshot))
    } else {
        reply(mesh.shared.get(&p.tenant, &doc).await)
    }
}

/// `POST /api/v1/state/{doc}` with `{"ops": [...]}`.
async fn state_apply(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(doc): Path<String>,
    body: Bytes,
) -> Response {
    let body = match parse_body(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(ops) = body.get("ops") else {
        return error(MeshError::invalid(
            "ops",
            "required: an array of operations, e.g. [{\"op\": \"counter.increment\", \"path\": \"hits\", \"by\": 1}]",
        ));
    };
    reply(
        mesh.shared
            .apply(&p.tenant, &doc, ops, &rest_writer(&p))
            .await
            .map(|a| {
                json!({
                    "doc": doc,
                    "applied": a.applied,
                    "hash": a.hash,
                    "version": a.version,
                    "value": a.value,
                    "delta": a.delta,
                })
            }),
    )
}

/// `DELETE /api/v1/state/{doc}`: removes every key (the clock stays).
async fn state_clear(
    Enabled(mesh): Enabled,
    Extension(RequestPrincipal(p)): Principal,
    Path(doc): Path<String>,
) -> Response {
    reply(
        mesh.shared
            .clear(&p.tenant, &doc, &rest_writer(&p))
            .await
            .map(|a| json!({"doc": doc, "cleared": true, "hash": a.hash, "version": a.version, "value": a.value})),
    )
}
