//! The semantics of each type, op parsing and state validation.

use serde_json::{Value, json};

use super::{CrdtError, Document, Op, parse_ops};

fn ops(v: Value) -> Vec<Op> {
    match parse_ops(&v, 64) {
        Ok(ops) => ops,
        Err(e) => panic!("test ops must parse: {e}"),
    }
}

/// Applies ops given as JSON and returns the delta.
fn run(doc: &mut Document, replica: &str, v: Value, now_ms: u64) -> Document {
    match doc.apply(replica, &ops(v), now_ms) {
        Ok(delta) => delta,
        Err(e) => panic!("ops must apply: {e}"),
    }
}

fn refused(doc: &mut Document, replica: &str, v: Value) -> CrdtError {
    match doc.apply(replica, &ops(v), 0) {
        Ok(_) => panic!("ops must be refused"),
        Err(e) => e,
    }
}

fn parse_error(v: Value) -> CrdtError {
    match parse_ops(&v, 4) {
        Ok(ops) => panic!("must not parse, got {ops:?}"),
        Err(e) => e,
    }
}

fn merged(a: &Document, b: &Document) -> Document {
    let mut out = a.clone();
    out.merge(b);
    out
}

#[test]
fn counters_sum_across_replicas() {
    let mut a = Document::new();
    let mut b = Document::new();
    run(
        &mut a,
        "r1",
        json!([{"op":"counter.increment","path":"hits","by":2}]),
        0,
    );
    run(
        &mut a,
        "r1",
        json!([{"op":"counter.increment","path":"hits"}]),
        0,
    );
    run(
        &mut b,
        "r2",
        json!([{"op":"counter.increment","path":"hits","by":4}]),
        0,
    );
    assert_eq!(a.value(), json!({"hits": 3}));
    let m = merged(&a, &b);
    assert_eq!(m.value(), json!({"hits": 7}));
    assert_eq!(m, merged(&b, &a));
}

#[test]
fn a_counter_delta_carries_the_cumulative_amount_and_supersedes_the_old_dot() {
    let mut gw = Document::new();
    let d1 = run(
        &mut gw,
        "gw",
        json!([{"op":"counter.increment","path":"n","by":2}]),
        0,
    );
    let d2 = run(
        &mut gw,
        "gw",
        json!([{"op":"counter.increment","path":"n","by":3}]),
        0,
    );
    assert_eq!(d2.value(), json!({"n": 5}));
    // Out of order and duplicated, the agent ends at the same value.
    let mut agent = Document::new();
    for d in [&d2, &d1, &d2, &d1] {
        agent.merge(d);
    }
    assert_eq!(agent.value(), json!({"n": 5}));
    assert_eq!(agent.hash(), gw.hash());
}

#[test]
fn pncounter_adds_and_subtracts_across_replicas() {
    let mut a = Document::new();
    let mut b = Document::new();
    run(
        &mut a,
        "r1",
        json!([{"op":"pncounter.add","path":"stock","by":5}]),
        0,
    );
    run(
        &mut a,
        "r1",
        json!([{"op":"pncounter.add","path":"stock","by":-7}]),
        0,
    );
    run(
        &mut b,
        "r2",
        json!([{"op":"pncounter.add","path":"stock","by":-1}]),
        0,
    );
    assert_eq!(a.value(), json!({"stock": -2}));
    assert_eq!(merged(&a, &b).value(), json!({"stock": -3}));
}

#[test]
fn or_set_concurrent_add_and_remove_lets_the_add_win() {
    let mut a = Document::new();
    run(
        &mut a,
        "r1",
        json!([{"op":"set.add","path":"tags","value":"x"}]),
        0,
    );
    let mut b = a.clone();
    // r1 removes the add it saw while r2 adds "x" again concurrently.
    run(
        &mut a,
        "r1",
        json!([{"op":"set.remove","path":"tags","value":"x"}]),
        0,
    );
    run(
        &mut b,
        "r2",
        json!([{"op":"set.add","path":"tags","value":"x"}]),
        0,
    );
    assert_eq!(a.value(), json!({}));
    assert_eq!(merged(&a, &b).value(), json!({"tags": ["x"]}));
    assert_eq!(merged(&b, &a).value(), json!({"tags": ["x"]}));
}

