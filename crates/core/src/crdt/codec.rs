//! The canonical JSON form of a document (`to_json`) and its strict parser
//! (`from_json`). The format is described in the module doc of `crdt`.

use std::collections::{BTreeSet, HashSet};

use serde_json::{Map, Value};

use super::context::{CausalContext, Dot};
use super::store::{Element, Entry, MapStore, Pn, Stamped, canonical_json, depth_within};
use super::{
    CrdtError, Document, MAX_PATH_DEPTH, MAX_VALUE_DEPTH, brief, check_key, check_replica,
    field_path,
};

/// The canonical JSON of a document.
pub(crate) fn to_json(doc: &Document) -> Value {
    let vv: Map<String, Value> = doc
        .ctx
        .vv()
        .iter()
        .map(|(r, &n)| (r.clone(), Value::from(n)))
        .collect();
    let cloud: Vec<Value> = doc.ctx.cloud().iter().map(dot_json).collect();
    let mut clock = Map::new();
    clock.insert("vv".into(), Value::Object(vv));
    clock.insert("cloud".into(), Value::Array(cloud));
    let mut out = Map::new();
    out.insert("clock".into(), Value::Object(clock));
    out.insert("root".into(), map_json(&doc.root));
    Value::Object(out)
}

fn dot_json(d: &Dot) -> Value {
    Value::Array(vec![
        Value::from(d.replica.as_str()),
        Value::from(d.counter),
    ])
}

fn map_json(map: &MapStore) -> Value {
    Value::Object(
        map.iter()
            .map(|(k, e)| (k.clone(), entry_json(e)))
            .collect(),
    )
}

fn entry_json(e: &Entry) -> Value {
    let mut m = Map::new();
    if !e.counter.is_empty() {
        let items = e.counter.iter().map(|(d, &amount)| {
            Value::Array(vec![
                Value::from(d.replica.as_str()),
                Value::from(d.counter),
                Value::from(amount),
            ])
        });
        m.insert("counter".into(), Value::Array(items.collect()));
    }
    if !e.pncounter.is_empty() {
        let items = e.pncounter.iter().map(|(d, pn)| {
            Value::Array(vec![
                Value::from(d.replica.as_str()),
                Value::from(d.counter),
                Value::from(pn.p),
                Value::from(pn.n),
            ])
        });
        m.insert("pncounter".into(), Value::Array(items.collect()));
    }
    if !e.register.is_empty() {
        let items = e.register.iter().map(|(d, s)| {
            Value::Array(vec![
                Value::from(d.replica.as_str()),
                Value::from(d.counter),
                Value::from(s.timestamp),
                s.value.clone(),
            ])
        });
        m.insert("register".into(), Value::Array(items.collect()));
    }
    if !e.set.is_empty() {
        let items = e.set.values().map(|el| {
            Value::Array(vec![
                el.value.clone(),
                Value::Array(el.dots.iter().map(dot_json).collect()),
            ])
        });
        m.insert("set".into(), Value::Array(items.collect()));
    }
    if !e.map.is_empty() {
        m.insert("map".into(), map_json(&e.map));
    }
    Value::Object(m)
}

/// Parses and validates a state; errors name the field path
/// (`root.a.map.b.counter[0][2]`).
pub(crate) fn from_json(v: &Value) -> Result<Document, CrdtError> {
    let top = object(v, "state", "must be an object {\"clock\": …, \"root\": …}")?;
    only_fields(top, "", &["clock", "root"])?;
    let clock = required(top, "clock")?;
    let clock = object(
        clock,
        "clock",
        "must be an object {\"vv\": {…}, \"cloud\": […]}",
    )?;
    only_fields(clock, "clock", &["vv", "cloud"])?;

    let mut ctx = CausalContext::new();
    let vv = object(
        required(clock, "vv").map_err(|e| e.under("clock"))?,
        "clock.vv",
        "must be an object of replica id → counter",
    )?;
    for (replica, n) in vv {
        let field = field_path("clock.vv", replica);
        check_replica(replica).map_err(|m| CrdtError::new(field.clone(), m))?;
        let n = positive(n, &field, "counter")?;
        ctx.insert_prefix(replica, n);
    }
    let cloud = required(clock, "cloud").map_err(|e| e.under("clock"))?;
    let Some(cloud) = cloud.as_array() else {
        return Err(CrdtError::new(
            "clock.cloud",
            "must be an array of dots [replica, counter]",
        ));
    };
    for (i, d) in cloud.iter().enumerate() {
        ctx.insert(parse_dot(d, &format!("clock.cloud[{i}]"))?);
    }

    let mut parser = Parser {
        ctx: &ctx,
        seen: HashSet::new(),
    };
    let root = required(top, "root")?;
    let root = parser.map(root, "root", 1)?;
    Ok(Document { ctx, root })
}

