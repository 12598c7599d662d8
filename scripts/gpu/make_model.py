#!/usr/bin/env python3
"""Make a random-weight HF model folder with a real model's shapes (no hub access needed): the
config is written here, the weights drawn by transformers' initialiser, saved in BF16.

Usage: make_model.py {qwen3-0.6b|llama-3-8b|nemotron-3-nano} OUT_DIR
"""
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


def main():
    name, out = sys.argv[1], sys.argv[2]
    if os.path.isfile(os.path.join(out, "config.json")):
        print(f"{out} exists")
        return
    cfg = transformers.AutoConfig.for_model(**SHAPES[name])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    print(f"made {name} in {out}")


if __name__ == "__main__":
    main()
