//! An example agent whose behaviour is driven by each task's payload, so one
//! binary can exercise the whole protocol in tests and demos.
//!
//! Payload fields: `sleep_ms` (work that long), `progress_steps` (report
//! progress that many times while sleeping), `fail` (fail with this message),
//! `retryable` (whether that failure is retryable), `reject` (reject the
//! task), `result_bytes` (add a `blob` of that many `x` to the result),
//! `panic` (panic in the handler), `echo: true` (report the payload's size
//! and SHA-256 instead of echoing it), `state: {doc, ops, repeat}` (apply
//! `ops` to the shared document `repeat` times), `state_report: {doc}`
//! (report the gateway's and the local replica's hash and value),
//! `protocol_info: true` (add the gateway's `protocol.get_info`). Events go
//! to stdout as JSON lines; logs go to stderr.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use meshgate_agent::{
    Agent, AgentError, AgentEvent, AgentOptions, BinaryOptions, CancellationToken, Capability,
    Negotiation, Task, TaskContext, TaskFailure, TaskHandler, TaskResult, codes,
};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tracing_subscriber::EnvFilter;

/// How long `state_report` waits for the replica to catch up with the
/// gateway before it syncs.
const REPORT_CATCH_UP: Duration = Duration::from_secs(2);

/// Command-line options.
#[derive(Debug, Parser)]
#[command(
    name = "meshgate-agent",
    version,
    about = "Example meshgate agent driven by task payloads"
)]
struct Cli {
    /// The gateway's agent endpoint.
    #[arg(
        long,
        env = "MESHGATE_AGENT_URL",
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    url: String,
    /// The API key (role `agent` or scope `agent:connect`).
    #[arg(
        long,
        env = "MESHGATE_AGENT_KEY",
        default_value = "",
        hide_env_values = true
    )]
    key: String,
    /// The agent's id.
    #[arg(long)]
    id: String,
    /// The agent's type.
    #[arg(long = "type", default_value = "generic")]
    agent_type: String,
    /// A human-readable name (default: the id).
    #[arg(long)]
    name: Option<String>,
    /// A capability, `name` or `name=0.8` (confidence); repeatable. Default:
    /// the agent's type.
    #[arg(long = "capability", value_parser = parse_capability)]
    capabilities: Vec<Capability>,
    /// How many tasks may run at once.
    #[arg(long, default_value_t = 4)]
    max_concurrent: u32,
    /// The configuration registered with the agent, a JSON object.
    #[arg(long, default_value = "{}", value_parser = parse_config)]
    config: Value,
    /// The first reconnect delay's upper bound, in milliseconds.
    #[arg(long, default_value_t = 500)]
    reconnect_initial_ms: u64,
    /// The largest reconnect delay, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    reconnect_max_ms: u64,
    /// How long shutdown waits for running tasks, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    shutdown_grace_ms: u64,
    /// Binary frames, offering the `mcpw.v1` WebSocket subprotocol.
    #[arg(long, conflicts_with = "binary_runtime")]
    binary: bool,
    /// Binary frames, asked for with `protocol.set_binary` after connecting.
    #[arg(long)]
    binary_runtime: bool,
    /// With binary frames: compress payloads of at least this many bytes; 0
    /// turns compression off.
    #[arg(long, default_value_t = 1024)]
    compress_threshold: usize,
    /// With binary frames: no CRC32 checksums.
    #[arg(long)]
    no_checksum: bool,
    /// Subscribe to this shared state document at start (and after every
    /// reconnect); repeatable.
    #[arg(long = "subscribe", value_name = "DOC")]
    subscribe: Vec<String>,
}

fn parse_capability(text: &str) -> Result<Capability, String> {
    match text.split_once('=') {
        None => Ok(Capability::named(text)),
        Some((name, confidence)) => {
            let confidence: f64 = confidence
                .parse()
                .map_err(|_| format!("confidence {confidence:?} is not a number (use name=0.8)"))?;
            if !(0.0..=1.0).contains(&confidence) {
                return Err(format!("confidence {confidence} must be in 0..=1"));
            }
            Ok(Capability::detailed(name).with_confidence(confidence))
        }
    }
}

fn parse_config(text: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if !value.is_object() {
        return Err("must be a JSON object".to_string());
    }
    Ok(value)
}

/// Does whatever the task's payload asks for.
struct PayloadHandler {
    agent_id: String,
}

impl TaskHandler for PayloadHandler {
    fn accept(&self, task: &Task) -> Result<(), String> {
        if task.payload.get("reject").and_then(Value::as_bool) == Some(true) {
            return Err("the payload asked for a rejection".to_string());
        }
        Ok(())
    }

