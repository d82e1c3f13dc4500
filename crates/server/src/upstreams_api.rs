//! `/api/v1/upstreams`: managed upstreams, created, read, changed and
//! deleted at run time (scopes `upstreams:read` / `upstreams:write`).
//!
//! Tenant rules: a caller sees its own tenant's upstreams and shared ones,
//! and creates, changes and deletes only its own tenant's unshared ones.
//! Creating one for another tenant, a shared one, or a stdio one (it runs a
//! program on the gateway's host) needs `tenants:*`. Header and
//! environment values are masked in every answer; a masked value sent back
//! keeps the stored secret. Every change is audited.

// Refusals are ready responses, built on the cold path; boxing them would
// only add an allocation to every refusal.
#![allow(clippy::result_large_err)]
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use meshgate_core::{UpstreamConfig, UpstreamTransport};
use serde_json::{Value, json};

use crate::admin::{Caller, Reach, audit, error};
use crate::auth::middleware::TraceId;
use crate::egress::private_destination;
use crate::gateway::{Upstream, UpstreamSource};
use crate::http::AppState;
use crate::managed::{ManageError, masked, unmask};

/// The routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/upstreams", get(list).post(create))
        .route(
            "/api/v1/upstreams/{name}",
            get(show).put(replace).patch(patch).delete(remove),
        )
}

type Trace = Option<Extension<TraceId>>;

/// The API view of an upstream.
pub fn view(up: &Upstream) -> Value {
    let (status, since) = up.status();
    let listing = up.listing();
    json!({
        "name": up.config.name,
        "source": up.source.label(),
        "transport": up.config.transport,
        "tenant": up.config.tenant,
        "shared": up.config.shared,
        "enabled": up.config.enabled,
        "status": status.label(),
        "status_detail": status.detail(),
        "status_since": since,
        "revision": up.era.revision().map(|v| v.to_string()),
        "tools": listing.tools.len(),
        "prompts": listing.prompts.len(),
        "resources": listing.resources.len(),
        "definition": masked(&up.config),
    })
}

fn manage_error(e: ManageError) -> Response {
    let (status, reason) = match &e {
        ManageError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_upstream"),
        ManageError::Exists(_) => (StatusCode::CONFLICT, "exists"),
        ManageError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        ManageError::FromConfig(_) => (StatusCode::CONFLICT, "defined_in_config"),
        ManageError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
    };
    error(status, reason, e.to_string())
}

fn not_found(name: &str) -> Response {
    manage_error(ManageError::NotFound(name.into()))
}

/// Parses a definition from a JSON body, naming the field that is wrong.
fn parse(body: Value) -> Result<UpstreamConfig, Response> {
    serde_json::from_value(body).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_upstream",
            format!(
                "the upstream definition does not parse: {e}; send the fields of an [[upstreams]] entry (docs/configuration.md) as JSON, e.g. {{\"name\":\"search\",\"transport\":\"streamable_http\",\"url\":\"https://search.example/mcp\"}}"
            ),
        )
    })
}

/// Fills the tenant from the caller when absent, and refuses what the
/// caller may not create: another tenant's upstream, a shared one, or a
/// stdio one without `tenants:*`.
fn admit(mut body: Value, reach: &Reach, private_ok: bool) -> Result<UpstreamConfig, Response> {
    if let Some(obj) = body.as_object_mut()
        && !obj.contains_key("tenant")
        && !reach.tenant.is_empty()
    {
        obj.insert("tenant".into(), Value::String(reach.tenant.clone()));
    }
    let mut up = parse(body)?;
    if reach.all {
        return Ok(up);
    }
    let refuse = |what: String| {
        Err(error(
            StatusCode::FORBIDDEN,
            "cross_tenant",
            format!("{what} needs a credential holding scope `tenants:*`"),
        ))
    };
    if up.tenant != reach.tenant {
        return refuse(format!(
            "an upstream of tenant `{}` (yours is `{}`)",
            up.tenant, reach.tenant
        ));
    }
    if up.shared {
        return refuse("a shared upstream (offered to every tenant)".into());
    }
    if up.transport == UpstreamTransport::Stdio {
        return refuse("a stdio upstream (it runs a program on the gateway's host)".into());
    }
    if !private_ok {
        if let Some(why) = up.url.as_deref().and_then(private_destination) {
            return refuse(format!(
                "an upstream at {why} (or set auth.tenant_upstreams_private_addresses = true)"
            ));
        }
        // Names are checked on every connection, not only now.
        up.public_addresses_only = true;
    }
    if let Some(refused) = gateway_identity_refused(&up, reach) {
        return Err(refused);
    }
    Ok(up)
}

