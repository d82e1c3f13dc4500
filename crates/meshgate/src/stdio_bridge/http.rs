//! The Streamable HTTP side of the bridge (MCP 2025-06-18 / 2025-11-25).
//!
//! Every client message is one `POST`, sent in stdin order: the next one goes
//! out once the gateway has answered the previous one's headers (or has been
//! working on it for [`ORDER_WINDOW`]), and each answer (JSON or an SSE
//! stream) is read by a task of its own, so a long call never holds up the
//! messages behind it. After `notifications/initialized` a `GET` stream
//! carries what the gateway sends on its own; it is reopened with
//! `Last-Event-ID` whenever it drops. A `POST` stream that breaks before the
//! answer is resumed the same way. A 404 for the session makes the bridge
//! replay the client's `initialize` and retry.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use meshgate_protocol::sse::{SseEvent, SseParser};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Response, StatusCode, Url};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{
    BRIDGE_ERROR, Backoff, Kind, Message, Options, Out, answers, initialized_notification,
    replay_id, replayed_initialize,
};

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
const LAST_EVENT_ID: &str = "last-event-id";
const ACCEPT_POST: &str = "application/json, text/event-stream";
const EVENT_STREAM: &str = "text/event-stream";

/// How long a `POST` may go without response headers before the next
/// message is sent anyway (the gateway has it and is working on it; with
/// `mcp.json_response` the headers only come with the answer).
const ORDER_WINDOW: Duration = Duration::from_millis(500);
/// How long a TCP (and TLS) connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long answers still in flight may take once stdin has ended.
const EOF_GRACE: Duration = Duration::from_secs(5);
/// How much of an error body is read.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// How often in a row one message may find its session gone.
const MAX_REINITS_PER_MESSAGE: u32 = 2;
/// Resumed answer streams in a row that may bring nothing before giving up.
const MAX_EMPTY_RESUMES: u32 = 2;

/// Runs the bridge until `input` ends, then ends the session.
pub(super) async fn run(
    options: Options,
    url: Url,
    mut input: mpsc::Receiver<Value>,
    out: Out,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .default_headers(options.headers.clone())
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(Duration::from_secs(30))
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
    let link = Arc::new(Link {
        client,
        url,
        out,
        retry_for: options.retry_for,
        state: Mutex::new(State::default()),
        reinit: tokio::sync::Mutex::new(()),
    });
    let mut posts = JoinSet::new();
    let mut listener: Option<tokio::task::JoinHandle<()>> = None;
    while let Some(value) = input.recv().await {
        let message = match Message::classify(value) {
            Ok(m) => m,
            Err(answer) => {
                link.out.send(answer).await;
                continue;
            }
        };
        if message.is_initialize() || message.is_initialized() {
            // The session is settled before anything else goes out.
            let initialized = message.is_initialized();
            link.clone().deliver(message, None).await;
            if initialized && listener.is_none() {
                listener = Some(tokio::spawn(link.clone().listen()));
            }
            continue;
        }
        let (sent, on_its_way) = oneshot::channel();
        posts.spawn(link.clone().deliver(message, Some(sent)));
        let _ = on_its_way.await;
        while posts.try_join_next().is_some() {}
    }
    if let Some(listener) = listener {
        listener.abort();
    }
    let drained = tokio::time::timeout(EOF_GRACE, async {
        while posts.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "stdin ended with answers still outstanding after {EOF_GRACE:?}; abandoning them"
        );
        posts.abort_all();
    }
    link.end_session().await;
    Ok(())
}

/// What the bridge knows of the MCP session.
#[derive(Default)]
struct State {
    /// `Mcp-Session-Id` from the last `initialize` answer.
    session: Option<String>,
    /// The protocol version that `initialize` negotiated.
    protocol_version: Option<String>,
    /// Counts sessions: a message that found session `g` gone asks for a
    /// new one only if no one has made one since.
    generation: u64,
    /// The client's `initialize`, replayed to open a new session.
    initialize: Option<Value>,
    /// Whether the client has sent `notifications/initialized`.
    initialized: bool,
    /// Replays so far (for their ids).
    replays: u64,
}

