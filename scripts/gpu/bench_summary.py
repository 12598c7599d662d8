#!/usr/bin/env python3
"""Markdown table of a bench.sh run: one row per engine and shape, from the tagged JSON lines of
$OUT/bench.jsonl (keys "peer", "shape", "step" added by bench.sh; a later line wins over an earlier
one for the same measurement).

  TTFT 512          ttft_ms of the single-stream run (llama.cpp: peer-bench single, the best of 3
                    prefills of 512 tokens into an empty cache)
  decode 1 seq      decode_tok_s after the 512-token prompt (llama.cpp: peer-bench single, 128
                    tokens decoded one by one at depth 512, best of 3)
  conc. N seqs      aggregate decode tokens/s with N sequences of 128 + 128 tokens: decode_tok_s of
                    stllm bench --concurrent / hf_batched_bench / peer-bench batched (N x 128
                    generated tokens / decode time); peer-bench's unified-KV lines
                    ("kv_unified": true) get their own row, "<peer> (unified KV)"
  VRAM smi          max nvidia-smi memory.used over the engine's steps (whole process)
  VRAM self         the engine's own peak (stllm vram_peak_mib, torch max_memory_allocated)

Usage: bench_summary.py BENCH_JSONL
"""
import json
import sys


def fmt(v, nd=1):
    return "—" if v is None else f"{v:.{nd}f}"


def main():
    rows, engines, long = {}, {}, []
    with open(sys.argv[1]) as f:
        for line in f:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            peer, shape, step = d.get("peer"), d.get("shape"), d.get("step")
            if peer is None:
                continue
            if d.get("kv_unified") is True:
                peer += " (unified KV)"
            r = rows.setdefault((shape, peer), {})
            if isinstance(d.get("engine"), str):
                engines[peer] = d["engine"] + (f" on {d['device']}" if isinstance(d.get("device"), str) else "")
            if d.get("bench") == "vram":
                if d.get("smi_peak_mib") is not None:
                    r["smi"] = max(r.get("smi", 0), d["smi_peak_mib"])
                if d.get("rc"):
                    r.setdefault("failed", []).append(step)
                continue
            for k in ("vram_peak_mib", "peak_vram_mib"):
                if d.get(k) is not None:
                    r["self"] = max(r.get("self", 0), d[k])
            if step == "single":
                r["ttft"], r["tg"] = d.get("ttft_ms"), d.get("decode_tok_s")
            elif step.startswith("long-") and "prefill_tok_s" in d:
                long.append((shape, peer, d))
            elif step == "concurrent" and "seqs" in d:
                r[f"c{d['seqs']}"] = d.get("decode_tok_s")
    print("| engine | shape | TTFT 512 (ms) | decode tok/s, 1 seq @512 | conc. 1 seq | conc. 8 seqs | conc. 32 seqs "
          "| peak VRAM MiB (smi) | peak VRAM MiB (self) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (shape, peer), r in sorted(rows.items()):
        name = peer + (f" (failed: {', '.join(r['failed'])})" if r.get("failed") else "")
        print(f"| {name} | {shape} | {fmt(r.get('ttft'), 2)} | {fmt(r.get('tg'))} | {fmt(r.get('c1'))} | "
              f"{fmt(r.get('c8'))} | {fmt(r.get('c32'))} | {fmt(r.get('smi'), 0)} | {fmt(r.get('self'), 0)} |")
    if long:
        mib = 1 / 2**20
        print("\n| engine | shape | context | prefill tok/s | prefill s | decode tok/s at depth | KV MiB "
              "| recurrent MiB | compute MiB | weights MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for shape, peer, d in long:
            m = d.get("memory", {})
            print(f"| {peer} | {shape} | {d['prompt']} | {fmt(d['prefill_tok_s'])} | {fmt(d['ttft_ms'] / 1e3, 2)} | "
                  f"{fmt(d.get('decode_tok_s'))} | {fmt(m.get('kv', 0) * mib, 0)} | {fmt(m.get('recurrent', 0) * mib, 0)} "
                  f"| {fmt(m.get('compute', 0) * mib, 0)} | {fmt(m.get('weights', 0) * mib, 0)} |")
    for peer, e in sorted(engines.items()):
        print(f"\n{peer}: {e}")


if __name__ == "__main__":
    main()
