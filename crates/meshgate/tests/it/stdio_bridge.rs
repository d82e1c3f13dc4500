//! `meshgate stdio`: the real binary as a bridge between stdin/stdout and a
//! real gateway, over Streamable HTTP and WebSocket. The official Python SDK's
//! stdio client drives it end to end; the rest talk JSON-RPC lines to it
//! directly: gateway restarts, forgotten sessions, dropped WebSockets, bad
//! input, a wrong key, EOF, and that stdout carries nothing but JSON-RPC.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::support::{Env, Gateway, TempDir, WAIT, create_key, meshgate_bin, python};

/// A running `meshgate stdio`, killed on drop.
struct Bridge {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Messages read from stdout that no `answer` has claimed yet.
    unclaimed: Vec<Value>,
    log_path: PathBuf,
    next_id: i64,
    // Dropped last: the process must be gone before its directory is removed.
    _dir: TempDir,
}

impl Bridge {
    /// `meshgate stdio --url URL --key KEY` plus `extra` arguments.
    fn start(url: &str, key: &str, extra: &[&str]) -> Bridge {
        let dir = TempDir::new("stdio");
        let log_path = dir.path().join("bridge.log");
        let log = std::fs::File::create(&log_path).expect("create the bridge log");
        let mut cmd = Command::new(meshgate_bin());
        cmd.args([
            "stdio",
            "--url",
            url,
            "--key",
            key,
            "--retry-for-secs",
            "20",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
        for (name, _) in std::env::vars() {
            if name.starts_with("MESHGATE_") {
                cmd.env_remove(name);
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", meshgate_bin().display()));
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        Bridge {
            child,
            stdin: Some(stdin),
            stdout,
            unclaimed: Vec::new(),
            log_path,
            next_id: 100,
            _dir: dir,
        }
    }

    /// What the bridge logged on stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Writes one line to the bridge's stdin.
    async fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to the bridge's stdin");
        stdin.flush().await.expect("flush the bridge's stdin");
    }

    async fn send(&mut self, message: Value) {
        self.send_line(&message.to_string()).await;
    }

    /// Sends a request with a fresh id; returns the id.
    async fn request(&mut self, method: &str, params: Value) -> i64 {
        self.next_id += 1;
        let id = self.next_id;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        id
    }

    /// The next stdout line, which must be one JSON-RPC message; `None` at EOF.
    async fn read(&mut self) -> Option<Value> {
        let line = tokio::time::timeout(WAIT, self.stdout.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no stdout line from the bridge within {WAIT:?}; its log:\n{}",
                    self.log()
                )
            })
            .expect("read the bridge's stdout")?;
        Some(assert_json_rpc_line(&line, &self.log()))
    }

    /// Reads until the answer to request `id`, keeping everything else.
    async fn answer(&mut self, id: i64) -> Value {
        if let Some(i) = self.unclaimed.iter().position(|m| is_answer(m, id)) {
            return self.unclaimed.remove(i);
        }
        loop {
            let message = self.read().await.unwrap_or_else(|| {
                panic!(
                    "the bridge's stdout ended before the answer to {id}; its log:\n{}",
                    self.log()
                )
            });
            if is_answer(&message, id) {
                return message;
            }
            self.unclaimed.push(message);
        }
    }

    /// Sends a request and returns its answer.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.request(method, params).await;
        self.answer(id).await
    }

    /// `initialize` (offering sampling) and `notifications/initialized`.
    async fn initialize(&mut self) -> Value {
        let answer = self
            .call(
                "initialize",
                json!({"protocolVersion": "2025-11-25", "capabilities": {"sampling": {}},
                       "clientInfo": {"name": "stdio-it", "version": "1.0.0"}}),
            )
            .await;
        assert_eq!(
            answer["result"]["serverInfo"]["name"],
            "meshgate",
            "{answer}\nbridge log:\n{}",
            self.log()
        );
        self.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        answer
    }