/// For an upstream held to public addresses: refuses it now when its host
/// name resolves only inside (it is checked again on every connection).
async fn resolves_inside(cfg: &UpstreamConfig, reach: &Reach) -> Option<Response> {
    if !cfg.public_addresses_only {
        return None;
    }
    let why = crate::egress::resolves_only_privately(cfg.url.as_deref()?).await?;
    Some(if reach.all {
        error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_upstream", why)
    } else {
        error(
            StatusCode::FORBIDDEN,
            "cross_tenant",
            format!(
                "{why}; an upstream inside the gateway's network needs a credential holding scope `tenants:*` (or set auth.tenant_upstreams_private_addresses = true)"
            ),
        )
    })
}

/// Refuses, without `tenants:*`, a definition that would hand the
/// gateway's own secrets or its clients' credentials to a URL the caller
/// chooses: `${env:...}`/`${file:...}` references (resolved from the
/// gateway's environment and files) and `forward_authorization` (every
/// caller's gateway credential, possibly a gateway-wide admin's).
fn gateway_identity_refused(up: &UpstreamConfig, reach: &Reach) -> Option<Response> {
    if reach.all {
        return None;
    }
    let what = if up
        .headers
        .values()
        .chain(up.env.values())
        .any(|v| meshgate_core::secrets::has_references(v))
    {
        "an upstream whose headers or env refer to the gateway's environment or files (`${env:...}`, `${file:...}`)"
    } else if up.forward_authorization {
        "an upstream with forward_authorization (it receives callers' gateway credentials)"
    } else {
        return None;
    };
    Some(error(
        StatusCode::FORBIDDEN,
        "cross_tenant",
        format!(
            "{what} needs a credential holding scope `tenants:*`; write a literal value (or `$${{` for a literal `${{`) instead"
        ),
    ))
}

/// The upstream named `name`, if the caller may see it.
fn visible(s: &AppState, name: &str, reach: &Reach) -> Option<std::sync::Arc<Upstream>> {
    s.gw.upstream_named(name).filter(|u| reach.sees(u))
}

/// Query of `GET /api/v1/upstreams`.
#[derive(serde::Deserialize)]
struct ListQuery {
    /// Page size (default 100, at most 500).
    limit: Option<usize>,
    /// The `next_cursor` of the previous page: the page starts after it.
    cursor: Option<String>,
}

async fn list(State(s): State<AppState>, who: Caller, Query(q): Query<ListQuery>) -> Response {
    let limit = match crate::admin::page_limit(q.limit) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let reach = Reach::of(&who);
    let mut seen: Vec<std::sync::Arc<Upstream>> =
        s.gw.upstreams.iter().filter(|u| reach.sees(u)).collect();
    seen.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    let total = seen.len();
    // The cursor is the last name of the previous page, so upstreams added
    // or removed meanwhile shift nothing.
    let after = q.cursor.as_deref().unwrap_or("");
    let rest: Vec<&std::sync::Arc<Upstream>> = seen
        .iter()
        .filter(|u| after.is_empty() || u.config.name.as_str() > after)
        .collect();
    let page: Vec<Value> = rest.iter().take(limit).map(|u| view(u)).collect();
    let next = (rest.len() > limit)
        .then(|| rest.get(limit - 1).map(|u| u.config.name.clone()))
        .flatten();
    Json(json!({"upstreams": page, "total": total, "next_cursor": next})).into_response()
}

/// `GET /api/v1/upstreams/{name}`.
async fn show(State(s): State<AppState>, Path(name): Path<String>, who: Caller) -> Response {
    match visible(&s, &name, &Reach::of(&who)) {
        Some(up) => Json(view(&up)).into_response(),
        None => not_found(&name),
    }
}

