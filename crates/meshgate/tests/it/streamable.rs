//! Streamable HTTP (`/mcp`) with the rmcp client: catalog, calls, progress,
//! cancellation, relayed server-to-client requests, list changes, resources,
//! prompts, completion, and the session lifecycle.

#![allow(deprecated)]

use std::collections::BTreeSet;
use std::time::Duration;

use rmcp::model::{
    CallToolRequest, ClientRequest, GetPromptRequestParams, LoggingLevel, ProtocolVersion,
    ReadResourceRequestParams, ServerResult,
};
use rmcp::service::PeerRequestOptions;
use serde_json::{Value, json};

use crate::support::{
    Env, RawSession, SAMPLED_TEXT, Seen, Session, SseReader, TestClient, WAIT, call, call_tool,
    connect, connect_with, json_body, text_of, tool_names,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialize_names_meshgate_and_negotiates_the_offered_version() {
    let env = Env::start().await;

    let (session, _) = connect(&env.gw).await;
    let info = session.peer_info().expect("the server answered initialize");
    assert_eq!(
        info.server_info.as_ref().map(|i| i.name.as_str()),
        Some("meshgate")
    );
    assert_eq!(info.protocol_version, ProtocolVersion::V_2025_11_25);
    assert!(
        info.capabilities.tools.is_some(),
        "tools capability is offered"
    );

    let (newest, _) = connect_with(&env.gw, ProtocolVersion::LATEST).await;
    let info = newest.peer_info().expect("the server answered initialize");
    assert_eq!(
        info.protocol_version,
        ProtocolVersion::V_2025_11_25,
        "a client offering {} (rmcp's default) gets the newest session-based revision",
        ProtocolVersion::LATEST
    );

    let (older, _) = connect_with(&env.gw, ProtocolVersion::V_2025_06_18).await;
    let info = older.peer_info().expect("the server answered initialize");
    assert_eq!(
        info.protocol_version,
        ProtocolVersion::V_2025_06_18,
        "a supported older version is accepted as offered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_list_shows_the_tools_of_both_upstreams_with_their_prefixes() {
    let env = Env::start().await;
    let (session, _) = connect(&env.gw).await;

    let tools = session.list_all_tools().await.expect("tools/list");
    let names: BTreeSet<String> = tools.iter().map(|t| t.name.to_string()).collect();
    for expected in [
        "fx__echo",
        "fx__add",
        "fx__slow",
        "fx__fail",
        "fx__sample",
        "fxs__echo",
        "fxs__add",
        "fxs__sample",
    ] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        names.contains("meshgate_status"),
        "the built-in status tool is listed: {names:?}"
    );
    assert!(
        names
            .iter()
            .filter(|n| *n != "meshgate_status")
            .filter(
                |n| !["agents_list", "task_submit", "task_get", "task_cancel"]
                    .contains(&n.as_str())
            )
            .all(|n| n.starts_with("fx__") || n.starts_with("fxs__")),
        "every upstream tool carries its upstream's prefix (beside the gateway's own tools): {names:?}"
    );
    let echo = tools
        .iter()
        .find(|t| t.name == "fx__echo")
        .expect("fx__echo");
    assert!(
        echo.description
            .as_deref()
            .is_some_and(|d| d.contains("Echo")),
        "descriptions are passed through: {echo:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_call_through_gateway_reaches_http_and_stdio_upstreams() {
    let env = Env::start().await;
    let (session, _) = connect(&env.gw).await;

    let echo = call_tool(&session, "fx__echo", json!({"message": "hello via http"})).await;
    assert_eq!(text_of(&echo), "hello via http");
    assert_ne!(echo.is_error, Some(true));

    let echo = call_tool(&session, "fxs__echo", json!({"message": "hello via stdio"})).await;
    assert_eq!(text_of(&echo), "hello via stdio");

    let sum = call_tool(&session, "fxs__add", json!({"a": 2, "b": 3.5})).await;
    assert_eq!(text_of(&sum), "5.5");
    assert_eq!(sum.structured_content, Some(json!({"sum": 5.5})));

    let sum = call_tool(&session, "fx__add", json!({"a": 40, "b": 2})).await;
    assert_eq!(sum.structured_content, Some(json!({"sum": 42.0})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_error_of_an_upstream_reaches_the_client_as_is_error_result() {
    let env = Env::start().await;
    let (session, _) = connect(&env.gw).await;

    let failed = call_tool(
        &session,
        "fx__fail",
        json!({"message": "the disk is on fire"}),
    )
    .await;
    assert_eq!(failed.is_error, Some(true));
    assert!(
        text_of(&failed).contains("the disk is on fire"),
        "{failed:?}"
    );

    let ok = call_tool(&session, "fx__echo", json!({"message": "still fine"})).await;
    assert_eq!(
        text_of(&ok),
        "still fine",
        "a tool error does not break the session"
    );
}

/// Calls `tool` (a `slow` tool) with three steps and checks the client got
/// progress 1..3 of 3 under the token of its own request.
async fn assert_progress_relayed(session: &Session, client: &TestClient, tool: &str) {
    let request = ClientRequest::CallToolRequest(CallToolRequest::new(call(
        tool,
        json!({"steps": 3, "delay_ms": 50}),
    )));
    let handle = session
        .peer()
        .send_request_with_option(request, PeerRequestOptions::with_timeout(WAIT))
        .await
        .expect("send tools/call");
    let token = handle.progress_token.clone();
    let result = handle
        .await_response()
        .await
        .unwrap_or_else(|e| panic!("tools/call {tool}: {e}"));
    let ServerResult::CallToolResult(result) = result else {
        panic!("unexpected result {result:?}");
    };
    assert_eq!(text_of(&result), "done after 3 steps");

    let progress = client
        .wait_for(&format!("three progress notifications of {tool}"), |seen| {
            let p: Vec<_> = seen
                .iter()
                .filter_map(|s| match s {
                    Seen::Progress(p) if p.progress_token == token => Some(p.clone()),
                    _ => None,
                })
                .collect();
            (p.len() >= 3).then_some(p)
        })
        .await;
    // rmcp hands each notification to its own task, so arrival order is not guaranteed.
    let mut steps: Vec<(f64, Option<f64>)> =
        progress.iter().map(|p| (p.progress, p.total)).collect();
    steps.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(
        steps,
        vec![(1.0, Some(3.0)), (2.0, Some(3.0)), (3.0, Some(3.0))],
        "{tool}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_of_an_upstream_call_reaches_the_client_under_its_own_token() {
    let env = Env::start().await;
    let (session, client) = connect(&env.gw).await;

    assert_progress_relayed(&session, &client, "fx__slow").await;
    assert_progress_relayed(&session, &client, "fxs__slow").await;
    let stray = client
        .seen()
        .into_iter()
        .filter(|s| matches!(s, Seen::Progress(_)))
        .count();
    assert_eq!(
        stray,
        6,
        "no progress arrives under any other token: {:#?}",
        client.seen()
    );
}

/// Starts `prefix__slow`, abandons it once it runs at the upstream, and checks
/// that `prefix__cancellations` goes up by one within 2 s.
async fn assert_abandoned_call_is_cancelled(
    env: &Env,
    session: &Session,
    client: &TestClient,
    prefix: &str,
) {
    let count = |text: String| {
        text.parse::<u64>()
            .unwrap_or_else(|_| panic!("not a count: {text}"))
    };
    let counter = format!("{prefix}__cancellations");
    let before = count(text_of(&call_tool(session, &counter, json!({})).await));

    // rmcp's call future sends notifications/cancelled for its request id when dropped.
    let started = tokio::time::Instant::now();
    let progressed = client
        .seen()
        .iter()
        .filter(|s| matches!(s, Seen::Progress(_)))
        .count();
    let mut slow = Box::pin(session.peer().call_tool(call(
        &format!("{prefix}__slow"),
        json!({"steps": 50, "delay_ms": 100}),
    )));
    tokio::select! {
        r = &mut slow => panic!("{prefix}__slow finished although it takes 5 s: {r:?}"),
        () = async {
            // Running at the upstream (it reported progress), and for about 300 ms.
            client
                .wait_for("the first progress of the slow call", |seen| {
                    (seen.iter().filter(|s| matches!(s, Seen::Progress(_))).count() > progressed).then_some(())
                })
                .await;
            tokio::time::sleep_until(started + Duration::from_millis(300)).await;
        } => {}
    }
    drop(slow);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let now = count(text_of(&call_tool(session, &counter, json!({})).await));
        if now == before + 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{prefix}: the upstream did not observe the cancellation within 2 s (count {before} -> {now}); gateway log:\n{}",
            env.gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoning_a_call_cancels_it_at_the_upstream() {
    let env = Env::start().await;
    let (session, client) = connect(&env.gw).await;
    assert_abandoned_call_is_cancelled(&env, &session, &client, "fx").await;
    assert_abandoned_call_is_cancelled(&env, &session, &client, "fxs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_sampling_and_elicitation_of_an_http_upstream_reach_the_client() {
    let env = Env::start().await;
    let (session, client) = connect(&env.gw).await;

    let logged = call_tool(
        &session,
        "fx__log",
        json!({"level": "warning", "message": "disk almost full"}),
    )
    .await;
    assert_eq!(text_of(&logged), "logged");
    let log = client
        .wait_for("the log notification", |seen| {
            seen.iter().find_map(|s| match s {
                Seen::Log(l) => Some(l.clone()),
                _ => None,
            })
        })
        .await;
    assert_eq!(log.data, json!("disk almost full"));
    assert_eq!(log.level, LoggingLevel::Warning);
    assert_eq!(log.logger.as_deref(), Some("fixture"));

    let sampled = call_tool(
        &session,
        "fx__sample",
        json!({"prompt": "six times seven?"}),
    )
    .await;
    assert_eq!(text_of(&sampled), format!("sampled: {SAMPLED_TEXT}"));
    let asked = client.seen().into_iter().find_map(|s| match s {
        Seen::Sampling(p) => Some(p),
        _ => None,
    });
    let asked =
        serde_json::to_string(&asked.expect("the client's create_message was called")).unwrap();
    assert!(
        asked.contains("six times seven?"),
        "the client saw the upstream's prompt: {asked}"
    );

    let elicited = call_tool(&session, "fx__elicit", json!({"message": "Who are you?"})).await;
    let text = text_of(&elicited);
    assert!(text.starts_with("elicited: accept"), "{text}");
    assert!(text.contains(r#""name":"Ann""#), "{text}");
    assert!(
        client
            .seen()
            .iter()
            .any(|s| matches!(s, Seen::Elicitation(m) if m == "Who are you?")),
        "the client's create_elicitation saw the upstream's message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_of_a_stdio_upstream_reaches_the_calling_client_over_the_shared_connection() {
    let env = Env::start().await;
    let (session, client) = connect(&env.gw).await;

    let sampled = call_tool(
        &session,
        "fxs__sample",
        json!({"prompt": "capital of France?"}),
    )
    .await;
    assert_eq!(
        text_of(&sampled),
        format!("sampled: {SAMPLED_TEXT}"),
        "{sampled:?}"
    );
    assert!(
        client.seen().iter().any(|s| matches!(s, Seen::Sampling(_))),
        "the client's create_message was called"
    );

    let elicited = call_tool(&session, "fxs__elicit", json!({"message": "Name?"})).await;
    assert!(
        text_of(&elicited).contains(r#"accept {"name":"Ann"}"#),
        "{elicited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_added_at_an_upstream_is_announced_listed_and_callable() {
    let env = Env::start().await;
    let (session, client) = connect(&env.gw).await;

    let added = call_tool(&session, "fx__add_tool", json!({"name": "newtool"})).await;
    assert_eq!(text_of(&added), "added");
    client
        .wait_for("notifications/tools/list_changed", |seen| {
            seen.iter()
                .any(|s| matches!(s, Seen::ToolListChanged))
                .then_some(())
        })
        .await;

    let names: Vec<String> = tool_names(&session).await;
    assert!(names.iter().any(|n| n == "fx__newtool"), "{names:?}");
    assert!(
        !names.iter().any(|n| n == "fxs__newtool"),
        "only the upstream that added it offers it: {names:?}"
    );

    let result = call_tool(&session, "fx__newtool", json!({"x": 1})).await;
    assert_eq!(text_of(&result), r#"{"x":1}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_templates_prompts_and_completions_are_federated_with_prefixes() {
    let env = Env::start().await;
    let (session, _) = connect(&env.gw).await;

    let resources = session.list_all_resources().await.expect("resources/list");
    let uris: Vec<&str> = resources.iter().map(|r| r.uri.as_str()).collect();
    assert!(uris.contains(&"fx+fixture://greeting"), "{uris:?}");
    assert!(uris.contains(&"fxs+fixture://greeting"), "{uris:?}");

    let read = session
        .read_resource(ReadResourceRequestParams::new("fx+fixture://greeting"))
        .await
        .expect("resources/read");
    let contents = serde_json::to_value(&read.contents).unwrap();
    assert_eq!(contents[0]["text"], "hello from fixture", "{contents}");
    assert_eq!(
        contents[0]["uri"], "fx+fixture://greeting",
        "returned URIs carry the prefix"
    );

    let templates = session
        .list_all_resource_templates()
        .await
        .expect("resources/templates/list");
    let templates: Vec<&str> = templates.iter().map(|t| t.uri_template.as_str()).collect();
    assert!(
        templates.contains(&"fx+fixture://items/{id}"),
        "{templates:?}"
    );

    let item = session
        .read_resource(ReadResourceRequestParams::new("fx+fixture://items/7"))
        .await
        .expect("resources/read of a templated URI");
    let contents = serde_json::to_value(&item.contents).unwrap();
    assert_eq!(contents[0]["text"], "item 7", "{contents}");
    assert_eq!(contents[0]["uri"], "fx+fixture://items/7");

    let prompts = session.list_all_prompts().await.expect("prompts/list");
    let names: Vec<&str> = prompts.iter().map(|p| p.name.as_str()).collect();
    assert!(
        names.contains(&"fx__greet") && names.contains(&"fxs__greet"),
        "{names:?}"
    );

    let mut args = serde_json::Map::new();
    args.insert("name".into(), json!("Bo"));
    let prompt = session
        .get_prompt(GetPromptRequestParams::new("fx__greet").with_arguments(args))
        .await
        .expect("prompts/get");
    let messages = serde_json::to_value(&prompt.messages).unwrap();
    assert_eq!(messages[0]["content"]["text"], "Hello, Bo!", "{messages}");

    let values = session
        .complete_prompt_simple("fx__greet", "name", "al")
        .await
        .expect("completion/complete");
    assert_eq!(values, vec!["alice".to_owned(), "alan".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_ends_the_session_and_its_id_is_then_refused() {
    let env = Env::start().await;
    let raw = RawSession::initialize(&env.gw).await;
    let id = raw.session.clone().expect("session id");

    let listed = raw.request("tools/list", json!({})).await;
    assert!(
        listed["result"]["tools"]
            .as_array()
            .is_some_and(|t| !t.is_empty()),
        "{listed}"
    );

    let deleted = raw
        .http
        .delete(&raw.url)
        .header("mcp-session-id", &id)
        .send()
        .await
        .expect("DELETE /mcp");
    assert!(
        deleted.status().is_success(),
        "DELETE answered {}",
        deleted.status()
    );

    let r = raw
        .post(&json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list", "params": {}}))
        .await;
    let (status, body) = json_body(r).await;
    assert_eq!(status, 404);
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("initialize"),
        "the message says how to recover: {body}"
    );
    assert!(
        message.contains("session was ended"),
        "the message says what happened to the session: {body}"
    );
}

fn progress_of(message: &Value) -> Option<f64> {
    (message["method"] == "notifications/progress")
        .then(|| message["params"]["progress"].as_f64().unwrap_or(-1.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_last_event_id_resumes_an_interrupted_response_stream() {
    let env = Env::start().await;
    let raw = RawSession::initialize(&env.gw).await;

    let r = raw
        .post(&json!({
            "jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {
                "name": "fx__slow",
                "arguments": {"steps": 5, "delay_ms": 200},
                "_meta": {"progressToken": "resume-me"}
            }
        }))
        .await;
    assert_eq!(r.status(), 200);
    let mut stream = SseReader::new(r);
    let (first_event, first) = loop {
        let (event, message) = stream.next_message("the first progress event").await;
        if progress_of(&message).is_some() {
            break (event, message);
        }
    };
    assert_eq!(progress_of(&first), Some(1.0), "{first}");
    let last_event_id = first_event.id.clone().expect("progress events carry an id");
    drop(stream); // the connection breaks

    let r = raw
        .http
        .get(&raw.url)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", raw.session.as_deref().unwrap())
        .header("mcp-protocol-version", "2025-11-25")
        .header("last-event-id", &last_event_id)
        .send()
        .await
        .expect("GET /mcp with Last-Event-ID");
    assert_eq!(r.status(), 200);
    let mut resumed = SseReader::new(r);
    let (result, before) = resumed.response_to(7).await;
    assert_eq!(
        result["result"]["content"][0]["text"], "done after 5 steps",
        "the final result arrives on the resumed stream: {result}"
    );
    let progress: BTreeSet<u64> = before
        .iter()
        .filter_map(progress_of)
        .map(|p| p as u64)
        .collect();
    for step in 2..=5 {
        assert!(
            progress.contains(&step),
            "progress {step} missing after resumption: {before:?}"
        );
    }
    assert!(
        before
            .iter()
            .filter(|m| progress_of(m).is_some())
            .all(|m| m["params"]["progressToken"] == "resume-me"),
        "{before:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_survives_a_gateway_restart() {
    let mut env = Env::start().await;
    let mut raw = RawSession::initialize(&env.gw).await;
    let before = raw
        .request(
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "before"}}),
        )
        .await;
    assert_eq!(before["result"]["content"][0]["text"], "before", "{before}");

    env.gw.restart().await;
    raw.http = env.gw.client(); // the old connections died with the process

    let after = raw
        .request(
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "after"}}),
        )
        .await;
    assert_eq!(
        after["result"]["content"][0]["text"],
        "after",
        "the old Mcp-Session-Id still works: {after}\ngateway log:\n{}",
        env.gw.log()
    );
    let stdio = raw
        .request(
            "tools/call",
            json!({"name": "fxs__add", "arguments": {"a": 1, "b": 2}}),
        )
        .await;
    assert_eq!(
        stdio["result"]["structuredContent"],
        json!({"sum": 3.0}),
        "{stdio}"
    );
}
