//! Start-up and shutdown: open the store, record the configured upstreams,
//! start the gateway, bind, serve until SIGTERM or Ctrl-C, then drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::serve::ListenerExt;
use meshgate_core::Config;
use meshgate_store::{SqliteStore, Store};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::auth::{Auth, bootstrap_admin_key};
use crate::gateway::Gateway;
use crate::http::{AppState, router};
use crate::legacy::LegacySessions;

/// Installs the Prometheus recorder; call once per process.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("duration_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ],
        )
        .context("invalid histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")
}

/// Opens the data directory and store, and records the configured upstreams.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(Arc::new(open_sqlite(config).await?))
}

/// Opens the SQLite store (see [`open_store`]).
pub async fn open_sqlite(config: &Config) -> anyhow::Result<SqliteStore> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create data directory {} (data_dir / --data-dir)",
            config.data_dir.display()
        )
    })?;
    let store = SqliteStore::open(&config.data_dir).await?;
    let managed: Vec<String> = store
        .list_upstreams()
        .await?
        .into_iter()
        .filter(|r| r.source == crate::gateway::UpstreamSource::Api.label())
        .map(|r| r.name)
        .collect();
    for up in &config.upstreams {
        if managed.contains(&up.name) {
            // The managed row (and its secrets) stays; `managed_upstreams`
            // says which one is used.
            continue;
        }
        store
            .upsert_upstream(&crate::managed::record(
                up,
                crate::gateway::UpstreamSource::Config,
            )?)
            .await?;
    }
    let keep: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
    store.prune_upstreams("config", &keep).await?;
    Ok(store)
}

/// The managed upstreams kept in the store (created through the API or
/// `meshgate import`). One whose definition no longer parses or validates,
/// or whose name the configuration file now uses, is skipped with an error
/// in the log (it stays in the store for an operator to fix or delete).
pub async fn managed_upstreams(
    store: &dyn Store,
    config: &Config,
) -> anyhow::Result<Vec<meshgate_core::UpstreamConfig>> {
    let mut out = Vec::new();
    for row in store.list_upstreams().await? {
        if row.source != crate::gateway::UpstreamSource::Api.label() {
            continue;
        }
        let up: meshgate_core::UpstreamConfig = match serde_json::from_value(row.definition) {
            Ok(up) => up,
            Err(e) => {
                tracing::error!(upstream = %row.name, error = %e, "a stored managed upstream does not parse; skipped (DELETE /api/v1/upstreams/{} removes it)", row.name);
                continue;
            }
        };
        let mut errors = Vec::new();
        up.check("upstream", &config.namespacing.separator, &mut errors);
        if let Some(e) = errors.first() {
            tracing::error!(upstream = %row.name, error = %e, "a stored managed upstream is invalid; skipped");
            continue;
        }
        if config.upstreams.iter().any(|c| c.name == up.name) {
            tracing::error!(upstream = %row.name, "the configuration file now defines an upstream with the name of a managed one; the configured one is used, the managed one skipped");
            continue;
        }
        out.push(up);
    }
    Ok(out)
}

/// Runs the gateway until a shutdown signal.
pub async fn run(config: Config, metrics: PrometheusHandle) -> anyhow::Result<()> {
    run_with(config, metrics, None).await
}

