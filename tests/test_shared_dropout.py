"""One dropout mask per shared input (method.dropout_mask=shared, issue #22 part 3).

q/k/v (shared_qkv) and gate/up (gated_mlp) read one x. With dropout_mask=shared the group draws
ONE seeded mask for x and runs the grouped GEMMs on drop(x); per_layer gives each linear its own
mask and runs them apart, as before. The reference here is plain autograd on the per-pair formula
(the paper's sum over (A_i, B_j) pairs, not the combiner's fused factors), float64, with the masks
built explicitly from the seeds the layers drew: outputs and the gradients of x, every A and B.
"""
from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cola_train.adapters import Kernels, attach_adapter, committed, fused_ops, gated_mlp, kernels_of, shared_qkv
from cola_train.adapters.combiners import LoRA
from cola_train.adapters.lowrank import LowRankLinear, cola_layer
from cola_train.adapters.seeded_dropout import dropout_mask
from cola_train.adapters.spec import AdapterError
from cola_train.config import MethodConfig

F64 = torch.float64
P = 0.3
D = 12


def _layer(d_out: int, combiner: str, mask: str, gen: torch.Generator) -> LowRankLinear:
    base = nn.Linear(D, d_out, bias=True).to(F64)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen, dtype=F64))
        base.bias.copy_(torch.randn(base.bias.shape, generator=gen, dtype=F64))
    base.requires_grad_(False)
    if combiner == "lora":
        layer = LowRankLinear(base, LoRA(), 3, 6.0, P)
    else:
        layer = cola_layer(base, 3, 6.0, P, 2, 3, combiner)
    if combiner == "random":
        layer.combiner.resample(layer, gen)
    layer.kernels = Kernels(dropout_mask=mask)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen, dtype=F64))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen, dtype=F64))
    return layer


def _commit_a_link(layer: LowRankLinear, gen: torch.Generator) -> None:
    """Chain of LoRA's link 2: the current update joins the frozen committed path, fresh factors."""
    layer.commit_factors()
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen, dtype=F64))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen, dtype=F64))


def _oracle(layer: LowRankLinear, x, A, B, seed):
    """base(x) (+ committed links on the undropped x) + sum over pairs s w B_j A_i (x * mask)."""
    out = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    found = committed.factors(layer)
    if found is not None:
        out = out + x @ found[0].to(F64).t() @ found[1].to(F64).t()
    xd = x * dropout_mask(x, P, seed)
    for i, j, w in layer.current_pairs():
        out = out + F.linear(F.linear(xd, A[i]), B[:, j]) * (layer.scaling * w)
    return out


class _Seeds:
    """fused_ops.new_seed replaced by 100, 101, ...: the seeds the layers drew, in order."""

    def __init__(self):
        self.drawn = []
        self._next = itertools.count(100)

    def __call__(self, device):
        seed = next(self._next)
        self.drawn.append(seed)
        return torch.tensor(seed, dtype=torch.int64, device=device)


def _leaves(layers):
    return [t for layer in layers for t in (layer.lora_A, layer.lora_B)]


