#!/usr/bin/env bash
# Run the `stllm serve` real-client tests (tests/server: the official openai package, httpx, curl)
# against target/release/stllm (or $STLLM_BIN). Creates/reuses the venv .venv-test (git-ignored)
# and installs tests/server/requirements.txt into it (from PyPI; only when they changed).
#
# Usage: scripts/test-server.sh [pytest args...]     e.g. scripts/test-server.sh -k chat -x
# Exit code: pytest's, except that "no tests collected" (5) is a failure too.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${STLLM_TEST_VENV:-.venv-test}
req=tests/server/requirements.txt
bin=${STLLM_BIN:-target/release/stllm}

if [ ! -x "$bin" ]; then
  echo "test-server: $bin not found (run cargo build --release, or set STLLM_BIN)" >&2
  exit 1
fi
command -v curl >/dev/null 2>&1 || { echo "test-server: curl is needed (SSE framing tests)" >&2; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# Install only when the requirements changed since the last successful install.
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
fi

export STLLM_BIN="$bin"
set +e
"$venv/bin/python" -m pytest tests/server -c tests/server/pytest.ini --rootdir tests/server "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test-server: no tests were collected: failing" >&2
  exit 1
fi
exit "$rc"
