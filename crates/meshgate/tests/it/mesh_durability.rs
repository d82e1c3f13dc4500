//! Durability of the agent mesh against crashes: the gateway SIGKILLed under
//! load and restarted on the same data directory, agents SIGKILLed mid-task
//! (gone for good, or back at once under the same id), pending tasks and
//! stored results across restarts. Real `meshgate` and `meshgate-agent`
//! processes throughout; the agents' JSON-line events on stdout tell what
//! they ran.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Gateway, GatewayConfig, agent_bin, create_key};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A gateway configuration with short mesh timers.
fn config(reconnect_grace_secs: u64) -> GatewayConfig {
    GatewayConfig::new().toml(&format!(
        "[mesh]\nheartbeat_interval_secs = 1\nheartbeat_timeout_secs = 3\n\
         reconnect_grace_secs = {reconnect_grace_secs}\n\
         retry_backoff_initial_ms = 50\nretry_backoff_max_ms = 500\n"
    ))
}

/// Milliseconds since the Unix epoch (the gateway's clock in task history).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An HTTP client with the admin key and a per-request timeout, for calls
/// that may hit a dead gateway and must fail rather than hang or panic.
fn admin_http(gw: &Gateway) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {}", gw.admin_key))
            .expect("a key is a valid header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build an HTTP client")
}

/// Polls `probe` every 50 ms until it yields a value; panics after `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /api/v1/tasks/{id}`, which must answer 200.
async fn get_task(gw: &Gateway, id: &str) -> Value {
    let (status, task) = gw.get_json(&format!("/api/v1/tasks/{id}")).await;
    assert_eq!(status, StatusCode::OK, "GET task {id}: {task}");
    task
}

/// Submits one task, which must be created (201); returns it.
async fn submit(gw: &Gateway, body: Value) -> Value {
    let r = admin_http(gw)
        .post(gw.url("/api/v1/tasks"))
        .json(&body)
        .send()
        .await
        .expect("POST /api/v1/tasks");
    let status = r.status();
    let task: Value = r.json().await.expect("a JSON task");
    assert_eq!(status, StatusCode::CREATED, "submit {body}: {task}");
    task
}

/// Waits until task `id` is in one of `states`; returns it.
async fn wait_state(gw: &Gateway, id: &str, states: &[&str], limit: Duration) -> Value {
    let what = format!("task {id} to be {}", states.join(" or "));
    wait_for(&what, limit, || async move {
        let t = get_task(gw, id).await;
        let state = t["state"].as_str().unwrap_or_default();
        states.contains(&state).then_some(t)
    })
    .await
}

/// Events of a task's history that entered a terminal state.
fn terminal_events(task: &Value) -> usize {
    task["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter(|e| {
                    matches!(
                        e["state"].as_str(),
                        Some("completed" | "failed" | "cancelled" | "timeout")
                    )
                })
                .count()
        })
        .unwrap_or(0)
}

