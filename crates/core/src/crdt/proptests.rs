//! Property tests: the join is a semilattice on random states, replicas
//! converge under any delivery order with duplicates, the canonical JSON
//! round-trips, and the parsers never panic.

use proptest::prelude::{Just, Strategy, any, prop, prop_oneof};
use proptest::test_runner::Config;
use proptest::{prop_assert, prop_assert_eq, proptest};
use serde_json::{Map, Value, json};

use super::{Document, Op, parse_ops};

const REPLICAS: [&str; 4] = ["r0", "r1", "r2", "r3"];

/// One step of a random history.
#[derive(Debug, Clone)]
enum Step {
    /// Replica `replica` applies `ops` at `now`.
    Apply {
        replica: usize,
        ops: Vec<Op>,
        now: u64,
    },
    /// Replica `to` merges the full state of replica `from`.
    Merge { from: usize, to: usize },
}

fn path() -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        Just(vec!["a"]),
        Just(vec!["b"]),
        Just(vec!["m"]),
        Just(vec!["m", "x"]),
        Just(vec!["m", "y"]),
        Just(vec!["a", "z"]),
    ]
    .prop_map(|p| p.into_iter().map(str::to_owned).collect())
}

fn element() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(1)),
        Just(json!(2)),
        Just(json!("x")),
        Just(json!(null)),
        Just(json!({"k": [1, "y"]})),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (path(), 1u64..4).prop_map(|(path, by)| Op::CounterIncrement { path, by }),
        (path(), prop_oneof![1i64..4, -3i64..0])
            .prop_map(|(path, by)| Op::PnCounterAdd { path, by }),
        (path(), element(), prop::option::of(0u64..3)).prop_map(|(path, value, timestamp)| {
            Op::RegisterSet {
                path,
                value,
                timestamp,
            }
        }),
        (path(), element()).prop_map(|(path, value)| Op::SetAdd { path, value }),
        (path(), element()).prop_map(|(path, value)| Op::SetRemove { path, value }),
        path().prop_map(|path| Op::MapDelete { path }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0usize..4, prop::collection::vec(op(), 1..4), 0u64..4)
            .prop_map(|(replica, ops, now)| Step::Apply { replica, ops, now }),
        1 => (0usize..4, 0usize..4).prop_map(|(from, to)| Step::Merge { from, to }),
    ]
}

/// The final states of `n` replicas after `steps`, and every delta made.
fn play(n: usize, steps: &[Step]) -> (Vec<Document>, Vec<Document>) {
    let mut states = vec![Document::new(); n];
    let mut deltas = Vec::new();
    for s in steps {
        match s {
            Step::Apply { replica, ops, now } => {
                let i = replica % n;
                // Refused ops (type conflicts) change nothing; that is part
                // of the history too.
                if let Ok(d) = states[i].apply(REPLICAS[i], ops, *now) {
                    deltas.push(d);
                }
            }
            Step::Merge { from, to } => {
                let other = states[from % n].clone();
                states[to % n].merge(&other);
            }
        }
    }
    (states, deltas)
}

fn join(a: &Document, b: &Document) -> Document {
    let mut out = a.clone();
    out.merge(b);
    out
}

fn join_all(states: &[Document]) -> Document {
    states.iter().fold(Document::new(), |acc, s| join(&acc, s))
}

/// `items` in an order given by `keys`, with the items at `dups` repeated.
fn shuffled<'a, T>(items: &'a [T], keys: &[u32], dups: &[usize]) -> Vec<&'a T> {
    if items.is_empty() {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..items.len())
        .chain(dups.iter().map(|d| d % items.len()))
        .collect();
    let key = |pos: usize| keys.get(pos % keys.len().max(1)).copied().unwrap_or(0);
    let mut keyed: Vec<(u32, usize, usize)> = order
        .drain(..)
        .enumerate()
        .map(|(pos, i)| (key(pos), pos, i))
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, _, i)| &items[i]).collect()
}

