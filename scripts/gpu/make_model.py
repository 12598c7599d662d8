#!/usr/bin/env python3
"""Make a random-weight HF model folder with a real model's shapes (no hub access needed): the
config is written here, the weights drawn by transformers' initialiser, saved in BF16.

Usage: make_model.py {qwen3-0.6b|llama-3-8b|nemotron-3-nano|gpt-oss-20b|gpt-oss-20b-mxfp4} OUT_DIR

gpt-oss-20b-mxfp4 stores the experts as the Hub does (`*_blocks` / `*_scales` U8, quantized here from
the random BF16 ones: per block of 32, the smallest power-of-two scale that fits 6, each value
rounded to the nearest E2M1 code, element 2j in the low nibble of byte j) with the Hub's
`quantization_config`; everything else BF16. MAKE_MODEL_LAYERS=N overrides the layer count (a
quick local check of the writer).
"""
import json
import os
import sys

import torch
import transformers

SHAPES = {
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       bos_token_id=151643, eos_token_id=151645),
    "llama-3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=128000, eos_token_id=128001),
}


def nemotron_pattern():
    """52 layers as the issue describes Nemotron 3 Nano: 23 Mamba-2 (M), 23 MoE (E), 6 attention
    (*); M/E pairs with an attention layer after every fourth pair."""
    out = []
    for i in range(23):
        out += ["M", "E"]
        if i % 4 == 2 and out.count("*") < 6:
            out.append("*")
    while out.count("*") < 6:
        out.append("*")
    assert len(out) == 52, len(out)
    return "".join(out)


# Nemotron 3 Nano (30B-A3B) shapes as given in the issue: hidden 2688, Mamba 64 heads x 64 with
# state 128 in 8 groups, 32 q / 2 kv heads x 128, 128 experts top-6 plus a shared expert,
# vocabulary 131072. Expert widths follow the published config (1856, shared 3712).
SHAPES["nemotron-3-nano"] = dict(
    model_type="nemotron_h", architectures=["NemotronHForCausalLM"], hidden_size=2688, vocab_size=131072,
    hybrid_override_pattern=nemotron_pattern(), num_attention_heads=32, num_key_value_heads=2, head_dim=128,
    intermediate_size=1856, mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4,
    chunk_size=128, n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
    moe_shared_expert_intermediate_size=3712, routed_scaling_factor=2.5, norm_topk_prob=True, n_group=1, topk_group=1,
    mlp_hidden_act="relu2", max_position_embeddings=262144, tie_word_embeddings=False, layer_norm_epsilon=1e-5,
    bos_token_id=1, eos_token_id=2)


# gpt-oss-20b as published (config.json of openai/gpt-oss-20b; see docs/design/gpt-oss.md §1.2).
SHAPES["gpt-oss-20b"] = dict(
    model_type="gpt_oss", architectures=["GptOssForCausalLM"], hidden_size=2880, intermediate_size=2880,
    num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
    num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
    layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
    max_position_embeddings=131072, rms_norm_eps=1e-5, attention_bias=True, swiglu_limit=7.0,
    rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                         original_max_position_embeddings=4096, rope_theta=150000.0),
    tie_word_embeddings=False, eos_token_id=200002, pad_token_id=199999)
SHAPES["gpt-oss-20b-mxfp4"] = SHAPES["gpt-oss-20b"]

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def to_mxfp4(w):
    """[..., rows, cols] (x·W experts transposed to [E, out, in] first) -> (blocks U8 [..., rows,
    cols/32, 16], scales U8 [..., rows, cols/32]) in the Hub's layout."""
    x = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = x.abs().amax(-1).clamp(min=2.0 ** -126)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    q = x / torch.pow(2.0, e)[..., None]
    lut = torch.tensor(E2M1, device=w.device)
    code = (q.abs()[..., None] - lut).abs().argmin(-1).to(torch.uint8) | ((q < 0).to(torch.uint8) << 3)
    code = code.reshape(*code.shape[:-1], 16, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return blocks.contiguous(), (e + 127).to(torch.uint8).contiguous()


def save_mxfp4(model, out):
    """Save with the experts in the Hub's MXFP4 form."""
    from safetensors.torch import save_file
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            # x·W [E, in, out] -> [E, out, in], one expert at a time (bounded scratch memory).
            parts = [to_mxfp4(v[e].transpose(0, 1)) for e in range(v.shape[0])]
            sd[k + "_blocks"] = torch.stack([b for b, _ in parts]).cpu()
            sd[k + "_scales"] = torch.stack([s for _, s in parts]).cpu()
        else:
            sd[k] = v.detach().cpu().contiguous()
    model.config.quantization_config = dict(
        quant_method="mxfp4", modules_to_not_convert=["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                      "model.embed_tokens", "lm_head"])
    model.config.save_pretrained(out)
    shards, cur, size, n = [], {}, 0, 0
    for k in sorted(sd):
        cur[k] = sd[k]
        size += sd[k].numel() * sd[k].element_size()
        if size > 4 << 30:
            shards.append(cur)
            cur, size = {}, 0
    shards.append(cur)
    index = {"metadata": {}, "weight_map": {}}
    for i, sh in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, os.path.join(out, fn), metadata={"format": "pt"})
        index["weight_map"].update({k: fn for k in sh})
        n += sum(t.numel() * t.element_size() for t in sh.values())
    index["metadata"]["total_size"] = n
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def main():
    name, out = sys.argv[1], sys.argv[2]
    if os.path.isfile(os.path.join(out, "config.json")):
        print(f"{out} exists")
        return
    shape = dict(SHAPES[name])
    if os.environ.get("MAKE_MODEL_LAYERS"):
        n = int(os.environ["MAKE_MODEL_LAYERS"])
        shape["num_hidden_layers"] = n
        if "layer_types" in shape:
            shape["layer_types"] = shape["layer_types"][:n]
    cfg = transformers.AutoConfig.for_model(**shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if name.endswith("-mxfp4"):
        os.makedirs(out, exist_ok=True)
        save_mxfp4(model, out)
    else:
        model.save_pretrained(out, max_shard_size="5GB")
    print(f"made {name} in {out}")


if __name__ == "__main__":
    main()
