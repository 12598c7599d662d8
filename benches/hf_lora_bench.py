#!/usr/bin/env python3
"""HF transformers + PEFT peer for `stllm bench --concurrent N --lora ...`: N sequences of a
random prompt, greedy, each with its own adapter (PEFT's mixed-adapter batches: `adapter_names`
per row), adapters applied unmerged as stllm does. Prints one JSON line per adapter count.

Usage: hf_lora_bench.py MODEL_DIR ADAPTER_DIR... --seqs 4 --prompt 64 --gen 32 --threads 2
       [--counts 0,1,4] (0: the base; k: adapter i % k for row i) [--device cpu|cuda]
"""
import argparse
import json
import time

import peft
import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("adapters", nargs="+")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--counts", default="0,1,4")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).to(a.device).eval()
    names = [f"a{i}" for i in range(len(a.adapters))]
    model = peft.PeftModel.from_pretrained(base, a.adapters[0], adapter_name=names[0])
    for n, d in zip(names[1:], a.adapters[1:]):
        model.load_adapter(d, adapter_name=n)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, base.config.vocab_size, (a.seqs, a.prompt), generator=g).to(a.device)
    engine = f"transformers {transformers.__version__} peft {peft.__version__} torch {torch.__version__}"
    with torch.inference_mode():
        for k in [int(x) for x in a.counts.split(",")]:
            rows = ["__base__"] * a.seqs if k == 0 else [names[i % k] for i in range(a.seqs)]
            kw = {"adapter_names": rows}
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **kw)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            t1 = time.perf_counter()
            for _ in range(a.gen - 1):
                out = model(input_ids=tok, past_key_values=past, use_cache=True, **kw)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            t2 = time.perf_counter()
            print(json.dumps({"engine": engine, "bench": "lora", "adapters": k, "seqs": a.seqs, "prompt": a.prompt,
                              "gen": a.gen, "threads": a.threads, "decode_tok_s": a.seqs * (a.gen - 1) / (t2 - t1),
                              "prefill_s": t1 - t0}), flush=True)


if __name__ == "__main__":
    main()
