//! A cheap structural check of one JSON-RPC 2.0 message, run on the raw request
//! body before the MCP layer sees it, so that malformed input gets a JSON-RPC
//! error that names the problem instead of a bare transport failure.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use thiserror::Error;

/// Standard JSON-RPC 2.0 error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonRpcCode {
    /// -32700: the body is not JSON.
    ParseError,
    /// -32600: JSON, but not a valid JSON-RPC message.
    InvalidRequest,
}

impl JsonRpcCode {
    /// The numeric code on the wire.
    pub fn code(self) -> i32 {
        match self {
            JsonRpcCode::ParseError => -32700,
            JsonRpcCode::InvalidRequest => -32600,
        }
    }
}

/// Why a message body is not an acceptable JSON-RPC 2.0 message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvelopeError {
    /// Not JSON at all.
    #[error("request body is not valid JSON ({0}); send one JSON-RPC 2.0 object per request")]
    NotJson(String),
    /// A JSON array (a batch).
    #[error(
        "JSON-RPC batches are not supported (they were removed from MCP in 2025-06-18); send one message per request"
    )]
    Batch,
    /// JSON, but not an object.
    #[error("expected a JSON-RPC 2.0 object, got {0}")]
    NotObject(&'static str),
    /// `jsonrpc` missing or not "2.0".
    #[error("the `jsonrpc` member must be the string \"2.0\", got {0}")]
    BadVersion(String),
    /// `method` present but not a string.
    #[error("the `method` member must be a string, got {0}")]
    BadMethod(String),
    /// `id` of a type JSON-RPC does not allow.
    #[error("the `id` member must be a string or an integer, got {0}")]
    BadId(String),
    /// Neither a request, a notification nor a response.
    #[error("message has no `method`, `result` or `error`; it is neither a request nor a response")]
    NoKind,
}

impl EnvelopeError {
    /// The JSON-RPC code this error maps to.
    pub fn code(&self) -> JsonRpcCode {
        match self {
            EnvelopeError::NotJson(_) => JsonRpcCode::ParseError,
            _ => JsonRpcCode::InvalidRequest,
        }
    }
}

/// What the check learned about a well-formed message.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The request id, if any.
    pub id: Option<Value>,
    /// The method, for requests and notifications.
    pub method: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    jsonrpc: Option<Value>,
    id: Option<Value>,
    method: Option<Value>,
    result: Option<IgnoredAny>,
    error: Option<IgnoredAny>,
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn shown(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 40 {
        let mut cut = 40;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Checks that `body` holds exactly one JSON-RPC 2.0 message.
///
/// On failure also returns the request id when it could be read, so the error
/// response can be correlated.
pub fn check_envelope(body: &[u8]) -> Result<Envelope, (EnvelopeError, Option<Value>)> {
    // serde skips ignored members without checking their UTF-8, so check
    // the whole body first (found by the `jsonrpc_parse` fuzz target).
    if let Err(e) = std::str::from_utf8(body) {
        return Err((
            EnvelopeError::NotJson(format!("invalid UTF-8 at byte {}", e.valid_up_to())),
            None,
        ));
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'[') {
        // Still report invalid JSON before calling it a batch.
        return match serde_json::from_slice::<IgnoredAny>(body) {
            Ok(_) => Err((EnvelopeError::Batch, None)),
            Err(e) => Err((EnvelopeError::NotJson(e.to_string()), None)),
        };
    }
    if first != Some(b'{') {
        return match serde_json::from_slice::<Value>(body) {
            Ok(v) => Err((EnvelopeError::NotObject(kind_of(&v)), None)),
            Err(e) => Err((EnvelopeError::NotJson(e.to_string()), None)),
        };
    }
    let raw: Raw =
        serde_json::from_slice(body).map_err(|e| (EnvelopeError::NotJson(e.to_string()), None))?;
    let id = match raw.id {
        Some(Value::String(_)) | None => raw.id,
        Some(Value::Number(ref n)) if n.is_i64() || n.is_u64() => raw.id,
        Some(Value::Null) => None,
        Some(other) => return Err((EnvelopeError::BadId(shown(&other)), None)),
    };
    match raw.jsonrpc {
        Some(Value::String(ref s)) if s == "2.0" => {}
        Some(other) => return Err((EnvelopeError::BadVersion(shown(&other)), id)),
        None => {
            return Err((
                EnvelopeError::BadVersion("nothing (member missing)".into()),
                id,
            ));
        }
    }
    let method = match raw.method {
        Some(Value::String(m)) => Some(m),
        Some(other) => return Err((EnvelopeError::BadMethod(shown(&other)), id)),
        None => None,
    };
    if method.is_none() && raw.result.is_none() && raw.error.is_none() {
        return Err((EnvelopeError::NoKind, id));
    }
    Ok(Envelope { id, method })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn accepts_request_notification_and_response() {
        let r = check_envelope(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#).unwrap();
        assert_eq!(r.method.as_deref(), Some("ping"));
        assert_eq!(r.id, Some(json!(1)));
        assert!(
            check_envelope(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).is_ok()
        );
        assert!(check_envelope(br#"{"jsonrpc":"2.0","id":"a","result":{}}"#).is_ok());
    }

    #[test]
    fn invalid_utf8_in_a_skipped_member_is_a_parse_error() {
        let mut body = br#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":"??"}}"#.to_vec();
        let at = body.iter().position(|b| *b == b'?').unwrap();
        body[at] = 0xFF;
        let (e, _) = check_envelope(&body).unwrap_err();
        assert_eq!(e.code(), JsonRpcCode::ParseError);
        assert!(e.to_string().contains("invalid UTF-8 at byte"), "{e}");
    }

    #[test]
    fn malformed_json_is_a_parse_error() {
        let (e, _) = check_envelope(b"{not json").unwrap_err();
        assert_eq!(e.code(), JsonRpcCode::ParseError);
        assert!(e.to_string().contains("not valid JSON"));
    }

    #[test]
    fn wrong_jsonrpc_field_names_the_value_and_keeps_the_id() {
        let (e, id) = check_envelope(br#"{"jsonrpc":"1.0","id":7,"method":"ping"}"#).unwrap_err();
        assert_eq!(e.code(), JsonRpcCode::InvalidRequest);
        assert!(e.to_string().contains("\"1.0\""), "{e}");
        assert_eq!(id, Some(json!(7)));
        let (e, _) = check_envelope(br#"{"id":7,"method":"ping"}"#).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn batches_and_scalars_are_refused_with_a_reason() {
        assert_eq!(check_envelope(b"[{}]").unwrap_err().0, EnvelopeError::Batch);
        assert_eq!(
            check_envelope(b"42").unwrap_err().0,
            EnvelopeError::NotObject("a number")
        );
        assert!(matches!(
            check_envelope(b"").unwrap_err().0,
            EnvelopeError::NotJson(_)
        ));
    }

    #[test]
    fn bad_id_and_method_types_are_named() {
        let (e, _) = check_envelope(br#"{"jsonrpc":"2.0","id":{"a":1},"method":"x"}"#).unwrap_err();
        assert!(matches!(e, EnvelopeError::BadId(_)));
        let (e, _) = check_envelope(br#"{"jsonrpc":"2.0","id":1,"method":5}"#).unwrap_err();
        assert!(matches!(e, EnvelopeError::BadMethod(_)));
        let (e, _) = check_envelope(br#"{"jsonrpc":"2.0","id":1}"#).unwrap_err();
        assert_eq!(e, EnvelopeError::NoKind);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = check_envelope(&bytes);
        }
    }
}
