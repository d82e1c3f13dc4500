//! The agent's connection loop: connect, register, serve the connection
//! until it ends, reconnect with backoff, and shut down gracefully.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::UrlError;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::rpc::{Session, error_frame, request_frame, result_frame};
use crate::table::{Refusal, TaskTable};
use crate::{AgentError, AgentEvent, AgentOptions, Task, TaskHandler, codes, driver};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Events kept for slow observers before the oldest are dropped.
const EVENT_CAPACITY: usize = 1024;
/// Frames queued for the writer; senders wait when it is full.
const OUTGOING_CAPACITY: usize = 256;
/// Used when the register answer names no heartbeat interval.
const DEFAULT_HEARTBEAT_SECS: u64 = 15;
/// How long a closing handshake may take.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Upper bound for delivering the failures of handlers aborted at the end
/// of shutdown's grace.
const FINAL_DELIVERY_WAIT: Duration = Duration::from_secs(10);
/// How long `run` waits for its background tasks before it returns.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// State that outlives a connection, shared by the connection loop, the
/// task drivers and the handlers' contexts.
pub(crate) struct Shared {
    pub(crate) opts: AgentOptions,
    pub(crate) events: broadcast::Sender<AgentEvent>,
    pub(crate) tasks: TaskTable,
    /// The registered connection, if there is one.
    pub(crate) sessions: watch::Sender<Option<Arc<Session>>>,
    /// The agent's configuration as the gateway last sent it.
    pub(crate) config: watch::Sender<Value>,
    /// Fired when `run` ends, so drivers stop waiting for a connection.
    pub(crate) stopped: CancellationToken,
    /// Drivers, handlers and one-off sends, awaited before `run` returns.
    pub(crate) tracker: TaskTracker,
}

