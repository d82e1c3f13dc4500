//! The task model: states and their transitions, the validated submission,
//! and the retry rule. Time is passed in as unix milliseconds.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::agent::{FieldError, check_requirement};
use super::routing::Strategy;
use crate::config::MeshConfig;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for an agent (or for its retry time).
    Pending,
    /// Sent to an agent, not yet accepted.
    Assigned,
    /// Accepted by its agent.
    Accepted,
    /// Its agent reported progress.
    InProgress,
    /// Finished with a result.
    Completed,
    /// Failed for good (dead-lettered).
    Failed,
    /// Cancelled by its submitter.
    Cancelled,
    /// Timed out on its last attempt (dead-lettered).
    Timeout,
}

impl TaskState {
    /// Every state.
    pub const ALL: [TaskState; 8] = [
        TaskState::Pending,
        TaskState::Assigned,
        TaskState::Accepted,
        TaskState::InProgress,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::Timeout,
    ];

    /// Spelling in the API and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Accepted => "accepted",
            TaskState::InProgress => "in_progress",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Timeout => "timeout",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Whether the task is finished for good.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Cancelled | TaskState::Timeout
        )
    }

    /// Whether an agent holds the task.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            TaskState::Assigned | TaskState::Accepted | TaskState::InProgress
        )
    }

    /// Whether `self → to` is a legal transition.
    pub fn can_become(self, to: TaskState) -> bool {
        use TaskState::*;
        match (self, to) {
            (s, _) if s.is_terminal() => false,
            (_, Cancelled) => true,
            (Pending, Assigned) => true,
            (Assigned, Accepted | InProgress | Completed | Failed | Pending | Timeout) => true,
            (Accepted, InProgress | Completed | Failed | Pending | Timeout) => true,
            (InProgress, Completed | Failed | Pending | Timeout) => true,
            _ => false,
        }
    }
}

/// One recorded step of a task's life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// When, unix ms.
    pub at_ms: i64,
    /// The state entered.
    pub state: TaskState,
    /// The agent involved, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Most events kept in a task's history.
pub const MAX_HISTORY: usize = 64;

/// A task, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// `t-<uuid>`.
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Task type (routing relevance and metrics label).
    #[serde(rename = "type")]
    pub task_type: String,
    /// Human title.
    pub title: String,
    /// Input for the agent.
    pub payload: Value,
    /// Capabilities an agent must have.
    pub required_capabilities: Vec<String>,
    /// Higher runs first.
    pub priority: i32,
    /// Time an agent has per attempt, in seconds.
    pub timeout_secs: u64,
    /// Attempts after the first before dead-lettering.
    pub max_retries: u32,
    /// Makes resubmission safe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Routing strategy named at submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// Current state.
    pub state: TaskState,
    /// The agent holding (or that last held) it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// Assignments made so far.
    pub attempts: u32,
    /// Last progress, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// Last progress message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_message: Option<String>,
    /// Result of a completed task (or a blob reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Ended in `failed`/`timeout` after its retries: the reason is in `error`.
    #[serde(default)]
    pub dead_letter: bool,
    /// Why a pending task is not assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_reason: Option<String>,
    /// Who submitted it.
    pub submitted_by: String,
    /// Submission time, unix ms.
    pub created_at_ms: i64,
    /// Last change, unix ms.
    pub updated_at_ms: i64,
    /// Deadline of the current attempt, unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
    /// A pending task waits for its retry until then, unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<i64>,
    /// When the current attempt was assigned, unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_at_ms: Option<i64>,
    /// Seconds granted by `task.extend` so far.
    #[serde(default)]
    pub extended_secs: u64,
    /// Agents that rejected it (avoided while others are eligible).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_by: Vec<String>,
    /// Its life so far (the newest [`MAX_HISTORY`] events).
    #[serde(default)]
    pub history: Vec<TaskEvent>,
}

impl Task {
    /// Moves to `to` at `now_ms`, recording why. Refuses illegal transitions.
    pub fn transition(
        &mut self,
        to: TaskState,
        now_ms: i64,
        note: Option<String>,
    ) -> Result<(), String> {
        if !self.state.can_become(to) {
            return Err(format!(
                "task {} is {} and cannot become {}",
                self.id,
                self.state.as_str(),
                to.as_str()
            ));
        }
        self.state = to;
        self.updated_at_ms = now_ms;
        if to != TaskState::Pending {
            self.waiting_reason = None;
        }
        if to.is_terminal() || to == TaskState::Pending {
            self.deadline_ms = None;
        }
        self.history.push(TaskEvent {
            at_ms: now_ms,
            state: to,
            agent_id: self.agent_id.clone(),
            note,
        });
        if self.history.len() > MAX_HISTORY {
            let excess = self.history.len() - MAX_HISTORY;
            self.history.drain(..excess);
        }
        Ok(())
    }

    /// Whether another attempt is allowed after the current one.
    pub fn retries_left(&self) -> bool {
        self.attempts <= self.max_retries
    }

