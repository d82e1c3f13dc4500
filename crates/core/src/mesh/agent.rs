//! Agents as the mesh sees them: capabilities, the validated `agent.register`
//! request, and capability matching.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A parameter that is missing or wrong, named by its path
/// (`capabilities[2].confidence`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.field, self.message)
    }
}

/// One capability of an agent, normalized (a plain string becomes a
/// capability of confidence 1.0 without lists).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capability {
    /// Its name, e.g. `summarize`, `lang:python`, `tool:git`.
    pub name: String,
    /// How good the agent is at it, 0..=1.
    pub confidence: f64,
    /// Task types it is relevant to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub task_types: Vec<String>,
    /// Languages it covers (`lang:<x>` requirements match these).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub languages: Vec<String>,
    /// Specialties, free text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub specialties: Vec<String>,
}

/// Longest agent id.
pub const MAX_AGENT_ID: usize = 128;
/// Most capabilities one agent may declare.
pub const MAX_CAPABILITIES: usize = 256;
/// Largest `max_concurrent_tasks`.
pub const MAX_CONCURRENT_LIMIT: u32 = 1000;

/// Checks an agent id: 1–128 characters of `A-Z a-z 0-9 . _ : -`, starting
/// with a letter or digit.
pub fn check_agent_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_AGENT_ID {
        return Err(format!(
            "must be 1 to {MAX_AGENT_ID} characters, got {}",
            id.len()
        ));
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("`{id}` must start with a letter or digit"));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(format!(
            "`{id}` contains `{bad}`; allowed are letters, digits and . _ : -"
        ));
    }
    Ok(())
}

/// A validated `agent.register` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// Agent id (equals the `X-Agent-ID` header).
    pub id: String,
    /// Agent type.
    #[serde(rename = "type")]
    pub agent_type: String,
    /// Display name.
    pub name: String,
    /// Agent software version.
    pub version: String,
    /// Capabilities, normalized.
    pub capabilities: Vec<Capability>,
    /// Tasks it works on at once, at most.
    pub max_concurrent_tasks: u32,
    /// Its configuration as registered.
    pub config: Map<String, Value>,
    /// Free-form metadata.
    pub metadata: Map<String, Value>,
    /// Tasks it is still working on after a reconnect.
    #[serde(default)]
    pub active_tasks: Vec<String>,
}

fn string_list(v: Option<&Value>, field: &str) -> Result<Vec<String>, FieldError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let Some(items) = v.as_array() else {
        return Err(FieldError::new(field, "must be an array of strings"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, s)| match s.as_str() {
            Some(s) if !s.trim().is_empty() => Ok(s.to_owned()),
            _ => Err(FieldError::new(
                format!("{field}[{i}]"),
                "must be a non-empty string",
            )),
        })
        .collect()
}

/// Parses one capability (a string or an object); `field` is its path.
pub fn parse_capability(v: &Value, field: &str) -> Result<Capability, FieldError> {
    match v {
        Value::String(s) => {
            if s.trim().is_empty() {
                return Err(FieldError::new(field, "must be a non-empty name"));
            }
            Ok(Capability {
                name: s.clone(),
                confidence: 1.0,
                task_types: Vec::new(),
                languages: Vec::new(),
                specialties: Vec::new(),
            })
        }
        Value::Object(m) => {
            let name = match m.get("name") {
                Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
                Some(Value::String(_)) | None => {
                    return Err(FieldError::new(
                        format!("{field}.name"),
                        "is required and must be a non-empty string",
                    ));
                }
                Some(_) => {
                    return Err(FieldError::new(format!("{field}.name"), "must be a string"));
                }
            };
            let confidence = match m.get("confidence") {
                None | Some(Value::Null) => 1.0,
                Some(Value::Number(n)) => match n.as_f64() {
                    Some(c) if (0.0..=1.0).contains(&c) => c,
                    _ => {
                        return Err(FieldError::new(
                            format!("{field}.confidence"),
                            format!("must be within 0..1, got {n}"),
                        ));
                    }
                },
                Some(other) => {
                    return Err(FieldError::new(
                        format!("{field}.confidence"),
                        format!("must be a number within 0..1, got {other}"),
                    ));
                }
            };
            for key in m.keys() {
                if !matches!(
                    key.as_str(),
                    "name" | "confidence" | "task_types" | "languages" | "specialties"
                ) {
                    return Err(FieldError::new(
                        format!("{field}.{key}"),
                        "unknown field; allowed are name, confidence, task_types, languages, specialties",
                    ));
                }
            }
            Ok(Capability {
                name,
                confidence,
                task_types: string_list(m.get("task_types"), &format!("{field}.task_types"))?,
                languages: string_list(m.get("languages"), &format!("{field}.languages"))?,
                specialties: string_list(m.get("specialties"), &format!("{field}.specialties"))?,
            })
        }
        _ => Err(FieldError::new(
            field,
            "must be a capability name or an object {name, confidence, task_types, languages, specialties}",
        )),
    }
}

