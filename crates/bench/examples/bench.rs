//! Stand-alone front end for the load tool (same options as `meshgate bench`).
//!
//! Usage: `cargo run --release -p meshgate-bench --example bench -- --url http://127.0.0.1:3001/mcp`

use clap::Parser;

/// Load tool for MCP tools/call over Streamable HTTP.
#[derive(Parser)]
#[command(name = "meshgate-bench")]
struct Cli {
    #[command(flatten)]
    bench: meshgate_bench::BenchArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    meshgate_bench::run_cli(Cli::parse().bench).await
}
