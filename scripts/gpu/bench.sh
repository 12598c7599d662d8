#!/usr/bin/env bash
# On the GPU machine, after run.sh built the CUDA module: random-weight models with real shapes,
# then `stllm bench --device cuda` (prefill 512 = TTFT, decode 128 at depth 512) next to HF
# transformers on the same GPU, in the same call. Usage: bench.sh [qwen3-0.6b] [llama-3-8b]
set -euo pipefail
cd "$(dirname "$0")/../.."
g=scratch/gpu
work=${WORK:-/tmp/stllm-gpu}
out=${OUT:-/tmp/stllm-out}
mkdir -p "$out"
for shape in "${@:-qwen3-0.6b}"; do
  dir="$work/models/$shape"
  python3 scripts/gpu/make_model.py "$shape" "$dir" >>"$out/make-$shape.log" 2>&1
  "$g/bin/stllm" bench --model "$dir" --prompt 512 --gen 128 --repeat 3 --json --device cuda \
    --backend-dir "$work/backends" 2>"$out/stllm-$shape.log" | tee -a "$out/bench.jsonl"
  python3 benches/hf_cpu_bench.py "$dir" --prompt 512 --gen 128 --repeat 3 --device cuda \
    2>"$out/hf-$shape.log" | tee -a "$out/bench.jsonl"
done
