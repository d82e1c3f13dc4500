#!/usr/bin/env bash
# The project's test command (see README): installs the Node-based test peers
# and the Python MCP SDK, checks formatting and lints, runs every Rust test
# (unit, property and the integration suite that drives the real binary), the
# fuzz targets for a bounded time (FUZZ_SECONDS each, 60 by default), then the
# official MCP conformance suite through the gateway.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x tools/node_modules/node/bin/node ] || [ ! -d tools/node_modules/@modelcontextprotocol/server-everything ]; then
  npm ci --prefix tools --no-audit --no-fund
fi
tools/node_modules/node/bin/node --version >/dev/null
# The Python MCP SDK (tools/python-requirements.txt) in target/pyenv, for the
# tests that drive `meshgate stdio` with its stdio client.
bash scripts/python-env.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
cargo test --workspace --locked
scripts/fuzz.sh
scripts/conformance.sh
