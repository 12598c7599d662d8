#!/usr/bin/env bash
# A CUDA-capable stllm from this repository alone, in one folder:
#
#   scripts/install-cuda.sh [--prefix DIR]
#
# on a machine with an NVIDIA GPU, the CUDA toolkit (nvcc), CMake, a C++ compiler, Python 3 and
# Rust. Two halves:
#   1. the binary: `cargo build --release --features dyn-backends` (ggml as shared libraries, RUNPATH
#      $ORIGIN so the binary finds them beside it), copied with its libggml*.so / libllama.so into
#      DIR (default: target/stllm-cuda in this repository);
#   2. the CUDA module: ggml's CUDA backend built as a loadable module (GGML_BACKEND_DL=ON,
#      BUILD_SHARED_LIBS=ON) with CMake + nvcc from the very ggml sources the binary was built from
#      (the llama.cpp tree vendored by the llama-cpp-sys-2 crate, which cargo fetched), installed as
#      DIR/libggml-cuda.so with the ABI stamp DIR/ggml-abi.txt (scripts/gpu/ggml_abi.py) that stllm
#      checks before loading it.
# Then `DIR/stllm run --model ... --prompt ...` uses the GPU without any flag (`--device cpu` forces
# the CPU; stllm says on stderr which device it uses); `DIR/stllm devices` lists the devices.
#
# Options:
#   --prefix DIR       where to install (default target/stllm-cuda)
#   --module-only      skip half 1: build only the CUDA module for an already built binary folder
#   --binary-dir DIR   with --module-only: the folder holding a dyn-backends stllm and its
#                      libggml*.so (default: the prefix); copied into the prefix when different
#   --src DIR          the llama.cpp tree the binary's ggml came from (default: llama-cpp-sys-2's in
#                      the cargo registry, version from Cargo.lock; scripts/gpu/prepare.sh ships a
#                      trimmed copy as scratch/gpu/llama.cpp)
#   --build-dir DIR    CMake build folder (default: target/ggml-cuda-module)
#   --cuda-arch LIST   CMAKE_CUDA_ARCHITECTURES (default: the GPUs' compute capability from
#                      nvidia-smi, e.g. 90 on an H100; without nvidia-smi ggml's default list, slower)
#   --jobs N           parallel compile jobs (default: all cores)
# The module takes ~3-4 minutes on 16 cores (most of it ggml's CUDA kernels) and ~70 MB.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=$repo/target/stllm-cuda module_only=0 bindir="" src="" build="" arch="" jobs=""
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) prefix=$2; shift 2 ;;
    --module-only) module_only=1; shift ;;
    --binary-dir) bindir=$2; shift 2 ;;
    --src) src=$2; shift 2 ;;
    --build-dir) build=$2; shift 2 ;;
    --cuda-arch) arch=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-cuda.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { echo "install-cuda.sh: $*" >&2; }
build=${build:-$repo/target/ggml-cuda-module}
jobs=${jobs:-$(nproc 2>/dev/null || echo 4)}

