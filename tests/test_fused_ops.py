"""The hand-written backward passes (fused_ops) against autograd: gradcheck in float64, whole-model
gradients equal to the plain-autograd path, and what each path keeps alive for backward."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from cola_train.adapters import (LowRankLinear, attach_adapter, set_kernels, aux_loss, gated_mlp, merged_model,
                                 resample)
from cola_train.adapters import fused_ops, seeded_dropout, shared_qkv
from cola_train.config import MethodConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _frozen_linear(d_in, d_out, bias, dtype=torch.float64):
    lin = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    lin.requires_grad_(False)
    return lin


def _ref_linear(x, weight, bias, A, B, p, seed):
    """The same maths in plain autograd ops (the reference for the hand-written backward)."""
    xa = x * seeded_dropout.dropout_mask(x, p, seed) if p else x
    return F.linear(x, weight, bias) + xa @ A.t() @ B.t()


def _ref_mlp(gate, up, weight, bias, A, B, p, seed):
    h = F.silu(gate) * up
    return _ref_linear(h, weight, bias, A, B, p, seed)


def _ref_shared(x, A, p, seed, *rest):
    """SharedInputLowRank's maths in plain autograd ops: one mask on x for every member; the
    committed links (Ac, Bc) read the undropped x."""
    xa = x * seeded_dropout.dropout_mask(x, p, seed) if p else x
    Bs = rest[2::5]
    outs = []
    for W, b, B, Ac, Bc, zi in zip(rest[0::5], rest[1::5], Bs, rest[3::5], rest[4::5],
                                   (xa @ A.t()).split([B.shape[1] for B in Bs], dim=1)):
        out = F.linear(x, W, b) + zi @ B.t()
        outs.append(out if Ac is None else out + x @ Ac.t() @ Bc.t())
    return tuple(outs)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_low_rank_linear_gradcheck(bias, p):
    torch.manual_seed(0)
    base = _frozen_linear(6, 5, bias)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, A, B: fused_ops.LowRankLinear.apply(x, base.weight, base.bias, A, B, p, 1234)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B))
    expected = _ref_linear(x, base.weight, base.bias, A, B, p, 1234)
    torch.testing.assert_close(fn(x, A, B), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_shared_input_low_rank_gradcheck(bias, p):
    """Two linears of different widths and ranks on one x, against each one's plain formula (with
    dropout: the same mask on x for both); an output left unused gets no B gradient and adds
    nothing to dx."""
    torch.manual_seed(2)
    bases = [_frozen_linear(6, 5, bias), _frozen_linear(6, 4, bias)]
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    factors = [(torch.randn(3, 6, dtype=torch.float64, requires_grad=True),
                torch.randn(5, 3, dtype=torch.float64, requires_grad=True)),
               (torch.randn(2, 6, dtype=torch.float64, requires_grad=True),
                torch.randn(4, 2, dtype=torch.float64, requires_grad=True))]
    leaves = (x, *[t for f in factors for t in f])

    def fn(x, A1, B1, A2, B2):
        if not p:
            return fused_ops.shared_input_low_rank(bases, x, [(A1, B1), (A2, B2)])
        rest = [t for base, B in zip(bases, (B1, B2)) for t in (base.weight, base.bias, B, None, None)]
        return fused_ops.SharedInputLowRank.apply(x, torch.cat([A1, A2]), p, 1234, *rest)

    assert torch.autograd.gradcheck(fn, leaves)
    for out, base, (A, B) in zip(fn(*leaves), bases, factors):
        torch.testing.assert_close(out, _ref_linear(x, base.weight, base.bias, A, B, p, 1234), rtol=1e-12, atol=1e-12)
    first = fn(*leaves)[0].sum()
    grads = torch.autograd.grad(first, leaves, allow_unused=True)
    ref = torch.autograd.grad(_ref_linear(x, bases[0].weight, bases[0].bias, *factors[0], p, 1234).sum(),
                              leaves[:3])
    for got, want in zip(grads[:3], ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(g is None or not g.any() for g in grads[3:])      # the unused output's A and B


def test_shared_input_grouping_steps_aside_for_partitioned_parameters():
    """Under ZeRO-3 a parameter is gathered in its own module's call: gate and up then run one by one."""
    model = attach_adapter(_llama(torch.float32), _cola("heuristic"), TARGETS)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 3, 64)
    assert gated_mlp._shared_input(mlp, x) is not None
    mlp.up_proj.lora_A.ds_id = 7
    assert gated_mlp._shared_input(mlp, x) is None
    del mlp.up_proj.lora_A.ds_id
    mlp.gate_proj.register_forward_pre_hook(lambda mod, args: None)
    assert gated_mlp._shared_input(mlp, x) is None


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gated_mlp_gradcheck(bias, p):
    torch.manual_seed(1)
    base = _frozen_linear(8, 5, bias)
    gate = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda g, u, A, B: fused_ops.GatedLowRankMLP.apply(g, u, base.weight, base.bias, A, B, p, 99)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (gate, up, A, B))
    expected = _ref_mlp(gate, up, base.weight, base.bias, A, B, p, 99)
    torch.testing.assert_close(fn(gate, up, A, B), expected, rtol=1e-12, atol=1e-12)