    /// The view an agent gets in `task.assigned`.
    pub fn assignment(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "tenant": self.tenant,
            "type": self.task_type,
            "title": self.title,
            "payload": self.payload,
            "required_capabilities": self.required_capabilities,
            "priority": self.priority,
            "timeout_secs": self.timeout_secs,
            "deadline_ms": self.deadline_ms,
            "attempt": self.attempts,
            "max_retries": self.max_retries,
        })
    }
}

/// Retry delay before attempt `attempts + 1`: exponential from `initial_ms`,
/// capped at `max_ms`, with full jitter (`unit` in 0..1 from the caller) over
/// the upper half, so retries neither synchronize nor come back at once.
pub fn retry_delay_ms(attempts: u32, initial_ms: u64, max_ms: u64, unit: f64) -> u64 {
    let exp = attempts.saturating_sub(1).min(30);
    let ceiling = initial_ms.saturating_mul(1u64 << exp).min(max_ms);
    let half = ceiling / 2;
    half + ((ceiling - half) as f64 * unit.clamp(0.0, 1.0)) as u64
}

/// A validated submission.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// Tenant named by the submitter (only honoured with `tenants:*`).
    pub tenant: Option<String>,
    /// Task type.
    pub task_type: String,
    /// Title (defaults to the type).
    pub title: String,
    /// Payload (defaults to `{}`).
    pub payload: Value,
    /// Required capabilities.
    pub required_capabilities: Vec<String>,
    /// Priority.
    pub priority: i32,
    /// Timeout per attempt, seconds.
    pub timeout_secs: u64,
    /// Retry limit.
    pub max_retries: u32,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Strategy.
    pub strategy: Option<Strategy>,
}

const SUBMIT_FIELDS: &str = "type, title, payload, required_capabilities, priority, timeout_secs, max_retries, idempotency_key, strategy, tenant";

impl Submission {
    /// Validates a submission body against the configured limits.
    pub fn parse(body: &Value, cfg: &MeshConfig) -> Result<Submission, FieldError> {
        let Some(m) = body.as_object() else {
            return Err(FieldError::new(
                "body",
                format!("must be a JSON object with {SUBMIT_FIELDS}"),
            ));
        };
        if let Some(k) = m
            .keys()
            .find(|k| !SUBMIT_FIELDS.split(", ").any(|f| f == k.as_str()))
        {
            return Err(FieldError::new(
                k.as_str(),
                format!("unknown field; allowed are {SUBMIT_FIELDS}"),
            ));
        }
        let text = |key: &str, max: usize, required: bool| -> Result<Option<String>, FieldError> {
            match m.get(key) {
                None | Some(Value::Null) if !required => Ok(None),
                Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= max => {
                    Ok(Some(s.clone()))
                }
                Some(Value::String(s)) if s.len() > max => Err(FieldError::new(
                    key,
                    format!("must be at most {max} characters, got {}", s.len()),
                )),
                _ => Err(FieldError::new(
                    key,
                    if required {
                        "is required and must be a non-empty string"
                    } else {
                        "must be a non-empty string"
                    },
                )),
            }
        };
        let task_type = text("type", 128, true)?.unwrap_or_default();
        let title = text("title", 512, false)?.unwrap_or_else(|| task_type.clone());
        let tenant = text("tenant", 128, false)?;
        let idempotency_key = text("idempotency_key", 256, false)?;
        let payload = m
            .get("payload")
            .cloned()
            .unwrap_or(Value::Object(Map::new()));
        let required_capabilities = match m.get("required_capabilities") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for (i, r) in a.iter().enumerate() {
                    let field = format!("required_capabilities[{i}]");
                    let Some(s) = r.as_str() else {
                        return Err(FieldError::new(field, "must be a string"));
                    };
                    check_requirement(s).map_err(|e| FieldError::new(field, e))?;
                    out.push(s.to_owned());
                }
                out
            }
            Some(_) => {
                return Err(FieldError::new(
                    "required_capabilities",
                    "must be an array of capability names",
                ));
            }
        };
        let int = |key: &str, min: i64, max: i64, default: i64| -> Result<i64, FieldError> {
            match m.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => match v.as_i64() {
                    Some(n) if (min..=max).contains(&n) => Ok(n),
                    _ => Err(FieldError::new(
                        key,
                        format!("must be a whole number within {min}..={max}, got {v}"),
                    )),
                },
            }
        };
        let priority = int("priority", -1000, 1000, 0)? as i32;
        let timeout_secs = int(
            "timeout_secs",
            1,
            cfg.max_timeout_secs as i64,
            cfg.default_timeout_secs as i64,
        )? as u64;
        let max_retries = int("max_retries", 0, 100, i64::from(cfg.default_max_retries))? as u32;
        let strategy = match m.get("strategy") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Strategy::parse(s).ok_or_else(|| {
                FieldError::new(
                    "strategy",
                    format!("unknown strategy `{s}`; allowed: {}", Strategy::ALLOWED),
                )
            })?),
            Some(_) => return Err(FieldError::new("strategy", "must be a string")),
        };
        Ok(Submission {
            tenant,
            task_type,
            title,
            payload,
            required_capabilities,
            priority,
            timeout_secs,
            max_retries,
            idempotency_key,
            strategy,
        })
    }

    /// The new pending task.
    pub fn into_task(self, id: String, tenant: String, submitted_by: String, now_ms: i64) -> Task {
        Task {
            id,
            tenant,
            task_type: self.task_type,
            title: self.title,
            payload: self.payload,
            required_capabilities: self.required_capabilities,
            priority: self.priority,
            timeout_secs: self.timeout_secs,
            max_retries: self.max_retries,
            idempotency_key: self.idempotency_key,
            strategy: self.strategy,
            state: TaskState::Pending,
            agent_id: None,
            attempts: 0,
            progress: None,
            progress_message: None,
            result: None,
            error: None,
            dead_letter: false,
            waiting_reason: None,
            submitted_by,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            deadline_ms: None,
            not_before_ms: None,
            assigned_at_ms: None,
            extended_secs: 0,
            rejected_by: Vec::new(),
            history: vec![TaskEvent {
                at_ms: now_ms,
                state: TaskState::Pending,
                agent_id: None,
                note: Some("submitted".into()),
            }],
        }
    }
}