/// The session as one request saw it.
#[derive(Clone)]
struct Snapshot {
    session: Option<String>,
    protocol_version: Option<String>,
    generation: u64,
}

/// The connection to the gateway, shared by the tasks of the bridge.
struct Link {
    client: reqwest::Client,
    url: Url,
    out: Out,
    retry_for: Duration,
    state: Mutex<State>,
    /// Held while a new session is opened, so only one is.
    reinit: tokio::sync::Mutex<()>,
}

impl Link {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn snapshot(&self) -> Snapshot {
        let st = self.state();
        Snapshot {
            session: st.session.clone(),
            protocol_version: st.protocol_version.clone(),
            generation: st.generation,
        }
    }

    /// A request with the session headers of `snap`.
    fn request(&self, method: reqwest::Method, snap: &Snapshot) -> reqwest::RequestBuilder {
        let mut b = self.client.request(method, self.url.clone());
        if let Some(s) = &snap.session {
            b = b.header(SESSION_HEADER, s);
        }
        if let Some(v) = &snap.protocol_version {
            b = b.header(VERSION_HEADER, v);
        }
        b
    }

    fn post(&self, body: &Value, snap: &Snapshot) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST, snap)
            .header(ACCEPT, ACCEPT_POST)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string())
    }

    /// Sends one client message and relays its answer; retries while the
    /// gateway is unreachable, opens a new session when it has forgotten
    /// this one, and answers the client with an error when it gives up.
    /// `sent` fires once the message is on its way.
    async fn deliver(self: Arc<Self>, message: Message, mut sent: Option<oneshot::Sender<()>>) {
        if message.is_initialize() {
            let mut st = self.state();
            st.initialize = Some(message.value.clone());
            st.session = None;
            st.protocol_version = None;
            st.initialized = false;
            st.generation += 1;
        }
        let deadline = Instant::now() + self.retry_for;
        let mut backoff = Backoff::new();
        let mut reinits = 0;
        loop {
            let snap = if message.is_initialize() {
                Snapshot {
                    session: None,
                    protocol_version: None,
                    generation: self.snapshot().generation,
                }
            } else {
                self.snapshot()
            };
            let failure = match send_marking(self.post(&message.value, &snap), &mut sent).await {
                Err(e) => unreachable_gateway(&self.url, &e),
                Ok(r) if is_retryable(r.status()) => {
                    let status = r.status();
                    format!("the gateway answered HTTP {status}{}", body_hint(r).await)
                }
                Ok(r)
                    if r.status() == StatusCode::NOT_FOUND
                        && snap.session.is_some()
                        && reinits < MAX_REINITS_PER_MESSAGE =>
                {
                    reinits += 1;
                    tracing::warn!(
                        session = %snap.session.as_deref().unwrap_or(""),
                        what = %message.describe(),
                        "the gateway does not know the session (it expired or was ended); opening a new one"
                    );
                    match self.reinitialize(snap.generation).await {
                        Ok(()) => continue,
                        Err(e) => e,
                    }
                }
                Ok(r) => {
                    mark(&mut sent);
                    self.take_answer(&message, r, &snap).await;
                    return;
                }
            };
            match backoff.next_before(deadline) {
                Some(wait) => {
                    tracing::warn!(what = %message.describe(), %failure, "reconnecting in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    mark(&mut sent);
                    let why = format!(
                        "{failure}; gave up after {} s. Check that the gateway at {} is running and reachable (meshgate stdio retries for --retry-for-secs), then retry",
                        self.retry_for.as_secs(),
                        self.url
                    );
                    self.give_up(&message, why).await;
                    return;
                }
            }
        }
    }

    /// Relays the gateway's answer to `message`.
    async fn take_answer(&self, message: &Message, r: Response, snap: &Snapshot) {
        let status = r.status();
        if !status.is_success() {
            let body = read_limited(r).await;
            match message.kind {
                Kind::Request => {
                    let (code, text, data) = http_error(status, &body);
                    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                        tracing::warn!(what = %message.describe(), %status, "the gateway refused it: {text}");
                    } else {
                        tracing::info!(what = %message.describe(), %status, "the gateway refused it: {text}");
                    }
                    self.out.error(&message.id, code, text, Some(data)).await;
                }
                _ => tracing::warn!(
                    what = %message.describe(),
                    %status,
                    body = %body.trim(),
                    "the gateway refused it"
                ),
            }
            return;
        }
        if message.is_initialize() {
            let session = header(&r, SESSION_HEADER);
            tracing::info!(
                session = %session.as_deref().unwrap_or("(none)"),
                "MCP session opened"
            );
            self.state().session = session;
        }
        if message.is_initialized() {
            self.state().initialized = true;
        }
        let content_type = header(&r, CONTENT_TYPE.as_str()).unwrap_or_default();
        if content_type.starts_with(EVENT_STREAM) {
            self.read_answer_stream(message, r, snap).await;
            return;
        }
        let bytes = match r.bytes().await {
            Ok(b) => b,
            Err(e) => {
                let why = format!(
                    "the connection to the gateway broke while its answer was read ({}); the request may or may not have been carried out: retry it if that is safe",
                    chain(&e)
                );
                self.give_up(message, why).await;
                return;
            }
        };
        let mut answered = false;
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Array(items)) => {
                    for item in items {
                        answered |= self.relay(item, message).await;
                    }
                }
                Ok(value) => answered = self.relay(value, message).await,
                Err(e) => {
                    tracing::warn!(error = %e, %content_type, "the gateway's answer is not JSON; dropped")
                }
            }
        }
        if message.kind == Kind::Request && !answered {
            let why = format!(
                "the gateway accepted it (HTTP {status}, {:?}) but sent no answer",
                content_type
            );
            self.give_up(message, why).await;
        }
    }

    /// Relays an SSE answer until the response to `message`, resuming the
    /// stream with `GET` + `Last-Event-ID` when it breaks off first.
    async fn read_answer_stream(&self, message: &Message, r: Response, snap: &Snapshot) {
        let wants_answer = message.kind == Kind::Request;
        let mut parser = SseParser::new();
        let mut body = r.bytes_stream();
        let mut empty_resumes = 0;
        loop {
            let mut got_bytes = false;
            let mut broke = "the gateway ended the stream".to_owned();
            while let Some(chunk) = body.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        broke = format!("the connection broke ({})", chain(&e));
                        break;
                    }
                };
                got_bytes |= !chunk.is_empty();
                let events = match parser.push(&chunk) {
                    Ok(events) => events,
                    Err(too_large) => {
                        // Not resumed: the gateway would replay the same event.
                        let why = format!(
                            "the gateway sent {too_large} (the most the bridge reads); the bridge closed the stream, and the request may or may not have been carried out"
                        );
                        self.give_up(message, why).await;
                        return;
                    }
                };
                for event in events {
                    if let Some(value) = event_message(&event)
                        && self.relay(value, message).await
                        && wants_answer
                    {
                        return;
                    }
                }
            }
            if !wants_answer {
                return;
            }
            empty_resumes = if got_bytes { 0 } else { empty_resumes + 1 };
            let Some(last_id) = parser.last_event_id().map(str::to_owned) else {
                let why = format!(
                    "{broke} before the answer, with no event id to resume from; the request may or may not have been carried out: retry it if that is safe"
                );
                self.give_up(message, why).await;
                return;
            };
            if empty_resumes > MAX_EMPTY_RESUMES {
                let why = "the answer stream broke off and the gateway cannot replay it (it restarted or forgot the stream); the request may or may not have been carried out: retry it if that is safe".to_owned();
                self.give_up(message, why).await;
                return;
            }
            let wait = parser
                .retry()
                .unwrap_or(Duration::from_millis(100))
                .min(Duration::from_secs(30));
            tracing::info!(
                what = %message.describe(),
                last_event_id = %last_id,
                "{broke} before the answer; resuming it with Last-Event-ID in {wait:?}"
            );
            tokio::time::sleep(wait).await;
            match self.resume(snap, &last_id).await {
                Ok(r) => {
                    body = r.bytes_stream();
                    parser = parser.resumed();
                }
                Err(failure) => {
                    let why = format!(
                        "{broke} before the answer and resuming failed: {failure}; the request may or may not have been carried out: retry it if that is safe"
                    );
                    self.give_up(message, why).await;
                    return;
                }
            }
        }
    }

    /// `GET` with `Last-Event-ID`, retried while the gateway is unreachable.
    async fn resume(&self, snap: &Snapshot, last_id: &str) -> Result<Response, String> {
        let deadline = Instant::now() + self.retry_for;
        let mut backoff = Backoff::new();
        loop {
            let request = self
                .request(reqwest::Method::GET, snap)
                .header(ACCEPT, EVENT_STREAM)
                .header(LAST_EVENT_ID, last_id);
            let failure = match request.send().await {
                Err(e) => unreachable_gateway(&self.url, &e),
                Ok(r) if r.status().is_success() => return Ok(r),
                Ok(r) if is_retryable(r.status()) => {
                    let status = r.status();
                    format!("the gateway answered HTTP {status}{}", body_hint(r).await)
                }
                Ok(r) => {
                    let status = r.status();
                    return Err(format!(
                        "the gateway answered the resumption with HTTP {status}{}",
                        body_hint(r).await
                    ));
                }
            };
            match backoff.next_before(deadline) {
                Some(wait) => {
                    tracing::warn!(%failure, "resuming a stream: reconnecting in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(failure),
            }
        }
    }

    /// Keeps the server-to-client `GET` stream open: reconnects with backoff
    /// and `Last-Event-ID`; stops for good on 405 (the gateway offers none).
    async fn listen(self: Arc<Self>) {
        let mut backoff = Backoff::new();
        // The last event id seen, with the session generation it belongs to.
        let mut last: Option<(u64, String)> = None;
        loop {
            let snap = self.snapshot();
            let mut request = self
                .request(reqwest::Method::GET, &snap)
                .header(ACCEPT, EVENT_STREAM);
            if let Some((generation, id)) = &last
                && *generation == snap.generation
            {
                request = request.header(LAST_EVENT_ID, id.as_str());
            }
            let mut wait = None;
            let failure = match request.send().await {
                Err(e) => unreachable_gateway(&self.url, &e),
                Ok(r) if r.status() == StatusCode::METHOD_NOT_ALLOWED => {
                    tracing::info!(
                        "the gateway offers no server-to-client stream (GET answered 405); its own messages arrive with the answers to requests only"
                    );
                    return;
                }
                Ok(r) if r.status() == StatusCode::NOT_FOUND && snap.session.is_some() => {
                    tracing::warn!(
                        session = %snap.session.as_deref().unwrap_or(""),
                        "the gateway does not know the session (it expired or was ended); opening a new one"
                    );
                    // Reconnect after the usual wait either way, so that a
                    // gateway that keeps answering 404 is not asked in a loop.
                    match self.reinitialize(snap.generation).await {
                        Ok(()) => "the session was gone; a new one is open".to_owned(),
                        Err(e) => e,
                    }
                }
                Ok(r) if r.status().is_success() => {
                    tracing::debug!(
                        session = %snap.session.as_deref().unwrap_or(""),
                        "server-to-client stream open"
                    );
                    let opened = Instant::now();
                    let mut parser = SseParser::new();
                    let mut delivered = false;
                    let mut body = r.bytes_stream();
                    let mut why = "the gateway ended it".to_owned();
                    while let Some(chunk) = body.next().await {
                        let chunk = match chunk {
                            Ok(c) => c,
                            Err(e) => {
                                why = format!("the connection broke ({})", chain(&e));
                                break;
                            }
                        };
                        let events = match parser.push(&chunk) {
                            Ok(events) => events,
                            Err(too_large) => {
                                why = format!(
                                    "the gateway sent {too_large} (the most the bridge reads); the bridge closed it"
                                );
                                break;
                            }
                        };
                        for event in events {
                            if let Some(value) = event_message(&event) {
                                delivered = true;
                                self.out.send(value).await;
                            }
                        }
                        if let Some(id) = parser.last_event_id() {
                            last = Some((snap.generation, id.to_owned()));
                        }
                    }
                    if delivered || opened.elapsed() >= Duration::from_secs(1) {
                        backoff.reset();
                    }
                    wait = parser.retry();
                    format!("server-to-client stream lost: {why}")
                }
                Ok(r) => {
                    let status = r.status();
                    format!(
                        "the gateway answered the server-to-client stream's GET with HTTP {status}{}",
                        body_hint(r).await
                    )
                }
            };
            let wait = wait.unwrap_or_else(|| backoff.next_wait());
            tracing::warn!(%failure, "reconnecting the server-to-client stream in {wait:?}");
            tokio::time::sleep(wait).await;
        }
    }

    /// Opens a new session by replaying the client's `initialize` (unless
    /// one was opened since session `failed` was found gone).
    async fn reinitialize(&self, failed: u64) -> Result<(), String> {
        let _one_at_a_time = self.reinit.lock().await;
        let (initialize, initialized, n) = {
            let mut st = self.state();
            if st.generation != failed {
                return Ok(());
            }
            let Some(initialize) = st.initialize.clone() else {
                return Err("the gateway does not know the session and the client has not sent initialize through this bridge; restart the client".into());
            };
            st.replays += 1;
            (initialize, st.initialized, st.replays)
        };
        let id = replay_id(n);
        let fresh = Snapshot {
            session: None,
            protocol_version: None,
            generation: failed,
        };
        let r = self
            .post(&replayed_initialize(&initialize, &id), &fresh)
            .send()
            .await
            .map_err(|e| unreachable_gateway(&self.url, &e))?;
        let status = r.status();
        if !status.is_success() {
            return Err(format!(
                "the gateway refused the replayed initialize with HTTP {status}{}",
                body_hint(r).await
            ));
        }
        let session = header(&r, SESSION_HEADER);
        let answer = read_single_answer(r, &Value::String(id)).await?;
        if let Some(error) = answer.get("error") {
            return Err(format!(
                "the gateway refused the replayed initialize: {error}"
            ));
        }
        let version = answer
            .pointer("/result/protocolVersion")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let snap = Snapshot {
            session: session.clone(),
            protocol_version: version.clone(),
            generation: failed,
        };
        if initialized {
            let r = self
                .post(&initialized_notification(), &snap)
                .send()
                .await
                .map_err(|e| unreachable_gateway(&self.url, &e))?;
            if !r.status().is_success() {
                let status = r.status();
                return Err(format!(
                    "the gateway refused the replayed notifications/initialized with HTTP {status}{}",
                    body_hint(r).await
                ));
            }
        }
        {
            let mut st = self.state();
            st.session = session.clone();
            st.protocol_version = version;
            st.generation += 1;
        }
        tracing::info!(
            session = %session.as_deref().unwrap_or("(none)"),
            "MCP session opened again by replaying the client's initialize"
        );
        Ok(())
    }

    /// Relays one message from the gateway; true when it answers `to`.
    async fn relay(&self, value: Value, to: &Message) -> bool {
        let is_answer = to.kind == Kind::Request && answers(&value, &to.id);
        if is_answer && to.is_initialize() {
            let version = value
                .pointer("/result/protocolVersion")
                .and_then(Value::as_str)
                .map(str::to_owned);
            self.state().protocol_version = version;
        }
        self.out.send(value).await;
        is_answer
    }

    /// Tells the client that `message` failed (a request gets an error
    /// answer; anything else can only be logged).
    async fn give_up(&self, message: &Message, why: String) {
        tracing::error!(what = %message.describe(), "{why}");
        if message.kind == Kind::Request {
            let text = format!("meshgate stdio: {} failed: {why}", message.method);
            let data = json!({"gateway": self.url.as_str()});
            self.out
                .error(&message.id, BRIDGE_ERROR, text, Some(data))
                .await;
        }
    }

    /// `DELETE` for the session, best effort.
    async fn end_session(&self) {
        let snap = self.snapshot();
        let Some(session) = snap.session.clone() else {
            return;
        };
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            self.request(reqwest::Method::DELETE, &snap).send(),
        )
        .await;
        match sent {
            Ok(Ok(r)) => tracing::info!(%session, status = %r.status(), "MCP session ended"),
            Ok(Err(e)) => tracing::warn!(%session, error = %e, "could not end the MCP session"),
            Err(_) => tracing::warn!(%session, "could not end the MCP session in 2 s"),
        }
    }
}