def _check(outs, refs, grads, ref_grads):
    for got, want in zip(outs, refs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class _Attention(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = layers


@pytest.mark.parametrize("mask", ["shared", "per_layer"])
@pytest.mark.parametrize("combiner,with_committed", [("lora", False), ("fully", False), ("random", False),
                                                     ("heuristic", False), ("heuristic", True)])
def test_qkv_group_matches_the_per_pair_oracle(combiner, with_committed, mask):
    gen = torch.Generator().manual_seed(7)
    layers = [_layer(d, combiner, mask, gen) for d in (D, 8, 8)]
    if with_committed:
        for layer in layers:
            _commit_a_link(layer, gen)
    attn = _Attention(layers)
    assert shared_qkv.install(attn) == 1
    x = torch.randn(2, 5, D, generator=gen, dtype=F64, requires_grad=True)
    weights = [torch.randn(2, 5, d, generator=gen, dtype=F64) for d in (D, 8, 8)]
    seeds = _Seeds()
    with mock.patch.object(fused_ops, "new_seed", seeds), \
            mock.patch.object(fused_ops.SharedInputLowRank, "apply", wraps=fused_ops.SharedInputLowRank.apply) as grouped:
        outs = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        grads = torch.autograd.grad(loss, [x, *_leaves(layers)])
    # shared: one grouped call, one mask for q, k and v; per_layer: each its own call and mask
    assert (grouped.call_count, seeds.drawn) == ((1, [100]) if mask == "shared" else (0, [100, 101, 102]))
    per_layer_seeds = seeds.drawn * 3 if mask == "shared" else seeds.drawn

    xr = x.detach().clone().requires_grad_(True)
    factors = [(layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True))
               for layer in layers]
    refs = [_oracle(layer, xr, A, B, seed) for layer, (A, B), seed in zip(layers, factors, per_layer_seeds)]
    ref_loss = sum((o * w).sum() for o, w in zip(refs, weights))
    ref_grads = torch.autograd.grad(ref_loss, [xr, *[t for f in factors for t in f]])
    _check(outs, refs, grads, ref_grads)


class _MLP(nn.Module):
    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.act_fn = nn.SiLU()


@pytest.mark.parametrize("mask", ["shared", "per_layer"])
@pytest.mark.parametrize("combiner", ["lora", "fully", "heuristic"])
def test_gate_up_group_matches_the_per_pair_oracle(combiner, mask):
    gen = torch.Generator().manual_seed(11)
    gate, up = _layer(10, combiner, mask, gen), _layer(10, combiner, mask, gen)
    down = cola_layer(nn.Linear(10, D).to(F64).requires_grad_(False), 3, 6.0, P, 2, 3, combiner) \
        if combiner != "lora" else LowRankLinear(nn.Linear(10, D).to(F64).requires_grad_(False), LoRA(), 3, 6.0, P)
    with torch.no_grad():
        down.lora_B.copy_(torch.randn(down.lora_B.shape, generator=gen, dtype=F64))
    down.kernels = Kernels(dropout_mask=mask)
    holder = nn.Module()
    holder.mlp = _MLP(gate, up, down)
    assert gated_mlp.install(holder) == 1
    x = torch.randn(3, 4, D, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(3, 4, D, generator=gen, dtype=F64)
    seeds = _Seeds()
    layers = [gate, up, down]
    with mock.patch.object(fused_ops, "new_seed", seeds), \
            mock.patch.object(fused_ops.SharedInputLowRank, "apply", wraps=fused_ops.SharedInputLowRank.apply) as grouped:
        out = holder.mlp(x)
        grads = torch.autograd.grad((out * weight).sum(), [x, *_leaves(layers)])
    # shared: gate and up in one call with one mask (100), then down_proj's own (101)
    assert (grouped.call_count, seeds.drawn) == ((1, [100, 101]) if mask == "shared" else (0, [100, 101, 102]))
    s_gate, s_up, s_down = (100, 100, 101) if mask == "shared" else (100, 101, 102)

    xr = x.detach().clone().requires_grad_(True)
    factors = [(layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True))
               for layer in layers]
    g = _oracle(gate, xr, *factors[0], s_gate)
    u = _oracle(up, xr, *factors[1], s_up)
    ref = _oracle(down, F.silu(g) * u, *factors[2], s_down)
    ref_grads = torch.autograd.grad((ref * weight).sum(), [xr, *[t for f in factors for t in f]])
    _check([out], [ref], grads, ref_grads)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64))


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("mask", ["shared", "per_layer"])
def test_the_method_choice_is_visible_and_recorded(mask):
    """method.dropout_mask reaches every layer's Kernels (results.json's adapter_kernels) and the
    groups' repr."""
    cfg = MethodConfig(name="cola_heuristic", kind="cola", strategy="heuristic", num_A=2, num_B=3, r=2,
                       dropout=0.05, dropout_mask=mask)
    model = attach_adapter(_tiny_llama(), cfg, TARGETS)
    assert kernels_of(model)["dropout_mask"] == mask
    text = repr(model)
    # the q/k/v group and the gated MLP; per_layer, not the default, on each of the 7 layers too
    assert text.count(f"dropout_mask={mask}") == (2 if mask == "shared" else 2 + 7)


def test_the_default_is_shared_and_a_bad_value_is_named():
    model = attach_adapter(_tiny_llama(), MethodConfig(name="cola_fully", kind="cola", r=2), TARGETS)
    assert kernels_of(model)["dropout_mask"] == "shared"
    with pytest.raises(AdapterError, match=r"unknown method.dropout_mask 'bogus' \(expected one of shared, per_layer\)"):
        attach_adapter(_tiny_llama(), MethodConfig(name="cola_fully", kind="cola", r=2, dropout_mask="bogus"), TARGETS)


def test_compose_takes_the_choice_for_a_method_and_a_chain_base():
    from conftest import compose

    from cola_train.chain import adapter_method

    assert adapter_method(compose(["method=cola_heuristic"]).method).dropout_mask == "shared"
    cfg = compose(["method=cola_heuristic", "method.dropout_mask=per_layer"])
    assert adapter_method(cfg.method).dropout_mask == "per_layer"
    cfg = compose(["method=chain_of_lora", "method.base=cola_heuristic", "method.base.dropout_mask=per_layer"])
    assert adapter_method(cfg.method).dropout_mask == "per_layer"


def test_a_run_saved_before_the_choice_resumes_as_per_layer():
    """Runs saved before method.dropout_mask existed drew one mask per linear: resuming one under
    the new default (shared) is a change the resume check names; per_layer continues it as is."""
    from conftest import compose

    from cola_train.config import as_dict
    from cola_train.resume import differences

    saved = as_dict(compose(["method=cola_heuristic"]))
    del saved["method"]["dropout_mask"]
    assert differences(saved, compose(["method=cola_heuristic"])) == {"method.dropout_mask": ["per_layer", "shared"]}
    assert differences(saved, compose(["method=cola_heuristic", "method.dropout_mask=per_layer"])) == {}