/// Parses a capability list: at least one, names unique.
pub fn parse_capabilities(v: Option<&Value>) -> Result<Vec<Capability>, FieldError> {
    let Some(v) = v else {
        return Err(FieldError::new(
            "capabilities",
            "is required: name at least one capability",
        ));
    };
    let Some(items) = v.as_array() else {
        return Err(FieldError::new("capabilities", "must be an array"));
    };
    if items.is_empty() {
        return Err(FieldError::new(
            "capabilities",
            "must name at least one capability",
        ));
    }
    if items.len() > MAX_CAPABILITIES {
        return Err(FieldError::new(
            "capabilities",
            format!(
                "at most {MAX_CAPABILITIES} capabilities, got {}",
                items.len()
            ),
        ));
    }
    let mut out: Vec<Capability> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("capabilities[{i}]");
        let c = parse_capability(item, &field)?;
        if out.iter().any(|o| o.name.eq_ignore_ascii_case(&c.name)) {
            return Err(FieldError::new(
                field,
                format!("capability `{}` is named twice", c.name),
            ));
        }
        out.push(c);
    }
    Ok(out)
}

fn required_string(m: &Map<String, Value>, key: &str, max: usize) -> Result<String, FieldError> {
    match m.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= max => Ok(s.clone()),
        Some(Value::String(s)) if s.len() > max => Err(FieldError::new(
            key,
            format!("must be at most {max} characters"),
        )),
        Some(Value::String(_)) | None => Err(FieldError::new(
            key,
            "is required and must be a non-empty string",
        )),
        Some(_) => Err(FieldError::new(key, "must be a string")),
    }
}

fn object_field(m: &Map<String, Value>, key: &str) -> Result<Map<String, Value>, FieldError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(o)) => Ok(o.clone()),
        Some(_) => Err(FieldError::new(key, "must be an object")),
    }
}

impl Registration {
    /// Validates `agent.register` params; `header_id` is the connection's
    /// `X-Agent-ID`, `default_limit` the configured concurrency default.
    pub fn parse(
        params: &Value,
        header_id: &str,
        default_limit: u32,
    ) -> Result<Registration, FieldError> {
        let Some(m) = params.as_object() else {
            return Err(FieldError::new(
                "params",
                "must be an object {id, type, name, version, capabilities, …}",
            ));
        };
        let id = required_string(m, "id", MAX_AGENT_ID)?;
        check_agent_id(&id).map_err(|e| FieldError::new("id", e))?;
        if id != header_id {
            return Err(FieldError::new(
                "id",
                format!(
                    "`{id}` differs from the X-Agent-ID header `{header_id}`; they must be equal"
                ),
            ));
        }
        let agent_type = required_string(m, "type", 64)?;
        let name = required_string(m, "name", 256)?;
        let version = match m.get("version") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) if s.len() <= 64 => s.clone(),
            Some(_) => {
                return Err(FieldError::new(
                    "version",
                    "must be a string of at most 64 characters",
                ));
            }
        };
        let capabilities = parse_capabilities(m.get("capabilities"))?;
        let max_concurrent_tasks = match m.get("max_concurrent_tasks") {
            None | Some(Value::Null) => default_limit,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=u64::from(MAX_CONCURRENT_LIMIT)).contains(&n) => n as u32,
                _ => {
                    return Err(FieldError::new(
                        "max_concurrent_tasks",
                        format!(
                            "must be a whole number within 1..={MAX_CONCURRENT_LIMIT}, got {v}"
                        ),
                    ));
                }
            },
        };
        let active_tasks = string_list(m.get("active_tasks"), "active_tasks")?;
        Ok(Registration {
            id,
            agent_type,
            name,
            version,
            capabilities,
            max_concurrent_tasks,
            config: object_field(m, "config")?,
            metadata: object_field(m, "metadata")?,
            active_tasks,
        })
    }
}

