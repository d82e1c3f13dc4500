//! Traffic control end to end: rate limits per key, tenant, tool and client
//! session (headers, 429s, JSON-RPC errors, run-time overrides), and the
//! operator endpoints (gateway health, session statistics, client health,
//! cleanup, reset, the log filter), against the real binary.

use std::time::{Duration, Instant};

use futures::future::join_all;
use reqwest::{Method, StatusCode};
use rmcp::ServiceError;
use rmcp::model::ProtocolVersion;
use serde_json::{Value, json};

use crate::support::{
    Gateway, GatewayConfig, RawSession, SseReader, WAIT, call, call_tool, connect, connect_as,
    create_key, json_body, read_response, send, text_of,
};

/// JSON-RPC code of a rate-limit refusal.
const RATE_LIMITED: i64 = -32029;

/// A gateway in front of the stdio fixture `fxs`, with `extra` TOML appended.
async fn gateway(extra: &str) -> Gateway {
    // One upstream: `always` keeps its tools named `fxs__<tool>`.
    let mut config = GatewayConfig::new()
        .stdio_fixture("fxs")
        .toml("[namespacing]\nprefix_mode = \"always\"");
    if !extra.is_empty() {
        config = config.toml(extra);
    }
    Gateway::start(&config).await
}

/// A response header as a number.
fn header_u64(r: &reqwest::Response, name: &str) -> Option<u64> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// `(X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset)`.
fn rate_headers(r: &reqwest::Response) -> (Option<u64>, Option<u64>, Option<u64>) {
    (
        header_u64(r, "x-ratelimit-limit"),
        header_u64(r, "x-ratelimit-remaining"),
        header_u64(r, "x-ratelimit-reset"),
    )
}

/// `GET /api/v1/auth/whoami` with `http`.
async fn whoami(gw: &Gateway, http: &reqwest::Client) -> reqwest::Response {
    http.get(gw.url("/api/v1/auth/whoami"))
        .send()
        .await
        .expect("GET /api/v1/auth/whoami")
}

/// Polls the audit log until `query` has at least one entry; returns them.
async fn audit_entries(gw: &Gateway, query: &str) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = gw.get_json(&format!("/api/v1/audit?{query}")).await;
        assert_eq!(status, StatusCode::OK, "GET /api/v1/audit?{query}: {body}");
        let entries = body["entries"].as_array().cloned().unwrap_or_default();
        if !entries.is_empty() {
            return entries;
        }
        assert!(
            Instant::now() < deadline,
            "the audit log has no entry for {query}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens and initializes a legacy HTTP+SSE session with the admin key;
/// returns its event stream and its `/messages` URL.
async fn open_legacy(gw: &Gateway) -> (SseReader, String) {
    let http = gw.client();
    let r = http
        .get(gw.url("/sse"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("GET /sse");
    assert_eq!(r.status(), StatusCode::OK, "GET /sse");
    let mut stream = SseReader::new(r);
    let endpoint = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the endpoint event in time")
        .expect("the endpoint event");
    assert_eq!(endpoint.event.as_deref(), Some("endpoint"), "{endpoint:?}");
    let messages = gw.url(&endpoint.data);
    let post = |message: Value| {
        http.post(&messages)
            .header("content-type", "application/json")
            .body(message.to_string())
            .send()
    };
    let r = post(json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "legacy-limits-it", "version": "1"}}
    }))
    .await
    .expect("POST /messages");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let (answer, _) = stream.response_to(1).await;
    assert!(answer.get("result").is_some(), "{answer}");
    let r = post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await
        .expect("POST /messages");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    (stream, messages)
}

/// The JSON-RPC error of a tool call the rmcp client got back.
fn mcp_error(r: Result<rmcp::model::CallToolResult, ServiceError>) -> rmcp::ErrorData {
    match r {
        Err(ServiceError::McpError(e)) => e,
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    }
}

/// `POST /mcp/admin/cleanup?max_idle_seconds=N` with `http`, which must
/// succeed; its answer.
async fn cleanup(gw: &Gateway, http: &reqwest::Client, max_idle_seconds: u64) -> Value {
    let query = format!("/mcp/admin/cleanup?max_idle_seconds={max_idle_seconds}");
    let (status, result) = send(http, Method::POST, &gw.url(&query), None).await;
    assert_eq!(status, StatusCode::OK, "POST {query}: {result}");
    result
}

/// `tools/call` of `tool` with `arguments` over a raw session; the JSON-RPC
/// response (result or error).
async fn call_raw(raw: &RawSession, tool: &str, arguments: Value) -> Value {
    raw.request("tools/call", json!({"name": tool, "arguments": arguments}))
        .await
}

