#!/usr/bin/env bash
# On the development machine: build stllm with ggml as shared libraries (--features dyn-backends),
# and gather what the GPU machine needs into scratch/gpu/ (git-ignored, carried by the device tool):
#   scratch/gpu/bin/       stllm.xz (debug info stripped, RUNPATH=$ORIGIN, xz-compressed; run.sh and
#                          bench.sh unpack it beside them) + the libggml*.so / libllama.so it links
#   scratch/gpu/llama.cpp/ the llama.cpp tree vendored by llama-cpp-sys-2 (the sources this build
#                          compiled), trimmed to what a CMake build of ggml-cuda, llama-bench and
#                          llama-batched-bench needs (ggml CPU + CUDA backends only, no tests,
#                          examples, server, docs), plus the llama-bench / batched-bench sources the
#                          crate strips, taken from $LLAMA_EXTRA/tools
#   scratch/gpu/gguf-py/   llama.cpp's gguf Python package ($LLAMA_EXTRA/gguf-py), for hf_to_gguf.py
# LLAMA_EXTRA (default scratch/llama.cpp-src) is a llama.cpp tree of the same version with those tool
# sources (see BENCHMARKS.md). PREPARE_SKIP_BUILD=1 skips the cargo build and gathers what exists;
# PREPARE_OUT=DIR gathers into DIR instead of scratch/gpu.
# Then, with the device tool: `bash scripts/gpu/run.sh` (and bench.sh) with carry ["scratch/gpu"].
set -euo pipefail
cd "$(dirname "$0")/../.."
ver=$(grep -A1 '^name = "llama-cpp-sys-2"' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$ver"/llama.cpp | head -1)
extra=${LLAMA_EXTRA:-scratch/llama.cpp-src}
for f in "$extra/tools/llama-bench/llama-bench.cpp" "$extra/tools/batched-bench/batched-bench.cpp" \
         "$extra/tools/batched-bench/compat-common-batch.h" "$extra/gguf-py/gguf/gguf_writer.py"; do
  [ -f "$f" ] || { echo "missing $f (set LLAMA_EXTRA to a llama.cpp tree with the tool sources)" >&2; exit 1; }
done
if [ -z "${PREPARE_SKIP_BUILD:-}" ]; then
  # RUNPATH=$ORIGIN: the binary finds libggml*.so beside it.
  cargo rustc --release --features dyn-backends --bin stllm -q -- -C 'link-arg=-Wl,-rpath,$ORIGIN'
fi
out=${PREPARE_OUT:-scratch/gpu}
rm -rf "$out" && mkdir -p "$out/bin"
objcopy --strip-debug target/release/stllm "$out/bin/stllm"
# xz: the device unpacks it with xz or, lacking that, Python's lzma module.
xz -T2 -6 "$out/bin/stllm"
# The shared ggml libraries of the newest dynamic-link build of the -sys crate.
libdir=$(dirname "$(ls -t target/release/build/llama-cpp-sys-2-*/out/lib*/libggml-base.so | head -1)")
cp -a "$libdir"/lib*.so* "$out/bin/"

# The llama.cpp tree, trimmed. ggml/src/CMakeLists.txt adds only the subdirectories of enabled
# backends (ggml_add_backend), so CPU and CUDA are all a CUDA build needs.
l="$out/llama.cpp"
mkdir -p "$l/ggml/src" "$l/tools"
cp -a "$src/CMakeLists.txt" "$src/LICENSE" "$src/cmake" "$src/include" "$src/src" "$src/common" "$src/vendor" "$l/"
cp -a "$src/ggml/CMakeLists.txt" "$src/ggml/cmake" "$src/ggml/include" "$l/ggml/"
find "$src/ggml/src" -maxdepth 1 -type f -exec cp -a {} "$l/ggml/src/" \;
cp -a "$src/ggml/src/ggml-cpu" "$src/ggml/src/ggml-cuda" "$l/ggml/src/"
# The crate drops ggml's pkg-config template (read only by a standalone ggml configure).
[ -f "$l/ggml/ggml.pc.in" ] || : > "$l/ggml/ggml.pc.in"
# The crate ships no tool sources: take llama-bench and batched-bench from $LLAMA_EXTRA (its
# batched-bench needs a two-function shim for this common/, force-included as there).
cp -a "$extra/tools/llama-bench" "$extra/tools/batched-bench" "$l/tools/"
cat > "$l/tools/CMakeLists.txt" <<'EOF'
# Written by scripts/gpu/prepare.sh: only llama-bench and llama-batched-bench are built.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(batched-bench)
target_compile_options(llama-batched-bench-impl PRIVATE -include ${CMAKE_CURRENT_SOURCE_DIR}/batched-bench/compat-common-batch.h)
add_subdirectory(llama-bench)
EOF
mkdir -p "$out/gguf-py"
cp -a "$extra/gguf-py/gguf" "$out/gguf-py/"
find "$out" -name __pycache__ -prune -exec rm -rf {} +
echo "llama-cpp-sys-2 $ver: llama.cpp sources from $src (tools and gguf-py from $extra)"
du -sh "$out/bin" "$l" "$out/gguf-py"
echo "total (the carry): $(du -sh "$out" | cut -f1)"
