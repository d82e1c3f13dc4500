//! Per-session sequencing and transport failover.
//!
//! [`SequencedSessions`] wraps rmcp's in-memory session manager and is the
//! one place every server-to-client message of a session passes through, on
//! every transport: Streamable HTTP (`/mcp`) and WebSocket (`/mcp/ws`, which
//! drives the same sessions). Each message gets the session's next sequence
//! number (the SSE event id on HTTP, `_meta["meshgate.io/seq"]` on
//! WebSocket) and is kept in a bounded [`ResumeBuffer`] until acknowledged.
//!
//! Messages go to an *attachment*: the POST stream of the request they
//! belong to, a WebSocket connection, or the session's *fallback* (the
//! newest `GET` stream or WebSocket). The streams of the inner session
//! manager are pumped by tasks of their own, so a dropped connection never
//! stops them: what its attachment can no longer take goes to the fallback,
//! or stays in the buffer. A client that lost a connection attaches again
//! with the last sequence number it saw (`Last-Event-ID` on a `GET`, or on
//! the WebSocket upgrade) and receives, in order, every later message that
//! no live attachment received, then the live flow: each message once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::SessionManager;
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError,
};
use rmcp::transport::streamable_http_server::session::{
    EventStore, RestoreOutcome, ServerSseMessage, SessionId,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The `_meta` key carrying a message's sequence number on WebSocket.
pub const SEQ_META: &str = "meshgate.io/seq";
/// Transport switches and resumptions kept per session for its trace.
const MAX_EVENTS: usize = 32;
/// How far a resuming client's number may be above this process's
/// numbering (clock-based, x1024 per ms): about 12 hours of clock difference.
const MAX_CLOCK_LEAD: u64 = 12 * 3600 * 1000 * 1024;
/// Messages queued toward one attachment; a consumer that reads no faster
/// holds the session's streams back (and so its outbound queue degrades).
const ATTACHMENT_QUEUE: usize = 64;

/// Bounds of the per-session buffer of unacknowledged messages.
#[derive(Debug, Clone, Copy)]
pub struct BufferLimits {
    /// Messages kept per session.
    pub messages: usize,
    /// Bytes (serialized) kept per session.
    pub bytes: usize,
    /// Age after which a message is dropped.
    pub max_age: Duration,
}

/// What a resumption replays.
#[derive(Debug, Default)]
pub struct Replay {
    /// Messages after the client's cursor, oldest first.
    pub messages: Vec<(u64, Arc<ServerJsonRpcMessage>)>,
    /// Sequence numbers after the cursor that the buffer no longer holds
    /// (dropped by its limits): first and last.
    pub lost: Option<(u64, u64)>,
}

/// Storage of unacknowledged messages per session. In memory by default;
/// a shared implementation (Redis) lets another process replay them.
pub trait ResumeBuffer: Send + Sync + 'static {
    /// Keeps message `seq` of `session`.
    fn push(&self, session: &str, seq: u64, message: Arc<ServerJsonRpcMessage>, bytes: usize);
    /// Messages of `session` after `seq`, and what was lost after it.
    fn after(&self, session: &str, seq: u64) -> Replay;
    /// Drops messages of `session` up to and including `seq`.
    fn ack(&self, session: &str, seq: u64);
    /// Forgets `session`.
    fn forget(&self, session: &str);
}

struct Held {
    seq: u64,
    at: Instant,
    bytes: usize,
    message: Arc<ServerJsonRpcMessage>,
}

#[derive(Default)]
struct SessionBuffer {
    held: VecDeque<Held>,
    bytes: usize,
    /// Highest sequence number dropped by the limits (not acknowledged).
    dropped_upto: u64,
    acked: u64,
}

/// The in-memory [`ResumeBuffer`].
pub struct MemoryBuffer {
    limits: BufferLimits,
    sessions: Mutex<HashMap<String, SessionBuffer>>,
}

impl MemoryBuffer {
    /// An empty buffer with `limits`.
    pub fn new(limits: BufferLimits) -> MemoryBuffer {
        MemoryBuffer {
            limits,
            sessions: Mutex::new(HashMap::new()),
        }
    }
}

