"""The fused functions' dropout: a mask that is a pure function of (seed, element index).

Why: the fused functions (fused_ops) keep only a seed and draw the mask again in backward. A seeded
torch.Generator did that, but torch.compile cannot trace one: every adapted linear broke the graph
(docs/PERFORMANCE.md, run 7), and in eager mode it cost three passes over every adapted input (draw,
scale, multiply).

Here the mask is an integer hash of the element's flat index and the seed, computed by one op that
reads x once and writes the dropped copy: one Triton kernel on a GPU (seeded_dropout_triton), torch
ops elsewhere. torch.compile sees an opaque custom op and the seed as a tensor, so a compiled block
has no graph break and does not recompile per seed. The hash works in 31-bit integers held in int64:
no product overflows, and every backend computes the same bits (one seed, one mask, on CPU or GPU).
Seeds are drawn from torch's default generator of the activations' device (reproducible under
torch.manual_seed, saved in the Trainer's checkpoints, replayed by activation checkpointing); under
torch.compile, regional_compile makes inductor draw them from the same generator.
"""
from __future__ import annotations

import torch

from . import triton_support

_M31 = 2**31 - 1


def _mix(h: torch.Tensor, rounds: int = 2) -> torch.Tensor:
    """xorshift-multiply rounds (lowbias32's constants) modulo 2^31: h < 2^31 times a constant
    < 2^32 stays below 2^63. Two rounds leave the index's mask correlated at offsets such as 4096
    (15 sigma over 2^24 elements, one row of an 8B model apart); three do not (tests)."""
    for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, 0x5BD1E995))[:rounds]:
        h = ((h ^ (h >> shift)) * factor) & _M31
    return h ^ (h >> 15)


def new_seed(device: torch.device) -> torch.Tensor:
    """A 0-d int64 seed on the device: no host sync, and a tensor, so compiled code is not
    specialised to its value."""
    return torch.randint(0, _M31, (), device=device)


def as_seed(seed, like: torch.Tensor) -> torch.Tensor:
    """A seed given as an int or a tensor, as the 0-d int64 tensor on like's device the mask uses."""
    return torch.as_tensor(seed, dtype=torch.int64, device=like.device)


def _threshold(p: float) -> int:
    return int(round(p * 2**31))


def keep_mask(like: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Bool, like's shape: element i kept iff hash(i, seed) >= p * 2^31, so P(keep) = 1 - p."""
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int64).view(like.shape)
    h = _mix((index & _M31) ^ _mix(seed.to(torch.int64) & _M31), rounds=3)
    if like.numel() > _M31:  # past 2^31 elements, the high bits of the index too
        h = _mix(h ^ (index >> 31), rounds=3)
    return h >= _threshold(p)


def _drop(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return torch.where(keep_mask(x, p, seed), x * (1.0 / (1.0 - p)), 0.0)


def _dropped_now(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """On a GPU one Triton kernel (seeded_dropout_triton), checked bit for bit against _drop on the
    GPU; elsewhere _drop's torch ops."""
    if triton_support.available(x):
        from .seeded_dropout_triton import triton_dropped
        return triton_dropped(x, seed, _threshold(p), 1.0 / (1.0 - p))
    return _drop(x, seed, p)


@torch.library.custom_op("cola_train::seeded_dropout", mutates_args=())
def _dropped_op(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """What a compiled graph calls: an opaque op running _dropped_now, so compiled code runs the
    same kernel, and draws the same bits, as eager mode."""
    return _dropped_now(x, seed, p)


@_dropped_op.register_fake
def _(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def dropped(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """x * mask / (1 - p): inverted dropout, as nn.Dropout's, with the mask of (seed, p, x's shape).
    seed: a 0-d tensor (new_seed) or an int."""
    if p == 0.0:
        return x
    seed = as_seed(seed, x)
    if torch.compiler.is_compiling():
        return _dropped_op(x, seed, p)
    return _dropped_now(x, seed, p)   # the op's body without the dispatcher: eager calls it ~700 times a step


def dropout_mask(like: torch.Tensor, p: float, seed) -> torch.Tensor:
    """The scaled mask itself (0 or 1/(1 - p)) in like's dtype: what dropped() multiplies by."""
    return dropped(torch.ones_like(like), p, seed)
