//! SDK for writing agents of the meshgate mesh.
//!
//! An agent connects to the gateway's `/ws` endpoint, registers, and then
//! works on the tasks the gateway assigns to it, reporting progress and
//! results. `docs/agent-protocol.md` is the contract; this crate is one
//! implementation of it. The caller writes a [`TaskHandler`] and hands it to
//! [`Agent::run`]; the SDK owns everything else: the handshake, registration,
//! heartbeats, answering the gateway's requests, the local concurrency limit,
//! reconnecting with backoff while handlers keep running, delivering results
//! that could not be sent before a reconnect, and graceful shutdown.
//!
//! ```no_run
//! use std::sync::Arc;
//! use meshgate_agent::{Agent, AgentOptions, Capability, Task, TaskContext, TaskFailure, TaskHandler};
//! use serde_json::{Map, Value};
//! use tokio_util::sync::CancellationToken;
//!
//! struct Echo;
//!
//! impl TaskHandler for Echo {
//!     async fn run(&self, task: Task, ctx: TaskContext) -> Result<Map<String, Value>, TaskFailure> {
//!         ctx.progress(0.5, "half way").await.ok();
//!         let mut result = Map::new();
//!         result.insert("echo".into(), task.payload);
//!         Ok(result)
//!     }
//! }
//!
//! # async fn example() -> Result<(), meshgate_agent::AgentError> {
//! let mut options = AgentOptions::new("ws://127.0.0.1:8080/ws", "mg_…", "echo-1", "echo");
//! options.capabilities = vec![Capability::named("echo")];
//! let agent = Agent::new(options);
//! let mut events = agent.events();
//! tokio::spawn(async move {
//!     while let Ok(event) = events.recv().await {
//!         println!("{event:?}");
//!     }
//! });
//! agent.run(Arc::new(Echo), CancellationToken::new()).await
//! # }
//! ```
//!
//! Besides tasks, an agent can use the binary frame protocol
//! ([`AgentOptions::binary`]) and the tenant's shared CRDT documents
//! ([`Agent::state`], [`TaskContext::state`]), keeping local replicas of the
//! subscribed ones.
//!
//! Architecture invariant: the SDK holds one connection at a time, owned by
//! one task (the reader and dispatcher) plus one writer task fed by a bounded
//! channel; the writer alone encodes (text or binary frames, per the
//! connection's mode). Handlers never touch the socket; they talk to the
//! gateway through [`TaskContext`], which always uses whichever connection is
//! current.

#![warn(missing_docs)]

mod agent;
mod backoff;
mod driver;
mod error;
mod event;
mod options;
mod rpc;
mod state;
mod table;
mod task;
mod wire;

pub use agent::{Agent, AgentHandle};
pub use error::{AgentError, codes};
pub use event::AgentEvent;
pub use options::{AgentOptions, BinaryOptions, Capability, Negotiation};
pub use state::{ApplyOutcome, StateHandle, StateView};
pub use task::{Task, TaskContext, TaskFailure, TaskHandler, TaskResult};

/// The cancellation token type the SDK uses for shutdown and task
/// cancellation, re-exported so callers need not name `tokio-util`.
pub use tokio_util::sync::CancellationToken;