/// Every task of the gateway, through `GET /api/v1/tasks` and its cursor.
async fn list_all_tasks(gw: &Gateway) -> Vec<Value> {
    let mut out = Vec::new();
    let mut path = "/api/v1/tasks?limit=1000".to_owned();
    loop {
        let (status, page) = gw.get_json(&path).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {page}");
        out.extend(page["tasks"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_i64() {
            Some(cursor) => path = format!("/api/v1/tasks?limit=1000&cursor={cursor}"),
            None => return out,
        }
    }
}

/// An example agent process (`meshgate-agent`), SIGKILLed and reaped on
/// drop. Its stdout events are collected; its log goes to a file next to
/// the gateway's.
struct AgentProc {
    id: String,
    child: Option<Child>,
    events: Arc<Mutex<Vec<Value>>>,
    log_path: PathBuf,
}

impl AgentProc {
    /// Starts an agent of `gw` with one capability and a task limit.
    fn start(gw: &Gateway, key: &str, id: &str, capability: &str, limit: u32) -> AgentProc {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = gw.data_dir().parent().unwrap_or_else(|| Path::new("."));
        let log_path = dir.join(format!("agent-{id}-{n}.log"));
        let log = std::fs::File::create(&log_path).expect("create the agent log file");
        let mut cmd = Command::new(agent_bin());
        cmd.args(["--url", &format!("ws://127.0.0.1:{}/ws", gw.port)])
            .args(["--key", key, "--id", id, "--type", "worker"])
            .args(["--capability", capability])
            .args(["--max-concurrent", &limit.to_string()])
            .args([
                "--reconnect-initial-ms",
                "100",
                "--reconnect-max-ms",
                "1000",
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        for (name, _) in std::env::vars() {
            if name.starts_with("MESHGATE_") {
                cmd.env_remove(name);
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent_bin().display()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(event) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(event);
                }
            }
        });
        AgentProc {
            id: id.to_owned(),
            child: Some(child),
            events,
            log_path,
        }
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The events printed so far.
    fn events(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many events named `name` it printed.
    fn count(&self, name: &str) -> usize {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| e["event"] == name)
            .count()
    }

    /// Waits until it has registered `times` times in all.
    async fn registered(&self, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.count("registered") < times {
            assert!(
                Instant::now() < deadline,
                "agent {} did not register within 15 s; its log:\n{}",
                self.id,
                std::fs::read_to_string(&self.log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent-role key of `gw`.
async fn agent_key(gw: &Gateway) -> String {
    create_key(gw, json!({"name": "workers", "role": "agent"}))
        .await
        .0
}

// ---------------------------------------------------------------------------
// 1. The gateway SIGKILLed under load
// ---------------------------------------------------------------------------

const LOAD_TASKS: usize = 1000;
const SUBMITTERS: usize = 8;
const LOAD_AGENTS: usize = 4;

/// What one submission got.
#[derive(Debug, Clone, Default)]
struct Slot {
    /// The task id, once an answer named it.
    id: Option<String>,
}

fn load_body(i: usize) -> Value {
    json!({
        "type": "work",
        "idempotency_key": format!("dur-{i}"),
        "payload": {"n": i, "sleep_ms": 5 + (i % 16)},
        "timeout_secs": 60,
    })
}

/// One POST; `Ok((status, replay header, body))` for any HTTP answer.
async fn post_task(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<(StatusCode, bool, Value), reqwest::Error> {
    let r = http.post(url).json(body).send().await?;
    let status = r.status();
    let replay = r
        .headers()
        .get("idempotent-replay")
        .is_some_and(|v| v == "true");
    let body = r.json::<Value>().await?;
    Ok((status, replay, body))
}

/// Runs of each task on the agents: every run of a taken task ends in one
/// `completed`, `failed` or `cancelled` event; a task dropped because its
/// acceptance was refused did not run.
fn runs_per_task(agents: &[AgentProc]) -> HashMap<String, usize> {
    let mut runs: HashMap<String, usize> = HashMap::new();
    for a in agents {
        for e in a.events() {
            let ran = match e["event"].as_str() {
                Some("completed" | "cancelled") => true,
                Some("failed") => !e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("accepting failed")),
                _ => false,
            };
            if ran && let Some(id) = e["task_id"].as_str() {
                *runs.entry(id.to_owned()).or_default() += 1;
            }
        }
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_sigkill_under_load_loses_and_duplicates_no_task() {
    let started = Instant::now();
    let mut gw = Gateway::start(&config(2)).await;
    let key = agent_key(&gw).await;
    let agents: Vec<AgentProc> = (0..LOAD_AGENTS)
        .map(|i| AgentProc::start(&gw, &key, &format!("load-{i}"), "work", 8))
        .collect();
    for a in &agents {
        a.registered(1).await;
    }

    // Submit from several tasks at a steady pace, so that submissions,
    // assignments and completions are all in flight when the gateway dies.
    let http = admin_http(&gw);
    let url = gw.url("/api/v1/tasks");
    let slots = Arc::new(Mutex::new(vec![Slot::default(); LOAD_TASKS]));
    let attempted = Arc::new(AtomicUsize::new(0));
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|s| {
            let (http, url, slots, attempted) =
                (http.clone(), url.clone(), slots.clone(), attempted.clone());
            tokio::spawn(async move {
                for i in (s..LOAD_TASKS).step_by(SUBMITTERS) {
                    if let Ok((status, _, body)) = post_task(&http, &url, &load_body(i)).await
                        && status.is_success()
                    {
                        let id = body["id"].as_str().map(str::to_owned);
                        slots.lock().unwrap_or_else(|p| p.into_inner())[i].id = id;
                    }
                    attempted.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();

    let completed = || agents.iter().map(|a| a.count("completed")).sum::<usize>();
    let deadline = Instant::now() + Duration::from_secs(30);
    while completed() < 300 {
        assert!(
            Instant::now() < deadline,
            "fewer than 300 tasks completed within 30 s ({}); gateway log:\n{}",
            completed(),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.kill();
    let killed_at = Instant::now();
    let attempted_at_kill = attempted.load(Ordering::SeqCst);
    let completed_at_kill = completed();
    let acknowledged_at_kill = slots
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|s| s.id.is_some())
        .count();
    eprintln!(
        "gateway SIGKILLed: {attempted_at_kill} submissions tried, {acknowledged_at_kill} acknowledged, \
         {completed_at_kill} completions acknowledged to agents"
    );
    assert!(
        attempted_at_kill < LOAD_TASKS,
        "every submission was made before the kill; the test must kill mid-way"
    );
    // Down for a while: submissions fail, agents wait to reconnect with
    // outcomes they could not deliver.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.restart().await;
    eprintln!("gateway back after {:?}", killed_at.elapsed());
    for s in submitters {
        s.await.expect("a submitter panicked");
    }

    // The submitter's view: a task acknowledged before the crash exists; one
    // without an answer is submitted again under the same key (which returns
    // the stored task if the first submission was stored after all).
    let mut snapshot = slots.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (mut created_again, mut replayed) = (0, 0);
    for (i, slot) in snapshot.iter_mut().enumerate() {
        match &slot.id {
            Some(id) => {
                let t = get_task(&gw, id).await;
                assert_eq!(t["idempotency_key"], format!("dur-{i}"), "{t}");
            }
            None => {
                let mut answer = None;
                for _ in 0..20 {
                    match post_task(&http, &url, &load_body(i)).await {
                        Ok((status, replay, body)) if status.is_success() => {
                            answer = Some((status, replay, body));
                            break;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                let (status, replay, body) =
                    answer.unwrap_or_else(|| panic!("resubmitting dur-{i} never succeeded"));
                if status == StatusCode::OK {
                    assert!(replay, "200 without idempotent-replay: {body}");
                    replayed += 1;
                } else {
                    assert_eq!(status, StatusCode::CREATED, "{body}");
                    created_again += 1;
                }
                slot.id = Some(body["id"].as_str().expect("a task id").to_owned());
            }
        }
    }
    eprintln!(
        "after the restart: {created_again} unanswered submissions created anew, \
         {replayed} found stored (idempotent replay)"
    );

    let gw_ref = &gw;
    wait_for(
        "every task to end",
        Duration::from_secs(45),
        move || async move {
            let (_, mesh) = gw_ref.get_json("/api/v1/mesh").await;
            (mesh["tasks_open"] == 0).then_some(())
        },
    )
    .await;
    eprintln!("all tasks ended {:?} after the kill", killed_at.elapsed());

    // The gateway's view: 1,000 tasks for 1,000 keys, each completed once.
    let tasks = list_all_tasks(&gw).await;
    let ids: HashSet<&str> = tasks.iter().filter_map(|t| t["id"].as_str()).collect();
    let keys: HashSet<&str> = tasks
        .iter()
        .filter_map(|t| t["idempotency_key"].as_str())
        .collect();
    assert_eq!(tasks.len(), LOAD_TASKS, "tasks listed");
    assert_eq!(ids.len(), LOAD_TASKS, "distinct task ids");
    assert_eq!(keys.len(), LOAD_TASKS, "distinct idempotency keys");
    let known: HashSet<&str> = snapshot.iter().filter_map(|s| s.id.as_deref()).collect();
    assert_eq!(ids, known, "the listed tasks are the submitted ones");
    let unfinished: Vec<String> = tasks
        .iter()
        .filter(|t| t["state"] != "completed")
        .map(|t| format!("{} {} {}", t["id"], t["state"], t["error"]))
        .collect();
    assert!(
        unfinished.is_empty(),
        "{} task(s) not completed: {unfinished:?}",
        unfinished.len()
    );
    let mut retried = 0;
    let mut retry_reasons: HashMap<String, usize> = HashMap::new();
    for t in &tasks {
        assert_eq!(terminal_events(t), 1, "one terminal event: {t}");
        let n = t["payload"]["n"].as_u64().expect("payload n");
        assert_eq!(t["idempotency_key"], format!("dur-{n}"), "{t}");
        assert_eq!(
            t["result"]["echo"]["n"], n,
            "the result is the task's own: {t}"
        );
        assert_eq!(t["result"]["agent"], t["agent_id"], "{t}");
        if t["attempts"].as_u64().unwrap_or(0) > 1 {
            retried += 1;
        }
        for e in t["history"].as_array().into_iter().flatten() {
            if let Some(why) = e["note"].as_str().and_then(|n| n.strip_prefix("retry: ")) {
                // Agent names vary; the reason's shape is what counts.
                let shape = why.split('`').step_by(2).collect::<Vec<_>>().join("_");
                *retry_reasons.entry(shape).or_default() += 1;
            }
        }
    }

    // Every key still names the same task.
    for (i, slot) in snapshot.iter().enumerate() {
        let (status, replay, body) = post_task(&http, &url, &load_body(i))
            .await
            .expect("resubmit");
        assert_eq!(status, StatusCode::OK, "replay of dur-{i}: {body}");
        assert!(replay, "replay of dur-{i} lacks idempotent-replay: true");
        assert_eq!(body["id"].as_str(), slot.id.as_deref(), "dur-{i}");
        assert_eq!(body["state"], "completed");
    }

    // At-least-once execution: a crash may run a task twice; count it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = runs_per_task(&agents);
    let twice = runs.values().filter(|&&n| n > 1).count();
    let extra: usize = runs.values().map(|&n| n.saturating_sub(1)).sum();
    let completions: usize = agents.iter().map(|a| a.count("completed")).sum();
    eprintln!(
        "figures: {LOAD_TASKS} tasks, {retried} assigned more than once (attempts > 1), \
         {twice} executed more than once by agents ({extra} extra runs), \
         {completions} completions acknowledged to agents, total {:?}; \
         re-queue reasons: {retry_reasons:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 2. An agent SIGKILLed mid-task
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_of_a_killed_agent_is_reassigned_after_the_grace_period_and_completes() {
    let gw = Gateway::start(&config(2)).await;
    let key = agent_key(&gw).await;
    let mut agents = [
        AgentProc::start(&gw, &key, "kill-a", "work", 4),
        AgentProc::start(&gw, &key, "kill-b", "work", 4),
    ];
    for a in &agents {
        a.registered(1).await;
    }
    let task = submit(
        &gw,
        json!({"type": "work", "payload": {"sleep_ms": 3000}, "timeout_secs": 60}),
    )
    .await;
    let id = task["id"].as_str().expect("task id").to_owned();
    let held = wait_state(
        &gw,
        &id,
        &["accepted", "in_progress"],
        Duration::from_secs(10),
    )
    .await;
    let first = held["agent_id"].as_str().expect("agent_id").to_owned();
    let (victim, survivor) = if first == agents[0].id {
        (0, 1)
    } else {
        (1, 0)
    };
    let survivor_id = agents[survivor].id.clone();
    agents[victim].kill();
    let killed_ms = now_ms();

    let done = wait_state(&gw, &id, &["completed"], Duration::from_secs(20)).await;
    assert_eq!(done["agent_id"], survivor_id.as_str(), "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    assert_eq!(done["result"]["agent"], survivor_id.as_str(), "{done}");
    assert_eq!(terminal_events(&done), 1, "{done}");
    let history = done["history"].as_array().expect("history");
    let requeued = history
        .iter()
        .find(|e| {
            e["state"] == "pending"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains(&format!("agent `{first}` was gone")))
        })
        .unwrap_or_else(|| panic!("no re-queue event naming {first}: {done}"));
    let waited = requeued["at_ms"].as_i64().unwrap_or(0) - killed_ms;
    assert!(
        waited >= 1500,
        "re-queued {waited} ms after the kill, before the 2 s grace period: {done}"
    );
    eprintln!("re-queued {waited} ms after the agent was killed");
}

// ---------------------------------------------------------------------------
// 3. An agent back under the same id right after a SIGKILL
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_under_the_same_id_gets_its_lost_tasks_requeued_at_once() {
    // A long grace period: the tasks must not wait for it.
    let gw = Gateway::start(&config(30)).await;
    let key = agent_key(&gw).await;
    let mut agent = AgentProc::start(&gw, &key, "phoenix", "work", 4);
    agent.registered(1).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let t = submit(
            &gw,
            json!({"type": "work", "payload": {"n": n, "sleep_ms": 1500}, "timeout_secs": 60}),
        )
        .await;
        ids.push(t["id"].as_str().expect("task id").to_owned());
    }
    for id in &ids {
        let t = wait_state(
            &gw,
            id,
            &["accepted", "in_progress"],
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(t["agent_id"], "phoenix");
    }
    agent.kill();
    let restarted = Instant::now();
    let again = AgentProc::start(&gw, &key, "phoenix", "work", 4);
    again.registered(1).await;
    let registered = again
        .events()
        .into_iter()
        .find(|e| e["event"] == "registered")
        .expect("registered event");
    assert_eq!(registered["resumed_tasks"], json!([]), "{registered}");

    for id in &ids {
        let done = wait_state(&gw, id, &["completed"], Duration::from_secs(10)).await;
        assert_eq!(done["attempts"], 2, "{done}");
        assert_eq!(done["result"]["agent"], "phoenix", "{done}");
        assert_eq!(terminal_events(&done), 1, "{done}");
        let notes: Vec<&str> = done["history"]
            .as_array()
            .expect("history")
            .iter()
            .filter_map(|e| e["note"].as_str())
            .collect();
        assert!(
            notes
                .iter()
                .any(|n| n.contains("agent `phoenix` came back without it")),
            "{done}"
        );
    }
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "the tasks waited {took:?}, as if for the 30 s grace period"
    );
    eprintln!("lost tasks completed {took:?} after the agent restarted");
}

// ---------------------------------------------------------------------------
// 4. Pending tasks across a gateway SIGKILL
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_tasks_survive_a_gateway_sigkill_and_run_once_a_capable_agent_comes() {
    let mut gw = Gateway::start(&config(2)).await;
    let key = agent_key(&gw).await;
    let cpu = AgentProc::start(&gw, &key, "cpu-only", "cpu", 4);
    cpu.registered(1).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let t = submit(
            &gw,
            json!({"type": "render", "required_capabilities": ["gpu"],
                   "payload": {"n": n, "sleep_ms": 10}}),
        )
        .await;
        ids.push(t["id"].as_str().expect("task id").to_owned());
    }
    let first = get_task(&gw, &ids[0]).await;
    assert_eq!(first["state"], "pending", "{first}");

    gw.kill();
    gw.restart().await;
    cpu.registered(2).await;
    for id in &ids {
        let t = get_task(&gw, id).await;
        assert_eq!(t["state"], "pending", "{t}");
        assert_eq!(t["attempts"], 0, "{t}");
        let why = t["waiting_reason"].as_str().unwrap_or_default();
        assert!(why.contains("`gpu`"), "waiting_reason {why:?}: {t}");
    }

    let gpu = AgentProc::start(&gw, &key, "gpu-1", "gpu", 4);
    gpu.registered(1).await;
    for (n, id) in ids.iter().enumerate() {
        let done = wait_state(&gw, id, &["completed"], Duration::from_secs(10)).await;
        assert_eq!(done["agent_id"], "gpu-1", "{done}");
        assert_eq!(done["attempts"], 1, "{done}");
        assert_eq!(done["result"]["echo"]["n"], n, "{done}");
        assert_eq!(terminal_events(&done), 1, "{done}");
    }
    assert_eq!(cpu.count("assigned"), 0, "the cpu agent got a gpu task");
}

// ---------------------------------------------------------------------------
// 5. Results served from the store after a restart
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_results_and_blobs_are_served_from_the_store_after_a_sigkill() {
    let mut gw = Gateway::start(&config(2)).await;
    let key = agent_key(&gw).await;
    let agent = AgentProc::start(&gw, &key, "store-1", "work", 4);
    agent.registered(1).await;
    let small = submit(
        &gw,
        json!({"type": "work", "payload": {"word": "kept", "sleep_ms": 5}}),
    )
    .await;
    // Over the 256 KiB blob threshold: the result becomes a blob reference.
    let large = submit(
        &gw,
        json!({"type": "work", "payload": {"result_bytes": 300_000}}),
    )
    .await;
    let small_id = small["id"].as_str().expect("id").to_owned();
    let large_id = large["id"].as_str().expect("id").to_owned();
    let before_small = wait_state(&gw, &small_id, &["completed"], Duration::from_secs(10)).await;
    let before_large = wait_state(&gw, &large_id, &["completed"], Duration::from_secs(10)).await;
    drop(agent);

    gw.kill();
    gw.restart().await;

    let after_small = get_task(&gw, &small_id).await;
    assert_eq!(after_small["state"], "completed", "{after_small}");
    assert_eq!(after_small["result"], before_small["result"]);
    assert_eq!(after_small["result"]["echo"]["word"], "kept");
    assert_eq!(after_small["result"]["agent"], "store-1");
    assert_eq!(after_small["history"], before_small["history"]);

    let after_large = get_task(&gw, &large_id).await;
    assert_eq!(after_large["result"], before_large["result"]);
    let blob = &after_large["result"]["blob"];
    let url = blob["url"].as_str().expect("a blob reference");
    let (status, body) = gw.get_text(url).await;
    assert_eq!(status, StatusCode::OK, "GET {url}");
    assert_eq!(body.len() as u64, blob["size"].as_u64().expect("size"));
    let stored: Value = serde_json::from_str(&body).expect("the blob is the JSON result");
    assert_eq!(stored["blob"].as_str().map(str::len), Some(300_000));
    assert_eq!(stored["task_id"], large_id.as_str());

    let (status, page) = gw.get_json("/api/v1/tasks?state=completed&limit=10").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["tasks"].as_array().map(Vec::len), Some(2), "{page}");
}

// ---------------------------------------------------------------------------
// 6. An idempotent replay names only stored tasks
// ---------------------------------------------------------------------------

/// `sqlite3` holding the write lock of a database until dropped (then it
/// is killed and its transaction rolled back).
struct WriteLock {
    child: Child,
    // Kept open: the shell (and its transaction) lives until killed.
    _stdin: std::process::ChildStdin,
}

impl WriteLock {
    /// `None` when the `sqlite3` shell is not installed.
    fn take(db: &Path) -> Option<WriteLock> {
        use std::io::Write;
        let mut child = Command::new("sqlite3")
            .arg("-bail")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(b".timeout 5000\nBEGIN IMMEDIATE;\nSELECT 'locked';\n")
            .expect("write to sqlite3");
        stdin.flush().expect("flush sqlite3's stdin");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout is piped");
        let read = BufReader::new(stdout).read_line(&mut line);
        let lock = WriteLock {
            child,
            _stdin: stdin,
        };
        assert!(
            read.is_ok() && line.trim() == "locked",
            "sqlite3 did not take the write lock: {read:?} {line:?}"
        );
        Some(lock)
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_replay_is_not_answered_before_the_task_is_stored() {
    let mut gw = Gateway::start(&config(2)).await;
    let http = admin_http(&gw);
    let url = gw.url("/api/v1/tasks");
    let body = json!({"type": "work", "idempotency_key": "replay-1"});
    // The store cannot commit: the first submission waits for its commit.
    let lock = WriteLock::take(&gw.data_dir().join("meshgate.db"))
        .expect("this test needs the sqlite3 shell (apt-get install sqlite3; .ci/run installs it)");
    let first = {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        tokio::spawn(async move { post_task(&http, &url, &body).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The same key again: whatever it answers must still hold after a crash.
    let second =
        tokio::time::timeout(Duration::from_millis(1500), post_task(&http, &url, &body)).await;
    gw.kill();
    drop(lock);
    eprintln!("a resubmission while the first was not stored got: {second:?}");
    let first = first.await.expect("the first submission's task");
    assert!(
        !first.as_ref().is_ok_and(|(s, _, _)| s.is_success()),
        "the first submission was answered {first:?} without being stored"
    );
    gw.restart().await;
    if let Ok(Ok((status, replay, task))) = &second
        && status.is_success()
    {
        let id = task["id"].as_str().expect("task id");
        let (status_after, after) = gw.get_json(&format!("/api/v1/tasks/{id}")).await;
        assert_eq!(
            status_after,
            StatusCode::OK,
            "a resubmission was answered {status} (replay: {replay}) with task {id}, \
             which was not stored and is gone after a crash: {after}"
        );
    }
    let (status, _, created) = post_task(&http, &url, &body).await.expect("submit");
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, replay, again) = post_task(&http, &url, &body).await.expect("submit");
    assert_eq!(status, StatusCode::OK, "{again}");
    assert!(replay);
    assert_eq!(again["id"], created["id"]);
}
