//! Tool calls are checked against the tools' schemas: arguments that break
//! the `inputSchema` are refused at the gateway with every violation named
//! (and never reach the upstream), unless `tools.validate_arguments` is off;
//! a structured result that breaks the `outputSchema` is counted and logged
//! but still handed to the client.

use rmcp::ServiceError;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use serde_json::{Value, json};

use crate::support::{
    Gateway, GatewayConfig, HttpFixture, Session, call, call_tool, connect, metric_value, text_of,
};

/// The fixture's tool with a rich schema, as the gateway exposes it.
const TYPED: &str = "fx__typed";

async fn gateway(fx: &HttpFixture, tools: &str) -> Gateway {
    // Prefixed although alone, so the exposed name differs from the
    // upstream's (the schema is found by the exposed one).
    let mut config = GatewayConfig::new()
        .http_upstream("fx", &fx.url)
        .toml("[namespacing]\nprefix_mode = \"always\"");
    if !tools.is_empty() {
        config = config.toml(&format!("[tools]\n{tools}"));
    }
    Gateway::start(&config).await
}

/// The JSON-RPC error a call got back.
async fn refusal(session: &Session, request: CallToolRequestParams) -> rmcp::ErrorData {
    match session.call_tool(request).await {
        Err(ServiceError::McpError(e)) => e,
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    }
}

/// A violation as `(pointer, expected, actual)`.
type Triple = (String, String, String);

/// The `(pointer, expected, actual)` of each violation in an error's data.
fn violations(e: &rmcp::ErrorData) -> Vec<Triple> {
    let data = e.data.as_ref().expect("the error has data");
    assert_eq!(data["tool"], TYPED, "{data}");
    data["violations"]
        .as_array()
        .unwrap_or_else(|| panic!("data.violations is an array: {data}"))
        .iter()
        .map(|v| {
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            assert!(!field("message").is_empty(), "{v}");
            (field("pointer"), field("expected"), field("actual"))
        })
        .collect()
}

fn sorted(mut v: Vec<Triple>) -> Vec<Triple> {
    v.sort();
    v
}

