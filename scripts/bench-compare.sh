#!/usr/bin/env bash
# bench-compare.sh: the proxied call path of two meshgate builds side by side
# (e.g. a baseline commit against the working tree). Two release gateways, A
# from --a DIR and B from --b DIR, run with the same configuration (auth on,
# the admin key on every request, every other setting at its default, one
# upstream over Streamable HTTP) in front of one fixture upstream taken from
# the B build. The configuration names only keys every build since the
# security layer knows (listen, data_dir, [log], [auth], [[upstreams]]), so an
# older binary does not refuse it.
# They are measured alternately in one run, ROUNDS x (A, B) at concurrency 16
# and 1 (the order flips every round), with B's `meshgate bench` as the load
# generator for both, then medians of calls/s, gateway CPU per call, p50 and
# p99, and the ratios B/A: the ratio of the medians, and (more robust to
# drift in the machine's speed during the run) the median of the per-round
# ratios, each round pairing A and B measured back to back.
#
# Usage: scripts/bench-compare.sh --a DIR [--b DIR] [--rounds N] [--duration SECS]
#                                 [--a-extra FILE] [--b-extra FILE]
#   --a DIR   directory holding the baseline `meshgate` binary (required)
#   --b DIR   directory holding the candidate `meshgate` and `meshgate-fixture`
#             (default: $CARGO_TARGET_DIR/release, or ./target/release)
#   --a-extra FILE, --b-extra FILE
#             TOML appended to that gateway's configuration (after the
#             upstream): compares settings of one build when --a and --b
#             name the same directory, e.g. a file holding
#             `[tools]` / `validate_arguments = false` against the default.
# Nothing is built: build both trees first (cargo build --release -p meshgate
# -p meshgate-fixture; the baseline in its own worktree and target dir).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
A_DIR="" B_DIR=$TARGET_DIR/release A_EXTRA="" B_EXTRA=""
ROUNDS=3 DURATION=5
while (($#)); do
    case $1 in
    --a) A_DIR=$2; shift ;;
    --b) B_DIR=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --a-extra) A_EXTRA=$2; shift ;;
    --b-extra) B_EXTRA=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-compare.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
[[ -n $A_DIR ]] || { echo "bench-compare.sh: --a DIR is required (see --help)" >&2; exit 2; }
A_DIR=$(cd "$A_DIR" && pwd) B_DIR=$(cd "$B_DIR" && pwd)
for f in "$A_DIR/meshgate" "$B_DIR/meshgate" "$B_DIR/meshgate-fixture"; do
    [[ -x $f ]] || { echo "bench-compare.sh: $f not found or not executable" >&2; exit 1; }
done
declare -A BINDIR=([a]=$A_DIR [b]=$B_DIR) EXTRA=([a]=$A_EXTRA [b]=$B_EXTRA)
for f in "$A_EXTRA" "$B_EXTRA"; do
    [[ -z $f || -r $f ]] || { echo "bench-compare.sh: $f not readable" >&2; exit 1; }
done
LOADGEN=$B_DIR/meshgate

TMP=$(mktemp -d "${TMPDIR:-/tmp}/meshgate-bench-compare.XXXXXX")
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

"$B_DIR/meshgate-fixture" --mode basic --transport http --listen 127.0.0.1:0 >"$TMP/fixture.out" 2>/dev/null &
PIDS+=($!)
for _ in $(seq 100); do grep -q '^listening on' "$TMP/fixture.out" && break; sleep 0.05; done
UP=$(sed -n 's/^listening on //p' "$TMP/fixture.out")
[[ -n $UP ]] || { echo "fixture did not start" >&2; exit 1; }

declare -A URL PID KEY
for g in a b; do
    port=$(free_port)
    cat >"$TMP/$g.toml" <<TOML
listen = "127.0.0.1:$port"
data_dir = "$TMP/$g-data"
[log]
level = "warn"
[auth]
enabled = true
[[upstreams]]
name = "fx"
transport = "streamable_http"
url = "$UP"
TOML
    [[ -z ${EXTRA[$g]} ]] || cat "${EXTRA[$g]}" >>"$TMP/$g.toml"
    "${BINDIR[$g]}/meshgate" serve --config "$TMP/$g.toml" >/dev/null 2>"$TMP/$g.log" &
    PID[$g]=$!
    PIDS+=($!)
    for _ in $(seq 200); do curl -fs "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break; sleep 0.05; done
    curl -fs "http://127.0.0.1:$port/ready" >/dev/null || { tail -20 "$TMP/$g.log" >&2; echo "gateway $g not ready" >&2; exit 1; }
    URL[$g]="http://127.0.0.1:$port/mcp"
    [[ -s $TMP/$g-data/admin.key ]] || { echo "gateway $g wrote no $TMP/$g-data/admin.key" >&2; exit 1; }
    KEY[$g]=$(cat "$TMP/$g-data/admin.key")
