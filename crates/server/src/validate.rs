//! Checks of federated tool calls against the tools' JSON Schemas: the
//! arguments of a `tools/call` against the tool's `inputSchema` before they
//! leave the gateway (a mismatch is refused with -32602 listing every
//! violation with its JSON pointer, what was expected and what was there),
//! and a structured result against the tool's `outputSchema` (a mismatch is
//! logged and counted but passed on unchanged: the answer is the upstream's).
//!
//! Schemas are compiled with the `jsonschema` crate, built without HTTP and
//! file retrieval and set offline, so a remote `$ref` makes a schema fail to
//! compile instead of making the gateway fetch anything. The dialect is the
//! schema's `$schema` (drafts 4, 6, 7, 2019-09 and 2020-12), 2020-12 when it
//! has none, as MCP says. A schema that does not compile is the upstream's
//! bug: it is logged once, counted, and its calls pass unvalidated (the
//! upstream decides).
//!
//! Compiling per call would cost more than the call, so [`Validators`] keeps
//! one compiled validator per tool name and schema kind together with the
//! schema it was compiled from. The catalog hands out a schema as an `Arc`,
//! so a hit is a pointer comparison; after a catalog refresh (new `Arc`s)
//! the first call compares contents once and keeps the compiled validator if
//! nothing changed; a changed schema is compiled anew. Tools are found by
//! exposed name through an index built once per catalog generation (the
//! snapshot's `Arc`), never by scanning the tool list per call.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use jsonschema::error::{TypeKind, ValidationErrorKind};
use rmcp::ErrorData as McpError;
use rmcp::model::{CallToolResult, ErrorCode, JsonObject, Tool};
use serde_json::Value;

use crate::gateway::{Gateway, Snapshot};

/// Most compiled schemas kept per kind; beyond it an arbitrary one goes
/// (the catalog bounds the tool names, so this only caps churn).
const MAX_CACHED: usize = 4096;
/// Most violations listed in one refusal; the rest are only counted, so a
/// huge bad array cannot make a huge error.
pub const MAX_LISTED: usize = 100;
/// Violations quoted in the warning about a result that breaks its
/// `outputSchema`.
const LOGGED_OUTPUT_VIOLATIONS: usize = 3;
/// Longest quoted string or JSON value in a violation, in characters.
const MAX_QUOTED: usize = 64;
/// `anyOf`/`oneOf` alternatives whose first failure a violation quotes.
const QUOTED_ALTERNATIVES: usize = 3;
/// Places (JSON pointers) an audit summary names.
const AUDITED_POINTERS: usize = 5;

/// Which of a tool's schemas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaKind {
    /// `inputSchema`, for the arguments.
    Input,
    /// `outputSchema`, for `structuredContent`.
    Output,
}

impl SchemaKind {
    /// The metric label.
    fn label(self) -> &'static str {
        match self {
            SchemaKind::Input => "input",
            SchemaKind::Output => "output",
        }
    }

    /// The field of the tool definition.
    fn field(self) -> &'static str {
        match self {
            SchemaKind::Input => "inputSchema",
            SchemaKind::Output => "outputSchema",
        }
    }
}

/// One way a value breaks a schema.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Violation {
    /// JSON pointer (RFC 6901) of the offending value; `""` is the checked
    /// object itself.
    pub pointer: String,
    /// What the schema wants there, e.g. `integer`.
    pub expected: String,
    /// What was there, e.g. `string "3"` or `missing`.
    pub actual: String,
    /// Both in one phrase, e.g. `expected integer, got string "3"`.
    pub message: String,
}

impl Violation {
    /// A violation whose message is "expected ..., got ...".
    fn mismatch(pointer: String, expected: String, actual: String) -> Violation {
        let message = format!("expected {expected}, got {actual}");
        Violation {
            pointer,
            expected,
            actual,
            message,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", display_pointer(&self.pointer), self.message)
    }
}

/// A `tools/call` refused because its arguments break the tool's
/// `inputSchema`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgumentViolations {
    /// The exposed tool name.
    pub tool: String,
    /// The violations found, at most [`MAX_LISTED`].
    pub violations: Vec<Violation>,
    /// Violations found beyond those listed.
    pub unlisted: usize,
}

impl ArgumentViolations {
    /// The error message: the tool, every listed violation and what to do.
    pub fn message(&self) -> String {
        let total = self.violations.len() + self.unlisted;
        let listed: Vec<String> = self.violations.iter().map(Violation::to_string).collect();
        let more = if self.unlisted > 0 {
            format!(
                "; and {} more (only the first {MAX_LISTED} are listed)",
                self.unlisted
            )
        } else {
            String::new()
        };
        format!(
            "invalid arguments for tool `{}` ({total} violation{}): {}{more}. Fix the arguments to match the tool's inputSchema (tools/list shows it) and call again",
            self.tool,
            if total == 1 { "" } else { "s" },
            listed.join("; "),
        )
    }

    /// The error's `data`: `{"tool", "violations": [{pointer, expected,
    /// actual, message}]}`, plus `"unlisted"` when some were left out.
    pub fn data(&self) -> Value {
        let mut data = serde_json::json!({
            "tool": self.tool,
            "violations": self.violations,
        });
        if self.unlisted > 0
            && let Value::Object(map) = &mut data
        {
            map.insert("unlisted".into(), self.unlisted.into());
        }
        data
    }

