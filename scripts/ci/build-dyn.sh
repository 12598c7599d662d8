#!/usr/bin/env bash
# CI: build the dyn-backends variant of stllm (ggml as shared libraries, the binary that loads GPU
# backend modules such as libggml-cuda.so at run time; see scripts/install-cuda.sh), CPU only, so
# the GPU route cannot rot unnoticed. Shares every artifact but llama-cpp-sys-2 (built again with
# its dynamic-link feature) and the crates above it with the default release build. Then a smoke
# run: the binary lists its devices and, with no GPU module beside it, picks the CPU and says so.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --features dyn-backends --bin stllm
bin=target/release/stllm
libdir=$(dirname "$(ls -t target/release/build/llama-cpp-sys-2-*/out/lib*/libggml-base.so | head -1)")
# The shared ggml libraries sit in the -sys crate's out folder (scripts/install-cuda.sh copies them
# beside the binary).
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# ldd's output is taken whole first: `ldd | grep -q` under pipefail fails at random when grep
# exits at its match while ldd still writes (SIGPIPE).
deps=$(ldd "$bin")
grep -q 'libggml-base.so' <<<"$deps" || { echo "build-dyn: $bin does not link libggml-base.so dynamically" >&2; exit 1; }
"$bin" devices >/dev/null
err=$("$bin" generate --model tests/fixtures/llama-f32 --tokens 1,2,3 --max-tokens 2 --json 2>&1 >/dev/null)
echo "$err" | grep -q '^stllm: using the CPU' || { echo "build-dyn: no 'using the CPU' line: $err" >&2; exit 1; }
echo "build-dyn: ok ($(echo "$err" | grep '^stllm:'))"
