#!/usr/bin/env bash
# On the GPU machine, after run.sh: Nemotron 3 Nano's real shapes (random weights, 31.6B
# parameters, ~63 GB BF16; make_model.py nemotron-3-nano, made once per machine into $WORK) next
# to HF transformers and llama.cpp (the vendored tree's peer-bench, run.sh builds it).
# Steps (arguments, in any order; default: make stllm):
#   make          make the model (on the GPU, saved as BF16 safetensors: ~1-3 min)
#   stllm         single stream (prefill 512 = TTFT, decode 128 at depth
#                 512, best of 2) and 1 / 8 / 32 concurrent sequences (prompt 128 + 64 generated)
#   nosplit       the single stream again with STLLM_MOE_SPLIT=0 (expert matrices not split into
#                 row parts: ggml-cuda's per-expert cuBLAS fallback for 129..512-token steps)
#   p8k           prefill of 8,192 tokens in steps of 512 and of 2,048 tokens
#   hf            the same two through HF transformers (decode 32 tokens: it runs at ~9 tok/s)
#   llama         the same two through llama.cpp on a BF16 GGUF of the same weights (hf_to_gguf.py,
#                 nemotron_h_moe, written once per machine into $GGUF_DIR (default $WORK/gguf):
#                 ~63 GB; its logits checked against HF on the fixtures by scripts/gpu/check_gguf.py).
#                 CONSUME=1: the model's safetensors are deleted as they are converted (the
#                 lent machine holds the model or its GGUF, not both): run every other step first
#   long:N        stllm prefill of N tokens (chunks of --batch 2048) then decode 32 at depth N:
#                 prefill speed, decode speed and memory (KV, recurrent state, compute) at depth
#   depth:N       the same over several calls: prefill in chunks of 8192 (speed over depth) until
#                 DEADLINE s (default 480), save the sequence (KV + recurrent state) to
#                 $WORK/depth-N.kv, resume from it in the next call on the warm machine; the call
#                 that completes the prompt decodes 32 tokens at depth N ($OUT/depth-N.jsonl)
#   2gpu          stllm single stream with the layers split over two GPUs
# Devices: $DEV (default "--device cuda"). JSON lines go to $OUT/bench.jsonl as in bench.sh.
# The device tool allows 10 minutes a command: "make stllm" in one call, "hf long:131072" in the
# next on the same warm machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
. scripts/gpu/lib.sh
unpack_stllm
shape=nemotron-3-nano
dir="$work/models/$shape"
read -r -a dev <<<"${DEV:---device cuda}"
be=(--backend-dir "$work/backends")

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(make stllm)
for step in "${steps[@]}"; do
  t0=$SECONDS
  echo "== $shape $step"
  case $step in
    make)
      # The model goes to RAM-backed /dev/shm when $dir links there (the disk is too small);
      # tmpfs defaults to half the RAM, too little for the model and, with CONSUME=1, a
      # shard in flight beside the growing GGUF: grow it when allowed (root).
      if [ "$(id -u)" = 0 ] && [ -n "${SHM_SIZE:-}" ]; then
        mount -o "remount,size=$SHM_SIZE" /dev/shm && df -h /dev/shm | tail -1
      fi
      python3 scripts/gpu/make_model.py "$shape" "$dir" >>"$out/make-$shape.log" 2>&1 \
        || { echo "make_model failed:"; tail -5 "$out/make-$shape.log"; exit 1; }
      du -sh "$dir"
      ;;
    stllm)
      measure stllm "$shape" single "$stllm" bench --model "$dir" --prompt 512 --gen 128 --repeat 2 --json \
        "${dev[@]}" "${be[@]}"
      measure stllm "$shape" concurrent "$stllm" bench --model "$dir" "${dev[@]}" "${be[@]}" \
        --concurrent 1,8,32 --prompt 128 --gen 64 --json
      ;;
    nosplit)
      STLLM_MOE_SPLIT=0 measure stllm-nosplit "$shape" single "$stllm" bench --model "$dir" --prompt 512 --gen 128 \
        --repeat 2 --json "${dev[@]}" "${be[@]}"
      ;;
    p8k)
      for b in 512 2048; do
        measure stllm "$shape" "p8k-b$b" "$stllm" bench --model "$dir" --prompt 8192 --gen 8 --batch "$b" --json \
          "${dev[@]}" "${be[@]}"
      done
      ;;
    hf)
      measure hf "$shape" single python3 benches/hf_cpu_bench.py "$dir" --prompt 512 --gen 32 --repeat 1 \
        --device cuda
      measure hf "$shape" concurrent python3 benches/hf_batched_bench.py "$dir" --seqs 1,8 --prompt 128 --gen 32 \
        --repeat 1 --system 0 --device cuda
      ;;
    llama)
      use_gguf_wheel
      gdir=${GGUF_DIR:-$work/gguf}
      gguf="$gdir/$shape-bf16.gguf"
      mkdir -p "$gdir"
      consume=(); [ "${CONSUME:-0}" = 1 ] && consume=(--consume)
      [ -f "$gguf" ] || python3 scripts/gpu/hf_to_gguf.py "$dir" "$gguf" "${consume[@]}" >>"$out/gguf-$shape.log" 2>&1 \
        || { echo "hf_to_gguf failed:"; tail -5 "$out/gguf-$shape.log"; rm -f "$gguf"; continue; }
      tail -2 "$out/gguf-$shape.log"
      measure llama.cpp "$shape" single "$work/llama/peer-bench" -m "$gguf" --ngl 99 --fa 1 single --prompt 512 \
        --gen 128 --depth 512 --repeat 2
      measure llama.cpp "$shape" concurrent "$work/llama/peer-bench" -m "$gguf" --ngl 99 --fa 1 batched --npl 1,8,32 \
        --prompt 128 --gen 64 --ctx 8192 --kv both
      ;;
    long:*)
      n=${step#long:}
      measure stllm "$shape" "long-$n" "$stllm" bench --model "$dir" --prompt "$n" --gen 32 --batch 2048 --json \
        "${dev[@]}" "${be[@]}"
      ;;
    depth:*)
      # A context too long for one 10-minute call (the 1M-token promise): chunks of 8192 with
      # the speed of each over depth, the sequence (KV cells and recurrent state) saved to
      # $work/depth-N.kv when DEADLINE (default 480) seconds have passed; the same step in the
      # next call on the still-warm machine resumes there, and the call that completes the
      # prompt decodes 32 tokens at its depth (decode speed, memory).
      n=${step#depth:}
      "$stllm" --quiet bench --model "$dir" --prompt "$n" --gen 32 --chunk 8192 --batch 2048 --ctx-size $((n + 64)) \
        --state "$work/depth-$n.kv" --deadline "${DEADLINE:-480}" --json "${dev[@]}" "${be[@]}" \
        | tee -a "$out/depth-$n.jsonl" | tail -3
      ;;
    2gpu)
      measure stllm-2gpu "$shape" single "$stllm" bench --model "$dir" --prompt 512 --gen 128 --repeat 2 --json \
        --devices cuda:0,cuda:1 "${be[@]}"
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "   ($step: $((SECONDS - t0)) s)"
done
python3 scripts/gpu/bench_summary.py "$out/bench.jsonl" | tee "$out/summary.md"
