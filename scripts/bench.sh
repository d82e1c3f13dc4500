#!/usr/bin/env bash
# bench.sh: measure MCP tools/call directly against an upstream and through the
# meshgate gateway, in one run, alternating direct/gateway after a warm-up.
#
# Targets (each started here, on 127.0.0.1 only):
#   everything  @modelcontextprotocol/server-everything over Streamable HTTP (Node)
#   fixture     target/release/meshgate-fixture --mode basic --transport http
# For each target, at concurrency 16 and 1: ROUNDS x (direct, gateway), then a
# table of medians and gateway/direct ratios (throughput, p50, CPU per call),
# plus the gateway's idle RSS and start-up-to-ready time.
#
# CPU per call: direct runs report the upstream process, gateway runs the
# gateway process (utime+stime from /proc/PID/stat over the measured phase).
# Every bench run is bounded by --duration and --requests.
#
# Usage: scripts/bench.sh [--quick] [--json FILE] [--no-build]
#                         [--targets everything,fixture] [--direct-only]
# Environment:
#   CARGO_TARGET_DIR  where the release binaries are (default: ./target)
#   MESHGATE_BENCH    load tool command to use instead of "meshgate bench"
#                     (any binary taking the same options)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN_DIR=$TARGET_DIR/release
GATEWAY_BIN=$BIN_DIR/meshgate
FIXTURE_BIN=$BIN_DIR/meshgate-fixture
TOOLS=$ROOT/tools
EVERYTHING_JS=$TOOLS/node_modules/@modelcontextprotocol/server-everything/dist/index.js
CALL_ARGS='{"message":"hello"}'

QUICK=0
JSON_OUT=""
BUILD=1
DIRECT_ONLY=0
TARGETS="everything,fixture"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

while (($#)); do
    case $1 in
    --quick) QUICK=1 ;;
    --json)
        [[ $# -ge 2 ]] || { echo "bench.sh: --json needs a file name" >&2; exit 2; }
        JSON_OUT=$2
        shift
        ;;
    --json=*) JSON_OUT=${1#--json=} ;;
    --no-build) BUILD=0 ;;
    --direct-only) DIRECT_ONLY=1 ;;
    --targets)
        [[ $# -ge 2 ]] || { echo "bench.sh: --targets needs a list" >&2; exit 2; }
        TARGETS=$2
        shift
        ;;
    --targets=*) TARGETS=${1#--targets=} ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -n $JSON_OUT && $JSON_OUT != /* ]]; then JSON_OUT=$PWD/$JSON_OUT; fi

# Run sizes: every run is bounded by both a duration and a call count.
if ((QUICK)); then
    ROUNDS=1
    WARMUP=300          # calls before each measured phase
    PRE_WARMUP=500      # calls per path before the first round
    C16_DURATION=2 C16_REQUESTS=3000
    C1_DURATION=1 C1_REQUESTS=500
else
    ROUNDS=3
    WARMUP=1000
    PRE_WARMUP=3000
    C16_DURATION=10 C16_REQUESTS=100000
    C1_DURATION=5 C1_REQUESTS=10000
fi

declare -a TARGET_LIST=()
IFS=',' read -r -a TARGET_LIST <<<"$TARGETS"
for t in "${TARGET_LIST[@]}"; do
    case $t in everything | fixture) ;; *) echo "bench.sh: unknown target $t (everything, fixture)" >&2; exit 2 ;; esac