/// Sends `request`; fires `sent` as soon as the headers are back or the
/// gateway has had the request for [`ORDER_WINDOW`].
async fn send_marking(
    request: reqwest::RequestBuilder,
    sent: &mut Option<oneshot::Sender<()>>,
) -> reqwest::Result<Response> {
    let response = request.send();
    tokio::pin!(response);
    if sent.is_some() {
        tokio::select! {
            r = &mut response => return r,
            () = tokio::time::sleep(ORDER_WINDOW) => mark(sent),
        }
    }
    response.await
}

fn mark(sent: &mut Option<oneshot::Sender<()>>) {
    if let Some(tx) = sent.take() {
        let _ = tx.send(());
    }
}

/// Statuses worth retrying: the gateway (or a proxy before it) is down,
/// restarting or overloaded.
pub(super) fn is_retryable(status: StatusCode) -> bool {
    status.is_server_error()
        && status != StatusCode::NOT_IMPLEMENTED
        && status != StatusCode::HTTP_VERSION_NOT_SUPPORTED
}

fn unreachable_gateway(url: &Url, e: &reqwest::Error) -> String {
    format!("cannot reach the gateway at {url} ({})", chain(e))
}

/// An error with its causes, `outer: inner: root`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn header(r: &Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The body of an error answer, at most [`ERROR_BODY_LIMIT`] bytes.
async fn read_limited(r: Response) -> String {
    let mut body = Vec::new();
    let mut stream = r.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = ERROR_BODY_LIMIT - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= ERROR_BODY_LIMIT {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// `: <the gateway's message>` for logs, or nothing.
async fn body_hint(r: Response) -> String {
    let body = read_limited(r).await;
    let (_, message) = gateway_message(&body);
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// The JSON-RPC code (if any) and the message of an error body: a JSON-RPC
/// error, the gateway's `{"error": {"message"}}`, or plain text.
fn gateway_message(body: &str) -> (Option<i64>, String) {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        let text: String = body.trim().chars().take(500).collect();
        return (None, text);
    };
    let code = v.pointer("/error/code").and_then(Value::as_i64);
    let message = v
        .pointer("/error/message")
        .or_else(|| v.get("error").filter(|e| e.is_string()))
        .or_else(|| v.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string());
    (code, message)
}

/// The JSON-RPC error for a request the gateway refused with `status`.
pub(super) fn http_error(status: StatusCode, body: &str) -> (i64, String, Value) {
    let (code, message) = gateway_message(body);
    let hint = match status {
        StatusCode::UNAUTHORIZED => {
            " (the gateway did not accept the credential: check --key or MESHGATE_KEY)"
        }
        StatusCode::FORBIDDEN => " (the key lacks a scope or tenant this needs)",
        StatusCode::TOO_MANY_REQUESTS => " (rate limited: wait and retry)",
        _ => "",
    };
    let message = if message.is_empty() {
        format!("the gateway answered HTTP {status}{hint}")
    } else {
        format!("the gateway answered HTTP {status}: {message}{hint}")
    };
    let detail = serde_json::from_str::<Value>(body).unwrap_or_else(|_| Value::String(body.into()));
    (
        code.unwrap_or(BRIDGE_ERROR),
        message,
        json!({"httpStatus": status.as_u16(), "gateway": detail}),
    )
}

/// The JSON message an SSE event carries, if it carries one.
fn event_message(event: &SseEvent) -> Option<Value> {
    if event.data.trim().is_empty() {
        return None;
    }
    match serde_json::from_str::<Value>(&event.data) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, id = event.id.as_deref().unwrap_or(""), "an SSE event from the gateway is not JSON; dropped");
            None
        }
    }
}

