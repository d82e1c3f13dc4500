//! The official server-everything (Node) federated with the fixture.

use std::path::PathBuf;

use serde_json::json;

use crate::support::{Gateway, GatewayConfig, HttpFixture, call_tool, connect, text_of};

/// `dist/index.js` of the installed `@modelcontextprotocol/server-everything`.
fn server_everything() -> PathBuf {
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools");
    let package = tools.join("node_modules/@modelcontextprotocol/server-everything");
    assert!(
        package.is_dir(),
        "{} is missing; install the test tools with `npm ci --prefix tools` (from the workspace root)",
        package.display()
    );
    let entry = package.join("dist/index.js");
    assert!(
        entry.is_file(),
        "{} is missing; reinstall the test tools with `npm ci --prefix tools`",
        entry.display()
    );
    entry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_everything_over_stdio_is_federated_with_the_http_fixture() {
    let entry = server_everything();
    let fx = HttpFixture::start();
    let config = GatewayConfig::new()
        .http_upstream("fx", &fx.url)
        .stdio_upstream(
            "everything",
            std::path::Path::new("node"),
            &[entry.to_str().expect("a UTF-8 path"), "stdio"],
        );
    let gw = Gateway::start(&config).await;
    let (session, _) = connect(&gw).await;

    let echo = call_tool(
        &session,
        "everything__echo",
        json!({"message": "hi from meshgate"}),
    )
    .await;
    assert_eq!(text_of(&echo), "Echo: hi from meshgate", "{echo:?}");
    let echo = call_tool(
        &session,
        "fx__echo",
        json!({"message": "and from the fixture"}),
    )
    .await;
    assert_eq!(text_of(&echo), "and from the fixture");

    let prompts = session.list_all_prompts().await.expect("prompts/list");
    let prompts: Vec<&str> = prompts.iter().map(|p| p.name.as_str()).collect();
    assert!(
        prompts.contains(&"everything__simple-prompt"),
        "{prompts:?}"
    );
    assert!(prompts.contains(&"fx__greet"), "{prompts:?}");

    let resources = session.list_all_resources().await.expect("resources/list");
    assert!(
        resources
            .iter()
            .any(|r| r.uri.starts_with("everything+demo://")),
        "{:?}",
        resources.iter().map(|r| r.uri.as_str()).collect::<Vec<_>>()
    );
}
