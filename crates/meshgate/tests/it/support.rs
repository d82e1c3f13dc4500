//! Shared machinery of the integration tests: real processes (the `meshgate`
//! binary and the `meshgate-fixture` upstream), a recording rmcp client, raw
//! HTTP helpers and a small SSE reader.

// Sampling, elicitation and logging are deprecated in MCP 2026-07-28 but are
// exactly what these tests exercise on the session-based revisions.
#![allow(deprecated)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig,
    CreateMessageRequestParams, CreateMessageResult, ElicitRequestParams, ElicitResult,
    ElicitationAction, Implementation, LoggingMessageNotificationParam, ProgressNotificationParam,
    ProtocolVersion, SamplingMessage,
};
use rmcp::service::{NotificationContext, RequestContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, ErrorData as McpError, RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::sync::watch;

/// How long any single wait in these tests may take before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Binaries and temporary directories
// ---------------------------------------------------------------------------

/// The `meshgate` binary under test.
pub fn meshgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshgate"))
}

/// The `meshgate-fixture` binary, next to the `meshgate` binary. Built once
/// with `cargo build -p meshgate-fixture` (same profile) when it is missing.
pub fn fixture_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| sibling_bin("meshgate-fixture", "meshgate-fixture"))
}

/// The example agent `meshgate-agent` (package `meshgate-agent`), next to
/// the `meshgate` binary; built like the fixture when it is missing.
pub fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| sibling_bin("meshgate-agent", "meshgate-agent"))
}

fn sibling_bin(name: &str, package: &str) -> PathBuf {
    let meshgate = meshgate_bin();
    let dir = meshgate
        .parent()
        .expect("the meshgate binary has a parent folder");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        build_package(dir, package);
    }
    assert!(
        bin.exists(),
        "the binary {} is missing and `cargo build -p {package}` did not produce it; \
         build it yourself with the same profile as the tests",
        bin.display()
    );
    bin
}

fn build_package(profile_dir: &Path, package: &str) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", package]);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(target_dir) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target_dir);
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{cargo} build -p {package}`: {e}"));
    assert!(
        status.success(),
        "`{cargo} build -p {package}` failed with {status}"
    );
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `meshgate-it-<pid>-<n>-<label>`.
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "meshgate-it-{}-{n}-{nanos}-{label}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills and reaps a child process.
fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Quotes a string for TOML (JSON string escapes are valid TOML escapes).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

// ---------------------------------------------------------------------------
// The fixture upstream over HTTP
// ---------------------------------------------------------------------------

/// `meshgate-fixture --mode basic --transport http`, killed on drop.
pub struct HttpFixture {
    child: Child,
    /// Its MCP endpoint, `http://127.0.0.1:PORT/mcp`.
    pub url: String,
}

impl HttpFixture {
    /// Starts the fixture and waits for its `listening on` line.
    pub fn start() -> HttpFixture {
        HttpFixture::start_with(&[])
    }

    /// [`HttpFixture::start`] with more arguments (e.g. `--versions all`).
    pub fn start_with(extra: &[&str]) -> HttpFixture {
        let mut child = Command::new(fixture_bin())
            .args([
                "--mode",
                "basic",
                "--transport",
                "http",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", fixture_bin().display()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let url = match read {
            Ok(n) if n > 0 => line.trim().strip_prefix("listening on ").map(str::to_owned),
            _ => None,
        };
        match url {
            Some(url) => HttpFixture { child, url },
            None => {
                stop(&mut child);
                panic!("the fixture did not announce its address; first stdout line: {line:?}");
            }
        }
    }
}

impl Drop for HttpFixture {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------

/// Builds a gateway configuration.
#[derive(Default, Clone)]
pub struct GatewayConfig {
    upstreams: Vec<String>,
    mcp: Vec<String>,
    /// Extra lines under `[auth]`.
    auth: Vec<String>,
    /// Extra TOML appended at the end (tables such as `[[auth.tool_rules]]`).
    tail: Vec<String>,
    grace: Option<u64>,
}

impl GatewayConfig {
    /// No upstreams yet.
    pub fn new() -> GatewayConfig {
        GatewayConfig::default()
    }

