//! Dot stores and their join: the values of a document, each a set of dots
//! (with payloads) interpreted against the document's one causal context.
//!
//! Join rules (Almeida et al., "Delta State Replicated Data Types"):
//! - dot set: `(s ∩ s') ∪ (s \ c') ∪ (s' \ c)`: a dot survives if both sides
//!   hold it, or if the side that lacks it has never seen it;
//! - dot fun (dot → value): the same on the keys, values of a dot held by
//!   both sides are equal (a dot is written once);
//! - dot map: key-wise join of the children under the same contexts, keys
//!   whose child ends up empty are dropped.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::context::{CausalContext, Dot};

/// A map node: key → what the key holds.
pub(crate) type MapStore = BTreeMap<String, Entry>;

/// The payload of a PN-counter dot: cumulative increments and decrements of
/// its replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pn {
    pub p: u64,
    pub n: u64,
}

/// The payload of a register dot: when it was set and to what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamped {
    pub timestamp: u64,
    pub value: Value,
}

/// One element of an OR-set: the element and the dots of the adds that
/// keep it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element {
    pub value: Value,
    pub dots: BTreeSet<Dot>,
}

/// What one map key holds: one dot store per type, joined field-wise, so
/// concurrent writes of different types to one key converge. The read
/// picks the first non-empty of map, set, register, pncounter, counter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Entry {
    /// G-counter: replica's latest dot → its cumulative amount.
    pub counter: BTreeMap<Dot, u64>,
    /// PN-counter: replica's latest dot → its cumulative (p, n).
    pub pncounter: BTreeMap<Dot, Pn>,
    /// LWW register: concurrent sets, the read takes the greatest.
    pub register: BTreeMap<Dot, Stamped>,
    /// OR-set: canonical JSON of the element → element.
    pub set: BTreeMap<String, Element>,
    /// Nested map.
    pub map: MapStore,
}

/// The types a key can hold, in read precedence (highest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Map,
    Set,
    Register,
    PnCounter,
    Counter,
}

impl Kind {
    /// Its name in ops and messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Map => "map",
            Kind::Set => "set",
            Kind::Register => "register",
            Kind::PnCounter => "pncounter",
            Kind::Counter => "counter",
        }
    }
}

/// A payload of a dot fun. Two replicas only disagree on a dot's payload if
/// a replica id was reused; the join then keeps the greater payload so it
/// stays commutative.
pub(crate) trait Payload: Clone + PartialEq {
    fn greater(&self, other: &Self) -> bool;
}

impl Payload for u64 {
    fn greater(&self, other: &Self) -> bool {
        self > other
    }
}

impl Payload for Pn {
    fn greater(&self, other: &Self) -> bool {
        self > other
    }
}

impl Payload for Stamped {
    fn greater(&self, other: &Self) -> bool {
        (self.timestamp, canonical_json(&self.value))
            > (other.timestamp, canonical_json(&other.value))
    }
}

impl Entry {
    /// Whether the key holds nothing (and so is absent).
    pub fn is_empty(&self) -> bool {
        self.counter.is_empty()
            && self.pncounter.is_empty()
            && self.register.is_empty()
            && self.set.is_empty()
            && self.map.is_empty()
    }

    /// The type the key reads as, `None` if empty.
    pub fn kind(&self) -> Option<Kind> {
        if !self.map.is_empty() {
            Some(Kind::Map)
        } else if !self.set.is_empty() {
            Some(Kind::Set)
        } else if !self.register.is_empty() {
            Some(Kind::Register)
        } else if !self.pncounter.is_empty() {
            Some(Kind::PnCounter)
        } else if !self.counter.is_empty() {
            Some(Kind::Counter)
        } else {
            None
        }
    }

