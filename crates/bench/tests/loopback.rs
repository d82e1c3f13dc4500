//! End-to-end runs of the load tool against the in-process mini server (JSON and SSE framing).

mod support;

use meshgate_bench::{BenchArgs, run};
use std::sync::atomic::Ordering;
use support::mini_server::{self, Mode};

fn args(url: &str) -> BenchArgs {
    let mut a = BenchArgs::new(url);
    a.concurrency = 4;
    a.sessions = Some(2);
    a.warmup = 20;
    a.requests = Some(300);
    a.duration = 20.0;
    a
}

async fn ok_run(mode: Mode) {
    let (url, counters) = mini_server::spawn(mode, None, 0).await.unwrap();
    let report = run(&args(&url)).await.unwrap();
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert_eq!(report.calls_ok, 300);
    assert_eq!(report.sessions, 2);
    assert!(report.p50_ms > 0.0 && report.p50_ms <= report.p99_ms);
    assert!(report.p99_ms <= report.max_ms);
    assert!(report.calls_per_sec > 0.0);
    assert_eq!(counters.initialize.load(Ordering::Relaxed), 2);
    assert_eq!(counters.calls.load(Ordering::Relaxed), 320);
    assert_eq!(counters.deletes.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_replies() {
    ok_run(Mode::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_replies() {
    ok_run(Mode::Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_errors_are_counted() {
    let (url, _) = mini_server::spawn(Mode::Sse, None, 0).await.unwrap();
    let mut a = args(&url);
    a.warmup = 0;
    a.requests = Some(50);
    a.tool = "fail".into();
    let r = run(&a).await.unwrap();
    assert_eq!((r.calls_ok, r.errors), (0, 50));
    assert_eq!(
        r.first_error.as_deref(),
        Some("tools/call failed: tool returned isError: boom")
    );

    a.tool = "nope".into();
    let r = run(&a).await.unwrap();
    assert_eq!(r.errors, 50);
    assert_eq!(
        r.first_error.as_deref(),
        Some("tools/call failed: JSON-RPC error -32602: Unknown tool: nope")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_warmup_stops_the_run() {
    let (url, _) = mini_server::spawn(Mode::Json, None, 0).await.unwrap();
    let mut a = args(&url);
    a.tool = "fail".into();
    let err = run(&a).await.unwrap_err().to_string();
    assert!(err.contains("every warm-up call failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_header_and_initialize_error() {
    let (url, _) = mini_server::spawn(Mode::Json, Some("s3cret"), 0)
        .await
        .unwrap();
    let err = run(&args(&url)).await.unwrap_err().to_string();
    assert_eq!(
        err,
        format!("initialize failed: HTTP 401 from {url}: unauthorized")
    );

    let mut a = args(&url);
    a.headers = vec!["Authorization: Bearer s3cret".into()];
    let r = run(&a).await.unwrap();
    assert_eq!(r.calls_ok, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("http://127.0.0.1:{port}/mcp");
    let err = run(&args(&url)).await.unwrap_err().to_string();
    assert!(err.starts_with("initialize failed: "), "{err}");
    assert!(err.contains(&url), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_of_a_pid() {
    let (url, _) = mini_server::spawn(Mode::Json, None, 0).await.unwrap();
    let mut a = args(&url);
    a.pid = Some(std::process::id());
    a.requests = Some(2000);
    let r = run(&a).await.unwrap();
    assert_eq!(r.target_pid, Some(std::process::id()));
    assert!(r.target_cpu_ms_per_call.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_bound_stops_the_run() {
    let (url, _) = mini_server::spawn(Mode::Json, None, 0).await.unwrap();
    let mut a = args(&url);
    a.requests = None;
    a.duration = 0.3;
    let started = std::time::Instant::now();
    let r = run(&a).await.unwrap();
    assert!(started.elapsed().as_secs_f64() < 5.0);
    assert!(
        r.elapsed_secs >= 0.3 && r.elapsed_secs < 2.0,
        "{}",
        r.elapsed_secs
    );
    assert!(r.calls_ok > 0);
}
