#!/usr/bin/env bash
# The serving core against its peers on the CPU, in one session, on the same weights:
#   stllm      cargo bench --bench engine (Engine API: continuous batching, prefix cache)
#   llama.cpp  llama-batched-bench (N parallel sequences) and llama-bench -p (cold TTFT), built
#              from the llama.cpp tree vendored by llama-cpp-sys-2 (see BENCHMARKS.md)
#   HF         benches/hf_batched_bench.py (batched forward with a KV cache)
#
# Usage: benches/compare_engine.sh MODEL_DIR [GGUF] [THREADS]
# Env: SEQS (1,4,16,64), PROMPT (16), GEN (32), SYSTEM (1000; +24-token question),
#      LLAMA_BIN (scratch/llama-build/bin). Run on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?model dir}
gguf=${2:-}
threads=${3:-$(nproc)}
seqs=${SEQS:-1,4,16,64}
prompt=${PROMPT:-16}
gen=${GEN:-32}
system=${SYSTEM:-1000}
bin=${LLAMA_BIN:-scratch/llama-build/bin}
out=${OUT_DIR:-scratch/engine-bench-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
cargo build --release --benches -q
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads; model $model; seqs $seqs, prompt $prompt, gen $gen, system $system" | tee "$out/summary.txt"
STLLM_BENCH_MODEL="$model" STLLM_BENCH_SEQS="$seqs" STLLM_BENCH_PROMPT="$prompt" STLLM_BENCH_GEN="$gen" \
  STLLM_BENCH_SYSTEM="$system" STLLM_BENCH_THREADS="$threads" cargo bench -q --bench engine 2>/dev/null | tee "$out/stllm.jsonl"
if [ -n "$gguf" ] && [ -x "$bin/llama-batched-bench" ]; then
  max=$(echo "$seqs" | tr ',' '\n' | sort -n | tail -1)
  "$bin/llama-batched-bench" -m "$gguf" -c $((max * (prompt + gen) + 64)) -b 2048 -ub 512 -t "$threads" -tb "$threads" \
    -fa on -npp "$prompt" -ntg "$gen" -npl "$seqs" --output-format jsonl 2>"$out/llama-batched.log" | tee "$out/llama-batched.jsonl"
  "$bin/llama-bench" -m "$gguf" -p $((system + 24)) -n 0 -t "$threads" -fa 1 -r 1 -o jsonl 2>"$out/llama-bench.log" | tee "$out/llama-ttft.jsonl"
fi
python3 benches/hf_batched_bench.py "$model" --seqs "$seqs" --prompt "$prompt" --gen "$gen" --system $((system + 24)) \
  --threads "$threads" 2>"$out/hf.log" | tee "$out/hf.jsonl"
echo "results in $out"
