//! Sealed, self-describing `Mcp-Session-Id`s: sessions that survive restarts
//! and move between gateway processes sharing the session key; tampered,
//! foreign, expired and ended ids refused with a clear 404.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

const SHARED_KEY: &str = "it-shared-session-secret-0123456789abcdef";

/// Sends `method` on `raw` and returns the HTTP status and the JSON-RPC answer.
async fn attempt(raw: &RawSession, method: &str, params: Value) -> (u16, Value) {
    let r = raw
        .post(&json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}))
        .await;
    let status = r.status().as_u16();
    if status == 200 {
        (status, read_response(r, 7).await)
    } else {
        let (_, body) = json_body(r).await;
        (status, body)
    }
}

async fn echo(raw: &RawSession, message: &str) -> (u16, Value) {
    attempt(
        raw,
        "tools/call",
        json!({"name": "fx__echo", "arguments": {"message": message}}),
    )
    .await
}

fn message_of(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}

/// `raw`'s session id with one character of the sealed part changed.
fn tampered(id: &str) -> String {
    let mut chars: Vec<char> = id.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_are_sealed_and_bound_to_whoever_opened_them() {
    let env = Env::start().await;
    let gw = &env.gw;
    let raw = RawSession::initialize(gw).await;
    let sid = raw.session.clone().expect("session id");
    assert!(sid.starts_with("mgs1."), "{sid}");
    assert!(
        sid.bytes().all(|b| (0x21..=0x7e).contains(&b)),
        "visible ASCII only, as the spec requires: {sid}"
    );
    assert!(
        !sid.contains("raw-it") && !sid.contains("default"),
        "the id is encrypted, not just encoded: {sid}"
    );
    let (status, ok) = echo(&raw, "mine").await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["result"]["content"][0]["text"], "mine", "{ok}");

    // The key file was created once, readable by the owner only.
    let key_file = gw.data_dir().join("session.key");
    let secret = std::fs::read_to_string(&key_file).expect("session.key in the data dir");
    assert!(secret.trim().len() >= 32, "{secret:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "session.key mode {mode:o}");
    }
    assert!(
        !gw.log().contains(secret.trim()),
        "the session secret is never logged"
    );

    // Another key of the same tenant cannot use the session.
    let (other_key, _) = create_key(gw, json!({"name": "other", "role": "developer"})).await;
    let mut thief = RawSession::new(gw);
    thief.http = gw.client_with_key(&other_key);
    thief.session = Some(sid.clone());
    let (status, body) = echo(&thief, "stolen").await;
    assert_eq!(status, 404, "{body}");
    assert!(message_of(&body).contains("session not found"), "{body}");

    // A tampered id names the problem.
    let mut bent = RawSession::new(gw);
    bent.session = Some(tampered(&sid));
    let (status, body) = echo(&bent, "bent").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        message_of(&body).contains("altered or corrupted")
            && message_of(&body).contains("initialize"),
        "{body}"
    );

    // The owner's session is untouched by all that.
    let (status, ok) = echo(&raw, "still mine").await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["result"]["content"][0]["text"], "still mine", "{ok}");

    // Operators find the session by the id the client holds.
    let (status, me) = gw.get_json(&format!("/mcp/health/client/{sid}")).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["session_id"], sid.as_str(), "{me}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_with_one_key_serve_one_session_and_a_third_key_is_refused() {
    let shared = |c: GatewayConfig| {
        c.auth("enabled = false")
            .mcp_line(&format!("session_key = \"{SHARED_KEY}\""))
    };
    let a = Env::start_with(shared).await;
    let b = Env::start_with(shared).await;
    assert_ne!(a.gw.data_dir(), b.gw.data_dir(), "no shared storage");

    let mut raw = RawSession::initialize(&a.gw).await;
    let sid = raw.session.clone().expect("session id");
    let (status, first) = echo(&raw, "on a").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["result"]["content"][0]["text"], "on a", "{first}");

    // The same session continues on the second process.
    raw.url = b.gw.mcp_url();
    raw.http = b.gw.client();
    let (status, second) = echo(&raw, "on b").await;
    assert_eq!(status, 200, "{second}\nlog of b:\n{}", b.gw.log());
    assert_eq!(second["result"]["content"][0]["text"], "on b", "{second}");
    let (status, stdio) = attempt(
        &raw,
        "tools/call",
        json!({"name": "fxs__add", "arguments": {"a": 2, "b": 3}}),
    )
    .await;
    assert_eq!(status, 200, "{stdio}");
    assert_eq!(
        stdio["result"]["structuredContent"],
        json!({"sum": 5.0}),
        "{stdio}"
    );
    // B knows it as the client's session, with the client's revision and name.
    let (status, me) = b.gw.get_json(&format!("/mcp/health/client/{sid}")).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["client_name"], "raw-it", "{me}");
    assert_eq!(me["protocol_version"], "2025-11-25", "{me}");

    // And back on the first.
    raw.url = a.gw.mcp_url();
    raw.http = a.gw.client();
    let (status, third) = echo(&raw, "on a again").await;
    assert_eq!(status, 200, "{third}");

    // A gateway with another key cannot open the id.
    let c = Env::start_with(|c| c.auth("enabled = false")).await;
    raw.url = c.gw.mcp_url();
    raw.http = c.gw.client();
    let (status, body) = echo(&raw, "on c").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        message_of(&body).contains("key this gateway does not hold")
            && message_of(&body).contains("mcp.session_key"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_deleted_sessions_get_a_clear_404_even_after_a_restart() {
    let mut env = Env::start_with(|c| c.mcp_line("session_ttl_secs = 3")).await;

    // Expiry.
    let old = RawSession::initialize(&env.gw).await;
    let (status, ok) = echo(&old, "fresh").await;
    assert_eq!(status, 200, "{ok}");

    // DELETE ends a session for good.
    let ended = RawSession::initialize(&env.gw).await;
    let r = ended
        .http
        .delete(&ended.url)
        .header(
            "mcp-session-id",
            ended.session.as_deref().unwrap_or_default(),
        )
        .send()
        .await
        .expect("DELETE /mcp");
    assert!(r.status().is_success(), "DELETE answered {}", r.status());
    let (status, body) = echo(&ended, "after delete").await;
    assert_eq!(status, 404, "{body}");

    env.gw.restart().await;
    let mut ended = ended;
    ended.http = env.gw.client();
    let (status, body) = echo(&ended, "after delete and restart").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        message_of(&body).contains("session was ended"),
        "the restarted gateway remembers the DELETE: {body}"
    );

    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let mut old = old;
    old.http = env.gw.client();
    let (status, body) = echo(&old, "stale").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        message_of(&body).contains("expired") && message_of(&body).contains("initialize"),
        "{body}"
    );
    // A new session works as usual.
    let fresh = RawSession::initialize(&env.gw).await;
    let (status, ok) = echo(&fresh, "new").await;
    assert_eq!(status, 200, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_never_shows_the_session_key() {
    let dir = TempDir::new("sesskey");
    let path = dir.path().join("meshgate.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\n[mcp]\nsession_key = \"{SHARED_KEY}\"\nsession_previous_keys = [\"{SHARED_KEY}-old\"]\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .expect("write config");
    let out = std::process::Command::new(meshgate_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains(SHARED_KEY) && !stderr.contains(SHARED_KEY),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("session_key"), "{stdout}");
    assert!(stdout.contains("<set>"), "{stdout}");

    // Too short a secret is refused with the key named.
    std::fs::write(&path, "[mcp]\nsession_key = \"short\"\n").expect("write config");
    let out = std::process::Command::new(meshgate_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("mcp.session_key") && stderr.contains("at least 32"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("short\""),
        "the value is not echoed: {stderr}"
    );
}
