//! What operators see: trace ids, Prometheus metrics, store health and files.

use serde_json::json;

use crate::support::{Env, RawSession, call_tool, connect, text_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_a_trace_id_and_a_valid_incoming_one_is_echoed() {
    let env = Env::start().await;
    let http = env.gw.client();

    for path in [
        "/ready",
        "/health",
        "/metrics",
        "/health/store",
        "/no-such-path",
    ] {
        let r = http.get(env.gw.url(path)).send().await.expect("GET");
        let id = r
            .headers()
            .get("x-trace-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            !id.is_empty(),
            "GET {path} ({}) has no X-Trace-ID",
            r.status()
        );
    }
    let a = http.get(env.gw.url("/ready")).send().await.expect("GET");
    let b = http.get(env.gw.url("/ready")).send().await.expect("GET");
    assert_ne!(
        a.headers().get("x-trace-id"),
        b.headers().get("x-trace-id"),
        "ids are per request"
    );

    let r = http
        .get(env.gw.url("/health"))
        .header("x-trace-id", "abc-123")
        .send()
        .await
        .expect("GET /health");
    assert_eq!(
        r.headers().get("x-trace-id").and_then(|v| v.to_str().ok()),
        Some("abc-123")
    );

    let raw = RawSession::initialize(&env.gw).await;
    let r = raw
        .post_builder()
        .header("x-trace-id", "abc-123")
        .body(json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}).to_string())
        .send()
        .await
        .expect("POST /mcp");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers().get("x-trace-id").and_then(|v| v.to_str().ok()),
        Some("abc-123")
    );

    let r = raw
        .post_builder()
        .header("x-trace-id", "abc-123")
        .body("{oops")
        .send()
        .await
        .expect("POST /mcp");
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.headers().get("x-trace-id").and_then(|v| v.to_str().ok()),
        Some("abc-123"),
        "error responses carry it too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_requests_durations_connections_and_upstream_state() {
    let env = Env::start().await;
    let (session, _) = connect(&env.gw).await;
    let echo = call_tool(&session, "fx__echo", json!({"message": "count me"})).await;
    assert_eq!(text_of(&echo), "count me");

    let (status, metrics) = env.gw.get_text("/metrics").await;
    assert_eq!(status, 200);
    let has_line = |prefix: &str, contains: &[&str]| {
        metrics
            .lines()
            .any(|l| l.starts_with(prefix) && contains.iter().all(|c| l.contains(c)))
    };
    assert!(
        has_line(
            "mcp_requests_total{",
            &["method=\"tools/call\"", "tool=\"fx__echo\""]
        ),
        "{metrics}"
    );
    assert!(
        has_line(
            "mcp_request_duration_seconds_bucket{",
            &["method=\"tools/call\""]
        ),
        "{metrics}"
    );
    let connections = metrics
        .lines()
        .find(|l| l.starts_with("gateway_connections{transport=\"streamable_http\"}"))
        .unwrap_or_else(|| panic!("no gateway_connections gauge: {metrics}"));
    let open: f64 = connections
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .parse()
        .unwrap_or(0.0);
    assert!(open >= 1.0, "{connections}");
    assert!(
        metrics
            .lines()
            .any(|l| l == "gateway_upstream_up{upstream=\"fx\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "gateway_upstream_up{upstream=\"fxs\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_is_healthy_sqlite_in_wal_mode_inside_the_data_dir() {
    let env = Env::start().await;
    // A session makes the store write something.
    let _raw = RawSession::initialize(&env.gw).await;

    let (status, store) = env.gw.get_json("/health/store").await;
    assert_eq!(status, 200, "{store}");
    assert_eq!(store["backend"], "sqlite", "{store}");
    assert_eq!(store["status"], "up", "{store}");

    let dir = env.gw.data_dir();
    assert!(
        dir.join("meshgate.db").is_file(),
        "no meshgate.db in {}",
        dir.display()
    );
    assert!(
        dir.join("meshgate.db-wal").is_file(),
        "no meshgate.db-wal in {}: the database is not in WAL mode",
        dir.display()
    );
}
