//! The example `meshgate-agent` binary against the fake gateway.

use std::process::Stdio;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::fake_gateway::{FakeDoc, FakeGateway, GatewayConn, WAIT};

fn agent_command(url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshgate-agent"));
    command
        .args(["--url", url, "--id", "bin-1"])
        .args(["--capability", "code=0.8", "--capability", "lang:rust"])
        .args(["--reconnect-initial-ms", "10", "--reconnect-max-ms", "50"])
        .env("MESHGATE_AGENT_KEY", "mg_bin_key")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn next_event(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("no event line in time")
        .expect("read stdout")
        .expect("stdout ended");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
}

/// The next event line whose `event` is `name`, skipping others.
async fn event_named(lines: &mut Lines<BufReader<ChildStdout>>, name: &str) -> Value {
    loop {
        let event = next_event(lines).await;
        if event["event"] == name {
            return event;
        }
    }
}

#[tokio::test]
async fn example_agent_follows_payload_instructions_and_stops_on_sigterm() {
    let gateway = FakeGateway::start().await;
    let mut child = agent_command(&gateway.url).spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let mut conn = gateway.accept().await;
    assert_eq!(conn.headers["authorization"], "Bearer mg_bin_key");
    assert_eq!(conn.headers["x-agent-type"], "generic");
    let params = conn.register(json!([])).await;
    assert_eq!(params["name"], "bin-1");
    assert_eq!(params["max_concurrent_tasks"], 4);
    assert_eq!(
        params["capabilities"],
        json!([{"name": "code", "confidence": 0.8}, "lang:rust"])
    );
    let registered = event_named(&mut lines, "registered").await;
    assert_eq!(registered["session_id"], "as-test");

    let payload = json!({"sleep_ms": 40, "progress_steps": 2, "result_bytes": 5});
    conn.assign_accepted("t-work", payload.clone()).await;
    assert_eq!(
        event_named(&mut lines, "assigned").await["task_id"],
        "t-work"
    );
    for (fraction, message) in [(0.5, "step 1 of 2"), (1.0, "step 2 of 2")] {
        let progress = conn.expect_and_answer("task.progress", json!({})).await;
        assert_eq!(
            progress,
            json!({"task_id": "t-work", "progress": fraction, "message": message})
        );
    }
    let complete = conn.expect_and_answer("task.complete", json!({})).await;
    assert_eq!(
        complete["result"],
        json!({"agent": "bin-1", "task_id": "t-work", "type": "summarize", "echo": payload, "blob": "xxxxx"})
    );
    assert_eq!(
        event_named(&mut lines, "completed").await["task_id"],
        "t-work"
    );

    conn.assign_accepted(
        "t-fail",
        json!({"fail": "model refused", "retryable": true}),
    )
    .await;
    let fail = conn.expect_and_answer("task.fail", json!({})).await;
    assert_eq!(
        fail,
        json!({"task_id": "t-fail", "error": "model refused", "retryable": true})
    );
    let failed = event_named(&mut lines, "failed").await;
    assert_eq!(failed["task_id"], "t-fail");

    conn.assign_accepted("t-panic", json!({"panic": true}))
        .await;
    let fail = conn.expect_and_answer("task.fail", json!({})).await;
    assert_eq!(fail["error"], "handler panicked");

    conn.assign("t-no", json!({"reject": true})).await;
    let reject = conn.expect_and_answer("task.reject", json!({})).await;
    assert_eq!(reject["task_id"], "t-no");

    conn.assign_accepted("t-long", json!({"sleep_ms": 60_000}))
        .await;
    conn.notify(
        "task.cancel",
        json!({"task_id": "t-long", "reason": "test"}),
    )
    .await;
    assert_eq!(
        event_named(&mut lines, "cancelled").await["task_id"],
        "t-long"
    );

    conn.notify(
        "config.update",
        json!({"version": 2, "config": {"model": "big"}}),
    )
    .await;
    assert_eq!(event_named(&mut lines, "config").await["version"], 2);

    let pid = child.id().expect("pid").to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().await;
    assert!(killed.is_ok_and(|s| s.success()));
    assert_eq!(conn.expect_close().await, Some(1000));
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the agent did not exit in time")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn example_agent_exits_non_zero_with_the_reason_when_refused() {
    let gateway = FakeGateway::start().await;
    let mut command = agent_command(&gateway.url);
    // Even the most verbose log must not show the key.
    command.env("RUST_LOG", "trace");
    let child = command.spawn().expect("spawn");
    gateway
        .refuse(403, 4001, "the key lacks scope agent:connect")
        .await;
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the agent did not exit in time")
        .expect("wait");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("HTTP 403 (code 4001): the key lacks scope agent:connect"),
        "{stderr}"
    );
    assert!(
        stderr.contains("tungstenite"),
        "trace logging was on: {stderr}"
    );
    assert!(
        !stderr.contains("mg_bin_key"),
        "the key leaked into the log: {stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(r#""event":"refused""#), "{stdout}");
}

/// SIGTERMs the agent and checks it closes with 1000 and exits 0.
async fn stop(mut child: Child, conn: &mut GatewayConn) {
    let pid = child.id().expect("pid").to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().await;
    assert!(killed.is_ok_and(|s| s.success()));
    assert_eq!(conn.expect_close().await, Some(1000));
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the agent did not exit in time")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}

/// `bytes` hex digits that compress only about half.
fn noise(bytes: usize) -> String {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 16) as u32, 16).unwrap_or('0')
        })
        .collect()
}

