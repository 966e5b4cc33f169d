"""Chain of LoRA keeps the fused path (issue #22 part 5, #24 part 4): committed links are a frozen
term of LowRankLinear, computed inside the fused kernels, not a forward hook on the base linear
(which made fused_ops.can_fuse refuse every later link)."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cola_train.adapters import attach_adapter, commit_adapter, fused_ops, reinit_adapter, set_kernels
from cola_train.adapters.lowrank import LowRankLinear
from cola_train.config import MethodConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
F64 = torch.float64


def _model(dropout, mask="shared"):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    cfg = MethodConfig(name="cola_heuristic", kind="cola", strategy="heuristic", num_A=2, num_B=3, r=4,
                       alpha=8.0, dropout=dropout, init="pissa", svd="exact", dropout_mask=mask)
    return attach_adapter(base.to(F64), cfg, TARGETS)


def _perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.lora_B.add_(torch.randn(m.lora_B.shape, generator=gen, dtype=F64) * 0.1)


def _step(model, ids, custom=True):
    """(loss, grads, {fused function: calls}) of one training forward + backward."""
    set_kernels(model, custom_backward=custom)
    fns = {"linear": fused_ops.LowRankLinear, "shared": fused_ops.SharedInputLowRank,
           "mlp": fused_ops.GatedLowRankMLP}
    patches = {k: mock.patch.object(fn, "apply", wraps=fn.apply) for k, fn in fns.items()}
    mocks = {k: p.start() for k, p in patches.items()}
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        for p in patches.values():
            p.stop()
        set_kernels(model, custom_backward=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {k: m.call_count for k, m in mocks.items()}


@pytest.mark.parametrize("dropout,mask", [(0.0, "shared"), (0.1, "shared"), (0.1, "per_layer")])
def test_link_two_runs_the_same_fused_path_as_link_one(dropout, mask):
    model = _model(dropout, mask)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    _perturb(model, 1)
    _, _, link1 = _step(model, ids)
    # q/k/v and gate/up run grouped (2 layers x 2 groups), o_proj alone, without dropout or with one
    # mask per group; with per-layer masks each of q, k, v, o, gate, up alone; down_proj through
    # the gated MLP kernel
    apart = dropout and mask == "per_layer"
    assert link1 == ({"linear": 12, "shared": 0, "mlp": 2} if apart else {"linear": 2, "shared": 4, "mlp": 2})
    commit_adapter(model)
    reinit_adapter(model)
    _perturb(model, 2)
    assert not any(m._forward_hooks for m in model.modules())   # no hook: a frozen term of the layer
    _, _, link2 = _step(model, ids)
    assert link2 == link1


def test_link_two_fused_equals_plain_autograd():
    """Link 2 through the fused kernels (committed links inside them) against the same model with
    the plain autograd ops (kernels.custom_backward=False), float64, no dropout: loss and every
    adapter gradient; and the committed links change the output (they are not dropped)."""
    model = _model(0.0)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    _perturb(model, 1)
    commit_adapter(model)
    reinit_adapter(model)
    _perturb(model, 2)
    loss, grads, calls = _step(model, ids, custom=True)
    assert calls["shared"] == 4 and calls["mlp"] == 2
    ref_loss, ref, ref_calls = _step(model, ids, custom=False)
    assert sum(ref_calls.values()) == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    # the same model without its committed links computes something else
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m._buffers.pop("committed_A"), m._buffers.pop("committed_B")
    without, _, _ = _step(model, ids)
    assert abs(float(without - loss)) > 1e-6


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_functions_with_a_frozen_term_match_the_formula(p):
    """fused_ops' frozen (A_c, B_c) term: y = x W^T + b + (drop(x) A^T) B^T + (x A_c^T) B_c^T, the
    committed links reading the undropped input; gradcheck plus the plain formula, for the linear and
    the gated MLP kernel."""
    from cola_train.adapters import seeded_dropout

    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, dtype=F64).requires_grad_(False)
    Ac, Bc = torch.randn(4, 6, dtype=F64), torch.randn(5, 4, dtype=F64)
    A = torch.randn(3, 6, dtype=F64, requires_grad=True)
    B = torch.randn(5, 3, dtype=F64, requires_grad=True)

    def formula(x):
        xa = x * seeded_dropout.dropout_mask(x, p, 1234) if p else x
        return torch.nn.functional.linear(x, base.weight, base.bias) + xa @ A.t() @ B.t() + x @ Ac.t() @ Bc.t()

    x = torch.randn(7, 6, dtype=F64, requires_grad=True)
    lin = lambda x, A, B: fused_ops.LowRankLinear.apply(x, base.weight, base.bias, A, B, p, 1234, Ac, Bc)  # noqa: E731
    assert torch.autograd.gradcheck(lin, (x, A, B))
    torch.testing.assert_close(lin(x, A, B), formula(x), rtol=1e-12, atol=1e-12)
    gate = torch.randn(7, 6, dtype=F64, requires_grad=True)
    up = torch.randn(7, 6, dtype=F64, requires_grad=True)
    mlp = lambda g, u, A, B: fused_ops.GatedLowRankMLP.apply(g, u, base.weight, base.bias, A, B, p, 1234, Ac, Bc)  # noqa: E731
    assert torch.autograd.gradcheck(mlp, (gate, up, A, B))
    torch.testing.assert_close(mlp(gate, up, A, B), formula(torch.nn.functional.silu(gate) * up),
                               rtol=1e-12, atol=1e-12)
