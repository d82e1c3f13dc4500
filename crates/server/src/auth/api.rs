//! REST endpoints of authentication: API keys (`/api/v1/auth/keys`), token
//! exchange, refresh and logout, `whoami`, the audit log (`/api/v1/audit`)
//! and the OAuth protected-resource metadata.
//!
//! Tenant rule: a caller sees and changes only its own tenant's keys and
//! audit entries; only a credential holding `tenants:*` may name another
//! tenant. An object of another tenant answers 404, as if it did not exist.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use meshgate_core::auth::{ALL_SCOPES, CredentialKind, Principal, Role, resolve_scopes, scope};
use meshgate_store::{ApiKeyRecord, AuditQuery, AuditRecord, now_ms};
use serde::Deserialize;
use serde_json::{Value, json};

use super::audit::entry;
use super::middleware::{RequestPrincipal, TokenFamily, TraceId, auth_error_response};
use super::tokens::{RefreshOutcome, describe, rotate};
use super::{Auth, AuthError, NewKey, create_key, rfc3339};

/// An API error: status, machine reason, message.
pub struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({"error": {"reason": self.1, "message": self.2}})),
        )
            .into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid_request", msg.into())
}

fn store_err(e: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!("the store did not answer: {e}; retry shortly"),
    )
}

fn not_found(id: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no API key `{id}` in your tenant; GET /api/v1/auth/keys lists them"),
    )
}

/// Parses a JSON body with a message naming the bad field.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    if body.is_empty() {
        return serde_json::from_slice(b"{}").map_err(|e| {
            bad(format!(
                "{what}: the request body must be a JSON object ({e})"
            ))
        });
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("{what}: {e}")))
}

/// The tenant a request acts on: the caller's own, or the one it names when
/// it may act on every tenant.
fn target_tenant(p: &Principal, requested: Option<&str>) -> Result<String, ApiError> {
    match requested {
        None => Ok(p.tenant.clone()),
        Some(t) if t == p.tenant => Ok(t.to_owned()),
        Some(t) if p.has_scope(scope::ALL_TENANTS) => {
            if meshgate_core::config::valid_tenant(t) {
                Ok(t.to_owned())
            } else {
                Err(bad(format!(
                    "tenant `{t}` {}",
                    meshgate_core::config::TENANT_RULE
                )))
            }
        }
        Some(t) => Err(ApiError(
            StatusCode::FORBIDDEN,
            "cross_tenant",
            format!(
                "you may act only on tenant `{}`, not `{t}` (that needs scope `tenants:*`)",
                p.tenant
            ),
        )),
    }
}

/// A key as the API shows it: never the hash.
fn key_json(r: &ApiKeyRecord) -> Value {
    let now = now_ms();
    let status = if r.revoked_at.is_some() {
        "revoked"
    } else if r.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    };
    json!({
        "id": r.id,
        "name": r.name,
        "prefix": r.prefix,
        "tenant": r.tenant,
        "role": r.role,
        "scopes": r.scopes,
        "status": status,
        "created_at": rfc3339(r.created_at),
        "created_by": r.created_by,
        "expires_at": r.expires_at.map(rfc3339),
        "revoked_at": r.revoked_at.map(rfc3339),
        "last_used_at": r.last_used_at.map(rfc3339),
        "rate_limit_per_minute": r.rate_limit_per_minute,
    })
}

/// The routes of this module (mounted by `http.rs` under the auth layer).
pub fn routes() -> Router<Arc<Auth>> {
    Router::new()
        .route("/api/v1/auth/keys", get(list_keys).post(create_key_route))
        .route(
            "/api/v1/auth/keys/{id}",
            get(get_key).patch(patch_key).delete(revoke_key),
        )
        .route("/api/v1/auth/token", post(token))
        .route("/api/v1/auth/refresh", post(refresh))
        .route("/api/v1/auth/logout", post(logout))
        .route("/api/v1/auth/whoami", get(whoami))
        .route("/api/v1/audit", get(audit_query))
        .route(
            "/.well-known/oauth-protected-resource",
            get(resource_metadata),
        )
        .route(
            "/.well-known/oauth-protected-resource/{*rest}",
            get(resource_metadata),
        )
}

fn trace(t: &Option<Extension<TraceId>>) -> Option<&str> {
    t.as_ref().map(|t| t.0.0.as_str())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default = "default_role")]
    role: String,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    expires_in_secs: Option<u64>,
    #[serde(default)]
    rate_limit_per_minute: Option<u32>,
}

fn default_role() -> String {
    "developer".into()
}

