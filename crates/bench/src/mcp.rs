//! Minimal Streamable HTTP MCP client used by the load loop: session set-up
//! (`initialize` + `notifications/initialized`), `tools/call`, and `DELETE` at the end.
//!
//! The hot path builds each request body from a pre-serialised prefix plus the
//! request id, and decodes replies into a small probe struct instead of a full
//! `serde_json::Value`, so one call costs only a handful of allocations.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderName, HeaderValue};
use reqwest::{Client, RequestBuilder, Response, StatusCode, Url};
use serde::Deserialize;
use serde_json::Value;

use crate::sse::{Flow, SseParser};

/// Protocol version the bench client asks for in `initialize`.
pub const PROTOCOL_VERSION: &str = "2025-11-25";

const ACCEPT_BOTH: HeaderValue = HeaderValue::from_static("application/json, text/event-stream");
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");

/// How long to wait for the rest of an SSE body once the reply has been read,
/// so the connection can go back to the pool.
const SSE_DRAIN_TIMEOUT: Duration = Duration::from_millis(50);

/// Longest part of an error body quoted in messages.
const BODY_SNIPPET: usize = 300;

/// Where requests go: shared by every session.
#[derive(Debug)]
pub struct Target {
    /// The pooled HTTP client shared by all workers.
    pub client: Client,
    /// The MCP endpoint.
    pub url: Url,
    /// Extra request headers (e.g. `Authorization`).
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    /// MCP revision offered in `initialize`.
    pub protocol_version: String,
}

/// Why one exchange failed.
#[derive(Debug, Clone)]
pub enum CallError {
    /// Non-2xx HTTP status.
    Http {
        /// The status received.
        status: StatusCode,
        /// Start of the response body.
        body: String,
    },
    /// Connection, timeout or body-read failure.
    Transport(String),
    /// The reply was not a well-formed answer to the request.
    Protocol(String),
    /// A JSON-RPC error, or a tool result with `isError: true`.
    Rpc(String),
}

impl CallError {
    /// Human-readable message for a failed `what` (e.g. "initialize") against `url`.
    pub fn describe(&self, what: &str, url: &Url) -> String {
        match self {
            CallError::Http { status, body } => {
                format!("{what} failed: HTTP {} from {url}: {body}", status.as_u16())
            }
            CallError::Transport(m) if m.contains(url.as_str()) => format!("{what} failed: {m}"),
            CallError::Transport(m) => format!("{what} failed: {m} ({url})"),
            CallError::Protocol(m) => format!("{what} failed: {m} (from {url})"),
            CallError::Rpc(m) => format!("{what} failed: {m}"),
        }
    }
}

/// Successful reply to a request.
#[derive(Debug, Default)]
pub struct Reply {
    /// `result.protocolVersion`, present in an `initialize` result.
    pub protocol_version: Option<String>,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    result: Option<ResultProbe>,
    #[serde(default)]
    error: Option<ErrorProbe>,
}

#[derive(Deserialize)]
struct ResultProbe {
    #[serde(rename = "isError", default)]
    is_error: Option<bool>,
    #[serde(rename = "protocolVersion", default)]
    protocol_version: Option<String>,
}

#[derive(Deserialize)]
struct ErrorProbe {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
}

/// What one JSON-RPC message means for a request waiting on `id`.
#[derive(Debug)]
pub enum Classified {
    /// The reply to our request.
    Reply(Result<Reply, CallError>),
    /// Something else (notification, server request, reply to another id).
    Other,
}

