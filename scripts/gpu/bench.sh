#!/usr/bin/env bash
# On the GPU machine, after run.sh built the CUDA module and our llama.cpp peer harness: per shape, a
# random-weight model with the real shapes (make_model.py, made once per machine), then, on the
# same GPU in the same call:
#   single stream  stllm bench (prefill 512 = TTFT, decode 128 at depth 512); HF transformers
#                  (benches/hf_cpu_bench.py --device cuda); llama.cpp through our harness
#                  peer-bench single (scripts/gpu/peer/peer_bench.cpp: prefill 512 into an empty
#                  cache = TTFT, decode 128 at depth 512, best of 3) on a BF16 GGUF of the same
#                  weights (hf_to_gguf.py with PyPI's gguf, into $WORK/gguf)
#   concurrent     1, 8, 32 sequences of prompt 128 + 128 generated: stllm bench --concurrent,
#                  peer-bench batched (per-sequence KV and unified KV), and
#                  benches/hf_batched_bench.py --device cuda (best of 2)
# Peak VRAM: each engine's own figure where it reports one, and nvidia-smi's memory.used sampled
# every 0.2 s around every step (whole process: CUDA context and caches included).
# Every JSON line goes to $OUT/bench.jsonl tagged with "peer", "shape" and "step"; a markdown table
# (bench_summary.py) ends the run; a failed step is reported and the rest goes on.
# Usage: bench.sh [qwen3-0.6b] [llama-3-8b]  (timings, and how to stay within the device tool's
# 10 minutes per command: README.md)
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
. scripts/gpu/lib.sh
use_gguf_wheel
unpack_stllm  # run.sh unpacks it too, but bench.sh may run alone
mkdir -p "$work/gguf"
[ -x "$work/llama/peer-bench" ] || echo "no $work/llama/peer-bench: run scripts/gpu/run.sh first" >&2
llama=$work/llama

for shape in "${@:-qwen3-0.6b}"; do
  dir="$work/models/$shape"
  gguf="$work/gguf/$shape-bf16.gguf"
  echo "== $shape"
  python3 scripts/gpu/make_model.py "$shape" "$dir" >>"$out/make-$shape.log" 2>&1 \
    || { echo "make_model $shape failed:"; tail -5 "$out/make-$shape.log"; continue; }
  # Single stream.
  measure stllm "$shape" single "$stllm" bench --model "$dir" --prompt 512 --gen 128 --repeat 3 --json \
    --device cuda --backend-dir "$work/backends"
  measure hf "$shape" single python3 benches/hf_cpu_bench.py "$dir" --prompt 512 --gen 128 --repeat 2 --device cuda
  [ -f "$gguf" ] || python3 scripts/gpu/hf_to_gguf.py "$dir" "$gguf" >>"$out/gguf-$shape.log" 2>&1 \
    || { echo "hf_to_gguf $shape failed:"; tail -5 "$out/gguf-$shape.log"; rm -f "$gguf"; }
  measure llama.cpp "$shape" single "$llama/peer-bench" -m "$gguf" --ngl 99 --fa 1 single --prompt 512 --gen 128 \
    --depth 512 --repeat 3
  # Concurrent sequences: 1, 8, 32 x (128 prompt + 128 generated).
  measure stllm "$shape" concurrent "$stllm" bench --model "$dir" --device cuda --backend-dir "$work/backends" \
    --concurrent 1,8,32 --prompt 128 --gen 128 --json
  # n_ctx 32 x 256 cells: per-sequence KV gives each of n_seq_max = 32 sequences 256; unified KV
  # shares all 8192.
  measure llama.cpp "$shape" concurrent "$llama/peer-bench" -m "$gguf" --ngl 99 --fa 1 batched --npl 1,8,32 \
    --prompt 128 --gen 128 --ctx 8192 --kv both
  # Two GPUs: the same model split by layers over both (pipeline parallelism), next to one GPU.
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    measure stllm-2gpu "$shape" single "$stllm" bench --model "$dir" --prompt 512 --gen 128 --repeat 3 --json \
      --devices cuda:0,cuda:1 --backend-dir "$work/backends"
    measure stllm-2gpu "$shape" concurrent "$stllm" bench --model "$dir" --devices cuda:0,cuda:1 \
      --backend-dir "$work/backends" --concurrent 1,8,32 --prompt 128 --gen 128 --json
  fi
  measure hf "$shape" concurrent python3 benches/hf_batched_bench.py "$dir" --seqs 1,8,32 --prompt 128 --gen 128 --repeat 2 \
    --system 0 --device cuda
done
echo
python3 scripts/gpu/bench_summary.py "$out/bench.jsonl" | tee "$out/summary.md"
