//! The one typed configuration of the gateway.
//!
//! Sources, lowest precedence first: built-in defaults, the TOML file,
//! `MESHGATE_*` environment variables, command-line flags (applied by the
//! binary). [`Config::validate`] runs once at start-up and names the key, the
//! value and what is allowed for every problem it finds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::auth::{Role, ToolPolicy, ToolRuleConfig};
use crate::catalog::{PrefixMode, RESOURCE_SEPARATOR};

mod mesh;
mod tools;
mod traffic;
mod views;

pub use mesh::MeshConfig;
pub use tools::ToolsConfig;
pub use views::VirtualServerConfig;

pub use traffic::{
    BackpressureConfig, BreakerConfig, LimitConfig, PoolConfig, RateLimitsConfig, RetryConfig,
};

/// A configuration problem, naming the key and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// The TOML file does not parse or has unknown keys or wrong types.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A key has a value that is not allowed.
    #[error("config key `{key}` = {value}: {allowed}")]
    Invalid {
        /// Dotted key path, e.g. `upstreams[1].url`.
        key: String,
        /// The offending value as written.
        value: String,
        /// What is allowed instead.
        allowed: String,
    },
    /// Several problems at once.
    #[error("{} configuration problems:\n  - {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  - "))]
    Many(Vec<ConfigError>),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line (default; for log shippers).
    #[default]
    Json,
    /// Human-readable lines (for a terminal).
    Human,
}

impl LogFormat {
    /// Parses the configuration spelling.
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "json" => Some(LogFormat::Json),
            "human" => Some(LogFormat::Human),
            _ => None,
        }
    }
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `json` or `human`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `meshgate_server=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

/// Settings of the MCP endpoints served to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct McpConfig {
    /// Largest accepted request body, in bytes.
    pub max_request_body_bytes: usize,
    /// Accepted `Host` header values (DNS-rebinding protection); `["*"]` disables the check.
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed besides the gateway itself and pages on an
    /// allowed host (`scheme://host[:port]`, port `*` for any, `null`, or
    /// `*`); they also get CORS answers.
    pub allowed_origins: Vec<String>,
    /// How long browsers may cache a CORS preflight answer, in seconds.
    pub cors_max_age_secs: u64,
    /// How often `/mcp/ws` pings the client, in seconds.
    pub ws_ping_interval_secs: u64,
    /// Silence after which a `/mcp/ws` connection is closed (1008), in seconds.
    pub ws_pong_timeout_secs: u64,
    /// Interval of SSE keep-alive comments, in seconds (0 disables them).
    pub sse_keep_alive_secs: u64,
    /// Answer plain request/response exchanges as `application/json` instead of SSE.
    pub json_response: bool,
    /// Secret (at least 32 characters) from which the key sealing
    /// `Mcp-Session-Id`s is derived. Gateways that share it accept each
    /// other's sessions. Unset: `session_key_file`, else `session.key` in the
    /// data directory (created on first start).
    #[serde(serialize_with = "mask_secret")]
    pub session_key: Option<String>,
    /// File holding the session secret (used when `session_key` is unset).
    pub session_key_file: Option<PathBuf>,
    /// Earlier session secrets still accepted when opening session ids
    /// (key rotation); new ids are sealed with the current one only.
    #[serde(serialize_with = "mask_secrets")]
    pub session_previous_keys: Vec<String>,
    /// Lifetime of a Streamable HTTP session from its `initialize`, in seconds.
    pub session_ttl_secs: u64,
    /// Unacknowledged server-to-client messages kept per session for a
    /// client that resumes (`Last-Event-ID`), at most this many...
    pub resume_buffer_messages: usize,
    /// ...and this many bytes...
    pub resume_buffer_bytes: usize,
    /// ...and none older than this, in seconds.
    pub resume_buffer_age_secs: u64,
    /// How long progress notifications from upstream are held to put
    /// out-of-order arrivals back in order, in milliseconds (0: off).
    pub reorder_window_ms: u64,
}

fn mask_secret<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_some("<set>"),
        None => s.serialize_none(),
    }
}

fn mask_secrets<S: serde::Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for _ in v {
        seq.serialize_element("<set>")?;
    }
    seq.end()
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            max_request_body_bytes: 4 * 1024 * 1024,
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            allowed_origins: Vec::new(),
            cors_max_age_secs: 600,
            ws_ping_interval_secs: 15,
            ws_pong_timeout_secs: 45,
            sse_keep_alive_secs: 15,
            json_response: false,
            session_key: None,
            session_key_file: None,
            session_previous_keys: Vec::new(),
            session_ttl_secs: 86_400,
            resume_buffer_messages: 1_000,
            resume_buffer_bytes: 8 * 1024 * 1024,
            resume_buffer_age_secs: 300,
            reorder_window_ms: 20,
        }
    }
}

/// How upstream capabilities are named on the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespacingConfig {
    /// `always`, `conditional` or `never`.
    pub prefix_mode: PrefixMode,
    /// Between upstream name and tool or prompt name.
    pub separator: String,
}

impl Default for NamespacingConfig {
    fn default() -> Self {
        NamespacingConfig {
            prefix_mode: PrefixMode::Conditional,
            separator: "__".into(),
        }
    }
}

/// How the gateway reaches an upstream MCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamTransport {
    /// A child process speaking MCP on stdin/stdout.
    Stdio,
    /// An MCP server over Streamable HTTP.
    StreamableHttp,
    /// An MCP server over the 2024-11-05 HTTP+SSE transport (a `GET` event
    /// stream plus the `POST` endpoint it names).
    Sse,
}

