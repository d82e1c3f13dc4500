//! Integration tests of the `meshgate` binary: real gateway processes in front
//! of real upstream MCP servers (the `meshgate-fixture` binary over HTTP and
//! stdio, and the official server-everything), driven by the rmcp client and
//! by plain HTTP; `meshgate stdio` is driven by the Python SDK's stdio client.

mod auth;
mod bad_input;
mod caching;
mod drain;
mod dual_stack;
mod everything;
mod failover;
mod federation;
mod frame_cli;
mod legacy_sse;
mod limits;
mod managed;
mod mcp_ws;
mod mesh;
mod mesh_binary;
mod mesh_durability;
mod operations;
mod origin;
mod resilience;
mod sessions;
mod stdio_bridge;
mod stdio_supervision;
mod streamable;
mod support;
mod tools_api;
mod tools_search;
mod upstream_kinds;
mod validation;
mod virtual_servers;
