# Shared by scripts/setup.sh and scripts/test.sh (sourced): install what a fresh Debian/Ubuntu
# machine with only a Rust toolchain lacks, saying what is installed, and failing with a clear
# message when it cannot (no apt-get, no root and no sudo).

# apt_install PKG...: install the Debian packages not yet installed.
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: these packages are needed but this machine has no apt-get: ${missing[*]}" >&2
    echo "       install their equivalents with your package manager and run this again" >&2
    exit 1
  fi
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo)
    elif command -v sudo >/dev/null 2>&1 && [ -t 0 ]; then
      sudo=(sudo)
    else
      echo "error: these packages are needed and installing them needs root: ${missing[*]}" >&2
      echo "       run as root, or: sudo apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
  fi
  echo "stllm setup: installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# The build: C/C++ for ggml, cmake for its build, libclang for bindgen, the wasm target for the
# guest components.
install_build_deps() {
  command -v cargo >/dev/null 2>&1 || {
    echo "error: cargo not found: install a Rust toolchain first (https://rustup.rs)" >&2
    exit 1
  }
  apt_install build-essential cmake libclang-dev pkg-config
  if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    command -v rustup >/dev/null 2>&1 || {
      echo "error: the wasm32-wasip2 target is missing and there is no rustup to add it" >&2
      exit 1
    }
    echo "stllm setup: adding the Rust target wasm32-wasip2 (rustup)"
    rustup target add wasm32-wasip2
  fi
}
