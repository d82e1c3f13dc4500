//! `meshgate bench-mesh`: task assignment throughput and latency of the
//! agent mesh. It connects `--agents` WebSocket agents (minimal: each
//! completes a task the moment it is assigned, without `task.accept`), then
//! submits tasks over the REST API from `--concurrency` workers, either as
//! fast as they are answered (closed loop) or at a fixed `--rate` (open loop,
//! latency measured from the scheduled time, so a stalled gateway cannot
//! hide its delay). Latency is submit → `task.assigned` received by the
//! agent, measured in this process on one clock (the submit time travels in
//! the task payload).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::cpu::{clock_ticks_per_sec, process_cpu_ticks};
use crate::stats::{Summary, summarize_micros};

/// Command-line options of `meshgate bench-mesh`.
#[derive(Debug, Clone, clap::Args)]
pub struct MeshBenchArgs {
    /// Gateway base URL, e.g. http://127.0.0.1:8080
    #[arg(long)]
    pub url: String,
    /// API key with scopes agent:connect and tasks:write (e.g. an admin key)
    #[arg(long, env = "MESHGATE_BENCH_KEY")]
    pub key: Option<String>,
    /// Number of agents
    #[arg(long, default_value_t = 10)]
    pub agents: usize,
    /// Task limit of each agent
    #[arg(long, default_value_t = 256)]
    pub agent_limit: u32,
    /// Concurrent submitters
    #[arg(long, short = 'c', default_value_t = 32)]
    pub concurrency: usize,
    /// Tasks per request (1: one task per POST; more: a batch array)
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Open loop: tasks per second to submit (default: as fast as answered)
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured time in seconds
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured warm-up in seconds
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Gateway process id, to report its CPU time per task
    #[arg(long)]
    pub pid: Option<u32>,
    /// Measure plain authenticated HTTP round trips (GET /api/v1/auth/whoami) instead, as a baseline
    #[arg(long)]
    pub baseline: bool,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct MeshReport {
    /// `tasks` or `baseline`.
    pub mode: &'static str,
    /// Measured seconds.
    pub seconds: f64,
    /// Tasks submitted (or baseline requests) in the measured window.
    pub submitted: u64,
    /// Tasks assigned to an agent in the measured window.
    pub assigned: u64,
    /// Assigned (or baseline requests) per second.
    pub per_sec: f64,
    /// Submit → assigned latency.
    pub latency: LatencyReport,
    /// Submissions refused or failed.
    pub errors: u64,
    /// Gateway CPU milliseconds per task (with --pid).
    pub cpu_ms_per_task: Option<f64>,
}

/// Latency percentiles in ms.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyReport {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl From<Summary> for LatencyReport {
    fn from(s: Summary) -> Self {
        LatencyReport {
            p50_ms: s.p50_ms,
            p90_ms: s.p90_ms,
            p99_ms: s.p99_ms,
            max_ms: s.max_ms,
        }
    }
}

