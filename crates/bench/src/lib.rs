//! `meshgate-bench`: a load tool for MCP `tools/call` over Streamable HTTP.
//!
//! It opens one or more MCP sessions against any Streamable HTTP endpoint,
//! runs an unmeasured warm-up, then drives `tools/call` from `--concurrency`
//! tokio tasks sharing one pooled HTTP client, bounded by `--duration` and
//! optionally `--requests`. It reports throughput, latency percentiles, and,
//! given `--pid`, the CPU time that process spent per call (read from
//! `/proc/<pid>/stat`), which is the figure that matters when the load tool,
//! the gateway and the upstream share a small machine.
//!
//! The `meshgate` binary exposes it as `meshgate bench ...` by embedding
//! [`BenchArgs`] and calling [`run_cli`].

#![warn(missing_docs)]

pub mod cpu;
pub mod mcp;
pub mod mesh;
pub mod sse;
pub mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};
use serde::Serialize;

use crate::mcp::{Session, Target};
use crate::sse::SseParser;

/// Default tool name.
pub const DEFAULT_TOOL: &str = "echo";
/// Default tool arguments.
pub const DEFAULT_ARGS: &str = r#"{"message":"hello"}"#;

/// Command-line options of `meshgate bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// MCP endpoint (Streamable HTTP), e.g. http://127.0.0.1:8080/mcp
    #[arg(long)]
    pub url: String,

    /// Tool to call
    #[arg(long, default_value = DEFAULT_TOOL)]
    pub tool: String,

    /// Tool arguments as a JSON object
    #[arg(long = "args", value_name = "JSON", default_value = DEFAULT_ARGS)]
    pub args: String,

    /// Number of concurrent workers
    #[arg(long, short = 'c', default_value_t = 16)]
    pub concurrency: usize,

    /// Measured phase time limit in seconds (the warm-up is also capped by it)
    #[arg(long, short = 'd', value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,

    /// Measured phase call limit (stops at whichever of --duration/--requests comes first)
    #[arg(long, short = 'n', value_name = "N")]
    pub requests: Option<u64>,

    /// Unmeasured warm-up calls before the measured phase
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub warmup: u64,

    /// MCP sessions shared by the workers (default: one per worker)
    #[arg(long, value_name = "N")]
    pub sessions: Option<usize>,

    /// Extra request header, repeatable (e.g. --header "Authorization: Bearer x")
    #[arg(long = "header", short = 'H', value_name = "K: V")]
    pub headers: Vec<String>,

    /// Process whose CPU time per call to report (from /proc/PID/stat)
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,

    /// Per-request timeout in seconds
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub timeout: f64,

    /// Print the report as one JSON line instead of a table
    #[arg(long)]
    pub json: bool,

    /// MCP revision offered in `initialize`; use the one the gateway negotiates
    /// with the upstream when comparing direct and through-gateway runs
    #[arg(long, value_name = "REVISION", default_value = "2025-11-25")]
    pub protocol_version: String,
}

impl BenchArgs {
    /// Options with every default, against `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tool: DEFAULT_TOOL.to_string(),
            args: DEFAULT_ARGS.to_string(),
            concurrency: 16,
            duration: 10.0,
            requests: None,
            warmup: 1000,
            sessions: None,
            headers: Vec::new(),
            pid: None,
            timeout: 30.0,
            json: false,
            protocol_version: "2025-11-25".to_string(),
        }
    }
}

/// Result of one bench run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Endpoint measured.
    pub url: String,
    /// Tool called.
    pub tool: String,
    /// Concurrent workers.
    pub concurrency: usize,
    /// MCP sessions the workers shared.
    pub sessions: usize,
    /// Successful calls in the measured phase.
    pub calls_ok: u64,
    /// Failed calls in the measured phase (HTTP, transport, JSON-RPC or isError).
    pub errors: u64,
    /// Message of the first failed call, if any.
    pub first_error: Option<String>,
    /// Wall time of the measured phase.
    pub elapsed_secs: f64,
    /// Successful calls per second.
    pub calls_per_sec: f64,
    /// Median latency of successful calls.
    pub p50_ms: f64,
    /// 90th percentile latency.
    pub p90_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
    /// Largest latency.
    pub max_ms: f64,
    /// Process measured with `--pid`.
    pub target_pid: Option<u32>,
    /// CPU (user + system) that process used during the measured phase, in ms.
    pub target_cpu_ms: Option<f64>,
    /// That CPU time divided by the calls made (ok + errors).
    pub target_cpu_ms_per_call: Option<f64>,
}

