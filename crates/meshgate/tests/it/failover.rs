//! Transport failover: a session's messages carry per-session sequence
//! numbers; a client that loses its WebSocket continues the same session over
//! Streamable HTTP with `Last-Event-ID`, or the reverse, and sees every
//! message once, in order.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::*;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SEQ: &str = "meshgate.io/seq";
const STEPS: u64 = 8;

/// Opens `/mcp/ws` with the admin key, optionally continuing a session.
async fn ws_connect(
    gw: &Gateway,
    session: Option<(&str, Option<u64>)>,
) -> Result<Ws, (u16, String)> {
    let mut request = format!("ws://127.0.0.1:{}/mcp/ws", gw.port)
        .into_client_request()
        .expect("request");
    let headers = request.headers_mut();
    headers.insert("sec-websocket-protocol", HeaderValue::from_static("mcp"));
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", gw.admin_key)).expect("header"),
    );
    if let Some((id, last)) = session {
        headers.insert("mcp-session-id", HeaderValue::from_str(id).expect("header"));
        if let Some(last) = last {
            headers.insert(
                "last-event-id",
                HeaderValue::from_str(&last.to_string()).expect("header"),
            );
        }
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(r)) => {
            let status = r.status().as_u16();
            let body = r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((status, body))
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

async fn ws_next(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str()).expect("text frames hold JSON");
            }
            Some(Ok(Message::Close(c))) => panic!("closed: {c:?}"),
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

/// The answer to request `id`, skipping what comes before it.
async fn ws_answer(ws: &mut Ws, id: u64) -> Value {
    loop {
        let m = ws_next(ws).await;
        if m["id"] == id && m.get("method").is_none() {
            return m;
        }
    }
}

async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Opens a session over WebSocket; returns the socket and the sealed id.
async fn ws_session(gw: &Gateway) -> (Ws, String) {
    let mut ws = ws_connect(gw, None).await.expect("upgrade");
    ws_send(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                          "clientInfo": {"name": "failover-it", "version": "1"}}}),
    )
    .await;
    let init = ws_next(&mut ws).await;
    assert_eq!(init["id"], 1, "{init}");
    let token = init["result"]["_meta"]["meshgate.io/sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("the initialize result names the session: {init}"))
        .to_owned();
    assert!(token.starts_with("mgs1."), "{token}");
    ws_send(
        &mut ws,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    (ws, token)
}

fn seq_of(message: &Value) -> Option<u64> {
    message["params"]["_meta"][SEQ]
        .as_u64()
        .or(message["result"]["_meta"][SEQ].as_u64())
        .or(message["error"]["data"]["_meta"][SEQ].as_u64())
}

fn progress_of(message: &Value) -> Option<u64> {
    (message["method"] == "notifications/progress")
        .then(|| message["params"]["progress"].as_f64().unwrap_or(-1.0) as u64)
}

fn slow_call(id: u64, token: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": "fx__slow", "arguments": {"steps": STEPS, "delay_ms": 150},
                      "_meta": {"progressToken": token}}})
}

