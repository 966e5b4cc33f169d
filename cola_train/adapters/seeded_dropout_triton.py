"""seeded_dropout's mask and scaling as one Triton kernel, for eager mode on a GPU.

Why a kernel of its own: the same maths in torch ops is ~15 passes over the activations, and a
torch.compile'd function costs ~0.1 ms of host time per call. The hash is seeded_dropout's, op for op
(tests on the GPU compare the two bit for bit); imported only where Triton runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _round(h, shift: tl.constexpr, factor: tl.constexpr):
    return ((h ^ (h >> shift)) * factor) & 0x7FFFFFFF


@triton.jit
def _drop_kernel(x_ptr, out_ptr, seed_ptr, n, threshold, scale, BIG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    s = tl.load(seed_ptr).to(tl.int64) & 0x7FFFFFFF                  # _mix(seed, rounds=2)
    s = _round(_round(s, 16, 0x7FEB352D), 15, 0x846CA68B)
    s = s ^ (s >> 15)
    h = (offs & 0x7FFFFFFF) ^ s                                      # _mix(index ^ s, rounds=3)
    h = _round(_round(_round(h, 16, 0x7FEB352D), 15, 0x846CA68B), 16, 0x5BD1E995)
    h = h ^ (h >> 15)
    if BIG:                                                          # numel > 2^31 - 1
        h = _round(_round(_round(h ^ (offs >> 31), 16, 0x7FEB352D), 15, 0x846CA68B), 16, 0x5BD1E995)
        h = h ^ (h >> 15)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0)
    y = tl.where(h >= threshold, x.to(tl.float32) * scale, 0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=valid)


def triton_dropped(x: torch.Tensor, seed: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _drop_kernel[(triton.cdiv(n, _BLOCK),)](x, out, seed, n, threshold, scale, BIG=n > 2**31 - 1, BLOCK=_BLOCK)
    return out