/// Classifies one JSON-RPC message received while waiting for the reply to `id`.
pub fn classify(data: &[u8], id: u64) -> Result<Classified, CallError> {
    let probe: Probe = serde_json::from_slice(data).map_err(|e| {
        CallError::Protocol(format!("invalid JSON-RPC message ({e}): {}", snippet(data)))
    })?;
    if probe.result.is_none() && probe.error.is_none() {
        return Ok(Classified::Other);
    }
    let matches = match &probe.id {
        Some(v) => v.as_u64() == Some(id),
        // An error with a null id answers a request the server could not parse: ours.
        None => probe.error.is_some(),
    };
    if !matches {
        return Ok(Classified::Other);
    }
    if let Some(err) = probe.error {
        return Ok(Classified::Reply(Err(CallError::Rpc(format!(
            "JSON-RPC error {}: {}",
            err.code.map_or_else(|| "?".to_string(), |c| c.to_string()),
            err.message.as_deref().unwrap_or("(no message)")
        )))));
    }
    let result = probe.result.unwrap_or(ResultProbe {
        is_error: None,
        protocol_version: None,
    });
    if result.is_error == Some(true) {
        return Ok(Classified::Reply(Err(CallError::Rpc(format!(
            "tool returned isError: {}",
            tool_error_text(data)
        )))));
    }
    Ok(Classified::Reply(Ok(Reply {
        protocol_version: result.protocol_version,
    })))
}

/// Text of a tool error result (`result.content[].text`), for messages.
fn tool_error_text(data: &[u8]) -> String {
    let texts: Vec<String> = serde_json::from_slice::<Value>(data)
        .ok()
        .and_then(|v| v.pointer("/result/content").cloned())
        .and_then(|c| c.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|item| item.get("text").and_then(Value::as_str).map(str::to_owned))
        .collect();
    if texts.is_empty() {
        "(no text content)".to_string()
    } else {
        truncate(texts.join(" "), BODY_SNIPPET)
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Start of a body as a one-line string, for error messages.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.is_empty() {
        "(empty body)".to_string()
    } else {
        truncate(one_line, BODY_SNIPPET)
    }
}

/// Renders an error with its chain of sources ("a: b: c").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = s.source();
    }
    out
}

fn transport(e: reqwest::Error) -> CallError {
    CallError::Transport(error_chain(&e))
}

/// Reads the reply to request `id` from a JSON or SSE response.
pub async fn read_reply(
    mut resp: Response,
    id: u64,
    parser: &mut SseParser,
) -> Result<Reply, CallError> {
    let status = resp.status();
    if !status.is_success() {
        let body = resp.bytes().await.unwrap_or_default();
        return Err(CallError::Http {
            status,
            body: snippet(&body),
        });
    }
    let is_sse = resp
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| {
            let v = v.as_bytes();
            v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream")
        })
        .unwrap_or(false);

    if !is_sse {
        let body = resp.bytes().await.map_err(transport)?;
        if body.is_empty() {
            return Err(CallError::Protocol(format!(
                "empty body (HTTP {}) instead of a JSON-RPC reply",
                status.as_u16()
            )));
        }
        return match classify(&body, id)? {
            Classified::Reply(r) => r,
            Classified::Other => Err(CallError::Protocol(format!(
                "response is not the reply to request id {id}: {}",
                snippet(&body)
            ))),
        };
    }

    parser.reset();
    let mut reply: Option<Result<Reply, CallError>> = None;
    let mut on_event = |data: &[u8]| -> Result<Flow, CallError> {
        if data.iter().all(u8::is_ascii_whitespace) {
            // Priming or keep-alive event.
            return Ok(Flow::Continue);
        }
        match classify(data, id)? {
            Classified::Reply(r) => {
                reply = Some(r);
                Ok(Flow::Stop)
            }
            Classified::Other => Ok(Flow::Continue),
        }
    };
    let mut done = false;
    while !done {
        match resp.chunk().await.map_err(transport)? {
            Some(chunk) => done = parser.push(&chunk, &mut on_event)? == Flow::Stop,
            None => {
                parser.finish(&mut on_event)?;
                break;
            }
        }
    }
    if done {
        // Read the end of the stream so the connection returns to the pool.
        let _ = tokio::time::timeout(SSE_DRAIN_TIMEOUT, async {
            while let Ok(Some(_)) = resp.chunk().await {}
        })
        .await;
    }
    reply.unwrap_or_else(|| {
        Err(CallError::Protocol(format!(
            "SSE stream ended without a reply to request id {id}"
        )))
    })
}