    /// The JSON-RPC error: -32602 (invalid params) with [`Self::message`]
    /// and [`Self::data`].
    pub fn to_mcp_error(&self) -> McpError {
        McpError::new(ErrorCode::INVALID_PARAMS, self.message(), Some(self.data()))
    }

    /// The refusal read back from a JSON-RPC error made by
    /// [`Self::to_mcp_error`] (here or by an upstream gateway), if it is one.
    pub fn from_mcp_error(e: &McpError) -> Option<ArgumentViolations> {
        if e.code != ErrorCode::INVALID_PARAMS {
            return None;
        }
        let data = e.data.as_ref()?;
        Some(ArgumentViolations {
            tool: data.get("tool")?.as_str()?.to_owned(),
            violations: serde_json::from_value(data.get("violations")?.clone()).ok()?,
            unlisted: data
                .get("unlisted")
                .and_then(Value::as_u64)
                .map_or(0, |n| n as usize),
        })
    }

    /// What the audit log keeps of the refusal: how many violations and
    /// where, never a value (the log keeps only a hash of the arguments),
    /// e.g. `invalid arguments: 3 violations at /count, /tags/2, / (root)`.
    pub fn audit_summary(&self) -> String {
        let total = self.violations.len() + self.unlisted;
        let mut places: Vec<&str> = Vec::new();
        for v in &self.violations {
            let p = display_pointer(&v.pointer);
            if !places.contains(&p) {
                places.push(p);
            }
        }
        let more = places.len() > AUDITED_POINTERS || self.unlisted > 0;
        let mut named: Vec<String> = places
            .iter()
            .take(AUDITED_POINTERS)
            .map(|p| cut(p))
            .collect();
        if more {
            named.push("…".into());
        }
        format!(
            "invalid arguments: {total} violation{} at {}",
            plural(total as u64),
            named.join(", ")
        )
    }
}

/// What the audit log records of a refused `tools/call`: for arguments
/// that break the inputSchema a summary without values
/// ([`ArgumentViolations::audit_summary`]), otherwise the error message.
pub fn audit_message(e: &McpError) -> String {
    ArgumentViolations::from_mcp_error(e)
        .map_or_else(|| e.message.to_string(), |v| v.audit_summary())
}

impl fmt::Display for ArgumentViolations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for ArgumentViolations {}

impl From<ArgumentViolations> for McpError {
    fn from(v: ArgumentViolations) -> McpError {
        v.to_mcp_error()
    }
}

/// A compiled schema and the schema it was compiled from.
struct Compiled {
    schema: Arc<JsonObject>,
    /// `None`: the schema does not compile (warned about once).
    validator: Option<Arc<jsonschema::Validator>>,
}

/// Exposed tool name → position in the tools of one catalog generation.
#[derive(Default)]
struct ToolIndex {
    /// The snapshot indexed. Weak, so an old catalog is not kept alive; its
    /// allocation stays until this is replaced, so its address cannot be
    /// reused by a newer snapshot and mistaken for it.
    generation: Weak<Snapshot>,
    positions: HashMap<String, usize>,
}