impl SessionBuffer {
    fn trim(&mut self, limits: &BufferLimits, now: Instant) {
        while let Some(front) = self.held.front() {
            let over = self.held.len() > limits.messages
                || self.bytes > limits.bytes
                || now.duration_since(front.at) > limits.max_age;
            if !over {
                break;
            }
            if let Some(h) = self.held.pop_front() {
                self.bytes -= h.bytes;
                self.dropped_upto = self.dropped_upto.max(h.seq);
                metrics::counter!("gateway_resume_buffer_dropped_total").increment(1);
            }
        }
    }
}

impl ResumeBuffer for MemoryBuffer {
    fn push(&self, session: &str, seq: u64, message: Arc<ServerJsonRpcMessage>, bytes: usize) {
        let Ok(mut all) = self.sessions.lock() else {
            return;
        };
        let b = all.entry(session.to_owned()).or_default();
        b.held.push_back(Held {
            seq,
            at: Instant::now(),
            bytes,
            message,
        });
        b.bytes += bytes;
        b.trim(&self.limits, Instant::now());
    }

    fn after(&self, session: &str, seq: u64) -> Replay {
        let Ok(mut all) = self.sessions.lock() else {
            return Replay::default();
        };
        let Some(b) = all.get_mut(session) else {
            return Replay::default();
        };
        b.trim(&self.limits, Instant::now());
        let from = seq.max(b.acked);
        let lost = (b.dropped_upto > from).then(|| (from.saturating_add(1), b.dropped_upto));
        Replay {
            messages: b
                .held
                .iter()
                .filter(|h| h.seq > seq)
                .map(|h| (h.seq, h.message.clone()))
                .collect(),
            lost,
        }
    }

    fn ack(&self, session: &str, seq: u64) {
        let Ok(mut all) = self.sessions.lock() else {
            return;
        };
        if let Some(b) = all.get_mut(session) {
            b.acked = b.acked.max(seq);
            while b.held.front().is_some_and(|h| h.seq <= seq) {
                if let Some(h) = b.held.pop_front() {
                    b.bytes -= h.bytes;
                }
            }
        }
    }

    fn forget(&self, session: &str) {
        if let Ok(mut all) = self.sessions.lock() {
            all.remove(session);
        }
    }
}

/// Which transport an attachment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A Streamable HTTP response stream (POST or GET).
    Http,
    /// A `/mcp/ws` connection.
    WebSocket,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Http => "streamable_http",
            Via::WebSocket => "websocket",
        }
    }
}

struct Attachment {
    tx: mpsc::Sender<ServerSseMessage>,
    via: Via,
}

#[derive(Default)]
struct LogState {
    last_seq: u64,
    attachments: HashMap<u64, Attachment>,
    fallback: Option<u64>,
    standalone: bool,
    /// Which attachment each buffered message went to (`None`: none).
    delivered: BTreeMap<u64, Option<u64>>,
    last_via: Option<Via>,
    events: VecDeque<Value>,
    /// POST attachments whose stream ended with the client still reading:
    /// what went to them was received.
    completed: std::collections::HashSet<u64>,
    /// The session ended: nothing more is numbered or kept.
    closed: bool,
}

impl LogState {
    /// A fresh log. Numbering starts from the clock (x1024), so a session
    /// resumed after a restart or on another process continues above every
    /// number the client saw before.
    fn new() -> LogState {
        LogState {
            last_seq: u64::try_from(meshgate_store::now_ms())
                .unwrap_or(0)
                .saturating_mul(1024),
            ..LogState::default()
        }
    }

    /// Whether the client has message `seq` from another attachment: one
    /// still live, or a response stream that ended with the client reading.
    fn received(&self, seq: u64) -> bool {
        match self.delivered.get(&seq).copied().flatten() {
            Some(a) => self.alive(a) || self.completed.contains(&a),
            None => false,
        }
    }

    fn alive(&self, att: u64) -> bool {
        self.attachments
            .get(&att)
            .is_some_and(|a| !a.tx.is_closed())
    }

    fn target(&self, origin: Option<u64>) -> Option<u64> {
        origin
            .filter(|o| self.alive(*o))
            .or(self.fallback.filter(|f| self.alive(*f)))
    }

    fn event(&mut self, event: Value) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}

struct SessionLog {
    state: Mutex<LogState>,
}

