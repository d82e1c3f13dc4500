//! `meshgate stdio`: lets a client that only speaks the MCP stdio transport
//! (a desktop app's `mcpServers` entry) use a remote gateway.
//!
//! JSON-RPC messages come in on stdin, one per line, and go out to the
//! gateway over Streamable HTTP (`http://`, `https://`) or MCP over WebSocket
//! (`ws://`, `wss://`, the gateway's `/mcp/ws`); whatever the gateway sends
//! comes back on stdout, one message per line. Messages are relayed as raw
//! JSON, never re-interpreted, so server-initiated requests (sampling,
//! elicitation, ping) and the client's answers pass through. stdout carries
//! nothing else: logs go to stderr.
//!
//! The bridge keeps the client's `initialize` so that it can open a new
//! session on its own when the old one is gone (the gateway answered 404, or
//! the WebSocket dropped): it replays `initialize` with an id of its own,
//! swallows the answer, replays `notifications/initialized`, and goes on.
//! Failed connections are retried with backoff for `--retry-for-secs`; a
//! request that cannot be delivered, or whose answer was lost, is answered
//! with a JSON-RPC error that says what happened and what to do.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{BufRead, IsTerminal};
use std::time::Duration;

use anyhow::Context;
use meshgate_core::RetryPolicy;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

mod http;
mod ws;

/// The environment variable that holds the key when `--key` is not given.
pub const KEY_ENV: &str = "MESHGATE_KEY";

/// Arguments of `meshgate stdio`.
#[derive(clap::Args)]
pub struct StdioArgs {
    /// The gateway's MCP endpoint: http(s)://HOST:PORT/mcp (Streamable HTTP) or
    /// ws(s)://HOST:PORT/mcp/ws (WebSocket). A URL without a path gets /mcp or /mcp/ws.
    #[arg(long)]
    url: String,
    /// API key or token, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = KEY_ENV, hide_env_values = true)]
    key: Option<String>,
    /// An extra header for every request, `Name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// Log filter for stderr (e.g. info, debug, meshgate=debug).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// How long to keep retrying a message while the gateway is unreachable
    /// before answering the client with an error.
    #[arg(long, default_value_t = 30)]
    retry_for_secs: u64,
}

/// Where the bridge sends messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Streamable HTTP at this URL.
    Http(reqwest::Url),
    /// MCP over WebSocket at this URL.
    WebSocket(reqwest::Url),
}

/// The settled options.
#[derive(Clone)]
struct Options {
    target: Target,
    /// `Authorization` and the `--header`s, on every request.
    headers: HeaderMap,
    retry_for: Duration,
}