/// One MCP session; workers may share it (ids come from an atomic counter).
#[derive(Debug)]
pub struct Session {
    /// `Mcp-Session-Id` returned by `initialize`, if any.
    session_id: Option<HeaderValue>,
    /// Negotiated protocol version, sent as `MCP-Protocol-Version`.
    protocol_version: HeaderValue,
    /// Next JSON-RPC id.
    next_id: AtomicU64,
}

impl Target {
    fn post(&self, session: Option<&Session>) -> RequestBuilder {
        let mut rb = self
            .client
            .post(self.url.clone())
            .header(ACCEPT, ACCEPT_BOTH)
            .header(CONTENT_TYPE, APPLICATION_JSON);
        if let Some(s) = session {
            rb = rb.header(MCP_PROTOCOL_VERSION, s.protocol_version.clone());
            if let Some(sid) = &s.session_id {
                rb = rb.header(MCP_SESSION_ID, sid.clone());
            }
        }
        for (k, v) in &self.extra_headers {
            rb = rb.header(k.clone(), v.clone());
        }
        rb
    }

    /// Opens a session: `initialize`, then `notifications/initialized`.
    pub async fn open_session(&self, parser: &mut SseParser) -> anyhow::Result<Session> {
        let init = serde_json::json!({
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": self.protocol_version,
                "capabilities": {},
                "clientInfo": {"name": "meshgate-bench", "version": env!("CARGO_PKG_VERSION")},
            },
        });
        let fail = |e: CallError| anyhow::anyhow!(e.describe("initialize", &self.url));
        let resp = self
            .post(None)
            .body(init.to_string())
            .send()
            .await
            .map_err(|e| fail(transport(e)))?;
        let session_id = resp.headers().get(MCP_SESSION_ID).cloned();
        let reply = read_reply(resp, 0, parser).await.map_err(fail)?;
        let protocol_version = reply
            .protocol_version
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
            .unwrap_or(HeaderValue::from_static(PROTOCOL_VERSION));
        let session = Session {
            session_id,
            protocol_version,
            next_id: AtomicU64::new(1),
        };

        let fail =
            |e: CallError| anyhow::anyhow!(e.describe("notifications/initialized", &self.url));
        let resp = self
            .post(Some(&session))
            .body(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .send()
            .await
            .map_err(|e| fail(transport(e)))?;
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        if !status.is_success() {
            return Err(fail(CallError::Http {
                status,
                body: snippet(&body),
            }));
        }
        Ok(session)
    }

    /// Sends one `tools/call` whose body is `prefix` + id + `}` and waits for its reply.
    pub async fn call(
        &self,
        session: &Session,
        prefix: &[u8],
        parser: &mut SseParser,
    ) -> Result<(), CallError> {
        let id = session.next_id.fetch_add(1, Ordering::Relaxed);
        let mut body = Vec::with_capacity(prefix.len() + 24);
        body.extend_from_slice(prefix);
        // Writing into a Vec cannot fail.
        let _ = write!(body, "{id}}}");
        let resp = self
            .post(Some(session))
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        read_reply(resp, id, parser).await.map(|_| ())
    }

    /// Ends a session with `DELETE` (errors ignored: servers may not support it).
    pub async fn close_session(&self, session: &Session) {
        let Some(sid) = &session.session_id else {
            return;
        };
        let mut rb = self
            .client
            .delete(self.url.clone())
            .header(MCP_SESSION_ID, sid.clone())
            .header(MCP_PROTOCOL_VERSION, session.protocol_version.clone());
        for (k, v) in &self.extra_headers {
            rb = rb.header(k.clone(), v.clone());
        }
        if let Ok(resp) = rb.timeout(Duration::from_secs(5)).send().await {
            let _ = resp.bytes().await;
        }
    }
}