/// A GET stream continuing `session` after `last`.
async fn http_resume(gw: &Gateway, session: &str, last: u64) -> SseReader {
    let r = gw
        .client()
        .get(gw.mcp_url())
        .header("accept", "text/event-stream")
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", "2025-06-18")
        .header("last-event-id", last.to_string())
        .send()
        .await
        .expect("GET /mcp");
    assert_eq!(r.status(), 200, "resume answered {}", r.status());
    SseReader::new(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_dropped_mid_stream_continues_over_streamable_http_once_and_in_order() {
    let env = Env::start().await;
    let gw = &env.gw;
    let (mut ws, token) = ws_session(gw).await;
    ws_send(&mut ws, slow_call(2, "ws-then-http")).await;

    let mut progress = Vec::new();
    let mut last_seq = 0;
    while progress.len() < 3 {
        let m = ws_next(&mut ws).await;
        let seq = seq_of(&m).unwrap_or_else(|| panic!("every message carries _meta seq: {m}"));
        assert!(
            seq > last_seq,
            "sequence numbers rise: {seq} after {last_seq}"
        );
        last_seq = seq;
        if let Some(p) = progress_of(&m) {
            assert_eq!(m["params"]["progressToken"], "ws-then-http", "{m}");
            progress.push(p);
        }
    }
    // The connection breaks: no close frame, the TCP connection just goes.
    drop(ws);

    let mut sse = http_resume(gw, &token, last_seq).await;
    let result = loop {
        let (event, m) = sse.next_message("the rest of the call").await;
        let seq: u64 = event
            .id
            .as_deref()
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("SSE events carry the sequence number: {event:?}"));
        assert!(
            seq > last_seq,
            "in order, nothing twice: {seq} after {last_seq}"
        );
        last_seq = seq;
        if let Some(p) = progress_of(&m) {
            progress.push(p);
        } else if m["id"] == 2 {
            break m;
        }
    };
    assert_eq!(
        progress,
        (1..=STEPS).collect::<Vec<_>>(),
        "every progress notification exactly once, in order"
    );
    assert!(
        result["result"]["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains(&STEPS.to_string())),
        "{result}"
    );

    // The session goes on over HTTP.
    let mut raw = RawSession::new(gw);
    raw.session = Some(token.clone());
    let r = raw
        .post(&json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                      "params": {"name": "fx__echo", "arguments": {"message": "over http now"}}}))
        .await;
    let echo = read_response(r, 3).await;
    assert_eq!(
        echo["result"]["content"][0]["text"], "over http now",
        "{echo}"
    );

    // The switch is in the client's trace.
    let (status, me) = gw.get_json(&format!("/mcp/health/client/{token}")).await;
    assert_eq!(status, 200, "{me}");
    let events = me["transport_events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        events.iter().any(|e| e["event"] == "transport_switch"
            && e["from"] == "websocket"
            && e["to"] == "streamable_http"),
        "{me}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_stream_dropped_mid_call_continues_over_websocket_once_and_in_order() {
    let env = Env::start().await;
    let gw = &env.gw;
    let raw = RawSession::initialize(gw).await;
    let token = raw.session.clone().expect("session id");
    let r = raw.post(&slow_call(5, "http-then-ws")).await;
    assert_eq!(r.status(), 200);
    let mut sse = SseReader::new(r);
    let mut progress = Vec::new();
    let mut last_seq = 0;
    while progress.len() < 2 {
        let (event, m) = sse.next_message("progress over HTTP").await;
        if let Some(p) = progress_of(&m) {
            progress.push(p);
            last_seq = event
                .id
                .as_deref()
                .and_then(|i| i.parse().ok())
                .expect("event id");
        }
    }
    drop(sse); // the HTTP connection breaks

    let mut ws = ws_connect(gw, Some((&token, Some(last_seq))))
        .await
        .expect("resume over WebSocket");
    let result = loop {
        let m = ws_next(&mut ws).await;
        let seq = seq_of(&m).unwrap_or_else(|| panic!("every message carries _meta seq: {m}"));
        assert!(
            seq > last_seq,
            "in order, nothing twice: {seq} after {last_seq}"
        );
        last_seq = seq;
        if let Some(p) = progress_of(&m) {
            progress.push(p);
        } else if m["id"] == 5 {
            break m;
        }
    };
    assert_eq!(progress, (1..=STEPS).collect::<Vec<_>>());
    assert!(result["result"]["content"].is_array(), "{result}");

    // And the session goes on over the WebSocket.
    ws_send(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 6, "method": "tools/call",
               "params": {"name": "fx__echo", "arguments": {"message": "over ws now"}}}),
    )
    .await;
    let echo = ws_answer(&mut ws, 6).await;
    assert_eq!(
        echo["result"]["content"][0]["text"], "over ws now",
        "{echo}"
    );
    assert!(seq_of(&echo).is_some_and(|s| s > last_seq), "{echo}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_sessions_resume_after_a_restart_and_bad_resumptions_are_named() {
    let mut env = Env::start().await;
    let (mut ws, token) = ws_session(&env.gw).await;
    ws_send(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
               "params": {"name": "fx__echo", "arguments": {"message": "before"}}}),
    )
    .await;
    let before = ws_answer(&mut ws, 2).await;
    assert_eq!(before["result"]["content"][0]["text"], "before", "{before}");
    drop(ws);

    env.gw.restart().await;
    let mut ws = ws_connect(&env.gw, Some((&token, None)))
        .await
        .unwrap_or_else(|e| panic!("resume after restart: {e:?}\n{}", env.gw.log()));
    ws_send(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
               "params": {"name": "fxs__echo", "arguments": {"message": "after"}}}),
    )
    .await;
    let after = ws_answer(&mut ws, 3).await;
    assert_eq!(after["result"]["content"][0]["text"], "after", "{after}");

    // A normal close ends the session: its id is refused afterwards.
    ws.send(Message::Close(None)).await.expect("close");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = ws_connect(&env.gw, Some((&token, None))).await.err();
    let (status, body) = refused.expect("an ended session is refused");
    assert_eq!(status, 404, "{body}");

    // A Last-Event-ID that is not ours is named.
    let (_, other) = ws_session(&env.gw).await;
    let mut request = format!("ws://127.0.0.1:{}/mcp/ws", env.gw.port)
        .into_client_request()
        .expect("request");
    let h = request.headers_mut();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", env.gw.admin_key)).expect("header"),
    );
    h.insert(
        "mcp-session-id",
        HeaderValue::from_str(&other).expect("header"),
    );
    h.insert("last-event-id", HeaderValue::from_static("3/17"));
    match tokio_tungstenite::connect_async(request).await {
        Err(tungstenite::Error::Http(r)) => {
            assert_eq!(r.status().as_u16(), 400);
            let body = r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            assert!(
                body.contains("Last-Event-ID") && body.contains("3/17"),
                "{body}"
            );
        }
        other => panic!("expected a 400, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_beyond_the_resume_buffer_are_reported_lost_not_silently_skipped() {
    let env = Env::start_with(|c| c.mcp_line("resume_buffer_messages = 2")).await;
    let gw = &env.gw;
    let (mut ws, token) = ws_session(gw).await;
    ws_send(&mut ws, slow_call(2, "small-buffer")).await;
    let first = loop {
        let m = ws_next(&mut ws).await;
        if progress_of(&m).is_some() {
            break m;
        }
    };
    let last_seq = seq_of(&first).expect("seq");
    drop(ws);
    // Let the call finish while nobody listens: more messages than the buffer holds.
    tokio::time::sleep(Duration::from_millis(150 * STEPS + 500)).await;

    let mut sse = http_resume(gw, &token, last_seq).await;
    let (_, warning) = sse.next_message("the loss report").await;
    assert_eq!(warning["method"], "notifications/message", "{warning}");
    assert_eq!(warning["params"]["level"], "warning", "{warning}");
    assert_eq!(
        warning["params"]["data"]["error"], "messages_lost",
        "{warning}"
    );
    assert!(
        warning["params"]["data"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("mcp.resume_buffer")),
        "{warning}"
    );
    // What the buffer still holds follows: the call's result is the last.
    let mut got_result = false;
    for _ in 0..2 {
        let (_, m) = sse.next_message("the retained messages").await;
        got_result |= m["id"] == 2;
    }
    assert!(
        got_result,
        "the newest messages are kept, the result among them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_lagging_get_stream_replays_nothing_a_finished_response_delivered() {
    let env = Env::start().await;
    let gw = &env.gw;
    let raw = RawSession::initialize(gw).await;
    let token = raw.session.clone().expect("session id");
    // The GET stream's last id lags behind the ids that POST answers use.
    let get = gw
        .client()
        .get(gw.mcp_url())
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &token)
        .header("mcp-protocol-version", "2025-11-25")
        .send()
        .await
        .expect("GET /mcp");
    assert_eq!(get.status(), 200);
    drop(get);
    let echoed = raw
        .request(
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "once"}}),
        )
        .await;
    assert_eq!(echoed["result"]["content"][0]["text"], "once", "{echoed}");

    let mut sse = http_resume(gw, &token, 0).await;
    // Nothing is owed: the echo answer went out on its finished POST stream.
    let replayed = tokio::time::timeout(Duration::from_millis(800), sse.next()).await;
    if let Ok(Some(event)) = &replayed {
        assert!(
            event.json().is_none(),
            "a message the client already has was sent again: {event:?}"
        );
    }

    // A number above anything the session sent is refused, with the reason.
    let mut ws = ws_connect(gw, Some((&token, Some(u64::MAX))))
        .await
        .expect("upgrade");
    let reason = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Close(c))) => {
                break c.map(|c| (u16::from(c.code), c.reason.to_string()));
            }
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    let (code, reason) = reason.expect("a close frame with a reason");
    assert_eq!(code, 1011);
    assert!(reason.contains("ahead of this session"), "{reason}");
    // The session itself is unharmed.
    let again = raw
        .request(
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "still"}}),
        )
        .await;
    assert_eq!(again["result"]["content"][0]["text"], "still", "{again}");
}
