//! Malformed or unacceptable requests get the right HTTP status and a JSON-RPC
//! error that names the problem, and the gateway keeps serving afterwards.

use serde_json::{Value, json};

use crate::support::{ACCEPT_BOTH, Env, Gateway, RawSession, json_body};

/// A normal initialize + call still works.
async fn assert_still_serves(gw: &Gateway) {
    let raw = RawSession::initialize(gw).await;
    let answer = raw
        .request(
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "still here"}}),
        )
        .await;
    assert_eq!(
        answer["result"]["content"][0]["text"], "still here",
        "the gateway stopped serving: {answer}"
    );
}

/// POSTs `body` to `/mcp` with the usual headers and `session` when given.
async fn post_raw(gw: &Gateway, session: Option<&str>, body: &str) -> reqwest::Response {
    let mut raw = RawSession::new(gw);
    raw.session = session.map(str::to_owned);
    raw.post_builder()
        .body(body.to_owned())
        .send()
        .await
        .expect("POST /mcp")
}

fn error_of(body: &Value) -> (i64, &str) {
    (
        body["error"]["code"].as_i64().unwrap_or_default(),
        body["error"]["message"].as_str().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400_parse_error() {
    let env = Env::start().await;
    let r = post_raw(&env.gw, None, r#"{"jsonrpc": "2.0", "id": 1, "method": "#).await;
    let (status, body) = json_body(r).await;
    assert_eq!(status, 400);
    let (code, message) = error_of(&body);
    assert_eq!(code, -32700, "{body}");
    assert!(message.contains("not valid JSON"), "{body}");
    assert_still_serves(&env.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_jsonrpc_version_is_400_invalid_request_naming_2_0() {
    let env = Env::start().await;
    let r = post_raw(
        &env.gw,
        None,
        r#"{"jsonrpc": "1.0", "id": 5, "method": "ping"}"#,
    )
    .await;
    let (status, body) = json_body(r).await;
    assert_eq!(status, 400);
    let (code, message) = error_of(&body);
    assert_eq!(code, -32600, "{body}");
    assert!(
        message.contains("\"2.0\"") && message.contains("1.0"),
        "{body}"
    );
    assert_eq!(
        body["id"], 5,
        "the error is correlated with the request: {body}"
    );
    assert_still_serves(&env.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_method_is_method_not_found_naming_it() {
    let env = Env::start().await;
    let raw = RawSession::initialize(&env.gw).await;
    let answer = raw.request("tools/frobnicate", json!({})).await;
    let (code, message) = error_of(&answer);
    assert_eq!(code, -32601, "{answer}");
    assert!(message.contains("tools/frobnicate"), "{answer}");
    assert_still_serves(&env.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tool_is_invalid_params_naming_it() {
    let env = Env::start().await;
    let raw = RawSession::initialize(&env.gw).await;
    let answer = raw
        .request(
            "tools/call",
            json!({"name": "fx__no_such_tool", "arguments": {}}),
        )
        .await;
    let (code, message) = error_of(&answer);
    assert_eq!(code, -32602, "{answer}");
    assert!(message.contains("fx__no_such_tool"), "{answer}");
    assert!(
        message.contains("tools/list"),
        "the message says where to look: {answer}"
    );
    assert_still_serves(&env.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_without_session_id_is_400_naming_the_header() {
    let env = Env::start().await;
    let r = post_raw(
        &env.gw,
        None,
        r#"{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}"#,
    )
    .await;
    let (status, body) = json_body(r).await;
    assert_eq!(status, 400);
    let (_, message) = error_of(&body);
    assert!(message.contains("Mcp-Session-Id"), "{body}");
    assert!(message.contains("initialize"), "{body}");
    assert_still_serves(&env.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_with_unknown_session_id_is_404() {
    let env = Env::start().await;
    let r = post_raw(
        &env.gw,
        Some("not-a-session"),
        r#"{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}"#,
    )
    .await;
    let (status, body) = json_body(r).await;
    assert_eq!(status, 404);
    let (_, message) = error_of(&body);
    assert!(
        message.contains("not a session id issued by this gateway")
            && message.contains("initialize"),
        "{body}"
    );
    assert_still_serves(&env.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_version_header_is_400_listing_supported_versions() {
    let env = Env::start().await;
    let raw = RawSession::initialize(&env.gw).await;
    let r = raw
        .http
        .post(&raw.url)
        .header("accept", ACCEPT_BOTH)
        .header("content-type", "application/json")
        .header(
            "mcp-session-id",
            raw.session.as_deref().expect("session id"),
        )
        .header("mcp-protocol-version", "1999-01-01")
        .body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string())
        .send()
        .await
        .expect("POST /mcp");
    let (status, body) = json_body(r).await;
    assert_eq!(status, 400);
    let (_, message) = error_of(&body);
    assert!(message.contains("1999-01-01"), "{body}");
    for supported in ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"] {
        assert!(
            message.contains(supported),
            "{supported} not listed: {body}"
        );
    }
    assert_still_serves(&env.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_configured_limit_is_413_naming_the_limit() {
    let env = Env::start_with(|c| c.max_request_body_bytes(2048)).await;
    let raw = RawSession::initialize(&env.gw).await;
    let big = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "fx__echo", "arguments": {"message": "x".repeat(4096)}}
    });
    let r = raw.post(&big).await;
    let (status, body) = json_body(r).await;
    assert_eq!(status, 413);
    let (_, message) = error_of(&body);
    assert!(
        message.contains("2048") && message.contains("max_request_body_bytes"),
        "{body}"
    );
    assert_still_serves(&env.gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_is_400_saying_batches_are_not_supported() {
    let env = Env::start().await;
    let r = post_raw(
        &env.gw,
        None,
        r#"[{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "ping"}]"#,
    )
    .await;
    let (status, body) = json_body(r).await;
    assert_eq!(status, 400);
    let (code, message) = error_of(&body);
    assert_eq!(code, -32600, "{body}");
    assert!(message.contains("batches"), "{body}");
    assert_still_serves(&env.gw).await;
}
