//! Result caching end to end: a gateway in front of the HTTP fixture with
//! `cache_ttl_secs` on some of its tools. Whether the upstream was called is
//! read from the fixture's own counters (`GET /fault`: `flaky_calls`), not
//! from the gateway.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use rmcp::model::{CallToolResult, ProtocolVersion};
use serde_json::{Value, json};

use crate::support::{
    Gateway, GatewayConfig, HttpFixture, Seen, WAIT, call_tool, connect, connect_as, create_key,
    metric_value, send, text_of, tool_names,
};

/// The fixture three times over: `fx` (shared, `flaky` and `bump` cached
/// for a minute), `fy` (`flaky` cached for one second) and `fz` (nothing
/// cached). `tools_search` is kept out of the lists (threshold 1000).
async fn gateway() -> (Gateway, HttpFixture) {
    let fx = HttpFixture::start();
    let config = GatewayConfig::new()
        .http_upstream("fx", &fx.url)
        .upstream_extra("shared = true\ncache_ttl_secs = { flaky = 60, bump = 60 }")
        .http_upstream("fy", &fx.url)
        .upstream_extra("cache_ttl_secs = { flaky = 1 }")
        .http_upstream("fz", &fx.url)
        .toml("[tools]\nsearch_threshold = 1000");
    (Gateway::start(&config).await, fx)
}

/// `flaky`'s answer counter (`structuredContent.calls`).
fn calls(r: &CallToolResult) -> u64 {
    r.structured_content
        .as_ref()
        .and_then(|s| s["calls"].as_u64())
        .unwrap_or_else(|| panic!("flaky answers with structuredContent.calls: {r:?}"))
}

/// The result's `_meta["meshgate.io/cache"]`, if marked.
fn cache_mark(r: &CallToolResult) -> Option<Value> {
    r.meta.as_ref()?.0.get("meshgate.io/cache").cloned()
}

async fn flaky_calls(fx: &HttpFixture) -> u64 {
    fx.fault_stats().await["flaky_calls"]
        .as_u64()
        .expect("flaky_calls")
}

