//! Shared state documents: delta-state causal CRDTs (Almeida et al., "Delta
//! State Replicated Data Types") that the agents of a tenant read and write
//! through the gateway.
//!
//! A [`Document`] is a map of keys to G-counters, PN-counters,
//! last-writer-wins registers, add-wins OR-sets and nested maps, all of them
//! dot stores sharing the document's one causal context (its vector clock).
//! [`Document::apply`] runs [`Op`]s as one replica and returns the delta;
//! [`Document::merge`] joins any state or delta in. The join is
//! deterministic, commutative, associative and idempotent, so replicas that
//! received the same deltas (in any order, with duplicates) are equal, and
//! [`Document::hash`] tells them so.
//!
//! Semantics worth knowing:
//! - concurrent `set.add` and `set.remove` of one element: the add wins;
//! - concurrent `register.set`: the greatest (timestamp, replica id,
//!   canonical JSON of the value) is read; the others stay until the next
//!   set that sees them;
//! - `map.delete` removes what it saw: a concurrent unseen write under the
//!   key survives, and a counter incremented after its deletion starts from
//!   zero;
//! - concurrent writes of different types to one key both survive; the read
//!   shows map over set over register over pncounter over counter, and
//!   `apply` refuses to write another type than the one shown (delete it
//!   first).
//!
//! # Canonical JSON (`to_json` / `from_json`)
//!
//! ```text
//! {
//!   "clock": {
//!     "vv": {"<replica>": <counter ≥ 1>, ...},     // every dot 1..=counter seen
//!     "cloud": [["<replica>", <counter>], ...]     // dots seen beyond that, sorted
//!   },
//!   "root": {"<key>": ENTRY, ...}
//! }
//! ENTRY, an object holding only its non-empty fields, at least one:
//!   "counter":   [["<replica>", <counter>, <amount ≥ 1>], ...]
//!   "pncounter": [["<replica>", <counter>, <p>, <n>], ...]          (p + n ≥ 1)
//!   "register":  [["<replica>", <counter>, <timestamp ms>, <value>], ...]
//!   "set":       [[<element>, [["<replica>", <counter>], ...]], ...]
//!   "map":       {"<key>": ENTRY, ...}
//! ```
//! Dots are sorted by (replica, counter), set elements by their canonical
//! JSON, object keys by byte order; the context is compacted (no cloud dot
//! inside or adjacent to its replica's prefix). `hash` is the SHA-256 of this
//! JSON written without whitespace and with sorted keys. `from_json` refuses
//! unknown fields, malformed dots, dots the clock does not cover, a dot that
//! appears twice, empty entries, keys and replica ids out of bounds, maps
//! nested more than [`MAX_PATH_DEPTH`] deep and values nested more than
//! [`MAX_VALUE_DEPTH`] deep, naming the field (`root.a.map.b.counter[0][2]`).

mod codec;
mod context;
mod ops;
mod store;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde_json::Value;
use sha2::{Digest, Sha256};

pub use context::{CausalContext, Dot};
pub use ops::{Op, parse_ops};
pub use store::canonical_json;

use store::MapStore;

/// Most keys in a path (and so the deepest map nesting).
pub const MAX_PATH_DEPTH: usize = 16;
/// Longest key, in characters.
pub const MAX_KEY_CHARS: usize = 256;
/// Longest replica id, in characters.
pub const MAX_REPLICA_CHARS: usize = 128;
/// Deepest nesting of arrays/objects inside a register value or set element.
pub const MAX_VALUE_DEPTH: usize = 32;

/// An op or a state that is wrong, named by its field path (`ops[2].by`,
/// `root.a.counter[0][1]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct CrdtError {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong and what to send instead.
    pub message: String,
}

impl CrdtError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> CrdtError {
        CrdtError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same problem, with `prefix.` put before the field.
    pub fn under(self, prefix: &str) -> CrdtError {
        CrdtError {
            field: if self.field.starts_with('[') {
                format!("{prefix}{}", self.field)
            } else {
                format!("{prefix}.{}", self.field)
            },
            message: self.message,
        }
    }
}

/// A shared state document: a map of CRDTs with its causal context.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Document {
    ctx: CausalContext,
    root: MapStore,
}

impl Document {
    /// The empty document.
    pub fn new() -> Document {
        Document::default()
    }

    /// Applies operations as `replica`, all or none; returns the delta (a
    /// Document-shaped state) to merge elsewhere. Errors name the op
    /// (`ops[1].path`).
    pub fn apply(&mut self, replica: &str, ops: &[Op], now_ms: u64) -> Result<Document, CrdtError> {
        check_replica(replica).map_err(|m| CrdtError::new("replica", m))?;
        // Only the root keys the ops name can change. A single op fails
        // before it changes anything; for a batch they (and the clock) are
        // kept so a failing op can undo the ones before it.
        let mut backup = None;
        if ops.len() > 1 {
            let mut keys: BTreeMap<String, Option<store::Entry>> = BTreeMap::new();
            for op in ops {
                if let Some(k) = op.path().first() {
                    keys.entry(k.clone())
                        .or_insert_with(|| self.root.get(k).cloned());
                }
            }
            backup = Some((self.ctx.clone(), keys));
        }
        let mut delta = Document::new();
        for (i, op) in ops.iter().enumerate() {
            match ops::delta(self, replica, op, now_ms) {
                Ok(d) => {
                    self.merge_along(op.path(), &d);
                    delta.merge(&d);
                }
                Err(e) => {
                    if let Some((ctx, keys)) = backup {
                        self.ctx = ctx;
                        for (k, entry) in keys {
                            match entry {
                                Some(entry) => self.root.insert(k, entry),
                                None => self.root.remove(&k),
                            };
                        }
                    }
                    return Err(e.under(&format!("ops[{i}]")));
                }
            }
        }
        Ok(delta)
    }