/// One upstream MCP server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique name; the namespace prefix of its tools.
    pub name: String,
    /// `stdio`, `streamable_http` or `sse`.
    pub transport: UpstreamTransport,
    /// Program to run (stdio).
    #[serde(default)]
    pub command: Option<String>,
    /// Its arguments (stdio).
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment given to the child, besides the `inherit_env` variables;
    /// values may be secret references (`${env:NAME}`, `${file:/path}`) (stdio).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the child (stdio).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Endpoint URL (streamable_http; for sse the event stream's URL).
    #[serde(default)]
    pub url: Option<String>,
    /// Extra HTTP headers sent with every request (streamable_http, sse);
    /// values may be secret references (`${env:NAME}`, `${file:/path}`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Longest a single call may take, in seconds.
    #[serde(default = "default_call_timeout")]
    pub timeout_secs: u64,
    /// Longest connecting and initializing may take, in seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Whether the upstream is used at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The tenant that owns the upstream; only its principals see its tools.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Offered to every tenant (declared sharing), not only its owner.
    #[serde(default)]
    pub shared: bool,
    /// Longest a whole request may take, retries and backoff included, in
    /// seconds; defaults to the call's timeout.
    #[serde(default)]
    pub deadline_secs: Option<u64>,
    /// Per-tool call timeouts (the upstream's own tool names), in seconds;
    /// they replace `timeout_secs` for those tools.
    #[serde(default)]
    pub tool_timeouts: BTreeMap<String, u64>,
    /// Retries after transport failures.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Circuit breaker.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Call pool.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Results of these tools (the upstream's own names) are cached for
    /// this many seconds; tools whose annotations say they are not
    /// read-only are never cached.
    #[serde(default)]
    pub cache_ttl_secs: BTreeMap<String, u64>,
    /// Names of the gateway's environment variables the child gets (stdio);
    /// nothing else of the gateway's environment is ever passed.
    #[serde(default = "default_inherit_env")]
    pub inherit_env: Vec<String>,
    /// One child process shared by every session, or one per client session (stdio).
    #[serde(default)]
    pub process: ProcessMode,
    /// Sends the client's own `Authorization` header on the session's
    /// connection instead of a configured one (streamable_http, sse).
    #[serde(default)]
    pub forward_authorization: bool,
    /// Connects only to public addresses (streamable_http, sse): a host
    /// name is resolved on every new connection and its loopback, private
    /// and link-local addresses are skipped, so neither a name nor a DNS
    /// change can point the upstream into the gateway's own network. Forced
    /// on for upstreams a tenant creates through the API.
    #[serde(default)]
    pub public_addresses_only: bool,
}

/// Which child processes serve a stdio upstream's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessMode {
    /// One process (or `pool.processes` of them) for every client session.
    #[default]
    Shared,
    /// Each client session gets its own process; the shared one keeps
    /// serving the catalog, health checks and 2026-07-28 requests.
    PerSession,
}

fn default_inherit_env() -> Vec<String> {
    vec!["PATH".into(), "HOME".into()]
}

impl UpstreamConfig {
    /// An upstream with every setting at its default (the caller fills in
    /// the command or URL).
    pub fn new(name: &str, transport: UpstreamTransport) -> UpstreamConfig {
        let mut up: UpstreamConfig = serde_json::from_value(serde_json::json!({
            "name": "x",
            "transport": "stdio",
        }))
        .unwrap_or_else(|_| unreachable!("the defaults of every field parse"));
        up.name = name.to_owned();
        up.transport = transport;
        up
    }

