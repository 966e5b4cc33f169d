"""Merged Chain-of-LoRA links kept as frozen low-rank factors beside a frozen base linear.

Why not W <- W + B A: in bf16 a link's update is mostly below a weight's rounding step (2^-8 of
the weight) and the merge drops it (on SmolLM2 at lr 5e-5 only 7 % of an update survived,
docs/RESULTS.md). Kept as factors, the merged links add (x A_c^T) B_c^T to the base output: the
effective weight W + B_c A_c, in any weight dtype, for one frozen rank-(links x r) path.

Where they live: on our LowRankLinear itself (`linear` below is then the LowRankLinear, which
says `adds_committed`): its forward adds the path as a frozen term, inside the fused kernels
(fused_ops `frozen=`), so a later Chain-of-LoRA link keeps the fused path, the q/k/v grouping
and the gated-MLP memory saving. On a PEFT layer's base nn.Linear, a forward hook adds it, so
PEFT's own forward and DeepSpeed's gathered forward see the merged weight. The factors are non-persistent float32 buffers:
the model's state dict (and so every checkpoint format) is unchanged; `fold` writes them into
the weight when a plain model is wanted.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import gathered  # the weight whole under ZeRO-3; no-op otherwise

A_KEY, B_KEY = "committed_A", "committed_B"


def factors(linear: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(A_c, B_c) with the merged update == B_c @ A_c, or None when nothing is committed."""
    A, B = linear._buffers.get(A_KEY), linear._buffers.get(B_KEY)
    return None if A is None else (A, B)


def add_to(output: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """output + (x A_c^T) B_c^T, in the dtype the base linear computed in."""
    if torch.is_autocast_enabled(x.device.type):
        return output + F.linear(F.linear(x, A), B).to(output.dtype)   # autocast picks the dtype
    dtype = output.dtype
    return output + F.linear(F.linear(x.to(dtype), A.to(dtype)), B.to(dtype))


def _add_committed(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """The forward hook on a PEFT layer's base linear."""
    return add_to(output, args[0], module._buffers[A_KEY], module._buffers[B_KEY])


def _hook_keys(linear: nn.Module):
    return [k for k, hook in linear._forward_hooks.items() if hook is _add_committed]


@torch.no_grad()
def append(linear: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
    """Commit the update B @ A for good: it joins the frozen path (float32, the weight's device)."""
    device = linear.weight.device
    A = A.detach().to(device, torch.float32)
    B = B.detach().to(device, torch.float32)
    if A.shape[1] != linear.in_features or B.shape[0] != linear.out_features or A.shape[0] != B.shape[1]:
        raise ValueError(f"committed factors A {tuple(A.shape)} / B {tuple(B.shape)} do not fit a linear "
                         f"{linear.in_features} -> {linear.out_features}")
    old = factors(linear)
    if old is not None:
        A = torch.cat([old[0].to(device, torch.float32), A], 0)
        B = torch.cat([old[1].to(device, torch.float32), B], 1)
    linear.register_buffer(A_KEY, A.contiguous(), persistent=False)
    linear.register_buffer(B_KEY, B.contiguous(), persistent=False)
    if not getattr(linear, "adds_committed", False) and not _hook_keys(linear):
        linear.register_forward_hook(_add_committed)


def remove(linear: nn.Module) -> None:
    for key in _hook_keys(linear):
        del linear._forward_hooks[key]
    linear._buffers.pop(A_KEY, None)
    linear._buffers.pop(B_KEY, None)


@torch.no_grad()
def fold(linear: nn.Module) -> None:
    """W <- W + B_c @ A_c (one rounding to the weight's dtype), then a plain linear again."""
    found = factors(linear)
    if found is None:
        return
    A, B = found
    weight = linear.weight
    with gathered(weight, modify=True):
        delta = B.to(weight.device, torch.float64) @ A.to(weight.device, torch.float64)
        weight.data.copy_((weight.data.double() + delta).to(weight.dtype))
    remove(linear)


def fold_all(model: nn.Module) -> int:
    """Fold every committed path of the model into its weight; returns how many there were."""
    linears = [m for m in model.modules() if factors(m) is not None]
    for linear in linears:
        fold(linear)
    return len(linears)
