//! Who may do what: roles and the scopes they grant, the authenticated
//! [`Principal`], API-key format and hashing, per-tool allow/deny rules, and
//! the failed-authentication lockout.
//!
//! Everything here is pure: time comes in as a parameter and randomness as
//! bytes, so the rules are unit-tested without a clock or a database.

use std::collections::HashMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Scope names. A scope is a permission on a family of routes or MCP methods.
pub mod scope {
    /// List tools, prompts, resources; read resources; get prompts; complete.
    pub const MCP_READ: &str = "mcp:read";
    /// Call tools.
    pub const MCP_CALL: &str = "mcp:call";
    /// Read API keys of the tenant.
    pub const KEYS_READ: &str = "keys:read";
    /// Create, change and revoke API keys of the tenant.
    pub const KEYS_WRITE: &str = "keys:write";
    /// Read the audit log of the tenant.
    pub const AUDIT_READ: &str = "audit:read";
    /// Read upstream definitions and their health.
    pub const UPSTREAMS_READ: &str = "upstreams:read";
    /// Change upstream definitions.
    pub const UPSTREAMS_WRITE: &str = "upstreams:write";
    /// Read metrics and detailed health.
    pub const METRICS_READ: &str = "metrics:read";
    /// Run-time admin actions (breakers, limits, log level, cleanup).
    pub const ADMIN: &str = "admin";
    /// Read tasks and agents.
    pub const TASKS_READ: &str = "tasks:read";
    /// Submit, cancel and work on tasks.
    pub const TASKS_WRITE: &str = "tasks:write";
    /// Connect to the agent endpoint as an agent.
    pub const AGENT_CONNECT: &str = "agent:connect";
    /// Act on other tenants' objects (only ever granted explicitly).
    pub const ALL_TENANTS: &str = "tenants:*";
}

/// Every scope this gateway knows, for validation and discovery.
pub const ALL_SCOPES: &[&str] = &[
    scope::MCP_READ,
    scope::MCP_CALL,
    scope::KEYS_READ,
    scope::KEYS_WRITE,
    scope::AUDIT_READ,
    scope::UPSTREAMS_READ,
    scope::UPSTREAMS_WRITE,
    scope::METRICS_READ,
    scope::ADMIN,
    scope::TASKS_READ,
    scope::TASKS_WRITE,
    scope::AGENT_CONNECT,
    scope::ALL_TENANTS,
];

/// A role: a named bundle of scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything within its tenant.
    Admin,
    /// Runs the gateway: MCP, upstreams, metrics, audit, admin actions; reads keys.
    Operator,
    /// Uses MCP tools and tasks.
    Developer,
    /// An AI agent of the mesh: connects and works on tasks, no MCP.
    Agent,
    /// Reads: lists MCP capabilities, upstreams, metrics, tasks; calls nothing.
    Viewer,
}

