#!/usr/bin/env python3
"""Write a BF16 GGUF that llama.cpp (our peer harness, scripts/gpu/peer) loads, from an HF folder of
make_model.py (Llama or Qwen3 architecture, safetensors, no tokenizer needed), for speed runs.

No vocabulary is written: tokenizer.ggml.model = "none" plus {arch}.vocab_size, which llama.cpp's
llama-vocab.cpp turns into that many dummy tokens (peer-bench feeds random token ids, so it never
tokenizes). Tensor names, metadata keys and the Llama Q/K row permutation
are those of llama.cpp's convert_hf_to_gguf.py (Qwen3 uses NEOX RoPE and is not permuted); 1-D
tensors (norms) are written F32, the matrices BF16, as that script does with --outtype bf16.

Needs PyPI's `gguf` package (pinned in prepare.sh, which carries its wheel to scratch/gpu/wheels;
bench.sh puts it on PYTHONPATH), numpy and safetensors; torch when it is there (without it,
F32, F16 and BF16 tensors are read with numpy and rounded to BF16 the same way: round to nearest
even).

With --vocab, the folder's tokenizer.json (a byte-level BPE, GPT-2 style) is written as the
vocabulary instead (tokenizer.ggml.model = "gpt2": tokens, token types, merges, BOS/EOS), for
peers that detokenize what they generate (llama-cpp-python's server aborts on a vocabulary-less
model); prompts given as token ids are then still not tokenized by llama.cpp.

Usage: hf_to_gguf.py MODEL_DIR OUT.gguf [--vocab]
"""
import json
import os
import sys

import numpy as np
from safetensors import safe_open

try:
    import torch
except ImportError:  # numpy only: benches/soak/run_cpu.sh on a CPU box
    torch = None


class RawSafetensors:
    """Without torch: a safetensors file read with numpy, F32/F16/BF16 tensors as float32
    (numpy has no bfloat16, which safetensors' numpy framework refuses)."""

    DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}

    def __init__(self, path):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self.data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)

    def keys(self):
        return self.header.keys()

    def shape(self, name):
        return self.header[name]["shape"]

    def get_tensor(self, name):
        h = self.header[name]
        if h["dtype"] not in self.DTYPES:
            sys.exit(f"{name}: dtype {h['dtype']} not handled without torch")
        a, b = h["data_offsets"]
        t = np.frombuffer(self.data[a:b], dtype=self.DTYPES[h["dtype"]]).reshape(h["shape"])
        if h["dtype"] == "BF16":
            return (t.astype(np.uint32) << 16).view(np.float32)
        return t.astype(np.float32)

import gguf

ARCHS = {"llama": "llama", "qwen3": "qwen3"}