fn delivery() -> impl Strategy<Value = (Vec<u32>, Vec<usize>)> {
    (
        prop::collection::vec(any::<u32>(), 1..64),
        prop::collection::vec(any::<usize>(), 0..12),
    )
}

fn history() -> impl Strategy<Value = (usize, Vec<Step>)> {
    (2usize..=4, prop::collection::vec(step(), 0..32))
}

/// Arbitrary JSON, biased towards the words ops and states use.
fn json_value() -> impl Strategy<Value = Value> {
    let word = prop_oneof![
        Just("op"),
        Just("path"),
        Just("by"),
        Just("value"),
        Just("timestamp"),
        Just("counter.increment"),
        Just("pncounter.add"),
        Just("register.set"),
        Just("set.add"),
        Just("set.remove"),
        Just("map.delete"),
        Just("clock"),
        Just("vv"),
        Just("cloud"),
        Just("root"),
        Just("counter"),
        Just("pncounter"),
        Just("register"),
        Just("set"),
        Just("map"),
        Just("r1"),
        Just("a"),
        Just(""),
    ]
    .prop_map(str::to_owned);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..4).prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        word.clone().prop_map(Value::String),
        "[a-z.]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((word.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<String, Value>>())),
        ]
    })
}

/// Replaces the node reached by following `choices` with `with`.
fn mutate(v: &mut Value, choices: &[usize], with: Value) {
    let Some((&c, rest)) = choices.split_first() else {
        *v = with;
        return;
    };
    match v {
        Value::Object(m) if !m.is_empty() && c % 5 != 0 => {
            let key = m.keys().nth(c % m.len()).cloned().unwrap_or_default();
            if let Some(child) = m.get_mut(&key) {
                mutate(child, rest, with);
            }
        }
        Value::Array(a) if !a.is_empty() && c % 5 != 0 => {
            let i = c % a.len();
            mutate(&mut a[i], rest, with);
        }
        _ => *v = with,
    }
}

