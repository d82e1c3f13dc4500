//! Operations on a document: their JSON form with its validation, and the
//! delta each one produces when a replica applies it.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::context::{CausalContext, Dot};
use super::store::{Element, Entry, Kind, MapStore, Pn, Stamped, canonical_json, depth_within};
use super::{CrdtError, Document, MAX_PATH_DEPTH, MAX_VALUE_DEPTH, brief, check_key, field_path};

/// One operation on a document, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `counter.increment`: adds `by` (≥ 1) to a G-counter.
    CounterIncrement {
        /// Where the counter lives.
        path: Vec<String>,
        /// Amount, at least 1.
        by: u64,
    },
    /// `pncounter.add`: adds `by` (non-zero, negative decrements) to a
    /// PN-counter.
    PnCounterAdd {
        /// Where the counter lives.
        path: Vec<String>,
        /// Amount, not 0.
        by: i64,
    },
    /// `register.set`: sets a last-writer-wins register.
    RegisterSet {
        /// Where the register lives.
        path: Vec<String>,
        /// The new value.
        value: Value,
        /// Unix milliseconds of the write; by default the later of now and
        /// one past the register's newest timestamp.
        timestamp: Option<u64>,
    },
    /// `set.add`: adds an element to an add-wins OR-set.
    SetAdd {
        /// Where the set lives.
        path: Vec<String>,
        /// The element.
        value: Value,
    },
    /// `set.remove`: removes the element's adds seen so far.
    SetRemove {
        /// Where the set lives.
        path: Vec<String>,
        /// The element.
        value: Value,
    },
    /// `map.delete`: removes a key and everything under it that was seen
    /// (a concurrent unseen write survives).
    MapDelete {
        /// The key to delete.
        path: Vec<String>,
    },
}

/// The op names, as listed in errors.
const OP_NAMES: &str =
    "counter.increment, pncounter.add, register.set, set.add, set.remove, map.delete";

impl Op {
    /// Parses one op (`{"op":"counter.increment","path":"hits","by":1}`);
    /// errors name the field (`by`, `path[1]`).
    pub fn parse(v: &Value) -> Result<Op, CrdtError> {
        parse_at(v, "", "op")
    }

    /// The op's name (`counter.increment`).
    pub fn name(&self) -> &'static str {
        match self {
            Op::CounterIncrement { .. } => "counter.increment",
            Op::PnCounterAdd { .. } => "pncounter.add",
            Op::RegisterSet { .. } => "register.set",
            Op::SetAdd { .. } => "set.add",
            Op::SetRemove { .. } => "set.remove",
            Op::MapDelete { .. } => "map.delete",
        }
    }

    /// The path it works on.
    pub fn path(&self) -> &[String] {
        match self {
            Op::CounterIncrement { path, .. }
            | Op::PnCounterAdd { path, .. }
            | Op::RegisterSet { path, .. }
            | Op::SetAdd { path, .. }
            | Op::SetRemove { path, .. }
            | Op::MapDelete { path } => path,
        }
    }

    /// Its JSON form, as `parse` reads it (the path always as an array).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("op".into(), Value::from(self.name()));
        m.insert(
            "path".into(),
            Value::Array(
                self.path()
                    .iter()
                    .map(|s| Value::from(s.as_str()))
                    .collect(),
            ),
        );
        match self {
            Op::CounterIncrement { by, .. } => {
                m.insert("by".into(), Value::from(*by));
            }
            Op::PnCounterAdd { by, .. } => {
                m.insert("by".into(), Value::from(*by));
            }
            Op::RegisterSet {
                value, timestamp, ..
            } => {
                m.insert("value".into(), value.clone());
                if let Some(ts) = timestamp {
                    m.insert("timestamp".into(), Value::from(*ts));
                }
            }
            Op::SetAdd { value, .. } | Op::SetRemove { value, .. } => {
                m.insert("value".into(), value.clone());
            }
            Op::MapDelete { .. } => {}
        }
        Value::Object(m)
    }

    /// The type the op writes (`None` for `map.delete`, which takes any).
    fn kind(&self) -> Option<Kind> {
        match self {
            Op::CounterIncrement { .. } => Some(Kind::Counter),
            Op::PnCounterAdd { .. } => Some(Kind::PnCounter),
            Op::RegisterSet { .. } => Some(Kind::Register),
            Op::SetAdd { .. } | Op::SetRemove { .. } => Some(Kind::Set),
            Op::MapDelete { .. } => None,
        }
    }

    /// Checks what parsing checks, for ops built in code.
    fn validate(&self) -> Result<(), CrdtError> {
        check_path(self.path(), "path", true)?;
        match self {
            Op::CounterIncrement { by: 0, .. } => {
                Err(CrdtError::new("by", "must be a whole number of at least 1"))
            }
            Op::PnCounterAdd { by: 0, .. } => Err(CrdtError::new(
                "by",
                "must be a non-zero whole number (negative decrements)",
            )),
            Op::RegisterSet { value, .. }
            | Op::SetAdd { value, .. }
            | Op::SetRemove { value, .. }
                if !depth_within(value, MAX_VALUE_DEPTH) =>
            {
                Err(CrdtError::new("value", too_deep()))
            }
            _ => Ok(()),
        }
    }
}