impl Shared {
    pub(crate) fn emit(&self, event: AgentEvent) {
        // No receiver is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    /// The registered connection, if it is still open.
    pub(crate) fn current_session(&self) -> Option<Arc<Session>> {
        self.sessions.borrow().clone().filter(|s| !s.is_closed())
    }

    /// Waits for an open registered connection; `None` once the agent stops.
    pub(crate) async fn wait_for_session(&self) -> Option<Arc<Session>> {
        let mut sessions = self.sessions.subscribe();
        loop {
            if self.stopped.is_cancelled() {
                return None;
            }
            let current = sessions.borrow_and_update().clone();
            if let Some(session) = current.filter(|s| !s.is_closed()) {
                return Some(session);
            }
            tokio::select! {
                changed = sessions.changed() => changed.ok()?,
                () = self.stopped.cancelled() => return None,
            }
        }
    }

    fn load(&self) -> f64 {
        self.tasks.len() as f64 / f64::from(self.opts.max_concurrent_tasks.max(1))
    }
}

/// An agent of the mesh: create it with [`Agent::new`], subscribe to
/// [`events`](Agent::events) if you want them, then [`run`](Agent::run) it.
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    /// An agent with these options (checked when it runs).
    pub fn new(options: AgentOptions) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let config = options.config.clone();
        Self {
            shared: Arc::new(Shared {
                opts: options,
                events,
                tasks: TaskTable::new(),
                sessions: watch::Sender::new(None),
                config: watch::Sender::new(config),
                stopped: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        }
    }

    /// The agent's options.
    pub fn options(&self) -> &AgentOptions {
        &self.shared.opts
    }

    /// A receiver of what happens from now on. A receiver that falls more
    /// than 1024 events behind loses the oldest (`RecvError::Lagged`).
    pub fn events(&self) -> broadcast::Receiver<AgentEvent> {
        self.shared.events.subscribe()
    }

    /// Connects, registers and works on assigned tasks with `handler` until
    /// `shutdown` is cancelled (then returns `Ok(())` after a graceful
    /// shutdown) or the gateway refuses the agent for good: an HTTP 400, 401
    /// or 403 at the upgrade, or a registration error other than conflict
    /// (4008), rate limit (4002) or server error (4003). Everything else —
    /// lost connections, 503 while the gateway restarts, a conflict with a
    /// dying earlier connection — is retried with backoff while running
    /// handlers keep going.
    ///
    /// Graceful shutdown rejects new assignments, waits up to
    /// `shutdown_grace` for running handlers and delivers their results, then
    /// cancels and aborts the rest (failing their tasks as retryable) and
    /// closes the connection with code 1000. Shutting down while
    /// disconnected, or returning an error, stops the handlers at once; the
    /// gateway re-queues their tasks when the agent's heartbeat times out.
    ///
    /// Subscribe to [`events`](Agent::events) before calling this; it
    /// consumes the agent.
    pub async fn run<H: TaskHandler>(
        self,
        handler: Arc<H>,
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        self.shared.opts.validate()?;
        let outcome = self.connect_loop(&handler, &shutdown).await;
        self.stop().await;
        outcome
    }

    async fn connect_loop<H: TaskHandler>(
        &self,
        handler: &Arc<H>,
        shutdown: &CancellationToken,
    ) -> Result<(), AgentError> {
        let opts = &self.shared.opts;
        let mut backoff = Backoff::new(opts.reconnect_initial, opts.reconnect_max);
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let attempt = tokio::select! {
                attempt = self.connect_and_register() => attempt,
                () = shutdown.cancelled() => return Ok(()),
            };
            match attempt {
                Ok((ws, reply)) => {
                    backoff.reset();
                    let reason =
                        Connection::serve(&self.shared, handler, shutdown, ws, reply).await;
                    if !shutdown.is_cancelled() {
                        warn!(%reason, "disconnected from the gateway; reconnecting");
                    }
                    self.shared.emit(AgentEvent::Disconnected { reason });
                }
                Err(err) => {
                    if let Some(event) = refusal_event(&err) {
                        self.shared.emit(event);
                    }
                    if !err.is_retryable() {
                        return Err(err);
                    }
                    warn!(error = %err, "connecting to the gateway failed; retrying");
                }
            }
            let delay = backoff.next_delay();
            debug!(?delay, "waiting before reconnecting");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    async fn connect_and_register(&self) -> Result<(Ws, RegisterReply), AgentError> {
        let mut ws = self.connect().await?;
        self.shared.emit(AgentEvent::Connected);
        let reply = self.register(&mut ws).await?;
        Ok((ws, reply))
    }

    async fn connect(&self) -> Result<Ws, AgentError> {
        let opts = &self.shared.opts;
        let mut request = opts
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| AgentError::InvalidOptions(format!("url {:?}: {e}", opts.url)))?;
        let headers = request.headers_mut();
        if !opts.key.is_empty() {
            let bearer = HeaderValue::from_str(&format!("Bearer {}", opts.key)).map_err(|_| {
                AgentError::InvalidOptions(
                    "key has characters not allowed in an HTTP header".into(),
                )
            })?;
            headers.insert("authorization", bearer);
        }
        for (name, value, option) in [
            ("x-agent-id", &opts.id, "id"),
            ("x-agent-type", &opts.agent_type, "agent_type"),
        ] {
            let value = HeaderValue::from_str(value).map_err(|_| {
                AgentError::InvalidOptions(format!(
                    "{option} has characters not allowed in an HTTP header"
                ))
            })?;
            headers.insert(name, value);
        }
        let handshake = tokio_tungstenite::connect_async_with_config(request, None, true);
        match tokio::time::timeout(opts.request_timeout, handshake).await {
            Ok(Ok((ws, _response))) => Ok(ws),
            Ok(Err(err)) => Err(handshake_error(err, &opts.url)),
            Err(_) => Err(AgentError::Connection(format!(
                "no WebSocket handshake with {} within {:?}",
                opts.url, opts.request_timeout
            ))),
        }
    }

    /// Sends `agent.register` as request 1 and waits for its answer.
    async fn register(&self, ws: &mut Ws) -> Result<RegisterReply, AgentError> {
        let opts = &self.shared.opts;
        let mut params = Map::new();
        params.insert("id".into(), json!(opts.id));
        params.insert("type".into(), json!(opts.agent_type));
        params.insert("name".into(), json!(opts.name));
        if !opts.version.is_empty() {
            params.insert("version".into(), json!(opts.version));
        }
        params.insert("capabilities".into(), json!(opts.capabilities));
        params.insert(
            "max_concurrent_tasks".into(),
            json!(opts.max_concurrent_tasks),
        );
        for (field, value) in [("config", &opts.config), ("metadata", &opts.metadata)] {
            if !value.is_null() {
                params.insert(field.into(), value.clone());
            }
        }
        let active = self.shared.tasks.ids();
        if !active.is_empty() {
            info!(tasks = ?active, "re-registering with tasks still held");
        }
        params.insert("active_tasks".into(), json!(active));

        ws.send(request_frame(1, "agent.register", Value::Object(params)))
            .await
            .map_err(|e| AgentError::Connection(format!("sending agent.register: {e}")))?;
        let deadline = Instant::now() + opts.request_timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline, ws.next())
                .await
                .map_err(|_| AgentError::Timeout {
                    method: "agent.register".into(),
                    timeout: opts.request_timeout,
                })?;
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(frame))) => {
                    return Err(AgentError::Connection(format!(
                        "closed during registration: {}",
                        describe_close(frame.as_ref())
                    )));
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Err(AgentError::Connection(err.to_string())),
                None => return Err(AgentError::Closed),
            };
            let Ok(message) = serde_json::from_str::<Value>(text.as_str()) else {
                warn!("ignoring a frame that is not JSON while registering");
                continue;
            };
            if message.get("id") != Some(&json!(1)) || message.get("method").is_some() {
                debug!("ignoring a message that arrived before the register answer");
                continue;
            }
            if let Some(error) = message.get("error") {
                return Err(AgentError::from_rpc_error(error));
            }
            let result = message.get("result").cloned().unwrap_or(Value::Null);
            return serde_json::from_value(result).map_err(|e| {
                AgentError::Protocol(format!("malformed agent.register answer: {e}"))
            });
        }
    }

    /// Stops whatever still runs and waits (briefly) for it to end.
    async fn stop(&self) {
        let shared = &self.shared;
        shared.tasks.abort_all();
        shared.stopped.cancel();
        shared.sessions.send_replace(None);
        shared.tracker.close();
        if tokio::time::timeout(STOP_WAIT, shared.tracker.wait())
            .await
            .is_err()
        {
            warn!("background tasks still running after {STOP_WAIT:?}; leaving them");
        }
    }
}

