//! Shared CRDT state through the SDK: subscriptions and their replicas,
//! pushed deltas, resyncs on a hash mismatch, and renewal after reconnects.

use meshgate_agent::{AgentError, AgentEvent, BinaryOptions, Negotiation, StateHandle};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::fake_gateway::{FakeDoc, FakeGateway, GatewayConn, RunningAgent, options};

async fn shut_down(agent: RunningAgent, conn: &mut GatewayConn) {
    agent.shutdown.cancel();
    assert_eq!(conn.expect_close().await, Some(1000));
    assert!(agent.finished().await.is_ok());
}

fn spawn_subscribe(
    state: &StateHandle,
) -> JoinHandle<Result<meshgate_agent::StateView, AgentError>> {
    let state = state.clone();
    tokio::spawn(async move { state.subscribe().await })
}

/// Waits for the next state event of `kind` for `doc`; its hash.
async fn state_event(agent: &mut RunningAgent, kind: &str, doc: &str) -> String {
    agent
        .event(|e| match (kind, e) {
            ("subscribed", AgentEvent::StateSubscribed { doc: d, hash })
            | ("changed", AgentEvent::StateChanged { doc: d, hash })
            | ("resynced", AgentEvent::StateResynced { doc: d, hash })
                if d == doc =>
            {
                Some(hash.clone())
            }
            _ => None,
        })
        .await
}

