//! The agent mesh without IO: agents and their capabilities, the task model,
//! and routing. The server's dispatcher holds the live state and calls these
//! pure functions; time is passed in.

pub mod agent;
pub mod routing;
pub mod task;

pub use agent::{Capability, FieldError, Registration, check_agent_id, satisfies};
pub use routing::{
    AgentStats, Candidate, Need, Strategy, choose, match_confidence, waiting_reason,
};
pub use task::{Submission, Task, TaskEvent, TaskState, normalize_progress, retry_delay_ms};