    /// Checks this upstream's settings (everything but the uniqueness of its
    /// name), reporting problems under `prefix` (e.g. `upstreams[2]`).
    pub fn check(&self, prefix: &str, separator: &str, errors: &mut Vec<ConfigError>) {
        let sep = separator;
        let k = |field: &str| format!("{prefix}.{field}");
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !self.name.contains(sep)
            && !self.name.contains(RESOURCE_SEPARATOR);
        if !name_ok {
            errors.push(invalid(
                &k("name"),
                &self.name,
                &format!("must be 1 to 64 characters from A-Z a-z 0-9 - _ and must not contain the separator `{sep}`"),
            ));
        }
        match self.transport {
            UpstreamTransport::Stdio => {
                if self.command.as_deref().is_none_or(|c| c.trim().is_empty()) {
                    errors.push(invalid(
                        &k("command"),
                        "",
                        "a stdio upstream needs the program to run",
                    ));
                }
                if self.url.is_some() {
                    errors.push(invalid(
                        &k("url"),
                        self.url.as_deref().unwrap_or(""),
                        "only streamable_http and sse upstreams take a url",
                    ));
                }
            }
            UpstreamTransport::StreamableHttp | UpstreamTransport::Sse => match self.url.as_deref() {
                None => errors.push(invalid(
                    &k("url"),
                    "",
                    if self.transport == UpstreamTransport::Sse {
                        "an sse upstream needs the URL of its event stream (the `GET` endpoint, often ending in /sse)"
                    } else {
                        "a streamable_http upstream needs its endpoint URL"
                    },
                )),
                Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    errors.push(invalid(&k("url"), u, "must start with http:// or https://"))
                }
                Some(_) => {
                    if self.command.is_some() {
                        errors.push(invalid(
                            &k("command"),
                            self.command.as_deref().unwrap_or(""),
                            "only stdio upstreams take a command",
                        ));
                    }
                }
            },
        }
        if !valid_tenant(&self.tenant) {
            errors.push(invalid(&k("tenant"), &self.tenant, TENANT_RULE));
        }
        // Upper bounds keep deadline arithmetic in range and stop one
        // upstream from holding its connect slot for days.
        let bounded = |key: &str, v: u64, max: u64, errors: &mut Vec<ConfigError>| {
            if v == 0 || v > max {
                errors.push(invalid(
                    &k(key),
                    &v.to_string(),
                    &format!("must be 1 to {max} seconds"),
                ));
            }
        };
        bounded("timeout_secs", self.timeout_secs, MAX_CALL_SECS, errors);
        bounded(
            "connect_timeout_secs",
            self.connect_timeout_secs,
            MAX_CONNECT_SECS,
            errors,
        );
        if let Some(d) = self.deadline_secs {
            bounded("deadline_secs", d, MAX_CALL_SECS, errors);
        }
        for (tool, secs) in &self.tool_timeouts {
            bounded(
                &format!("tool_timeouts.{tool}"),
                *secs,
                MAX_CALL_SECS,
                errors,
            );
        }
        if self.forward_authorization && !self.cache_ttl_secs.is_empty() {
            errors.push(invalid(
                &k("cache_ttl_secs"),
                &format!("{} tools", self.cache_ttl_secs.len()),
                "cannot be combined with forward_authorization: the upstream answers per caller, and the cache is shared by every caller of a tenant",
            ));
        }
        for (tool, ttl) in &self.cache_ttl_secs {
            if tool.is_empty() {
                errors.push(invalid(
                    &k("cache_ttl_secs"),
                    "",
                    "keys are the upstream's own tool names and must not be empty",
                ));
            } else if *ttl == 0 {
                errors.push(invalid(
                    &k(&format!("cache_ttl_secs.{tool}")),
                    "0",
                    "must be at least 1 (leave the tool out to not cache it)",
                ));
            }
        }
        self.check_process_and_secrets(prefix, errors);
        traffic::validate_upstream(prefix, self, errors);
    }

    /// Checks `inherit_env`, `process`, `forward_authorization` and the
    /// secret references in `headers` and `env` (never echoing a value).
    fn check_process_and_secrets(&self, prefix: &str, errors: &mut Vec<ConfigError>) {
        let k = |field: &str| format!("{prefix}.{field}");
        let stdio = self.transport == UpstreamTransport::Stdio;
        for name in &self.inherit_env {
            if name.is_empty() || name.contains(['=', '\0']) {
                errors.push(invalid(
                    &k("inherit_env"),
                    name,
                    "entries are names of the gateway's environment variables (no `=`), e.g. [\"PATH\", \"HOME\"]",
                ));
            }
        }
        if self.process == ProcessMode::PerSession {
            if !stdio {
                errors.push(invalid(
                    &k("process"),
                    "per_session",
                    "only stdio upstreams take `process`; streamable_http and sse upstreams already get one connection per client session",
                ));
            } else if self.pool.processes > 1 {
                errors.push(invalid(
                    &k("process"),
                    "per_session",
                    &format!(
                        "cannot be combined with pool.processes = {}: each session has its own process, so there is no pool to spread calls over; remove pool.processes or use process = \"shared\"",
                        self.pool.processes
                    ),
                ));
            }
        }
        if self.public_addresses_only && stdio {
            errors.push(invalid(
                &k("public_addresses_only"),
                "true",
                "a stdio upstream makes no network connection; public_addresses_only is for streamable_http and sse upstreams",
            ));
        }
        if self.forward_authorization && stdio {
            errors.push(invalid(
                &k("forward_authorization"),
                "true",
                "a stdio upstream has no HTTP headers; forward_authorization is for streamable_http and sse upstreams",
            ));
        }
        for (field, map) in [("headers", &self.headers), ("env", &self.env)] {
            for (key, value) in map {
                if let Err(e) = crate::secrets::references(value) {
                    errors.push(ConfigError::Invalid {
                        key: k(&format!("{field}.{key}")),
                        // Never echo what may be a secret.
                        value: "(hidden)".into(),
                        allowed: e.to_string(),
                    });
                }
            }
        }
    }

    /// The timeout of one attempt of a call to `tool` (the upstream's name).
    pub fn call_timeout(&self, tool: Option<&str>) -> std::time::Duration {
        let secs = tool
            .and_then(|t| self.tool_timeouts.get(t))
            .copied()
            .unwrap_or(self.timeout_secs);
        std::time::Duration::from_secs(secs)
    }

    /// The deadline of a whole request to `tool`, retries included.
    pub fn call_deadline(&self, tool: Option<&str>) -> std::time::Duration {
        let timeout = self.call_timeout(tool);
        match self.deadline_secs {
            Some(d) => std::time::Duration::from_secs(d),
            None => timeout,
        }
    }
}

/// Longest `timeout_secs`, `deadline_secs` and `tool_timeouts` (one day).
pub const MAX_CALL_SECS: u64 = 86_400;
/// Longest `connect_timeout_secs` (five minutes).
pub const MAX_CONNECT_SECS: u64 = 300;

/// The tenant of objects that name none.
pub const DEFAULT_TENANT: &str = "default";

fn default_tenant() -> String {
    DEFAULT_TENANT.into()
}

fn default_call_timeout() -> u64 {
    60
}
fn default_connect_timeout() -> u64 {
    15
}
fn default_true() -> bool {
    true
}

