//! The `Origin` layer: refuses browser requests from origins the rules do
//! not allow (403, before authentication), answers CORS preflights for the
//! ones they do, and adds CORS headers to their answers. The rules are
//! `meshgate_core::origin::OriginPolicy`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meshgate_core::origin::{OriginDecision, OriginPolicy};
use serde_json::json;

/// Headers a browser may send cross-origin.
const ALLOW_HEADERS: &str = "authorization, content-type, accept, mcp-session-id, mcp-protocol-version, last-event-id, x-trace-id, idempotency-key";
/// Headers a browser may read from answers.
const EXPOSE_HEADERS: &str = "mcp-session-id, mcp-protocol-version, www-authenticate, x-trace-id, retry-after, x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset, idempotent-replay";
const ALLOW_METHODS: &str = "GET, POST, PUT, DELETE, OPTIONS";

/// The layer's state.
pub struct OriginLayer {
    policy: OriginPolicy,
    max_age: String,
}

impl OriginLayer {
    /// The layer for `mcp.allowed_hosts` and `mcp.allowed_origins`
    /// (validated with the configuration).
    pub fn new(cfg: &meshgate_core::config::McpConfig) -> Result<OriginLayer, String> {
        Ok(OriginLayer {
            policy: OriginPolicy::new(&cfg.allowed_hosts, &cfg.allowed_origins)?,
            max_age: cfg.cors_max_age_secs.to_string(),
        })
    }

    /// Allows no browser origin but the gateway's own.
    pub fn strict() -> OriginLayer {
        OriginLayer {
            policy: OriginPolicy::strict(),
            max_age: "0".into(),
        }
    }
}

fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn set(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// The middleware.
pub async fn check(State(layer): State<Arc<OriginLayer>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let origin = headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
    let decision = layer
        .policy
        .decide(origin.as_deref(), text(headers, header::HOST));
    let Some(origin) = origin else {
        return next.run(req).await;
    };
    if decision == OriginDecision::Refused {
        metrics::counter!("gateway_errors_total", "type" => "origin_refused").increment(1);
        tracing::warn!(origin = %origin, path = %req.uri().path(), "refused a request from a browser origin that is not allowed");
        return (
            StatusCode::FORBIDDEN,
            axum::Json(json!({"error": {
                "reason": "origin_not_allowed",
                "message": format!("Origin `{origin}` is not allowed (DNS-rebinding and cross-site protection); an operator can add it to mcp.allowed_origins"),
            }})),
        )
            .into_response();
    }
    let preflight = req.method() == Method::OPTIONS
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        let h = resp.headers_mut();
        set(h, header::ACCESS_CONTROL_ALLOW_METHODS, ALLOW_METHODS);
        set(h, header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOW_HEADERS);
        set(h, header::ACCESS_CONTROL_MAX_AGE, &layer.max_age);
        resp
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    set(h, header::ACCESS_CONTROL_ALLOW_ORIGIN, &origin);
    set(h, header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE_HEADERS);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    resp
}
