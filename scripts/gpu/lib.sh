# Shared by run.sh, bench.sh, nano.sh and extras.sh (sourced from the repository root): paths, tag JSON lines and measure a
# command with nvidia-smi memory sampling; unpack the xz-compressed stllm prepare.sh ships.

# The paths every step uses (run from the repository root): the carry, the machine's work folder,
# the folder the device tool brings back, and the stllm binary.
g=scratch/gpu
work=${WORK:-/tmp/stllm-gpu}
out=${OUT:-/tmp/stllm-out}
stllm=$g/bin/stllm
mkdir -p "$work" "$out"

# unpack_stllm: scratch/gpu/bin/stllm.xz -> scratch/gpu/bin/stllm beside its libraries (xz, else
# Python's lzma), unless already unpacked from this archive.
unpack_stllm() {
  local g=scratch/gpu
  if [ -f "$g/bin/stllm.xz" ] && [ ! "$g/bin/stllm" -nt "$g/bin/stllm.xz" ]; then
    if command -v xz >/dev/null; then xz -dc "$g/bin/stllm.xz"
    else python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$g/bin/stllm.xz"
    fi > "$g/bin/stllm.tmp" && chmod +x "$g/bin/stllm.tmp" && mv "$g/bin/stllm.tmp" "$g/bin/stllm"
  fi
}

# use_gguf_wheel: put PyPI's gguf (carried as a wheel by prepare.sh; no network there) on
# PYTHONPATH for hf_to_gguf.py: installed into $WORK/site, or, if pip cannot, imported from the
# wheel itself (pure Python).
use_gguf_wheel() {
  local whl
  whl=$(ls scratch/gpu/wheels/gguf-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$whl" >/dev/null 2>&1; then
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  elif [ -n "$whl" ]; then
    export PYTHONPATH="$PWD/$whl${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "no gguf wheel in scratch/gpu/wheels: run scripts/gpu/prepare.sh" >&2
  fi
}

# add_tokenizer DIR [NAME]: put a carried tokenizer's files (prepare.sh: scratch/gpu/tokenizer-NAME,
# tokenizer.json xz-compressed; NAME qwen3 (default) or llama3) into a model folder, for what runs
# through the policy component.
add_tokenizer() {
  local f src=scratch/gpu/tokenizer-${2:-qwen3}
  [ -d "$src" ] || { echo "no $src (prepare.sh packs it when npm is there)" >&2; return 1; }
  for f in "$src"/*; do
    case "$f" in
      *.xz) python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$1/$(basename "$f" .xz)" ;;
      *) cp "$f" "$1/" ;;
    esac
  done
}

# policy_model SHAPE: the random-weight model of make_model.py in $work/models/SHAPE (made once
# per machine) with the carried tokenizer of its family (Llama 3's for llama-3-*, Qwen3's
# otherwise), for what runs through the policy component; sets $dir to its folder.
policy_model() {
  dir="$work/models/$1"
  # A folder left without weights by an interrupted make_model.py is made again.
  if [ ! -f "$dir/config.json" ] || { [ ! -f "$dir/model.safetensors" ] && [ ! -f "$dir/model.safetensors.index.json" ]; }; then
    rm -rf "$dir"
    python3 scripts/gpu/make_model.py "$1" "$dir" >"$out/make-$1.log" 2>&1 \
      || { echo "make_model.py $1 failed:"; tail -5 "$out/make-$1.log"; return 1; }
  fi
  case "$1" in
    llama-3-*) add_tokenizer "$dir" llama3 ;;
    *) add_tokenizer "$dir" qwen3 ;;
  esac
}

# tag PEER SHAPE STEP: keep the JSON lines of stdin, add the three keys, append to bench.jsonl.
tag() {
  python3 -c 'import json, sys
for line in sys.stdin:
    try:
        d = json.loads(line)
    except ValueError:
        continue
    if isinstance(d, dict):
        print(json.dumps({"peer": sys.argv[1], "shape": sys.argv[2], "step": sys.argv[3], **d}), flush=True)' "$@" \
    | tee -a "$out/bench.jsonl"
}
# measure PEER SHAPE STEP CMD...: run CMD (stderr to $OUT/PEER-SHAPE-STEP.log) with nvidia-smi
# sampling memory.used every 0.2 s; its JSON lines and then a {"bench": "vram"} line are tagged.
measure() {
  local peer=$1 shape=$2 step=$3; shift 3
  local log="$out/$peer-$shape-$step.log" smi="$work/smi-$peer-$step.txt"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "${GPU:-0}" -lms 200 >"$smi" 2>/dev/null &
  local smi_pid=$!
  local t0=$SECONDS
  "$@" 2>"$log" | tag "$peer" "$shape" "$step"
  local rc=${PIPESTATUS[0]}
  kill "$smi_pid" 2>/dev/null; wait "$smi_pid" 2>/dev/null
  local peak; peak=$(sort -n "$smi" | tail -1)
  echo "{\"bench\": \"vram\", \"smi_peak_mib\": ${peak:-null}, \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" \
    | tag "$peer" "$shape" "$step" >/dev/null
  [ "$rc" = 0 ] || { echo "$peer $step on $shape failed (rc $rc), last lines of $log:"; tail -5 "$log"; }
}

