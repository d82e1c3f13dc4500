#!/usr/bin/env bash
# bench-auth.sh: the cost of authentication, authorization and audit on the
# proxied hot path. Two release gateways in front of the same fixture upstream
# (Streamable HTTP), one with auth on (API key on every request, audit of every
# tool call) and one with `auth.enabled = false`, measured alternately in one
# run: ROUNDS x (off, on) at concurrency 16 and 1, then medians and on/off
# ratios of calls/s, p50 and gateway CPU per call.
#
# Usage: scripts/bench-auth.sh [--rounds N] [--duration SECS] [--no-build]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
ROUNDS=3 DURATION=5 BUILD=1
while (($#)); do
    case $1 in
    --rounds) ROUNDS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --no-build) BUILD=0 ;;
    *) echo "bench-auth.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
((BUILD)) && cargo build --release -p meshgate -p meshgate-fixture >&2
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$BIN/meshgate-fixture" --mode basic --transport http --listen 127.0.0.1:0 >"$TMP/fixture.out" 2>/dev/null &
PIDS+=($!)
for _ in $(seq 100); do grep -q '^listening on' "$TMP/fixture.out" && break; sleep 0.05; done
UP=$(sed -n 's/^listening on //p' "$TMP/fixture.out")
[[ -n $UP ]] || { echo "fixture did not start" >&2; exit 1; }

declare -A URL PID
for mode in on off; do
    port=$(free_port)
    enabled=true
    [[ $mode == off ]] && enabled=false
    cat >"$TMP/$mode.toml" <<TOML
listen = "127.0.0.1:$port"
data_dir = "$TMP/$mode-data"
[log]
level = "warn"
[auth]
enabled = $enabled
[[upstreams]]
name = "fx"
transport = "streamable_http"
url = "$UP"
TOML
    "$BIN/meshgate" serve --config "$TMP/$mode.toml" >/dev/null 2>"$TMP/$mode.log" &
    PID[$mode]=$!
    PIDS+=($!)
    for _ in $(seq 200); do curl -fs "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break; sleep 0.05; done
    URL[$mode]="http://127.0.0.1:$port/mcp"
done
KEY=$(cat "$TMP/on-data/admin.key")

run() { # mode concurrency -> JSON line
    local auth=()
    [[ $1 == on ]] && auth=(--header "Authorization: Bearer $KEY")
    "$BIN/meshgate" bench --url "${URL[$1]}" --tool echo --concurrency "$2" --duration "$DURATION" \
        --requests 200000 --warmup 2000 --pid "${PID[$1]}" --json "${auth[@]}"
}
field() { sed -E "s/.*\"$1\":([-0-9.eE+]+).*/\1/" <<<"$2"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A m_cps m_p50 m_cpu
for c in 16 1; do
    declare -A CPS=() P50=() CPU=()
    for r in $(seq "$ROUNDS"); do
        for mode in off on; do
            out=$(run "$mode" "$c")
            cps=$(field calls_per_sec "$out") p50=$(field p50_ms "$out") cpu=$(field target_cpu_ms_per_call "$out")
            [[ $(field errors "$out") == 0 ]] || { echo "errors in $mode c=$c: $out" >&2; exit 1; }
            CPS[$mode]+="$cps " P50[$mode]+="$p50 " CPU[$mode]+="$cpu "
            printf 'c=%-2s round %s auth %-3s: %8.0f calls/s  p50 %.3f ms  gateway cpu %.4f ms/call\n' "$c" "$r" "$mode" "$cps" "$p50" "$cpu" >&2
        done
    done
    for mode in off on; do
        m_cps[$mode]=$(tr ' ' '\n' <<<"${CPS[$mode]}" | grep . | median)
        m_p50[$mode]=$(tr ' ' '\n' <<<"${P50[$mode]}" | grep . | median)
        m_cpu[$mode]=$(tr ' ' '\n' <<<"${CPU[$mode]}" | grep . | median)
    done
    awk -v c="$c" -v a="${m_cps[off]}" -v b="${m_cps[on]}" -v pa="${m_p50[off]}" -v pb="${m_p50[on]}" -v ua="${m_cpu[off]}" -v ub="${m_cpu[on]}" 'BEGIN {
        printf "c=%-2s medians: auth off %.0f calls/s p50 %.3f ms cpu %.4f ms | auth on %.0f calls/s p50 %.3f ms cpu %.4f ms | on/off: throughput %.3f, p50 %+.3f ms, cpu %.3f\n", c, a, pa, ua, b, pb, ub, b/a, pb-pa, ub/ua }'
done