impl Role {
    /// Every role, most powerful first.
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Operator,
        Role::Developer,
        Role::Agent,
        Role::Viewer,
    ];
    /// Accepted spellings, for error messages.
    pub const ALLOWED: &'static str = "admin, operator, developer, agent, viewer";

    /// Parses the configuration and API spelling.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The spelling used in configuration, tokens and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Developer => "developer",
            Role::Agent => "agent",
            Role::Viewer => "viewer",
        }
    }

    /// The scopes a credential of this role gets when none are named.
    pub fn default_scopes(self) -> &'static [&'static str] {
        use scope::*;
        match self {
            Role::Admin => &[
                MCP_READ,
                MCP_CALL,
                KEYS_READ,
                KEYS_WRITE,
                AUDIT_READ,
                UPSTREAMS_READ,
                UPSTREAMS_WRITE,
                METRICS_READ,
                ADMIN,
                TASKS_READ,
                TASKS_WRITE,
                AGENT_CONNECT,
            ],
            Role::Operator => &[
                MCP_READ,
                MCP_CALL,
                KEYS_READ,
                AUDIT_READ,
                UPSTREAMS_READ,
                UPSTREAMS_WRITE,
                METRICS_READ,
                ADMIN,
                TASKS_READ,
            ],
            Role::Developer => &[MCP_READ, MCP_CALL, UPSTREAMS_READ, TASKS_READ, TASKS_WRITE],
            Role::Agent => &[AGENT_CONNECT, TASKS_READ, TASKS_WRITE],
            Role::Viewer => &[MCP_READ, UPSTREAMS_READ, METRICS_READ, TASKS_READ],
        }
    }

    /// Whether a credential of this role may hold `scope` at all. Only admins
    /// may hold `tenants:*`, and only when it is granted explicitly.
    pub fn may_hold(self, scope: &str) -> bool {
        self.default_scopes().contains(&scope)
            || (self == Role::Admin && scope == scope::ALL_TENANTS)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a requested scope list against a role: every scope must exist and
/// be one the role may hold. `None` means the role's defaults. The result is
/// sorted and free of duplicates.
pub fn resolve_scopes(role: Role, requested: Option<&[String]>) -> Result<Vec<String>, String> {
    let Some(requested) = requested else {
        let mut s: Vec<String> = role
            .default_scopes()
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        s.sort();
        return Ok(s);
    };
    let mut out = Vec::with_capacity(requested.len());
    for s in requested {
        if !ALL_SCOPES.contains(&s.as_str()) {
            return Err(format!(
                "unknown scope `{s}`; known scopes: {}",
                ALL_SCOPES.join(", ")
            ));
        }
        if !role.may_hold(s) {
            return Err(format!(
                "role `{role}` cannot hold scope `{s}`; its scopes are: {}",
                role.default_scopes().join(", ")
            ));
        }
        out.push(s.clone());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// How a principal authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// An `mg_` API key.
    ApiKey,
    /// A gateway-issued JWT access token.
    AccessToken,
    /// A token from an external OAuth issuer.
    OAuth,
    /// Nobody: authentication is disabled for local development.
    Anonymous,
    /// The operator at the command line (`meshgate keys ...`).
    Cli,
}

impl CredentialKind {
    /// Spelling in the audit log and API output.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ApiKey => "api_key",
            CredentialKind::AccessToken => "access_token",
            CredentialKind::OAuth => "oauth",
            CredentialKind::Anonymous => "anonymous",
            CredentialKind::Cli => "cli",
        }
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Who: an API key id (`key_…`), or the OAuth token's subject.
    pub subject: String,
    /// The tenant whose objects it may see.
    pub tenant: String,
    /// Its role.
    pub role: Role,
    /// Its scopes (sorted).
    pub scopes: Vec<String>,
    /// The API key behind it (directly or through a token), if any.
    pub key_id: Option<String>,
    /// How it authenticated.
    pub kind: CredentialKind,
    /// Its API key's own rate limit (requests per minute), replacing
    /// `rate_limits.per_key` for it.
    pub rate_limit_per_minute: Option<u32>,
}

impl Principal {
    /// Whether it holds `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// Whether it may act on objects of `tenant`.
    pub fn may_access_tenant(&self, tenant: &str) -> bool {
        self.tenant == tenant || self.has_scope(scope::ALL_TENANTS)
    }

    /// The principal used when authentication is disabled: an admin of the
    /// default tenant, recorded as anonymous.
    pub fn anonymous(tenant: &str) -> Principal {
        Principal {
            subject: "anonymous".into(),
            tenant: tenant.into(),
            role: Role::Admin,
            scopes: resolve_scopes(Role::Admin, None).unwrap_or_default(),
            key_id: None,
            kind: CredentialKind::Anonymous,
            rate_limit_per_minute: None,
        }
    }
}

/// Prefix of every API key.
pub const API_KEY_PREFIX: &str = "mg_";
/// Length of an API key: the prefix plus base64url of 32 bytes without padding.
pub const API_KEY_LEN: usize = 3 + 43;

/// Formats 32 random bytes as an API key: `mg_` + base64url (no padding).
pub fn format_api_key(secret: &[u8; 32]) -> String {
    format!("{API_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret))
}

/// Why a presented API key is not even shaped like one.
pub fn check_api_key_format(key: &str) -> Result<(), String> {
    let Some(body) = key.strip_prefix(API_KEY_PREFIX) else {
        return Err("API key does not start with `mg_`".into());
    };
    if key.len() != API_KEY_LEN {
        return Err(format!(
            "API key has {} characters; meshgate keys have {API_KEY_LEN}",
            key.len()
        ));
    }
    match URL_SAFE_NO_PAD.decode(body) {
        Ok(bytes) if bytes.len() == 32 => Ok(()),
        _ => Err("API key is not `mg_` followed by base64url of 32 bytes".into()),
    }
}

/// SHA-256 of a secret (API key or refresh token), hex. Keys carry 256 random
/// bits, so a fast hash is enough: there is nothing to brute-force.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The non-secret part shown in listings: `mg_` and the first 6 characters.
pub fn display_prefix(key: &str) -> String {
    key.chars().take(API_KEY_PREFIX.len() + 6).collect()
}

/// SHA-256 of the canonical JSON of tool arguments (object keys sorted), hex:
/// what the audit log records instead of the arguments themselves.
pub fn arguments_hash(arguments: Option<&serde_json::Map<String, serde_json::Value>>) -> String {
    let s = match arguments {
        Some(m) => crate::crdt::canonical_json(&serde_json::Value::Object(m.clone())),
        None => "null".to_owned(),
    };
    hash_secret(&s)
}

// ---------------------------------------------------------------------------
// Per-tool rules
// ---------------------------------------------------------------------------

/// Whether a rule allows or denies the tools it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleEffect {
    /// Only tools matching some allow rule are usable (for the principals the rule applies to).
    Allow,
    /// Tools matching the rule are never usable (deny wins over allow).
    Deny,
}

/// One allow or deny rule, as configured (`[[auth.tool_rules]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolRuleConfig {
    /// `allow` or `deny`.
    pub effect: RuleEffect,
    /// Tool-name globs (`*`, `?`, `[abc]`), matched against exposed names.
    pub tools: Vec<String>,
    /// Applies only to this role.
    #[serde(default)]
    pub role: Option<Role>,
    /// Applies only to this tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Applies only to this API key id (`key_…`).
    #[serde(default)]
    pub key: Option<String>,
}