/// Failed-authentication lockout settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LockoutConfig {
    /// Failures from one client address within `window_secs` that lock it out (0 disables).
    pub max_failures: u32,
    /// The window failures are counted in, in seconds.
    pub window_secs: u64,
    /// How long a locked-out client is refused, in seconds.
    pub lockout_secs: u64,
    /// Addresses of reverse proxies in front of the gateway. For requests
    /// from them, the client is the last address in `X-Forwarded-For` that is
    /// not itself a trusted proxy; otherwise it is the peer address.
    pub trusted_proxies: Vec<String>,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            max_failures: 5,
            window_secs: 60,
            lockout_secs: 900,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Audit log retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Entries older than this many days are deleted (0 keeps them forever).
    pub retention_days: u64,
    /// At most this many entries are kept; the oldest go first (0 = no limit).
    pub max_entries: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            retention_days: 90,
            max_entries: 1_000_000,
        }
    }
}

/// An external OAuth 2.1 authorization server whose access tokens the gateway accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthIssuerConfig {
    /// The `iss` value tokens must carry (also listed as authorization server).
    pub issuer: String,
    /// Where its JSON Web Key Set is fetched from (refreshed on unknown `kid`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Or a file holding the JSON Web Key Set.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Accepted `aud` values; tokens for anything else are refused.
    pub audience: Vec<String>,
    /// Tenant of principals from this issuer.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Role of principals from this issuer; token `scope` values narrow it.
    #[serde(default = "default_oauth_role")]
    pub role: Role,
}

fn default_oauth_role() -> Role {
    Role::Developer
}

/// MCP authorization (OAuth 2.1 resource server) settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct OAuthConfig {
    /// This gateway's canonical resource URI (RFC 9728 `resource`), e.g.
    /// `https://mcp.example.com/mcp`. Default: `http://<Host header>/mcp`;
    /// set it when clients reach the gateway over TLS or through a proxy.
    pub resource: Option<String>,
    /// Trusted issuers.
    pub issuers: Vec<OAuthIssuerConfig>,
}

/// Authentication and authorization settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Require credentials on every endpoint but `/health`, `/ready` and
    /// `/.well-known/*`. Turn off only for local development.
    pub enabled: bool,
    /// Lifetime of access tokens from `/api/v1/auth/token`, in seconds.
    pub access_token_ttl_secs: u64,
    /// Lifetime of refresh tokens, in seconds.
    pub refresh_token_ttl_secs: u64,
    /// Tolerated clock difference when checking token times, in seconds.
    pub clock_skew_secs: u64,
    /// Failed-authentication lockout.
    pub lockout: LockoutConfig,
    /// Audit log retention.
    pub audit: AuditConfig,
    /// Per-tool allow and deny rules.
    pub tool_rules: Vec<ToolRuleConfig>,
    /// External OAuth issuers (MCP authorization).
    pub oauth: OAuthConfig,
    /// Whether upstreams created through the API by a tenant (a caller
    /// without `tenants:*`) may point at loopback, private, link-local or
    /// unspecified addresses (off: the gateway is not a way into the
    /// networks it can reach).
    pub tenant_upstreams_private_addresses: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: true,
            access_token_ttl_secs: 900,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            clock_skew_secs: 60,
            lockout: LockoutConfig::default(),
            audit: AuditConfig::default(),
            tool_rules: Vec::new(),
            oauth: OAuthConfig::default(),
            tenant_upstreams_private_addresses: false,
        }
    }
}

/// The gateway's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Directory for the SQLite database and other state.
    pub data_dir: PathBuf,
    /// Logging.
    pub log: LogConfig,
    /// MCP endpoint settings.
    pub mcp: McpConfig,
    /// Naming of upstream capabilities.
    pub namespacing: NamespacingConfig,
    /// Upstream MCP servers.
    pub upstreams: Vec<UpstreamConfig>,
    /// Seconds to let in-flight requests finish on shutdown.
    pub shutdown_grace_secs: u64,
    /// Authentication, authorization and audit.
    pub auth: AuthConfig,
    /// Rate limits.
    pub rate_limits: RateLimitsConfig,
    /// Per-client outbound queue limits.
    pub backpressure: BackpressureConfig,
    /// The agent mesh.
    pub mesh: MeshConfig,
    /// Validation, caching and discovery of federated tools.
    pub tools: ToolsConfig,
    /// Named views over the upstreams, at `/servers/{name}/mcp`.
    pub virtual_servers: Vec<VirtualServerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from(".meshgate"),
            log: LogConfig::default(),
            mcp: McpConfig::default(),
            namespacing: NamespacingConfig::default(),
            upstreams: Vec::new(),
            shutdown_grace_secs: 10,
            auth: AuthConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            backpressure: BackpressureConfig::default(),
            mesh: MeshConfig::default(),
            tools: ToolsConfig::default(),
            virtual_servers: Vec::new(),
        }
    }
}