/// Compiled tool schemas, shared by every session and entry point.
#[derive(Default)]
pub struct Validators {
    index: RwLock<ToolIndex>,
    input: RwLock<HashMap<String, Compiled>>,
    output: RwLock<HashMap<String, Compiled>>,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl Validators {
    /// The definition of exposed tool `name` in `snapshot`, through a name
    /// index rebuilt only when the catalog generation changes.
    pub fn tool<'s>(&self, snapshot: &'s Arc<Snapshot>, name: &str) -> Option<&'s Tool> {
        let found = |positions: &HashMap<String, usize>| {
            positions
                .get(name)
                .and_then(|&i| snapshot.tools.get(i))
                .filter(|t| t.name == name)
        };
        {
            let index = read(&self.index);
            if std::ptr::eq(index.generation.as_ptr(), Arc::as_ptr(snapshot)) {
                return found(&index.positions);
            }
        }
        let mut index = write(&self.index);
        if !std::ptr::eq(index.generation.as_ptr(), Arc::as_ptr(snapshot)) {
            index.positions = snapshot
                .tools
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.to_string(), i))
                .collect();
            index.generation = Arc::downgrade(snapshot);
        }
        found(&index.positions)
    }

    /// Checks `arguments` (a missing `arguments` is `{}`) against `schema`,
    /// the `inputSchema` of exposed tool `tool`. A schema that does not
    /// compile passes everything.
    pub fn check_arguments(
        &self,
        tool: &str,
        schema: &Arc<JsonObject>,
        arguments: &Value,
    ) -> Result<(), ArgumentViolations> {
        let Some(validator) = self.validator(SchemaKind::Input, tool, schema) else {
            return Ok(());
        };
        if validator.is_valid(arguments) {
            return Ok(());
        }
        let (violations, unlisted) = collect(&validator, arguments, MAX_LISTED);
        Err(ArgumentViolations {
            tool: tool.to_owned(),
            violations,
            unlisted,
        })
    }

    /// Checks a result's `structuredContent` against `schema`, the
    /// `outputSchema` of exposed tool `tool`; `Err` holds the first `limit`
    /// violations and how many more there were.
    pub fn check_output(
        &self,
        tool: &str,
        schema: &Arc<JsonObject>,
        structured: &Value,
        limit: usize,
    ) -> Result<(), (Vec<Violation>, usize)> {
        let Some(validator) = self.validator(SchemaKind::Output, tool, schema) else {
            return Ok(());
        };
        if validator.is_valid(structured) {
            return Ok(());
        }
        Err(collect(&validator, structured, limit))
    }

    /// The compiled `schema` of `tool`, compiling it if it is new or
    /// changed; `None` if it does not compile.
    fn validator(
        &self,
        kind: SchemaKind,
        tool: &str,
        schema: &Arc<JsonObject>,
    ) -> Option<Arc<jsonschema::Validator>> {
        let cache = match kind {
            SchemaKind::Input => &self.input,
            SchemaKind::Output => &self.output,
        };
        let mut same_content = false;
        if let Some(hit) = read(cache).get(tool) {
            if Arc::ptr_eq(&hit.schema, schema) {
                return hit.validator.clone();
            }
            same_content = *hit.schema == **schema;
        }
        if same_content {
            // A catalog refresh brought a new `Arc` of the same schema:
            // keep the compiled validator and remember the new pointer.
            let mut cache = write(cache);
            if let Some(hit) = cache.get_mut(tool)
                && *hit.schema == **schema
            {
                hit.schema = schema.clone();
                return hit.validator.clone();
            }
        }
        // Compiled outside the lock: a large schema must not stall every
        // other call.
        let compiled = compile(schema);
        let mut cache = write(cache);
        if let Some(hit) = cache.get(tool)
            && *hit.schema == **schema
        {
            // Another call compiled it meanwhile (and warned if it had to).
            return hit.validator.clone();
        }
        let validator = match compiled {
            Ok(v) => Some(Arc::new(v)),
            Err(error) => {
                metrics::counter!(
                    "gateway_tool_schema_invalid_total",
                    "tool" => tool.to_owned(),
                    "schema" => kind.label()
                )
                .increment(1);
                tracing::warn!(
                    tool,
                    schema = kind.field(),
                    %error,
                    "the tool's {} does not compile; its calls pass unchecked until the upstream fixes it",
                    kind.field()
                );
                None
            }
        };
        if cache.len() >= MAX_CACHED
            && !cache.contains_key(tool)
            && let Some(victim) = cache.keys().next().cloned()
        {
            cache.remove(&victim);
        }
        cache.insert(
            tool.to_owned(),
            Compiled {
                schema: schema.clone(),
                validator: validator.clone(),
            },
        );
        validator
    }
}

/// The gateway's argument check of one `tools/call` of exposed tool `tool`
/// (the MCP handler and the REST tool endpoint both use it): nothing when
/// `tools.validate_arguments` is off or the tool is not in the catalog,
/// otherwise `arguments` (missing: `{}`) against its `inputSchema`, each
/// refusal counted in `gateway_tool_argument_violations_total{tool}`. The
/// arguments are handed back unchanged.
pub fn check_call_arguments(
    gw: &Gateway,
    tool: &str,
    arguments: &mut Option<JsonObject>,
) -> Result<(), ArgumentViolations> {
    if !gw.config.tools.validate_arguments {
        return Ok(());
    }
    let snapshot = gw.snapshot();
    let Some(def) = gw.validators.tool(&snapshot, tool) else {
        return Ok(());
    };
    // Moved into a `Value` and back rather than cloned: arguments can be big.
    let missing = arguments.is_none();
    let value = Value::Object(arguments.take().unwrap_or_default());
    let checked = gw
        .validators
        .check_arguments(tool, &def.input_schema, &value);
    if let Value::Object(map) = value
        && !missing
    {
        *arguments = Some(map);
    }
    if let Err(refused) = &checked {
        metrics::counter!("gateway_tool_argument_violations_total", "tool" => tool.to_owned())
            .increment(1);
        tracing::debug!(
            tool,
            violations = refused.violations.len() + refused.unlisted,
            "tools/call refused: arguments break the inputSchema"
        );
    }
    checked
}

/// The gateway's check of a successful `tools/call` result of exposed tool
/// `tool`: when `tools.check_output_schema` is on and the tool declares an
/// `outputSchema`, its `structuredContent` is checked; a mismatch is counted
/// in `gateway_tool_output_schema_mismatches_total{tool}` and logged with
/// its first violations (never the payload). The result is not changed.
pub fn check_call_output(gw: &Gateway, tool: &str, result: &CallToolResult) {
    if !gw.config.tools.check_output_schema || result.is_error == Some(true) {
        return;
    }
    let Some(structured) = &result.structured_content else {
        return;
    };
    let snapshot = gw.snapshot();
    let Some(schema) = gw
        .validators
        .tool(&snapshot, tool)
        .and_then(|t| t.output_schema.as_ref())
    else {
        return;
    };
    if let Err((first, more)) =
        gw.validators
            .check_output(tool, schema, structured, LOGGED_OUTPUT_VIOLATIONS)
    {
        metrics::counter!("gateway_tool_output_schema_mismatches_total", "tool" => tool.to_owned())
            .increment(1);
        let listed: Vec<String> = first.iter().map(Violation::to_string).collect();
        tracing::warn!(
            tool,
            violations = first.len() + more,
            first = %listed.join("; "),
            "the upstream's structuredContent does not match the tool's outputSchema; passed on unchanged (report it to the upstream's owner)"
        );
    }
}

