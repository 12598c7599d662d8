#!/usr/bin/env python3
"""HF transformers peer for `cargo bench --bench engine`: aggregate greedy decode tokens/s with N
sequences decoded together (one batched forward per step, KV cache), and time to first token for a
long prompt (one prefill). Same folder, threads and shapes as the stllm bench.

Usage: python3 benches/hf_batched_bench.py MODEL_DIR --seqs 1,4,16,64 --prompt 16 --gen 32 --system 1024 --threads 2
Prints one JSON line per measurement.
"""
import argparse
import json
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--seqs", default="1,4,16,64")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--system", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    engine = f"transformers {transformers.__version__} torch {torch.__version__}"
    with torch.inference_mode():
        for n in [int(x) for x in a.seqs.split(",")]:
            ids = torch.randint(100, vocab, (n, a.prompt), generator=g)
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            for _ in range(a.gen - 1):
                out = model(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            print(json.dumps({"bench": "concurrent", "engine": engine, "seqs": n, "prompt": a.prompt, "gen": a.gen,
                              "threads": a.threads, "decode_tok_s": n * (a.gen - 1) / (t2 - t1),
                              "overall_tok_s": n * a.gen / (t2 - t0), "ttft_ms": (t1 - t0) * 1e3}), flush=True)
        if a.system:
            ids = torch.randint(100, vocab, (1, a.system), generator=g)
            t0 = time.perf_counter()
            model(ids, use_cache=True).logits[:, -1].argmax(-1)
            print(json.dumps({"bench": "ttft", "engine": engine, "prompt": a.system, "threads": a.threads,
                              "ttft_ms": (time.perf_counter() - t0) * 1e3}), flush=True)


if __name__ == "__main__":
    main()
