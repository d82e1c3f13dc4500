//! Supervision of stdio upstreams and the identity the gateway presents
//! upstream: crashed children restarted and their exit logged, one child
//! process per client session (`process = "per_session"`), the explicit
//! child environment with `${env:...}` secret references, no child left
//! behind after SIGTERM, and `forward_authorization`. Real gateway, real
//! child processes (the fixture and the official server-everything),
//! observed through `/proc`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::ProtocolVersion;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientLifecycleMode, ClientServiceExt};
use serde_json::{Value, json};

use crate::support::{
    Gateway, GatewayConfig, HttpFixture, Session, TestClient, WAIT, call, call_tool, connect,
    fixture_bin, metric_value, text_of,
};

/// The fixture's process id, from its `whoami` tool.
async fn pid_of(session: &Session, whoami: &str) -> u32 {
    let answer = call_tool(session, whoami, json!({})).await;
    let text = text_of(&answer);
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("{whoami} answered no pid: {text}"))
}

/// Polls `check` every 50 ms until it returns `Some`, for up to `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the log says upstream `fx`'s process `pid` ended after the
/// gateway closed its connection.
fn assert_end_logged(gw: &Gateway, pid: u32) {
    assert!(
        log_lines(gw).iter().any(|l| l["upstream"] == "fx"
            && l["pid"] == pid
            && l["message"] == "upstream process ended after its connection closed"),
        "the end of process {pid} is logged:\n{}",
        gw.log()
    );
}

/// `/proc/<pid>/stat`: (state, parent pid), if the process exists.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` is a running process (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// Every live descendant of `root` (children, their children, ...).
fn descendants(root: u32) -> BTreeSet<u32> {
    let mut parents: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some((state, ppid)) = stat(pid)
            && state != 'Z'
        {
            parents.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &child in parents.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if found.insert(child) {
                todo.push(child);
            }
        }
    }
    found
}