fn triple(pointer: &str, expected: &str, actual: &str) -> Triple {
    (pointer.into(), expected.into(), actual.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_refused_with_every_violation_and_never_reach_the_upstream() {
    let fx = HttpFixture::start();
    let gw = gateway(&fx, "").await;
    let (session, _) = connect(&gw).await;

    // Each case: the call, phrases its message must hold, and its
    // violations as (pointer, expected, actual), sorted.
    let cases: Vec<(CallToolRequestParams, Vec<&str>, Vec<Triple>)> = vec![
        (
            call(TYPED, json!({"name": "ann", "count": "3"})),
            vec!["/count: expected integer, got string \"3\""],
            vec![triple("/count", "integer", "string \"3\"")],
        ),
        (
            call(TYPED, json!({"count": 3})),
            vec!["/ (root): missing required property \"name\""],
            vec![triple("", "required property \"name\"", "missing")],
        ),
        (
            call(
                TYPED,
                json!({"name": "ann", "count": 3, "tags": ["a", "b", 7]}),
            ),
            vec!["/tags/2: expected string, got number 7"],
            vec![triple("/tags/2", "string", "number 7")],
        ),
        (
            call(
                TYPED,
                json!({"name": "Ann", "count": 0, "mode": "slow", "extra": true}),
            ),
            vec![
                "4 violations",
                "/name: expected a string matching the pattern \"^[a-z]+$\", got string \"Ann\"",
                "/count: expected a number >= 1, got number 0",
                "/mode: expected one of [\"fast\",\"safe\"], got string \"slow\"",
                "/extra: unexpected property \"extra\"",
            ],
            vec![
                triple("/count", "a number >= 1", "number 0"),
                triple(
                    "/extra",
                    "no such property (the schema allows no other properties)",
                    "boolean true",
                ),
                triple("/mode", "one of [\"fast\",\"safe\"]", "string \"slow\""),
                triple(
                    "/name",
                    "a string matching the pattern \"^[a-z]+$\"",
                    "string \"Ann\"",
                ),
            ],
        ),
        (
            // No `arguments` at all: checked as `{}`.
            CallToolRequestParams::new(TYPED),
            vec![
                "missing required property \"name\"",
                "missing required property \"count\"",
            ],
            vec![
                triple("", "required property \"count\"", "missing"),
                triple("", "required property \"name\"", "missing"),
            ],
        ),
    ];
    let refusals = cases.len();
    for (request, phrases, expected) in cases {
        let what = format!("{:?}", request.arguments);
        let e = refusal(&session, request).await;
        assert_eq!(e.code.0, -32602, "{what}: {e:?}");
        for phrase in phrases.iter().chain(&[TYPED, "inputSchema", "tools/list"]) {
            assert!(
                e.message.contains(phrase),
                "{what}: `{phrase}` is not in the message: {}",
                e.message
            );
        }
        assert_eq!(sorted(violations(&e)), expected, "{what}: {}", e.message);
    }

    // The fixture counts every `typed` call it receives, valid or not: the
    // first call to reach it is this one.
    let ok = call_tool(&session, TYPED, json!({"name": "ann", "count": 3})).await;
    assert!(
        text_of(&ok).starts_with("typed call #1:"),
        "a refused call reached the upstream: {}",
        text_of(&ok)
    );

    let (_, metrics) = gw.get_text("/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            &format!("gateway_tool_argument_violations_total{{tool=\"{TYPED}\"}}")
        ),
        Some(refusals as f64),
        "{metrics}"
    );
    let _ = session.cancel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_validation_off_bad_arguments_and_results_pass_unchecked() {
    let fx = HttpFixture::start();
    let gw = gateway(
        &fx,
        "validate_arguments = false\ncheck_output_schema = false",
    )
    .await;
    let (session, _) = connect(&gw).await;

    let passed = call_tool(&session, TYPED, json!({"count": "3", "break_output": true})).await;
    assert!(
        text_of(&passed).starts_with("typed call #1:")
            && text_of(&passed).contains("\"count\":\"3\""),
        "the upstream answers the bad call itself: {}",
        text_of(&passed)
    );

    let (_, metrics) = gw.get_text("/metrics").await;
    for name in [
        "gateway_tool_argument_violations_total",
        "gateway_tool_output_schema_mismatches_total",
    ] {
        assert!(
            !metrics.contains(name),
            "{name} counted while off:\n{metrics}"
        );
    }
    let _ = session.cancel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_breaking_the_output_schema_is_counted_and_still_delivered() {
    let fx = HttpFixture::start();
    let gw = gateway(&fx, "").await;
    let (session, _) = connect(&gw).await;
    let series = format!("gateway_tool_output_schema_mismatches_total{{tool=\"{TYPED}\"}}");

    let fine: CallToolResult = call_tool(&session, TYPED, json!({"name": "ann", "count": 1})).await;
    assert_eq!(
        fine.structured_content,
        Some(json!({"calls": 1, "name": "ann"}))
    );
    let (_, metrics) = gw.get_text("/metrics").await;
    assert_eq!(metric_value(&metrics, &series), None, "{metrics}");

    let broken = call_tool(
        &session,
        TYPED,
        json!({"name": "ann", "count": 1, "break_output": true}),
    )
    .await;
    assert_eq!(
        broken.structured_content,
        Some(json!({"calls": "2", "name": "ann"})),
        "the result is passed on unchanged"
    );
    assert_ne!(broken.is_error, Some(true));

    let (_, metrics) = gw.get_text("/metrics").await;
    assert_eq!(metric_value(&metrics, &series), Some(1.0), "{metrics}");
    let log = gw.log();
    let warning = log
        .lines()
        .find(|l| l.contains("outputSchema") && l.contains(TYPED))
        .unwrap_or_else(|| panic!("no warning about the mismatch in the log:\n{log}"));
    assert!(
        warning.contains("/calls: expected integer, got string \\\"2\\\""),
        "the warning names the violation: {warning}"
    );
    let parsed: Value = serde_json::from_str(warning).expect("a JSON log line");
    assert_eq!(parsed["level"], "WARN", "{warning}");
    let _ = session.cancel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_of_the_official_server_everything_are_enforced() {
    let entry = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools/node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    assert!(
        entry.is_file(),
        "{} is missing; install the test tools with `npm ci --prefix tools`",
        entry.display()
    );
    let gw = Gateway::start(&GatewayConfig::new().stdio_upstream(
        "everything",
        std::path::Path::new("node"),
        &[entry.to_str().expect("a UTF-8 path"), "stdio"],
    ))
    .await;
    let (session, _) = connect(&gw).await;

    let e = refusal(&session, call("echo", json!({"message": 5}))).await;
    assert_eq!(e.code.0, -32602, "{e:?}");
    assert!(
        e.message
            .contains("/message: expected string, got number 5"),
        "{}",
        e.message
    );
    let echo = call_tool(&session, "echo", json!({"message": "fine"})).await;
    assert_eq!(text_of(&echo), "Echo: fine");
    assert!(
        !gw.log().contains("does not compile"),
        "a schema of server-everything did not compile:\n{}",
        gw.log()
    );
    let _ = session.cancel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_entry_of_a_refused_call_names_the_places_but_no_argument_value() {
    let fx = HttpFixture::start();
    let gw = gateway(&fx, "").await;
    let (session, _) = connect(&gw).await;
    let secret = "do-not-audit-7f3a9c";

    let e = refusal(
        &session,
        call(TYPED, json!({"name": "ann", "count": secret})),
    )
    .await;
    assert!(
        e.message.contains(secret),
        "the caller is told what was wrong: {}",
        e.message
    );

    // The audit queue is written in batches: wait for the entry.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let entry = loop {
        let (status, audit) = gw
            .get_json("/api/v1/audit?action=tool.call&outcome=error")
            .await;
        assert!(status.is_success(), "{status}: {audit}");
        if let Some(entry) = audit["entries"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["target"] == TYPED))
        {
            break entry.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit entry for the refused call: {audit}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let recorded = entry.to_string();
    assert!(
        !recorded.contains(secret),
        "an argument value reached the audit log: {recorded}"
    );
    assert!(
        recorded.contains("invalid arguments: 1 violation at /count"),
        "the entry says what was wrong and where: {recorded}"
    );
    let _ = session.cancel().await;
}
