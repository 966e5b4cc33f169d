"""method.init=pissa_split (our extension) through attach_adapter on a tiny Llama: the step-0 output
is the base model's, the copies differ, save/load rebuilds it, and the methods it cannot serve are
one line. The maths (top-K.r part, zero-sum noise) is checked in tests/test_split_init.py."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cola_train.adapters import AdapterError, attach_adapter, load_adapter, save_adapter
from cola_train.adapters.lowrank import LowRankLinear
from cola_train.config import MethodConfig

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def cola(strategy, **kw):
    return MethodConfig(name=f"cola_{strategy}", kind="cola", strategy=strategy, num_A=2, num_B=3, r=4, alpha=8.0,
                        dropout=0.0, init="pissa_split", svd="exact", **kw)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("strategy,pairing", [("heuristic", "paper"), ("heuristic", "code"), ("random", "paper")])
def test_step_zero_is_the_base_and_the_copies_differ(strategy, pairing, tmp_path):
    want = logits(llama())
    model = attach_adapter(llama(), cola(strategy, pairing=pairing), TARGETS)
    for train in (False, True):   # eval (random: the expectation) and a training draw
        model.train(train)
        assert torch.allclose(logits(model), want, atol=2e-5)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert all((lay.lora_A[0] - lay.lora_A[1]).abs().max() > 1e-4 for lay in layers)
    save_adapter(model, tmp_path / "a")
    assert torch.allclose(logits(load_adapter(llama(), tmp_path / "a")), logits(model), atol=1e-6)


@pytest.mark.parametrize("cfg", [cola("fully"), MethodConfig(name="pissa", kind="peft", init="pissa_split")],
                         ids=["fully", "peft"])
def test_methods_it_cannot_serve_are_one_line(cfg):
    with pytest.raises(AdapterError, match="method.init=pissa_split \\(our symmetry-breaking init\\) applies to"):
        attach_adapter(llama(), cfg, TARGETS)
