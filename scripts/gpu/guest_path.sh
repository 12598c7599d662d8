#!/usr/bin/env bash
# On the GPU machine, after run.sh (SKIP_CHECKS=1 is enough): issue #16 item 4, the guest path
# against the engine's own. One stllm binary, one random-weight model with real shapes
# (make_model.py), `stllm bench --concurrent` with and without `--through-policy` (every request
# through the default policy component: its loop, its sampler, its `decode-top` calls), on the
# GPU and then on the CPU of the same machine, each pair back to back. Greedy and sampled
# (temperature 0.8, top-k 40) runs. Results: $OUT/guest_path.jsonl and a markdown table printed last.
#
# Usage: SHAPE=qwen3-0.6b CONC=1,8,32 GEN=512 CPU_GEN=32 REPS=2 [DEVICES="cuda cpu"] bash scripts/gpu/guest_path.sh
# Each pair (engine, then through the policy) runs REPS times alternating, and each rep gets its
# own ratio: one run of a few hundred milliseconds varies by ~10% on the GPU (clocks, start-up),
# more than the difference measured; GEN=512 keeps the requests' staggered starts a small part.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
. scripts/gpu/lib.sh
unpack_stllm
shape=${SHAPE:-qwen3-0.6b}
conc=${CONC:-1,8,32}
gen=${GEN:-512}
reps=${REPS:-2}
cpu_gen=${CPU_GEN:-32}
prompt=${PROMPT:-128}
# The policy component tokenizes (even token prompts are detokenized for the stream).
policy_model "$shape"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
res="$out/guest_path.jsonl"
: >"$res"
one() { # DEVICE LABEL SAMPLING GEN EXTRA...
  local dev=$1 label=$2 sampling=$3 n=$4; shift 4
  "$g/bin/stllm" --quiet bench --model "$dir" --backend-dir "$work/backends" --device "$dev" --ctx-size 16384 \
    --concurrent "$conc" --prompt "$prompt" --gen "$n" --json "$@" 2>>"$out/guest_path.log" \
    | python3 -c 'import json, sys
for line in sys.stdin:
    try:
        d = json.loads(line)
    except ValueError:
        continue
    print(json.dumps({"device": sys.argv[1], "path": sys.argv[2], "sampling": sys.argv[3], "rep": int(sys.argv[4]), **d}))' "$dev" "$label" "$sampling" "$rep" \
    | tee -a "$res"
}
for dev in ${DEVICES:-cuda cpu}; do
  n=$gen; [ "$dev" = cpu ] && n=$cpu_gen
  for s in greedy sampled; do
    extra=(); [ "$s" = sampled ] && extra=(--temperature 0.8 --top-k 40 --seed 1)
    for rep in $(seq 1 "$reps"); do
      one "$dev" engine "$s" "$n" "${extra[@]}"
      one "$dev" policy "$s" "$n" --through-policy "${extra[@]}"
    done
  done
done
echo "== guest path vs Engine::generate ($shape; GPU: $card; CPU: $cpu, $(nproc) threads) =="
python3 - "$res" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def key(r): return (r["device"], r["sampling"], r.get("seqs"), r.get("rep"))
eng = {key(r): r for r in rows if r["path"] == "engine"}
print("| device | sampling | streams | rep | Engine::generate tok/s | through the policy tok/s | ratio | steps (engine / policy) |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["path"] != "policy":
        continue
    e = eng.get(key(r))
    if not e:
        continue
    a, b = e["decode_tok_s"], r["decode_tok_s"]
    print(f"| {r['device']} | {r['sampling']} | {r['seqs']} | {r.get('rep')} | {a:,.0f} | {b:,.0f} | {b / a:.2f} | {e.get('steps')} / {r.get('steps')} |")
PY