/// Checks a requirement (`summarize`, `lang:python`, `tool:git`) as a task
/// names it.
pub fn check_requirement(r: &str) -> Result<(), String> {
    if r.trim().is_empty() || r.len() > 128 {
        return Err("must be a non-empty string of at most 128 characters".into());
    }
    for prefix in ["lang:", "tool:"] {
        if let Some(rest) = r.strip_prefix(prefix)
            && rest.trim().is_empty()
        {
            return Err(format!("`{r}` names no {}", &prefix[..prefix.len() - 1]));
        }
    }
    Ok(())
}

/// The confidence with which `caps` satisfy requirement `required`, or
/// `None`. Names compare case-insensitively; `lang:<x>` is also met by a
/// capability listing `<x>` among its languages.
pub fn satisfies(caps: &[Capability], required: &str) -> Option<f64> {
    let mut best: Option<f64> = None;
    let lang = required
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("lang:"))
        .map(|_| &required[5..]);
    for c in caps {
        let hit = c.name.eq_ignore_ascii_case(required)
            || lang.is_some_and(|l| c.languages.iter().any(|x| x.eq_ignore_ascii_case(l)));
        if hit {
            best = Some(best.map_or(c.confidence, |b: f64| b.max(c.confidence)));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reg(v: Value) -> Result<Registration, FieldError> {
        Registration::parse(&v, "a-1", 4)
    }

    fn base() -> Value {
        json!({"id": "a-1", "type": "coder", "name": "A", "version": "1", "capabilities": ["python"]})
    }

    #[test]
    fn accepts_strings_and_objects() {
        let mut v = base();
        v["capabilities"] = json!([
            "tool:git",
            {"name": "summarize", "confidence": 0.7, "task_types": ["summarize"], "languages": ["en"]}
        ]);
        let r = reg(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.capabilities.len(), 2);
        assert_eq!(r.capabilities[0].confidence, 1.0);
        assert_eq!(r.capabilities[1].confidence, 0.7);
        assert_eq!(r.max_concurrent_tasks, 4);
    }

    #[test]
    fn names_the_field_of_every_violation() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"capabilities": []}), "capabilities"),
            (json!({"capabilities": [""]}), "capabilities[0]"),
            (
                json!({"capabilities": ["x", {"name": "y", "confidence": 1.5}]}),
                "capabilities[1].confidence",
            ),
            (
                json!({"capabilities": [{"name": "", "confidence": 0.5}]}),
                "capabilities[0].name",
            ),
            (
                json!({"capabilities": [{"name": "y", "confidence": "high"}]}),
                "capabilities[0].confidence",
            ),
            (json!({"capabilities": ["x", "X"]}), "capabilities[1]"),
            (json!({"id": "other"}), "id"),
            (json!({"type": ""}), "type"),
            (json!({"max_concurrent_tasks": 0}), "max_concurrent_tasks"),
            (json!({"config": "no"}), "config"),
            (
                json!({"capabilities": [{"name": "y", "task_types": [1]}]}),
                "capabilities[0].task_types[0]",
            ),
        ];
        for (patch, field) in cases {
            let mut v = base();
            if let (Some(o), Some(p)) = (v.as_object_mut(), patch.as_object()) {
                for (k, val) in p {
                    o.insert(k.clone(), val.clone());
                }
            }
            match reg(v) {
                Err(e) => assert_eq!(e.field, field, "{e}"),
                Ok(_) => panic!("accepted a registration with a bad `{field}`"),
            }
        }
    }

    #[test]
    fn agent_id_format() {
        assert!(check_agent_id("worker-1.eu:a_b").is_ok());
        assert!(check_agent_id("").is_err());
        assert!(check_agent_id("-x").is_err());
        assert!(check_agent_id("a b").is_err());
        assert!(check_agent_id(&"a".repeat(129)).is_err());
    }

    #[test]
    fn language_requirements_match_language_lists() {
        let caps = vec![Capability {
            name: "code".into(),
            confidence: 0.6,
            task_types: vec![],
            languages: vec!["Python".into()],
            specialties: vec![],
        }];
        assert_eq!(satisfies(&caps, "lang:python"), Some(0.6));
        assert_eq!(satisfies(&caps, "CODE"), Some(0.6));
        assert_eq!(satisfies(&caps, "lang:rust"), None);
        assert_eq!(satisfies(&caps, "tool:git"), None);
        assert!(check_requirement("lang:").is_err());
        assert!(check_requirement("tool:git").is_ok());
    }
}