impl ToolRuleConfig {
    fn describe(&self, index: usize) -> String {
        let mut who = Vec::new();
        if let Some(r) = self.role {
            who.push(format!("role={r}"));
        }
        if let Some(t) = &self.tenant {
            who.push(format!("tenant={t}"));
        }
        if let Some(k) = &self.key {
            who.push(format!("key={k}"));
        }
        if who.is_empty() {
            who.push("everyone".into());
        }
        format!(
            "auth.tool_rules[{index}] ({} {} for {})",
            match self.effect {
                RuleEffect::Allow => "allow",
                RuleEffect::Deny => "deny",
            },
            self.tools.join(", "),
            who.join(" ")
        )
    }

    fn applies_to(&self, p: &Principal) -> bool {
        self.role.is_none_or(|r| r == p.role)
            && self.tenant.as_deref().is_none_or(|t| t == p.tenant)
            && self
                .key
                .as_deref()
                .is_none_or(|k| p.key_id.as_deref() == Some(k))
    }
}

struct CompiledRule {
    config: ToolRuleConfig,
    globs: globset::GlobSet,
    description: String,
}

/// The compiled tool rules: answers "may this principal use this tool?".
#[derive(Default)]
pub struct ToolPolicy {
    rules: Vec<CompiledRule>,
}

impl fmt::Debug for ToolPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.rules.iter().map(|r| &r.description))
            .finish()
    }
}