    async fn run(&self, task: Task, ctx: TaskContext) -> TaskResult {
        let payload = &task.payload;
        let number = |field: &str| payload.get(field).and_then(Value::as_u64).unwrap_or(0);
        if payload.get("panic").and_then(Value::as_bool) == Some(true) {
            panic!("the payload asked the handler to panic");
        }
        let sleep_ms = number("sleep_ms");
        let steps = number("progress_steps");
        let cancelled = ctx.cancelled();
        let chunks = steps.max(1);
        let chunk = Duration::from_millis(sleep_ms / chunks);
        for step in 1..=chunks {
            tokio::select! {
                () = tokio::time::sleep(chunk) => {}
                () = cancelled.cancelled() => return Err(TaskFailure::retryable("cancelled")),
            }
            if steps > 0 {
                let message = format!("step {step} of {steps}");
                if let Err(err) = ctx.progress(step as f64 / steps as f64, message).await {
                    tracing::warn!(task_id = ctx.task_id(), error = %err, "progress not sent");
                }
            }
        }
        if let Some(message) = payload.get("fail").and_then(Value::as_str) {
            let retryable = payload.get("retryable").and_then(Value::as_bool) == Some(true);
            return Err(TaskFailure {
                message: message.to_string(),
                retryable,
            });
        }
        let mut result = Map::new();
        result.insert("agent".into(), json!(self.agent_id));
        result.insert("task_id".into(), json!(task.id));
        result.insert("type".into(), json!(task.task_type));
        if payload.get("echo").and_then(Value::as_bool) == Some(true) {
            digest_payload(payload, &mut result);
        } else {
            result.insert("echo".into(), payload.clone());
        }
        if let Some(spec) = payload.get("state") {
            apply_state(spec, &ctx, &mut result).await?;
        }
        if let Some(spec) = payload.get("state_report") {
            report_state(spec, &ctx, &mut result).await?;
        }
        if payload.get("protocol_info").and_then(Value::as_bool) == Some(true) {
            let info = ctx
                .protocol_info()
                .await
                .map_err(|e| TaskFailure::retryable(format!("protocol.get_info failed: {e}")))?;
            result.insert("protocol_info".into(), info);
        }
        let blob_len = usize::try_from(number("result_bytes")).unwrap_or(usize::MAX);
        if blob_len > 0 {
            result.insert("blob".into(), json!("x".repeat(blob_len)));
        }
        Ok(result)
    }
}

/// Adds the payload's size and SHA-256 (of its compact JSON), and of its
/// `data` string if it has one, so a large payload can be checked without
/// echoing it.
fn digest_payload(payload: &Value, result: &mut Map<String, Value>) {
    let bytes = payload.to_string().into_bytes();
    result.insert("payload_bytes".into(), json!(bytes.len()));
    result.insert("payload_sha256".into(), json!(sha256_hex(&bytes)));
    if let Some(data) = payload.get("data").and_then(Value::as_str) {
        result.insert("data_bytes".into(), json!(data.len()));
        result.insert("data_sha256".into(), json!(sha256_hex(data.as_bytes())));
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The `doc` of a `state` or `state_report` payload field.
fn doc_of<'a>(spec: &'a Value, field: &str) -> Result<&'a str, TaskFailure> {
    spec.get("doc")
        .and_then(Value::as_str)
        .ok_or_else(|| TaskFailure::permanent(format!("{field}.doc must be a string")))
}

/// `state: {doc, ops, repeat}`: applies `ops` `repeat` times (default 1).
/// A failed apply fails the task for good, since a retry would apply the
/// earlier rounds again.
async fn apply_state(
    spec: &Value,
    ctx: &TaskContext,
    result: &mut Map<String, Value>,
) -> Result<(), TaskFailure> {
    let doc = doc_of(spec, "state")?;
    let ops = spec
        .get("ops")
        .and_then(Value::as_array)
        .ok_or_else(|| TaskFailure::permanent("state.ops must be an array"))?;
    let repeat = spec.get("repeat").and_then(Value::as_u64).unwrap_or(1);
    let state = ctx.state(doc);
    let mut ops_applied = 0;
    let mut last = None;
    for round in 0..repeat {
        let outcome = state.apply(ops.clone()).await.map_err(|e| {
            TaskFailure::permanent(format!(
                "state.apply failed after {round} of {repeat} rounds: {e}"
            ))
        })?;
        ops_applied += outcome.applied;
        last = Some(outcome);
    }
    result.insert("applied".into(), json!(repeat));
    result.insert("ops_applied".into(), json!(ops_applied));
    if let Some(last) = last {
        result.insert("hash".into(), json!(last.hash));
        result.insert("value".into(), last.value);
    }
    Ok(())
}

