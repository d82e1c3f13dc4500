//! The WebSocket side of the bridge: the gateway's `/mcp/ws`, subprotocol
//! `mcp`, one JSON-RPC message per text frame both ways. The connection is
//! the session, so one task owns it: it sends the client's messages in
//! order and relays every frame the gateway sends.
//!
//! When the connection drops, the requests in flight on it are answered
//! with an error (their answers are lost with the session), and the bridge
//! reconnects with backoff and replays the client's `initialize` (under an
//! id of its own, answer swallowed) and `notifications/initialized` before
//! anything else goes out.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::{StatusCode, Url};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as Frame};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{
    BRIDGE_ERROR, Backoff, Kind, Message, Options, Out, initialized_notification, replay_id,
    replayed_initialize,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The WebSocket subprotocol of MCP.
const SUBPROTOCOL: &str = "mcp";
/// How long the TCP connect, TLS and upgrade may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long answers still in flight may take once stdin has ended.
const EOF_GRACE: Duration = Duration::from_secs(5);

/// Runs the bridge until `input` ends, then closes the connection with 1000.
pub(super) async fn run(options: Options, url: Url, mut input: mpsc::Receiver<Value>, out: Out) {
    let mut link = Link {
        url,
        options,
        out,
        conn: None,
        session_started: false,
        initialize: None,
        initialized: false,
        inflight: HashMap::new(),
        replay_ids: HashSet::new(),
        replays: 0,
        reconnect_at: None,
        backoff: Backoff::new(),
    };
    loop {
        let reconnect_at = link.reconnect_at;
        tokio::select! {
            frame = next_frame(&mut link.conn), if link.conn.is_some() => link.on_frame(frame).await,
            value = input.recv() => match value {
                Some(value) => link.forward(value).await,
                None => break,
            },
            () = sleep_until(reconnect_at), if reconnect_at.is_some() && link.conn.is_none() => {
                link.reconnect_in_background().await;
            }
        }
    }
    link.finish().await;
}

