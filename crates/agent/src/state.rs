//! Shared CRDT state: handles to the tenant's documents on the gateway, and
//! the local replicas of the subscribed ones.
//!
//! A subscribed document's replica starts from the gateway's snapshot and
//! merges every `state.delta` the gateway pushes. After each merge the
//! replica's hash is compared with the gateway's hash after that delta; a
//! difference means the replica missed something, and a `state.sync`
//! replaces it. Snapshots and sync answers are installed on the reader's
//! task (by answer hooks), so they take their place in the gateway's order
//! of deltas. Subscriptions outlive connections: every registration
//! subscribes again and the snapshot replaces the replica.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use meshgate_core::crdt::Document;
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::agent::Shared;
use crate::rpc::{AnswerHook, Session};
use crate::{AgentError, AgentEvent};

/// A document's value and hash as the gateway holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StateView {
    /// The document's plain JSON value (counters as numbers, sets as
    /// arrays, registers as their value).
    pub value: Value,
    /// The gateway's hash of the document.
    pub hash: String,
    /// The document's vector clock.
    pub clock: Value,
}

/// What `state.apply` did.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyOutcome {
    /// How many operations the gateway applied.
    pub applied: u64,
    /// The gateway's hash of the document afterwards.
    pub hash: String,
    /// The document's value afterwards.
    pub value: Value,
    /// The change, as a document (`Document::to_json`).
    pub delta: Value,
}

/// A cloneable line to one shared document of the agent's tenant, from
/// [`Agent::state`](crate::Agent::state) or
/// [`TaskContext::state`](crate::TaskContext::state). Requests need a
/// registered connection and fail with [`AgentError::NotConnected`] while
/// the agent reconnects, except [`subscribe`](Self::subscribe), which waits.
///
/// ```no_run
/// # async fn example(ctx: meshgate_agent::TaskContext) -> Result<(), meshgate_agent::AgentError> {
/// use serde_json::json;
///
/// let board = ctx.state("board");
/// board.subscribe().await?;
/// let hit = json!({"op": "counter.increment", "path": "hits", "by": 1});
/// let outcome = board.apply(vec![hit]).await?;
/// println!("gateway {} / local {:?}", outcome.hash, board.local_hash());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct StateHandle {
    doc: Arc<str>,
    shared: Arc<Shared>,
}

impl StateHandle {
    pub(crate) fn new(shared: Arc<Shared>, doc: &str) -> Self {
        Self {
            doc: doc.into(),
            shared,
        }
    }

    /// The document's name.
    pub fn doc(&self) -> &str {
        &self.doc
    }

    /// The document's value, hash and clock on the gateway (`state.get`).
    pub async fn get(&self) -> Result<StateView, AgentError> {
        let answer = self.request("state.get").await?;
        view_of("state.get", &answer)
    }

    /// Applies operations (`state.apply`), passed through as the gateway
    /// takes them, e.g. `{"op": "counter.increment", "path": "hits", "by": 1}`.
    /// A subscribed replica merges the returned delta at once.
    pub async fn apply(&self, ops: Vec<Value>) -> Result<ApplyOutcome, AgentError> {
        let session = self.session()?;
        let shared = self.shared.clone();
        let doc = self.doc.clone();
        let hook: AnswerHook = Box::new(move |answer| {
            if let Ok(answer) = answer
                && let Some(delta) = answer.get("delta")
            {
                shared.states.merge_own(&doc, delta);
            }
        });
        let params = json!({"doc": &*self.doc, "ops": ops});
        let answer = session
            .request_with("state.apply", params, Some(hook))
            .await?;
        Ok(ApplyOutcome {
            applied: answer.get("applied").and_then(Value::as_u64).unwrap_or(0),
            hash: hash_of("state.apply", &answer)?,
            value: answer.get("value").cloned().unwrap_or(Value::Null),
            delta: answer.get("delta").cloned().unwrap_or(Value::Null),
        })
    }

    /// Subscribes: keeps a local replica from the gateway's snapshot and
    /// pushed deltas, on this connection and every later one, until
    /// [`unsubscribe`](Self::unsubscribe). Waits for a registered connection
    /// if there is none; returns the snapshot. An error other than a lost
    /// connection (a refusal such as a bad document name, a timeout) drops
    /// the subscription.
    pub async fn subscribe(&self) -> Result<StateView, AgentError> {
        self.shared.states.want(&self.doc);
        loop {
            let session = self
                .shared
                .wait_for_session()
                .await
                .ok_or(AgentError::Closed)?;
            match subscribe_on(&self.shared, &session, &self.doc).await {
                Ok(view) => return Ok(view),
                // The next registration subscribes again; wait for it.
                Err(AgentError::Closed | AgentError::NotConnected) => {
                    tokio::select! {
                        () = session.wait_closed() => {}
                        () = self.shared.stopped.cancelled() => return Err(AgentError::Closed),
                    }
                }
                Err(err) => {
                    self.shared.states.forget_unestablished(&self.doc);
                    return Err(err);
                }
            }
        }
    }

