"""Symmetry-breaking inits for CoLA (`method.init=pissa_split`): OUR extension, not the paper's.

Why. The paper's split PiSSA gives every A_i the same tensor and every B_j the same tensor
(PAPERS.md, CoLA, Init). What that does to each strategy (float64, issue #23 and
docs/PROTOCOL.md):
  * fully: the forward reads only (sum_j B_j)(sum_i A_i) and every copy gets the same gradient,
    so CoLA-fully(M, N) is one rank-r adapter trained with A's lr x M and B's lr x N, for ANY
    init. No init can break that; `pissa_split` refuses fully.
  * heuristic: dW = sum_k B~_k A_k over K = min(M, N) groups (a B group per A, or an A group per
    B). With identical copies the K groups start equal; under Adam they stay equal (up to eps),
    so the rank-K.r adapter never leaves rank r. Giving group k its own block of singular
    directions, k = 1..K among W's top K.r, makes the initial update W's top-K.r part (a
    rank-K.r PiSSA), every group different, the residual exact.
  * random: the pairing is redrawn every step, so the step-0 output must not depend on the draw:
    every B stays the same tensor b, and the A's get a seeded perturbation that sums to zero over
    the copies, so b (sum_i A_i) and the residual are those of split PiSSA exactly.

Factor layout as in cola_layer.py: A is (M, r, d_in), B is (d_out, N, r); P is the pairing
matrix (N, M) (pairing.py). `effective` gives the (A0, B0) with initial update B0 @ A0 that
AdapterLinear.set_initial records to form the residual from the factors actually used.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import init as inits


class SplitInitError(ValueError):
    """A strategy / shape the symmetry-breaking init cannot serve (one line)."""


def star_groups(P: torch.Tensor) -> Tuple[str, List[Tuple[int, List[int]]]]:
    """The heuristic pairing as groups: ("A", [(i, [B's of A_i])]) when every B pairs with exactly
    one A (M <= N), ("B", [(j, [A's of B_j])]) when every A pairs with exactly one B (M > N)."""
    n, m = P.shape
    nz = P != 0
    if m <= n and bool((nz.sum(1) == 1).all()):
        return "A", [(i, nz[:, i].nonzero().flatten().tolist()) for i in range(m)]
    if m > n and bool((nz.sum(0) == 1).all()):
        return "B", [(j, nz[j].nonzero().flatten().tolist()) for j in range(n)]
    raise SplitInitError("method.init=pissa_split needs a pairing where each B pairs with one A (or each A "
                         "with one B): the heuristic strategy; fully reads only sum(B) sum(A), so no init "
                         "breaks its copies' symmetry (docs/PROTOCOL.md)")


@torch.no_grad()
def split_directions(weight: torch.Tensor, r: int, scaling: float, P: torch.Tensor,
                     svd: inits.SVDChoice = inits.SVDChoice()) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for a heuristic pairing P: group k gets singular block k of W's top K.r
    (K = number of groups), its centre factor sqrt(S_k / s) V_k^T (or U_k sqrt(S_k / s)) and each
    member the other factor divided by the group's total pair weight, so that
        s * sum_{i, j} P[j, i] B_j A_i = sum_k U_k S_k V_k^T   (W's top-K.r part).
    float32, like inits.principal_factors."""
    n, m = P.shape
    centre, groups = star_groups(P)
    K = len(groups)
    d_out, d_in = weight.shape
    if K * r > min(d_out, d_in):
        raise SplitInitError(f"method.init=pissa_split needs {K} x r = {K * r} singular directions, but the "
                             f"layer is {d_out} x {d_in}; lower method.r or use method.init=pissa")
    U, S, Vh = inits.top_svd(weight, K * r, svd)
    A = torch.zeros(m, r, d_in, dtype=torch.float32, device=U.device)
    B = torch.zeros(d_out, n, r, dtype=torch.float32, device=U.device)
    for k, (c, members) in enumerate(groups):
        blk = slice(k * r, (k + 1) * r)
        root = torch.sqrt(S[blk] / scaling)
        a_k, b_k = root[:, None] * Vh[blk], U[:, blk] * root[None, :]
        if centre == "A":
            w = float(sum(P[j, c] for j in members))
            A[c] = a_k
            for j in members:
                B[:, j] = b_k / w
        else:
            w = float(sum(P[c, i] for i in members))
            B[:, c] = b_k
            for i in members:
                A[i] = a_k / w
    return A, B


@torch.no_grad()
def zero_sum_perturbation(A: torch.Tensor, relative: float, seed: int) -> torch.Tensor:
    """A (M, r, d) plus seeded noise that sums to zero over the M copies, of root-mean-square
    `relative` x rms(A): sum_i A_i is unchanged (to rounding), the copies differ."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(A.shape, generator=gen, dtype=torch.float64)
    noise = noise - noise.mean(0, keepdim=True)
    noise = noise / noise.pow(2).mean().sqrt().clamp_min(1e-30)
    scale = relative * float(A.double().pow(2).mean().sqrt())
    return (A.double() + scale * noise.to(A.device)).to(A.dtype)


def effective(A: torch.Tensor, B: torch.Tensor, P: torch.Tensor, scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) with B0 @ A0 == scaling * sum_{i, j} P[j, i] B_j A_i: A0 = [A_1; ..; A_M] and
    B0 = [B~_1 .. B~_M] * scaling, B~_i = sum_j P[j, i] B_j. For AdapterLinear.set_initial(A0, B0, 1.0)."""
    m, r, d_in = A.shape
    grouped = torch.einsum("onr,nm->omr", B, P.to(B.dtype))      # (d_out, M, r): B~_i
    return A.reshape(m * r, d_in), grouped.reshape(B.shape[0], m * r) * scaling