    /// Calls `fx__echo` and returns the text it echoed (panics on an error).
    async fn echo(&mut self, text: &str) -> String {
        let answer = self
            .call(
                "tools/call",
                json!({"name": "fx__echo", "arguments": {"message": text}}),
            )
            .await;
        answer["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("fx__echo failed: {answer}\nbridge log:\n{}", self.log()))
            .to_owned()
    }

    /// Reads until a message with `method` arrives (or finds one already read).
    async fn wait_for_method(&mut self, method: &str) -> Value {
        if let Some(i) = self.unclaimed.iter().position(|m| m["method"] == method) {
            return self.unclaimed.remove(i);
        }
        loop {
            let message = self.read().await.unwrap_or_else(|| {
                panic!(
                    "the bridge's stdout ended before {method}; its log:\n{}",
                    self.log()
                )
            });
            if message["method"] == method {
                return message;
            }
            self.unclaimed.push(message);
        }
    }

    /// Registers a tool on the fixture; the gateway then tells the session
    /// `notifications/tools/list_changed` on its own (over the GET stream on
    /// Streamable HTTP), which must reach stdout.
    async fn expect_server_initiated_notification(&mut self, tool: &str) {
        let added = self
            .call(
                "tools/call",
                json!({"name": "fx__add_tool", "arguments": {"name": tool}}),
            )
            .await;
        assert!(added.get("result").is_some(), "{added}");
        self.wait_for_method("notifications/tools/list_changed")
            .await;
    }

    /// The session id the bridge logged last (`MCP session opened ... session=ID`).
    fn session_id(&self) -> String {
        self.log()
            .lines()
            .rev()
            .filter(|l| l.contains("MCP session opened"))
            .find_map(|l| l.split("session=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("the bridge logged no session id; its log:\n{}", self.log()))
    }

    /// Closes stdin; returns the exit status and every message still on stdout.
    async fn finish(&mut self) -> (ExitStatus, Vec<Value>) {
        drop(self.stdin.take());
        let mut rest = std::mem::take(&mut self.unclaimed);
        while let Some(message) = self.read().await {
            rest.push(message);
        }
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the bridge did not exit within {WAIT:?} of stdin's end; its log:\n{}",
                    self.log()
                )
            })
            .expect("wait for the bridge");
        (status, rest)
    }
}

/// Parses a stdout line, failing the test unless it is one JSON-RPC 2.0 message.
fn assert_json_rpc_line(line: &str, log: &str) -> Value {
    let value: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("the bridge wrote a stdout line that is not JSON ({e}): {line:?}\nits log:\n{log}")
    });
    assert_eq!(
        value["jsonrpc"], "2.0",
        "the bridge wrote a stdout line that is not JSON-RPC 2.0: {line}"
    );
    assert!(
        value.get("method").is_some()
            || value.get("result").is_some()
            || value.get("error").is_some(),
        "the bridge wrote a stdout line that is neither a request, a notification nor a response: {line}"
    );
    value
}

fn is_answer(message: &Value, id: i64) -> bool {
    message["id"] == json!(id) && message.get("method").is_none()
}

/// A developer key (the role a desktop client would get).
async fn developer_key(gw: &Gateway) -> String {
    create_key(gw, json!({"name": "desktop", "role": "developer"}))
        .await
        .0
}

fn ws_url(gw: &Gateway) -> String {
    format!("ws://127.0.0.1:{}/mcp/ws", gw.port)
}

// ---------------------------------------------------------------------------
// The Python SDK's stdio client, end to end
// ---------------------------------------------------------------------------

/// Runs `fixtures/stdio_bridge_client.py` against `url`; returns its report.
async fn python_client_through_bridge(url: &str, key: &str) -> Value {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/fixtures/stdio_bridge_client.py");
    let mut cmd = Command::new(python());
    cmd.arg(&script)
        .arg(meshgate_bin())
        .arg(url)
        .env("MESHGATE_KEY", key)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the Python client finished within 60 s")
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client failed ({}):\nstdout:\n{stdout}\nstderr (the SDK and the bridge):\n{stderr}",
        output.status
    );
    let report = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(report).unwrap_or_else(|e| {
        panic!("the Python client's report is not JSON ({e}): {stdout}\nstderr:\n{stderr}")
    })
}