/// Environment variables read by [`Config::apply_env`], with their keys.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("MESHGATE_LISTEN", "listen"),
    ("MESHGATE_DATA_DIR", "data_dir"),
    ("MESHGATE_LOG_FORMAT", "log.format"),
    ("MESHGATE_LOG_LEVEL", "log.level"),
    (
        "MESHGATE_MCP_MAX_REQUEST_BODY_BYTES",
        "mcp.max_request_body_bytes",
    ),
    ("MESHGATE_MCP_ALLOWED_HOSTS", "mcp.allowed_hosts"),
    ("MESHGATE_MCP_ALLOWED_ORIGINS", "mcp.allowed_origins"),
    ("MESHGATE_MCP_JSON_RESPONSE", "mcp.json_response"),
    ("MESHGATE_MCP_SESSION_KEY", "mcp.session_key"),
    (
        "MESHGATE_NAMESPACING_PREFIX_MODE",
        "namespacing.prefix_mode",
    ),
    ("MESHGATE_NAMESPACING_SEPARATOR", "namespacing.separator"),
    ("MESHGATE_SHUTDOWN_GRACE_SECS", "shutdown_grace_secs"),
    ("MESHGATE_AUTH_ENABLED", "auth.enabled"),
];

/// Variables the binary itself reads (not configuration keys).
/// (`MESHGATE_KEY` is the client-side key of `meshgate stdio` and of the
/// docs' examples: a shell that exports it can still start the gateway.)
pub const ENV_VARS_CLI: &[&str] = &["MESHGATE_CONFIG", "MESHGATE_KEY"];

fn invalid(key: &str, value: &str, allowed: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: format!("{value:?}"),
        allowed: allowed.into(),
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(key, value, "must be a non-negative whole number"))
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(invalid(key, value, "must be true or false")),
    }
}

