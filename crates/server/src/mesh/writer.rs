//! Group commit: operations queue their rows and the messages those rows
//! allow; one task writes everything queued in one transaction, then sends
//! the messages in order. Nothing is announced before it is stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use meshgate_store::{AgentRow, MeshStore, TaskRow};
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};

use super::{AgentTx, Outbound, TaskUpdate};

/// Largest number of queued jobs written in one transaction.
const MAX_JOBS: usize = 512;

/// Something to do once a batch is stored.
pub(super) enum After {
    /// A message to an agent.
    Send(AgentTx, Outbound),
    /// The answer to an agent's request (turned into error 4003 if the
    /// store failed).
    Reply(AgentTx, Value, Value),
    /// A task update for subscribers.
    Event(Arc<TaskUpdate>),
    /// Run the dispatcher again.
    Wake,
    /// Nothing (an update nobody listens to).
    Nothing,
}

/// Rows to store and what to do after.
#[derive(Default)]
pub(super) struct Batch {
    pub tasks: Vec<TaskRow>,
    pub agents: Vec<AgentRow>,
    pub after: Vec<After>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty() && self.agents.is_empty() && self.after.is_empty()
    }
    pub fn extend(&mut self, other: Batch) {
        self.tasks.extend(other.tasks);
        self.agents.extend(other.agents);
        self.after.extend(other.after);
    }
}

struct Job {
    batch: Batch,
    ack: Option<oneshot::Sender<Result<(), String>>>,
}

/// Handle of the writer task.
pub(super) struct Writer {
    tx: mpsc::UnboundedSender<Job>,
}

impl Writer {
    pub fn start(
        store: Arc<dyn MeshStore>,
        events: broadcast::Sender<Arc<TaskUpdate>>,
        wake: Arc<Notify>,
    ) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, rx, events, wake));
        Writer { tx }
    }

    pub fn submit(&self, batch: Batch, ack: Option<oneshot::Sender<Result<(), String>>>) {
        if let Err(e) = self.tx.send(Job { batch, ack })
            && let Some(ack) = e.0.ack
        {
            let _ = ack.send(Err("the mesh writer has stopped".into()));
        }
    }
}

async fn write(
    store: &dyn MeshStore,
    tasks: &[TaskRow],
    agents: &[AgentRow],
) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
        }
        let r = async {
            if !tasks.is_empty() {
                store.write_tasks(tasks).await?;
            }
            for a in agents {
                store.put_agent(a).await?;
            }
            Ok::<(), meshgate_store::StoreError>(())
        }
        .await;
        match r {
            Ok(()) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

async fn run(
    store: Arc<dyn MeshStore>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    events: broadcast::Sender<Arc<TaskUpdate>>,
    wake: Arc<Notify>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_JOBS);
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        while jobs.len() < MAX_JOBS {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // The newest row of each task and agent wins; order of first
        // appearance is kept.
        let mut tasks: Vec<TaskRow> = Vec::new();
        let mut task_at: HashMap<String, usize> = HashMap::new();
        let mut agents: Vec<AgentRow> = Vec::new();
        for job in &mut jobs {
            for row in job.batch.tasks.drain(..) {
                match task_at.get(&row.id) {
                    Some(&i) => tasks[i] = row,
                    None => {
                        task_at.insert(row.id.clone(), tasks.len());
                        tasks.push(row);
                    }
                }
            }
            for row in job.batch.agents.drain(..) {
                match agents.iter_mut().find(|a| a.id == row.id) {
                    Some(a) => *a = row,
                    None => agents.push(row),
                }
            }
        }
        let started = std::time::Instant::now();
        let result = write(store.as_ref(), &tasks, &agents).await;
        metrics::histogram!("agent_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("agent_store_rows_written_total").increment(tasks.len() as u64);
        if let Err(e) = &result {
            tracing::error!(error = %e, rows = tasks.len(), "mesh: storing task changes failed; they are not announced");
            metrics::counter!("gateway_errors_total", "type" => "mesh_store").increment(1);
        }
        for job in jobs.drain(..) {
            for a in job.batch.after {
                match (a, &result) {
                    (After::Send(tx, msg), Ok(())) => {
                        let _ = tx.send(msg);
                    }
                    (After::Reply(tx, id, res), Ok(())) => {
                        let msg = json!({"jsonrpc": "2.0", "id": id, "result": res});
                        let _ = tx.send(Outbound::Text(msg.to_string()));
                    }
                    (After::Reply(tx, id, _), Err(e)) => {
                        let msg = json!({"jsonrpc": "2.0", "id": id, "error": {"code": super::code::SERVER_ERROR, "message": format!("the task store failed: {e}; retry the request")}});
                        let _ = tx.send(Outbound::Text(msg.to_string()));
                    }
                    (After::Event(ev), Ok(())) => {
                        if events.receiver_count() > 0 {
                            let _ = events.send(ev);
                        }
                    }
                    (After::Wake, _) => wake.notify_one(),
                    (After::Nothing, _) => {}
                    (_, Err(_)) => {}
                }
            }
            if let Some(ack) = job.ack {
                let _ = ack.send(result.clone());
            }
        }
    }
}
