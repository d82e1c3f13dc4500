//! One connection's two wire formats: JSON-RPC in WebSocket text frames, and
//! `mcpw.v1` binary frames (`meshgate_protocol::frame`). The gateway reads
//! both at any time, and so does the agent; what the agent *sends* follows
//! the connection's mode, which negotiation switches.
//!
//! [`Link`] is one connection: the reading half, plus the writer task that
//! encodes what the [`Session`] queues. Until registration the connection
//! loop reads through [`Link::call`]; afterwards the dispatcher reads the
//! stream itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use meshgate_protocol::frame::{self, EncodeOptions, FrameType, Limits, Method};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, warn};

use crate::agent::{Shared, describe_close};
use crate::rpc::{AnswerHook, Outgoing, Session};
use crate::{AgentError, AgentOptions, BinaryOptions};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Messages queued for the writer; senders wait when it is full.
const OUTGOING_CAPACITY: usize = 256;
/// Messages kept from before registration; more are dropped (the gateway
/// sends nothing but answers to an agent that has not registered).
const EARLY_CAPACITY: usize = 256;

/// One open connection: its reading half, its session, its writer.
pub(crate) struct Link {
    pub(crate) session: Arc<Session>,
    pub(crate) stream: SplitStream<Ws>,
    pub(crate) writer: JoinHandle<()>,
    /// Whether the writer sends binary frames; read for every message.
    binary: Arc<AtomicBool>,
    /// The largest payload the gateway reads (`limits.max_payload_bytes`
    /// of its mode answer), once known; the writer keeps under it.
    gateway_max_payload: Arc<AtomicUsize>,
    /// The limits for the gateway's binary frames.
    pub(crate) limits: Limits,
    /// Requests and notifications that arrived before registration ended
    /// (say in one batch with the register answer), for the dispatcher.
    pub(crate) early: Vec<Value>,
}

impl Link {
    /// Splits the socket and starts its writer; the first request gets id
    /// one. `binary` starts the writer in binary mode (the gateway accepted
    /// the subprotocol).
    pub(crate) fn start(ws: Ws, opts: &AgentOptions, binary: bool) -> Self {
        let (sink, stream) = ws.split();
        let (out_tx, out_rx) = mpsc::channel(OUTGOING_CAPACITY);
        let binary = Arc::new(AtomicBool::new(binary));
        let gateway_max_payload = Arc::new(AtomicUsize::new(usize::MAX));
        let preferences = opts.binary.clone().unwrap_or_default();
        let encoder = Encoder {
            binary: binary.clone(),
            gateway_max_payload: gateway_max_payload.clone(),
            options: encode_options(&preferences),
            limits: limits(&preferences),
            sequence: 0,
        };
        let writer = tokio::spawn(write_frames(sink, out_rx, encoder));
        Self {
            session: Arc::new(Session::new(out_tx, 1, opts.request_timeout)),
            stream,
            writer,
            binary,
            gateway_max_payload,
            limits: limits(&preferences),
            early: Vec::new(),
        }
    }

    /// Whether the writer sends binary frames now.
    pub(crate) fn is_binary(&self) -> bool {
        self.binary.load(Ordering::Acquire)
    }

    /// Records the largest payload the gateway reads, from its answer to
    /// `protocol.set_binary` or `protocol.get_info`: larger messages then go
    /// out as text instead of frames the gateway would refuse.
    pub(crate) fn set_gateway_limits(&self, answer: &Value) {
        if let Some(max) = answer
            .pointer("/limits/max_payload_bytes")
            .and_then(Value::as_u64)
            .and_then(|m| usize::try_from(m).ok())
        {
            self.gateway_max_payload.store(max, Ordering::Release);
        }
    }