    /// A Streamable HTTP upstream.
    pub fn http_upstream(mut self, name: &str, url: &str) -> GatewayConfig {
        self.upstreams.push(format!(
            "name = {}\ntransport = \"streamable_http\"\nurl = {}\nconnect_timeout_secs = 5\n",
            toml_str(name),
            toml_str(url)
        ));
        self
    }

    /// A Streamable HTTP upstream nobody listens on (connect timeout 1 s).
    pub fn dead_upstream(mut self, name: &str) -> GatewayConfig {
        let port = free_port();
        self.upstreams.push(format!(
            "name = {}\ntransport = \"streamable_http\"\nurl = \"http://127.0.0.1:{port}/mcp\"\nconnect_timeout_secs = 1\n",
            toml_str(name)
        ));
        self
    }

    /// A stdio upstream.
    pub fn stdio_upstream(mut self, name: &str, command: &Path, args: &[&str]) -> GatewayConfig {
        let args: Vec<String> = args.iter().map(|a| toml_str(a)).collect();
        self.upstreams.push(format!(
            "name = {}\ntransport = \"stdio\"\ncommand = {}\nargs = [{}]\nconnect_timeout_secs = 10\n",
            toml_str(name),
            toml_str(&command.display().to_string()),
            args.join(", ")
        ));
        self
    }

    /// The fixture over stdio, as upstream `name`.
    pub fn stdio_fixture(self, name: &str) -> GatewayConfig {
        self.stdio_upstream(
            name,
            fixture_bin(),
            &["--mode", "basic", "--transport", "stdio"],
        )
    }

    /// Adds `line` (e.g. `enabled = false`) under `[auth]`.
    pub fn auth(mut self, line: &str) -> GatewayConfig {
        self.auth.push(line.to_owned());
        self
    }

    /// Appends raw TOML (tables such as `[[auth.tool_rules]]`).
    pub fn toml(mut self, text: &str) -> GatewayConfig {
        self.tail.push(text.to_owned());
        self
    }

    /// Adds `key = value` lines to the last upstream (e.g. `tenant = "b"`).
    pub fn upstream_extra(mut self, lines: &str) -> GatewayConfig {
        if let Some(last) = self.upstreams.last_mut() {
            last.push_str(lines);
            last.push('\n');
        }
        self
    }

    /// Sets `shutdown_grace_secs` (1 unless set).
    pub fn shutdown_grace_secs(mut self, secs: u64) -> GatewayConfig {
        self.grace = Some(secs);
        self
    }

    /// Adds a line (`key = value`) to the `[mcp]` section.
    pub fn mcp_line(mut self, line: &str) -> GatewayConfig {
        self.mcp.push(line.to_owned());
        self
    }

    /// Sets `mcp.max_request_body_bytes`.
    pub fn max_request_body_bytes(mut self, limit: usize) -> GatewayConfig {
        self.mcp.push(format!("max_request_body_bytes = {limit}"));
        self
    }

    fn render(&self, port: u16, data_dir: &Path) -> String {
        let mut s = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = {}\nshutdown_grace_secs = {}\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n\n[mcp]\n{}\n",
            toml_str(&data_dir.display().to_string()),
            self.grace.unwrap_or(1),
            self.mcp.join("\n")
        );
        s.push_str("\n[auth]\n");
        for line in &self.auth {
            s.push_str(line);
            s.push('\n');
        }
        for up in &self.upstreams {
            s.push_str("\n[[upstreams]]\n");
            s.push_str(up);
        }
        for t in &self.tail {
            s.push('\n');
            s.push_str(t);
            s.push('\n');
        }
        s
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// A running `meshgate serve`, killed on drop (its temp dir is removed too).
pub struct Gateway {
    child: Option<Child>,
    /// The port it listens on.
    pub port: u16,
    config_path: PathBuf,
    log_path: PathBuf,
    data_dir: PathBuf,
    http: reqwest::Client,
    /// The admin key the gateway created on first start (empty when auth is off).
    pub admin_key: String,
    /// Extra variables of the gateway process's environment.
    extra_env: Vec<(String, String)>,
    // Dropped last: the process must be gone before its directory is removed.
    dir: TempDir,
}

impl Gateway {
    /// Writes the configuration, starts the gateway and waits until `/ready` is 200.
    pub async fn start(config: &GatewayConfig) -> Gateway {
        Gateway::start_with_env(config, &[]).await
    }

