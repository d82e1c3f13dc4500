//! The SDK's error type and the protocol's error codes.

use std::time::Duration;

use serde_json::Value;

/// The JSON-RPC error codes of the agent protocol (`docs/agent-protocol.md`,
/// "Error codes").
pub mod codes {
    /// Not JSON, not JSON-RPC 2.0, or a request before `agent.register`.
    pub const INVALID_MESSAGE: i64 = 4000;
    /// The credential is missing, wrong, expired or revoked, or lacks scope.
    pub const AUTHENTICATION_FAILED: i64 = 4001;
    /// Too many messages; `data.retry_after_ms` says when to try again.
    pub const RATE_LIMITED: i64 = 4002;
    /// The gateway failed (for example its store); retry later.
    pub const SERVER_ERROR: i64 = 4003;
    /// An unknown method; `data.method` names it.
    pub const METHOD_NOT_FOUND: i64 = 4004;
    /// A missing or wrong field; `data.field` names it.
    pub const INVALID_PARAMS: i64 = 4005;
    /// Progress or completion of a task that was cancelled.
    pub const OPERATION_CANCELLED: i64 = 4006;
    /// A result over the gateway's `mesh.max_result_bytes`.
    pub const CONTEXT_TOO_LARGE: i64 = 4007;
    /// The agent id is connected elsewhere, or the task is not assigned to
    /// this agent.
    pub const CONFLICT: i64 = 4008;
}

/// What went wrong while connecting, registering or talking to the gateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The gateway refused the WebSocket upgrade with an HTTP answer.
    /// 400, 401 and 403 are final (fix the key, its scopes or the agent's
    /// id and type); other statuses, such as 503 while the gateway shuts
    /// down, are retried.
    #[error("the gateway refused the connection with HTTP {status}{}: {message}", code_suffix(*.code))]
    Refused {
        /// The HTTP status of the refusal.
        status: u16,
        /// The meshgate error code from the JSON body, if it had one.
        code: Option<i64>,
        /// The message from the JSON body (or the body itself).
        message: String,
    },
    /// The gateway answered a request with a JSON-RPC error.
    #[error("the gateway answered with error {code}: {message}")]
    Rpc {
        /// The error code, one of [`codes`].
        code: i64,
        /// What was wrong and what to do.
        message: String,
        /// Details such as `field` or `retry_after_ms`.
        data: Option<Value>,
    },
    /// The connection could not be made, or broke.
    #[error("the connection to the gateway failed: {0}")]
    Connection(String),
    /// The connection closed before the answer to a request arrived.
    #[error("the connection to the gateway closed before the answer arrived")]
    Closed,
    /// There is no registered connection right now (the SDK is reconnecting).
    #[error("not connected to the gateway right now (reconnecting); try again later")]
    NotConnected,
    /// The gateway did not answer a request in time.
    #[error("the gateway did not answer `{method}` within {timeout:?}")]
    Timeout {
        /// The method of the unanswered request.
        method: String,
        /// How long the SDK waited.
        timeout: Duration,
    },
    /// The agent's options are unusable; the message names the option.
    #[error("invalid agent options: {0}")]
    InvalidOptions(String),
    /// The gateway sent something the protocol does not allow.
    #[error("the gateway broke the agent protocol: {0}")]
    Protocol(String),
}

fn code_suffix(code: Option<i64>) -> String {
    code.map(|c| format!(" (code {c})")).unwrap_or_default()
}

impl AgentError {
    /// Whether trying again later (with backoff) can succeed. `run` stops
    /// with the errors for which this is false.
    pub fn is_retryable(&self) -> bool {
        match self {
            AgentError::Refused { status, .. } => !matches!(status, 400 | 401 | 403),
            AgentError::Rpc { code, .. } => matches!(
                *code,
                codes::RATE_LIMITED | codes::SERVER_ERROR | codes::CONFLICT
            ),
            AgentError::Connection(_)
            | AgentError::Closed
            | AgentError::NotConnected
            | AgentError::Timeout { .. }
            | AgentError::Protocol(_) => true,
            AgentError::InvalidOptions(_) => false,
        }
    }

