#!/usr/bin/env python3
"""HF transformers peer for `stllm bench`: prefill tokens/s for a prompt and decode tokens/s with a
KV cache (greedy), on the CPU, same folder, same thread count, same prompt length.

Usage: python3 benches/hf_cpu_bench.py MODEL_DIR --prompt 512 --gen 128 --threads 2 [--dtype bf16|f32] [--device cuda]
Prints one JSON line.
"""
import argparse
import json
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args()
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    # On a GPU the weights go straight to it (a 63 GB model need not pass through host memory).
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.model, dtype=dtype, device_map=a.device if a.device.startswith("cuda") else None).to(a.device)
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (1, a.prompt), generator=g).to(a.device)
    best_pp, best_tg = float("inf"), float("inf")
    with torch.inference_mode():
        for _ in range(a.repeat):
            sync()
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            out.logits[:, -1:].argmax(-1).item()
            best_pp = min(best_pp, time.perf_counter() - t0)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            for _ in range(a.gen):
                out = model(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            tok.cpu()
            best_tg = min(best_tg, time.perf_counter() - t1)
    print(json.dumps({
        "engine": f"transformers {transformers.__version__} torch {torch.__version__}",
        "device": a.device, "peak_vram_mib": torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else None,
        "dtype": a.dtype, "threads": a.threads, "prompt": a.prompt, "gen": a.gen,
        "prefill_tok_s": a.prompt / best_pp, "decode_tok_s": a.gen / best_tg if a.gen else 0.0,
        "ttft_ms": best_pp * 1e3,
    }))


if __name__ == "__main__":
    main()
