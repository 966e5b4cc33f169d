"""The adapters' low-rank path in float32 while the base model runs in bf16/fp16 autocast.

Why: autocast casts the fp32 master factors to half precision in every forward and rounds
z = x A^T to it. An AdamW step at the paper's lr (5e-5, less during warm-up) is far below half a
bf16 rounding step of PiSSA's large principal factors, so the forward sees it only where an entry
happens to cross a rounding boundary, as a whole rounding step: right on average, but as a fixed
error in the factors many times the step. On SmolLM2-135M one PiSSA pair reached eval loss 0.831
after 10 steps with this path in fp32, 2.131 without, and 0.840 with the whole model in fp32
(docs/RESULTS.md).

The base weights and activations stay in half precision. CoLA's layers keep their fused functions
(fused_ops takes fp32 factors beside half activations; the input's fp32 copy lives only inside each
call). HydraLoRA, MoLE and PEFT's layers take plain autograd ops and keep an fp32 copy of each
adapted input for backward. Its speed is not measured yet, so it is opt-in:
`trainer.fp32_adapter_path=true`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lowrank import LowRankLinear
from .spec import AdapterError

MARK = "_cola_fp32_adapter_path"


class FP32Linear(nn.Linear):
    """PEFT's lora_A / lora_B with autocast off; swapped in by class, so parameters, state dict and
    PEFT's own code are unchanged (PEFT casts the sum back to the base output's dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def _peft_factor_modules(module: nn.Module):
    for attr in ("lora_A", "lora_B"):
        for sub in getattr(module, attr, {}).values():
            if isinstance(sub, nn.Linear):
                yield sub


def enable(model: nn.Module) -> int:
    """Put every adapter of `model` on the fp32 path; returns the number of adapted layers.
    Their trainable factors must already be fp32 (models.upcast_trainable)."""
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            params = [p for p in module.parameters(recurse=True) if p.requires_grad]
            module.kernels = module.kernels.replace(fp32_path=True)
        elif hasattr(module, "lora_A") and isinstance(getattr(module, "lora_A"), nn.ModuleDict):
            subs = list(_peft_factor_modules(module))
            params = [p for s in subs for p in s.parameters()]
            for sub in subs:
                sub.__class__ = FP32Linear
        else:
            continue
        half = [p.dtype for p in params if p.dtype != torch.float32]
        if half:
            raise AdapterError(f"trainer.fp32_adapter_path needs fp32 adapter weights, but layer {name!r} "
                               f"has {half[0]}; set trainer.master_weights=true (without DeepSpeed)")
        n += 1
    setattr(model, MARK, True)
    return n


def enabled(model: nn.Module) -> bool:
    return bool(getattr(model, MARK, False))