    /// A hook that switches the writer to `binary` when run: messages it
    /// takes from the queue afterwards go out in the new mode.
    pub(crate) fn mode_switch(&self, binary: bool) -> impl FnOnce() + Send + 'static {
        let flag = self.binary.clone();
        move || flag.store(binary, Ordering::Release)
    }

    /// Sends a request before registration and reads the connection until
    /// its answer arrives. Other answers are resolved, pings answered, and
    /// requests and notifications kept in `early` for the dispatcher.
    pub(crate) async fn call(
        &mut self,
        shared: &Shared,
        method: &str,
        params: Value,
        hook: Option<AnswerHook>,
    ) -> Result<Value, AgentError> {
        let session = self.session.clone();
        let request = session.request_with(method, params, hook);
        tokio::pin!(request);
        loop {
            let message = tokio::select! {
                answer = &mut request => return answer,
                message = self.stream.next() => message,
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(err)) => return Err(AgentError::Connection(err.to_string())),
                None => return Err(AgentError::Closed),
            };
            match read(message, &self.limits) {
                Inbound::Messages(messages) => {
                    for message in messages {
                        if resolve_answer(&self.session, &message) {
                            continue;
                        }
                        if self.early.len() < EARLY_CAPACITY {
                            self.early.push(message);
                        } else {
                            warn!(
                                during = method,
                                "dropping a message that arrived before registration"
                            );
                        }
                    }
                }
                Inbound::Ping { sequence, payload } => {
                    let _ = self
                        .session
                        .send(Outgoing::Pong { sequence, payload })
                        .await;
                }
                Inbound::Close(frame) => {
                    return Err(AgentError::Connection(format!(
                        "closed during {method}: {}",
                        describe_close(frame.as_ref())
                    )));
                }
                Inbound::Bad(error) => shared.bad_frame(error),
                Inbound::Nothing => {}
            }
        }
    }
}

/// Hands a JSON-RPC answer to the request waiting for it; false when the
/// message is not an answer (a request or notification).
pub(crate) fn resolve_answer(session: &Session, message: &Value) -> bool {
    let Some(id) = message.get("id").filter(|id| !id.is_null()) else {
        return false;
    };
    if message.get("method").is_some() {
        return false;
    }
    let answer = match message.get("error") {
        Some(error) => Err(AgentError::from_rpc_error(error)),
        None => Ok(message.get("result").cloned().unwrap_or(Value::Null)),
    };
    if !session.resolve(id, answer) {
        debug!(%id, "ignoring an answer to no waiting request");
    }
    true
}

/// What one WebSocket message from the gateway amounts to.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// JSON-RPC messages, in the order they came (a batch gives several).
    Messages(Vec<Value>),
    /// A binary ping frame, to be answered with a pong of the same sequence.
    Ping { sequence: u64, payload: Vec<u8> },
    /// The gateway closed the connection.
    Close(Option<CloseFrame>),
    /// A binary frame that does not decode; the reason.
    Bad(String),
    /// Nothing to act on (WebSocket pings, pong frames, empty frames).
    Nothing,
}

/// Decodes one WebSocket message from the gateway, text or binary.
pub(crate) fn read(message: Message, limits: &Limits) -> Inbound {
    match message {
        Message::Text(text) => Inbound::Messages(parse_messages(text.as_bytes())),
        Message::Binary(bytes) => {
            let frame = match frame::decode(&bytes, limits) {
                Ok(frame) => frame,
                Err(err) => return Inbound::Bad(err.to_string()),
            };
            match frame.header.frame_type {
                FrameType::Ping => Inbound::Ping {
                    sequence: frame.header.sequence,
                    payload: frame.messages().next().unwrap_or_default().to_vec(),
                },
                FrameType::Pong => Inbound::Nothing,
                _ => Inbound::Messages(frame.messages().flat_map(parse_messages).collect()),
            }
        }
        Message::Close(frame) => Inbound::Close(frame),
        // WebSocket pings are answered by tungstenite on the next read.
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Inbound::Nothing,
    }
}

/// The JSON-RPC messages in one payload: an object, or a batch array.
fn parse_messages(bytes: &[u8]) -> Vec<Value> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Array(batch)) => batch,
        Ok(message) => vec![message],
        Err(err) => {
            warn!(error = %err, "ignoring a message from the gateway that is not JSON");
            Vec::new()
        }
    }
}

/// The agent's encoding side of one connection.
struct Encoder {
    binary: Arc<AtomicBool>,
    gateway_max_payload: Arc<AtomicUsize>,
    options: EncodeOptions,
    limits: Limits,
    /// The last binary frame's sequence id; frames are numbered from 1.
    sequence: u64,
}

