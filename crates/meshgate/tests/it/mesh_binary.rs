//! Binary frames and shared state end to end: raw WebSocket agents speaking
//! the frame codec by hand (negotiation, the switch at run time, ping
//! frames, bad frames), SDK agents in binary mode sharing a CRDT document,
//! and the REST state API.

use std::time::{Duration, Instant};

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use meshgate_protocol::frame::{self, EncodeOptions, FrameType, Limits, Method};
use reqwest::{Method as Http, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::mesh::{
    AgentProc, FLOW_WAIT, agent_key, developer_key, mesh_config, submit, wait_finished,
};
use crate::support::{Gateway, WAIT, metric_value, send};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One frame the gateway sent, decoded.
#[derive(Debug)]
enum In {
    Text(Value),
    Binary {
        header: frame::Header,
        messages: Vec<Value>,
    },
    Close(Option<u16>, String),
}

/// An agent speaking text and binary frames by hand.
struct BinAgent {
    sink: SplitSink<Ws, Message>,
    stream: SplitStream<Ws>,
    /// The subprotocol the gateway chose.
    subprotocol: Option<String>,
    next_id: i64,
    sequence: u64,
}

impl BinAgent {
    async fn connect(gw: &Gateway, key: &str, id: &str, subprotocol: Option<&str>) -> BinAgent {
        let mut request = format!("ws://127.0.0.1:{}/ws", gw.port)
            .into_client_request()
            .expect("a valid WebSocket request");
        let headers = request.headers_mut();
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {key}")).expect("header"),
        );
        headers.insert("x-agent-id", HeaderValue::from_str(id).expect("header"));
        headers.insert("x-agent-type", HeaderValue::from_static("raw"));
        if let Some(p) = subprotocol {
            headers.insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(p).expect("header"),
            );
        }
        let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("the handshake finishes in time")
            .unwrap_or_else(|e| panic!("the WebSocket handshake failed: {e}"));
        let subprotocol = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (sink, stream) = ws.split();
        BinAgent {
            sink,
            stream,
            subprotocol,
            next_id: 0,
            sequence: 0,
        }
    }

    async fn next(&mut self) -> In {
        loop {
            let msg = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("a frame from the gateway in time");
            return match msg {
                Some(Ok(Message::Text(t))) => {
                    In::Text(serde_json::from_str(t.as_str()).expect("text frames hold JSON"))
                }
                Some(Ok(Message::Binary(b))) => {
                    let f = frame::decode(&b, &Limits::default())
                        .unwrap_or_else(|e| panic!("the gateway sent a bad frame: {e}"));
                    let messages = f
                        .messages()
                        .map(|m| serde_json::from_slice(m).unwrap_or(Value::Null))
                        .collect();
                    In::Binary {
                        header: f.header,
                        messages,
                    }
                }
                Some(Ok(Message::Close(c))) => In::Close(
                    c.as_ref().map(|c| u16::from(c.code)),
                    c.map(|c| c.reason.to_string()).unwrap_or_default(),
                ),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => In::Close(None, String::new()),
            };
        }
    }

    /// The next JSON-RPC message matching `pick` and whether it came in a
    /// binary frame (with that frame's header); others are dropped.
    async fn message(&mut self, pick: impl Fn(&Value) -> bool) -> (Value, Option<frame::Header>) {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no matching message in time");
            match self.next().await {
                In::Text(m) if pick(&m) => return (m, None),
                In::Binary { header, messages } => {
                    if let Some(m) = messages.into_iter().find(|m| pick(m)) {
                        return (m, Some(header));
                    }
                }
                In::Close(code, reason) => {
                    panic!("the connection closed ({code:?}, {reason}) while waiting")
                }
                In::Text(_) => {}
            }
        }
    }

    fn request(&mut self, method: &str, params: Value) -> (i64, String) {
        self.next_id += 1;
        let text =
            json!({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
                .to_string();
        (self.next_id, text)
    }

    async fn send_text(&mut self, text: String) {
        self.sink.send(Message::text(text)).await.expect("send");
    }

    async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.sink.send(Message::binary(bytes)).await.expect("send");
    }

    fn encode(&mut self, text: &str, opts: &EncodeOptions) -> Vec<u8> {
        self.sequence += 1;
        let (kind, method) = frame::classify(text.as_bytes());
        frame::encode(
            kind,
            method,
            self.sequence,
            text.as_bytes(),
            opts,
            &Limits::default(),
        )
        .expect("encodes")
    }

    /// A request in a text frame; its answer and how it came.
    async fn call_text(&mut self, method: &str, params: Value) -> (Value, Option<frame::Header>) {
        let (id, text) = self.request(method, params);
        self.send_text(text).await;
        self.message(|m| m["id"] == id && m.get("method").is_none())
            .await
    }

    /// A request in a binary frame; its answer and how it came.
    async fn call_binary(
        &mut self,
        method: &str,
        params: Value,
        opts: &EncodeOptions,
    ) -> (Value, Option<frame::Header>) {
        let (id, text) = self.request(method, params);
        let bytes = self.encode(&text, opts);
        self.send_binary(bytes).await;
        self.message(|m| m["id"] == id && m.get("method").is_none())
            .await
    }
}

