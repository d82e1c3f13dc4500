//! All three kinds of upstream at once: the official server-everything (Node)
//! over stdio, over the 2024-11-05 HTTP+SSE transport (`transport = "sse"`)
//! and over Streamable HTTP, beside the HTTP fixture, behind one gateway;
//! clients of another revision than the upstream they reach (2026-07-28 to
//! an SSE upstream, 2024-11-05 over the gateway's `/sse` to a 2026-07-28
//! upstream); and an SSE upstream that goes away and comes back.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rmcp::model::ProtocolVersion;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientLifecycleMode, ClientServiceExt};
use serde_json::{Value, json};

use crate::support::{
    Gateway, GatewayConfig, HttpFixture, Session, SseReader, TestClient, WAIT, call_tool, connect,
    fixture_bin, free_port, text_of, tool_names,
};

/// `dist/index.js` of the installed `@modelcontextprotocol/server-everything`.
fn server_everything() -> PathBuf {
    let package = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools/node_modules/@modelcontextprotocol/server-everything");
    let entry = package.join("dist/index.js");
    assert!(
        entry.is_file(),
        "{} is missing; install the test tools with `npm ci --prefix tools` (from the workspace root)",
        entry.display()
    );
    entry
}

/// A server-everything process serving HTTP (`sse` or `streamableHttp`
/// mode) on a port of its own; killed and reaped on drop, so no Node process
/// outlives the test (it is `node` itself, with no children).
struct Everything {
    child: Option<Child>,
    mode: &'static str,
    port: u16,
}

impl Everything {
    /// Starts `mode` on a free port and waits until it accepts connections.
    async fn start(mode: &'static str) -> Everything {
        let mut last = String::new();
        // A free port can be taken between picking and binding it: pick again.
        for _ in 0..4 {
            match Everything::start_on(mode, free_port()).await {
                Ok(e) => return e,
                Err(why) => last = why,
            }
        }
        panic!("server-everything ({mode}) did not start: {last}");
    }

    /// Starts `mode` on `port`; `Err` when it exits or does not listen in
    /// time. Ready means its "… port N" line on stderr, printed once the
    /// socket is bound: a successful TCP connect alone could reach another
    /// test's server that won a race for the same port.
    async fn start_on(mode: &'static str, port: u16) -> Result<Everything, String> {
        let mut child = Command::new("node")
            .arg(server_everything())
            .arg(mode)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run node: {e}; install Node.js"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<Result<(), String>>();
        // Reads stderr to its end (the server logs every message there, and
        // a full pipe would stall it), reporting the ready line or the exit.
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            let mut seen = Vec::new();
            let lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
            for line in lines.map_while(Result::ok) {
                if ready_tx.is_some() {
                    let bound = line.contains(&format!("port {port}"))
                        && (line.contains("running") || line.contains("listening"));
                    if bound {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    } else {
                        seen.push(line);
                    }
                }
            }
            if let Some(tx) = ready_tx {
                let _ = tx.send(Err(seen.join("\n")));
            }
        });
        let mut me = Everything {
            child: Some(child),
            mode,
            port,
        };
        match tokio::time::timeout(Duration::from_secs(20), ready).await {
            Ok(Ok(Ok(()))) => Ok(me),
            Ok(Ok(Err(stderr))) => {
                me.kill();
                Err(format!("it exited on port {port}; its stderr:\n{stderr}"))
            }
            Ok(Err(_)) => {
                me.kill();
                Err("its stderr reader stopped".into())
            }
            Err(_) => {
                me.kill();
                Err(format!("it did not listen on port {port} within 20 s"))
            }
        }
    }

    /// The URL a gateway upstream points at.
    fn url(&self) -> String {
        let path = if self.mode == "sse" { "sse" } else { "mcp" };
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// Kills the process (SIGKILL) and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Everything {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `[[upstreams]]` table for an HTTP+SSE upstream.
fn sse_upstream(name: &str, url: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"{name}\"\ntransport = \"sse\"\nurl = \"{url}\"\nconnect_timeout_secs = 10\n"
    )
}

/// An rmcp client on 2026-07-28: no `initialize`, `server/discover`, then
/// every request carries its revision.
async fn connect_modern(gw: &Gateway) -> Session {
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
    tokio::time::timeout(WAIT, client.serve_with_lifecycle(transport, lifecycle))
        .await
        .expect("server/discover did not finish in time")
        .unwrap_or_else(|e| panic!("server/discover failed: {e}; gateway log:\n{}", gw.log()))
}