    /// Joins `other` (seen under `other_ctx`) into this (seen under `ctx`).
    pub fn join(&mut self, ctx: &CausalContext, other: &Entry, other_ctx: &CausalContext) {
        join_fun(&mut self.counter, ctx, &other.counter, other_ctx);
        join_fun(&mut self.pncounter, ctx, &other.pncounter, other_ctx);
        join_fun(&mut self.register, ctx, &other.register, other_ctx);
        join_set(&mut self.set, ctx, &other.set, other_ctx);
        join_map(&mut self.map, ctx, &other.map, other_ctx);
    }

    /// Visits every dot under this key, nested maps included.
    pub fn for_each_dot<'a>(&'a self, f: &mut impl FnMut(&'a Dot)) {
        self.counter.keys().for_each(&mut *f);
        self.pncounter.keys().for_each(&mut *f);
        self.register.keys().for_each(&mut *f);
        for element in self.set.values() {
            element.dots.iter().for_each(&mut *f);
        }
        for child in self.map.values() {
            child.for_each_dot(f);
        }
    }

    /// The plain JSON view of what the key holds (`Null` if empty).
    pub fn value(&self) -> Value {
        match self.kind() {
            Some(Kind::Map) => map_value(&self.map),
            Some(Kind::Set) => Value::Array(self.set.values().map(|e| e.value.clone()).collect()),
            Some(Kind::Register) => {
                register_read(&self.register).map_or(Value::Null, |(_, s)| s.value.clone())
            }
            Some(Kind::PnCounter) => Value::from(pn_value(&self.pncounter)),
            Some(Kind::Counter) => Value::from(counter_value(&self.counter)),
            None => Value::Null,
        }
    }
}

/// The plain JSON view of a map node.
pub(crate) fn map_value(map: &MapStore) -> Value {
    Value::Object(map.iter().map(|(k, e)| (k.clone(), e.value())).collect())
}

/// G-counter value: the sum of the replicas' amounts, saturating.
pub(crate) fn counter_value(store: &BTreeMap<Dot, u64>) -> u64 {
    let sum: u128 = store.values().map(|&v| u128::from(v)).sum();
    u64::try_from(sum).unwrap_or(u64::MAX)
}

/// PN-counter value: Σp − Σn, saturating at the bounds of i64.
pub(crate) fn pn_value(store: &BTreeMap<Dot, Pn>) -> i64 {
    let p: i128 = store.values().map(|v| i128::from(v.p)).sum();
    let n: i128 = store.values().map(|v| i128::from(v.n)).sum();
    let diff = p.saturating_sub(n);
    i64::try_from(diff).unwrap_or(if diff < 0 { i64::MIN } else { i64::MAX })
}

/// The register's read: the greatest entry by (timestamp, replica id,
/// canonical JSON of the value, dot counter), a total order every replica
/// agrees on.
pub(crate) fn register_read(store: &BTreeMap<Dot, Stamped>) -> Option<(&Dot, &Stamped)> {
    store.iter().max_by(|(da, a), (db, b)| {
        (a.timestamp, &da.replica)
            .cmp(&(b.timestamp, &db.replica))
            .then_with(|| canonical_json(&a.value).cmp(&canonical_json(&b.value)))
            .then_with(|| da.counter.cmp(&db.counter))
    })
}

/// Joins two dot funs.
fn join_fun<V: Payload>(
    s: &mut BTreeMap<Dot, V>,
    ctx: &CausalContext,
    o: &BTreeMap<Dot, V>,
    o_ctx: &CausalContext,
) {
    s.retain(|dot, v| match o.get(dot) {
        Some(theirs) => {
            if theirs.greater(v) {
                *v = theirs.clone();
            }
            true
        }
        None => !o_ctx.contains(dot),
    });
    for (dot, v) in o {
        if !ctx.contains(dot) && !s.contains_key(dot) {
            s.insert(dot.clone(), v.clone());
        }
    }
}

/// Joins two dot sets.
fn join_dots(s: &mut BTreeSet<Dot>, ctx: &CausalContext, o: &BTreeSet<Dot>, o_ctx: &CausalContext) {
    s.retain(|dot| o.contains(dot) || !o_ctx.contains(dot));
    for dot in o {
        if !ctx.contains(dot) && !s.contains(dot) {
            s.insert(dot.clone());
        }
    }
}