/// Normalizes reported progress: a fraction 0..=1, or a percentage up to 100.
pub fn normalize_progress(p: f64) -> Option<f64> {
    if !p.is_finite() || p < 0.0 {
        None
    } else if p <= 1.0 {
        Some(p)
    } else if p <= 100.0 {
        Some(p / 100.0)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::{prop_assert, proptest};
    use serde_json::json;

    fn cfg() -> MeshConfig {
        MeshConfig::default()
    }

    #[test]
    fn submission_defaults_and_fields() {
        let s = Submission::parse(&json!({"type": "summarize"}), &cfg())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.title, "summarize");
        assert_eq!(s.timeout_secs, 300);
        assert_eq!(s.max_retries, 3);
        assert_eq!(s.payload, json!({}));
        let bad: Vec<(Value, &str)> = vec![
            (json!({}), "type"),
            (json!({"type": 3}), "type"),
            (json!({"type": "x", "priority": "high"}), "priority"),
            (json!({"type": "x", "timeout_secs": 0}), "timeout_secs"),
            (json!({"type": "x", "max_retries": -1}), "max_retries"),
            (
                json!({"type": "x", "required_capabilities": "py"}),
                "required_capabilities",
            ),
            (
                json!({"type": "x", "required_capabilities": ["lang:"]}),
                "required_capabilities[0]",
            ),
            (json!({"type": "x", "strategy": "fastest"}), "strategy"),
            (json!({"type": "x", "colour": "red"}), "colour"),
            (json!([1]), "body"),
        ];
        for (body, field) in bad {
            match Submission::parse(&body, &cfg()) {
                Err(e) => assert_eq!(e.field, field, "{e}"),
                Ok(_) => panic!("accepted {body}"),
            }
        }
    }

    #[test]
    fn terminal_states_are_final() {
        for from in TaskState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in TaskState::ALL {
                assert!(!from.can_become(to), "{from:?} -> {to:?}");
            }
        }
        assert!(TaskState::Pending.can_become(TaskState::Assigned));
        assert!(!TaskState::Pending.can_become(TaskState::Completed));
        assert!(TaskState::InProgress.can_become(TaskState::Pending));
    }

    #[test]
    fn transition_records_history_and_refuses_illegal_moves() {
        let mut t = Submission::parse(&json!({"type": "x"}), &cfg())
            .unwrap_or_else(|e| panic!("{e}"))
            .into_task("t-1".into(), "default".into(), "key_1".into(), 10);
        assert!(t.transition(TaskState::Completed, 11, None).is_err());
        assert!(t.transition(TaskState::Assigned, 12, None).is_ok());
        assert!(t.transition(TaskState::Completed, 13, None).is_ok());
        assert!(t.transition(TaskState::Cancelled, 14, None).is_err());
        assert_eq!(t.history.len(), 3);
        assert_eq!(t.updated_at_ms, 13);
    }

    #[test]
    fn progress_is_a_fraction_or_a_percentage() {
        assert_eq!(normalize_progress(0.5), Some(0.5));
        assert_eq!(normalize_progress(40.0), Some(0.4));
        assert_eq!(normalize_progress(101.0), None);
        assert_eq!(normalize_progress(-0.1), None);
        assert_eq!(normalize_progress(f64::NAN), None);
    }

    proptest! {
        #[test]
        fn retry_delay_is_bounded_and_grows(attempts in 1u32..64, unit in 0.0f64..1.0) {
            let d = retry_delay_ms(attempts, 100, 10_000, unit);
            let ceiling = (100u64 << (attempts - 1).min(30)).min(10_000);
            prop_assert!(d <= ceiling);
            prop_assert!(d >= ceiling / 2);
        }
    }
}
