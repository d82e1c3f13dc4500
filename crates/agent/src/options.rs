//! What an agent is and how it connects: [`AgentOptions`], the
//! [`Capability`] entries it registers with, and the [`BinaryOptions`] of
//! the binary frame protocol.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::AgentError;

/// Everything [`Agent`](crate::Agent) needs; start from [`AgentOptions::new`]
/// and set the fields that differ from the defaults.
#[derive(Clone)]
pub struct AgentOptions {
    /// The gateway's agent endpoint, `ws://host:port/ws`.
    pub url: String,
    /// The API key sent as `Authorization: Bearer …`. Empty sends no
    /// `Authorization` header, for gateways with auth turned off. The SDK
    /// never logs it, but tungstenite traces the raw handshake request under
    /// the log target `tungstenite::handshake::client`: keep that target at
    /// `debug` or quieter (the example binary does).
    pub key: String,
    /// The agent's id (`X-Agent-ID`): 1–128 of `A–Z a–z 0–9 . _ : -`,
    /// starting with a letter or digit.
    pub id: String,
    /// The agent's type (`X-Agent-Type`), 1–64 characters.
    pub agent_type: String,
    /// A human-readable name; non-empty.
    pub name: String,
    /// The agent's version; empty leaves it out of the registration.
    pub version: String,
    /// What the agent can do; the gateway routes tasks by these. At least one.
    pub capabilities: Vec<Capability>,
    /// How many tasks may run at once (1..=1000); enforced locally too.
    pub max_concurrent_tasks: u32,
    /// The configuration registered with the agent (a JSON object).
    pub config: Value,
    /// Free-form metadata registered with the agent (a JSON object).
    pub metadata: Value,
    /// The first reconnect delay's upper bound.
    pub reconnect_initial: Duration,
    /// The largest reconnect delay.
    pub reconnect_max: Duration,
    /// How long graceful shutdown waits for running handlers before it
    /// cancels them and fails their tasks as retryable.
    pub shutdown_grace: Duration,
    /// How long a request to the gateway (and the handshake) may take.
    pub request_timeout: Duration,
    /// Binary frames (`mcpw.v1`) instead of JSON text frames; `None` (the
    /// default) stays in text. Negotiated anew on every connection.
    pub binary: Option<BinaryOptions>,
}

impl AgentOptions {
    /// Options with the defaults: name = id, no version, no capabilities
    /// (add at least one), 4 concurrent tasks, empty config and metadata,
    /// reconnect delays from 500 ms up to 30 s, 30 s shutdown grace, a
    /// 30 s request timeout and text frames.
    pub fn new(
        url: impl Into<String>,
        key: impl Into<String>,
        id: impl Into<String>,
        agent_type: impl Into<String>,
    ) -> Self {
        let id = id.into();
        Self {
            url: url.into(),
            key: key.into(),
            name: id.clone(),
            id,
            agent_type: agent_type.into(),
            version: String::new(),
            capabilities: Vec::new(),
            max_concurrent_tasks: 4,
            config: Value::Object(Default::default()),
            metadata: Value::Object(Default::default()),
            reconnect_initial: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            binary: None,
        }
    }

