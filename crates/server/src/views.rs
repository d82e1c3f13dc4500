//! Virtual servers: named, tenant-scoped views over the upstreams, served
//! at `/servers/{name}/mcp` by the same MCP service as `/mcp`.
//!
//! A view is applied at the edges of a session's requests: `tools/list`
//! filters (upstreams, include/exclude globs on the gateway's exposed
//! names), renames, overrides descriptions and caps the list; `tools/call`
//! maps a view name back to the exposed name and refuses tools outside the
//! view. Everything between (rules, limits, validation, caching,
//! forwarding, audit under the exposed name) is the plain `/mcp` path. The
//! view is taken from each request's path, so a session is never tied to
//! one: each request is answered as the endpoint it was sent to.

use std::collections::HashMap;
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};
use meshgate_core::Principal;
use meshgate_core::config::VirtualServerConfig;
use rmcp::model::Tool;

/// One compiled virtual server.
pub struct View {
    /// Its configuration.
    pub config: VirtualServerConfig,
    include: Option<GlobSet>,
    exclude: GlobSet,
    /// View name → exposed name.
    reverse: HashMap<String, String>,
}

fn globs(patterns: &[String]) -> GlobSet {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        // Validated at start-up; an invalid one matches nothing.
        if let Ok(g) = Glob::new(p) {
            b.add(g);
        }
    }
    b.build().unwrap_or_else(|_| GlobSet::empty())
}

impl View {
    /// Compiles `config`.
    pub fn new(config: VirtualServerConfig) -> View {
        View {
            include: (!config.include.is_empty()).then(|| globs(&config.include)),
            exclude: globs(&config.exclude),
            reverse: config
                .rename
                .iter()
                .map(|(from, to)| (to.clone(), from.clone()))
                .collect(),
            config,
        }
    }

    /// Whether `p` may use the view: its tenant's, a shared one, or any
    /// with `tenants:*`.
    pub fn may_use(&self, p: &Principal) -> bool {
        self.config.shared
            || self.config.tenant == p.tenant
            || p.has_scope(meshgate_core::auth::scope::ALL_TENANTS)
    }

    /// Whether the exposed tool `exposed` of upstream `upstream` (none for
    /// the gateway's built-in tools) is in the view.
    pub fn admits(&self, exposed: &str, upstream: Option<&str>) -> bool {
        // The gateway's built-in tools belong to no upstream.
        let upstream_ok = self.config.upstreams.is_empty()
            || upstream.is_none_or(|u| self.config.upstreams.iter().any(|n| n == u));
        upstream_ok
            && self.include.as_ref().is_none_or(|g| g.is_match(exposed))
            && !self.exclude.is_match(exposed)
    }

    /// The exposed name a client of the view means by `requested`, if any
    /// (a renamed tool answers only to its new name).
    pub fn exposed_name(&self, requested: &str) -> Option<String> {
        if let Some(exposed) = self.reverse.get(requested) {
            return Some(exposed.clone());
        }
        (!self.config.rename.contains_key(requested)).then(|| requested.to_owned())
    }

    /// `tools` (exposed names; `upstream_of` names each one's upstream) as
    /// the view shows them: filtered, renamed, described, in name order and
    /// capped at `max_tools`.
    pub fn present(
        &self,
        tools: Vec<Tool>,
        upstream_of: impl Fn(&str) -> Option<String>,
    ) -> Vec<Tool> {
        let mut out: Vec<Tool> = tools
            .into_iter()
            .filter(|t| self.admits(&t.name, upstream_of(&t.name).as_deref()))
            // A tool whose own name another tool is renamed to is hidden:
            // the view's name means the renamed one (as `exposed_name` says).
            .filter(|t| {
                self.config.rename.contains_key(t.name.as_ref())
                    || !self.reverse.contains_key(t.name.as_ref())
            })
            .map(|mut t| {
                if let Some(d) = self.config.descriptions.get(t.name.as_ref()) {
                    t.description = Some(d.clone().into());
                }
                if let Some(new) = self.config.rename.get(t.name.as_ref()) {
                    t.name = new.clone().into();
                }
                t
            })
            .collect();
        if let Some(max) = self.config.max_tools
            && out.len() > max
        {
            out.sort_by(|a, b| a.name.cmp(&b.name));
            out.truncate(max);
        }
        out
    }
}

