"""Our MoLE's experts from PEFT LoRA adapter directories (method.expert_paths); its layer is a
LowRankLinear with the combiners.ExpertGate combiner, whose docstring holds the maths.

MoLE (Wu et al., 2024): m LoRA experts (A_i, B_i) mixed by a per-layer softmax gate; its experts
are trained jointly or loaded from PEFT LoRA adapter directories (and optionally frozen).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
from torch import nn

from .spec import AdapterError


def _read_expert(path: str) -> tuple:
    config_file = os.path.join(path, "adapter_config.json")
    weights_file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(config_file) or not os.path.isfile(weights_file):
        raise AdapterError(f"mole expert {path!r} is not a PEFT LoRA adapter dir "
                           f"(needs adapter_config.json and adapter_model.safetensors)")
    with open(config_file) as fh:
        cfg = json.load(fh)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise AdapterError(f"mole expert {path!r} is not a plain LoRA adapter (peft_type/use_dora)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian",):
        raise AdapterError(f"mole expert {path!r} was initialised with {init!r}, which changes the base "
                           f"weights; convert it to a plain LoRA first (export_peft does)")
    from safetensors.torch import load_file

    return cfg, load_file(weights_file)


@torch.no_grad()
def load_experts(layers: Dict[str, nn.Module], paths: List[str]) -> None:
    """Copy expert i of every layer from the PEFT LoRA adapter at paths[i].

    An expert's own scaling (lora_alpha / r, or / sqrt(r) with rsLoRA) is folded into its B so
    that it contributes exactly what it did as a stand-alone LoRA under our shared scaling.
    """
    for i, path in enumerate(paths):
        cfg, tensors = _read_expert(path)
        r_e = int(cfg.get("r", 8))
        scale_e = cfg.get("lora_alpha", 8) / (r_e ** 0.5 if cfg.get("use_rslora") else r_e)
        for name, layer in layers.items():
            key = f"base_model.model.{name}"
            A, B = tensors.get(f"{key}.lora_A.weight"), tensors.get(f"{key}.lora_B.weight")
            if A is None or B is None:
                raise AdapterError(f"mole expert {path!r} has no LoRA weights for module {name!r}")
            if A.shape != (layer.r, layer.in_features) or B.shape != (layer.out_features, layer.r):
                raise AdapterError(
                    f"mole expert {path!r} module {name!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} "
                    f"do not fit r={layer.r}, in={layer.in_features}, out={layer.out_features}"
                )
            layer.lora_A.data[i].copy_(A.to(layer.lora_A.dtype))
            layer.lora_B.data[:, i].copy_((B.float() * (scale_e / layer.scaling)).to(layer.lora_B.dtype))
