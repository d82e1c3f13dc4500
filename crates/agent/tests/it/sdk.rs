//! The SDK's behaviour on the wire, against the fake gateway.

use std::time::Duration;

use meshgate_agent::{AgentError, AgentEvent};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::fake_gateway::{FakeGateway, GatewayConn, RunningAgent, options};

/// Shuts the agent down and checks it closes with 1000 and returns `Ok`.
async fn shut_down(agent: RunningAgent, conn: &mut GatewayConn) {
    agent.shutdown.cancel();
    assert_eq!(conn.expect_close().await, Some(1000));
    assert!(agent.finished().await.is_ok());
}

#[tokio::test]
async fn handshake_carries_credentials_and_register_describes_the_agent() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    let mut conn = gateway.accept().await;
    assert_eq!(conn.headers["authorization"], "Bearer mg_test_key");
    assert_eq!(conn.headers["x-agent-id"], "test-agent-1");
    assert_eq!(conn.headers["x-agent-type"], "tester");

    let params = conn.register(json!([])).await;
    assert_eq!(
        params,
        json!({
            "id": "test-agent-1", "type": "tester", "name": "Test Agent", "version": "9.9.9",
            "capabilities": [
                {"name": "summarize", "confidence": 0.9, "task_types": ["summarize"], "languages": ["en", "de"]},
                "lang:rust"
            ],
            "max_concurrent_tasks": 2,
            "config": {"model": "tiny"},
            "metadata": {"host": "test"},
            "active_tasks": []
        })
    );
    let (session, version) = agent
        .event(|e| match e {
            AgentEvent::Registered {
                session_id,
                config_version,
                ..
            } => Some((session_id.clone(), *config_version)),
            _ => None,
        })
        .await;
    assert_eq!((session.as_str(), version), ("as-test", 3));
    agent.shutdown.cancel();
    assert_eq!(conn.expect_close().await, Some(1000));
    assert!(agent.finished().await.is_ok());
}