    /// Checks the options against the protocol's rules, naming the first
    /// option that breaks one. [`Agent::run`](crate::Agent::run) calls it first.
    pub fn validate(&self) -> Result<(), AgentError> {
        let invalid = |msg: String| Err(AgentError::InvalidOptions(msg));
        if self.url.starts_with("wss://") {
            return invalid(format!(
                "url {:?}: wss:// needs TLS, which this build of the SDK does not include; \
                 use ws:// (behind a TLS-terminating proxy if the network is untrusted)",
                self.url
            ));
        }
        if !self.url.starts_with("ws://") {
            return invalid(format!(
                "url {:?} must start with ws://, e.g. ws://127.0.0.1:8080/ws",
                self.url
            ));
        }
        if self.key.chars().any(|c| c.is_control()) {
            return invalid("key contains control characters".to_string());
        }
        if !is_valid_agent_id(&self.id) {
            return invalid(format!(
                "id {:?} must be 1-128 characters of A-Z a-z 0-9 . _ : - starting with a letter or digit",
                self.id
            ));
        }
        let type_len = self.agent_type.chars().count();
        if !(1..=64).contains(&type_len) || self.agent_type.chars().any(|c| c.is_control()) {
            return invalid(format!(
                "agent_type {:?} must be 1-64 characters without control characters",
                self.agent_type
            ));
        }
        if self.name.trim().is_empty() {
            return invalid("name is empty".to_string());
        }
        if self.capabilities.is_empty() {
            return invalid("capabilities is empty: register at least one".to_string());
        }
        let mut seen = HashSet::new();
        for (i, capability) in self.capabilities.iter().enumerate() {
            let name = capability.name();
            if name.is_empty() {
                return invalid(format!("capabilities[{i}] has an empty name"));
            }
            if !seen.insert(name) {
                return invalid(format!("capabilities[{i}]: {name:?} appears twice"));
            }
            if let Some(confidence) = capability.confidence()
                && !(0.0..=1.0).contains(&confidence)
            {
                return invalid(format!(
                    "capabilities[{i}].confidence {confidence} must be in 0..=1"
                ));
            }
        }
        if !(1..=1000).contains(&self.max_concurrent_tasks) {
            return invalid(format!(
                "max_concurrent_tasks {} must be in 1..=1000",
                self.max_concurrent_tasks
            ));
        }
        for (field, value) in [("config", &self.config), ("metadata", &self.metadata)] {
            if !(value.is_object() || value.is_null()) {
                return invalid(format!("{field} must be a JSON object"));
            }
        }
        if self.reconnect_initial.is_zero() {
            return invalid("reconnect_initial must be above zero".to_string());
        }
        if self.reconnect_max < self.reconnect_initial {
            return invalid(format!(
                "reconnect_max {:?} is below reconnect_initial {:?}",
                self.reconnect_max, self.reconnect_initial
            ));
        }
        if self.request_timeout.is_zero() {
            return invalid("request_timeout must be above zero".to_string());
        }
        if let Some(binary) = &self.binary {
            binary.validate()?;
        }
        Ok(())
    }
}

/// Keeps the key out of logs and panics.
impl fmt::Debug for AgentOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentOptions")
            .field("url", &self.url)
            .field(
                "key",
                &if self.key.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("id", &self.id)
            .field("agent_type", &self.agent_type)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("capabilities", &self.capabilities)
            .field("max_concurrent_tasks", &self.max_concurrent_tasks)
            .field("config", &self.config)
            .field("metadata", &self.metadata)
            .field("reconnect_initial", &self.reconnect_initial)
            .field("reconnect_max", &self.reconnect_max)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("request_timeout", &self.request_timeout)
            .field("binary", &self.binary)
            .finish()
    }
}

/// How the agent asks for binary frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiation {
    /// Offer the WebSocket subprotocol `mcpw.v1` at the upgrade and send
    /// binary from the first message when the gateway accepts it. A gateway
    /// that does not accept it is asked at run time instead.
    Subprotocol,
    /// Connect in text and send `protocol.set_binary` before
    /// `agent.register`; binary from the answer on.
    Runtime,
}

/// The binary frame protocol's settings (`docs/agent-protocol.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryOptions {
    /// How binary mode is asked for.
    pub negotiate: Negotiation,
    /// Payloads of at least this many bytes are gzip-compressed; `None`
    /// compresses nothing. The gateway is asked to do the same.
    pub compress_threshold: Option<usize>,
    /// Whether frames carry a CRC32 of their payload, both ways.
    pub checksum: bool,
    /// The largest payload accepted in a frame from the gateway, in bytes.
    pub max_payload: usize,
    /// The largest payload accepted after decompression, in bytes.
    pub max_decompressed: usize,
}

impl BinaryOptions {
    /// The gateway's own defaults: compression from 1024 bytes, checksums
    /// on, 1 MiB payloads (10 MiB decompressed), negotiated by `negotiate`.
    pub fn new(negotiate: Negotiation) -> Self {
        Self {
            negotiate,
            compress_threshold: Some(DEFAULT_COMPRESS_THRESHOLD),
            checksum: true,
            max_payload: 1024 * 1024,
            max_decompressed: 10 * 1024 * 1024,
        }
    }

    /// Whether the gateway's defaults (compression from 1024 bytes,
    /// checksums on) already match these settings, so nothing needs aligning
    /// after a subprotocol upgrade.
    pub(crate) fn matches_gateway_defaults(&self) -> bool {
        self.compress_threshold == Some(DEFAULT_COMPRESS_THRESHOLD) && self.checksum
    }

