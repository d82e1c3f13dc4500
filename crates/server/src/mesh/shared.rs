//! Shared state: per-tenant named CRDT documents (`meshgate_core::crdt`)
//! that agents read, change with operations and subscribe to.
//!
//! The gateway is a replica like any other, writing under its node id (kept
//! in the store, so it survives restarts). Each document has one async
//! mutex: an apply runs on a copy, is stored, and only then replaces the
//! document and goes out to the subscribers, while the mutex is still held.
//! So every subscriber gets the deltas in the order they were applied, the
//! `hash` in each `state.delta` is the gateway's hash after that delta, and
//! a failed store write changes nothing anyone can see.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshgate_core::crdt::{CrdtError, Document, parse_ops};
use meshgate_store::{MeshStore, StateDocRow, StateDocSummary};
use serde_json::{Value, json};

use super::{AgentTx, MeshError, Outbound, code, now_ms};

/// Longest document name.
const MAX_NAME: usize = 128;
/// A document nobody subscribes to leaves memory after this long unused.
const IDLE_EVICT: Duration = Duration::from_secs(300);

/// Checks a document name: 1 to 128 of `A-Z a-z 0-9 . _ : -`.
pub fn check_doc_name(name: &str) -> Result<(), MeshError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(MeshError::invalid(
            "doc",
            format!(
                "a document name has 1 to {MAX_NAME} characters, got {}",
                name.len()
            ),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(MeshError::invalid(
            "doc",
            format!("`{c}` is not allowed in a document name; use A-Z a-z 0-9 . _ : -"),
        ));
    }
    Ok(())
}

fn crdt_error(e: CrdtError) -> MeshError {
    MeshError::invalid(&e.field, e.message)
}

/// One document in memory.
struct Slot {
    /// `None` until loaded from the store.
    doc: Option<Loaded>,
    /// Connections that receive `state.delta`: (connection id, sender).
    subscribers: Vec<(u64, AgentTx)>,
    last_used: Instant,
}

struct Loaded {
    doc: Document,
    /// 0 for a document not stored yet.
    version: i64,
    hash: String,
}

/// What an apply did.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Operations applied.
    pub applied: usize,
    /// The delta, as canonical JSON.
    pub delta: Value,
    /// The document's hash afterwards.
    pub hash: String,
    /// The document's plain value afterwards.
    pub value: Value,
    /// The document's version afterwards.
    pub version: i64,
}

/// Every shared document of the gateway.
pub struct SharedState {
    store: Arc<dyn MeshStore>,
    node: String,
    max_doc_bytes: usize,
    max_ops: usize,
    max_docs: usize,
    slots: Mutex<HashMap<(String, String), SlotRef>>,
    /// Held while a new document is counted and first stored.
    creating: tokio::sync::Mutex<()>,
}

/// A document's slot, by (tenant, name).
type SlotRef = Arc<tokio::sync::Mutex<Slot>>;

impl SharedState {
    /// The shared state on `store`, writing as the store's node id.
    pub async fn open(
        store: Arc<dyn MeshStore>,
        cfg: &meshgate_core::config::MeshConfig,
    ) -> anyhow::Result<SharedState> {
        let candidate = format!("gw-{}", uuid::Uuid::new_v4().simple());
        let node = store.node_id(&candidate).await?;
        Ok(SharedState {
            store,
            node,
            max_doc_bytes: cfg.state_max_doc_bytes,
            max_ops: cfg.state_max_ops,
            max_docs: cfg.state_max_docs_per_tenant,
            slots: Mutex::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
        })
    }

    /// The replica id the gateway writes under.
    pub fn node_id(&self) -> &str {
        &self.node
    }

