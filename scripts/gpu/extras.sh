#!/usr/bin/env bash
# On the GPU machine, after run.sh: quantization at load and LoRA serving on one GPU, Qwen3-0.6B
# shapes (made by make_model.py once per machine):
#   quant  stllm bench (prefill 512 = TTFT, decode 128 at depth 512) with BF16 weights, then
#          --quantize q8_0 and q4_k (weights quantized at load)
#   lora   stllm bench --concurrent 8 (128 prompt + 64 generated) with 0 adapters, 1 adapter for
#          every request, and 4 different adapters in one batch (request i uses adapter i mod 4);
#          random r-16 adapters on every projection (scripts/make_lora.py), BF16 and Q4_K bases
# JSON lines go to $OUT/bench.jsonl tagged as in bench.sh (step "quant-..." / "lora-..."), and a
# short table is printed. Usage: extras.sh [quant] [lora]
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
. scripts/gpu/lib.sh
unpack_stllm
shape=qwen3-0.6b
dir="$work/models/$shape"
be=(--device cuda --backend-dir "$work/backends")
python3 scripts/gpu/make_model.py "$shape" "$dir" >>"$out/make-$shape.log" 2>&1 || { tail -5 "$out/make-$shape.log"; exit 1; }
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(quant lora)
for step in "${steps[@]}"; do
  case $step in
    quant)
      for q in bf16 q8_0 q4_k; do
        qa=(); [ "$q" = bf16 ] || qa=(--quantize "$q")
        measure stllm "$shape" "quant-$q" "$stllm" bench --model "$dir" --prompt 512 --gen 128 --repeat 2 --json \
          "${be[@]}" "${qa[@]}"
      done
      ;;
    lora)
      lora=()
      for i in 0 1 2 3; do
        [ -f "$work/lora-$i/adapter_config.json" ] || python3 scripts/make_lora.py "$dir" "$work/lora-$i" --seed "$i" >/dev/null
        lora+=(--lora "$work/lora-$i")
      done
      for q in bf16 q4_k; do
        qa=(); [ "$q" = bf16 ] || qa=(--quantize "$q")
        for k in 0 1 4; do
          measure stllm "$shape" "lora-$q-$k" "$stllm" bench --model "$dir" --concurrent 8 --prompt 128 --gen 64 \
            --json "${be[@]}" "${qa[@]}" "${lora[@]:0:$((2 * k))}"
        done
      done
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
python3 - "$out/bench.jsonl" <<'EOF'
import json, sys
print("| step | TTFT 512 ms | decode tok/s | weights MiB | LoRA MiB | smi peak MiB |")
print("|---|---|---|---|---|---|")
smi = {}
rows = []
for line in open(sys.argv[1]):
    d = json.loads(line)
    st = d.get("step", "")
    if not (st.startswith("quant-") or st.startswith("lora-")):
        continue
    if d.get("bench") == "vram":
        smi[st] = d.get("smi_peak_mib")
        continue
    m = d.get("memory", {})
    rows.append((st, d.get("ttft_ms", d.get("mean_ttft_ms")), d.get("decode_tok_s"), m.get("weights", 0) / 2**20,
                 m.get("lora", 0) / 2**20))
for st, ttft, tg, w, l in rows:
    print(f"| {st} | {ttft:.2f} | {tg:.1f} | {w:.0f} | {l:.0f} | {smi.get(st)} |")
EOF