    fn validate(&self) -> Result<(), AgentError> {
        if self.max_payload == 0 || self.max_decompressed < self.max_payload {
            return Err(AgentError::InvalidOptions(format!(
                "binary.max_payload {} must be above zero and at most binary.max_decompressed {}",
                self.max_payload, self.max_decompressed
            )));
        }
        if self
            .compress_threshold
            .is_some_and(|t| u32::try_from(t).is_err())
        {
            return Err(AgentError::InvalidOptions(
                "binary.compress_threshold must fit in 32 bits".to_string(),
            ));
        }
        Ok(())
    }
}

impl Default for BinaryOptions {
    /// Subprotocol negotiation with the gateway's defaults.
    fn default() -> Self {
        Self::new(Negotiation::Subprotocol)
    }
}

/// The gateway's default compression threshold, in bytes.
const DEFAULT_COMPRESS_THRESHOLD: usize = 1024;

/// The `X-Agent-ID` rule: 1–128 of `A–Z a–z 0–9 . _ : -`, starting with a
/// letter or digit.
fn is_valid_agent_id(id: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    (1..=128).contains(&id.len())
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(allowed)
}

/// One thing the agent can do, as registered: a plain name (`"lang:python"`)
/// or a name with details the gateway routes by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Capability {
    /// Just a name; the gateway takes confidence 1.0.
    Name(String),
    /// A name with confidence and what it covers.
    Detailed {
        /// The capability's name.
        name: String,
        /// How good the agent is at it, 0..=1 (the gateway's default is 1.0).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confidence: Option<f64>,
        /// Task types this capability serves.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        task_types: Vec<String>,
        /// Languages it covers.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        languages: Vec<String>,
        /// Specialties within it.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        specialties: Vec<String>,
    },
}

impl Capability {
    /// A plain-name capability.
    pub fn named(name: impl Into<String>) -> Self {
        Capability::Name(name.into())
    }

    /// A detailed capability with only its name set; add details with the
    /// `with_*` methods.
    pub fn detailed(name: impl Into<String>) -> Self {
        Capability::Detailed {
            name: name.into(),
            confidence: None,
            task_types: Vec::new(),
            languages: Vec::new(),
            specialties: Vec::new(),
        }
    }

    /// The capability's name.
    pub fn name(&self) -> &str {
        match self {
            Capability::Name(name) | Capability::Detailed { name, .. } => name,
        }
    }

    /// The confidence, if one was set.
    pub fn confidence(&self) -> Option<f64> {
        match self {
            Capability::Name(_) => None,
            Capability::Detailed { confidence, .. } => *confidence,
        }
    }

    /// Sets the confidence (turning a plain name into a detailed capability).
    pub fn with_confidence(mut self, value: f64) -> Self {
        if let Capability::Detailed { confidence, .. } = self.make_detailed() {
            *confidence = Some(value);
        }
        self
    }

    /// Sets the task types (turning a plain name into a detailed capability).
    pub fn with_task_types<I, S>(mut self, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        if let Capability::Detailed { task_types, .. } = self.make_detailed() {
            *task_types = values.into_iter().map(Into::into).collect();
        }
        self
    }

    /// Sets the languages (turning a plain name into a detailed capability).
    pub fn with_languages<I, S>(mut self, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        if let Capability::Detailed { languages, .. } = self.make_detailed() {
            *languages = values.into_iter().map(Into::into).collect();
        }
        self
    }

    /// Sets the specialties (turning a plain name into a detailed capability).
    pub fn with_specialties<I, S>(mut self, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        if let Capability::Detailed { specialties, .. } = self.make_detailed() {
            *specialties = values.into_iter().map(Into::into).collect();
        }
        self
    }

    fn make_detailed(&mut self) -> &mut Self {
        if let Capability::Name(name) = self {
            *self = Capability::detailed(std::mem::take(name));
        }
        self
    }
}

