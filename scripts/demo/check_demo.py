#!/usr/bin/env python3
"""Check models/demo with transformers (CPU, float32): file sizes and tensors, greedy replies for a few
chat prompts, the dictionary-word check, the tool call's JSON, and that expected.json reproduces.

  .venv-demo/bin/python scripts/demo/check_demo.py [models/demo]
"""
import json
import os
import re
import sys

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

D = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", "demo")
torch.set_num_threads(2)
words = {w.strip().lower() for w in open("/usr/share/dict/words", encoding="utf-8", errors="replace") if w.strip()}

total = sum(os.path.getsize(os.path.join(D, f)) for f in os.listdir(D))
print(f"files: {sorted(os.listdir(D))}; total {total / 1e6:.2f} MB")
assert total <= 15e6
cfg = json.load(open(os.path.join(D, "config.json")))
with safe_open(os.path.join(D, "model.safetensors"), "pt") as f:
    keys = list(f.keys())
    dtypes = {str(f.get_slice(k).get_dtype()) for k in keys}
print(f"tensors {len(keys)}, dtypes {dtypes}, tie {cfg.get('tie_word_embeddings')}, lm_head stored: {'lm_head.weight' in keys}")

tok = AutoTokenizer.from_pretrained(D)
model = LlamaForCausalLM.from_pretrained(D, dtype=torch.float32).eval()
exp = json.load(open(os.path.join(D, "expected.json")))
tools = exp["cases"][1]["tools"]


def greedy(msgs, tools=None, n=48):
    ids = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False)
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return ids, out[0, len(ids):].tolist()


for c in exp["cases"]:
    ids, new = greedy(c["messages"], c["tools"], c["max_new_tokens"])
    assert ids == c["prompt_ids"] and new == c["greedy_ids"], (c["messages"], new, c["greedy_ids"])
print("expected.json reproduces")

prompts = [("Tell me something about love.", None), ("What do you think of work?", None),
           ("Say something wise about time.", None), ("Give me a quote about friends.", None),
           ("What is the weather in Paris?", tools), ("What's the weather like in Berlin?", tools),
           ("What time is it in Tokyo?", tools), ("Tell me something about love.", tools)]
for p, t in prompts:
    _, new = greedy([{"role": "user", "content": p}], t)
    reply = tok.decode(new, skip_special_tokens=True)
    toks = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)*", reply)
    bad = [w for w in toks if w.lower() not in words]
    bad_strict = [w for w in re.findall(r"[A-Za-z']+", reply) if w.strip("'") and w.replace("'", "").lower() not in words]
    m = re.search(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", reply, re.S)
    call = json.loads(m.group(1)) if m else None
    print(f"\n[{'tools' if t else 'chat'}] {p}\n  -> {reply!r}")
    print(f"  dictionary: {'all words found' if not bad else bad}; apostrophes-dropped variant: {'ok' if not bad_strict else bad_strict}")
    if call is not None:
        print(f"  tool call parsed: {call}")
