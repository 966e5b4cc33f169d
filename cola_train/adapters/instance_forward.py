"""Sibling linears that read one input and can run as one fused call (gated_mlp's gate/up,
shared_qkv's q/k/v): whether they can (can_share) and the call (together)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn


def can_share(modules: Sequence) -> bool:
    """Modules that read one input and can run as one call: all of one class that has a
    shared_input_forward (LowRankLinear's) and all able to (static combiners)."""
    cls = type(modules[0])
    return (hasattr(cls, "shared_input_forward") and all(type(m) is cls for m in modules)
            and all(getattr(m, "can_share_input", False) for m in modules))


def together(modules: Sequence[nn.Module], x: torch.Tensor) -> Optional[List[torch.Tensor]]:
    """[m(x) for m in modules] from one shared_input_forward call, or None where they cannot share
    (can_share) or that call declines."""
    return type(modules[0]).shared_input_forward(modules, x) if can_share(modules) else None


def mask_repr(modules: Sequence[nn.Module]) -> str:
    """", dropout_mask=shared|per_layer" for siblings with dropout that could share their input
    (how their masks are drawn: Kernels.dropout_mask), else ""."""
    if not can_share(modules):
        return ""
    kernels = getattr(modules[0], "kernels", None)
    dropout = getattr(modules[0], "dropout", None)
    if kernels is None or not getattr(dropout, "p", 0.0):
        return ""
    return f", dropout_mask={kernels.dropout_mask}"
