#!/usr/bin/env bash
# The README's first command: install what is missing (Debian/Ubuntu packages, the wasm target),
# build stllm, and generate text with the built-in demo model (works offline).
# Idempotent: a second run installs nothing and rebuilds nothing that is up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
install_build_deps
echo "stllm setup: building (cargo build --release; the first build takes ~15 minutes on 2 cores)"
cargo build --release
echo "stllm setup: done. The demo model answers:"
echo
./target/release/stllm run --prompt "${STLLM_DEMO_PROMPT:-Tell me something about love.}" --max-tokens 48