/// Why a tool is refused: the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolDenied {
    /// The tool.
    pub tool: String,
    /// The rule, described (`auth.tool_rules[2] (deny fx__* for role=viewer)`),
    /// or the allow rules the tool matched none of.
    pub rule: String,
}

impl fmt::Display for ToolDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tool `{}` is denied by {}", self.tool, self.rule)
    }
}

impl ToolPolicy {
    /// Compiles the rules; an invalid glob is named with its rule.
    pub fn new(rules: &[ToolRuleConfig]) -> Result<ToolPolicy, String> {
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let mut b = globset::GlobSetBuilder::new();
            for g in &r.tools {
                let glob = globset::GlobBuilder::new(g)
                    .literal_separator(false)
                    .build()
                    .map_err(|e| {
                        format!("auth.tool_rules[{i}].tools: `{g}` is not a valid glob: {e}")
                    })?;
                b.add(glob);
            }
            let globs = b
                .build()
                .map_err(|e| format!("auth.tool_rules[{i}].tools: {e}"))?;
            compiled.push(CompiledRule {
                description: r.describe(i),
                config: r.clone(),
                globs,
            });
        }
        Ok(ToolPolicy { rules: compiled })
    }

    /// True when no rule exists (every tool is allowed; the fast path).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides whether `principal` may see and call `tool`. A matching deny
    /// rule wins; otherwise, when allow rules apply to the principal, the tool
    /// must match one of them.
    pub fn check(&self, principal: &Principal, tool: &str) -> Result<(), ToolDenied> {
        let mut allow_rules = Vec::new();
        let mut allowed = false;
        for r in self.rules.iter().filter(|r| r.config.applies_to(principal)) {
            let hit = r.globs.is_match(tool);
            match r.config.effect {
                RuleEffect::Deny if hit => {
                    return Err(ToolDenied {
                        tool: tool.to_owned(),
                        rule: r.description.clone(),
                    });
                }
                RuleEffect::Deny => {}
                RuleEffect::Allow => {
                    allowed |= hit;
                    allow_rules.push(r.description.as_str());
                }
            }
        }
        if allow_rules.is_empty() || allowed {
            Ok(())
        } else {
            Err(ToolDenied {
                tool: tool.to_owned(),
                rule: format!(
                    "matching none of the allow rules {}",
                    allow_rules.join("; ")
                ),
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Lockout
// ---------------------------------------------------------------------------

/// Failed-authentication lockout per client (by address): `max_failures`
/// failures within `window_ms` lock the client out for `lockout_ms`.
#[derive(Debug)]
pub struct Lockout {
    max_failures: u32,
    window_ms: i64,
    lockout_ms: i64,
    clients: HashMap<String, ClientFailures>,
}

#[derive(Debug, Default)]
struct ClientFailures {
    /// Times of recent failures (unix ms), oldest first, at most `max_failures`.
    recent: Vec<i64>,
    locked_until: Option<i64>,
}

impl Lockout {
    /// A lockout policy; `max_failures` 0 disables it.
    pub fn new(max_failures: u32, window_ms: i64, lockout_ms: i64) -> Lockout {
        Lockout {
            max_failures,
            window_ms,
            lockout_ms,
            clients: HashMap::new(),
        }
    }

    /// When `client` is locked out at `now`, the time (unix ms) it is let in again.
    pub fn locked_until(&self, client: &str, now: i64) -> Option<i64> {
        self.clients
            .get(client)
            .and_then(|c| c.locked_until)
            .filter(|until| *until > now)
    }

    /// Records a failure; returns the end of the lockout when this failure
    /// starts one.
    pub fn record_failure(&mut self, client: &str, now: i64) -> Option<i64> {
        if self.max_failures == 0 {
            return None;
        }
        if self.clients.len() > 100_000 {
            self.prune(now);
        }
        let c = self.clients.entry(client.to_owned()).or_default();
        c.recent.retain(|t| now - *t < self.window_ms);
        c.recent.push(now);
        if c.recent.len() > self.max_failures as usize {
            c.recent.remove(0);
        }
        if c.recent.len() >= self.max_failures as usize {
            let until = now + self.lockout_ms;
            c.locked_until = Some(until);
            c.recent.clear();
            return Some(until);
        }
        None
    }

    /// Forgets the failures of a client that authenticated successfully.
    pub fn record_success(&mut self, client: &str) {
        if let Some(c) = self.clients.get(client)
            && c.locked_until.is_none()
        {
            self.clients.remove(client);
        }
    }

    /// Clients locked out at `now`.
    pub fn locked_clients(&self, now: i64) -> usize {
        self.clients
            .values()
            .filter(|c| c.locked_until.is_some_and(|u| u > now))
            .count()
    }

    /// Drops entries with nothing left to remember (bounds memory under a
    /// spray of addresses).
    pub fn prune(&mut self, now: i64) {
        let window = self.window_ms;
        self.clients.retain(|_, c| {
            c.locked_until.is_some_and(|u| u > now) || c.recent.iter().any(|t| now - *t < window)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role, tenant: &str, key: &str) -> Principal {
        Principal {
            subject: key.into(),
            tenant: tenant.into(),
            role,
            scopes: resolve_scopes(role, None).unwrap(),
            key_id: Some(key.into()),
            kind: CredentialKind::ApiKey,
            rate_limit_per_minute: None,
        }
    }

    #[test]
    fn api_keys_have_the_documented_shape_and_check_rejects_others() {
        let k = format_api_key(&[7u8; 32]);
        assert!(k.starts_with("mg_"));
        assert_eq!(k.len(), API_KEY_LEN);
        check_api_key_format(&k).unwrap();
        assert!(
            check_api_key_format("mg_short")
                .unwrap_err()
                .contains("characters")
        );
        assert!(
            check_api_key_format(&k.replace("mg_", "xx_"))
                .unwrap_err()
                .contains("mg_")
        );
        let bad = format!("mg_{}", "!".repeat(43));
        assert!(
            check_api_key_format(&bad)
                .unwrap_err()
                .contains("base64url")
        );
        assert_eq!(display_prefix(&k).len(), 9);
    }

    #[test]
    fn hash_is_sha256_hex_and_stable() {
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn arguments_hash_ignores_key_order() {
        let obj = |v: serde_json::Value| match v {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("an object"),
        };
        let a = obj(serde_json::json!({"b": 1, "a": {"y": [1, 2], "x": "s"}}));
        let b = obj(serde_json::json!({"a": {"x": "s", "y": [1, 2]}, "b": 1}));
        assert_eq!(arguments_hash(Some(&a)), arguments_hash(Some(&b)));
        assert_ne!(
            arguments_hash(Some(&a)),
            arguments_hash(Some(&obj(serde_json::json!({"b": 2}))))
        );
        assert_ne!(arguments_hash(None), arguments_hash(Some(&a)));
    }

    #[test]
    fn roles_grant_their_scopes_and_nothing_else() {
        assert!(Role::Admin.may_hold(scope::KEYS_WRITE));
        assert!(Role::Admin.may_hold(scope::ALL_TENANTS));
        assert!(
            !resolve_scopes(Role::Admin, None)
                .unwrap()
                .contains(&scope::ALL_TENANTS.to_string())
        );
        assert!(!Role::Viewer.may_hold(scope::MCP_CALL));
        assert!(!Role::Agent.may_hold(scope::MCP_READ));
        let err = resolve_scopes(Role::Developer, Some(&["keys:write".into()])).unwrap_err();
        assert!(
            err.contains("developer") && err.contains("keys:write"),
            "{err}"
        );
        let err = resolve_scopes(Role::Admin, Some(&["root".into()])).unwrap_err();
        assert!(err.contains("unknown scope `root`"), "{err}");
        assert_eq!(
            resolve_scopes(
                Role::Developer,
                Some(&["mcp:read".into(), "mcp:read".into()])
            )
            .unwrap(),
            ["mcp:read"]
        );
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn deny_wins_and_names_the_rule() {
        let policy = ToolPolicy::new(&[
            ToolRuleConfig {
                effect: RuleEffect::Allow,
                tools: vec!["fx__*".into()],
                role: None,
                tenant: None,
                key: None,
            },
            ToolRuleConfig {
                effect: RuleEffect::Deny,
                tools: vec!["fx__slow".into(), "*admin*".into()],
                role: Some(Role::Developer),
                tenant: None,
                key: None,
            },
        ])
        .unwrap();
        let dev = principal(Role::Developer, "a", "key_1");
        let op = principal(Role::Operator, "a", "key_2");
        policy.check(&dev, "fx__echo").unwrap();
        let denied = policy.check(&dev, "fx__slow").unwrap_err();
        assert!(denied.rule.contains("auth.tool_rules[1]"), "{denied}");
        assert!(denied.to_string().contains("fx__slow"));
        policy.check(&op, "fx__slow").unwrap();
        let denied = policy.check(&op, "other__echo").unwrap_err();
        assert!(denied.rule.contains("allow rules"), "{denied}");
    }

    #[test]
    fn rules_select_by_tenant_and_key() {
        let policy = ToolPolicy::new(&[
            ToolRuleConfig {
                effect: RuleEffect::Deny,
                tools: vec!["*".into()],
                role: None,
                tenant: Some("b".into()),
                key: None,
            },
            ToolRuleConfig {
                effect: RuleEffect::Deny,
                tools: vec!["echo".into()],
                role: None,
                tenant: None,
                key: Some("key_9".into()),
            },
        ])
        .unwrap();
        policy
            .check(&principal(Role::Admin, "a", "key_1"), "echo")
            .unwrap();
        assert!(
            policy
                .check(&principal(Role::Admin, "b", "key_1"), "x")
                .is_err()
        );
        assert!(
            policy
                .check(&principal(Role::Admin, "a", "key_9"), "echo")
                .is_err()
        );
        assert!(
            ToolPolicy::new(&[ToolRuleConfig {
                effect: RuleEffect::Deny,
                tools: vec!["[".into()],
                role: None,
                tenant: None,
                key: None,
            }])
            .unwrap_err()
            .contains("auth.tool_rules[0]")
        );
    }

    #[test]
    fn lockout_triggers_after_max_failures_in_window_and_expires() {
        let mut l = Lockout::new(3, 60_000, 900_000);
        assert_eq!(l.record_failure("c", 0), None);
        assert_eq!(l.record_failure("c", 70_000), None); // first one fell out of the window
        assert_eq!(l.record_failure("c", 80_000), None);
        assert_eq!(l.locked_until("c", 80_000), None);
        assert_eq!(l.record_failure("c", 90_000), Some(990_000));
        assert_eq!(l.locked_until("c", 100_000), Some(990_000));
        assert_eq!(l.locked_until("other", 100_000), None);
        assert_eq!(l.locked_clients(100_000), 1);
        assert_eq!(l.locked_until("c", 990_000), None);
        l.prune(2_000_000);
        assert_eq!(l.locked_clients(2_000_000), 0);
    }

    #[test]
    fn success_clears_failures_but_not_a_lockout() {
        let mut l = Lockout::new(2, 60_000, 1_000);
        l.record_failure("c", 0);
        l.record_success("c");
        assert_eq!(l.record_failure("c", 1), None);
        assert!(l.record_failure("c", 2).is_some());
        l.record_success("c");
        assert!(l.locked_until("c", 3).is_some());
    }

    #[test]
    fn zero_max_failures_disables_lockout() {
        let mut l = Lockout::new(0, 60_000, 1_000);
        for t in 0..100 {
            assert_eq!(l.record_failure("c", t), None);
        }
    }
}