/// Compiles `schema` in its declared dialect (2020-12 without `$schema`),
/// never fetching a `$ref`.
fn compile(schema: &JsonObject) -> Result<jsonschema::Validator, String> {
    let mut options = jsonschema::options().offline();
    if !schema.contains_key("$schema") {
        // MCP's default dialect, stated rather than left to the crate.
        options = options.with_draft(jsonschema::Draft::Draft202012);
    }
    options
        .build(&Value::Object(schema.clone()))
        .map_err(|e| e.to_string())
}

/// The violations of `instance`, the first `limit` of them, and how many
/// more there were.
fn collect(
    validator: &jsonschema::Validator,
    instance: &Value,
    limit: usize,
) -> (Vec<Violation>, usize) {
    let mut listed = Vec::new();
    let mut more = 0;
    for error in validator.iter_errors(instance) {
        for v in violations_of(&error) {
            if listed.len() < limit {
                listed.push(v);
            } else {
                more += 1;
            }
        }
    }
    (listed, more)
}

/// What one validation error says, in our terms (usually one violation;
/// one per property for `additionalProperties: false`).
fn violations_of(error: &jsonschema::ValidationError<'_>) -> Vec<Violation> {
    use ValidationErrorKind as K;
    let pointer = error.instance_path().as_str().to_owned();
    let instance: &Value = error.instance();
    let actual = describe(instance);
    let mismatch = |expected: String| {
        vec![Violation::mismatch(
            pointer.clone(),
            expected,
            actual.clone(),
        )]
    };
    match error.kind() {
        K::Type { kind } => mismatch(type_names(kind)),
        K::Required { property } => {
            let name = quote_value(property);
            vec![Violation {
                pointer,
                expected: format!("required property {name}"),
                actual: "missing".into(),
                message: format!("missing required property {name}"),
            }]
        }
        K::AdditionalProperties { unexpected } | K::UnevaluatedProperties { unexpected } => {
            unexpected
                .iter()
                .map(|name| {
                    let quoted = quote(name);
                    Violation {
                        pointer: format!("{pointer}/{}", escape_pointer(name)),
                        expected: "no such property (the schema allows no other properties)".into(),
                        actual: instance
                            .get(name)
                            .map_or_else(|| "present".to_owned(), describe),
                        message: format!(
                            "unexpected property {quoted}: the schema allows no other properties"
                        ),
                    }
                })
                .collect()
        }
        K::Enum { options } => mismatch(format!("one of {}", short_json(options))),
        K::Constant { expected_value } => {
            mismatch(format!("exactly {}", short_json(expected_value)))
        }
        K::Minimum { limit } => mismatch(format!("a number >= {limit}")),
        K::ExclusiveMinimum { limit } => mismatch(format!("a number > {limit}")),
        K::Maximum { limit } => mismatch(format!("a number <= {limit}")),
        K::ExclusiveMaximum { limit } => mismatch(format!("a number < {limit}")),
        K::MultipleOf { multiple_of } => mismatch(format!("a multiple of {multiple_of}")),
        K::MinLength { limit } => vec![Violation::mismatch(
            pointer,
            format!("a string of at least {limit} character{}", plural(*limit)),
            with_length(instance, actual),
        )],
        K::MaxLength { limit } => vec![Violation::mismatch(
            pointer,
            format!("a string of at most {limit} character{}", plural(*limit)),
            with_length(instance, actual),
        )],
        K::MinItems { limit } => mismatch(format!(
            "an array of at least {limit} item{}",
            plural(*limit)
        )),
        K::MaxItems { limit } => mismatch(format!(
            "an array of at most {limit} item{}",
            plural(*limit)
        )),
        K::AdditionalItems { limit } => mismatch(format!(
            "an array of at most {limit} item{}",
            plural(*limit as u64)
        )),
        K::MinProperties { limit } => mismatch(format!(
            "an object with at least {limit} propert{}",
            if *limit == 1 { "y" } else { "ies" }
        )),
        K::MaxProperties { limit } => mismatch(format!(
            "an object with at most {limit} propert{}",
            if *limit == 1 { "y" } else { "ies" }
        )),
        K::UniqueItems => vec![Violation::mismatch(
            pointer,
            "an array of unique items".into(),
            format!("{actual} with duplicates"),
        )],
        K::Pattern { pattern } => {
            mismatch(format!("a string matching the pattern {}", quote(pattern)))
        }
        K::Format { format } => mismatch(format!("a string in format {}", quote(format))),
        K::Contains => mismatch("an array with at least one item matching `contains`".into()),
        K::FalseSchema => mismatch("nothing (the schema here is `false`)".into()),
        K::Not { schema } => mismatch(format!("a value not matching {}", short_json(schema))),
        K::AnyOf { context } => vec![alternatives(
            pointer,
            actual,
            "a value matching at least one `anyOf` alternative",
            context,
        )],
        K::OneOfNotValid { context } => vec![alternatives(
            pointer,
            actual,
            "a value matching exactly one `oneOf` alternative",
            context,
        )],
        K::OneOfMultipleValid { .. } => vec![Violation::mismatch(
            pointer,
            "a value matching exactly one `oneOf` alternative".into(),
            format!("{actual}, which matches several"),
        )],
        K::PropertyNames { error: inner } => {
            let name = quote_value(error.instance());
            let why = violations_of(inner)
                .first()
                .map(|v| v.message.clone())
                .unwrap_or_default();
            vec![Violation {
                pointer,
                expected: "property names allowed by `propertyNames`".into(),
                actual: format!("property {name}"),
                message: format!("property name {name} is not allowed: {why}"),
            }]
        }
        other => {
            // Rarer keywords (contentEncoding, unevaluatedItems, $ref
            // failures, regex limits). Not the crate's wording: it quotes
            // the whole value, which can be any size and is the caller's.
            mismatch(format!("a value valid under `{}`", other.keyword()))
        }
    }
}

