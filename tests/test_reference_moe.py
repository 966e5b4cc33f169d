"""The float64 oracles of tests/reference_moe.py checked on their own, before any production layer
is compared with them: hand-computed small cases and identities that follow from the papers'
equations (not from the oracle's code)."""
from __future__ import annotations

import math

import pytest
import torch

import reference_moe as ref

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


# -- MoLE ------------------------------------------------------------------------------------------
def mlp_block(d=4, hidden=6, n_experts=3, r=2, seed=0):
    """A residual MLP block h + W2 tanh(W1 h) with one LoRA per expert on both linears."""
    W1, W2 = rand(hidden, d, seed=seed), rand(d, hidden, seed=seed + 1)
    experts = [(rand(r, d, seed=10 + i), rand(hidden, r, seed=20 + i), rand(r, hidden, seed=30 + i),
                rand(d, r, seed=40 + i)) for i in range(n_experts)]

    def block(h, expert):
        w1, w2 = W1, W2
        if expert is not None:
            A1, B1, A2, B2 = experts[expert]
            w1, w2 = W1 + 0.5 * B1 @ A1, W2 + 0.5 * B2 @ A2
        return h + torch.tanh(h @ w1.T) @ w2.T

    return block, experts


def test_mole_one_expert_is_that_lora():
    """N = 1: G = 1, and O = F + (F_1 - F) is the block with that LoRA, whatever the gate."""
    block, _ = mlp_block()
    h = rand(2, 5, 4, seed=3)
    out, G = ref.mole_block(block, h, 1, rand(4, 1, seed=4), torch.tensor(0.3, dtype=F64))
    assert torch.allclose(G, torch.ones(2, 1, dtype=F64))
    assert torch.allclose(out, block(h, 0), atol=1e-12)


def test_mole_zero_gate_is_the_average_of_the_experts():
    """e = 0: epsilon = 0, G uniform, O = F + (1/N) sum_i (F_i - F)."""
    block, _ = mlp_block()
    h = rand(2, 5, 4, seed=3)
    N = 3
    e = torch.zeros(N * 4, N, dtype=F64)
    out, G = ref.mole_block(block, h, N, e, torch.tensor(1.0, dtype=F64))
    assert torch.allclose(G, torch.full((2, N), 1 / N, dtype=F64))      # zero gate: uniform
    uniform = block(h, None) + sum((block(h, i) - block(h, None)) / N for i in range(N))
    assert torch.allclose(out, uniform, atol=1e-12)


def test_mole_hand_computed_gate():
    """N = 2 experts, d = 1, one token: the concatenated outputs (a, b) normalise to (+1, -1) (or
    (-1, +1)) whatever a != b, so epsilon = +-(e[0] - e[1]) and G follows by hand."""
    outs = {None: torch.tensor([[[0.0]]], dtype=F64), 0: torch.tensor([[[3.0]]], dtype=F64),
            1: torch.tensor([[[1.0]]], dtype=F64)}
    block = lambda h, i: outs[i]
    e = torch.tensor([[2.0, 0.5], [-1.0, 1.0]], dtype=F64)              # rows: concatenated feature
    tau = torch.tensor(2.0, dtype=F64)
    out, G = ref.mole_block(block, None, 2, e, tau, ln_eps=0.0)
    normed = torch.tensor([1.0, -1.0], dtype=F64)                        # (3, 1) -> mean 2, std 1
    eps = normed @ e                                                     # (3.0, -0.5)
    want = torch.softmax(eps / 2.0, -1)
    assert torch.allclose(G[0], want, atol=1e-15)
    assert torch.allclose(out[0, 0, 0], want[0] * 3.0 + want[1] * 1.0, atol=1e-15)


def test_mole_padding_does_not_move_the_gate():
    block, _ = mlp_block()
    h = rand(1, 4, 4, seed=5)
    e, tau = rand(12, 3, seed=6), torch.tensor(0.7, dtype=F64)
    _, G_short = ref.mole_block(block, h[:, :3], 3, e, tau)
    padded = torch.cat([h[:, :3], rand(1, 1, 4, seed=99)], 1)
    _, G_pad = ref.mole_block(block, padded, 3, e, tau, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    assert torch.allclose(G_short, G_pad, atol=1e-14)


def test_mole_balance_loss_by_hand():
    g1 = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=F64)     # block 1, two sequences
    g2 = torch.tensor([[0.2, 0.2, 0.6], [0.4, 0.4, 0.2]], dtype=F64)     # block 2
    q = torch.tensor([(0.3 + 0.3) / 2, (0.2 + 0.3) / 2, (0.5 + 0.4) / 2], dtype=F64)
    assert float(ref.mole_balance_loss([g1, g2])) == pytest.approx(-math.log(float(q.prod())), abs=1e-14)
    uniform = torch.full((2, 3), 1 / 3, dtype=F64)
    assert float(ref.mole_balance_loss([uniform])) == pytest.approx(3 * math.log(3), abs=1e-14)
    assert ref.MOLE_BALANCE_WEIGHT == 0.5


def test_mole_gradients_reach_gate_and_temperature_only_through_autograd():
    block, _ = mlp_block()
    h = rand(2, 3, 4, seed=7)
    e = rand(12, 3, seed=8).requires_grad_()
    tau = torch.tensor(1.3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e_, t_: ref.mole_block(block, h, 3, e_, t_)[0], (e, tau))