struct Parser<'a> {
    ctx: &'a CausalContext,
    /// Every dot met so far: a dot is one write and lives in one place.
    seen: HashSet<Dot>,
}

impl Parser<'_> {
    fn map(&mut self, v: &Value, field: &str, depth: usize) -> Result<MapStore, CrdtError> {
        let m = object(v, field, "must be an object of key → entry")?;
        if !m.is_empty() && depth > MAX_PATH_DEPTH {
            return Err(CrdtError::new(
                field,
                format!("nests maps more than {MAX_PATH_DEPTH} deep"),
            ));
        }
        let mut out = MapStore::new();
        for (key, entry) in m {
            let at = field_path(field, key);
            check_key(key).map_err(|msg| CrdtError::new(at.clone(), msg))?;
            let entry = self.entry(entry, &at, depth)?;
            if entry.is_empty() {
                return Err(CrdtError::new(
                    at,
                    "holds no value; omit keys whose entry is empty",
                ));
            }
            out.insert(key.clone(), entry);
        }
        Ok(out)
    }

    fn entry(&mut self, v: &Value, field: &str, depth: usize) -> Result<Entry, CrdtError> {
        let m = object(
            v,
            field,
            "must be an object with some of counter, pncounter, register, set, map",
        )?;
        only_fields(
            m,
            field,
            &["counter", "pncounter", "register", "set", "map"],
        )?;
        let mut e = Entry::default();
        if let Some(items) = m.get("counter") {
            let at = format!("{field}.counter");
            for (i, item) in array(items, &at, "[replica, counter, amount]")?
                .iter()
                .enumerate()
            {
                let at = format!("{at}[{i}]");
                let [r, c, amount] = tuple(item, &at, "[replica, counter, amount]")?;
                let dot = self.dot(r, c, &at)?;
                let amount = positive(amount, &format!("{at}[2]"), "amount")?;
                e.counter.insert(dot, amount);
            }
        }
        if let Some(items) = m.get("pncounter") {
            let at = format!("{field}.pncounter");
            for (i, item) in array(items, &at, "[replica, counter, p, n]")?
                .iter()
                .enumerate()
            {
                let at = format!("{at}[{i}]");
                let [r, c, p, n] = tuple(item, &at, "[replica, counter, p, n]")?;
                let dot = self.dot(r, c, &at)?;
                let p = whole(p, &format!("{at}[2]"))?;
                let n = whole(n, &format!("{at}[3]"))?;
                if p == 0 && n == 0 {
                    return Err(CrdtError::new(
                        at,
                        "p and n are both 0; a pncounter dot records at least one change",
                    ));
                }
                e.pncounter.insert(dot, Pn { p, n });
            }
        }
        if let Some(items) = m.get("register") {
            let at = format!("{field}.register");
            let shape = "[replica, counter, timestamp, value]";
            for (i, item) in array(items, &at, shape)?.iter().enumerate() {
                let at = format!("{at}[{i}]");
                let [r, c, timestamp, value] = tuple(item, &at, shape)?;
                let dot = self.dot(r, c, &at)?;
                let timestamp = whole(timestamp, &format!("{at}[2]"))?;
                let value = nested_value(value, &format!("{at}[3]"))?;
                e.register.insert(dot, Stamped { timestamp, value });
            }
        }
        if let Some(items) = m.get("set") {
            let at = format!("{field}.set");
            let shape = "[element, [[replica, counter], …]]";
            for (i, item) in array(items, &at, shape)?.iter().enumerate() {
                let at = format!("{at}[{i}]");
                let [value, dots] = tuple(item, &at, shape)?;
                let value = nested_value(value, &format!("{at}[0]"))?;
                let dots_at = format!("{at}[1]");
                let dots = array(dots, &dots_at, "[replica, counter]")?;
                if dots.is_empty() {
                    return Err(CrdtError::new(
                        dots_at,
                        "holds no dots; omit elements that are not in the set",
                    ));
                }
                let mut set = BTreeSet::new();
                for (j, d) in dots.iter().enumerate() {
                    let d_at = format!("{dots_at}[{j}]");
                    let [r, c] = tuple(d, &d_at, "[replica, counter]")?;
                    set.insert(self.dot(r, c, &d_at)?);
                }
                let key = canonical_json(&value);
                if e.set.contains_key(&key) {
                    return Err(CrdtError::new(
                        format!("{at}[0]"),
                        format!("element {key} is listed twice; list each element once"),
                    ));
                }
                e.set.insert(key, Element { value, dots: set });
            }
        }
        if let Some(map) = m.get("map") {
            e.map = self.map(map, &format!("{field}.map"), depth + 1)?;
        }
        Ok(e)
    }

    /// A dot of a store: well-formed, covered by the context, met once.
    fn dot(&mut self, replica: &Value, counter: &Value, at: &str) -> Result<Dot, CrdtError> {
        let dot = dot_parts(replica, counter, at)?;
        if !self.ctx.contains(&dot) {
            return Err(CrdtError::new(
                at,
                format!(
                    "dot {dot} is not covered by the clock; a state's clock includes every dot it holds"
                ),
            ));
        }
        if !self.seen.insert(dot.clone()) {
            return Err(CrdtError::new(
                at,
                format!("dot {dot} appears twice; a dot is one write and lives in one place"),
            ));
        }
        Ok(dot)
    }
}