impl From<&str> for Capability {
    fn from(name: &str) -> Self {
        Capability::named(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> AgentOptions {
        let mut opts = AgentOptions::new("ws://127.0.0.1:1/ws", "mg_secret", "sum-1", "summarizer");
        opts.capabilities = vec![Capability::named("summarize")];
        opts
    }

    #[test]
    fn plain_capability_serializes_as_a_string() {
        let value = serde_json::to_value(Capability::named("lang:python")).unwrap_or_default();
        assert_eq!(value, json!("lang:python"));
    }

    #[test]
    fn detailed_capability_serializes_as_an_object_without_empty_fields() {
        let cap = Capability::detailed("summarize")
            .with_confidence(0.9)
            .with_task_types(["summarize"])
            .with_languages(["en", "de"])
            .with_specialties(["legal"]);
        let value = serde_json::to_value(&cap).unwrap_or_default();
        assert_eq!(
            value,
            json!({"name": "summarize", "confidence": 0.9, "task_types": ["summarize"],
                   "languages": ["en", "de"], "specialties": ["legal"]})
        );
        let bare = serde_json::to_value(Capability::detailed("x")).unwrap_or_default();
        assert_eq!(bare, json!({"name": "x"}));
    }

    #[test]
    fn capabilities_from_the_protocol_example_round_trip() {
        let list = json!([
            {"name": "summarize", "confidence": 0.9, "task_types": ["summarize"], "languages": ["en", "de"], "specialties": ["legal"]},
            "lang:python",
            "tool:git"
        ]);
        let caps: Vec<Capability> = serde_json::from_value(list.clone()).unwrap_or_default();
        assert_eq!(caps.len(), 3);
        assert_eq!(caps[0].name(), "summarize");
        assert_eq!(caps[0].confidence(), Some(0.9));
        assert_eq!(caps[1], Capability::named("lang:python"));
        assert_eq!(serde_json::to_value(&caps).unwrap_or_default(), list);
    }

    #[test]
    fn with_confidence_turns_a_name_into_an_object() {
        let cap = Capability::named("code").with_confidence(0.8);
        assert_eq!(
            serde_json::to_value(cap).unwrap_or_default(),
            json!({"name": "code", "confidence": 0.8})
        );
    }

    #[test]
    fn debug_output_hides_the_key() {
        let text = format!("{:?}", valid());
        assert!(!text.contains("mg_secret"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn valid_options_pass() {
        assert!(valid().validate().is_ok());
    }

    #[test]
    fn each_broken_rule_is_named() {
        type Change = Box<dyn Fn(&mut AgentOptions)>;
        let cases: Vec<(&str, Change)> = vec![
            ("wss://", Box::new(|o| o.url = "wss://h/ws".into())),
            (
                "must start with ws://",
                Box::new(|o| o.url = "http://h/ws".into()),
            ),
            ("id", Box::new(|o| o.id = "-bad".into())),
            ("id", Box::new(|o| o.id = "a b".into())),
            ("id", Box::new(|o| o.id = "x".repeat(129))),
            ("agent_type", Box::new(|o| o.agent_type = String::new())),
            ("name is empty", Box::new(|o| o.name = " ".into())),
            (
                "capabilities is empty",
                Box::new(|o| o.capabilities.clear()),
            ),
            (
                "appears twice",
                Box::new(|o| o.capabilities.push("summarize".into())),
            ),
            (
                "capabilities[1].confidence",
                Box::new(|o| {
                    o.capabilities
                        .push(Capability::named("b").with_confidence(1.5))
                }),
            ),
            (
                "max_concurrent_tasks",
                Box::new(|o| o.max_concurrent_tasks = 0),
            ),
            ("config must be", Box::new(|o| o.config = json!([1]))),
            (
                "reconnect_initial",
                Box::new(|o| o.reconnect_initial = Duration::ZERO),
            ),
            (
                "reconnect_max",
                Box::new(|o| o.reconnect_max = Duration::from_millis(1)),
            ),
            (
                "binary.max_payload",
                Box::new(|o| {
                    o.binary = Some(BinaryOptions {
                        max_payload: 0,
                        ..BinaryOptions::default()
                    })
                }),
            ),
        ];
        for (expected, change) in cases {
            let mut opts = valid();
            change(&mut opts);
            let err = opts
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn binary_defaults_match_the_gateway() {
        let binary = BinaryOptions::new(Negotiation::Runtime);
        assert!(binary.matches_gateway_defaults());
        let quiet = BinaryOptions {
            compress_threshold: None,
            ..binary.clone()
        };
        assert!(!quiet.matches_gateway_defaults());
        let mut opts = valid();
        opts.binary = Some(binary);
        assert!(opts.validate().is_ok());
    }

    #[test]
    fn agent_id_rule_accepts_the_documented_alphabet() {
        assert!(is_valid_agent_id("summarizer-1"));
        assert!(is_valid_agent_id("a.b_c:d-e"));
        assert!(is_valid_agent_id(&"x".repeat(128)));
        assert!(!is_valid_agent_id(""));
        assert!(!is_valid_agent_id("_x"));
        assert!(!is_valid_agent_id("é"));
    }
}