/// `POST /api/v1/upstreams`.
async fn create(
    State(s): State<AppState>,
    who: Caller,
    trace: Trace,
    Json(body): Json<Value>,
) -> Response {
    let reach = Reach::of(&who);
    let cfg = match admit(
        body,
        &reach,
        s.gw.config.auth.tenant_upstreams_private_addresses,
    ) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Some(refused) = resolves_inside(&cfg, &reach).await {
        return refused;
    }
    match s.gw.create_upstream(cfg).await {
        Ok(up) => {
            let v = view(&up);
            audit(
                &s,
                &who,
                &trace,
                "upstream.create",
                &up.config.name,
                json!({"definition": v["definition"]}),
            )
            .await;
            (StatusCode::CREATED, Json(v)).into_response()
        }
        // Names are global: say it is taken without showing whose it is.
        Err(e) => manage_error(e),
    }
}

/// The managed upstream `name` if the caller may change it.
fn changeable(
    s: &AppState,
    name: &str,
    reach: &Reach,
) -> Result<std::sync::Arc<Upstream>, Response> {
    let Some(up) = visible(s, name, reach) else {
        return Err(not_found(name));
    };
    if up.source == UpstreamSource::Config {
        return Err(manage_error(ManageError::FromConfig(name.into())));
    }
    if !reach.manages(&up) {
        return Err(error(
            StatusCode::FORBIDDEN,
            "cross_tenant",
            format!(
                "upstream `{name}` is shared with every tenant; changing it needs a credential holding scope `tenants:*`"
            ),
        ));
    }
    Ok(up)
}

/// Applies a changed definition of `up`.
async fn update(
    s: &AppState,
    who: &Caller,
    trace: &Trace,
    up: &Upstream,
    body: Value,
    reach: &Reach,
) -> Response {
    let cfg = match admit(
        body,
        reach,
        s.gw.config.auth.tenant_upstreams_private_addresses,
    )
    .and_then(|c| {
        unmask(c, &up.config)
            .map_err(|why| error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_upstream", why))
    }) {
        Ok(c) => c,
        Err(r) => return r,
    };
    // A masked value sent back takes the stored one, which may be a reference.
    if let Some(refused) = gateway_identity_refused(&cfg, reach) {
        return refused;
    }
    if let Some(refused) = resolves_inside(&cfg, reach).await {
        return refused;
    }
    let name = up.config.name.clone();
    match s.gw.update_upstream(&name, cfg).await {
        Ok(new) => {
            let v = view(&new);
            audit(
                s,
                who,
                trace,
                "upstream.update",
                &name,
                json!({"definition": v["definition"]}),
            )
            .await;
            Json(v).into_response()
        }
        Err(e) => manage_error(e),
    }
}

/// `PUT /api/v1/upstreams/{name}`: the whole new definition (`name` may be
/// left out).
async fn replace(
    State(s): State<AppState>,
    Path(name): Path<String>,
    who: Caller,
    trace: Trace,
    Json(mut body): Json<Value>,
) -> Response {
    let reach = Reach::of(&who);
    let up = match changeable(&s, &name, &reach) {
        Ok(u) => u,
        Err(r) => return r,
    };
    if let Some(obj) = body.as_object_mut() {
        obj.entry("name")
            .or_insert_with(|| Value::String(name.clone()));
    }
    update(&s, &who, &trace, &up, body, &reach).await
}

/// `PATCH /api/v1/upstreams/{name}`: a JSON merge patch (RFC 7396) over
/// the current definition, e.g. `{"enabled": false}`.
async fn patch(
    State(s): State<AppState>,
    Path(name): Path<String>,
    who: Caller,
    trace: Trace,
    Json(changes): Json<Value>,
) -> Response {
    let reach = Reach::of(&who);
    let up = match changeable(&s, &name, &reach) {
        Ok(u) => u,
        Err(r) => return r,
    };
    if !changes.is_object() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_upstream",
            "a PATCH body is a JSON object of the fields to change (null removes one), e.g. {\"enabled\": false}".into(),
        );
    }
    let mut body = match serde_json::to_value(masked(&up.config)) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot read the current definition: {e}"),
            );
        }
    };
    merge_patch(&mut body, changes);
    update(&s, &who, &trace, &up, body, &reach).await
}

