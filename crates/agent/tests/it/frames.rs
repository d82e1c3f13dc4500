//! Binary frames (`mcpw.v1`) between the SDK and the fake gateway: both
//! ways of negotiating, what the agent's frames look like, and frames that
//! do not decode.

use meshgate_agent::{AgentEvent, BinaryOptions, Negotiation};
use meshgate_protocol::frame::{self, EncodeOptions, FrameType, Header, Limits, Method, flags};
use serde_json::{Value, json};

use crate::fake_gateway::{FakeGateway, GatewayConn, RunningAgent, mode_info, options};

/// Shuts the agent down and checks it closes with 1000 and returns `Ok`.
async fn shut_down(agent: RunningAgent, conn: &mut GatewayConn) {
    agent.shutdown.cancel();
    assert_eq!(conn.expect_close().await, Some(1000));
    assert!(agent.finished().await.is_ok());
}

/// Waits for the next `ProtocolMode` event: (binary, compression, checksum).
async fn mode(agent: &mut RunningAgent) -> (bool, bool, bool) {
    agent
        .event(|e| match e {
            AgentEvent::ProtocolMode {
                binary,
                compression,
                checksum,
            } => Some((*binary, *compression, *checksum)),
            _ => None,
        })
        .await
}

/// Waits for the next `BadFrame` event; its error.
async fn bad_frame(agent: &mut RunningAgent) -> String {
    agent
        .event(|e| match e {
            AgentEvent::BadFrame { error } => Some(error.clone()),
            _ => None,
        })
        .await
}

fn header(conn: &GatewayConn, what: &str) -> Header {
    conn.last_frame
        .unwrap_or_else(|| panic!("{what} came as text, not as a binary frame"))
}

fn has(header: &Header, flag: u16) -> bool {
    header.flags & flag != 0
}

/// A payload whose echo makes `task.complete` larger than `bytes`, and
/// compressible.
fn padded(bytes: usize) -> Value {
    json!({"text": "all work and no play ".repeat(bytes / 20 + 1)})
}