/// The `agent.register` answer, as far as the agent uses it.
#[derive(Debug, Deserialize)]
struct RegisterReply {
    #[serde(default)]
    session_id: String,
    #[serde(default)]
    heartbeat_interval_secs: Option<u64>,
    #[serde(default)]
    config: Option<Value>,
    #[serde(default)]
    config_version: Option<u64>,
    #[serde(default)]
    resumed_tasks: Option<Vec<String>>,
}

/// Maps a failed handshake: a non-101 answer is a refusal, a bad URL an
/// option error, the rest connection trouble.
fn handshake_error(err: tungstenite::Error, url: &str) -> AgentError {
    match err {
        tungstenite::Error::Http(response) => {
            AgentError::from_refusal(response.status().as_u16(), response.body().as_deref())
        }
        tungstenite::Error::Url(UrlError::UnableToConnect(e)) => {
            AgentError::Connection(format!("cannot connect to {url}: {e}"))
        }
        tungstenite::Error::Url(e) => AgentError::InvalidOptions(format!("url {url:?}: {e}")),
        e => AgentError::Connection(format!("{url}: {e}")),
    }
}

fn refusal_event(err: &AgentError) -> Option<AgentEvent> {
    match err {
        AgentError::Refused {
            status,
            code,
            message,
        } => Some(AgentEvent::Refused {
            status: Some(*status),
            code: *code,
            message: message.clone(),
        }),
        AgentError::Rpc { code, message, .. } => Some(AgentEvent::Refused {
            status: None,
            code: Some(*code),
            message: message.clone(),
        }),
        _ => None,
    }
}

fn describe_close(frame: Option<&CloseFrame>) -> String {
    let Some(frame) = frame else {
        return "closed without a close code".to_string();
    };
    let code = u16::from(frame.code);
    let meaning = match code {
        1000 => "normal closure",
        1001 => "going away: the gateway is shutting down",
        1008 => "policy violation",
        1011 => "server error",
        _ => "closed",
    };
    if frame.reason.is_empty() {
        format!("{code} {meaning}")
    } else {
        format!("{code} {meaning}: {}", frame.reason.as_str())
    }
}