/// `state_report: {doc}`: the gateway's and the local replica's hash and
/// value. A subscribed replica gets a moment to catch up with deltas still
/// on their way, then is synced, so the two agree unless the document
/// changed in between.
async fn report_state(
    spec: &Value,
    ctx: &TaskContext,
    result: &mut Map<String, Value>,
) -> Result<(), TaskFailure> {
    let state = ctx.state(doc_of(spec, "state_report")?);
    let failed = |e: AgentError| TaskFailure::retryable(format!("reading the state failed: {e}"));
    let deadline = tokio::time::Instant::now() + REPORT_CATCH_UP;
    let mut view = state.get().await.map_err(failed)?;
    while state.is_subscribed() && state.local_hash().as_deref() != Some(view.hash.as_str()) {
        if tokio::time::Instant::now() >= deadline {
            view = state.sync().await.map_err(failed)?;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        view = state.get().await.map_err(failed)?;
    }
    result.insert("gateway_hash".into(), json!(view.hash));
    result.insert("value".into(), view.value);
    result.insert("local_hash".into(), json!(state.local_hash()));
    result.insert("local_value".into(), json!(state.local_value()));
    Ok(())
}

/// One JSON line per event on stdout, or `None` for events not printed.
fn event_line(event: &AgentEvent) -> Option<Value> {
    Some(match event {
        AgentEvent::Connected => json!({"event": "connected"}),
        AgentEvent::Registered {
            session_id,
            config_version,
            resumed_tasks,
            ..
        } => json!({"event": "registered", "session_id": session_id,
                    "config_version": config_version, "resumed_tasks": resumed_tasks}),
        AgentEvent::TaskAssigned { id } => json!({"event": "assigned", "task_id": id}),
        AgentEvent::TaskRejected { id, reason } => {
            json!({"event": "rejected", "task_id": id, "reason": reason})
        }
        AgentEvent::TaskCompleted { id } => json!({"event": "completed", "task_id": id}),
        AgentEvent::TaskFailed { id, message } => {
            json!({"event": "failed", "task_id": id, "message": message})
        }
        AgentEvent::TaskCancelled { id } => json!({"event": "cancelled", "task_id": id}),
        AgentEvent::ConfigUpdated { version, config } => {
            json!({"event": "config", "version": version, "config": config})
        }
        AgentEvent::Disconnected { reason } => json!({"event": "disconnected", "reason": reason}),
        AgentEvent::ProtocolMode {
            binary,
            compression,
            checksum,
        } => json!({"event": "protocol_mode", "binary": binary,
                    "compression": compression, "checksum": checksum}),
        AgentEvent::BadFrame { error } => json!({"event": "bad_frame", "error": error}),
        AgentEvent::StateSubscribed { doc, hash } => {
            json!({"event": "state_subscribed", "doc": doc, "hash": hash})
        }
        AgentEvent::StateResynced { doc, hash } => {
            json!({"event": "state_resynced", "doc": doc, "hash": hash})
        }
        AgentEvent::Refused {
            status,
            code,
            message,
        } => json!({"event": "refused", "status": status, "code": code, "message": message}),
        _ => return None,
    })
}

async fn print_events(mut events: broadcast::Receiver<AgentEvent>) {
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "stdout fell behind; events lost");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if let Some(line) = event_line(&event) {
            let mut stdout = std::io::stdout().lock();
            // A closed stdout must not stop the agent.
            let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
        }
    }
}

/// Cancels `token` on ctrl-c or SIGTERM.
async fn cancel_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot watch SIGTERM; only ctrl-c stops the agent");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("signal received; shutting down");
    token.cancel();
}

fn options(cli: Cli) -> AgentOptions {
    let mut opts = AgentOptions::new(cli.url, cli.key, cli.id, cli.agent_type);
    if let Some(name) = cli.name {
        opts.name = name;
    }
    opts.version = env!("CARGO_PKG_VERSION").to_string();
    opts.capabilities = if cli.capabilities.is_empty() {
        vec![Capability::named(opts.agent_type.clone())]
    } else {
        cli.capabilities
    };
    opts.max_concurrent_tasks = cli.max_concurrent;
    opts.config = cli.config;
    opts.metadata = json!({"example": true});
    opts.reconnect_initial = Duration::from_millis(cli.reconnect_initial_ms);
    opts.reconnect_max = Duration::from_millis(cli.reconnect_max_ms);
    opts.shutdown_grace = Duration::from_millis(cli.shutdown_grace_ms);
    let negotiate = if cli.binary {
        Some(Negotiation::Subprotocol)
    } else if cli.binary_runtime {
        Some(Negotiation::Runtime)
    } else {
        None
    };
    opts.binary = negotiate.map(|negotiate| BinaryOptions {
        compress_threshold: (cli.compress_threshold > 0).then_some(cli.compress_threshold),
        checksum: !cli.no_checksum,
        ..BinaryOptions::new(negotiate)
    });
    opts
}