impl Encoder {
    /// The WebSocket message for `out` in the current mode; `None` when
    /// there is nothing to send.
    fn encode(&mut self, out: Outgoing) -> Option<Message> {
        match out {
            Outgoing::Json(text) => {
                if !self.binary.load(Ordering::Acquire) {
                    return Some(Message::text(text));
                }
                let (frame_type, method) = frame::classify(text.as_bytes());
                let sequence = self.sequence + 1;
                let limits = Limits {
                    max_payload: self
                        .limits
                        .max_payload
                        .min(self.gateway_max_payload.load(Ordering::Acquire)),
                    ..self.limits
                };
                match frame::encode(
                    frame_type,
                    method,
                    sequence,
                    text.as_bytes(),
                    &self.options,
                    &limits,
                ) {
                    Ok(bytes) => {
                        self.sequence = sequence;
                        Some(Message::Binary(bytes.into()))
                    }
                    Err(err) => {
                        // The gateway reads text frames in every mode.
                        warn!(error = %err, bytes = text.len(), "message does not fit a binary frame; sending it as text");
                        Some(Message::text(text))
                    }
                }
            }
            Outgoing::Pong { sequence, payload } => {
                match frame::encode(
                    FrameType::Pong,
                    Method::Pong,
                    sequence,
                    &payload,
                    &self.options,
                    &self.limits,
                ) {
                    Ok(bytes) => Some(Message::Binary(bytes.into())),
                    Err(err) => {
                        warn!(error = %err, "cannot answer the gateway's ping frame");
                        None
                    }
                }
            }
            Outgoing::Close(frame) => Some(Message::Close(Some(frame))),
        }
    }
}

/// The writer: sends queued messages in order until the queue closes, a
/// send fails, or a close frame went out.
async fn write_frames(
    mut sink: SplitSink<Ws, Message>,
    mut queue: mpsc::Receiver<Outgoing>,
    mut encoder: Encoder,
) {
    while let Some(out) = queue.recv().await {
        let closing = matches!(out, Outgoing::Close(_));
        if let Some(message) = encoder.encode(out)
            && let Err(err) = sink.send(message).await
        {
            debug!(error = %err, "writing to the gateway failed");
            return;
        }
        if closing {
            return;
        }
    }
}

/// The agent's frame encoding preferences.
fn encode_options(binary: &BinaryOptions) -> EncodeOptions {
    EncodeOptions {
        compress_threshold: binary.compress_threshold,
        checksum: binary.checksum,
        ..EncodeOptions::default()
    }
}