fn too_deep() -> String {
    format!("nests arrays/objects more than {MAX_VALUE_DEPTH} deep; flatten it")
}

/// Parses a JSON array of 1..=`max` ops; errors name the path (`ops[2].by`).
pub fn parse_ops(v: &Value, max: usize) -> Result<Vec<Op>, CrdtError> {
    let Some(items) = v.as_array() else {
        return Err(CrdtError::new(
            "ops",
            r#"must be an array of operations such as [{"op":"counter.increment","path":"hits"}]"#,
        ));
    };
    if items.is_empty() {
        return Err(CrdtError::new("ops", "must hold at least one operation"));
    }
    if items.len() > max {
        return Err(CrdtError::new(
            "ops",
            format!(
                "holds {} operations; send at most {max} per request",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("ops[{i}]");
            parse_at(item, &at, &at)
        })
        .collect()
}

/// Parses one op; `prefix` goes before field names, `whole` names the op
/// itself.
fn parse_at(v: &Value, prefix: &str, whole: &str) -> Result<Op, CrdtError> {
    let field = |name: &str| field_path(prefix, name);
    let Some(m) = v.as_object() else {
        return Err(CrdtError::new(
            whole,
            r#"must be an object such as {"op":"counter.increment","path":"hits","by":1}"#,
        ));
    };
    let name = match m.get("op") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(CrdtError::new(
                field("op"),
                format!("must be a string, one of {OP_NAMES}"),
            ));
        }
        None => {
            return Err(CrdtError::new(
                field("op"),
                format!("is required: one of {OP_NAMES}"),
            ));
        }
    };
    let allowed: &[&str] = match name {
        "counter.increment" | "pncounter.add" => &["op", "path", "by"],
        "register.set" => &["op", "path", "value", "timestamp"],
        "set.add" | "set.remove" => &["op", "path", "value"],
        "map.delete" => &["op", "path"],
        other => {
            return Err(CrdtError::new(
                field("op"),
                format!(
                    "unknown operation {}; use one of {OP_NAMES}",
                    brief(&Value::from(other))
                ),
            ));
        }
    };
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    if let Some(unknown) = keys.into_iter().find(|k| !allowed.contains(&k.as_str())) {
        return Err(CrdtError::new(
            field(unknown),
            format!("unknown field; {name} takes {}", allowed.join(", ")),
        ));
    }
    let path = parse_path(m.get("path"), &field("path"))?;
    let value = || match m.get("value") {
        None => Err(CrdtError::new(
            field("value"),
            format!("is required: the JSON value to {}", value_purpose(name)),
        )),
        Some(v) if !depth_within(v, MAX_VALUE_DEPTH) => {
            Err(CrdtError::new(field("value"), too_deep()))
        }
        Some(v) => Ok(v.clone()),
    };
    Ok(match name {
        "counter.increment" => {
            let by = match m.get("by") {
                None | Some(Value::Null) => 1,
                Some(v) => match v.as_u64() {
                    Some(n) if n >= 1 => n,
                    _ => {
                        return Err(CrdtError::new(
                            field("by"),
                            format!("must be a whole number of at least 1, got {}", brief(v)),
                        ));
                    }
                },
            };
            Op::CounterIncrement { path, by }
        }
        "pncounter.add" => {
            let by = match m.get("by") {
                None | Some(Value::Null) => {
                    return Err(CrdtError::new(
                        field("by"),
                        "is required: a non-zero whole number (negative decrements)",
                    ));
                }
                Some(v) => match v.as_i64() {
                    Some(n) if n != 0 => n,
                    _ => {
                        return Err(CrdtError::new(
                            field("by"),
                            format!(
                                "must be a non-zero whole number within the range of i64 (negative decrements), got {}",
                                brief(v)
                            ),
                        ));
                    }
                },
            };
            Op::PnCounterAdd { path, by }
        }
        "register.set" => {
            let timestamp = match m.get("timestamp") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_u64() {
                    Some(ts) => Some(ts),
                    None => {
                        return Err(CrdtError::new(
                            field("timestamp"),
                            format!(
                                "must be unix milliseconds as a whole number ≥ 0, got {}; omit it to use the gateway's clock",
                                brief(v)
                            ),
                        ));
                    }
                },
            };
            Op::RegisterSet {
                path,
                value: value()?,
                timestamp,
            }
        }
        "set.add" => Op::SetAdd {
            path,
            value: value()?,
        },
        "set.remove" => Op::SetRemove {
            path,
            value: value()?,
        },
        _ => Op::MapDelete { path },
    })
}