/// Runs the bridge until stdin ends.
pub fn run(args: StdioArgs) -> anyhow::Result<()> {
    init_logging(&args.log_level);
    let options = Options {
        target: parse_target(&args.url)?,
        headers: parse_headers(args.key.as_deref(), &args.headers)?,
        retry_for: Duration::from_secs(args.retry_for_secs.max(1)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(bridge(options))?;
    // Nothing may be left that waits on stdin (it has ended) or the gateway.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|e| {
        eprintln!("--log-level {level:?} is not a valid filter ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Checks the scheme and fills in the default path.
fn parse_target(url: &str) -> anyhow::Result<Target> {
    let mut url = reqwest::Url::parse(url).with_context(|| {
        format!("--url {url:?} is not a URL; expected e.g. http://127.0.0.1:8080/mcp or ws://127.0.0.1:8080/mcp/ws")
    })?;
    let ws = match url.scheme() {
        "http" | "https" => false,
        "ws" | "wss" => true,
        other => anyhow::bail!(
            "--url scheme {other:?} is not supported; use http(s):// for Streamable HTTP or ws(s):// for WebSocket"
        ),
    };
    if url.path().is_empty() || url.path() == "/" {
        url.set_path(if ws { "/mcp/ws" } else { "/mcp" });
    }
    Ok(if ws {
        Target::WebSocket(url)
    } else {
        Target::Http(url)
    })
}

/// `Authorization: Bearer KEY` and the `--header NAME:VALUE`s.
fn parse_headers(key: Option<&str>, extra: &[String]) -> anyhow::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for h in extra {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("--header {h:?} has no colon; write it as `Name: value`"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("--header {h:?}: {:?} is not a header name", name.trim()))?;
        let mut value = HeaderValue::from_str(value.trim())
            .with_context(|| format!("--header {h:?}: the value is not a valid header value"))?;
        if name == AUTHORIZATION {
            value.set_sensitive(true);
        }
        headers.append(name, value);
    }
    if let Some(key) = key.map(str::trim).filter(|k| !k.is_empty()) {
        let mut value = HeaderValue::from_str(&format!("Bearer {key}")).context(
            "--key (or MESHGATE_KEY) holds characters that cannot go into an HTTP header",
        )?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    Ok(headers)
}

async fn bridge(options: Options) -> anyhow::Result<()> {
    let (out, writer) = Out::stdout();
    let (in_tx, in_rx) = mpsc::channel::<Value>(QUEUE);
    spawn_stdin_reader(in_tx, out.clone());
    match &options.target {
        Target::Http(url) => {
            tracing::info!(%url, "relaying stdio to the gateway over Streamable HTTP");
            http::run(options.clone(), url.clone(), in_rx, out).await?;
        }
        Target::WebSocket(url) => {
            tracing::info!(%url, "relaying stdio to the gateway over WebSocket");
            ws::run(options.clone(), url.clone(), in_rx, out).await;
        }
    }
    // The senders are gone (or going, as aborted tasks unwind): the writer
    // flushes what is queued and ends.
    if tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .is_err()
    {
        tracing::warn!("stdout did not take the last messages within 5 s");
    }
    tracing::info!("stdin ended; bridge stopped");
    Ok(())
}

/// Messages queued between stdin, the transport and stdout.
const QUEUE: usize = 256;

/// The longest stdin line (one JSON-RPC message) the bridge accepts.
const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// Sends messages to the client: one JSON text per line on stdout, written
/// by a single task so that lines never interleave.
#[derive(Clone)]
struct Out(mpsc::Sender<Value>);

impl Out {
    /// The stdout writer and its task.
    fn stdout() -> (Out, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Value>(QUEUE);
        let writer = tokio::spawn(async move {
            let mut stdout = tokio::io::stdout();
            let mut broken = false;
            while let Some(message) = rx.recv().await {
                if broken {
                    continue;
                }
                // serde_json escapes every newline inside strings, so this is one line.
                let mut line = message.to_string();
                line.push('\n');
                let written = match stdout.write_all(line.as_bytes()).await {
                    Ok(()) => stdout.flush().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = written {
                    tracing::error!(error = %e, "cannot write to stdout (the client is gone?); dropping messages from now on");
                    broken = true;
                }
            }
        });
        (Out(tx), writer)
    }

    /// Writes `message` to the client.
    async fn send(&self, message: Value) {
        let _ = self.0.send(message).await;
    }

    /// Answers request `id` with a JSON-RPC error.
    async fn error(&self, id: &Value, code: i64, message: String, data: Option<Value>) {
        self.send(error_message(id, code, message, data)).await;
    }
}

fn error_message(id: &Value, code: i64, message: String, data: Option<Value>) -> Value {
    let mut error = json!({"code": code, "message": message});
    if let Some(data) = data {
        error["data"] = data;
    }
    json!({"jsonrpc": "2.0", "id": id, "error": error})
}

/// JSON-RPC: the input is not JSON.
const PARSE_ERROR: i64 = -32700;
/// JSON-RPC: the input is not a valid request.
const INVALID_REQUEST: i64 = -32600;
/// The bridge could not deliver a message or lost its answer.
const BRIDGE_ERROR: i64 = -32000;

/// Reads stdin on a thread of its own (a blocking read never holds up the
/// runtime or its shutdown) and hands each message to the transport; a line
/// that is not JSON is answered with a parse error right away. The channel
/// closes at EOF.
fn spawn_stdin_reader(tx: mpsc::Sender<Value>, out: Out) {
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut line = Vec::new();
            let mut number = 0u64;
            loop {
                line.clear();
                let (read, too_long) = match read_line_capped(&mut stdin, &mut line, MAX_LINE_BYTES)
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read stdin; stopping");
                        break;
                    }
                };
                if read == 0 {
                    break;
                }
                number += 1;
                let text = line.trim_ascii();
                if too_long {
                    let answer = error_message(
                        &Value::Null,
                        INVALID_REQUEST,
                        format!("line {number} of stdin is longer than {MAX_LINE_BYTES} bytes; it was dropped"),
                        None,
                    );
                    if out.0.blocking_send(answer).is_err() {
                        break;
                    }
                    continue;
                }
                if text.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<Value>(text) {
                    Ok(message) => {
                        if tx.blocking_send(message).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(line = number, error = %e, "stdin line is not JSON; answered with -32700");
                        let answer = error_message(
                            &Value::Null,
                            PARSE_ERROR,
                            format!("Parse error: line {number} of stdin is not JSON ({e}); send one JSON-RPC message per line"),
                            None,
                        );
                        if out.0.blocking_send(answer).is_err() {
                            break;
                        }
                    }
                }
            }
            tracing::debug!("stdin closed");
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the stdin reader thread");
    }
}

/// Reads up to and including the next `\n` into `line`, keeping at most
/// `cap` bytes (the rest of an overlong line is consumed and dropped).
/// Returns the bytes read (0 at EOF) and whether the line was cut.
fn read_line_capped(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<(usize, bool)> {
    let mut total = 0;
    let mut cut = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok((total, cut));
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let room = cap.saturating_sub(line.len());
        if chunk.len() > room {
            cut = true;
        }
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len();
        total += used;
        reader.consume(used);
        if done {
            return Ok((total, cut));
        }
    }
}

/// What a message from the client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Has `method` and `id`: the gateway answers it.
    Request,
    /// Has `method`, no `id`.
    Notification,
    /// Has `id` and `result` or `error`: the answer to a server request.
    Response,
}

/// A message from the client, classified once.
#[derive(Debug, Clone)]
struct Message {
    value: Value,
    kind: Kind,
    /// The id of a request or response.
    id: Value,
    /// The method of a request or notification.
    method: String,
}

impl Message {
    /// Classifies `value`; `Err` with the answer for one that is no JSON-RPC message.
    fn classify(value: Value) -> Result<Message, Value> {
        let Some(object) = value.as_object() else {
            let why = if value.is_array() {
                "JSON-RPC batches are not part of MCP since 2025-06-18; send one message per line"
            } else {
                "a JSON-RPC message is a JSON object"
            };
            return Err(error_message(
                &Value::Null,
                INVALID_REQUEST,
                format!("Invalid Request: {why}"),
                None,
            ));
        };
        let id = object.get("id").cloned();
        let method = object
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let kind = match (&method, &id) {
            (Some(_), Some(_)) => Kind::Request,
            (Some(_), None) => Kind::Notification,
            (None, Some(_)) if object.contains_key("result") || object.contains_key("error") => {
                Kind::Response
            }
            _ => {
                return Err(error_message(
                    id.as_ref().unwrap_or(&Value::Null),
                    INVALID_REQUEST,
                    "Invalid Request: a JSON-RPC message needs `method` (a request or notification) or `id` with `result` or `error` (a response)".into(),
                    None,
                ));
            }
        };
        Ok(Message {
            kind,
            id: id.unwrap_or(Value::Null),
            method: method.unwrap_or_default(),
            value,
        })
    }

    fn is_initialize(&self) -> bool {
        self.kind == Kind::Request && self.method == "initialize"
    }

    fn is_initialized(&self) -> bool {
        self.kind == Kind::Notification && self.method == "notifications/initialized"
    }

    /// How the message is named in logs and errors.
    fn describe(&self) -> String {
        match self.kind {
            Kind::Request => format!("request {} ({})", self.id, self.method),
            Kind::Notification => format!("notification {}", self.method),
            Kind::Response => format!("response to server request {}", self.id),
        }
    }
}

/// Whether `message` (from the gateway) answers request `id`.
fn answers(message: &Value, id: &Value) -> bool {
    message.get("method").is_none()
        && message.get("id") == Some(id)
        && (message.get("result").is_some() || message.get("error").is_some())
}

/// The bridge's own copy of the client's `initialize`, under a new id.
fn replayed_initialize(initialize: &Value, id: &str) -> Value {
    let mut replay = initialize.clone();
    if let Some(object) = replay.as_object_mut() {
        object.insert("id".into(), Value::String(id.to_owned()));
    }
    replay
}

/// `notifications/initialized`.
fn initialized_notification() -> Value {
    json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
}

/// Ids of the bridge's replayed `initialize` requests.
fn replay_id(n: u64) -> String {
    format!("meshgate-stdio-reinit-{n}")
}

/// Reconnection waits: from 100 ms doubling to 5 s, each drawn from the upper
/// half of its ceiling so that many bridges do not reconnect in step.
struct Backoff {
    retry: u32,
    seed: RandomState,
}

/// The reconnection schedule.
const BACKOFF: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    initial_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_secs(5),
};

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            retry: 0,
            seed: RandomState::new(),
        }
    }

    /// The next wait.
    fn next_wait(&mut self) -> Duration {
        self.retry = self.retry.saturating_add(1);
        let unit = (self.seed.hash_one(self.retry) >> 11) as f64 / (1u64 << 53) as f64;
        BACKOFF.jittered(self.retry, 0.5 + unit / 2.0)
    }

    /// The next wait if it ends before `deadline`.
    fn next_before(&mut self, deadline: tokio::time::Instant) -> Option<Duration> {
        let wait = self.next_wait();
        (tokio::time::Instant::now() + wait < deadline).then_some(wait)
    }

    /// Starts over after a success.
    fn reset(&mut self) {
        self.retry = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_by_scheme_with_default_paths() {
        assert_eq!(
            parse_target("http://127.0.0.1:8080").ok(),
            Some(Target::Http(
                reqwest::Url::parse("http://127.0.0.1:8080/mcp").unwrap()
            ))
        );
        assert_eq!(
            parse_target("wss://gw.example/").ok(),
            Some(Target::WebSocket(
                reqwest::Url::parse("wss://gw.example/mcp/ws").unwrap()
            ))
        );
        assert_eq!(
            parse_target("https://gw.example/custom").ok(),
            Some(Target::Http(
                reqwest::Url::parse("https://gw.example/custom").unwrap()
            ))
        );
        let e = parse_target("ftp://x").unwrap_err().to_string();
        assert!(e.contains("ftp") && e.contains("ws(s)://"), "{e}");
    }

    #[test]
    fn headers_take_the_key_as_bearer_and_refuse_bad_ones() {
        let h = parse_headers(Some("mg_abc"), &["X-Team: blue".into()]).unwrap();
        assert_eq!(h[AUTHORIZATION], "Bearer mg_abc");
        assert_eq!(h["x-team"], "blue");
        let e = parse_headers(None, &["no-colon".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("Name: value"), "{e}");
        assert!(parse_headers(Some("bad\nkey"), &[]).is_err());
    }

    #[test]
    fn messages_are_classified_and_non_messages_answered() {
        let m =
            Message::classify(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize"})).unwrap();
        assert!(m.is_initialize());
        let m = Message::classify(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .unwrap();
        assert!(m.is_initialized());
        let m = Message::classify(json!({"jsonrpc": "2.0", "id": "s1", "result": {}})).unwrap();
        assert_eq!(m.kind, Kind::Response);
        let e = Message::classify(json!([1])).unwrap_err();
        assert_eq!(e["error"]["code"], INVALID_REQUEST);
        let e = Message::classify(json!({"jsonrpc": "2.0", "id": 4})).unwrap_err();
        assert_eq!(e["id"], 4);
    }

    #[test]
    fn overlong_lines_are_cut_and_the_next_line_is_read_whole() {
        let mut input = std::io::Cursor::new(b"0123456789\nok\nlast".to_vec());
        let mut line = Vec::new();
        assert_eq!(
            read_line_capped(&mut input, &mut line, 4).unwrap(),
            (11, true)
        );
        assert_eq!(line, b"0123");
        line.clear();
        assert_eq!(
            read_line_capped(&mut input, &mut line, 4).unwrap(),
            (3, false)
        );
        assert_eq!(line, b"ok\n");
        line.clear();
        assert_eq!(
            read_line_capped(&mut input, &mut line, 8).unwrap(),
            (4, false)
        );
        line.clear();
        assert_eq!(
            read_line_capped(&mut input, &mut line, 8).unwrap(),
            (0, false)
        );
    }

    #[test]
    fn backoff_grows_to_five_seconds() {
        let mut b = Backoff::new();
        let first = b.next_wait();
        assert!(first >= Duration::from_millis(50) && first < Duration::from_millis(100));
        let last = (0..20).map(|_| b.next_wait()).last().unwrap();
        assert!(last >= Duration::from_millis(2500) && last < Duration::from_secs(5));
        b.reset();
        assert!(b.next_wait() < Duration::from_millis(100));
    }
}
