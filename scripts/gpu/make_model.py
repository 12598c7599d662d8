#!/usr/bin/env python3
"""Make a random-weight HF model folder with a real model's shapes (no hub access needed): the
config is written here, the weights drawn by transformers' initialiser, saved in BF16.

Usage: make_model.py {qwen3-0.6b|llama-3-8b} OUT_DIR
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
