"""silu(gate) * up, and its backward, for the fused MLP (fused_ops.GatedLowRankMLP).

Why: that MLP keeps gate and up instead of the product and recomputes it in backward. In torch ops
the backward is five kernels and 14 passes over d_ff-wide tensors (silu, product, two gradient
products, silu's backward); on a GPU in eager mode it is one Triton kernel that reads gate, up and
dh and writes h, dgate and dup (6 passes), and the forward one kernel instead of two. The kernel
computes in float32 and rounds once; the torch ops (CPU, float64, torch.compile, which fuses them
itself) round silu(gate) first, a difference of one rounding of the activations' dtype.
`use_kernels = False` forces the torch ops (the benchmark's before/after).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_support

use_kernels = True


def _kernel_here(*tensors: torch.Tensor) -> bool:
    return (use_kernels and triton_support.available(tensors[0])
            and all(t.is_contiguous() and t.dtype == tensors[0].dtype for t in tensors))


def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up, a new tensor."""
    if _kernel_here(gate, up):
        from . import gated_act_triton
        return gated_act_triton.forward(gate, up)
    return F.silu(gate).mul_(up)


def backward(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor):
    """(h, dgate, dup) for dh = dL/dh: the product again (for the adapter's dA) and both input
    gradients. dh's memory is reused: its values are lost."""
    if _kernel_here(gate, up, dh):
        from . import gated_act_triton
        return gated_act_triton.backward(gate, up, dh)
    act = F.silu(gate)
    h = act * up
    dup = dh * act
    del act
    return h, torch.ops.aten.silu_backward(dh.mul_(up), gate), dup
