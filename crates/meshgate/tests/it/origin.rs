//! Browser origins: the `Origin` check against DNS rebinding and cross-site
//! requests (refused before authentication), and CORS for allowed origins.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Gateway, GatewayConfig};

fn initialize() -> Value {
    json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
           "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                      "clientInfo": {"name": "origin-it", "version": "1"}}})
}

/// POSTs `initialize` to `/mcp` with the admin key and `origin`.
async fn post_mcp(gw: &Gateway, origin: Option<&str>) -> reqwest::Response {
    let mut b = gw
        .client()
        .post(gw.mcp_url())
        .header("accept", "application/json, text/event-stream")
        .json(&initialize());
    if let Some(o) = origin {
        b = b.header("origin", o);
    }
    b.send().await.expect("request")
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origins_are_refused_and_local_ones_get_cors_answers() {
    let gw = Gateway::start(&GatewayConfig::new()).await;

    // DNS rebinding: a page of another site is refused before anything else.
    let r = post_mcp(&gw, Some("http://evil.example")).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["reason"], "origin_not_allowed", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("http://evil.example") && message.contains("mcp.allowed_origins"),
        "{body}"
    );
    let anonymous = reqwest::Client::new()
        .get(gw.url("/api/v1/tasks"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect("request");
    assert_eq!(
        anonymous.status(),
        StatusCode::FORBIDDEN,
        "refused before authentication"
    );

    // Without an Origin (not a browser) and from the gateway's own origin.
    assert_eq!(post_mcp(&gw, None).await.status(), StatusCode::OK);
    let own = format!("http://127.0.0.1:{}", gw.port);
    assert_eq!(post_mcp(&gw, Some(&own)).await.status(), StatusCode::OK);

    // A local page on another port: allowed, with CORS headers.
    let r = post_mcp(&gw, Some("http://localhost:5173")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("http://localhost:5173")
    );
    let exposed = header(&r, "access-control-expose-headers").unwrap_or_default();
    assert!(exposed.contains("mcp-session-id"), "{exposed}");

    // Its preflight is answered without credentials; a foreign one is not.
    let preflight = |origin: &'static str| {
        reqwest::Client::new()
            .request(Method::OPTIONS, gw.mcp_url())
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, mcp-session-id",
            )
            .send()
    };
    let r = preflight("http://localhost:5173").await.expect("preflight");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("http://localhost:5173")
    );
    assert!(
        header(&r, "access-control-allow-methods")
            .unwrap_or_default()
            .contains("POST")
    );
    let allowed = header(&r, "access-control-allow-headers").unwrap_or_default();
    assert!(
        allowed.contains("authorization") && allowed.contains("mcp-session-id"),
        "{allowed}"
    );
    assert_eq!(header(&r, "access-control-max-age").as_deref(), Some("600"));
    let r = preflight("https://evil.example").await.expect("preflight");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(header(&r, "access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_origins_are_allowed_everywhere_and_the_agent_socket_is_protected_too() {
    let gw =
        Gateway::start(&GatewayConfig::new().mcp_line(
            r#"allowed_origins = ["https://app.example.com", "http://dev.example.com:*"]"#,
        ))
        .await;
    let r = post_mcp(&gw, Some("https://app.example.com")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("https://app.example.com")
    );
    assert_eq!(
        post_mcp(&gw, Some("http://dev.example.com:8081"))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        post_mcp(&gw, Some("https://app.example.com:8443"))
            .await
            .status(),
        StatusCode::FORBIDDEN,
        "a listed origin without `:*` means its own port only"
    );
    let r = gw
        .client()
        .get(gw.url("/api/v1/tasks"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "vary").as_deref(), Some("Origin"));

    // Cross-site WebSocket hijacking: a foreign page cannot open /ws.
    let ws = gw
        .client()
        .get(gw.url("/ws"))
        .header("origin", "https://evil.example")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("x-agent-id", "a1")
        .header("x-agent-type", "raw")
        .send()
        .await
        .expect("request");
    assert_eq!(ws.status(), StatusCode::FORBIDDEN);
}