#[tokio::test]
async fn accepted_task_reports_progress_then_completes() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;

    conn.assign_accepted("t-1", json!({"progress": true})).await;
    let progress = conn
        .expect_and_answer(
            "task.progress",
            json!({"task_id": "t-1", "state": "in_progress"}),
        )
        .await;
    assert_eq!(
        progress,
        json!({"task_id": "t-1", "progress": 0.5, "message": "half way"})
    );
    let complete = conn
        .expect_and_answer(
            "task.complete",
            json!({"task_id": "t-1", "state": "completed"}),
        )
        .await;
    // The handler saw the configuration from the register answer.
    assert_eq!(
        complete,
        json!({"task_id": "t-1", "result": {"echo": {"progress": true}, "config": {"model": "small"}}})
    );
    agent
        .event(|e| matches!(e, AgentEvent::TaskCompleted { id } if id == "t-1").then_some(()))
        .await;
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn reconnects_and_re_registers_running_tasks_then_delivers_their_result() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    conn.assign_accepted("t-held", json!({"hold": true})).await;
    drop(conn);
    agent
        .event(|e| matches!(e, AgentEvent::Disconnected { .. }).then_some(()))
        .await;

    let mut conn = gateway.accept().await;
    let params = conn.register(json!(["t-held"])).await;
    assert_eq!(params["active_tasks"], json!(["t-held"]));
    let resumed = agent
        .event(|e| match e {
            AgentEvent::Registered { resumed_tasks, .. } => Some(resumed_tasks.clone()),
            _ => None,
        })
        .await;
    assert_eq!(resumed, ["t-held"]);

    agent.release.add_permits(1);
    let complete = conn
        .expect_and_answer(
            "task.complete",
            json!({"task_id": "t-held", "state": "completed"}),
        )
        .await;
    assert_eq!(complete["task_id"], "t-held");
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn result_finished_while_disconnected_is_delivered_after_reconnect() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    conn.assign_accepted("t-queued", json!({"hold": true}))
        .await;
    drop(conn);
    agent
        .event(|e| matches!(e, AgentEvent::Disconnected { .. }).then_some(()))
        .await;
    // The handler ends while no connection is registered.
    agent.release.add_permits(1);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut conn = gateway.accept().await;
    let params = conn.register(json!(["t-queued"])).await;
    assert_eq!(
        params["active_tasks"],
        json!(["t-queued"]),
        "an undelivered result keeps the task held"
    );
    let complete = conn
        .expect_and_answer(
            "task.complete",
            json!({"task_id": "t-queued", "state": "completed"}),
        )
        .await;
    assert_eq!(complete["result"]["echo"], json!({"hold": true}));
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn task_the_gateway_did_not_resume_is_cancelled_locally() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    conn.assign_accepted("t-lost", json!({"hold": true})).await;
    drop(conn);

    let mut conn = gateway.accept().await;
    let params = conn.register(json!([])).await;
    assert_eq!(params["active_tasks"], json!(["t-lost"]));
    agent
        .event(|e| matches!(e, AgentEvent::TaskCancelled { id } if id == "t-lost").then_some(()))
        .await;
    // Nothing about the task is sent: the next message answers our request.
    let health = conn.call("g-1", "health.check").await;
    assert_eq!(health["result"]["active_tasks"], 0);
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn unauthorized_upgrade_stops_run_with_the_gateways_reason() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    gateway.refuse(401, 4001, "the API key was revoked").await;
    let event = agent
        .event(|e| matches!(e, AgentEvent::Refused { .. }).then(|| e.clone()))
        .await;
    assert_eq!(
        event,
        AgentEvent::Refused {
            status: Some(401),
            code: Some(4001),
            message: "the API key was revoked".into()
        }
    );
    match agent.finished().await {
        Err(AgentError::Refused {
            status: 401,
            code: Some(4001),
            message,
        }) => assert_eq!(message, "the API key was revoked"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn unavailable_gateway_is_retried_until_it_accepts() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    gateway.refuse(503, 4003, "shutting down").await;
    let (mut conn, _) = gateway.accept_registered().await;
    agent
        .event(|e| matches!(e, AgentEvent::Registered { .. }).then_some(()))
        .await;
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn register_conflict_is_retried_and_invalid_params_stop_the_agent() {
    let gateway = FakeGateway::start().await;
    let agent = RunningAgent::start(options(&gateway.url));
    let mut conn = gateway.accept().await;
    let (id, _) = conn.expect_request("agent.register").await;
    conn.answer_error(&id, 4008, "agent test-agent-1 is connected elsewhere")
        .await;
    drop(conn);

    let mut conn = gateway.accept().await;
    let (id, _) = conn.expect_request("agent.register").await;
    conn.answer_error(&id, 4005, "capabilities[0].confidence must be in 0..=1")
        .await;
    match agent.finished().await {
        Err(AgentError::Rpc { code: 4005, .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn gateway_requests_are_answered() {
    let gateway = FakeGateway::start().await;
    let agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;

    let health = conn.call("g-1", "health.check").await;
    assert_eq!(
        health["result"],
        json!({"status": "ok", "active_tasks": 0, "load": 0.0})
    );
    let caps = conn.call("g-2", "capability.query").await;
    assert_eq!(caps["result"]["capabilities"][1], "lang:rust");
    let unknown = conn.call("g-3", "agent.dance").await;
    assert_eq!(unknown["error"]["code"], 4004);
    assert_eq!(unknown["error"]["data"]["method"], "agent.dance");

    conn.assign_accepted("t-1", json!({"hold": true})).await;
    let health = conn.call("g-4", "health.check").await;
    assert_eq!(health["result"]["active_tasks"], 1);
    assert_eq!(health["result"]["load"], 0.5);
    agent.shutdown.cancel();
    agent.release.add_permits(1);
    conn.expect_and_answer("task.complete", json!({})).await;
    assert_eq!(conn.expect_close().await, Some(1000));
    assert!(agent.finished().await.is_ok());
}

#[tokio::test]
async fn cancelled_task_sends_nothing_more() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    conn.assign_accepted("t-c", json!({"hold": true})).await;
    conn.notify(
        "task.cancel",
        json!({"task_id": "t-c", "reason": "by the submitter"}),
    )
    .await;
    agent
        .event(|e| matches!(e, AgentEvent::TaskCancelled { id } if id == "t-c").then_some(()))
        .await;
    let health = conn.call("g-1", "health.check").await;
    assert_eq!(health["result"]["active_tasks"], 0);
    agent.shutdown.cancel();
    assert_eq!(conn.expect_close().await, Some(1000));
    assert!(agent.finished().await.is_ok());
}

#[tokio::test]
async fn panicking_handler_fails_its_task_and_the_agent_goes_on() {
    let gateway = FakeGateway::start().await;
    let agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    conn.assign_accepted("t-p", json!({"panic": true})).await;
    let fail = conn.expect_and_answer("task.fail", json!({})).await;
    assert_eq!(
        fail,
        json!({"task_id": "t-p", "error": "handler panicked", "retryable": false})
    );
    conn.assign_accepted("t-ok", json!({})).await;
    let complete = conn.expect_and_answer("task.complete", json!({})).await;
    assert_eq!(complete["task_id"], "t-ok");

    conn.assign_accepted("t-f", json!({"fail": "bad input"}))
        .await;
    let fail = conn.expect_and_answer("task.fail", json!({})).await;
    assert_eq!(
        fail,
        json!({"task_id": "t-f", "error": "bad input", "retryable": false})
    );
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn over_assignment_and_handler_refusals_are_rejected() {
    let gateway = FakeGateway::start().await;
    let agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    conn.assign("t-r", json!({"reject": "not my kind of task"}))
        .await;
    let reject = conn.expect_and_answer("task.reject", json!({})).await;
    assert_eq!(
        reject,
        json!({"task_id": "t-r", "reason": "not my kind of task"})
    );

    conn.assign_accepted("t-1", json!({"hold": true})).await;
    conn.assign_accepted("t-2", json!({"hold": true})).await;
    conn.assign("t-3", json!({})).await;
    let reject = conn.expect_and_answer("task.reject", json!({})).await;
    assert_eq!(reject, json!({"task_id": "t-3", "reason": "at capacity"}));

    agent.release.add_permits(2);
    for _ in 0..2 {
        conn.expect_and_answer("task.complete", json!({})).await;
    }
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn graceful_shutdown_rejects_new_tasks_finishes_running_ones_and_closes_1000() {
    let gateway = FakeGateway::start().await;
    let agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    conn.assign_accepted("t-run", json!({"hold": true})).await;

    agent.shutdown.cancel();
    // The agent reports itself degraded once it has seen the shutdown.
    for attempt in 0.. {
        let health = conn.call(&format!("g-{attempt}"), "health.check").await;
        if health["result"]["status"] == "degraded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    conn.assign("t-late", json!({})).await;
    let reject = conn.expect_and_answer("task.reject", json!({})).await;
    assert_eq!(
        reject,
        json!({"task_id": "t-late", "reason": "agent shutting down"})
    );

    agent.release.add_permits(1);
    let complete = conn.expect_and_answer("task.complete", json!({})).await;
    assert_eq!(complete["task_id"], "t-run");
    assert_eq!(conn.expect_close().await, Some(1000));
    assert!(agent.finished().await.is_ok());
}

#[tokio::test]
async fn tasks_still_running_after_the_grace_fail_as_retryable() {
    let gateway = FakeGateway::start().await;
    let mut opts = options(&gateway.url);
    opts.shutdown_grace = Duration::from_millis(100);
    let agent = RunningAgent::start(opts);
    let (mut conn, _) = gateway.accept_registered().await;
    conn.assign_accepted("t-slow", json!({"hold": true})).await;
    agent.shutdown.cancel();
    let fail = conn.expect_and_answer("task.fail", json!({})).await;
    assert_eq!(
        fail,
        json!({"task_id": "t-slow", "error": "agent shut down before the task finished", "retryable": true})
    );
    assert_eq!(conn.expect_close().await, Some(1000));
    assert!(agent.finished().await.is_ok());
}

#[tokio::test]
async fn going_away_close_leads_to_a_reconnect() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    conn.close(CloseCode::Away, "draining").await;
    assert_eq!(
        conn.expect_close().await,
        Some(1001),
        "the agent answers the close"
    );
    drop(conn);
    let reason = agent
        .event(|e| match e {
            AgentEvent::Disconnected { reason } => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(reason.starts_with("1001"), "{reason}");
    let (mut conn, _) = gateway.accept_registered().await;
    agent
        .event(|e| matches!(e, AgentEvent::Registered { .. }).then_some(()))
        .await;
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn config_update_reaches_events_and_handlers() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    conn.notify(
        "config.update",
        json!({"version": 4, "config": {"model": "large"}}),
    )
    .await;
    let (version, config) = agent
        .event(|e| match e {
            AgentEvent::ConfigUpdated { version, config } => Some((*version, config.clone())),
            _ => None,
        })
        .await;
    assert_eq!((version, config), (4, json!({"model": "large"})));
    conn.assign_accepted("t-cfg", json!({})).await;
    let complete = conn.expect_and_answer("task.complete", json!({})).await;
    assert_eq!(complete["result"]["config"], json!({"model": "large"}));
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn too_large_result_is_failed_instead() {
    let gateway = FakeGateway::start().await;
    let agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    conn.assign_accepted("t-big", json!({})).await;
    let (id, _) = conn.expect_request("task.complete").await;
    conn.answer_error(&id, 4007, "result over mesh.max_result_bytes")
        .await;
    let fail = conn.expect_and_answer("task.fail", json!({})).await;
    assert_eq!(fail["retryable"], false);
    assert!(
        fail["error"]
            .as_str()
            .unwrap_or_default()
            .contains("too large"),
        "{fail}"
    );
    shut_down(agent, &mut conn).await;
}