/// `DELETE /api/v1/upstreams/{name}`.
async fn remove(
    State(s): State<AppState>,
    Path(name): Path<String>,
    who: Caller,
    trace: Trace,
) -> Response {
    let reach = Reach::of(&who);
    if let Err(r) = changeable(&s, &name, &reach) {
        // A stored definition that was never loaded (invalid at start-up,
        // or imported while running) is visible to nobody: only a
        // gateway-wide admin may delete it, by name.
        if reach.all && s.gw.upstream_named(&name).is_none() {
            match s.gw.delete_unloaded_upstream(&name).await {
                Ok(true) => {
                    audit(
                        &s,
                        &who,
                        &trace,
                        "upstream.delete",
                        &name,
                        json!({"loaded": false}),
                    )
                    .await;
                    return Json(json!({"deleted": name, "loaded": false})).into_response();
                }
                Ok(false) => {}
                Err(e) => return manage_error(e),
            }
        }
        return r;
    }
    match s.gw.delete_upstream(&name).await {
        Ok(()) => {
            audit(&s, &who, &trace, "upstream.delete", &name, json!({})).await;
            Json(json!({"deleted": name})).into_response()
        }
        Err(e) => manage_error(e),
    }
}

/// RFC 7396 JSON merge patch.
fn merge_patch(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(changes) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Value::Object(obj) = target {
                for (k, v) in changes {
                    if v.is_null() {
                        obj.remove(&k);
                    } else {
                        merge_patch(obj.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_may_not_point_upstreams_into_private_networks() {
        let reach = Reach {
            tenant: "acme".into(),
            all: false,
        };
        let body = json!({"name": "m", "transport": "sse", "url": "http://169.254.169.254/sse"});
        assert_eq!(
            admit(body.clone(), &reach, false).err().map(|r| r.status()),
            Some(StatusCode::FORBIDDEN)
        );
        let allowed = admit(body, &reach, true).expect("private addresses allowed");
        assert!(!allowed.public_addresses_only);
        // A tenant's upstream at a name is held to public addresses when it
        // connects, whatever the caller sent.
        let named = json!({"name": "m", "transport": "streamable_http", "url": "https://mcp.example.com/mcp", "public_addresses_only": false});
        let up = admit(named.clone(), &reach, false).expect("a public name");
        assert!(up.public_addresses_only);
        let admin = Reach {
            tenant: String::new(),
            all: true,
        };
        assert!(
            !admit(named, &admin, false)
                .expect("admin")
                .public_addresses_only
        );
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut doc = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]});
        merge_patch(
            &mut doc,
            json!({"a": null, "b": {"c": 5}, "e": [2], "f": true}),
        );
        assert_eq!(doc, json!({"b": {"c": 5, "d": 3}, "e": [2], "f": true}));
    }

    #[test]
    fn tenant_callers_cannot_create_stdio_shared_or_foreign_upstreams() {
        let reach = Reach {
            tenant: "acme".into(),
            all: false,
        };
        let http = json!({"name": "a", "transport": "streamable_http", "url": "http://x/mcp"});
        let up = admit(http.clone(), &reach, true).expect("own tenant");
        assert_eq!(up.tenant, "acme");
        let mut shared = http.clone();
        shared["shared"] = json!(true);
        assert_eq!(
            admit(shared, &reach, true).err().map(|r| r.status()),
            Some(StatusCode::FORBIDDEN)
        );
        let mut foreign = http;
        foreign["tenant"] = json!("other");
        assert_eq!(
            admit(foreign, &reach, true).err().map(|r| r.status()),
            Some(StatusCode::FORBIDDEN)
        );
        let stdio = json!({"name": "s", "transport": "stdio", "command": "sh"});
        assert_eq!(
            admit(stdio, &reach, true).err().map(|r| r.status()),
            Some(StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn only_gateway_wide_callers_may_use_gateway_secrets_or_forward_credentials() {
        let tenant = Reach {
            tenant: "acme".into(),
            all: false,
        };
        let global = Reach {
            tenant: "default".into(),
            all: true,
        };
        let base = json!({"name": "a", "transport": "streamable_http", "url": "http://x/mcp", "tenant": "acme"});
        let mut secret = base.clone();
        secret["headers"] = json!({"Authorization": "Bearer ${file:/var/lib/meshgate/token.key}"});
        let mut forward = base.clone();
        forward["forward_authorization"] = json!(true);
        let mut escaped = base.clone();
        escaped["headers"] = json!({"X-Template": "$${not a reference}"});
        for body in [&secret, &forward] {
            assert_eq!(
                admit(body.clone(), &tenant, true).err().map(|r| r.status()),
                Some(StatusCode::FORBIDDEN),
                "{body}"
            );
            assert!(admit(body.clone(), &global, true).is_ok(), "{body}");
        }
        assert!(
            admit(escaped, &tenant, true).is_ok(),
            "a literal `${{` is fine"
        );
    }
}