impl Config {
    /// Parses a TOML document; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::File {
            path: path.into(),
            message: e.to_string().trim_end().replace('\n', "\n    "),
        })
    }

    /// Applies `MESHGATE_*` variables. An unknown `MESHGATE_*` name is an
    /// error, so a typo does not silently leave a default in place.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        for (name, value) in vars {
            if !name.starts_with("MESHGATE_") || ENV_VARS_CLI.contains(&name.as_str()) {
                continue;
            }
            if let Err(e) = self.apply_one_env(&name, &value) {
                errors.push(e);
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }

    fn apply_one_env(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        let Some((_, key)) = ENV_VARS.iter().find(|(n, _)| *n == name) else {
            let known: Vec<&str> = ENV_VARS
                .iter()
                .map(|(n, _)| *n)
                .chain(ENV_VARS_CLI.iter().copied())
                .collect();
            return Err(invalid(
                name,
                value,
                &format!(
                    "unknown environment variable; known are {}",
                    known.join(", ")
                ),
            ));
        };
        match *key {
            "listen" => self.listen = value.to_owned(),
            "data_dir" => self.data_dir = PathBuf::from(value),
            "log.format" => {
                self.log.format = LogFormat::parse(value)
                    .ok_or_else(|| invalid(key, value, "allowed: json, human"))?
            }
            "log.level" => self.log.level = value.to_owned(),
            "mcp.max_request_body_bytes" => {
                self.mcp.max_request_body_bytes = parse_num(key, value)?
            }
            "mcp.allowed_hosts" => {
                self.mcp.allowed_hosts = value
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "mcp.allowed_origins" => {
                self.mcp.allowed_origins = value
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "mcp.json_response" => self.mcp.json_response = parse_bool(key, value)?,
            "mcp.session_key" => self.mcp.session_key = Some(value.to_owned()),
            "namespacing.prefix_mode" => {
                self.namespacing.prefix_mode = PrefixMode::parse(value).ok_or_else(|| {
                    invalid(key, value, &format!("allowed: {}", PrefixMode::ALLOWED))
                })?
            }
            "namespacing.separator" => self.namespacing.separator = value.to_owned(),
            "shutdown_grace_secs" => self.shutdown_grace_secs = parse_num(key, value)?,
            "auth.enabled" => self.auth.enabled = parse_bool(key, value)?,
            _ => return Err(invalid(name, value, "internal: variable without a key")),
        }
        Ok(())
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| {
            invalid(
                "listen",
                &self.listen,
                "must be IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080",
            )
        })
    }

    /// Checks every setting and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if let Err(e) = self.listen_addr() {
            errors.push(e);
        }
        if self.data_dir.as_os_str().is_empty() {
            errors.push(invalid("data_dir", "", "must be a directory path"));
        }
        if self.mcp.max_request_body_bytes < 1024 {
            errors.push(invalid(
                "mcp.max_request_body_bytes",
                &self.mcp.max_request_body_bytes.to_string(),
                "must be at least 1024",
            ));
        }
        for (key, secret) in self
            .mcp
            .session_key
            .iter()
            .map(|k| ("mcp.session_key", k))
            .chain(
                self.mcp
                    .session_previous_keys
                    .iter()
                    .map(|k| ("mcp.session_previous_keys", k)),
            )
        {
            if secret.trim().chars().count() < 32 {
                errors.push(invalid(
                    key,
                    "<hidden>",
                    "must be at least 32 characters (for example the output of `openssl rand -base64 32`)",
                ));
            }
        }
        if self.mcp.resume_buffer_messages == 0 || self.mcp.resume_buffer_bytes < 1024 {
            errors.push(invalid(
                "mcp.resume_buffer_messages",
                &format!(
                    "{} messages, {} bytes",
                    self.mcp.resume_buffer_messages, self.mcp.resume_buffer_bytes
                ),
                "keep at least 1 message and 1024 bytes (mcp.resume_buffer_bytes) per session",
            ));
        }
        if self.mcp.session_ttl_secs == 0 {
            errors.push(invalid(
                "mcp.session_ttl_secs",
                "0",
                "must be at least 1 (seconds a session lives after its initialize)",
            ));
        }
        if self.mcp.allowed_hosts.is_empty() {
            errors.push(invalid(
                "mcp.allowed_hosts",
                "[]",
                "list at least one host, or [\"*\"] to accept any Host",
            ));
        }
        if let Err(e) =
            crate::origin::OriginPolicy::new(&self.mcp.allowed_hosts, &self.mcp.allowed_origins)
        {
            errors.push(invalid(
                "mcp.allowed_origins",
                &self.mcp.allowed_origins.join(","),
                &e,
            ));
        }
        let sep = &self.namespacing.separator;
        if sep.is_empty() || sep.len() > 8 || !sep.chars().all(|c| matches!(c, '_' | '-' | '.')) {
            errors.push(invalid(
                "namespacing.separator",
                sep,
                "must be 1 to 8 of the characters `_`, `-`, `.` (so prefixed names stay valid MCP tool names)",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, up) in self.upstreams.iter().enumerate() {
            let prefix = format!("upstreams[{i}]");
            up.check(&prefix, sep, &mut errors);
            if !up.name.is_empty() && !seen.insert(up.name.as_str()) {
                errors.push(invalid(
                    &format!("{prefix}.name"),
                    &up.name,
                    "is used by another upstream; names must be unique",
                ));
            }
        }
        self.rate_limits.validate(&mut errors);
        self.backpressure.validate(&mut errors);
        self.mesh.validate(&mut errors);
        self.tools.validate(&mut errors);
        views::validate(&self.virtual_servers, &mut errors);
        self.validate_auth(&mut errors);
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }

    fn validate_auth(&self, errors: &mut Vec<ConfigError>) {
        let a = &self.auth;
        for (key, v) in [
            ("auth.access_token_ttl_secs", a.access_token_ttl_secs),
            ("auth.refresh_token_ttl_secs", a.refresh_token_ttl_secs),
            ("auth.lockout.window_secs", a.lockout.window_secs),
            ("auth.lockout.lockout_secs", a.lockout.lockout_secs),
        ] {
            if v == 0 {
                errors.push(invalid(key, "0", "must be at least 1"));
            }
        }
        if a.refresh_token_ttl_secs < a.access_token_ttl_secs {
            errors.push(invalid(
                "auth.refresh_token_ttl_secs",
                &a.refresh_token_ttl_secs.to_string(),
                "must be at least auth.access_token_ttl_secs",
            ));
        }
        if a.clock_skew_secs > 600 {
            errors.push(invalid(
                "auth.clock_skew_secs",
                &a.clock_skew_secs.to_string(),
                "must be at most 600 (ten minutes); fix the clocks instead",
            ));
        }
        for (i, p) in a.lockout.trusted_proxies.iter().enumerate() {
            if p.parse::<std::net::IpAddr>().is_err() {
                errors.push(invalid(
                    &format!("auth.lockout.trusted_proxies[{i}]"),
                    p,
                    "must be an IP address such as 10.0.0.5 or ::1",
                ));
            }
        }
        if let Err(e) = ToolPolicy::new(&a.tool_rules) {
            errors.push(invalid("auth.tool_rules", "", &e));
        }
        for (i, r) in a.tool_rules.iter().enumerate() {
            if let Some(t) = &r.tenant
                && !valid_tenant(t)
            {
                errors.push(invalid(
                    &format!("auth.tool_rules[{i}].tenant"),
                    t,
                    TENANT_RULE,
                ));
            }
            if let Some(k) = &r.key
                && !(k.starts_with("key_")
                    && k.len() == 20
                    && k[4..].bytes().all(|b| b.is_ascii_hexdigit()))
            {
                errors.push(invalid(
                    &format!("auth.tool_rules[{i}].key"),
                    k,
                    "must be a key id such as key_0123456789abcdef (see `meshgate keys list`), not the key itself",
                ));
            }
            if r.tools.is_empty() {
                errors.push(invalid(
                    &format!("auth.tool_rules[{i}].tools"),
                    "[]",
                    "name at least one tool glob",
                ));
            }
        }
        if let Some(r) = &a.oauth.resource
            && !(r.starts_with("http://") || r.starts_with("https://"))
        {
            errors.push(invalid("auth.oauth.resource", r, "must be an http(s) URL"));
        }
        for (i, iss) in a.oauth.issuers.iter().enumerate() {
            let k = |f: &str| format!("auth.oauth.issuers[{i}].{f}");
            if iss.issuer.trim().is_empty() {
                errors.push(invalid(
                    &k("issuer"),
                    "",
                    "must be the issuer URL tokens carry in `iss`",
                ));
            }
            match (&iss.jwks_url, &iss.jwks_file) {
                (None, None) => errors.push(invalid(
                    &k("jwks_url"),
                    "",
                    "set jwks_url (fetched) or jwks_file (read at start-up) to verify signatures",
                )),
                (Some(_), Some(_)) => errors.push(invalid(
                    &k("jwks_file"),
                    "",
                    "set only one of jwks_url and jwks_file",
                )),
                (Some(u), None) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    errors.push(invalid(
                        &k("jwks_url"),
                        u,
                        "must start with http:// or https://",
                    ))
                }
                _ => {}
            }
            if iss.audience.is_empty() {
                errors.push(invalid(
                    &k("audience"),
                    "[]",
                    "list the audience values this gateway accepts (usually its resource URL)",
                ));
            }
            if !valid_tenant(&iss.tenant) {
                errors.push(invalid(&k("tenant"), &iss.tenant, TENANT_RULE));
            }
        }
    }
}

/// What a tenant name may look like.
pub const TENANT_RULE: &str = "must be 1 to 64 characters from a-z A-Z 0-9 - _ .";

