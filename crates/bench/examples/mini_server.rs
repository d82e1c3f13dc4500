//! Trivial MCP server on 127.0.0.1 for checking the load tool's own ceiling.
//!
//! Usage: `cargo run --release -p meshgate-bench --example mini_server -- [json|sse] [PORT]`

#[path = "../tests/support/mini_server.rs"]
mod mini_server;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = match args.next().as_deref() {
        None | Some("json") => mini_server::Mode::Json,
        Some("sse") => mini_server::Mode::Sse,
        Some(other) => anyhow::bail!("unknown mode {other:?}: expected json or sse"),
    };
    let port: u16 = match args.next() {
        Some(p) => p.parse()?,
        None => 0,
    };
    let (url, _counters) = mini_server::spawn(mode, None, port).await?;
    println!("listening on {url}");
    std::future::pending::<()>().await;
    Ok(())
}
