#!/usr/bin/env bash
# On the GPU machine (through the device tool, carry ["scratch/gpu"] made by prepare.sh):
# build ggml's CUDA backend module from the same ggml sources, list devices, and check the parity
# fixtures on CUDA against HF's references and the CPU. Full logs go to $OUT (or /tmp/stllm-out).
set -euo pipefail
cd "$(dirname "$0")/../.."
g=scratch/gpu
work=${WORK:-/tmp/stllm-gpu}
out=${OUT:-/tmp/stllm-out}
mkdir -p "$work" "$out"
if [ ! -f "$work/backends/libggml-cuda.so" ]; then
  t0=$(date +%s)
  cmake -S "$g/ggml" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_BACKEND_DL=ON -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
    -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF \
    >"$out/cmake.log" 2>&1
  cmake --build "$work/build" --target ggml-cuda -j"$(nproc)" >"$out/build.log" 2>&1
  mkdir -p "$work/backends"
  cp "$(find "$work/build" -name 'libggml-cuda.so' | head -1)" "$work/backends/"
  echo "built libggml-cuda.so in $(( $(date +%s) - t0 )) s"
fi
"$g/bin/stllm" devices --backend-dir "$work/backends" | tee "$out/devices.json"
python3 scripts/gpu/check_parity.py --stllm "$g/bin/stllm" --backend-dir "$work/backends" | tee "$out/parity.txt"
