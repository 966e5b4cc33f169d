#!/usr/bin/env python
"""How much of a Chain-of-LoRA link's update survives a merge into bf16 base weights.

    python scripts/bf16_merge_loss.py <run dir of a chain_of_lora run>/results.json

Real SmolLM2-135M weights (model=smollm2_135m), and for every adapted layer a random rank-8
update with the Frobenius norm that the run recorded for link 0 (results.json, chain.records).
Prints the share of the update that the bf16 merge keeps along its direction and the cosine
between the applied and the intended update (docs/RESULTS.md, Chain of LoRA).
"""
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cola_train.config import ModelConfig
from cola_train.models import load_model

CONF = Path(__file__).resolve().parent.parent / "conf" / "model" / "smollm2_135m.yaml"
model = load_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF)), torch.float32)
rec = json.load(open(sys.argv[1]))["chain"]["records"][0]["layer_norms"]
g = torch.Generator().manual_seed(0)
kept = total = 0.0
cosines = []
for name, norm in rec.items():
    W = model.get_submodule(name).weight.detach()
    dW = torch.randn(W.shape[0], 8, generator=g) @ torch.randn(8, W.shape[1], generator=g)
    dW *= norm / dW.norm()
    Wb = W.bfloat16()
    applied = (Wb + dW.bfloat16()).float() - Wb.float()   # what a merge into bf16 weights adds
    kept += float((applied * dW).sum())
    total += float((dW * dW).sum())
    cosines.append(float(torch.nn.functional.cosine_similarity(applied.flatten(), dW.flatten(), dim=0)))
cosines.sort()
print(f"layers {len(rec)}; share of the update kept along its direction <applied,dW>/|dW|^2 = {kept / total:.3f}; "
      f"cosine(applied, dW) median {cosines[len(cosines) // 2]:.3f}, min {cosines[0]:.3f}, max {cosines[-1]:.3f}")
