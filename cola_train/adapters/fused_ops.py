"""Hand-written backward passes for a frozen linear plus a low-rank update, y = x W^T + b + (x A^T) B^T.

Why: autograd would treat the base matmul and the update as two branches. It would write the
adapter's input gradient to its own activation-sized tensor and then sum it with the base's, and
it would keep extra activations alive. These functions cut that traffic and memory:

* `LowRankLinear`: dx = g W, then (g B) A is added into the same buffer in place (addmm_, beta=1).
  The base weight is frozen, so nothing but the adapter's input (and the small z = x A^T) is saved.
* `GatedLowRankMLP`: the whole gated MLP tail, down(silu(gate) * up), when down_proj carries the
  update. It saves gate and up, which the floor keeps too. silu(gate) * up is recomputed in
  backward, where the floor would have stored silu(gate) and the product. So an adapted MLP keeps
  less than a frozen one.

Both need: a plain frozen nn.Linear base (no ZeRO-3 partitioned weight) and one dtype for
activations, weights and factors (no casts). `can_fuse` checks this; otherwise callers use plain
autograd ops. A and B are the effective factors (scaling folded into B), so every CoLA combiner
goes through here; their own gradients flow on to the stored factors through autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def can_fuse(base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    w = getattr(base, "weight", None)
    if type(base) is not nn.Linear or w is None or w.requires_grad or hasattr(w, "ds_id"):
        return False
    if base.bias is not None and base.bias.requires_grad:
        return False
    if not (x.dtype == w.dtype == A.dtype == B.dtype) or x.device != w.device:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type) == x.dtype
    return True


class LowRankLinear(torch.autograd.Function):
    """x: (T, d_in) base input; xa: the adapter's input (dropout(x)) or None when it is x itself."""

    @staticmethod
    def forward(ctx, x, xa, weight, bias, A, B):
        inp = x if xa is None else xa
        out = F.linear(x, weight, bias)
        z = inp @ A.t()
        out.addmm_(z, B.t())
        ctx.shared = xa is None
        ctx.save_for_backward(inp, weight, A, B, z)
        return out

    @staticmethod
    def backward(ctx, g):
        inp, weight, A, B, z = ctx.saved_tensors
        gz = g @ B
        dB = g.t() @ z
        dA = gz.t() @ inp
        dx = dxa = None
        if ctx.needs_input_grad[0]:
            dx = g @ weight
            if ctx.shared:
                dx.addmm_(gz, A)
        if not ctx.shared and ctx.needs_input_grad[1]:
            dxa = gz @ A
        return dx, dxa, None, None, dA, dB


class GatedLowRankMLP(torch.autograd.Function):
    """out = down(silu(gate) * up) + ((silu(gate) * up) A^T) B^T; gate, up: (T, d_ff)."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, A, B):
        h = F.silu(gate).mul_(up)
        out = F.linear(h, weight, bias)
        z = h @ A.t()
        out.addmm_(z, B.t())
        ctx.save_for_backward(gate, up, weight, A, B, z)
        return out

    @staticmethod
    def backward(ctx, g):
        gate, up, weight, A, B, z = ctx.saved_tensors
        gz = g @ B
        dB = g.t() @ z
        act = F.silu(gate)
        dA = gz.t() @ (act * up)
        dh = g @ weight
        dh.addmm_(gz, A)
        dup = dh * act
        del act
        dgate = torch.ops.aten.silu_backward(dh.mul_(up), gate)
        return dgate, dup, None, None, dA, dB


def low_rank_linear(base: nn.Linear, x: torch.Tensor, xa: Optional[torch.Tensor],
                    A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return LowRankLinear.apply(x, xa, base.weight, base.bias, A, B)


def gated_low_rank_mlp(base: nn.Linear, gate: torch.Tensor, up: torch.Tensor,
                       A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return GatedLowRankMLP.apply(gate, up, base.weight, base.bias, A, B)