/// Whether the gateway (or the options) said no for good, as opposed to a
/// failure on the way.
fn is_refusal(err: &AgentError) -> bool {
    matches!(
        err,
        AgentError::Refused { .. } | AgentError::InvalidOptions(_)
    ) || err.code() == Some(codes::INVALID_PARAMS)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // tungstenite traces the raw handshake request, key included.
    if let Ok(cap) = "tungstenite::handshake::client=debug".parse() {
        filter = filter.add_directive(cap);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let agent_id = cli.id.clone();
    let subscriptions = cli.subscribe.clone();
    let agent = Agent::new(options(cli));
    let printer = tokio::spawn(print_events(agent.events()));
    for doc in subscriptions {
        let state = agent.state(&doc);
        // Waits for the first registration; later ones subscribe again.
        tokio::spawn(async move {
            if let Err(err) = state.subscribe().await {
                tracing::warn!(doc, error = %err, "subscribing failed");
            }
        });
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    let outcome = agent
        .run(Arc::new(PayloadHandler { agent_id }), shutdown)
        .await
        .context("meshgate-agent stopped");
    // The agent is gone, so the event channel closes once drained.
    let _ = tokio::time::timeout(Duration::from_secs(2), printer).await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            let refused = err.downcast_ref::<AgentError>().is_some_and(is_refusal);
            if refused {
                eprintln!(
                    "hint: check --key (an API key with role `agent` or scope `agent:connect`), \
                     --id (1-128 of A-Z a-z 0-9 . _ : -) and --type"
                );
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_flag_takes_a_name_or_name_and_confidence() {
        assert_eq!(parse_capability("code"), Ok(Capability::named("code")));
        assert_eq!(
            parse_capability("code=0.8"),
            Ok(Capability::detailed("code").with_confidence(0.8))
        );
        assert!(parse_capability("code=high").is_err());
        assert!(parse_capability("code=2").is_err());
    }

    #[test]
    fn config_flag_must_be_an_object() {
        assert_eq!(parse_config(r#"{"a":1}"#), Ok(json!({"a": 1})));
        assert!(parse_config("[1]").is_err());
        assert!(parse_config("{").is_err());
    }

    #[test]
    fn name_defaults_to_id_and_capability_to_type() {
        let cli = Cli::parse_from(["meshgate-agent", "--id", "w-1", "--key", "k"]);
        let opts = options(cli);
        assert_eq!(opts.name, "w-1");
        assert_eq!(opts.agent_type, "generic");
        assert_eq!(opts.capabilities, [Capability::named("generic")]);
        assert_eq!(opts.max_concurrent_tasks, 4);
        assert_eq!(opts.binary, None);
        assert!(opts.validate().is_ok());
    }

    #[test]
    fn binary_flags_pick_negotiation_compression_and_checksum() {
        let cli = Cli::parse_from(["meshgate-agent", "--id", "w-1", "--binary"]);
        assert_eq!(
            options(cli).binary,
            Some(BinaryOptions::new(Negotiation::Subprotocol))
        );
        let cli = Cli::parse_from([
            "meshgate-agent",
            "--id",
            "w-1",
            "--binary-runtime",
            "--compress-threshold",
            "0",
            "--no-checksum",
        ]);
        let binary = options(cli).binary;
        assert_eq!(
            binary
                .as_ref()
                .map(|b| (b.negotiate, b.compress_threshold, b.checksum)),
            Some((Negotiation::Runtime, None, false))
        );
        let both = [
            "meshgate-agent",
            "--id",
            "w",
            "--binary",
            "--binary-runtime",
        ];
        assert!(Cli::try_parse_from(both).is_err());
    }

    #[test]
    fn echo_reports_size_and_sha256() {
        let mut result = Map::new();
        digest_payload(&json!({"data": "abc"}), &mut result);
        assert_eq!(result["payload_bytes"], json!(14));
        assert_eq!(result["data_bytes"], json!(3));
        assert_eq!(
            result["data_sha256"],
            json!("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
    }
}
