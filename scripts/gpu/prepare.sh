#!/usr/bin/env bash
# On the development machine: build stllm with ggml as shared libraries (--features dyn-backends),
# and gather what the GPU machine needs into scratch/gpu/ (git-ignored, carried by the device tool):
#   scratch/gpu/bin/   stllm (debug info stripped, RUNPATH=$ORIGIN) + libggml*.so it links
#   scratch/gpu/ggml/  the ggml sources this build compiled (CPU and CUDA parts), for the CUDA module
# Then, with the device tool: run `bash scripts/gpu/run.sh` with carry ["scratch/gpu"].
set -euo pipefail
cd "$(dirname "$0")/../.."
ver=$(grep -A1 '^name = "llama-cpp-sys-2"' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$ver"/llama.cpp/ggml | head -1)
# RUNPATH=$ORIGIN: the binary finds libggml*.so beside it.
cargo rustc --release --features dyn-backends --bin stllm -q -- -C 'link-arg=-Wl,-rpath,$ORIGIN'
out=scratch/gpu
rm -rf "$out" && mkdir -p "$out/bin" "$out/ggml/src"
objcopy --strip-debug target/release/stllm "$out/bin/stllm"
# The shared ggml libraries of the newest dynamic-link build of the -sys crate.
libdir=$(dirname "$(ls -t target/release/build/llama-cpp-sys-2-*/out/lib*/libggml-base.so | head -1)")
cp -a "$libdir"/lib*.so* "$out/bin/"
find "$src" -maxdepth 1 -type f -exec cp -a {} "$out/ggml/" \;
cp -a "$src/cmake" "$src/include" "$out/ggml/"
find "$src/src" -maxdepth 1 -type f -exec cp -a {} "$out/ggml/src/" \;
cp -a "$src/src/ggml-cpu" "$src/src/ggml-cuda" "$out/ggml/src/"
# The crate drops ggml's pkg-config template, which a standalone configure wants; an empty one does.
[ -f "$out/ggml/ggml.pc.in" ] || : > "$out/ggml/ggml.pc.in"
echo "ggml $ver sources from $src"
du -sh "$out/bin" "$out/ggml"
