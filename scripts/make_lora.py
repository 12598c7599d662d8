#!/usr/bin/env python3
"""Write a random LoRA adapter in PEFT's layout for a HF model folder, for benchmarks at real
shapes (no peft or torch needed: numpy + safetensors). Every projection named in --targets that
the checkpoint holds as one matrix gets lora_A [r, in] and lora_B [out, r] (F32, random,
non-zero), under PEFT's key names `base_model.model.<module>.lora_{A,B}.weight`.

Usage: make_lora.py MODEL_DIR OUT_DIR [--r 16] [--alpha 32] [--seed 0]
                    [--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]
"""
import argparse
import json
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    a = ap.parse_args()
    targets = a.targets.split(",")
    files = [f for f in sorted(os.listdir(a.model)) if f.endswith(".safetensors")]
    rng = np.random.default_rng(a.seed)
    tensors = {}
    for f in files:
        with safe_open(os.path.join(a.model, f), "np") as st:
            for name in st.keys():
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if module is None or module.split(".")[-1] not in targets:
                    continue
                out, inp = st.get_slice(name).get_shape()
                key = f"base_model.model.{module}"
                tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((a.r, inp)) / inp ** 0.5).astype(np.float32)
                tensors[f"{key}.lora_B.weight"] = (0.1 * rng.standard_normal((out, a.r)) / a.r ** 0.5).astype(np.float32)
    if not tensors:
        raise SystemExit(f"no matrix of {a.model} is named like {targets}")
    os.makedirs(a.out, exist_ok=True)
    save_file(tensors, os.path.join(a.out, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": a.r, "lora_alpha": a.alpha, "target_modules": targets, "bias": "none",
           "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
           "base_model_name_or_path": a.model, "task_type": "CAUSAL_LM"}
    with open(os.path.join(a.out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    n = sum(t.size for t in tensors.values())
    print(f"{a.out}: {len(tensors) // 2} modules, r {a.r}, {n / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