/// Validated, parsed options.
struct Plan {
    url: Url,
    prefix: Arc<[u8]>,
    concurrency: usize,
    sessions: usize,
    duration: Duration,
    requests: Option<u64>,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
}

fn seconds(name: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 1e9) {
        bail!("--{name} must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// Parses a `--header` value of the form `Name: value`.
pub fn parse_header(raw: &str) -> Result<(HeaderName, HeaderValue)> {
    let (name, value) = raw
        .split_once(':')
        .with_context(|| format!("--header {raw:?}: expected \"Name: value\""))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .with_context(|| format!("--header {raw:?}: invalid header name"))?;
    let value = HeaderValue::from_str(value.trim())
        .with_context(|| format!("--header {raw:?}: invalid header value"))?;
    Ok((name, value))
}

impl Plan {
    fn new(opts: &BenchArgs) -> Result<Self> {
        let url = Url::parse(&opts.url).with_context(|| format!("--url {:?}", opts.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("--url {}: only http and https are supported", opts.url);
        }
        let arguments: serde_json::Value = serde_json::from_str(&opts.args)
            .with_context(|| format!("--args is not valid JSON: {}", opts.args))?;
        if !arguments.is_object() {
            bail!("--args must be a JSON object, got {}", opts.args);
        }
        if opts.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        let sessions = opts.sessions.unwrap_or(opts.concurrency);
        if sessions == 0 || sessions > opts.concurrency {
            bail!(
                "--sessions must be between 1 and --concurrency ({}), got {sessions}",
                opts.concurrency
            );
        }
        if opts.requests == Some(0) {
            bail!("--requests must be at least 1");
        }
        let headers = opts
            .headers
            .iter()
            .map(|h| parse_header(h))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            url,
            prefix: mcp::call_prefix(&opts.tool, &arguments).into(),
            concurrency: opts.concurrency,
            sessions,
            duration: seconds("duration", opts.duration)?,
            requests: opts.requests,
            headers,
            timeout: seconds("timeout", opts.timeout)?,
        })
    }
}

/// Outcome of one phase (warm-up or measured).
#[derive(Default)]
struct PhaseResult {
    ok: u64,
    errors: u64,
    first_error: Option<(Instant, String)>,
    samples_us: Vec<f64>,
    elapsed: Duration,
}

/// State shared by the workers of one phase.
struct Phase {
    target: Arc<Target>,
    prefix: Arc<[u8]>,
    deadline: Instant,
    limit: Option<u64>,
    issued: AtomicU64,
    record: bool,
}

impl Phase {
    /// Claims the right to make one more call; false once a limit is reached.
    fn claim(&self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        match self.limit {
            Some(limit) => self.issued.fetch_add(1, Ordering::Relaxed) < limit,
            None => true,
        }
    }
}

async fn worker(phase: Arc<Phase>, session: Arc<Session>, capacity: usize) -> PhaseResult {
    let mut out = PhaseResult {
        samples_us: Vec::with_capacity(if phase.record { capacity } else { 0 }),
        ..PhaseResult::default()
    };
    let mut parser = SseParser::new();
    while phase.claim() {
        let started = Instant::now();
        match phase
            .target
            .call(&session, &phase.prefix, &mut parser)
            .await
        {
            Ok(()) => {
                out.ok += 1;
                if phase.record {
                    out.samples_us
                        .push(started.elapsed().as_nanos() as f64 / 1000.0);
                }
            }
            Err(e) => {
                out.errors += 1;
                if out.first_error.is_none() {
                    out.first_error = Some((started, e.describe("tools/call", &phase.target.url)));
                }
            }
        }
    }
    out
}

async fn run_phase(
    target: &Arc<Target>,
    prefix: &Arc<[u8]>,
    sessions: &[Arc<Session>],
    concurrency: usize,
    duration: Duration,
    limit: Option<u64>,
    record: bool,
) -> Result<PhaseResult> {
    let started = Instant::now();
    let phase = Arc::new(Phase {
        target: Arc::clone(target),
        prefix: Arc::clone(prefix),
        deadline: started + duration,
        limit,
        issued: AtomicU64::new(0),
        record,
    });
    let capacity = match limit {
        Some(n) => usize::try_from(n / concurrency as u64 + 1).unwrap_or(1 << 16),
        None => 1 << 14,
    }
    .min(1 << 20);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let session = Arc::clone(&sessions[i % sessions.len()]);
        tasks.spawn(worker(Arc::clone(&phase), session, capacity));
    }
    let mut total = PhaseResult::default();
    while let Some(joined) = tasks.join_next().await {
        let part = joined.context("bench worker panicked")?;
        total.ok += part.ok;
        total.errors += part.errors;
        total.first_error = match (total.first_error.take(), part.first_error) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
        if total.samples_us.is_empty() {
            total.samples_us = part.samples_us;
        } else {
            total.samples_us.extend_from_slice(&part.samples_us);
        }
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// Runs a benchmark and returns its report.
pub async fn run(opts: &BenchArgs) -> Result<BenchReport> {
    let plan = Plan::new(opts)?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(plan.concurrency * 2)
        .connect_timeout(Duration::from_secs(5))
        .timeout(plan.timeout)
        .user_agent(concat!("meshgate-bench/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the HTTP client")?;
    let target = Arc::new(Target {
        client,
        url: plan.url.clone(),
        extra_headers: plan.headers.clone(),
        protocol_version: opts.protocol_version.clone(),
    });

    let opened = futures::future::join_all((0..plan.sessions).map(|_| {
        let target = Arc::clone(&target);
        async move { target.open_session(&mut SseParser::new()).await }
    }))
    .await;
    let mut sessions = Vec::with_capacity(opened.len());
    let mut open_error = None;
    for s in opened {
        match s {
            Ok(s) => sessions.push(Arc::new(s)),
            Err(e) => open_error = open_error.or(Some(e)),
        }
    }
    if let Some(e) = open_error {
        close_all(&target, &sessions).await;
        return Err(e);
    }

    let result = measure(&plan, &target, &sessions, opts).await;
    close_all(&target, &sessions).await;
    result
}

async fn close_all(target: &Arc<Target>, sessions: &[Arc<Session>]) {
    futures::future::join_all(sessions.iter().map(|s| target.close_session(s))).await;
}

async fn measure(
    plan: &Plan,
    target: &Arc<Target>,
    sessions: &[Arc<Session>],
    opts: &BenchArgs,
) -> Result<BenchReport> {
    if opts.warmup > 0 {
        let warm = run_phase(
            target,
            &plan.prefix,
            sessions,
            plan.concurrency,
            plan.duration,
            Some(opts.warmup),
            false,
        )
        .await?;
        if warm.ok == 0
            && let Some((_, msg)) = warm.first_error
        {
            bail!("every warm-up call failed; first error: {msg}");
        }
    }

    let ticks_per_sec = cpu::clock_ticks_per_sec();
    let cpu_before = opts.pid.map(cpu::process_cpu_ticks).transpose()?;
    let mut phase = run_phase(
        target,
        &plan.prefix,
        sessions,
        plan.concurrency,
        plan.duration,
        plan.requests,
        true,
    )
    .await?;
    let cpu_after = opts.pid.map(cpu::process_cpu_ticks).transpose()?;

    let summary = stats::summarize_micros(&mut phase.samples_us);
    let elapsed = phase.elapsed.as_secs_f64();
    let calls = phase.ok + phase.errors;
    let target_cpu_ms = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 * 1000.0 / ticks_per_sec as f64),
        _ => None,
    };
    Ok(BenchReport {
        url: opts.url.clone(),
        tool: opts.tool.clone(),
        concurrency: plan.concurrency,
        sessions: plan.sessions,
        calls_ok: phase.ok,
        errors: phase.errors,
        first_error: phase.first_error.map(|(_, m)| m),
        elapsed_secs: elapsed,
        calls_per_sec: if elapsed > 0.0 {
            phase.ok as f64 / elapsed
        } else {
            0.0
        },
        p50_ms: summary.p50_ms,
        p90_ms: summary.p90_ms,
        p99_ms: summary.p99_ms,
        max_ms: summary.max_ms,
        target_pid: opts.pid,
        target_cpu_ms,
        target_cpu_ms_per_call: target_cpu_ms
            .filter(|_| calls > 0)
            .map(|ms| ms / calls as f64),
    })
}

/// Renders a report as a small human-readable table.
pub fn format_report(r: &BenchReport) -> String {
    let mut out = format!(
        "meshgate bench  {}  tool={}  concurrency={}  sessions={}\n",
        r.url, r.tool, r.concurrency, r.sessions
    );
    out.push_str(&format!(
        "  calls        {} ok, {} errors in {:.2} s\n",
        r.calls_ok, r.errors, r.elapsed_secs
    ));
    out.push_str(&format!("  throughput   {:.1} calls/s\n", r.calls_per_sec));
    out.push_str(&format!(
        "  latency ms   p50 {:.3}   p90 {:.3}   p99 {:.3}   max {:.3}\n",
        r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms
    ));
    if let (Some(pid), Some(total), Some(per_call)) =
        (r.target_pid, r.target_cpu_ms, r.target_cpu_ms_per_call)
    {
        out.push_str(&format!(
            "  target CPU   {per_call:.4} ms/call  ({total:.0} ms total, pid {pid})\n"
        ));
    }
    if let Some(e) = &r.first_error {
        out.push_str(&format!("  first error  {e}\n"));
    }
    out
}

/// Runs a benchmark and prints the report (table, or one JSON line with `--json`).
///
/// Fails if no call succeeded.
pub async fn run_cli(args: BenchArgs) -> Result<()> {
    let report = run(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", format_report(&report));
    }
    if report.calls_ok == 0 {
        bail!(
            "no call succeeded{}",
            report
                .first_error
                .as_deref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing() {
        let (k, v) = parse_header("Authorization: Bearer abc:def").unwrap();
        assert_eq!(k.as_str(), "authorization");
        assert_eq!(v.to_str().unwrap(), "Bearer abc:def");
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: x").is_err());
    }

    #[test]
    fn plan_validation() {
        let ok = BenchArgs::new("http://127.0.0.1:1/mcp");
        assert!(Plan::new(&ok).is_ok());
        let mut a = ok.clone();
        a.args = "[1]".into();
        assert!(Plan::new(&a).is_err());
        let mut a = ok.clone();
        a.args = "{".into();
        assert!(Plan::new(&a).is_err());
        let mut a = ok.clone();
        a.sessions = Some(17);
        assert!(Plan::new(&a).is_err());
        let mut a = ok.clone();
        a.concurrency = 0;
        assert!(Plan::new(&a).is_err());
        let mut a = ok.clone();
        a.duration = 0.0;
        assert!(Plan::new(&a).is_err());
        let mut a = ok.clone();
        a.url = "ftp://x/".into();
        assert!(Plan::new(&a).is_err());
        let mut a = ok;
        a.requests = Some(0);
        assert!(Plan::new(&a).is_err());
    }

    #[test]
    fn cli_defaults_match_new() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let parsed = Cli::parse_from(["x", "--url", "http://h/mcp"]).bench;
        let built = BenchArgs::new("http://h/mcp");
        assert_eq!(format!("{parsed:?}"), format!("{built:?}"));
    }
}