#[test]
fn or_set_remove_of_a_seen_add_removes_it_and_elements_read_sorted() {
    let mut d = Document::new();
    run(
        &mut d,
        "r1",
        json!([
            {"op":"set.add","path":"s","value":{"b":1,"a":2}},
            {"op":"set.add","path":"s","value":"zeta"},
            {"op":"set.add","path":"s","value":3},
            {"op":"set.add","path":"s","value":3},
            {"op":"set.add","path":"s","value":"alpha"},
        ]),
        0,
    );
    // Sorted by canonical JSON: strings (`"`) before numbers before objects.
    assert_eq!(
        d.value(),
        json!({"s": ["alpha", "zeta", 3, {"a": 2, "b": 1}]})
    );
    let mut other = Document::new();
    other.merge(&d);
    run(
        &mut other,
        "r2",
        json!([{"op":"set.remove","path":"s","value":"zeta"}]),
        0,
    );
    d.merge(&other);
    assert_eq!(
        d.get(&["s".into()]),
        Some(json!(["alpha", 3, {"a":2,"b":1}]))
    );
}

#[test]
fn concurrent_register_sets_read_the_higher_timestamp() {
    let mut a = Document::new();
    let mut b = Document::new();
    run(
        &mut a,
        "r9",
        json!([{"op":"register.set","path":"mode","value":"early"}]),
        1_000,
    );
    run(
        &mut b,
        "r1",
        json!([{"op":"register.set","path":"mode","value":"late"}]),
        2_000,
    );
    assert_eq!(merged(&a, &b).value(), json!({"mode": "late"}));
    assert_eq!(merged(&b, &a).value(), json!({"mode": "late"}));
    // Both concurrent sets stay until a set that sees them replaces them.
    let mut m = merged(&a, &b);
    run(
        &mut m,
        "r1",
        json!([{"op":"register.set","path":"mode","value":"final"}]),
        0,
    );
    assert_eq!(
        m.to_json()["root"]["mode"]["register"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(m.value(), json!({"mode": "final"}));
}

#[test]
fn concurrent_register_sets_with_equal_timestamps_read_the_higher_replica_id() {
    let mut a = Document::new();
    let mut b = Document::new();
    run(
        &mut a,
        "agent-b",
        json!([{"op":"register.set","path":"k","value":1,"timestamp":5}]),
        0,
    );
    run(
        &mut b,
        "agent-a",
        json!([{"op":"register.set","path":"k","value":2,"timestamp":5}]),
        0,
    );
    assert_eq!(merged(&a, &b).value(), json!({"k": 1}));
    assert_eq!(merged(&b, &a).value(), json!({"k": 1}));
}

#[test]
fn a_register_set_without_timestamp_lands_after_the_newest_it_saw() {
    let mut d = Document::new();
    run(
        &mut d,
        "r1",
        json!([{"op":"register.set","path":"k","value":"a","timestamp":9_000}]),
        0,
    );
    // The local clock is behind the register's newest write.
    let delta = run(
        &mut d,
        "r2",
        json!([{"op":"register.set","path":"k","value":"b"}]),
        100,
    );
    assert_eq!(delta.to_json()["root"]["k"]["register"][0][2], json!(9_001));
    assert_eq!(d.value(), json!({"k": "b"}));
}

#[test]
fn map_delete_keeps_a_concurrent_unseen_increment() {
    let mut a = Document::new();
    run(
        &mut a,
        "r1",
        json!([{"op":"counter.increment","path":"n","by":5}]),
        0,
    );
    let mut b = a.clone();
    run(&mut a, "r1", json!([{"op":"map.delete","path":"n"}]), 0);
    run(
        &mut b,
        "r2",
        json!([{"op":"counter.increment","path":"n","by":1}]),
        0,
    );
    assert_eq!(a.value(), json!({}));
    assert_eq!(merged(&a, &b).value(), json!({"n": 1}));
    assert_eq!(merged(&b, &a).value(), json!({"n": 1}));
}

#[test]
fn a_counter_incremented_after_its_deletion_starts_from_zero() {
    let mut d = Document::new();
    run(
        &mut d,
        "r1",
        json!([{"op":"counter.increment","path":"n","by":5}]),
        0,
    );
    run(&mut d, "r1", json!([{"op":"map.delete","path":"n"}]), 0);
    run(
        &mut d,
        "r1",
        json!([{"op":"counter.increment","path":"n","by":2}]),
        0,
    );
    assert_eq!(d.value(), json!({"n": 2}));
}

#[test]
fn writing_another_type_than_the_key_holds_is_refused() {
    let mut d = Document::new();
    run(
        &mut d,
        "r1",
        json!([{"op":"set.add","path":["a","b"],"value":1}]),
        0,
    );
    let e = refused(
        &mut d,
        "r1",
        json!([{"op":"counter.increment","path":["a","b"]}]),
    );
    assert_eq!(e.field, "ops[0].path");
    assert_eq!(
        e.message,
        "path `a.b` holds a set, not a counter; delete it first with map.delete"
    );
    let e = refused(
        &mut d,
        "r1",
        json!([{"op":"register.set","path":["a","b","c"],"value":1}]),
    );
    assert_eq!(e.field, "ops[0].path");
    assert!(
        e.message.contains("path `a.b` holds a set, not a map"),
        "{e}"
    );
    // After a delete the key takes any type.
    run(
        &mut d,
        "r1",
        json!([{"op":"map.delete","path":["a","b"]},{"op":"counter.increment","path":["a","b"]}]),
        0,
    );
    assert_eq!(d.value(), json!({"a": {"b": 1}}));
}

#[test]
fn concurrent_writes_of_different_types_converge_and_read_by_precedence() {
    let mut a = Document::new();
    let mut b = Document::new();
    run(
        &mut a,
        "r1",
        json!([{"op":"register.set","path":"k","value":"v"}]),
        0,
    );
    run(
        &mut b,
        "r2",
        json!([{"op":"set.add","path":"k","value":"x"}]),
        0,
    );
    let mut m = merged(&a, &b);
    assert_eq!(m, merged(&b, &a));
    assert_eq!(m.value(), json!({"k": ["x"]}));
    let e = refused(
        &mut m,
        "r1",
        json!([{"op":"register.set","path":"k","value":1}]),
    );
    assert!(e.message.contains("holds a set, not a register"), "{e}");
    run(&mut m, "r1", json!([{"op":"map.delete","path":"k"}]), 0);
    assert!(m.is_empty());
}

#[test]
fn nested_maps_are_created_on_write_and_deleted_recursively() {
    let mut d = Document::new();
    run(
        &mut d,
        "r1",
        json!([
            {"op":"counter.increment","path":["m","x"]},
            {"op":"register.set","path":["m","y"],"value":{"deep":[1,2]}},
            {"op":"pncounter.add","path":["m","z","w"],"by":-4},
        ]),
        0,
    );
    assert_eq!(
        d.value(),
        json!({"m": {"x": 1, "y": {"deep": [1, 2]}, "z": {"w": -4}}})
    );
    assert_eq!(d.get(&["m".into(), "z".into()]), Some(json!({"w": -4})));
    assert_eq!(d.get(&["m".into(), "x".into(), "q".into()]), None);
    run(
        &mut d,
        "r1",
        json!([{"op":"map.delete","path":["m","z","w"]}]),
        0,
    );
    assert_eq!(d.value(), json!({"m": {"x": 1, "y": {"deep": [1, 2]}}}));
    run(&mut d, "r1", json!([{"op":"map.delete","path":"m"}]), 0);
    assert!(d.is_empty());
    // Deleting what is not there changes nothing but succeeds.
    let delta = run(
        &mut d,
        "r1",
        json!([{"op":"map.delete","path":["nope","deeper"]}]),
        0,
    );
    assert_eq!(delta, Document::new());
}

#[test]
fn a_failing_op_leaves_the_document_unchanged() {
    let mut d = Document::new();
    run(
        &mut d,
        "r1",
        json!([{"op":"counter.increment","path":"a"}]),
        0,
    );
    let before = d.clone();
    let e = refused(
        &mut d,
        "r1",
        json!([{"op":"counter.increment","path":"a"},{"op":"set.add","path":"a","value":1}]),
    );
    assert_eq!(e.field, "ops[1].path");
    assert_eq!(d, before);
}

#[test]
fn a_delta_holds_only_what_the_ops_touched() {
    let mut d = Document::new();
    run(
        &mut d,
        "r1",
        json!([{"op":"counter.increment","path":"a"}]),
        0,
    );
    let delta = run(
        &mut d,
        "r1",
        json!([{"op":"set.add","path":["m","s"],"value":"x"}]),
        0,
    );
    assert_eq!(delta.value(), json!({"m": {"s": ["x"]}}));
    assert_eq!(delta.clock(), json!({}));
    assert_eq!(delta.cloud(), json!([["r1", 2]]));
    assert_eq!(d.clock(), json!({"r1": 2}));
}

#[test]
fn clear_ops_empty_the_document_and_keep_its_clock() {
    let mut d = Document::new();
    run(
        &mut d,
        "r1",
        json!([{"op":"counter.increment","path":"a"},{"op":"set.add","path":["b","c"],"value":1}]),
        0,
    );
    let clear = d.clear_ops();
    assert_eq!(clear.len(), 2);
    let Ok(_) = d.apply("r1", &clear, 0) else {
        panic!("clear ops apply")
    };
    assert!(d.is_empty());
    assert_eq!(d.value(), json!({}));
    assert_eq!(d.clock(), json!({"r1": 2}));
}

#[test]
fn hash_is_sha256_hex_and_equal_for_equal_states() {
    let mut a = Document::new();
    run(
        &mut a,
        "r1",
        json!([{"op":"counter.increment","path":"a"}]),
        0,
    );
    let mut b = Document::new();
    b.merge(&a);
    let h = a.hash();
    assert_eq!(h, b.hash());
    assert!(h.starts_with("sha256:"));
    assert_eq!(h.len(), 7 + 64);
    assert!(h[7..].chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
    assert_ne!(h, Document::new().hash());
}

#[test]
fn to_json_has_the_documented_shape() {
    let mut d = Document::new();
    run(
        &mut d,
        "r1",
        json!([
            {"op":"counter.increment","path":"c","by":3},
            {"op":"pncounter.add","path":"p","by":-2},
            {"op":"register.set","path":"r","value":"v","timestamp":7},
            {"op":"set.add","path":["m","s"],"value":true},
        ]),
        0,
    );
    assert_eq!(
        d.to_json(),
        json!({
            "clock": {"vv": {"r1": 4}, "cloud": []},
            "root": {
                "c": {"counter": [["r1", 1, 3]]},
                "p": {"pncounter": [["r1", 2, 0, 2]]},
                "r": {"register": [["r1", 3, 7, "v"]]},
                "m": {"map": {"s": {"set": [[true, [["r1", 4]]]]}}},
            }
        })
    );
    assert_eq!(Document::from_json(&d.to_json()), Ok(d));
}

#[test]
fn from_json_refuses_bad_states_naming_the_field() {
    let cases = [
        (json!([]), "state"),
        (json!({"clock": {"vv": {}, "cloud": []}}), "root"),
        (
            json!({"clock": {"vv": {}, "cloud": []}, "root": {}, "x": 1}),
            "x",
        ),
        (
            json!({"clock": {"vv": {"r1": 0}, "cloud": []}, "root": {}}),
            "clock.vv.r1",
        ),
        (
            json!({"clock": {"vv": {}, "cloud": [["r1"]]}, "root": {}}),
            "clock.cloud[0]",
        ),
        (
            json!({"clock": {"vv": {"": 1}, "cloud": []}, "root": {}}),
            r#"clock.vv[""]"#,
        ),
        (
            json!({"clock": {"vv": {}, "cloud": []}, "root": {"a.b": {}}}),
            r#"root["a.b"]"#,
        ),
        (json!({"": 1}), r#"[""]"#),
        (
            json!({"clock": {"vv": {"r1": 1}, "cloud": []}, "root": {"a": {"counter": [["r1", 2, 1]]}}}),
            "root.a.counter[0]",
        ),
        (
            json!({"clock": {"vv": {"r1": 1}, "cloud": []}, "root": {"a": {"counter": [["r1", 1, 0]]}}}),
            "root.a.counter[0][2]",
        ),
        (
            json!({"clock": {"vv": {"r1": 2}, "cloud": []}, "root": {
                "a": {"counter": [["r1", 1, 1]]},
                "b": {"register": [["r1", 1, 0, null]]}}}),
            "root.b.register[0]",
        ),
        (
            json!({"clock": {"vv": {"r1": 1}, "cloud": []}, "root": {"a": {}}}),
            "root.a",
        ),
        (
            json!({"clock": {"vv": {"r1": 1}, "cloud": []}, "root": {"a": {"map": {"b": {"lww": []}}}}}),
            "root.a.map.b.lww",
        ),
        (
            json!({"clock": {"vv": {"r1": 2}, "cloud": []}, "root": {"a": {"set": [
                [1, [["r1", 1]]], [1, [["r1", 2]]]]}}}),
            "root.a.set[1][0]",
        ),
        (
            json!({"clock": {"vv": {"r1": 1}, "cloud": []}, "root": {"a": {"set": [[1, []]]}}}),
            "root.a.set[0][1]",
        ),
        (
            json!({"clock": {"vv": {"r1": 1}, "cloud": []}, "root": {"a": {"pncounter": [["r1", 1, 0, 0]]}}}),
            "root.a.pncounter[0]",
        ),
    ];
    for (state, field) in cases {
        match Document::from_json(&state) {
            Ok(d) => panic!("{state} must be refused, got {d:?}"),
            Err(e) => assert_eq!(e.field, field, "{state}: {e}"),
        }
    }
}

#[test]
fn from_json_refuses_maps_nested_too_deep() {
    let mut entry = json!({"counter": [["r1", 1, 1]]});
    for _ in 0..16 {
        entry = json!({"map": {"k": entry}});
    }
    let state = json!({"clock": {"vv": {"r1": 1}, "cloud": []}, "root": {"k": entry}});
    let Err(e) = Document::from_json(&state) else {
        panic!("17 levels must be refused")
    };
    assert!(e.message.contains("more than 16 deep"), "{e}");
}

#[test]
fn from_json_normalizes_an_uncompacted_clock() {
    let state =
        json!({"clock": {"vv": {"r1": 1}, "cloud": [["r1", 1], ["r1", 2], ["r2", 3]]}, "root": {}});
    let Ok(d) = Document::from_json(&state) else {
        panic!("must parse")
    };
    assert_eq!(d.clock(), json!({"r1": 2}));
    assert_eq!(d.cloud(), json!([["r2", 3]]));
}

#[test]
fn parse_errors_name_the_field_path() {
    let cases = [
        (json!({}), "ops"),
        (json!([]), "ops"),
        (
            Value::Array(vec![json!({"op":"map.delete","path":"a"}); 5]),
            "ops",
        ),
        (json!([1]), "ops[0]"),
        (json!([{"path":"a"}]), "ops[0].op"),
        (json!([{"op":"counter.decrement","path":"a"}]), "ops[0].op"),
        (json!([{"op":"counter.increment"}]), "ops[0].path"),
        (json!([{"op":"counter.increment","path":""}]), "ops[0].path"),
        (json!([{"op":"counter.increment","path":[]}]), "ops[0].path"),
        (json!([{"op":"counter.increment","path":7}]), "ops[0].path"),
        (
            json!([{"op":"counter.increment","path":["a", 1]}]),
            "ops[0].path[1]",
        ),
        (
            json!([{"op":"counter.increment","path":["a", ""]}]),
            "ops[0].path[1]",
        ),
        (
            json!([{"op":"counter.increment","path":vec!["a"; 17]}]),
            "ops[0].path",
        ),
        (
            json!([{"op":"counter.increment","path":"x".repeat(257)}]),
            "ops[0].path",
        ),
        (
            json!([{"op":"map.delete","path":"a"},{"op":"counter.increment","path":"a","by":0}]),
            "ops[1].by",
        ),
        (
            json!([{"op":"counter.increment","path":"a","by":1.5}]),
            "ops[0].by",
        ),
        (
            json!([{"op":"counter.increment","path":"a","by":-1}]),
            "ops[0].by",
        ),
        (json!([{"op":"pncounter.add","path":"a"}]), "ops[0].by"),
        (
            json!([{"op":"pncounter.add","path":"a","by":0}]),
            "ops[0].by",
        ),
        (json!([{"op":"register.set","path":"a"}]), "ops[0].value"),
        (
            json!([{"op":"register.set","path":"a","value":1,"timestamp":-5}]),
            "ops[0].timestamp",
        ),
        (
            json!([{"op":"set.add","path":"a","value":1,"timestamp":5}]),
            "ops[0].timestamp",
        ),
        (
            json!([{"op":"map.delete","path":"a","value":1}]),
            "ops[0].value",
        ),
        (json!([{"op":"set.remove","path":"a"}]), "ops[0].value"),
    ];
    for (v, field) in cases {
        let e = parse_error(v.clone());
        assert_eq!(e.field, field, "{v}: {e}");
        assert!(!e.message.is_empty());
    }
    let Err(e) = Op::parse(&json!({"op":"counter.increment","path":"a","by":"2"})) else {
        panic!("must not parse")
    };
    assert_eq!(e.field, "by");
    assert_eq!(
        e.to_string(),
        "by: must be a whole number of at least 1, got \"2\""
    );
}

#[test]
fn values_nested_too_deep_are_refused() {
    let mut v = json!(1);
    for _ in 0..40 {
        v = json!([v]);
    }
    let e = parse_error(json!([{"op":"set.add","path":"a","value":v}]));
    assert_eq!(e.field, "ops[0].value");
    let mut d = Document::new();
    let op = Op::RegisterSet {
        path: vec!["a".into()],
        value: v,
        timestamp: None,
    };
    let Err(e) = d.apply("r1", &[op], 0) else {
        panic!("must be refused")
    };
    assert_eq!(e.field, "ops[0].value");
}

#[test]
fn ops_built_in_code_are_validated_too() {
    let mut d = Document::new();
    let bad = [
        (
            Op::CounterIncrement {
                path: vec![],
                by: 1,
            },
            "ops[0].path",
        ),
        (
            Op::CounterIncrement {
                path: vec!["a".into()],
                by: 0,
            },
            "ops[0].by",
        ),
        (
            Op::PnCounterAdd {
                path: vec!["a".into(), String::new()],
                by: 1,
            },
            "ops[0].path[1]",
        ),
    ];
    for (op, field) in bad {
        let Err(e) = d.apply("r1", &[op], 0) else {
            panic!("must be refused")
        };
        assert_eq!(e.field, field);
    }
    let Err(e) = d.apply(
        "",
        &[Op::MapDelete {
            path: vec!["a".into()],
        }],
        0,
    ) else {
        panic!("empty replica must be refused")
    };
    assert_eq!(e.field, "replica");
}

#[test]
fn an_op_round_trips_through_its_json() {
    let all = ops(json!([
        {"op":"counter.increment","path":"a","by":2},
        {"op":"pncounter.add","path":["a","b"],"by":-3},
        {"op":"register.set","path":"a","value":{"x":[1]},"timestamp":4},
        {"op":"register.set","path":"a","value":null},
        {"op":"set.add","path":"a","value":"x"},
        {"op":"set.remove","path":"a","value":"x"},
        {"op":"map.delete","path":"a"},
    ]));
    for op in all {
        assert_eq!(Op::parse(&op.to_json()), Ok(op));
    }
}

#[test]
fn counter_overflow_is_refused_not_wrapped() {
    let mut d = Document::new();
    run(
        &mut d,
        "r1",
        json!([{"op":"counter.increment","path":"a","by":u64::MAX}]),
        0,
    );
    let e = refused(&mut d, "r1", json!([{"op":"counter.increment","path":"a"}]));
    assert_eq!(e.field, "ops[0].by");
    // Across replicas the sum saturates.
    let mut other = Document::new();
    run(
        &mut other,
        "r2",
        json!([{"op":"counter.increment","path":"a","by":5}]),
        0,
    );
    d.merge(&other);
    assert_eq!(d.value(), json!({"a": u64::MAX}));
    let mut p = Document::new();
    run(
        &mut p,
        "r1",
        json!([{"op":"pncounter.add","path":"a","by":i64::MIN}]),
        0,
    );
    run(
        &mut p,
        "r2",
        json!([{"op":"pncounter.add","path":"a","by":i64::MIN}]),
        0,
    );
    assert_eq!(p.value(), json!({"a": i64::MIN}));
}
