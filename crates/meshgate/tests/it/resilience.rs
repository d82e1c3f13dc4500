//! Traffic control and resilience: circuit breakers, retries with backoff
//! inside a deadline, per-tool timeouts that cancel upstream, call pools, and
//! the supervisor that restarts crashed stdio upstreams. Faults are injected
//! into the real fixture (`fault` tool or `POST /fault`).

use std::time::{Duration, Instant};

use rmcp::{ErrorData, ServiceError};
use serde_json::{Value, json};

use crate::support::{
    CountingProxy, Gateway, GatewayConfig, HttpFixture, Session, WAIT, call, call_tool, connect,
    metric_value, text_of,
};

/// Calls a tool that must fail with a JSON-RPC error; returns the error and
/// how long the call took.
async fn call_error(session: &Session, name: &str, arguments: Value) -> (ErrorData, Duration) {
    let started = Instant::now();
    let outcome = tokio::time::timeout(WAIT, session.call_tool(call(name, arguments))).await;
    let elapsed = started.elapsed();
    match outcome {
        Err(_) => panic!("tools/call {name} did not answer within {WAIT:?}"),
        Ok(Ok(result)) => panic!("tools/call {name} should have failed but answered {result:?}"),
        Ok(Err(ServiceError::McpError(e))) => (e, elapsed),
        Ok(Err(other)) => panic!("tools/call {name} failed without a JSON-RPC error: {other}"),
    }
}

/// `prompts/get greet` without its required `name`: the fixture answers
/// with a JSON-RPC error (invalid params), which the gateway passes on.
async fn greet_without_name(session: &Session) -> ErrorData {
    let params = serde_json::from_value(json!({"name": "greet"})).expect("prompts/get params");
    match tokio::time::timeout(WAIT, session.get_prompt(params)).await {
        Err(_) => panic!("prompts/get did not answer within {WAIT:?}"),
        Ok(Ok(result)) => panic!("prompts/get greet without a name answered {result:?}"),
        Ok(Err(ServiceError::McpError(e))) => {
            assert!(
                e.message.contains("missing required argument: name"),
                "the upstream's own error is passed on: {e:?}"
            );
            e
        }
        Ok(Err(other)) => panic!("prompts/get failed without a JSON-RPC error: {other}"),
    }
}

/// The error's `data`, which every gateway-made upstream error carries.
fn data_of(e: &ErrorData) -> Value {
    e.data
        .clone()
        .unwrap_or_else(|| panic!("the error has no data: {e:?}"))
}

/// `GET /admin/circuit-breakers/{upstream}`.
async fn breaker(gw: &Gateway, upstream: &str) -> Value {
    let (status, body) = gw
        .get_json(&format!("/admin/circuit-breakers/{upstream}"))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The entry of `upstream` in `GET /health/gateway`.
async fn gateway_health_of(gw: &Gateway, upstream: &str) -> Value {
    let (status, health) = gw.get_json("/health/gateway").await;
    assert_eq!(status, 200, "{health}");
    health["upstreams"]
        .as_array()
        .and_then(|ups| ups.iter().find(|u| u["name"] == upstream))
        .cloned()
        .unwrap_or_else(|| panic!("no upstream `{upstream}` in /health/gateway: {health}"))
}

/// The current value of a series on `/metrics`.
async fn metric(gw: &Gateway, series: &str) -> Option<f64> {
    let (status, metrics) = gw.get_text("/metrics").await;
    assert_eq!(status, 200);
    metric_value(&metrics, series)
}

/// The fixture's process id, from its `whoami` tool.
async fn pid_of(session: &Session, whoami: &str) -> u64 {
    let answer = call_tool(session, whoami, json!({})).await;
    let text = text_of(&answer);
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["pid"].as_u64())
        .unwrap_or_else(|| panic!("{whoami} answered no pid: {text}"))
}