/// Every virtual server, by name.
#[derive(Default)]
pub struct Views(HashMap<String, Arc<View>>);

impl Views {
    /// Compiles the configured virtual servers.
    pub fn new(configs: &[VirtualServerConfig]) -> Views {
        Views(
            configs
                .iter()
                .map(|c| (c.name.clone(), Arc::new(View::new(c.clone()))))
                .collect(),
        )
    }

    /// The view named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<View>> {
        self.0.get(name).cloned()
    }

    /// The view a request path (`/servers/{name}/mcp`) names, if any.
    pub fn of_path(&self, path: &str) -> Option<Arc<View>> {
        let name = path.strip_prefix("/servers/")?.strip_suffix("/mcp")?;
        self.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(toml: &str) -> View {
        let c: meshgate_core::Config =
            meshgate_core::Config::from_toml(toml, "t.toml").expect("parses");
        View::new(c.virtual_servers[0].clone())
    }

    fn tool(name: &str) -> Tool {
        Tool::new(
            name.to_owned(),
            "d".to_owned(),
            Arc::new(Default::default()),
        )
    }

    #[test]
    fn filters_renames_describes_and_caps() {
        let v = view(
            "[[virtual_servers]]\nname = \"dev\"\nupstreams = [\"gh\", \"fx\"]\ninclude = [\"gh__*\", \"fx__echo\"]\nexclude = [\"gh__delete*\"]\nrename = { \"fx__echo\" = \"say\" }\ndescriptions = { \"gh__issues\" = \"Issues of our repos\" }\n",
        );
        let all = vec![
            tool("gh__issues"),
            tool("gh__delete_repo"),
            tool("fx__echo"),
            tool("fx__add"),
            tool("other__echo"),
        ];
        let shown = v.present(all, |n| n.split("__").next().map(str::to_owned));
        let names: Vec<&str> = shown.iter().map(|t| t.name.as_ref()).collect();
        assert_eq!(names, vec!["gh__issues", "say"]);
        assert_eq!(shown[0].description.as_deref(), Some("Issues of our repos"));
        assert_eq!(v.exposed_name("say").as_deref(), Some("fx__echo"));
        assert_eq!(v.exposed_name("fx__echo"), None, "the old name is gone");
        assert_eq!(v.exposed_name("gh__issues").as_deref(), Some("gh__issues"));
        assert!(!v.admits("gh__delete_repo", Some("gh")));
        assert!(!v.admits("other__echo", Some("other")));
        assert!(
            v.admits("gh__status", None),
            "built-ins belong to no upstream"
        );

        // A rename onto a real tool's name hides the real one.
        let clash = view("[[virtual_servers]]\nname = \"x\"\nrename = { \"a\" = \"b\" }\n");
        let shown = clash.present(vec![tool("a"), tool("b")], |_| None);
        let names: Vec<&str> = shown.iter().map(|t| t.name.as_ref()).collect();
        assert_eq!(names, vec!["b"]);
        assert_eq!(clash.exposed_name("b").as_deref(), Some("a"));

        let capped = view("[[virtual_servers]]\nname = \"c\"\nmax_tools = 2\n");
        let shown = capped.present(vec![tool("c"), tool("a"), tool("b")], |_| None);
        let names: Vec<&str> = shown.iter().map(|t| t.name.as_ref()).collect();
        assert_eq!(names, vec!["a", "b"]);
    }

    #[test]
    fn paths_name_views() {
        let views = Views::new(&[view("[[virtual_servers]]\nname = \"dev\"\n").config]);
        assert!(views.of_path("/servers/dev/mcp").is_some());
        assert!(views.of_path("/servers/nope/mcp").is_none());
        assert!(views.of_path("/mcp").is_none());
    }
}