struct Shared {
    epoch: Instant,
    measuring: std::sync::atomic::AtomicBool,
    assigned: AtomicU64,
    submitted: AtomicU64,
    errors: AtomicU64,
    latencies: Mutex<Vec<f64>>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

fn ws_url(base: &str) -> Result<String> {
    let base = base.trim_end_matches('/');
    if let Some(rest) = base.strip_prefix("http://") {
        Ok(format!("ws://{rest}/ws"))
    } else if let Some(rest) = base.strip_prefix("https://") {
        Ok(format!("wss://{rest}/ws"))
    } else {
        bail!("--url must start with http:// or https://, got {base}")
    }
}

async fn run_agent(
    url: String,
    key: Option<String>,
    id: String,
    limit: u32,
    shared: Arc<Shared>,
    ready: tokio::sync::mpsc::Sender<Result<()>>,
) {
    let connect = async {
        let mut req = url.as_str().into_client_request()?;
        let h = req.headers_mut();
        if let Some(k) = &key {
            h.insert("authorization", format!("Bearer {k}").parse()?);
        }
        h.insert("x-agent-id", id.parse()?);
        h.insert("x-agent-type", "bench".parse()?);
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .with_context(|| format!("agent {id} cannot connect to {url}"))?;
        let (mut sink, mut stream) = ws.split();
        let reg = json!({"jsonrpc": "2.0", "id": 0, "method": "agent.register", "params": {
            "id": id, "type": "bench", "name": id, "version": "1",
            "capabilities": ["bench"], "max_concurrent_tasks": limit}});
        sink.send(Message::Text(reg.to_string().into())).await?;
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str())?;
                    if v["id"] == json!(0) {
                        if v.get("error").is_some() {
                            bail!("agent {id}: register refused: {}", v["error"]);
                        }
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("agent {id}: {e}"),
                None => bail!("agent {id}: connection closed during registration"),
            }
        }
        Ok::<_, anyhow::Error>((sink, stream))
    };
    let (mut sink, mut stream) = match connect.await {
        Ok(x) => {
            let _ = ready.send(Ok(())).await;
            x
        }
        Err(e) => {
            let _ = ready.send(Err(e)).await;
            return;
        }
    };
    drop(ready);
    let mut next_id: u64 = 1;
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(t) = msg else { continue };
        let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
            continue;
        };
        if v["method"] != "task.assigned" {
            continue;
        }
        let task = &v["params"]["task"];
        if let Some(t0) = task["payload"]["t0_us"].as_u64() {
            let now = shared.now_us();
            if shared.measuring.load(Ordering::Relaxed) && task["payload"]["measured"] == true {
                shared.assigned.fetch_add(1, Ordering::Relaxed);
                shared
                    .latencies
                    .lock()
                    .await
                    .push(now.saturating_sub(t0) as f64);
            }
        }
        next_id += 1;
        let done = json!({"jsonrpc": "2.0", "id": next_id, "method": "task.complete",
            "params": {"task_id": task["id"], "result": {}}});
        if sink
            .send(Message::Text(done.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
}

async fn submit_loop(
    client: reqwest::Client,
    url: String,
    key: Option<String>,
    batch: usize,
    shared: Arc<Shared>,
    schedule: Option<(Arc<AtomicU64>, f64)>,
    stop_at: Instant,
) {
    loop {
        let t0 = match &schedule {
            Some((slot, rate)) => {
                let k = slot.fetch_add(batch as u64, Ordering::Relaxed);
                let at = shared.epoch + Duration::from_secs_f64(k as f64 / rate);
                if at >= stop_at {
                    return;
                }
                tokio::time::sleep_until(at.into()).await;
                at.duration_since(shared.epoch).as_micros() as u64
            }
            None => {
                if Instant::now() >= stop_at {
                    return;
                }
                shared.now_us()
            }
        };
        let measured = shared.measuring.load(Ordering::Relaxed);
        let task = |_: usize| {
            json!({"type": "bench", "required_capabilities": ["bench"],
                   "payload": {"t0_us": t0, "measured": measured}})
        };
        let body = if batch == 1 {
            task(0)
        } else {
            Value::Array((0..batch).map(task).collect())
        };
        let mut req = client.post(&url).json(&body);
        if let Some(k) = &key {
            req = req.bearer_auth(k);
        }
        let ok = match req.send().await {
            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
            Err(_) => false,
        };
        if measured {
            if ok {
                shared.submitted.fetch_add(batch as u64, Ordering::Relaxed);
            } else {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs the benchmark.
pub async fn run(args: &MeshBenchArgs) -> Result<MeshReport> {
    let base = args.url.trim_end_matches('/').to_owned();
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        measuring: Default::default(),
        assigned: AtomicU64::new(0),
        submitted: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(1))
        .build()?;
    if !args.baseline {
        let ws = ws_url(&base)?;
        let run_id = format!(
            "{:x}",
            shared.epoch.elapsed().as_nanos() ^ u128::from(std::process::id())
        );
        let (tx, mut rx) = tokio::sync::mpsc::channel(args.agents.max(1));
        for i in 0..args.agents {
            tokio::spawn(run_agent(
                ws.clone(),
                args.key.clone(),
                format!("bench-{run_id}-{i}"),
                args.agent_limit,
                shared.clone(),
                tx.clone(),
            ));
        }
        drop(tx);
        for _ in 0..args.agents {
            match rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(e),
                None => bail!("agents ended before registering"),
            }
        }
    }
    let warm_end = Instant::now() + Duration::from_secs_f64(args.warmup);
    let stop_at = warm_end + Duration::from_secs_f64(args.duration);
    let schedule = args.rate.map(|r| (Arc::new(AtomicU64::new(0)), r.max(1.0)));
    let url = if args.baseline {
        format!("{base}/api/v1/auth/whoami")
    } else {
        format!("{base}/api/v1/tasks")
    };
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        if args.baseline {
            let (client, url, key, shared) = (
                client.clone(),
                url.clone(),
                args.key.clone(),
                shared.clone(),
            );
            workers.push(tokio::spawn(async move {
                while Instant::now() < stop_at {
                    let t0 = shared.now_us();
                    let mut req = client.get(&url);
                    if let Some(k) = &key {
                        req = req.bearer_auth(k);
                    }
                    let ok = matches!(req.send().await, Ok(r) if r.status().is_success());
                    if shared.measuring.load(Ordering::Relaxed) {
                        if ok {
                            shared.submitted.fetch_add(1, Ordering::Relaxed);
                            shared.assigned.fetch_add(1, Ordering::Relaxed);
                            let dt = shared.now_us().saturating_sub(t0) as f64;
                            shared.latencies.lock().await.push(dt);
                        } else {
                            shared.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        } else {
            workers.push(tokio::spawn(submit_loop(
                client.clone(),
                url.clone(),
                args.key.clone(),
                args.batch.max(1),
                shared.clone(),
                schedule.clone(),
                stop_at,
            )));
        }
    }
    tokio::time::sleep_until(warm_end.into()).await;
    let cpu0 = args.pid.map(process_cpu_ticks).transpose()?;
    let started = Instant::now();
    shared.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep_until(stop_at.into()).await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu1 = args.pid.map(process_cpu_ticks).transpose()?;
    for w in workers {
        let _ = w.await;
    }
    // Let tasks submitted in the window reach their agents (at most 5 s).
    let drain_until = Instant::now() + Duration::from_secs(5);
    while !args.baseline
        && shared.assigned.load(Ordering::Relaxed) < shared.submitted.load(Ordering::Relaxed)
        && Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.measuring.store(false, Ordering::Relaxed);
    let assigned = shared.assigned.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *shared.latencies.lock().await);
    let summary = summarize_micros(&mut lat);
    let cpu_ms_per_task = match (cpu0, cpu1) {
        (Some(a), Some(b)) if assigned > 0 => {
            Some((b - a) as f64 * 1000.0 / clock_ticks_per_sec() as f64 / assigned as f64)
        }
        _ => None,
    };
    Ok(MeshReport {
        mode: if args.baseline { "baseline" } else { "tasks" },
        seconds,
        submitted: shared.submitted.load(Ordering::Relaxed),
        assigned,
        per_sec: assigned as f64 / seconds,
        latency: summary.into(),
        errors: shared.errors.load(Ordering::Relaxed),
        cpu_ms_per_task,
    })
}

/// Runs the benchmark and prints the report.
pub async fn run_cli(args: MeshBenchArgs) -> Result<()> {
    let r = run(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: {:.0}/s over {:.1} s ({} submitted, {} assigned, {} errors); latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms{}",
            r.mode,
            r.per_sec,
            r.seconds,
            r.submitted,
            r.assigned,
            r.errors,
            r.latency.p50_ms,
            r.latency.p90_ms,
            r.latency.p99_ms,
            r.latency.max_ms,
            r.cpu_ms_per_task
                .map(|c| format!("; gateway CPU {c:.3} ms per task"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
