#!/usr/bin/env bash
# Creates (or refreshes) the Python environment the integration tests drive
# real Python MCP clients from: a venv at target/pyenv with the pinned
# packages of tools/python-requirements.txt. Does nothing when the venv exists,
# works, and was built from the same requirements file. PYTHON picks the
# interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/pyenv
req=tools/python-requirements.txt
stamp="$venv/.requirements"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && cmp -s "$req" "$stamp" \
  && "$venv/bin/python" -c 'import mcp' >/dev/null 2>&1; then
  exit 0
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "python-env: $python cannot create a venv (missing venv/ensurepip); on Debian: apt-get install python3-venv" >&2
  exit 1
fi
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
cp "$req" "$stamp"
"$venv/bin/python" -c 'import mcp' >/dev/null
echo "python-env: $venv ready ($(tr '\n' ' ' < "$req"))" >&2
