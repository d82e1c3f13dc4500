//! The bounded outbound queue of one client session: every notification the
//! gateway sends a client on its own (relayed progress, log messages, resource
//! updates, list changes) goes through it, so a client that stops reading
//! costs a bounded amount of memory and never stalls the upstream connection
//! that produced the message (a stdio upstream's one connection serves every
//! client).
//!
//! Responses do not pass through here (rmcp sends them), so they are never
//! dropped. Above configurable thresholds of pending messages the queue
//! degrades in grades: *bundle* (a newer progress notification of the same
//! call replaces the queued one; list changes and resource updates are
//! de-duplicated), *slow* (each producer is held a few milliseconds), *drop*
//! (droppable notifications, progress and logs below `warning`, are
//! discarded). Entering a grade sends the client a `notifications/message`
//! at level `warning` from logger `meshgate.backpressure`, and counts
//! `gateway_backpressure_events_total{grade}`.

// Logging is deprecated in MCP 2026-07-28 but part of every session revision.
#![allow(deprecated)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshgate_core::config::BackpressureConfig;
use rmcp::RoleServer;
use rmcp::model::{
    LoggingLevel, LoggingMessageNotification, LoggingMessageNotificationParam,
    ProgressNotification, ProgressNotificationParam, ProgressToken, ServerNotification,
};
use rmcp::service::Peer;
use serde_json::json;
use tokio::sync::Notify;

/// How degraded a client's queue is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grade {
    /// Below every threshold.
    Normal,
    /// Progress bundled, duplicates merged.
    Bundle,
    /// Producers held back.
    Slow,
    /// Droppable notifications dropped.
    Drop,
}

impl Grade {
    fn label(self) -> &'static str {
        match self {
            Grade::Normal => "normal",
            Grade::Bundle => "bundle",
            Grade::Slow => "slow",
            Grade::Drop => "drop",
        }
    }
}

/// A `notifications/message` at level `warning` from `logger`.
pub fn warning(logger: &str, data: serde_json::Value) -> ServerNotification {
    ServerNotification::LoggingMessageNotification(LoggingMessageNotification::new(
        LoggingMessageNotificationParam::new(LoggingLevel::Warning, data).with_logger(logger),
    ))
}

/// What a queued notification may be merged with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MergeKey {
    Progress(ProgressToken),
    ToolsChanged,
    PromptsChanged,
    ResourcesChanged,
    ResourceUpdated(String),
}

struct Queued {
    n: ServerNotification,
    key: Option<MergeKey>,
}

struct Inner {
    queue: VecDeque<Queued>,
    sending: bool,
    sending_key: Option<MergeKey>,
    grade: Option<Grade>,
    /// Highest grade told to the client since the queue was last empty.
    announced: Grade,
    sent: u64,
    bundled: u64,
    dropped: u64,
    slowed: u64,
    peak: usize,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            queue: VecDeque::new(),
            sending: false,
            sending_key: None,
            grade: None,
            announced: Grade::Normal,
            sent: 0,
            bundled: 0,
            dropped: 0,
            slowed: 0,
            peak: 0,
        }
    }
}

impl Inner {
    fn pending(&self) -> usize {
        self.queue.len() + usize::from(self.sending)
    }
}

/// Counters of one client's queue, for stats and per-client health.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxStats {
    /// Messages queued or being sent now.
    pub pending: usize,
    /// Most pending at once.
    pub peak_pending: usize,
    /// Current grade.
    pub grade: Grade,
    /// Notifications delivered to the transport.
    pub sent: u64,
    /// Notifications merged into a newer one.
    pub bundled: u64,
    /// Droppable notifications dropped.
    pub dropped: u64,
    /// Times a producer was held back.
    pub slowed: u64,
}

/// The outbound notification queue of one client session.
pub struct Outbox {
    peer: Peer<RoleServer>,
    cfg: BackpressureConfig,
    inner: Mutex<Inner>,
    wake: Notify,
    space: Notify,
    closed: AtomicBool,
}

