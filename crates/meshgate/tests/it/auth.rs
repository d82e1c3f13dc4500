//! Security end to end: API keys, gateway tokens, OAuth issuer tokens,
//! tenants and roles on every route and MCP method, per-tool rules, lockout,
//! the audit log and the `meshgate keys` command, against the real binary.
//!
//! `fixtures/oauth-*-es256.pem` are throw-away P-256 keys made for these
//! tests only (`oauth-jwks.json` holds the public half of the trusted one).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{
    Env, Gateway, GatewayConfig, RawSession, connect_as, create_key, json_body, meshgate_bin,
    read_response, send, text_of,
};

const ROLES: [&str; 5] = ["admin", "operator", "developer", "agent", "viewer"];

/// Which roles hold a scope, written out independently of the gateway's table.
fn role_has(role: &str, scope: &str) -> bool {
    let roles: &[&str] = match scope {
        "keys:read" | "audit:read" => &["admin", "operator"],
        "keys:write" => &["admin"],
        "metrics:read" => &["admin", "operator", "viewer"],
        "mcp:read" => &["admin", "operator", "developer", "viewer"],
        "mcp:call" => &["admin", "operator", "developer"],
        other => panic!("the test table has no scope {other}"),
    };
    roles.contains(&role)
}

/// POSTs `initialize` with `key`; returns the status and, on success, the session.
async fn initialize_as(gw: &Gateway, key: &str) -> (StatusCode, Option<RawSession>) {
    let mut raw = RawSession::new(gw);
    raw.http = gw.client_with_key(key);
    let r = raw
        .post(&json!({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "auth-it", "version": "1"}}
        }))
        .await;
    let status = r.status();
    if status != StatusCode::OK {
        return (status, None);
    }
    raw.session = r
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let answer = read_response(r, 0).await;
    assert!(answer.get("result").is_some(), "{answer}");
    let r = raw
        .post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    (status, Some(raw))
}