/// The `echo` call of the fixture as a JSON-RPC request with `id`.
fn echo_request(id: Value, message: &str) -> Value {
    json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": "fxs__echo", "arguments": {"message": message}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_headers_on_success_and_429_with_retry_after() {
    let gw = gateway("[rate_limits]\nper_key = { limit = 5, period_secs = 60, burst = 5 }").await;
    let http = gw.client();

    // 1-2: an MCP session (initialize, then the initialized notification).
    let mut raw = RawSession::new(&gw);
    let r = raw
        .post(&json!({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "limits-it", "version": "1"}}
        }))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut seen = vec![rate_headers(&r)];
    raw.session = r
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let _ = read_response(r, 0).await;
    let r = raw
        .post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    seen.push(rate_headers(&r));
    // 3-5: the REST API.
    let mut key_id = String::new();
    for _ in 0..3 {
        let r = whoami(&gw, &http).await;
        assert_eq!(r.status(), StatusCode::OK);
        seen.push(rate_headers(&r));
        let (_, me) = json_body(r).await;
        key_id = me["key_id"].as_str().expect("key_id").to_owned();
    }
    let limits: Vec<Option<u64>> = seen.iter().map(|h| h.0).collect();
    let remaining: Vec<Option<u64>> = seen.iter().map(|h| h.1).collect();
    let resets: Vec<u64> = seen
        .iter()
        .map(|h| h.2.expect("X-RateLimit-Reset on every counted response"))
        .collect();
    assert_eq!(limits, vec![Some(5); 5], "X-RateLimit-Limit");
    assert_eq!(
        remaining,
        vec![Some(4), Some(3), Some(2), Some(1), Some(0)],
        "X-RateLimit-Remaining after each request"
    );
    // One request refills every 12 s: the bucket is full again 12 s per request used.
    assert!(
        resets.windows(2).all(|w| w[0] < w[1]) && resets[0] >= 1 && resets[4] <= 60,
        "X-RateLimit-Reset grows with every request, up to the period: {resets:?}"
    );

    // 6: refused.
    let r = whoami(&gw, &http).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after = header_u64(&r, "retry-after").expect("Retry-After in seconds");
    assert!(
        (1..=12).contains(&retry_after),
        "Retry-After is at least 1 s and at most one refill interval (12 s): {retry_after}"
    );
    let (limit, left, reset) = rate_headers(&r);
    assert_eq!((limit, left), (Some(5), Some(0)));
    assert!(
        reset.is_some_and(|s| (1..=60).contains(&s)),
        "X-RateLimit-Reset {reset:?}"
    );
    let (_, body) = json_body(r).await;
    let e = &body["error"];
    assert_eq!(e["reason"], "rate_limited", "{body}");
    assert_eq!(e["http_status"], 429, "{body}");
    let ms = e["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(ms > 0 && ms <= 12_000, "retry_after_ms {ms}");
    assert_eq!(e["retry_after"].as_u64(), Some(ms.div_ceil(1000)), "{body}");
    assert_eq!(e["limit"]["scope"], "key", "{body}");
    assert_eq!(e["limit"]["key"], format!("key:{key_id}"), "{body}");
    assert_eq!(e["limit"]["limit"], 5, "{body}");
    assert_eq!(e["limit"]["burst"], 5, "{body}");
    assert_eq!(e["limit"]["period_secs"].as_f64(), Some(60.0), "{body}");
    assert_eq!(e["limit"]["source"], "config", "{body}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(&format!("rate limit exceeded for key:{key_id}"))),
        "{body}"
    );

    // The MCP endpoint is refused too: the key is out of requests everywhere.
    let r = raw.post(&echo_request(json!(7), "late")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);

    // Health, metrics and admin endpoints are not counted, so an operator can always get in.
    for path in [
        "/health",
        "/health/gateway",
        "/metrics",
        "/admin/rate-limits",
        "/mcp/stats",
    ] {
        let r = http.get(gw.url(path)).send().await.expect("GET");
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "GET {path} with the key out of requests"
        );
        assert!(
            r.headers().get("x-ratelimit-limit").is_none(),
            "GET {path} is not counted, so it has no X-RateLimit-Limit"
        );
    }
    let (status, state) = gw
        .get_json(&format!("/admin/rate-limits/key:{key_id}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{state}");
    assert_eq!(state["state"]["remaining"], 0, "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_post_refused_by_rate_limit_is_a_jsonrpc_error_with_the_request_id() {
    let gw = gateway("[rate_limits]\nper_key = { limit = 3, period_secs = 60 }").await;
    // initialize + initialized + one call: the three requests of the burst.
    let raw = RawSession::initialize(&gw).await;
    let ok = call_raw(&raw, "fxs__echo", json!({"message": "in time"})).await;
    assert_eq!(ok["result"]["content"][0]["text"], "in time", "{ok}");

    for id in [json!(42), json!("req-x")] {
        let r = raw.post(&echo_request(id.clone(), "too many")).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "id {id}");
        assert!(
            header_u64(&r, "retry-after").is_some_and(|s| s >= 1),
            "Retry-After"
        );
        assert_eq!(header_u64(&r, "x-ratelimit-limit"), Some(3));
        assert_eq!(header_u64(&r, "x-ratelimit-remaining"), Some(0));
        let (_, body) = json_body(r).await;
        assert_eq!(body["jsonrpc"], "2.0", "{body}");
        assert_eq!(body["id"], id, "the error answers the request: {body}");
        assert!(body.get("result").is_none(), "{body}");
        let e = &body["error"];
        assert_eq!(e["code"], RATE_LIMITED, "{body}");
        assert!(
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("rate limit exceeded for key:key_")),
            "{body}"
        );
        assert_eq!(e["data"]["reason"], "rate_limited", "{body}");
        assert!(
            e["data"]["retry_after_ms"]
                .as_u64()
                .is_some_and(|ms| ms > 0),
            "{body}"
        );
        assert!(
            e["data"]["retry_after"].as_u64().is_some_and(|s| s >= 1),
            "{body}"
        );
        assert_eq!(e["data"]["limit"]["scope"], "key", "{body}");
        assert_eq!(e["data"]["limit"]["limit"], 3, "{body}");
        assert_eq!(e["data"]["http_status"], 429, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tool_limit_is_reported_inside_the_session() {
    let gw = gateway("[rate_limits.tools]\n\"fxs__echo\" = { limit = 2, period_secs = 60 }").await;
    let (session, _) = connect(&gw).await;
    for i in 0..2 {
        let r = call_tool(&session, "fxs__echo", json!({"message": format!("m{i}")})).await;
        assert_eq!(text_of(&r), format!("m{i}"));
    }
    let e = mcp_error(
        tokio::time::timeout(
            WAIT,
            session.call_tool(call("fxs__echo", json!({"message": "third"}))),
        )
        .await
        .expect("the third call answers in time"),
    );
    assert_eq!(e.code.0, RATE_LIMITED as i32, "{e:?}");
    assert!(
        e.message
            .starts_with("rate limit exceeded for tool:fxs__echo"),
        "{e:?}"
    );
    let data = e.data.clone().expect("error data");
    assert_eq!(data["reason"], "rate_limited", "{data}");
    assert_eq!(data["limit"]["key"], "tool:fxs__echo", "{data}");
    assert_eq!(data["limit"]["scope"], "tool", "{data}");
    assert_eq!(data["limit"]["limit"], 2, "{data}");
    assert_eq!(data["limit"]["source"], "config", "{data}");
    assert!(
        data["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{data}"
    );
    assert_eq!(data["http_status"], 429, "{data}");

    // Other tools are not affected.
    let r = call_tool(&session, "fxs__add", json!({"a": 1, "b": 2})).await;
    assert!(text_of(&r).contains('3'), "{}", text_of(&r));

    // The limit is per tool across callers: another session is refused too,
    // while its POST itself is an ordinary HTTP 200.
    let raw = RawSession::initialize(&gw).await;
    let refused = call_raw(&raw, "fxs__echo", json!({"message": "other session"})).await;
    assert_eq!(refused["error"]["code"], RATE_LIMITED, "{refused}");
    assert_eq!(
        refused["error"]["data"]["limit"]["key"], "tool:fxs__echo",
        "{refused}"
    );

    let (status, state) = gw.get_json("/admin/rate-limits/tool:fxs__echo").await;
    assert_eq!(status, StatusCode::OK, "{state}");
    assert_eq!(state["source"], "config", "{state}");
    assert_eq!(state["effective"]["limit"], 2, "{state}");
    assert_eq!(state["state"]["remaining"], 0, "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_limit_counts_each_session_and_a_refused_call_consumes_nothing() {
    let gw = gateway(
        "[rate_limits]\nper_connection = { limit = 2, period_secs = 600 }\n\
         [rate_limits.tools]\n\"fxs__echo\" = { limit = 1, period_secs = 600 }",
    )
    .await;
    let raw = RawSession::initialize(&gw).await;
    let sid = raw.session.clone().expect("session id");

    // echo: tool 1 → 0, connection 2 → 1.
    let ok = call_raw(&raw, "fxs__echo", json!({"message": "one"})).await;
    assert_eq!(ok["result"]["content"][0]["text"], "one", "{ok}");
    let (status, me) = gw.get_json(&format!("/mcp/health/client/{sid}")).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    let client_id = me["client_id"].as_str().expect("client_id").to_owned();
    // echo again: refused by the tool limit, which must not use up the connection's request.
    let refused = call_raw(&raw, "fxs__echo", json!({"message": "two"})).await;
    assert_eq!(
        refused["error"]["data"]["limit"]["key"], "tool:fxs__echo",
        "{refused}"
    );
    // add: the connection's second request.
    let ok = call_raw(&raw, "fxs__add", json!({"a": 2, "b": 2})).await;
    assert!(
        ok.get("result").is_some(),
        "a refused call consumed the connection's quota: {ok}"
    );
    // add again: the connection is out of requests.
    let refused = call_raw(&raw, "fxs__add", json!({"a": 2, "b": 2})).await;
    assert_eq!(refused["error"]["code"], RATE_LIMITED, "{refused}");
    let limit = &refused["error"]["data"]["limit"];
    assert_eq!(limit["key"], format!("connection:{client_id}"), "{refused}");
    assert_eq!(limit["scope"], "connection", "{refused}");
    assert_eq!(limit["limit"], 2, "{refused}");

    // Another session has its own connection bucket.
    let other = RawSession::initialize(&gw).await;
    let ok = call_raw(&other, "fxs__add", json!({"a": 1, "b": 1})).await;
    assert!(ok.get("result").is_some(), "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_request_consumes_no_other_limit_at_the_http_layer() {
    let gw = gateway("").await;
    let (a, _) = create_key(
        &gw,
        json!({"name": "a", "role": "developer", "rate_limit_per_minute": 2}),
    )
    .await;
    let (b, _) = create_key(&gw, json!({"name": "b", "role": "developer"})).await;
    // Three requests for the whole tenant (the override refills its bucket).
    let (status, v) = send(
        &gw.client(),
        Method::PUT,
        &gw.url("/admin/rate-limits/tenant:default"),
        Some(json!({"limit": 3, "period_secs": 600})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");

    let a_http = gw.client_with_key(&a);
    for _ in 0..2 {
        assert_eq!(whoami(&gw, &a_http).await.status(), StatusCode::OK);
    }
    // a's own limit refuses; the tenant still has one request left.
    let r = whoami(&gw, &a_http).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let (_, body) = json_body(r).await;
    assert_eq!(body["error"]["limit"]["scope"], "key", "{body}");
    assert_eq!(body["error"]["limit"]["source"], "api_key", "{body}");

    let b_http = gw.client_with_key(&b);
    let r = whoami(&gw, &b_http).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the refused request of key a consumed a request of the tenant"
    );
    let r = whoami(&gw, &b_http).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let (_, body) = json_body(r).await;
    assert_eq!(body["error"]["limit"]["key"], "tenant:default", "{body}");
    assert_eq!(body["error"]["limit"]["scope"], "tenant", "{body}");
    assert_eq!(body["error"]["limit"]["source"], "override", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_rate_limit_per_minute_applies_to_that_key_only() {
    let gw = gateway("").await;
    let (key, id) = create_key(
        &gw,
        json!({"name": "limited", "role": "developer", "rate_limit_per_minute": 3}),
    )
    .await;
    let limited = gw.client_with_key(&key);
    for left in [2, 1, 0] {
        let r = whoami(&gw, &limited).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header_u64(&r, "x-ratelimit-limit"), Some(3));
        assert_eq!(header_u64(&r, "x-ratelimit-remaining"), Some(left));
    }
    let r = whoami(&gw, &limited).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let (_, body) = json_body(r).await;
    assert_eq!(body["error"]["limit"]["key"], format!("key:{id}"), "{body}");
    assert_eq!(body["error"]["limit"]["source"], "api_key", "{body}");
    assert_eq!(body["error"]["limit"]["limit"], 3, "{body}");
    assert_eq!(
        body["error"]["limit"]["period_secs"].as_f64(),
        Some(60.0),
        "{body}"
    );
    // MCP is refused for that key as well.
    let mut raw = RawSession::new(&gw);
    raw.http = limited.clone();
    let r = raw
    .post(&json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}
    }))
    .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);

    // The admin key (no limit of its own, none configured) is not limited.
    let admin = gw.client();
    for i in 0..10 {
        let r = whoami(&gw, &admin).await;
        assert_eq!(r.status(), StatusCode::OK, "admin request {i}");
    }
    let (session, _) = connect(&gw).await;
    let r = call_tool(&session, "fxs__echo", json!({"message": "admin"})).await;
    assert_eq!(text_of(&r), "admin");

    let (status, state) = gw.get_json(&format!("/admin/rate-limits/key:{id}")).await;
    assert_eq!(status, StatusCode::OK, "{state}");
    assert_eq!(state["source"], "api_key", "{state}");
    assert_eq!(state["limited"], true, "{state}");
    assert_eq!(state["effective"]["limit"], 3, "{state}");
    assert_eq!(state["effective"]["burst"], 3, "{state}");
    assert_eq!(state["state"]["remaining"], 0, "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_override_and_reset_take_effect_without_restart() {
    let gw = gateway("").await;
    let admin = gw.client();
    let (key, id) = create_key(&gw, json!({"name": "k", "role": "developer"})).await;
    let k = gw.client_with_key(&key);
    let limit_url = gw.url(&format!("/admin/rate-limits/key:{id}"));

    let (status, before) = gw.get_json(&format!("/admin/rate-limits/key:{id}")).await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(before["source"], "none", "{before}");
    assert_eq!(before["limited"], false, "{before}");

    let (status, set) = send(&admin, Method::PUT, &limit_url, Some(json!({"limit": 2}))).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["source"], "override", "{set}");
    assert_eq!(set["effective"]["limit"], 2, "{set}");
    assert_eq!(
        set["effective"]["period_secs"].as_f64(),
        Some(60.0),
        "{set}"
    );
    assert_eq!(set["effective"]["burst"], 2, "{set}");
    let (status, got) = gw.get_json(&format!("/admin/rate-limits/key:{id}")).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["key"], format!("key:{id}"), "{got}");
    assert_eq!(got["source"], "override", "{got}");
    assert_eq!(got["limited"], true, "{got}");
    assert_eq!(got["state"]["remaining"], 2, "{got}");
    let (_, all) = gw.get_json("/admin/rate-limits").await;
    assert!(
        all["limits"]
            .as_array()
            .is_some_and(|l| l.iter().any(|e| e["key"] == format!("key:{id}"))),
        "GET /admin/rate-limits lists the override: {all}"
    );

    for left in [1, 0] {
        let r = whoami(&gw, &k).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header_u64(&r, "x-ratelimit-remaining"), Some(left));
    }
    let r = whoami(&gw, &k).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let (_, body) = json_body(r).await;
    assert_eq!(body["error"]["limit"]["source"], "override", "{body}");

    // DELETE restores the default (unlimited) at once.
    let (status, deleted) = send(&admin, Method::DELETE, &limit_url, None).await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_eq!(deleted["override_removed"], true, "{deleted}");
    assert_eq!(deleted["source"], "none", "{deleted}");
    assert_eq!(deleted["limited"], false, "{deleted}");
    for i in 0..5 {
        let r = whoami(&gw, &k).await;
        assert_eq!(r.status(), StatusCode::OK, "request {i} after DELETE");
    }

    // A limit of 1; the reset refills the exhausted bucket and keeps the override.
    let (status, set) = send(
        &admin,
        Method::PUT,
        &limit_url,
        Some(json!({"limit": 1, "period_secs": 600})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(whoami(&gw, &k).await.status(), StatusCode::OK);
    assert_eq!(
        whoami(&gw, &k).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let (status, reset) = send(&admin, Method::POST, &gw.url("/mcp/admin/reset"), None).await;
    assert_eq!(status, StatusCode::OK, "{reset}");
    assert_eq!(reset["breakers_reset"], 1, "one upstream: {reset}");
    assert!(
        reset["limiters_reset"].as_u64().is_some_and(|n| n >= 1),
        "{reset}"
    );
    let r = whoami(&gw, &k).await;
    assert_eq!(r.status(), StatusCode::OK, "the reset refilled the bucket");
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), Some(1));
    assert_eq!(
        whoami(&gw, &k).await.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the override outlives the reset"
    );

    // limit 0 lifts the limit for the key.
    let (status, set) = send(&admin, Method::PUT, &limit_url, Some(json!({"limit": 0}))).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["limited"], false, "{set}");
    for i in 0..5 {
        assert_eq!(
            whoami(&gw, &k).await.status(),
            StatusCode::OK,
            "request {i} with limit 0"
        );
    }

    // Malformed limiter keys and bodies are refused with what is allowed.
    for bad in ["bogus", "key:", "user:alice"] {
        let (status, body) = send(
            &admin,
            Method::PUT,
            &gw.url(&format!("/admin/rate-limits/{bad}")),
            Some(json!({"limit": 1})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            ["key:", "tenant:", "tool:", "connection:"]
                .iter()
                .all(|f| message.contains(f)),
            "{bad}: the message names the allowed forms: {body}"
        );
        let (status, _) = gw.get_json(&format!("/admin/rate-limits/{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "GET {bad}");
    }
    let (status, body) = send(&admin, Method::PUT, &limit_url, Some(json!({"rate": 5}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_burst_never_exceeds_the_limit() {
    // 20 per 600 s: one refill every 30 s, so none arrives during the burst.
    let gw = gateway("[rate_limits]\nper_key = { limit = 20, period_secs = 600 }").await;
    let http = gw.client();
    let url = gw.url("/api/v1/auth/whoami");
    let answers = join_all((0..100).map(|_| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http.get(&url).send().await.expect("GET whoami");
            (r.status(), header_u64(&r, "x-ratelimit-remaining"))
        }
    }))
    .await;
    let ok: Vec<u64> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .map(|(_, left)| left.expect("X-RateLimit-Remaining on a success"))
        .collect();
    let refused = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(ok.len(), 20, "successes; all answers: {answers:?}");
    assert_eq!(refused, 80, "refusals; all answers: {answers:?}");
    // Each success took its own place in the bucket.
    let mut places = ok.clone();
    places.sort_unstable();
    assert_eq!(
        places,
        (0..20).collect::<Vec<u64>>(),
        "remaining after each success"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_need_admin_scope_and_are_audited() {
    let gw = gateway("").await;
    let admin = gw.client();
    let admin_id = json_body(whoami(&gw, &admin).await).await.1["key_id"]
        .as_str()
        .expect("key_id")
        .to_owned();
    let (dev_key, dev_id) = create_key(&gw, json!({"name": "dev", "role": "developer"})).await;
    let (viewer_key, _) = create_key(&gw, json!({"name": "viewer", "role": "viewer"})).await;
    let (op_key, _) = create_key(&gw, json!({"name": "op", "role": "operator"})).await;
    let raw = RawSession::initialize(&gw).await;
    let sid = raw.session.clone().expect("session id");
    let listed = raw.request("tools/list", json!({})).await;
    assert!(listed.get("result").is_some(), "{listed}");

    let requests: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/admin/rate-limits".into(), None),
        (
            Method::GET,
            format!("/admin/rate-limits/key:{dev_id}"),
            None,
        ),
        (
            Method::PUT,
            format!("/admin/rate-limits/key:{dev_id}"),
            Some(json!({"limit": 5})),
        ),
        (Method::GET, "/mcp/stats".into(), None),
        (Method::GET, "/health/gateway".into(), None),
        (Method::GET, format!("/mcp/health/client/{sid}"), None),
        (Method::GET, "/admin/log-level".into(), None),
        (
            Method::PUT,
            "/admin/log-level".into(),
            Some(json!({"level": "info"})),
        ),
        (
            Method::POST,
            "/mcp/admin/cleanup?max_idle_seconds=3600".into(),
            None,
        ),
        (Method::POST, "/mcp/admin/reset".into(), None),
        (Method::GET, "/admin/circuit-breakers".into(), None),
        (
            Method::POST,
            "/admin/circuit-breakers/fxs/reset".into(),
            None,
        ),
    ];
    // Viewers hold metrics:read, which is not enough for /health/gateway either.
    for key in [&dev_key, &viewer_key] {
        let http = gw.client_with_key(key);
        for (method, path, body) in &requests {
            let (status, b) = send(&http, method.clone(), &gw.url(path), body.clone()).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {b}");
            assert_eq!(
                b["error"]["reason"], "insufficient_scope",
                "{method} {path}: {b}"
            );
        }
    }
    // Operators hold the admin scope (docs/security.md).
    let (status, _) = send(
        &gw.client_with_key(&op_key),
        Method::GET,
        &gw.url("/mcp/stats"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "operator GET /mcp/stats");
    // Nothing the refused callers asked for happened.
    let (_, dev_limit) = gw
        .get_json(&format!("/admin/rate-limits/key:{dev_id}"))
        .await;
    assert_eq!(dev_limit["source"], "none", "{dev_limit}");

    for (method, path, body) in &requests {
        let (status, b) = send(&admin, method.clone(), &gw.url(path), body.clone()).await;
        assert_eq!(status, StatusCode::OK, "admin {method} {path}: {b}");
    }

    for (action, target) in [
        ("admin.rate_limit_set", Some(format!("key:{dev_id}"))),
        ("admin.log_level", None),
        ("admin.cleanup", None),
        ("admin.reset", None),
        ("admin.breaker_reset", Some("fxs".to_owned())),
    ] {
        let entries = audit_entries(&gw, &format!("action={action}")).await;
        assert_eq!(
            entries.len(),
            1,
            "{action}: only the admin's request: {entries:?}"
        );
        let e = &entries[0];
        assert_eq!(e["actor"], admin_id, "{action}: {e}");
        assert_eq!(e["outcome"], "ok", "{action}: {e}");
        if let Some(target) = target {
            assert_eq!(e["target"], target, "{action}: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_client_health_describe_open_sessions() {
    let gw = gateway("").await;
    let a = RawSession::initialize(&gw).await;
    let b = RawSession::initialize(&gw).await;
    let (mut legacy, messages) = open_legacy(&gw).await;
    for raw in [&a, &b] {
        let r = call_raw(raw, "fxs__echo", json!({"message": "hi"})).await;
        assert_eq!(r["result"]["content"][0]["text"], "hi", "{r}");
    }
    let r = gw
        .client()
        .post(&messages)
        .header("content-type", "application/json")
        .body(echo_request(json!(2), "legacy hi").to_string())
        .send()
        .await
        .expect("POST /messages");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let (answer, _) = legacy.response_to(2).await;
    assert_eq!(
        answer["result"]["content"][0]["text"], "legacy hi",
        "{answer}"
    );

    let (status, stats) = gw.get_json("/mcp/stats").await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    let c = &stats["connections"];
    assert_eq!(c["total"], 3, "{stats}");
    assert_eq!(c["by_transport"]["streamable_http"], 2, "{stats}");
    assert_eq!(c["by_transport"]["sse"], 1, "{stats}");
    assert_eq!(c["age_buckets"]["under_1m"], 3, "{stats}");
    assert!(
        c["average_age_secs"]
            .as_f64()
            .is_some_and(|s| (0.0..60.0).contains(&s)),
        "{stats}"
    );
    assert!(
        stats["requests"].as_u64().is_some_and(|n| n >= 3),
        "three tool calls at least: {stats}"
    );
    assert!(stats["errors"].is_u64(), "{stats}");
    assert!(stats["error_rate"].is_number(), "{stats}");
    assert!(stats["outbound"].is_object(), "{stats}");
    assert!(stats["pools"].is_array(), "{stats}");

    let (status, health) = gw.get_json("/health/gateway").await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["transports"]["streamable_http"], 2, "{health}");
    assert_eq!(health["transports"]["sse"], 1, "{health}");
    assert!(health["requests_in_flight"].is_u64(), "{health}");
    assert!(health["error_rate"].is_object(), "{health}");
    let up = &health["upstreams"][0];
    assert_eq!(up["name"], "fxs", "{health}");
    assert_eq!(up["status"], "up", "{health}");
    assert_eq!(up["breaker"]["state"], "closed", "{health}");
    assert!(
        up["pool"].is_object() && up["restarts"].is_u64(),
        "{health}"
    );

    let sid = a.session.clone().expect("session id");
    let (status, me) = gw.get_json(&format!("/mcp/health/client/{sid}")).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["session_id"], sid.as_str(), "{me}");
    assert_eq!(me["transport"], "streamable_http", "{me}");
    assert_eq!(me["status"], "ok", "{me}");
    assert_eq!(me["tenant"], "default", "{me}");
    assert_eq!(me["protocol_version"], "2025-11-25", "{me}");
    assert_eq!(me["client_name"], "raw-it", "{me}");
    assert!(
        me["subject"].as_str().is_some_and(|s| !s.is_empty()),
        "{me}"
    );
    assert!(me["age_secs"].is_u64() && me["idle_secs"].is_u64(), "{me}");
    let requests = me["requests"].as_u64().expect("requests");
    assert!(requests > 0, "{me}");
    assert!(
        me["errors"].is_u64() && me["error_rate"].is_number(),
        "{me}"
    );
    assert!(me["upstream_connections"].is_array(), "{me}");
    let client_id = me["client_id"].as_str().expect("client_id").to_owned();
    assert!(client_id.starts_with("c-"), "{me}");

    // More requests are counted; the gateway id finds the same session.
    for _ in 0..2 {
        call_raw(&a, "fxs__echo", json!({"message": "again"})).await;
    }
    let (status, again) = gw
        .get_json(&format!("/mcp/health/client/{client_id}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["session_id"], sid.as_str(), "{again}");
    assert!(
        again["requests"]
            .as_u64()
            .is_some_and(|n| n >= requests + 2),
        "requests went from {requests} to {}",
        again["requests"]
    );
    // The other session is a different client.
    let (_, other) = gw
        .get_json(&format!(
            "/mcp/health/client/{}",
            b.session.clone().expect("session id")
        ))
        .await;
    assert_ne!(other["client_id"], client_id.as_str(), "{other}");

    for unknown in ["c-999999", "no-such-session"] {
        let (status, body) = gw.get_json(&format!("/mcp/health/client/{unknown}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}: {body}");
        assert_eq!(body["error"]["reason"], "not_found", "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_closes_idle_sessions() {
    let gw = gateway("").await;
    let admin = gw.client();
    let idle = RawSession::initialize(&gw).await;
    let idle_id = idle.session.clone().expect("session id");
    let busy = RawSession::initialize(&gw).await;
    for raw in [&idle, &busy] {
        let listed = raw.request("tools/list", json!({})).await;
        assert!(listed.get("result").is_some(), "{listed}");
    }
    let (mut legacy, _) = open_legacy(&gw).await;

    for (status, query) in [
        ("missing", "/mcp/admin/cleanup"),
        ("not a number", "/mcp/admin/cleanup?max_idle_seconds=abc"),
        ("negative", "/mcp/admin/cleanup?max_idle_seconds=-1"),
    ] {
        let (s, body) = send(&admin, Method::POST, &gw.url(query), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{status}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("max_idle_seconds")),
            "{status}: {body}"
        );
    }
    // The refused cleanups closed nothing.
    let (_, stats) = gw.get_json("/mcp/stats").await;
    assert_eq!(stats["connections"]["total"], 3, "{stats}");

    tokio::time::sleep(Duration::from_millis(2100)).await;
    // `busy` was just active; `idle` and the legacy session were not.
    let r = call_raw(&busy, "fxs__echo", json!({"message": "still here"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "still here", "{r}");

    let result = cleanup(&gw, &admin, 1).await;
    assert_eq!(result["sessions_closed"], 2, "idle and legacy: {result}");
    let closed = result["closed"].as_u64().expect("closed");
    let conns = result["upstream_connections_closed"]
        .as_u64()
        .expect("upstream_connections_closed");
    assert_eq!(closed, 2 + conns, "{result}");

    let r = idle
        .post(&json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {}}))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "the closed session's next request"
    );
    let (status, _) = gw.get_json(&format!("/mcp/health/client/{idle_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The legacy session's event stream ends.
    let end = tokio::time::timeout(WAIT, async { while legacy.next().await.is_some() {} }).await;
    assert!(
        end.is_ok(),
        "the closed legacy session's stream is still open"
    );

    // The active session lives on.
    let r = call_raw(&busy, "fxs__echo", json!({"message": "after"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "after", "{r}");
    let (_, stats) = gw.get_json("/mcp/stats").await;
    assert_eq!(stats["connections"]["total"], 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_changes_at_run_time() {
    const DEBUG_LINE: &str = "\"level\":\"DEBUG\"";
    let gw = gateway("").await;
    let admin = gw.client();
    let (session, _) = connect(&gw).await;
    call_tool(&session, "fxs__echo", json!({"message": "at info"})).await;
    let (status, level) = gw.get_json("/admin/log-level").await;
    assert_eq!(status, StatusCode::OK, "{level}");
    // The configured level, with the MCP library held at warnings.
    assert_eq!(level["level"], "rmcp=warn,info", "{level}");
    assert!(
        !gw.log().contains(DEBUG_LINE),
        "debug lines at level info:\n{}",
        gw.log()
    );

    let (status, set) = send(
        &admin,
        Method::PUT,
        &gw.url("/admin/log-level"),
        Some(json!({"level": "debug"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["level"], "debug", "{set}");
    assert_eq!(set["previous"], "rmcp=warn,info", "{set}");
    let (_, level) = gw.get_json("/admin/log-level").await;
    assert_eq!(level["level"], "debug", "{level}");
    call_tool(&session, "fxs__echo", json!({"message": "at debug"})).await;
    let deadline = Instant::now() + WAIT;
    while !gw.log().contains(DEBUG_LINE) {
        assert!(
            Instant::now() < deadline,
            "no debug line after switching to debug:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for bad in ["==", "info,[", "meshgate=loud"] {
        let (status, body) = send(
            &admin,
            Method::PUT,
            &gw.url("/admin/log-level"),
            Some(json!({"level": bad})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
        assert_eq!(body["error"]["reason"], "invalid_level", "{body}");
    }
    let (status, body) = send(
        &admin,
        Method::PUT,
        &gw.url("/admin/log-level"),
        Some(json!({"filter": "debug"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (_, level) = gw.get_json("/admin/log-level").await;
    assert_eq!(
        level["level"], "debug",
        "invalid filters change nothing: {level}"
    );

    // Back to info: no more debug lines.
    let (status, set) = send(
        &admin,
        Method::PUT,
        &gw.url("/admin/log-level"),
        Some(json!({"level": "info"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["previous"], "debug", "{set}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let debug_lines = gw.log().matches(DEBUG_LINE).count();
    let (other, _) = connect_as(&gw, ProtocolVersion::V_2025_11_25, &gw.admin_key).await;
    call_tool(&other, "fxs__echo", json!({"message": "at info again"})).await;
    call_tool(&session, "fxs__echo", json!({"message": "at info again"})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        gw.log().matches(DEBUG_LINE).count(),
        debug_lines,
        "debug lines after switching back to info"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_health_finds_a_session_by_its_id_right_after_initialize() {
    let gw = gateway("").await;
    let raw = RawSession::initialize(&gw).await;
    let sid = raw.session.clone().expect("session id");
    let (_, stats) = gw.get_json("/mcp/stats").await;
    assert_eq!(
        stats["connections"]["total"], 1,
        "the session is open: {stats}"
    );
    let (status, me) = gw.get_json(&format!("/mcp/health/client/{sid}")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "an open session that has not made a request since initialize is unknown by its Mcp-Session-Id: {me}"
    );
    assert_eq!(me["session_id"], sid.as_str(), "{me}");
    assert_eq!(me["transport"], "streamable_http", "{me}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_closes_a_session_that_only_initialized() {
    let gw = gateway("").await;
    let raw = RawSession::initialize(&gw).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let result = cleanup(&gw, &gw.client(), 1).await;
    assert_eq!(
        result["sessions_closed"], 1,
        "a session idle since initialize: {result}"
    );
    let r = raw
        .post(&json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {}}))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "the closed session's next request"
    );
    let (_, stats) = gw.get_json("/mcp/stats").await;
    assert_eq!(stats["connections"]["total"], 0, "{stats}");
}

/// A refusal for want of `tenants:*`.
const CROSS_TENANT: (StatusCode, &str) = (StatusCode::FORBIDDEN, "cross_tenant");
/// A refusal that hides another tenant's object.
const NOT_FOUND: (StatusCode, &str) = (StatusCode::NOT_FOUND, "not_found");

/// Checks that the acme operator's `what` was refused with `want` (status
/// and error reason).
fn refused(what: &str, want: (StatusCode, &str), (status, body): (StatusCode, Value)) {
    assert_eq!(status, want.0, "acme {what}: {body}");
    assert_eq!(body["error"]["reason"], want.1, "acme {what}: {body}");
}

/// The `upstream` fields of a `GET /admin/circuit-breakers` answer, sorted.
fn breaker_names(body: &Value) -> Vec<String> {
    let mut names: Vec<String> = body["circuit_breakers"]
        .as_array()
        .unwrap_or_else(|| panic!("circuit_breakers is a list: {body}"))
        .iter()
        .map(|b| b["upstream"].as_str().expect("upstream").to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_are_cut_to_the_callers_tenant() {
    // fxs serves tenant `default`, fxa tenant `acme`.
    let gw = Gateway::start(
        &GatewayConfig::new()
            .stdio_fixture("fxs")
            .stdio_fixture("fxa")
            .upstream_extra("tenant = \"acme\"")
            .toml("[namespacing]\nprefix_mode = \"always\""),
    )
    .await;
    let admin = gw.client();
    let (_, me) = json_body(whoami(&gw, &admin).await).await;
    let admin_id = me["key_id"].as_str().expect("key_id").to_owned();
    let (op_key, _) = create_key(
        &gw,
        json!({"name": "acme-op", "role": "operator", "tenant": "acme"}),
    )
    .await;
    let op = gw.client_with_key(&op_key);
    let (status, op_me) = json_body(whoami(&gw, &op).await).await;
    assert_eq!(status, StatusCode::OK, "{op_me}");
    assert_eq!(op_me["tenant"], "acme", "{op_me}");
    let scopes = op_me["scopes"].as_array().expect("scopes");
    assert!(
        scopes.contains(&json!("admin")) && !scopes.contains(&json!("tenants:*")),
        "an operator holds `admin` but not `tenants:*`: {op_me}"
    );

    // A default-tenant session that has made a call.
    let raw = RawSession::initialize(&gw).await;
    let sid = raw.session.clone().expect("session id");
    let r = call_raw(&raw, "fxs__echo", json!({"message": "before"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "before", "{r}");
    let (status, seen) = gw.get_json(&format!("/mcp/health/client/{sid}")).await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(seen["tenant"], "default", "{seen}");
    let client_id = seen["client_id"].as_str().expect("client_id").to_owned();

    // Statistics and client health: the default session is not acme's.
    let (status, stats) = send(&op, Method::GET, &gw.url("/mcp/stats"), None).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["tenant"], "acme", "{stats}");
    assert_eq!(stats["connections"]["total"], 0, "{stats}");
    assert_eq!(
        stats["connections"]["by_transport"]["streamable_http"], 0,
        "{stats}"
    );
    assert_eq!(stats["requests"], 0, "{stats}");
    for id in [&sid, &client_id] {
        let path = format!("/mcp/health/client/{id}");
        refused(
            &format!("GET {path}"),
            NOT_FOUND,
            send(&op, Method::GET, &gw.url(&path), None).await,
        );
    }
    let (status, health) = send(&op, Method::GET, &gw.url("/health/gateway"), None).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["transports"]["streamable_http"], 0, "{health}");
    let names: Vec<&str> = health["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(names, ["fxa"], "acme GET /health/gateway: {health}");

    // Cleanup closes only acme's sessions: none.
    let cleaned = cleanup(&gw, &op, 0).await;
    assert_eq!(cleaned["sessions_closed"], 0, "{cleaned}");
    assert_eq!(cleaned["closed"], 0, "{cleaned}");
    let r = call_raw(&raw, "fxs__echo", json!({"message": "after"})).await;
    assert_eq!(
        r["result"]["content"][0]["text"], "after",
        "the default session after acme's cleanup: {r}"
    );

    // Gateway-wide switches need tenants:*.
    let (_, before) = gw.get_json("/admin/log-level").await;
    assert_ne!(before["level"], "debug", "{before}");
    refused(
        "POST /mcp/admin/reset",
        CROSS_TENANT,
        send(&op, Method::POST, &gw.url("/mcp/admin/reset"), None).await,
    );
    refused(
        "PUT /admin/log-level",
        CROSS_TENANT,
        send(
            &op,
            Method::PUT,
            &gw.url("/admin/log-level"),
            Some(json!({"level": "debug"})),
        )
        .await,
    );
    let (_, after) = gw.get_json("/admin/log-level").await;
    assert_eq!(after, before, "the refused change changed the level");

    // Rate limits: acme's own tenant only.
    let limit = Some(json!({"limit": 100, "period_secs": 60}));
    for (path, want) in [
        ("/admin/rate-limits/tenant:default".to_owned(), NOT_FOUND),
        (format!("/admin/rate-limits/key:{admin_id}"), NOT_FOUND),
        ("/admin/rate-limits/tool:anything".to_owned(), CROSS_TENANT),
    ] {
        refused(
            &format!("PUT {path}"),
            want,
            send(&op, Method::PUT, &gw.url(&path), limit.clone()).await,
        );
        let (status, state) = gw.get_json(&path).await;
        assert_eq!(status, StatusCode::OK, "admin GET {path}: {state}");
        assert_eq!(state["source"], "none", "the refused PUT {path}: {state}");
    }
    let (status, set) = send(
        &op,
        Method::PUT,
        &gw.url("/admin/rate-limits/tenant:acme"),
        limit,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "acme PUT tenant:acme: {set}");
    assert_eq!(set["source"], "override", "{set}");

    // Circuit breakers: acme's upstream only.
    let (status, breakers) = send(&op, Method::GET, &gw.url("/admin/circuit-breakers"), None).await;
    assert_eq!(status, StatusCode::OK, "{breakers}");
    assert_eq!(breaker_names(&breakers), ["fxa"], "{breakers}");
    refused(
        "POST /admin/circuit-breakers/fxs/reset",
        NOT_FOUND,
        send(
            &op,
            Method::POST,
            &gw.url("/admin/circuit-breakers/fxs/reset"),
            None,
        )
        .await,
    );
    let (status, reset) = send(
        &op,
        Method::POST,
        &gw.url("/admin/circuit-breakers/fxa/reset"),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "acme resets its own breaker: {reset}"
    );

    // An acme session: acme counts it, and only it.
    let acme = RawSession::initialize_as(&gw, &op_key).await;
    let r = call_raw(&acme, "fxa__echo", json!({"message": "acme"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "acme", "{r}");
    let (status, stats) = send(&op, Method::GET, &gw.url("/mcp/stats"), None).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["connections"]["total"], 1, "its own session: {stats}");

    // tenants:* still sees everything.
    let (status, stats) = gw.get_json("/mcp/stats").await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["connections"]["total"], 2, "both tenants: {stats}");
    assert!(stats["tenant"].is_null(), "{stats}");
    let (_, breakers) = gw.get_json("/admin/circuit-breakers").await;
    assert_eq!(breaker_names(&breakers), ["fxa", "fxs"], "{breakers}");
    let (status, reset) = send(&admin, Method::POST, &gw.url("/mcp/admin/reset"), None).await;
    assert_eq!(status, StatusCode::OK, "{reset}");
    assert_eq!(reset["breakers_reset"], 2, "{reset}");
}