/// Errors of [`SequencedSessions`].
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// From the inner session manager.
    #[error(transparent)]
    Local(#[from] LocalSessionManagerError),
    /// `Last-Event-ID` that is not one of ours.
    #[error(
        "Last-Event-ID `{0}` is not an event id of this gateway (a decimal sequence number from an SSE `id:` or `_meta[\"meshgate.io/seq\"]`)"
    )]
    BadEventId(String),
    /// A cursor above anything the session sent.
    #[error(
        "Last-Event-ID {given} is ahead of this session (its last message is {last}); send the last sequence number received"
    )]
    AheadOfSession {
        /// The client's cursor.
        given: u64,
        /// The session's last sequence number.
        last: u64,
    },
    /// The session has no log (closed).
    #[error("session `{0}` not found")]
    NotFound(SessionId),
}

/// rmcp's [`LocalSessionManager`] with per-session sequencing, a resume
/// buffer and attachments (see the module documentation).
pub struct SequencedSessions {
    inner: Arc<LocalSessionManager>,
    logs: RwLock<HashMap<SessionId, Arc<SessionLog>>>,
    buffer: Arc<dyn ResumeBuffer>,
    next_attachment: AtomicU64,
    reorder_window: Duration,
    /// Routing records kept per session (the buffer's message limit).
    delivered_cap: usize,
}

impl SequencedSessions {
    /// Over `inner`, keeping unacknowledged messages in `buffer` and
    /// re-sequencing progress within `reorder_window` (zero: off).
    pub fn new(
        inner: LocalSessionManager,
        buffer: Arc<dyn ResumeBuffer>,
        reorder_window: Duration,
        buffered_messages: usize,
    ) -> SequencedSessions {
        SequencedSessions {
            inner: Arc::new(inner),
            logs: RwLock::new(HashMap::new()),
            buffer,
            next_attachment: AtomicU64::new(1),
            reorder_window,
            delivered_cap: buffered_messages.max(1024),
        }
    }

    fn log(&self, id: &SessionId) -> Option<Arc<SessionLog>> {
        self.logs.read().ok().and_then(|m| m.get(id).cloned())
    }

    fn log_or_new(&self, id: &SessionId) -> Arc<SessionLog> {
        if let Some(l) = self.log(id) {
            return l;
        }
        let fresh = Arc::new(SessionLog {
            state: Mutex::new(LogState::new()),
        });
        match self.logs.write() {
            Ok(mut m) => m.entry(id.clone()).or_insert(fresh).clone(),
            Err(_) => fresh,
        }
    }

    /// Transport switches and resumptions of session `id`, oldest first.
    pub fn events(&self, id: &str) -> Vec<Value> {
        self.log(&id.to_owned().into())
            .and_then(|l| {
                l.state
                    .lock()
                    .ok()
                    .map(|s| s.events.iter().cloned().collect())
            })
            .unwrap_or_default()
    }

    /// The sequence number of the last message sent in session `id`.
    pub fn last_seq(&self, id: &SessionId) -> Option<u64> {
        self.log(id)
            .and_then(|l| l.state.lock().ok().map(|s| s.last_seq))
    }

