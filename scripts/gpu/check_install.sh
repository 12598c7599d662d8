#!/usr/bin/env bash
# On the GPU machine (device tool, carry ["scratch/gpu"] made by prepare.sh): check the users' GPU
# route, scripts/install-cuda.sh, as documented in README.md. The GPU machine has no Rust, so the
# binary half comes prebuilt (prepare.sh's dyn-backends stllm and its libggml*.so, as a user's
# `cargo build` would leave them) and the documented module step runs here on its own:
#
#   scripts/install-cuda.sh --module-only --binary-dir BIN --src scratch/gpu/llama.cpp --prefix P
#
# (--src: the vendored llama.cpp tree prepare.sh ships; on a user's machine it is found in the cargo
# registry). Then, from P alone: `stllm devices` must list a CUDA device, and a short `stllm run` on a
# fixture with NO --device flag must say on stderr that it uses CUDA and print the same greedy tokens
# as `--device cpu`. Fresh build folder each time (~3-4 min on 16 cores); logs in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
. scripts/gpu/lib.sh
unpack_stllm
fail=0
bin=$work/install-bin prefix=$work/install
rm -rf "$bin" "$prefix" "$work/install-build"
mkdir -p "$bin"
cp -a "$g/bin/stllm" "$g"/bin/lib*.so* "$bin/"
t0=$SECONDS
if ! scripts/install-cuda.sh --module-only --binary-dir "$bin" --src "$g/llama.cpp" --prefix "$prefix" \
     --build-dir "$work/install-build" 2>&1 | tee "$out/install.log"; then
  echo "CHECK FAILED: install-cuda.sh --module-only"; exit 1
fi
echo "module step: $((SECONDS - t0)) s; installed: $(cd "$prefix" && ls | tr '\n' ' ')"
"$prefix/stllm" devices >"$out/install-devices.json" 2>"$out/install-devices.err"
cat "$out/install-devices.err" "$out/install-devices.json"
grep -q '"CUDA0"' "$out/install-devices.json" || { echo "CHECK FAILED: stllm devices lists no CUDA device"; fail=1; }
fx=tests/fixtures/llama-f32
run() { "$prefix/stllm" run --model "$fx" --prompt "Hello there" --max-tokens 8 --temperature 0 --json "$@"; }
run >"$out/install-run-gpu.json" 2>"$out/install-run-gpu.err"; rc=$?
echo "stllm run (no --device): rc $rc; stderr:"; cat "$out/install-run-gpu.err"; cat "$out/install-run-gpu.json"
grep -q '^stllm: using CUDA' "$out/install-run-gpu.err" || { echo "CHECK FAILED: the run without --device did not use CUDA"; fail=1; }
run --device cpu >"$out/install-run-cpu.json" 2>"$out/install-run-cpu.err" || { echo "CHECK FAILED: --device cpu run"; fail=1; }
tok() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["tokens"])' "$1" 2>/dev/null; }
echo "greedy tokens, GPU: $(tok "$out/install-run-gpu.json"); CPU (--device cpu): $(tok "$out/install-run-cpu.json")"
[ -n "$(tok "$out/install-run-gpu.json")" ] && [ "$(tok "$out/install-run-gpu.json")" = "$(tok "$out/install-run-cpu.json")" ] \
  || { echo "CHECK FAILED: GPU and CPU greedy tokens differ (or no output)"; fail=1; }
# A module that does not match must not stop a run that asked for no device: the CPU, with the reason.
echo 0000000000000000 >"$prefix/ggml-abi.txt"
"$prefix/stllm" run --model "$fx" --prompt "Hello there" --max-tokens 4 --json >/dev/null 2>"$out/install-run-bad.err" \
  || { echo "CHECK FAILED: a mismatched module broke a run without --device"; fail=1; }
echo "with a wrong ABI stamp: $(grep '^stllm:' "$out/install-run-bad.err")"
grep -q '^stllm: using the CPU' "$out/install-run-bad.err" || { echo "CHECK FAILED: no CPU fallback line"; fail=1; }
python3 scripts/gpu/ggml_abi.py "$g/llama.cpp/ggml" "$prefix/ggml-abi.txt" >/dev/null
[ "$fail" = 0 ] && echo "INSTALL CHECK OK" || echo "INSTALL CHECK FAILED"
exit "$fail"