def permute(w, n_head, n_head_kv):
    # convert_hf_to_gguf.py LlamaModel.permute: HF rotates halves, llama.cpp's llama arch uses
    # RoPE mode "normal" (adjacent pairs), so each head's rows are interleaved back.
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_bpe_vocab(w, src, cfg):
    """tokenizer.json's byte-level BPE as a GGUF "gpt2" vocabulary."""
    with open(os.path.join(src, "tokenizer.json")) as f:
        tok = json.load(f)
    model = tok["model"]
    if model.get("type") != "BPE":
        sys.exit(f"--vocab: tokenizer model {model.get('type')!r} is not BPE")
    n_vocab = cfg["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for a in tok.get("added_tokens", []):
        if a["id"] < n_vocab:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        v = cfg.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            add(int(v))
    w.add_add_bos_token(False)


def main():
    args = [a for a in sys.argv[1:] if a != "--vocab"]
    with_vocab = "--vocab" in sys.argv[1:]
    src, dst = args[0], args[1]
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    arch = ARCHS.get(cfg["model_type"])
    if arch is None:
        sys.exit(f"model_type {cfg['model_type']!r} not supported (only {', '.join(ARCHS)})")
    n_layer, n_embd = cfg["num_hidden_layers"], cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or n_embd // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    if (rope.get("rope_type") or "default") != "default" or cfg.get("rope_scaling"):
        sys.exit("rope scaling is not handled here")

    # Where each HF tensor lives.
    where = {}
    for fn in sorted(os.listdir(src)):
        if fn.endswith(".safetensors"):
            if torch is None:
                for k in RawSafetensors(os.path.join(src, fn)).keys():
                    where[k] = os.path.join(src, fn)
                continue
            with safe_open(os.path.join(src, fn), framework="pt") as f:
                for k in f.keys():
                    where[k] = os.path.join(src, fn)

    if torch is None:
        handles = {fn: RawSafetensors(fn) for fn in set(where.values())}
    else:
        handles = {fn: safe_open(fn, framework="pt") for fn in set(where.values())}

    def hf(name):
        return handles[where[name]].get_tensor(name)

    # (gguf name, hf name, permute args or None)
    plan = [("token_embd.weight", "model.embed_tokens.weight", None)]
    for i in range(n_layer):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", p + "input_layernorm.weight", None),
            (b + "attn_q.weight", p + "self_attn.q_proj.weight", (n_head, n_head) if arch == "llama" else None),
            (b + "attn_k.weight", p + "self_attn.k_proj.weight", (n_head, n_head_kv) if arch == "llama" else None),
            (b + "attn_v.weight", p + "self_attn.v_proj.weight", None),
            (b + "attn_output.weight", p + "self_attn.o_proj.weight", None),
        ]
        if arch == "qwen3":
            plan += [(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", None),
                     (b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", None)]
        plan += [
            (b + "ffn_norm.weight", p + "post_attention_layernorm.weight", None),
            (b + "ffn_gate.weight", p + "mlp.gate_proj.weight", None),
            (b + "ffn_up.weight", p + "mlp.up_proj.weight", None),
            (b + "ffn_down.weight", p + "mlp.down_proj.weight", None),
        ]
    plan.append(("output_norm.weight", "model.norm.weight", None))
    if not cfg.get("tie_word_embeddings", False) and "lm_head.weight" in where:
        plan.append(("output.weight", "lm_head.weight", None))
    missing = [h for _, h, _ in plan if h not in where]
    if missing:
        sys.exit(f"missing tensors in {src}: {missing[:5]}")

    w = gguf.GGUFWriter(dst, arch)
    w.add_name(os.path.basename(os.path.normpath(src)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(n_layer)
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if head_dim != n_embd // n_head or arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    if with_vocab:
        add_bpe_vocab(w, src, cfg)
    else:
        # No vocabulary: llama.cpp's LLAMA_VOCAB_TYPE_NONE ("none" or "no_vocab") with vocab_size dummies.
        w.add_tokenizer_model("none")

    # Shapes first (header), then stream the data one tensor at a time.
    shapes = {}
    for name, h, _ in plan:
        hd = handles[where[h]]
        shape = list(hd.shape(h) if torch is None else hd.get_slice(h).get_shape())
        bf16 = len(shape) > 1
        shapes[name] = (shape, bf16)
        n = int(np.prod(shape))
        if bf16:
            w.add_tensor_info(name, shape, np.dtype(np.uint16), n * 2, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), n * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, h, perm in plan:
        t = hf(h)
        if perm is not None:
            t = permute(t, *perm)
        if torch is None:
            a = np.ascontiguousarray(t, dtype=np.float32)
            if shapes[name][1]:
                # f32 -> bf16, round to nearest even (as torch's .to(torch.bfloat16))
                u = a.view(np.uint32)
                a = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        elif shapes[name][1]:
            a = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        else:
            a = t.to(torch.float32).contiguous().numpy()
        w.write_tensor_data(a)
    w.close()
    print(f"wrote {dst} ({arch}, {len(plan)} tensors, {os.path.getsize(dst) / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
