//! Wire formats shared by every part of meshgate: MCP protocol revisions and
//! their negotiation, the MCP naming rules, the JSON-RPC 2.0 envelope check
//! that runs before a message reaches the MCP machinery, the binary frame
//! codec ("MCPW") of agent connections in binary mode, and the incremental
//! parser of Server-Sent Events streams.
//!
//! Architecture invariant: this crate does no IO and knows nothing about tokio
//! or HTTP. It is pure functions over bytes and strings.

pub mod envelope;
pub mod frame;
pub mod names;
pub mod sse;
pub mod versions;

pub use envelope::{EnvelopeError, JsonRpcCode, check_envelope};
pub use names::{ToolNameError, validate_tool_name};
pub use versions::{ProtocolRevision, negotiate_revision};
