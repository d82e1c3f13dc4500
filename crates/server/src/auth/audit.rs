//! The audit log writer: entries go over a bounded queue to one task that
//! writes them in batches (one transaction per batch), so a tool call never
//! waits on the database; a full queue makes the caller wait rather than lose
//! an entry, and shutdown waits for the queue to drain ([`Audit::flush`]). A
//! second task applies the retention policy hourly.

use std::sync::Arc;
use std::time::Duration;

use meshgate_core::Principal;
use meshgate_core::config::AuditConfig;
use meshgate_store::{AuditRecord, Store, now_ms};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Entries waiting to be written, at most.
const QUEUE: usize = 8192;
/// Entries written per transaction, at most.
const BATCH: usize = 512;

/// What the writer task receives. Nearly every message is an entry, so it is
/// kept inline rather than boxed.
#[allow(clippy::large_enum_variant)]
enum Message {
    Entry(AuditRecord),
    /// Answered once everything queued before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Handle to the audit writer.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Message>,
}

impl Audit {
    /// Starts the writer and the retention task.
    pub fn start(
        store: Arc<dyn Store>,
        retention: AuditConfig,
        shutdown: CancellationToken,
    ) -> Audit {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(store.clone(), rx));
        tokio::spawn(retention_loop(store, retention, shutdown));
        Audit { tx }
    }

    /// Queues an entry; waits for room when the queue is full.
    pub async fn record(&self, record: AuditRecord) {
        match self.tx.try_send(Message::Entry(record)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(r)) => {
                metrics::counter!("audit_queue_full_total").increment(1);
                let _ = self.tx.send(r).await;
            }
            Err(mpsc::error::TrySendError::Closed(Message::Entry(r))) => {
                tracing::error!(tenant = %r.tenant, actor = %r.actor, action = %r.action, target = %r.target, outcome = %r.outcome, "audit writer is gone; entry logged here instead");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Waits (up to `limit`) until every entry queued so far is written; used
    /// on shutdown so that the last calls are not lost.
    pub async fn flush(&self, limit: Duration) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Message::Flush(tx)).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(limit, rx).await, Ok(Ok(())))
    }

    /// Queues an entry from synchronous code (lockout): never blocks; a full
    /// queue hands the entry to a task that waits for room.
    pub fn record_system(
        &self,
        tenant: &str,
        action: &str,
        target: &str,
        outcome: &str,
        detail: serde_json::Value,
    ) {
        let record = AuditRecord {
            id: 0,
            at: now_ms(),
            tenant: tenant.to_owned(),
            actor: "meshgate".into(),
            actor_kind: "system".into(),
            action: action.to_owned(),
            target: target.to_owned(),
            args_hash: None,
            outcome: outcome.to_owned(),
            latency_ms: None,
            trace_id: None,
            detail,
        };
        if let Err(mpsc::error::TrySendError::Full(r)) = self.tx.try_send(Message::Entry(record)) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(r).await;
            });
        }
    }
}

/// An entry for an action by `principal`.
pub fn entry(
    principal: &Principal,
    action: &str,
    target: &str,
    outcome: &str,
    trace_id: Option<&str>,
    detail: serde_json::Value,
) -> AuditRecord {
    AuditRecord {
        id: 0,
        at: now_ms(),
        tenant: principal.tenant.clone(),
        actor: principal.subject.clone(),
        actor_kind: principal.kind.as_str().to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        args_hash: None,
        outcome: outcome.to_owned(),
        latency_ms: None,
        trace_id: trace_id.map(str::to_owned),
        detail,
    }
}

async fn write_loop(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Message>) {
    let mut messages = Vec::with_capacity(BATCH);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        messages.clear();
        if rx.recv_many(&mut messages, BATCH).await == 0 {
            return;
        }
        batch.clear();
        let mut flushes = Vec::new();
        for m in messages.drain(..) {
            match m {
                Message::Entry(r) => batch.push(r),
                Message::Flush(done) => flushes.push(done),
            }
        }
        write_batch(store.as_ref(), &batch).await;
        for done in flushes {
            let _ = done.send(());
        }
    }
}

async fn write_batch(store: &dyn Store, batch: &[AuditRecord]) {
    if batch.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=5 {
        match store.append_audit(batch).await {
            Ok(()) => {
                metrics::counter!("audit_entries_written_total").increment(batch.len() as u64);
                break;
            }
            Err(e) if attempt < 5 => {
                tracing::warn!(error = %e, attempt, entries = batch.len(), "audit write failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                metrics::counter!("audit_write_failures_total").increment(batch.len() as u64);
                for r in batch {
                    tracing::error!(error = %e, tenant = %r.tenant, actor = %r.actor, action = %r.action, target = %r.target, outcome = %r.outcome, "audit entry could not be stored");
                }
            }
        }
    }
}

async fn retention_loop(store: Arc<dyn Store>, config: AuditConfig, shutdown: CancellationToken) {
    if config.retention_days == 0 && config.max_entries == 0 {
        return;
    }
    loop {
        let before = if config.retention_days == 0 {
            0
        } else {
            now_ms() - (config.retention_days as i64) * 86_400_000
        };
        match store.purge_audit(before, config.max_entries).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "audit retention applied"),
            Err(e) => tracing::warn!(error = %e, "audit retention failed; retrying in an hour"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