fn tool_names_of(list: &Value) -> Vec<String> {
    list["result"]["tools"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn first_start_writes_an_admin_key_and_only_health_ready_and_well_known_are_public() {
    let env = Env::start().await;
    let gw = &env.gw;
    let key = &gw.admin_key;
    assert!(
        key.starts_with("mg_") && key.len() == 46,
        "admin.key holds {key:?}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(gw.data_dir().join("admin.key"))
            .expect("admin.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "admin.key must be private");
    }
    assert!(gw.log().contains("created the first admin key"));
    assert!(
        !gw.log().contains(key.as_str()),
        "the key must not reach the logs"
    );

    let anonymous = gw.client_with_key("");
    for path in ["/health", "/ready", "/.well-known/oauth-protected-resource"] {
        let (status, _) = send(&anonymous, reqwest::Method::GET, &gw.url(path), None).await;
        assert_eq!(status, StatusCode::OK, "{path} is public");
    }
    // Public health says how many upstreams are up, not which or why.
    let (_, health) = send(&anonymous, reqwest::Method::GET, &gw.url("/health"), None).await;
    assert_eq!(health["components"]["upstreams"]["healthy"], 2, "{health}");
    assert!(!health.to_string().contains("fxs"), "{health}");
    let (_, health) = gw.get_json("/health").await;
    assert_eq!(
        health["components"]["upstreams"]["fxs"]["status"], "up",
        "{health}"
    );
    for (method, path) in [
        (reqwest::Method::POST, "/mcp"),
        (reqwest::Method::GET, "/sse"),
        (reqwest::Method::POST, "/messages?sessionId=x"),
        (reqwest::Method::GET, "/metrics"),
        (reqwest::Method::GET, "/health/store"),
        (reqwest::Method::GET, "/api/v1/auth/keys"),
        (reqwest::Method::GET, "/api/v1/audit"),
        (reqwest::Method::GET, "/api/v1/auth/whoami"),
        (reqwest::Method::GET, "/no/such/route"),
    ] {
        let r = anonymous
            .request(method.clone(), gw.url(path))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        let challenge = r
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            challenge.starts_with("Bearer ")
                && challenge.contains(&format!(
                    "resource_metadata=\"http://127.0.0.1:{}/.well-known/oauth-protected-resource\"",
                    gw.port
                )),
            "{path}: WWW-Authenticate {challenge:?}"
        );
        let (_, body) = json_body(r).await;
        assert_eq!(body["error"]["reason"], "missing", "{body}");
    }
    // The key works as a bearer token and as X-API-Key; a restart keeps it.
    let r = reqwest::Client::new()
        .get(gw.url("/api/v1/auth/whoami"))
        .header("x-api-key", key.as_str())
        .send()
        .await
        .expect("whoami");
    let (status, me) = json_body(r).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["role"], "admin");
    assert_eq!(me["tenant"], "default");
    let (session, _) = connect_as(gw, rmcp::model::ProtocolVersion::V_2025_11_25, key).await;
    let r = crate::support::call_tool(&session, "fx__echo", json!({"message": "with a key"})).await;
    assert_eq!(text_of(&r), "with a key");
}

fn check(wrong: &mut Vec<String>, what: String, got: StatusCode, want: StatusCode, body: &Value) {
    if got != want {
        wrong.push(format!("{what}: got {got}, want {want}: {body}"));
    }
}

#[tokio::test]
async fn every_role_in_two_tenants_gets_exactly_its_routes_and_mcp_methods() {
    // fx belongs to tenant `default`, fxs to tenant `beta`.
    let env = Env::start_with(|c| c.upstream_extra("tenant = \"beta\"")).await;
    let gw = &env.gw;
    let tenants = ["default", "beta"];
    let mut keys: HashMap<(&str, &str), (String, String)> = HashMap::new();
    for t in tenants {
        for r in ROLES {
            let k = create_key(
                gw,
                json!({"name": format!("{r}-{t}"), "role": r, "tenant": t}),
            )
            .await;
            keys.insert((t, r), k);
        }
    }
    let mut wrong = Vec::new();
    use reqwest::Method as M;
    for (t, other) in [("default", "beta"), ("beta", "default")] {
        let prefix = if t == "default" { "fx" } else { "fxs" };
        let other_prefix = if t == "default" { "fxs" } else { "fx" };
        let (_, same_tenant_id) = &keys[&(t, "viewer")];
        let (_, other_tenant_id) = &keys[&(other, "viewer")];
        for role in ROLES {
            let (key, _) = &keys[&(t, role)];
            let http = gw.client_with_key(key);
            let who = format!("{role}@{t}");
            let ok_or_403 = |scope: &str, ok: StatusCode| {
                if role_has(role, scope) {
                    ok
                } else {
                    StatusCode::FORBIDDEN
                }
            };

            // REST routes: method, path, body, expected status.
            let table: Vec<(M, String, Option<Value>, StatusCode)> = vec![
                (M::GET, "/api/v1/auth/whoami".into(), None, StatusCode::OK),
                (
                    M::GET,
                    "/api/v1/auth/keys".into(),
                    None,
                    ok_or_403("keys:read", StatusCode::OK),
                ),
                (
                    M::GET,
                    format!("/api/v1/auth/keys?tenant={other}"),
                    None,
                    StatusCode::FORBIDDEN,
                ),
                (
                    M::GET,
                    format!("/api/v1/auth/keys/{same_tenant_id}"),
                    None,
                    ok_or_403("keys:read", StatusCode::OK),
                ),
                (
                    M::GET,
                    format!("/api/v1/auth/keys/{other_tenant_id}"),
                    None,
                    ok_or_403("keys:read", StatusCode::NOT_FOUND),
                ),
                (
                    M::PATCH,
                    format!("/api/v1/auth/keys/{other_tenant_id}"),
                    Some(json!({"scopes": ["mcp:read"]})),
                    ok_or_403("keys:write", StatusCode::NOT_FOUND),
                ),
                (
                    M::DELETE,
                    format!("/api/v1/auth/keys/{other_tenant_id}"),
                    None,
                    ok_or_403("keys:write", StatusCode::NOT_FOUND),
                ),
                (
                    M::POST,
                    "/api/v1/auth/keys".into(),
                    Some(json!({"name": "x", "role": "viewer", "tenant": other})),
                    StatusCode::FORBIDDEN,
                ),
                (
                    M::POST,
                    "/api/v1/auth/keys".into(),
                    Some(json!({"name": format!("made-by-{who}"), "role": "viewer"})),
                    ok_or_403("keys:write", StatusCode::CREATED),
                ),
                (M::POST, "/api/v1/auth/token".into(), None, StatusCode::OK),
                (
                    M::GET,
                    "/api/v1/audit".into(),
                    None,
                    ok_or_403("audit:read", StatusCode::OK),
                ),
                (
                    M::GET,
                    format!("/api/v1/audit?tenant={other}"),
                    None,
                    StatusCode::FORBIDDEN,
                ),
                (
                    M::GET,
                    "/metrics".into(),
                    None,
                    ok_or_403("metrics:read", StatusCode::OK),
                ),
                (
                    M::GET,
                    "/health/store".into(),
                    None,
                    ok_or_403("metrics:read", StatusCode::OK),
                ),
                (
                    M::GET,
                    "/health/upstreams".into(),
                    None,
                    ok_or_403("metrics:read", StatusCode::OK),
                ),
                (M::GET, "/health".into(), None, StatusCode::OK),
            ];
            for (method, path, body, want) in table {
                let (s, b) = send(&http, method.clone(), &gw.url(&path), body).await;
                check(&mut wrong, format!("{who} {method} {path}"), s, want, &b);
                let leaks = s == StatusCode::OK
                    && match path.as_str() {
                        "/api/v1/auth/whoami" => b["tenant"] != t || b["role"] != role,
                        "/api/v1/auth/keys" => b["keys"]
                            .as_array()
                            .is_none_or(|ks| ks.iter().any(|k| k["tenant"] != t)),
                        "/api/v1/audit" => b["entries"]
                            .as_array()
                            .is_none_or(|es| es.iter().any(|e| e["tenant"] != t)),
                        _ => false,
                    };
                if leaks {
                    wrong.push(format!(
                        "{who} {method} {path} shows another tenant's objects: {b}"
                    ));
                }
            }
            let r = http.get(gw.url("/sse")).send().await.expect("GET /sse");
            check(
                &mut wrong,
                format!("{who} GET /sse"),
                r.status(),
                ok_or_403("mcp:read", StatusCode::OK),
                &Value::Null,
            );
            drop(r);

            // MCP methods.
            let (s, raw) = initialize_as(gw, key).await;
            check(
                &mut wrong,
                format!("{who} initialize"),
                s,
                ok_or_403("mcp:read", StatusCode::OK),
                &Value::Null,
            );
            let Some(raw) = raw else { continue };
            let list = raw.request("tools/list", json!({})).await;
            let names = tool_names_of(&list);
            if !names.contains(&format!("{prefix}__echo"))
                || names
                    .iter()
                    .any(|n| n.starts_with(&format!("{other_prefix}__")))
            {
                wrong.push(format!("{who} tools/list shows {names:?}"));
            }
            let own = raw
                .request(
                    "tools/call",
                    json!({"name": format!("{prefix}__echo"), "arguments": {"message": "hi"}}),
                )
                .await;
            let called = own["result"]["content"][0]["text"] == "hi";
            if called != role_has(role, "mcp:call") {
                wrong.push(format!("{who} tools/call own tool: {own}"));
            }
            if !called && own["error"]["code"] != -32003 {
                wrong.push(format!(
                    "{who} tools/call refusal is not the 403-equivalent -32003: {own}"
                ));
            }
            let foreign = raw
                .request("tools/call", json!({"name": format!("{other_prefix}__echo"), "arguments": {"message": "hi"}}))
                .await;
            if foreign.get("result").is_some() {
                wrong.push(format!("{who} called another tenant's tool: {foreign}"));
            }
            for method in ["prompts/list", "resources/list"] {
                let r = raw.request(method, json!({})).await;
                let text = r["result"].to_string();
                if text.contains(&format!("\"{other_prefix}__"))
                    || text.contains(&format!("\"{other_prefix}+"))
                    || r.get("error").is_some()
                {
                    wrong.push(format!("{who} {method}: {r}"));
                }
            }
            let read = raw
                .request(
                    "resources/read",
                    json!({"uri": format!("{other_prefix}+fixture://greeting")}),
                )
                .await;
            if read.get("result").is_some() {
                wrong.push(format!("{who} read another tenant's resource: {read}"));
            }
            let read = raw
                .request(
                    "resources/read",
                    json!({"uri": format!("{prefix}+fixture://greeting")}),
                )
                .await;
            if read["result"]["contents"][0]["text"] != "hello from fixture" {
                wrong.push(format!("{who} could not read its own resource: {read}"));
            }
            let prompt = raw
                .request(
                    "prompts/get",
                    json!({"name": format!("{other_prefix}__plain")}),
                )
                .await;
            if prompt.get("result").is_some() {
                wrong.push(format!("{who} got another tenant's prompt: {prompt}"));
            }
            // Another principal cannot use this session, even in the same tenant.
            for (intruder_tenant, intruder_role) in [(other, "admin"), (t, "developer")] {
                if (intruder_tenant, intruder_role) == (t, role) {
                    continue;
                }
                let (intruder, _) = &keys[&(intruder_tenant, intruder_role)];
                let r = gw
                    .client_with_key(intruder)
                    .post(gw.mcp_url())
                    .header("accept", crate::support::ACCEPT_BOTH)
                    .header("content-type", "application/json")
                    .header("mcp-session-id", raw.session.as_deref().unwrap_or_default())
                    .header("mcp-protocol-version", "2025-11-25")
                    .body(json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}).to_string())
                    .send()
                    .await
                    .expect("POST");
                check(
                    &mut wrong,
                    format!("{intruder_role}@{intruder_tenant} using {who}'s session"),
                    r.status(),
                    StatusCode::NOT_FOUND,
                    &Value::Null,
                );
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} mismatches:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Signs `claims` as a gateway access token with the gateway's own secret.
fn sign_with_gateway_secret(gw: &Gateway, claims: &Value) -> String {
    let secret = std::fs::read_to_string(gw.data_dir().join("token.key")).expect("token.key");
    let secret = URL_SAFE_NO_PAD.decode(secret.trim()).expect("base64url");
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(&secret),
    )
    .expect("sign")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/fixtures")
        .join(name)
}

fn sign_es256(pem_file: &str, claims: &Value) -> String {
    let pem = std::fs::read(fixture(pem_file)).expect("pem");
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("trusted-1".into());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_ec_pem(&pem).expect("ec key"),
    )
    .expect("sign")
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const ISSUER: &str = "https://idp.example.test";
const AUDIENCE: &str = "https://gateway.example.test/mcp";

fn oauth_config(c: GatewayConfig) -> GatewayConfig {
    c.auth("[auth.lockout]\nmax_failures = 0").toml(&format!(
        "[[auth.oauth.issuers]]\nissuer = \"{ISSUER}\"\njwks_file = {}\naudience = [\"{AUDIENCE}\"]\ntenant = \"default\"\nrole = \"developer\"\n",
        serde_json::to_string(&fixture("oauth-jwks.json").display().to_string()).expect("path")
    ))
}

#[tokio::test]
async fn bad_keys_and_tokens_are_refused_with_401_and_a_reason_that_names_the_problem() {
    let env = Env::start_with(oauth_config).await;
    let gw = &env.gw;
    let (expiring, _) = create_key(
        gw,
        json!({"name": "short-lived", "role": "developer", "expires_in_secs": 1}),
    )
    .await;
    let (revoked, revoked_id) =
        create_key(gw, json!({"name": "to revoke", "role": "developer"})).await;
    let (s, b) = send(
        &gw.client(),
        reqwest::Method::DELETE,
        &gw.url(&format!("/api/v1/auth/keys/{revoked_id}")),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["key"]["status"], "revoked", "{b}");
    let (s, pair) = send(
        &gw.client(),
        reqwest::Method::POST,
        &gw.url("/api/v1/auth/token"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{pair}");
    let access = pair["access_token"]
        .as_str()
        .expect("access token")
        .to_owned();
    let admin_id = {
        let (_, me) = send(
            &gw.client(),
            reqwest::Method::GET,
            &gw.url("/api/v1/auth/whoami"),
            None,
        )
        .await;
        me["key_id"].as_str().expect("key id").to_owned()
    };
    let claims = |exp: i64, aud: &str| {
        json!({"iss": "meshgate", "aud": aud, "sub": admin_id, "tenant": "default", "role": "admin",
               "scope": "mcp:read", "iat": now_secs(), "nbf": now_secs() - 10, "exp": exp, "jti": "t", "fam": "fam_test"})
    };
    let mut tampered_parts: Vec<String> = access.split('.').map(str::to_owned).collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&tampered_parts[1]).expect("b64"))
            .expect("json");
    payload["tenant"] = json!("beta");
    tampered_parts[1] = URL_SAFE_NO_PAD.encode(payload.to_string());
    let tampered = tampered_parts.join(".");
    let alg_none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims(now_secs() + 600, "meshgate").to_string())
    );
    let alg_none_sig = format!("{alg_none}c2ln");
    let wrong_secret = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(now_secs() + 600, "meshgate"),
        &EncodingKey::from_secret(&[9u8; 32]),
    )
    .expect("sign");
    let oauth_claims = |exp: i64, aud: &str, iss: &str| json!({"iss": iss, "aud": aud, "sub": "user-1", "exp": exp, "iat": now_secs(), "scope": "mcp:read mcp:call"});
    let hs256_as_issuer = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &oauth_claims(now_secs() + 600, AUDIENCE, ISSUER),
        &EncodingKey::from_secret(b"the-public-key-is-not-a-secret!!"),
    )
    .expect("sign");
    tokio::time::sleep(Duration::from_millis(1100)).await; // `expiring` is now expired

    let unknown = format!("mg_{}", URL_SAFE_NO_PAD.encode([42u8; 32]));
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("expired key", expiring.clone(), "expired", "expired at"),
        ("revoked key", revoked.clone(), "revoked", "revoked at"),
        (
            "unknown key",
            unknown.clone(),
            "unknown_key",
            "never issued",
        ),
        (
            "malformed key",
            "mg_tooshort".into(),
            "malformed",
            "characters",
        ),
        (
            "not a credential",
            "hello".into(),
            "malformed",
            "neither an API key",
        ),
        (
            "tampered token",
            tampered,
            "invalid_token",
            "signature does not verify",
        ),
        (
            "wrong-signature token",
            wrong_secret,
            "invalid_token",
            "signature does not verify",
        ),
        ("alg none token", alg_none, "invalid_token", "alg: none"),
        (
            "alg none token with a signature",
            alg_none_sig,
            "invalid_token",
            "alg: none",
        ),
        (
            "expired token",
            sign_with_gateway_secret(gw, &claims(now_secs() - 3600, "meshgate")),
            "expired",
            "expired at",
        ),
        (
            "wrong-audience token",
            sign_with_gateway_secret(gw, &claims(now_secs() + 600, "someone-else")),
            "invalid_token",
            "audience",
        ),
        (
            "untrusted issuer",
            sign_es256(
                "oauth-trusted-es256.pem",
                &oauth_claims(now_secs() + 600, AUDIENCE, "https://evil.example.test"),
            ),
            "invalid_token",
            "not trusted",
        ),
        (
            "OAuth token for another audience",
            sign_es256(
                "oauth-trusted-es256.pem",
                &oauth_claims(now_secs() + 600, "https://other.example.test", ISSUER),
            ),
            "invalid_token",
            "audience",
        ),
        (
            "expired OAuth token",
            sign_es256(
                "oauth-trusted-es256.pem",
                &oauth_claims(now_secs() - 3600, AUDIENCE, ISSUER),
            ),
            "expired",
            "expired at",
        ),
        (
            "OAuth token signed by another key",
            sign_es256(
                "oauth-untrusted-es256.pem",
                &oauth_claims(now_secs() + 600, AUDIENCE, ISSUER),
            ),
            "invalid_token",
            "signature does not verify",
        ),
        (
            "HS256 token claiming the OAuth issuer",
            hs256_as_issuer,
            "invalid_token",
            "not accepted",
        ),
    ];
    for (what, credential, reason, words) in cases {
        let r = gw
            .client_with_key(&credential)
            .get(gw.url("/api/v1/auth/whoami"))
            .send()
            .await
            .expect("GET");
        let challenge = r
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let (status, body) = json_body(r).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["error"]["reason"], reason, "{what}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(words),
            "{what}: message {message:?} should say {words:?}"
        );
        assert!(
            !body.to_string().contains(&credential) || credential.len() < 12,
            "{what}: the answer echoes the credential: {body}"
        );
        assert!(
            challenge.contains("error=\"invalid_token\""),
            "{what}: {challenge}"
        );
    }
    // Only the key's non-secret prefix is named.
    let r = gw
        .client_with_key(&unknown)
        .get(gw.url("/api/v1/auth/whoami"))
        .send()
        .await
        .expect("GET");
    let (_, body) = json_body(r).await;
    assert!(
        body.to_string().contains(&unknown[..9]) && !body.to_string().contains(&unknown[9..]),
        "{body}"
    );

    // The valid OAuth token works, as the issuer's tenant and role, over MCP too.
    let good = sign_es256(
        "oauth-trusted-es256.pem",
        &oauth_claims(now_secs() + 600, AUDIENCE, ISSUER),
    );
    let (s, me) = send(
        &gw.client_with_key(&good),
        reqwest::Method::GET,
        &gw.url("/api/v1/auth/whoami"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{me}");
    assert_eq!(me["credential"], "oauth");
    assert_eq!(me["role"], "developer");
    assert_eq!(me["subject"], format!("{ISSUER}#user-1"));
    let (s, raw) = initialize_as(gw, &good).await;
    assert_eq!(s, StatusCode::OK);
    let raw = raw.expect("session");
    let r = raw
        .request(
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "via oauth"}}),
        )
        .await;
    assert_eq!(r["result"]["content"][0]["text"], "via oauth", "{r}");
    // The metadata names the issuer.
    let (s, meta) = send(
        &reqwest::Client::new(),
        reqwest::Method::GET,
        &gw.url("/.well-known/oauth-protected-resource"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(meta["authorization_servers"], json!([ISSUER]), "{meta}");
    assert!(
        meta["resource"]
            .as_str()
            .is_some_and(|r| r.ends_with("/mcp")),
        "{meta}"
    );
    // A gateway access token works until its key is revoked.
    let (s, _) = send(
        &gw.client_with_key(&access),
        reqwest::Method::GET,
        &gw.url("/api/v1/auth/whoami"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_its_whole_family() {
    let env = Env::start().await;
    let gw = &env.gw;
    let (key, key_id) = create_key(gw, json!({"name": "app", "role": "developer"})).await;
    let http = gw.client_with_key(&key);
    let (s, first) = send(
        &http,
        reqwest::Method::POST,
        &gw.url("/api/v1/auth/token"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{first}");
    assert_eq!(first["token_type"], "Bearer");
    assert!(
        first["expires_in"]
            .as_u64()
            .is_some_and(|e| e > 0 && e <= 900),
        "{first}"
    );
    assert!(
        first["refresh_token"]
            .as_str()
            .is_some_and(|r| r.starts_with("mgr_")),
        "{first}"
    );
    // The access token works on MCP and REST and carries the key's scopes.
    let access1 = first["access_token"].as_str().expect("access").to_owned();
    let (s, me) = send(
        &gw.client_with_key(&access1),
        reqwest::Method::GET,
        &gw.url("/api/v1/auth/whoami"),
        None,
    )
    .await;
    assert_eq!(
        (s, me["credential"].clone(), me["key_id"].clone()),
        (StatusCode::OK, json!("access_token"), json!(key_id)),
        "{me}"
    );
    let (s, raw) = initialize_as(gw, &access1).await;
    assert_eq!(s, StatusCode::OK);
    let r = raw
        .expect("session")
        .request(
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "jwt"}}),
        )
        .await;
    assert_eq!(r["result"]["content"][0]["text"], "jwt", "{r}");
    // An access token cannot be exchanged for more tokens.
    let (s, b) = send(
        &gw.client_with_key(&access1),
        reqwest::Method::POST,
        &gw.url("/api/v1/auth/token"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");

    let anonymous = reqwest::Client::new();
    let refresh = |token: &Value| json!({"refresh_token": token.as_str().expect("refresh token")});
    let (s, second) = send(
        &anonymous,
        reqwest::Method::POST,
        &gw.url("/api/v1/auth/refresh"),
        Some(refresh(&first["refresh_token"])),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{second}");
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let access2 = second["access_token"].as_str().expect("access").to_owned();
    let (s, _) = send(
        &gw.client_with_key(&access2),
        reqwest::Method::GET,
        &gw.url("/api/v1/auth/whoami"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    // Reuse of the first refresh token: refused, and the family is revoked.
    let (s, b) = send(
        &anonymous,
        reqwest::Method::POST,
        &gw.url("/api/v1/auth/refresh"),
        Some(refresh(&first["refresh_token"])),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already been used")),
        "{b}"
    );
    let (s, b) = send(
        &anonymous,
        reqwest::Method::POST,
        &gw.url("/api/v1/auth/refresh"),
        Some(refresh(&second["refresh_token"])),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "the newest refresh token of the family is revoked too: {b}"
    );
    assert_eq!(b["error"]["reason"], "revoked", "{b}");
    for access in [&access1, &access2] {
        let (s, b) = send(
            &gw.client_with_key(access),
            reqwest::Method::GET,
            &gw.url("/api/v1/auth/whoami"),
            None,
        )
        .await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "access tokens of a revoked family stop working: {b}"
        );
    }
    // The key itself still works and can start a new family; logout ends it.
    let (s, third) = send(
        &http,
        reqwest::Method::POST,
        &gw.url("/api/v1/auth/token"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{third}");
    let access3 = third["access_token"].as_str().expect("access").to_owned();
    let (s, b) = send(
        &gw.client_with_key(&access3),
        reqwest::Method::POST,
        &gw.url("/api/v1/auth/logout"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _) = send(
        &gw.client_with_key(&access3),
        reqwest::Method::GET,
        &gw.url("/api/v1/auth/whoami"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = send(
        &anonymous,
        reqwest::Method::POST,
        &gw.url("/api/v1/auth/refresh"),
        Some(refresh(&third["refresh_token"])),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Garbage is a clear 400/401, not a crash.
    let (s, b) = send(
        &anonymous,
        reqwest::Method::POST,
        &gw.url("/api/v1/auth/refresh"),
        Some(json!({"refresh_token": 7})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("refresh_token")),
        "{b}"
    );
    // The audit log has the story.
    let (_, audit) = send(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url("/api/v1/audit?action=token.reuse"),
        None,
    )
    .await;
    assert_eq!(
        audit["entries"].as_array().map(Vec::len),
        Some(1),
        "{audit}"
    );
    assert_eq!(audit["entries"][0]["target"], key_id);
}

#[tokio::test]
async fn repeated_failures_lock_a_client_out_then_the_lockout_expires() {
    let env = Env::start_with(|c| {
        c.auth("[auth.lockout]\nmax_failures = 5\nwindow_secs = 60\nlockout_secs = 2")
    })
    .await;
    let gw = &env.gw;
    let bad = gw.client_with_key(&format!("mg_{}", URL_SAFE_NO_PAD.encode([1u8; 32])));
    for i in 0..5 {
        let r = bad
            .get(gw.url("/api/v1/auth/whoami"))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    // Locked out: even the right key is refused, with when to come back.
    let r = gw
        .client()
        .get(gw.url("/api/v1/auth/whoami"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let (_, body) = json_body(r).await;
    assert_eq!(body["error"]["reason"], "locked_out", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("127.0.0.1") && m.contains("auth.lockout")),
        "{body}"
    );
    // Public endpoints stay reachable.
    let r = reqwest::Client::new()
        .get(gw.url("/health"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (status, metrics) = gw.get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK, "the lockout expired");
    assert!(metrics.contains("auth_lockouts_total 1"), "{metrics}");
    assert!(
        metrics.contains("auth_failures_total{reason=\"unknown_key\"} 5"),
        "{metrics}"
    );
    let (_, audit) = send(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url("/api/v1/audit?action=auth.lockout"),
        None,
    )
    .await;
    assert_eq!(audit["entries"][0]["target"], "127.0.0.1", "{audit}");
}

#[tokio::test]
async fn tool_rules_hide_denied_tools_and_refuse_calls_naming_the_rule() {
    let env = Env::start_with(|c| {
        c.toml("[[auth.tool_rules]]\neffect = \"deny\"\ntools = [\"fx__slow*\", \"*__add\"]\nrole = \"developer\"\n")
    })
    .await;
    let gw = &env.gw;
    let (dev, _) = create_key(gw, json!({"name": "dev", "role": "developer"})).await;
    let (_, raw) = initialize_as(gw, &dev).await;
    let raw = raw.expect("session");
    let names = tool_names_of(&raw.request("tools/list", json!({})).await);
    assert!(names.contains(&"fx__echo".to_owned()), "{names:?}");
    assert!(
        !names
            .iter()
            .any(|n| n == "fx__slow" || n.ends_with("__add")),
        "{names:?}"
    );
    let r = raw
        .request(
            "tools/call",
            json!({"name": "fxs__add", "arguments": {"a": 1, "b": 2}}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32003, "{r}");
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("fxs__add") && message.contains("auth.tool_rules[0]"),
        "{message}"
    );
    assert_eq!(r["error"]["data"]["reason"], "tool_denied", "{r}");
    // The admin is not affected.
    let (_, admin) = initialize_as(gw, &gw.admin_key).await;
    let admin = admin.expect("session");
    assert!(
        tool_names_of(&admin.request("tools/list", json!({})).await)
            .contains(&"fx__slow".to_owned())
    );
    let r = admin
        .request(
            "tools/call",
            json!({"name": "fxs__add", "arguments": {"a": 1, "b": 2}}),
        )
        .await;
    assert!(r.get("result").is_some(), "{r}");
    // The refusal is audited.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, audit) = send(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url("/api/v1/audit?action=tool.call&outcome=denied"),
        None,
    )
    .await;
    assert_eq!(audit["entries"][0]["target"], "fxs__add", "{audit}");
}

#[tokio::test]
async fn the_audit_log_records_calls_and_key_changes_with_filters_and_paging() {
    let env = Env::start().await;
    let gw = &env.gw;
    let (dev, dev_id) = create_key(gw, json!({"name": "auditee", "role": "developer"})).await;
    let (_, raw) = initialize_as(gw, &dev).await;
    let raw = raw.expect("session");
    for i in 0..3 {
        let r = raw
            .post_builder()
            .header("x-trace-id", format!("trace-{i}"))
            .body(json!({"jsonrpc": "2.0", "id": 100 + i, "method": "tools/call", "params": {"name": "fx__echo", "arguments": {"message": format!("m{i}")}}}).to_string())
            .send()
            .await
            .expect("POST");
        let answer = read_response(r, 100 + i).await;
        assert!(answer.get("result").is_some(), "{answer}");
    }
    let (s, b) = send(
        &gw.client(),
        reqwest::Method::PATCH,
        &gw.url(&format!("/api/v1/auth/keys/{dev_id}")),
        Some(json!({"scopes": ["mcp:read"]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["scopes"], json!(["mcp:read"]));
    // The narrowed key can no longer call tools.
    let r = raw
        .request(
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "x"}}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32003, "{r}");
    // Scopes a role cannot hold are refused with the reason.
    let (s, b) = send(
        &gw.client(),
        reqwest::Method::PATCH,
        &gw.url(&format!("/api/v1/auth/keys/{dev_id}")),
        Some(json!({"scopes": ["keys:write"]})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("developer") && m.contains("keys:write")),
        "{b}"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, calls) = send(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url(&format!(
            "/api/v1/audit?action=tool.call&actor={dev_id}&outcome=ok"
        )),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{calls}");
    let entries = calls["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 3, "{calls}");
    let newest = &entries[0];
    assert_eq!(newest["target"], "fx__echo");
    assert_eq!(newest["trace_id"], "trace-2");
    assert_eq!(newest["tenant"], "default");
    assert_eq!(newest["actor_kind"], "api_key");
    assert!(
        newest["latency_ms"].as_f64().is_some_and(|l| l > 0.0),
        "{newest}"
    );
    let hash = newest["args_hash"].as_str().expect("args hash");
    assert_eq!(hash.len(), 64);
    assert_ne!(
        entries[1]["args_hash"], newest["args_hash"],
        "different arguments hash differently"
    );
    assert!(
        !calls.to_string().contains("m2"),
        "arguments themselves are not stored: {calls}"
    );
    // Paging.
    let (_, page1) = send(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url("/api/v1/audit?action=tool.call&limit=2"),
        None,
    )
    .await;
    let cursor = page1["next_cursor"].as_i64().expect("next cursor");
    let (_, page2) = send(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url(&format!(
            "/api/v1/audit?action=tool.call&limit=2&cursor={cursor}"
        )),
        None,
    )
    .await;
    let ids: Vec<i64> = page1["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(page2["entries"].as_array().into_iter().flatten())
        .filter_map(|e| e["id"].as_i64())
        .collect();
    assert_eq!(ids.len(), 4, "{page1} {page2}");
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "newest first, no overlap: {ids:?}"
    );
    // The key records its last use.
    let (_, k) = send(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url(&format!("/api/v1/auth/keys/{dev_id}")),
        None,
    )
    .await;
    assert!(
        k["last_used_at"]
            .as_str()
            .is_some_and(|t| t.starts_with("20")),
        "{k}"
    );
    assert!(
        k.get("hash").is_none() && k.get("key").is_none(),
        "never the key or its hash: {k}"
    );
    // Key changes.
    let (_, changes) = send(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url(&format!("/api/v1/audit?target={dev_id}")),
        None,
    )
    .await;
    let actions: Vec<&str> = changes["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"key.create") && actions.contains(&"key.update"),
        "{changes}"
    );
    // A tenant admin cannot disarm a more powerful key (the bootstrap key holds tenants:*).
    let (tenant_admin, _) = create_key(gw, json!({"name": "tenant admin", "role": "admin"})).await;
    let (_, me) = send(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url("/api/v1/auth/whoami"),
        None,
    )
    .await;
    let boot_id = me["key_id"].as_str().expect("key id").to_owned();
    let (s, b) = send(
        &gw.client_with_key(&tenant_admin),
        reqwest::Method::DELETE,
        &gw.url(&format!("/api/v1/auth/keys/{boot_id}")),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("tenants:*")),
        "{b}"
    );
    // Bad filters are named.
    let (s, b) = send(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url("/api/v1/audit?limit=5000"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = send(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url("/api/v1/audit?since=yesterday"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b.to_string().contains("since"), "{b}");
}

#[tokio::test]
async fn the_keys_command_manages_keys_in_the_data_directory_of_a_running_gateway() {
    let env = Env::start().await;
    let gw = &env.gw;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(meshgate_bin())
            .args(args)
            .arg("--data-dir")
            .arg(gw.data_dir())
            .env_remove("MESHGATE_CONFIG")
            .output()
            .expect("run meshgate keys");
        assert!(
            out.status.success(),
            "meshgate {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let created: Value = serde_json::from_str(&run(&[
        "keys",
        "create",
        "--name",
        "ci bot",
        "--role",
        "viewer",
        "--expires-in",
        "1d",
        "--json",
    ]))
    .expect("JSON");
    let key = created["key"].as_str().expect("key").to_owned();
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(
        created["scopes"],
        json!(["mcp:read", "metrics:read", "tasks:read", "upstreams:read"])
    );
    let (s, me) = send(
        &gw.client_with_key(&key),
        reqwest::Method::GET,
        &gw.url("/api/v1/auth/whoami"),
        None,
    )
    .await;
    assert_eq!(
        (s, me["role"].clone()),
        (StatusCode::OK, json!("viewer")),
        "{me}"
    );
    let listing = run(&["keys", "list"]);
    assert!(
        listing.contains(&id) && listing.contains("ci bot") && !listing.contains(&key),
        "{listing}"
    );
    run(&["keys", "revoke", &id]);
    // The running gateway notices within its 5 s key cache.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    loop {
        let (s, b) = send(
            &gw.client_with_key(&key),
            reqwest::Method::GET,
            &gw.url("/api/v1/auth/whoami"),
            None,
        )
        .await;
        if s == StatusCode::UNAUTHORIZED {
            assert_eq!(b["error"]["reason"], "revoked", "{b}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked key still works"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Bad input is named.
    let out = std::process::Command::new(meshgate_bin())
        .args([
            "keys",
            "create",
            "--name",
            "x",
            "--role",
            "root",
            "--data-dir",
        ])
        .arg(gw.data_dir())
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin, operator, developer, agent, viewer")
    );
}

#[tokio::test]
async fn with_auth_disabled_everything_is_open_and_the_gateway_says_so() {
    let env = Env::start_with(|c| c.auth("enabled = false")).await;
    let gw = &env.gw;
    assert!(
        gw.admin_key.is_empty(),
        "no admin key is made when auth is off"
    );
    assert!(
        gw.log().contains("authentication is DISABLED"),
        "{}",
        gw.log()
    );
    let (s, health) = gw.get_json("/health").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(health["auth"], "disabled");
    assert!(
        health["warning"]
            .as_str()
            .is_some_and(|w| w.contains("DISABLED")),
        "{health}"
    );
    let (s, raw) = initialize_as(gw, "").await;
    assert_eq!(s, StatusCode::OK);
    let r = raw
        .expect("session")
        .request(
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "open"}}),
        )
        .await;
    assert_eq!(r["result"]["content"][0]["text"], "open", "{r}");
}

/// Serves `body` as JSON to every HTTP request on 127.0.0.1; returns the URL
/// and a counter of requests served.
async fn serve_json(body: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    (url, hits)
}

#[tokio::test]
async fn oauth_keys_are_fetched_from_the_issuers_jwks_url_once() {
    let jwks = std::fs::read_to_string(fixture("oauth-jwks.json")).expect("jwks");
    let (url, hits) = serve_json(jwks).await;
    let env = Env::start_with(|c| {
        c.toml(&format!(
            "[[auth.oauth.issuers]]\nissuer = \"{ISSUER}\"\njwks_url = \"{url}\"\naudience = [\"{AUDIENCE}\"]\ntenant = \"default\"\nrole = \"viewer\"\n"
        ))
    })
    .await;
    let gw = &env.gw;
    let claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "u2", "exp": now_secs() + 600, "scope": "mcp:read mcp:call"});
    let token = sign_es256("oauth-trusted-es256.pem", &claims);
    for _ in 0..3 {
        let (s, me) = send(
            &gw.client_with_key(&token),
            reqwest::Method::GET,
            &gw.url("/api/v1/auth/whoami"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{me}");
        // A viewer issuer cannot hand out mcp:call, whatever the token says.
        assert_eq!(me["scopes"], json!(["mcp:read"]), "{me}");
    }
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the key set is cached"
    );
    let (s, raw) = initialize_as(gw, &token).await;
    assert_eq!(s, StatusCode::OK);
    let r = raw
        .expect("session")
        .request(
            "tools/call",
            json!({"name": "fx__echo", "arguments": {"message": "x"}}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32003, "{r}");
}

#[tokio::test]
async fn a_graceful_shutdown_writes_every_queued_audit_entry() {
    let mut env = Env::start().await;
    let (_, raw) = initialize_as(&env.gw, &env.gw.admin_key.clone()).await;
    let raw = raw.expect("session");
    for i in 0..20 {
        let r = raw
            .request(
                "tools/call",
                json!({"name": "fx__echo", "arguments": {"message": format!("n{i}")}}),
            )
            .await;
        assert!(r.get("result").is_some(), "{r}");
    }
    assert!(env.gw.terminate_and_restart().await, "SIGTERM exits 0");
    let (s, audit) = env
        .gw
        .get_json("/api/v1/audit?action=tool.call&limit=100")
        .await;
    assert_eq!(s, StatusCode::OK, "{audit}");
    assert_eq!(
        audit["entries"].as_array().map(Vec::len),
        Some(20),
        "{audit}"
    );
}
