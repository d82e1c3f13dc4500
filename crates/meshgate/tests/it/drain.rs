//! Backpressure, graceful shutdown and pooled stdio processes, against the
//! real binary: a client that stops reading, SIGTERM with calls in flight,
//! and `pool.processes`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::support::{Gateway, GatewayConfig, RawSession, call_tool, connect, text_of};

/// Opens a raw TCP connection, POSTs a `tools/call` of `flood` on `session`
/// with a progress token, and never reads the answer: a client that stops
/// reading.
async fn stalled_flood(
    gw: &Gateway,
    session: &str,
    count: u64,
    size: u64,
    token: &str,
) -> tokio::net::TcpStream {
    let mut params = json!({"name": "fx__flood", "arguments": {"count": count, "size": size}});
    params["_meta"] = json!({"progressToken": token});
    let body =
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}).to_string();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
         Mcp-Session-Id: {session}\r\nMcp-Protocol-Version: 2025-11-25\r\n\
         Content-Length: {len}\r\n\r\n{body}",
        port = gw.port,
        key = gw.admin_key,
        len = body.len(),
    );
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect to the gateway");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_keeps_gateway_memory_bounded_and_other_clients_unaffected() {
    // Two upstreams so the stdio fixture's tools are named fx__*; both
    // clients share fx's one process, the case where one stalled client
    // could otherwise block everyone.
    let gw = Gateway::start(
        &GatewayConfig::new()
            .stdio_fixture("fx")
            .stdio_fixture("other"),
    )
    .await;
    let raw = RawSession::initialize(&gw).await;
    let session = raw.session.clone().expect("a session id");
    let baseline = gw.rss_kib();

    // 40,000 progress notifications of 2 KB each: about 80 MB if the gateway
    // buffered them for the stalled client.
    let _stalled = stalled_flood(&gw, &session, 40_000, 2_000, "flood").await;

    let (other, _client) = connect(&gw).await;
    let mut peak = baseline;
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    let mut degraded = false;
    while started.elapsed() < Duration::from_secs(12) {
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            call_tool(&other, "fx__echo", json!({"message": "still here"})),
        )
        .await
        .expect("another client's call answers while one client is stalled");
        assert_eq!(text_of(&r), "still here");
        slowest = slowest.max(t.elapsed());
        peak = peak.max(gw.rss_kib());
        let (_, health) = gw.get_json(&format!("/mcp/health/client/{session}")).await;
        let q = &health["outbound_queue"];
        let shed = q["dropped"].as_u64().unwrap_or(0) + q["bundled"].as_u64().unwrap_or(0);
        if shed > 1000 {
            degraded = true;
            if started.elapsed() > Duration::from_secs(4) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, health) = gw.get_json(&format!("/mcp/health/client/{session}")).await;
    let queue = &health["outbound_queue"];
    assert!(
        degraded,
        "the stalled client's queue never bundled or dropped progress notifications: {health}"
    );
    assert_ne!(queue["grade"], "normal", "{health}");
    let capacity = 1024;
    assert!(
        queue["pending"].as_u64().unwrap_or(u64::MAX) <= capacity,
        "pending exceeds the queue capacity: {health}"
    );
    assert_eq!(health["status"], "degraded", "{health}");
    let growth_mib = peak.saturating_sub(baseline) / 1024;
    assert!(
        growth_mib < 40,
        "gateway memory grew by {growth_mib} MiB (baseline {baseline} KiB, peak {peak} KiB) while one client stalled"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "another client's call took {slowest:?} while one client was stalled"
    );
    let (_, metrics) = gw.get_text("/metrics").await;
    assert!(
        metrics.contains("gateway_backpressure_events_total{grade=\"bundle\"}"),
        "no backpressure metric:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_with_many_calls_drops_progress_in_the_drop_grade() {
    let gw = Gateway::start(
        &GatewayConfig::new()
            .stdio_fixture("fx")
            .stdio_fixture("other")
            .toml("[backpressure]\nbundle_at = 8\nslow_at = 16\ndrop_at = 32\ncapacity = 64\nslow_delay_ms = 1\n"),
    )
    .await;
    let raw = RawSession::initialize(&gw).await;
    let session = raw.session.clone().expect("a session id");
    // Progress of 48 calls: each call's progress is merged into one entry,
    // so the queue grows by call, past drop_at (32), where progress of calls
    // without a queued entry is dropped.
    let mut stalled = Vec::new();
    for i in 0..48 {
        stalled.push(stalled_flood(&gw, &session, 2_000, 1_000, &format!("flood-{i}")).await);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        let (_, health) = gw.get_json(&format!("/mcp/health/client/{session}")).await;
        if health["outbound_queue"]["dropped"].as_u64().unwrap_or(0) > 100 {
            break health;
        }
        assert!(
            Instant::now() < deadline,
            "no progress was dropped for the stalled client: {health}; log:\n{}",
            gw.log()
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let queue = &health["outbound_queue"];
    // The queue reached the drop grade and never passed its capacity.
    let peak = queue["peak_pending"].as_u64().unwrap_or(0);
    assert!(
        (32..=64).contains(&peak),
        "peak pending {peak} is not between drop_at (32) and capacity (64): {health}"
    );
    assert!(queue["slowed"].as_u64().unwrap_or(0) > 0, "{health}");
    // The shared upstream still serves others.
    let (other, _client) = connect(&gw).await;
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        call_tool(&other, "fx__echo", json!({"message": "ok"})),
    )
    .await
    .expect("another client is served while one is stalled");
    assert_eq!(text_of(&r), "ok");
    let (_, metrics) = gw.get_text("/metrics").await;
    assert!(
        metrics.contains("gateway_backpressure_events_total{grade=\"drop\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_calls_finish_refuses_new_ones_and_exits_zero() {
    let mut gw = Gateway::start(
        &GatewayConfig::new()
            .stdio_fixture("fx")
            .stdio_fixture("other")
            .shutdown_grace_secs(15),
    )
    .await;
    let mut in_flight = Vec::new();
    let mut sessions = Vec::new();
    for i in 0..3 {
        let (session, client) = connect(&gw).await;
        let session = std::sync::Arc::new(session);
        sessions.push((session.clone(), client));
        in_flight.push(tokio::spawn(async move {
            let r = session
                .call_tool(crate::support::call(
                    "fx__slow",
                    json!({"steps": 4, "delay_ms": 500}),
                ))
                .await;
            (i, r)
        }));
    }
    // Let the calls reach the upstream, then ask the gateway to stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped_at = Instant::now();
    gw.send_sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A new client cannot get in: the listener is closed (or the request is refused).
    let fresh = RawSession::new(&gw);
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "late", "version": "1"}}});
    match fresh.post_builder().body(init.to_string()).send().await {
        Err(e) => assert!(e.is_connect() || e.is_request(), "unexpected error: {e}"),
        Ok(r) => {
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert!(
                status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                    || body["error"]["code"] == -32004,
                "a new session was accepted during the drain: HTTP {status} {body}"
            );
        }
    }

    for task in in_flight {
        let (i, r) = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "an in-flight call got no answer during the drain; log:\n{}",
                    gw.log()
                )
            })
            .expect("the call task");
        let r = r.unwrap_or_else(|e| panic!("in-flight call {i} failed during the drain: {e}"));
        assert_ne!(r.is_error, Some(true), "call {i}: {r:?}");
        assert_eq!(
            text_of(&r),
            "done after 4 steps",
            "call {i} did not run to the end"
        );
    }
    let status = gw.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "exit status {status} after SIGTERM; log:\n{}",
        gw.log()
    );
    assert!(
        stopped_at.elapsed() < Duration::from_secs(15),
        "the drain took {:?}, longer than shutdown_grace_secs",
        stopped_at.elapsed()
    );
    let log = gw.log();
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("drained; bye"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_pool_spreads_calls_over_its_processes() {
    let gw = Gateway::start(
        &GatewayConfig::new()
            .stdio_fixture("fx")
            .upstream_extra("pool = { processes = 3 }\n")
            .stdio_fixture("other"),
    )
    .await;
    // The extra processes start in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, h) = gw.get_json("/health/gateway").await;
        let fx = h["upstreams"]
            .as_array()
            .and_then(|a| a.iter().find(|u| u["name"] == "fx").cloned())
            .unwrap_or(Value::Null);
        if fx["processes"]["live"] == 3 {
            assert_eq!(fx["processes"]["configured"], 3);
            break;
        }
        assert!(Instant::now() < deadline, "processes never all live: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (session, _client) = connect(&gw).await;
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..9 {
        let r = call_tool(&session, "fx__whoami", json!({})).await;
        let v: Value = serde_json::from_str(&text_of(&r)).expect("whoami answers JSON");
        pids.insert(v["pid"].as_u64().expect("a pid"));
    }
    assert_eq!(pids.len(), 3, "calls went to {pids:?}, not to 3 processes");
}
