//! The agent's connection loop: connect, register, serve the connection
//! until it ends, reconnect with backoff, and shut down gracefully.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::SplitStream;
use meshgate_protocol::frame::{self, Limits};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{ProtocolError, UrlError};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::rpc::{AnswerHook, Outgoing, Session, error_frame, result_frame};
use crate::state::{self, Replicas, StateHandle};
use crate::table::{Refusal, TaskTable};
use crate::wire::{self, Inbound, Link, Ws};
use crate::{
    AgentError, AgentEvent, AgentOptions, BinaryOptions, Negotiation, Task, TaskHandler, codes,
    driver,
};

/// Events kept for slow observers before the oldest are dropped.
const EVENT_CAPACITY: usize = 1024;
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
    /// The subscribed CRDT documents and their local replicas.
    pub(crate) states: Replicas,
    /// Binary frames from the gateway that did not decode.
    bad_frames: AtomicU64,
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

    /// Logs and counts a binary frame from the gateway that did not decode.
    pub(crate) fn bad_frame(&self, error: String) {
        let count = self.bad_frames.fetch_add(1, Ordering::Relaxed) + 1;
        warn!(%error, count, "dropping a binary frame from the gateway that does not decode");
        self.emit(AgentEvent::BadFrame { error });
    }

    /// Asks the gateway for the connection's wire mode (`protocol.get_info`).
    pub(crate) async fn protocol_info(&self) -> Result<Value, AgentError> {
        let session = self.current_session().ok_or(AgentError::NotConnected)?;
        session.request("protocol.get_info", json!({})).await
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
                states: Replicas::new(),
                bad_frames: AtomicU64::new(0),
            }),
        }
    }

    /// A cloneable handle that keeps working while [`run`](Agent::run) owns
    /// the agent: events, shared state, the gateway's protocol info.
    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            shared: self.shared.clone(),
        }
    }

    /// A handle to the shared CRDT document `doc` (1–128 of
    /// `A–Z a–z 0–9 . _ : -`); see [`StateHandle`].
    pub fn state(&self, doc: &str) -> StateHandle {
        StateHandle::new(self.shared.clone(), doc)
    }

    /// The gateway's `protocol.get_info` for the current connection (mode,
    /// compression, checksum, limits, frame counters). Needs a registered
    /// connection, so call it on a [`handle`](Agent::handle) once `run` runs.
    pub async fn protocol_info(&self) -> Result<Value, AgentError> {
        self.shared.protocol_info().await
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
                Ok((link, reply)) => {
                    backoff.reset();
                    let reason =
                        Connection::serve(&self.shared, handler, shutdown, link, reply).await;
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

    async fn connect_and_register(&self) -> Result<(Link, RegisterReply), AgentError> {
        let (ws, binary) = self.connect().await?;
        self.shared.emit(AgentEvent::Connected);
        let mut link = Link::start(ws, &self.shared.opts, binary);
        self.negotiate(&mut link).await?;
        let reply = self.register(&mut link).await?;
        Ok((link, reply))
    }

    /// Upgrades to a WebSocket; true when the gateway accepted the binary
    /// subprotocol. A gateway that answers the offer without a subprotocol
    /// (tungstenite then fails the handshake) is connected to again without
    /// the offer, and asked with `protocol.set_binary` instead.
    async fn connect(&self) -> Result<(Ws, bool), AgentError> {
        let opts = &self.shared.opts;
        let mut offer = matches!(
            &opts.binary,
            Some(BinaryOptions {
                negotiate: Negotiation::Subprotocol,
                ..
            })
        );
        loop {
            let request = self.upgrade_request(offer)?;
            let handshake = tokio_tungstenite::connect_async_with_config(request, None, true);
            match tokio::time::timeout(opts.request_timeout, handshake).await {
                Ok(Ok((ws, response))) => {
                    let echoed = response
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.trim() == frame::SUBPROTOCOL);
                    return Ok((ws, offer && echoed));
                }
                Ok(Err(tungstenite::Error::Protocol(
                    ProtocolError::SecWebSocketSubProtocolError(err),
                ))) if offer => {
                    info!(error = %err, "the gateway did not take the {} subprotocol; connecting in text to ask with protocol.set_binary", frame::SUBPROTOCOL);
                    offer = false;
                }
                Ok(Err(err)) => return Err(handshake_error(err, &opts.url)),
                Err(_) => {
                    return Err(AgentError::Connection(format!(
                        "no WebSocket handshake with {} within {:?}",
                        opts.url, opts.request_timeout
                    )));
                }
            }
        }
    }

    /// The upgrade request with the agent's headers, offering the binary
    /// subprotocol if `offer`.
    fn upgrade_request(
        &self,
        offer: bool,
    ) -> Result<tungstenite::handshake::client::Request, AgentError> {
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
        if offer {
            headers.insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(frame::SUBPROTOCOL),
            );
        }
        Ok(request)
    }

    /// Sets the connection's wire mode before registration and announces it
    /// with [`AgentEvent::ProtocolMode`]. Binary after a subprotocol upgrade
    /// (aligning the gateway's compression and checksum with the agent's if
    /// they differ from its defaults), or by `protocol.set_binary`. A
    /// gateway that refuses `protocol.set_binary` leaves the connection as
    /// it was; only a lost connection or a timeout fails.
    async fn negotiate(&self, link: &mut Link) -> Result<(), AgentError> {
        let Some(binary) = &self.shared.opts.binary else {
            self.shared.emit(AgentEvent::ProtocolMode {
                binary: false,
                compression: false,
                checksum: false,
            });
            return Ok(());
        };
        let answer = if link.is_binary() && binary.matches_gateway_defaults() {
            None
        } else {
            self.set_binary(link, binary).await?
        };
        // The gateway's frame limits: in the mode answer, or asked for.
        let limits = match &answer {
            Some(a) => Some(a.clone()),
            None if link.is_binary() => {
                match link
                    .call(&self.shared, "protocol.get_info", json!({}), None)
                    .await
                {
                    Ok(info) => Some(info),
                    Err(err @ AgentError::Rpc { .. }) => {
                        warn!(error = %err, "the gateway refused protocol.get_info; assuming its default frame limits");
                        None
                    }
                    Err(err) => return Err(err),
                }
            }
            None => None,
        };
        if let Some(limits) = &limits {
            link.set_gateway_limits(limits);
        }
        let (compression, checksum) = gateway_mode(answer.as_ref());
        let binary = link.is_binary();
        let mode = AgentEvent::ProtocolMode {
            binary,
            compression: binary && compression,
            checksum: binary && checksum,
        };
        info!(?mode, "wire mode set");
        self.shared.emit(mode);
        Ok(())
    }

    /// Sends `protocol.set_binary` with the agent's preferences; the writer
    /// switches to binary when the answer arrives. Returns the answer, or
    /// `None` when the gateway refused.
    async fn set_binary(
        &self,
        link: &mut Link,
        binary: &BinaryOptions,
    ) -> Result<Option<Value>, AgentError> {
        let switch = link.mode_switch(true);
        let hook: AnswerHook = Box::new(move |answer| {
            if let Ok(answer) = answer
                && answer.get("mode").and_then(Value::as_str) != Some("text")
            {
                switch();
            }
        });
        let params = set_binary_params(binary);
        match link
            .call(&self.shared, "protocol.set_binary", params, Some(hook))
            .await
        {
            Ok(answer) => Ok(Some(answer)),
            Err(err @ AgentError::Rpc { .. }) => {
                warn!(error = %err, "the gateway refused protocol.set_binary; keeping the connection's mode");
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// Sends `agent.register` and waits for its answer.
    async fn register(&self, link: &mut Link) -> Result<RegisterReply, AgentError> {
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

        let result = link
            .call(&self.shared, "agent.register", Value::Object(params), None)
            .await?;
        serde_json::from_value(result)
            .map_err(|e| AgentError::Protocol(format!("malformed agent.register answer: {e}")))
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

/// A cloneable line to an agent while [`Agent::run`] owns it, from
/// [`Agent::handle`].
#[derive(Clone)]
pub struct AgentHandle {
    shared: Arc<Shared>,
}

impl AgentHandle {
    /// A receiver of what happens from now on; see [`Agent::events`].
    pub fn events(&self) -> broadcast::Receiver<AgentEvent> {
        self.shared.events.subscribe()
    }

    /// A handle to the shared CRDT document `doc`; see [`StateHandle`].
    pub fn state(&self, doc: &str) -> StateHandle {
        StateHandle::new(self.shared.clone(), doc)
    }

    /// The gateway's `protocol.get_info` for the current connection; fails
    /// with [`AgentError::NotConnected`] while there is no registered one.
    pub async fn protocol_info(&self) -> Result<Value, AgentError> {
        self.shared.protocol_info().await
    }

    /// How many binary frames from the gateway did not decode (and were
    /// dropped), over all connections.
    pub fn bad_frames(&self) -> u64 {
        self.shared.bad_frames.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle")
            .field("id", &self.shared.opts.id)
            .finish()
    }
}

/// The gateway's (compression, checksum) as a `protocol.set_binary` answer
/// reports them; without an answer its defaults hold (both on).
fn gateway_mode(answer: Option<&Value>) -> (bool, bool) {
    let field = |pointer: &str| answer.and_then(|a| a.pointer(pointer)?.as_bool());
    (
        field("/compression/enabled").unwrap_or(true),
        field("/checksum").unwrap_or(true),
    )
}

/// `protocol.set_binary`'s params for the agent's preferences.
fn set_binary_params(binary: &BinaryOptions) -> Value {
    let threshold = binary
        .compress_threshold
        .map_or(1024, |t| u32::try_from(t).unwrap_or(u32::MAX));
    json!({
        "enabled": true,
        "compression": {"enabled": binary.compress_threshold.is_some(), "threshold": threshold},
        "checksum": binary.checksum,
    })
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

/// A close frame in words: its code, what the code means, its reason.
pub(crate) fn describe_close(frame: Option<&CloseFrame>) -> String {
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
        link: Link,
        reply: RegisterReply,
    ) -> String {
        let Link {
            session,
            mut stream,
            writer,
            limits,
            early,
            ..
        } = link;
        let mut connection = Connection {
            shared,
            handler,
            session: session.clone(),
            shutting_down: false,
        };
        let heartbeat = connection.apply_registration(reply);
        for message in early {
            connection.on_message(message).await;
        }

        let end = connection
            .dispatch(&mut stream, &limits, shutdown, heartbeat)
            .await;
        match end {
            End::Shutdown => {
                let close = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "agent shutting down".into(),
                };
                let _ = session.send(Outgoing::Close(close)).await;
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
        state::resubscribe_all(shared, &self.session);
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
        limits: &Limits,
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
                    Some(Ok(message)) => match wire::read(message, limits) {
                        Inbound::Messages(messages) => {
                            for message in messages {
                                self.on_message(message).await;
                            }
                        }
                        Inbound::Ping { sequence, payload } => {
                            let _ = self.session.send(Outgoing::Pong { sequence, payload }).await;
                        }
                        Inbound::Close(frame) => return End::Lost(describe_close(frame.as_ref())),
                        Inbound::Bad(error) => shared.bad_frame(error),
                        Inbound::Nothing => {}
                    },
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

    async fn on_message(&mut self, message: Value) {
        if wire::resolve_answer(&self.session, &message) {
            return;
        }
        let Some(method) = message.get("method").and_then(Value::as_str) else {
            match message.get("error") {
                // Such as 4009 for a binary frame the gateway could not read.
                Some(error) => warn!(%error, "the gateway reported an error about no request"),
                None => warn!("ignoring a message with neither method nor id"),
            }
            return;
        };
        let params = message.get("params").cloned().unwrap_or(Value::Null);
        match message.get("id").filter(|id| !id.is_null()) {
            Some(id) => self.on_request(method, id, params).await,
            None => self.on_notification(method, params).await,
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
            "state.delta" => state::on_delta(shared, &self.session, &params),
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
    fn set_binary_asks_for_the_agents_preferences() {
        let binary = BinaryOptions {
            compress_threshold: None,
            checksum: false,
            ..BinaryOptions::new(Negotiation::Runtime)
        };
        assert_eq!(
            set_binary_params(&binary),
            json!({"enabled": true, "compression": {"enabled": false, "threshold": 1024}, "checksum": false})
        );
        let binary = BinaryOptions {
            compress_threshold: Some(64),
            ..binary
        };
        assert_eq!(
            set_binary_params(&binary)["compression"],
            json!({"enabled": true, "threshold": 64})
        );
    }

    #[test]
    fn mode_comes_from_the_answer_or_the_gateways_defaults() {
        assert_eq!(gateway_mode(None), (true, true));
        let answer =
            json!({"mode": "binary", "compression": {"enabled": false}, "checksum": false});
        assert_eq!(gateway_mode(Some(&answer)), (false, false));
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
