//! The agent mesh without IO: agents and their capabilities, the task model,
//! and routing. The server's dispatcher holds the live state and calls these
//! pure functions; time is passed in.

pub mod agent;
pub mod routing;
pub mod task;

pub use agent::{Capability, FieldError, Registration, check_agent_id, satisfies};
pub use routing::{
    AgentStats, Candidate, Need, Strategy, choose, match_confidence, waiting_reason,
};
pub use task::{Submission, Task, TaskEvent, TaskState, normalize_progress, retry_delay_ms};

#[cfg(test)]
mod fuzz {
    use proptest::prelude::{Just, Strategy as _, any, prop, prop_oneof};
    use proptest::{prop_assert, proptest};
    use serde_json::{Map, Value};

    use super::{Registration, Submission};
    use crate::config::MeshConfig;

    fn json() -> impl proptest::strategy::Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[a-z:_ ]{0,12}".prop_map(Value::String),
            prop_oneof![
                Just("id"),
                Just("type"),
                Just("name"),
                Just("capabilities"),
                Just("confidence"),
                Just("payload"),
                Just("priority"),
                Just("timeout_secs"),
                Just("lang:"),
                Just("a-1"),
            ]
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("id"),
                            Just("type"),
                            Just("name"),
                            Just("version"),
                            Just("capabilities"),
                            Just("confidence"),
                            Just("task_types"),
                            Just("max_concurrent_tasks"),
                            Just("config"),
                            Just("payload"),
                            Just("required_capabilities"),
                            Just("priority"),
                            Just("timeout_secs"),
                            Just("max_retries"),
                            Just("strategy"),
                            Just("idempotency_key"),
                        ]
                        .prop_map(str::to_owned),
                        inner
                    ),
                    0..8
                )
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<String, Value>>())),
            ]
        })
    }

    proptest! {
        /// Any JSON is either a valid registration or an error naming a
        /// field; never a panic.
        #[test]
        fn registration_parser_never_panics(v in json()) {
            match Registration::parse(&v, "a-1", 4) {
                Ok(r) => {
                    prop_assert!(!r.capabilities.is_empty());
                    prop_assert!(r.capabilities.iter().all(|c| (0.0..=1.0).contains(&c.confidence)));
                }
                Err(e) => prop_assert!(!e.field.is_empty() && !e.message.is_empty()),
            }
        }

        /// Any JSON is either a valid submission or an error naming a field.
        #[test]
        fn submission_parser_never_panics(v in json()) {
            let cfg = MeshConfig::default();
            match Submission::parse(&v, &cfg) {
                Ok(s) => {
                    prop_assert!(!s.task_type.is_empty());
                    prop_assert!(s.timeout_secs >= 1 && s.timeout_secs <= cfg.max_timeout_secs);
                }
                Err(e) => prop_assert!(!e.field.is_empty() && !e.message.is_empty()),
            }
        }
    }
}