    /// [`Gateway::start`] with extra variables in the gateway process's
    /// environment (e.g. what `${env:NAME}` references read); restarts keep them.
    pub async fn start_with_env(config: &GatewayConfig, env: &[(&str, &str)]) -> Gateway {
        let dir = TempDir::new("gw");
        let port = free_port();
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("meshgate.toml");
        std::fs::write(&config_path, config.render(port, &data_dir))
            .expect("write the config file");
        let mut gw = Gateway {
            child: None,
            port,
            log_path: dir.path().join("gateway.log"),
            config_path,
            data_dir,
            http: reqwest::Client::new(),
            admin_key: String::new(),
            extra_env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            dir,
        };
        // The free port can be taken (e.g. as another test's outgoing port)
        // between picking it and the gateway binding it: pick again then.
        for _ in 0..4 {
            match gw.try_spawn().await {
                Ok(()) => {
                    gw.load_admin_key();
                    return gw;
                }
                Err(log) if log.contains("cannot listen") => {
                    gw.port = free_port();
                    std::fs::write(&gw.config_path, config.render(gw.port, &gw.data_dir))
                        .expect("write the config file");
                }
                Err(log) => panic!("the gateway exited before it was ready; its log:\n{log}"),
            }
        }
        gw.spawn().await;
        gw.load_admin_key();
        gw
    }

    /// Reads `admin.key` from the data directory, where the first start puts it.
    fn load_admin_key(&mut self) {
        self.admin_key = std::fs::read_to_string(self.data_dir.join("admin.key"))
            .map(|k| k.trim().to_owned())
            .unwrap_or_default();
        self.http = self.client_with_key(&self.admin_key.clone());
    }

    /// An HTTP client that sends the admin key on every request.
    pub fn client(&self) -> reqwest::Client {
        self.http.clone()
    }

    /// An HTTP client that sends `key` as `Authorization: Bearer` (none when empty).
    pub fn client_with_key(&self, key: &str) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        if !key.is_empty() {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
                    .expect("a key is a valid header value"),
            );
        }
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("build an HTTP client")
    }

    async fn spawn(&mut self) {
        if let Err(log) = self.try_spawn().await {
            panic!("the gateway exited before it was ready; its log:\n{log}");
        }
    }