done
((${#TARGET_LIST[@]})) || { echo "bench.sh: no targets" >&2; exit 2; }
want() { [[ ,$TARGETS, == *,$1,* ]]; }

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/meshgate-bench.XXXXXX")
declare -a PIDS=()

cleanup() {
    local status=$? pid i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
    echo "bench.sh: $*" >&2
    exit 1
}

# ---------------------------------------------------------------- helpers
# Fork-free sleep: read with a timeout on a FIFO nobody writes to.
mkfifo "$TMP/sleep.fifo"
exec {SLEEP_FD}<>"$TMP/sleep.fifo"
nap() { read -r -t "$1" -u "$SLEEP_FD" _ || true; }

now_us() { NOW_US=${EPOCHREALTIME/[.,]/}; }

# Sets HTTP_STATUS to the status code of GET http://127.0.0.1:$1$2 ("" if no answer). No fork.
http_get_status() {
    local port=$1 path=$2 fd line
    HTTP_STATUS=""
    { exec {fd}<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 0
    { printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$path" "$port" >&"$fd"; } 2>/dev/null || true
    if IFS= read -r -t 2 line <&"$fd"; then
        [[ $line =~ ^HTTP/[0-9.]+\ ([0-9]{3}) ]] && HTTP_STATUS=${BASH_REMATCH[1]}
    fi
    exec {fd}>&-
}

free_port() {
    "$NODE" -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{process.stdout.write(String(s.address().port));s.close()})'
}

alive() { kill -0 "$1" 2>/dev/null; }

show_log() {
    echo "---- last lines of $1 ----" >&2
    tail -n 20 "$1" >&2 || true
}

# ---------------------------------------------------------------- build & tools
cd "$ROOT"
if ((BUILD)); then
    echo "building release binaries..." >&2
    cargo build --release -p meshgate -p meshgate-fixture
fi
if want everything && [[ ! -f $EVERYTHING_JS ]]; then
    echo "installing tools/node_modules..." >&2
    (cd "$TOOLS" && npm install --no-audit --no-fund)
fi
if [[ -x $TOOLS/node_modules/.bin/node ]]; then NODE=$TOOLS/node_modules/.bin/node; else NODE=$(command -v node) || die "node not found"; fi

if [[ -n ${MESHGATE_BENCH:-} ]]; then
    read -r -a BENCH <<<"$MESHGATE_BENCH"
else
    BENCH=("$GATEWAY_BIN" bench)
fi
[[ -x ${BENCH[0]} ]] || command -v "${BENCH[0]}" >/dev/null || die "load tool ${BENCH[0]} not found (build it, or set MESHGATE_BENCH)"
((DIRECT_ONLY)) || [[ -x $GATEWAY_BIN ]] || die "gateway $GATEWAY_BIN not found (build it, or use --direct-only)"
if want fixture; then [[ -x $FIXTURE_BIN ]] || die "fixture $FIXTURE_BIN not found"; fi
if want everything; then [[ -f $EVERYTHING_JS ]] || die "$EVERYTHING_JS not found"; fi

# ---------------------------------------------------------------- upstreams
declare -A DIRECT_URL=() DIRECT_PID=() GATEWAY_TOOL=()

start_everything() {
    local port pid
    # Node's listen(PORT) binds every interface; this preload pins it to loopback.
    cat >"$TMP/loopback.cjs" <<'EOF'
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const p = args[0];
  if ((typeof p === "number" || (typeof p === "string" && /^\d+$/.test(p))) &&
      (args.length === 1 || typeof args[1] === "function")) {
    args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};
EOF
    port=$(free_port)
    # Its per-request console.log goes to /dev/null: logging to a file costs it CPU.
    PORT=$port "$NODE" --require "$TMP/loopback.cjs" "$EVERYTHING_JS" streamableHttp >/dev/null 2>"$TMP/everything.log" &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1 1000); do
        alive "$pid" || { show_log "$TMP/everything.log"; die "server-everything exited during start-up"; }
        http_get_status "$port" /mcp
        [[ -n $HTTP_STATUS ]] && break
        nap 0.01
    done
    [[ -n $HTTP_STATUS ]] || die "server-everything did not answer on port $port within 10 s"
    DIRECT_URL[everything]="http://127.0.0.1:$port/mcp"
    DIRECT_PID[everything]=$pid
    GATEWAY_TOOL[everything]=everything__echo
}

start_fixture() {
    local pid line=""
    "$FIXTURE_BIN" --mode basic --transport http --listen 127.0.0.1:0 >"$TMP/fixture.out" 2>"$TMP/fixture.log" &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1 1000); do
        alive "$pid" || { show_log "$TMP/fixture.log"; die "meshgate-fixture exited during start-up"; }
        IFS= read -r line <"$TMP/fixture.out" || true
        [[ $line == "listening on "* ]] && break
        nap 0.01
    done
    [[ $line =~ ^listening\ on\ (http://127\.0\.0\.1:[0-9]+/mcp) ]] || die "meshgate-fixture did not print its address (got: ${line:-nothing})"
    DIRECT_URL[fixture]=${BASH_REMATCH[1]}
    DIRECT_PID[fixture]=$pid
    GATEWAY_TOOL[fixture]=fixture__echo
}

want everything && start_everything
want fixture && start_fixture
for t in "${TARGET_LIST[@]}"; do echo "upstream $t: ${DIRECT_URL[$t]} (pid ${DIRECT_PID[$t]})" >&2; done

# ---------------------------------------------------------------- gateway
GW_URL="" GW_PID="" GW_READY_MS="null" GW_RSS_KIB="null"
if ((!DIRECT_ONLY)); then
    GW_PORT=$(free_port)
    mkdir -p "$TMP/data"
    {
        printf 'listen = "127.0.0.1:%s"\n' "$GW_PORT"
        printf 'data_dir = "%s/data"\n' "$TMP"
        printf '[log]\nformat = "json"\nlevel = "warn"\n'
        printf '[namespacing]\nprefix_mode = "always"\nseparator = "__"\n'
        for t in "${TARGET_LIST[@]}"; do
            printf '[[upstreams]]\nname = "%s"\ntransport = "streamable_http"\nurl = "%s"\n' "$t" "${DIRECT_URL[$t]}"
        done
    } >"$TMP/meshgate.toml"

    now_us
    GW_T0=$NOW_US
    "$GATEWAY_BIN" serve --config "$TMP/meshgate.toml" >"$TMP/gateway.out" 2>"$TMP/gateway.log" &
    GW_PID=$!
    PIDS+=("$GW_PID")
    HTTP_STATUS=""
    while :; do
        http_get_status "$GW_PORT" /ready
        now_us
        [[ $HTTP_STATUS == 200 ]] && break
        alive "$GW_PID" || { show_log "$TMP/gateway.log"; die "gateway exited during start-up"; }
        ((NOW_US - GW_T0 < 20000000)) || { show_log "$TMP/gateway.log"; die "gateway not ready (GET /ready != 200) within 20 s"; }
        nap 0.005
    done
    GW_READY_MS=$(((NOW_US - GW_T0) / 1000)).$(printf '%01d' $(((NOW_US - GW_T0) % 1000 / 100)))
    GW_URL="http://127.0.0.1:$GW_PORT/mcp"
    # Authentication stays on (the default), so its cost is part of the figure.
    GW_KEY=$(cat "$TMP/data/admin.key") || die "the gateway wrote no admin.key"
    nap 1 # let it settle before reading its idle footprint
    GW_RSS_KIB=$(awk '/^VmRSS:/ {print $2}' "/proc/$GW_PID/status" 2>/dev/null || true)
    [[ $GW_RSS_KIB =~ ^[0-9]+$ ]] || { show_log "$TMP/gateway.log"; die "gateway exited after becoming ready"; }
    echo "gateway: $GW_URL (pid $GW_PID) ready in $GW_READY_MS ms, idle RSS $((GW_RSS_KIB / 1024)) MiB" >&2
fi

# ---------------------------------------------------------------- runs
RESULTS=$TMP/results.jsonl
: >"$RESULTS"

# bench_run TARGET PATH(direct|gateway) CONCURRENCY ROUND DURATION REQUESTS WARMUP
# Appends one JSON line to $RESULTS (ROUND 0 = warm-up, not recorded).
bench_run() {
    local target=$1 path=$2 c=$3 round=$4 duration=$5 requests=$6 warmup=$7 url tool pid out
    local auth=()
    if [[ $path == direct ]]; then
        url=${DIRECT_URL[$target]} tool=echo pid=${DIRECT_PID[$target]}
    else
        url=$GW_URL tool=${GATEWAY_TOOL[$target]} pid=$GW_PID
        auth=(--header "Authorization: Bearer $GW_KEY")
    fi
    if ! out=$("${BENCH[@]}" --url "$url" --tool "$tool" --args "$CALL_ARGS" "${auth[@]}" \
        --concurrency "$c" --duration "$duration" --requests "$requests" \
        --warmup "$warmup" --pid "$pid" --json 2>"$TMP/bench.err"); then
        cat "$TMP/bench.err" >&2
        [[ $path == gateway ]] && show_log "$TMP/gateway.log"
        die "bench failed: $target $path c=$c round $round"
    fi
    ((round > 0)) || return 0
    printf '{"target":"%s","path":"%s","concurrency":%s,"round":%s,"report":%s}\n' \
        "$target" "$path" "$c" "$round" "$out" >>"$RESULTS"
    local cps p50 p99 cpu errors
    [[ $out =~ \"calls_per_sec\":([-0-9.eE+]+) ]] && cps=${BASH_REMATCH[1]}
    [[ $out =~ \"p50_ms\":([-0-9.eE+]+) ]] && p50=${BASH_REMATCH[1]}
    [[ $out =~ \"p99_ms\":([-0-9.eE+]+) ]] && p99=${BASH_REMATCH[1]}
    [[ $out =~ \"target_cpu_ms_per_call\":([-0-9.eE+]+|null) ]] && cpu=${BASH_REMATCH[1]}
    [[ $out =~ \"errors\":([0-9]+) ]] && errors=${BASH_REMATCH[1]}
    if [[ ${cpu:-null} == null ]]; then cpu=-; else LC_ALL=C printf -v cpu '%.4f' "$cpu"; fi
    LC_ALL=C printf '  %-10s %-7s c=%-2s round %s: %8.0f calls/s  p50 %7.3f ms  p99 %7.3f ms  cpu %s ms/call%s\n' \
        "$target" "$path" "$c" "$round" "${cps:-0}" "${p50:-0}" "${p99:-0}" "$cpu" \
        "$( ((${errors:-0} == 0)) || echo "  ERRORS: $errors")" >&2
}

PATHS=(direct)
((DIRECT_ONLY)) || PATHS+=(gateway)

for t in "${TARGET_LIST[@]}"; do
    echo "$t: warm-up" >&2
    for p in "${PATHS[@]}"; do bench_run "$t" "$p" 16 0 "$C16_DURATION" 1 "$PRE_WARMUP"; done
    for c in 16 1; do
        if ((c == 16)); then d=$C16_DURATION n=$C16_REQUESTS; else d=$C1_DURATION n=$C1_REQUESTS; fi
        for ((r = 1; r <= ROUNDS; r++)); do
            for p in "${PATHS[@]}"; do bench_run "$t" "$p" "$c" "$r" "$d" "$n" "$WARMUP"; done
        done
    done
done

# ---------------------------------------------------------------- summary
META=$(printf '{"quick":%s,"rounds":%s,"direct_only":%s,"gateway":{"ready_ms":%s,"idle_rss_kib":%s},"runs":{"c16":{"duration_s":%s,"requests":%s},"c1":{"duration_s":%s,"requests":%s},"warmup":%s}}' \
    "$([[ $QUICK == 1 ]] && echo true || echo false)" "$ROUNDS" "$([[ $DIRECT_ONLY == 1 ]] && echo true || echo false)" \
    "$GW_READY_MS" "$GW_RSS_KIB" "$C16_DURATION" "$C16_REQUESTS" "$C1_DURATION" "$C1_REQUESTS" "$WARMUP")

"$NODE" - "$RESULTS" "$META" "$JSON_OUT" <<'EOF'
const fs = require("fs");
const [resultsFile, metaJson, jsonOut] = process.argv.slice(2);
const meta = JSON.parse(metaJson);
const runs = fs.readFileSync(resultsFile, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l));

const median = (xs) => {
  const v = xs.filter((x) => typeof x === "number" && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return null;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
};
const ratio = (g, d) => (g == null || d == null || d === 0 ? null : g / d);

const groups = [];
for (const r of runs) {
  let g = groups.find((x) => x.target === r.target && x.concurrency === r.concurrency);
  if (!g) groups.push((g = { target: r.target, concurrency: r.concurrency, direct: [], gateway: [] }));
  g[r.path].push(r.report);
}
const summary = groups.map((g) => {
  const side = (reports) => ({
    rounds: reports.length,
    calls_per_sec: median(reports.map((r) => r.calls_per_sec)),
    p50_ms: median(reports.map((r) => r.p50_ms)),
    p99_ms: median(reports.map((r) => r.p99_ms)),
    cpu_ms_per_call: median(reports.map((r) => r.target_cpu_ms_per_call)),
    errors: reports.reduce((a, r) => a + r.errors, 0),
  });
  const d = side(g.direct), gw = side(g.gateway);
  return {
    target: g.target, concurrency: g.concurrency,
    direct: d, gateway: g.gateway.length ? gw : null,
    ratio: g.gateway.length ? {
      calls_per_sec: ratio(gw.calls_per_sec, d.calls_per_sec),
      p50_ms: ratio(gw.p50_ms, d.p50_ms),
      cpu_ms_per_call: ratio(gw.cpu_ms_per_call, d.cpu_ms_per_call),
    } : null,
    added_p50_ms: g.gateway.length && gw.p50_ms != null && d.p50_ms != null ? gw.p50_ms - d.p50_ms : null,
  };
});

const f = (x, digits) => (x == null ? "-" : x.toFixed(digits));
const pad = (s, n) => String(s).padStart(n);
const lines = [];
lines.push("");
lines.push(`medians of ${meta.rounds} round(s); CPU ms/call: direct = upstream process, gateway = gateway process`);
lines.push(
  "target      c  |   calls/s direct  gateway  ratio |  p50 ms direct  gateway  ratio  added |" +
  "  p99 ms direct  gateway | CPU ms/call upstream  gateway  ratio | errors");
for (const s of summary) {
  const d = s.direct, g = s.gateway || {}, r = s.ratio || {};
  lines.push(
    `${s.target.padEnd(10)} ${pad(s.concurrency, 2)}  | ` +
    `${pad(f(d.calls_per_sec, 0), 14)} ${pad(f(g.calls_per_sec, 0), 8)} ${pad(f(r.calls_per_sec, 2), 6)} | ` +
    `${pad(f(d.p50_ms, 3), 13)} ${pad(f(g.p50_ms, 3), 8)} ${pad(f(r.p50_ms, 2), 6)} ${pad(s.added_p50_ms == null ? "-" : (s.added_p50_ms >= 0 ? "+" : "") + s.added_p50_ms.toFixed(3), 6)} | ` +
    `${pad(f(d.p99_ms, 3), 13)} ${pad(f(g.p99_ms, 3), 8)} | ` +
    `${pad(f(d.cpu_ms_per_call, 4), 20)} ${pad(f(g.cpu_ms_per_call, 4), 8)} ${pad(f(r.cpu_ms_per_call, 2), 6)} | ` +
    `${d.errors + (g.errors || 0)}`);
}
if (!meta.direct_only) {
  const gw = meta.gateway;
  lines.push("");
  lines.push(`gateway start-up to ready: ${gw.ready_ms} ms (goal < 50 ms)`);
  lines.push(`gateway idle RSS: ${(gw.idle_rss_kib / 1024).toFixed(1)} MiB (goal < 30 MB)`);
  const goals = [];
  for (const s of summary) {
    if (!s.gateway) continue;
    const tag = `${s.target} c=${s.concurrency}`;
    if (s.gateway.cpu_ms_per_call != null) goals.push(`${tag}: gateway CPU ${f(s.gateway.cpu_ms_per_call, 4)} ms/call (goal <= 0.08)`);
    if (s.concurrency > 1 && s.ratio.calls_per_sec != null) goals.push(`${tag}: throughput ${(100 * s.ratio.calls_per_sec).toFixed(0)}% of direct (goal >= 90%)`);
    if (s.concurrency === 1 && s.added_p50_ms != null) goals.push(`${tag}: added p50 ${f(s.added_p50_ms, 3)} ms (goal <= 0.1)`);
  }
  for (const g of goals) lines.push(g);
}
console.log(lines.join("\n"));
if (jsonOut) {
  fs.writeFileSync(jsonOut, JSON.stringify({ meta, summary, runs }, null, 2) + "\n");
  console.log(`\nresults written to ${jsonOut}`);
}
EOF
