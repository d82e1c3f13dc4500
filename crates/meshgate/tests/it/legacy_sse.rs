//! The legacy HTTP+SSE transport of MCP 2024-11-05 (`GET /sse` + `POST /messages`).

use serde_json::{Value, json};

use crate::support::{Env, SseReader, json_body};

async fn post(http: &reqwest::Client, url: &str, message: Value) -> reqwest::StatusCode {
    http.post(url)
        .header("content-type", "application/json")
        .body(message.to_string())
        .send()
        .await
        .expect("POST /messages")
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_sse_session_initializes_lists_and_calls_tools() {
    let env = Env::start().await;
    let http = env.gw.client();

    let r = http
        .get(env.gw.url("/sse"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("GET /sse");
    assert_eq!(r.status(), 200);
    let mut stream = SseReader::new(r);
    let endpoint = stream.next().await.expect("the endpoint event");
    assert_eq!(endpoint.event.as_deref(), Some("endpoint"), "{endpoint:?}");
    assert!(
        endpoint.data.starts_with("/messages?sessionId="),
        "{endpoint:?}"
    );
    let messages = env.gw.url(&endpoint.data);

    let init = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": "2024-11-05",
            "capabilities": {},
            "clientInfo": {"name": "legacy-it", "version": "1.0.0"}
        }
    });
    assert_eq!(post(&http, &messages, init).await, 202);
    let (answer, _) = stream.response_to(1).await;
    assert_eq!(
        answer["result"]["protocolVersion"], "2024-11-05",
        "{answer}"
    );
    assert_eq!(
        answer["result"]["serverInfo"]["name"], "meshgate",
        "{answer}"
    );

    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(post(&http, &messages, initialized).await, 202);

    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}});
    assert_eq!(post(&http, &messages, list).await, 202);
    let (answer, _) = stream.response_to(2).await;
    let names: Vec<&str> = answer["result"]["tools"]
        .as_array()
        .expect("a tool list")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"fx__echo") && names.contains(&"fxs__echo"),
        "{names:?}"
    );

    let call = json!({
        "jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "fx__echo", "arguments": {"message": "hello legacy"}}
    });
    assert_eq!(post(&http, &messages, call).await, 202);
    let (answer, _) = stream.response_to(3).await;
    assert_eq!(
        answer["result"]["content"][0]["text"], "hello legacy",
        "{answer}"
    );

    let call = json!({
        "jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": {"name": "fxs__add", "arguments": {"a": 1, "b": 1}}
    });
    assert_eq!(post(&http, &messages, call).await, 202);
    let (answer, _) = stream.response_to(4).await;
    assert_eq!(
        answer["result"]["structuredContent"],
        json!({"sum": 2.0}),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_post_to_an_unknown_session_is_404_naming_the_session() {
    let env = Env::start().await;
    let r = env
        .gw
        .client()
        .post(env.gw.url("/messages?sessionId=no-such-session"))
        .header("content-type", "application/json")
        .body(json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}).to_string())
        .send()
        .await
        .expect("POST /messages");
    let (status, body) = json_body(r).await;
    assert_eq!(status, 404);
    assert_eq!(body["jsonrpc"], "2.0", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no-such-session"), "{body}");
    assert!(
        message.contains("GET /sse"),
        "the message says how to recover: {body}"
    );
}
