//! The gateway's domain without IO: the typed configuration with its
//! validation, and the catalog that namespaces upstream tools, prompts and
//! resources behind one endpoint.
//!
//! Architecture invariant: no tokio, no HTTP, no filesystem access here.
//! Callers hand in strings and get plain values back.

pub mod auth;
pub mod backoff;
pub mod breaker;
pub mod catalog;
pub mod config;
pub mod crdt;
pub mod import;
pub mod mesh;
pub mod origin;
pub mod ratelimit;
pub mod secrets;

pub use auth::{CredentialKind, Principal, Role};
pub use backoff::RetryPolicy;
pub use breaker::{Breaker, BreakerPolicy, BreakerState, Rejected};
pub use catalog::{Catalog, CatalogIssue, Namer, PrefixMode, Route};
pub use config::{
    AuthConfig, Config, ConfigError, DEFAULT_TENANT, LogFormat, OAuthIssuerConfig, ToolsConfig,
    UpstreamConfig, UpstreamTransport,
};
pub use ratelimit::{Decision, Gcra, Quota};
