#!/usr/bin/env python3
"""HF transformers peer for `cargo bench --bench engine`: aggregate greedy decode tokens/s with N
sequences decoded together (one batched forward per step, KV cache), and time to first token for a
long prompt (one prefill). Same folder, threads and shapes as the stllm bench. On the CPU by
default; --device cuda runs on the GPU (synchronized around each timed part, peak VRAM from
torch.cuda.max_memory_allocated, one untimed warm-up forward first). --repeat R runs each
sequence count R times and reports the fastest: on CUDA the first decode run of each batch shape
is ~3x slower than the next (measured on the H100: 15.8 vs 50.7 tok/s, one sequence), so use 2 there.

Usage: python3 benches/hf_batched_bench.py MODEL_DIR --seqs 1,4,16,64 --prompt 16 --gen 32 --system 1024 --threads 2 [--device cuda --repeat 2]
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per sequence count, the fastest reported (on CUDA the first run of a batch shape is ~3x slower)")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    # On a GPU the weights go straight to it (a 63 GB model need not pass through host memory).
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.model, dtype=dtype, device_map=a.device if a.device.startswith("cuda") else None).to(a.device)
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    engine = f"transformers {transformers.__version__} torch {torch.__version__}"

    def peak():
        return {"device": a.device, "peak_vram_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}

    with torch.inference_mode():
        if cuda:  # kernels, cuBLAS handles and the allocator warm up outside the timings
            model(torch.randint(100, vocab, (1, 16), generator=g).to(a.device), use_cache=True)
            sync()
        for n in [int(x) for x in a.seqs.split(",")]:
            ids = torch.randint(100, vocab, (n, a.prompt), generator=g).to(a.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            best = None
            for _ in range(a.repeat):
                sync()
                t0 = time.perf_counter()
                out = model(ids, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
                sync()
                t1 = time.perf_counter()
                for _ in range(a.gen - 1):
                    out = model(tok, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    tok = out.logits[:, -1:].argmax(-1)
                sync()
                t2 = time.perf_counter()
                del out, past, tok
                if best is None or t2 - t0 < best[2] - best[0]:
                    best = (t0, t1, t2)
            t0, t1, t2 = best
            print(json.dumps({"bench": "concurrent", "engine": engine, "seqs": n, "prompt": a.prompt, "gen": a.gen,
                              "threads": a.threads, "repeat": a.repeat, "decode_tok_s": n * (a.gen - 1) / (t2 - t1),
                              "overall_tok_s": n * a.gen / (t2 - t0), "ttft_ms": (t1 - t0) * 1e3, **peak()}),
                  flush=True)
        if a.system:
            ids = torch.randint(100, vocab, (1, a.system), generator=g).to(a.device)
            sync()
            t0 = time.perf_counter()
            model(ids, use_cache=True).logits[:, -1].argmax(-1).item()
            print(json.dumps({"bench": "ttft", "engine": engine, "prompt": a.system, "threads": a.threads,
                              "ttft_ms": (time.perf_counter() - t0) * 1e3, **peak()}), flush=True)


if __name__ == "__main__":
    main()