    /// Starts the process and waits for readiness; `Err(log)` if it exited first.
    async fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "the gateway is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open the gateway log file");
        let mut cmd = Command::new(meshgate_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (name, _) in std::env::vars() {
            if name.starts_with("MESHGATE_") {
                cmd.env_remove(name);
            }
        }
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", meshgate_bin().display()));
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("(exit status {status})\n{}", self.log()));
            }
            if let Ok(r) = self.http.get(self.url("/ready")).send().await
                && r.status() == reqwest::StatusCode::OK
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "the gateway was not ready within 15 s; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the process (SIGKILL: nothing is flushed or drained).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
    }

    /// Stops the process with SIGTERM (a graceful shutdown), waits for it to
    /// exit, and starts it again; returns the exit status's success.
    pub async fn terminate_and_restart(&mut self) -> bool {
        let mut child = self.child.take().expect("the gateway is running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(15);
        let exited = loop {
            if let Ok(Some(s)) = child.try_wait() {
                break s.success();
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit within 15 s of SIGTERM; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.spawn().await;
        exited
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM (a graceful shutdown) without waiting.
    pub fn send_sigterm(&self) {
        let pid = self.pid().expect("the gateway is running");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit, at most `limit`; its exit status.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the gateway is running");
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return s;
            }
            if Instant::now() >= deadline {
                stop(&mut child);
                panic!(
                    "the gateway did not exit within {limit:?}; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident memory of the process in KiB (Linux `/proc`).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid().expect("the gateway is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Kills the process and starts it again with the same configuration,
    /// data directory and port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// `http://127.0.0.1:PORT<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The Streamable HTTP endpoint.
    pub fn mcp_url(&self) -> String {
        self.url("/mcp")
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// What the gateway wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GET `path`, returning the status and the body parsed as JSON.
    pub async fn get_json(&self, path: &str) -> (reqwest::StatusCode, Value) {
        let r = self.http.get(self.url(path)).send().await.expect("GET");
        let status = r.status();
        let text = r.text().await.expect("body");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {text}"));
        (status, body)
    }

    /// GET `path`, returning the status and the body text.
    pub async fn get_text(&self, path: &str) -> (reqwest::StatusCode, String) {
        let r = self.http.get(self.url(path)).send().await.expect("GET");
        (r.status(), r.text().await.expect("body"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The usual setup: the HTTP fixture as `fx` and the stdio fixture as `fxs`.
pub struct Env {
    /// The gateway (dropped first).
    pub gw: Gateway,
    /// The HTTP fixture, kept running for the gateway.
    _fx: HttpFixture,
}

impl Env {
    /// `fx` (HTTP) and `fxs` (stdio) behind one gateway.
    pub async fn start() -> Env {
        Env::start_with(|c| c).await
    }

    /// Like [`Env::start`], with extra configuration.
    pub async fn start_with(extra: impl FnOnce(GatewayConfig) -> GatewayConfig) -> Env {
        let fx = HttpFixture::start();
        let config = extra(
            GatewayConfig::new()
                .http_upstream("fx", &fx.url)
                .stdio_fixture("fxs"),
        );
        let gw = Gateway::start(&config).await;
        Env { gw, _fx: fx }
    }
}

// ---------------------------------------------------------------------------
// A recording rmcp client
// ---------------------------------------------------------------------------

/// Something the server sent to the client on its own.
#[derive(Debug, Clone)]
pub enum Seen {
    /// `notifications/progress`.
    Progress(ProgressNotificationParam),
    /// `notifications/message`.
    Log(LoggingMessageNotificationParam),
    /// `notifications/tools/list_changed`.
    ToolListChanged,
    /// `sampling/createMessage`, with the request.
    Sampling(CreateMessageRequestParams),
    /// `elicitation/create`, with its message.
    Elicitation(String),
}

struct ClientState {
    seen: Mutex<Vec<Seen>>,
    version: watch::Sender<u64>,
}

/// A client that answers sampling with [`SAMPLED_TEXT`], accepts elicitation
/// with `{"name": "Ann"}`, and records every notification.
#[derive(Clone)]
pub struct TestClient {
    state: Arc<ClientState>,
    protocol_version: ProtocolVersion,
}

/// What the test client's "model" answers to every sampling request.
pub const SAMPLED_TEXT: &str = "forty-two";

/// A connected client session.
pub type Session = RunningService<RoleClient, TestClient>;

impl TestClient {
    /// A client offering `protocol_version` in `initialize`.
    pub fn new(protocol_version: ProtocolVersion) -> TestClient {
        TestClient {
            state: Arc::new(ClientState {
                seen: Mutex::new(Vec::new()),
                version: watch::channel(0).0,
            }),
            protocol_version,
        }
    }

    fn record(&self, seen: Seen) {
        self.state.seen.lock().expect("lock").push(seen);
        self.state.version.send_modify(|v| *v += 1);
    }

    /// Everything recorded so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    /// Waits until `pick` finds something in what was recorded, for up to [`WAIT`].
    pub async fn wait_for<T>(&self, what: &str, mut pick: impl FnMut(&[Seen]) -> Option<T>) -> T {
        let mut rx = self.state.version.subscribe();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            rx.borrow_and_update();
            if let Some(found) = pick(&self.seen()) {
                return found;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "timed out waiting for {what}; the client saw: {:#?}",
                    self.seen()
                );
            }
        }
    }
}

impl ClientHandler for TestClient {
    fn get_info(&self) -> ClientConfig {
        let capabilities: ClientCapabilities = serde_json::from_value(
            json!({"sampling": {}, "elicitation": {"form": {}}, "roots": {}}),
        )
        .expect("valid capabilities");
        let mut info = ClientConfig::new(capabilities, Implementation::new("meshgate-it", "1.0.0"));
        info.protocol_version = self.protocol_version.clone();
        info
    }

    async fn create_message(
        &self,
        params: CreateMessageRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<CreateMessageResult, McpError> {
        self.record(Seen::Sampling(params));
        Ok(CreateMessageResult::new(
            SamplingMessage::assistant_text(SAMPLED_TEXT),
            "test-model".into(),
        )
        .with_stop_reason(CreateMessageResult::STOP_REASON_END_TURN))
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        let message = match &request {
            ElicitRequestParams::FormElicitationParams { message, .. } => message.clone(),
            other => format!("{other:?}"),
        };
        self.record(Seen::Elicitation(message));
        Ok(ElicitResult::new(ElicitationAction::Accept).with_content(json!({"name": "Ann"})))
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.record(Seen::Progress(params));
    }

    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.record(Seen::Log(params));
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.record(Seen::ToolListChanged);
    }
}

/// Connects a [`TestClient`] to the gateway's `/mcp` (protocol 2025-11-25).
pub async fn connect(gw: &Gateway) -> (Session, TestClient) {
    connect_with(gw, ProtocolVersion::V_2025_11_25).await
}

/// Connects a [`TestClient`] offering `version`, with the admin key.
pub async fn connect_with(gw: &Gateway, version: ProtocolVersion) -> (Session, TestClient) {
    connect_as(gw, version, &gw.admin_key).await
}

/// Connects a [`TestClient`] offering `version`, authenticating with `key`.
pub async fn connect_as(
    gw: &Gateway,
    version: ProtocolVersion,
    key: &str,
) -> (Session, TestClient) {
    connect_to(gw, "/mcp", version, key).await
}

/// `tools/call` parameters from a name and a JSON object of arguments.
pub fn call(name: &str, arguments: Value) -> CallToolRequestParams {
    let Value::Object(arguments) = arguments else {
        panic!("tool arguments must be a JSON object");
    };
    CallToolRequestParams::new(name.to_owned()).with_arguments(arguments)
}

/// The names `tools/list` shows, in order.
pub async fn tool_names(session: &Session) -> Vec<String> {
    session
        .list_all_tools()
        .await
        .expect("tools/list")
        .into_iter()
        .map(|t| t.name.to_string())
        .collect()
}

/// Calls a tool and fails the test on a protocol error.
pub async fn call_tool(session: &Session, name: &str, arguments: Value) -> CallToolResult {
    tokio::time::timeout(WAIT, session.call_tool(call(name, arguments)))
        .await
        .unwrap_or_else(|_| panic!("tools/call {name} did not answer in time"))
        .unwrap_or_else(|e| panic!("tools/call {name} failed: {e}"))
}

/// The concatenated text blocks of a tool result.
pub fn text_of(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text())
        .map(|t| t.text.as_str())
        .collect()
}

// ---------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------

/// One server-sent event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    /// `id:`.
    pub id: Option<String>,
    /// `event:`.
    pub event: Option<String>,
    /// `data:` lines joined with newlines.
    pub data: String,
}

impl SseEvent {
    /// The data parsed as JSON, if it is.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.data).ok()
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>;

/// An incremental reader of a `text/event-stream` response body.
pub struct SseReader {
    body: ByteStream,
    buf: String,
}

impl SseReader {
    /// Reads `response`'s body as SSE.
    pub fn new(response: reqwest::Response) -> SseReader {
        SseReader {
            body: Box::pin(
                response
                    .bytes_stream()
                    .map(|chunk| chunk.map(|b| b.to_vec())),
            ),
            buf: String::new(),
        }
    }

    /// The next event (comments and keep-alives skipped); `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if let Some(event) = parse_event(&block) {
                    return Some(event);
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self
                    .buf
                    .push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n")),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event carrying JSON data, within [`WAIT`]; panics otherwise.
    pub async fn next_message(&mut self, what: &str) -> (SseEvent, Value) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.next())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what} on the event stream"))
                .unwrap_or_else(|| panic!("the event stream ended while waiting for {what}"));
            if let Some(json) = event.json() {
                return (event, json);
            }
        }
    }

    /// Reads messages until one is the response to request `id`; returns it
    /// and every message read before it.
    pub async fn response_to(&mut self, id: i64) -> (Value, Vec<Value>) {
        let mut before = Vec::new();
        loop {
            let (_, message) = self
                .next_message(&format!("the response to request {id}"))
                .await;
            if message["id"] == json!(id)
                && (message.get("result").is_some() || message.get("error").is_some())
            {
                return (message, before);
            }
            before.push(message);
        }
    }
}

fn parse_event(block: &str) -> Option<SseEvent> {
    let mut event = SseEvent::default();
    let mut data = Vec::new();
    let mut any = false;
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        any = true;
        match field {
            "id" => event.id = Some(value.to_owned()),
            "event" => event.event = Some(value.to_owned()),
            "data" => data.push(value.to_owned()),
            _ => {}
        }
    }
    event.data = data.join("\n");
    any.then_some(event)
}

/// A Streamable HTTP session driven with plain HTTP requests.
pub struct RawSession {
    /// The HTTP client.
    pub http: reqwest::Client,
    /// The endpoint.
    pub url: String,
    /// `Mcp-Session-Id`, once initialized.
    pub session: Option<String>,
    next_id: AtomicU64,
}

/// Headers of every MCP POST.
pub const ACCEPT_BOTH: &str = "application/json, text/event-stream";

impl RawSession {
    /// A session-less handle on `gw`'s endpoint.
    pub fn new(gw: &Gateway) -> RawSession {
        RawSession {
            http: gw.client(),
            url: gw.mcp_url(),
            session: None,
            next_id: AtomicU64::new(1),
        }
    }

    /// Runs `initialize` + `notifications/initialized` and keeps the session id.
    pub async fn initialize(gw: &Gateway) -> RawSession {
        RawSession::handshake(RawSession::new(gw)).await
    }

    /// Like [`RawSession::initialize`], authenticating with `key`.
    pub async fn initialize_as(gw: &Gateway, key: &str) -> RawSession {
        let mut raw = RawSession::new(gw);
        raw.http = gw.client_with_key(key);
        RawSession::handshake(raw).await
    }

    /// `initialize` + `notifications/initialized` on a session-less handle.
    async fn handshake(mut raw: RawSession) -> RawSession {
        let init = json!({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "raw-it", "version": "1.0.0"}
            }
        });
        let r = raw.post(&init).await;
        assert_eq!(r.status(), reqwest::StatusCode::OK, "initialize failed");
        let session = r
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .expect("initialize returns Mcp-Session-Id")
            .to_owned();
        let answer = read_response(r, 0).await;
        assert_eq!(
            answer["result"]["serverInfo"]["name"], "meshgate",
            "{answer}"
        );
        raw.session = Some(session);
        let r = raw
            .post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
        raw
    }

    /// A POST with the MCP headers (and the session id, once known).
    pub fn post_builder(&self) -> reqwest::RequestBuilder {
        let mut b = self
            .http
            .post(&self.url)
            .header("accept", ACCEPT_BOTH)
            .header("content-type", "application/json");
        if let Some(s) = &self.session {
            b = b
                .header("mcp-session-id", s)
                .header("mcp-protocol-version", "2025-11-25");
        }
        b
    }

    /// POSTs a JSON message.
    pub async fn post(&self, message: &Value) -> reqwest::Response {
        self.post_builder()
            .body(message.to_string())
            .send()
            .await
            .expect("POST /mcp")
    }

    /// Sends a request and returns the JSON-RPC response (result or error).
    pub async fn request(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as i64;
        let r = self
            .post(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        assert_eq!(
            r.status(),
            reqwest::StatusCode::OK,
            "{method} got HTTP {}",
            r.status()
        );
        read_response(r, id).await
    }
}

/// Reads the JSON-RPC response to request `id` from a JSON or SSE body.
pub async fn read_response(r: reqwest::Response, id: i64) -> Value {
    let is_sse = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if is_sse {
        SseReader::new(r).response_to(id).await.0
    } else {
        let text = r.text().await.expect("body");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("response is not JSON ({e}): {text}"))
    }
}

