//! Virtual servers at `/servers/{name}/mcp`: filtered, renamed views over
//! the upstreams, applied to `tools/list` and `tools/call`.

use serde_json::json;

use crate::support::{
    Gateway, GatewayConfig, HttpFixture, call, call_tool, connect, connect_path, create_key,
    text_of, tool_names,
};

const VIEWS: &str = r#"
[[virtual_servers]]
name = "dev"
upstreams = ["fx"]
include = ["fx__*"]
exclude = ["fx__fail", "fx__slow*"]
rename = { "fx__echo" = "say" }
descriptions = { "fx__add" = "Adds two numbers, as the dev view describes it" }

[[virtual_servers]]
name = "small"
max_tools = 3

[[virtual_servers]]
name = "acme-only"
tenant = "acme"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_server_filters_and_renames_tools_on_list_and_call() {
    let fx = HttpFixture::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .http_upstream("fx", &fx.url)
            .stdio_fixture("st")
            .toml(VIEWS),
    )
    .await;
    let (dev_key, _) = create_key(&gw, json!({"name": "dev", "role": "developer"})).await;
    let (view, _) = connect_path(&gw, "/servers/dev/mcp", &dev_key).await;

    let tools = view.list_all_tools().await.expect("tools/list");
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert!(names.contains(&"say"), "{names:?}");
    assert!(names.contains(&"fx__add"), "{names:?}");
    for hidden in ["fx__echo", "fx__fail", "fx__slow", "st__echo", "st__add"] {
        assert!(
            !names.contains(&hidden),
            "{hidden} is outside the view: {names:?}"
        );
    }
    let add = tools.iter().find(|t| t.name == "fx__add").expect("fx__add");
    assert_eq!(
        add.description.as_deref(),
        Some("Adds two numbers, as the dev view describes it")
    );

    // Calls use the view's names and reach the right upstream tool.
    let said = call_tool(&view, "say", json!({"message": "through the view"})).await;
    assert_eq!(text_of(&said), "through the view");
    let sum = call_tool(&view, "fx__add", json!({"a": 1, "b": 2})).await;
    assert_eq!(
        sum.structured_content.as_ref().map(|s| s["sum"].clone()),
        Some(json!(3.0))
    );
    for outside in ["fx__echo", "fx__fail", "st__echo"] {
        let e = view
            .peer()
            .call_tool(call(outside, json!({"message": "x"})))
            .await
            .expect_err("a tool outside the view is refused");
        assert!(
            e.to_string()
                .contains("virtual server `dev` has no such tool"),
            "{outside}: {e}"
        );
    }

    // The plain endpoint is the view of everything.
    let (plain, _) = connect(&gw).await;
    let all = tool_names(&plain).await;
    for t in ["fx__echo", "fx__fail", "st__echo"] {
        assert!(all.iter().any(|n| n == t), "{t} missing from /mcp: {all:?}");
    }
    assert!(!all.iter().any(|n| n == "say"));

    // A tool-count limit caps the list; the rest stay callable.
    let (small, _) = connect_path(&gw, "/servers/small/mcp", &dev_key).await;
    assert_eq!(small.list_all_tools().await.expect("tools/list").len(), 3);
    let echo = call_tool(&small, "st__echo", json!({"message": "beyond the cap"})).await;
    assert_eq!(text_of(&echo), "beyond the cap");

    // Another tenant's view and an unknown view are 404 before any MCP.
    for path in ["/servers/acme-only/mcp", "/servers/nope/mcp"] {
        let r = gw
            .client_with_key(&dev_key)
            .post(gw.url(path))
            .header("Accept", "application/json, text/event-stream")
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND, "{path}");
        let body = r.text().await.unwrap_or_default();
        assert!(body.contains("no virtual server named"), "{body}");
    }
    // A key holding tenants:* may use any view.
    let (admin_view, _) = connect_path(&gw, "/servers/acme-only/mcp", &gw.admin_key).await;
    assert!(!tool_names(&admin_view).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_search_in_a_virtual_server_finds_only_its_tools_under_its_names() {
    let fx = HttpFixture::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .http_upstream("fx", &fx.url)
            .stdio_fixture("st")
            .toml(
                r#"
[tools]
search_threshold = 0

[[virtual_servers]]
name = "found"
upstreams = ["fx"]
exclude = ["fx__fail"]
rename = { "fx__echo" = "say" }
max_tools = 1
"#,
            ),
    )
    .await;
    let (dev_key, _) = create_key(&gw, json!({"name": "dev", "role": "developer"})).await;
    let (view, _) = connect_path(&gw, "/servers/found/mcp", &dev_key).await;

    // The cap leaves one tool; the search is offered beside it.
    let names = tool_names(&view).await;
    assert!(names.contains(&"tools_search".to_owned()), "{names:?}");
    assert_eq!(names.len(), 2, "one tool and tools_search: {names:?}");
    assert!(!names.contains(&"say".to_owned()), "{names:?}");

    let found = |r: &rmcp::model::CallToolResult| -> Vec<String> {
        r.structured_content
            .as_ref()
            .and_then(|s| s["tools"].as_array())
            .unwrap_or_else(|| panic!("structuredContent.tools: {r:?}"))
            .iter()
            .map(|t| t["name"].as_str().expect("name").to_owned())
            .collect()
    };
    let echo = call_tool(&view, "tools_search", json!({"query": "echo", "limit": 50})).await;
    let echo = found(&echo);
    assert_eq!(echo.first().map(String::as_str), Some("say"), "{echo:?}");
    for name in &echo {
        assert!(
            name == "say" || (name.starts_with("fx__") && name != "fx__echo"),
            "{name} is outside the view or under a name it hides: {echo:?}"
        );
    }
    let fail = call_tool(&view, "tools_search", json!({"query": "fail"})).await;
    assert!(
        !found(&fail).contains(&"fx__fail".to_owned()),
        "an excluded tool was found: {:?}",
        found(&fail)
    );
    let other = call_tool(
        &view,
        "tools_search",
        json!({"query": "echo", "upstream": "st"}),
    )
    .await;
    assert!(found(&other).is_empty(), "{:?}", found(&other));

    // The name found is the one the view answers to.
    let said = call_tool(&view, "say", json!({"message": "found by search"})).await;
    assert_eq!(text_of(&said), "found by search");
}
