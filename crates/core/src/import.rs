//! Reading the `mcpServers` files of MCP clients (Claude Desktop, Cursor,
//! Windsurf; VS Code's `servers`) into upstream definitions, for
//! `meshgate import`.
//!
//! Every server becomes one upstream. Names are made valid upstream names
//! (characters outside `A-Z a-z 0-9 - _` become `-`, the namespacing
//! separator is broken up, at most 64 characters) and every such change,
//! every ignored field and every server that cannot be imported is
//! reported, so nothing is dropped silently.

use std::collections::BTreeMap;

use serde_json::Value;
use thiserror::Error;

use crate::config::{UpstreamConfig, UpstreamTransport};

/// Why a file cannot be imported at all.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ImportError {
    /// Not JSON.
    #[error("the file is not JSON: {0}")]
    NotJson(String),
    /// No `mcpServers` (or `servers`) object.
    #[error(
        "the file has no `mcpServers` object (nor VS Code's `servers`); expected {{\"mcpServers\": {{\"name\": {{\"command\": ..., \"args\": [...]}}}}}}"
    )]
    NoServers,
}

/// One server of the file, as an upstream, with what was changed or left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    /// The server's name in the file.
    pub source_name: String,
    /// The upstream (not yet validated against the gateway's settings).
    pub upstream: Result<UpstreamConfig, String>,
    /// What was changed or ignored.
    pub notes: Vec<String>,
}

/// Options of an import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Tenant of the upstreams (default: the default tenant).
    pub tenant: Option<String>,
    /// Offer them to every tenant.
    pub shared: bool,
    /// Prepended to every name.
    pub prefix: String,
    /// The gateway's namespacing separator (names must not contain it).
    pub separator: String,
}

/// A valid upstream name made from `raw`.
pub fn upstream_name(raw: &str, separator: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !separator.is_empty() {
        while name.contains(separator) {
            name = name.replace(separator, "-");
        }
    }
    let name = name.trim_matches('-').to_owned();
    let mut name: String = name.chars().take(64).collect();
    if name.is_empty() {
        name = "server".into();
    }
    name
}

fn string_map(v: &Value, field: &str, notes: &mut Vec<String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(obj) = v.get(field).and_then(Value::as_object) else {
        if v.get(field).is_some() {
            notes.push(format!("`{field}` is not an object; ignored"));
        }
        return out;
    };
    for (k, val) in obj {
        match val {
            Value::String(s) => {
                out.insert(k.clone(), s.clone());
            }
            Value::Number(_) | Value::Bool(_) => {
                out.insert(k.clone(), val.to_string());
            }
            _ => notes.push(format!("`{field}.{k}` is not a string; ignored")),
        }
    }
    out
}

/// Reads one server entry.
fn server(name: &str, v: &Value, opts: &ImportOptions) -> Imported {
    let mut notes = Vec::new();
    let mut upstream = || -> Result<UpstreamConfig, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| "the entry is not a JSON object".to_owned())?;
        const KNOWN: &[&str] = &[
            "command",
            "args",
            "env",
            "cwd",
            "url",
            "headers",
            "type",
            "transport",
            "disabled",
        ];
        for k in obj.keys().filter(|k| !KNOWN.contains(&k.as_str())) {
            notes.push(format!("field `{k}` has no meshgate equivalent; ignored"));
        }
        let kind = obj
            .get("type")
            .or_else(|| obj.get("transport"))
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase);
        let url = obj.get("url").and_then(Value::as_str).map(str::to_owned);
        let command = obj
            .get("command")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let transport = match (kind.as_deref(), &command, &url) {
            (Some("stdio"), _, _) | (None, Some(_), None) => UpstreamTransport::Stdio,
            (Some("sse"), _, _) => UpstreamTransport::Sse,
            (Some("http" | "streamable-http" | "streamablehttp" | "streamable_http"), _, _) => {
                UpstreamTransport::StreamableHttp
            }
            (None, _, Some(u)) => {
                // Clients that take only a `url` guess the same way.
                if u.trim_end_matches('/').ends_with("/sse") {
                    UpstreamTransport::Sse
                } else {
                    UpstreamTransport::StreamableHttp
                }
            }
            (Some(other), _, _) => {
                return Err(format!(
                    "transport type `{other}` is unknown; meshgate takes stdio, sse and http"
                ));
            }
            (None, None, None) => {
                return Err("the entry has neither `command` nor `url`".into());
            }
        };
        let args = match obj.get("args") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect(),
            Some(_) => return Err("`args` is not an array of strings".into()),
        };
        let env = string_map(v, "env", &mut notes);
        let headers = string_map(v, "headers", &mut notes);
        let stdio = transport == UpstreamTransport::Stdio;
        if stdio && url.is_some() {
            notes.push("`url` is ignored for a stdio server".into());
        }
        if !stdio && command.is_some() {
            notes.push("`command` is ignored for a remote server".into());
        }
        if !stdio && !env.is_empty() {
            notes.push("`env` is ignored for a remote server".into());
        }
        if stdio && !headers.is_empty() {
            notes.push("`headers` is ignored for a stdio server".into());
        }
        let mut up = UpstreamConfig::new(
            &upstream_name(&format!("{}{name}", opts.prefix), &opts.separator),
            transport,
        );
        up.command = if stdio { command } else { None };
        up.args = if stdio { args } else { Vec::new() };
        up.env = if stdio { env } else { BTreeMap::new() };
        up.cwd = if stdio {
            obj.get("cwd").and_then(Value::as_str).map(Into::into)
        } else {
            None
        };
        up.url = if stdio { None } else { url };
        up.headers = if stdio { BTreeMap::new() } else { headers };
        up.enabled = !obj
            .get("disabled")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let Some(t) = &opts.tenant {
            up.tenant.clone_from(t);
        }
        up.shared = opts.shared;
        Ok(up)
    };
    let upstream = upstream();
    if let Ok(up) = &upstream
        && up.name != name
    {
        notes.push(format!(
            "named `{}` (upstream names allow A-Z a-z 0-9 - _)",
            up.name
        ));
    }
    Imported {
        source_name: name.to_owned(),
        upstream,
        notes,
    }
}