fn parse_dot(v: &Value, at: &str) -> Result<Dot, CrdtError> {
    let [r, c] = tuple(v, at, "[replica, counter]")?;
    dot_parts(r, c, at)
}

fn dot_parts(replica: &Value, counter: &Value, at: &str) -> Result<Dot, CrdtError> {
    let r_at = format!("{at}[0]");
    let Some(r) = replica.as_str() else {
        return Err(CrdtError::new(r_at, "must be a replica id (a string)"));
    };
    check_replica(r).map_err(|m| CrdtError::new(r_at, m))?;
    let counter = positive(counter, &format!("{at}[1]"), "counter")?;
    Ok(Dot::new(r, counter))
}

fn object<'a>(v: &'a Value, field: &str, what: &str) -> Result<&'a Map<String, Value>, CrdtError> {
    v.as_object().ok_or_else(|| CrdtError::new(field, what))
}

fn array<'a>(v: &'a Value, field: &str, item: &str) -> Result<&'a Vec<Value>, CrdtError> {
    v.as_array()
        .ok_or_else(|| CrdtError::new(field, format!("must be an array of {item}")))
}

/// An array of exactly `N` items.
fn tuple<'a, const N: usize>(
    v: &'a Value,
    field: &str,
    shape: &str,
) -> Result<&'a [Value; N], CrdtError> {
    v.as_array()
        .and_then(|a| <&[Value; N]>::try_from(a.as_slice()).ok())
        .ok_or_else(|| CrdtError::new(field, format!("must be {shape}")))
}

fn required<'a>(m: &'a Map<String, Value>, name: &str) -> Result<&'a Value, CrdtError> {
    m.get(name)
        .ok_or_else(|| CrdtError::new(name, "is required"))
}

fn only_fields(m: &Map<String, Value>, prefix: &str, allowed: &[&str]) -> Result<(), CrdtError> {
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    match keys.into_iter().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(CrdtError::new(
            field_path(prefix, k),
            format!("unknown field; allowed are {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn whole(v: &Value, field: &str) -> Result<u64, CrdtError> {
    v.as_u64().ok_or_else(|| {
        CrdtError::new(
            field,
            format!("must be a whole number ≥ 0, got {}", brief(v)),
        )
    })
}

fn positive(v: &Value, field: &str, what: &str) -> Result<u64, CrdtError> {
    match v.as_u64() {
        Some(n) if n >= 1 => Ok(n),
        _ => Err(CrdtError::new(
            field,
            format!("{what} must be a whole number ≥ 1, got {}", brief(v)),
        )),
    }
}

fn nested_value(v: &Value, field: &str) -> Result<Value, CrdtError> {
    if depth_within(v, MAX_VALUE_DEPTH) {
        Ok(v.clone())
    } else {
        Err(CrdtError::new(
            field,
            format!("nests arrays/objects more than {MAX_VALUE_DEPTH} deep"),
        ))
    }
}
