#!/usr/bin/env bash
# bench-traffic.sh: the cost of traffic control on the proxied hot path. Two
# release gateways in front of the same fixture upstream (Streamable HTTP),
# both with authentication on (the admin key on every request) and the default
# per-upstream circuit breaker, call pool and retry policy:
#   A ("limits")    every rate limit on (per_key and per_tenant in the HTTP
#                   layer, per_tool and per_connection in the MCP handler), set
#                   so high (100,000,000 per second) that none ever refuses;
#   B ("nolimits")  rate limits off (the default).
# They are measured alternately in one run, ROUNDS x (B, A) at concurrency 16
# and 1 (the order flips every round), then medians and A/B ratios of calls/s,
# gateway CPU per call, and the p50 A adds over B.
#
# Not measured: a progress-streaming call (fixture `slow`/`flood` relaying
# notifications/progress through the per-client outbox). The fixture sends
# progress only when the request carries `params._meta.progressToken`, and
# `meshgate bench` builds `params` from --tool and --args alone, so it cannot
# ask for progress.
#
# Usage: scripts/bench-traffic.sh [--rounds N] [--duration SECS] [--no-build]
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
    *) echo "bench-traffic.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
((BUILD)) && (cd "$ROOT" && cargo build --release -p meshgate -p meshgate-fixture >&2)
for b in meshgate meshgate-fixture; do
    [[ -x $BIN/$b ]] || { echo "bench-traffic.sh: $BIN/$b not found (build it, or drop --no-build)" >&2; exit 1; }
done
TMP=$(mktemp -d "${TMPDIR:-/tmp}/meshgate-bench-traffic.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$BIN/meshgate-fixture" --mode basic --transport http --listen 127.0.0.1:0 >"$TMP/fixture.out" 2>/dev/null &
PIDS+=($!)
for _ in $(seq 100); do grep -q '^listening on' "$TMP/fixture.out" && break; sleep 0.05; done
UP=$(sed -n 's/^listening on //p' "$TMP/fixture.out")
[[ -n $UP ]] || { echo "fixture did not start" >&2; exit 1; }

HIGH='{ limit = 100000000, period_secs = 1 }'
declare -A URL PID KEY
for mode in nolimits limits; do
    port=$(free_port)
    {
        printf 'listen = "127.0.0.1:%s"\ndata_dir = "%s/%s-data"\n' "$port" "$TMP" "$mode"
        printf '[log]\nlevel = "warn"\n'
        if [[ $mode == limits ]]; then
            printf '[rate_limits]\nper_key = %s\nper_tenant = %s\nper_tool = %s\nper_connection = %s\n' \
                "$HIGH" "$HIGH" "$HIGH" "$HIGH"
        fi
        printf '[[upstreams]]\nname = "fx"\ntransport = "streamable_http"\nurl = "%s"\n' "$UP"
    } >"$TMP/$mode.toml"
    "$BIN/meshgate" serve --config "$TMP/$mode.toml" >/dev/null 2>"$TMP/$mode.log" &
    PID[$mode]=$!
    PIDS+=($!)
    for _ in $(seq 200); do curl -fs "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break; sleep 0.05; done
    curl -fs "http://127.0.0.1:$port/ready" >/dev/null || { tail -20 "$TMP/$mode.log" >&2; echo "gateway $mode not ready" >&2; exit 1; }
    URL[$mode]="http://127.0.0.1:$port/mcp"
    KEY[$mode]=$(cat "$TMP/$mode-data/admin.key")
done

# Sanity check: A answers with X-RateLimit-* headers (the HTTP layer is on), B without.
ratelimit_header() {
    curl -s -o /dev/null -D - -X POST "${URL[$1]}" -H "Authorization: Bearer ${KEY[$1]}" \
        -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \
        -d '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"bench-traffic","version":"0"}}}' |
        grep -ci '^x-ratelimit-limit:' || true
}
[[ $(ratelimit_header limits) -ge 1 ]] || { echo "gateway A sends no X-RateLimit-Limit: are its rate limits on?" >&2; exit 1; }
[[ $(ratelimit_header nolimits) == 0 ]] || { echo "gateway B sends X-RateLimit-Limit: its rate limits should be off" >&2; exit 1; }
echo "upstream $UP; A (limits) ${URL[limits]} pid ${PID[limits]}; B (nolimits) ${URL[nolimits]} pid ${PID[nolimits]}" >&2

run() { # mode concurrency -> JSON line
    "$BIN/meshgate" bench --url "${URL[$1]}" --tool echo --concurrency "$2" --duration "$DURATION" \
        --requests 200000 --warmup 2000 --pid "${PID[$1]}" --json --header "Authorization: Bearer ${KEY[$1]}"
}
field() { sed -E "s/.*\"$1\":([-0-9.eE+]+).*/\1/" <<<"$2"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A m_cps m_p50 m_p99 m_cpu
for c in 16 1; do
    declare -A CPS=() P50=() P99=() CPU=()
    for r in $(seq "$ROUNDS"); do
        order=(nolimits limits)
        ((r % 2)) || order=(limits nolimits)
        for mode in "${order[@]}"; do
            out=$(run "$mode" "$c")
            cps=$(field calls_per_sec "$out") p50=$(field p50_ms "$out") p99=$(field p99_ms "$out") cpu=$(field target_cpu_ms_per_call "$out")
            [[ $(field errors "$out") == 0 ]] || { echo "errors in $mode c=$c: $out" >&2; exit 1; }
            CPS[$mode]+="$cps " P50[$mode]+="$p50 " P99[$mode]+="$p99 " CPU[$mode]+="$cpu "
            printf 'c=%-2s round %s %-8s: %8.0f calls/s  p50 %.3f ms  p99 %.3f ms  gateway cpu %.4f ms/call\n' \
                "$c" "$r" "$mode" "$cps" "$p50" "$p99" "$cpu" >&2
        done
    done
    for mode in nolimits limits; do
        m_cps[$mode]=$(tr ' ' '\n' <<<"${CPS[$mode]}" | grep . | median)
        m_p50[$mode]=$(tr ' ' '\n' <<<"${P50[$mode]}" | grep . | median)
        m_p99[$mode]=$(tr ' ' '\n' <<<"${P99[$mode]}" | grep . | median)
        m_cpu[$mode]=$(tr ' ' '\n' <<<"${CPU[$mode]}" | grep . | median)
    done
    awk -v c="$c" -v rounds="$ROUNDS" \
        -v ca="${m_cps[limits]}" -v cb="${m_cps[nolimits]}" \
        -v pa="${m_p50[limits]}" -v pb="${m_p50[nolimits]}" \
        -v qa="${m_p99[limits]}" -v qb="${m_p99[nolimits]}" \
        -v ua="${m_cpu[limits]}" -v ub="${m_cpu[nolimits]}" 'BEGIN {
        printf "c=%-2s medians of %d: A limits %.0f calls/s p50 %.3f ms p99 %.3f ms cpu %.4f ms/call | B nolimits %.0f calls/s p50 %.3f ms p99 %.3f ms cpu %.4f ms/call | A/B: throughput %.3f, cpu %.3f (%+.4f ms/call), p50 %+.3f ms\n",
            c, rounds, ca, pa, qa, ua, cb, pb, qb, ub, ca/cb, ua/ub, ua-ub, pa-pb }'
done
echo "not measured: progress streaming (meshgate bench cannot send params._meta.progressToken)"
