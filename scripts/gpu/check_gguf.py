#!/usr/bin/env python3
"""Check a GGUF written by hf_to_gguf.py against its HF folder's reference outputs: run llama.cpp (through
llama-cpp-python, on the CPU) on the prompt of MODEL_DIR/expected.safetensors (a parity fixture of
tests/fixtures/make_fixtures.py: `tokens` [n], `logits` [n, vocab] from HF in float64, `greedy` [8]) and
compare the logits at every prompt position.

Prints the max |dlogit|, the reference's std and their ratio (the error measure of tests/parity.rs), how
many positions agree on the top token, and whether llama.cpp, fed the reference's greedy tokens one at
a time after the prompt (decode with the cache / recurrent state), picks each of them (8/8). Exits 1
when max |dlogit| / std exceeds the tolerance (--tol; default 1e-4 for a GGUF with F32 weights, as
hf_to_gguf.py --outtype f32 writes, and 1e-1 otherwise: with BF16 weights llama.cpp's CPU matmuls round
the activations to BF16 as well, ~5e-2 on the NemotronH fixtures) or a greedy token differs. The KV
cache is F32 (llama.cpp's default F16 alone costs ~1.5e-3).

Measured with llama-cpp-python 0.3.36 (its own llama.cpp), max |dlogit| (max/std), top-1 and greedy all
agreeing; the llama.cpp vendored by llama-cpp-sys-2 (our peer's), built on its own, gives 3.1e-6 /
1.3e-6 / 1.3e-6 with F32 weights and the same BF16 figures to within 1e-4:
  fixture              --outtype f32        --outtype bf16
  nemotron_h-bf16      4.5e-6 (4.5e-6)      5.5e-2 (5.4e-2)
  nemotron_h-f32       1.9e-6 (1.9e-6)      3.7e-2 (3.8e-2)
  nemotron_h-f32-pub   1.9e-6 (1.9e-6)      3.7e-2 (3.8e-2)

Needs numpy and llama-cpp-python (PyPI: `pip install numpy llama-cpp-python==0.3.36`, a source build of
its own llama.cpp with cmake and a C++ compiler; 0.3.36 knows nemotron_h and nemotron_h_moe);
expected.safetensors is read with numpy alone. hf_to_gguf.py needs gguf (and numpy, safetensors).

Usage: check_gguf.py MODEL_DIR GGUF [--tol X] [--threads N]
e.g.   python3 scripts/gpu/hf_to_gguf.py tests/fixtures/nemotron_h-f32 /tmp/nh.gguf --outtype f32
       python3 scripts/gpu/check_gguf.py tests/fixtures/nemotron_h-f32 /tmp/nh.gguf
"""
import argparse
import json
import os
import sys

import numpy as np

GGML_TYPE_F32 = 0  # the KV cache in F32 (llama.cpp's default F16 costs ~1e-3 of std on these fixtures)


def read_safetensors(path):
    """{name: numpy array} for the F32 / F64 / I64 / I32 tensors of a .safetensors file."""
    dtypes = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, h in header.items():
        if name == "__metadata__" or h["dtype"] not in dtypes:
            continue
        a, b = h["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=dtypes[h["dtype"]]).reshape(h["shape"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("gguf")
    ap.add_argument("--tol", type=float, default=None,
                    help="largest max|dlogit|/std(reference) accepted (default 1e-4 for F32 weights, else 1e-1)")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    a = ap.parse_args()

    from llama_cpp import Llama

    ref = read_safetensors(os.path.join(a.model_dir, "expected.safetensors"))
    tokens = [int(t) for t in ref["tokens"]]
    want = ref["logits"].astype(np.float64)
    greedy = [int(t) for t in ref.get("greedy", [])]
    n = len(tokens)

    llm = Llama(model_path=a.gguf, logits_all=True, vocab_only=False, n_ctx=max(64, n + len(greedy) + 8),
                n_batch=max(n, 8), n_ubatch=max(n, 8), n_threads=a.threads, n_threads_batch=a.threads,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    llm.eval(tokens)
    got = np.array(llm.scores[:n], dtype=np.float64)
    if got.shape != want.shape:
        sys.exit(f"logits shape {got.shape}, reference {want.shape}")
    diff = float(np.abs(got - want).max())
    std = float(want.std())
    top = int((got.argmax(-1) == want.argmax(-1)).sum())

    # greedy decode, one token at a time, fed the reference's choices
    picks = []
    for t in greedy:
        picks.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([t])
    ok_greedy = picks == greedy

    file_type = llm.metadata.get("general.file_type")
    tol = a.tol if a.tol is not None else (1e-4 if file_type == "0" else 1e-1)
    rel = diff / std
    print(f"{os.path.basename(os.path.normpath(a.model_dir))}: {llm.metadata.get('general.architecture')} "
          f"file_type={file_type} tokens={n} max|dlogit|={diff:.3e} std={std:.3f} max/std={rel:.3e} "
          f"(tol {tol:g}) top1={top}/{n} greedy={sum(p == g for p, g in zip(picks, greedy))}/{len(greedy)}")
    if not ok_greedy:
        print(f"  greedy: llama.cpp {picks}, reference {greedy}")
    sys.exit(0 if rel <= tol and ok_greedy else 1)


if __name__ == "__main__":
    main()