    /// Starts pumping the inner standalone stream (server-initiated
    /// messages) of `id` once; its messages go to the fallback.
    async fn ensure_standalone(
        &self,
        id: &SessionId,
        log: &Arc<SessionLog>,
    ) -> Result<(), ResumeError> {
        let start = match log.state.lock() {
            Ok(mut s) if !s.standalone => {
                s.standalone = true;
                true
            }
            _ => false,
        };
        if start {
            match self.inner.create_standalone_stream(id).await {
                Ok(stream) => self.pump(id.clone(), log.clone(), stream, None),
                Err(e) => {
                    if let Ok(mut s) = log.state.lock() {
                        s.standalone = false;
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    fn pump(
        &self,
        id: SessionId,
        log: Arc<SessionLog>,
        stream: impl Stream<Item = ServerSseMessage> + Send + 'static,
        origin: Option<u64>,
    ) {
        let buffer = self.buffer.clone();
        let window = self.reorder_window;
        let cap = self.delivered_cap;
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut reorder = Reorder::new(window);
            loop {
                let deadline = reorder.next_deadline();
                let ready = tokio::select! {
                    ev = stream.next() => match ev {
                        Some(ev) => reorder.push(ev, Instant::now()),
                        None => break,
                    },
                    () = sleep_until_opt(deadline) => reorder.due(Instant::now()),
                };
                for ev in ready {
                    if deliver(&id, &log, buffer.as_ref(), origin, cap, ev)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            for ev in reorder.flush() {
                if deliver(&id, &log, buffer.as_ref(), origin, cap, ev)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // The inner stream ended: a POST stream's attachment ends with
            // it, received in full if the client was still reading.
            if let Some(o) = origin
                && let Ok(mut s) = log.state.lock()
                && s.attachments.get(&o).is_some_and(|a| a.via == Via::Http)
                && s.fallback != Some(o)
            {
                if s.alive(o) {
                    s.completed.insert(o);
                }
                s.attachments.remove(&o);
            }
        });
    }

    fn attach(&self, log: &SessionLog, via: Via) -> (u64, mpsc::Receiver<ServerSseMessage>) {
        let (tx, rx) = mpsc::channel(ATTACHMENT_QUEUE);
        let att = self.next_attachment.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = log.state.lock() {
            s.attachments.insert(att, Attachment { tx, via });
        }
        (att, rx)
    }

    /// Makes a new attachment over `via` the fallback of session `id` and
    /// replays what the client missed after `after` (its last seen sequence
    /// number; `None`: only what was never sent anywhere).
    pub async fn attach_fallback(
        &self,
        id: &SessionId,
        via: Via,
        after: Option<u64>,
    ) -> Result<(u64, mpsc::Receiver<ServerSseMessage>), ResumeError> {
        if !self.inner.has_session(id).await? {
            return Err(ResumeError::NotFound(id.clone()));
        }
        let log = self.log_or_new(id);
        self.ensure_standalone(id, &log).await?;
        let att = self.next_attachment.fetch_add(1, Ordering::Relaxed);
        let Ok(mut s) = log.state.lock() else {
            return Err(ResumeError::NotFound(id.clone()));
        };
        let cursor = after.unwrap_or(0);
        if after.is_some() && cursor > s.last_seq {
            // A number from another process (its clock ahead of ours):
            // continue above it. Far beyond any clock: not one of ours.
            if cursor - s.last_seq > MAX_CLOCK_LEAD {
                return Err(ResumeError::AheadOfSession {
                    given: cursor,
                    last: s.last_seq,
                });
            }
            s.last_seq = cursor;
        }
        // The client resumes: the connections it had are gone for it. Its
        // WebSocket and its previous fallback stream are superseded (a
        // half-open one must not swallow what is replayed or still to come),
        // and closed ones are forgotten.
        let superseded: Vec<u64> = s
            .attachments
            .iter()
            .filter(|(id, a)| {
                a.tx.is_closed()
                    || (Some(**id) == s.fallback && (a.via == Via::Http || after.is_some()))
                    || (after.is_some() && a.via == Via::WebSocket)
            })
            .map(|(id, _)| *id)
            .collect();
        for old in superseded {
            s.attachments.remove(&old);
        }
        s.fallback = None;
        let replay = self.buffer.after(id, cursor);
        // Room for the whole replay, so it is queued at once under the lock.
        let (tx, rx) = mpsc::channel(ATTACHMENT_QUEUE + replay.messages.len() + 1);
        let mut replayed = 0u64;
        // Dropped by the buffer's limits and not received elsewhere: lost.
        let lost: Vec<u64> = match (after, replay.lost) {
            (Some(_), Some((from, to))) => {
                let from = from.max(to.saturating_sub(self.delivered_cap as u64));
                (from..=to).filter(|q| !s.received(*q)).collect()
            }
            _ => Vec::new(),
        };
        if let (Some(first), Some(last)) = (lost.first(), lost.last()) {
            let n = lost.len();
            let warning = json!({
                "jsonrpc": "2.0",
                "method": "notifications/message",
                "params": {"level": "warning", "logger": "meshgate", "data": {
                    "error": "messages_lost",
                    "message": format!("{n} messages of this session (between {first} and {last}) were dropped from the gateway's resume buffer (mcp.resume_buffer_* limits) before this client resumed; state that depends on them must be fetched again"),
                    "first": first, "last": last, "count": n,
                }},
            });
            if let Ok(m) = serde_json::from_value::<ServerJsonRpcMessage>(warning) {
                let _ = tx.try_send(ServerSseMessage::new(cursor.to_string(), m));
            }
        }
        for (seq, message) in replay.messages {
            let skip = match after {
                // With a cursor: skip what the client has from elsewhere.
                Some(_) => s.received(seq),
                // Without one: send only what never went anywhere.
                None => s.delivered.get(&seq).copied().flatten().is_some(),
            };
            if skip {
                continue;
            }
            replayed += 1;
            s.delivered.insert(seq, Some(att));
            let _ = tx.try_send(ServerSseMessage::new(seq.to_string(), (*message).clone()));
        }
        if after.is_some() {
            self.buffer.ack(id, cursor);
            // What the client acknowledged needs no routing record.
            while s
                .delivered
                .first_key_value()
                .is_some_and(|(q, _)| *q <= cursor)
            {
                s.delivered.pop_first();
            }
        }
        s.attachments.insert(att, Attachment { tx, via });
        s.fallback = Some(att);
        let switched = s.last_via.is_some_and(|v| v != via);
        if after.is_some() || switched {
            let event = json!({
                "at_unix_ms": meshgate_store::now_ms(),
                "event": if switched { "transport_switch" } else { "resume" },
                "from": s.last_via.map(Via::label),
                "to": via.label(),
                "last_event_id": after,
                "replayed": replayed,
                "lost": lost.len(),
            });
            s.event(event);
            metrics::counter!("gateway_session_resumes_total", "transport" => via.label(), "switch" => if switched { "true" } else { "false" }).increment(1);
            metrics::counter!("gateway_session_replayed_messages_total").increment(replayed);
        }
        s.last_via = Some(via);
        Ok((att, rx))
    }

    /// Sends `message` (a request) into session `id`; what it produces goes
    /// to attachment `att`.
    pub async fn submit(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
        att: u64,
    ) -> Result<(), ResumeError> {
        let log = self
            .log(id)
            .ok_or_else(|| ResumeError::NotFound(id.clone()))?;
        let stream = self.inner.create_stream(id, message).await?;
        self.pump(id.clone(), log, stream, Some(att));
        Ok(())
    }

    /// Removes attachment `att` of session `id` (its connection ended).
    pub fn detach(&self, id: &SessionId, att: u64) {
        if let Some(log) = self.log(id)
            && let Ok(mut s) = log.state.lock()
        {
            s.attachments.remove(&att);
            if s.fallback == Some(att) {
                s.fallback = None;
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Numbers, keeps and sends one message of session `id` that came from the
/// stream of attachment `origin` (`None`: the standalone stream). `Err` when
/// the session's state is unusable.
async fn deliver(
    id: &SessionId,
    log: &SessionLog,
    buffer: &dyn ResumeBuffer,
    origin: Option<u64>,
    delivered_cap: usize,
    mut ev: ServerSseMessage,
) -> Result<(), ()> {
    let Some(message) = ev.message.clone() else {
        // A priming event: the cursor so far, on its own stream.
        if let Ok(s) = log.state.lock()
            && let Some(o) = origin.filter(|o| s.alive(*o))
            && let Some(a) = s.attachments.get(&o)
        {
            ev.event_id = Some(s.last_seq.to_string());
            let _ = a.tx.try_send(ev);
        }
        return Ok(());
    };
    // Room at the target first, outside the lock (this is where a slow
    // reader holds the streams back); then number, keep and send at once
    // under it, so each attachment receives its messages in sequence order.
    let mut permit = None;
    for _ in 0..4 {
        let target = match log.state.lock() {
            Ok(s) => s
                .target(origin)
                .and_then(|t| s.attachments.get(&t).map(|a| (t, a.tx.clone()))),
            Err(_) => None,
        };
        let Some((t, tx)) = target else { break };
        if let Ok(p) = tx.reserve_owned().await {
            permit = Some((t, p));
            break;
        }
    }
    let Ok(mut s) = log.state.lock() else {
        return Err(());
    };
    if s.closed {
        return Err(());
    }
    s.last_seq = s.last_seq.saturating_add(1);
    let seq = s.last_seq;
    ev.event_id = Some(seq.to_string());
    let bytes = serde_json::to_vec(&*message).map_or(0, |v| v.len());
    buffer.push(id, seq, message, bytes);
    // The target may have been superseded while we waited for room: then
    // the current one, if it has room now, else none (a resumption replays).
    let target = match permit {
        Some((t, p)) if s.attachments.contains_key(&t) => {
            p.send(ev);
            Some(t)
        }
        _ => match s.target(origin) {
            Some(t) => s
                .attachments
                .get(&t)
                .and_then(|a| a.tx.try_send(ev).ok())
                .map(|()| t),
            None => None,
        },
    };
    s.delivered.insert(seq, target);
    while s.delivered.len() > delivered_cap {
        s.delivered.pop_first();
    }
    Ok(())
}

/// Progress notifications held back at most this many per stream.
const REORDER_HELD: usize = 64;

/// Re-sequences progress notifications that arrive out of order from
/// upstream: each is held for the window, and released per progress token
/// in rising `progress` order (the spec requires progress to rise). One that
/// arrives after a higher value of its token was released is stale and
/// dropped (counted). Any other message first releases everything held, so
/// a result never overtakes its progress.
struct Reorder {
    window: Duration,
    held: Vec<(String, f64, Instant, ServerSseMessage)>,
    released: HashMap<String, f64>,
}

fn progress_key(ev: &ServerSseMessage) -> Option<(String, f64)> {
    let ServerJsonRpcMessage::Notification(n) = ev.message.as_deref()? else {
        return None;
    };
    let rmcp::model::ServerNotification::ProgressNotification(p) = &n.notification else {
        return None;
    };
    let token = serde_json::to_string(&p.params.progress_token).ok()?;
    Some((token, p.params.progress))
}

impl Reorder {
    fn new(window: Duration) -> Reorder {
        Reorder {
            window,
            held: Vec::new(),
            released: HashMap::new(),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.held.iter().map(|h| h.2).min()
    }

    fn push(&mut self, ev: ServerSseMessage, now: Instant) -> Vec<ServerSseMessage> {
        let Some((token, progress)) = progress_key(&ev) else {
            let mut out = self.flush();
            out.push(ev);
            return out;
        };
        if self.released.get(&token).is_some_and(|&r| progress <= r) {
            metrics::counter!("gateway_progress_reordered_total", "action" => "dropped_stale")
                .increment(1);
            return Vec::new();
        }
        if self.window.is_zero() {
            self.released.insert(token, progress);
            return vec![ev];
        }
        if self.held.iter().any(|h| h.0 == token && h.1 > progress) {
            metrics::counter!("gateway_progress_reordered_total", "action" => "resequenced")
                .increment(1);
        }
        self.held.push((token, progress, now + self.window, ev));
        if self.held.len() > REORDER_HELD {
            // Full: release the oldest arrival's token up to its value.
            let (token, progress) = (self.held[0].0.clone(), self.held[0].1);
            return self.release(|t, p| t == token && p <= progress);
        }
        Vec::new()
    }

    /// Releases what is due at `now` (with the lower values of its token).
    fn due(&mut self, now: Instant) -> Vec<ServerSseMessage> {
        let mut upto: HashMap<String, f64> = HashMap::new();
        for (t, p, d, _) in &self.held {
            if *d <= now {
                let e = upto.entry(t.clone()).or_insert(*p);
                *e = e.max(*p);
            }
        }
        self.release(|t, p| upto.get(t).is_some_and(|&u| p <= u))
    }

    fn flush(&mut self) -> Vec<ServerSseMessage> {
        self.release(|_, _| true)
    }

    fn release(&mut self, pick: impl Fn(&str, f64) -> bool) -> Vec<ServerSseMessage> {
        let (mut out, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| pick(&h.0, h.1));
        self.held = keep;
        // Tokens in order of first arrival, each in rising progress.
        let mut order: Vec<String> = Vec::new();
        for h in &out {
            if !order.contains(&h.0) {
                order.push(h.0.clone());
            }
        }
        out.sort_by(|a, b| {
            let ia = order.iter().position(|t| *t == a.0);
            let ib = order.iter().position(|t| *t == b.0);
            ia.cmp(&ib).then(a.1.total_cmp(&b.1))
        });
        let mut ready = Vec::with_capacity(out.len());
        for (token, progress, _, ev) in out {
            let last = self.released.entry(token).or_insert(f64::MIN);
            if progress <= *last {
                metrics::counter!("gateway_progress_reordered_total", "action" => "dropped_stale")
                    .increment(1);
                continue;
            }
            *last = progress;
            ready.push(ev);
        }
        ready
    }
}

fn parse_cursor(last_event_id: &str) -> Result<u64, ResumeError> {
    last_event_id
        .trim()
        .parse()
        .map_err(|_| ResumeError::BadEventId(last_event_id.chars().take(64).collect()))
}

impl SessionManager for SequencedSessions {
    type Error = ResumeError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let (id, transport) = self.inner.create_session().await?;
        self.log_or_new(&id);
        Ok((id, transport))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        Ok(self.inner.initialize_session(id, message).await?)
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        Ok(self.inner.has_session(id).await?)
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        let r = self.inner.close_session(id).await;
        let log = self.logs.write().ok().and_then(|mut m| m.remove(id));
        if let Some(log) = log
            && let Ok(mut s) = log.state.lock()
        {
            s.closed = true;
            s.attachments.clear();
        }
        self.buffer.forget(id);
        Ok(r?)
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let log = self.log_or_new(id);
        let (att, rx) = self.attach(&log, Via::Http);
        if let Ok(mut s) = log.state.lock() {
            s.last_via = Some(Via::Http);
        }
        match self.inner.create_stream(id, message).await {
            Ok(stream) => {
                self.pump(id.clone(), log, stream, Some(att));
                Ok(ReceiverStream::new(rx))
            }
            Err(e) => {
                self.detach(id, att);
                Err(e.into())
            }
        }
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        Ok(self.inner.accept_message(id, message).await?)
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let (_, rx) = self.attach_fallback(id, Via::Http, None).await?;
        Ok(ReceiverStream::new(rx))
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let cursor = parse_cursor(&last_event_id)?;
        let (_, rx) = self.attach_fallback(id, Via::Http, Some(cursor)).await?;
        Ok(ReceiverStream::new(rx))
    }

    async fn restore_session(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        let outcome = self.inner.restore_session(id.clone()).await?;
        if matches!(outcome, RestoreOutcome::Restored(_)) {
            self.log_or_new(&id);
        }
        Ok(outcome)
    }

    fn event_store(&self) -> Option<Arc<dyn EventStore>> {
        None
    }
}

/// `message` as JSON with its sequence number in `_meta` (WebSocket): in
/// `result._meta` of a result, `params._meta` of a request or notification,
/// `error.data._meta` of an error.
pub fn with_seq(message: &ServerJsonRpcMessage, seq: Option<&str>) -> Value {
    let mut v = serde_json::to_value(message).unwrap_or(Value::Null);
    let Some(seq) = seq.and_then(|s| s.parse::<u64>().ok()) else {
        return v;
    };
    let Some(obj) = v.as_object_mut() else {
        return v;
    };
    let holder = if obj.contains_key("result") {
        obj.get_mut("result")
    } else if obj.contains_key("method") {
        Some(obj.entry("params").or_insert_with(|| json!({})))
    } else if let Some(err) = obj.get_mut("error").and_then(Value::as_object_mut) {
        let data = err.entry("data").or_insert(Value::Null);
        if data.is_null() {
            *data = json!({});
        }
        Some(data)
    } else {
        None
    };
    if let Some(h) = holder.and_then(Value::as_object_mut) {
        let meta = h.entry("_meta").or_insert_with(|| json!({}));
        if let Some(m) = meta.as_object_mut() {
            m.insert(SEQ_META.into(), json!(seq));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(n: u64) -> Arc<ServerJsonRpcMessage> {
        Arc::new(
            serde_json::from_value(json!({
                "jsonrpc": "2.0", "method": "notifications/progress",
                "params": {"progressToken": "t", "progress": n}
            }))
            .unwrap(),
        )
    }

    fn limits(messages: usize) -> BufferLimits {
        BufferLimits {
            messages,
            bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        }
    }

    #[test]
    fn buffer_replays_after_a_cursor_and_reports_what_its_limits_dropped() {
        let b = MemoryBuffer::new(limits(3));
        for seq in 1..=5 {
            b.push("s", seq, note(seq), 10);
        }
        let r = b.after("s", 0);
        assert_eq!(
            r.messages.iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(r.lost, Some((1, 2)));
        let r = b.after("s", 3);
        assert_eq!(
            r.messages.iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(r.lost, None, "nothing after 3 was dropped");
        b.ack("s", 4);
        let r = b.after("s", 4);
        assert_eq!(r.messages.iter().map(|m| m.0).collect::<Vec<_>>(), vec![5]);
        b.forget("s");
        assert!(b.after("s", 0).messages.is_empty());
    }

    #[test]
    fn buffer_respects_byte_and_age_limits() {
        let b = MemoryBuffer::new(BufferLimits {
            messages: 100,
            bytes: 25,
            max_age: Duration::from_secs(60),
        });
        for seq in 1..=4 {
            b.push("s", seq, note(seq), 10);
        }
        assert_eq!(
            b.after("s", 0).messages.len(),
            2,
            "25 bytes hold two of ten"
        );
        let aged = MemoryBuffer::new(BufferLimits {
            messages: 100,
            bytes: 1 << 20,
            max_age: Duration::from_millis(0),
        });
        aged.push("s", 1, note(1), 10);
        std::thread::sleep(Duration::from_millis(2));
        let r = aged.after("s", 0);
        assert!(r.messages.is_empty());
        assert_eq!(r.lost, Some((1, 1)));
    }

    fn progress_ev(token: &str, n: u64) -> ServerSseMessage {
        ServerSseMessage::from_message((*note_with(token, n)).clone())
    }

    fn note_with(token: &str, n: u64) -> Arc<ServerJsonRpcMessage> {
        Arc::new(
            serde_json::from_value(json!({
                "jsonrpc": "2.0", "method": "notifications/progress",
                "params": {"progressToken": token, "progress": n}
            }))
            .unwrap(),
        )
    }

    fn values(evs: &[ServerSseMessage]) -> Vec<(String, u64)> {
        evs.iter()
            .filter_map(progress_key)
            .map(|(t, p)| (t, p as u64))
            .collect()
    }

    #[test]
    fn reorder_resequences_within_the_window_and_drops_stale_progress() {
        let w = Duration::from_millis(20);
        let mut r = Reorder::new(w);
        let t0 = Instant::now();
        assert!(r.push(progress_ev("a", 2), t0).is_empty(), "held");
        assert!(r.push(progress_ev("a", 1), t0).is_empty(), "held");
        assert!(r.push(progress_ev("b", 5), t0).is_empty());
        assert!(r.due(t0).is_empty(), "nothing due yet");
        let out = r.due(t0 + w);
        assert_eq!(
            values(&out),
            vec![
                ("\"a\"".into(), 1),
                ("\"a\"".into(), 2),
                ("\"b\"".into(), 5)
            ]
        );
        // Arriving after 2 was released: stale.
        assert!(r.push(progress_ev("a", 1), t0 + w).is_empty());
        assert!(r.flush().is_empty(), "the stale one is dropped, not held");
        // A result releases what is held, first.
        assert!(r.push(progress_ev("a", 3), t0 + w).is_empty());
        let result: ServerJsonRpcMessage = serde_json::from_value(json!({
            "jsonrpc": "2.0", "id": 1, "result": {"content": []}
        }))
        .unwrap();
        let out = r.push(ServerSseMessage::from_message(result), t0 + w);
        assert_eq!(out.len(), 2);
        assert_eq!(values(&out[..1]), vec![("\"a\"".into(), 3)]);
        assert!(progress_key(&out[1]).is_none(), "the result comes last");
    }

    #[test]
    fn reorder_with_no_window_passes_through_and_still_drops_stale() {
        let mut r = Reorder::new(Duration::ZERO);
        let t = Instant::now();
        assert_eq!(r.push(progress_ev("a", 2), t).len(), 1);
        assert!(r.push(progress_ev("a", 1), t).is_empty());
        assert_eq!(r.push(progress_ev("a", 3), t).len(), 1);
        let mut bounded = Reorder::new(Duration::from_secs(60));
        let mut released = 0;
        for n in 1..=(REORDER_HELD as u64 + 10) {
            released += bounded.push(progress_ev("x", n), t).len();
        }
        assert!(released >= 10, "a full hold releases: {released}");
        assert!(bounded.held.len() <= REORDER_HELD);
    }

    #[test]
    fn seq_goes_into_meta_of_every_message_kind() {
        let n: ServerJsonRpcMessage = serde_json::from_value(json!({
            "jsonrpc": "2.0", "method": "notifications/tools/list_changed"
        }))
        .unwrap();
        let v = with_seq(&n, Some("7"));
        assert_eq!(v["params"]["_meta"][SEQ_META], 7, "{v}");
        let r: ServerJsonRpcMessage = serde_json::from_value(json!({
            "jsonrpc": "2.0", "id": 1, "result": {"tools": []}
        }))
        .unwrap();
        let v = with_seq(&r, Some("8"));
        assert_eq!(v["result"]["_meta"][SEQ_META], 8, "{v}");
        assert_eq!(v["result"]["tools"], json!([]));
        let e: ServerJsonRpcMessage = serde_json::from_value(json!({
            "jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "no"}
        }))
        .unwrap();
        let v = with_seq(&e, Some("9"));
        assert_eq!(v["error"]["data"]["_meta"][SEQ_META], 9, "{v}");
        assert_eq!(with_seq(&e, None)["error"].get("data"), None);
    }
}