# What the module half needs, all said at once before anything long starts.
missing=()
nvcc=$(command -v nvcc || true)
[ -n "$nvcc" ] || { [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc && export PATH="/usr/local/cuda/bin:$PATH"; } || true
[ -n "$nvcc" ] || missing+=("nvcc (the CUDA toolkit: https://developer.nvidia.com/cuda-downloads, or apt install nvidia-cuda-toolkit; if installed, put its bin/ on PATH, e.g. /usr/local/cuda/bin)")
command -v cmake >/dev/null || missing+=("cmake >= 3.18 (apt install cmake, or pip install cmake)")
command -v c++ >/dev/null || command -v g++ >/dev/null || missing+=("a C++ compiler (apt install g++)")
command -v python3 >/dev/null || missing+=("python3 (writes the module's ABI stamp)")
if [ "$module_only" = 0 ]; then
  command -v cargo >/dev/null || missing+=("cargo (Rust: https://rustup.rs), or pass --module-only --binary-dir DIR with an already built dyn-backends stllm")
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "cannot build the CUDA stllm; missing:"
  for m in "${missing[@]}"; do echo "  - $m" >&2; done
  exit 1
fi
mkdir -p "$prefix" && prefix=$(cd "$prefix" && pwd)
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 \
  || say "warning: nvidia-smi finds no GPU here; the module still builds, but stllm will use the CPU on this machine"

ver=$(grep -A1 '^name = "llama-cpp-sys-2"' "$repo/Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p')

# 1. The binary.
if [ "$module_only" = 0 ]; then
  say "building stllm (cargo build --release --features dyn-backends) ..."
  # RUNPATH=$ORIGIN: the binary finds libggml*.so beside it.
  (cd "$repo" && cargo rustc --release --features dyn-backends --bin stllm -- -C 'link-arg=-Wl,-rpath,$ORIGIN')
  tdir=${CARGO_TARGET_DIR:-$repo/target}
  libdir=$(dirname "$(ls -t "$tdir"/release/build/llama-cpp-sys-2-*/out/lib*/libggml-base.so | head -1)")
  cp -f "$tdir/release/stllm" "$prefix/"
  cp -af "$libdir"/lib*.so* "$prefix/"
  bindir=$prefix
fi

# 2. The CUDA module.
bindir=${bindir:-$prefix}
[ -x "$bindir/stllm" ] || { say "no stllm in $bindir (build it first, or drop --module-only)"; exit 1; }
[ -e "$bindir/libggml-base.so" ] || {
  say "$bindir/stllm links ggml statically (no libggml-base.so beside it): backend modules need a build with --features dyn-backends (run this script without --module-only)"
  exit 1
}
bindir=$(cd "$bindir" && pwd)
if [ "$bindir" != "$prefix" ]; then
  cp -af "$bindir"/stllm "$bindir"/lib*.so* "$prefix/"
fi
if [ -z "$src" ]; then
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$ver"/llama.cpp 2>/dev/null | head -1 || true)
  [ -n "$src" ] || { say "llama-cpp-sys-2 $ver's sources are not in the cargo registry (run a cargo build of stllm first, or pass --src DIR)"; exit 1; }
fi
[ -f "$src/ggml/include/ggml.h" ] || { say "$src is not a llama.cpp tree (no ggml/include/ggml.h)"; exit 1; }
# The binary's ggml and the sources must be the same, or the module is refused at run time.
want=$("$prefix/stllm" devices --device cpu 2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["ggml_abi"])')
have=$(python3 "$repo/scripts/gpu/ggml_abi.py" "$src/ggml")
if [ "$want" != "unknown" ] && [ "$want" != "$have" ]; then
  say "the sources in $src (ggml ABI $have) are not the ones $prefix/stllm was built from ($want); pass --src with the right llama.cpp tree"
  exit 1
fi
if [ -z "$arch" ]; then
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d . | sort -u | paste -sd';' || true)
fi
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
say "building libggml-cuda.so from $src (CUDA architectures: ${arch:-ggml default}; log: $build/build.log) ..."
mkdir -p "$build"
t0=$(date +%s)
# The flags of llama.cpp's own configure, as the crate builds ggml; GGML_CUDA_GRAPHS=ON is
# llama.cpp's default (a standalone ggml configure would compile CUDA graph replay out).
cmake -S "$src" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_CUDA=ON ${arch:+-DCMAKE_CUDA_ARCHITECTURES="$arch"} -DGGML_CUDA_GRAPHS=ON \
  -DGGML_BACKEND_DL=ON -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  >"$build/cmake.log" 2>&1 || { tail -30 "$build/cmake.log" >&2; say "cmake configure failed (full log: $build/cmake.log)"; exit 1; }
cmake --build "$build" --target ggml-cuda -j"$jobs" >"$build/build.log" 2>&1 \
  || { grep -m5 -B2 -A8 'error' "$build/build.log" >&2 || tail -30 "$build/build.log" >&2; say "build failed (full log: $build/build.log)"; exit 1; }
# Only the module: the binary keeps the libggml-base.so it was linked with.
cp -f "$build/bin/libggml-cuda.so" "$prefix/"
python3 "$repo/scripts/gpu/ggml_abi.py" "$src/ggml" "$prefix/ggml-abi.txt" >/dev/null
say "built libggml-cuda.so in $(( $(date +%s) - t0 )) s"
"$prefix/stllm" devices >&2 || true
say "installed in $prefix: stllm, libggml*.so, libggml-cuda.so, ggml-abi.txt"
say "run: $prefix/stllm run --model MODEL --prompt '...'   (GPU by default; --device cpu for the CPU)"
