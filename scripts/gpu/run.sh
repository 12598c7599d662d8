#!/usr/bin/env bash
# On the GPU machine (through the device tool, carry ["scratch/gpu"] made by prepare.sh): unpack
# stllm, build from the shipped llama.cpp tree (the sources stllm's ggml came from) in one CMake
# build: ggml's CUDA backend module (GGML_BACKEND_DL) for stllm into $WORK/backends, and our peer
# harness peer-bench (scripts/gpu/peer/peer_bench.cpp, against llama.h) with llama.cpp's libraries
# and backend modules into $WORK/llama (it loads backends from its own directory); then list
# devices and check the parity fixtures on CUDA against HF's references and the CPU. Skips the build when $WORK already has it (warm machine).
# Full logs go to $OUT (or /tmp/stllm-out); $WORK defaults to /tmp/stllm-gpu.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
. scripts/gpu/lib.sh
unpack_stllm
if [ ! -f "$work/backends/libggml-cuda.so" ] || [ ! -x "$work/llama/peer-bench" ]; then
  t0=$(date +%s)
  gen=Ninja; command -v ninja >/dev/null || gen="Unix Makefiles"
  # GGML_CUDA_GRAPHS=ON is llama.cpp's default (a standalone ggml configure defaults it OFF, which
  # compiles CUDA-graph replay out of the module); stated here so both engines get the same module.
  cmake -S "$g/llama.cpp" -B "$work/build" -G "$gen" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_CUDA_GRAPHS=ON \
    -DGGML_BACKEND_DL=ON -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    >"$out/cmake.log" 2>&1 || { tail -30 "$out/cmake.log"; exit 1; }
  cmake --build "$work/build" --target ggml-cuda peer-bench -j"$(nproc)" \
    >"$out/build.log" 2>&1 || { grep -m5 -B2 -A8 'error' "$out/build.log" || tail -30 "$out/build.log"; exit 1; }
  # Everything lands in build/bin: peer-bench, shared libraries and the backend modules
  # (libggml-cpu.so, libggml-cuda.so). ggml_backend_load_all() searches the executable's directory.
  mkdir -p "$work/backends" "$work/llama"
  cp "$work/build/bin/libggml-cuda.so" "$work/backends/"
  # The stamp stllm checks before loading a module: the fingerprint of the ggml ABI headers built.
  python3 scripts/gpu/ggml_abi.py "$g/llama.cpp/ggml" "$work/backends/ggml-abi.txt"
  cp -a "$work/build/bin/." "$work/llama/"
  echo "built libggml-cuda.so and peer-bench in $(( $(date +%s) - t0 )) s"
fi
"$g/bin/stllm" devices --backend-dir "$work/backends" | tee "$out/devices.json"
# SKIP_CHECKS=1: build only (a later command runs the checks it needs).
[ "${SKIP_CHECKS:-0}" = 1 ] && exit 0
python3 scripts/gpu/check_parity.py --stllm "$g/bin/stllm" --backend-dir "$work/backends" | tee "$out/parity.txt" \
  || echo "CUDA parity FAILED"
# Pipeline parallelism: layers split over two GPUs, when there are two.
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  python3 scripts/gpu/check_parity.py --stllm "$g/bin/stllm" --backend-dir "$work/backends" --device cuda:0 \
    --device-extra "--devices cuda:0,cuda:1" | tee "$out/parity-2gpu.txt" || echo "2-GPU parity FAILED"
  python3 scripts/gpu/check_parity.py --stllm "$g/bin/stllm" --backend-dir "$work/backends" --device cuda:0 \
    --device-extra "--devices cuda:0,cuda:1 --tensor-split 1,3 --ctx-size 300" | tee -a "$out/parity-2gpu.txt" \
    || echo "2-GPU parity (1:3) FAILED"
fi
# Every op x dtype the models use, on CUDA against an f64 reference and the CPU (--large: also
# the expert matrices at Nemotron 3 Nano's shapes, which the split MoE path runs).
"$g/bin/stllm" op-check --large --device cuda --backend-dir "$work/backends" | tee "$out/opcheck.txt" || echo "op-check FAILED"
# Layer offload: the last layer on the GPU, the rest on the CPU (llama.cpp's -ngl 1).
python3 scripts/gpu/check_parity.py --stllm "$g/bin/stllm" --backend-dir "$work/backends" --device-extra "--gpu-layers 1" \
  | tee "$out/parity-gpu-layers-1.txt" || echo "gpu-layers parity FAILED"
