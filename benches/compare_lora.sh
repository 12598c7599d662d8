#!/usr/bin/env bash
# LoRA serving against HF transformers + PEFT on the CPU, in one session, same weights and
# adapters: N concurrent sequences decoding with 0 adapters, 1 adapter (all rows), and 4 different
# adapters in one batch (row i uses adapter i mod 4); then the same on a Q4_K base (QLoRA).
#   stllm  stllm bench --concurrent N [--lora DIR]... [--quantize q4_k]
#   HF     benches/hf_lora_bench.py (PEFT mixed-adapter batches, BF16; no quantized peer)
# Adapters: random, r 16 on every projection (scripts/make_lora.py), made into $out once.
#
# Usage: benches/compare_lora.sh MODEL_DIR [THREADS]   Env: SEQS (4), PROMPT (64), GEN (32)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?model dir}
threads=${2:-$(nproc)}
seqs=${SEQS:-4}
prompt=${PROMPT:-64}
gen=${GEN:-32}
out=${OUT_DIR:-scratch/lora-bench-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
cargo build --release -q
lora=()
for i in 0 1 2 3; do
  [ -f "$out/lora-$i/adapter_config.json" ] || python3 scripts/make_lora.py "$model" "$out/lora-$i" --seed "$i" >/dev/null
  lora+=(--lora "$out/lora-$i")
done
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads; model $model; $seqs seqs, prompt $prompt, gen $gen" \
  | tee "$out/summary.txt"
for q in "" "--quantize q4_k"; do
  for k in 0 1 4; do
    # shellcheck disable=SC2086
    ./target/release/stllm bench --model "$model" --concurrent "$seqs" --prompt "$prompt" --gen "$gen" \
      --threads "$threads" --json $q "${lora[@]:0:$((2 * k))}" 2>>"$out/stllm.log" \
      | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); d['adapters']=$k; d['quantize']='${q#--quantize }'; print(json.dumps(d))" \
      | tee -a "$out/stllm.jsonl"
  done
done
python3 benches/hf_lora_bench.py "$model" "$out"/lora-{0,1,2,3} --seqs "$seqs" --prompt "$prompt" --gen "$gen" \
  --threads "$threads" 2>"$out/hf.log" | tee "$out/hf.jsonl"
echo "results in $out"
