#!/usr/bin/env bash
# The soak of benches/soak/soak.py on the CPU, in one session, on the same weights:
#   stllm serve                    (target/release/stllm or $STLLM_BIN), token-id and text prompts
#   llama-cpp-python's server      (PyPI llama-cpp-python[server], which compiles the llama.cpp it
#                                   ships, in its own venv), on a GGUF of the same folder written by
#                                   scripts/gpu/hf_to_gguf.py --vocab (BF16 matrices), text prompts
#                                   (its /v1/completions takes no token ids): the same token ids
#                                   decoded to text, re-tokenized by each server.
#
# Usage: benches/soak/run_cpu.sh [MODEL_DIR] [NAME]
#   MODEL_DIR: a llama/qwen3 folder with default RoPE and a byte-level BPE tokenizer.json
#              (default tests/fixtures/qwen3-f32-sharded)
# Environment: C (concurrency, 64), N (requests, 256), MAX_TOKENS (32), THREADS (nproc),
#   PROMPT_LENS (8,24,64,16,48), PREFIX (48 shared tokens), DISCONNECT (0.1),
#   CTX (stllm --ctx-size, 16384), LLAMA_CPP_VENV (scratch/venv-llamacpp), OUT_DIR,
#   SKIP_PEER=1 to run stllm only.
# Results: $OUT_DIR/results.jsonl (one JSON object per run) and $OUT_DIR/table.md (markdown rows).
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-tests/fixtures/qwen3-f32-sharded}
name=${2:-$(basename "$model")}
C=${C:-64}
N=${N:-256}
MAX_TOKENS=${MAX_TOKENS:-32}
THREADS=${THREADS:-$(nproc)}
PROMPT_LENS=${PROMPT_LENS:-8,24,64,16,48}
PREFIX=${PREFIX:-48}
DISCONNECT=${DISCONNECT:-0.1}
CTX=${CTX:-16384}
venv=${LLAMA_CPP_VENV:-scratch/venv-llamacpp}
out=${OUT_DIR:-scratch/soak-$(date +%Y%m%d-%H%M%S)}
bin=${STLLM_BIN:-target/release/stllm}
mkdir -p "$out"

[ -x "$bin" ] || { echo "run_cpu: $bin not found (cargo build --release)" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import httpx, gguf, numpy, safetensors" 2>/dev/null; then
  "$venv/bin/pip" install -q gguf numpy safetensors httpx
fi
if [ "${SKIP_PEER:-0}" != 1 ] && ! "$venv/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  echo "run_cpu: installing llama-cpp-python[server] into $venv (compiles llama.cpp: minutes)" >&2
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$venv/bin/pip" install -q 'llama-cpp-python[server]'
fi
py="$venv/bin/python"
eos=$("$py" -c "import json,sys; c=json.load(open(sys.argv[1])); e=c.get('eos_token_id'); print(e[0] if isinstance(e,list) else e)" "$model/config.json")
vocab=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$model/config.json")

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_http() {  # url, pid, seconds
  local url=$1 pid=$2 t=$3
  for _ in $(seq $((t * 5))); do
    kill -0 "$pid" 2>/dev/null || { echo "run_cpu: server $pid died" >&2; return 1; }
    curl -fs -o /dev/null "$url" && return 0
    sleep 0.2
  done
  echo "run_cpu: $url not up after ${t}s" >&2; return 1
}

soak() {  # label base_url model pid extra...
  local label=$1 url=$2 m=$3 pid=$4; shift 4
  "$py" benches/soak/soak.py --base-url "$url" --model "$m" --label "$label" --pid "$pid" \
    --mode tokens --vocab-size "$vocab" --tokenizer "$model" --ban-token "$eos" \
    -c "$C" -n "$N" --max-tokens "$MAX_TOKENS" --prompt-lens "$PROMPT_LENS" --shared-prefix "$PREFIX" \
    --disconnect-frac "$DISCONNECT" --out "$out/results.jsonl" --md "$out/table.md" "$@" \
    || echo "run_cpu: soak $label reported errors (see $out/results.jsonl)" >&2
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $THREADS threads; model $model; C=$C N=$N max_tokens=$MAX_TOKENS" | tee "$out/summary.txt"

# stllm
"$bin" serve --model "$name=$model" --host 127.0.0.1 --port 0 --threads "$THREADS" --ctx-size "$CTX" \
  --max-concurrent "$C" 2> "$out/stllm.log" &
spid=$!; pids+=("$spid")
for _ in $(seq 600); do grep -q "listening on http://127.0.0.1:" "$out/stllm.log" && break; kill -0 $spid || break; sleep 0.2; done
port=$(grep -o "listening on http://127.0.0.1:[0-9]*" "$out/stllm.log" | grep -o "[0-9]*$" || true)
[ -n "$port" ] || { echo "run_cpu: stllm did not start:" >&2; cat "$out/stllm.log" >&2; exit 1; }
soak "stllm" "http://127.0.0.1:$port/v1" "$name" "$spid" --prompt-format ids
soak "stllm" "http://127.0.0.1:$port/v1" "$name" "$spid" --prompt-format text
kill -TERM "$spid"; wait "$spid" || echo "run_cpu: stllm exited with $?" >&2

# llama-cpp-python
if [ "${SKIP_PEER:-0}" != 1 ]; then
  gguf="scratch/soak/$name.bf16.gguf"
  mkdir -p scratch/soak
  [ -f "$gguf" ] || "$py" scripts/gpu/hf_to_gguf.py "$model" "$gguf" --vocab
  lport=$("$py" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
  "$py" -m llama_cpp.server --model "$gguf" --model_alias "$name" --host 127.0.0.1 --port "$lport" \
    --n_ctx 512 --n_threads "$THREADS" --n_threads_batch "$THREADS" --interrupt_requests False \
    > "$out/llama-cpp-python.log" 2>&1 &
  lpid=$!; pids+=("$lpid")
  wait_http "http://127.0.0.1:$lport/v1/models" "$lpid" 120
  ver=$("$py" -c "import llama_cpp; print(llama_cpp.__version__)")
  soak "llama-cpp-python $ver" "http://127.0.0.1:$lport/v1" "$name" "$lpid" --prompt-format text
  kill -TERM "$lpid"; wait "$lpid" || true
fi

cat "$out/table.md"
echo "results in $out"
