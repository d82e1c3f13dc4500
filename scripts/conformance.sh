#!/usr/bin/env bash
# Runs the official MCP conformance suite (@modelcontextprotocol/conformance,
# all active server scenarios) three ways and fails on any regression:
#   1. directly against the conformance fixture (the reference),
#   2. through meshgate, fixture as a Streamable HTTP upstream,
#   3. through meshgate, fixture as a stdio upstream.
# The expected pass count lives in conformance/expected-passed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
profile=${PROFILE:-debug}
bin=$root/target/$profile
expected=$(cat conformance/expected-passed)
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

[ -x tools/node_modules/node/bin/node ] || { echo "conformance: tools/node_modules missing; run: npm ci --prefix tools" >&2; exit 1; }
export PATH=$root/tools/node_modules/node/bin:$PATH
[ -x "$bin/meshgate" ] && [ -x "$bin/meshgate-fixture" ] || cargo build -p meshgate -p meshgate-fixture $([ "$profile" = release ] && echo --release)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_ready() { # url
  for _ in $(seq 1 300); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "conformance: $1 never became ready" >&2; return 1
}

run_suite() { # label url
  local out=$work/$1.txt
  ( cd tools && ./node_modules/.bin/conformance server --url "$2" ) > "$out" 2>&1 || true
  local total passed failed
  total=$(grep -E '^Total: [0-9]+ passed, [0-9]+ failed' "$out" | tail -1)
  if [ -z "$total" ]; then echo "conformance[$1]: no summary line; output:" >&2; tail -30 "$out" >&2; return 1; fi
  passed=$(sed -E 's/Total: ([0-9]+) passed.*/\1/' <<<"$total")
  failed=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$total")
  echo "conformance[$1]: $passed passed, $failed failed (expected $expected passed)"
  if [ "$failed" != 0 ] || [ "$passed" -lt "$expected" ]; then
    grep -E '✗' "$out" >&2 || true
    tail -40 "$out" >&2
    return 1
  fi
}

# 1. Reference: the fixture directly.
fport=$(free_port)
"$bin/meshgate-fixture" --mode conformance --transport http --listen 127.0.0.1:$fport > "$work/fixture.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do grep -q '^listening on' "$work/fixture.log" && break; sleep 0.05; done
grep -q '^listening on' "$work/fixture.log" || { echo "conformance: fixture did not start:" >&2; cat "$work/fixture.log" >&2; exit 1; }
run_suite direct "http://127.0.0.1:$fport/mcp"

# 2 and 3: through the gateway.
start_gateway() { # label upstream-toml
  local port; port=$(free_port)
  cat > "$work/$1.toml" <<TOML
listen = "127.0.0.1:$port"
data_dir = "$work/$1-data"
[log]
format = "json"
level = "warn"
# The conformance CLI cannot send credentials, so this local, loopback-only
# gateway runs with authentication explicitly off (the local-dev setting).
[auth]
enabled = false
$2
TOML
  "$bin/meshgate" serve --config "$work/$1.toml" > "$work/$1.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$port/ready"
  gw_url="http://127.0.0.1:$port/mcp"
}

start_gateway via-http "[[upstreams]]
name = \"conformance\"
transport = \"streamable_http\"
url = \"http://127.0.0.1:$fport/mcp\""
run_suite gateway-http-upstream "$gw_url"

start_gateway via-stdio "[[upstreams]]
name = \"conformance\"
transport = \"stdio\"
command = \"$bin/meshgate-fixture\"
args = [\"--mode\", \"conformance\", \"--transport\", \"stdio\"]"
run_suite gateway-stdio-upstream "$gw_url"
echo "conformance: all runs passed"