#[tokio::test]
async fn subscription_merges_pushed_deltas_and_resyncs_on_a_hash_mismatch() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    let mut doc = FakeDoc::new("counters");
    doc.apply(
        "other",
        &json!([{"op": "counter.increment", "path": "hits", "by": 3}]),
    );

    let state = agent.handle.state("counters");
    let subscribing = spawn_subscribe(&state);
    let params = conn
        .expect_and_answer("state.subscribe", doc.snapshot())
        .await;
    assert_eq!(params, json!({"doc": "counters"}));
    let view = subscribing.await.expect("join").expect("subscribe");
    assert_eq!(view.hash, doc.doc.hash());
    assert_eq!(view.value, json!({"hits": 3}));
    assert_eq!(view.clock, json!({"other": 1}));
    assert_eq!(
        state_event(&mut agent, "subscribed", "counters").await,
        doc.doc.hash()
    );
    assert_eq!(state.local_value(), Some(json!({"hits": 3})));

    // A pushed delta is merged and agrees with the gateway's hash.
    let delta = doc.apply(
        "other",
        &json!([{"op": "set.add", "path": "tags", "value": "x"}]),
    );
    conn.notify("state.delta", doc.delta(&delta)).await;
    assert_eq!(
        state_event(&mut agent, "changed", "counters").await,
        doc.doc.hash()
    );
    assert_eq!(state.local_value(), Some(doc.doc.value()));

    // A delta that never arrives: the next one's hash differs, so the
    // replica is synced.
    doc.apply(
        "other",
        &json!([{"op": "pncounter.add", "path": ["stock", "apples"], "by": -2}]),
    );
    let delta = doc.apply(
        "other",
        &json!([{"op": "register.set", "path": "leader", "value": "a1"}]),
    );
    conn.notify("state.delta", doc.delta(&delta)).await;
    let params = conn.expect_and_answer("state.sync", doc.snapshot()).await;
    assert_eq!(params, json!({"doc": "counters"}));
    assert_eq!(
        state_event(&mut agent, "resynced", "counters").await,
        doc.doc.hash()
    );
    assert_eq!(state.local_hash(), Some(doc.doc.hash()));
    assert_eq!(
        state.local_value(),
        Some(json!({"hits": 3, "tags": ["x"], "stock": {"apples": -2}, "leader": "a1"}))
    );

    // The agent's own apply: the returned delta is in the replica at once,
    // and the pushed copy of it changes nothing.
    let applying = {
        let state = state.clone();
        tokio::spawn(async move {
            let ops = vec![json!({"op": "counter.increment", "path": "hits", "by": 1})];
            state.apply(ops).await
        })
    };
    let ops = doc.serve_apply(&mut conn, true).await;
    assert_eq!(
        ops,
        json!([{"op": "counter.increment", "path": "hits", "by": 1}])
    );
    let outcome = applying.await.expect("join").expect("apply");
    assert_eq!(outcome.applied, 1);
    assert_eq!(outcome.hash, doc.doc.hash());
    assert_eq!(outcome.value["hits"], 4);
    assert_eq!(state.local_hash(), Some(doc.doc.hash()));

    // The gateway's view, and unsubscribing.
    let hashing = {
        let state = state.clone();
        tokio::spawn(async move { state.gateway_hash().await })
    };
    conn.expect_and_answer(
        "state.hash",
        json!({"doc": "counters", "hash": doc.doc.hash(), "clock": doc.doc.clock()}),
    )
    .await;
    assert_eq!(hashing.await.expect("join").ok(), Some(doc.doc.hash()));
    let unsubscribing = {
        let state = state.clone();
        tokio::spawn(async move { state.unsubscribe().await })
    };
    conn.expect_and_answer(
        "state.unsubscribe",
        json!({"doc": "counters", "subscribed": false}),
    )
    .await;
    assert!(unsubscribing.await.expect("join").is_ok());
    assert!(!state.is_subscribed());
    assert_eq!(state.local_hash(), None);
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn subscriptions_and_binary_mode_are_renewed_after_a_reconnect() {
    let gateway = FakeGateway::start().await;
    let mut opts = options(&gateway.url);
    opts.binary = Some(BinaryOptions::new(Negotiation::Runtime));
    let mut agent = RunningAgent::start(opts);
    // Subscribed before the agent is even connected.
    let state = agent.handle.state("board");
    let subscribing = spawn_subscribe(&state);
    let mut doc = FakeDoc::new("board");
    doc.apply(
        "other",
        &json!([{"op": "register.set", "path": "leader", "value": "a1"}]),
    );

    let mut conn = gateway.accept().await;
    conn.expect_set_binary().await;
    conn.register(json!([])).await;
    let params = conn
        .expect_and_answer("state.subscribe", doc.snapshot())
        .await;
    assert_eq!(params, json!({"doc": "board"}));
    assert!(conn.last_frame.is_some(), "binary after the switch");
    assert_eq!(
        state_event(&mut agent, "subscribed", "board").await,
        doc.doc.hash()
    );
    assert!(subscribing.await.expect("join").is_ok());
    // Asked once: the next message answers the gateway's request.
    assert_eq!(
        conn.call("g-1", "health.check").await["result"]["status"],
        "ok"
    );
    drop(conn);
    agent
        .event(|e| matches!(e, AgentEvent::Disconnected { .. }).then_some(()))
        .await;

    // The document moves on while the agent is away.
    doc.apply(
        "other",
        &json!([{"op": "register.set", "path": "leader", "value": "b2"}]),
    );
    let mut conn = gateway.accept().await;
    let params = conn.expect_set_binary().await;
    assert!(conn.last_frame.is_none(), "text again until the answer");
    assert_eq!(params["enabled"], true);
    conn.register(json!([])).await;
    conn.expect_and_answer("state.subscribe", doc.snapshot())
        .await;
    assert_eq!(
        state_event(&mut agent, "subscribed", "board").await,
        doc.doc.hash()
    );
    assert_eq!(state.local_value(), Some(json!({"leader": "b2"})));
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn refused_subscription_is_dropped() {
    let gateway = FakeGateway::start().await;
    let mut agent = RunningAgent::start(options(&gateway.url));
    let (mut conn, _) = gateway.accept_registered().await;
    agent
        .event(|e| matches!(e, AgentEvent::Registered { .. }).then_some(()))
        .await;
    let state = agent.handle.state("no spaces");
    let subscribing = spawn_subscribe(&state);
    let (id, _) = conn.expect_request("state.subscribe").await;
    conn.answer_error(&id, -32602, "doc must be 1-128 of A-Za-z0-9._:-")
        .await;
    match subscribing.await.expect("join") {
        Err(AgentError::Rpc { code: -32602, .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert!(!state.is_subscribed());
    shut_down(agent, &mut conn).await;
}