/// One registered connection: reads and dispatches what the gateway sends,
/// while a writer task sends what the agent queues.
struct Connection<'a, H> {
    shared: &'a Arc<Shared>,
    handler: &'a Arc<H>,
    session: Arc<Session>,
    shutting_down: bool,
}

/// How a connection ended.
enum End {
    /// Graceful shutdown finished (or gave up) and the socket was closed.
    Shutdown,
    /// The connection broke or the gateway closed it.
    Lost(String),
}

impl<'a, H: TaskHandler> Connection<'a, H> {
    /// Serves one connection until it ends; returns why, in words.
    async fn serve(
        shared: &'a Arc<Shared>,
        handler: &'a Arc<H>,
        shutdown: &CancellationToken,
        ws: Ws,
        reply: RegisterReply,
    ) -> String {
        let (sink, mut stream) = ws.split();
        let (out_tx, out_rx) = mpsc::channel(OUTGOING_CAPACITY);
        let writer = tokio::spawn(write_frames(sink, out_rx));
        // Request 1 was agent.register.
        let session = Arc::new(Session::new(out_tx, 2, shared.opts.request_timeout));
        let mut connection = Connection {
            shared,
            handler,
            session: session.clone(),
            shutting_down: false,
        };
        let heartbeat = connection.apply_registration(reply);

        let end = connection.dispatch(&mut stream, shutdown, heartbeat).await;
        match end {
            End::Shutdown => {
                let close = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "agent shutting down".into(),
                };
                let _ = session.send(Message::Close(Some(close))).await;
                session.close();
                shared.sessions.send_replace(None);
                // Up to the gateway's close reply; the gateway then ends the TCP connection.
                let drain = async {
                    while let Some(Ok(message)) = stream.next().await {
                        if message.is_close() {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
                writer.abort();
                info!("closed the connection to the gateway (1000)");
                "agent shut down".to_string()
            }
            End::Lost(reason) => {
                session.close();
                shared.sessions.send_replace(None);
                // Reading on sends tungstenite's reply to a gateway's close.
                let drain = async { while let Some(Ok(_)) = stream.next().await {} };
                let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
                writer.abort();
                reason
            }
        }
    }

    /// Takes in the register answer and publishes the session; returns the
    /// heartbeat period.
    fn apply_registration(&self, reply: RegisterReply) -> Duration {
        let shared = self.shared;
        if let Some(config) = reply.config.clone().filter(|c| !c.is_null()) {
            shared.config.send_replace(config);
        }
        if let Some(resumed) = &reply.resumed_tasks {
            for id in shared.tasks.ids() {
                if !resumed.contains(&id) && shared.tasks.cancel_by_gateway(&id) {
                    warn!(task_id = %id, "the gateway did not resume the task (re-queued while disconnected); stopping its handler");
                }
            }
        }
        shared.sessions.send_replace(Some(self.session.clone()));
        info!(session_id = %reply.session_id, "registered with the gateway");
        shared.emit(AgentEvent::Registered {
            session_id: reply.session_id,
            config_version: reply.config_version.unwrap_or(0),
            config: shared.config.borrow().clone(),
            resumed_tasks: reply.resumed_tasks.unwrap_or_default(),
        });
        let secs = reply
            .heartbeat_interval_secs
            .unwrap_or(DEFAULT_HEARTBEAT_SECS)
            .max(1);
        Duration::from_secs(secs)
    }

    async fn dispatch(
        &mut self,
        stream: &mut SplitStream<Ws>,
        shutdown: &CancellationToken,
        heartbeat_every: Duration,
    ) -> End {
        let shared = self.shared;
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + heartbeat_every, heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut held = shared.tasks.watch_len();
        let mut grace_ends: Option<Instant> = None;
        let mut give_up_at: Option<Instant> = None;
        loop {
            if self.shutting_down && shared.tasks.len() == 0 {
                return End::Shutdown;
            }
            tokio::select! {
                () = shutdown.cancelled(), if !self.shutting_down => {
                    self.shutting_down = true;
                    let grace = shared.opts.shutdown_grace;
                    grace_ends = Some(Instant::now() + grace);
                    info!(running = shared.tasks.len(), ?grace, "shutting down: rejecting new tasks, waiting for running ones");
                }
                () = sleep_until(grace_ends) => {
                    grace_ends = None;
                    warn!(running = shared.tasks.len(), "shutdown grace over: cancelling the remaining tasks");
                    shared.tasks.abort_all();
                    give_up_at = Some(Instant::now() + shared.opts.request_timeout.min(FINAL_DELIVERY_WAIT));
                }
                () = sleep_until(give_up_at) => {
                    warn!(held = shared.tasks.len(), "closing with task outcomes undelivered");
                    return End::Shutdown;
                }
                // Wakes the loop so an emptied table ends the shutdown.
                _ = held.changed() => {}
                frame = stream.next() => match frame {
                    Some(Ok(Message::Text(text))) => self.on_text(text.as_str()).await,
                    Some(Ok(Message::Close(frame))) => return End::Lost(describe_close(frame.as_ref())),
                    // Pings are answered by tungstenite on the next read.
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return End::Lost(format!("connection error: {err}")),
                    None => return End::Lost("the connection ended".to_string()),
                },
                _ = heartbeat.tick() => {
                    let status = if self.shutting_down { "degraded" } else { "ok" };
                    let params = json!({"status": status, "load": shared.load()});
                    let _ = self.session.notify("agent.heartbeat", params).await;
                }
            }
        }
    }

    async fn on_text(&mut self, text: &str) {
        let message: Value = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(err) => {
                warn!(error = %err, "ignoring a frame from the gateway that is not JSON");
                return;
            }
        };
        let id = message.get("id").filter(|id| !id.is_null());
        match (message.get("method").and_then(Value::as_str), id) {
            (Some(method), Some(id)) => {
                let params = message.get("params").cloned().unwrap_or(Value::Null);
                self.on_request(method, id, params).await;
            }
            (Some(method), None) => {
                let params = message.get("params").cloned().unwrap_or(Value::Null);
                self.on_notification(method, params).await;
            }
            (None, Some(id)) => {
                let answer = match message.get("error") {
                    Some(error) => Err(AgentError::from_rpc_error(error)),
                    None => Ok(message.get("result").cloned().unwrap_or(Value::Null)),
                };
                if !self.session.resolve(id, answer) {
                    debug!(%id, "ignoring an answer to no waiting request");
                }
            }
            (None, None) => warn!("ignoring a message with neither method nor id"),
        }
    }

    async fn on_request(&mut self, method: &str, id: &Value, params: Value) {
        let shared = self.shared;
        let frame = match method {
            // Notifications by the contract; sent as requests they are
            // still acted on, and acknowledged.
            "task.assigned" | "task.cancel" | "config.update" => {
                self.on_notification(method, params).await;
                result_frame(id, json!({}))
            }
            "health.check" => result_frame(
                id,
                json!({
                    "status": if self.shutting_down { "degraded" } else { "ok" },
                    "active_tasks": shared.tasks.len(),
                    "load": shared.load(),
                }),
            ),
            "capability.query" => {
                result_frame(id, json!({"capabilities": shared.opts.capabilities}))
            }
            other => error_frame(
                id,
                codes::METHOD_NOT_FOUND,
                &format!(
                    "method {other:?} not found: this agent answers health.check and capability.query"
                ),
                json!({"method": other}),
            ),
        };
        let _ = self.session.send(frame).await;
    }

    async fn on_notification(&mut self, method: &str, params: Value) {
        let shared = self.shared;
        match method {
            "task.assigned" => self.on_task_assigned(params),
            "task.cancel" => {
                let Some(id) = params.get("task_id").and_then(Value::as_str) else {
                    warn!("ignoring task.cancel without task_id");
                    return;
                };
                let reason = params.get("reason").and_then(Value::as_str).unwrap_or("");
                if shared.tasks.cancel_by_gateway(id) {
                    info!(task_id = id, reason, "the gateway cancelled the task");
                } else {
                    debug!(task_id = id, "task.cancel for a task not held");
                }
            }
            "config.update" => {
                let version = params.get("version").and_then(Value::as_u64).unwrap_or(0);
                let config = params.get("config").cloned().unwrap_or(Value::Null);
                shared.config.send_replace(config.clone());
                info!(version, "configuration updated by the gateway");
                shared.emit(AgentEvent::ConfigUpdated { version, config });
            }
            other => debug!(method = other, "ignoring an unknown notification"),
        }
    }

    fn on_task_assigned(&self, params: Value) {
        let shared = self.shared;
        let raw = params.get("task").cloned().unwrap_or(Value::Null);
        let task: Task = match serde_json::from_value(raw.clone()) {
            Ok(task) => task,
            Err(err) => {
                match raw.get("id").and_then(Value::as_str) {
                    Some(id) => self.reject(id, format!("malformed task: {err}")),
                    None => warn!(error = %err, "ignoring task.assigned without a task id"),
                }
                return;
            }
        };
        let id = task.id.clone();
        shared.emit(AgentEvent::TaskAssigned { id: id.clone() });
        if self.shutting_down {
            self.reject(&id, "agent shutting down".to_string());
            return;
        }
        let max = usize::try_from(shared.opts.max_concurrent_tasks).unwrap_or(usize::MAX);
        let token = match shared.tasks.try_insert(&id, max) {
            Ok(token) => token,
            Err(Refusal::Duplicate) => {
                debug!(task_id = %id, "task assigned again while held; ignoring");
                return;
            }
            Err(Refusal::Full) => {
                self.reject(&id, "at capacity".to_string());
                return;
            }
        };
        let verdict = std::panic::catch_unwind(AssertUnwindSafe(|| self.handler.accept(&task)))
            .unwrap_or_else(|_| Err("handler panicked while deciding whether to accept".into()));
        if let Err(reason) = verdict {
            shared.tasks.remove(&id);
            self.reject(&id, reason);
            return;
        }
        info!(task_id = %id, task_type = %task.task_type, "taking the task");
        let driver = driver::drive_task(shared.clone(), self.handler.clone(), task, token);
        shared.tracker.spawn(driver);
    }

    fn reject(&self, id: &str, reason: String) {
        info!(task_id = id, %reason, "rejecting the task");
        self.shared.emit(AgentEvent::TaskRejected {
            id: id.to_string(),
            reason: reason.clone(),
        });
        let session = self.session.clone();
        let params = json!({"task_id": id, "reason": reason});
        let id = id.to_string();
        self.shared.tracker.spawn(async move {
            if let Err(err) = session.request("task.reject", params).await {
                debug!(task_id = %id, error = %err, "task.reject not taken");
            }
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The writer: sends queued frames in order until the queue closes, a send
/// fails, or a close frame went out.
async fn write_frames(mut sink: SplitSink<Ws, Message>, mut queue: mpsc::Receiver<Message>) {
    while let Some(message) = queue.recv().await {
        let closing = matches!(message, Message::Close(_));
        if let Err(err) = sink.send(message).await {
            debug!(error = %err, "writing to the gateway failed");
            return;
        }
        if closing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_frames_are_described_with_their_meaning() {
        let going_away = CloseFrame {
            code: CloseCode::Away,
            reason: "draining".into(),
        };
        assert_eq!(
            describe_close(Some(&going_away)),
            "1001 going away: the gateway is shutting down: draining"
        );
        let policy = CloseFrame {
            code: CloseCode::Policy,
            reason: "".into(),
        };
        assert_eq!(describe_close(Some(&policy)), "1008 policy violation");
        assert_eq!(describe_close(None), "closed without a close code");
    }

    #[test]
    fn refusals_become_refused_events() {
        let err =
            AgentError::from_refusal(401, Some(br#"{"error":{"code":4001,"message":"bad key"}}"#));
        assert_eq!(
            refusal_event(&err),
            Some(AgentEvent::Refused {
                status: Some(401),
                code: Some(4001),
                message: "bad key".into()
            })
        );
        assert_eq!(refusal_event(&AgentError::Closed), None);
    }

    #[test]
    fn unable_to_connect_is_retried_but_bad_urls_are_not() {
        let err = handshake_error(
            tungstenite::Error::Url(UrlError::UnableToConnect("refused".into())),
            "ws://x/ws",
        );
        assert!(err.is_retryable());
        let err = handshake_error(tungstenite::Error::Url(UrlError::NoHostName), "ws:///ws");
        assert!(!err.is_retryable());
    }
}