    /// Ends the subscription and drops the local replica.
    pub async fn unsubscribe(&self) -> Result<(), AgentError> {
        self.shared.states.forget(&self.doc);
        match self.shared.current_session() {
            // The next connection does not subscribe again.
            None => Ok(()),
            Some(session) => session
                .request("state.unsubscribe", json!({"doc": &*self.doc}))
                .await
                .map(|_| ()),
        }
    }

    /// The gateway's hash of the document (`state.hash`).
    pub async fn gateway_hash(&self) -> Result<String, AgentError> {
        let answer = self.request("state.hash").await?;
        hash_of("state.hash", &answer)
    }

    /// Fetches the whole document (`state.sync`); a subscribed replica is
    /// replaced by it.
    pub async fn sync(&self) -> Result<StateView, AgentError> {
        let session = self.session()?;
        let hook = install_hook(&self.shared, &self.doc, Installed::Resynced);
        let answer = session
            .request_with("state.sync", json!({"doc": &*self.doc}), Some(hook))
            .await?;
        view_of("state.sync", &answer)
    }

    /// The local replica's hash; `None` unless subscribed with a snapshot.
    pub fn local_hash(&self) -> Option<String> {
        self.shared.states.local_hash(&self.doc)
    }

    /// The local replica's value; `None` unless subscribed with a snapshot.
    pub fn local_value(&self) -> Option<Value> {
        self.shared.states.local_value(&self.doc)
    }

    /// Whether the document is subscribed (the replica may still wait for
    /// its snapshot).
    pub fn is_subscribed(&self) -> bool {
        self.shared.states.is_wanted(&self.doc)
    }

    fn session(&self) -> Result<Arc<Session>, AgentError> {
        self.shared
            .current_session()
            .ok_or(AgentError::NotConnected)
    }

    async fn request(&self, method: &str) -> Result<Value, AgentError> {
        self.session()?
            .request(method, json!({"doc": &*self.doc}))
            .await
    }
}

impl fmt::Debug for StateHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateHandle")
            .field("doc", &self.doc)
            .finish()
    }
}

/// Sends `state.subscribe` on `session`; the snapshot replaces the replica
/// when the answer arrives.
async fn subscribe_on(
    shared: &Arc<Shared>,
    session: &Session,
    doc: &str,
) -> Result<StateView, AgentError> {
    let hook = install_hook(shared, doc, Installed::Subscribed);
    let answer = session
        .request_with("state.subscribe", json!({"doc": doc}), Some(hook))
        .await?;
    view_of("state.subscribe", &answer)
}

/// Subscribes the session to every document that was subscribed on an
/// earlier connection (after a registration), in the background. A
/// `subscribe` call still waiting for its first snapshot sends its own
/// request, so no document is asked for twice.
pub(crate) fn resubscribe_all(shared: &Arc<Shared>, session: &Arc<Session>) {
    for doc in shared.states.established() {
        let shared_for_task = shared.clone();
        let session = session.clone();
        shared.tracker.spawn(async move {
            let shared = shared_for_task;
            match subscribe_on(&shared, &session, &doc).await {
                Ok(_) => debug!(doc, "subscribed again after registering"),
                Err(err @ AgentError::Rpc { .. }) => {
                    warn!(doc, error = %err, "the gateway refused the subscription; dropping it");
                    shared.states.forget(&doc);
                }
                Err(err) => {
                    debug!(doc, error = %err, "subscribing again failed; the next connection tries")
                }
            }
        });
    }
}