fn value_purpose(op: &str) -> &'static str {
    match op {
        "register.set" => "store",
        "set.add" => "add",
        _ => "remove",
    }
}

/// Parses a path: one key, or an array of 1..=16 keys (nested maps).
fn parse_path(v: Option<&Value>, field: &str) -> Result<Vec<String>, CrdtError> {
    let path = match v {
        None => {
            return Err(CrdtError::new(
                field,
                format!(
                    "is required: a key, or an array of 1 to {MAX_PATH_DEPTH} keys for nested maps"
                ),
            ));
        }
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            let mut path = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => path.push(s.clone()),
                    other => {
                        return Err(CrdtError::new(
                            format!("{field}[{i}]"),
                            format!("must be a string key, got {}", brief(other)),
                        ));
                    }
                }
            }
            path
        }
        Some(other) => {
            return Err(CrdtError::new(
                field,
                format!(
                    "must be a key or an array of 1 to {MAX_PATH_DEPTH} keys, got {}",
                    brief(other)
                ),
            ));
        }
    };
    check_path(&path, field, matches!(v, Some(Value::Array(_))))?;
    Ok(path)
}

/// Checks a path's length and keys. A bad key is named `field[i]` when the
/// path was sent as an array, else `field`.
fn check_path(path: &[String], field: &str, as_array: bool) -> Result<(), CrdtError> {
    if path.is_empty() || path.len() > MAX_PATH_DEPTH {
        return Err(CrdtError::new(
            field,
            format!("must hold 1 to {MAX_PATH_DEPTH} keys, got {}", path.len()),
        ));
    }
    for (i, key) in path.iter().enumerate() {
        check_key(key).map_err(|m| {
            let at = if as_array {
                format!("{field}[{i}]")
            } else {
                field.to_owned()
            };
            CrdtError::new(at, m)
        })?;
    }
    Ok(())
}

/// A path for messages: `a.b.c`.
pub(crate) fn show_path(path: &[String]) -> String {
    path.join(".")
}