/// [`run`], reloading the configuration file's upstreams on `SIGHUP` and
/// when the file changes.
pub async fn run_with(
    config: Config,
    metrics: PrometheusHandle,
    reloader: Option<crate::reload::Reloader>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let addr = config.listen_addr()?;
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let sqlite = open_sqlite(&config).await?;
    let mesh_store: Arc<dyn meshgate_store::MeshStore> = Arc::new(sqlite.clone());
    let store: Arc<dyn Store> = Arc::new(sqlite);
    let shutdown = CancellationToken::new();
    let auth = Auth::start(&config, store.clone(), shutdown.clone()).await?;
    let sealer = Arc::new(
        crate::session_token::SessionSealer::from_config(&config.mcp, &config.data_dir)
            .context("cannot set up the session key (mcp.session_key)")?,
    );
    if auth.enabled() {
        if let Some(key) = bootstrap_admin_key(store.as_ref(), &config.data_dir).await? {
            // Printed once, on purpose, to stdout (logs go to stderr): this
            // is how the operator gets in.
            println!(
                "\nmeshgate: created the first admin key (shown once; also saved to {}):\n\n    {key}\n\nUse it as `Authorization: Bearer <key>`, or create narrower keys with `meshgate keys create`.\n",
                config.data_dir.join("admin.key").display()
            );
        }
    } else {
        tracing::warn!("{}", crate::http::AUTH_DISABLED_WARNING);
    }
    let audit = auth.audit.clone();
    let mesh_config = config.mesh.clone();
    let managed = managed_upstreams(store.as_ref(), &config).await?;
    let gw = Gateway::start_with(config, managed, store, shutdown.clone())?;
    if let Some(reloader) = reloader {
        tokio::spawn(crate::reload::run(gw.clone(), reloader, shutdown.clone()));
    }
    if mesh_config.enabled {
        let mesh = crate::mesh::Mesh::start(mesh_config, mesh_store, shutdown.clone())
            .await
            .context("cannot start the agent mesh")?;
        if auth.enabled() {
            let _ = mesh.auth.set(auth.clone());
        }
        let _ = gw.mesh.set(mesh);
    }
    let app = router(AppState {
        gw: gw.clone(),
        metrics,
        legacy: Arc::new(LegacySessions::default()),
        auth,
        mcp_sessions: Arc::new(crate::resume::SequencedSessions::new(
            Default::default(),
            Arc::new(crate::resume::MemoryBuffer::new(
                crate::resume::BufferLimits {
                    messages: gw.config.mcp.resume_buffer_messages,
                    bytes: gw.config.mcp.resume_buffer_bytes,
                    max_age: Duration::from_secs(gw.config.mcp.resume_buffer_age_secs),
                },
            )),
            Duration::from_millis(gw.config.mcp.reorder_window_ms),
            gw.config.mcp.resume_buffer_messages,
        )),
        sealer,
        restore_hints: Arc::default(),
    });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}: is another process using the port? change it with --listen or MESHGATE_LISTEN"))?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(
        listen = %local,
        mcp = %format!("http://{local}/mcp"),
        sse = %format!("http://{local}/sse"),
        upstreams = gw.upstreams.len(),
        startup_ms = started.elapsed().as_millis() as u64,
        "meshgate listening"
    );
    let stop_accepting = CancellationToken::new();
    let signal = stop_accepting.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
    });
    let stop = stop_accepting.clone();
    let server = axum::serve(
        listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        }),
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await });
    let mut served = tokio::spawn(async move { server.await });
    tokio::select! {
        _ = stop_accepting.cancelled() => {}
        r = &mut served => {
            // The server ended on its own: an accept error.
            shutdown.cancel();
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e).context("server error"),
                Err(e) => Err(anyhow::anyhow!("server task failed: {e}")),
            };
        }
    }
    // Drain: the listener is closed, new requests on open connections are
    // refused, clients are told, and in-flight requests get up to
    // shutdown_grace_secs to finish.
    let in_flight = gw.inflight.count();
    tracing::info!(
        in_flight,
        grace_secs = grace.as_secs(),
        "shutdown requested; draining"
    );
    let drained = async { gw.inflight.drain(grace).await };
    let notice = announce_shutdown(&gw, grace);
    let (left, ()) = tokio::join!(drained, notice);
    if left > 0 {
        tracing::warn!(
            left,
            grace_secs = grace.as_secs(),
            "requests still in flight after shutdown_grace_secs; cancelling them"
        );
    }
    // Ends every session (SSE streams close, legacy streams get a final
    // `shutdown` event) and the background tasks.
    shutdown.cancel();
    // Every upstream connection closes too: stdio children get EOF and are
    // killed 2 s later if still running, so none outlives the gateway.
    let (result, children_left) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(5), served),
        gw.close_all_upstreams(Duration::from_secs(3)),
    );
    if children_left > 0 {
        tracing::warn!(
            children_left,
            "stdio upstream processes still running 3 s after their connections closed"
        );
    }
    if !audit.flush(Duration::from_secs(5)).await {
        tracing::warn!(
            "the audit log could not be flushed within 5 s; the newest entries may be missing"
        );
    }
    match result {
        Ok(Ok(Ok(()))) => tracing::info!("drained; bye"),
        Ok(Ok(Err(e))) => return Err(e).context("server error"),
        Ok(Err(e)) => return Err(anyhow::anyhow!("server task failed: {e}")),
        Err(_) => tracing::warn!("connections still open 5 s after the drain; closing them"),
    }
    Ok(())
}

/// Tells every connected client, with a `notifications/message` at level
/// `warning` (logger `meshgate`), that the gateway is going away.
async fn announce_shutdown(gw: &Gateway, grace: Duration) {
    for client in gw.clients.live() {
        let Some(outbox) = client.outbox.get() else {
            continue;
        };
        let n = crate::outbox::warning(
            "meshgate",
            serde_json::json!({
                "message": format!("meshgate is shutting down: requests in flight may finish within {} s, new ones are refused; reconnect to another instance or after the restart", grace.as_secs()),
                "reason": "shutting_down",
            }),
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), outbox.push(n)).await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