/// The limits for frames from the gateway.
fn limits(binary: &BinaryOptions) -> Limits {
    Limits {
        max_payload: binary.max_payload,
        max_decompressed: binary.max_decompressed,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn encoder(binary: bool, preferences: &BinaryOptions) -> Encoder {
        Encoder {
            binary: Arc::new(AtomicBool::new(binary)),
            gateway_max_payload: Arc::new(AtomicUsize::new(usize::MAX)),
            options: encode_options(preferences),
            limits: limits(preferences),
            sequence: 0,
        }
    }

    fn binary_bytes(message: Option<Message>) -> Vec<u8> {
        match message {
            Some(Message::Binary(bytes)) => bytes.to_vec(),
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }

    #[test]
    fn binary_mode_numbers_classifies_compresses_and_checksums() {
        let preferences = BinaryOptions::default();
        let mut encoder = encoder(true, &preferences);
        let small = json!({"jsonrpc": "2.0", "id": 1, "method": "agent.register", "params": {}});
        let bytes = binary_bytes(encoder.encode(Outgoing::Json(small.to_string())));
        let frame = frame::decode(&bytes, &Limits::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(frame.header.frame_type, FrameType::Request);
        assert_eq!(frame.header.sequence, 1);
        assert!(frame.has_checksum());
        assert!(!frame.is_compressed());

        let big = json!({"jsonrpc": "2.0", "method": "agent.heartbeat", "params": {"pad": "x".repeat(4096)}});
        let bytes = binary_bytes(encoder.encode(Outgoing::Json(big.to_string())));
        let frame = frame::decode(&bytes, &Limits::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(frame.header.frame_type, FrameType::Notification);
        assert_eq!(frame.header.sequence, 2);
        assert!(frame.is_compressed());
        let messages: Vec<&[u8]> = frame.messages().collect();
        assert_eq!(messages, [big.to_string().as_bytes()]);
    }

    #[test]
    fn text_mode_sends_text_and_the_switch_takes_effect_at_once() {
        let mut encoder = encoder(false, &BinaryOptions::default());
        let message = encoder.encode(Outgoing::Json("{}".into()));
        assert!(matches!(message, Some(Message::Text(_))), "{message:?}");
        encoder.binary.store(true, Ordering::Release);
        let message = encoder.encode(Outgoing::Json("{}".into()));
        assert!(matches!(message, Some(Message::Binary(_))), "{message:?}");
    }

    #[test]
    fn a_message_too_large_for_a_frame_goes_out_as_text() {
        let preferences = BinaryOptions {
            compress_threshold: None,
            max_payload: 64,
            ..BinaryOptions::default()
        };
        let mut encoder = encoder(true, &preferences);
        let text = json!({"pad": "y".repeat(100)}).to_string();
        let message = encoder.encode(Outgoing::Json(text));
        assert!(matches!(message, Some(Message::Text(_))), "{message:?}");
        assert_eq!(encoder.sequence, 0, "no frame number was used");
    }

    #[test]
    fn the_gateways_smaller_payload_limit_is_kept() {
        let preferences = BinaryOptions {
            compress_threshold: None,
            ..BinaryOptions::default()
        };
        let mut encoder = encoder(true, &preferences);
        let text = json!({"pad": "y".repeat(2000)}).to_string();
        let fits = encoder.encode(Outgoing::Json(text.clone()));
        assert!(matches!(fits, Some(Message::Binary(_))), "{fits:?}");
        // The gateway reads at most 1024 bytes per frame.
        encoder.gateway_max_payload.store(1024, Ordering::Release);
        let message = encoder.encode(Outgoing::Json(text));
        assert!(matches!(message, Some(Message::Text(_))), "{message:?}");
    }

    #[test]
    fn pong_echoes_the_pings_sequence() {
        let mut encoder = encoder(true, &BinaryOptions::default());
        let bytes = binary_bytes(encoder.encode(Outgoing::Pong {
            sequence: 42,
            payload: b"{}".to_vec(),
        }));
        let frame = frame::decode(&bytes, &Limits::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(frame.header.frame_type, FrameType::Pong);
        assert_eq!(frame.header.sequence, 42);
    }

    #[test]
    fn batches_arrays_pings_and_bad_frames_are_read() {
        let limits = Limits::default();
        let opts = EncodeOptions::default();
        let one = br#"{"jsonrpc":"2.0","method":"a"}"#;
        let two = br#"{"jsonrpc":"2.0","method":"b"}"#;
        let batch = frame::encode_batch(7, &[one, two], &opts, &limits).unwrap_or_default();
        match read(Message::Binary(batch.into()), &limits) {
            Inbound::Messages(messages) => {
                let methods: Vec<&Value> = messages.iter().map(|m| &m["method"]).collect();
                assert_eq!(methods, [&json!("a"), &json!("b")]);
            }
            other => panic!("{other:?}"),
        }
        let array = Message::text(r#"[{"method":"a"},{"method":"b"}]"#);
        assert!(matches!(read(array, &limits), Inbound::Messages(m) if m.len() == 2));
        let ping = frame::encode(FrameType::Ping, Method::Ping, 9, b"{}", &opts, &limits)
            .unwrap_or_default();
        assert!(matches!(
            read(Message::Binary(ping.into()), &limits),
            Inbound::Ping { sequence: 9, .. }
        ));
        let bad = read(
            Message::Binary(b"not a frame at all, really".to_vec().into()),
            &limits,
        );
        assert!(
            matches!(bad, Inbound::Bad(ref e) if e.contains("magic")),
            "{bad:?}"
        );
        let not_json = Message::text("{oops");
        assert!(matches!(read(not_json, &limits), Inbound::Messages(m) if m.is_empty()));
    }
}