#[tokio::test]
async fn example_agent_speaks_binary_applies_state_and_reports_it() {
    let gateway = FakeGateway::start().await;
    let mut command = agent_command(&gateway.url);
    command.args(["--binary", "--subscribe", "counters"]);
    let mut child = command.spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let mut conn = gateway.accept_with(true).await;
    assert!(conn.binary, "the agent offered mcpw.v1");
    conn.register(json!([])).await;
    assert!(conn.last_frame.is_some());
    let mode = event_named(&mut lines, "protocol_mode").await;
    assert_eq!(
        mode,
        json!({"event": "protocol_mode", "binary": true, "compression": true, "checksum": true})
    );

    let mut doc = FakeDoc::new("counters");
    conn.expect_and_answer("state.subscribe", doc.snapshot())
        .await;
    let subscribed = event_named(&mut lines, "state_subscribed").await;
    assert_eq!(subscribed["doc"], "counters");
    assert_eq!(subscribed["hash"], doc.doc.hash().as_str());

    let ops = json!([{"op": "counter.increment", "path": "hits", "by": 1}]);
    conn.assign_accepted(
        "t-state",
        json!({"state": {"doc": "counters", "ops": ops, "repeat": 3}}),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(doc.serve_apply(&mut conn, true).await, ops);
    }
    let complete = conn.expect_and_answer("task.complete", json!({})).await;
    let result = &complete["result"];
    assert_eq!(result["applied"], 3);
    assert_eq!(result["ops_applied"], 3);
    assert_eq!(result["hash"], doc.doc.hash().as_str());
    assert_eq!(result["value"], json!({"hits": 3}));

    conn.assign_accepted("t-report", json!({"state_report": {"doc": "counters"}}))
        .await;
    let complete = loop {
        let message = conn.recv().await;
        match message["method"].as_str() {
            Some("state.get") => {
                let answer = json!({"doc": "counters", "value": doc.doc.value(),
                                    "hash": doc.doc.hash(), "clock": doc.doc.clock()});
                conn.answer(&message["id"], answer).await;
            }
            Some("state.sync") => conn.answer(&message["id"], doc.snapshot()).await,
            Some("task.complete") => {
                conn.answer(&message["id"], json!({})).await;
                break message;
            }
            _ => panic!("unexpected {message}"),
        }
    };
    let result = &complete["params"]["result"];
    assert_eq!(result["gateway_hash"], doc.doc.hash().as_str());
    assert_eq!(result["local_hash"], doc.doc.hash().as_str());
    assert_eq!(result["value"], json!({"hits": 3}));
    assert_eq!(result["local_value"], json!({"hits": 3}));

    // A large payload arrives intact (compressed by the gateway).
    let data = noise(300_000);
    let payload = json!({"echo": true, "data": data});
    conn.assign_accepted("t-echo", payload.clone()).await;
    let complete = conn.expect_and_answer("task.complete", json!({})).await;
    let result = &complete["result"];
    assert_eq!(result["payload_bytes"], payload.to_string().len());
    assert_eq!(result["data_bytes"], 300_000);
    let sha = hex::encode(Sha256::digest(data.as_bytes()));
    assert_eq!(result["data_sha256"], sha.as_str());
    assert!(result.get("echo").is_none(), "the payload is not echoed");
    stop(child, &mut conn).await;
}

#[tokio::test]
async fn example_agent_negotiates_at_run_time_with_its_own_preferences() {
    let gateway = FakeGateway::start().await;
    let mut command = agent_command(&gateway.url);
    command.args([
        "--binary-runtime",
        "--compress-threshold",
        "0",
        "--no-checksum",
    ]);
    let mut child = command.spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let mut conn = gateway.accept().await;
    let params = conn.expect_set_binary().await;
    assert_eq!(
        params,
        json!({"enabled": true, "compression": {"enabled": false, "threshold": 1024}, "checksum": false})
    );
    conn.register(json!([])).await;
    assert_eq!(conn.last_frame.map(|h| h.flags), Some(0));
    let mode = event_named(&mut lines, "protocol_mode").await;
    assert_eq!(
        mode,
        json!({"event": "protocol_mode", "binary": true, "compression": false, "checksum": false})
    );
    event_named(&mut lines, "registered").await;

    conn.send_bytes(vec![0; 30]).await;
    let bad = event_named(&mut lines, "bad_frame").await;
    assert!(
        bad["error"].as_str().is_some_and(|e| e.contains("magic")),
        "{bad}"
    );
    conn.assign_accepted("t-after", json!({"protocol_info": true}))
        .await;
    let (id, _) = conn.expect_request("protocol.get_info").await;
    let info = crate::fake_gateway::mode_info(true, false, 1024, false);
    conn.answer(&id, info.clone()).await;
    let complete = conn.expect_and_answer("task.complete", json!({})).await;
    assert_eq!(complete["result"]["protocol_info"], info);
    stop(child, &mut conn).await;
}
