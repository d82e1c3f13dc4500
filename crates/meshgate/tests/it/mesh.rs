//! The agent mesh end to end: a real gateway, real `meshgate-agent`
//! processes driven by task payloads, raw WebSocket agents for the protocol's
//! error paths, and submitters over REST, SSE and MCP.

use std::collections::{BTreeSet, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use rmcp::model::{CallToolRequest, ClientRequest, ServerResult};
use rmcp::service::PeerRequestOptions;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::{
    Gateway, GatewayConfig, Seen, SseReader, WAIT, agent_bin, call, call_tool, connect, create_key,
    metric_value, send, tool_names,
};

/// Longest wait of a flow that spans several processes (agents connecting,
/// retries with backoff, heartbeat timeouts) on a slow shared machine.
pub(crate) const FLOW_WAIT: Duration = Duration::from_secs(20);

/// Task states that end a task.
const TERMINAL: [&str; 4] = ["completed", "failed", "cancelled", "timeout"];

// ---------------------------------------------------------------------------
// Gateway and REST helpers
// ---------------------------------------------------------------------------

/// A gateway configuration with short mesh timers; `overrides` replace or
/// add `[mesh]` keys (values are TOML).
pub(crate) fn mesh_config(overrides: &[(&str, &str)]) -> GatewayConfig {
    let mut keys: Vec<(String, String)> = [
        ("heartbeat_interval_secs", "1"),
        ("heartbeat_timeout_secs", "10"),
        ("reconnect_grace_secs", "1"),
        ("retry_backoff_initial_ms", "50"),
        ("retry_backoff_max_ms", "200"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    for (k, v) in overrides {
        match keys.iter_mut().find(|(key, _)| key == k) {
            Some(entry) => entry.1 = (*v).to_owned(),
            None => keys.push(((*k).to_owned(), (*v).to_owned())),
        }
    }
    let body: Vec<String> = keys.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    GatewayConfig::new().toml(&format!("[mesh]\n{}\n", body.join("\n")))
}

/// A new key with role `agent` (in `tenant`, or the default tenant).
pub(crate) async fn agent_key(gw: &Gateway, tenant: Option<&str>) -> String {
    let mut body = json!({"name": "agent", "role": "agent"});
    if let Some(t) = tenant {
        body["tenant"] = json!(t);
    }
    create_key(gw, body).await.0
}

/// A new key with role `developer` in `tenant`.
pub(crate) async fn developer_key(gw: &Gateway, tenant: &str) -> String {
    create_key(
        gw,
        json!({"name": format!("dev-{tenant}"), "role": "developer", "tenant": tenant}),
    )
    .await
    .0
}

/// `POST /api/v1/tasks` with one task; it must be created (201).
pub(crate) async fn submit(gw: &Gateway, http: &reqwest::Client, body: Value) -> String {
    let (status, task) = send(
        http,
        Method::POST,
        &gw.url("/api/v1/tasks"),
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "submit {body}: {task}");
    task["id"]
        .as_str()
        .unwrap_or_else(|| panic!("the task has no id: {task}"))
        .to_owned()
}

/// `POST /api/v1/tasks` with a batch; the ids of the created tasks, in order.
async fn submit_batch(gw: &Gateway, bodies: Vec<Value>) -> Vec<String> {
    let (status, answer) = send(
        &gw.client(),
        Method::POST,
        &gw.url("/api/v1/tasks"),
        Some(Value::Array(bodies)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {answer}"))
        .iter()
        .map(|r| {
            assert_eq!(r["created"], true, "{r}");
            r["task"]["id"].as_str().expect("task id").to_owned()
        })
        .collect()
}

/// `GET /api/v1/tasks/{id}` with the admin key; it must exist.
pub(crate) async fn get_task(gw: &Gateway, id: &str) -> Value {
    let (status, task) = gw.get_json(&format!("/api/v1/tasks/{id}")).await;
    assert_eq!(status, StatusCode::OK, "GET task {id}: {task}");
    task
}

/// Polls the task until `done` holds, for up to [`FLOW_WAIT`].
pub(crate) async fn wait_task(
    gw: &Gateway,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + FLOW_WAIT;
    loop {
        let task = get_task(gw, id).await;
        if done(&task) {
            return task;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} did not reach {what} within {FLOW_WAIT:?}; it is now: {task:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the task until it has ended.
pub(crate) async fn wait_finished(gw: &Gateway, id: &str) -> Value {
    wait_task(gw, id, "a terminal state", |t| {
        TERMINAL.iter().any(|s| t["state"] == *s)
    })
    .await
}

/// Asserts that `task` completed on `agent`, as both the task and the
/// agent's result say.
#[track_caller]
fn assert_completed_by(task: &Value, agent: &str) {
    assert_eq!(task["state"], "completed", "{task:#}");
    assert_eq!(task["agent_id"], agent, "routed elsewhere: {task:#}");
    assert_eq!(task["result"]["agent"], agent, "{task:#}");
}

/// The task id of a string field.
fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_owned()
}

// ---------------------------------------------------------------------------
// Example agent processes
// ---------------------------------------------------------------------------

/// A running `meshgate-agent`; its stdout events are collected, and it is
/// killed and reaped on drop.
pub(crate) struct AgentProc {
    id: String,
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl AgentProc {
    /// Starts `meshgate-agent --id id <args>` against `gw` with `key`.
    pub(crate) fn spawn(gw: &Gateway, key: &str, id: &str, args: &[&str]) -> AgentProc {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--url")
            .arg(format!("ws://127.0.0.1:{}/ws", gw.port))
            .args(["--id", id])
            .args(["--reconnect-initial-ms", "100", "--reconnect-max-ms", "500"])
            .args(args)
            .env("MESHGATE_AGENT_KEY", key)
            .env("RUST_LOG", "warn")
            .env_remove("MESHGATE_AGENT_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent_bin().display()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let event = serde_json::from_str(&line).unwrap_or(json!({"unparsed": line}));
                sink.lock().expect("lock").push(event);
            }
        });
        let mut err = child.stderr.take().expect("stderr is piped");
        let log = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    return;
                }
                log.lock()
                    .expect("lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        AgentProc {
            id: id.to_owned(),
            child,
            events,
            stderr,
        }
    }

    /// Starts the agent and waits until the gateway accepted its registration.
    pub(crate) async fn start(gw: &Gateway, key: &str, id: &str, args: &[&str]) -> AgentProc {
        let agent = AgentProc::spawn(gw, key, id, args);
        agent
            .wait_event("its registration", |e| e["event"] == "registered")
            .await;
        agent
    }

    /// Everything printed so far.
    pub(crate) fn events(&self) -> Vec<Value> {
        self.events.lock().expect("lock").clone()
    }

    /// Whether it printed event `name` about `task_id`.
    pub(crate) fn saw(&self, name: &str, task_id: &str) -> bool {
        self.events()
            .iter()
            .any(|e| e["event"] == name && e["task_id"] == task_id)
    }

    /// Ids of the tasks it was assigned.
    pub(crate) fn assigned(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["event"] == "assigned")
            .filter_map(|e| e["task_id"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits (up to [`FLOW_WAIT`]) for an event matching `pick`.
    pub(crate) async fn wait_event(&self, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + FLOW_WAIT;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pick(e)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "agent {} did not report {what} within {FLOW_WAIT:?}; its events: {:#?}\nits stderr:\n{}",
                self.id,
                self.events(),
                self.stderr.lock().expect("lock")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for event `name` about `task_id`.
    pub(crate) async fn wait_task_event(&self, name: &str, task_id: &str) -> Value {
        self.wait_event(&format!("`{name}` of task {task_id}"), |e| {
            e["event"] == name && e["task_id"] == task_id
        })
        .await
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// A raw WebSocket agent
// ---------------------------------------------------------------------------

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the reader of a raw agent saw.
#[derive(Debug)]
enum Frame {
    Json(Value),
    Close(Option<u16>),
    Ended,
}

/// An agent speaking the wire protocol by hand. A background task reads
/// (answering pings) until [`RawAgent::go_silent`].
struct RawAgent {
    sink: SplitSink<Ws, Message>,
    frames: mpsc::UnboundedReceiver<Frame>,
    reader: tokio::task::JoinHandle<()>,
    stash: VecDeque<Value>,
    next_id: i64,
}

/// Opens `/ws` as agent `id` with `key` (none: no credential); the HTTP
/// status of a refused upgrade otherwise.
async fn ws_connect(gw: &Gateway, key: Option<&str>, id: &str) -> Result<Ws, u16> {
    let mut request = format!("ws://127.0.0.1:{}/ws", gw.port)
        .into_client_request()
        .expect("a valid WebSocket request");
    let headers = request.headers_mut();
    if let Some(key) = key {
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {key}")).expect("header"),
        );
    }
    headers.insert("x-agent-id", HeaderValue::from_str(id).expect("header"));
    headers.insert("x-agent-type", HeaderValue::from_static("raw"));
    let connected = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("the WebSocket handshake did not finish in time");
    match connected {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("the WebSocket handshake failed: {e}"),
    }
}

/// `agent.register` params of a raw agent.
fn registration(id: &str, capabilities: Value) -> Value {
    json!({"id": id, "type": "raw", "name": id, "version": "1.0.0",
           "capabilities": capabilities, "max_concurrent_tasks": 4})
}

fn is_answer_to(m: &Value, id: &Value) -> bool {
    m.get("method").is_none()
        && m.get("id").unwrap_or(&Value::Null) == id
        && (m.get("result").is_some() || m.get("error").is_some())
}

impl RawAgent {
    /// Connects (the upgrade must succeed) without registering.
    async fn connect(gw: &Gateway, key: &str, id: &str) -> RawAgent {
        let ws = ws_connect(gw, Some(key), id)
            .await
            .unwrap_or_else(|status| panic!("the upgrade of {id} was refused with {status}"));
        let (sink, mut stream) = ws.split();
        let (tx, frames) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                let frame = match msg {
                    Ok(Message::Text(t)) => Frame::Json(
                        serde_json::from_str(t.as_str())
                            .unwrap_or_else(|_| json!({"unparsed": t.as_str()})),
                    ),
                    Ok(Message::Close(c)) => Frame::Close(c.map(|c| u16::from(c.code))),
                    Ok(_) => continue,
                    Err(_) => break,
                };
                let last = matches!(frame, Frame::Close(_));
                if tx.send(frame).is_err() || last {
                    return;
                }
            }
            let _ = tx.send(Frame::Ended);
        });
        RawAgent {
            sink,
            frames,
            reader,
            stash: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Connects and registers with `capabilities`.
    async fn start(gw: &Gateway, key: &str, id: &str, capabilities: Value) -> RawAgent {
        let mut agent = RawAgent::connect(gw, key, id).await;
        let answer = agent
            .call("agent.register", registration(id, capabilities))
            .await;
        assert_eq!(answer["result"]["agent_id"], id, "register {id}: {answer}");
        agent
    }

    /// Sends one text frame.
    async fn send_text(&mut self, text: String) {
        self.sink
            .send(Message::text(text))
            .await
            .expect("send a frame");
    }

    async fn next_frame(&mut self, what: &str) -> Frame {
        tokio::time::timeout(WAIT, self.frames.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; stashed: {:?}", self.stash))
            .unwrap_or(Frame::Ended)
    }

    /// The next message matching `pick`; others are kept for later.
    async fn message(&mut self, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.stash.iter().position(&pick) {
            return self.stash.remove(i).expect("present");
        }
        loop {
            match self.next_frame(what).await {
                Frame::Json(m) if pick(&m) => return m,
                Frame::Json(m) => self.stash.push_back(m),
                other => panic!("the connection ended ({other:?}) while waiting for {what}"),
            }
        }
    }

    /// Sends a request and returns the whole answer (`result` or `error`).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = json!(self.next_id);
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send_text(request.to_string()).await;
        self.message(&format!("the answer to {method}"), |m| is_answer_to(m, &id))
            .await
    }

    /// The answer to a message that had no usable id.
    async fn answer_without_id(&mut self, what: &str) -> Value {
        self.message(what, |m| is_answer_to(m, &Value::Null)).await
    }

    /// The next notification `method`'s params.
    async fn notification(&mut self, method: &str) -> Value {
        let m = self
            .message(&format!("a {method} notification"), |m| {
                m["method"] == method && m.get("id").is_none()
            })
            .await;
        m["params"].clone()
    }

    /// The id of the next task assigned to this agent.
    async fn assigned_task(&mut self) -> String {
        let params = self.notification("task.assigned").await;
        id_of(&params["task"])
    }

    /// Waits for the gateway's close frame; its code.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.next_frame("a close frame").await {
                Frame::Json(m) => self.stash.push_back(m),
                Frame::Close(code) => return code,
                Frame::Ended => return None,
            }
        }
    }

    /// Stops reading (so pings go unanswered) and sending, keeping the
    /// connection open.
    fn go_silent(&self) {
        self.reader.abort();
    }
}

impl Drop for RawAgent {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Asserts a JSON-RPC error with `code` and, if given, `data.field`.
#[track_caller]
fn assert_rpc_error(answer: &Value, code: i64, field: Option<&str>) {
    assert_eq!(answer["error"]["code"], code, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "the error says what is wrong: {answer}"
    );
    if let Some(field) = field {
        assert_eq!(answer["error"]["data"]["field"], field, "{answer}");
    }
}

// ---------------------------------------------------------------------------
// Routing end to end
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_over_rest_and_mcp_are_routed_by_strategy_to_sdk_agents() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let _a = AgentProc::start(
        &gw,
        &key,
        "sum-a",
        &[
            "--capability",
            "summarize=0.9",
            "--capability",
            "lang:python",
            "--config",
            r#"{"cost_per_task": 0.9}"#,
        ],
    )
    .await;
    let _b = AgentProc::start(
        &gw,
        &key,
        "sum-b",
        &[
            "--capability",
            "summarize=0.5",
            "--config",
            r#"{"cost_per_task": 0.1}"#,
        ],
    )
    .await;
    let c = AgentProc::start(&gw, &key, "tr-c", &["--capability", "translate"]).await;
    let http = gw.client();
    let summarize = |strategy: &str| {
        json!({"type": "summarize", "required_capabilities": ["summarize"],
               "strategy": strategy, "payload": {"text": "long"}})
    };

    // capability_match: the higher confidence wins.
    let id = submit(&gw, &http, summarize("capability_match")).await;
    assert_completed_by(&wait_finished(&gw, &id).await, "sum-a");
    let id = submit(
        &gw,
        &http,
        json!({"type": "review", "required_capabilities": ["lang:python"]}),
    )
    .await;
    assert_completed_by(&wait_finished(&gw, &id).await, "sum-a");
    let id = submit(
        &gw,
        &http,
        json!({"type": "translate", "required_capabilities": ["translate"], "payload": {"to": "de"}}),
    )
    .await;
    let translated = wait_finished(&gw, &id).await;
    assert_completed_by(&translated, "tr-c");
    assert_eq!(translated["result"]["echo"], json!({"to": "de"}));

    // cost_optimized: the cheaper agent, although less confident.
    let id = submit(&gw, &http, summarize("cost_optimized")).await;
    assert_completed_by(&wait_finished(&gw, &id).await, "sum-b");

    // least_loaded and round_robin spread work over equally eligible agents.
    for strategy in ["least_loaded", "round_robin"] {
        let mut body = summarize(strategy);
        body["payload"] = json!({"sleep_ms": 300});
        let ids = submit_batch(&gw, vec![body; 4]).await;
        let mut used = BTreeSet::new();
        for id in &ids {
            let task = wait_finished(&gw, id).await;
            assert_eq!(task["state"], "completed", "{task:#}");
            assert_eq!(task["result"]["agent"], task["agent_id"], "{task:#}");
            used.insert(task["agent_id"].as_str().unwrap_or_default().to_owned());
        }
        assert_eq!(
            used,
            BTreeSet::from(["sum-a".to_owned(), "sum-b".to_owned()]),
            "{strategy} gave all four tasks to one agent"
        );
    }

    // The same routing through the MCP tool, waiting for the result.
    let (session, _client) = connect(&gw).await;
    for (strategy, agent) in [("capability_match", "sum-a"), ("cost_optimized", "sum-b")] {
        let mut args = summarize(strategy);
        args["wait"] = json!(true);
        let r = call_tool(&session, "task_submit", args).await;
        assert_ne!(r.is_error, Some(true), "{r:?}");
        let task = r.structured_content.clone().expect("the task as JSON");
        assert_completed_by(&task, agent);
    }

    assert_eq!(
        c.assigned(),
        vec![id_of(&translated)],
        "only the translate task reaches the translator"
    );
    session.cancel().await.ok();
}

// ---------------------------------------------------------------------------
// Progress
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_event_stream_shows_states_then_progress_and_ends_after_completion() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let http = gw.client();
    // Nobody can take the task yet, so the stream starts before any progress.
    let id = submit(
        &gw,
        &http,
        json!({"type": "report", "required_capabilities": ["report"],
               "payload": {"sleep_ms": 900, "progress_steps": 3}}),
    )
    .await;
    let r = http
        .get(gw.url(&format!("/api/v1/tasks/{id}/events")))
        .send()
        .await
        .expect("GET events");
    assert_eq!(r.status(), StatusCode::OK);
    let mut sse = SseReader::new(r);
    let (first_event, first) = sse.next_message("the current state").await;
    assert_eq!(first_event.event.as_deref(), Some("state"));
    assert_eq!(first["state"], "pending", "{first}");

    let _agent = AgentProc::start(&gw, &key, "reporter", &["--capability", "report"]).await;
    let mut seen: Vec<(String, Value)> = Vec::new();
    let deadline = tokio::time::Instant::now() + FLOW_WAIT;
    while let Some(ev) = tokio::time::timeout_at(deadline, sse.next())
        .await
        .expect("the event stream did not end in time")
    {
        if let Some(data) = ev.json() {
            seen.push((ev.event.clone().unwrap_or_default(), data));
        }
    }
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    let states: Vec<&str> = seen
        .iter()
        .filter(|(k, _)| k == "state")
        .filter_map(|(_, d)| d["state"].as_str())
        .collect();
    let messages: Vec<&str> = seen
        .iter()
        .filter(|(k, _)| k == "progress")
        .filter_map(|(_, d)| d["message"].as_str())
        .collect();
    assert_eq!(
        messages,
        ["step 1 of 3", "step 2 of 3", "step 3 of 3"],
        "{seen:#?}"
    );
    assert_eq!(states.first(), Some(&"assigned"), "{seen:#?}");
    assert_eq!(states.last(), Some(&"completed"), "{seen:#?}");
    assert!(states.contains(&"in_progress"), "{seen:#?}");
    let first_progress = kinds
        .iter()
        .position(|k| *k == "progress")
        .expect("progress");
    assert!(
        kinds[..first_progress].contains(&"state"),
        "state events come before progress: {kinds:?}"
    );
    assert_eq!(
        kinds.last(),
        Some(&"state"),
        "the stream ends after `completed`"
    );
    let (_, last) = seen.last().expect("events");
    assert_eq!(last["task"]["result"]["agent"], "reporter", "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_task_submit_waiting_relays_the_agents_progress_to_the_client() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let _agent = AgentProc::start(&gw, &key, "stepper", &["--capability", "steps"]).await;
    let (session, client) = connect(&gw).await;

    let request = ClientRequest::CallToolRequest(CallToolRequest::new(call(
        "task_submit",
        json!({"type": "steps", "required_capabilities": ["steps"], "wait": true,
               "payload": {"sleep_ms": 900, "progress_steps": 3}}),
    )));
    let handle = session
        .peer()
        .send_request_with_option(request, PeerRequestOptions::with_timeout(FLOW_WAIT))
        .await
        .expect("send tools/call");
    let token = handle.progress_token.clone();
    let answer = handle.await_response().await.expect("task_submit answers");
    let ServerResult::CallToolResult(result) = answer else {
        panic!("unexpected answer {answer:?}");
    };
    let task = result.structured_content.clone().expect("the task");
    assert_completed_by(&task, "stepper");

    let messages = client
        .wait_for("the agent's last progress step", |seen| {
            let messages: Vec<String> = seen
                .iter()
                .filter_map(|s| match s {
                    Seen::Progress(p) if p.progress_token == token => p.message.clone(),
                    _ => None,
                })
                .collect();
            messages
                .iter()
                .any(|m| m == "step 3 of 3")
                .then_some(messages)
        })
        .await;
    let mut values: Vec<(f64, Option<f64>, Option<String>)> = client
        .seen()
        .iter()
        .filter_map(|s| match s {
            Seen::Progress(p) if p.progress_token == token => {
                Some((p.progress, p.total, p.message.clone()))
            }
            _ => None,
        })
        .collect();
    // rmcp hands each notification to its own task, so arrival order is not
    // guaranteed: check the values, sorted.
    values.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut previous = -1.0;
    for (progress, total, _) in &values {
        assert!(
            *progress > previous && *total == Some(100.0) && *progress <= 100.0,
            "progress values are distinct and stay within their total: {values:?}"
        );
        previous = *progress;
    }
    for step in ["step 1 of 3", "step 2 of 3"] {
        assert!(
            messages.iter().any(|m| m == step),
            "{step} missing: {messages:?}"
        );
    }
    session.cancel().await.ok();
}

// ---------------------------------------------------------------------------
// Protocol validation with a raw WebSocket client
// ---------------------------------------------------------------------------

/// A gateway for the validation tests: small result limits, short extensions.
fn validation_config() -> GatewayConfig {
    mesh_config(&[
        ("max_result_bytes", "65536"),
        ("max_message_bytes", "1048576"),
        ("blob_threshold_bytes", "4096"),
        ("max_extension_secs", "5"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_upgrade_is_refused_over_http_for_bad_credentials_and_headers() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let agent = agent_key(&gw, None).await;
    let developer = developer_key(&gw, "default").await;

    assert_eq!(ws_connect(&gw, None, "w-1").await.err(), Some(401));
    assert_eq!(
        ws_connect(&gw, Some("mg_not_a_real_key"), "w-1")
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        ws_connect(&gw, Some(&developer), "w-1").await.err(),
        Some(403),
        "a developer key lacks agent:connect"
    );
    assert_eq!(
        ws_connect(&gw, Some(&agent), "bad/id").await.err(),
        Some(400)
    );
    // The refusal's body names the problem (read over plain HTTP).
    let r = gw
        .client_with_key(&agent)
        .get(gw.url("/ws"))
        .header("x-agent-id", "bad/id")
        .header("x-agent-type", "raw")
        .send()
        .await
        .expect("GET /ws");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.expect("JSON body");
    assert_eq!(body["error"]["code"], 4005, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("X-Agent-ID")),
        "{body}"
    );
    let r = gw
        .client_with_key(&agent)
        .get(gw.url("/ws"))
        .header("x-agent-id", "w-1")
        .send()
        .await
        .expect("GET /ws");
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "X-Agent-Type is required"
    );
    // The right key and a good id get through.
    assert!(ws_connect(&gw, Some(&agent), "w-1").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_early_unknown_and_invalid_agent_messages_get_their_error_codes() {
    let gw = Gateway::start(&validation_config()).await;
    let key = agent_key(&gw, None).await;
    let mut raw = RawAgent::connect(&gw, &key, "val-1").await;

    raw.send_text("{not json".into()).await;
    let answer = raw
        .answer_without_id("the answer to a malformed frame")
        .await;
    assert_rpc_error(&answer, 4000, None);

    let answer = raw.call("task.accept", json!({"task_id": "t-1"})).await;
    assert_rpc_error(&answer, 4000, None);
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("agent.register")),
        "{answer}"
    );

    let cases = [
        (json!([]), "val-1", "capabilities"),
        (
            json!(["summarize", {"name": "y", "confidence": 1.5}]),
            "val-1",
            "capabilities[1].confidence",
        ),
        (json!(["summarize"]), "someone-else", "id"),
    ];
    for (capabilities, id, field) in cases {
        let answer = raw
            .call("agent.register", registration(id, capabilities))
            .await;
        assert_rpc_error(&answer, 4005, Some(field));
    }

    let answer = raw
        .call(
            "agent.register",
            registration("val-1", json!(["summarize"])),
        )
        .await;
    assert_eq!(answer["result"]["agent_id"], "val-1", "{answer}");
    assert_eq!(answer["result"]["heartbeat_interval_secs"], 1, "{answer}");

    let answer = raw.call("agent.dance", json!({})).await;
    assert_rpc_error(&answer, 4004, None);
    assert_eq!(answer["error"]["data"]["method"], "agent.dance", "{answer}");

    let answer = raw.call("agent.heartbeat", json!({"status": "ok"})).await;
    assert!(
        answer["result"]["server_time_ms"].as_i64().is_some(),
        "the connection still works: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_live_connection_with_the_same_agent_id_is_refused_4008_and_closed_1008() {
    let gw = Gateway::start(&validation_config()).await;
    let key = agent_key(&gw, None).await;
    let mut first = RawAgent::start(&gw, &key, "dup-1", json!(["work"])).await;

    let mut second = RawAgent::connect(&gw, &key, "dup-1").await;
    let answer = second
        .call("agent.register", registration("dup-1", json!(["work"])))
        .await;
    assert_rpc_error(&answer, 4008, None);
    assert_eq!(second.close_code().await, Some(1008));

    let answer = first.call("agent.heartbeat", json!({})).await;
    assert!(
        answer.get("result").is_some(),
        "the first one lives: {answer}"
    );
    let (_, agent) = gw.get_json("/api/v1/agents/dup-1").await;
    assert_eq!(agent["status"], "online", "{agent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_messages_are_refused_for_bad_results_foreign_cancelled_and_overextended_tasks() {
    let gw = Gateway::start(&validation_config()).await;
    let key = agent_key(&gw, None).await;
    let http = gw.client();
    let mut holder = RawAgent::start(&gw, &key, "holder", json!(["raw"])).await;
    let mut other = RawAgent::start(&gw, &key, "other", json!(["other"])).await;

    let first = submit(
        &gw,
        &http,
        json!({"type": "raw", "required_capabilities": ["raw"]}),
    )
    .await;
    assert_eq!(holder.assigned_task().await, first);
    let answer = holder.call("task.accept", json!({"task_id": first})).await;
    assert_eq!(answer["result"]["state"], "accepted", "{answer}");

    let answer = holder
        .call(
            "task.complete",
            json!({"task_id": first, "result": "not an object"}),
        )
        .await;
    assert_rpc_error(&answer, 4005, Some("result"));

    let answer = other
        .call("task.complete", json!({"task_id": first, "result": {}}))
        .await;
    assert_rpc_error(&answer, 4008, None);
    let answer = other
        .call(
            "task.progress",
            json!({"task_id": "t-nothing", "progress": 0.5}),
        )
        .await;
    assert_rpc_error(&answer, 4008, None);

    // The grant is cut to mesh.max_extension_secs; nothing is left after.
    let answer = holder
        .call("task.extend", json!({"task_id": first, "seconds": 100}))
        .await;
    assert_eq!(answer["result"]["granted_secs"], 5, "{answer}");
    let answer = holder
        .call("task.extend", json!({"task_id": first, "seconds": 1}))
        .await;
    assert_rpc_error(&answer, 4005, Some("seconds"));

    let answer = holder
        .call(
            "task.complete",
            json!({"task_id": first, "result": {"ok": true}}),
        )
        .await;
    assert_eq!(answer["result"]["state"], "completed", "{answer}");
    let done = get_task(&gw, &first).await;
    assert_eq!(done["result"], json!({"ok": true}), "{done}");

    // Cancelled by the submitter: the agent is told, and later messages get 4006.
    let second = submit(
        &gw,
        &http,
        json!({"type": "raw", "required_capabilities": ["raw"]}),
    )
    .await;
    assert_eq!(holder.assigned_task().await, second);
    let (status, cancelled) = send(
        &http,
        Method::POST,
        &gw.url(&format!("/api/v1/tasks/{second}/cancel")),
        Some(json!({"reason": "changed my mind"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    let note = holder.notification("task.cancel").await;
    assert_eq!(note["task_id"], second, "{note}");
    let answer = holder
        .call("task.progress", json!({"task_id": second, "progress": 0.5}))
        .await;
    assert_rpc_error(&answer, 4006, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_result_is_refused_4007_and_a_large_one_is_stored_as_a_blob() {
    let gw = Gateway::start(&validation_config()).await;
    let key = agent_key(&gw, None).await;
    let http = gw.client();
    let mut raw = RawAgent::start(&gw, &key, "big-1", json!(["raw"])).await;

    let id = submit(
        &gw,
        &http,
        json!({"type": "raw", "required_capabilities": ["raw"]}),
    )
    .await;
    assert_eq!(raw.assigned_task().await, id);
    raw.call("task.accept", json!({"task_id": id})).await;

    let answer = raw
        .call(
            "task.complete",
            json!({"task_id": id, "result": {"data": "x".repeat(70_000)}}),
        )
        .await;
    assert_rpc_error(&answer, 4007, None);
    let task = get_task(&gw, &id).await;
    assert_eq!(
        task["state"], "accepted",
        "the task stays with the agent: {task}"
    );
    assert_eq!(task["agent_id"], "big-1", "{task}");

    let result = json!({"data": "y".repeat(10_000), "pages": 3});
    let answer = raw
        .call(
            "task.complete",
            json!({"task_id": id, "result": result.clone()}),
        )
        .await;
    assert_eq!(answer["result"]["state"], "completed", "{answer}");
    let task = get_task(&gw, &id).await;
    let blob = &task["result"]["blob"];
    let url = blob["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no blob reference: {task}"));
    assert!(url.starts_with("/api/v1/blobs/"), "{blob}");
    assert!(blob["size"].as_u64().is_some_and(|s| s > 10_000), "{blob}");
    let (status, stored) = gw.get_json(url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored, result, "the blob holds the original result");

    // A frame over mesh.max_message_bytes ends the connection with 1008.
    // The gateway refuses it from the frame header and closes while this
    // side may still be writing the payload, so the send may fail with a
    // broken pipe and a reset may swallow the close frame; either way the
    // connection must end, with 1008 if a close frame arrives.
    let _ = raw
        .sink
        .send(Message::text(format!(
            "{{\"jsonrpc\": \"2.0\", \"method\": \"agent.heartbeat\", \"params\": {{\"pad\": \"{}\"}}}}",
            "z".repeat(1_100_000)
        )))
        .await;
    let code = raw.close_code().await;
    assert!(
        code.is_none() || code == Some(1008),
        "an oversized frame closes the connection with 1008, got {code:?}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, agent) = gw.get_json("/api/v1/agents/big-1").await;
        if agent["status"] != "online" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent is still online after its oversized frame: {agent}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Queueing, retries, timeouts, cancellation
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_for_a_missing_capability_waits_with_a_reason_until_a_capable_agent_connects() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let _plain = AgentProc::start(&gw, &key, "plain", &["--capability", "summarize"]).await;
    let id = submit(
        &gw,
        &gw.client(),
        json!({"type": "ocr", "required_capabilities": ["ocr"]}),
    )
    .await;
    let task = get_task(&gw, &id).await;
    assert_eq!(task["state"], "pending", "{task}");
    let reason = task["waiting_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("`ocr`"),
        "the reason names the capability: {task}"
    );

    let _ocr = AgentProc::start(&gw, &key, "reader", &["--capability", "ocr"]).await;
    assert_completed_by(&wait_finished(&gw, &id).await, "reader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_then_dead_lettered_and_permanent_ones_end_at_once() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let agent = AgentProc::start(&gw, &key, "failer", &["--capability", "work"]).await;
    let http = gw.client();

    let id = submit(
        &gw,
        &http,
        json!({"type": "work", "required_capabilities": ["work"], "max_retries": 1,
               "payload": {"fail": "boom", "retryable": true}}),
    )
    .await;
    let task = wait_finished(&gw, &id).await;
    assert_eq!(task["state"], "failed", "{task:#}");
    assert_eq!(task["dead_letter"], true, "{task:#}");
    assert_eq!(task["attempts"], 2, "one retry: {task:#}");
    assert!(
        task["error"].as_str().is_some_and(|e| e.contains("boom")),
        "{task:#}"
    );

    let id = submit(
        &gw,
        &http,
        json!({"type": "work", "required_capabilities": ["work"], "max_retries": 3,
               "payload": {"fail": "bad input"}}),
    )
    .await;
    let task = wait_finished(&gw, &id).await;
    assert_eq!(task["state"], "failed", "{task:#}");
    assert_eq!(task["dead_letter"], true, "{task:#}");
    assert_eq!(task["attempts"], 1, "not retried: {task:#}");
    assert!(agent.saw("failed", &id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_task_is_retried_on_another_agent_before_it_is_dead_lettered() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let one = AgentProc::start(&gw, &key, "picky-1", &["--capability", "work"]).await;
    let two = AgentProc::start(&gw, &key, "picky-2", &["--capability", "work"]).await;

    let id = submit(
        &gw,
        &gw.client(),
        json!({"type": "work", "required_capabilities": ["work"], "max_retries": 1,
               "payload": {"reject": true}}),
    )
    .await;
    let task = wait_finished(&gw, &id).await;
    assert_eq!(task["state"], "failed", "{task:#}");
    assert_eq!(task["dead_letter"], true, "{task:#}");
    assert_eq!(task["attempts"], 2, "{task:#}");
    let mut rejected_by: Vec<&str> = task["rejected_by"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    rejected_by.sort();
    assert_eq!(
        rejected_by,
        ["picky-1", "picky-2"],
        "the retry went to the other agent: {task:#}"
    );
    assert!(one.saw("rejected", &id) && two.saw("rejected", &id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_past_its_timeout_is_cancelled_on_the_agent_and_dead_lettered() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let agent = AgentProc::start(&gw, &key, "sleeper", &["--capability", "work"]).await;

    let id = submit(
        &gw,
        &gw.client(),
        json!({"type": "work", "required_capabilities": ["work"], "max_retries": 0,
               "timeout_secs": 1, "payload": {"sleep_ms": 5000}}),
    )
    .await;
    let task = wait_finished(&gw, &id).await;
    assert_eq!(task["state"], "timeout", "{task:#}");
    assert_eq!(task["dead_letter"], true, "{task:#}");
    assert_eq!(task["attempts"], 1, "{task:#}");
    agent.wait_task_event("cancelled", &id).await;
    assert!(!agent.saw("completed", &id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_task_stops_it_on_the_agent_and_a_second_cancel_is_409() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let agent = AgentProc::start(&gw, &key, "worker", &["--capability", "work"]).await;
    let http = gw.client();

    let id = submit(
        &gw,
        &http,
        json!({"type": "work", "required_capabilities": ["work"],
               "payload": {"sleep_ms": 30000, "progress_steps": 60}}),
    )
    .await;
    wait_task(&gw, &id, "in_progress", |t| t["state"] == "in_progress").await;

    let url = gw.url(&format!("/api/v1/tasks/{id}/cancel"));
    let (status, task) = send(&http, Method::POST, &url, None).await;
    assert_eq!(status, StatusCode::OK, "{task}");
    assert_eq!(task["state"], "cancelled", "{task}");
    agent.wait_task_event("cancelled", &id).await;
    assert_eq!(get_task(&gw, &id).await["state"], "cancelled");

    let (status, again) = send(&http, Method::POST, &url, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["error"]["code"], 4008, "{again}");
}

// ---------------------------------------------------------------------------
// The REST task API
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_list_filters_by_state_and_pages_with_a_cursor() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let _agent = AgentProc::start(&gw, &key, "lister", &["--capability", "work"]).await;
    let http = gw.client();
    let body = json!({"type": "work", "required_capabilities": ["work"]});
    let ids = submit_batch(&gw, vec![body; 5]).await;
    for id in &ids {
        assert_eq!(wait_finished(&gw, id).await["state"], "completed");
    }
    let waiting = submit(
        &gw,
        &http,
        json!({"type": "work", "required_capabilities": ["nobody-has-this"]}),
    )
    .await;

    let mut pages: Vec<Vec<String>> = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let mut path = "/api/v1/tasks?state=completed&limit=2".to_owned();
        if let Some(c) = cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = gw.get_json(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let tasks = page["tasks"].as_array().expect("tasks");
        assert!(tasks.iter().all(|t| t["state"] == "completed"), "{page:#}");
        pages.push(tasks.iter().map(id_of).collect());
        cursor = page["next_cursor"].as_i64();
        if cursor.is_none() || pages.len() > 5 {
            break;
        }
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [2, 2, 1], "{pages:?}");
    let listed: BTreeSet<String> = pages.into_iter().flatten().collect();
    assert_eq!(listed.len(), 5, "pages are disjoint");
    assert_eq!(listed, ids.into_iter().collect::<BTreeSet<_>>());

    let (_, pending) = gw.get_json("/api/v1/tasks?state=pending").await;
    let pending: Vec<String> = pending["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(pending, [waiting]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmission_with_the_same_idempotency_key_replays_and_batches_answer_per_item() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let http = gw.client();
    let url = gw.url("/api/v1/tasks");
    let body = json!({"type": "order", "idempotency_key": "order-42"});

    let r = http.post(&url).json(&body).send().await.expect("POST");
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(r.headers().get("idempotent-replay").is_none());
    let first: Value = r.json().await.expect("JSON");

    let r = http.post(&url).json(&body).send().await.expect("POST");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()
            .get("idempotent-replay")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    let again: Value = r.json().await.expect("JSON");
    assert_eq!(again["id"], first["id"], "{again}");

    let r = http
        .post(&url)
        .header("idempotency-key", "order-42")
        .json(&json!({"type": "order"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::OK, "the header is a key too");
    let by_header: Value = r.json().await.expect("JSON");
    assert_eq!(by_header["id"], first["id"]);

    let (status, batch) = send(
        &http,
        Method::POST,
        &url,
        Some(json!([
            {"type": "order", "title": "fresh"},
            {"type": "order", "priority": 5000},
            {"type": "order", "idempotency_key": "order-42"},
        ])),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    let results = batch["results"].as_array().expect("results");
    assert_eq!(results.len(), 3, "{batch}");
    assert_eq!(results[0]["created"], true, "{batch:#}");
    assert_eq!(results[0]["task"]["title"], "fresh");
    assert_eq!(results[1]["error"]["code"], 4005, "{batch:#}");
    assert_eq!(
        results[1]["error"]["data"]["field"], "priority",
        "{batch:#}"
    );
    assert!(results[1].get("task").is_none());
    assert_eq!(results[2]["created"], false, "{batch:#}");
    assert_eq!(results[2]["task"]["id"], first["id"], "{batch:#}");
    let (status, _) = gw
        .get_json(&format!("/api/v1/tasks/{}", id_of(&results[0]["task"])))
        .await;
    assert_eq!(status, StatusCode::OK, "the valid item was stored");
}

// ---------------------------------------------------------------------------
// Agents: configuration, health, capabilities, heartbeat
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_update_reaches_the_agent_and_health_and_capabilities_can_be_queried() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let agent = AgentProc::start(
        &gw,
        &key,
        "cfg-1",
        &[
            "--capability",
            "summarize=0.7",
            "--capability",
            "tool:git",
            "--config",
            r#"{"model": "small"}"#,
        ],
    )
    .await;
    let http = gw.client();
    let (_, before) = gw.get_json("/api/v1/agents/cfg-1").await;
    assert_eq!(before["config_version"], 1, "{before}");
    assert_eq!(before["config"], json!({"model": "small"}));

    let (status, updated) = send(
        &http,
        Method::PUT,
        &gw.url("/api/v1/agents/cfg-1/config"),
        Some(json!({"config": {"model": "large", "cost_per_task": 0.3}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["config_version"], 2, "{updated}");
    let event = agent
        .wait_event("the new configuration", |e| e["event"] == "config")
        .await;
    assert_eq!(event["version"], 2, "{event}");
    assert_eq!(event["config"]["model"], "large", "{event}");
    let (_, after) = gw.get_json("/api/v1/agents/cfg-1").await;
    assert_eq!(after["config_version"], 2, "{after}");
    assert_eq!(after["config"]["model"], "large", "{after}");

    let (status, health) = send(
        &http,
        Method::POST,
        &gw.url("/api/v1/agents/cfg-1/health-check"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["active_tasks"], 0, "{health}");

    let (status, caps) = send(
        &http,
        Method::POST,
        &gw.url("/api/v1/agents/cfg-1/capability-query"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{caps}");
    let names: Vec<&str> = caps["capabilities"]
        .as_array()
        .unwrap_or_else(|| panic!("no capabilities: {caps}"))
        .iter()
        .filter_map(|c| c.as_str().or_else(|| c["name"].as_str()))
        .collect();
    assert_eq!(names, ["summarize", "tool:git"], "{caps}");

    let (status, missing) = send(
        &http,
        Method::POST,
        &gw.url("/api/v1/agents/nobody/health-check"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_is_marked_offline_and_its_task_moves_to_another_agent() {
    let gw = Gateway::start(&mesh_config(&[("heartbeat_timeout_secs", "3")])).await;
    let key = agent_key(&gw, None).await;
    let mut silent = RawAgent::start(&gw, &key, "silent", json!(["hb"])).await;
    let id = submit(
        &gw,
        &gw.client(),
        json!({"type": "hb", "required_capabilities": ["hb"], "max_retries": 2}),
    )
    .await;
    assert_eq!(silent.assigned_task().await, id);
    let answer = silent.call("task.accept", json!({"task_id": id})).await;
    assert_eq!(answer["result"]["state"], "accepted", "{answer}");

    // From now on it neither reads (so pings go unanswered) nor writes.
    silent.go_silent();
    let silent_since = Instant::now();
    let backup = AgentProc::start(&gw, &key, "backup", &["--capability", "hb"]).await;
    let deadline = Instant::now() + FLOW_WAIT;
    loop {
        let (_, agent) = gw.get_json("/api/v1/agents/silent").await;
        if agent["status"] != "online" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the silent agent is still online: {agent}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let offline_after = silent_since.elapsed();
    assert!(
        offline_after >= Duration::from_secs(2) && offline_after < Duration::from_secs(12),
        "marked offline {offline_after:?} after falling silent, with a 3 s heartbeat timeout"
    );

    let task = wait_finished(&gw, &id).await;
    assert_completed_by(&task, "backup");
    assert_eq!(task["attempts"], 2, "{task:#}");
    assert!(backup.saw("completed", &id));
    drop(silent);
}

// ---------------------------------------------------------------------------
// Tenants
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_receive_or_see_each_others_tasks() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let agent_a = agent_key(&gw, Some("a")).await;
    let agent_b = agent_key(&gw, Some("b")).await;
    let dev_a = gw.client_with_key(&developer_key(&gw, "a").await);
    let dev_b = gw.client_with_key(&developer_key(&gw, "b").await);
    let worker_b = AgentProc::start(&gw, &agent_b, "worker-b", &["--capability", "work"]).await;

    let body = json!({"type": "work", "required_capabilities": ["work"]});
    let task_a = submit(&gw, &dev_a, body.clone()).await;
    let task_b = submit(&gw, &dev_b, body.clone()).await;
    assert_completed_by(&wait_finished(&gw, &task_b).await, "worker-b");

    // worker-b was free and capable, yet tenant a's task waits.
    let waiting = get_task(&gw, &task_a).await;
    assert_eq!(waiting["state"], "pending", "{waiting:#}");
    assert!(
        waiting["waiting_reason"]
            .as_str()
            .is_some_and(|r| r.contains("`a`")),
        "{waiting:#}"
    );
    let task_url = gw.url(&format!("/api/v1/tasks/{task_a}"));
    let (status, body_b) = send(&dev_b, Method::GET, &task_url, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body_b}");
    let (status, _) = send(&dev_b, Method::POST, &format!("{task_url}/cancel"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, listed) = send(&dev_b, Method::GET, &gw.url("/api/v1/tasks"), None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<String> = listed["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(
        ids,
        std::slice::from_ref(&task_b),
        "tenant b lists only its own task"
    );
    let (status, _) = send(&dev_a, Method::GET, &task_url, None).await;
    assert_eq!(status, StatusCode::OK, "its own tenant sees it");

    let _worker_a = AgentProc::start(&gw, &agent_a, "worker-a", &["--capability", "work"]).await;
    assert_completed_by(&wait_finished(&gw, &task_a).await, "worker-a");
    assert_eq!(
        worker_b.assigned(),
        [task_b],
        "worker-b got only tenant b's task"
    );
}

// ---------------------------------------------------------------------------
// Metrics and MCP tools
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_processed_tasks_durations_online_agents_and_queue_depth() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let _agent = AgentProc::start(&gw, &key, "counted", &["--capability", "work"]).await;
    let id = submit(
        &gw,
        &gw.client(),
        json!({"type": "work", "required_capabilities": ["work"]}),
    )
    .await;
    assert_eq!(wait_finished(&gw, &id).await["state"], "completed");

    let deadline = Instant::now() + FLOW_WAIT;
    loop {
        let (status, text) = gw.get_text("/metrics").await;
        assert_eq!(status, StatusCode::OK);
        let completed: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("agent_tasks_processed_total{") && l.contains("status=\"completed\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let has = |name: &str| text.lines().any(|l| l.starts_with(name));
        let online = metric_value(&text, "agent_agents_online").unwrap_or(0.0);
        if completed > 0.0
            && has("agent_task_duration_seconds")
            && online >= 1.0
            && has("agent_queue_depth")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mesh metrics missing (completed {completed}, online {online}):\n{}",
            text.lines()
                .filter(|l| l.starts_with("agent_"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_tools_are_listed_for_an_admin_and_task_get_of_an_unknown_id_names_it() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let (session, _client) = connect(&gw).await;
    let names = tool_names(&session).await;
    for tool in ["agents_list", "task_submit", "task_get", "task_cancel"] {
        assert!(names.iter().any(|n| n == tool), "{tool} missing: {names:?}");
    }

    let r = call_tool(&session, "task_get", json!({"task_id": "t-nowhere"})).await;
    assert_eq!(r.is_error, Some(true), "{r:?}");
    let error = r.structured_content.clone().unwrap_or_default();
    assert!(
        error.to_string().contains("t-nowhere"),
        "the error names the id: {r:?}"
    );

    let r = call_tool(&session, "task_submit", json!({"type": "later"})).await;
    assert_ne!(r.is_error, Some(true), "{r:?}");
    let task = r.structured_content.clone().expect("the task");
    assert_eq!(task["state"], "pending", "{task}");
    let r = call_tool(&session, "task_get", json!({"task_id": task["id"]})).await;
    assert_eq!(
        r.structured_content.clone().expect("task")["id"],
        task["id"]
    );
    session.cancel().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_answer_arrives_before_the_first_task_assigned_to_the_agent() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let http = gw.client();
    for round in 0..20 {
        let id = submit(
            &gw,
            &http,
            json!({"type": "early", "required_capabilities": ["early"]}),
        )
        .await;
        let agent_id = format!("early-{round}");
        let mut raw = RawAgent::connect(&gw, &key, &agent_id).await;
        let answer = raw
            .call("agent.register", registration(&agent_id, json!(["early"])))
            .await;
        assert_eq!(answer["result"]["agent_id"], agent_id.as_str(), "{answer}");
        assert!(
            raw.stash.is_empty(),
            "round {round}: the agent heard of a task before its registration was answered: {:?}",
            raw.stash
        );
        assert_eq!(raw.assigned_task().await, id);
        let answer = raw
            .call("task.complete", json!({"task_id": id, "result": {}}))
            .await;
        assert_eq!(answer["result"]["state"], "completed", "{answer}");
    }
}
