#!/usr/bin/env bash
# fuzz.sh: run every cargo-fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS
# each, starting from the committed seed corpus fuzz/corpus/<target>.
#
# Inputs libFuzzer finds along the way go to a temporary directory (the first
# corpus directory is the one it writes to), never into the repository.
# A crash, leak, timeout or out-of-memory input is saved under
# fuzz/artifacts/<target>/ (ignored by git); the script prints its path and
# how to replay it, and exits 1.
#
# Usage: scripts/fuzz.sh [TARGET...]          (default: every target)
# Environment:
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_TIMEOUT   seconds one input may take before it counts as a hang (default 20)
# Needs the nightly toolchain (`rustup toolchain install nightly`); installs
# cargo-fuzz when `cargo fuzz` is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if ! cargo fuzz --help >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

seconds=${FUZZ_SECONDS:-60}
timeout=${FUZZ_TIMEOUT:-20}
work=$(mktemp -d "${TMPDIR:-/tmp}/meshgate-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

failed=0
for target in "${targets[@]}"; do
  seeds="fuzz/corpus/$target"
  artifacts="fuzz/artifacts/$target"
  if [ ! -d "$seeds" ]; then
    echo "fuzz.sh: no seed corpus $seeds for target $target" >&2
    exit 2
  fi
  mkdir -p "$work/$target" "$artifacts"
  marker="$work/$target.start"
  touch "$marker"
  echo "== $target: ${seconds}s from $(find "$seeds" -type f | wc -l) seeds" >&2
  if cargo +nightly fuzz run "$target" "$work/$target" "$seeds" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout="$timeout" -print_final_stats=1; then
    echo "== $target: no crash ($(find "$work/$target" -type f | wc -l) new corpus entries, discarded)" >&2
  else
    failed=1
    echo "== $target: FAILED" >&2
    found=$(find "$artifacts" -type f -newer "$marker" 2>/dev/null || true)
    if [ -n "$found" ]; then
      while IFS= read -r artifact; do
        echo "   artifact: $ROOT/$artifact" >&2
        echo "   replay:   cargo +nightly fuzz run $target $artifact" >&2
      done <<<"$found"
    else
      echo "   (no artifact written; see the output above)" >&2
    fi
  fi
done
exit "$failed"