fn classify(n: &ServerNotification) -> (Option<MergeKey>, bool) {
    match n {
        ServerNotification::ProgressNotification(p) => (
            Some(MergeKey::Progress(p.params.progress_token.clone())),
            true,
        ),
        ServerNotification::LoggingMessageNotification(l) => (
            None,
            matches!(
                l.params.level,
                LoggingLevel::Debug | LoggingLevel::Info | LoggingLevel::Notice
            ),
        ),
        ServerNotification::ToolListChangedNotification(_) => (Some(MergeKey::ToolsChanged), false),
        ServerNotification::PromptListChangedNotification(_) => {
            (Some(MergeKey::PromptsChanged), false)
        }
        ServerNotification::ResourceListChangedNotification(_) => {
            (Some(MergeKey::ResourcesChanged), false)
        }
        ServerNotification::ResourceUpdatedNotification(r) => {
            (Some(MergeKey::ResourceUpdated(r.params.uri.clone())), false)
        }
        _ => (None, false),
    }
}

impl Outbox {
    /// A queue delivering to `peer`, with its sender task.
    pub fn start(peer: Peer<RoleServer>, cfg: BackpressureConfig) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox {
            peer,
            cfg,
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            space: Notify::new(),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(outbox.clone().deliver());
        outbox
    }

