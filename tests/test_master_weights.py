"""fp32 master weights under bf16 mixed precision (no DeepSpeed): the trainable weights are fp32,
the maths still runs fused in bf16, and AdamW's small warm-up steps are no longer rounded away."""
from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

from cola_train import run
from cola_train.adapters import attach_adapter, aux_loss, fused_ops, resample
from cola_train.config import MethodConfig
from cola_train.models import upcast_trainable

from conftest import TINY, compose
from test_fused_ops import TARGETS, _llama

METHODS = {
    "cola_heuristic": dict(kind="cola", strategy="heuristic", num_A=2, num_B=3, init="pissa"),
    "hydralora": dict(kind="hydralora", num_A=1, num_B=3),
    "mole": dict(kind="mole", num_A=3, num_B=3),
}
FUSED = (fused_ops.LowRankLinear, fused_ops.GatedLowRankMLP, fused_ops.RoutedLowRankLinear)


def _model(method):
    model = attach_adapter(_llama(torch.bfloat16),
                           MethodConfig(name=method, r=4, alpha=8.0, dropout=0.0, **METHODS[method]), TARGETS)
    with torch.no_grad():  # zero-init B would give A no gradient
        for m in model.modules():
            if hasattr(m, "lora_B") and method != "cola_heuristic":
                m.lora_B.normal_(0, 0.1)
    return model


def _step(model, ids, lr):
    """One bf16-autocast forward/backward (as the Trainer runs it) and one AdamW step; counts
    the fused autograd functions called."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    resample(model, 0, 0)
    spies = [mock.patch.object(f, "apply", wraps=f.apply) for f in FUSED]
    mocks = [s.start() for s in spies]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
            aux = aux_loss(model)
            loss = loss + aux if aux is not None else loss
        loss.backward()
    finally:
        for s in spies:
            s.stop()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    return loss.detach().float(), grads, sum(m.call_count for m in mocks)


@pytest.mark.parametrize("method", list(METHODS))
def test_master_weights_train_fused_in_bf16_and_keep_small_steps(method):
    pure = _model(method)
    master = copy.deepcopy(pure)
    n = upcast_trainable(master)
    trainable = [p for p in master.parameters() if p.requires_grad]
    assert n == sum(p.numel() for p in trainable) > 0
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in master.parameters() if not p.requires_grad)
    before = {k: v.float().clone() for k, v in master.state_dict().items() if "lora" in k}

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    lr = 1e-5  # a warm-up-sized step: below bf16's rounding step for weights of size ~0.1 or more
    loss_p, grads_p, calls_p = _step(pure, ids, lr)
    loss_m, grads_m, calls_m = _step(master, ids, lr)

    assert calls_m == calls_p > 0                    # the fp32 weights did not push it off the fused path
    torch.testing.assert_close(loss_m, loss_p, rtol=1e-2, atol=1e-2)
    for name, g in grads_m.items():
        assert g.dtype == torch.float32 and g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads_p[name].float(), rtol=5e-2, atol=5e-3, msg=name)

    moved = lambda model: sum(int((v.float() != before[k]).sum()) for k, v in model.state_dict().items()
                              if k in before)
    total = sum(v.numel() for v in before.values())
    assert moved(master) > 0.9 * total               # Adam's first step moves every weight by ~lr
    assert moved(pure) < 0.5 * moved(master)         # in bf16 most of those steps round to nothing


def _build(overrides):
    cfg = compose([*TINY, "method=cola_heuristic", "model.dtype=bf16", *overrides])
    return run.build_model(cfg)[1]


@pytest.mark.parametrize("overrides, upcast", [
    (["trainer.precision=bf16"], True),
    (["trainer.precision=bf16", "trainer.master_weights=false"], False),
    (["trainer.precision=fp32"], False),        # no autocast: the weights keep the model's dtype
])
def test_build_model_upcasts_only_trainable_weights_under_mixed_precision(overrides, upcast):
    model = _build(overrides)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32 if upcast else torch.bfloat16}
    assert frozen == {torch.bfloat16}


@pytest.mark.parametrize("base", [dict(name="lora", kind="peft"),
                                  dict(name="cola_fully", kind="cola", strategy="fully", num_A=2, num_B=3)])
def test_chain_link_switch_keeps_fp32_master_weights_when_the_rank_changes(base):
    from cola_train import chain

    model = attach_adapter(_llama(torch.bfloat16), MethodConfig(r=4, alpha=8.0, dropout=0.0, **base), TARGETS)
    upcast_trainable(model)
    chain.switch(model, next_rank=2, seed=1)          # new, smaller tensors for the next link
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert min(min(p.shape) for p in trainable) == 2  # the rank did change
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_master_weights_cast_only_the_factors_per_step():
    """fp32 master factors beside a bf16 base (issue #22 part 2): a step casts A and B to bf16 and
    their gradients back (4 casts per layer), nothing else; heuristic's pairing matrix is cast
    once, not every forward; a changed pairing (random's per-step draw) is cast again."""
    from collections import Counter

    import torch
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode

    from cola_train.adapters.lowrank import cola_layer

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = cola_layer(nn.Linear(16, 12, bias=False).to(torch.bfloat16).requires_grad_(False), 4, 8.0, 0.0,
                       2, 3, "heuristic")
    for p in (layer.lora_A, layer.lora_B):
        p.data = p.data.float()
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    layer(x).float().sum().backward()         # the first step casts the pairing matrix
    with Count() as counter:
        layer(x).float().sum().backward()
    assert counter.ops["_to_copy"] == 4 + 2, counter.ops   # A, B and their gradients; the test's .float() x2
    reference = layer.combiner._mixing(layer, torch.float32)
    layer.set_pairing(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))   # a new pairing: cast again
    fresh = layer.combiner._mixing(layer, torch.float32)
    assert fresh is not reference and torch.equal(fresh, layer.mixing.float())
