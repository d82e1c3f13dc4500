//! Which browser origins may call the gateway: the `Origin` check that the
//! MCP transport specification requires against DNS rebinding, and the
//! allow-list CORS answers are built from. Pure: the server's layer passes
//! the request's `Origin` and `Host` headers in.
//!
//! A request is allowed when it has no `Origin` (not a browser), when its
//! origin is the gateway itself (the origin's host and port equal the
//! `Host` header, which `mcp.allowed_hosts` already vetted), when the
//! origin's host is one of `mcp.allowed_hosts` (a local page on another
//! port), or when it matches an entry of `mcp.allowed_origins`.

/// A parsed origin: scheme, lower-case host (IPv6 without brackets), port
/// (the scheme's default when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `http` or `https` (other schemes parse, and match only exactly).
    pub scheme: String,
    /// Host name or address, lower case.
    pub host: String,
    /// Explicit or default port.
    pub port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Splits `host[:port]` (IPv6 in brackets); `None` if malformed. The port
/// `*` comes back as `Err(())` in the second place so patterns can use it.
fn split_host_port(s: &str) -> Option<(String, Result<Option<u16>, ()>)> {
    let (host, rest) = if let Some(inner) = s.strip_prefix('[') {
        let end = inner.find(']')?;
        (&inner[..end], &inner[end + 1..])
    } else {
        match s.rfind(':') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        }
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | '@' | '?' | '#'))
    {
        return None;
    }
    let port = match rest {
        "" => Ok(None),
        ":*" => Err(()),
        p => Ok(Some(p.strip_prefix(':')?.parse::<u16>().ok()?)),
    };
    Some((host.to_ascii_lowercase(), port))
}

impl Origin {
    /// Parses an `Origin` header value (`scheme://host[:port]`). `null` and
    /// anything with a path, user info or bad port give `None`.
    pub fn parse(value: &str) -> Option<Origin> {
        let (scheme, rest) = value.trim().split_once("://")?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return None;
        }
        let scheme = scheme.to_ascii_lowercase();
        let (host, port) = split_host_port(rest)?;
        let port = port.ok()?.or_else(|| default_port(&scheme));
        Some(Origin { scheme, host, port })
    }
}

/// One entry of `mcp.allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// `*`: every origin.
    Any,
    /// `null`: the opaque origin of sandboxed pages and files.
    Null,
    /// `scheme://host[:port|:*]`.
    Exact {
        scheme: String,
        host: String,
        /// `None`: any port (`:*`).
        port: Option<Option<u16>>,
    },
}

/// The compiled origin rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    hosts: Vec<String>,
    any_host: bool,
    patterns: Vec<Pattern>,
}

/// Why an origin was allowed, or that it was not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginDecision {
    /// No `Origin` header: not a browser.
    NoOrigin,
    /// The origin is the gateway itself.
    SameOrigin,
    /// Another origin the rules allow: answer with CORS headers.
    CrossOrigin,
    /// Refused.
    Refused,
}

impl OriginPolicy {
    /// Compiles `allowed_hosts` (as in `mcp.allowed_hosts`, `*` for any)
    /// and `allowed_origins`; an entry that does not parse is an error
    /// naming it.
    pub fn new(
        allowed_hosts: &[String],
        allowed_origins: &[String],
    ) -> Result<OriginPolicy, String> {
        let mut patterns = Vec::new();
        for entry in allowed_origins {
            let e = entry.trim();
            let pattern = match e {
                "*" => Pattern::Any,
                "null" => Pattern::Null,
                _ => {
                    let bad = || {
                        format!(
                            "`{entry}` is not an origin; write scheme://host[:port] (port `*` for any), `null` or `*`"
                        )
                    };
                    let (scheme, rest) = e.split_once("://").ok_or_else(bad)?;
                    if scheme.is_empty() {
                        return Err(bad());
                    }
                    let scheme = scheme.to_ascii_lowercase();
                    let (host, port) = split_host_port(rest).ok_or_else(bad)?;
                    let port = match port {
                        Err(()) => None,
                        Ok(p) => Some(p.or_else(|| default_port(&scheme))),
                    };
                    Pattern::Exact { scheme, host, port }
                }
            };
            patterns.push(pattern);
        }
        let any_host = allowed_hosts.iter().any(|h| h.trim() == "*");
        let hosts = allowed_hosts
            .iter()
            .map(|h| {
                let h = h.trim().to_ascii_lowercase();
                h.strip_prefix('[')
                    .and_then(|x| x.strip_suffix(']'))
                    .map(str::to_owned)
                    .unwrap_or(h)
            })
            .collect();
        Ok(OriginPolicy {
            hosts,
            any_host,
            patterns,
        })
    }

    /// Allows no browser origin but the gateway's own.
    pub fn strict() -> OriginPolicy {
        OriginPolicy {
            hosts: Vec::new(),
            any_host: false,
            patterns: Vec::new(),
        }
    }

