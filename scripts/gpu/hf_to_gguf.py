#!/usr/bin/env python3
"""Write a BF16 (or --outtype f32) GGUF that llama.cpp (our peer harness, scripts/gpu/peer) loads, from an HF folder of
make_model.py (Llama or Qwen3 architecture, safetensors, no tokenizer needed), for speed runs, or
from an NVIDIA Nemotron-H / Nemotron 3 Nano checkpoint (model_type nemotron_h, see below).

No vocabulary is written: tokenizer.ggml.model = "none" plus {arch}.vocab_size, which llama.cpp's
llama-vocab.cpp turns into that many dummy tokens (peer-bench feeds random token ids, so it never
tokenizes). Tensor names, metadata keys and the Llama Q/K row permutation
are those of llama.cpp's convert_hf_to_gguf.py (Qwen3 uses NEOX RoPE and is not permuted); 1-D
tensors (norms) are written F32, the matrices BF16, as that script does with --outtype bf16.
--outtype f32 writes every tensor F32 (file type ALL_F32), as that script's --outtype f32 does: for
tight checks against a float64 reference (check_gguf.py).

NemotronH (NemotronHForCausalLM, hybrid Mamba-2 / attention / MLP / MoE layers): the layer kinds
come from hybrid_override_pattern (M Mamba-2, * attention, - MLP, E MoE) or, in the spelling of
transformers >= 5, layers_block_type (linear_attention / mamba, full_attention / attention, mlp,
moe). With an MoE layer the llama.cpp architecture is nemotron_h_moe, else nemotron_h. What is
written follows convert_hf_to_gguf.py's NemotronHModel (on its GraniteHybridModel / Mamba2Model
bases): A_log -> A = -exp(A_log) as [n_head, 1], D as [n_head, 1], conv1d [C, 1, K] -> [C, K],
dt_bias -> ssm_dt.bias, the gated norm's weight as [n_groups, d_inner / n_groups], the routed experts
stacked into ffn_{up,down}_exps, e_score_correction_bias -> exp_probs_b.bias, the shared expert as
ffn_{up,down}_shexp, Q/K rows permuted as for Llama (it has no RoPE, so scores are unchanged);
per-layer feed_forward_length (the MLP or expert width on MLP/MoE layers, 0 elsewhere) and
head_count_kv (0 except on attention layers), which is how llama.cpp tells the layer kinds apart;
context_length 2^20 (no RoPE); ssm.* from mamba_num_heads, mamba_head_dim, n_groups,
ssm_state_size, conv_kernel; expert_* from n_routed_experts, num_experts_per_tok, n_group,
topk_group, moe_(shared_expert_)intermediate_size, n_shared_experts, norm_topk_prob,
routed_scaling_factor. Router weight, biases, A, D, conv1d and norms are F32 whatever --outtype.
Differences from that script, each where it would write a file llama.cpp cannot load or that
computes something else: MoE-ness is taken from the layer kinds (not from num_experts_per_tok being
in config.json, which transformers 5 writes for dense models too), `mlp` entries of
layers_block_type count as MLP layers, and expert keys are not written for a dense model. llama.cpp's
nemotron_h_moe has no dense-MLP layer kind (with experts, every FFN layer is MoE), so an MLP layer
of an MoE model (none in published checkpoints; the test fixtures have one) is written, with a
warning, as an exactly equivalent MoE layer: zero router, zero routed experts, the MLP as its shared
expert, every shared expert zero-padded to the widest (relu2(0) = 0, so the padding adds nothing).
With topk_group >= n_group > 1 (every group kept) the group counts are written as 1 (llama.cpp
asserts topk_group < n_group). An MTP head (mtp.* tensors) is left out, as with
convert_hf_to_gguf.py --no-mtp. What llama.cpp then computes differs from transformers' NemotronH
only in rounding, except that it does not clamp dt = softplus(dt + dt_bias) from below at
time_step_min as transformers 5 does (the published remote code's time_step_limit is (0, inf); the
fixtures keep dt above it), and it has no MTP.

Needs PyPI's `gguf` package (pinned in prepare.sh, which carries its wheel to scratch/gpu/wheels;
bench.sh puts it on PYTHONPATH), numpy and safetensors; torch when it is there (without it,
F32, F16 and BF16 tensors are read with numpy and rounded to BF16 the same way: round to nearest
even).

With --vocab, the folder's tokenizer.json (a byte-level BPE, GPT-2 style) is written as the
vocabulary instead (tokenizer.ggml.model = "gpt2": tokens, token types, merges, BOS/EOS), for
peers that detokenize what they generate (llama-cpp-python's server aborts on a vocabulary-less
model); prompts given as token ids are then still not tokenized by llama.cpp.

Check a conversion against the folder's HF reference logits (tests/fixtures/*/expected.safetensors)
with scripts/gpu/check_gguf.py MODEL_DIR OUT.gguf (llama.cpp through llama-cpp-python).

With --consume (nemotron_h), each .safetensors file of MODEL_DIR is deleted once everything taken
from it is written (see Consumer): for a model that fits the machine only once.

Usage: hf_to_gguf.py MODEL_DIR OUT.gguf [--vocab] [--outtype bf16|f32] [--consume]
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


def open_tensors(src):
    """(where: HF tensor name -> its .safetensors file, handles: file -> open reader)"""
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
    return where, handles


def parse_args(argv):
    """(src, dst, with_vocab, outtype, consume)"""
    pos, with_vocab, outtype, consume = [], False, "bf16", False
    it = iter(argv)
    for a in it:
        if a == "--vocab":
            with_vocab = True
        elif a == "--consume":
            consume = True
        elif a == "--outtype":
            outtype = next(it, "")
        elif a.startswith("--outtype="):
            outtype = a[len("--outtype="):]
        else:
            pos.append(a)
    if len(pos) != 2 or outtype not in ("bf16", "f32"):
        sys.exit("usage: hf_to_gguf.py MODEL_DIR OUT.gguf [--vocab] [--outtype bf16|f32] [--consume]")
    return pos[0], pos[1], with_vocab, outtype, consume


class Consumer:
    """--consume: delete each .safetensors file of the source folder as soon as every tensor
    the conversion takes from it is written, so a model and its GGUF never need the space of
    both (Nemotron 3 Nano's 63 GB on the GPU machine, where only RAM-backed /dev/shm holds it).
    The source folder is unusable afterwards."""

    def __init__(self, where, handles, used):
        self.where, self.handles = where, handles
        self.left = {}
        for name in used:
            self.left.setdefault(where[name], set()).add(name)
        self.freed = 0  # files nothing is taken from (a fixture's expected.safetensors) stay

    def _delete(self, fn):
        self.handles.pop(fn, None)  # the reader's mapping goes with it
        self.freed += os.path.getsize(fn)
        os.unlink(fn)

    def done(self, names):
        for name in names:
            fn = self.where[name]
            left = self.left.get(fn)
            if left is None:
                continue
            left.discard(name)
            if not left:
                del self.left[fn]
                self._delete(fn)


# NemotronH layer kinds: hybrid_override_pattern characters (remote-code configs, as published) and
# layers_block_type names (transformers >= 5 configs)
NH_KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe",
            "mamba": "mamba", "linear_attention": "mamba", "attention": "attention",
            "full_attention": "attention", "mlp": "mlp", "moe": "moe"}


def to_bf16(a):
    """float32 -> BF16 bits (uint16), round to nearest even (as torch's .to(torch.bfloat16))"""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def declare_tensor(w, name, shape, bf16):
    """Announce a tensor's name, shape and type (BF16 or F32) before the data is written."""
    n = int(np.prod(shape))
    if bf16:
        w.add_tensor_info(name, shape, np.dtype(np.uint16), n * 2, raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        w.add_tensor_info(name, shape, np.dtype(np.float32), n * 4)


def write_header(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()


def keeps_f32(name, n_dims):
    """convert_hf_to_gguf.py's prepare_tensors: tensors it writes F32 whatever --outtype"""
    return (n_dims <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or name.endswith((".ffn_gate_inp.weight", ".ssm_conv1d.weight")))


def convert_nemotron_h(src, dst, cfg, with_vocab, outtype, consume=False):
    """NemotronHForCausalLM -> llama.cpp nemotron_h / nemotron_h_moe (see the module docstring)."""
    def hp(*keys, default=KeyError):
        # convert_hf_to_gguf.py's GraniteHybridModel.find_hparam: the keys, then "mamba_" + each
        for k in list(keys) + ["mamba_" + k for k in keys]:
            if cfg.get(k) is not None:
                return cfg[k]
        if default is KeyError:
            sys.exit(f"nemotron_h: config.json has none of {keys}")
        return default

    pattern = cfg.get("hybrid_override_pattern") or cfg.get("layers_block_type")
    if not pattern:
        sys.exit("nemotron_h: config.json has neither hybrid_override_pattern nor layers_block_type")
    unknown = sorted({c for c in pattern if c not in NH_KINDS})
    if unknown:
        sys.exit(f"nemotron_h: unknown layer kinds {unknown}")
    kinds = [NH_KINDS[c] for c in pattern]
    n_layer = len(kinds)
    if cfg.get("num_hidden_layers", n_layer) != n_layer and isinstance(pattern, str):
        sys.exit(f"nemotron_h: hybrid_override_pattern has {n_layer} layers, num_hidden_layers "
                 f"{cfg['num_hidden_layers']}")
    is_moe = "moe" in kinds
    arch = "nemotron_h_moe" if is_moe else "nemotron_h"

    n_embd, n_vocab = cfg["hidden_size"], cfg["vocab_size"]
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg.get("attention_head_dim") or n_embd // n_head
    # Mamba-2 mixer (GraniteHybridModel: d_model = mamba_head_dim, d_inner = mamba_num_heads * it)
    ssm_heads = hp("n_heads", "num_heads")
    ssm_head_dim = hp("mamba_head_dim", "hidden_size", "d_model")
    d_inner = ssm_heads * ssm_head_dim
    n_group = hp("n_groups", "num_groups")
    d_state = hp("state_size", "d_state", "state_dim", "ssm_state_size")
    d_conv = hp("conv_kernel", "d_conv")
    ff = cfg.get("intermediate_size")
    if ("mlp" in kinds or is_moe) and cfg.get("mlp_hidden_act", "relu2") != "relu2":
        sys.exit(f"nemotron_h: mlp_hidden_act {cfg['mlp_hidden_act']!r} (llama.cpp has relu2 only)")
    if cfg.get("mamba_hidden_act", "silu") != "silu":
        sys.exit(f"nemotron_h: mamba_hidden_act {cfg['mamba_hidden_act']!r} (llama.cpp has silu only)")
    if d_inner % n_group:
        sys.exit(f"nemotron_h: d_inner {d_inner} is not a multiple of n_groups {n_group}")
    if is_moe:
        n_expert, n_expert_used = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
        ff_exp, ff_shexp = cfg["moe_intermediate_size"], cfg["moe_shared_expert_intermediate_size"]
        latent = cfg.get("moe_latent_size")
        moe_in = latent or n_embd

    where, handles = open_tensors(src)

    def shape_of(name):
        h = handles[where[name]]
        return list(h.shape(name) if torch is None else h.get_slice(name).get_shape())

    def load(name):  # float32 numpy
        t = handles[where[name]].get_tensor(name)
        return t if torch is None else t.to(torch.float32).numpy()

    used = set()
    # (gguf name, numpy-order shape, chunks(): float32 arrays concatenated along axis 0, HF sources)
    plan = []

    def add(name, shape, chunks, srcs=()):
        plan.append((name, [int(d) for d in shape], chunks, tuple(srcs)))

    def put(name, hname, fn=None, shape=None):
        """gguf `name` from HF tensor `hname`, through fn (a float32 array -> array) if given."""
        if hname not in where:
            sys.exit(f"nemotron_h: {hname} missing in {src}")
        used.add(hname)
        add(name, shape or shape_of(hname), lambda: [load(hname) if fn is None else fn(load(hname))], [hname])

    def put_opt(name, hname, fn=None):
        if hname in where:
            put(name, hname, fn)

    def zeros(name, shape):
        add(name, shape, lambda: [np.zeros(shape, np.float32)])

    def pad_to(a, axis, n):
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, n - a.shape[axis])
        return np.pad(a, widths)

    # llama.cpp's nemotron_h_moe has no dense-MLP layer: an MLP layer of an MoE model becomes an MoE
    # layer with a zero router and zero experts whose shared expert is the MLP, every shared expert
    # zero-padded to the widest of them (exact: relu2(0) = 0)
    mlp_as_moe = [i for i, k in enumerate(kinds) if k == "mlp"] if is_moe else []
    shexp_width = max([ff_shexp] + ([ff] if mlp_as_moe else [])) if is_moe else None
    if mlp_as_moe:
        print(f"warning: MLP layers {mlp_as_moe} of an MoE model written as equivalent MoE layers (zero router "
              f"and routed experts, the MLP as shared expert; shared experts zero-padded {ff_shexp} -> "
              f"{shexp_width}): llama.cpp's nemotron_h_moe has no dense-MLP layer", file=sys.stderr)

    def permute_rows(nh, nkv):
        return lambda t: permute(t, nh, nkv)

    put("token_embd.weight", "backbone.embeddings.weight")
    ff_arr, kv_arr = [], []
    for i, kind in enumerate(kinds):
        p, b = f"backbone.layers.{i}.", f"blk.{i}."
        m = p + "mixer."
        put(b + "attn_norm.weight", p + "norm.weight")
        ff_arr.append(ff if kind == "mlp" and not is_moe else ff_exp if kind in ("moe", "mlp") else 0)
        kv_arr.append(n_head_kv if kind == "attention" else 0)
        if kind == "mamba":
            if m + "in_proj.bias" in where or m + "out_proj.bias" in where:
                sys.exit("nemotron_h: mamba_proj_bias (in_proj / out_proj biases) is not in llama.cpp")
            d_in_proj = 2 * d_inner + 2 * n_group * d_state + ssm_heads
            if shape_of(m + "in_proj.weight") != [d_in_proj, n_embd]:
                sys.exit(f"nemotron_h: {m}in_proj.weight is {shape_of(m + 'in_proj.weight')}, "
                         f"expected {[d_in_proj, n_embd]}")
            n_conv = d_inner + 2 * n_group * d_state
            put(b + "ssm_in.weight", m + "in_proj.weight")
            put(b + "ssm_conv1d.weight", m + "conv1d.weight", lambda t: t.reshape(t.shape[0], t.shape[-1]),
                [n_conv, d_conv])
            put_opt(b + "ssm_conv1d.bias", m + "conv1d.bias")
            put(b + "ssm_dt.bias", m + "dt_bias")
            put(b + "ssm_a", m + "A_log", lambda t: (-np.exp(t)).reshape(-1, 1), [ssm_heads, 1])
            put(b + "ssm_d", m + "D", lambda t: t.reshape(-1, 1), [ssm_heads, 1])
            put(b + "ssm_norm.weight", m + "norm.weight", lambda t: t.reshape(n_group, -1),
                [n_group, d_inner // n_group])
            put(b + "ssm_out.weight", m + "out_proj.weight")
        elif kind == "attention":
            # convert_hf_to_gguf.py sends these through LlamaModel.modify_tensors (undo_permute): Q and K
            # rows are permuted per head; without RoPE the scores are the same either way
            put(b + "attn_q.weight", m + "q_proj.weight", permute_rows(n_head, n_head))
            put(b + "attn_k.weight", m + "k_proj.weight", permute_rows(n_head, n_head_kv))
            put(b + "attn_v.weight", m + "v_proj.weight")
            put(b + "attn_output.weight", m + "o_proj.weight")
            put_opt(b + "attn_q.bias", m + "q_proj.bias", permute_rows(n_head, n_head))
            put_opt(b + "attn_k.bias", m + "k_proj.bias", permute_rows(n_head, n_head_kv))
            put_opt(b + "attn_v.bias", m + "v_proj.bias")
            put_opt(b + "attn_output.bias", m + "o_proj.bias")
        elif kind == "mlp" and not is_moe:
            put(b + "ffn_up.weight", m + "up_proj.weight")
            put(b + "ffn_down.weight", m + "down_proj.weight")
            put_opt(b + "ffn_up.bias", m + "up_proj.bias")
            put_opt(b + "ffn_down.bias", m + "down_proj.bias")
        elif kind == "mlp":  # in an MoE model, see mlp_as_moe
            if m + "up_proj.bias" in where or m + "down_proj.bias" in where:
                sys.exit("nemotron_h: an MLP layer with biases in an MoE model cannot be written for llama.cpp")
            zeros(b + "ffn_gate_inp.weight", [n_expert, n_embd])
            zeros(b + "exp_probs_b.bias", [n_expert])
            if latent:
                zeros(b + "ffn_latent_down.weight", [latent, n_embd])
                zeros(b + "ffn_latent_up.weight", [n_embd, latent])
            zeros(b + "ffn_up_exps.weight", [n_expert, ff_exp, moe_in])
            zeros(b + "ffn_down_exps.weight", [n_expert, moe_in, ff_exp])
            put(b + "ffn_up_shexp.weight", m + "up_proj.weight", lambda t: pad_to(t, 0, shexp_width),
                [shexp_width, n_embd])
            put(b + "ffn_down_shexp.weight", m + "down_proj.weight", lambda t: pad_to(t, 1, shexp_width),
                [n_embd, shexp_width])
        else:  # moe
            put(b + "ffn_gate_inp.weight", m + "gate.weight")
            put(b + "exp_probs_b.bias", m + "gate.e_score_correction_bias")
            if latent:
                put(b + "ffn_latent_down.weight", m + "fc1_latent_proj.weight")
                put(b + "ffn_latent_up.weight", m + "fc2_latent_proj.weight")
            for proj, shape in (("up_proj", [n_expert, ff_exp, moe_in]), ("down_proj", [n_expert, moe_in, ff_exp])):
                fused = m + "experts." + proj  # transformers 5 keeps experts as one [E, out, in] tensor
                if fused in where:
                    put(b + f"ffn_{proj[:-5]}_exps.weight", fused, shape=shape)
                    continue
                names = [m + f"experts.{j}.{proj}.weight" for j in range(n_expert)]
                missing = [n for n in names if n not in where]
                if missing:
                    sys.exit(f"nemotron_h: {missing[0]} missing in {src}")
                used.update(names)
                add(b + f"ffn_{proj[:-5]}_exps.weight", shape,
                    lambda names=names: (load(n)[None] for n in names), names)
            put(b + "ffn_up_shexp.weight", m + "shared_experts.up_proj.weight",
                lambda t: pad_to(t, 0, shexp_width), [shexp_width, n_embd])
            put(b + "ffn_down_shexp.weight", m + "shared_experts.down_proj.weight",
                lambda t: pad_to(t, 1, shexp_width), [n_embd, shexp_width])
    put("output_norm.weight", "backbone.norm_f.weight")
    if not cfg.get("tie_word_embeddings", False) and "lm_head.weight" in where:
        put("output.weight", "lm_head.weight")
    mtp = sorted(k for k in where if k.startswith("mtp."))
    if mtp or cfg.get("num_nextn_predict_layers"):
        print(f"note: MTP head left out ({len(mtp)} mtp.* tensors), as convert_hf_to_gguf.py --no-mtp does",
              file=sys.stderr)
    # (the folder may hold other .safetensors files, e.g. the fixtures' expected.safetensors)
    unused = sorted(k for k in where if k not in used and k.startswith("backbone."))
    if unused:
        sys.exit(f"nemotron_h: tensors this script does not place: {unused[:5]}")

    # Metadata: the keys convert_hf_to_gguf.py's NemotronHModel writes, with its values (TextModel,
    # LlamaModel, GraniteModel and GraniteHybridModel set_gguf_parameters, then its own; GraniteModel
    # drops head_dim from what its bases see, so rope.dimension_count is hidden_size / heads)
    w = gguf.GGUFWriter(dst, arch)
    w.add_name(os.path.basename(os.path.normpath(src)))
    w.add_block_count(n_layer)
    w.add_context_length(2**20)  # GraniteHybridModel without RoPE
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(ff_arr)
    w.add_head_count(n_head)
    w.add_head_count_kv(kv_arr)
    rope_theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
    if rope_theta is not None:  # unused: no RoPE
        w.add_rope_freq_base(float(rope_theta))
    if (rms_eps := hp("rms_norm_eps", "norm_eps", default=None)) is not None:
        w.add_layer_norm_rms_eps(float(rms_eps))
    # llama.cpp reads layer_norm_epsilon (and uses it for the RMS norms when no rms eps is given)
    w.add_layer_norm_eps(float(hp("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", default=1e-5)))
    if is_moe:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        n_grp, topk_grp = cfg.get("n_group"), cfg.get("topk_group")
        if n_grp is not None and topk_grp is not None and topk_grp >= n_grp > 1:
            n_grp = topk_grp = 1  # every group kept: no group choice (llama.cpp asserts topk_group < n_group)
        if n_grp is not None:
            w.add_expert_group_count(n_grp)
        if topk_grp is not None:
            w.add_expert_group_used_count(topk_grp)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if outtype == "bf16" else gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_state_size(d_state)
    w.add_ssm_group_count(n_group)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_time_step_rank(ssm_heads)
    w.add_rope_scaling_finetuned(False)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if is_moe:
        w.add_expert_feed_forward_length(ff_exp)
        w.add_expert_shared_feed_forward_length(shexp_width)
        w.add_expert_shared_count(cfg.get("n_shared_experts", 1))
        w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", False)))
        w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
        if latent is not None:
            w.add_moe_latent_size(latent)
    if with_vocab:
        add_bpe_vocab(w, src, cfg)
    else:
        w.add_tokenizer_model("none")

    types = {}
    for name, shape, _, _ in plan:
        bf16 = outtype == "bf16" and not keeps_f32(name, len(shape))
        types[name] = bf16
        declare_tensor(w, name, shape, bf16)
    write_header(w)
    consumer = Consumer(where, handles, used) if consume else None
    for name, shape, chunks, srcs in plan:
        parts = [to_bf16(c) if types[name] else np.ascontiguousarray(c, dtype=np.float32) for c in chunks()]
        a = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if list(a.shape) != shape:
            sys.exit(f"nemotron_h: {name} came out {list(a.shape)}, expected {shape}")
        w.write_tensor_data(a)
        del parts, a
        if consumer:
            consumer.done(srcs)
    w.close()
    if consumer:
        print(f"--consume: deleted {consumer.freed / 2**30:.2f} GiB of safetensors from {src}")
    kinds_str = "".join({"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}[k] for k in kinds)
    print(f"wrote {dst} ({arch} {kinds_str}, {len(plan)} tensors, {os.path.getsize(dst) / 2**30:.2f} GiB)")


def main():
    src, dst, with_vocab, outtype, consume = parse_args(sys.argv[1:])
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if cfg["model_type"] == "nemotron_h":
        return convert_nemotron_h(src, dst, cfg, with_vocab, outtype, consume)
    if consume:
        sys.exit("--consume is implemented for nemotron_h only")
    arch = ARCHS.get(cfg["model_type"])
    if arch is None:
        sys.exit(f"model_type {cfg['model_type']!r} not supported (only {', '.join(ARCHS)}, nemotron_h)")
    n_layer, n_embd = cfg["num_hidden_layers"], cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or n_embd // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    if (rope.get("rope_type") or "default") != "default" or cfg.get("rope_scaling"):
        sys.exit("rope scaling is not handled here")

    # Where each HF tensor lives.
    where, handles = open_tensors(src)

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
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if outtype == "bf16" else gguf.LlamaFileType.ALL_F32)
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
        bf16 = len(shape) > 1 and outtype == "bf16"
        shapes[name] = (shape, bf16)
        declare_tensor(w, name, shape, bf16)
    write_header(w)
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