#[tokio::test]
async fn subprotocol_upgrade_sends_binary_frames_compressed_above_the_threshold_with_checksums() {
    let gateway = FakeGateway::start().await;
    let mut opts = options(&gateway.url);
    opts.binary = Some(BinaryOptions::default());
    let mut agent = RunningAgent::start(opts);
    let mut conn = gateway.accept_with(true).await;
    assert_eq!(conn.headers["sec-websocket-protocol"], frame::SUBPROTOCOL);
    assert!(conn.binary);

    // The preferences are the gateway's defaults: no set_binary, only
    // protocol.get_info for the gateway's frame limits, then register.
    conn.register(json!([])).await;
    let register = header(&conn, "agent.register");
    assert_eq!(register.frame_type, FrameType::Request);
    assert_eq!(register.sequence, 2, "frame 1 was protocol.get_info");
    assert!(has(&register, flags::CHECKSUM));
    assert!(
        !has(&register, flags::COMPRESSED),
        "small messages stay plain"
    );
    assert_eq!(mode(&mut agent).await, (true, true, true));

    let payload = padded(4096);
    conn.assign_accepted("t-big", payload.clone()).await;
    let accept = header(&conn, "task.accept");
    assert!(!has(&accept, flags::COMPRESSED));
    let complete = conn.expect_and_answer("task.complete", json!({})).await;
    assert_eq!(complete["result"]["echo"], payload);
    let frame = header(&conn, "task.complete");
    assert_eq!(frame.frame_type, FrameType::Request);
    assert!(
        frame.sequence > accept.sequence,
        "frames are numbered in order"
    );
    assert!(
        has(&frame, flags::COMPRESSED),
        "over 1024 bytes: compressed"
    );
    assert!(has(&frame, flags::CHECKSUM));

    // A ping frame is answered with a pong of the same sequence.
    conn.send_ping(77).await;
    let health = conn.call("g-1", "health.check").await;
    assert_eq!(health["result"]["status"], "ok");
    assert_eq!(header(&conn, "the answer").frame_type, FrameType::Response);
    let pongs: Vec<u64> = conn.pongs.iter().map(|h| h.sequence).collect();
    assert_eq!(pongs, [77]);
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn subprotocol_with_other_preferences_aligns_the_gateway_with_set_binary() {
    let gateway = FakeGateway::start().await;
    let mut opts = options(&gateway.url);
    opts.binary = Some(BinaryOptions {
        compress_threshold: None,
        checksum: false,
        ..BinaryOptions::default()
    });
    let mut agent = RunningAgent::start(opts);
    let mut conn = gateway.accept_with(true).await;
    let params = conn.expect_set_binary().await;
    assert_eq!(
        params,
        json!({"enabled": true, "compression": {"enabled": false, "threshold": 1024}, "checksum": false})
    );
    let set_binary = header(&conn, "protocol.set_binary");
    assert_eq!(
        set_binary.flags, 0,
        "the agent's own frames follow its preferences"
    );
    conn.register(json!([])).await;
    assert_eq!(mode(&mut agent).await, (true, false, false));

    conn.assign_accepted("t-big", padded(4096)).await;
    conn.expect_and_answer("task.complete", json!({})).await;
    assert_eq!(header(&conn, "task.complete").flags, 0, "never compressed");
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn gateway_without_the_subprotocol_is_asked_at_run_time() {
    let gateway = FakeGateway::start().await;
    let mut opts = options(&gateway.url);
    opts.binary = Some(BinaryOptions::default());
    let mut agent = RunningAgent::start(opts);
    // Upgraded without the subprotocol: the agent gives this connection up
    // at once and connects again without offering it.
    let first = gateway.accept().await;
    assert_eq!(first.headers["sec-websocket-protocol"], frame::SUBPROTOCOL);
    drop(first);
    let mut conn = gateway.accept().await;
    assert!(conn.headers.get("sec-websocket-protocol").is_none());
    conn.expect_set_binary().await;
    assert!(conn.last_frame.is_none(), "set_binary goes out in text");
    conn.register(json!([])).await;
    header(&conn, "agent.register");
    assert_eq!(mode(&mut agent).await, (true, true, true));
    agent
        .event(|e| matches!(e, AgentEvent::Registered { .. }).then_some(()))
        .await;
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn runtime_switch_sends_text_until_the_answer_then_binary_and_loses_nothing() {
    let gateway = FakeGateway::start().await;
    let mut opts = options(&gateway.url);
    opts.binary = Some(BinaryOptions {
        compress_threshold: Some(64),
        checksum: false,
        ..BinaryOptions::new(Negotiation::Runtime)
    });
    let mut agent = RunningAgent::start(opts);
    let mut conn = gateway.accept().await;
    assert!(conn.headers.get("sec-websocket-protocol").is_none());

    let (id, params) = conn.expect_request("protocol.set_binary").await;
    assert!(conn.last_frame.is_none(), "text before the answer");
    assert_eq!(id, json!(1));
    assert_eq!(
        params,
        json!({"enabled": true, "compression": {"enabled": true, "threshold": 64}, "checksum": false})
    );
    // A request of the gateway's crosses the switch; it must be answered.
    conn.send_text(json!({"jsonrpc": "2.0", "id": "g-early", "method": "health.check"}))
        .await;
    conn.answer(&id, mode_info(true, true, 64, false)).await;
    conn.binary = true;
    conn.encode = EncodeOptions {
        compress_threshold: Some(64),
        checksum: false,
        ..EncodeOptions::default()
    };

    let (id, _) = conn.expect_request("agent.register").await;
    let register = header(&conn, "agent.register");
    assert_eq!(id, json!(2));
    assert!(!has(&register, flags::CHECKSUM));
    assert!(
        has(&register, flags::COMPRESSED),
        "the register request is over 64 bytes"
    );
    conn.answer(
        &id,
        json!({"agent_id": "test-agent-1", "session_id": "as-bin", "heartbeat_interval_secs": 60}),
    )
    .await;
    let early = conn.recv().await;
    assert_eq!(early["id"], "g-early", "{early}");
    assert_eq!(early["result"]["status"], "ok");
    header(&conn, "the early answer");
    assert_eq!(mode(&mut agent).await, (true, true, false));

    // Text from the gateway is still read after the switch.
    conn.send_text(json!({"jsonrpc": "2.0", "id": "g-text", "method": "health.check"}))
        .await;
    assert_eq!(conn.recv().await["id"], "g-text");
    conn.assign_accepted("t-1", padded(200)).await;
    conn.expect_and_answer("task.complete", json!({})).await;
    let complete = header(&conn, "task.complete");
    assert!(has(&complete, flags::COMPRESSED) && !has(&complete, flags::CHECKSUM));
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn refused_set_binary_keeps_the_connection_in_text() {
    let gateway = FakeGateway::start().await;
    let mut opts = options(&gateway.url);
    opts.binary = Some(BinaryOptions::new(Negotiation::Runtime));
    let mut agent = RunningAgent::start(opts);
    let mut conn = gateway.accept().await;
    let (id, _) = conn.expect_request("protocol.set_binary").await;
    conn.answer_error(&id, 4004, "method \"protocol.set_binary\" not found")
        .await;
    conn.register(json!([])).await;
    assert!(conn.last_frame.is_none(), "register goes out in text");
    assert_eq!(mode(&mut agent).await, (false, false, false));
    conn.assign_accepted("t-1", json!({})).await;
    conn.expect_and_answer("task.complete", json!({})).await;
    assert!(conn.last_frame.is_none());
    shut_down(agent, &mut conn).await;
}

#[tokio::test]
async fn bad_binary_frames_from_the_gateway_are_counted_and_survived() {
    let gateway = FakeGateway::start().await;
    let mut opts = options(&gateway.url);
    opts.binary = Some(BinaryOptions::default());
    let mut agent = RunningAgent::start(opts);
    let mut conn = gateway.accept_with(true).await;
    conn.register(json!([])).await;
    agent
        .event(|e| matches!(e, AgentEvent::Registered { .. }).then_some(()))
        .await;

    conn.send_bytes(b"this is not a frame at all".to_vec())
        .await;
    let error = bad_frame(&mut agent).await;
    assert!(error.contains("magic"), "{error}");

    let message = br#"{"jsonrpc":"2.0","id":"g-x","method":"health.check"}"#;
    let opts = EncodeOptions::default();
    let mut corrupt = frame::encode(
        FrameType::Request,
        Method::Named,
        5,
        message,
        &opts,
        &Limits::default(),
    )
    .unwrap_or_default();
    if let Some(last) = corrupt.last_mut() {
        *last ^= 0xff;
    }
    conn.send_bytes(corrupt).await;
    let error = bad_frame(&mut agent).await;
    assert!(error.contains("checksum"), "{error}");
    assert_eq!(agent.handle.bad_frames(), 2);

    // The connection goes on: the corrupt request was dropped, the next is
    // answered.
    let health = conn.call("g-1", "health.check").await;
    assert_eq!(health["result"]["status"], "ok");
    shut_down(agent, &mut conn).await;
}
