"""cola_train/adapters/split_init.py, the symmetry-breaking init (our extension): checked against
the SVD of W computed here in float64 and a per-pair loop written from the pairing formula."""
from __future__ import annotations

import itertools

import pytest
import torch

from cola_train.adapters import pairing
from cola_train.adapters.init import SVDChoice
from cola_train.adapters.split_init import SplitInitError, effective, split_directions, zero_sum_perturbation

F64 = torch.float64
S_ = 2.0   # alpha / r
R = 2


def weight(seed=0, d_out=20, d_in=24):
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))


def update(A, B, P, s):
    """s * sum over pairs of P[j, i] B_j A_i, pair by pair, in float64."""
    n, m = P.shape
    return sum(float(P[j, i]) * s * (B[:, j].double() @ A[i].double()) for i in range(m) for j in range(n)
               if P[j, i] != 0)


def top_part(W, k):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


HEURISTIC = [(m, n, rule) for m, n in itertools.product(range(1, 5), range(1, 5)) for rule in ("paper", "code")]


@pytest.mark.parametrize("m,n,rule", HEURISTIC, ids=[f"{m}x{n}-{rule}" for m, n, rule in HEURISTIC])
def test_heuristic_starts_at_the_top_K_r_part_with_distinct_groups(m, n, rule):
    W = weight(m * 10 + n)
    P = pairing.heuristic(m, n, rule)
    A, B = split_directions(W, R, S_, P, SVDChoice("exact"))
    K = min(m, n)
    dW = update(A, B, P, S_)
    assert torch.allclose(dW, top_part(W, K * R), atol=1e-4), float((dW - top_part(W, K * R)).abs().max())
    # the residual from the factors used leaves the output exact (what set_initial does)
    A0, B0 = effective(A, B, P, S_)
    assert torch.allclose(B0.double() @ A0.double(), dW, atol=1e-5)
    # every group different: the group centres (A's when m <= n, B's otherwise) pairwise apart
    centres = [A[i] for i in range(m)] if m <= n else [B[:, j] for j in range(n)]
    for x, y in itertools.combinations(centres, 2):
        assert (x - y).abs().max() > 1e-3


def test_fully_cannot_be_split():
    with pytest.raises(SplitInitError, match="fully reads only sum\\(B\\) sum\\(A\\)"):
        split_directions(weight(), R, S_, pairing.fully(2, 3))


def test_too_many_directions_for_the_layer():
    with pytest.raises(SplitInitError, match="needs 4 x r = 16 singular directions, but the layer is 20 x 12"):
        split_directions(weight(d_in=12), 4, S_, pairing.heuristic(4, 4))


def test_zero_sum_perturbation_keeps_the_sum_and_breaks_the_copies():
    a = torch.randn(R, 24, generator=torch.Generator().manual_seed(1))
    A = a.expand(3, R, 24).clone()
    P1 = zero_sum_perturbation(A, 0.1, seed=7)
    assert torch.allclose(P1.sum(0), A.sum(0), atol=1e-6)
    assert (P1[0] - P1[1]).abs().max() > 1e-3
    rms = lambda t: float(t.double().pow(2).mean().sqrt())
    assert rms(P1 - A) == pytest.approx(0.1 * rms(A), rel=1e-5)
    assert torch.equal(P1, zero_sum_perturbation(A, 0.1, seed=7))
    assert not torch.equal(P1, zero_sum_perturbation(A, 0.1, seed=8))
    # random strategy: B's identical, so the step-0 update b sum_i A_i does not depend on the draw
    b = torch.randn(20, R, generator=torch.Generator().manual_seed(2))
    B = b[:, None, :].expand(20, 2, R).clone()
    gen = torch.Generator().manual_seed(0)
    updates = [update(P1, B, pairing.draw(3, 2, gen), S_) for _ in range(4)]
    for u in updates[1:]:
        assert torch.allclose(u, updates[0], atol=1e-10)


def train_rank(A, B, P, W_res, steps=20, lr=0.02):
    """Adam on the per-pair forward (float64), then the numerical rank pattern of dW."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, W_res.shape[1], generator=g, dtype=F64)
    Y = torch.randn(30, W_res.shape[0], generator=g, dtype=F64)
    As = [A[i].double().clone().requires_grad_() for i in range(A.shape[0])]
    Bs = [B[:, j].double().clone().requires_grad_() for j in range(B.shape[1])]
    opt = torch.optim.Adam(As + Bs, lr=lr)
    pairs = [(i, j) for i in range(len(As)) for j in range(len(Bs)) if P[j, i] != 0]
    for _ in range(steps):
        opt.zero_grad()
        out = X @ W_res.T + sum(S_ * (X @ As[i].T) @ Bs[j].T for i, j in pairs)
        ((out - Y) ** 2).mean().backward()
        opt.step()
    dW = sum(S_ * Bs[j].detach() @ As[i].detach() for i, j in pairs)
    sv = torch.linalg.svdvals(dW)
    return sv / sv[0]


def test_split_init_lets_heuristic_use_its_rank():
    """The degeneracy this init exists for: heuristic (2, 3) from identical copies stays rank r
    under Adam; from split directions it uses rank 2r."""
    W = weight(5).double()
    P = pairing.heuristic(2, 3, "paper")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = torch.sqrt(S[:R] / S_)
    a, b = root[:, None] * Vh[:R] / 3 ** 0.5, U[:, :R] * root / 3 ** 0.5     # split PiSSA: 3 pairs
    A_same, B_same = a.expand(2, R, 24).clone(), b[:, None, :].expand(20, 3, R).clone()
    same = train_rank(A_same, B_same, P, W - update(A_same, B_same, P, S_))
    A, B = split_directions(W.float(), R, S_, P, SVDChoice("exact"))
    split = train_rank(A, B, P, W - update(A, B, P, S_))
    assert float(same[R]) < 1e-5          # rank r (up to Adam's eps)
    assert float(split[2 * R - 1]) > 1e-2  # rank 2r