/// A failed `anyOf`/`oneOf`, quoting the first failure of the first few
/// alternatives.
fn alternatives(
    pointer: String,
    actual: String,
    expected: &str,
    context: &[Vec<jsonschema::ValidationError<'static>>],
) -> Violation {
    let mut v = Violation::mismatch(pointer, expected.into(), actual);
    let quoted: Vec<String> = context
        .iter()
        .take(QUOTED_ALTERNATIVES)
        .enumerate()
        .filter_map(|(i, errors)| {
            let first = errors
                .first()
                .and_then(|e| violations_of(e).into_iter().next())?;
            Some(format!("alternative {}: {first}", i + 1))
        })
        .collect();
    if !quoted.is_empty() {
        v.message = format!("{} ({})", v.message, quoted.join("; "));
    }
    v
}

/// `integer`, or `one of string, null`.
fn type_names(kind: &TypeKind) -> String {
    match kind {
        TypeKind::Single(t) => t.to_string(),
        TypeKind::Multiple(set) => {
            let names: Vec<String> = set.iter().map(|t| t.to_string()).collect();
            format!("one of {}", names.join(", "))
        }
    }
}

/// The type and (short) value of a JSON value: `string "3"`, `number 7`,
/// `array of 3 items`.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {}", quote(s)),
        Value::Array(a) => format!("array of {} item{}", a.len(), plural(a.len() as u64)),
        Value::Object(o) => format!(
            "object with {} propert{}",
            o.len(),
            if o.len() == 1 { "y" } else { "ies" }
        ),
    }
}

/// `describe` plus the length in characters, for length limits.
fn with_length(v: &Value, described: String) -> String {
    match v.as_str() {
        Some(s) => {
            let n = s.chars().count() as u64;
            format!("{described} ({n} character{})", plural(n))
        }
        None => described,
    }
}

/// `s` as a JSON string, cut to [`MAX_QUOTED`] characters.
fn quote(s: &str) -> String {
    let mut chars = s.chars();
    let cut: String = chars.by_ref().take(MAX_QUOTED).collect();
    let rest = if chars.next().is_some() { "…" } else { "" };
    format!("{}{rest}", Value::String(cut))
}

/// `s` cut to [`MAX_QUOTED`] characters.
fn cut(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(MAX_QUOTED).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}

/// A property name from a `required` error (a JSON string) quoted.
fn quote_value(v: &Value) -> String {
    match v.as_str() {
        Some(s) => quote(s),
        None => short_json(v),
    }
}

