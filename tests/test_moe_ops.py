"""cola_train/adapters/moe_ops.py (fused MOELoRA / MoLA updates) against the float64 per-expert
oracles of tests/reference_moe.py: outputs and gradients of x, the factors and the gates."""
from __future__ import annotations

import torch

import reference_moe as ref
from cola_train.adapters import moe_ops
from test_reference_moe import mola_case, moelora_case, rand

F64 = torch.float64


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def grads_match(ours, theirs, atol=1e-11):
    return all(torch.allclose(a.grad, b.grad, atol=atol) for a, b in zip(ours, theirs))


def test_moelora_delta_and_gradients():
    W, b, As, Bs, E, Wg = moelora_case(N=4, r=8)
    x = rand(3, 5, 5, seed=50)
    tasks = torch.tensor([1, 0, 2])
    ref_in = leaves(x, *As, *Bs, E, Wg)
    rx, rA, rB, rE, rW = ref_in[0], ref_in[1:5], ref_in[5:9], ref_in[9], ref_in[10]
    y_ref = ref.moelora_linear(rx, W, b, rA, rB, 16.0, 8, tasks, rE, rW)
    ox, oA, oB, oE, oW = leaves(x, torch.cat(As, 0), torch.cat(Bs, 1), E, Wg)
    omega = moe_ops.moelora_gate(tasks, oE, oW)
    y = ox @ W.T + b + moe_ops.moelora_delta(ox, oA, oB, 16.0 / 8, omega)
    assert torch.allclose(y, y_ref, atol=1e-12)
    w = rand(*y.shape, seed=51)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    assert torch.allclose(ox.grad, rx.grad, atol=1e-11)
    assert torch.allclose(oA.grad, torch.cat([a.grad for a in rA], 0), atol=1e-11)
    assert torch.allclose(oB.grad, torch.cat([g.grad for g in rB], 1), atol=1e-11)
    assert grads_match([oE, oW], [rE, rW])


def test_mola_delta_and_gradients_top2():
    W, b, As, Bs, R = mola_case(E=4, r=2)
    x = rand(2, 4, 5, seed=60)
    ref_in = leaves(x, *As, *Bs, R)
    rx, rA, rB, rR = ref_in[0], ref_in[1:5], ref_in[5:9], ref_in[9]
    y_ref = ref.mola_linear(rx, W, b, rA, rB, 2.0, rR, top_k=2)
    ox, oA, oB, oR = leaves(x, torch.cat(As, 0), torch.cat(Bs, 1), R)
    y = ox @ W.T + b + moe_ops.mola_delta(ox, oA, oB, 2.0, oR, top_k=2)
    assert torch.allclose(y, y_ref, atol=1e-12)
    w = rand(*y.shape, seed=61)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    assert torch.allclose(ox.grad, rx.grad, atol=1e-11)
    assert torch.allclose(oA.grad, torch.cat([a.grad for a in rA], 0), atol=1e-11)
    assert torch.allclose(oB.grad, torch.cat([g.grad for g in rB], 1), atol=1e-11)
    assert torch.allclose(oR.grad, rR.grad, atol=1e-11)


def test_mola_routing_keeps_k_weights_summing_to_one():
    R = rand(6, 5, seed=70)
    wts = moe_ops.mola_routing(rand(3, 4, 5, seed=71), R, top_k=2)
    assert ((wts > 0).sum(-1) == 2).all()
    assert torch.allclose(wts.sum(-1), torch.ones(3, 4, dtype=F64))