    /// The meshgate error code, for refusals that carried one and JSON-RPC
    /// errors.
    pub fn code(&self) -> Option<i64> {
        match self {
            AgentError::Refused { code, .. } => *code,
            AgentError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Builds the error for a JSON-RPC `error` object; a malformed object
    /// still yields an error that says so.
    pub(crate) fn from_rpc_error(error: &Value) -> Self {
        let code = error.get("code").and_then(Value::as_i64);
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("(no message)")
            .to_string();
        match code {
            Some(code) => AgentError::Rpc {
                code,
                message,
                data: error.get("data").filter(|d| !d.is_null()).cloned(),
            },
            None => {
                AgentError::Protocol(format!("an error answer without a numeric code: {error}"))
            }
        }
    }

    /// Builds the error for an HTTP refusal of the upgrade from its status
    /// and whatever of its body arrived with the headers.
    pub(crate) fn from_refusal(status: u16, body: Option<&[u8]>) -> Self {
        let body = body.unwrap_or_default();
        let (code, message) = match parse_error_body(body) {
            Some(parsed) => parsed,
            None => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                let message = if text.is_empty() {
                    http_reason(status).to_string()
                } else {
                    truncate(text, 300)
                };
                (None, message)
            }
        };
        AgentError::Refused {
            status,
            code,
            message,
        }
    }
}

/// Reads `{"error": {"code", "message"}}`. The body may be chunked, so when
/// the whole does not parse, the outermost `{…}` inside it is tried.
fn parse_error_body(body: &[u8]) -> Option<(Option<i64>, String)> {
    let value: Value = serde_json::from_slice(body).ok().or_else(|| {
        let start = body.iter().position(|b| *b == b'{')?;
        let end = body.iter().rposition(|b| *b == b'}')?;
        serde_json::from_slice(body.get(start..=end)?).ok()
    })?;
    let error = value.get("error")?;
    let code = error.get("code").and_then(Value::as_i64);
    let message = match error.get("message").and_then(Value::as_str) {
        Some(message) => message.to_string(),
        None => error.as_str()?.to_string(),
    };
    Some((code, message))
}

fn http_reason(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not found (is the URL's path /ws?)",
        503 => "service unavailable",
        _ => "no explanation in the answer",
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refusal_body_gives_code_and_message() {
        let body = br#"{"error":{"code":4001,"message":"the API key was revoked"}}"#;
        let err = AgentError::from_refusal(401, Some(body));
        match &err {
            AgentError::Refused {
                status,
                code,
                message,
            } => {
                assert_eq!(*status, 401);
                assert_eq!(*code, Some(4001));
                assert_eq!(message, "the API key was revoked");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "the gateway refused the connection with HTTP 401 (code 4001): the API key was revoked"
        );
    }

    #[test]
    fn chunked_refusal_body_is_still_read() {
        let body =
            b"3a\r\n{\"error\":{\"code\":4005,\"message\":\"X-Agent-ID is missing\"}}\r\n0\r\n\r\n";
        let err = AgentError::from_refusal(400, Some(body));
        assert_eq!(err.code(), Some(4005));
        assert!(err.to_string().contains("X-Agent-ID is missing"));
    }

    #[test]
    fn refusal_without_json_body_uses_text_or_reason() {
        let err = AgentError::from_refusal(502, Some(b"Bad Gateway"));
        assert_eq!(err.code(), None);
        assert!(err.to_string().ends_with("HTTP 502: Bad Gateway"), "{err}");
        let err = AgentError::from_refusal(403, None);
        assert!(err.to_string().ends_with("HTTP 403: forbidden"), "{err}");
    }

    #[test]
    fn auth_and_bad_request_refusals_are_final_others_retried() {
        for status in [400, 401, 403] {
            assert!(
                !AgentError::from_refusal(status, None).is_retryable(),
                "{status}"
            );
        }
        for status in [404, 429, 500, 502, 503] {
            assert!(
                AgentError::from_refusal(status, None).is_retryable(),
                "{status}"
            );
        }
    }

    #[test]
    fn rpc_errors_map_code_message_and_data() {
        let err = AgentError::from_rpc_error(&json!({
            "code": 4005, "message": "capabilities[2].confidence must be in 0..=1",
            "data": {"field": "capabilities[2].confidence"}
        }));
        match &err {
            AgentError::Rpc {
                code,
                message,
                data,
            } => {
                assert_eq!(*code, 4005);
                assert!(message.starts_with("capabilities[2]"));
                assert_eq!(
                    data.as_ref().and_then(|d| d.get("field")),
                    Some(&json!("capabilities[2].confidence"))
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!err.is_retryable());
    }

    #[test]
    fn conflict_rate_limit_and_server_errors_are_retried_at_registration() {
        for code in [codes::CONFLICT, codes::RATE_LIMITED, codes::SERVER_ERROR] {
            let err = AgentError::from_rpc_error(&json!({"code": code, "message": "x"}));
            assert!(err.is_retryable(), "{code}");
        }
        for code in [
            codes::INVALID_MESSAGE,
            codes::AUTHENTICATION_FAILED,
            codes::INVALID_PARAMS,
        ] {
            let err = AgentError::from_rpc_error(&json!({"code": code, "message": "x"}));
            assert!(!err.is_retryable(), "{code}");
        }
    }

    #[test]
    fn error_answer_without_code_is_a_protocol_error() {
        let err = AgentError::from_rpc_error(&json!({"message": "oops"}));
        assert!(matches!(err, AgentError::Protocol(_)));
    }

    #[test]
    fn connection_problems_are_retried_option_problems_are_not() {
        assert!(AgentError::Connection("refused".into()).is_retryable());
        assert!(AgentError::Closed.is_retryable());
        assert!(!AgentError::InvalidOptions("id".into()).is_retryable());
    }
}