/// Reads every server of an `mcpServers` file.
pub fn parse_mcp_servers(text: &str, opts: &ImportOptions) -> Result<Vec<Imported>, ImportError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| ImportError::NotJson(e.to_string()))?;
    let servers = doc
        .get("mcpServers")
        .or_else(|| doc.get("servers"))
        .and_then(Value::as_object)
        .ok_or(ImportError::NoServers)?;
    let mut out: Vec<Imported> = servers.iter().map(|(n, v)| server(n, v, opts)).collect();
    // Two servers whose names map to the same upstream name: number the later ones.
    let mut taken = std::collections::HashSet::new();
    for item in &mut out {
        if let Ok(up) = &mut item.upstream {
            let base = up.name.clone();
            let mut n = 2;
            while !taken.insert(up.name.clone()) {
                up.name = format!("{}-{n}", base.chars().take(60).collect::<String>());
                n += 1;
            }
            if up.name != base {
                item.notes.push(format!(
                    "named `{}`: `{base}` was taken by another server of the file",
                    up.name
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn opts() -> ImportOptions {
        ImportOptions {
            separator: "__".into(),
            ..Default::default()
        }
    }

    #[test]
    fn claude_desktop_file_becomes_stdio_and_remote_upstreams() {
        let file = r#"{"mcpServers": {
            "filesystem": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"], "env": {"TOKEN": "s"}},
            "remote": {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer t"}},
            "legacy": {"url": "https://example.com/sse"},
            "vs code": {"type": "http", "url": "https://example.com/x"},
            "off": {"command": "x", "disabled": true}
        }}"#;
        let out = parse_mcp_servers(file, &opts()).expect("parses");
        let by = |n: &str| {
            out.iter()
                .find(|i| i.source_name == n)
                .and_then(|i| i.upstream.clone().ok())
                .expect("imported")
        };
        let fs = by("filesystem");
        assert_eq!(fs.transport, UpstreamTransport::Stdio);
        assert_eq!(fs.args.len(), 3);
        assert_eq!(fs.env["TOKEN"], "s");
        assert_eq!(by("remote").transport, UpstreamTransport::StreamableHttp);
        assert_eq!(by("remote").headers["Authorization"], "Bearer t");
        assert_eq!(by("legacy").transport, UpstreamTransport::Sse);
        let vs = by("vs code");
        assert_eq!(vs.name, "vs-code");
        assert!(!by("off").enabled);
        let c = Config {
            upstreams: out.into_iter().filter_map(|i| i.upstream.ok()).collect(),
            ..Default::default()
        };
        c.validate().expect("imported upstreams validate");
    }

    #[test]
    fn bad_entries_are_reported_not_dropped() {
        let file = r#"{"mcpServers": {"a": 5, "b": {"type": "carrier-pigeon", "url": "x"}, "c": {}, "d": {"command": "x", "autoApprove": []}}}"#;
        let out = parse_mcp_servers(file, &opts()).expect("parses");
        assert_eq!(out.len(), 4);
        assert!(
            out[0]
                .upstream
                .as_ref()
                .is_err_and(|e| e.contains("not a JSON object"))
        );
        assert!(
            out[1]
                .upstream
                .as_ref()
                .is_err_and(|e| e.contains("carrier-pigeon"))
        );
        assert!(
            out[2]
                .upstream
                .as_ref()
                .is_err_and(|e| e.contains("neither"))
        );
        assert!(out[3].notes.iter().any(|n| n.contains("autoApprove")));
        assert_eq!(
            parse_mcp_servers("{}", &opts()).unwrap_err(),
            ImportError::NoServers
        );
        assert!(matches!(
            parse_mcp_servers("{", &opts()).unwrap_err(),
            ImportError::NotJson(_)
        ));
    }

    #[test]
    fn names_are_made_valid_and_unique() {
        assert_eq!(upstream_name("my.server v2", "__"), "my-server-v2");
        assert_eq!(upstream_name("a__b", "__"), "a-b");
        assert_eq!(upstream_name("???", "__"), "server");
        assert_eq!(upstream_name(&"x".repeat(80), "__").len(), 64);
        let file = r#"{"mcpServers": {"a.b": {"command": "x"}, "a b": {"command": "y"}}}"#;
        let out = parse_mcp_servers(file, &opts()).expect("parses");
        let names: Vec<String> = out
            .iter()
            .map(|i| i.upstream.clone().expect("ok").name)
            .collect();
        assert_eq!(names, vec!["a-b", "a-b-2"]);
    }
}