/// Whether `t` is a valid tenant name.
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_listen_on_loopback_8080() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.listen_addr().unwrap().to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from(".meshgate"));
    }

    #[test]
    fn example_file_parses_and_validates() {
        let text = include_str!("../../../meshgate.example.toml");
        let c = Config::from_toml(text, "meshgate.example.toml").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn unknown_key_is_named_with_its_location() {
        let err = Config::from_toml("lissen = \"x\"\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lissen"), "{err}");
        assert!(err.contains("m.toml"), "{err}");
    }

    #[test]
    fn bad_enum_value_lists_the_allowed_ones() {
        let err = Config::from_toml("[namespacing]\nprefix_mode = \"sometimes\"\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sometimes") && err.contains("always"), "{err}");
    }

    #[test]
    fn validation_names_key_value_and_rule() {
        let c = Config::from_toml(
            "listen = \"nope\"\n[[upstreams]]\nname = \"a b\"\ntransport = \"streamable_http\"\nurl = \"ftp://x\"\n",
            "m.toml",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`listen` = \"nope\""), "{err}");
        assert!(err.contains("upstreams[0].name"), "{err}");
        assert!(
            err.contains("upstreams[0].url") && err.contains("http://"),
            "{err}"
        );
    }

    #[test]
    fn sse_upstreams_need_an_http_url_and_take_no_command() {
        let ok = Config::from_toml(
            "[[upstreams]]\nname = \"old\"\ntransport = \"sse\"\nurl = \"http://127.0.0.1:9/sse\"\n",
            "s.toml",
        )
        .expect("parses");
        assert_eq!(ok.upstreams[0].transport, UpstreamTransport::Sse);
        ok.validate()
            .expect("an sse upstream with an http url is valid");
        for (body, key, words) in [
            ("", "upstreams[0].url", "event stream"),
            ("url = \"ws://x/sse\"\n", "upstreams[0].url", "http://"),
            (
                "url = \"http://x/sse\"\ncommand = \"node\"\n",
                "upstreams[0].command",
                "only stdio",
            ),
        ] {
            let c = Config::from_toml(
                &format!("[[upstreams]]\nname = \"old\"\ntransport = \"sse\"\n{body}"),
                "s.toml",
            )
            .expect("parses");
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(words), "{body}: {err}");
        }
        let stdio = Config::from_toml(
            "[[upstreams]]\nname = \"p\"\ntransport = \"stdio\"\ncommand = \"x\"\nurl = \"http://x\"\n",
            "s.toml",
        )
        .expect("parses");
        let err = stdio.validate().unwrap_err().to_string();
        assert!(err.contains("streamable_http and sse"), "{err}");
    }

    #[test]
    fn duplicate_upstream_names_are_refused() {
        let one = "[[upstreams]]\nname = \"x\"\ntransport = \"stdio\"\ncommand = \"true\"\n";
        let c = Config::from_toml(&format!("{one}{one}"), "t.toml").expect("parses");
        assert!(c.validate().unwrap_err().to_string().contains("unique"));
    }

    #[test]
    fn traffic_settings_are_validated_with_their_keys() {
        let c = Config::from_toml(
            "[rate_limits.per_key]\nlimit = 10\nperiod_secs = 0\n\
             [rate_limits.tools.slow]\nlimit = 5\nburst = 0\n\
             [backpressure]\nbundle_at = 600\n\
             [[upstreams]]\nname = \"a\"\ntransport = \"streamable_http\"\nurl = \"http://x/mcp\"\n\
             retry = { max_attempts = 0, initial_backoff_ms = 5000 }\n\
             breaker = { open_timeout_ms = 0 }\npool = { size = 0, processes = 2 }\n\
             tool_timeouts = { hang = 0 }\n",
            "t.toml",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        for key in [
            "rate_limits.per_key.period_secs",
            "rate_limits.tools.slow.burst",
            "`backpressure`",
            "upstreams[0].retry.max_attempts",
            "upstreams[0].retry.initial_backoff_ms",
            "upstreams[0].breaker.open_timeout_ms",
            "upstreams[0].pool.size",
            "upstreams[0].pool.processes",
            "upstreams[0].tool_timeouts.hang",
        ] {
            assert!(err.contains(key), "{key} missing from: {err}");
        }
    }

    #[test]
    fn call_timeout_and_deadline_follow_tool_overrides() {
        let c = Config::from_toml(
            "[[upstreams]]\nname = \"a\"\ntransport = \"stdio\"\ncommand = \"x\"\ntimeout_secs = 7\n\
             tool_timeouts = { long = 90 }\n",
            "t.toml",
        )
        .unwrap();
        let up = &c.upstreams[0];
        assert_eq!(up.call_timeout(Some("long")).as_secs(), 90);
        assert_eq!(up.call_timeout(Some("other")).as_secs(), 7);
        assert_eq!(up.call_deadline(Some("long")).as_secs(), 90);
        let mut up = up.clone();
        up.deadline_secs = Some(3);
        assert_eq!(up.call_deadline(Some("long")).as_secs(), 3);
    }

    #[test]
    fn auth_settings_are_validated_with_their_keys() {
        let c = Config::from_toml(
            "[auth]\naccess_token_ttl_secs = 0\n[auth.lockout]\ntrusted_proxies = [\"proxy.local\"]\n\
             [[auth.tool_rules]]\neffect = \"deny\"\ntools = [\"x\"]\nkey = \"mg_secret\"\ntenant = \"a b\"\n\
             [[auth.oauth.issuers]]\nissuer = \"https://idp\"\naudience = []\n",
            "m.toml",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        for needle in [
            "auth.access_token_ttl_secs",
            "auth.lockout.trusted_proxies[0]",
            "auth.tool_rules[0].key",
            "auth.tool_rules[0].tenant",
            "auth.oauth.issuers[0].jwks_url",
            "auth.oauth.issuers[0].audience",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
    }

    #[test]
    fn env_overrides_file_and_rejects_unknown_names() {
        let mut c = Config::default();
        c.apply_env([
            ("MESHGATE_LISTEN".to_string(), "127.0.0.1:9999".to_string()),
            ("MESHGATE_LOG_FORMAT".to_string(), "human".to_string()),
            ("MESHGATE_CONFIG".to_string(), "ignored.toml".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ])
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9999");
        assert_eq!(c.log.format, LogFormat::Human);
        let err = c
            .apply_env([("MESHGATE_LISTN".to_string(), "x".to_string())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MESHGATE_LISTN") && err.contains("MESHGATE_LISTEN"),
            "{err}"
        );
        let err = c
            .apply_env([(
                "MESHGATE_MCP_MAX_REQUEST_BODY_BYTES".to_string(),
                "lots".to_string(),
            )])
            .unwrap_err()
            .to_string();
        assert!(err.contains("whole number"), "{err}");
    }

    #[test]
    fn cache_ttls_must_be_positive_and_name_a_tool() {
        let c = Config::from_toml(
            "[[upstreams]]\nname = \"a\"\ntransport = \"stdio\"\ncommand = \"x\"\n\
             cache_ttl_secs = { lookup = 0, \"\" = 5, ok = 30 }\n",
            "t.toml",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("upstreams[0].cache_ttl_secs.lookup"), "{err}");
        assert!(err.contains("must not be empty"), "{err}");
        assert!(!err.contains("cache_ttl_secs.ok"), "{err}");
    }
}

#[cfg(test)]
mod process_and_secrets_tests {
    use super::*;

    fn problems(up: &UpstreamConfig) -> Vec<String> {
        let mut errors = Vec::new();
        up.check("upstreams[0]", "__", &mut errors);
        errors.iter().map(ToString::to_string).collect()
    }

    fn stdio() -> UpstreamConfig {
        let mut up = UpstreamConfig::new("s", UpstreamTransport::Stdio);
        up.command = Some("server".into());
        up
    }

    fn http() -> UpstreamConfig {
        let mut up = UpstreamConfig::new("h", UpstreamTransport::StreamableHttp);
        up.url = Some("http://127.0.0.1:1/mcp".into());
        up
    }

    #[test]
    fn defaults_pass_path_and_home_share_one_process_and_forward_nothing() {
        let up = stdio();
        assert_eq!(up.inherit_env, ["PATH", "HOME"]);
        assert_eq!(up.process, ProcessMode::Shared);
        assert!(!up.forward_authorization);
        assert!(problems(&up).is_empty(), "{:?}", problems(&up));
        let parsed: UpstreamConfig = toml::from_str(
            "name = \"s\"\ntransport = \"stdio\"\ncommand = \"x\"\ninherit_env = []\nprocess = \"per_session\"\n",
        )
        .expect("parses");
        assert!(parsed.inherit_env.is_empty());
        assert_eq!(parsed.process, ProcessMode::PerSession);
    }

    #[test]
    fn per_session_with_several_pooled_processes_is_refused() {
        let mut up = stdio();
        up.process = ProcessMode::PerSession;
        assert!(problems(&up).is_empty(), "{:?}", problems(&up));
        up.pool.processes = 3;
        let p = problems(&up);
        assert!(
            p.iter()
                .any(|e| e.contains("upstreams[0].process") && e.contains("pool.processes = 3")),
            "{p:?}"
        );
        let mut h = http();
        h.process = ProcessMode::PerSession;
        assert!(
            problems(&h)
                .iter()
                .any(|e| e.contains("only stdio upstreams take `process`")),
            "{:?}",
            problems(&h)
        );
    }

    #[test]
    fn forward_authorization_is_for_http_upstreams_only() {
        let mut h = http();
        h.forward_authorization = true;
        assert!(problems(&h).is_empty(), "{:?}", problems(&h));
        let mut s = stdio();
        s.forward_authorization = true;
        assert!(
            problems(&s)
                .iter()
                .any(|e| e.contains("upstreams[0].forward_authorization")),
            "{:?}",
            problems(&s)
        );
    }

    #[test]
    fn malformed_secret_references_are_named_without_their_value() {
        let mut h = http();
        h.headers
            .insert("Authorization".into(), "Bearer ${env:TOKEN".into());
        h.headers
            .insert("X-Ok".into(), "${file:/run/secrets/x} $${literal}".into());
        let p = problems(&h);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("upstreams[0].headers.Authorization"), "{p:?}");
        assert!(p[0].contains("no closing"), "{p:?}");
        assert!(!p[0].contains("Bearer"), "the value is not echoed: {p:?}");
        let mut s = stdio();
        s.env.insert("KEY".into(), "${file:relative}".into());
        s.inherit_env = vec!["A=B".into()];
        let p = problems(&s);
        assert!(
            p.iter()
                .any(|e| e.contains("upstreams[0].env.KEY") && e.contains("absolute path")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|e| e.contains("upstreams[0].inherit_env")),
            "{p:?}"
        );
    }
}
