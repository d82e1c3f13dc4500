//! The authentication layer over the whole router, and the one table that
//! says which scope each route needs ([`route_scope`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meshgate_core::DEFAULT_TENANT;
use meshgate_core::auth::{Principal, scope};
use serde_json::json;

use super::{Auth, AuthError};

/// The authenticated caller, in the request extensions.
#[derive(Clone, Debug)]
pub struct RequestPrincipal(pub Arc<Principal>);

/// The family of the gateway access token used, in the request extensions.
#[derive(Clone, Debug)]
pub struct TokenFamily(pub String);

/// The request's trace id, in the request extensions.
#[derive(Clone, Debug)]
pub struct TraceId(pub String);

/// Paths served without credentials.
pub fn is_public(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/api/v1/auth/refresh")
        || path.starts_with("/.well-known/")
}

/// The scope a route needs beyond being authenticated (`None`: any
/// authenticated caller). MCP methods are checked per method by the handler.
pub fn route_scope(method: &Method, path: &str) -> Option<&'static str> {
    let write = !matches!(*method, Method::GET | Method::HEAD);
    if path.starts_with("/admin/")
        || path.starts_with("/mcp/admin/")
        || path == "/mcp/stats"
        || path.starts_with("/mcp/health/")
        || path == "/health/gateway"
    {
        return Some(scope::ADMIN);
    }
    if path == "/mcp"
        || path.starts_with("/mcp/")
        || path == "/sse"
        || path == "/messages"
        || path.starts_with("/servers/")
    {
        return Some(scope::MCP_READ);
    }
    if path == "/metrics" || path.starts_with("/health/") {
        return Some(scope::METRICS_READ);
    }
    if path == "/api/v1/auth/keys" || path.starts_with("/api/v1/auth/keys/") {
        return Some(if write {
            scope::KEYS_WRITE
        } else {
            scope::KEYS_READ
        });
    }
    if path == "/ws" {
        return Some(scope::AGENT_CONNECT);
    }
    if path == "/api/v1/mesh" {
        return Some(scope::ADMIN);
    }
    if path.starts_with("/api/v1/agents/") && write {
        return Some(scope::ADMIN);
    }
    if path == "/api/v1/tasks"
        || path.starts_with("/api/v1/tasks/")
        || path == "/api/v1/agents"
        || path.starts_with("/api/v1/agents/")
        || path.starts_with("/api/v1/blobs/")
        || path == "/api/v1/state"
        || path.starts_with("/api/v1/state/")
    {
        return Some(if write {
            scope::TASKS_WRITE
        } else {
            scope::TASKS_READ
        });
    }
    if path == "/api/v1/tools" || path.starts_with("/api/v1/tools/") {
        return Some(if write {
            scope::MCP_CALL
        } else {
            scope::MCP_READ
        });
    }
    if path == "/api/v1/upstreams" || path.starts_with("/api/v1/upstreams/") {
        return Some(if write {
            scope::UPSTREAMS_WRITE
        } else {
            scope::UPSTREAMS_READ
        });
    }
    if path == "/api/v1/audit" {
        return Some(scope::AUDIT_READ);
    }
    None
}

/// The client address lockout is counted against: the peer, or, when the
/// peer is a trusted proxy, the last `X-Forwarded-For` hop that is not one.
pub fn client_address(
    peer: Option<std::net::IpAddr>,
    headers: &HeaderMap,
    trusted: &[std::net::IpAddr],
) -> String {
    let Some(peer) = peer else {
        return "unknown".into();
    };
    if !trusted.contains(&peer) {
        return peer.to_string();
    }
    let hops: Vec<std::net::IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    hops.into_iter()
        .rev()
        .find(|h| !trusted.contains(h))
        .unwrap_or(peer)
        .to_string()
}

/// The lockout client of a request.
pub fn client_of(auth: &Auth, req: &Request) -> String {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    client_address(peer, req.headers(), &auth.trusted_proxies)
}

/// The credential presented, if any: `Authorization: Bearer` or `X-API-Key`.
pub(crate) fn presented(headers: &HeaderMap) -> Result<Option<String>, AuthError> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let s = v
            .to_str()
            .map_err(|_| AuthError::Malformed("the Authorization header is not text".into()))?;
        let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed(format!(
                "Authorization scheme `{scheme}` is not supported; use `Bearer <API key or token>`"
            )));
        }
        let token = rest.trim();
        if token.is_empty() {
            return Err(AuthError::Malformed(
                "`Authorization: Bearer` has no token".into(),
            ));
        }
        return Ok(Some(token.to_owned()));
    }
    if let Some(v) = headers.get("x-api-key") {
        let s = v
            .to_str()
            .map_err(|_| AuthError::Malformed("the X-API-Key header is not text".into()))?;
        return Ok(Some(s.trim().to_owned()));
    }
    Ok(None)
}