/// The gateway's log, one JSON object per line (other lines skipped).
fn log_lines(gw: &Gateway) -> Vec<Value> {
    gw.log()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A program's absolute path, from this process's `PATH`.
fn in_path(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{program}` is not in PATH; these tests need it"))
}

/// `dist/index.js` of the installed `@modelcontextprotocol/server-everything`.
fn server_everything() -> PathBuf {
    let entry = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools/node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    assert!(
        entry.is_file(),
        "{} is missing; install the test tools with `npm ci --prefix tools` (from the workspace root)",
        entry.display()
    );
    entry
}

/// A client on 2026-07-28: no session, so the gateway serves it over the
/// shared connections.
async fn connect_modern(gw: &Gateway) -> Session {
    let client = TestClient::new(ProtocolVersion::V_2026_07_28);
    let config =
        rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(
            gw.mcp_url(),
        )
        .auth_header(gw.admin_key.clone());
    let lifecycle = ClientLifecycleMode::Discover {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
    };
    tokio::time::timeout(
        WAIT,
        client.serve_with_lifecycle(
            StreamableHttpClientTransport::from_config(config),
            lifecycle,
        ),
    )
    .await
    .expect("server/discover did not finish in time")
    .unwrap_or_else(|e| panic!("server/discover failed: {e}; gateway log:\n{}", gw.log()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_stdio_upstream_comes_back_as_a_new_process_and_its_exit_is_logged() {
    let gw = Gateway::start(
        &GatewayConfig::new()
            .stdio_fixture("fx")
            .upstream_extra("retry = { max_attempts = 1 }"),
    )
    .await;
    let (session, _) = connect(&gw).await;
    let old = pid_of(&session, "whoami").await;

    let set = call_tool(&session, "fault", json!({"mode": "crash"})).await;
    assert_ne!(set.is_error, Some(true), "{set:?}");
    let crashed = tokio::time::timeout(WAIT, session.call_tool(call("flaky", json!({}))))
        .await
        .expect("the crashing call answers");
    assert!(crashed.is_err(), "the crashing call fails: {crashed:?}");

    let new = eventually("the upstream to answer again", WAIT, || async {
        let r = session.call_tool(call("whoami", json!({}))).await.ok()?;
        serde_json::from_str::<Value>(&text_of(&r)).ok()?["pid"].as_u64()
    })
    .await;
    assert_ne!(u64::from(old), new, "a new process serves the upstream");
    assert!(!alive(old), "the crashed process is gone");
    let echo = call_tool(&session, "echo", json!({"message": "back"})).await;
    assert_eq!(text_of(&echo), "back");

    let (_, metrics) = gw.get_text("/metrics").await;
    let restarts = metric_value(&metrics, "gateway_upstream_restarts_total{upstream=\"fx\"}");
    assert!(restarts.is_some_and(|n| n >= 1.0), "restarts: {restarts:?}");

    // The child's last stderr line and its exit, both tagged with the upstream.
    let lines = log_lines(&gw);
    let tagged = |l: &&Value| l["upstream"] == "fx";
    assert!(
        lines.iter().filter(tagged).any(|l| l["stream"] == "stderr"
            && l["pid"] == old
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("injected crash"))),
        "no stderr line of the child in the log:\n{}",
        gw.log()
    );
    let exit = lines
        .iter()
        .filter(tagged)
        .find(|l| l["message"] == "upstream process exited" && l["pid"] == old)
        .unwrap_or_else(|| panic!("no exit line in the log:\n{}", gw.log()));
    assert_eq!(exit["level"], "WARN", "{exit}");
    assert!(
        exit["status"].as_str().is_some_and(|s| s.contains("17")),
        "the exit status (the fixture's crash exits with 17): {exit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_processes_are_one_per_session_and_end_with_it() {
    let gw = Gateway::start(
        &GatewayConfig::new()
            .stdio_fixture("fx")
            .upstream_extra("process = \"per_session\""),
    )
    .await;
    let modern = connect_modern(&gw).await;
    let shared = pid_of(&modern, "whoami").await;
    let (one, _) = connect(&gw).await;
    let (two, _) = connect(&gw).await;
    let p1 = pid_of(&one, "whoami").await;
    let p2 = pid_of(&two, "whoami").await;
    assert_eq!(
        pid_of(&one, "whoami").await,
        p1,
        "a session keeps its process"
    );
    let pids = BTreeSet::from([shared, p1, p2]);
    assert_eq!(
        pids.len(),
        3,
        "two sessions and the shared connection: three processes, not {pids:?}"
    );
    let gw_pid = gw.pid().expect("the gateway runs");
    assert!(
        pids.is_subset(&descendants(gw_pid)),
        "{pids:?} are the gateway's children"
    );
    assert_eq!(
        pid_of(&modern, "whoami").await,
        shared,
        "2026-07-28 requests use the shared process"
    );

    // Ending the session (DELETE) ends its process, and only its.
    one.cancel().await.expect("close the first session");
    eventually("the first session's process to end", WAIT, || async {
        (!alive(p1)).then_some(())
    })
    .await;
    assert!(alive(p2) && alive(shared), "the others keep running");
    assert_eq!(pid_of(&two, "whoami").await, p2);

    assert_end_logged(&gw, p1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_process_idle_past_its_timeout_ends_and_one_in_use_stays() {
    let gw = Gateway::start(
        &GatewayConfig::new()
            .stdio_fixture("fx")
            .upstream_extra("process = \"per_session\"\npool = { idle_timeout_secs = 2 }"),
    )
    .await;
    let (idle, _) = connect(&gw).await;
    let (busy, _) = connect(&gw).await;
    let p_idle = pid_of(&idle, "whoami").await;
    let p_busy = pid_of(&busy, "whoami").await;
    assert_ne!(p_idle, p_busy, "a process per session");
    let idle_since = Instant::now();

    // `busy` keeps calling; `idle` says nothing for longer than 2 s.
    eventually("the idle session's process to end", WAIT, || async {
        assert_eq!(
            pid_of(&busy, "whoami").await,
            p_busy,
            "a session in use keeps its process"
        );
        (!alive(p_idle)).then_some(())
    })
    .await;
    assert!(
        idle_since.elapsed() >= Duration::from_secs(1),
        "ended after {:?}, before its 2 s idle timeout",
        idle_since.elapsed()
    );
    assert!(alive(p_busy), "the busy session's process runs on");
    assert_end_logged(&gw, p_idle);

    // The idle session is still open: its next call starts a new process.
    let again = pid_of(&idle, "whoami").await;
    assert!(
        again != p_idle && again != p_busy && alive(again),
        "a new process for the returning session, not {again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_sees_only_its_configured_environment_and_secrets_stay_out_of_logs_and_api() {
    const SECRET: &str = "mg-secret-4f1c9e";
    let node = in_path("node");
    let entry = server_everything();
    let entry = entry.to_str().expect("a UTF-8 path");
    let config = GatewayConfig::new()
        .stdio_upstream("everything", &node, &[entry, "stdio"])
        .upstream_extra("env = { A = \"${env:MG_TEST_SECRET}\", B = \"$${env:literal}\" }")
        .stdio_upstream("picky", &node, &[entry, "stdio"])
        .upstream_extra("inherit_env = [\"MG_TEST_OTHER\"]")
        .stdio_fixture("missing")
        .upstream_extra("env = { C = \"${env:MG_TEST_MISSING}\" }");
    let gw = Gateway::start_with_env(
        &config,
        &[("MG_TEST_SECRET", SECRET), ("MG_TEST_OTHER", "other")],
    )
    .await;
    let (session, _) = connect(&gw).await;
    let env_of = |text: String| -> BTreeMap<String, String> {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("get-env: {e}: {text}"))
    };

    let env = env_of(text_of(
        &call_tool(&session, "everything__get-env", json!({})).await,
    ));
    assert_eq!(env.get("A").map(String::as_str), Some(SECRET), "{env:?}");
    assert_eq!(
        env.get("B").map(String::as_str),
        Some("${env:literal}"),
        "`$${{` is a literal `${{`"
    );
    let allowed = BTreeSet::from(["A", "B", "PATH", "HOME"]);
    assert!(
        env.keys().all(|k| allowed.contains(k.as_str())),
        "only PATH, HOME and `env` by default, nothing else of the gateway's: {:?}",
        env.keys().collect::<Vec<_>>()
    );

    let env = env_of(text_of(
        &call_tool(&session, "picky__get-env", json!({})).await,
    ));
    assert_eq!(
        env.keys().map(String::as_str).collect::<Vec<_>>(),
        ["MG_TEST_OTHER"],
        "inherit_env replaces PATH and HOME: {env:?}"
    );

    let (status, body) = gw.get_json("/api/v1/upstreams/everything").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["definition"]["env"]["A"], "***", "{body}");
    assert!(!body.to_string().contains(SECRET), "{body}");

    let (_, missing) = gw.get_json("/api/v1/upstreams/missing").await;
    assert_eq!(missing["status"], "down", "{missing}");
    let reason = missing["status_detail"].as_str().unwrap_or_default();
    for part in ["missing", "env `C`", "${env:MG_TEST_MISSING}"] {
        assert!(reason.contains(part), "`{part}` in the reason: {missing}");
    }

    assert!(
        !gw.log().contains(SECRET),
        "the secret appears in the gateway log:\n{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_no_upstream_process_behind() {
    let fixture = fixture_bin().display().to_string();
    // `sh` outlives its stdin: after the fixture exits it sleeps, so only a
    // kill of its process group ends it and the `sleep`.
    let stubborn = format!("{fixture} --mode basic --transport stdio; sleep 30");
    let config = GatewayConfig::new()
        .stdio_fixture("shared")
        .stdio_fixture("pooled")
        .upstream_extra("pool = { processes = 2 }")
        .stdio_fixture("own")
        .upstream_extra("process = \"per_session\"")
        .stdio_upstream("stubborn", Path::new("sh"), &["-c", &stubborn]);
    let mut gw = Gateway::start(&config).await;
    let (session, _) = connect(&gw).await;
    let own = pid_of(&session, "own__whoami").await;
    let gw_pid = gw.pid().expect("the gateway runs");
    // shared 1, pooled 2, own 1 + this session's 1, stubborn `sh` + fixture.
    let children = eventually("every upstream process to start", WAIT, || async {
        let d = descendants(gw_pid);
        (d.len() >= 7).then_some(d)
    })
    .await;
    assert!(children.contains(&own), "{children:?}");

    let started = Instant::now();
    gw.send_sigterm();
    let status = gw.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
    let left: Vec<u32> = children.iter().copied().filter(|&p| alive(p)).collect();
    assert!(
        left.is_empty(),
        "processes left after the gateway exited: {left:?}"
    );
    drop(session);
    let lines = log_lines(&gw);
    assert!(
        lines.iter().any(|l| l["upstream"] == "stubborn"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("killed it (SIGKILL)"))),
        "the stubborn child was killed after 2 s:\n{}",
        gw.log()
    );
}

/// One HTTP request seen by a [`HeaderRecorder`]: lower-case header names
/// to values, and the body.
type Seen = (BTreeMap<String, String>, String);

/// A TCP proxy in front of an HTTP upstream that records the header lines
/// and body of every request going through it.
struct HeaderRecorder {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl HeaderRecorder {
    async fn start(target: &str) -> HeaderRecorder {
        let rest = target.strip_prefix("http://").expect("an http:// URL");
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let upstream = authority.to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the recorder");
        let local = listener.local_addr().expect("recorder address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let record = record.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (server_read, mut server_write) = server.into_split();
                    let mut server_read = server_read;
                    let up = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut pending: Vec<u8> = Vec::new();
                        loop {
                            let n = match client_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            pending.extend_from_slice(&buf[..n]);
                            while let Some(request) = take_request(&mut pending) {
                                if let Ok(mut s) = record.lock() {
                                    s.push(request);
                                }
                            }
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let down = tokio::io::copy(&mut server_read, &mut client_write);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        HeaderRecorder {
            url: format!("http://{local}{path}"),
            seen,
            accept,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for HeaderRecorder {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Takes one whole HTTP/1.1 request (headers and a `Content-Length` body)
/// off the front of `pending`, if it has arrived.
fn take_request(pending: &mut Vec<u8>) -> Option<Seen> {
    let end = pending.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&pending[..end]).into_owned();
    let headers: BTreeMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if pending.len() < end + 4 + length {
        return None;
    }
    let body = String::from_utf8_lossy(&pending[end + 4..end + 4 + length]).into_owned();
    pending.drain(..end + 4 + length);
    Some((headers, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_authorization_sends_the_clients_credential_on_its_own_connection_only() {
    let fx = HttpFixture::start();
    let recorder = HeaderRecorder::start(&fx.url).await;
    let gw = Gateway::start(
        &GatewayConfig::new()
            .http_upstream("api", &recorder.url)
            .upstream_extra("forward_authorization = true")
            .upstream_extra(
                "headers = { Authorization = \"Bearer configured\", X-Extra = \"kept\" }",
            ),
    )
    .await;
    assert!(!gw.admin_key.is_empty(), "authentication is on");
    let client_credential = format!("Bearer {}", gw.admin_key);

    let (session, _) = connect(&gw).await;
    let echo = call_tool(&session, "echo", json!({"message": "from-session"})).await;
    assert_eq!(text_of(&echo), "from-session");
    let modern = connect_modern(&gw).await;
    let echo = call_tool(&modern, "echo", json!({"message": "from-2026"})).await;
    assert_eq!(text_of(&echo), "from-2026");

    let seen = recorder.seen();
    let auth_of = |marker: &str| -> Vec<String> {
        seen.iter()
            .filter(|(_, body)| body.contains(marker))
            .map(|(h, _)| h.get("authorization").cloned().unwrap_or_default())
            .collect()
    };
    assert_eq!(
        auth_of("from-session"),
        [client_credential],
        "the session's call carries the client's credential"
    );
    assert_eq!(
        auth_of("from-2026"),
        ["Bearer configured"],
        "a 2026-07-28 call goes over the shared connection, with the configured header"
    );
    assert!(
        seen.iter().any(|(h, body)| body.contains("tools/list")
            && h.get("authorization").map(String::as_str) == Some("Bearer configured")),
        "the catalog is listed with the configured identity"
    );
    assert!(
        seen.iter()
            .all(|(h, _)| h.get("x-extra").map(String::as_str) == Some("kept")),
        "other configured headers go with every request"
    );
}

/// A stdio upstream that never answers `initialize` (`sleep` reads nothing)
/// with a 1 s connect timeout: the process of each timed-out attempt is
/// stopped (2 s grace after its stdin closed, then killed), so the restarts
/// do not pile up processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_never_answers_initialize_is_stopped_after_its_connect_timeout() {
    let sleep = serde_json::to_string(&in_path("sleep").display().to_string())
        .expect("a path as a TOML basic string");
    let config = GatewayConfig::new().toml(&format!(
        "[[upstreams]]\nname = \"mute\"\ntransport = \"stdio\"\ncommand = {sleep}\nargs = [\"600\"]\nconnect_timeout_secs = 1\n"
    ));
    let gw = Gateway::start(&config).await;
    let gw_pid = gw.pid().expect("the gateway runs");
    let first = eventually("the first `sleep` child", WAIT, || async {
        let d = descendants(gw_pid);
        (!d.is_empty()).then_some(d)
    })
    .await;
    // 1 s timeout and 2 s grace, with room for a slow machine.
    eventually(
        "the first timed-out children to be stopped",
        Duration::from_secs(10),
        || async { first.iter().all(|&p| !alive(p)).then_some(()) },
    )
    .await;
    let live = descendants(gw_pid);
    assert!(
        live.len() <= 3,
        "only attempts within their timeout or grace may be alive, not {live:?}"
    );
    let timeouts = log_lines(&gw)
        .iter()
        .filter(|l| {
            // `upstream down` at start-up, `upstream reconnect failed` after.
            let why = l["reason"].as_str().or(l["error"].as_str());
            l["upstream"] == "mute" && why.is_some_and(|e| e.contains("connect_timeout_secs"))
        })
        .count();
    assert!(
        timeouts >= 2,
        "the upstream was retried and timed out each time:\n{}",
        gw.log()
    );
}
