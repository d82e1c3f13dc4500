//! The meshgate server: the axum application that serves MCP to clients
//! (Streamable HTTP at `/mcp`, legacy HTTP+SSE at `/sse` + `/messages`),
//! federates upstream MCP servers, and exposes health, readiness and metrics.
//!
//! Architecture invariant: only this crate knows HTTP status codes and MCP
//! transports; domain rules live in `meshgate-core`, persistence behind
//! `meshgate-store`.

pub mod admin;
pub mod auth;
pub mod cache;
pub mod clients;
pub mod egress;
pub mod gateway;
pub mod handler;
pub mod managed;
pub mod reload;
pub mod tools_api;
pub mod upstream;
pub mod upstream_set;
pub mod upstream_sse;
pub mod upstreams_api;
pub mod views;

pub use gateway::Gateway;
pub mod http;
pub mod legacy;
pub mod limits;
pub mod mcp_ws;
pub mod mesh;
pub mod origin;
pub mod outbox;
pub mod resilience;
pub mod resume;
pub mod serve;
pub mod session_token;
pub mod sessions;
pub mod tools_search;
pub mod validate;
