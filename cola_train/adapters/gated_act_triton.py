"""gated_act's two passes as one Triton kernel each, for eager mode on a GPU; imported only where
Triton runs (triton_support). Computed in float32, rounded once on store."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _forward_kernel(G, U, H, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(H + offs, (g * tl.sigmoid(g) * u).to(H.dtype.element_ty), mask=valid)


@triton.jit
def _backward_kernel(G, U, DH, H, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=valid, other=0.0).to(tl.float32)
    dh = tl.load(DH + offs, mask=valid, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    act = g * s
    tl.store(H + offs, (act * u).to(H.dtype.element_ty), mask=valid)
    tl.store(DU + offs, (dh * act).to(DU.dtype.element_ty), mask=valid)
    tl.store(DG + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=valid)


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    h = torch.empty_like(gate)
    if gate.numel():
        _forward_kernel[_grid(gate.numel())](gate, up, h, gate.numel(), BLOCK=_BLOCK)
    return h


def backward(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor):
    """(h, dgate, dup); dgate is written over dh, each element after it is read."""
    h, dup = torch.empty_like(gate), torch.empty_like(gate)
    if gate.numel():
        _backward_kernel[_grid(gate.numel())](gate, up, dh, h, dh, dup, gate.numel(), BLOCK=_BLOCK)
    return h, dh, dup
