"""Initialisation, kept apart from the forward pass: zero-B (LoRA), PiSSA, and CoLA's split PiSSA.

A PiSSA-style init moves the principal part of W into the adapter. The residual base is computed
from the adapter's *actual* initial factors (after rounding to the model dtype) and its combiner's
total pair weight, in float64, so the adapted model reproduces the base model at step 0 for every
combiner -- not just for the fully collaborative one, which is all the authors' code subtracts.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn


@torch.no_grad()
def kaiming_(A: torch.Tensor) -> torch.Tensor:
    """PEFT's LoRA-A init, applied per factor: A is (r, d_in) or a stack (k, r, d_in).

    Drawn in float32 and cast, so the random stream does not depend on the model dtype.
    """
    stack = A if A.dim() == 3 else A.unsqueeze(0)
    for factor in stack:
        tmp = torch.empty(factor.shape, dtype=torch.float32, device=factor.device)
        nn.init.kaiming_uniform_(tmp, a=math.sqrt(5))
        factor.copy_(tmp)
    return A


@torch.no_grad()
def principal_factors(weight: torch.Tensor, r: int, scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's factors in float32: scaling * B_p @ A_p is W's top-r SVD part (PEFT's convention)."""
    W = weight.detach().to(torch.float32)
    # Jacobi SVD on CUDA: several times faster than the default for these small matrices, which
    # matters when every job of a study re-inits 200+ layers on a shared GPU
    U, S, Vh = torch.linalg.svd(W, full_matrices=False, driver="gesvdj" if W.is_cuda else None)
    Sr = torch.sqrt(S[:r] / scaling)
    A_p = Sr[:, None] * Vh[:r]          # (r, d_in)
    B_p = U[:, :r] * Sr[None, :]        # (d_out, r)
    return A_p, B_p


def split(A_p: torch.Tensor, B_p: torch.Tensor, total_weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scaled copies a, b with total_weight * b @ a == B_p @ A_p: every A_i gets a and every B_j
    gets b, so whatever the combiner, the initial update is exactly the principal part."""
    c = total_weight ** -0.5
    return A_p * c, B_p * c


@torch.no_grad()
def residual(weight: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, coef: float) -> torch.Tensor:
    """W - coef * B0 @ A0 in float64, cast back to W's dtype (deterministic: a reload rebuilds it bit for bit)."""
    delta = (B0.to(torch.float64) @ A0.to(torch.float64)) * coef
    return (weight.to(torch.float64) - delta.to(weight.device)).to(weight.dtype)
