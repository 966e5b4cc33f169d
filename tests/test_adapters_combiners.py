"""Layer-level numerics of the adapter combiners against oracles written here, in float64, from
the formulas (never from the implementation):

    CoLA:      y = W x + b + s * sum_{(i, j, w) in pairs} w * B_j (A_i x)
    HydraLoRA: y = W x + b + s * sum_j g_j(x) B_j A x,     g = softmax(R x)
    MoLE:      y = W x + b + s * sum_i g_i(x) B_i A_i x,   g = softmax(G x)
"""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn

from cola_train.adapters import aux_loss, resample
from cola_train.adapters.lowrank import cola_layer, hydralora_layer, mole_layer
from cola_train.adapters import pairing
from cola_train.adapters.combiners import balance_loss

F64 = torch.float64
COUNTS = list(itertools.product(range(1, 5), range(1, 5)))


# -- independent references ---------------------------------------------------------------------
def paper_pairs(m: int, n: int):
    """The CoLA paper's heuristic formula, read term by term, as (A index, B index) pairs:
    m <= n: B_1A_1 + ... + B_{m-1}A_{m-1} + (B_m + ... + B_n)A_m;
    m > n (roles swapped): B_1A_1 + ... + B_{n-1}A_{n-1} + B_n(A_n + ... + A_m)."""
    terms = []
    if m <= n:
        for t in range(1, m):                 # B_t A_t, 1-based as the paper writes it
            terms.append((t, t))
        for j in range(m, n + 1):             # (B_m + ... + B_n) A_m
            terms.append((m, j))
    else:
        for t in range(1, n):
            terms.append((t, t))
        for i in range(n, m + 1):             # B_n (A_n + ... + A_m)
            terms.append((i, n))
    return sorted((i - 1, j - 1) for i, j in terms)