async fn metric(gw: &Gateway, series: &str) -> f64 {
    let (status, text) = gw.get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    metric_value(&text, series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_calls_are_answered_from_the_cache_and_other_arguments_or_tenants_miss() {
    let (gw, fx) = gateway().await;
    let (session, _) = connect(&gw).await;
    assert!(
        !tool_names(&session)
            .await
            .contains(&"tools_search".to_owned()),
        "below search_threshold tools_search is not listed"
    );

    let first = call_tool(&session, "fx__flaky", json!({"message": "a"})).await;
    assert_eq!(cache_mark(&first), None, "a miss is not marked");
    let second = call_tool(&session, "fx__flaky", json!({"message": "a"})).await;
    assert_eq!(calls(&second), calls(&first), "the same answer");
    assert_eq!(text_of(&second), text_of(&first));
    assert_eq!(cache_mark(&second), Some(json!("hit")));
    let age = &second.meta.as_ref().expect("meta").0["meshgate.io/cache_age_secs"];
    assert!(age.as_u64().is_some_and(|a| a <= 1), "age {age}");
    assert_eq!(flaky_calls(&fx).await, 1, "the upstream was called once");
    assert_eq!(
        metric(
            &gw,
            r#"gateway_cache_hits_total{upstream="fx",tool="flaky"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            r#"gateway_cache_misses_total{upstream="fx",tool="flaky"}"#
        )
        .await,
        1.0
    );

    // Other arguments are another entry.
    let other = call_tool(&session, "fx__flaky", json!({"message": "b"})).await;
    assert_eq!(cache_mark(&other), None);
    assert_ne!(calls(&other), calls(&first));
    assert_eq!(flaky_calls(&fx).await, 2);

    // Another tenant never sees this tenant's entries.
    let (key_b, _) = create_key(
        &gw,
        json!({"name": "tenant b", "role": "developer", "tenant": "b"}),
    )
    .await;
    let (session_b, _) = connect_as(&gw, ProtocolVersion::V_2025_11_25, &key_b).await;
    let for_b = call_tool(&session_b, "fx__flaky", json!({"message": "a"})).await;
    assert_eq!(cache_mark(&for_b), None, "tenant b misses");
    assert_eq!(flaky_calls(&fx).await, 3);
    let for_b_again = call_tool(&session_b, "fx__flaky", json!({"message": "a"})).await;
    assert_eq!(cache_mark(&for_b_again), Some(json!("hit")));
    assert_eq!(calls(&for_b_again), calls(&for_b));
    // A hit is still a call: it is audited like any other (the admin's
    // tenant made a miss, a hit and a call with other arguments).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, audit) = send(
            &gw.client(),
            Method::GET,
            &gw.url("/api/v1/audit?tenant=default&action=tool.call&target=fx__flaky"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{audit}");
        let n = audit["entries"].as_array().map_or(0, Vec::len);
        if n == 3 {
            break;
        }
        assert!(
            n < 3 && tokio::time::Instant::now() < deadline,
            "expected 3 audited calls: {audit}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_and_tools_not_configured_or_annotated_as_writing_are_never_cached() {
    let (gw, fx) = gateway().await;
    let (session, _) = connect(&gw).await;

    // fy caches flaky for one second.
    let first = call_tool(&session, "fy__flaky", json!({"message": "ttl"})).await;
    let hit = call_tool(&session, "fy__flaky", json!({"message": "ttl"})).await;
    assert_eq!(cache_mark(&hit), Some(json!("hit")));
    assert_eq!(calls(&hit), calls(&first));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = call_tool(&session, "fy__flaky", json!({"message": "ttl"})).await;
    assert_eq!(cache_mark(&expired), None, "expired after its TTL");
    assert_ne!(calls(&expired), calls(&first));
    assert_eq!(flaky_calls(&fx).await, 2);

    // fz sets no TTL: every call reaches the upstream.
    let a = call_tool(&session, "fz__flaky", json!({"message": "none"})).await;
    let b = call_tool(&session, "fz__flaky", json!({"message": "none"})).await;
    assert_eq!(cache_mark(&b), None);
    assert_ne!(calls(&a), calls(&b));
    assert_eq!(flaky_calls(&fx).await, 4);

    // fx sets a TTL on bump, which is annotated readOnlyHint: false.
    let one = call_tool(&session, "fx__bump", json!({})).await;
    let two = call_tool(&session, "fx__bump", json!({})).await;
    assert_eq!(cache_mark(&two), None);
    assert_ne!(text_of(&one), text_of(&two), "bump ran twice");
    assert_eq!(
        metric(&gw, r#"gateway_cache_refused_total{tool="fx__bump"}"#).await,
        2.0
    );
    let log = gw.log();
    assert_eq!(
        log.matches("not caching results of tool `bump`").count(),
        1,
        "one warning per tool, naming the setting and the annotation: {log}"
    );
    assert!(log.contains("cache_ttl_secs.bump") && log.contains("readOnlyHint: false"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_list_change_or_an_admin_flush_drops_cached_results() {
    let (gw, fx) = gateway().await;
    let (session, client) = connect(&gw).await;

    let first = call_tool(&session, "fx__flaky", json!({"message": "x"})).await;
    assert_eq!(
        cache_mark(&call_tool(&session, "fx__flaky", json!({"message": "x"})).await),
        Some(json!("hit"))
    );
    let added = call_tool(&session, "fx__add_tool", json!({"name": "cache_probe"})).await;
    assert_eq!(text_of(&added), "added");
    client
        .wait_for("notifications/tools/list_changed", |seen| {
            seen.iter()
                .any(|s| matches!(s, Seen::ToolListChanged))
                .then_some(())
        })
        .await;
    let after = call_tool(&session, "fx__flaky", json!({"message": "x"})).await;
    assert_eq!(cache_mark(&after), None, "fx's entries were dropped");
    assert_ne!(calls(&after), calls(&first));
    assert_eq!(flaky_calls(&fx).await, 2);
    assert!(
        metric(
            &gw,
            r#"gateway_cache_invalidations_total{upstream="fx",reason="tools_changed"}"#
        )
        .await
            >= 1.0
    );

    // The operator flushes by hand.
    assert_eq!(
        cache_mark(&call_tool(&session, "fx__flaky", json!({"message": "x"})).await),
        Some(json!("hit"))
    );
    let (status, body) = send(
        &gw.client(),
        Method::DELETE,
        &gw.url("/admin/cache?upstream=nosuch"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = send(
        &gw.client(),
        Method::DELETE,
        &gw.url("/admin/cache?upstream=fx"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["flushed"], 1, "{body}");
    let flushed = call_tool(&session, "fx__flaky", json!({"message": "x"})).await;
    assert_eq!(cache_mark(&flushed), None);
    assert_eq!(flaky_calls(&fx).await, 3);
}
