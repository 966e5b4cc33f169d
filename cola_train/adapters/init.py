"""Initialisation, kept apart from the forward pass: zero-B (LoRA), PiSSA, and CoLA's split PiSSA.

A PiSSA-style init moves the principal part of W into the adapter. The residual base is computed
from the adapter's *actual* initial factors (after rounding to the model dtype) and its combiner's
total pair weight, so the adapted model reproduces the base model at step 0 for every combiner --
not just for the fully collaborative one, which is all the authors' code subtracts.

Finding the principal part (`method.svd`):
  * lowrank (the default): `torch.svd_lowrank`, a randomized SVD with `method.svd_niter` power
    iterations and a sketch of 2r columns (r extra: LLM weights have flat spectra, sigma_8/sigma_9
    ~ 1.01 on SmolLM2, and a sketch of only r columns converges slowly to the top-r subspace), in
    float32 on the weight's device. r = 8 needs only the top 8 triplets; an exact
    SVD of a Llama-3.1-8B MLP matrix computes all 4096 of them (~0.75 s each on an H200, 224 of
    them before the first step). Its random sketch is drawn from a generator seeded per layer
    (`layer_seed`), so re-building a run gives the same factors bit for bit.
    The residual is then formed in float32: it is rounded to the model dtype right after, and
    float32 vs float64 changes it by about one float32 rounding (docs/INIT.md measures it).
  * exact: `torch.linalg.svd` and a float64 residual, the behaviour before `method.svd` existed.
The paper's PiSSA baseline is LLaMA-Factory's `--pissa_init`, i.e. PEFT's
`init_lora_weights="pissa_niter_16"`: `svd_lowrank(W, q=r, niter=16)`; the PEFT methods here use
exactly that (peft_methods.py), our layers the 2r sketch (docs/INIT.md compares them).
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

SVD_MODES = ("lowrank", "exact")


@dataclass(frozen=True)
class SVDChoice:
    """How a PiSSA-style init finds W's top-r part: method.svd, method.svd_niter, and the seed of
    the randomized SVD's sketch for this layer. The class default is the exact SVD, so a layer
    built outside attach_adapter behaves as it always did."""
    mode: str = "exact"
    niter: int = 16
    seed: int = 0
    oversample: Optional[int] = None   # extra sketch columns; None: r (a sketch of 2r)

    @property
    def residual_dtype(self) -> torch.dtype:
        return torch.float64 if self.mode == "exact" else torch.float32


def layer_seed(seed: int, name: str) -> int:
    """A seed per (run seed, layer name): stable across processes (crc32, not Python's hash) and
    independent of the order in which layers are initialised."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block that draws from torch's global generators (torch.svd_lowrank has no generator
    argument; neither has PEFT's pissa_niter init) from `seed`, and leave the global streams as
    they were, so the rest of the run (dropout, data order) does not depend on the init's choice."""
    device = torch.device(device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


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
def top_svd(weight: torch.Tensor, r: int, svd: SVDChoice = SVDChoice()
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, Vh_r) of W in float32 on W's device: exact, or randomized (see the module doc)."""
    W = weight.detach().to(torch.float32)
    if svd.mode == "exact":
        # Jacobi SVD on CUDA: several times faster than the default for these small matrices
        U, S, Vh = torch.linalg.svd(W, full_matrices=False, driver="gesvdj" if W.is_cuda else None)
        return U[:, :r], S[:r], Vh[:r]
    if svd.mode != "lowrank":
        raise ValueError(f"svd mode {svd.mode!r} is not one of {', '.join(SVD_MODES)}")
    q = min(r + (r if svd.oversample is None else svd.oversample), *W.shape)
    with seeded(svd.seed, W.device):
        U, S, V = torch.svd_lowrank(W, q=q, niter=svd.niter)
    return U[:, :r], S[:r], V[:, :r].T


@torch.no_grad()
def principal_factors(weight: torch.Tensor, r: int, scaling: float, svd: SVDChoice = SVDChoice()
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's factors in float32: scaling * B_p @ A_p is W's top-r SVD part (PEFT's convention)."""
    U, S, Vh = top_svd(weight, r, svd)
    Sr = torch.sqrt(S / scaling)
    A_p = Sr[:, None] * Vh          # (r, d_in)
    B_p = U * Sr[None, :]           # (d_out, r)
    return A_p, B_p


def split(A_p: torch.Tensor, B_p: torch.Tensor, total_weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scaled copies a, b with total_weight * b @ a == B_p @ A_p: every A_i gets a and every B_j
    gets b, so whatever the combiner, the initial update is exactly the principal part."""
    c = total_weight ** -0.5
    return A_p * c, B_p * c


@torch.no_grad()
def residual(weight: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, coef: float,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W - coef * B0 @ A0 computed in `dtype` on W's device, cast back to W's dtype.

    Deterministic: a reload rebuilds it bit for bit from the saved A0/B0 (same dtype, same device
    type). float64 is the exact init's choice; the lowrank init uses float32 (see the module doc)."""
    delta = (B0.to(weight.device, dtype) @ A0.to(weight.device, dtype)) * coef
    return (weight.to(dtype) - delta).to(weight.dtype)