def _ref_routed(x, weight, bias, R, A, B, r, p, seed):
    probs = torch.softmax(x @ R.t(), dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))
    xa = x * seeded_dropout.dropout_mask(x, p, seed) if p else x
    h = (xa @ A.t()).view(x.shape[0], -1, r)
    return F.linear(x, weight, bias) + (probs.to(h.dtype).unsqueeze(-1) * h).flatten(1) @ B.t(), probs


@pytest.mark.parametrize("groups", [1, 3])       # 1: HydraLoRA's shared A; 3: MoLE's experts
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_routed_low_rank_linear_gradcheck(groups, p):
    torch.manual_seed(2)
    base = _frozen_linear(6, 5, True)
    E, r = 3, 2
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    R = torch.randn(E, 6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(groups * r, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, E * r, dtype=torch.float64, requires_grad=True)

    def fn(x, R, A, B):   # both outputs: probs carries MoLE's balance-loss gradient
        return fused_ops.RoutedLowRankLinear.apply(x, base.weight, base.bias, R, A, B, r, p, 5)

    assert torch.autograd.gradcheck(fn, (x, R, A, B))
    out, probs = fn(x, R, A, B)
    ref_out, ref_probs = _ref_routed(x, base.weight, base.bias, R, A, B, r, p, 5)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("used", [0, 1])          # only out (HydraLoRA: probs unused), only probs
@pytest.mark.parametrize("groups", [1, 3])
def test_routed_gradients_with_one_output_unused(groups, used):
    """The routed functions do not materialise zero gradients for an unused output
    (set_materialize_grads(False)): the maths is the same when either one is unused."""
    torch.manual_seed(4)
    base = _frozen_linear(6, 5, True)
    E, r = 3, 2
    leaves = (torch.randn(7, 6, dtype=torch.float64, requires_grad=True),
              torch.randn(E, 6, dtype=torch.float64, requires_grad=True),
              torch.randn(groups * r, 6, dtype=torch.float64, requires_grad=True),
              torch.randn(5, E * r, dtype=torch.float64, requires_grad=True))
    fn = lambda x, R, A, B: fused_ops.RoutedLowRankLinear.apply(x, base.weight, base.bias, R, A, B, r, 0.0, None)[used]  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    got = torch.autograd.grad(fn(*leaves).sum(), leaves, allow_unused=True)
    want = torch.autograd.grad(_ref_routed(*leaves[:1], base.weight, base.bias, *leaves[1:], r, 0.0, 0)[used].sum(),
                               leaves, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_hydralora_routed_path_dispatches_no_avoidable_op():
    """Issue #22 part 3: the routed path after the one-layer redesign dispatched a view of the
    shared A (forward and backward), materialised zeros for HydraLoRA's unused probs gradient and
    added them, copied h to make it contiguous, built [R; A] again in backward and dispatched
    promote_types. Counted with a TorchDispatchMode on one layer's forward + backward."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from cola_train.adapters.lowrank import hydralora_layer

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = hydralora_layer(_frozen_linear(16, 12, False), 4, 8.0, 0.0, 3)
    assert layer._routed_factors()[1] is layer.lora_A          # the shared A as it is: no view
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    with Count() as counter:
        layer(x).sum().backward()
    ops = counter.ops
    assert not {"zeros", "clone", "promote_types", "add"} & set(ops), ops
    assert ops["cat"] == 2 and ops["_softmax"] == 1, ops   # [R; A] once, [d_logits | d_h] once


def _ref_gated_routed(gate, up, *rest):
    return _ref_routed(F.silu(gate) * up, *rest)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gated_routed_mlp_gradcheck(groups, p):
    """The routed down_proj fed silu(gate) * up, which it recomputes in backward."""
    torch.manual_seed(3)
    base = _frozen_linear(8, 5, True)
    E, r = 3, 2
    gate, up = (torch.randn(7, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    R = torch.randn(E, 8, dtype=torch.float64, requires_grad=True)
    A = torch.randn(groups * r, 8, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, E * r, dtype=torch.float64, requires_grad=True)

    def fn(gate, up, R, A, B):
        return fused_ops.GatedRoutedLowRankMLP.apply(gate, up, base.weight, base.bias, R, A, B, r, p, 5)

    assert torch.autograd.gradcheck(fn, (gate, up, R, A, B))
    for got, want in zip(fn(gate, up, R, A, B), _ref_gated_routed(gate, up, base.weight, base.bias, R, A, B, r, p, 5)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dropout_mask_is_a_seeded_inverted_dropout():
    like = torch.empty(200, 100)
    mask = seeded_dropout.dropout_mask(like, 0.3, 7)
    assert torch.equal(mask, seeded_dropout.dropout_mask(like, 0.3, 7))
    assert not torch.equal(mask, seeded_dropout.dropout_mask(like, 0.3, 8))
    values = mask.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7)
    assert abs((mask == 0).float().mean().item() - 0.3) < 0.02
    bf16 = seeded_dropout.dropout_mask(like.bfloat16(), 0.3, 7)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16 == 0, mask == 0)


def test_can_fuse_refuses_what_it_cannot_handle():
    base = _frozen_linear(4, 3, False, torch.float32)
    x, A, B = torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 2)
    assert fused_ops.can_fuse(base, x, A, B)
    assert not fused_ops.can_fuse(base, x.double(), A, B)          # a cast would be needed
    base.weight.requires_grad_(True)
    assert not fused_ops.can_fuse(base, x, A, B)                    # trainable base
    base.weight.requires_grad_(False)
    base.weight.ds_id = 3                                           # ZeRO-3 partitioned
    assert not fused_ops.can_fuse(base, x, A, B)


def _llama(dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


def _cola(strategy, dropout=0.0, pairing="paper", mask="shared"):
    return MethodConfig(name=f"cola_{strategy}", kind="cola", strategy=strategy, num_A=2, num_B=3, r=4,
                        alpha=8.0, dropout=dropout, init="pissa", pairing=pairing, dropout_mask=mask)


def _grads(model, ids, custom, seed=0):
    set_kernels(model, custom_backward=custom)
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        resample(model, 0, 0)
        torch.manual_seed(seed)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        set_kernels(model, custom_backward=True)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("strategy,pairing", [("fully", "paper"), ("random", "paper"), ("heuristic", "paper"),
                                              ("heuristic", "code")])
@pytest.mark.parametrize("dropout,mask", [(0.0, "shared"), (0.1, "shared"), (0.1, "per_layer")])
def test_model_gradients_match_autograd(strategy, pairing, dropout, mask):
    """Loss and every adapter gradient (float64) equal to the same forward differentiated by
    autograd: the plain path without dropout; with dropout, the plain-op twins of the fused
    functions drawing the same masks (nn.Dropout draws from another stream)."""
    model = attach_adapter(_llama(torch.float64), _cola(strategy, dropout, pairing, mask), TARGETS)
    assert not any("forward" in m.__dict__ for m in model.modules())   # no patched forward, but modules:
    assert sum(1 for m in model.modules() if isinstance(m, gated_mlp.FusedGatedMLP)) == 2  # both MLPs
    assert sum(1 for m in model.modules() if isinstance(m, shared_qkv.SharedInputGroup)) == 2  # both q/k/v
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    shared_apply = fused_ops.SharedInputLowRank.apply
    with mock.patch.object(fused_ops.LowRankLinear, "apply", wraps=fused_ops.LowRankLinear.apply) as lin, \
            mock.patch.object(fused_ops.SharedInputLowRank, "apply", wraps=shared_apply) as shared, \
            mock.patch.object(fused_ops.GatedLowRankMLP, "apply", wraps=fused_ops.GatedLowRankMLP.apply) as mlp:
        loss, grads = _grads(model, ids, custom=True)
    # q, k, v, o, gate, up in 2 layers: each on its own with per-layer masks, else q, k, v
    # together and gate, up together (one mask each group with dropout_mask=shared)
    assert (lin.call_count, shared.call_count) == ((12, 0) if dropout and mask == "per_layer" else (2, 4))
    assert mlp.call_count == 2                       # the down_proj of each MLP
    assert all(c.args[-2] == dropout for c in lin.call_args_list + mlp.call_args_list)
    assert all(c.args[2] == dropout for c in shared.call_args_list)
    if dropout:
        with mock.patch.object(fused_ops.LowRankLinear, "apply", _ref_linear), \
                mock.patch.object(fused_ops.SharedInputLowRank, "apply", _ref_shared), \
                mock.patch.object(fused_ops.GatedLowRankMLP, "apply", _ref_mlp):
            ref_loss, ref = _grads(model, ids, custom=True)
        with mock.patch.object(LowRankLinear, "_dropout_p", lambda self: 0.0):
            no_dropout_loss, _ = _grads(model, ids, custom=True)
        assert abs(loss.item() - no_dropout_loss.item()) > 1e-6      # the masks were applied
    else:
        ref_loss, ref = _grads(model, ids, custom=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


ROUTED = {"hydralora": dict(kind="hydralora", num_A=1, num_B=3),
          "mole": dict(kind="mole", num_A=3, num_B=3)}


def _routed_grads(model, ids, custom, seed=0):
    set_kernels(model, custom_backward=custom)
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = model(input_ids=ids, labels=ids).loss
        aux = aux_loss(model)
        loss = loss + aux if aux is not None else loss
        loss.backward()
    finally:
        set_kernels(model, custom_backward=True)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["hydralora", "mole"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_routed_model_gradients_match_autograd(kind, dropout):
    """HydraLoRA and MoLE (with MoLE's balance loss) in float64, as the CoLA test above."""
    cfg = MethodConfig(name=kind, r=4, alpha=8.0, dropout=dropout, balance_coef=0.5, **ROUTED[kind])
    model = attach_adapter(_llama(torch.float64), cfg, TARGETS)
    with torch.no_grad():   # B's and MoLE's gate start at zero: give every path a gradient
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.1)
            if hasattr(getattr(m, "combiner", None), "balance_coef"):     # a uniform gate has a zero balance-loss gradient
                m.gate.weight.normal_(0, 0.5)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with mock.patch.object(fused_ops.RoutedLowRankLinear, "apply",
                           wraps=fused_ops.RoutedLowRankLinear.apply) as routed, \
            mock.patch.object(fused_ops.GatedRoutedLowRankMLP, "apply",
                              wraps=fused_ops.GatedRoutedLowRankMLP.apply) as gated:
        loss, grads = _routed_grads(model, ids, custom=True)
    assert (routed.call_count, gated.call_count) == (12, 2)      # down_proj fed (gate, up)
    if dropout:
        with mock.patch.object(fused_ops.RoutedLowRankLinear, "apply", _ref_routed), \
                mock.patch.object(fused_ops.GatedRoutedLowRankMLP, "apply", _ref_gated_routed):
            ref_loss, ref = _routed_grads(model, ids, custom=True)
    else:
        ref_loss, ref = _routed_grads(model, ids, custom=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref.keys() and len(grads) == 42
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


def _saved_bytes(model, ids):
    """Bytes of the distinct storages autograd keeps for backward (weights excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    resample(model, 0, 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_adapted_model_keeps_no_more_than_the_frozen_one(dropout):
    """The memory claim, counted exactly: with the fused paths a CoLA model keeps about what the
    frozen base keeps for backward (down_proj's input is recomputed, dropout keeps a seed);
    plain autograd keeps far more."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    base = _llama(torch.float32)
    base.requires_grad_(False)
    base.enable_input_require_grads()
    floor = _saved_bytes(base, ids)
    model = attach_adapter(_llama(torch.float32), _cola("fully", dropout), TARGETS)
    model.enable_input_require_grads()
    fused = _saved_bytes(model, ids)
    set_kernels(model, custom_backward=False)
    try:
        plain = _saved_bytes(model, ids)
    finally:
        set_kernels(model, custom_backward=True)
    # what remains above the floor: the attention and MLP inputs (2 x 64 wide) and the small z's
    tokens = ids.numel()
    extra = 2 * (2 * tokens * 64 * 4)
    assert fused <= floor + extra * 1.25, (floor, fused, plain)
    assert plain >= floor + extra + 2 * tokens * 160 * 4, (floor, fused, plain)


@pytest.mark.parametrize("kind", ["hydralora", "mole"])
def test_routed_mlp_keeps_gate_and_up_not_their_product(kind):
    """HydraLoRA's and MoLE's down_proj fed (gate, up): neither silu(gate) nor the product is kept,
    where the model's own MLP keeps both (d_ff = 160, two layers)."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    cfg = MethodConfig(name=kind, r=4, alpha=8.0, dropout=0.0, **ROUTED[kind])
    model = attach_adapter(_llama(torch.float32), cfg, TARGETS)
    model.enable_input_require_grads()
    fused = _saved_bytes(model, ids)
    gated_mlp.uninstall(model)
    apart = _saved_bytes(model, ids)
    assert apart - fused >= 2 * 2 * ids.numel() * 160 * 4, (fused, apart)


def test_merged_model_restores_the_mlp_forward():
    model = attach_adapter(_llama(torch.float32), _cola("heuristic"), TARGETS)
    assert gated_mlp.install(model) == 2
    plain = merged_model(model)
    assert not any("forward" in m.__dict__ for m in plain.modules())
    assert not any(isinstance(m, (LowRankLinear, gated_mlp.FusedGatedMLP)) for m in plain.modules())
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in plain.model.layers)


def test_parameters_are_read_only_inside_module_calls():
    """DeepSpeed ZeRO-3 gathers a module's parameters in its pre-forward hook: the gated MLP must
    reach down_proj's factors through a module call, never around it."""
    model = attach_adapter(_llama(torch.float32), _cola("heuristic", 0.1), TARGETS)
    inside = set()
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.register_forward_pre_hook(lambda mod, args: inside.add(id(mod)))
            m.register_forward_hook(lambda mod, args, out: inside.discard(id(mod)))
    real = LowRankLinear.factors
    calls = []

    def checked(self, *args, **kwargs):
        assert id(self) in inside, "factors() read outside the module call"
        calls.append(id(self))
        return real(self, *args, **kwargs)

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with mock.patch.object(LowRankLinear, "factors", checked):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(set(calls)) == 14


def test_routed_mlps_survive_deepcopy_and_pickle():
    import copy
    import pickle

    model = attach_adapter(_llama(torch.float32), _cola("fully"), TARGETS).eval()
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            mlps = [m for m in clone.modules() if gated_mlp.routing(m) is not None]
            assert len(mlps) == 2 and all(gated_mlp.routing(m) is m for m in mlps)   # modules of the copy
            attns = [m for m in clone.modules() if shared_qkv.routing(m) is not None]
            assert len(attns) == 2 and all(shared_qkv.routing(m) is m.shared_qkv for m in attns)
            assert all(m.q_proj.group is m.shared_qkv for m in attns)   # the copy's group
            torch.testing.assert_close(clone(input_ids=ids).logits, expected)


def test_shared_qkv_hands_each_output_back_once():
    """q, k and v come from one fused call (their SharedInputGroup); nothing is left pending after
    the attention's forward, and merged_model leaves the model's own attention module."""
    model = attach_adapter(_llama(torch.float32), _cola("heuristic"), TARGETS)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    with mock.patch.object(fused_ops.SharedInputLowRank, "apply", wraps=fused_ops.SharedInputLowRank.apply) as shared:
        model(input_ids=ids)
    # x, A, p, seed and (W, b, B, A_c, B_c) per member: q, k, v then gate, up
    assert [len(c.args) for c in shared.call_args_list] == [4 + 5 * 3, 4 + 5 * 2] * 2
    assert all(not g.pending for g in model.modules() if isinstance(g, shared_qkv.SharedInputGroup))
    plain = merged_model(model)
    assert shared_qkv.install(plain) == 0 and not any("forward" in m.__dict__ for m in plain.modules())
    assert not any(isinstance(m, shared_qkv.SharedInputGroup) for m in plain.modules())


@pytest.mark.parametrize("cfg", [_cola("heuristic"), _cola("random", 0.1),
                                 MethodConfig(name="hydralora", r=4, alpha=8.0, dropout=0.0, **ROUTED["hydralora"]),
                                 MethodConfig(name="mole", r=4, alpha=8.0, dropout=0.1, **ROUTED["mole"])],
                         ids=["cola_heuristic", "cola_random_dropout", "hydralora", "mole_dropout"])
def test_gradient_checkpointing_recomputes_the_fused_paths_exactly(cfg):
    """With model.gradient_checkpointing=true each decoder layer is replayed in backward: the shared
    q/k/v and gate/up calls, the gated MLPs and the dropout seeds must give the same loss and
    gradients as a run that keeps its activations."""
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    model = attach_adapter(_llama(torch.float64), cfg, TARGETS)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.1)
    model.config.use_cache = False
    loss, grads = _routed_grads(model, ids, custom=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.layers[0].gradient_checkpointing
    ckpt_loss, ckpt = _routed_grads(model, ids, custom=True)
    torch.testing.assert_close(ckpt_loss, loss, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(ckpt[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)