def code_pairs(m: int, n: int):
    """The authors' code's rule, written out as (A index, B index) pairs: each A takes n // m
    consecutive B's, the leftover B's go round-robin from A_1 (roles swapped when m > n)."""
    if n >= m:
        k = n // m
        owner = [j // k for j in range(m * k)] + [t % m for t in range(n - m * k)]
        return sorted((owner[j], j) for j in range(n))
    k = m // n
    owner = [i // k for i in range(n * k)] + [t % n for t in range(m - n * k)]
    return sorted((i, owner[i]) for i in range(m))


HEURISTIC_PAIRS = {"paper": paper_pairs, "code": code_pairs}
# (strategy, method.pairing): the pairing only changes the heuristic strategy
STRATEGIES = [("fully", "paper"), ("random", "paper"), ("heuristic", "paper"), ("heuristic", "code")]


def pairs_for(strategy, m, n, training, layer, rule="paper"):
    if strategy == "fully":
        return [(i, j, 1.0) for i in range(m) for j in range(n)]
    if strategy == "heuristic":
        return [(i, j, 1.0) for i, j in HEURISTIC_PAIRS[rule](m, n)]
    if not training:  # expectation over draws: each A with the mean of the B's
        return [(i, j, 1.0 / n) for i in range(m) for j in range(n)]
    P = layer.pairing.detach().cpu()
    return [(i, int(P[:, i].argmax()), 1.0) for i in range(m)]


def cola_oracle(x, W, b, As, Bs, pairs, s):
    y = x @ W.T + b
    for i, j, w in pairs:
        y = y + s * w * ((x @ As[i].T) @ Bs[j].T)
    return y


def shapes(seed):
    rng = random.Random(seed)
    return rng.randint(3, 12), rng.randint(3, 12), rng.randint(1, 4)


def make_cola(strategy, m, n, impl="fused", seed=0, dropout=0.0, rule="paper"):
    d_in, d_out, r = shapes(seed * 100 + m * 10 + n)
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, dtype=F64)
    layer = cola_layer(base, r, alpha=3.0, dropout=dropout, num_A=m, num_B=n, strategy=strategy, impl=impl,
                       pairing_rule=rule)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()  # zero B's would hide every B-side mistake
    return layer


def run_and_grads(layer, x, g):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def oracle_and_grads(layer, x, g, pairs):
    x = x.clone().requires_grad_(True)
    As = [layer.lora_A[i].detach().clone().requires_grad_(True) for i in range(layer.num_A)]
    Bs = [layer.lora_B[:, j].detach().clone().requires_grad_(True) for j in range(layer.num_B)]
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    y = cola_oracle(x, W, b, As, Bs, pairs, layer.alpha / layer.r)
    (y * g).sum().backward()
    zero = torch.zeros_like
    return (y.detach(), x.grad, torch.stack([a.grad if a.grad is not None else zero(a) for a in As]),
            torch.stack([b.grad if b.grad is not None else zero(b) for b in Bs], dim=1))


# -- CoLA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", COUNTS)
@pytest.mark.parametrize("strategy,rule", STRATEGIES)
def test_cola_fused_and_loop_match_oracle_with_grads(strategy, rule, m, n):
    fused = make_cola(strategy, m, n, "fused", rule=rule)
    loop = make_cola(strategy, m, n, "loop", rule=rule)
    if strategy == "random":  # a non-trivial draw, shared by both
        resample(fused, step=3, seed=7)
        resample(loop, step=3, seed=7)
        assert torch.equal(fused.pairing, loop.pairing)
    x = torch.randn(2, 5, fused.in_features, dtype=F64)
    g = torch.randn(2, 5, fused.out_features, dtype=F64)
    for training in (True, False):
        fused.train(training), loop.train(training)
        ref = oracle_and_grads(fused, x, g, pairs_for(strategy, m, n, training, fused, rule))
        for layer in (fused, loop):
            got = run_and_grads(layer, x, g)
            for name, a, b in zip(("y", "dx", "dA", "dB"), got, ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{layer.impl} {name}")


@pytest.mark.parametrize("m,n", [(2, 3), (3, 2)])
@pytest.mark.parametrize("strategy,rule", STRATEGIES[1:])
def test_cola_fused_matches_oracle_after_a_rank_change(strategy, rule, m, n):
    """Chain of LoRA's next link at a new rank: the grouping matrix (pairing.mixing_matrix) follows."""
    layer = make_cola(strategy, m, n, "fused", rule=rule)
    layer.reinit(rank=layer.r + 2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, layer.in_features, dtype=F64)
    g = torch.randn(2, 5, layer.out_features, dtype=F64)
    ref = oracle_and_grads(layer, x, g, pairs_for(strategy, m, n, True, layer, rule))
    for name, a, b in zip(("y", "dx", "dA", "dB"), run_and_grads(layer, x, g), ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("m,n", [(1, 1), (2, 3), (3, 2), (4, 4)])
def test_cola_merge_factors_equal_eval_update(m, n):
    for strategy, rule in STRATEGIES:
        layer = make_cola(strategy, m, n, rule=rule).eval()
        x = torch.randn(7, layer.in_features, dtype=F64)
        A, B = layer.factors()
        torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ A.T @ B.T)
        if strategy == "fully":
            assert A.shape[0] == layer.r  # fully collaborative collapses to rank r


@pytest.mark.parametrize("impl", ["fused", "loop"])
def test_heuristic_paper_pairing_is_the_papers_formula(impl):
    """The paper's example written out as matrices, not pairs: (2, 3) gives
    s [B1 A1 + (B2 + B3) A2] x and the reversed (3, 2) gives s [B1 A1 + B2 (A2 + A3)] x;
    the code pairing differs from it (B3 goes with A1 there)."""
    for m, n in ((2, 3), (3, 2)):
        layer = make_cola("heuristic", m, n, impl).eval()
        A = [layer.lora_A[i].detach() for i in range(m)]
        B = [layer.lora_B[:, j].detach() for j in range(n)]
        dW = B[0] @ A[0] + ((B[1] + B[2]) @ A[1] if (m, n) == (2, 3) else B[1] @ (A[1] + A[2]))
        x = torch.randn(4, layer.in_features, dtype=F64)
        with torch.no_grad():
            got = layer(x) - layer.base_layer(x)
            code = make_cola("heuristic", m, n, impl, rule="code").eval()
            other = code(x) - code.base_layer(x)
        torch.testing.assert_close(got, layer.scaling * x @ dW.T, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(other, got)


@pytest.mark.parametrize("m,n,expected", [
    (1, 3, [(0, 0), (0, 1), (0, 2)]),
    (2, 3, [(0, 0), (0, 2), (1, 1)]),
    (2, 5, [(0, 0), (0, 1), (0, 4), (1, 2), (1, 3)]),
    (3, 3, [(0, 0), (1, 1), (2, 2)]),
    (3, 2, [(0, 0), (1, 1), (2, 0)]),
    (5, 2, [(0, 0), (1, 0), (2, 1), (3, 1), (4, 0)]),
    (4, 1, [(0, 0), (1, 0), (2, 0), (3, 0)]),
])
def test_heuristic_code_table_hand_checked(m, n, expected):
    """method.pairing=code: the authors' released code (each A takes n // m consecutive B's,
    leftovers round-robin from A_1)."""
    P = pairing.heuristic(m, n, "code")
    assert P.shape == (n, m)
    assert sorted((i, j) for j, i in zip(*torch.nonzero(P, as_tuple=True))) == expected
    assert code_pairs(m, n) == expected


@pytest.mark.parametrize("m,n,expected", [
    (1, 3, [(0, 0), (0, 1), (0, 2)]),
    (2, 3, [(0, 0), (1, 1), (1, 2)]),                    # A1:{B1}, A2:{B2, B3}: the paper's example
    (2, 5, [(0, 0), (1, 1), (1, 2), (1, 3), (1, 4)]),
    (3, 3, [(0, 0), (1, 1), (2, 2)]),
    (3, 2, [(0, 0), (1, 1), (2, 1)]),                    # B2 takes A2 and A3
    (5, 2, [(0, 0), (1, 1), (2, 1), (3, 1), (4, 1)]),
    (4, 1, [(0, 0), (1, 0), (2, 0), (3, 0)]),
])
def test_heuristic_paper_table_hand_checked(m, n, expected):
    """method.pairing=paper (the default): the paper's formula."""
    P = pairing.heuristic(m, n, "paper")
    assert torch.equal(P, pairing.heuristic(m, n))
    assert sorted((i, j) for j, i in zip(*torch.nonzero(P, as_tuple=True))) == expected
    assert paper_pairs(m, n) == expected


@pytest.mark.parametrize("rule", ["paper", "code"])
@pytest.mark.parametrize("m,n", COUNTS)
def test_heuristic_has_max_m_n_pairs_and_covers_every_factor(rule, m, n):
    """Both definitions use every A and every B once on the larger side (the split-PiSSA init
    divides by the pair count, pairing.total_weight)."""
    P = pairing.heuristic(m, n, rule)
    assert P.sum() == pairing.total_weight("heuristic", m, n) == max(m, n)
    assert bool((P.sum(0) > 0).all()) and bool((P.sum(1) > 0).all())


def test_heuristic_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="method.pairing='papr' is not one of paper, code"):
        pairing.heuristic(2, 3, "papr")


def test_random_draws_differ_across_steps_and_are_reproducible():
    layer = make_cola("random", 3, 4)
    draws = []
    for step in range(12):
        resample(layer, step, seed=1)
        P = layer.pairing.clone()
        assert torch.equal(P.sum(0), torch.ones(3, dtype=F64))  # every A gets exactly one B
        draws.append(P)
    assert len({tuple(P.flatten().tolist()) for P in draws}) > 1
    resample(layer, 5, seed=1)
    assert torch.equal(layer.pairing, draws[5])
    other_seed = []
    for step in range(12):
        resample(layer, step, seed=2)
        other_seed.append(layer.pairing.clone())
    assert any(not torch.equal(a, b) for a, b in zip(draws, other_seed))
    resample(layer, 5, seed=1)
    assert torch.equal(layer.pairing, draws[5])
    # and the draw is spread over the B's
    counts = torch.zeros(4)
    for step in range(300):
        resample(layer, step, seed=0)
        counts += layer.pairing.sum(1).float()
    assert counts.min() > 0.7 * counts.mean(), counts


def test_random_training_output_changes_with_step_and_eval_is_mean_of_B():
    layer = make_cola("random", 2, 3)
    x = torch.randn(4, layer.in_features, dtype=F64)
    outs = set()
    for step in range(10):
        resample(layer, step, seed=0)
        outs.add(tuple(layer(x).detach().flatten().tolist()))
    assert len(outs) > 1
    layer.eval()
    y1 = layer(x)
    resample(layer, 99, seed=0)
    y2 = layer(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # deterministic: the draw does not matter
    s = layer.alpha / layer.r
    B_mean = layer.lora_B.mean(dim=1)
    A_sum = layer.lora_A.sum(dim=0)
    torch.testing.assert_close(y1, layer.base_layer(x) + s * (x @ A_sum.T) @ B_mean.T)


def test_dropout_one_mask_same_in_fused_and_loop():
    fused = make_cola("fully", 2, 3, "fused", dropout=0.5)
    loop = make_cola("fully", 2, 3, "loop", dropout=0.5)
    x = torch.randn(6, fused.in_features, dtype=F64)
    torch.manual_seed(11)
    y_f = fused(x)
    torch.manual_seed(11)
    y_l = loop(x)
    torch.testing.assert_close(y_f, y_l)
    assert not torch.allclose(y_f, fused.eval()(x))


def test_single_pair_equals_peft_lora():
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(9, 7, dtype=F64)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    tiny = Tiny()
    ours = cola_layer(nn.Linear(9, 7, dtype=F64), r=3, alpha=5.0, dropout=0.0, num_A=1, num_B=1,
                      strategy="fully")
    ours.base_layer.load_state_dict(tiny.lin.state_dict())
    peft_model = get_peft_model(tiny, LoraConfig(r=3, lora_alpha=5.0, target_modules=["lin"]))
    lora = peft_model.base_model.model.lin
    with torch.no_grad():
        ours.lora_B.normal_()
        lora.lora_A["default"].weight.copy_(ours.lora_A[0])
        lora.lora_B["default"].weight.copy_(ours.lora_B[:, 0])
    x = torch.randn(4, 9, dtype=F64)
    g = torch.randn(4, 7, dtype=F64)
    (ours(x) * g).sum().backward()
    (peft_model(x) * g).sum().backward()
    torch.testing.assert_close(ours(x), peft_model(x))
    torch.testing.assert_close(ours.lora_A.grad[0], lora.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.grad[:, 0], lora.lora_B["default"].weight.grad)


# -- HydraLoRA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4])
def test_hydralora_router_and_output_match_oracle(n):
    d_in, d_out, r = shapes(n)
    torch.manual_seed(n)
    layers = [hydralora_layer(nn.Linear(d_in, d_out, dtype=F64), r, 4.0, 0.0, n, impl) for impl in ("fused", "loop")]
    layers[1].load_state_dict(layers[0].state_dict())
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.copy_(torch.randn_like(layer.lora_B, generator=torch.Generator().manual_seed(1)))
    layer = layers[0]
    x = torch.randn(2, 5, d_in, dtype=F64)
    g = torch.randn(2, 5, d_out, dtype=F64)
    gate = layer.route(x)
    torch.testing.assert_close(gate.sum(-1), torch.ones(2, 5, dtype=F64))
    assert layer.router.weight.requires_grad

    xr = x.clone().requires_grad_(True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    Bs = [layer.lora_B[:, j].detach().clone().requires_grad_(True) for j in range(n)]
    R = layer.router.weight.detach().clone().requires_grad_(True)
    probs = torch.softmax(xr @ R.T, dim=-1)
    y_ref = xr @ layer.base_layer.weight.T + layer.base_layer.bias
    for j in range(n):
        y_ref = y_ref + (layer.alpha / r) * probs[..., j:j + 1] * ((xr @ A.T) @ Bs[j].T)
    (y_ref * g).sum().backward()
    for lay in layers:
        xx = x.clone().requires_grad_(True)
        y = lay(xx)
        (y * g).sum().backward()
        torch.testing.assert_close(y, y_ref.detach())
        torch.testing.assert_close(xx.grad, xr.grad)
        torch.testing.assert_close(lay.lora_A.grad, A.grad)
        torch.testing.assert_close(lay.lora_B.grad, torch.stack([b.grad for b in Bs], 1))
        torch.testing.assert_close(lay.router.weight.grad, R.grad)


# -- MoLE -----------------------------------------------------------------------------------------
def test_balance_loss_values():
    assert balance_loss(torch.full((10, 3), 1 / 3)).abs() < 1e-6
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # q = (0.75, 0.25)
    torch.testing.assert_close(balance_loss(probs), torch.tensor(-math.log(1.5) - math.log(0.5)))
    assert balance_loss(torch.softmax(torch.randn(20, 4), -1)) > 0


def test_aux_loss_is_the_sum_of_each_layers_balance_loss_times_its_coefficient():
    """aux_loss takes the loss of all layers' mean gate distributions at once, grouped by coefficient
    and expert count: the value and the gates' gradients of a per-layer float64 loop."""
    torch.manual_seed(0)
    specs = [(2, 0.5), (3, 0.5), (3, 0.1), (2, 0.5), (4, 0.0)]   # (experts, balance_coef)
    layers = [mole_layer(nn.Linear(6, 5, dtype=F64), 2, 2.0, 0.0, m, coef) for m, coef in specs]
    x = torch.randn(3, 4, 6, dtype=F64)
    with torch.no_grad():
        for layer in layers:
            layer.gate.weight.normal_()
    for layer in layers:
        layer(x)
    got = aux_loss(nn.Sequential(*layers))
    got.backward()
    got_grads = [layer.gate.weight.grad.clone() for layer in layers]
    ref = 0.0
    gates = [layer.gate.weight.detach().clone().requires_grad_() for layer in layers]
    for (m, coef), G in zip(specs, gates):
        q = torch.softmax(x @ G.T, -1).reshape(-1, m).mean(0)
        ref = ref + coef * -torch.log(m * q).sum()
    ref.backward()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-9)
    for g, G in zip(got_grads, gates):
        torch.testing.assert_close(g, G.grad, rtol=1e-6, atol=1e-9)
    assert got_grads[0].abs().sum() > 0 and got_grads[-1].abs().sum() == 0


@pytest.mark.parametrize("m", [2, 3, 4])
def test_mole_output_and_balance_loss(m):
    d_in, d_out, r = shapes(10 + m)
    torch.manual_seed(m)
    layers = [mole_layer(nn.Linear(d_in, d_out, dtype=F64), r, 2.0, 0.0, m, 0.5, impl) for impl in ("fused", "loop")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 4, d_in, dtype=F64)
    # zero-initialised gate: uniform, balance loss zero
    layers[0](x)
    assert layers[0].combiner.balance_loss().abs() < 1e-6
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.copy_(torch.randn_like(layer.lora_B, generator=torch.Generator().manual_seed(2)))
            layer.gate.weight.copy_(torch.randn_like(layer.gate.weight, generator=torch.Generator().manual_seed(3)))
    layer = layers[0]
    G = layer.gate.weight.detach()
    probs = torch.softmax(x @ G.T, -1)
    y_ref = layer.base_layer(x)
    for i in range(m):
        y_ref = y_ref + (layer.alpha / r) * probs[..., i:i + 1] * ((x @ layer.lora_A[i].T) @ layer.lora_B[:, i].T)
    q = probs.reshape(-1, m).mean(0)
    loss_ref = -torch.log(m * q).sum()
    for lay in layers:
        torch.testing.assert_close(lay(x), y_ref.detach())
        assert lay.combiner.balance_loss() > 0
        torch.testing.assert_close(lay.combiner.balance_loss().double(), loss_ref, rtol=1e-5, atol=1e-6)
    holder = nn.Sequential(*layers)
    torch.testing.assert_close(aux_loss(holder).double(), 0.5 * 2 * loss_ref, rtol=1e-5, atol=1e-6)
    # the gate learns from the balance loss
    layer.zero_grad()
    layer(x)
    layer.combiner.balance_loss().backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    layer.eval()
    layer(x)
    assert aux_loss(nn.Sequential(layer)) is None  # no balance loss outside training