# -- MOELoRA ---------------------------------------------------------------------------------------
def moelora_case(N=4, r=8, d_in=5, d_out=3, n_tasks=3, d_T=6, seed=0):
    As = [rand(r // N, d_in, seed=seed + i) for i in range(N)]
    Bs = [rand(d_out, r // N, seed=seed + 10 + i) for i in range(N)]
    return (rand(d_out, d_in, seed=seed + 20), rand(d_out, seed=seed + 21), As, Bs,
            rand(n_tasks, d_T, seed=seed + 22), rand(N, d_T, seed=seed + 23))


def test_moelora_equals_its_per_task_merged_weight():
    W, b, As, Bs, E, Wg = moelora_case()
    x = rand(3, 4, 5, seed=30)
    tasks = torch.tensor([2, 0, 1])
    y = ref.moelora_linear(x, W, b, As, Bs, 16.0, 8, tasks, E, Wg)
    for k, t in enumerate(tasks.tolist()):
        Wt = ref.moelora_merged_weight(W, As, Bs, 16.0, 8, t, E, Wg)
        assert torch.allclose(y[k], x[k] @ Wt.T + b, atol=1e-12)


def test_moelora_gate_by_hand_and_rank_split():
    """Two experts, an embedding that makes omega = softmax((1, 3)) for task 0; the update is
    (alpha/r)(omega_1 B_1 A_1 + omega_2 B_2 A_2) with each A_i of rank r/2."""
    A1, A2 = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[0.0, 2.0]], dtype=F64)
    B1, B2 = torch.tensor([[1.0]], dtype=F64), torch.tensor([[3.0]], dtype=F64)
    E = torch.tensor([[1.0]], dtype=F64)
    Wg = torch.tensor([[1.0], [3.0]], dtype=F64)
    x = torch.tensor([[[1.0, 1.0]]], dtype=F64)
    y = ref.moelora_linear(x, torch.zeros(1, 2, dtype=F64), None, [A1, A2], [B1, B2], 4.0, 2, torch.tensor([0]), E, Wg)
    w = torch.softmax(torch.tensor([1.0, 3.0], dtype=F64), 0)
    assert float(y) == pytest.approx(float(2.0 * (w[0] * 1.0 + w[1] * 6.0)), abs=1e-14)
    with pytest.raises(AssertionError, match="splits the rank"):
        ref.moelora_linear(x, torch.zeros(1, 2, dtype=F64), None, [A1, A2], [B1, B2], 4.0, 4, torch.tensor([0]), E, Wg)


# -- MoLA ------------------------------------------------------------------------------------------
def test_mola_expert_counts_per_group():
    assert ref.mola_expert_counts(32, [2, 4, 6, 8]) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8   # the paper's 2468
    assert ref.mola_expert_counts(30, [8, 2]) == [8] * 15 + [2] * 15
    assert ref.mola_expert_counts(2, [2, 4, 6, 8]) == [2, 6]
    assert ref.mola_expert_counts(5, [2, 4]) == [2, 2, 2, 4, 4]


def mola_case(E=4, r=2, d_in=5, d_out=3, seed=0):
    As = [rand(r, d_in, seed=seed + i) for i in range(E)]
    Bs = [rand(d_out, r, seed=seed + 10 + i) for i in range(E)]
    return rand(d_out, d_in, seed=seed + 20), rand(d_out, seed=seed + 21), As, Bs, rand(E, d_in, seed=seed + 22)


def test_mola_top_k_of_all_experts_is_the_dense_mixture():
    W, b, As, Bs, R = mola_case()
    x = rand(2, 3, 5, seed=40)
    p = torch.softmax(x @ R.T, -1)
    dense = x @ W.T + b + sum(p[..., i, None] * ref.lora_delta(x, As[i], Bs[i], 2.0) for i in range(4))
    assert torch.allclose(ref.mola_linear(x, W, b, As, Bs, 2.0, R, top_k=4), dense, atol=1e-12)


def test_mola_top2_by_hand():
    """Three experts with probabilities (0.5, 0.3, 0.2) at one token: experts 1 and 2 (1-based)
    with weights 0.5/0.8 and 0.3/0.8; expert 3 contributes nothing."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=F64))
    x = torch.tensor([[[1.0]]], dtype=F64)
    R = logits[:, None]                                     # x = 1: router logits = R
    As = [torch.tensor([[1.0]], dtype=F64)] * 3
    Bs = [torch.tensor([[1.0]], dtype=F64), torch.tensor([[10.0]], dtype=F64), torch.tensor([[100.0]], dtype=F64)]
    y = ref.mola_linear(x, torch.zeros(1, 1, dtype=F64), None, As, Bs, 1.0, R, top_k=2)
    assert float(y) == pytest.approx(0.5 / 0.8 * 1.0 + 0.3 / 0.8 * 10.0, abs=1e-13)


def test_mola_balance_loss_by_hand():
    """Uniform probabilities, top-2 over 4 experts chosen evenly: f = P = 1/4, L = 4 * 4/16 = 1."""
    logits = torch.zeros(2, 4, dtype=F64)
    # ties: topk of equal values picks some two; make the choice explicit with tiny offsets
    logits[0, :2] += 1e-9
    logits[1, 2:] += 1e-9
    assert float(ref.mola_balance_loss([logits])) == pytest.approx(1.0, abs=1e-8)
    skewed = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]], dtype=F64))

    # top-2 of (0.7, 0.1, 0.1, 0.1) is expert 0 and one of the others: f = (1/2, 1/2 on that one)
    loss = float(ref.mola_balance_loss([skewed]))
    assert loss == pytest.approx(4 * (0.5 * 0.7 + 0.5 * 0.1), abs=1e-12)
    assert ref.MOLA_BALANCE_WEIGHT == 0.001