/// Status and JSON body of a response that must be JSON.
pub async fn json_body(r: reqwest::Response) -> (reqwest::StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.expect("body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("HTTP {status}: body is not JSON ({e}): {text}"));
    (status, body)
}

/// Sends a request; returns the status and the body as JSON (or as a string).
pub async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (reqwest::StatusCode, Value) {
    let mut b = http.request(method, url);
    if let Some(body) = body {
        b = b.json(&body);
    }
    let r = b.send().await.expect("request");
    let status = r.status();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Creates a key through the REST API with the admin key; returns (key, id).
pub async fn create_key(gw: &Gateway, body: Value) -> (String, String) {
    let (status, v) = send(
        &gw.client(),
        reqwest::Method::POST,
        &gw.url("/api/v1/auth/keys"),
        Some(body.clone()),
    )
    .await;
    assert_eq!(
        status,
        reqwest::StatusCode::CREATED,
        "create key {body}: {v}"
    );
    (
        v["key"].as_str().expect("key").to_owned(),
        v["id"].as_str().expect("id").to_owned(),
    )
}

// ---------------------------------------------------------------------------
// Fault injection and a counting proxy (resilience tests)
// ---------------------------------------------------------------------------

impl HttpFixture {
    /// The fixture's fault control endpoint, `http://127.0.0.1:PORT/fault`.
    pub fn fault_url(&self) -> String {
        let base = self.url.strip_suffix("/mcp").unwrap_or(&self.url);
        format!("{base}/fault")
    }

    /// `POST /fault` with `spec` (the `fault` tool's arguments); returns the
    /// fault in force and panics unless the fixture accepts it.
    pub async fn set_fault(&self, spec: Value) -> Value {
        let r = reqwest::Client::new()
            .post(self.fault_url())
            .json(&spec)
            .send()
            .await
            .expect("POST /fault");
        let (status, body) = json_body(r).await;
        assert_eq!(
            status,
            reqwest::StatusCode::OK,
            "POST /fault {spec}: {body}"
        );
        body
    }

    /// `GET /fault`: `{pid, flaky_calls, flaky_answered, flaky_failed,
    /// cancellations, http_faulted, fault}`.
    pub async fn fault_stats(&self) -> Value {
        let r = reqwest::Client::new()
            .get(self.fault_url())
            .send()
            .await
            .expect("GET /fault");
        let (status, body) = json_body(r).await;
        assert_eq!(status, reqwest::StatusCode::OK, "GET /fault: {body}");
        body
    }
}

/// The JSON-RPC methods a [`CountingProxy`] counts.
const COUNTED_METHODS: [&str; 3] = ["tools/call", "prompts/get", "resources/read"];

/// A TCP proxy in front of an HTTP upstream that counts the requests of
/// [`COUNTED_METHODS`] the gateway sends through it (occurrences of the
/// quoted method name in the bytes going upstream), including those the
/// upstream rejects before any of its code runs. Stops accepting when dropped.
pub struct CountingProxy {
    /// The upstream URL with the proxy's address in place of the upstream's.
    pub url: String,
    counts: Arc<[AtomicU64; COUNTED_METHODS.len()]>,
    accept: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Listens on a free local port and forwards every connection to the
    /// host and port of `target` (an `http://HOST:PORT/path` URL).
    pub async fn start(target: &str) -> CountingProxy {
        let rest = target
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("not an http:// URL: {target}"));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let upstream = authority.to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let local = listener.local_addr().expect("proxy address");
        let counts = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
        let counter = counts.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, Some(counter)),
                        pump(server_read, client_write, None),
                    );
                });
            }
        });
        CountingProxy {
            url: format!("http://{local}{path}"),
            counts,
            accept,
        }
    }

    /// Requests of `method` (one of [`COUNTED_METHODS`]) forwarded so far.
    pub fn requests(&self, method: &str) -> u64 {
        let i = COUNTED_METHODS
            .iter()
            .position(|m| *m == method)
            .unwrap_or_else(|| panic!("the proxy does not count {method}"));
        self.counts[i].load(Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to` until either side closes, counting the quoted
/// [`COUNTED_METHODS`] in the copied bytes when `counts` is given.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counts: Option<Arc<[AtomicU64; COUNTED_METHODS.len()]>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let needles: Vec<Vec<u8>> = COUNTED_METHODS
        .iter()
        .map(|m| format!("\"{m}\"").into_bytes())
        .collect();
    let longest = needles.iter().map(Vec::len).max().unwrap_or(1);
    let mut buf = vec![0u8; 16 * 1024];
    // The end of the previous read, so a needle split across reads is found.
    let mut window: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(counts) = &counts {
            window.extend_from_slice(&buf[..n]);
            for (needle, count) in needles.iter().zip(counts.iter()) {
                // Only matches ending in the new bytes: older ones were counted.
                let fresh = window
                    .windows(needle.len())
                    .enumerate()
                    .filter(|(at, w)| w == needle && at + needle.len() > window.len() - n)
                    .count();
                count.fetch_add(fresh as u64, Ordering::SeqCst);
            }
            let keep = window.len().min(longest - 1);
            window.drain(..window.len() - keep);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The value of the Prometheus series starting with `series` (name and
/// labels, e.g. `gateway_circuit_breaker_state{upstream="fx"}`), if present.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// `<workspace>/target/pyenv/bin/python`, made by `scripts/python-env.sh`
/// (the Python MCP SDK the tests drive the gateway with).
pub fn python() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = workspace.join("target/pyenv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: these tests drive the gateway with the Python MCP SDK; run `bash scripts/python-env.sh` in the workspace first (scripts/test.sh does)",
        python.display()
    );
    python
}

impl Gateway {
    /// Its configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Rewrites its configuration file from `config` (same port and data
    /// directory), for reload tests; the running gateway is not told.
    pub fn rewrite_config(&self, config: &GatewayConfig) {
        let text = config.render(self.port, &self.data_dir);
        // Written whole and renamed into place, as editors do, so the
        // gateway never reads half a file.
        let tmp = self.config_path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).expect("write the config file");
        std::fs::rename(&tmp, &self.config_path).expect("replace the config file");
    }

    /// Sends SIGHUP (reload the configuration).
    pub fn send_sighup(&self) {
        let pid = self.pid().expect("the gateway is running");
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP failed");
    }
}

/// Like [`connect_as`], to another MCP endpoint of the gateway (`path`,
/// e.g. `/servers/dev/mcp`).
pub async fn connect_path(gw: &Gateway, path: &str, key: &str) -> (Session, TestClient) {
    connect_to(gw, path, ProtocolVersion::LATEST, key).await
}

async fn connect_to(
    gw: &Gateway,
    path: &str,
    version: ProtocolVersion,
    key: &str,
) -> (Session, TestClient) {
    let client = TestClient::new(version);
    let mut config =
        rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(
            gw.url(path),
        );
    if !key.is_empty() {
        config = config.auth_header(key.to_owned());
    }
    let transport = StreamableHttpClientTransport::from_config(config);
    let session = tokio::time::timeout(WAIT, client.clone().serve(transport))
        .await
        .expect("initialize did not finish in time")
        .unwrap_or_else(|e| {
            panic!(
                "initialize at {path} failed: {e}; gateway log:\n{}",
                gw.log()
            )
        });
    (session, client)
}