/// Merges a pushed `state.delta` into its replica, and resynchronizes the
/// replica when its hash then differs from the gateway's.
pub(crate) fn on_delta(shared: &Arc<Shared>, session: &Arc<Session>, params: &Value) {
    let Some(doc) = params.get("doc").and_then(Value::as_str) else {
        warn!("ignoring state.delta without doc");
        return;
    };
    let delta = match params.get("delta").map(Document::from_json) {
        Some(Ok(delta)) => delta,
        Some(Err(err)) => {
            warn!(doc, error = %err, "ignoring a state.delta whose delta is not a document");
            return;
        }
        None => {
            warn!(doc, "ignoring state.delta without delta");
            return;
        }
    };
    let expected = params.get("hash").and_then(Value::as_str);
    match shared.states.merge_pushed(doc, &delta, expected) {
        Merged::NotSubscribed => debug!(doc, "state.delta for a document not subscribed"),
        Merged::InStep(hash) => shared.emit(AgentEvent::StateChanged {
            doc: doc.to_string(),
            hash,
        }),
        Merged::Diverged { local, gateway } => {
            info!(
                doc,
                local, gateway, "the replica's hash differs from the gateway's; syncing"
            );
            shared.emit(AgentEvent::StateChanged {
                doc: doc.to_string(),
                hash: local,
            });
            resync(shared, session, doc);
        }
    }
}

/// Replaces the replica with the gateway's whole document, in the
/// background.
fn resync(shared: &Arc<Shared>, session: &Arc<Session>, doc: &str) {
    let hook = install_hook(shared, doc, Installed::Resynced);
    let shared_for_task = shared.clone();
    let session = session.clone();
    let doc = doc.to_string();
    shared.tracker.spawn(async move {
        let params = json!({"doc": &doc});
        if let Err(err) = session.request_with("state.sync", params, Some(hook)).await {
            warn!(doc, error = %err, "state.sync failed; the replica stays behind until the next delta or connection");
            shared_for_task.states.sync_failed(&doc);
        }
    });
}

/// Why a whole document was installed, for the event it leads to.
#[derive(Clone, Copy)]
enum Installed {
    Subscribed,
    Resynced,
}

/// A hook that installs a snapshot or sync answer (`{"state", "hash"}`) as
/// the replica of `doc`, if `doc` is subscribed.
fn install_hook(shared: &Arc<Shared>, doc: &str, why: Installed) -> AnswerHook {
    let shared = shared.clone();
    let doc = doc.to_string();
    Box::new(move |answer| {
        let Ok(answer) = answer else {
            return;
        };
        let document = match answer.get("state").map(Document::from_json) {
            Some(Ok(document)) => document,
            Some(Err(err)) => {
                warn!(doc, error = %err, "the gateway's state is not a document; replica unchanged");
                return;
            }
            None => {
                warn!(doc, "the gateway's answer has no state; replica unchanged");
                return;
            }
        };
        let gateway = answer.get("hash").and_then(Value::as_str);
        let Some(hash) = shared.states.install(&doc, document, gateway) else {
            return;
        };
        shared.emit(match why {
            Installed::Subscribed => AgentEvent::StateSubscribed { doc, hash },
            Installed::Resynced => AgentEvent::StateResynced { doc, hash },
        });
    })
}

fn hash_of(method: &str, answer: &Value) -> Result<String, AgentError> {
    answer
        .get("hash")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| AgentError::Protocol(format!("{method} answer without hash: {answer}")))
}

/// A view from a `state.get`, `state.sync` or `state.subscribe` answer; the
/// clock comes from the answer or else from its document.
fn view_of(method: &str, answer: &Value) -> Result<StateView, AgentError> {
    let clock = match answer.get("clock") {
        Some(clock) => clock.clone(),
        None => answer
            .get("state")
            .and_then(|state| Document::from_json(state).ok())
            .map(|document| document.clock())
            .unwrap_or(Value::Null),
    };
    Ok(StateView {
        value: answer.get("value").cloned().unwrap_or(Value::Null),
        hash: hash_of(method, answer)?,
        clock,
    })
}

/// The subscribed documents and their replicas, shared by handles and the
/// connection's reader; the lock is held for single merges only.
pub(crate) struct Replicas {
    docs: Mutex<HashMap<String, Replica>>,
}

#[derive(Default)]
struct Replica {
    /// `None` until the first snapshot.
    document: Option<Document>,
    /// A `state.sync` is on its way: mismatches until it lands are expected.
    resyncing: bool,
    /// A snapshot arrived once: later registrations subscribe again.
    established: bool,
    /// The replica's hash disagreed with the gateway's even right after a
    /// whole-document install, so hashes cannot be compared (the two sides
    /// hash differently); no more automatic syncs until they agree again.
    hashes_differ: bool,
}

/// What merging a pushed delta found.
#[derive(Debug, PartialEq)]
enum Merged {
    NotSubscribed,
    /// The replica agrees with the gateway (or cannot be compared); its hash.
    InStep(String),
    /// The replica disagrees; a sync is due.
    Diverged {
        local: String,
        gateway: String,
    },
}