/// Reads a JSON or SSE answer until the response to `id`; everything else in
/// it is dropped (it belongs to the bridge's own request).
async fn read_single_answer(r: Response, id: &Value) -> Result<Value, String> {
    let is_sse = header(&r, CONTENT_TYPE.as_str()).is_some_and(|ct| ct.starts_with(EVENT_STREAM));
    if !is_sse {
        let bytes = r
            .bytes()
            .await
            .map_err(|e| format!("reading the answer to the replayed initialize failed: {e}"))?;
        let items = match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Array(items)) => items,
            Ok(v) => vec![v],
            Err(e) => {
                return Err(format!(
                    "the answer to the replayed initialize is not JSON: {e}"
                ));
            }
        };
        return items
            .into_iter()
            .find(|v| answers(v, id))
            .ok_or_else(|| "the gateway did not answer the replayed initialize".to_owned());
    }
    let mut parser = SseParser::new();
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk
            .map_err(|e| format!("reading the answer to the replayed initialize failed: {e}"))?;
        let events = parser.push(&chunk).map_err(|too_large| {
            format!("the gateway answered the replayed initialize with {too_large} (the most the bridge reads)")
        })?;
        for event in events {
            if let Some(v) = event_message(&event)
                && answers(&v, id)
            {
                return Ok(v);
            }
        }
    }
    Err("the gateway's stream ended before it answered the replayed initialize".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_errors_carry_the_gateway_message_and_status() {
        let (code, message, data) = http_error(
            StatusCode::UNAUTHORIZED,
            r#"{"error":{"reason":"invalid_key","message":"the API key is not valid"}}"#,
        );
        assert_eq!(code, BRIDGE_ERROR);
        assert!(
            message.contains("401")
                && message.contains("the API key is not valid")
                && message.contains("--key"),
            "{message}"
        );
        assert_eq!(data["httpStatus"], 401);
        let (code, message, _) = http_error(
            StatusCode::BAD_REQUEST,
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"bad envelope"}}"#,
        );
        assert_eq!(code, -32600);
        assert!(message.ends_with("bad envelope"), "{message}");
        let (_, message, data) = http_error(StatusCode::FORBIDDEN, "plain words\n");
        assert!(
            message.contains("403 Forbidden: plain words (the key lacks"),
            "{message}"
        );
        assert_eq!(data["gateway"], "plain words\n");
    }

    #[test]
    fn only_transient_server_errors_are_retried() {
        assert!(is_retryable(StatusCode::BAD_GATEWAY));
        assert!(is_retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!is_retryable(StatusCode::NOT_IMPLEMENTED));
        assert!(!is_retryable(StatusCode::NOT_FOUND));
        assert!(!is_retryable(StatusCode::UNAUTHORIZED));
    }
}
