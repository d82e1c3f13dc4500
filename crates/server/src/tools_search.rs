//! The built-in `tools_search` tool: discovery when a caller may use more
//! tools than a client should hold in its context. `tools/list` offers it
//! when the caller may use more than `[tools] search_threshold` tools (0:
//! always); it matches a query against the names and descriptions of the
//! tools that caller may use (tenant visibility and tool rules, as in
//! `tools/list`) and returns the best matches with their input schemas, so
//! a client can call a found tool by its exposed name.
//!
//! Ranking, case-insensitive: exact name, then name prefix, then name
//! substring, then every query word somewhere in the name or description;
//! ties by name. Names are matched both as exposed (`fx__echo`) and as the
//! upstream knows them (`echo`).
//!
//! On a virtual server (`/servers/{name}/mcp`) the search sees the tools as
//! the view does: only those it admits, under its names and descriptions (a
//! renamed tool is found by its new name and by the upstream's, never by
//! the exposed name the view hides), so every tool found is callable there.
//! The view's `max_tools` cap does not apply: getting past it is the point.

use std::borrow::Cow;
use std::sync::Arc;

use rmcp::model::{CallToolResult, ContentBlock, JsonObject, Tool, ToolAnnotations};
use serde_json::{Value, json};

use crate::gateway::Gateway;
use crate::views::View;

/// Name of the built-in search tool.
pub const SEARCH_TOOL: &str = "tools_search";
/// Matches returned when the call names no `limit`.
const DEFAULT_LIMIT: usize = 10;
/// Most matches one call returns.
const MAX_LIMIT: usize = 50;

/// The tool's definition, as `tools/list` shows it.
pub fn definition() -> Tool {
    let schema = json!({
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "minLength": 1,
                "description": "Words to look for in tool names and descriptions (case-insensitive)."
            },
            "limit": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_LIMIT,
                "default": DEFAULT_LIMIT,
                "description": "Most tools to return."
            },
            "upstream": {
                "type": "string",
                "description": "Only tools of this upstream server."
            }
        },
        "required": ["query"],
        "additionalProperties": false
    });
    let schema = match schema {
        Value::Object(m) => m,
        _ => JsonObject::new(),
    };
    Tool::new(
        SEARCH_TOOL,
        "Search the tools you may call by name and description; returns the best matches with their input schemas. Every tool found can be called by its name, even if tools/list did not show it.",
        Arc::new(schema),
    )
    .annotate(ToolAnnotations::new().read_only(true).open_world(false))
}

/// Whether `tools/list` offers the tool to a caller who may use `usable`
/// tools.
pub fn offered(usable: usize, threshold: usize) -> bool {
    threshold == 0 || usable > threshold
}

/// A validated search.
#[derive(Debug)]
struct Query {
    /// The query, trimmed and lower-cased.
    text: String,
    words: Vec<String>,
    limit: usize,
    upstream: Option<String>,
}

fn parse(arguments: Option<&JsonObject>) -> Result<Query, String> {
    let empty = JsonObject::new();
    let a = arguments.unwrap_or(&empty);
    if let Some(k) = a
        .keys()
        .find(|k| !matches!(k.as_str(), "query" | "limit" | "upstream"))
    {
        return Err(format!(
            "unknown argument `{k}`; {SEARCH_TOOL} takes query, limit and upstream"
        ));
    }
    let text = match a.get("query") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_lowercase(),
        Some(Value::String(_)) | None => {
            return Err(
                "argument `query` is required: a non-empty string of words to look for, e.g. {\"query\": \"weather\"}"
                    .to_owned(),
            );
        }
        Some(other) => return Err(format!("argument `query` must be a string, not {other}")),
    };
    let limit = match a.get("limit") {
        None | Some(Value::Null) => DEFAULT_LIMIT,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_LIMIT as u64).contains(&n) => n as usize,
            _ => {
                return Err(format!(
                    "argument `limit` must be an integer from 1 to {MAX_LIMIT}, not {v}"
                ));
            }
        },
    };
    let upstream = match a.get("upstream") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(format!(
                "argument `upstream` must be an upstream's name as a string, not {other}"
            ));
        }
    };
    Ok(Query {
        words: text.split_whitespace().map(str::to_owned).collect(),
        text,
        limit,
        upstream,
    })
}

/// How well a tool matches (lower is better), `None` when it does not:
/// 0 exact name, 1 name prefix, 2 name substring, 3 every word in the
/// name or description.
fn rank(q: &Query, names: &[&str], description: &str) -> Option<u8> {
    let names: Vec<String> = names.iter().map(|n| n.to_lowercase()).collect();
    if names.contains(&q.text) {
        return Some(0);
    }
    if names.iter().any(|n| n.starts_with(&q.text)) {
        return Some(1);
    }
    if names.iter().any(|n| n.contains(&q.text)) {
        return Some(2);
    }
    let haystack = format!("{} {}", names.join(" "), description.to_lowercase());
    q.words
        .iter()
        .all(|w| haystack.contains(w.as_str()))
        .then_some(3)
}

