//! MCP over WebSocket (`/mcp/ws`): a real client speaking JSON-RPC in text
//! frames through the real binary, bad frames, keepalive and close codes.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::{Gateway, GatewayConfig, WAIT};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(gw: &Gateway, key: Option<&str>) -> Result<(Ws, Option<String>), u16> {
    let mut request = format!("ws://127.0.0.1:{}/mcp/ws", gw.port)
        .into_client_request()
        .expect("request");
    let headers = request.headers_mut();
    headers.insert("sec-websocket-protocol", HeaderValue::from_static("mcp"));
    if let Some(key) = key {
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {key}")).expect("header"),
        );
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
    {
        Ok((ws, response)) => {
            let protocol = response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Ok((ws, protocol))
        }
        Err(tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// The next text frame as JSON; `Err` with the close code when closed.
async fn next(ws: &mut Ws) -> Result<Value, Option<u16>> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(t))) => {
                return Ok(serde_json::from_str(t.as_str()).expect("text frames hold JSON"));
            }
            Some(Ok(Message::Close(c))) => return Err(c.map(|c| u16::from(c.code))),
            Some(Ok(_)) => continue,
            _ => return Err(None),
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// The answer to request `id`, skipping notifications.
async fn answer(ws: &mut Ws, id: i64) -> Value {
    loop {
        let m = next(ws)
            .await
            .unwrap_or_else(|c| panic!("closed ({c:?}) before answer {id}"));
        if m["id"] == id && m.get("method").is_none() {
            return m;
        }
    }
}

async fn initialize(ws: &mut Ws) -> Value {
    send(
        ws,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                          "clientInfo": {"name": "ws-it", "version": "1"}}}),
    )
    .await;
    let init = answer(ws, 1).await;
    send(
        ws,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    init
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_session_over_websocket_lists_and_calls_tools_and_survives_bad_frames() {
    let gw = Gateway::start(&GatewayConfig::new()).await;
    assert_eq!(
        connect(&gw, None).await.err(),
        Some(401),
        "a credential is required"
    );
    let (mut ws, protocol) = connect(&gw, Some(&gw.admin_key)).await.expect("upgrade");
    assert_eq!(protocol.as_deref(), Some("mcp"));

    let init = initialize(&mut ws).await;
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18", "{init}");
    send(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    let list = answer(&mut ws, 2).await;
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(names.contains(&"meshgate_status"), "{list}");

    // Bad frames get JSON-RPC errors; the session goes on.
    ws.send(Message::text("{not json")).await.expect("send");
    let err = next(&mut ws).await.expect("an error answer");
    assert_eq!(err["error"]["code"], -32700, "{err}");
    send(
        &mut ws,
        json!({"jsonrpc": "1.0", "id": 7, "method": "ping"}),
    )
    .await;
    let err = answer(&mut ws, 7).await;
    assert_eq!(err["error"]["code"], -32600, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("jsonrpc"),
        "{err}"
    );
    ws.send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("send");
    let err = next(&mut ws).await.expect("an error answer");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("text frame"),
        "{err}"
    );

    send(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
               "params": {"name": "meshgate_status", "arguments": {}}}),
    )
    .await;
    let call = answer(&mut ws, 3).await;
    assert!(call["result"]["content"].is_array(), "{call}");

    // The client ends the session: the gateway closes normally.
    ws.send(Message::Close(None)).await.expect("close");
    let end = loop {
        match next(&mut ws).await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert!(matches!(end, Some(1000) | None), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_websocket_clients_are_closed_1008_and_oversized_frames_too() {
    let gw = Gateway::start(
        &GatewayConfig::new()
            .mcp_line("ws_ping_interval_secs = 1")
            .mcp_line("ws_pong_timeout_secs = 2")
            .max_request_body_bytes(4096),
    )
    .await;
    let (mut ws, _) = connect(&gw, Some(&gw.admin_key)).await.expect("upgrade");
    initialize(&mut ws).await;
    // Stop reading (so no pong goes back) for longer than the timeout.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let code = loop {
        match next(&mut ws).await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(1008));

    let (mut ws, _) = connect(&gw, Some(&gw.admin_key)).await.expect("upgrade");
    let big =
        json!({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x".repeat(8000)}});
    let _ = ws.send(Message::text(big.to_string())).await;
    let code = loop {
        match next(&mut ws).await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert!(matches!(code, Some(1008) | None), "{code:?}");
}