    /// The client this queue delivers to (for requests, which bypass it).
    pub fn peer(&self) -> &Peer<RoleServer> {
        &self.peer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn grade_for(&self, pending: usize) -> Grade {
        if pending >= self.cfg.drop_at {
            Grade::Drop
        } else if pending >= self.cfg.slow_at {
            Grade::Slow
        } else if pending >= self.cfg.bundle_at {
            Grade::Bundle
        } else {
            Grade::Normal
        }
    }

    /// Queues a progress notification.
    pub async fn progress(&self, params: ProgressNotificationParam) {
        self.push(ServerNotification::ProgressNotification(
            ProgressNotification::new(params),
        ))
        .await
    }

    /// Queues `n`, applying the grade the queue is in.
    pub async fn push(&self, n: ServerNotification) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let (key, droppable) = classify(&n);
        let mut item = Some(Queued { n, key });
        let mut slowed = false;
        loop {
            let wait = {
                let mut inner = self.lock();
                let grade = self.grade_for(inner.pending());
                self.note_grade(&mut inner, grade);
                let queued = item.take();
                let Some(q) = queued else { return };
                if grade >= Grade::Bundle
                    && let Some(k) = &q.key
                    && let Some(slot) = inner.queue.iter_mut().find(|e| e.key.as_ref() == Some(k))
                {
                    // Progress: the newer value replaces the older in place;
                    // list changes and resource updates are idempotent.
                    if matches!(k, MergeKey::Progress(_)) {
                        slot.n = q.n;
                    }
                    inner.bundled += 1;
                    metrics::counter!("gateway_backpressure_bundled_total").increment(1);
                    return;
                }
                if grade == Grade::Drop && droppable {
                    inner.dropped += 1;
                    metrics::counter!("gateway_backpressure_dropped_total").increment(1);
                    return;
                }
                if grade >= Grade::Slow && !slowed {
                    slowed = true;
                    inner.slowed += 1;
                    item = Some(q);
                    Some(Duration::from_millis(self.cfg.slow_delay_ms))
                } else if inner.queue.len() >= self.cfg.capacity {
                    item = Some(q);
                    None
                } else {
                    inner.queue.push_back(q);
                    let pending = inner.pending();
                    inner.peak = inner.peak.max(pending);
                    metrics::gauge!("gateway_outbound_pending").increment(1.0);
                    drop(inner);
                    self.wake.notify_one();
                    return;
                }
            };
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => {
                    // Full of messages that may not be dropped: wait for room,
                    // but never forever (a client that is gone frees it anyway).
                    let room = self.space.notified();
                    if tokio::time::timeout(Duration::from_secs(5), room)
                        .await
                        .is_err()
                    {
                        let mut inner = self.lock();
                        inner.dropped += 1;
                        metrics::counter!("gateway_backpressure_dropped_total").increment(1);
                        tracing::warn!(
                            pending = inner.pending(),
                            "client queue full for 5 s; a notification was dropped"
                        );
                        return;
                    }
                    if self.closed.load(Ordering::Acquire) {
                        return;
                    }
                }
            }
        }
    }

    /// Records a grade change and tells the client of a grade it has not
    /// been told of since the queue was last empty (so a queue hovering at a
    /// threshold does not repeat the notice).
    fn note_grade(&self, inner: &mut Inner, grade: Grade) {
        if inner.pending() == 0 {
            inner.announced = Grade::Normal;
        }
        let previous = inner.grade.unwrap_or(Grade::Normal);
        if grade == previous {
            return;
        }
        inner.grade = Some(grade);
        if grade <= inner.announced {
            return;
        }
        inner.announced = grade;
        metrics::counter!("gateway_backpressure_events_total", "grade" => grade.label())
            .increment(1);
        let what = match grade {
            Grade::Bundle => "progress notifications of one call are merged into the latest",
            Grade::Slow => "message producers are being held back",
            Grade::Drop => {
                "progress notifications and log messages below warning are being dropped"
            }
            Grade::Normal => return,
        };
        let params = LoggingMessageNotificationParam::new(
            LoggingLevel::Warning,
            json!({
                "message": format!("meshgate: you are reading slowly ({} messages pending); {what}. Responses are never dropped.", inner.pending()),
                "grade": grade.label(),
                "pending": inner.pending(),
                "dropped": inner.dropped,
                "bundled": inner.bundled,
            }),
        )
        .with_logger("meshgate.backpressure");
        // The signal itself goes to the front, so the client learns early.
        inner.queue.push_front(Queued {
            n: ServerNotification::LoggingMessageNotification(LoggingMessageNotification::new(
                params,
            )),
            key: None,
        });
        metrics::gauge!("gateway_outbound_pending").increment(1.0);
    }

    async fn deliver(self: Arc<Self>) {
        loop {
            let next = {
                let mut inner = self.lock();
                let n = inner.queue.pop_front();
                inner.sending = n.is_some();
                inner.sending_key = n.as_ref().and_then(|q| q.key.clone());
                n
            };
            let Some(q) = next else {
                if self.closed.load(Ordering::Acquire) || self.peer.is_transport_closed() {
                    return;
                }
                let woken = self.wake.notified();
                // Re-check after registering, so a push in between is not missed.
                if !self.lock().queue.is_empty() {
                    continue;
                }
                tokio::select! {
                    _ = woken => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            };
            metrics::gauge!("gateway_outbound_pending").decrement(1.0);
            self.space.notify_waiters();
            let sent = self.peer.send_notification(q.n).await;
            {
                let mut inner = self.lock();
                inner.sending = false;
                inner.sending_key = None;
                if sent.is_ok() {
                    inner.sent += 1;
                }
                let grade = self.grade_for(inner.pending());
                self.note_grade(&mut inner, grade);
            }
            if sent.is_err() && self.peer.is_transport_closed() {
                self.close();
                return;
            }
        }
    }

    /// Waits until the queue is empty, at most `limit`, so that what the
    /// upstream sent before a result reaches the client before it; progress
    /// of `token` still queued then is dropped, because its call has ended.
    pub async fn settle(&self, token: Option<&ProgressToken>, limit: Duration) {
        let key = token.map(|t| MergeKey::Progress(t.clone()));
        let deadline = tokio::time::Instant::now() + limit;
        // Notification handlers run as their own tasks: let those already
        // spawned for progress that arrived before the result queue it.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        loop {
            // Everything queued before the result (its progress, and log
            // messages the upstream sent while answering) goes out first.
            let queued = self.lock().pending() > 0;
            if !queued {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let mut inner = self.lock();
                let before = inner.queue.len();
                inner
                    .queue
                    .retain(|q| key.is_none() || q.key.as_ref() != key.as_ref());
                let removed = before - inner.queue.len();
                inner.dropped += removed as u64;
                metrics::gauge!("gateway_outbound_pending").decrement(removed as f64);
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The queue's counters.
    pub fn stats(&self) -> OutboxStats {
        let inner = self.lock();
        OutboxStats {
            pending: inner.pending(),
            peak_pending: inner.peak,
            grade: inner.grade.unwrap_or(Grade::Normal),
            sent: inner.sent,
            bundled: inner.bundled,
            dropped: inner.dropped,
            slowed: inner.slowed,
        }
    }

    /// Stops delivery and frees the queue (the session ended).
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut inner = self.lock();
        let n = inner.queue.len();
        inner.queue.clear();
        metrics::gauge!("gateway_outbound_pending").decrement(n as f64);
        drop(inner);
        self.wake.notify_one();
        self.space.notify_waiters();
    }
}