    fn slot(&self, tenant: &str, name: &str) -> SlotRef {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry((tenant.to_owned(), name.to_owned()))
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Slot {
                    doc: None,
                    subscribers: Vec::new(),
                    last_used: Instant::now(),
                }))
            })
            .clone()
    }

    async fn load<'a>(
        &self,
        slot: &'a mut Slot,
        tenant: &str,
        name: &str,
    ) -> Result<&'a mut Loaded, MeshError> {
        slot.last_used = Instant::now();
        if slot.doc.is_none() {
            let row = self
                .store
                .get_state_doc(tenant, name)
                .await
                .map_err(MeshError::store)?;
            let loaded = match row {
                Some(row) => {
                    let doc = Document::from_json(&row.state).map_err(|e| {
                        MeshError::new(
                            code::SERVER_ERROR,
                            500,
                            format!("the stored state of document `{name}` is corrupt ({e}); clear it with DELETE /api/v1/state/{name}"),
                            Value::Null,
                        )
                    })?;
                    let hash = doc.hash();
                    Loaded {
                        doc,
                        version: row.version,
                        hash,
                    }
                }
                None => {
                    let doc = Document::new();
                    let hash = doc.hash();
                    Loaded {
                        doc,
                        version: 0,
                        hash,
                    }
                }
            };
            slot.doc = Some(loaded);
        }
        slot.doc.as_mut().ok_or_else(|| {
            MeshError::new(
                code::SERVER_ERROR,
                500,
                "internal: document not loaded",
                Value::Null,
            )
        })
    }

    fn existing_slot(&self, tenant: &str, name: &str) -> Option<SlotRef> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(&(tenant.to_owned(), name.to_owned())).cloned()
    }

    /// Runs `f` on the document under its lock. A document that is neither
    /// in memory nor stored is read as empty without keeping a slot for it,
    /// so reads of made-up names cost no memory.
    async fn read<T>(
        &self,
        tenant: &str,
        name: &str,
        f: impl FnOnce(&Loaded) -> T,
    ) -> Result<T, MeshError> {
        check_doc_name(name)?;
        let slot = match self.existing_slot(tenant, name) {
            Some(slot) => slot,
            None => {
                let stored = self
                    .store
                    .get_state_doc(tenant, name)
                    .await
                    .map_err(MeshError::store)?;
                if stored.is_none() {
                    let doc = Document::new();
                    let hash = doc.hash();
                    return Ok(f(&Loaded {
                        doc,
                        version: 0,
                        hash,
                    }));
                }
                self.slot(tenant, name)
            }
        };
        let mut slot = slot.lock().await;
        let d = self.load(&mut slot, tenant, name).await?;
        Ok(f(d))
    }

    /// `state.get`: the plain value, hash, clock and version.
    pub async fn get(&self, tenant: &str, name: &str) -> Result<Value, MeshError> {
        self.read(tenant, name, |d| {
            json!({
                "doc": name,
                "value": d.doc.value(),
                "hash": d.hash,
                "clock": d.doc.clock(),
                "version": d.version,
            })
        })
        .await
    }

    /// `state.sync`: everything, the full CRDT state included, handed to
    /// `answer` while the document is locked: an agent subscribed to it
    /// gets the answer before any later delta, never after.
    pub async fn sync(
        &self,
        tenant: &str,
        name: &str,
        answer: impl FnOnce(Value),
    ) -> Result<(), MeshError> {
        self.read(tenant, name, |d| answer(snapshot(name, d))).await
    }

    /// `state.hash`: the digest and clock only.
    pub async fn hash(&self, tenant: &str, name: &str) -> Result<Value, MeshError> {
        self.read(
            tenant,
            name,
            |d| json!({"doc": name, "hash": d.hash, "clock": d.doc.clock(), "version": d.version}),
        )
        .await
    }

    /// `state.apply`: parses `ops`, applies them all or none, stores the
    /// document, then sends the delta to every subscriber.
    pub async fn apply(
        &self,
        tenant: &str,
        name: &str,
        ops: &Value,
        writer: &str,
    ) -> Result<Applied, MeshError> {
        check_doc_name(name)?;
        let ops = parse_ops(ops, self.max_ops).map_err(crdt_error)?;
        self.apply_ops(tenant, name, &ops, writer).await
    }

    /// Removes every key of a document, keeping its clock so that late
    /// deltas cannot bring removed data back.
    pub async fn clear(
        &self,
        tenant: &str,
        name: &str,
        writer: &str,
    ) -> Result<Applied, MeshError> {
        let (version, ops) = self
            .read(tenant, name, |d| (d.version, d.doc.clear_ops()))
            .await?;
        if version == 0 {
            return Err(MeshError::not_found("document", name));
        }
        self.apply_ops(tenant, name, &ops, writer).await
    }

    async fn apply_ops(
        &self,
        tenant: &str,
        name: &str,
        ops: &[meshgate_core::crdt::Op],
        writer: &str,
    ) -> Result<Applied, MeshError> {
        let slot = self.slot(tenant, name);
        let mut slot = slot.lock().await;
        let d = self.load(&mut slot, tenant, name).await?;
        // New documents are created one at a time, so concurrent first
        // writes cannot pass the per-tenant limit together.
        let _creating = if d.version == 0 {
            Some(self.creating.lock().await)
        } else {
            None
        };
        if d.version == 0 {
            let count = self
                .store
                .list_state_docs(tenant)
                .await
                .map_err(MeshError::store)?
                .len();
            if count >= self.max_docs {
                return Err(MeshError::new(
                    code::TOO_LARGE,
                    413,
                    format!(
                        "your tenant already holds {count} shared documents (mesh.state_max_docs_per_tenant); write to an existing document instead (a cleared one still counts), or ask the operator to raise the limit"
                    ),
                    json!({"limit": self.max_docs}),
                ));
            }
        }
        let mut next = d.doc.clone();
        let delta = next
            .apply(&self.node, ops, now_ms().max(0) as u64)
            .map_err(crdt_error)?;
        let state = next.to_json();
        let size = state.to_string().len();
        if size > self.max_doc_bytes {
            return Err(MeshError::new(
                code::TOO_LARGE,
                413,
                format!(
                    "document `{name}` would grow to {size} bytes, over mesh.state_max_doc_bytes ({}); remove keys or split it into several documents",
                    self.max_doc_bytes
                ),
                json!({"size": size, "limit": self.max_doc_bytes}),
            ));
        }
        let hash = next.hash();
        let version = d.version + 1;
        self.store
            .put_state_doc(&StateDocRow {
                tenant: tenant.to_owned(),
                name: name.to_owned(),
                state,
                hash: hash.clone(),
                version,
                size: size as i64,
                updated_at: now_ms(),
            })
            .await
            .map_err(MeshError::store)?;
        d.doc = next;
        d.hash = hash.clone();
        d.version = version;
        let value = d.doc.value();
        let delta = delta.to_json();
        tracing::debug!(
            tenant,
            doc = name,
            writer,
            ops = ops.len(),
            version,
            "mesh: state applied"
        );
        metrics::counter!("agent_state_ops_total").increment(ops.len() as u64);
        let push = json!({
            "jsonrpc": "2.0",
            "method": "state.delta",
            "params": {"doc": name, "delta": &delta, "hash": &hash, "version": version},
        })
        .to_string();
        let before = slot.subscribers.len();
        slot.subscribers
            .retain(|(_, tx)| tx.send(Outbound::Text(push.clone())).is_ok());
        let gone = before - slot.subscribers.len();
        if gone > 0 {
            metrics::gauge!("agent_state_subscriptions").decrement(gone as f64);
        }
        Ok(Applied {
            applied: ops.len(),
            delta,
            hash,
            value,
            version,
        })
    }

    /// `state.subscribe`: hands the full snapshot to `answer` and, from
    /// then on, sends `state.delta` notifications to `tx` in order, all
    /// under the document's lock, so the answer precedes every delta after
    /// it. Subscribing twice is harmless.
    pub async fn subscribe(
        &self,
        tenant: &str,
        name: &str,
        conn: u64,
        tx: &AgentTx,
        answer: impl FnOnce(Value),
    ) -> Result<(), MeshError> {
        check_doc_name(name)?;
        let slot = self.slot(tenant, name);
        let mut slot = slot.lock().await;
        let snap = {
            let d = self.load(&mut slot, tenant, name).await?;
            snapshot(name, d)
        };
        if !slot.subscribers.iter().any(|(c, _)| *c == conn) {
            slot.subscribers.push((conn, tx.clone()));
            metrics::gauge!("agent_state_subscriptions").increment(1.0);
        }
        answer(snap);
        Ok(())
    }

    /// `state.unsubscribe`; true if the connection was subscribed.
    pub async fn unsubscribe(&self, tenant: &str, name: &str, conn: u64) -> bool {
        let Some(slot) = self.existing_slot(tenant, name) else {
            return false;
        };
        let mut slot = slot.lock().await;
        let before = slot.subscribers.len();
        slot.subscribers.retain(|(c, _)| *c != conn);
        let removed = slot.subscribers.len() < before;
        if removed {
            metrics::gauge!("agent_state_subscriptions").decrement(1.0);
        }
        removed
    }

    /// Documents of a tenant, by name.
    pub async fn list(&self, tenant: &str) -> Result<Vec<StateDocSummary>, MeshError> {
        self.store
            .list_state_docs(tenant)
            .await
            .map_err(MeshError::store)
    }

    /// Drops documents that nobody subscribes to and nobody used lately.
    pub fn evict_idle(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slot| {
            // A slot in use (locked, or referenced by an operation) stays.
            Arc::strong_count(slot) > 1
                || slot.try_lock().map_or(true, |s| {
                    !s.subscribers.is_empty() || s.last_used.elapsed() < IDLE_EVICT
                })
        });
    }
}

fn snapshot(name: &str, d: &Loaded) -> Value {
    json!({
        "doc": name,
        "state": d.doc.to_json(),
        "hash": d.hash,
        "value": d.doc.value(),
        "clock": d.doc.clock(),
        "version": d.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_names_are_checked() {
        assert!(check_doc_name("board").is_ok());
        assert!(check_doc_name("team-1:plan.v2_x").is_ok());
        let e = check_doc_name("").unwrap_err();
        assert!(e.message.contains("1 to 128"), "{}", e.message);
        let e = check_doc_name("a/b").unwrap_err();
        assert!(e.message.contains("`/` is not allowed"), "{}", e.message);
        assert!(check_doc_name(&"x".repeat(129)).is_err());
    }
}