/// The delta of `op` applied by `replica` to `doc`. Reads `doc` only; the
/// caller merges the delta in.
pub(crate) fn delta(
    doc: &Document,
    replica: &str,
    op: &Op,
    now_ms: u64,
) -> Result<Document, CrdtError> {
    op.validate()?;
    let path = op.path();
    let (parents, leaf_key) = match path.split_last() {
        Some((last, parents)) => (parents, last),
        None => return Err(CrdtError::new("path", "must hold at least one key")),
    };
    // Walk to the map that holds the leaf; intermediate keys must hold maps.
    let mut node: Option<&MapStore> = Some(&doc.root);
    for (depth, key) in parents.iter().enumerate() {
        let Some(map) = node else { break };
        node = match map.get(key) {
            None => None,
            Some(entry) => match entry.kind() {
                Some(Kind::Map) | None => Some(&entry.map),
                Some(other) => {
                    return Err(CrdtError::new(
                        "path",
                        format!(
                            "path `{}` holds a {}, not a map; delete it first with map.delete",
                            show_path(&path[..=depth]),
                            other.name()
                        ),
                    ));
                }
            },
        };
    }
    let existing = node.and_then(|m| m.get(leaf_key));
    if let (Some(want), Some(held)) = (op.kind(), existing.and_then(Entry::kind))
        && want != held
    {
        return Err(CrdtError::new(
            "path",
            format!(
                "path `{}` holds a {}, not a {}; delete it first with map.delete",
                show_path(path),
                held.name(),
                want.name()
            ),
        ));
    }
    let empty = Entry::default();
    let existing = existing.unwrap_or(&empty);

    let mut seen: Vec<Dot> = Vec::new();
    let mut leaf = Entry::default();
    let new_dot = || {
        doc.ctx.next_dot(replica).ok_or_else(|| {
            CrdtError::new(
                "replica",
                format!("replica `{replica}` has used up its dot counter; use a new replica id"),
            )
        })
    };
    match op {
        Op::CounterIncrement { by, .. } => {
            let mine = own_dots(&existing.counter, replica);
            let amount: u64 = mine.iter().map(|&(_, &v)| v).max().unwrap_or(0);
            let total = amount.checked_add(*by).ok_or_else(|| {
                CrdtError::new(
                    "by",
                    format!(
                        "counter `{}` would pass {} for this replica",
                        show_path(path),
                        u64::MAX
                    ),
                )
            })?;
            seen.extend(mine.into_iter().map(|(d, _)| d.clone()));
            let dot = new_dot()?;
            leaf.counter.insert(dot.clone(), total);
            seen.push(dot);
        }
        Op::PnCounterAdd { by, .. } => {
            let mine = own_dots(&existing.pncounter, replica);
            let current = mine
                .iter()
                .map(|&(_, &v)| v)
                .max()
                .unwrap_or(Pn { p: 0, n: 0 });
            let overflow = || {
                CrdtError::new(
                    "by",
                    format!(
                        "pncounter `{}` would pass {} in one direction for this replica",
                        show_path(path),
                        u64::MAX
                    ),
                )
            };
            let next = if *by > 0 {
                Pn {
                    p: current
                        .p
                        .checked_add(by.unsigned_abs())
                        .ok_or_else(overflow)?,
                    n: current.n,
                }
            } else {
                Pn {
                    p: current.p,
                    n: current
                        .n
                        .checked_add(by.unsigned_abs())
                        .ok_or_else(overflow)?,
                }
            };
            seen.extend(mine.into_iter().map(|(d, _)| d.clone()));
            let dot = new_dot()?;
            leaf.pncounter.insert(dot.clone(), next);
            seen.push(dot);
        }
        Op::RegisterSet {
            value, timestamp, ..
        } => {
            let newest = existing.register.values().map(|s| s.timestamp).max();
            let timestamp = timestamp
                .unwrap_or_else(|| newest.map_or(now_ms, |t| now_ms.max(t.saturating_add(1))));
            seen.extend(existing.register.keys().cloned());
            let dot = new_dot()?;
            leaf.register.insert(
                dot.clone(),
                Stamped {
                    timestamp,
                    value: value.clone(),
                },
            );
            seen.push(dot);
        }
        Op::SetAdd { value, .. } => {
            let key = canonical_json(value);
            if let Some(element) = existing.set.get(&key) {
                seen.extend(element.dots.iter().cloned());
            }
            let dot = new_dot()?;
            leaf.set.insert(
                key,
                Element {
                    value: value.clone(),
                    dots: BTreeSet::from([dot.clone()]),
                },
            );
            seen.push(dot);
        }
        Op::SetRemove { value, .. } => {
            if let Some(element) = existing.set.get(&canonical_json(value)) {
                seen.extend(element.dots.iter().cloned());
            }
        }
        Op::MapDelete { .. } => existing.for_each_dot(&mut |d| seen.push(d.clone())),
    }

    let mut ctx = CausalContext::new();
    for dot in seen {
        ctx.insert(dot);
    }
    let mut root = MapStore::new();
    if !leaf.is_empty() {
        root.insert(leaf_key.clone(), leaf);
        for key in parents.iter().rev() {
            let entry = Entry {
                map: root,
                ..Entry::default()
            };
            root = MapStore::from([(key.clone(), entry)]);
        }
    }
    Ok(Document { ctx, root })
}

/// The dots of `replica` in a dot fun (with a single writer per replica,
/// at most one).
fn own_dots<'a, V>(store: &'a BTreeMap<Dot, V>, replica: &str) -> Vec<(&'a Dot, &'a V)> {
    store
        .range(Dot::new(replica, 0)..=Dot::new(replica, u64::MAX))
        .collect()
}
