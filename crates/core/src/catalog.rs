//! Namespacing of upstream capabilities behind one MCP endpoint.
//!
//! Tools and prompts are exposed as `<upstream><separator><name>` and resources
//! and resource templates as `<upstream>+<uri>`, depending on the prefix mode.
//! The [`Catalog`] maps exposed names back to their upstream, by lookup rather
//! than by splitting strings, so names that contain the separator stay exact.

use std::collections::HashMap;

use meshgate_protocol::validate_tool_name;
use serde::{Deserialize, Serialize};

/// When upstream names are put in front of tool, prompt and resource names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PrefixMode {
    /// Always prefix.
    Always,
    /// Prefix only when more than one upstream is configured (the only case in
    /// which names can clash).
    #[default]
    Conditional,
    /// Never prefix; on a clash the first upstream in configuration order wins.
    Never,
}

impl PrefixMode {
    /// Every accepted spelling, for error messages.
    pub const ALLOWED: &'static str = "always, conditional, never";

    /// Parses the configuration spelling.
    pub fn parse(s: &str) -> Option<PrefixMode> {
        match s {
            "always" => Some(PrefixMode::Always),
            "conditional" => Some(PrefixMode::Conditional),
            "never" => Some(PrefixMode::Never),
            _ => None,
        }
    }
}

/// Separator between an upstream name and a resource URI.
pub const RESOURCE_SEPARATOR: char = '+';

/// Builds exposed names from upstream names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namer {
    /// Whether names are prefixed at all (resolved from the mode and the upstream count).
    pub prefixed: bool,
    /// The separator between upstream and tool or prompt name.
    pub separator: String,
}

impl Namer {
    /// Resolves the prefix mode for a gateway with `upstream_count` upstreams.
    pub fn new(mode: PrefixMode, separator: &str, upstream_count: usize) -> Namer {
        let prefixed = match mode {
            PrefixMode::Always => true,
            PrefixMode::Never => false,
            PrefixMode::Conditional => upstream_count > 1,
        };
        Namer {
            prefixed,
            separator: separator.to_owned(),
        }
    }

    /// The exposed name of a tool or prompt.
    pub fn name(&self, upstream: &str, name: &str) -> String {
        if self.prefixed {
            format!("{upstream}{}{name}", self.separator)
        } else {
            name.to_owned()
        }
    }

    /// The exposed URI (or URI template) of a resource.
    pub fn uri(&self, upstream: &str, uri: &str) -> String {
        if self.prefixed {
            format!("{upstream}{RESOURCE_SEPARATOR}{uri}")
        } else {
            uri.to_owned()
        }
    }

    /// Splits an exposed resource URI into upstream and original URI when
    /// prefixing is on. `None` when the URI carries no known prefix.
    pub fn split_uri<'a>(
        &self,
        uri: &'a str,
        is_upstream: impl Fn(&str) -> bool,
    ) -> Option<(&'a str, &'a str)> {
        if !self.prefixed {
            return None;
        }
        let (up, rest) = uri.split_once(RESOURCE_SEPARATOR)?;
        is_upstream(up).then_some((up, rest))
    }
}

/// Where an exposed name leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Index of the upstream in the gateway's upstream list.
    pub upstream: usize,
    /// The name the upstream knows.
    pub original: String,
}

/// Something the catalog could not expose, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogIssue {
    /// The upstream the item came from.
    pub upstream: String,
    /// The item's name at the upstream.
    pub name: String,
    /// What is wrong and what to do.
    pub reason: String,
}

/// The map from exposed names to upstreams, for one kind of item.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    routes: HashMap<String, Route>,
    /// Exposed names in presentation order (upstream order, then upstream order of items).
    order: Vec<String>,
}