impl Replicas {
    pub(crate) fn new() -> Self {
        Self {
            docs: Mutex::new(HashMap::new()),
        }
    }

    fn want(&self, doc: &str) {
        self.lock().entry(doc.to_string()).or_default();
    }

    fn forget(&self, doc: &str) {
        self.lock().remove(doc);
    }

    fn is_wanted(&self, doc: &str) -> bool {
        self.lock().contains_key(doc)
    }

    /// Drops a subscription that never got a snapshot.
    fn forget_unestablished(&self, doc: &str) {
        let mut docs = self.lock();
        if docs.get(doc).is_some_and(|r| !r.established) {
            docs.remove(doc);
        }
    }

    /// The subscribed documents that got a snapshot once, sorted.
    fn established(&self) -> Vec<String> {
        let mut docs: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, replica)| replica.established)
            .map(|(doc, _)| doc.clone())
            .collect();
        docs.sort();
        docs
    }

    /// Replaces the replica; returns its hash, or `None` when `doc` is not
    /// subscribed.
    fn install(&self, doc: &str, document: Document, gateway: Option<&str>) -> Option<String> {
        let mut docs = self.lock();
        let replica = docs.get_mut(doc)?;
        let hash = document.hash();
        replica.hashes_differ = gateway.is_some_and(|g| g != hash);
        if replica.hashes_differ {
            warn!(doc, local = %hash, gateway = ?gateway, "a whole document from the gateway hashes differently here; are the SDK's and the gateway's CRDT versions the same? Not syncing on hash differences until they agree");
        }
        replica.document = Some(document);
        replica.resyncing = false;
        replica.established = true;
        Some(hash)
    }

    /// Merges a delta from the agent's own `state.apply` answer.
    fn merge_own(&self, doc: &str, delta: &Value) {
        let mut docs = self.lock();
        let Some(replica) = docs.get_mut(doc) else {
            return;
        };
        match Document::from_json(delta) {
            Ok(delta) => replica.document.get_or_insert_default().merge(&delta),
            Err(err) => {
                warn!(doc, error = %err, "the state.apply answer's delta is not a document")
            }
        }
    }

    fn merge_pushed(&self, doc: &str, delta: &Document, gateway: Option<&str>) -> Merged {
        let mut docs = self.lock();
        let Some(replica) = docs.get_mut(doc) else {
            return Merged::NotSubscribed;
        };
        let document = replica.document.get_or_insert_default();
        document.merge(delta);
        let local = document.hash();
        let Some(gateway) = gateway else {
            return Merged::InStep(local);
        };
        if local == gateway {
            replica.hashes_differ = false;
            return Merged::InStep(local);
        }
        if replica.resyncing || replica.hashes_differ {
            return Merged::InStep(local);
        }
        replica.resyncing = true;
        Merged::Diverged {
            local,
            gateway: gateway.to_string(),
        }
    }

    fn sync_failed(&self, doc: &str) {
        if let Some(replica) = self.lock().get_mut(doc) {
            replica.resyncing = false;
        }
    }

    fn local_hash(&self, doc: &str) -> Option<String> {
        self.lock().get(doc)?.document.as_ref().map(Document::hash)
    }

    fn local_value(&self, doc: &str) -> Option<Value> {
        self.lock().get(doc)?.document.as_ref().map(Document::value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Replica>> {
        // Every operation leaves the map consistent, so poison is ignored.
        self.docs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use meshgate_core::crdt::Op;

    use super::*;

    /// The gateway's document after `ops` (as replica `gw`), and the delta.
    fn apply(doc: &mut Document, op: Value) -> Document {
        let op = Op::parse(&op).unwrap_or_else(|e| panic!("{e}"));
        doc.apply("gw", &[op], 1).unwrap_or_else(|e| panic!("{e}"))
    }

    fn subscribed(replicas: &Replicas, gateway: &Document) {
        replicas.want("d");
        let installed = replicas.install("d", gateway.clone(), Some(&gateway.hash()));
        assert_eq!(installed, Some(gateway.hash()));
    }

    #[test]
    fn deltas_in_order_keep_the_replica_in_step() {
        let replicas = Replicas::new();
        let mut gateway = Document::new();
        apply(
            &mut gateway,
            json!({"op": "counter.increment", "path": "hits", "by": 2}),
        );
        subscribed(&replicas, &gateway);
        let delta = apply(
            &mut gateway,
            json!({"op": "set.add", "path": "tags", "value": "x"}),
        );
        let merged = replicas.merge_pushed("d", &delta, Some(&gateway.hash()));
        assert_eq!(merged, Merged::InStep(gateway.hash()));
        assert_eq!(
            replicas.local_value("d"),
            Some(json!({"hits": 2, "tags": ["x"]}))
        );
    }

    #[test]
    fn a_missed_delta_asks_for_one_sync_until_it_lands() {
        let replicas = Replicas::new();
        let mut gateway = Document::new();
        subscribed(&replicas, &gateway);
        // The first delta never reaches the agent.
        apply(
            &mut gateway,
            json!({"op": "counter.increment", "path": "a", "by": 1}),
        );
        let second = apply(
            &mut gateway,
            json!({"op": "counter.increment", "path": "b", "by": 1}),
        );
        let merged = replicas.merge_pushed("d", &second, Some(&gateway.hash()));
        assert!(matches!(merged, Merged::Diverged { .. }), "{merged:?}");
        let third = apply(
            &mut gateway,
            json!({"op": "counter.increment", "path": "c", "by": 1}),
        );
        let merged = replicas.merge_pushed("d", &third, Some(&gateway.hash()));
        assert!(
            matches!(merged, Merged::InStep(_)),
            "no second sync while one is on its way: {merged:?}"
        );
        assert_eq!(
            replicas.install("d", gateway.clone(), Some(&gateway.hash())),
            Some(gateway.hash())
        );
        assert_eq!(replicas.local_hash("d"), Some(gateway.hash()));
    }

    #[test]
    fn own_apply_delta_merges_and_a_duplicate_push_is_harmless() {
        let replicas = Replicas::new();
        let mut gateway = Document::new();
        subscribed(&replicas, &gateway);
        let delta = apply(
            &mut gateway,
            json!({"op": "register.set", "path": "leader", "value": "a1"}),
        );
        replicas.merge_own("d", &delta.to_json());
        assert_eq!(replicas.local_hash("d"), Some(gateway.hash()));
        let merged = replicas.merge_pushed("d", &delta, Some(&gateway.hash()));
        assert_eq!(merged, Merged::InStep(gateway.hash()));
    }

    #[test]
    fn unsubscribed_documents_keep_no_replica() {
        let replicas = Replicas::new();
        let mut gateway = Document::new();
        let delta = apply(
            &mut gateway,
            json!({"op": "counter.increment", "path": "a", "by": 1}),
        );
        assert_eq!(
            replicas.merge_pushed("d", &delta, Some(&gateway.hash())),
            Merged::NotSubscribed
        );
        assert_eq!(replicas.install("d", gateway.clone(), None), None);
        replicas.want("d");
        assert!(replicas.is_wanted("d"));
        assert_eq!(replicas.local_hash("d"), None, "no snapshot yet");
        assert!(replicas.established().is_empty(), "no snapshot yet");
        replicas.forget_unestablished("d");
        assert!(!replicas.is_wanted("d"));
        subscribed(&replicas, &gateway);
        replicas.forget_unestablished("d");
        assert_eq!(replicas.established(), ["d"]);
        replicas.forget("d");
        assert!(!replicas.is_wanted("d"));
    }

    #[test]
    fn hashes_that_differ_after_a_whole_install_stop_automatic_syncs() {
        let replicas = Replicas::new();
        let mut gateway = Document::new();
        replicas.want("d");
        replicas.install("d", gateway.clone(), Some("sha256:other"));
        let delta = apply(
            &mut gateway,
            json!({"op": "counter.increment", "path": "a", "by": 1}),
        );
        let merged = replicas.merge_pushed("d", &delta, Some("sha256:other-again"));
        assert!(matches!(merged, Merged::InStep(_)), "{merged:?}");
    }

    #[test]
    fn views_take_the_clock_from_the_answer_or_its_document() {
        let mut gateway = Document::new();
        apply(
            &mut gateway,
            json!({"op": "counter.increment", "path": "a", "by": 1}),
        );
        let answer = json!({"doc": "d", "state": gateway.to_json(), "hash": gateway.hash(), "value": gateway.value()});
        let view = view_of("state.sync", &answer);
        assert_eq!(
            view.ok(),
            Some(StateView {
                value: json!({"a": 1}),
                hash: gateway.hash(),
                clock: json!({"gw": 1}),
            })
        );
        assert!(view_of("state.get", &json!({"value": 1})).is_err());
    }
}