proptest! {
    #![proptest_config(Config::with_cases(128))]

    /// The join is commutative, associative and idempotent on states and
    /// deltas of random histories.
    #[test]
    fn merge_is_a_semilattice_join(
        (n, steps) in history(),
        picks in (any::<usize>(), any::<usize>(), any::<usize>()),
    ) {
        let (states, deltas) = play(n, &steps);
        let pool: Vec<&Document> = states.iter().chain(deltas.iter()).collect();
        let a = pool[picks.0 % pool.len()];
        let b = pool[picks.1 % pool.len()];
        let c = pool[picks.2 % pool.len()];
        prop_assert_eq!(join(a, b), join(b, a));
        prop_assert_eq!(join(&join(a, b), c), join(a, &join(b, c)));
        prop_assert_eq!(&join(a, a), a);
        prop_assert_eq!(join(&join(a, b), b), join(a, b));
        prop_assert_eq!(join(a, b).hash(), join(b, a).hash());
    }

    /// Applying ops changes a state exactly as merging their delta into
    /// it does (apply joins only along the op's path).
    #[test]
    fn apply_equals_merging_its_delta((n, steps) in history()) {
        let mut states = vec![Document::new(); n];
        for s in &steps {
            match s {
                Step::Apply { replica, ops, now } => {
                    let i = replica % n;
                    let before = states[i].clone();
                    match states[i].apply(REPLICAS[i], ops, *now) {
                        Ok(d) => prop_assert_eq!(&states[i], &join(&before, &d)),
                        Err(_) => prop_assert_eq!(&states[i], &before),
                    }
                }
                Step::Merge { from, to } => {
                    let other = states[from % n].clone();
                    states[to % n].merge(&other);
                }
            }
        }
    }

    /// Every replica, and fresh ones, end equal once every delta reached
    /// them, in any order and with duplicates.
    #[test]
    fn replicas_converge_when_every_delta_is_delivered(
        (n, steps) in history(),
        orders in prop::collection::vec(delivery(), 6),
    ) {
        let (mut states, deltas) = play(n, &steps);
        let expected = join_all(&states);
        prop_assert_eq!(join_all(&deltas), expected.clone());
        let mut receivers = vec![Document::new(); 2];
        receivers.append(&mut states);
        for (receiver, (keys, dups)) in receivers.iter_mut().zip(orders.iter()) {
            for d in shuffled(&deltas, keys, dups) {
                receiver.merge(d);
            }
            prop_assert_eq!(receiver.hash(), expected.hash());
            prop_assert_eq!(receiver.value(), expected.value());
            prop_assert_eq!(&*receiver, &expected);
        }
    }

    /// Exchanging full states in any order with duplicates converges too.
    #[test]
    fn replicas_converge_when_full_states_are_exchanged(
        (n, steps) in history(),
        orders in prop::collection::vec(delivery(), 4),
    ) {
        let (states, _) = play(n, &steps);
        let snapshot = states.clone();
        let expected = join_all(&states);
        for (mut state, (keys, dups)) in states.into_iter().zip(orders.iter()) {
            for other in shuffled(&snapshot, keys, dups) {
                state.merge(other);
            }
            prop_assert_eq!(state.hash(), expected.hash());
            prop_assert_eq!(state.value(), expected.value());
        }
    }

    /// The canonical JSON parses back to the same state, also as text.
    #[test]
    fn to_json_round_trips((n, steps) in history()) {
        let (states, deltas) = play(n, &steps);
        for d in states.iter().chain(deltas.iter()) {
            let v = d.to_json();
            prop_assert_eq!(&Document::from_json(&v), &Ok(d.clone()));
            let text = v.to_string();
            let reparsed: Value = serde_json::from_str(&text)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let back = Document::from_json(&reparsed);
            prop_assert_eq!(back.as_ref().map(Document::hash), Ok(d.hash()));
        }
    }

    /// A state altered anywhere is refused with a field, or accepted and
    /// then behaves: it round-trips and joins commutatively.
    #[test]
    fn altered_states_are_refused_or_behave(
        (n, steps) in history(),
        choices in prop::collection::vec(any::<usize>(), 0..8),
        with in json_value(),
    ) {
        let (states, _) = play(n, &steps);
        let mut v = states[0].to_json();
        mutate(&mut v, &choices, with);
        match Document::from_json(&v) {
            Ok(d) => {
                prop_assert_eq!(Document::from_json(&d.to_json()), Ok(d.clone()));
                prop_assert_eq!(join(&d, &states[1]), join(&states[1], &d));
                let _ = d.value();
            }
            Err(e) => prop_assert!(!e.field.is_empty() && !e.message.is_empty()),
        }
    }
}

proptest! {
    #![proptest_config(Config::with_cases(128))]

    /// Any JSON is an op or an error naming a field; never a panic.
    #[test]
    fn op_parsers_never_panic(v in json_value()) {
        if let Err(e) = Op::parse(&v) {
            prop_assert!(!e.field.is_empty() && !e.message.is_empty());
        }
        match parse_ops(&v, 4) {
            Ok(ops) => prop_assert!(!ops.is_empty() && ops.len() <= 4),
            Err(e) => prop_assert!(!e.field.is_empty() && !e.message.is_empty()),
        }
        let wrapped = Value::Array(vec![v]);
        if let Ok(ops) = parse_ops(&wrapped, 4) {
            let mut d = Document::new();
            let _ = d.apply("r1", &ops, 0);
        }
    }

    /// Any JSON is a state or an error naming a field; never a panic.
    #[test]
    fn state_parser_never_panics(v in json_value()) {
        match Document::from_json(&v) {
            Ok(d) => prop_assert_eq!(Document::from_json(&d.to_json()), Ok(d)),
            Err(e) => prop_assert!(!e.field.is_empty() && !e.message.is_empty()),
        }
    }
}