    /// Decides on a request's `Origin` (`None`: absent) given its `Host`.
    pub fn decide(&self, origin: Option<&str>, host: Option<&str>) -> OriginDecision {
        let Some(value) = origin else {
            return OriginDecision::NoOrigin;
        };
        let value = value.trim();
        if value == "null" {
            return if self
                .patterns
                .iter()
                .any(|p| matches!(p, Pattern::Any | Pattern::Null))
            {
                OriginDecision::CrossOrigin
            } else {
                OriginDecision::Refused
            };
        }
        let Some(o) = Origin::parse(value) else {
            return OriginDecision::Refused;
        };
        if let Some((h, p)) = host.and_then(split_host_port)
            && h == o.host
            && p.ok().flatten().or_else(|| default_port(&o.scheme)) == o.port
        {
            return OriginDecision::SameOrigin;
        }
        let listed = self.patterns.iter().any(|p| match p {
            Pattern::Any => true,
            Pattern::Null => false,
            Pattern::Exact { scheme, host, port } => {
                *scheme == o.scheme && *host == o.host && port.is_none_or(|p| p == o.port)
            }
        });
        if listed || (!self.any_host && self.hosts.contains(&o.host)) {
            OriginDecision::CrossOrigin
        } else {
            OriginDecision::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(origins: &[&str]) -> OriginPolicy {
        let hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
        let origins: Vec<String> = origins.iter().map(|s| (*s).to_owned()).collect();
        OriginPolicy::new(&hosts, &origins).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn origins_parse_with_default_ports() {
        let o = Origin::parse("HTTPS://App.Example.com").unwrap();
        assert_eq!(
            (o.scheme.as_str(), o.host.as_str(), o.port),
            ("https", "app.example.com", Some(443))
        );
        let o = Origin::parse("http://[::1]:3000").unwrap();
        assert_eq!((o.host.as_str(), o.port), ("::1", Some(3000)));
        assert!(Origin::parse("null").is_none());
        assert!(Origin::parse("http://a.com/path").is_none());
        assert!(Origin::parse("http://user@a.com").is_none());
        assert!(Origin::parse("http://a.com:99999").is_none());
    }

    #[test]
    fn no_origin_same_origin_and_local_pages_pass() {
        let p = policy(&[]);
        assert_eq!(
            p.decide(None, Some("localhost:8080")),
            OriginDecision::NoOrigin
        );
        assert_eq!(
            p.decide(Some("http://localhost:8080"), Some("localhost:8080")),
            OriginDecision::SameOrigin
        );
        assert_eq!(
            p.decide(Some("http://mcp.example.com"), Some("mcp.example.com")),
            OriginDecision::SameOrigin,
            "default port 80 on both sides"
        );
        assert_eq!(
            p.decide(Some("http://127.0.0.1:3000"), Some("127.0.0.1:8080")),
            OriginDecision::CrossOrigin,
            "a local page on another port"
        );
        assert_eq!(
            p.decide(Some("http://[::1]:3000"), Some("[::1]:8080")),
            OriginDecision::CrossOrigin
        );
    }

    #[test]
    fn foreign_and_malformed_origins_are_refused_unless_listed() {
        let p = policy(&[]);
        assert_eq!(
            p.decide(Some("http://evil.com"), Some("localhost:8080")),
            OriginDecision::Refused
        );
        assert_eq!(
            p.decide(Some("null"), Some("localhost:8080")),
            OriginDecision::Refused
        );
        assert_eq!(
            p.decide(Some("garbage"), Some("localhost:8080")),
            OriginDecision::Refused
        );
        let p = policy(&[
            "https://app.example.com",
            "http://dev.example.com:*",
            "null",
        ]);
        assert_eq!(
            p.decide(Some("https://app.example.com"), Some("localhost:8080")),
            OriginDecision::CrossOrigin
        );
        assert_eq!(
            p.decide(Some("https://app.example.com:8443"), Some("localhost:8080")),
            OriginDecision::Refused,
            "an explicit entry means its port only"
        );
        assert_eq!(
            p.decide(Some("http://dev.example.com:5173"), Some("localhost:8080")),
            OriginDecision::CrossOrigin
        );
        assert_eq!(p.decide(Some("null"), None), OriginDecision::CrossOrigin);
        assert_eq!(
            policy(&["*"]).decide(Some("https://anything.example"), None),
            OriginDecision::CrossOrigin
        );
    }

    #[test]
    fn any_host_does_not_open_every_origin() {
        let p = OriginPolicy::new(&["*".to_owned()], &[]).unwrap();
        assert_eq!(
            p.decide(Some("http://evil.com"), Some("mcp.example.com")),
            OriginDecision::Refused
        );
        assert_eq!(
            p.decide(Some("https://mcp.example.com"), Some("mcp.example.com:443")),
            OriginDecision::SameOrigin
        );
    }

    #[test]
    fn bad_entries_are_named() {
        let e = OriginPolicy::new(&[], &["app.example.com".to_owned()]).unwrap_err();
        assert!(e.contains("`app.example.com` is not an origin"), "{e}");
        assert!(OriginPolicy::new(&[], &["http://a.com:x".to_owned()]).is_err());
    }

    proptest! {
        #[test]
        fn any_header_values_get_a_decision(origin in ".{0,64}", host in ".{0,64}") {
            let p = policy(&["https://app.example.com"]);
            let _ = p.decide(Some(&origin), Some(&host));
            let _ = Origin::parse(&origin);
        }
    }
}