/// A caller may change or revoke only keys whose scopes it holds itself, so a
/// tenant admin cannot disarm a more powerful key (one holding `tenants:*`).
fn check_may_change(p: &Principal, target: &ApiKeyRecord) -> Result<(), ApiError> {
    if p.key_id.as_deref() == Some(target.id.as_str()) {
        return Ok(());
    }
    if let Some(s) = target.scopes.iter().find(|s| !p.has_scope(s)) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "key_more_privileged",
            format!(
                "key `{}` holds scope `{s}`, which your credential does not; only a credential holding all its scopes may change or revoke it",
                target.id
            ),
        ));
    }
    Ok(())
}

/// A caller may hand out only scopes it holds itself.
fn check_grant(p: &Principal, scopes: &[String]) -> Result<(), ApiError> {
    if let Some(s) = scopes.iter().find(|s| !p.has_scope(s)) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "scope_escalation",
            format!("you cannot grant scope `{s}`, which your own credential does not hold"),
        ));
    }
    Ok(())
}

async fn create_key_route(
    State(auth): State<Arc<Auth>>,
    Extension(RequestPrincipal(p)): Extension<RequestPrincipal>,
    t: Option<Extension<TraceId>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: CreateKey = parse_body(&body, "create key")?;
    let role = Role::parse(&req.role).ok_or_else(|| {
        bad(format!(
            "role `{}` is unknown; use one of {}",
            req.role,
            Role::ALLOWED
        ))
    })?;
    let tenant = target_tenant(&p, req.tenant.as_deref())?;
    let scopes = resolve_scopes(role, req.scopes.as_deref()).map_err(bad)?;
    check_grant(&p, &scopes)?;
    let expires_at = match req.expires_in_secs {
        Some(0) => {
            return Err(bad(
                "expires_in_secs must be at least 1 (omit it for a key that never expires)",
            ));
        }
        Some(s) => Some(now_ms().saturating_add((s.min(100 * 365 * 86_400) * 1000) as i64)),
        None => None,
    };
    let (key, record) = create_key(
        auth.store.as_ref(),
        NewKey {
            name: req.name,
            tenant,
            role,
            scopes: Some(scopes),
            expires_at,
            rate_limit_per_minute: req.rate_limit_per_minute,
            created_by: p.subject.clone(),
        },
    )
    .await
    .map_err(bad)?;
    let mut audit = entry(
        &p,
        "key.create",
        &record.id,
        "ok",
        trace(&t),
        json!({"role": record.role, "scopes": record.scopes, "name": record.name}),
    );
    audit.tenant = record.tenant.clone();
    auth.audit.record(audit).await;
    let mut out = key_json(&record);
    out["key"] = json!(key);
    out["note"] = json!("store this key now: it is shown only once");
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

#[derive(Deserialize)]
struct TenantQuery {
    tenant: Option<String>,
}

async fn list_keys(
    State(auth): State<Arc<Auth>>,
    Extension(RequestPrincipal(p)): Extension<RequestPrincipal>,
    Query(q): Query<TenantQuery>,
) -> Result<Json<Value>, ApiError> {
    let tenant = match q.tenant.as_deref() {
        Some("*") if p.has_scope(scope::ALL_TENANTS) => None,
        other => Some(target_tenant(&p, other)?),
    };
    let keys = auth
        .store
        .list_api_keys(tenant.as_deref())
        .await
        .map_err(store_err)?;
    Ok(Json(
        json!({"keys": keys.iter().map(key_json).collect::<Vec<_>>()}),
    ))
}

/// The key `id` when the caller may see it (same tenant or `tenants:*`).
async fn visible_key(auth: &Auth, p: &Principal, id: &str) -> Result<ApiKeyRecord, ApiError> {
    match auth.store.get_api_key(id).await.map_err(store_err)? {
        Some(r) if p.may_access_tenant(&r.tenant) => Ok(r),
        _ => Err(not_found(id)),
    }
}

async fn get_key(
    State(auth): State<Arc<Auth>>,
    Extension(RequestPrincipal(p)): Extension<RequestPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(key_json(&visible_key(&auth, &p, &id).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchKey {
    scopes: Vec<String>,
}

async fn patch_key(
    State(auth): State<Arc<Auth>>,
    Extension(RequestPrincipal(p)): Extension<RequestPrincipal>,
    t: Option<Extension<TraceId>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: PatchKey = parse_body(&body, "patch key (only `scopes` can change)")?;
    let record = visible_key(&auth, &p, &id).await?;
    check_may_change(&p, &record)?;
    let role = Role::parse(&record.role)
        .ok_or_else(|| bad(format!("stored role `{}` is unknown", record.role)))?;
    let scopes = resolve_scopes(role, Some(&req.scopes)).map_err(bad)?;
    check_grant(&p, &scopes)?;
    if !auth
        .store
        .update_api_key_scopes(&id, &scopes)
        .await
        .map_err(store_err)?
    {
        return Err(not_found(&id));
    }
    auth.forget_key(&record);
    let mut audit = entry(
        &p,
        "key.update",
        &id,
        "ok",
        trace(&t),
        json!({"scopes_before": record.scopes, "scopes": scopes}),
    );
    audit.tenant = record.tenant.clone();
    auth.audit.record(audit).await;
    let updated = visible_key(&auth, &p, &id).await?;
    Ok(Json(key_json(&updated)))
}

async fn revoke_key(
    State(auth): State<Arc<Auth>>,
    Extension(RequestPrincipal(p)): Extension<RequestPrincipal>,
    t: Option<Extension<TraceId>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = visible_key(&auth, &p, &id).await?;
    check_may_change(&p, &record)?;
    let now = now_ms();
    let revoked = auth
        .store
        .revoke_api_key(&id, now)
        .await
        .map_err(store_err)?;
    let families = auth
        .store
        .revoke_refresh_families_of_key(&id, now)
        .await
        .map_err(store_err)?;
    auth.revoke_families(families.iter().cloned());
    auth.forget_key(&record);
    let mut audit = entry(
        &p,
        "key.revoke",
        &id,
        if revoked { "ok" } else { "noop" },
        trace(&t),
        json!({"token_families_revoked": families.len()}),
    );
    audit.tenant = record.tenant.clone();
    auth.audit.record(audit).await;
    let updated = visible_key(&auth, &p, &id).await?;
    Ok(Json(json!({"revoked": revoked, "key": key_json(&updated)})))
}

async fn token(
    State(auth): State<Arc<Auth>>,
    Extension(RequestPrincipal(p)): Extension<RequestPrincipal>,
    t: Option<Extension<TraceId>>,
) -> Result<Response, ApiError> {
    if p.kind != CredentialKind::ApiKey {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "api_key_required",
            "a token pair is issued for an API key: send it as `Authorization: Bearer mg_…` or `X-API-Key` (to renew a token, POST /api/v1/auth/refresh)".into(),
        ));
    }
    let key_id = p.key_id.clone().unwrap_or_default();
    let key = auth
        .live_key_by_id(&key_id)
        .await
        .map_err(|e| ApiError(StatusCode::UNAUTHORIZED, e.reason(), e.to_string()))?;
    let pair = auth
        .tokens
        .issue(auth.store.as_ref(), &key)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.reason(), e.to_string()))?;
    auth.audit
        .record(entry(
            &p,
            "token.issue",
            &key_id,
            "ok",
            trace(&t),
            json!({}),
        ))
        .await;
    Ok(Json(pair).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

async fn refresh(
    State(auth): State<Arc<Auth>>,
    connect: Option<Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    t: Option<Extension<TraceId>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let client = super::middleware::client_address(
        connect.map(|c| c.0.0.ip()),
        &headers,
        &auth.trusted_proxies,
    );
    if !auth.enabled() {
        return ApiError(
            StatusCode::BAD_REQUEST,
            "auth_disabled",
            "authentication is disabled (auth.enabled = false); no tokens are issued".into(),
        )
        .into_response();
    }
    if let Err(e) = auth.check_lockout(&client) {
        metrics::counter!("auth_failures_total", "reason" => e.reason()).increment(1);
        return auth_error_response(&auth, &headers, &e);
    }
    let req: RefreshBody = match parse_body(&body, "refresh (send {\"refresh_token\": \"mgr_…\"})")
    {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let fail = |e: AuthError| {
        auth.record_failure(&client, &e);
        auth_error_response(&auth, &headers, &e)
    };
    match rotate(&auth, &req.refresh_token).await {
        Ok(RefreshOutcome::Rotated(pair, key)) => {
            auth.record_success(&client);
            let who = Principal {
                subject: key.id.clone(),
                tenant: key.tenant.clone(),
                role: Role::parse(&key.role).unwrap_or(Role::Viewer),
                scopes: key.scopes.clone(),
                key_id: Some(key.id.clone()),
                kind: CredentialKind::AccessToken,
                rate_limit_per_minute: key.rate_limit_per_minute,
            };
            auth.audit
                .record(entry(
                    &who,
                    "token.refresh",
                    &key.id,
                    "ok",
                    trace(&t),
                    json!({}),
                ))
                .await;
            Json(pair).into_response()
        }
        Ok(RefreshOutcome::Reused {
            family,
            tenant,
            key_id,
        }) => {
            tracing::warn!(
                key_id,
                family,
                client,
                "refresh token reused: revoked its whole family"
            );
            metrics::counter!("auth_refresh_reuse_total").increment(1);
            let mut e = entry(
                &Principal {
                    subject: key_id.clone(),
                    tenant,
                    role: Role::Viewer,
                    scopes: vec![],
                    key_id: Some(key_id.clone()),
                    kind: CredentialKind::AccessToken,
                    rate_limit_per_minute: None,
                },
                "token.reuse",
                &key_id,
                "denied",
                trace(&t),
                json!({"family": family, "client": client}),
            );
            e.actor_kind = "refresh_token".into();
            auth.audit.record(e).await;
            fail(AuthError::Revoked {
                what: "this refresh token had already been used, so it may be stolen; every token of this login".into(),
                when: format!("at {}", rfc3339(now_ms())),
            })
        }
        Err(e) => fail(e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LogoutBody {
    #[serde(default)]
    refresh_token: Option<String>,
}

async fn logout(
    State(auth): State<Arc<Auth>>,
    Extension(RequestPrincipal(p)): Extension<RequestPrincipal>,
    family: Option<Extension<TokenFamily>>,
    t: Option<Extension<TraceId>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: LogoutBody = parse_body(&body, "logout")?;
    let mut families = Vec::new();
    if let Some(Extension(TokenFamily(f))) = family {
        families.push(f);
    }
    if let Some(rt) = &req.refresh_token {
        let rec = auth
            .store
            .find_refresh_token_by_hash(&meshgate_core::auth::hash_secret(rt))
            .await
            .map_err(store_err)?;
        match rec {
            Some(r) if p.may_access_tenant(&r.tenant) => families.push(r.family),
            _ => {
                return Err(bad(
                    "refresh_token is not one this gateway issued to your tenant",
                ));
            }
        }
    }
    if families.is_empty() {
        return Err(bad(
            "nothing to log out: call with the access token of the login, or send {\"refresh_token\": \"mgr_…\"}; to stop an API key, revoke it (DELETE /api/v1/auth/keys/{id})",
        ));
    }
    families.sort();
    families.dedup();
    let now = now_ms();
    let mut revoked = 0;
    for f in &families {
        revoked += auth
            .store
            .revoke_refresh_family(f, now)
            .await
            .map_err(store_err)?;
    }
    auth.revoke_families(families.iter().cloned());
    auth.audit
        .record(entry(
            &p,
            "token.logout",
            p.key_id.as_deref().unwrap_or(&p.subject),
            "ok",
            trace(&t),
            json!({"families": families.len()}),
        ))
        .await;
    Ok(Json(
        json!({"logged_out": true, "refresh_tokens_revoked": revoked}),
    ))
}

async fn whoami(Extension(RequestPrincipal(p)): Extension<RequestPrincipal>) -> Json<Value> {
    Json(describe(&p))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    tenant: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    target: Option<String>,
    outcome: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    cursor: Option<i64>,
    limit: Option<u32>,
}

fn audit_json(r: &AuditRecord) -> Value {
    json!({
        "id": r.id,
        "at": rfc3339(r.at),
        "at_ms": r.at,
        "tenant": r.tenant,
        "actor": r.actor,
        "actor_kind": r.actor_kind,
        "action": r.action,
        "target": r.target,
        "args_hash": r.args_hash,
        "outcome": r.outcome,
        "latency_ms": r.latency_ms,
        "trace_id": r.trace_id,
        "detail": r.detail,
    })
}

async fn audit_query(
    State(auth): State<Arc<Auth>>,
    Extension(RequestPrincipal(p)): Extension<RequestPrincipal>,
    q: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| {
        bad(format!(
            "{e}; filters: tenant, actor, action, target, outcome, since, until (unix ms), cursor, limit (1-1000)"
        ))
    })?;
    let tenant = match q.tenant.as_deref() {
        Some("*") if p.has_scope(scope::ALL_TENANTS) => None,
        other => Some(target_tenant(&p, other)?),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(bad(format!("limit {limit} is out of range; use 1 to 1000")));
    }
    let entries = auth
        .store
        .query_audit(&AuditQuery {
            tenant,
            actor: q.actor,
            action: q.action,
            target: q.target,
            outcome: q.outcome,
            since: q.since,
            until: q.until,
            before_id: q.cursor,
            limit,
        })
        .await
        .map_err(store_err)?;
    let next = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(json!({
        "entries": entries.iter().map(audit_json).collect::<Vec<_>>(),
        "next_cursor": next,
    })))
}

async fn resource_metadata(State(auth): State<Arc<Auth>>, headers: HeaderMap) -> Json<Value> {
    let resource = auth
        .resource
        .clone()
        .unwrap_or_else(|| format!("{}/mcp", super::middleware::base_url(&auth, &headers)));
    Json(json!({
        "resource": resource,
        "authorization_servers": auth.oauth.issuer_urls(),
        "scopes_supported": ALL_SCOPES,
        "bearer_methods_supported": ["header"],
        "resource_name": "meshgate MCP gateway",
    }))
}
