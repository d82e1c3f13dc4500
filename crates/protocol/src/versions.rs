//! MCP protocol revisions the gateway speaks and the negotiation rule from the
//! lifecycle section of the specification.

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
}

impl ProtocolRevision {
    /// Every session-based revision, oldest first.
    pub const ALL: [ProtocolRevision; 4] = [
        ProtocolRevision::V2024_11_05,
        ProtocolRevision::V2025_03_26,
        ProtocolRevision::V2025_06_18,
        ProtocolRevision::V2025_11_25,
    ];

    /// The newest revision negotiated through `initialize`.
    pub const LATEST: ProtocolRevision = ProtocolRevision::V2025_11_25;

    /// The revision string as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolRevision::V2024_11_05 => "2024-11-05",
            ProtocolRevision::V2025_03_26 => "2025-03-26",
            ProtocolRevision::V2025_06_18 => "2025-06-18",
            ProtocolRevision::V2025_11_25 => "2025-11-25",
        }
    }

    /// Parses a wire revision string; `None` for anything the gateway does not speak.
    pub fn parse(s: &str) -> Option<ProtocolRevision> {
        ProtocolRevision::ALL.into_iter().find(|r| r.as_str() == s)
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
/// and the client decides whether to continue.
pub fn negotiate_revision(requested: &str) -> ProtocolRevision {
    ProtocolRevision::parse(requested).unwrap_or(ProtocolRevision::LATEST)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_revision_is_echoed() {
        for r in ProtocolRevision::ALL {
            assert_eq!(negotiate_revision(r.as_str()), r);
        }
    }

    #[test]
    fn unknown_revision_gets_latest() {
        assert_eq!(negotiate_revision("1999-01-01"), ProtocolRevision::LATEST);
        assert_eq!(negotiate_revision(""), ProtocolRevision::LATEST);
    }
}
