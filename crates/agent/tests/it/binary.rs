//! The example `meshgate-agent` binary against the fake gateway.

use std::process::Stdio;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use crate::fake_gateway::{FakeGateway, WAIT};

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
