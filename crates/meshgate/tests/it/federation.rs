//! An upstream that is down degrades the gateway without taking it down.

use serde_json::json;

use crate::support::{Env, call, call_tool, connect, text_of, tool_names};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_upstream_degrades_health_but_other_upstreams_keep_working() {
    // Env::start_with waits for /ready: the gateway becomes ready although `dead` is down.
    let env = Env::start_with(|c| c.dead_upstream("dead")).await;

    let (status, health) = env.gw.get_json("/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    let dead = &health["components"]["upstreams"]["dead"];
    assert_eq!(dead["status"], "down", "{health}");
    assert!(
        dead["error"].as_str().is_some_and(|e| !e.is_empty()),
        "the reason is given: {health}"
    );
    assert_eq!(
        health["components"]["upstreams"]["fx"]["status"], "up",
        "{health}"
    );

    let (status, dead) = env.gw.get_json("/health/upstreams/dead").await;
    assert_eq!(status, 503, "{dead}");
    assert_eq!(dead["status"], "down");
    let (status, _) = env.gw.get_json("/health/upstreams/fx").await;
    assert_eq!(status, 200);

    let (session, _) = connect(&env.gw).await;
    let names: Vec<String> = tool_names(&session).await;
    assert!(names.iter().any(|n| n == "fx__echo"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("dead__")), "{names:?}");
    let refused = session
        .call_tool(call("dead__echo", json!({"message": "x"})))
        .await
        .expect_err("a tool of a down upstream cannot be called");
    let message = refused.to_string();
    assert!(
        message.contains("upstream `dead`") && message.contains("unavailable"),
        "the error names the down upstream instead of calling the tool unknown: {message}"
    );
    let echo = call_tool(&session, "fx__echo", json!({"message": "alive"})).await;
    assert_eq!(text_of(&echo), "alive");
    let sum = call_tool(&session, "fxs__add", json!({"a": 1, "b": 2})).await;
    assert_eq!(sum.structured_content, Some(json!({"sum": 3.0})));

    let status = call_tool(&session, "meshgate_status", json!({})).await;
    let report = status
        .structured_content
        .expect("the status tool answers in structuredContent");
    let state = |name: &str| {
        report["upstreams"]
            .as_array()
            .and_then(|ups| ups.iter().find(|u| u["name"] == name))
            .map(|u| u["status"].clone())
    };
    assert_eq!(state("dead"), Some(json!("down")), "{report}");
    assert_eq!(state("fx"), Some(json!("up")), "{report}");
}
