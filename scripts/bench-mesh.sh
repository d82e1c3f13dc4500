#!/usr/bin/env bash
# bench-mesh.sh: agent-mesh task assignment throughput and latency. One
# release gateway with auth on (the admin key on every request and agent) and
# the embedded SQLite store; `meshgate bench-mesh` connects 10 agents (in its
# own process; each completes a task as soon as it is assigned) and submits
# tasks over REST. Measured in one run:
#   baseline   plain authenticated HTTP round trips (GET /api/v1/auth/whoami)
#              from the same load tool at the same concurrency: the floor any
#              REST submission pays;
#   single     closed loop, one task per POST, concurrency 32: sustained
#              assignments per second (submit -> task.assigned at the agent);
#   batch      closed loop, arrays of 100 tasks per POST, concurrency 4;
#   half-rate  open loop at half the single-task throughput: latency
#              percentiles counted from each task's scheduled submit time.
# ROUNDS rounds of (baseline, single, batch), then the medians and the ratios
# to the baseline, then one half-rate run at half the median single rate.
#
# Usage: scripts/bench-mesh.sh [--rounds N] [--duration SECS] [--no-build]
# Environment: CARGO_TARGET_DIR  where the release binaries are (default: ./target)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN=$TARGET_DIR/release
ROUNDS=3 DURATION=5 BUILD=1
while (($#)); do
    case $1 in
    --rounds) ROUNDS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-mesh.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
((BUILD)) && (cd "$ROOT" && cargo build --release -p meshgate >&2)
[[ -x $BIN/meshgate ]] || { echo "bench-mesh.sh: $BIN/meshgate not found (build it, or drop --no-build)" >&2; exit 1; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/meshgate-bench-mesh.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$TMP/meshgate.toml" <<TOML
listen = "127.0.0.1:$PORT"
data_dir = "$TMP/data"
[log]
level = "warn"
[mesh]
agent_messages_per_sec = 1000000
TOML
"$BIN/meshgate" serve --config "$TMP/meshgate.toml" >"$TMP/gw.out" 2>"$TMP/gw.err" &
GW=$!
PIDS+=($GW)
for _ in $(seq 200); do [[ -s $TMP/data/admin.key ]] && curl -fs "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.05; done
KEY=$(cat "$TMP/data/admin.key")
[[ -n $KEY ]] || { echo "gateway did not start: $(cat "$TMP/gw.err")" >&2; exit 1; }
URL=http://127.0.0.1:$PORT
run() { "$BIN/meshgate" bench-mesh --url "$URL" --key "$KEY" --pid "$GW" --duration "$DURATION" --warmup 1 --json "$@"; }
: >"$TMP/results"
for r in $(seq "$ROUNDS"); do
    echo "round $r/$ROUNDS" >&2
    echo "baseline $(run --baseline -c 32)" >>"$TMP/results"
    echo "single $(run -c 32)" >>"$TMP/results"
    echo "batch $(run -c 4 --batch 100)" >>"$TMP/results"
done
python3 - "$TMP/results" >"$TMP/summary" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    kind, js = line.split(" ", 1)
    rows.setdefault(kind, []).append(json.loads(js))
med = lambda k, f: statistics.median(r[f] for r in rows[k])
base = med("baseline", "per_sec")
print(f"baseline  {base:8.0f} req/s   (authenticated GET round trips, c=32)")
for k in ("single", "batch"):
    ps = med(k, "per_sec")
    cpu = statistics.median(r["cpu_ms_per_task"] or 0 for r in rows[k])
    errs = sum(r["errors"] for r in rows[k])
    print(f"{k:8}  {ps:8.0f} tasks/s  ratio to baseline {ps/base:5.2f}   gateway CPU {cpu:.3f} ms/task   p99 {med(k,'latency')['p99_ms'] if False else statistics.median(r['latency']['p99_ms'] for r in rows[k]):.2f} ms   errors {errs}")
print(f"half_rate {med('single','per_sec')/2:.0f}")
PY
cat "$TMP/summary"
HALF=$(sed -n 's/^half_rate //p' "$TMP/summary")
echo "open loop at $HALF tasks/s (half the single-task throughput):"
"$BIN/meshgate" bench-mesh --url "$URL" --key "$KEY" --pid "$GW" --duration "$DURATION" --warmup 1 -c 64 --rate "$HALF"
