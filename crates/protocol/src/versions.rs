//! MCP protocol revisions the gateway speaks and the negotiation rules: the
//! lifecycle section of the session-based revisions (`initialize`) and the
//! per-request version of 2026-07-28 (`UnsupportedProtocolVersionError`).

use std::fmt;

/// One published revision of the MCP specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolRevision {
    /// 2024-11-05: the legacy HTTP+SSE transport.
    V2024_11_05,
    /// 2025-03-26: Streamable HTTP, batching.
    V2025_03_26,
    /// 2025-06-18: structured output, elicitation, no batching.
    V2025_06_18,
    /// 2025-11-25: the newest session-based revision.
    V2025_11_25,
    /// 2026-07-28: stateless; the version, client capabilities and client
    /// info travel in every request's `_meta`, no `initialize`, no sessions.
    V2026_07_28,
}

/// JSON-RPC code of `UnsupportedProtocolVersionError` (2026-07-28).
pub const UNSUPPORTED_PROTOCOL_VERSION: i32 = -32022;

/// JSON-RPC code of `MissingRequiredClientCapabilityError` (2026-07-28).
pub const MISSING_REQUIRED_CLIENT_CAPABILITY: i32 = -32021;

impl ProtocolRevision {
    /// Every revision the gateway serves, oldest first.
    pub const ALL: [ProtocolRevision; 5] = [
        ProtocolRevision::V2024_11_05,
        ProtocolRevision::V2025_03_26,
        ProtocolRevision::V2025_06_18,
        ProtocolRevision::V2025_11_25,
        ProtocolRevision::V2026_07_28,
    ];

    /// Every revision negotiated through `initialize`, oldest first.
    pub const SESSION_BASED: [ProtocolRevision; 4] = [
        ProtocolRevision::V2024_11_05,
        ProtocolRevision::V2025_03_26,
        ProtocolRevision::V2025_06_18,
        ProtocolRevision::V2025_11_25,
    ];

    /// The newest revision negotiated through `initialize`.
    pub const LATEST: ProtocolRevision = ProtocolRevision::V2025_11_25;

    /// The newest revision served (per request, without a session).
    pub const NEWEST: ProtocolRevision = ProtocolRevision::V2026_07_28;

    /// The revision string as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolRevision::V2024_11_05 => "2024-11-05",
            ProtocolRevision::V2025_03_26 => "2025-03-26",
            ProtocolRevision::V2025_06_18 => "2025-06-18",
            ProtocolRevision::V2025_11_25 => "2025-11-25",
            ProtocolRevision::V2026_07_28 => "2026-07-28",
        }
    }

    /// Parses a wire revision string; `None` for anything the gateway does not speak.
    pub fn parse(s: &str) -> Option<ProtocolRevision> {
        ProtocolRevision::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether the revision is negotiated through `initialize` and served
    /// over a session (everything before 2026-07-28).
    pub fn is_session_based(self) -> bool {
        self < ProtocolRevision::V2026_07_28
    }

    /// The wire strings of every supported revision, for error messages.
    pub fn supported_list() -> String {
        ProtocolRevision::ALL
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for ProtocolRevision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Picks the revision to answer an `initialize` with.
///
/// Per the lifecycle rules: if the server supports the requested revision it
/// answers with the same one; otherwise it answers with the latest it supports
/// and the client decides whether to continue. 2026-07-28 has no
/// `initialize`, so asking for it there gets the latest session-based one.
pub fn negotiate_revision(requested: &str) -> ProtocolRevision {
    ProtocolRevision::parse(requested)
        .filter(|r| r.is_session_based())
        .unwrap_or(ProtocolRevision::LATEST)
}

/// The JSON-RPC `error` object of an `UnsupportedProtocolVersionError` for
/// `requested`: code -32022, `data` listing what is supported (newest first,
/// as the specification's example does) and what was requested.
pub fn unsupported_version_error(requested: &str) -> serde_json::Value {
    let supported: Vec<&str> = ProtocolRevision::ALL
        .iter()
        .rev()
        .map(|r| r.as_str())
        .collect();
    serde_json::json!({
        "code": UNSUPPORTED_PROTOCOL_VERSION,
        "message": format!(
            "Unsupported protocol version: `{requested}`; this gateway speaks {} (2026-07-28 per request in _meta, the others through initialize)",
            supported.join(", ")
        ),
        "data": {"supported": supported, "requested": requested},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_revision_is_echoed() {
        for r in ProtocolRevision::SESSION_BASED {
            assert_eq!(negotiate_revision(r.as_str()), r);
        }
    }

    #[test]
    fn unknown_revision_gets_latest() {
        assert_eq!(negotiate_revision("1999-01-01"), ProtocolRevision::LATEST);
        assert_eq!(negotiate_revision(""), ProtocolRevision::LATEST);
    }

    #[test]
    fn initialize_asking_for_the_stateless_revision_gets_the_latest_session_based_one() {
        assert_eq!(negotiate_revision("2026-07-28"), ProtocolRevision::LATEST);
    }

    #[test]
    fn stateless_revision_parses_and_is_not_session_based() {
        let r = ProtocolRevision::parse("2026-07-28");
        assert_eq!(r, Some(ProtocolRevision::V2026_07_28));
        assert!(!ProtocolRevision::V2026_07_28.is_session_based());
        assert!(
            ProtocolRevision::SESSION_BASED
                .iter()
                .all(|r| r.is_session_based())
        );
        assert!(ProtocolRevision::supported_list().ends_with("2026-07-28"));
    }

    #[test]
    fn unsupported_version_error_lists_supported_and_requested() {
        let e = unsupported_version_error("1900-01-01");
        assert_eq!(e["code"], -32022);
        assert_eq!(e["data"]["requested"], "1900-01-01");
        assert_eq!(e["data"]["supported"][0], "2026-07-28");
        assert_eq!(e["data"]["supported"].as_array().map(Vec::len), Some(5));
    }
}
