//! Upstreams changed at run time: `/api/v1/upstreams`, configuration file
//! reloads (file watch and SIGHUP) and `meshgate import`, with the sessions
//! of other upstreams undisturbed.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{
    Gateway, GatewayConfig, HttpFixture, Session, WAIT, call, call_tool, connect, connect_as,
    create_key, fixture_bin, meshgate_bin, send, text_of, tool_names,
};

/// Waits until `check` holds for the session's tool names (at most 15 s).
async fn wait_tools(session: &Session, what: &str, check: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let names = tool_names(session).await;
        if check(&names) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tools never {what}; last list: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn has(names: &[String], name: &str) -> bool {
    names.iter().any(|n| n == name)
}

async fn api(gw: &Gateway, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    send(&gw.client(), method, &gw.url(path), body).await
}

/// Waits until `GET /api/v1/upstreams/{name}` reports `status`.
async fn wait_status(gw: &Gateway, name: &str, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, v) = api(gw, Method::GET, &format!("/api/v1/upstreams/{name}"), None).await;
        if code == StatusCode::OK && v["status"] == status {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "upstream {name} never became {status}: {code} {v}; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn initializations(session: &Session, tool: &str) -> String {
    text_of(&call_tool(session, tool, json!({})).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_are_created_changed_disabled_and_deleted_through_the_api_while_other_sessions_carry_on()
 {
    let (fx_a, fx_b, fx_c) = (
        HttpFixture::start(),
        HttpFixture::start(),
        HttpFixture::start(),
    );
    let config = GatewayConfig::new()
        .http_upstream("a", &fx_a.url)
        .http_upstream("c", &fx_c.url);
    let mut gw = Gateway::start(&config).await;
    let (session, _) = connect(&gw).await;
    let before = initializations(&session, "a__initializations").await;
    // A call in flight on upstream `a` while upstreams change.
    let slow = {
        let peer = session.peer().clone();
        tokio::spawn(async move {
            peer.call_tool(call("a__slow", json!({"steps": 10, "delay_ms": 150})))
                .await
        })
    };

    let secret = "hunter2-upstream-secret";
    let (code, created) = api(
        &gw,
        Method::POST,
        "/api/v1/upstreams",
        Some(json!({
            "name": "b",
            "transport": "streamable_http",
            "url": fx_b.url,
            "headers": {"X-Api-Key": secret},
        })),
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert_eq!(created["source"], "api");
    assert_eq!(created["definition"]["headers"]["X-Api-Key"], "***");
    wait_status(&gw, "b", "up").await;
    wait_tools(&session, "gained b__echo", |n| has(n, "b__echo")).await;

    // The list comes in pages by name: a, b, c one at a time.
    let mut names = Vec::new();
    let mut path = "/api/v1/upstreams?limit=1".to_owned();
    loop {
        let (code, page) = api(&gw, Method::GET, &path, None).await;
        assert_eq!(code, StatusCode::OK, "{page}");
        assert_eq!(page["total"], 3, "{page}");
        let listed = page["upstreams"].as_array().cloned().unwrap_or_default();
        assert_eq!(listed.len(), 1, "{page}");
        names.extend(
            listed
                .iter()
                .filter_map(|u| u["name"].as_str().map(str::to_owned)),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/upstreams?limit=1&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(names, ["a", "b", "c"]);
    let (code, bad) = api(&gw, Method::GET, "/api/v1/upstreams?limit=0", None).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}");
    assert!(
        bad.to_string().contains("`limit` must be 1 to 500"),
        "{bad}"
    );
    let echo = call_tool(&session, "b__echo", json!({"message": "via b"})).await;
    assert_eq!(text_of(&echo), "via b");

    // A duplicate name is refused with 409, naming it.
    let (code, dup) = api(
        &gw,
        Method::POST,
        "/api/v1/upstreams",
        Some(json!({"name": "b", "transport": "streamable_http", "url": fx_c.url})),
    )
    .await;
    assert_eq!(code, StatusCode::CONFLICT, "{dup}");
    assert!(
        dup["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("`b` already exists")
    );
    // An invalid definition names the field.
    let (code, bad) = api(
        &gw,
        Method::POST,
        "/api/v1/upstreams",
        Some(json!({"name": "d", "transport": "streamable_http", "url": "ftp://x"})),
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("upstream.url"),
        "{bad}"
    );

    // Disabled: its tools leave the list; enabled again: they return.
    let (code, v) = api(
        &gw,
        Method::PATCH,
        "/api/v1/upstreams/b",
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "disabled");
    wait_tools(&session, "lost b__echo", |n| !has(n, "b__echo")).await;
    // Moved elsewhere with the masked secret: refused, the stored secret
    // never follows a new URL.
    let mut definition = v["definition"].clone();
    definition["enabled"] = json!(true);
    definition["url"] = json!(fx_c.url);
    let (code, v) = api(
        &gw,
        Method::PUT,
        "/api/v1/upstreams/b",
        Some(definition.clone()),
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("send those secrets again"),
        "{v}"
    );
    // With the secret sent again: the new URL is used, the secret masked.
    definition["headers"]["X-Api-Key"] = json!(secret);
    let (code, v) = api(&gw, Method::PUT, "/api/v1/upstreams/b", Some(definition)).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["definition"]["headers"]["X-Api-Key"], "***");
    // Changed in place with the masked value: kept.
    let (code, v) = api(
        &gw,
        Method::PATCH,
        "/api/v1/upstreams/b",
        Some(json!({"timeout_secs": 30})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    wait_status(&gw, "b", "up").await;
    wait_tools(&session, "regained b__echo", |n| has(n, "b__echo")).await;
    let b_pid = text_of(&call_tool(&session, "b__whoami", json!({})).await);
    let c_pid = text_of(&call_tool(&session, "c__whoami", json!({})).await);
    assert_eq!(b_pid, c_pid, "b now points at the fixture of c");

    // Configured upstreams are the file's: the API refuses to change them.
    let (code, v) = api(&gw, Method::DELETE, "/api/v1/upstreams/a", None).await;
    assert_eq!(code, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("configuration file")
    );

    let (code, v) = api(&gw, Method::DELETE, "/api/v1/upstreams/b", None).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    wait_tools(&session, "lost b__echo", |n| !has(n, "b__echo")).await;
    let gone = session
        .peer()
        .call_tool(call("b__echo", json!({"message": "x"})))
        .await
        .expect_err("a deleted upstream's tool is unknown");
    assert!(gone.to_string().contains("unknown tool"), "{gone}");
    let (code, _) = api(&gw, Method::GET, "/api/v1/upstreams/b", None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    // The session's connection to `a` was never re-opened, and the call in
    // flight there finished.
    let done = slow
        .await
        .expect("task")
        .expect("the slow call on a finished");
    assert_ne!(done.is_error, Some(true), "{done:?}");
    assert_eq!(
        initializations(&session, "a__initializations").await,
        before
    );
    assert!(
        !gw.log().contains(secret),
        "the upstream secret reached the log"
    );

    // Managed upstreams survive a restart, secrets included.
    let (code, v) = api(
        &gw,
        Method::POST,
        "/api/v1/upstreams",
        Some(json!({"name": "d", "transport": "streamable_http", "url": fx_b.url})),
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    // Renamed before the restart: only the new name comes back.
    let (code, v) = api(
        &gw,
        Method::PATCH,
        "/api/v1/upstreams/d",
        Some(json!({"name": "e"})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    gw.restart().await;
    let v = wait_status(&gw, "e", "up").await;
    assert_eq!(v["source"], "api");
    let (code, _) = api(&gw, Method::GET, "/api/v1/upstreams/d", None).await;
    assert_eq!(
        code,
        StatusCode::NOT_FOUND,
        "the old name is gone from the store"
    );
    let (session, _) = connect(&gw).await;
    let echo = call_tool(&session, "e__echo", json!({"message": "after restart"})).await;
    assert_eq!(text_of(&echo), "after restart");
    let (_, audit) = api(&gw, Method::GET, "/api/v1/audit?limit=100", None).await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["action"].as_str()).collect())
        .unwrap_or_default();
    for action in ["upstream.create", "upstream.update", "upstream.delete"] {
        assert!(actions.contains(&action), "{action} not audited: {audit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_keys_manage_only_their_own_unshared_remote_upstreams() {
    let fx = HttpFixture::start();
    let mut gw = Gateway::start(&GatewayConfig::new()).await;
    let (acme_op, _) = create_key(
        &gw,
        json!({"name": "acme-op", "role": "operator", "tenant": "acme"}),
    )
    .await;
    let (acme_dev, _) = create_key(
        &gw,
        json!({"name": "acme-dev", "role": "developer", "tenant": "acme"}),
    )
    .await;
    let (beta_op, _) = create_key(
        &gw,
        json!({"name": "beta-op", "role": "operator", "tenant": "beta"}),
    )
    .await;
    // By default a tenant may not point an upstream into the networks the
    // gateway reaches (the fixture listens on 127.0.0.1).
    let (code, v) = send(
        &gw.client_with_key(&acme_op),
        Method::POST,
        &gw.url("/api/v1/upstreams"),
        Some(json!({"name": "probe", "transport": "sse", "url": "http://169.254.169.254/sse"})),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("auth.tenant_upstreams_private_addresses"),
        "{v}"
    );
    gw.rewrite_config(&GatewayConfig::new().auth("tenant_upstreams_private_addresses = true"));
    gw.restart().await;

    let as_key = |key: &str| gw.client_with_key(key);
    let post = |key: String, body: Value| {
        let client = as_key(&key);
        let url = gw.url("/api/v1/upstreams");
        async move { send(&client, Method::POST, &url, Some(body)).await }
    };
    let remote = json!({"name": "acme-tools", "transport": "streamable_http", "url": fx.url});

    let (code, v) = post(acme_dev.clone(), remote.clone()).await;
    assert_eq!(
        code,
        StatusCode::FORBIDDEN,
        "a developer key lacks upstreams:write: {v}"
    );
    let mut shared = remote.clone();
    shared["shared"] = json!(true);
    let (code, v) = post(acme_op.clone(), shared).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("tenants:*"),
        "{v}"
    );
    let (code, v) = post(
        acme_op.clone(),
        json!({"name": "sh", "transport": "stdio", "command": "sh"}),
    )
    .await;
    assert_eq!(
        code,
        StatusCode::FORBIDDEN,
        "a tenant may not run programs on the host: {v}"
    );
    let (code, v) = post(acme_op.clone(), remote.clone()).await;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    assert_eq!(v["tenant"], "acme");

    // Another tenant neither sees nor deletes it, and does not get its tools.
    let (_, list) = send(
        &as_key(&beta_op),
        Method::GET,
        &gw.url("/api/v1/upstreams"),
        None,
    )
    .await;
    assert_eq!(list["upstreams"], json!([]), "{list}");
    let (code, _) = send(
        &as_key(&beta_op),
        Method::DELETE,
        &gw.url("/api/v1/upstreams/acme-tools"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (acme, _) = connect_as(&gw, Default::default(), &acme_dev).await;
    wait_tools(&acme, "gained echo", |n| has(n, "echo")).await;
    let (beta, _) = connect_as(&gw, Default::default(), &beta_op).await;
    assert!(!has(&tool_names(&beta).await, "echo"));
    let (code, _) = send(
        &as_key(&acme_op),
        Method::DELETE,
        &gw.url("/api/v1/upstreams/acme-tools"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_upstreams_reload_when_the_file_changes_and_on_sighup() {
    let (fx_a, fx_c) = (HttpFixture::start(), HttpFixture::start());
    let base = GatewayConfig::new()
        .http_upstream("a", &fx_a.url)
        .http_upstream("c", &fx_c.url);
    let gw = Gateway::start(&base).await;
    let (session, _) = connect(&gw).await;
    let before = initializations(&session, "c__initializations").await;

    // Added in the file: a stdio upstream appears.
    gw.rewrite_config(&base.clone().stdio_fixture("b"));
    wait_tools(&session, "gained b__echo", |n| has(n, "b__echo")).await;
    let echo = call_tool(&session, "b__echo", json!({"message": "from the file"})).await;
    assert_eq!(text_of(&echo), "from the file");
    let (_, b) = api(&gw, Method::GET, "/api/v1/upstreams/b", None).await;
    assert_eq!(b["source"], "config");

    // Removed from the file: `a` goes, `b` and `c` stay as they were.
    let without_a = GatewayConfig::new()
        .http_upstream("c", &fx_c.url)
        .stdio_fixture("b");
    gw.rewrite_config(&without_a);
    wait_tools(&session, "lost a__echo", |n| {
        !has(n, "a__echo") && has(n, "b__echo")
    })
    .await;

    // An invalid file changes nothing and says why.
    let broken = without_a
        .clone()
        .toml("[[upstreams]]\nname = \"x\"\ntransport = \"streamable_http\"\n");
    gw.rewrite_config(&broken);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("configuration reload refused") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gw.log().contains("upstreams[2].url"),
        "the refusal names the key"
    );
    assert!(has(&tool_names(&session).await, "b__echo"));

    // SIGHUP applies the file at once.
    gw.rewrite_config(&without_a.clone().http_upstream("a2", &fx_a.url));
    gw.send_sighup();
    wait_tools(&session, "gained a2__echo", |n| has(n, "a2__echo")).await;

    // Through it all, the session kept its connection to `c`.
    assert_eq!(
        initializations(&session, "c__initializations").await,
        before
    );
    assert!(gw.log().contains("configuration reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_servers_file_is_imported_into_a_running_gateway_and_into_the_data_dir() {
    let fx = HttpFixture::start();
    let mut gw = Gateway::start(&GatewayConfig::new()).await;
    let file = gw.data_dir().with_file_name("claude_desktop_config.json");
    let servers = json!({"mcpServers": {
        "fixture stdio": {
            "command": fixture_bin(),
            "args": ["--mode", "basic", "--transport", "stdio"],
        },
        "remote.fx": {"url": fx.url},
        "broken": {"type": "carrier-pigeon"},
    }});
    std::fs::write(&file, servers.to_string()).expect("write the mcpServers file");
    let out = tokio::process::Command::new(meshgate_bin())
        .arg("import")
        .arg(&file)
        .args(["--url", &gw.url(""), "--key", &gw.admin_key])
        .output()
        .await
        .expect("run meshgate import");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a skipped server fails the import: {stdout}"
    );
    assert!(
        stdout.contains("skipped broken: transport type `carrier-pigeon` is unknown"),
        "{stdout}"
    );
    assert!(
        stdout.contains("imported fixture stdio as `fixture-stdio`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("imported remote.fx as `remote-fx`"),
        "{stdout}"
    );
    let (session, _) = connect(&gw).await;
    wait_tools(&session, "gained both", |n| {
        has(n, "fixture-stdio__echo") && has(n, "remote-fx__echo")
    })
    .await;
    let echo = call_tool(
        &session,
        "fixture-stdio__echo",
        json!({"message": "imported"}),
    )
    .await;
    assert_eq!(text_of(&echo), "imported");
    drop(session);

    // Offline: written to the data directory, used at the next start.
    gw.kill();
    let offline = json!({"mcpServers": {"later": {"url": fx.url}}});
    std::fs::write(&file, offline.to_string()).expect("write the mcpServers file");
    let out = tokio::process::Command::new(meshgate_bin())
        .arg("import")
        .arg(&file)
        .arg("--config")
        .arg(gw.config_path())
        .output()
        .await
        .expect("run meshgate import");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("imported later as `later`"), "{stdout}");
    gw.restart().await;
    let (session, _) = connect(&gw).await;
    wait_tools(&session, "gained later__echo", |n| has(n, "later__echo")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_held_to_public_addresses_never_connects_to_a_name_that_resolves_inside() {
    let fx = HttpFixture::start();
    let by_name = fx.url.replace("127.0.0.1", "localhost");
    let gw = Gateway::start(
        &GatewayConfig::new()
            .http_upstream("open", &by_name)
            .http_upstream("held", &by_name)
            .upstream_extra("public_addresses_only = true"),
    )
    .await;

    let (status, open) = gw.get_json("/health/upstreams/open").await;
    assert_eq!(
        status, 200,
        "the same name without the rule connects: {open}"
    );
    let (status, held) = gw.get_json("/health/upstreams/held").await;
    assert_eq!(status, 503, "{held}");
    assert_eq!(held["status"], "down", "{held}");
    let error = held["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("`localhost` resolves only to loopback, private or link-local addresses")
            && error.contains("127.0.0.1"),
        "the reason names the host and where it resolves: {held}"
    );

    let (session, _) = connect(&gw).await;
    let names = tool_names(&session).await;
    assert!(names.iter().any(|n| n == "open__echo"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("held__")), "{names:?}");
    assert!(
        gw.log().contains("upstream connection refused"),
        "the refusal is logged:\n{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_stuck_connecting_is_changed_and_deleted_without_waiting_for_its_timeout() {
    // Accepts connections (the kernel does) and never answers a request.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_url = format!(
        "http://{}/mcp",
        silent.local_addr().expect("the listener's address")
    );
    let fx = HttpFixture::start();
    let gw = Gateway::start(&GatewayConfig::new().http_upstream("fx", &fx.url)).await;
    // The change must not wait out the 120 s connect attempt.
    let promptly = |method: Method, path: String, body: Option<Value>| {
        let gw = &gw;
        async move {
            tokio::time::timeout(WAIT, api(gw, method.clone(), &path, body))
                .await
                .unwrap_or_else(|_| panic!("{method} {path} waited for the connect attempt"))
        }
    };

    for name in ["s1", "s2"] {
        let (code, v) = api(
            &gw,
            Method::POST,
            "/api/v1/upstreams",
            Some(json!({"name": name, "transport": "streamable_http", "url": silent_url, "connect_timeout_secs": 120})),
        )
        .await;
        assert_eq!(code, StatusCode::CREATED, "{v}");
        wait_status(&gw, name, "connecting").await;
    }
    let (code, v) = promptly(
        Method::PATCH,
        "/api/v1/upstreams/s1".into(),
        Some(json!({"url": fx.url})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    wait_status(&gw, "s1", "up").await;
    let (code, v) = promptly(Method::DELETE, "/api/v1/upstreams/s2".into(), None).await;
    assert!(code.is_success(), "{code} {v}");
    let (code, _) = api(&gw, Method::GET, "/api/v1/upstreams/s2", None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    let (session, _) = connect(&gw).await;
    let echo = call_tool(&session, "s1__echo", json!({"message": "moved"})).await;
    assert_eq!(text_of(&echo), "moved");
}