/// The `meshgate_status` entry of upstream `name`.
async fn status_of(session: &Session, name: &str) -> Value {
    let report = call_tool(session, "meshgate_status", json!({}))
        .await
        .structured_content
        .expect("the status tool answers in structuredContent");
    report["upstreams"]
        .as_array()
        .and_then(|ups| ups.iter().find(|u| u["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no upstream `{name}` in {report}"))
}

/// Polls `/health/gateway` until upstream `name` has `status`.
async fn wait_for_status(gw: &Gateway, name: &str, status: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (code, health) = gw.get_json("/health/gateway").await;
        assert_eq!(code, 200, "{health}");
        let entry = health["upstreams"]
            .as_array()
            .and_then(|ups| ups.iter().find(|u| u["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no upstream `{name}` in {health}"));
        if entry["status"] == status {
            return entry;
        }
        assert!(
            Instant::now() < deadline,
            "upstream `{name}` was not {status} within {within:?}: {entry}; gateway log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_everything_over_stdio_sse_and_streamable_http_and_the_fixture_serve_one_session() {
    let entry = server_everything();
    let sse = Everything::start("sse").await;
    let http = Everything::start("streamableHttp").await;
    let fx = HttpFixture::start();
    let config = GatewayConfig::new()
        .stdio_upstream(
            "ev_stdio",
            std::path::Path::new("node"),
            &[entry.to_str().expect("a UTF-8 path"), "stdio"],
        )
        .http_upstream("ev_http", &http.url())
        .http_upstream("fx", &fx.url)
        .toml(&sse_upstream("ev_sse", &sse.url()));
    let gw = Gateway::start(&config).await;
    let (session, _) = connect(&gw).await;

    let names = tool_names(&session).await;
    for expected in [
        "ev_stdio__echo",
        "ev_sse__echo",
        "ev_http__echo",
        "fx__echo",
        "ev_sse__get-sum",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from tools/list: {names:?}"
        );
    }
    for name in ["ev_stdio", "ev_sse", "ev_http"] {
        let message = format!("hi {name}");
        let echo = call_tool(
            &session,
            &format!("{name}__echo"),
            json!({"message": message}),
        )
        .await;
        assert_eq!(text_of(&echo), format!("Echo: {message}"), "{echo:?}");
    }
    let echo = call_tool(&session, "fx__echo", json!({"message": "hi fx"})).await;
    assert_eq!(text_of(&echo), "hi fx");
    let sum = call_tool(&session, "ev_sse__get-sum", json!({"a": 2, "b": 40})).await;
    assert!(text_of(&sum).contains("42"), "{sum:?}");

    let (code, health) = gw.get_json("/health/upstreams/ev_sse").await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["status"], "up", "{health}");
    assert_eq!(health["transport"], "sse", "{health}");
    assert_eq!(
        health["calls_over"], "one connection per client session",
        "{health}"
    );

    // server-everything over stdio keeps running after its stdin closes once
    // a session is open, so only the gateway's shutdown ends it: no Node
    // process may outlive a gateway stopped with SIGTERM.
    let mut gw = gw;
    let pid = gw.pid().expect("the gateway is running");
    let children = everything_children_of(pid);
    assert!(
        !children.is_empty(),
        "the stdio upstream runs as a child of the gateway"
    );
    drop(session);
    gw.send_sigterm();
    gw.wait_exit(Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while children.iter().any(|c| is_running(*c)) {
        assert!(
            Instant::now() < deadline,
            "server-everything (pids {children:?}) outlived the gateway"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server-everything processes whose parent is `pid` (Linux `/proc`).
fn everything_children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // `pid (comm) state ppid …`; comm may hold spaces, so split after `)`.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            ppid == Some(pid) && String::from_utf8_lossy(&cmdline).contains("server-everything")
        })
        .collect()
}

/// Whether process `pid` exists and is not a zombie.
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s != "Z"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_other_revisions_reach_an_sse_upstream_and_a_2026_upstream() {
    let sse = Everything::start("sse").await;
    // `--versions all`: the fixture serves 2026-07-28, which the gateway
    // then speaks to it (checked below), so a 2024-11-05 client's call is
    // carried across both ends of the revision range.
    let modern_fx = {
        let mut child = Command::new(fixture_bin())
            .args(["--mode", "basic", "--transport", "http"])
            .args(["--listen", "127.0.0.1:0", "--versions", "all"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the fixture");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("the fixture did not announce its address: {line:?}"));
        (KillOnDrop(child), url)
    };
    let config = GatewayConfig::new()
        .http_upstream("new", &modern_fx.1)
        .toml(&sse_upstream("old", &sse.url()));
    let gw = Gateway::start(&config).await;

    // A 2026-07-28 client calls a tool of the 2024-11-05-era SSE upstream.
    let modern = connect_modern(&gw).await;
    let info = modern.peer_info().expect("server/discover answered");
    assert_eq!(info.protocol_version, ProtocolVersion::V_2026_07_28);
    let echo = call_tool(&modern, "old__echo", json!({"message": "from 2026"})).await;
    assert_eq!(text_of(&echo), "Echo: from 2026", "{echo:?}");
    let old = status_of(&modern, "old").await;
    assert_eq!(old["transport"], "sse", "{old}");
    assert!(
        old["revision"].as_str().is_some_and(|r| r < "2026-07-28"),
        "the SSE upstream was opened with initialize on a session-based revision: {old}"
    );
    let new = status_of(&modern, "new").await;
    assert_eq!(new["revision"], "2026-07-28", "{new}");

    // A 2024-11-05 client on the gateway's own HTTP+SSE endpoint calls a tool
    // of the upstream the gateway speaks 2026-07-28 to.
    let http = gw.client();
    let r = http
        .get(gw.url("/sse"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("GET /sse");
    assert_eq!(r.status(), 200);
    let mut stream = SseReader::new(r);
    let endpoint = stream.next().await.expect("the endpoint event");
    assert_eq!(endpoint.event.as_deref(), Some("endpoint"), "{endpoint:?}");
    let messages = gw.url(&endpoint.data);
    let post = |message: Value| {
        let http = http.clone();
        let messages = messages.clone();
        async move {
            http.post(&messages)
                .header("content-type", "application/json")
                .body(message.to_string())
                .send()
                .await
                .expect("POST /messages")
                .status()
        }
    };
    let init = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": "2024-11-05",
            "capabilities": {},
            "clientInfo": {"name": "old-client", "version": "1.0.0"}
        }
    });
    assert_eq!(post(init).await, 202);
    let (answer, _) = stream.response_to(1).await;
    assert_eq!(
        answer["result"]["protocolVersion"], "2024-11-05",
        "{answer}"
    );
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(post(initialized).await, 202);
    for (id, name, expect) in [
        (2, "new__echo", "from 2024"),
        (3, "old__echo", "Echo: from 2024"),
    ] {
        let call = json!({
            "jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": name, "arguments": {"message": "from 2024"}}
        });
        assert_eq!(post(call).await, 202);
        let (answer, _) = stream.response_to(id).await;
        assert_eq!(
            answer["result"]["content"][0]["text"], expect,
            "{name}: {answer}"
        );
    }
    let sum = json!({
        "jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": {"name": "new__add", "arguments": {"a": 1, "b": 2}}
    });
    assert_eq!(post(sum).await, 202);
    let (answer, _) = stream.response_to(4).await;
    assert_eq!(
        answer["result"]["structuredContent"],
        json!({"sum": 3.0}),
        "{answer}"
    );
}

/// Kills and reaps a child process when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_upstream_that_goes_away_is_down_and_comes_back_when_restarted() {
    let mut sse = Everything::start("sse").await;
    let port = sse.port;
    let fx = HttpFixture::start();
    let config = GatewayConfig::new()
        .http_upstream("fx", &fx.url)
        .toml(&sse_upstream("old", &sse.url()));
    let gw = Gateway::start(&config).await;
    let (session, _) = connect(&gw).await;
    let echo = call_tool(&session, "old__echo", json!({"message": "before"})).await;
    assert_eq!(text_of(&echo), "Echo: before");

    sse.kill();
    let down = wait_for_status(&gw, "old", "down", Duration::from_secs(15)).await;
    assert_eq!(down["transport"], "sse", "{down}");
    let (code, detail) = gw.get_json("/health/upstreams/old").await;
    assert_eq!(code, 503, "{detail}");
    assert!(
        detail["error"].as_str().is_some_and(|e| !e.is_empty()),
        "the reason is given: {detail}"
    );
    // The other upstream is untouched.
    let echo = call_tool(&session, "fx__echo", json!({"message": "still here"})).await;
    assert_eq!(text_of(&echo), "still here");

    let mut restarted = None;
    for _ in 0..10 {
        match Everything::start_on("sse", port).await {
            Ok(e) => {
                restarted = Some(e);
                break;
            }
            // The port may linger for a moment after the kill.
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
    let _sse = restarted.expect("server-everything restarts on its old port");
    wait_for_status(&gw, "old", "up", Duration::from_secs(40)).await;

    // The same client session calls again: its own connection to the old
    // process is gone and a new one is opened.
    let echo = call_tool(&session, "old__echo", json!({"message": "after"})).await;
    assert_eq!(text_of(&echo), "Echo: after", "{echo:?}");
    let (fresh, _) = connect(&gw).await;
    let echo = call_tool(&fresh, "old__echo", json!({"message": "fresh"})).await;
    assert_eq!(text_of(&echo), "Echo: fresh", "{echo:?}");
}
