//! Dual-stack MCP: the gateway serves revision 2026-07-28 (stateless, every
//! request carrying its revision, client capabilities and client info in
//! `_meta`) beside the session-based revisions on the same `/mcp`, and
//! translates between a client's revision and each upstream's. Driven by the
//! rmcp client on 2026-07-28 and on 2025-11-25, by the Python SDK
//! (`fixtures/dual_stack_client.py`) in its `2026-07-28` and `legacy` modes,
//! and by plain HTTP, against fixture upstreams that serve either every
//! revision (`--versions all`) or only session-based ones (`--versions
//! 2025-06-18`, `--versions legacy`: up to 2025-11-25).

// Sampling, elicitation and logging are deprecated in 2026-07-28 but are
// what the translation between revisions is about.
#![allow(deprecated)]

use std::path::PathBuf;
use std::process::Stdio;

use rmcp::model::{LoggingLevel, ProtocolVersion, ServerNotification, SubscriptionFilter};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientLifecycleMode, ClientServiceExt, RoleClient};
use serde_json::{Value, json};

use crate::support::{
    ACCEPT_BOTH, Gateway, GatewayConfig, HttpFixture, RawSession, SAMPLED_TEXT, Seen, Session,
    SseReader, TestClient, WAIT, call_tool, connect, fixture_bin, python, text_of, tool_names,
};

/// The revision served per request.
const MODERN: &str = "2026-07-28";

/// The session-based revision the older upstreams serve (`--versions`).
const OLD: &str = "2025-06-18";

// ---------------------------------------------------------------------------
// Upstreams
// ---------------------------------------------------------------------------

/// `meshgate-fixture --mode basic --transport http --versions <versions>`,
/// killed on drop.
fn fixture(versions: &str) -> HttpFixture {
    HttpFixture::start_with(&["--versions", versions])
}

/// A gateway in front of fixture upstreams serving `versions`: `fx` over
/// HTTP and `fxs` over stdio.
struct Env {
    gw: Gateway,
    _fx: HttpFixture,
}

impl Env {
    async fn start(versions: &str) -> Env {
        Env::mixed(versions, versions).await
    }