/// Pre-serialised start of a `tools/call` request body; the id and closing brace follow.
pub fn call_prefix(tool: &str, arguments: &Value) -> Vec<u8> {
    let params = serde_json::json!({"name": tool, "arguments": arguments});
    format!(r#"{{"jsonrpc":"2.0","method":"tools/call","params":{params},"id":"#).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(data: &str, id: u64) -> Option<Result<Reply, CallError>> {
        match classify(data.as_bytes(), id) {
            Ok(Classified::Reply(r)) => Some(r),
            Ok(Classified::Other) => None,
            Err(e) => Some(Err(e)),
        }
    }

    #[test]
    fn ok_result() {
        let r = reply(
            r#"{"jsonrpc":"2.0","id":5,"result":{"content":[{"type":"text","text":"Echo: hello"}]}}"#,
            5,
        );
        assert!(matches!(r, Some(Ok(_))));
    }

    #[test]
    fn other_id_and_notifications_are_skipped() {
        assert!(reply(r#"{"jsonrpc":"2.0","id":4,"result":{}}"#, 5).is_none());
        assert!(
            reply(
                r#"{"jsonrpc":"2.0","method":"notifications/message","params":{}}"#,
                5
            )
            .is_none()
        );
        assert!(reply(r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#, 5).is_none());
    }

    #[test]
    fn rpc_error_is_an_error() {
        let r = reply(
            r#"{"jsonrpc":"2.0","id":5,"error":{"code":-32602,"message":"Unknown tool: nope"}}"#,
            5,
        );
        match r {
            Some(Err(CallError::Rpc(m))) => {
                assert_eq!(m, "JSON-RPC error -32602: Unknown tool: nope")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn null_id_error_is_ours() {
        let r = reply(
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}"#,
            5,
        );
        assert!(matches!(r, Some(Err(CallError::Rpc(_)))));
    }

    #[test]
    fn is_error_result_is_an_error() {
        let r = reply(
            r#"{"jsonrpc":"2.0","id":5,"result":{"isError":true,"content":[{"type":"text","text":"boom"}]}}"#,
            5,
        );
        match r {
            Some(Err(CallError::Rpc(m))) => assert_eq!(m, "tool returned isError: boom"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn initialize_version_is_read() {
        let r = reply(
            r#"{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-03-26","capabilities":{}}}"#,
            0,
        );
        match r {
            Some(Ok(rep)) => assert_eq!(rep.protocol_version.as_deref(), Some("2025-03-26")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn invalid_json_is_protocol_error() {
        assert!(matches!(
            reply("not json", 1),
            Some(Err(CallError::Protocol(_)))
        ));
    }

    #[test]
    fn prefix_builds_valid_request() {
        let args = serde_json::json!({"message": "hi \"there\""});
        let mut body = call_prefix("echo", &args);
        body.extend_from_slice(b"42}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], 42);
        assert_eq!(v["method"], "tools/call");
        assert_eq!(v["params"]["name"], "echo");
        assert_eq!(v["params"]["arguments"], args);
    }

    #[test]
    fn describe_http_error() {
        let url = Url::parse("http://127.0.0.1:1/mcp").unwrap();
        let e = CallError::Http {
            status: StatusCode::UNAUTHORIZED,
            body: "nope".into(),
        };
        assert_eq!(
            e.describe("initialize", &url),
            "initialize failed: HTTP 401 from http://127.0.0.1:1/mcp: nope"
        );
    }

    #[test]
    fn snippet_truncates_and_flattens() {
        assert_eq!(snippet(b""), "(empty body)");
        assert_eq!(snippet(b"a\nb"), "a b");
        let long = vec![b'x'; 1000];
        assert!(snippet(&long).chars().count() <= BODY_SNIPPET + 1);
    }
}