fn check_python_report(report: &Value) {
    assert_eq!(report["server_name"], "meshgate", "{report}");
    assert_eq!(report["protocol_version"], "2025-11-25", "{report}");
    let tools: Vec<&str> = report["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for name in ["fx__echo", "fx__sample", "fxs__echo", "meshgate_status"] {
        assert!(tools.contains(&name), "{name} missing from {tools:?}");
    }
    assert_eq!(report["echo"], "hello through stdio", "{report}");
    assert_eq!(report["echo_is_error"], false, "{report}");
    assert_eq!(
        report["sample"], "sampled: forty-two",
        "the gateway's sampling request reached the SDK through the bridge and its answer came back: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_stdio_client_uses_the_gateway_over_streamable_http_through_the_bridge() {
    let env = Env::start().await;
    let key = developer_key(&env.gw).await;
    let report = python_client_through_bridge(&env.gw.mcp_url(), &key).await;
    check_python_report(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_stdio_client_uses_the_gateway_over_websocket_through_the_bridge() {
    let env = Env::start().await;
    let key = developer_key(&env.gw).await;
    let report = python_client_through_bridge(&ws_url(&env.gw), &key).await;
    check_python_report(&report);
}

// ---------------------------------------------------------------------------
// Reconnection and session resumption
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bridge_answers_the_next_request_after_a_gateway_restart() {
    let mut env = Env::start().await;
    let key = developer_key(&env.gw).await;
    let mut bridge = Bridge::start(&env.gw.mcp_url(), &key, &[]);
    bridge.initialize().await;
    assert_eq!(
        bridge.echo("before the restart").await,
        "before the restart"
    );

    env.gw.restart().await;
    assert_eq!(
        bridge.echo("after the restart").await,
        "after the restart",
        "the second request is answered through the restarted gateway"
    );
    bridge
        .expect_server_initiated_notification("added_after_http_restart")
        .await;

    // The gateway is down: the bridge retries until it is back.
    env.gw.kill();
    let id = bridge
        .request(
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "while down"}}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    env.gw.restart().await;
    let answer = bridge.answer(id).await;
    assert_eq!(
        answer["result"]["content"][0]["text"], "while down",
        "{answer}"
    );
    assert!(
        bridge.log().contains("reconnecting"),
        "the bridge logs its reconnects: {}",
        bridge.log()
    );
    let (status, _) = bridge.finish().await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bridge_opens_a_new_session_when_the_gateway_has_forgotten_it() {
    let env = Env::start().await;
    let key = developer_key(&env.gw).await;
    let mut bridge = Bridge::start(&env.gw.mcp_url(), &key, &[]);
    bridge.initialize().await;
    assert_eq!(bridge.echo("one").await, "one");
    let first = bridge.session_id();

    // The session ends behind the bridge's back (as when it expires).
    let r = env
        .gw
        .client_with_key(&key)
        .delete(env.gw.mcp_url())
        .header("mcp-session-id", &first)
        .send()
        .await
        .expect("DELETE /mcp");
    assert!(r.status().is_success(), "DELETE: {}", r.status());

    assert_eq!(
        bridge.echo("two").await,
        "two",
        "the bridge replays initialize on 404 and retries"
    );
    let second = bridge.session_id();
    assert_ne!(first, second, "a new session: {}", bridge.log());
    assert!(
        bridge.log().contains("opened again by replaying"),
        "{}",
        bridge.log()
    );
    let listed = bridge.call("tools/list", json!({})).await;
    assert!(listed["result"]["tools"].is_array(), "{listed}");
    assert!(
        !bridge.unclaimed.iter().any(|m| m["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("meshgate-stdio"))),
        "the replayed initialize's answer is swallowed: {:?}",
        bridge.unclaimed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_bridge_reconnects_and_replays_the_session_after_a_gateway_restart() {
    let mut env = Env::start().await;
    let key = developer_key(&env.gw).await;
    let mut bridge = Bridge::start(&ws_url(&env.gw), &key, &[]);
    bridge.initialize().await;
    assert_eq!(
        bridge.echo("before the restart").await,
        "before the restart"
    );

    env.gw.restart().await;
    assert_eq!(
        bridge.echo("after the restart").await,
        "after the restart",
        "the bridge reconnected, replayed initialize and sent the request; log:\n{}",
        bridge.log()
    );
    assert!(
        bridge.log().contains("WebSocket to the gateway lost"),
        "{}",
        bridge.log()
    );
    bridge
        .expect_server_initiated_notification("added_after_ws_restart")
        .await;
    assert!(
        !bridge.unclaimed.iter().any(|m| m["id"].is_string()),
        "the replayed initialize's answer is swallowed: {:?}",
        bridge.unclaimed
    );
    let (status, _) = bridge.finish().await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_bridge_answers_the_gateways_pings_and_stays_connected() {
    let env = Env::start_with(|c| {
        c.mcp_line("ws_ping_interval_secs = 1")
            .mcp_line("ws_pong_timeout_secs = 2")
    })
    .await;
    let key = developer_key(&env.gw).await;
    let mut bridge = Bridge::start(&ws_url(&env.gw), &key, &[]);
    bridge.initialize().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(bridge.echo("still connected").await, "still connected");
    assert!(
        !bridge.log().contains("lost"),
        "the gateway did not close the idle connection: {}",
        bridge.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_bridge_answers_a_request_in_flight_when_the_connection_drops() {
    let mut env = Env::start().await;
    let key = developer_key(&env.gw).await;
    let mut bridge = Bridge::start(&ws_url(&env.gw), &key, &[]);
    bridge.initialize().await;
    let slow = bridge
        .request(
            "tools/call",
            json!({"name": "fx__slow", "arguments": {"steps": 100, "delay_ms": 100}}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.gw.kill();
    let answer = bridge.answer(slow).await;
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("lost while this request was in flight") && message.contains("retry"),
        "{answer}"
    );

    env.gw.restart().await;
    assert_eq!(bridge.echo("again").await, "again");
}

// ---------------------------------------------------------------------------
// Bad input, bad keys, EOF, and a clean stdout
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stdin_line_gets_a_parse_error_and_the_bridge_goes_on() {
    let env = Env::start().await;
    let key = developer_key(&env.gw).await;
    for url in [env.gw.mcp_url(), ws_url(&env.gw)] {
        let mut bridge = Bridge::start(&url, &key, &[]);
        bridge.initialize().await;
        bridge.send_line("{\"jsonrpc\": \"2.0\", \"id\": 5, ").await;
        let error = bridge.read().await.expect("an answer to the bad line");
        assert_eq!(error["error"]["code"], -32700, "{error}");
        assert_eq!(error["id"], Value::Null, "{error}");
        bridge.send_line("[]").await;
        let error = bridge.read().await.expect("an answer to the batch");
        assert_eq!(error["error"]["code"], -32600, "{error}");
        assert_eq!(bridge.echo("still here").await, "still here", "{url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_gets_a_json_rpc_error_naming_the_401() {
    let env = Env::start().await;
    for url in [env.gw.mcp_url(), ws_url(&env.gw)] {
        let mut bridge = Bridge::start(&url, "mg_not_a_real_key_at_all", &[]);
        let answer = bridge
            .call(
                "initialize",
                json!({"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "stdio-it", "version": "1"}}),
            )
            .await;
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("401") && message.contains("--key"),
            "{url}: {answer}"
        );
        assert_eq!(answer["error"]["data"]["httpStatus"], 401, "{answer}");
        let (status, _) = bridge.finish().await;
        assert!(status.success(), "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_eof_ends_the_session_and_exits_0() {
    let env = Env::start().await;
    let key = developer_key(&env.gw).await;

    let mut bridge = Bridge::start(&env.gw.mcp_url(), &key, &[]);
    bridge.initialize().await;
    let session = bridge.session_id();
    let (status, rest) = bridge.finish().await;
    assert!(status.success(), "exit status {status}");
    assert!(rest.is_empty(), "{rest:?}");
    let r = env
        .gw
        .client_with_key(&key)
        .post(env.gw.mcp_url())
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-session-id", &session)
        .body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string())
        .send()
        .await
        .expect("POST /mcp");
    assert_eq!(
        r.status(),
        reqwest::StatusCode::NOT_FOUND,
        "the bridge ended its session with DELETE at EOF"
    );

    let mut bridge = Bridge::start(&ws_url(&env.gw), &key, &[]);
    bridge.initialize().await;
    let (status, _) = bridge.finish().await;
    assert!(status.success(), "exit status {status}");

    // Without a gateway at all, EOF still ends the bridge cleanly.
    let mut bridge = Bridge::start("http://127.0.0.1:9/mcp", &key, &[]);
    let (status, _) = bridge.finish().await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_carries_only_json_rpc_lines_while_logs_go_to_stderr() {
    let env = Env::start().await;
    let key = developer_key(&env.gw).await;
    for url in [env.gw.mcp_url(), ws_url(&env.gw)] {
        let mut bridge = Bridge::start(&url, &key, &["--log-level", "trace"]);
        bridge.initialize().await;
        bridge.send_line("this is not json").await;

        // A server-initiated request travels out on stdout and its answer back in on stdin.
        let call = bridge
            .request(
                "tools/call",
                json!({"name": "fx__sample", "arguments": {"prompt": "six times seven?"}}),
            )
            .await;
        let sampling = loop {
            let m = bridge.read().await.expect("the sampling request");
            if m["method"] == "sampling/createMessage" {
                break m;
            }
            bridge.unclaimed.push(m);
        };
        bridge
            .send(json!({"jsonrpc": "2.0", "id": sampling["id"], "result": {
                "role": "assistant", "content": {"type": "text", "text": "forty-two"}, "model": "it"}}))
            .await;
        let answer = bridge.answer(call).await;
        assert_eq!(
            answer["result"]["content"][0]["text"], "sampled: forty-two",
            "{url}: {answer}"
        );

        // Progress notifications interleave with the answer.
        let slow = bridge
            .request(
                "tools/call",
                json!({"name": "fx__slow", "arguments": {"steps": 3, "delay_ms": 20},
                       "_meta": {"progressToken": "p1"}}),
            )
            .await;
        let answer = bridge.answer(slow).await;
        assert_eq!(
            answer["result"]["content"][0]["text"], "done after 3 steps",
            "{answer}"
        );
        assert!(
            bridge
                .unclaimed
                .iter()
                .any(|m| m["method"] == "notifications/progress"),
            "{url}: {:?}",
            bridge.unclaimed
        );
        assert!(
            bridge
                .unclaimed
                .iter()
                .any(|m| m["error"]["code"] == -32700),
            "{:?}",
            bridge.unclaimed
        );

        // Every line read above and below went through assert_json_rpc_line.
        let (status, _) = bridge.finish().await;
        assert!(status.success(), "{status}");
        let log = bridge.log();
        assert!(
            log.contains("TRACE") || log.contains("DEBUG"),
            "the logs went to stderr: {log}"
        );
    }
}