fn registration(id: &str) -> Value {
    json!({"id": id, "type": "raw", "name": id, "version": "1.0.0",
           "capabilities": ["raw"], "max_concurrent_tasks": 1})
}

fn checksummed() -> EncodeOptions {
    EncodeOptions {
        compress_threshold: Some(64),
        checksum: true,
        ..EncodeOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subprotocol_starts_binary_mode_and_answers_come_in_checksummed_frames() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let mut a = BinAgent::connect(&gw, &key, "bin-sub", Some(frame::SUBPROTOCOL)).await;
    assert_eq!(a.subprotocol.as_deref(), Some("mcpw.v1"));

    // A binary request, compressed and checksummed; the answer is binary.
    let (answer, header) = a
        .call_binary("agent.register", registration("bin-sub"), &checksummed())
        .await;
    assert_eq!(answer["result"]["agent_id"], "bin-sub", "{answer}");
    let header = header.expect("the answer came in a binary frame");
    assert_eq!(header.frame_type, FrameType::Response);
    assert!(header.flags & frame::flags::CHECKSUM != 0, "{header:?}");
    assert_eq!(header.sequence, 1, "the gateway numbers its frames from 1");

    // Text still works on a binary connection; the answer comes binary.
    let (info, header) = a.call_text("protocol.get_info", json!({})).await;
    assert!(header.is_some(), "answers follow the mode, not the request");
    let info = &info["result"];
    assert_eq!(info["mode"], "binary", "{info}");
    assert_eq!(info["subprotocol"], "mcpw.v1");
    assert_eq!(info["checksum"], true);
    assert_eq!(info["compression"]["enabled"], true);
    assert_eq!(info["compression"]["threshold"], 1024);
    assert_eq!(info["limits"]["max_payload_bytes"], 1_048_576);
    assert_eq!(info["frames"]["binary_in"], 1, "{info}");
    assert_eq!(info["frames"]["text_in"], 1, "{info}");

    // A ping frame is answered by a pong frame with the same sequence id.
    let ping = frame::encode(
        FrameType::Ping,
        Method::Ping,
        4242,
        &[],
        &checksummed(),
        &Limits::default(),
    )
    .expect("encodes");
    a.send_binary(ping).await;
    let pong = loop {
        if let In::Binary { header, .. } = a.next().await
            && header.frame_type == FrameType::Pong
        {
            break header;
        }
    };
    assert_eq!(pong.sequence, 4242);
    assert_eq!(pong.method, Method::Pong);

    // Large state values come back compressed.
    let big = "shared state is replicated to every subscriber. ".repeat(200);
    let (applied, header) = a
        .call_text(
            "state.apply",
            json!({"doc": "notes", "ops": [{"op": "register.set", "path": "text", "value": big}]}),
        )
        .await;
    assert_eq!(applied["result"]["applied"], 1, "{applied}");
    let header = header.expect("binary");
    assert!(
        header.flags & frame::flags::COMPRESSED != 0,
        "a {}-byte answer is compressed: {header:?}",
        big.len()
    );
    assert!((header.data_size as usize) < big.len() / 4, "{header:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_binary_switches_after_its_answer_and_bad_frames_are_refused_then_closed() {
    let gw = Gateway::start(&mesh_config(&[("binary_max_bad_frames", "3")])).await;
    let key = agent_key(&gw, None).await;
    let mut a = BinAgent::connect(&gw, &key, "bin-rt", None).await;
    assert_eq!(a.subprotocol, None);
    let (info, header) = a.call_text("protocol.get_info", json!({})).await;
    assert!(header.is_none());
    assert_eq!(info["result"]["mode"], "text", "{info}");

    // Bad parameters name the field.
    let (bad, _) = a
        .call_text("protocol.set_binary", json!({"enabled": "yes"}))
        .await;
    assert_eq!(bad["error"]["code"], 4005, "{bad}");
    assert_eq!(bad["error"]["data"]["field"], "enabled", "{bad}");
    let (bad, _) = a
        .call_text(
            "protocol.set_binary",
            json!({"enabled": true, "compression": {"level": 3}}),
        )
        .await;
    assert_eq!(bad["error"]["data"]["field"], "compression.level", "{bad}");

    // The answer to set_binary is the last text frame; the next is binary.
    let (answer, header) = a
        .call_text(
            "protocol.set_binary",
            json!({"enabled": true, "compression": {"enabled": true, "threshold": 0}, "checksum": false}),
        )
        .await;
    assert!(header.is_none(), "the answer comes in the old mode");
    assert_eq!(answer["result"]["mode"], "binary", "{answer}");
    assert_eq!(answer["result"]["checksum"], false);
    let (registered, header) = a.call_text("agent.register", registration("bin-rt")).await;
    assert_eq!(registered["result"]["agent_id"], "bin-rt", "{registered}");
    let header = header.expect("binary after the switch");
    assert!(
        header.flags & frame::flags::COMPRESSED != 0,
        "threshold 0 compresses all"
    );
    assert_eq!(
        header.flags & frame::flags::CHECKSUM,
        0,
        "checksums were turned off"
    );

    // Bad frames: each gets a 4009 error naming the problem.
    let (_, text) = a.request("agent.heartbeat", json!({}));
    let mut corrupt = a.encode(&text, &checksummed());
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xFF;
    a.send_binary(corrupt).await;
    let (err, _) = a.message(|m| m["error"]["code"] == 4009).await;
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("checksum mismatch"), "{err}");
    assert_eq!(err["error"]["data"]["kind"], "checksum_mismatch", "{err}");

    let mut wrong_magic = a.encode(&text, &checksummed());
    wrong_magic[..4].copy_from_slice(&0xDEAD_BEEFu32.to_be_bytes());
    a.send_binary(wrong_magic).await;
    let (err, _) = a.message(|m| m["error"]["code"] == 4009).await;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid magic number 0xDEADBEEF, expected 0x4D435057"),
        "{err}"
    );
    // Good frames still work between bad ones.
    let (hb, _) = a
        .call_binary("agent.heartbeat", json!({}), &checksummed())
        .await;
    assert!(hb["result"]["server_time_ms"].is_u64(), "{hb}");

    // The third bad frame closes the connection with 1008 and the reason.
    let mut short = a.encode(&text, &checksummed());
    short.truncate(10);
    a.send_binary(short).await;
    let (code, reason) = loop {
        if let In::Close(code, reason) = a.next().await {
            break (code, reason);
        }
    };
    assert_eq!(code, Some(1008), "{reason}");
    assert!(
        reason.contains("too many bad binary frames (3)"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_can_be_disabled_by_the_operator() {
    let gw = Gateway::start(&mesh_config(&[("binary_enabled", "false")])).await;
    let key = agent_key(&gw, None).await;
    // The upgrade succeeds without the subprotocol (read off the raw
    // handshake: WebSocket clients refuse such an answer themselves).
    let mut tcp = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: mcpw.v1\r\nAuthorization: Bearer {key}\r\n\
         X-Agent-ID: no-bin-raw\r\nX-Agent-Type: raw\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut byte))
            .await
            .expect("the answer in time")
            .expect("read");
        assert_eq!(
            n,
            1,
            "the connection ended in the handshake: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        !head.contains("sec-websocket-protocol"),
        "not accepted: {head}"
    );

    let mut a = BinAgent::connect(&gw, &key, "no-bin", None).await;
    let (answer, _) = a
        .call_text("protocol.set_binary", json!({"enabled": true}))
        .await;
    assert_eq!(answer["error"]["code"], 4005, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("mesh.binary_enabled = false"),
        "{answer}"
    );
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

async fn state(
    gw: &Gateway,
    http: &reqwest::Client,
    method: Http,
    doc: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    send(http, method, &gw.url(&format!("/api/v1/state/{doc}")), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_api_applies_operations_refuses_bad_ones_and_keeps_tenants_apart() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let acme = gw.client_with_key(&developer_key(&gw, "acme").await);
    let other = gw.client_with_key(&developer_key(&gw, "other").await);

    let (status, applied) = state(
        &gw,
        &acme,
        Http::POST,
        "board",
        Some(json!({"ops": [
            {"op": "counter.increment", "path": "visits", "by": 3},
            {"op": "pncounter.add", "path": ["stock", "apples"], "by": -2},
            {"op": "register.set", "path": "leader", "value": "a1"},
            {"op": "set.add", "path": "tags", "value": "x"},
            {"op": "set.add", "path": "tags", "value": "y"},
            {"op": "set.remove", "path": "tags", "value": "x"},
        ]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{applied}");
    assert_eq!(applied["applied"], 6);
    let expected = json!({"visits": 3, "stock": {"apples": -2}, "leader": "a1", "tags": ["y"]});
    assert_eq!(applied["value"], expected, "{applied}");
    let hash = applied["hash"].as_str().expect("hash").to_owned();
    assert!(hash.starts_with("sha256:"), "{hash}");

    let (status, got) = state(&gw, &acme, Http::GET, "board", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["value"], expected);
    assert_eq!(got["hash"], hash.as_str());
    let (_, full) = send(
        &acme,
        Http::GET,
        &gw.url("/api/v1/state/board?full=true"),
        None,
    )
    .await;
    assert!(full["state"].is_object(), "{full}");
    assert_eq!(full["hash"], hash.as_str());

    // Bad operations: nothing is applied, the field is named.
    let (status, err) = state(
        &gw,
        &acme,
        Http::POST,
        "board",
        Some(json!({"ops": [
            {"op": "counter.increment", "path": "visits", "by": 1},
            {"op": "counter.increment", "path": "visits", "by": -1},
        ]})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["data"]["field"], "ops[1].by", "{err}");
    let (status, err) = state(
        &gw,
        &acme,
        Http::POST,
        "board",
        Some(json!({"ops": [{"op": "set.add", "path": "visits", "value": 1}]})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("visits"),
        "the type conflict names the path: {err}"
    );
    let (status, err) = state(
        &gw,
        &acme,
        Http::POST,
        "bad%2Fname",
        Some(json!({"ops": []})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let (_, unchanged) = state(&gw, &acme, Http::GET, "board", None).await;
    assert_eq!(
        unchanged["hash"],
        hash.as_str(),
        "refused operations change nothing"
    );

    // Another tenant sees an empty document of the same name.
    let (status, theirs) = state(&gw, &other, Http::GET, "board", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(theirs["value"], json!({}), "{theirs}");
    let (_, list) = send(&other, Http::GET, &gw.url("/api/v1/state"), None).await;
    assert_eq!(list["documents"], json!([]), "{list}");
    let (_, list) = send(&acme, Http::GET, &gw.url("/api/v1/state"), None).await;
    assert_eq!(list["documents"][0]["name"], "board", "{list}");

    // Clearing removes every key; the document survives a restart.
    let (status, cleared) = state(&gw, &acme, Http::DELETE, "board", None).await;
    assert_eq!(status, StatusCode::OK, "{cleared}");
    assert_eq!(cleared["value"], json!({}));
    let (status, _) = state(&gw, &other, Http::DELETE, "board", None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "nothing to clear in another tenant"
    );
    let (_, after) = state(
        &gw,
        &acme,
        Http::POST,
        "board",
        Some(json!({"ops": [{"op": "counter.increment", "path": "visits"}]})),
    )
    .await;
    assert_eq!(
        after["value"],
        json!({"visits": 1}),
        "a cleared counter starts over"
    );
    let hash = after["hash"].clone();
    let mut gw = gw;
    gw.restart().await;
    let acme = gw.client_with_key(&developer_key(&gw, "acme").await);
    let (_, reloaded) = state(&gw, &acme, Http::GET, "board", None).await;
    assert_eq!(reloaded["value"], json!({"visits": 1}), "{reloaded}");
    assert_eq!(reloaded["hash"], hash);
}

/// A payload of `n` bytes of compressible text that differs per `seed`.
fn text_of(n: usize, seed: &str) -> String {
    let mut s = String::with_capacity(n + 64);
    let mut i = 0u64;
    while s.len() < n {
        s.push_str(&format!(
            "{seed}-{i} the quick brown fox jumps over the lazy dog; "
        ));
        i += 1;
    }
    s.truncate(n);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_binary_sdk_agents_exchange_large_payloads_and_converge_on_a_shared_document() {
    let gw = Gateway::start(&mesh_config(&[("blob_threshold_bytes", "8388608")])).await;
    let key = agent_key(&gw, None).await;
    let a = AgentProc::start(
        &gw,
        &key,
        "bin-a",
        &[
            "--capability",
            "alpha",
            "--binary",
            "--compress-threshold",
            "1024",
            "--subscribe",
            "plan",
        ],
    )
    .await;
    let b = AgentProc::start(
        &gw,
        &key,
        "bin-b",
        &[
            "--capability",
            "beta",
            "--binary-runtime",
            "--compress-threshold",
            "1024",
            "--subscribe",
            "plan",
        ],
    )
    .await;
    for agent in [&a, &b] {
        let mode = agent
            .wait_event("binary mode", |e| {
                e["event"] == "protocol_mode" && e["binary"] == true
            })
            .await;
        assert_eq!(mode["compression"], true, "{mode}");
        assert_eq!(mode["checksum"], true, "{mode}");
    }
    let http = gw.client();

    // Large payloads both ways: 600 KiB in, 600 KiB echoed plus 300 KiB out.
    let mut large = Vec::new();
    for (agent, cap) in [("bin-a", "alpha"), ("bin-b", "beta")] {
        let text = text_of(600 * 1024, agent);
        let id = submit(
            &gw,
            &http,
            json!({"type": "bulk", "required_capabilities": [cap],
                   "payload": {"text": text, "result_bytes": 300 * 1024}}),
        )
        .await;
        large.push((id, agent, text));
    }
    for (id, agent, text) in &large {
        let task = wait_finished(&gw, id).await;
        assert_eq!(task["state"], "completed", "{}", task["error"]);
        assert_eq!(task["agent_id"], *agent);
        assert_eq!(
            task["result"]["echo"]["text"].as_str(),
            Some(text.as_str()),
            "the payload arrived intact"
        );
        assert_eq!(
            task["result"]["blob"].as_str().map(str::len),
            Some(300 * 1024)
        );
    }

    // Concurrent updates of one document from both agents.
    let ops = |who: &str| {
        json!([
            {"op": "counter.increment", "path": "done", "by": 1},
            {"op": "pncounter.add", "path": ["balance", who], "by": -1},
            {"op": "set.add", "path": "members", "value": who},
            {"op": "register.set", "path": "last", "value": who},
        ])
    };
    let mut updates = Vec::new();
    for round in 0..4 {
        for (who, cap) in [("bin-a", "alpha"), ("bin-b", "beta")] {
            updates.push(
                submit(
                    &gw,
                    &http,
                    json!({"type": "update", "required_capabilities": [cap],
                           "payload": {"state": {"doc": "plan", "ops": ops(who), "repeat": 25}, "round": round}}),
                )
                .await,
            );
        }
    }
    for id in &updates {
        let task = wait_finished(&gw, id).await;
        assert_eq!(task["state"], "completed", "{task:#}");
    }

    // Both replicas end equal to the gateway's document.
    let (_, doc) = state(&gw, &http, Http::GET, "plan", None).await;
    assert_eq!(doc["value"]["done"], 200, "{doc}");
    assert_eq!(
        doc["value"]["balance"],
        json!({"bin-a": -100, "bin-b": -100}),
        "{doc}"
    );
    assert_eq!(doc["value"]["members"], json!(["bin-a", "bin-b"]), "{doc}");
    let gateway_hash = doc["hash"].as_str().expect("hash").to_owned();
    let deadline = Instant::now() + FLOW_WAIT;
    for (agent, cap) in [("bin-a", "alpha"), ("bin-b", "beta")] {
        loop {
            let id = submit(
                &gw,
                &http,
                json!({"type": "report", "required_capabilities": [cap],
                       "payload": {"state_report": {"doc": "plan"}}}),
            )
            .await;
            let report = wait_finished(&gw, &id).await;
            let result = &report["result"];
            assert_eq!(result["gateway_hash"], gateway_hash.as_str(), "{result}");
            if result["local_hash"] == gateway_hash.as_str() {
                assert_eq!(result["local_value"], doc["value"], "{agent}: {result}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{agent}'s replica did not converge: {result}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Everything went in binary frames, compressed where large.
    let (_, metrics) = gw.get_text("/metrics").await;
    let binary_in = metric_value(
        &metrics,
        "agent_frames_total{direction=\"in\",kind=\"binary\"}",
    )
    .unwrap_or(0.0);
    let binary_out = metric_value(
        &metrics,
        "agent_frames_total{direction=\"out\",kind=\"binary\"}",
    )
    .unwrap_or(0.0);
    assert!(binary_in >= 200.0, "binary frames in: {binary_in}");
    assert!(binary_out >= 200.0, "binary frames out: {binary_out}");
    assert_eq!(
        metric_value(&metrics, "agent_bad_frames_total").unwrap_or(0.0),
        0.0,
        "no bad frames"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_every_delta_in_order_and_a_replica_merging_them_matches_the_hash() {
    let gw = Gateway::start(&mesh_config(&[])).await;
    let key = agent_key(&gw, None).await;
    let http = gw.client();
    let mut a = BinAgent::connect(&gw, &key, "sub-1", None).await;
    let (early, _) = a.call_text("state.get", json!({"doc": "feed"})).await;
    assert_eq!(early["error"]["code"], 4000, "register first: {early}");
    let (registered, _) = a.call_text("agent.register", registration("sub-1")).await;
    assert_eq!(registered["result"]["agent_id"], "sub-1", "{registered}");

    let (_, seeded) = state(
        &gw,
        &http,
        Http::POST,
        "feed",
        Some(json!({"ops": [{"op": "set.add", "path": "seen", "value": "first"}]})),
    )
    .await;
    let (snap, _) = a.call_text("state.subscribe", json!({"doc": "feed"})).await;
    let snap = &snap["result"];
    assert_eq!(snap["hash"], seeded["hash"], "{snap}");
    assert_eq!(snap["version"], 1);
    let mut replica = meshgate_core::crdt::Document::from_json(&snap["state"])
        .unwrap_or_else(|e| panic!("the snapshot is a valid state: {e}"));

    let mut last_hash = Value::Null;
    for i in 0..5 {
        let (status, applied) = state(
            &gw,
            &http,
            Http::POST,
            "feed",
            Some(json!({"ops": [
                {"op": "counter.increment", "path": "n", "by": i + 1},
                {"op": "set.add", "path": "seen", "value": format!("m{i}")},
            ]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{applied}");
        last_hash = applied["hash"].clone();
    }
    for version in 2..=6 {
        let (push, _) = a.message(|m| m["method"] == "state.delta").await;
        let params = &push["params"];
        assert_eq!(params["doc"], "feed");
        assert_eq!(
            params["version"], version,
            "deltas arrive in order: {params}"
        );
        let delta = meshgate_core::crdt::Document::from_json(&params["delta"])
            .unwrap_or_else(|e| panic!("the delta is a valid state: {e}"));
        replica.merge(&delta);
        assert_eq!(
            json!(replica.hash()),
            params["hash"],
            "after version {version}"
        );
    }
    assert_eq!(json!(replica.hash()), last_hash);
    assert_eq!(replica.value()["n"], 15);

    // Merging a delta again changes nothing; after unsubscribing no more come.
    let (answer, _) = a
        .call_text("state.unsubscribe", json!({"doc": "feed"}))
        .await;
    assert_eq!(answer["result"]["was_subscribed"], true, "{answer}");
    state(
        &gw,
        &http,
        Http::POST,
        "feed",
        Some(json!({"ops": [{"op": "counter.increment", "path": "n"}]})),
    )
    .await;
    let (hash, _) = a.call_text("state.hash", json!({"doc": "feed"})).await;
    assert_eq!(hash["result"]["version"], 7, "{hash}");
    assert_ne!(
        json!(replica.hash()),
        hash["result"]["hash"],
        "the replica is behind now"
    );
    let (sync, _) = a.call_text("state.sync", json!({"doc": "feed"})).await;
    let synced = meshgate_core::crdt::Document::from_json(&sync["result"]["state"])
        .unwrap_or_else(|e| panic!("a valid state: {e}"));
    replica.merge(&synced);
    assert_eq!(
        json!(replica.hash()),
        hash["result"]["hash"],
        "a full sync repairs the replica"
    );

    // Bad state requests name the field.
    let (bad, _) = a
        .call_text("state.apply", json!({"doc": "feed", "ops": []}))
        .await;
    assert_eq!(bad["error"]["code"], 4005, "{bad}");
    let (bad, _) = a.call_text("state.get", json!({"doc": 7})).await;
    assert_eq!(bad["error"]["data"]["field"], "doc", "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_subscribes_to_a_bounded_number_of_documents_and_made_up_names_cost_nothing() {
    let gw = Gateway::start(&mesh_config(&[("state_max_docs_per_tenant", "2")])).await;
    let key = agent_key(&gw, None).await;
    let mut a = BinAgent::connect(&gw, &key, "sub-cap", None).await;
    let (registered, _) = a.call_text("agent.register", registration("sub-cap")).await;
    assert_eq!(registered["result"]["agent_id"], "sub-cap", "{registered}");
    for doc in ["d1", "d2"] {
        let (ok, _) = a.call_text("state.subscribe", json!({"doc": doc})).await;
        assert_eq!(ok["result"]["version"], 0, "{ok}");
    }
    let (again, _) = a.call_text("state.subscribe", json!({"doc": "d1"})).await;
    assert!(
        again["result"].is_object(),
        "subscribing again is harmless: {again}"
    );
    let (third, _) = a.call_text("state.subscribe", json!({"doc": "d3"})).await;
    assert_eq!(third["error"]["code"], 4007, "{third}");
    assert!(
        third["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("mesh.state_max_docs_per_tenant"),
        "{third}"
    );
    let (never, _) = a
        .call_text("state.unsubscribe", json!({"doc": "never-seen"}))
        .await;
    assert_eq!(never["result"]["was_subscribed"], false, "{never}");
    let (left, _) = a.call_text("state.unsubscribe", json!({"doc": "d2"})).await;
    assert_eq!(left["result"]["was_subscribed"], true, "{left}");
    let (third, _) = a.call_text("state.subscribe", json!({"doc": "d3"})).await;
    assert!(
        third["result"].is_object(),
        "room again after unsubscribing: {third}"
    );
    // Reading a document nobody wrote answers an empty one and stores nothing.
    let (empty, _) = a
        .call_text("state.get", json!({"doc": "nothing-here"}))
        .await;
    assert_eq!(empty["result"]["value"], json!({}), "{empty}");
    assert_eq!(empty["result"]["version"], 0);
    let (_, list) = send(&gw.client(), Http::GET, &gw.url("/api/v1/state"), None).await;
    assert_eq!(list["documents"], json!([]), "{list}");
}