impl Catalog {
    /// Builds a catalog from `(upstream name, item names)` pairs in
    /// configuration order. `check_names` applies the MCP tool-name rules to
    /// exposed names (tools only).
    pub fn build<'a>(
        namer: &Namer,
        upstreams: impl IntoIterator<Item = (usize, &'a str, Vec<&'a str>)>,
        check_names: bool,
    ) -> (Catalog, Vec<CatalogIssue>) {
        let mut catalog = Catalog::default();
        let mut issues = Vec::new();
        let mut owner: HashMap<String, String> = HashMap::new();
        for (index, upstream, names) in upstreams {
            for name in names {
                let exposed = namer.name(upstream, name);
                if check_names && let Err(e) = validate_tool_name(&exposed) {
                    issues.push(CatalogIssue {
                        upstream: upstream.to_owned(),
                        name: name.to_owned(),
                        reason: format!("not exposed: {e}"),
                    });
                    continue;
                }
                if let Some(first) = owner.get(&exposed) {
                    issues.push(CatalogIssue {
                        upstream: upstream.to_owned(),
                        name: name.to_owned(),
                        reason: format!(
                            "not exposed: `{exposed}` is already provided by upstream `{first}`; set namespacing.prefix_mode = \"always\" to expose both"
                        ),
                    });
                    continue;
                }
                owner.insert(exposed.clone(), upstream.to_owned());
                catalog.routes.insert(
                    exposed.clone(),
                    Route {
                        upstream: index,
                        original: name.to_owned(),
                    },
                );
                catalog.order.push(exposed);
            }
        }
        (catalog, issues)
    }

    /// Looks up an exposed name.
    pub fn resolve(&self, exposed: &str) -> Option<&Route> {
        self.routes.get(exposed)
    }

    /// Exposed names in presentation order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(String::as_str)
    }

    /// Number of exposed items.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when nothing is exposed.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditional_prefixes_only_with_several_upstreams() {
        assert!(!Namer::new(PrefixMode::Conditional, "__", 1).prefixed);
        assert!(Namer::new(PrefixMode::Conditional, "__", 2).prefixed);
        assert!(Namer::new(PrefixMode::Always, "__", 1).prefixed);
        assert!(!Namer::new(PrefixMode::Never, "__", 3).prefixed);
    }

    #[test]
    fn prefixed_names_route_back_exactly_even_with_separator_inside() {
        let namer = Namer::new(PrefixMode::Always, "__", 2);
        let (cat, issues) = Catalog::build(
            &namer,
            [(0, "a", vec!["x__y", "echo"]), (1, "b", vec!["echo"])],
            true,
        );
        assert!(issues.is_empty());
        assert_eq!(cat.resolve("a__x__y").unwrap().original, "x__y");
        assert_eq!(cat.resolve("b__echo").unwrap().upstream, 1);
        assert_eq!(
            cat.names().collect::<Vec<_>>(),
            ["a__x__y", "a__echo", "b__echo"]
        );
    }

    #[test]
    fn clash_without_prefix_keeps_first_and_reports_the_second() {
        let namer = Namer::new(PrefixMode::Never, "__", 2);
        let (cat, issues) = Catalog::build(
            &namer,
            [(0, "a", vec!["echo"]), (1, "b", vec!["echo"])],
            true,
        );
        assert_eq!(cat.resolve("echo").unwrap().upstream, 0);
        assert_eq!(issues.len(), 1);
        assert!(
            issues[0]
                .reason
                .contains("already provided by upstream `a`")
        );
    }

    #[test]
    fn invalid_exposed_tool_names_are_reported_not_exposed() {
        let namer = Namer::new(PrefixMode::Always, "__", 1);
        let (cat, issues) = Catalog::build(&namer, [(0, "a", vec!["has space"])], true);
        assert!(cat.is_empty());
        assert!(issues[0].reason.contains("' '"));
    }

    #[test]
    fn resource_uris_split_only_on_known_upstreams() {
        let namer = Namer::new(PrefixMode::Always, "__", 2);
        assert_eq!(namer.uri("fs", "file:///a+b"), "fs+file:///a+b");
        let known = |u: &str| u == "fs";
        assert_eq!(
            namer.split_uri("fs+file:///a+b", known),
            Some(("fs", "file:///a+b"))
        );
        assert_eq!(namer.split_uri("other+x://y", known), None);
        let flat = Namer::new(PrefixMode::Never, "__", 2);
        assert_eq!(flat.split_uri("fs+file:///a", known), None);
    }
}