/// Polls `check` every 50 ms until it returns `Some`, for up to [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_after_threshold_fails_fast_and_recovers_through_half_open() {
    let fx = HttpFixture::start();
    let gw = Gateway::start(&GatewayConfig::new().http_upstream("fx", &fx.url).upstream_extra(
        "breaker = { failure_threshold = 3, open_timeout_ms = 1000 }\nretry = { max_attempts = 1 }",
    ))
    .await;
    let (session, _) = connect(&gw).await;
    let ok = call_tool(&session, "flaky", json!({"message": "before"})).await;
    assert_eq!(text_of(&ok), "flaky ok: before");

    fx.set_fault(json!({"mode": "http_error"})).await;
    for i in 1..=3 {
        let (e, _) = call_error(&session, "flaky", json!({})).await;
        assert_eq!(
            data_of(&e)["reason"],
            "upstream_unavailable",
            "failure {i} is a transport failure: {e:?}"
        );
    }
    assert_eq!(fx.fault_stats().await["http_faulted"], 3);
    assert_eq!(
        metric(&gw, "gateway_circuit_breaker_state{upstream=\"fx\"}").await,
        Some(1.0),
        "the state gauge shows open"
    );
    let open = breaker(&gw, "fx").await;
    assert_eq!(open["state"], "open", "{open}");
    assert_eq!(open["times_opened"], 1, "{open}");

    let (e, took) = call_error(&session, "flaky", json!({})).await;
    assert!(
        e.message.starts_with("circuit_open:") && e.message.contains("`fx`"),
        "the fast failure says why and names the upstream: {}",
        e.message
    );
    let data = data_of(&e);
    assert_eq!(data["reason"], "circuit_open", "{data}");
    assert_eq!(data["upstream"], "fx", "{data}");
    assert_eq!(data["http_status"], 503, "{data}");
    let retry_after = data["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no retry_after_ms: {data}"));
    assert!(
        (1..=1000).contains(&retry_after),
        "retry_after_ms is within open_timeout_ms: {data}"
    );
    assert!(took < Duration::from_secs(1), "failing fast took {took:?}");
    assert_eq!(
        fx.fault_stats().await["http_faulted"],
        3,
        "the fast failure did not reach the upstream"
    );

    fx.set_fault(json!({"mode": "ok"})).await;
    tokio::time::sleep(Duration::from_millis(retry_after + 100)).await;
    let probe = call_tool(&session, "flaky", json!({"message": "probe"})).await;
    assert_eq!(
        text_of(&probe),
        "flaky ok: probe",
        "the half-open probe goes through"
    );
    let closed = breaker(&gw, "fx").await;
    assert_eq!(closed["state"], "closed", "{closed}");
    assert_eq!(closed["consecutive_failures"], 0, "{closed}");
    assert_eq!(closed["times_opened"], 1, "{closed}");
    assert_eq!(
        metric(&gw, "gateway_circuit_breaker_state{upstream=\"fx\"}").await,
        Some(0.0)
    );
    let after = call_tool(&session, "flaky", json!({"message": "after"})).await;
    assert_eq!(text_of(&after), "flaky ok: after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_errors_and_error_answers_do_not_open_the_breaker() {
    let fx = HttpFixture::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .http_upstream("fx", &fx.url)
            .upstream_extra("breaker = { failure_threshold = 2, open_timeout_ms = 60000 }"),
    )
    .await;
    let (session, _) = connect(&gw).await;

    fx.set_fault(json!({"mode": "fail"})).await;
    for _ in 0..5 {
        let failed = call_tool(&session, "flaky", json!({})).await;
        assert_eq!(failed.is_error, Some(true), "{failed:?}");
        assert_eq!(text_of(&failed), "injected failure");
    }
    for _ in 0..3 {
        greet_without_name(&session).await;
    }
    let b = breaker(&gw, "fx").await;
    assert_eq!(b["state"], "closed", "{b}");
    assert_eq!(b["consecutive_failures"], 0, "{b}");
    assert_eq!(b["times_opened"], 0, "{b}");

    let failed = call_tool(&session, "flaky", json!({})).await;
    assert_eq!(failed.is_error, Some(true));
    assert_eq!(
        fx.fault_stats().await["flaky_failed"],
        6,
        "every call reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_breaker_reset_closes_an_open_breaker() {
    let fx = HttpFixture::start();
    let gw = Gateway::start(&GatewayConfig::new().http_upstream("fx", &fx.url).upstream_extra(
        "breaker = { failure_threshold = 2, open_timeout_ms = 60000 }\nretry = { max_attempts = 1 }",
    ))
    .await;
    let (session, _) = connect(&gw).await;
    let http = gw.client();

    let open_it = || async {
        fx.set_fault(json!({"mode": "http_error"})).await;
        for _ in 0..2 {
            call_error(&session, "flaky", json!({})).await;
        }
        let (e, _) = call_error(&session, "flaky", json!({})).await;
        assert_eq!(data_of(&e)["reason"], "circuit_open", "{e:?}");
        fx.set_fault(json!({"mode": "ok"})).await;
    };

    open_it().await;
    let (e, _) = call_error(&session, "flaky", json!({})).await;
    assert_eq!(
        data_of(&e)["reason"],
        "circuit_open",
        "the upstream is fine again, but the breaker stays open for 60 s: {e:?}"
    );
    let r = http
        .post(gw.url("/admin/circuit-breakers/fx/reset"))
        .send()
        .await
        .expect("POST reset");
    let (status, body) = crate::support::json_body(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "closed", "{body}");
    let ok = call_tool(&session, "flaky", json!({"message": "reset"})).await;
    assert_eq!(text_of(&ok), "flaky ok: reset");
    assert_eq!(breaker(&gw, "fx").await["state"], "closed");

    // POST /mcp/admin/reset closes every breaker.
    open_it().await;
    let r = http
        .post(gw.url("/mcp/admin/reset"))
        .send()
        .await
        .expect("POST /mcp/admin/reset");
    let (status, body) = crate::support::json_body(r).await;
    assert_eq!(status, 200, "{body}");
    let ok = call_tool(&session, "flaky", json!({"message": "reset all"})).await;
    assert_eq!(text_of(&ok), "flaky ok: reset all");
    assert_eq!(breaker(&gw, "fx").await["state"], "closed");

    for (method, path) in [
        ("GET", "/admin/circuit-breakers/nope"),
        ("POST", "/admin/circuit-breakers/nope/reset"),
    ] {
        let r = match method {
            "GET" => http.get(gw.url(path)),
            _ => http.post(gw.url(path)),
        }
        .send()
        .await
        .expect("request");
        let (status, body) = crate::support::json_body(r).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("nope") && message.contains("fx"),
            "{method} {path} names the unknown and the configured upstreams: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_recover_from_transient_transport_failures() {
    let fx = HttpFixture::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .http_upstream("fx", &fx.url)
            .upstream_extra(
                "retry = { max_attempts = 3, initial_backoff_ms = 50, max_backoff_ms = 200 }",
            ),
    )
    .await;
    let (session, _) = connect(&gw).await;

    fx.set_fault(json!({"mode": "http_error", "count": 2}))
        .await;
    let ok = call_tool(&session, "flaky", json!({"message": "third time"})).await;
    assert_eq!(
        text_of(&ok),
        "flaky ok: third time",
        "the third attempt answers"
    );
    let stats = fx.fault_stats().await;
    assert_eq!(stats["http_faulted"], 2, "{stats}");
    assert_eq!(stats["flaky_answered"], 1, "{stats}");
    assert_eq!(stats["flaky_calls"], 1, "{stats}");
    let b = breaker(&gw, "fx").await;
    assert_eq!(
        b["consecutive_failures"], 0,
        "the success reset the count: {b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_jitter_stay_within_the_deadline() {
    let fx = HttpFixture::start();
    // 10 attempts need 9 waits of up to 400, 800, then 1500 ms (~5.8 s on
    // average; under 2 s in ~0.02 % of runs), so the 2 s deadline, not
    // max_attempts, ends the retries.
    let gw = Gateway::start(&GatewayConfig::new().http_upstream("fx", &fx.url).upstream_extra(
        "deadline_secs = 2\nretry = { max_attempts = 10, initial_backoff_ms = 400, max_backoff_ms = 1500 }\nbreaker = { failure_threshold = 0 }",
    ))
    .await;
    let (session, _) = connect(&gw).await;

    fx.set_fault(json!({"mode": "http_error"})).await;
    let (e, took) = call_error(&session, "flaky", json!({})).await;
    let data = data_of(&e);
    assert_eq!(data["reason"], "upstream_unavailable", "{e:?}");
    assert_eq!(data["upstream"], "fx", "{data}");
    let attempts = data["attempts"]
        .as_u64()
        .unwrap_or_else(|| panic!("no attempts: {data}"));
    assert!(
        (2..10).contains(&attempts),
        "retried, and cut short by the deadline: {data}"
    );
    assert!(
        e.message.contains("deadline"),
        "the message says the deadline ended the retries: {}",
        e.message
    );
    // It gives up only when a wait (< max_backoff_ms = 1.5 s) would pass the deadline.
    let elapsed_ms = data["elapsed_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no elapsed_ms: {data}"));
    assert!(
        (490..=2000).contains(&elapsed_ms),
        "elapsed_ms lies between deadline - max_backoff and the deadline: {data}"
    );
    assert!(
        took >= Duration::from_millis(490) && took <= Duration::from_secs(3),
        "the call took {took:?}, not within the 2 s deadline (+1 s slack)"
    );
    assert_eq!(
        fx.fault_stats().await["http_faulted"],
        json!(attempts),
        "every attempt reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tool_timeout_cancels_the_call_upstream() {
    let fx = HttpFixture::start();
    let proxy = CountingProxy::start(&fx.url).await;
    // Retries are on (the default); timeouts and error answers must not use them.
    let gw = Gateway::start(
        &GatewayConfig::new()
            .http_upstream("fx", &proxy.url)
            .upstream_extra("tool_timeouts = { flaky = 1 }"),
    )
    .await;
    let (session, _) = connect(&gw).await;

    fx.set_fault(json!({"mode": "hang"})).await;
    let (e, took) = call_error(&session, "flaky", json!({})).await;
    let data = data_of(&e);
    assert_eq!(data["reason"], "upstream_timeout", "{e:?}");
    assert_eq!(data["upstream"], "fx", "{data}");
    let timeout_ms = data["timeout_ms"].as_u64().unwrap_or_default();
    assert!(
        (990..=1000).contains(&timeout_ms),
        "the 1 s tool timeout: {data}"
    );
    assert_eq!(data["attempts"], 1, "a timeout is not retried: {data}");
    let timed_out = e.message.clone();
    assert!(
        e.message.contains("did not answer within") && e.message.contains("cancelled upstream"),
        "{}",
        e.message
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "the 1 s tool timeout fired after {took:?}"
    );
    eventually("the fixture to observe the cancellation", || async {
        let stats = fx.fault_stats().await;
        (stats["cancellations"] == 1).then_some(())
    })
    .await;
    let stats = fx.fault_stats().await;
    assert_eq!(stats["flaky_calls"], 1, "not retried: {stats}");
    assert_eq!(
        breaker(&gw, "fx").await["consecutive_failures"],
        1,
        "the breaker counts the timeout"
    );
    assert_eq!(
        proxy.requests("tools/call"),
        1,
        "one tools/call went upstream"
    );

    // The timeout is flaky's own: other tools keep timeout_secs (60 s).
    let slow = call_tool(&session, "slow", json!({"steps": 3, "delay_ms": 500})).await;
    assert_eq!(text_of(&slow), "done after 3 steps");
    greet_without_name(&session).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        proxy.requests("prompts/get"),
        1,
        "a JSON-RPC error answer is not retried"
    );
    assert!(
        timed_out.contains("(tool_timeouts)"),
        "the message names the setting that fired, tool_timeouts: {timed_out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_answers_pool_timeout_naming_the_pool() {
    let fx = HttpFixture::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .http_upstream("fx", &fx.url)
            .upstream_extra("pool = { size = 1, overflow = 0, checkout_timeout_ms = 300 }"),
    )
    .await;
    let (busy, _) = connect(&gw).await;
    let (waiting, _) = connect(&gw).await;

    fx.set_fault(json!({"mode": "slow", "delay_ms": 2000, "count": 1}))
        .await;
    let first = tokio::spawn(async move {
        let r = call_tool(&busy, "flaky", json!({"message": "first"})).await;
        (text_of(&r), busy)
    });
    eventually("the slow call to hold the only slot", || async {
        let stats = fx.fault_stats().await;
        (stats["flaky_calls"] == 1).then_some(())
    })
    .await;
    let pool = gateway_health_of(&gw, "fx").await["pool"].clone();
    assert_eq!(pool["in_use"], 1, "{pool}");
    assert_eq!(pool["size"], 1, "{pool}");

    let (e, took) = call_error(&waiting, "flaky", json!({"message": "second"})).await;
    assert!(
        e.message.starts_with("pool_timeout:") && e.message.contains("`fx`"),
        "{}",
        e.message
    );
    let data = data_of(&e);
    assert_eq!(data["reason"], "pool_timeout", "{data}");
    assert_eq!(data["pool"], "fx", "{data}");
    assert_eq!(data["capacity"], 1, "{data}");
    let waited = data["waited_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no waited_ms: {data}"));
    assert!(
        (300..2000).contains(&waited),
        "waited the checkout timeout: {data}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "the pool timeout came after {took:?}, not ~300 ms"
    );

    let (text, _busy) = tokio::time::timeout(WAIT, first)
        .await
        .expect("the slow call ends")
        .expect("the slow call's task");
    assert_eq!(text, "flaky ok: first");
    let ok = call_tool(&waiting, "flaky", json!({"message": "later"})).await;
    assert_eq!(text_of(&ok), "flaky ok: later", "the slot is free again");

    let pool = gateway_health_of(&gw, "fx").await["pool"].clone();
    assert_eq!(pool["checkout_timeouts"], 1, "{pool}");
    assert_eq!(pool["in_use"], 0, "{pool}");
    assert_eq!(
        breaker(&gw, "fx").await["consecutive_failures"],
        0,
        "a pool timeout says nothing about the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_stdio_upstream_restarts_with_backoff_while_others_serve() {
    let gw = Gateway::start(
        &GatewayConfig::new()
            .stdio_fixture("a")
            .upstream_extra("retry = { max_attempts = 1 }")
            .stdio_fixture("b"),
    )
    .await;
    let (session, _) = connect(&gw).await;
    let a_pid = pid_of(&session, "a__whoami").await;
    let b_pid = pid_of(&session, "b__whoami").await;

    let set = call_tool(&session, "a__fault", json!({"mode": "crash"})).await;
    assert_ne!(set.is_error, Some(true), "{set:?}");
    let crashed_at = Instant::now();
    let crashed = tokio::time::timeout(WAIT, session.call_tool(call("a__flaky", json!({}))))
        .await
        .expect("the crashing call answers");
    assert!(
        crashed.is_err(),
        "the call that crashed the upstream fails: {crashed:?}"
    );

    for i in 0..5 {
        let started = Instant::now();
        let echo = call_tool(
            &session,
            "b__echo",
            json!({"message": format!("still {i}")}),
        )
        .await;
        assert_eq!(text_of(&echo), format!("still {i}"));
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "b answered after {took:?} while a was down"
        );
    }

    let new_pid = eventually("a to answer again", || async {
        let r = session.call_tool(call("a__whoami", json!({}))).await.ok()?;
        serde_json::from_str::<Value>(&text_of(&r)).ok()?["pid"].as_u64()
    })
    .await;
    assert_ne!(new_pid, a_pid, "a is a new process");
    assert!(
        crashed_at.elapsed() < Duration::from_secs(5),
        "a was back only {:?} after the crash",
        crashed_at.elapsed()
    );
    let ok = call_tool(&session, "a__flaky", json!({"message": "back"})).await;
    assert_eq!(text_of(&ok), "flaky ok: back");
    assert_eq!(
        pid_of(&session, "b__whoami").await,
        b_pid,
        "b never restarted"
    );

    let a = gateway_health_of(&gw, "a").await;
    assert!(a["restarts"].as_u64().is_some_and(|n| n >= 1), "{a}");
    assert_eq!(a["status"], "up", "{a}");
    let b = gateway_health_of(&gw, "b").await;
    assert_eq!(b["restarts"], 0, "{b}");
    let restarts = metric(&gw, "gateway_upstream_restarts_total{upstream=\"a\"}").await;
    assert!(
        restarts.is_some_and(|n| n >= 1.0),
        "gateway_upstream_restarts_total for a: {restarts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upstream_is_reported_up_again_once_calls_succeed_after_a_transport_failure() {
    let fx = HttpFixture::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .http_upstream("fx", &fx.url)
            .upstream_extra("retry = { max_attempts = 1 }"),
    )
    .await;
    let (session, _) = connect(&gw).await;

    fx.set_fault(json!({"mode": "http_error", "count": 1}))
        .await;
    let (e, _) = call_error(&session, "flaky", json!({})).await;
    assert_eq!(data_of(&e)["reason"], "upstream_unavailable", "{e:?}");
    let ok = call_tool(&session, "flaky", json!({"message": "fine again"})).await;
    assert_eq!(text_of(&ok), "flaky ok: fine again");
    assert_eq!(breaker(&gw, "fx").await["state"], "closed");

    // Allow one health-check period (10 s) plus its ping timeout (5 s).
    let started = Instant::now();
    let mut last = Value::Null;
    while started.elapsed() < Duration::from_secs(15) {
        let (status, up) = gw.get_json("/health/upstreams/fx").await;
        if status == 200 && up["status"] == "up" {
            let (_, health) = gw.get_json("/health/gateway").await;
            assert_eq!(health["status"], "ok", "{health}");
            return;
        }
        last = up;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "fx answers calls again, but /health/upstreams/fx still reports it after {:?}: {last}",
        started.elapsed()
    );
}
