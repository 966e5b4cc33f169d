"""trainer.fp32_adapter_path: under bf16 autocast the adapters' low-rank path runs in fp32, so a
step far below bf16's rounding step of the factors reaches the output as itself, not as the
rounding noise of the cast factors. Checked against float64, for our layers and for PEFT's."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from cola_train import chain
from cola_train.adapters import attach_adapter, fp32_path
from cola_train.adapters.spec import AdapterError
from cola_train.config import MethodConfig
from cola_train.models import upcast_trainable

METHODS = {
    "cola_fully": MethodConfig(name="cola_fully", kind="cola", strategy="fully", num_A=2, num_B=3, r=4, alpha=8.0,
                               dropout=0.0, init="pissa"),
    "cola_heuristic": MethodConfig(name="cola_heuristic", kind="cola", strategy="heuristic", num_A=2, num_B=3, r=4,
                                   alpha=8.0, dropout=0.0, init="pissa"),
    "hydralora": MethodConfig(name="hydralora", kind="hydralora", num_A=1, num_B=3, r=4, alpha=8.0, dropout=0.0),
    "mole": MethodConfig(name="mole", kind="mole", num_A=3, num_B=3, r=4, alpha=8.0, dropout=0.0),
    "peft_lora": MethodConfig(name="lora", kind="peft", r=4, alpha=8.0, dropout=0.0),
    "peft_dora": MethodConfig(name="dora", kind="peft", use_dora=True, r=4, alpha=8.0, dropout=0.0),
}


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def _q_proj(model: nn.Module) -> nn.Module:
    """The adapted q_proj, called directly: one layer's output, no attention around it."""
    return next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))


def _adapted(method: str, fp32: bool) -> nn.Module:
    model = attach_adapter(_llama(), METHODS[method], ["q_proj"])
    upcast_trainable(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # large factors: a 1e-4 step is far below half their bf16 rounding step (2^-9)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
    if fp32:
        assert fp32_path.enable(model) == 1
    return model


def _step(model: nn.Module, size: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(size)


def _mean_change(model: nn.Module, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    """Mean over tokens of out(after a 1e-4 step) - out(before): the output's own rounding averages
    out over the tokens, a fixed error in the factors does not."""
    def out():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _q_proj(model)(x).double().mean(0)
    before = out()
    _step(model, 1e-4)
    after = out()
    _step(model, -1e-4)
    return after - before


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_step_below_bf16_rounding_reaches_the_output(method):
    g = torch.Generator().manual_seed(2)
    x = (1 + 0.1 * torch.randn(8192, 64, generator=g)).to(torch.bfloat16)
    reference = _adapted(method, fp32=False).double()                      # float64, no autocast
    want = _mean_change(reference, x.double(), autocast=False)
    err = lambda got: float((got - want).norm() / want.norm())             # noqa: E731
    fp32 = err(_mean_change(_adapted(method, fp32=True), x, autocast=True))
    plain = err(_mean_change(_adapted(method, fp32=False), x, autocast=True))
    assert fp32 < 0.15, (fp32, plain)
    assert plain > 0.5, (fp32, plain)   # without the fp32 path the cast factors hide or distort the step


def test_gradients_reach_fp32_factors_and_the_base_stays_bf16():
    model = _adapted("cola_heuristic", fp32=True)
    x = torch.randn(8, 64).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _q_proj(model)(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    assert _q_proj(model).base_layer.weight.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16


def test_half_precision_factors_are_refused():
    model = attach_adapter(_llama(), METHODS["cola_fully"], ["q_proj"])
    with pytest.raises(AdapterError, match="needs fp32 adapter weights.*master_weights=true"):
        fp32_path.enable(model)


def test_a_chain_link_at_a_new_rank_keeps_the_fp32_path():
    """PEFT builds new lora_A / lora_B modules for a new rank, in the base's dtype."""
    model = _adapted("peft_lora", fp32=True)
    chain.switch(model, 2, seed=0)
    layer = _q_proj(model)
    subs = (layer.lora_A["default"], layer.lora_B["default"])
    assert subs[0].weight.shape[0] == 2
    assert all(type(m) is fp32_path.FP32Linear and m.weight.dtype == torch.float32 for m in subs)