/// Joins two OR-sets: a dot map of element → dot set.
fn join_set(
    s: &mut BTreeMap<String, Element>,
    ctx: &CausalContext,
    o: &BTreeMap<String, Element>,
    o_ctx: &CausalContext,
) {
    let empty = BTreeSet::new();
    s.retain(|key, element| {
        let theirs = o.get(key).map_or(&empty, |e| &e.dots);
        join_dots(&mut element.dots, ctx, theirs, o_ctx);
        !element.dots.is_empty()
    });
    for (key, theirs) in o {
        if s.contains_key(key) {
            continue;
        }
        // Keys present on this side before the join were handled above;
        // one dropped there had every dot of `theirs` in `ctx`, so it is
        // empty here again.
        let dots: BTreeSet<Dot> = theirs
            .dots
            .iter()
            .filter(|d| !ctx.contains(d))
            .cloned()
            .collect();
        if !dots.is_empty() {
            s.insert(
                key.clone(),
                Element {
                    value: theirs.value.clone(),
                    dots,
                },
            );
        }
    }
}

/// Joins two map nodes key-wise.
pub(crate) fn join_map(s: &mut MapStore, ctx: &CausalContext, o: &MapStore, o_ctx: &CausalContext) {
    let empty = Entry::default();
    s.retain(|key, entry| {
        entry.join(ctx, o.get(key).unwrap_or(&empty), o_ctx);
        !entry.is_empty()
    });
    for (key, theirs) in o {
        if s.contains_key(key) {
            continue;
        }
        // As in `join_set`: a key dropped above joins to empty again.
        let mut entry = Entry::default();
        entry.join(ctx, theirs, o_ctx);
        if !entry.is_empty() {
            s.insert(key.clone(), entry);
        }
    }
}

/// `join_map` for an `o` that touches only the subtree at `path`: its
/// store holds nothing off the path and its context covers no dot held off
/// the path, so only the entries on the path are joined.
pub(crate) fn join_map_along(
    s: &mut MapStore,
    ctx: &CausalContext,
    o: &MapStore,
    o_ctx: &CausalContext,
    path: &[String],
) {
    let Some((key, rest)) = path.split_first() else {
        return join_map(s, ctx, o, o_ctx);
    };
    if o.keys().any(|k| k != key) {
        return join_map(s, ctx, o, o_ctx);
    }
    let empty = Entry::default();
    let theirs = o.get(key).unwrap_or(&empty);
    let mine = s.entry(key.clone()).or_default();
    if rest.is_empty() {
        mine.join(ctx, theirs, o_ctx);
    } else {
        join_fun(&mut mine.counter, ctx, &theirs.counter, o_ctx);
        join_fun(&mut mine.pncounter, ctx, &theirs.pncounter, o_ctx);
        join_fun(&mut mine.register, ctx, &theirs.register, o_ctx);
        join_set(&mut mine.set, ctx, &theirs.set, o_ctx);
        join_map_along(&mut mine.map, ctx, &theirs.map, o_ctx, rest);
    }
    if mine.is_empty() {
        s.remove(key);
    }
}

/// Canonical JSON text: object keys sorted (explicitly, as serde_json keeps
/// insertion order when any crate in the build enables `preserve_order`),
/// no whitespace. Equal values give equal text.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(child) = m.get(k) {
                    write_canonical(child, out);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Whether `v` nests at most `max` arrays/objects deep. Stops descending
/// past `max`, so the recursion is bounded whatever the input.
pub(crate) fn depth_within(v: &Value, max: usize) -> bool {
    match v {
        Value::Array(a) => max > 0 && a.iter().all(|x| depth_within(x, max - 1)),
        Value::Object(m) => max > 0 && m.values().all(|x| depth_within(x, max - 1)),
        _ => true,
    }
}