async fn next_frame(conn: &mut Option<Ws>) -> Option<Result<Frame, tungstenite::Error>> {
    match conn {
        Some(ws) => ws.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why a connection attempt failed.
enum ConnectError {
    /// The gateway refused the upgrade (401, 403, ...): retrying will not help.
    Refused {
        code: i64,
        message: String,
        data: Value,
    },
    /// Unreachable, timed out, or a transient 5xx: worth retrying.
    Failed(String),
}

struct Link {
    url: Url,
    options: Options,
    out: Out,
    conn: Option<Ws>,
    /// An `initialize` went out on the current connection.
    session_started: bool,
    /// The client's `initialize`, replayed on every new connection.
    initialize: Option<Value>,
    /// Whether the client has sent `notifications/initialized`.
    initialized: bool,
    /// Client requests sent on the current connection and not yet answered,
    /// by their id's JSON text.
    inflight: HashMap<String, Value>,
    /// Ids of the replayed `initialize` requests whose answers are swallowed.
    replay_ids: HashSet<String>,
    replays: u64,
    /// When to try reconnecting on our own (after a drop).
    reconnect_at: Option<Instant>,
    backoff: Backoff,
}

impl Link {
    /// Sends one client message, connecting first when needed.
    async fn forward(&mut self, value: Value) {
        let message = match Message::classify(value) {
            Ok(m) => m,
            Err(answer) => {
                self.out.send(answer).await;
                return;
            }
        };
        if message.is_initialize() {
            self.initialize = Some(message.value.clone());
            self.initialized = false;
            if self.session_started {
                // One session per connection: a second initialize needs a new one.
                tracing::info!("the client initializes again; opening a new WebSocket for it");
                self.close(CloseCode::Normal, "the client started a new session")
                    .await;
            }
        }
        let deadline = Instant::now() + self.options.retry_for;
        loop {
            if self.conn.is_none()
                && let Err(e) = self.connect(deadline, !message.is_initialize()).await
            {
                self.give_up(&message, e).await;
                return;
            }
            let Some(ws) = self.conn.as_mut() else {
                continue;
            };
            match ws.send(Frame::text(message.value.to_string())).await {
                Ok(()) => break,
                Err(e) => {
                    let why = format!("sending failed ({e})");
                    self.dropped(why.clone()).await;
                    if Instant::now() >= deadline {
                        self.give_up(&message, ConnectError::Failed(why)).await;
                        return;
                    }
                }
            }
        }
        match message.kind {
            Kind::Request => {
                self.inflight
                    .insert(message.id.to_string(), message.id.clone());
            }
            Kind::Notification if message.is_initialized() => self.initialized = true,
            _ => {}
        }
        if message.is_initialize() {
            self.session_started = true;
        }
    }

    /// Connects, retrying until `deadline`; replays the client's session
    /// when `replay` and there is one.
    async fn connect(&mut self, deadline: Instant, replay: bool) -> Result<(), ConnectError> {
        let mut backoff = Backoff::new();
        loop {
            let failure = match self.open().await {
                Ok(ws) => {
                    self.conn = Some(ws);
                    self.reconnect_at = None;
                    self.backoff.reset();
                    tracing::info!(url = %self.url, "WebSocket to the gateway open");
                    if !replay || self.replay().await {
                        return Ok(());
                    }
                    "the connection broke while the session was replayed".to_owned()
                }
                Err(refused @ ConnectError::Refused { .. }) => return Err(refused),
                Err(ConnectError::Failed(why)) => why,
            };
            match backoff.next_before(deadline) {
                Some(wait) => {
                    tracing::warn!(%failure, "reconnecting to the gateway in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    return Err(ConnectError::Failed(format!(
                        "{failure}; gave up after {} s. Check that the gateway at {} is running and reachable (meshgate stdio retries for --retry-for-secs), then retry",
                        self.options.retry_for.as_secs(),
                        self.url
                    )));
                }
            }
        }
    }

    /// One connection attempt.
    async fn open(&self) -> Result<Ws, ConnectError> {
        let mut request =
            self.url.as_str().into_client_request().map_err(|e| {
                ConnectError::Failed(format!("cannot build the upgrade request: {e}"))
            })?;
        let headers = request.headers_mut();
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        for (name, value) in &self.options.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_str().as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) {
                headers.append(name, value);
            }
        }
        let attempt =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request)).await;
        match attempt {
            Err(_) => Err(ConnectError::Failed(format!(
                "cannot reach the gateway at {} (no WebSocket upgrade within {CONNECT_TIMEOUT:?})",
                self.url
            ))),
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(tungstenite::Error::Http(response))) => {
                let status = StatusCode::from_u16(response.status().as_u16())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                let body = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                if super::http::is_retryable(status) {
                    return Err(ConnectError::Failed(format!(
                        "the gateway answered the WebSocket upgrade with HTTP {status}"
                    )));
                }
                let (code, message, data) = super::http::http_error(status, &body);
                Err(ConnectError::Refused {
                    code,
                    message,
                    data,
                })
            }
            Ok(Err(e)) => Err(ConnectError::Failed(format!(
                "cannot reach the gateway at {} ({e})",
                self.url
            ))),
        }
    }

    /// Opens the client's session again on the new connection: its
    /// `initialize` under an id of ours, then `notifications/initialized` if
    /// the client had sent it. False when the connection broke meanwhile.
    async fn replay(&mut self) -> bool {
        let Some(initialize) = self.initialize.clone() else {
            return true;
        };
        self.replays += 1;
        let id = replay_id(self.replays);
        let mut frames = vec![replayed_initialize(&initialize, &id)];
        if self.initialized {
            frames.push(initialized_notification());
        }
        self.replay_ids.insert(id);
        self.session_started = true;
        for frame in frames {
            let Some(ws) = self.conn.as_mut() else {
                return false;
            };
            if let Err(e) = ws.send(Frame::text(frame.to_string())).await {
                self.dropped(format!("sending failed ({e})")).await;
                return false;
            }
        }
        tracing::info!(
            "MCP session opened again on the new WebSocket by replaying the client's initialize"
        );
        true
    }

    /// A reconnection attempt of our own, after the connection dropped.
    async fn reconnect_in_background(&mut self) {
        self.reconnect_at = None;
        match self.open().await {
            Ok(ws) => {
                self.conn = Some(ws);
                self.backoff.reset();
                tracing::info!(url = %self.url, "WebSocket to the gateway open again");
                self.replay().await;
            }
            Err(ConnectError::Refused { message, .. }) => {
                tracing::error!(
                    "reconnecting failed: {message}; trying again with the next message from the client"
                );
            }
            Err(ConnectError::Failed(why)) => {
                let wait = self.backoff.next_wait();
                tracing::warn!(failure = %why, "reconnecting to the gateway in {wait:?}");
                self.reconnect_at = Some(Instant::now() + wait);
            }
        }
    }

    /// Relays one frame from the gateway.
    async fn on_frame(&mut self, frame: Option<Result<Frame, tungstenite::Error>>) {
        match frame {
            Some(Ok(Frame::Text(text))) => {
                let value = match serde_json::from_str::<Value>(text.as_str()) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "a frame from the gateway is not JSON; dropped");
                        return;
                    }
                };
                if value.get("method").is_none()
                    && let Some(id) = value.get("id")
                {
                    if let Some(own) = id.as_str()
                        && self.replay_ids.remove(own)
                    {
                        if let Some(error) = value.get("error") {
                            tracing::error!(%error, "the gateway refused the replayed initialize");
                        }
                        return;
                    }
                    self.inflight.remove(&id.to_string());
                }
                self.out.send(value).await;
            }
            Some(Ok(Frame::Binary(_))) => {
                tracing::warn!("the gateway sent a binary frame; MCP uses text frames; dropped");
            }
            Some(Ok(Frame::Close(close))) => {
                let why = match close {
                    Some(c) => format!(
                        "the gateway closed it with {} ({})",
                        u16::from(c.code),
                        c.reason
                    ),
                    None => "the gateway closed it".to_owned(),
                };
                self.dropped(why).await;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => self.dropped(format!("the connection broke ({e})")).await,
            None => self.dropped("the connection ended".to_owned()).await,
        }
    }

    /// Forgets the connection, answers what was in flight on it, and plans a
    /// reconnection when there is a session to restore.
    async fn dropped(&mut self, why: String) {
        self.conn = None;
        self.session_started = false;
        self.replay_ids.clear();
        tracing::warn!("WebSocket to the gateway lost: {why}");
        let lost: Vec<Value> = self.inflight.drain().map(|(_, id)| id).collect();
        for id in lost {
            let text = format!(
                "meshgate stdio: the WebSocket to the gateway was lost while this request was in flight ({why}); the gateway may or may not have carried it out: retry it if that is safe"
            );
            let data = serde_json::json!({"gateway": self.url.as_str()});
            self.out.error(&id, BRIDGE_ERROR, text, Some(data)).await;
        }
        if self.initialize.is_some() {
            let wait = self.backoff.next_wait();
            tracing::info!("reconnecting to the gateway in {wait:?}");
            self.reconnect_at = Some(Instant::now() + wait);
        }
    }

    /// Tells the client that `message` could not be sent.
    async fn give_up(&mut self, message: &Message, e: ConnectError) {
        let (code, text, data) = match e {
            // The gateway's own answer, as over HTTP.
            ConnectError::Refused {
                code,
                message,
                data,
            } => (code, message, data),
            ConnectError::Failed(why) => (
                BRIDGE_ERROR,
                format!("meshgate stdio: {} failed: {why}", message.method),
                serde_json::json!({"gateway": self.url.as_str()}),
            ),
        };
        tracing::error!(what = %message.describe(), "{text}");
        if message.kind == Kind::Request {
            self.out.error(&message.id, code, text, Some(data)).await;
        }
    }

    /// Sends a close frame and waits briefly for the gateway's answer.
    async fn close(&mut self, code: CloseCode, reason: &str) {
        let Some(mut ws) = self.conn.take() else {
            return;
        };
        self.session_started = false;
        let frame = CloseFrame {
            code,
            reason: reason.to_owned().into(),
        };
        if ws.close(Some(frame)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        }
    }

    /// At the end of stdin: lets the answers in flight arrive (for a while),
    /// then closes with 1000.
    async fn finish(&mut self) {
        self.reconnect_at = None;
        let deadline = Instant::now() + EOF_GRACE;
        while !self.inflight.is_empty() && self.conn.is_some() {
            match tokio::time::timeout_at(deadline, next_frame(&mut self.conn)).await {
                Ok(frame) => self.on_frame(frame).await,
                Err(_) => {
                    tracing::warn!(
                        "stdin ended with answers still outstanding after {EOF_GRACE:?}; abandoning them"
                    );
                    break;
                }
            }
        }
        self.reconnect_at = None;
        self.close(CloseCode::Normal, "the client ended the session")
            .await;
    }
}
