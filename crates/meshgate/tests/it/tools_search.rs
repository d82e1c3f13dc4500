//! The built-in `tools_search` tool end to end: offered with
//! `search_threshold = 0`, ranking the fixture's tools by name and
//! description, cut by tenant and tool rules, and the tools it finds
//! callable.

use rmcp::ServiceError;
use rmcp::model::{CallToolResult, ProtocolVersion};
use serde_json::{Value, json};

use crate::support::{
    Env, Session, WAIT, call, call_tool, connect_as, create_key, text_of, tool_names,
};

/// `fx` (HTTP) and `fxs` (stdio); developers may not use the fault tools,
/// tenant `b` may not use `tools_search`.
async fn env() -> Env {
    Env::start_with(|c| {
        c.toml(
            "[tools]\nsearch_threshold = 0\n\n\
             [[auth.tool_rules]]\neffect = \"deny\"\ntools = [\"*__fault*\"]\nrole = \"developer\"\n\n\
             [[auth.tool_rules]]\neffect = \"deny\"\ntools = [\"tools_search\"]\ntenant = \"b\"\n",
        )
    })
    .await
}

async fn search(session: &Session, arguments: Value) -> CallToolResult {
    call_tool(session, "tools_search", arguments).await
}

/// The names found, best first.
fn found(r: &CallToolResult) -> Vec<String> {
    r.structured_content
        .as_ref()
        .and_then(|s| s["tools"].as_array())
        .unwrap_or_else(|| panic!("structuredContent.tools: {r:?}"))
        .iter()
        .map(|t| t["name"].as_str().expect("name").to_owned())
        .collect()
}

fn total(r: &CallToolResult) -> u64 {
    r.structured_content.as_ref().expect("structured")["total_matches"]
        .as_u64()
        .expect("total_matches")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_search_finds_usable_tools_by_name_and_description_and_they_are_callable() {
    let env = env().await;
    let gw = &env.gw;
    let (dev, _) = create_key(gw, json!({"name": "dev", "role": "developer"})).await;
    let (session, _) = connect_as(gw, ProtocolVersion::V_2025_11_25, &dev).await;
    assert!(
        tool_names(&session)
            .await
            .contains(&"tools_search".to_owned())
    );

    // Exact names (as the upstream knows them) first, ties by name.
    let r = search(&session, json!({"query": "ECHO"})).await;
    assert_eq!(found(&r)[..2], ["fx__echo", "fxs__echo"], "{r:?}");
    let first = &r.structured_content.as_ref().expect("structured")["tools"][0];
    assert_eq!(
        first["inputSchema"]["required"],
        json!(["message"]),
        "{first}"
    );
    assert!(text_of(&r).contains("fx__echo"), "{}", text_of(&r));

    // Every word in the description.
    let r = search(&session, json!({"query": "cancelled so far"})).await;
    assert_eq!(found(&r), ["fx__cancellations", "fxs__cancellations"]);

    // One upstream, a limit.
    let r = search(&session, json!({"query": "echo", "upstream": "fxs"})).await;
    let names = found(&r);
    assert_eq!(names[0], "fxs__echo", "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("fxs__")), "{names:?}");
    let r = search(&session, json!({"query": "a", "limit": 3})).await;
    assert_eq!(found(&r).len(), 3);
    assert!(total(&r) > 3, "{r:?}");

    // Tool rules cut the results: the developer may not use the fault tools.
    let r = search(&session, json!({"query": "fault"})).await;
    let names = found(&r);
    assert!(names.contains(&"fx__flaky".to_owned()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("__fault")), "{names:?}");
    let (admin, _) = connect_as(gw, ProtocolVersion::V_2025_11_25, &gw.admin_key).await;
    let r = search(&admin, json!({"query": "fault"})).await;
    assert_eq!(found(&r)[..2], ["fx__fault", "fxs__fault"]);

    // What was found is callable by its name.
    let echoed = call_tool(&session, "fx__echo", json!({"message": "found"})).await;
    assert_eq!(text_of(&echoed), "found");

    // Bad arguments are a tool error that says what to send.
    let r = search(&session, json!({"query": ""})).await;
    assert_eq!(r.is_error, Some(true));
    assert!(
        text_of(&r).contains("`query` is required"),
        "{}",
        text_of(&r)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_search_obeys_tool_rules_for_itself() {
    let env = env().await;
    let gw = &env.gw;
    let (key, _) = create_key(gw, json!({"name": "b", "role": "developer", "tenant": "b"})).await;
    let (session, _) = connect_as(gw, ProtocolVersion::V_2025_11_25, &key).await;
    assert!(
        !tool_names(&session)
            .await
            .contains(&"tools_search".to_owned())
    );
    let refused = tokio::time::timeout(
        WAIT,
        session.call_tool(call("tools_search", json!({"query": "echo"}))),
    )
    .await
    .expect("answered in time");
    match refused {
        Err(ServiceError::McpError(e)) => {
            assert_eq!(e.code.0, -32003, "{e:?}");
            assert!(e.message.contains("auth.tool_rules[1]"), "{e:?}");
        }
        other => panic!("tools_search must be refused for tenant b: {other:?}"),
    }
}