    /// `merge` for a delta of one op at `path`: the delta's dots and the
    /// dots its context supersedes all live under `path` (a dot lives in one
    /// place), so keys off the path are left alone instead of visited.
    fn merge_along(&mut self, path: &[String], delta: &Document) {
        store::join_map_along(&mut self.root, &self.ctx, &delta.root, &delta.ctx, path);
        self.ctx.join(&delta.ctx);
    }

    /// Joins another state or delta into this one.
    pub fn merge(&mut self, other: &Document) {
        // The stores join under both original contexts; the contexts join
        // after.
        store::join_map(&mut self.root, &self.ctx, &other.root, &other.ctx);
        self.ctx.join(&other.ctx);
    }

    /// The plain JSON view: an object; counters as numbers, a register as
    /// its value, a set as an array sorted by canonical JSON, a map as an
    /// object.
    pub fn value(&self) -> Value {
        store::map_value(&self.root)
    }

    /// The plain JSON view of the value at `path`, `None` if nothing is
    /// there.
    pub fn get(&self, path: &[String]) -> Option<Value> {
        let (first, rest) = path.split_first()?;
        let mut entry = self.root.get(first)?;
        for key in rest {
            if entry.kind() != Some(store::Kind::Map) {
                return None;
            }
            entry = entry.map.get(key)?;
        }
        Some(entry.value())
    }

    /// `"sha256:<64 lowercase hex>"` of the canonical encoding; equal states
    /// have equal hashes.
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(canonical_json(&self.to_json()).as_bytes());
        format!("sha256:{}", hex::encode(digest))
    }

    /// The vector clock as `{"replica": counter}` (the contiguous part; see
    /// [`Document::cloud`] for the rest).
    pub fn clock(&self) -> Value {
        Value::Object(
            self.ctx
                .vv()
                .iter()
                .map(|(r, &n)| (r.clone(), Value::from(n)))
                .collect(),
        )
    }

    /// The dots seen beyond the contiguous clock, `[["replica", counter], …]`
    /// (empty unless deltas arrived out of order).
    pub fn cloud(&self) -> Value {
        Value::Array(
            self.ctx
                .cloud()
                .iter()
                .map(|d| {
                    Value::Array(vec![
                        Value::from(d.replica.as_str()),
                        Value::from(d.counter),
                    ])
                })
                .collect(),
        )
    }

    /// The causal context (vector clock and dot cloud).
    pub fn context(&self) -> &CausalContext {
        &self.ctx
    }

    /// Canonical JSON of the full state (context + stores), deterministic;
    /// the format is in the module doc.
    pub fn to_json(&self) -> Value {
        codec::to_json(self)
    }

    /// Parses and validates a state produced by `to_json`; errors name the
    /// field path.
    pub fn from_json(v: &Value) -> Result<Document, CrdtError> {
        codec::from_json(v)
    }

    /// Whether the document has no visible keys.
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// Ops that delete every root key (to clear a document without losing
    /// its clock).
    pub fn clear_ops(&self) -> Vec<Op> {
        self.root
            .keys()
            .map(|k| Op::MapDelete {
                path: vec![k.clone()],
            })
            .collect()
    }
}

/// The path of `key` inside `prefix` for errors: `prefix.key`, or
/// `prefix["a.b"]` when the key is empty or has characters that would make
/// the path ambiguous.
fn field_path(prefix: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| !matches!(c, '.' | '[' | ']' | '"') && !c.is_whitespace() && !c.is_control());
    match (plain, prefix.is_empty()) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{prefix}.{key}"),
        (false, _) => format!("{prefix}[{}]", Value::from(key)),
    }
}

/// A short rendering of a value sent to us, for error messages: scalars
/// as JSON (strings cut at 40 characters), arrays and objects by kind.
fn brief(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() > 40 => {
            let cut: String = s.chars().take(40).collect();
            format!("{}…", Value::from(cut))
        }
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
        other => other.to_string(),
    }
}

/// Checks a map key: 1 to [`MAX_KEY_CHARS`] characters.
fn check_key(key: &str) -> Result<(), String> {
    let n = key.chars().count();
    if n == 0 || n > MAX_KEY_CHARS {
        return Err(format!(
            "a key must be 1 to {MAX_KEY_CHARS} characters, got {n}"
        ));
    }
    Ok(())
}

/// Checks a replica id: 1 to [`MAX_REPLICA_CHARS`] characters.
fn check_replica(replica: &str) -> Result<(), String> {
    let n = replica.chars().count();
    if n == 0 || n > MAX_REPLICA_CHARS {
        return Err(format!(
            "a replica id must be 1 to {MAX_REPLICA_CHARS} characters, got {n}"
        ));
    }
    Ok(())
}
