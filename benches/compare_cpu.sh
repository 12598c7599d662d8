#!/usr/bin/env bash
# Compare stllm with its peers on the CPU, in one session, on the same weights:
#   stllm bench            (this repo, release build)
#   llama.cpp llama-bench  (built from the ggml/llama.cpp sources vendored by llama-cpp-sys-2,
#                           on a GGUF converted from the same folder by its convert_hf_to_gguf.py)
#   HF transformers        (benches/hf_cpu_bench.py)
#
# Usage: benches/compare_cpu.sh MODEL_DIR [GGUF] [PROMPT] [GEN] [THREADS]
# Set LLAMA_BENCH=/path/to/llama-bench (default scratch/llama-build/bin/llama-bench).
# How the peers were prepared is in BENCHMARKS.md. Runs each engine twice, alternating.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?model dir}
gguf=${2:-}
prompt=${3:-128}
gen=${4:-32}
threads=${5:-$(nproc)}
llama_bench=${LLAMA_BENCH:-scratch/llama-build/bin/llama-bench}
out=${OUT_DIR:-scratch/bench-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
cargo build --release -q
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads; model $model; prompt $prompt, gen $gen" | tee "$out/summary.txt"
for round in 1 2; do
  ./target/release/stllm bench --model "$model" --prompt "$prompt" --gen "$gen" --threads "$threads" --json \
    | tee -a "$out/stllm.jsonl"
  if [ -n "$gguf" ] && [ -x "$llama_bench" ]; then
    # Prefill from an empty cache, then decode at the depth of the prompt, as `stllm bench` does.
    { "$llama_bench" -m "$gguf" -p "$prompt" -n 0 -t "$threads" -r 1 -o json 2>"$out/llama-$round.log" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))'
      "$llama_bench" -m "$gguf" -p 0 -n "$gen" -d "$prompt" -t "$threads" -r 1 -o json 2>>"$out/llama-$round.log" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))'
    } > "$out/llama-$round.json"
    python3 - "$out/llama-$round.json" <<'PY' | tee -a "$out/llama.jsonl"
import json, sys
rows = [r for line in open(sys.argv[1]) for r in json.loads(line)]
d = {"engine": "llama.cpp " + rows[0].get("build_commit", "")}
for r in rows:
    key = "prefill_tok_s" if r["n_gen"] == 0 else "decode_tok_s"
    d[key] = r["avg_ts"]
print(json.dumps(d))
PY
  fi
  if python3 -c "import transformers" 2>/dev/null; then
    python3 benches/hf_cpu_bench.py "$model" --prompt "$prompt" --gen "$gen" --threads "$threads" --dtype bf16 \
      | tee -a "$out/hf.jsonl"
  fi
done
echo "logs in $out"