/// The base URL clients used to reach us, for `resource_metadata`.
pub fn base_url(auth: &Auth, headers: &HeaderMap) -> String {
    if let Some(r) = &auth.resource
        && let Some(scheme_end) = r.find("://")
    {
        let after = &r[scheme_end + 3..];
        let host_end = after.find('/').map_or(r.len(), |i| scheme_end + 3 + i);
        return r[..host_end].to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        })
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// The HTTP answer to an authentication or authorization failure.
pub fn auth_error_response(auth: &Auth, headers: &HeaderMap, e: &AuthError) -> Response {
    let status = match e {
        AuthError::LockedOut { .. } => StatusCode::TOO_MANY_REQUESTS,
        AuthError::MissingScope { .. } => StatusCode::FORBIDDEN,
        AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    };
    let mut resp = (
        status,
        Json(json!({"error": {"reason": e.reason(), "message": e.to_string()}})),
    )
        .into_response();
    let h = resp.headers_mut();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        let mut challenge = format!(
            "Bearer realm=\"meshgate\", resource_metadata=\"{}/.well-known/oauth-protected-resource\"",
            base_url(auth, headers)
        );
        match e {
            AuthError::Missing => {}
            AuthError::MissingScope { scope, .. } => challenge.push_str(&format!(
                ", error=\"insufficient_scope\", scope=\"{scope}\""
            )),
            _ => challenge.push_str(&format!(
                ", error=\"invalid_token\", error_description=\"{}\"",
                e.to_string()
                    .replace('…', "...")
                    .chars()
                    .filter(|c| c.is_ascii() && !c.is_ascii_control())
                    .collect::<String>()
                    .replace(['"', '\\'], "'")
            )),
        }
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
    }
    if let AuthError::LockedOut {
        retry_after_secs, ..
    } = e
        && let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string())
    {
        h.insert(header::RETRY_AFTER, v);
    }
    resp
}

/// Authenticates every request but the public ones, checks the route's
/// scope, and puts the [`RequestPrincipal`] into the request extensions.
pub async fn authenticate(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if is_public(&path) {
        return next.run(req).await;
    }
    if !auth.enabled() {
        req.extensions_mut()
            .insert(RequestPrincipal(Arc::new(Principal::anonymous(
                DEFAULT_TENANT,
            ))));
        return next.run(req).await;
    }
    let client = client_of(&auth, &req);
    if let Err(e) = auth.check_lockout(&client) {
        metrics::counter!("auth_failures_total", "reason" => e.reason()).increment(1);
        return auth_error_response(&auth, req.headers(), &e);
    }
    let result = match presented(req.headers()) {
        Ok(Some(token)) => auth.authenticate_bearer(&token).await,
        Ok(None) => Err(AuthError::Missing),
        Err(e) => Err(e),
    };
    let (principal, family) = match result {
        Ok(p) => p,
        Err(e) => {
            auth.record_failure(&client, &e);
            tracing::info!(client, reason = e.reason(), path, "authentication failed");
            return auth_error_response(&auth, req.headers(), &e);
        }
    };
    auth.record_success(&client);
    if let Some(needed) = route_scope(req.method(), &path)
        && !principal.has_scope(needed)
    {
        let e = AuthError::MissingScope {
            route: format!("route {} {path}", req.method()),
            scope: needed.into(),
            role: principal.role.to_string(),
        };
        metrics::counter!("auth_failures_total", "reason" => e.reason()).increment(1);
        return auth_error_response(&auth, req.headers(), &e);
    }
    if let Some(f) = family {
        req.extensions_mut().insert(TokenFamily(f));
    }
    req.extensions_mut()
        .insert(RequestPrincipal(Arc::new(principal)));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_family_needs_its_scope() {
        let table = [
            (Method::POST, "/mcp", Some(scope::MCP_READ)),
            (Method::GET, "/sse", Some(scope::MCP_READ)),
            (Method::POST, "/messages", Some(scope::MCP_READ)),
            (Method::GET, "/metrics", Some(scope::METRICS_READ)),
            (Method::GET, "/health/store", Some(scope::METRICS_READ)),
            (Method::GET, "/api/v1/auth/keys", Some(scope::KEYS_READ)),
            (Method::POST, "/api/v1/auth/keys", Some(scope::KEYS_WRITE)),
            (
                Method::DELETE,
                "/api/v1/auth/keys/key_1",
                Some(scope::KEYS_WRITE),
            ),
            (
                Method::PATCH,
                "/api/v1/auth/keys/key_1",
                Some(scope::KEYS_WRITE),
            ),
            (Method::GET, "/api/v1/audit", Some(scope::AUDIT_READ)),
            (Method::GET, "/api/v1/auth/whoami", None),
            (Method::POST, "/api/v1/auth/token", None),
        ];
        for (m, path, want) in table {
            assert_eq!(route_scope(&m, path), want, "{m} {path}");
        }
        for public in [
            "/health",
            "/ready",
            "/.well-known/oauth-protected-resource",
            "/api/v1/auth/refresh",
        ] {
            assert!(is_public(public), "{public}");
        }
        for private in ["/health/store", "/healthz", "/mcp", "/api/v1/auth/token"] {
            assert!(!is_public(private), "{private}");
        }
    }

    #[test]
    fn lockout_client_is_the_peer_unless_a_trusted_proxy_forwarded_it() {
        let proxy: std::net::IpAddr = "10.0.0.5".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 1.2.3.4, 10.0.0.5"),
        );
        // An untrusted peer's header is ignored: it could say anything.
        assert_eq!(
            client_address(Some("9.9.9.9".parse().unwrap()), &h, &[proxy]),
            "9.9.9.9"
        );
        // Through the trusted proxy: the last hop it did not add itself.
        assert_eq!(client_address(Some(proxy), &h, &[proxy]), "1.2.3.4");
        assert_eq!(
            client_address(Some(proxy), &HeaderMap::new(), &[proxy]),
            "10.0.0.5"
        );
        assert_eq!(client_address(None, &h, &[proxy]), "unknown");
    }

    #[test]
    fn credentials_are_read_from_bearer_or_x_api_key_with_reasons() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h), Ok(None));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer  mg_abc "),
        );
        assert_eq!(presented(&h), Ok(Some("mg_abc".into())));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwYXNz"),
        );
        assert!(presented(&h).unwrap_err().to_string().contains("Basic"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer"));
        assert!(presented(&h).unwrap_err().to_string().contains("no token"));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("mg_key"));
        assert_eq!(presented(&h), Ok(Some("mg_key".into())));
    }
}