done
for g in a b; do
    G=${g^^}
    echo "$G ${BINDIR[$g]}/meshgate ($(sha256sum "${BINDIR[$g]}/meshgate" | cut -c1-12)) ${URL[$g]} pid ${PID[$g]}${EXTRA[$g]:+ + ${EXTRA[$g]}}" >&2
done
echo "upstream $UP (fixture from B); load generator $LOADGEN; load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

run() { # gateway concurrency -> JSON line
    "$LOADGEN" bench --url "${URL[$1]}" --tool echo --concurrency "$2" --duration "$DURATION" \
        --requests 200000 --warmup 2000 --pid "${PID[$1]}" --json --header "Authorization: Bearer ${KEY[$1]}"
}
field() { sed -E "s/.*\"$1\":([-0-9.eE+]+).*/\1/" <<<"$2"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A m_cps m_p50 m_p99 m_cpu
for c in 16 1; do
    declare -A CPS=() P50=() P99=() CPU=()
    R_CPS="" R_CPU="" R_P50=""
    for r in $(seq "$ROUNDS"); do
        declare -A rc=() ru=() rp=()
        order=(a b)
        ((r % 2)) || order=(b a)
        for g in "${order[@]}"; do
            out=$(run "$g" "$c")
            cps=$(field calls_per_sec "$out") p50=$(field p50_ms "$out") p99=$(field p99_ms "$out") cpu=$(field target_cpu_ms_per_call "$out")
            [[ $(field errors "$out") == 0 ]] || { echo "errors in $g c=$c: $out" >&2; exit 1; }
            CPS[$g]+="$cps " P50[$g]+="$p50 " P99[$g]+="$p99 " CPU[$g]+="$cpu "
            rc[$g]=$cps ru[$g]=$cpu rp[$g]=$p50
            printf 'c=%-2s round %s %s: %8.0f calls/s  p50 %.3f ms  p99 %.3f ms  gateway cpu %.4f ms/call\n' \
                "$c" "$r" "${g^^}" "$cps" "$p50" "$p99" "$cpu" >&2
        done
        R_CPS+="$(awk -v a="${rc[a]}" -v b="${rc[b]}" 'BEGIN {print b/a}') "
        R_CPU+="$(awk -v a="${ru[a]}" -v b="${ru[b]}" 'BEGIN {print b/a}') "
        R_P50+="$(awk -v a="${rp[a]}" -v b="${rp[b]}" 'BEGIN {print b/a}') "
    done
    for g in a b; do
        m_cps[$g]=$(tr ' ' '\n' <<<"${CPS[$g]}" | grep . | median)
        m_p50[$g]=$(tr ' ' '\n' <<<"${P50[$g]}" | grep . | median)
        m_p99[$g]=$(tr ' ' '\n' <<<"${P99[$g]}" | grep . | median)
        m_cpu[$g]=$(tr ' ' '\n' <<<"${CPU[$g]}" | grep . | median)
    done
    awk -v c="$c" -v rounds="$ROUNDS" \
        -v ca="${m_cps[a]}" -v cb="${m_cps[b]}" \
        -v pa="${m_p50[a]}" -v pb="${m_p50[b]}" \
        -v qa="${m_p99[a]}" -v qb="${m_p99[b]}" \
        -v ua="${m_cpu[a]}" -v ub="${m_cpu[b]}" 'BEGIN {
        printf "c=%-2s medians of %d: A %.0f calls/s p50 %.3f ms p99 %.3f ms cpu %.4f ms/call | B %.0f calls/s p50 %.3f ms p99 %.3f ms cpu %.4f ms/call | B/A: throughput %.3f, cpu %.3f (%+.4f ms/call), p50 %.3f (%+.3f ms), p99 %.3f\n",
            c, rounds, ca, pa, qa, ua, cb, pb, qb, ub, cb/ca, ub/ua, ub-ua, pb/pa, pb-pa, qb/qa }'
    printf 'c=%-2s per-round B/A, median of %d pairs: throughput %.3f, cpu %.3f, p50 %.3f  (cpu ratios: %s)\n' "$c" "$ROUNDS" \
        "$(tr ' ' '\n' <<<"$R_CPS" | grep . | median)" "$(tr ' ' '\n' <<<"$R_CPU" | grep . | median)" \
        "$(tr ' ' '\n' <<<"$R_P50" | grep . | median)" "$(printf '%.3f ' $R_CPU)"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
