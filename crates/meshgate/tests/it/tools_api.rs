//! The tool registry API: `GET /api/v1/tools`, `GET /api/v1/tools/{name}`
//! and `POST /api/v1/tools/{name}/execute`, against real upstreams.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Gateway, GatewayConfig, HttpFixture, create_key, send};

async fn exec(
    gw: &Gateway,
    client: &reqwest::Client,
    name: &str,
    body: Value,
) -> (StatusCode, Value) {
    let url = gw.url(&format!("/api/v1/tools/{name}/execute"));
    send(client, Method::POST, &url, Some(body)).await
}

fn names(page: &Value) -> Vec<String> {
    page["tools"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_lists_filters_pages_describes_and_executes_tools_with_mcp_rules() {
    let fx = HttpFixture::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .http_upstream("fx", &fx.url)
            .stdio_fixture("st")
            .toml("[[auth.tool_rules]]\neffect = \"deny\"\ntools = [\"*__bump\"]\nrole = \"developer\"\n"),
    )
    .await;
    let (dev, _) = create_key(&gw, json!({"name": "dev", "role": "developer"})).await;
    let (viewer, _) = create_key(&gw, json!({"name": "viewer", "role": "viewer"})).await;
    let dev = gw.client_with_key(&dev);
    let get = |path: &str| {
        let (client, url) = (dev.clone(), gw.url(path));
        async move { send(&client, Method::GET, &url, None).await }
    };

    // Filter by upstream and glob; the denied tool is not listed.
    let (code, page) = get("/api/v1/tools?upstream=fx").await;
    assert_eq!(code, StatusCode::OK, "{page}");
    let fx_tools = names(&page);
    assert!(fx_tools.contains(&"fx__echo".to_owned()), "{page}");
    assert!(
        fx_tools.iter().all(|n| n.starts_with("fx__")),
        "{fx_tools:?}"
    );
    assert!(
        !fx_tools.contains(&"fx__bump".to_owned()),
        "a denied tool is listed"
    );
    let (_, page) = get("/api/v1/tools?name=*__echo").await;
    let mut echoes = names(&page);
    echoes.sort();
    assert_eq!(echoes, vec!["fx__echo", "st__echo"]);
    assert_eq!(page["tools"][0]["upstream_status"], "up");

    // Paging walks the whole list once.
    let (_, all) = get("/api/v1/tools?limit=500").await;
    let total = all["total"].as_u64().expect("total") as usize;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/tools?limit=3&cursor={c}"),
            None => "/api/v1/tools?limit=3".to_owned(),
        };
        let (code, page) = get(&path).await;
        assert_eq!(code, StatusCode::OK, "{page}");
        seen.extend(names(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, names(&all));
    assert_eq!(seen.len(), total);
    let (code, v) = get("/api/v1/tools?limit=0").await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    let (code, v) = get("/api/v1/tools?name=[").await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    let (code, _) = get("/api/v1/tools?upstream=nope").await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    // One tool: schema, upstream and its health.
    let (code, tool) = get("/api/v1/tools/fx__add").await;
    assert_eq!(code, StatusCode::OK, "{tool}");
    assert_eq!(tool["upstream"], "fx");
    assert_eq!(tool["original_name"], "add");
    assert_eq!(tool["inputSchema"]["properties"]["a"]["type"], "number");
    assert_eq!(tool["health"]["status"], "up");
    assert_eq!(tool["health"]["breaker"]["state"], "closed");
    let (code, _) = get("/api/v1/tools/fx__bump").await;
    assert_eq!(code, StatusCode::NOT_FOUND, "a denied tool is not shown");

    // Execute: a result, a tool error, refusals with their statuses.
    let (code, r) = exec(&gw, &dev, "fx__add", json!({"arguments": {"a": 2, "b": 3}})).await;
    assert_eq!(code, StatusCode::OK, "{r}");
    assert_eq!(r["structuredContent"]["sum"], 5.0);
    let (code, r) = exec(
        &gw,
        &dev,
        "st__echo",
        json!({"arguments": {"message": "over REST"}}),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{r}");
    assert_eq!(r["content"][0]["text"], "over REST");
    let (code, r) = exec(
        &gw,
        &dev,
        "fx__fail",
        json!({"arguments": {"message": "boom"}}),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "a tool error is a result: {r}");
    assert_eq!(r["isError"], true);
    let (code, r) = exec(&gw, &dev, "fx__bump", json!({})).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("auth.tool_rules[0]"),
        "{r}"
    );
    let (code, r) = exec(&gw, &dev, "fx__nope", json!({})).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{r}");
    let (code, r) = exec(&gw, &dev, "fx__add", json!({"args": {}})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("arguments"),
        "{r}"
    );
    let (code, r) = exec(
        &gw,
        &gw.client_with_key(&viewer),
        "fx__echo",
        json!({"arguments": {"message": "x"}}),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "a viewer lacks mcp:call: {r}");

    // Executions are audited like MCP calls.
    let (_, audit) = send(
        &gw.client(),
        Method::GET,
        &gw.url("/api/v1/audit?limit=100"),
        None,
    )
    .await;
    let calls: Vec<(&str, &str)> = audit["entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["action"] == "tool.call")
                .filter_map(|e| Some((e["target"].as_str()?, e["outcome"].as_str()?)))
                .collect()
        })
        .unwrap_or_default();
    assert!(calls.contains(&("fx__add", "ok")), "{audit}");
    assert!(calls.contains(&("fx__fail", "tool_error")), "{audit}");
    assert!(calls.contains(&("fx__bump", "denied")), "{audit}");
}