    /// `fx` serving `http_versions`, `fxs` serving `stdio_versions`.
    async fn mixed(http_versions: &str, stdio_versions: &str) -> Env {
        let versions = stdio_versions;
        let fx = fixture(http_versions);
        let config = GatewayConfig::new()
            .http_upstream("fx", &fx.url)
            .stdio_upstream(
                "fxs",
                fixture_bin(),
                &[
                    "--mode",
                    "basic",
                    "--transport",
                    "stdio",
                    "--versions",
                    versions,
                ],
            );
        let gw = Gateway::start(&config).await;
        Env { gw, _fx: fx }
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A [`TestClient`] (it answers sampling and elicitation) on 2026-07-28: no
/// `initialize`, the revision and capabilities in every request's `_meta`.
async fn connect_modern(gw: &Gateway) -> (RunningService<RoleClient, TestClient>, TestClient) {
    let client = TestClient::new(ProtocolVersion::V_2026_07_28);
    let config =
        rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(
            gw.mcp_url(),
        )
        .auth_header(gw.admin_key.clone());
    let transport = StreamableHttpClientTransport::from_config(config);
    let lifecycle = ClientLifecycleMode::Discover {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
    };
    let session = tokio::time::timeout(
        WAIT,
        client.clone().serve_with_lifecycle(transport, lifecycle),
    )
    .await
    .expect("server/discover did not finish in time")
    .unwrap_or_else(|e| panic!("server/discover failed: {e}; gateway log:\n{}", gw.log()));
    (session, client)
}

/// The `_meta` a 2026-07-28 request carries, plus `extra`.
fn modern_meta(extra: Value) -> Value {
    let mut meta = json!({
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientInfo": {"name": "raw-2026", "version": "1.0.0"},
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    if let (Some(m), Value::Object(extra)) = (meta.as_object_mut(), extra) {
        m.extend(extra);
    }
    meta
}

/// POSTs a 2026-07-28 request (no session; `MCP-Protocol-Version`,
/// `Mcp-Method` and, for the methods that name something, `Mcp-Name`).
async fn post_modern(gw: &Gateway, id: i64, method: &str, mut params: Value) -> reqwest::Response {
    if params.get("_meta").is_none() {
        params["_meta"] = modern_meta(json!({}));
    }
    let name = params
        .get("name")
        .or_else(|| params.get("uri"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut b = gw
        .client()
        .post(gw.mcp_url())
        .header("accept", ACCEPT_BOTH)
        .header("content-type", "application/json")
        .header("mcp-protocol-version", MODERN)
        .header("mcp-method", method);
    if let Some(name) = name {
        b = b.header("mcp-name", name);
    }
    b.body(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string())
        .send()
        .await
        .expect("POST /mcp")
}

/// The JSON-RPC response to `id` and the notifications sent before it.
async fn answer_of(r: reqwest::Response, id: i64) -> (Value, Vec<Value>) {
    let is_sse = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if is_sse {
        SseReader::new(r).response_to(id).await
    } else {
        let text = r.text().await.expect("body");
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {text}"));
        (v, Vec::new())
    }
}

/// Runs `fixtures/dual_stack_client.py` against the gateway in `mode` for the
/// upstreams `prefixes`; its report.
async fn python_client(gw: &Gateway, mode: &str, prefixes: &[&str]) -> Value {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/fixtures/dual_stack_client.py");
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(&script)
        .arg(gw.mcp_url())
        .arg(mode)
        .args(prefixes)
        .env("MESHGATE_KEY", &gw.admin_key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("the Python client ({mode}) did not finish within 60 s"))
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client ({mode}) failed with {}:\nstdout:\n{stdout}\nstderr:\n{stderr}\ngateway log:\n{}",
        out.status,
        gw.log()
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("the Python client's report is not JSON ({e}): {stdout}\nstderr:\n{stderr}")
    })
}

/// The text of call `name` in a Python report, failing on an error.
fn python_text(report: &Value, name: &str) -> String {
    let call = &report["calls"][name];
    assert!(
        call.get("error").is_none() && call["is_error"] == false,
        "{name} failed: {call}\nreport: {report}"
    );
    call["text"].as_str().unwrap_or_default().to_owned()
}

/// A number the fixture's counter tools answer with.
fn count(text: &str) -> u64 {
    text.parse()
        .unwrap_or_else(|_| panic!("not a count: {text}"))
}

// ---------------------------------------------------------------------------
// Serving 2026-07-28 clients
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_client_on_2026_07_28_lists_and_calls_tools_of_legacy_upstreams() {
    let env = Env::start(OLD).await;
    let (session, _) = connect_modern(&env.gw).await;
    let info = session.peer_info().expect("server/discover answered");
    assert_eq!(info.protocol_version, ProtocolVersion::V_2026_07_28);

    let names = tool_names(&session).await;
    for expected in ["fx__echo", "fxs__echo", "meshgate_status"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    for prefix in ["fx", "fxs"] {
        let echo = call_tool(
            &session,
            &format!("{prefix}__echo"),
            json!({"message": "hi 2026"}),
        )
        .await;
        assert_eq!(text_of(&echo), "hi 2026");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_lists_both_eras_and_results_carry_result_type_complete() {
    let env = Env::start(OLD).await;

    let (discover, _) = answer_of(
        post_modern(&env.gw, 1, "server/discover", json!({})).await,
        1,
    )
    .await;
    let result = &discover["result"];
    assert_eq!(result["resultType"], "complete", "{discover}");
    let versions: Vec<&str> = result["supportedVersions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for v in [MODERN, "2025-11-25", "2025-06-18"] {
        assert!(versions.contains(&v), "{v} missing: {discover}");
    }
    assert!(result["capabilities"]["tools"].is_object(), "{discover}");

    let (list, _) = answer_of(post_modern(&env.gw, 2, "tools/list", json!({})).await, 2).await;
    assert_eq!(list["result"]["resultType"], "complete", "{list}");
    assert!(
        list["result"]["ttlMs"].is_number(),
        "cache hints on tools/list: {list}"
    );

    // A legacy upstream's result has no resultType; the gateway adds it.
    let (echo, _) = answer_of(
        post_modern(
            &env.gw,
            3,
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "typed"}}),
        )
        .await,
        3,
    )
    .await;
    assert_eq!(echo["result"]["resultType"], "complete", "{echo}");
    assert_eq!(echo["result"]["content"][0]["text"], "typed", "{echo}");

    let (fail, _) = answer_of(
        post_modern(
            &env.gw,
            4,
            "tools/call",
            json!({"name": "fxs__fail", "arguments": {"message": "nope"}}),
        )
        .await,
        4,
    )
    .await;
    assert_eq!(fail["result"]["resultType"], "complete", "{fail}");
    assert_eq!(fail["result"]["isError"], true, "{fail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_revision_is_400_with_unsupported_protocol_version_error() {
    let env = Env::start(OLD).await;
    let r = env
        .gw
        .client()
        .post(env.gw.mcp_url())
        .header("accept", ACCEPT_BOTH)
        .header("content-type", "application/json")
        .header("mcp-protocol-version", "1900-01-01")
        .header("mcp-method", "tools/list")
        .body(
            json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {"_meta": {
                "io.modelcontextprotocol/protocolVersion": "1900-01-01",
                "io.modelcontextprotocol/clientCapabilities": {}
            }}})
            .to_string(),
        )
        .send()
        .await
        .expect("POST /mcp");
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("JSON body");
    assert_eq!(body["error"]["code"], -32022, "{body}");
    assert_eq!(body["error"]["data"]["requested"], "1900-01-01", "{body}");
    let supported = body["error"]["data"]["supported"].to_string();
    for v in [MODERN, "2025-11-25", "2024-11-05"] {
        assert!(supported.contains(v), "{v} missing: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_headers_are_checked_against_the_body() {
    let env = Env::start(OLD).await;
    let r = env
        .gw
        .client()
        .post(env.gw.mcp_url())
        .header("accept", ACCEPT_BOTH)
        .header("content-type", "application/json")
        .header("mcp-protocol-version", MODERN)
        .header("mcp-method", "tools/call")
        .header("mcp-name", "fx__add")
        .body(
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
                "name": "fx__echo", "arguments": {"message": "x"}, "_meta": modern_meta(json!({}))
            }})
            .to_string(),
        )
        .send()
        .await
        .expect("POST /mcp");
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("JSON body");
    assert_eq!(body["error"]["code"], -32020, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_requests_share_upstream_connections_and_open_no_sessions() {
    let env = Env::start(OLD).await;
    let initializations = |v: Value| {
        count(
            v["result"]["content"][0]["text"]
                .as_str()
                .unwrap_or_default(),
        )
    };
    let call = |id: i64| {
        post_modern(
            &env.gw,
            id,
            "tools/call",
            json!({"name": "fx__initializations", "arguments": {}}),
        )
    };
    let (first, _) = answer_of(call(1).await, 1).await;
    let before = initializations(first);
    for id in 2..6 {
        let (echo, _) = answer_of(
            post_modern(
                &env.gw,
                id,
                "tools/call",
                json!({"name": "fx__echo", "arguments": {"message": "again"}}),
            )
            .await,
            id,
        )
        .await;
        assert_eq!(echo["result"]["content"][0]["text"], "again", "{echo}");
    }
    let (last, _) = answer_of(call(9).await, 9).await;
    assert_eq!(
        initializations(last),
        before,
        "2026-07-28 requests reuse the upstream's shared connection (no handshake per request)"
    );

    let (status, stats) = env.gw.get_json("/mcp/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(
        stats["connections"]["total"], 0,
        "stateless requests are not sessions: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_keys_of_meta_stay_at_the_gateway_and_trace_context_goes_upstream() {
    let env = Env::start(OLD).await;
    for (id, tool) in [(1, "fx__request_meta"), (2, "fxs__request_meta")] {
        let meta = modern_meta(json!({
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=1",
            "io.modelcontextprotocol/logLevel": "info",
        }));
        let (answer, _) = answer_of(
            post_modern(
                &env.gw,
                id,
                "tools/call",
                json!({"name": tool, "arguments": {}, "_meta": meta}),
            )
            .await,
            id,
        )
        .await;
        let text = answer["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default();
        let seen: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {answer}"));
        assert_eq!(
            seen["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "{tool}: {seen}"
        );
        assert_eq!(seen["tracestate"], "vendor=1", "{tool}: {seen}");
        assert!(
            seen.as_object()
                .is_some_and(|m| !m.keys().any(|k| k.starts_with("io.modelcontextprotocol/"))),
            "{tool}: a legacy upstream sees none of the client's protocol keys: {seen}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_messages_reach_a_2026_client_only_at_the_level_its_request_asks_for() {
    let env = Env::start(OLD).await;
    let log_call = |id: i64, level: &str, meta: Value| {
        post_modern(
            &env.gw,
            id,
            "tools/call",
            json!({"name": "fxs__log", "arguments": {"level": level, "message": format!("m{id}")}, "_meta": meta}),
        )
    };
    let logs = |notes: &[Value]| -> Vec<Value> {
        notes
            .iter()
            .filter(|n| n["method"] == "notifications/message")
            .cloned()
            .collect()
    };

    let (answer, notes) = answer_of(log_call(1, "warning", modern_meta(json!({}))).await, 1).await;
    assert_eq!(answer["result"]["content"][0]["text"], "logged", "{answer}");
    assert!(
        logs(&notes).is_empty(),
        "no logLevel, no log messages: {notes:?}"
    );

    let meta = modern_meta(json!({"io.modelcontextprotocol/logLevel": "info"}));
    let (_, notes) = answer_of(log_call(2, "warning", meta.clone()).await, 2).await;
    let got = logs(&notes);
    assert_eq!(got.len(), 1, "{notes:?}");
    assert_eq!(got[0]["params"]["data"], "m2");

    let (_, notes) = answer_of(log_call(3, "debug", meta).await, 3).await;
    assert!(logs(&notes).is_empty(), "below the asked level: {notes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_in_2026_and_legacy_modes_lists_and_calls_tools_of_older_upstreams() {
    let env = Env::start(OLD).await;
    for (mode, version) in [(MODERN, MODERN), ("legacy", "2025-11-25")] {
        let report = python_client(&env.gw, mode, &["fx", "fxs"]).await;
        assert_eq!(report["protocol_version"], version, "{report}");
        let tools = report["tools"].to_string();
        assert!(
            tools.contains("\"fx__echo\"") && tools.contains("\"fxs__echo\""),
            "{report}"
        );
        assert_eq!(
            python_text(&report, "fx__echo"),
            format!("hello fx from python {mode}")
        );
        assert_eq!(
            python_text(&report, "fxs__echo"),
            format!("hello fxs from python {mode}")
        );
        for prefix in ["fx", "fxs"] {
            assert_eq!(
                python_text(&report, &format!("{prefix}__elicit")),
                r#"elicited: accept {"name":"Ann"}"#,
                "{mode}: {report}"
            );
            assert_eq!(
                python_text(&report, &format!("{prefix}__sample")),
                format!("sampled: {SAMPLED_TEXT}"),
                "{mode}: {report}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 2026-07-28 clients, upstreams on older revisions: input requests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_2026_client_answers_elicitation_and_sampling_of_legacy_upstreams() {
    let env = Env::start(OLD).await;
    let report = python_client(&env.gw, MODERN, &["fx", "fxs"]).await;
    for prefix in ["fx", "fxs"] {
        let elicited = python_text(&report, &format!("{prefix}__elicit"));
        assert_eq!(elicited, r#"elicited: accept {"name":"Ann"}"#, "{report}");
        let sampled = python_text(&report, &format!("{prefix}__sample"));
        assert_eq!(sampled, format!("sampled: {SAMPLED_TEXT}"), "{report}");
    }
    let seen = report["seen"].to_string();
    assert!(
        seen.contains("Who are you (fx)?") && seen.contains("Who are you (fxs)?"),
        "{report}"
    );
    assert!(seen.contains("six times seven (fxs)?"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_2026_client_answers_elicitation_and_sampling_of_legacy_upstreams() {
    let env = Env::start(OLD).await;
    let (session, client) = connect_modern(&env.gw).await;
    assert_answers_elicitation_and_sampling(&session, &client, "Name?").await;
}

/// `session` (whose handlers are `client`'s) calls `elicit` with `question`
/// and `sample` of both upstreams; each is answered by the client once.
async fn assert_answers_elicitation_and_sampling(
    session: &Session,
    client: &TestClient,
    question: &str,
) {
    for prefix in ["fx", "fxs"] {
        let elicited = call_tool(
            session,
            &format!("{prefix}__elicit"),
            json!({"message": question}),
        )
        .await;
        assert_eq!(text_of(&elicited), r#"elicited: accept {"name":"Ann"}"#);
        let sampled = call_tool(
            session,
            &format!("{prefix}__sample"),
            json!({"prompt": "6x7?"}),
        )
        .await;
        assert_eq!(text_of(&sampled), format!("sampled: {SAMPLED_TEXT}"));
    }
    let seen = client.seen();
    assert_eq!(
        seen.iter()
            .filter(|s| matches!(s, Seen::Elicitation(m) if m == question))
            .count(),
        2,
        "{seen:#?}"
    );
    assert_eq!(
        seen.iter()
            .filter(|s| matches!(s, Seen::Sampling(_)))
            .count(),
        2,
        "{seen:#?}"
    );
}

/// `tools/call` of `fx__elicit` by a 2026-07-28 client declaring `caps`,
/// with `extra` parameters (a retry's `requestState` and `inputResponses`).
async fn elicit_modern(gw: &Gateway, id: i64, tool: &str, caps: Value, extra: Value) -> Value {
    let mut params = json!({
        "name": tool,
        "arguments": {"message": "Who?"},
        "_meta": modern_meta(json!({"io.modelcontextprotocol/clientCapabilities": caps})),
    });
    if let (Some(p), Value::Object(extra)) = (params.as_object_mut(), extra) {
        p.extend(extra);
    }
    answer_of(post_modern(gw, id, "tools/call", params).await, id)
        .await
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_elicitation_becomes_input_required_with_a_sealed_request_state() {
    let env = Env::start(OLD).await;
    let caps = json!({"elicitation": {}});
    let first = elicit_modern(&env.gw, 1, "fx__elicit", caps.clone(), json!({})).await;
    let result = &first["result"];
    assert_eq!(result["resultType"], "input_required", "{first}");
    let ask = &result["inputRequests"]["elicitation"];
    assert_eq!(ask["method"], "elicitation/create", "{first}");
    assert_eq!(ask["params"]["message"], "Who?", "{first}");
    let state = result["requestState"]
        .as_str()
        .expect("a requestState")
        .to_owned();

    // Tampered, or presented for another tool: refused, and the call still waits.
    let mut tampered = state.clone();
    tampered.pop();
    tampered.push(if state.ends_with('0') { '1' } else { '0' });
    let answer = json!({"elicitation": {"action": "accept", "content": {"name": "Eve"}}});
    for (id, tool, state) in [(2, "fx__elicit", &tampered), (3, "fxs__elicit", &state)] {
        let refused = elicit_modern(
            &env.gw,
            id,
            tool,
            caps.clone(),
            json!({"requestState": state, "inputResponses": answer}),
        )
        .await;
        assert_eq!(refused["error"]["code"], -32602, "{refused}");
        assert!(
            refused["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("requestState"),
            "{refused}"
        );
    }

    // A retry without the answer is asked again.
    let again = elicit_modern(
        &env.gw,
        4,
        "fx__elicit",
        caps.clone(),
        json!({"requestState": state}),
    )
    .await;
    assert_eq!(again["result"]["resultType"], "input_required", "{again}");
    let state = again["result"]["requestState"]
        .as_str()
        .expect("a new requestState")
        .to_owned();

    let answer = json!({"elicitation": {"action": "accept", "content": {"name": "Bo"}}});
    let done = elicit_modern(
        &env.gw,
        5,
        "fx__elicit",
        caps.clone(),
        json!({"requestState": state, "inputResponses": answer}),
    )
    .await;
    assert_eq!(done["result"]["resultType"], "complete", "{done}");
    assert_eq!(
        done["result"]["content"][0]["text"], r#"elicited: accept {"name":"Bo"}"#,
        "{done}"
    );

    // Used once: the same state again names a call that no longer waits.
    let replay = elicit_modern(
        &env.gw,
        6,
        "fx__elicit",
        caps,
        json!({"requestState": state, "inputResponses": answer}),
    )
    .await;
    assert_eq!(replay["error"]["code"], -32602, "{replay}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elicitation_for_a_client_without_the_capability_is_a_missing_capability_error() {
    let env = Env::start(OLD).await;
    let refused = elicit_modern(&env.gw, 1, "fxs__elicit", json!({}), json!({})).await;
    assert_eq!(refused["error"]["code"], -32021, "{refused}");
    assert_eq!(
        refused["error"]["data"]["requiredCapabilities"]["elicitation"],
        json!({}),
        "{refused}"
    );
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    for needed in [
        "elicitation/create",
        "fxs",
        "2026-07-28",
        "2025-11-25",
        "elicitation",
    ] {
        assert!(message.contains(needed), "{needed} not named: {refused}");
    }
    // The upstream got an error for its request, so the process is free again.
    let echo = elicit_modern(
        &env.gw,
        2,
        "fxs__echo",
        json!({}),
        json!({"arguments": {"message": "free"}}),
    )
    .await;
    assert_eq!(echo["result"]["content"][0]["text"], "free", "{echo}");
}

// ---------------------------------------------------------------------------
// Upstreams on 2026-07-28
// ---------------------------------------------------------------------------

/// The revision the gateway speaks with each upstream, from `meshgate_status`.
async fn upstream_revisions(gw: &Gateway) -> Value {
    let (session, _) = connect(gw).await;
    let status = call_tool(&session, "meshgate_status", json!({})).await;
    let report = status.structured_content.expect("structured status");
    let mut revisions = serde_json::Map::new();
    for up in report["upstreams"].as_array().into_iter().flatten() {
        let name = up["name"].as_str().unwrap_or_default().to_owned();
        revisions.insert(name, up["revision"].clone());
    }
    Value::Object(revisions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_is_spoken_to_in_the_newest_revision_it_serves() {
    let env = Env::mixed("all", OLD).await;
    assert_eq!(
        upstream_revisions(&env.gw).await,
        json!({"fx": MODERN, "fxs": OLD})
    );
    let env = Env::mixed("legacy", "all").await;
    assert_eq!(
        upstream_revisions(&env.gw).await,
        json!({"fx": "2025-11-25", "fxs": MODERN})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_client_answers_input_requests_of_2026_upstreams_as_server_requests() {
    let env = Env::start("all").await;
    assert_session_client_answers_elicitation_and_sampling(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_client_answers_elicitation_and_sampling_of_older_upstreams() {
    let env = Env::start(OLD).await;
    assert_session_client_answers_elicitation_and_sampling(&env).await;
}

/// An rmcp session client (2025-11-25) calls `elicit` and `sample` of both
/// upstreams; its handlers answer them.
async fn assert_session_client_answers_elicitation_and_sampling(env: &Env) {
    let (session, client) = connect(&env.gw).await;
    assert_answers_elicitation_and_sampling(&session, &client, "Who?").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_log_level_reaches_2026_upstreams_with_each_request() {
    let env = Env::start("all").await;
    let (session, client) = connect(&env.gw).await;
    session
        .peer()
        .set_level(rmcp::model::SetLevelRequestParams::new(LoggingLevel::Error))
        .await
        .expect("logging/setLevel");
    for (level, message) in [("warning", "quiet"), ("error", "loud")] {
        let logged = call_tool(
            &session,
            "fxs__log",
            json!({"level": level, "message": message}),
        )
        .await;
        assert_eq!(text_of(&logged), "logged");
    }
    let log = client
        .wait_for("the error-level log message", |seen| {
            seen.iter().find_map(|s| match s {
                Seen::Log(l) => Some(l.clone()),
                _ => None,
            })
        })
        .await;
    assert_eq!(log.data, json!("loud"));
    let logs = client
        .seen()
        .into_iter()
        .filter(|s| matches!(s, Seen::Log(_)))
        .count();
    assert_eq!(
        logs,
        1,
        "the warning stays below the session's level: {:#?}",
        client.seen()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_in_both_modes_answers_input_requests_of_2026_upstreams() {
    let env = Env::start("all").await;
    for mode in [MODERN, "legacy"] {
        let report = python_client(&env.gw, mode, &["fx", "fxs"]).await;
        for prefix in ["fx", "fxs"] {
            assert_eq!(
                python_text(&report, &format!("{prefix}__echo")),
                format!("hello {prefix} from python {mode}")
            );
            assert_eq!(
                python_text(&report, &format!("{prefix}__elicit")),
                r#"elicited: accept {"name":"Ann"}"#,
                "{mode}: {report}"
            );
            assert_eq!(
                python_text(&report, &format!("{prefix}__sample")),
                format!("sampled: {SAMPLED_TEXT}"),
                "{mode}: {report}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_requests_of_a_2026_upstream_pass_to_a_2026_client_with_the_state_wrapped() {
    let env = Env::start("all").await;
    let caps = json!({"elicitation": {}});
    let first = elicit_modern(&env.gw, 1, "fx__elicit", caps.clone(), json!({})).await;
    let result = &first["result"];
    assert_eq!(result["resultType"], "input_required", "{first}");
    assert_eq!(
        result["inputRequests"]["answer"]["params"]["message"], "Who?",
        "the upstream's own key and request: {first}"
    );
    let state = result["requestState"]
        .as_str()
        .expect("a requestState")
        .to_owned();
    assert!(
        state.ends_with("fixture:elicit") && state != "fixture:elicit",
        "{first}"
    );

    let done = elicit_modern(
        &env.gw,
        2,
        "fx__elicit",
        caps,
        json!({"requestState": state, "inputResponses": {"answer": {"action": "accept", "content": {"name": "Cy"}}}}),
    )
    .await;
    assert_eq!(
        done["result"]["content"][0]["text"], r#"elicited: accept {"name":"Cy"}"#,
        "{done}"
    );

    let refused = elicit_modern(&env.gw, 3, "fxs__elicit", json!({}), json!({})).await;
    assert_eq!(refused["error"]["code"], -32021, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("fxs") && message.contains("elicitation"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_2026_client_answers_input_requests_of_2026_upstreams() {
    let env = Env::start("all").await;
    let (session, client) = connect_modern(&env.gw).await;
    for prefix in ["fx", "fxs"] {
        let elicited = call_tool(
            &session,
            &format!("{prefix}__elicit"),
            json!({"message": "Name?"}),
        )
        .await;
        assert_eq!(text_of(&elicited), r#"elicited: accept {"name":"Ann"}"#);
        let sampled = call_tool(
            &session,
            &format!("{prefix}__sample"),
            json!({"prompt": "6x7?"}),
        )
        .await;
        assert_eq!(text_of(&sampled), format!("sampled: {SAMPLED_TEXT}"));
    }
    assert_eq!(
        client
            .seen()
            .iter()
            .filter(|s| matches!(s, Seen::Elicitation(_)))
            .count(),
        2
    );
}

// ---------------------------------------------------------------------------
// Change notifications: subscriptions/listen
// ---------------------------------------------------------------------------

/// The next notification of a listen stream, within [`WAIT`].
async fn next_notification(
    sub: &mut rmcp::service::Subscription,
    what: &str,
) -> ServerNotification {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what} on the listen stream"))
        .unwrap_or_else(|e| panic!("the listen stream failed while waiting for {what}: {e}"))
        .unwrap_or_else(|| panic!("the listen stream ended while waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_stream_announces_tool_list_changes_of_upstreams_of_both_eras() {
    let env = Env::mixed("all", OLD).await;
    let (session, _) = connect_modern(&env.gw).await;
    let mut sub = session
        .peer()
        .listen(SubscriptionFilter::builder().tools_list_changed().build())
        .await
        .expect("subscriptions/listen");
    assert_eq!(sub.acknowledged().tools_list_changed, Some(true));

    for (prefix, tool) in [("fx", "made_modern"), ("fxs", "made_legacy")] {
        let added = call_tool(
            &session,
            &format!("{prefix}__add_tool"),
            json!({"name": tool}),
        )
        .await;
        assert_eq!(text_of(&added), "added");
        let n = next_notification(&mut sub, &format!("the tool-list change of {prefix}")).await;
        assert!(
            matches!(n, ServerNotification::ToolListChangedNotification(_)),
            "{n:?}"
        );
        let names = tool_names(&session).await;
        let exposed = format!("{prefix}__{tool}");
        assert!(names.contains(&exposed), "{exposed} missing: {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_stream_delivers_updates_of_the_resources_it_names() {
    let env = Env::mixed("all", OLD).await;
    let (session, _) = connect_modern(&env.gw).await;
    let uris = ["fx+fixture://greeting", "fxs+fixture://greeting"];
    let mut sub = session
        .peer()
        .listen(
            SubscriptionFilter::builder()
                .resource_subscriptions(uris.iter().map(|u| u.to_string()))
                .build(),
        )
        .await
        .expect("subscriptions/listen");
    let mut updated = Vec::new();
    while updated.len() < 2 {
        match next_notification(&mut sub, "the resource updates").await {
            ServerNotification::ResourceUpdatedNotification(u) => updated.push(u.params.uri),
            other => panic!("only resource updates were asked for: {other:?}"),
        }
    }
    updated.sort();
    assert_eq!(updated, uris);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_subscription_to_a_resource_of_a_2026_upstream_gets_its_updates() {
    let env = Env::start("all").await;
    let raw = RawSession::initialize(&env.gw).await;
    let stream = raw
        .http
        .get(&raw.url)
        .header("accept", "text/event-stream")
        .header(
            "mcp-session-id",
            raw.session.as_deref().expect("session id"),
        )
        .header("mcp-protocol-version", "2025-11-25")
        .send()
        .await
        .expect("GET /mcp");
    assert_eq!(stream.status(), 200);
    let mut events = SseReader::new(stream);
    let subscribed = raw
        .request(
            "resources/subscribe",
            json!({"uri": "fxs+fixture://greeting"}),
        )
        .await;
    assert!(subscribed.get("result").is_some(), "{subscribed}");
    loop {
        let (_, message) = events.next_message("notifications/resources/updated").await;
        if message["method"] == "notifications/resources/updated" {
            assert_eq!(
                message["params"]["uri"], "fxs+fixture://greeting",
                "{message}"
            );
            break;
        }
    }
    let unsubscribed = raw
        .request(
            "resources/unsubscribe",
            json!({"uri": "fxs+fixture://greeting"}),
        )
        .await;
    assert!(unsubscribed.get("result").is_some(), "{unsubscribed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn param_headers_are_checked_against_the_tool_schema_from_the_catalog() {
    let env = Env::mixed("all", OLD).await;
    let call = |id: i64, tool: &str, region: Option<&str>| {
        let mut b = env
            .gw
            .client()
            .post(env.gw.mcp_url())
            .header("accept", ACCEPT_BOTH)
            .header("content-type", "application/json")
            .header("mcp-protocol-version", MODERN)
            .header("mcp-method", "tools/call")
            .header("mcp-name", tool);
        if let Some(region) = region {
            b = b.header("mcp-param-region", region);
        }
        b.body(
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
                "name": tool,
                "arguments": {"region": "eu-west", "message": "hi"},
                "_meta": modern_meta(json!({})),
            }})
            .to_string(),
        )
        .send()
    };
    for (id, tool) in [(1, "fx__region_echo"), (3, "fxs__region_echo")] {
        let missing = call(id, tool, None).await.expect("POST /mcp");
        assert_eq!(missing.status(), 400, "{tool}");
        let body: Value = missing.json().await.expect("JSON body");
        assert_eq!(body["error"]["code"], -32020, "{tool}: {body}");

        // With the header the call goes through, to the 2026-07-28 upstream
        // with the header the gateway's own client mirrors.
        let (ok, _) = answer_of(
            call(id + 1, tool, Some("eu-west"))
                .await
                .expect("POST /mcp"),
            id + 1,
        )
        .await;
        assert_eq!(
            ok["result"]["content"][0]["text"], "eu-west: hi",
            "{tool}: {ok}"
        );
    }
}
