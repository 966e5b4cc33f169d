"""method=mola (combiners.TopKRouter) against the float64 oracle tests/reference_moe.py
(mola_linear, mola_expert_counts): outputs and gradients, loop and fused layers, the expert count
of each layer group on a model, and step 0 (B = 0: the base model's output)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import reference_moe as ref
from cola_train.adapters import attach_adapter
from cola_train.adapters.combiners import TopKRouter
from cola_train.adapters.lowrank import LowRankLinear
from cola_train.config import MethodConfig

F64 = torch.float64


def layer(impl, E=4, r=2, d_in=6, d_out=5, seed=0):
    torch.manual_seed(seed)
    lay = LowRankLinear(nn.Linear(d_in, d_out, dtype=F64), TopKRouter(E, E, top_k=2), r, 4.0, 0.0, impl)
    with torch.no_grad():
        lay.lora_B.normal_()           # B = 0 at init: give it values so every term counts
    return lay


@pytest.mark.parametrize("impl", ["loop", "fused"])
def test_layer_matches_the_oracle_with_gradients(impl):
    lay = layer(impl)
    x = torch.randn(2, 3, 6, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = lay(x)
    As = [lay.lora_A[i].detach().clone().requires_grad_() for i in range(4)]
    Bs = [lay.lora_B[:, i].detach().clone().requires_grad_() for i in range(4)]
    R = lay.router.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = ref.mola_linear(x_ref, lay.base_layer.weight.detach(), lay.base_layer.bias.detach(), As, Bs,
                            lay.scaling, R, top_k=2)
    assert torch.allclose(y, y_ref, atol=1e-12)
    w = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-11)
    assert torch.allclose(lay.lora_A.grad, torch.stack([a.grad for a in As]), atol=1e-11)
    assert torch.allclose(lay.lora_B.grad, torch.stack([b.grad for b in Bs], 1), atol=1e-11)
    assert torch.allclose(lay.router.weight.grad, R.grad, atol=1e-11)


def llama(layers=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def test_expert_counts_per_layer_group_and_step_zero():
    base = llama(4)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    cfg = MethodConfig(name="mola", kind="mola", num_A=8, num_B=8, experts_per_group=[2, 4], top_k=2, r=2,
                       alpha=4.0, dropout=0.0)
    model = attach_adapter(base, cfg, ["q_proj", "down_proj"])
    counts = {name: m.num_A for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    per_layer = [counts[f"model.layers.{l}.self_attn.q_proj"] for l in range(4)]
    assert per_layer == ref.mola_expert_counts(4, [2, 4]) == [2, 2, 4, 4]
    assert counts["model.layers.3.mlp.down_proj"] == 4
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-6)   # B = 0: the base model


def test_top_k_larger_than_a_group_is_one_line():
    from cola_train.adapters import AdapterError

    cfg = MethodConfig(name="mola", kind="mola", num_A=8, num_B=8, experts_per_group=[1, 4], top_k=2)
    with pytest.raises(AdapterError, match="mola routes each token to its top 2: every layer needs at least"):
        attach_adapter(llama(2), cfg, ["q_proj"])