/// One tool a caller may use, as the search sees it.
struct Candidate<'a> {
    /// As the caller sees it (on a virtual server: renamed, described).
    tool: Cow<'a, Tool>,
    original: &'a str,
    upstream: Option<String>,
}

fn search<'a>(q: &Query, candidates: impl IntoIterator<Item = Candidate<'a>>) -> CallToolResult {
    let mut found: Vec<(u8, Cow<'a, Tool>)> = candidates
        .into_iter()
        .filter(|c| {
            q.upstream
                .as_deref()
                .is_none_or(|u| c.upstream.as_deref() == Some(u))
        })
        .filter_map(|c| {
            let description = c.tool.description.as_deref().unwrap_or("");
            rank(q, &[&c.tool.name, c.original], description).map(|r| (r, c.tool))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    let total = found.len();
    found.truncate(q.limit);
    let tools: Vec<Value> = found
        .iter()
        .map(|(_, t)| {
            json!({
                "name": t.name,
                "description": t.description,
                "inputSchema": t.input_schema,
            })
        })
        .collect();
    let mut text = if total == 0 {
        format!(
            "No tool you may call matches \"{}\"; try fewer or other words.",
            q.text
        )
    } else {
        format!(
            "{total} tool(s) match \"{}\"{}:\n",
            q.text,
            if total > tools.len() {
                format!(", the best {} shown", tools.len())
            } else {
                String::new()
            }
        )
    };
    for (_, t) in &found {
        text.push_str(&format!(
            "- {}: {}\n",
            t.name,
            t.description.as_deref().unwrap_or("(no description)")
        ));
    }
    let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
    result.structured_content = Some(json!({"tools": tools, "total_matches": total}));
    result
}

/// Answers a call of the tool: searches the catalog's tools that `usable`
/// (upstream index, exposed name) lets the caller use and, on a virtual
/// server, `view` admits, as `view` shows them. Bad arguments are a tool
/// error (`isError: true`) that says what to send.
pub fn call(
    gw: &Gateway,
    arguments: Option<&JsonObject>,
    usable: impl Fn(usize, &str) -> bool,
    view: Option<&View>,
) -> CallToolResult {
    let q = match parse(arguments) {
        Ok(q) => q,
        Err(e) => return CallToolResult::error(vec![ContentBlock::text(e)]),
    };
    let snap = gw.snapshot();
    let candidates = snap
        .tools
        .iter()
        .zip(&snap.owners.tools)
        .filter(|(t, i)| usable(**i, &t.name))
        .filter_map(|(t, i)| {
            let upstream = gw.upstreams.get(*i).map(|u| u.config.name.clone());
            let tool = match view {
                None => Cow::Borrowed(t),
                Some(v) => Cow::Owned(as_view_shows(v, t, upstream.as_deref())?),
            };
            Some(Candidate {
                tool,
                original: snap
                    .tool_routes
                    .resolve(&t.name)
                    .map_or(t.name.as_ref(), |r| r.original.as_str()),
                upstream,
            })
        });
    search(&q, candidates)
}

/// Exposed tool `t` of `upstream` as `view` shows it (its name and
/// description), or `None` when the view does not show it. One tool at a
/// time, so the view's `max_tools` cap (at least 1) never cuts it.
fn as_view_shows(view: &View, t: &Tool, upstream: Option<&str>) -> Option<Tool> {
    view.present(vec![t.clone()], |_| upstream.map(str::to_owned))
        .pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: Value) -> Query {
        match v {
            Value::Object(m) => parse(Some(&m)).expect("valid"),
            _ => unreachable!("an object"),
        }
    }

    fn tool(name: &str, description: &str) -> Tool {
        Tool::new(
            name.to_owned(),
            description.to_owned(),
            Arc::new(JsonObject::new()),
        )
    }

    fn names(r: &CallToolResult) -> Vec<String> {
        let s = r.structured_content.as_ref().expect("structured");
        s["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .map(|t| t["name"].as_str().expect("name").to_owned())
            .collect()
    }

    #[test]
    fn exact_beats_prefix_beats_substring_beats_description() {
        let tools = [
            tool("fx__describe_echo", "Mirror a message"),
            tool("fx__echoes", "Many echoes"),
            tool("fx__echo", "Echo a message"),
            tool("fx__send", "Send a message and ECHO it back"),
            tool("fx__add", "Add two numbers"),
        ];
        let originals = ["describe_echo", "echoes", "echo", "send", "add"];
        let cands = || {
            tools.iter().zip(originals).map(|(t, o)| Candidate {
                tool: Cow::Borrowed(t),
                original: o,
                upstream: Some("fx".into()),
            })
        };
        let r = search(&q(json!({"query": "ECHO"})), cands());
        assert_eq!(
            names(&r),
            ["fx__echo", "fx__echoes", "fx__describe_echo", "fx__send"]
        );
        assert_eq!(
            r.structured_content.as_ref().expect("s")["total_matches"],
            4
        );
        let r = search(&q(json!({"query": "message back"})), cands());
        assert_eq!(names(&r), ["fx__send"]);
        let r = search(&q(json!({"query": "echo", "limit": 2})), cands());
        assert_eq!(names(&r), ["fx__echo", "fx__echoes"]);
        assert_eq!(
            r.structured_content.as_ref().expect("s")["total_matches"],
            4
        );
    }

    #[test]
    fn the_upstream_filter_keeps_only_that_upstreams_tools() {
        let a = tool("a__echo", "Echo");
        let b = tool("b__echo", "Echo");
        let cands = [
            Candidate {
                tool: Cow::Borrowed(&a),
                original: "echo",
                upstream: Some("a".into()),
            },
            Candidate {
                tool: Cow::Borrowed(&b),
                original: "echo",
                upstream: Some("b".into()),
            },
        ];
        let r = search(&q(json!({"query": "echo", "upstream": "b"})), cands);
        assert_eq!(names(&r), ["b__echo"]);
    }

    #[test]
    fn no_match_says_so() {
        let t = tool("x", "y");
        let r = search(
            &q(json!({"query": "weather"})),
            [Candidate {
                tool: Cow::Borrowed(&t),
                original: "x",
                upstream: None,
            }],
        );
        assert_eq!(
            r.structured_content.as_ref().expect("s")["total_matches"],
            0
        );
        assert_ne!(r.is_error, Some(true));
    }

    #[test]
    fn bad_arguments_name_what_to_send() {
        let bad = |v: Value| match v {
            Value::Object(m) => parse(Some(&m)).expect_err("invalid"),
            _ => unreachable!("an object"),
        };
        assert!(
            parse(None)
                .expect_err("no query")
                .contains("`query` is required")
        );
        assert!(bad(json!({"query": " "})).contains("`query` is required"));
        assert!(bad(json!({"query": 3})).contains("must be a string"));
        assert!(bad(json!({"query": "a", "limit": 0})).contains("1 to 50"));
        assert!(bad(json!({"query": "a", "limit": 51})).contains("1 to 50"));
        assert!(bad(json!({"query": "a", "limit": "5"})).contains("1 to 50"));
        assert!(bad(json!({"query": "a", "upstream": 1})).contains("upstream"));
        assert!(bad(json!({"query": "a", "q": 1})).contains("unknown argument `q`"));
        assert_eq!(q(json!({"query": "a"})).limit, DEFAULT_LIMIT);
    }

    #[test]
    fn a_view_shows_only_its_tools_under_its_names() {
        let c: meshgate_core::Config = meshgate_core::Config::from_toml(
            "[[virtual_servers]]\nname = \"dev\"\nupstreams = [\"fx\"]\nexclude = [\"fx__fail\"]\nrename = { \"fx__echo\" = \"say\" }\ndescriptions = { \"fx__echo\" = \"Say it back\" }\nmax_tools = 1\n",
            "t.toml",
        )
        .expect("parses");
        let view = View::new(c.virtual_servers[0].clone());
        let tools = [
            (tool("fx__echo", "Echo"), "echo", "fx"),
            (tool("fx__add", "Add two numbers"), "add", "fx"),
            (tool("fx__fail", "Echo a failure"), "fail", "fx"),
            (tool("st__echo", "Echo"), "echo", "st"),
        ];
        let cands = || {
            tools.iter().filter_map(|(t, o, u)| {
                Some(Candidate {
                    tool: Cow::Owned(as_view_shows(&view, t, Some(u))?),
                    original: o,
                    upstream: Some((*u).into()),
                })
            })
        };
        let r = search(&q(json!({"query": "echo"})), cands());
        assert_eq!(names(&r), ["say"], "only the view's tools, by its names");
        let s = r.structured_content.as_ref().expect("s");
        assert_eq!(s["tools"][0]["description"], "Say it back");
        assert_eq!(
            names(&search(&q(json!({"query": "say"})), cands())),
            ["say"]
        );
        assert!(
            names(&search(&q(json!({"query": "fx__echo"})), cands())).is_empty(),
            "the name the view hides finds nothing"
        );
        // The view's cap limits its list, not the search.
        let r = search(&q(json!({"query": "a"})), cands());
        assert_eq!(names(&r), ["fx__add", "say"]);
    }

    #[test]
    fn offered_above_the_threshold_or_always_at_zero() {
        assert!(offered(0, 0));
        assert!(!offered(50, 50));
        assert!(offered(51, 50));
    }
}