/// `v` as JSON, cut to [`MAX_QUOTED`] characters.
fn short_json(v: &Value) -> String {
    cut(&v.to_string())
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// One pointer segment, escaped per RFC 6901.
fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// A pointer for people: the root is `/ (root)`.
fn display_pointer(pointer: &str) -> &str {
    if pointer.is_empty() {
        "/ (root)"
    } else {
        pointer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(v: Value) -> Arc<JsonObject> {
        match v {
            Value::Object(m) => Arc::new(m),
            other => panic!("a schema object, not {other}"),
        }
    }

    /// The rich schema most tests use.
    fn typed() -> Arc<JsonObject> {
        schema(json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 8},
                "count": {"type": "integer", "minimum": 1, "maximum": 10},
                "mode": {"enum": ["fast", "safe"]},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}
            },
            "required": ["name", "count"],
            "additionalProperties": false
        }))
    }

    fn refused(schema: &Arc<JsonObject>, args: Value) -> ArgumentViolations {
        Validators::default()
            .check_arguments("fx__typed", schema, &args)
            .expect_err("the arguments break the schema")
    }

    fn only(v: &ArgumentViolations) -> &Violation {
        assert_eq!(v.violations.len(), 1, "{v}");
        &v.violations[0]
    }

    fn expect(v: &Violation, pointer: &str, expected: &str, actual: &str) {
        assert_eq!(
            (v.pointer.as_str(), v.expected.as_str(), v.actual.as_str()),
            (pointer, expected, actual),
            "{v}"
        );
    }

    #[test]
    fn valid_arguments_pass() {
        let ok = Validators::default().check_arguments(
            "fx__typed",
            &typed(),
            &json!({"name": "ann", "count": 3, "mode": "safe", "tags": ["a"]}),
        );
        assert_eq!(ok, Ok(()));
    }

    #[test]
    fn wrong_type_names_pointer_expected_type_and_actual_value() {
        let v = refused(&typed(), json!({"name": "ann", "count": "3"}));
        expect(only(&v), "/count", "integer", "string \"3\"");
        assert_eq!(only(&v).message, "expected integer, got string \"3\"");
    }

    #[test]
    fn missing_required_property_points_at_the_root() {
        let v = refused(&typed(), json!({"count": 3}));
        expect(only(&v), "", "required property \"name\"", "missing");
        assert_eq!(
            only(&v).to_string(),
            "/ (root): missing required property \"name\""
        );
    }

    #[test]
    fn enum_lists_the_allowed_values() {
        let v = refused(&typed(), json!({"name": "ann", "count": 3, "mode": "slow"}));
        expect(
            only(&v),
            "/mode",
            "one of [\"fast\",\"safe\"]",
            "string \"slow\"",
        );
    }

    #[test]
    fn minimum_and_maximum_name_the_bound() {
        let low = refused(&typed(), json!({"name": "ann", "count": 0}));
        expect(only(&low), "/count", "a number >= 1", "number 0");
        let high = refused(&typed(), json!({"name": "ann", "count": 11}));
        expect(only(&high), "/count", "a number <= 10", "number 11");
    }

    #[test]
    fn pattern_and_length_are_reported() {
        let v = refused(&typed(), json!({"name": "Ann", "count": 3}));
        expect(
            only(&v),
            "/name",
            "a string matching the pattern \"^[a-z]+$\"",
            "string \"Ann\"",
        );
        let long = refused(&typed(), json!({"name": "abcdefghij", "count": 3}));
        expect(
            only(&long),
            "/name",
            "a string of at most 8 characters",
            "string \"abcdefghij\" (10 characters)",
        );
    }

    #[test]
    fn each_unexpected_property_is_its_own_violation() {
        let v = refused(
            &typed(),
            json!({"name": "ann", "count": 3, "extra": 1, "other/x": "y"}),
        );
        let mut pointers: Vec<&str> = v.violations.iter().map(|v| v.pointer.as_str()).collect();
        pointers.sort_unstable();
        assert_eq!(pointers, ["/extra", "/other~1x"], "{v}");
        let extra = v
            .violations
            .iter()
            .find(|v| v.pointer == "/extra")
            .expect("a violation for /extra");
        assert_eq!(extra.actual, "number 1");
        assert!(
            extra.message.contains("unexpected property \"extra\""),
            "{v}"
        );
    }

    #[test]
    fn nested_array_item_is_pointed_at_by_index() {
        let v = refused(
            &typed(),
            json!({"name": "ann", "count": 3, "tags": ["a", "b", 7]}),
        );
        expect(only(&v), "/tags/2", "string", "number 7");
        assert_eq!(
            only(&v).to_string(),
            "/tags/2: expected string, got number 7"
        );
        let many = refused(
            &typed(),
            json!({"name": "ann", "count": 3, "tags": ["a", "b", "c", "d"]}),
        );
        expect(
            only(&many),
            "/tags",
            "an array of at most 3 items",
            "array of 4 items",
        );
    }

    #[test]
    fn every_violation_is_listed_and_the_error_says_what_to_do() {
        let v = refused(&typed(), json!({"count": "3", "tags": ["a", "b", 7]}));
        let pointers: Vec<&str> = v.violations.iter().map(|v| v.pointer.as_str()).collect();
        assert_eq!(v.violations.len(), 3, "{v}");
        for p in ["", "/count", "/tags/2"] {
            assert!(pointers.contains(&p), "{p} missing in {v}");
        }
        let e = v.to_mcp_error();
        assert_eq!(e.code, ErrorCode::INVALID_PARAMS);
        for part in [
            "fx__typed",
            "3 violations",
            "/count: expected integer, got string \"3\"",
            "/ (root): missing required property \"name\"",
            "/tags/2: expected string, got number 7",
            "inputSchema",
            "tools/list",
        ] {
            assert!(e.message.contains(part), "{part} not in: {}", e.message);
        }
        let data = e.data.expect("error data");
        assert_eq!(data["tool"], "fx__typed");
        assert_eq!(data["violations"].as_array().map(Vec::len), Some(3));
        let count = data["violations"]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["pointer"] == "/count"))
            .expect("the /count violation in data");
        assert_eq!(count["expected"], "integer");
        assert_eq!(count["actual"], "string \"3\"");
        assert_eq!(count["message"], "expected integer, got string \"3\"");
        assert!(data.get("unlisted").is_none(), "{data}");
    }

    #[test]
    fn violations_beyond_the_limit_are_counted_not_listed() {
        let s = schema(
            json!({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "string"}}}}),
        );
        let xs: Vec<u32> = (0..(MAX_LISTED as u32 + 5)).collect();
        let v = refused(&s, json!({ "xs": xs }));
        assert_eq!((v.violations.len(), v.unlisted), (MAX_LISTED, 5));
        assert!(v.message().contains("and 5 more"), "{}", v.message());
        assert_eq!(v.data()["unlisted"], 5);
    }

    #[test]
    fn missing_arguments_are_checked_as_an_empty_object() {
        let v = refused(&typed(), json!({}));
        assert_eq!(v.violations.len(), 2, "{v}");
        let open = schema(json!({"type": "object"}));
        assert_eq!(
            Validators::default().check_arguments("t", &open, &json!({})),
            Ok(())
        );
    }

    #[test]
    fn draft_07_definitions_ref_and_dependencies_work() {
        let s = schema(json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "definitions": {"positive": {"type": "integer", "minimum": 1}},
            "properties": {
                "n": {"$ref": "#/definitions/positive"},
                "card": {"type": "string"},
                "cvv": {"type": "string"}
            },
            "dependencies": {"card": ["cvv"]}
        }));
        let validators = Validators::default();
        assert_eq!(
            validators.check_arguments("t", &s, &json!({"n": 2, "card": "x", "cvv": "1"})),
            Ok(())
        );
        let bad_ref = validators
            .check_arguments("t", &s, &json!({"n": 0}))
            .expect_err("n breaks the referenced definition");
        expect(only(&bad_ref), "/n", "a number >= 1", "number 0");
        let bad_dep = validators
            .check_arguments("t", &s, &json!({"card": "x"}))
            .expect_err("card needs cvv");
        expect(only(&bad_dep), "", "required property \"cvv\"", "missing");
    }

    #[test]
    fn draft_07_tuple_items_are_not_2020_12_prefix_items() {
        // In draft-07 an `items` array checks by position; 2020-12 would
        // reject the array form (it is `prefixItems` there) or read it
        // differently, so this only passes when the dialect is honoured.
        let s = schema(json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"pair": {"type": "array", "items": [{"type": "string"}, {"type": "integer"}]}}
        }));
        let v = Validators::default()
            .check_arguments("t", &s, &json!({"pair": ["a", "b"]}))
            .expect_err("the second item must be an integer");
        expect(only(&v), "/pair/1", "integer", "string \"b\"");
    }

    #[test]
    fn without_schema_keyword_the_dialect_is_2020_12() {
        // `prefixItems` means something only in 2020-12.
        let s = schema(json!({
            "type": "object",
            "properties": {"pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}}
        }));
        let v = Validators::default()
            .check_arguments("t", &s, &json!({"pair": ["a", "b"]}))
            .expect_err("prefixItems applies");
        expect(only(&v), "/pair/1", "integer", "string \"b\"");
    }

    #[test]
    fn a_schema_that_does_not_compile_passes_calls_through() {
        let broken = schema(json!({"type": "object", "properties": {"n": {"type": 5}}}));
        let validators = Validators::default();
        assert_eq!(
            validators.check_arguments("t", &broken, &json!({"n": "anything"})),
            Ok(())
        );
        // Remembered as broken: the second call does not compile again.
        assert!(
            read(&validators.input)
                .get("t")
                .is_some_and(|c| c.validator.is_none())
        );
        assert_eq!(
            validators.check_arguments("t", &broken, &json!({"n": 1})),
            Ok(())
        );
    }

    #[test]
    fn an_unknown_dialect_passes_calls_through() {
        let s = schema(json!({
            "$schema": "https://example.com/my-dialect",
            "type": "object",
            "properties": {"n": {"type": "integer"}}
        }));
        let validators = Validators::default();
        assert_eq!(
            validators.check_arguments("t", &s, &json!({"n": "x"})),
            Ok(())
        );
        assert!(
            read(&validators.input)
                .get("t")
                .is_some_and(|c| c.validator.is_none())
        );
    }

    #[test]
    fn any_of_quotes_why_each_alternative_failed() {
        let s = schema(json!({
            "type": "object",
            "properties": {"id": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}
        }));
        let v = refused(&s, json!({"id": true}));
        let only = only(&v);
        assert_eq!(only.pointer, "/id");
        assert_eq!(only.actual, "boolean true");
        for part in [
            "alternative 1: /id: expected string",
            "alternative 2: /id: expected integer",
        ] {
            assert!(
                only.message.contains(part),
                "{part} not in {}",
                only.message
            );
        }
    }

    #[test]
    fn a_remote_ref_is_not_fetched() {
        // 192.0.2.0/24 is TEST-NET-1: nothing answers there, and a fetch
        // attempt would take the connect timeout; compiling fails at once.
        let s = schema(json!({
            "type": "object",
            "properties": {"n": {"$ref": "http://192.0.2.1/schema.json"}}
        }));
        let started = std::time::Instant::now();
        let validators = Validators::default();
        assert_eq!(
            validators.check_arguments("t", &s, &json!({"n": "x"})),
            Ok(())
        );
        assert!(
            read(&validators.input)
                .get("t")
                .is_some_and(|c| c.validator.is_none()),
            "a schema with a remote $ref must not compile"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn a_changed_schema_is_compiled_anew_and_an_equal_one_reused() {
        let validators = Validators::default();
        let first = schema(json!({"type": "object", "properties": {"n": {"type": "integer"}}}));
        assert!(
            validators
                .check_arguments("t", &first, &json!({"n": "x"}))
                .is_err()
        );
        let compiled = read(&validators.input)
            .get("t")
            .and_then(|c| c.validator.clone())
            .expect("compiled");
        // Same content, new Arc (a catalog refresh): same validator.
        let again = schema(json!({"type": "object", "properties": {"n": {"type": "integer"}}}));
        assert!(
            validators
                .check_arguments("t", &again, &json!({"n": "x"}))
                .is_err()
        );
        let reused = read(&validators.input)
            .get("t")
            .and_then(|c| c.validator.clone())
            .expect("compiled");
        assert!(Arc::ptr_eq(&compiled, &reused));
        // Changed content: the new rules apply.
        let changed = schema(json!({"type": "object", "properties": {"n": {"type": "string"}}}));
        assert_eq!(
            validators.check_arguments("t", &changed, &json!({"n": "x"})),
            Ok(())
        );
    }

    #[test]
    fn output_check_reports_the_first_violations() {
        let s = schema(json!({
            "type": "object",
            "properties": {"sum": {"type": "number"}},
            "required": ["sum"]
        }));
        let validators = Validators::default();
        assert_eq!(
            validators.check_output("fx__add", &s, &json!({"sum": 3}), 3),
            Ok(())
        );
        let (first, more) = validators
            .check_output("fx__add", &s, &json!({"sum": "3"}), 3)
            .expect_err("sum must be a number");
        assert_eq!(more, 0);
        expect(&first[0], "/sum", "number", "string \"3\"");
    }

    #[test]
    fn tools_are_found_by_name_per_snapshot_generation() {
        let validators = Validators::default();
        let tool = |name: &str| Tool::new(name.to_owned(), "t", typed());
        let one = Arc::new(Snapshot {
            tools: vec![tool("a"), tool("b")],
            ..Default::default()
        });
        assert_eq!(
            validators.tool(&one, "b").map(|t| t.name.as_ref()),
            Some("b")
        );
        assert!(validators.tool(&one, "c").is_none());
        let two = Arc::new(Snapshot {
            tools: vec![tool("c")],
            ..Default::default()
        });
        assert_eq!(
            validators.tool(&two, "c").map(|t| t.name.as_ref()),
            Some("c")
        );
        assert!(validators.tool(&two, "b").is_none());
    }

    #[test]
    fn the_audit_summary_names_count_and_places_but_no_value() {
        let secret = "hunter2-do-not-log";
        // /name breaks both its pattern and its length: one place.
        let v = refused(
            &typed(),
            json!({"name": secret, "count": secret, "tags": ["a", 7]}),
        );
        assert!(v.message().contains(secret), "the client sees the value");
        let e = v.to_mcp_error();
        let summary = audit_message(&e);
        assert!(!summary.contains(secret), "{summary}");
        let mut places: Vec<&str> = summary
            .strip_prefix("invalid arguments: 4 violations at ")
            .unwrap_or_else(|| panic!("{summary}"))
            .split(", ")
            .collect();
        places.sort_unstable();
        assert_eq!(places, ["/count", "/name", "/tags/1"], "{summary}");
        assert_eq!(
            ArgumentViolations::from_mcp_error(&e).as_ref(),
            Some(&v),
            "read back from the error"
        );
        // Many places: the first few and an ellipsis.
        let s = schema(
            json!({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "string"}}}}),
        );
        let xs: Vec<u32> = (0..(MAX_LISTED as u32 + 5)).collect();
        let many = audit_message(&refused(&s, json!({ "xs": xs })).to_mcp_error());
        assert_eq!(
            many,
            format!(
                "invalid arguments: {} violations at /xs/0, /xs/1, /xs/2, /xs/3, /xs/4, …",
                MAX_LISTED + 5
            )
        );
        // Any other error is recorded as it is.
        let other = McpError::new(ErrorCode::INVALID_PARAMS, "unknown tool `x`", None);
        assert_eq!(audit_message(&other), "unknown tool `x`");
    }

    #[test]
    fn rarer_keywords_never_quote_the_whole_value() {
        // `unevaluatedItems` has no arm of its own; jsonschema's wording
        // would quote every unexpected item in full.
        let s = schema(json!({
            "type": "object",
            "properties": {"xs": {"type": "array", "prefixItems": [{"type": "string"}], "unevaluatedItems": false}}
        }));
        let long = format!("secret-{}", "x".repeat(500));
        let v = refused(&s, json!({"xs": ["a", long]}));
        let only = only(&v);
        expect(
            only,
            "/xs",
            "a value valid under `unevaluatedItems`",
            "array of 2 items",
        );
        assert!(!v.message().contains("secret-"), "{}", v.message());
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let s = schema(json!({"type": "object", "properties": {"n": {"type": "integer"}}}));
        let long = "x".repeat(500);
        let v = refused(&s, json!({ "n": long }));
        assert!(only(&v).actual.chars().count() < 80, "{}", only(&v).actual);
        assert!(only(&v).actual.ends_with('…'));
    }
}
