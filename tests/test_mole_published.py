"""method=mole, MoLE as published (combiners.ExpertSwitch + mole_block + mole_gate), on a tiny
Llama with PEFT LoRA experts: identical experts reproduce PEFT's own LoRA model (any gate), only
the gates train, the balance loss is the paper's, save/load keeps the gates, bad configs are one
line. The gate's maths against the float64 oracle: tests/test_mole_gate.py, test_mole_block.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reference_moe as ref
from cola_train.adapters import AdapterError, attach_adapter, aux_loss, load_adapter, save_adapter
from cola_train.adapters.mole_block import MoLEBlock
from cola_train.config import MethodConfig

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def expert(tmp_path, seed):
    """A PEFT LoRA adapter dir with non-zero B (r 4, alpha 8) and the PEFT model itself."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / f"expert{seed}"
    model.save_pretrained(str(path))
    return str(path), model.eval()


def mole(paths):
    return MethodConfig(name="mole", kind="mole_block", num_A=len(paths), num_B=len(paths), r=4, alpha=8.0,
                        dropout=0.0, expert_paths=list(paths))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def test_identical_experts_are_that_lora_whatever_the_gate(tmp_path):
    path, peft_model = expert(tmp_path, 1)
    model = attach_adapter(llama(), mole([path, path]), TARGETS)
    assert sum(isinstance(m, MoLEBlock) for m in model.modules()) == 2
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoLEBlock):
                m.gate.e.normal_()                    # any gate: O = F + sum G_i E = F + E
    assert torch.allclose(logits(model), logits(peft_model), atol=1e-5)


def test_only_the_gates_train_and_the_balance_loss_is_the_papers(tmp_path):
    p1, _ = expert(tmp_path, 1)
    p2, _ = expert(tmp_path, 2)
    model = attach_adapter(llama(), mole([p1, p2]), TARGETS)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".mole_gate." in n for n in trainable)
    assert len(trainable) == 2 * 2                   # e and tau in each of the two blocks
    model.train()
    out = model(input_ids=IDS, attention_mask=MASK, labels=IDS)
    aux = aux_loss(model)
    assert aux.item() == pytest.approx(0.5 * 2 * math.log(2), rel=1e-6)   # uniform gates at step 0
    (out.loss + aux).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # e gets a gradient at once; tau's is 0 while e = 0 (epsilon = 0: softmax(epsilon / tau) is uniform for any tau)
    assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if n.endswith(".e"))
    gates = [m.gate.last for m in model.modules() if isinstance(m, MoLEBlock)]
    assert aux.item() == pytest.approx((ref.MOLE_BALANCE_WEIGHT * ref.mole_balance_loss(
        [g.detach().double() for g in gates])).item(), rel=1e-6)


def test_save_and_load_keep_the_gates(tmp_path):
    p1, _ = expert(tmp_path, 1)
    p2, _ = expert(tmp_path, 2)
    model = attach_adapter(llama(), mole([p1, p2]), TARGETS)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoLEBlock):
                m.gate.e.normal_()
                m.gate.tau.fill_(0.7)
    want = logits(model)
    save_adapter(model, tmp_path / "saved")
    loaded = load_adapter(llama(), tmp_path / "saved")
    assert torch.allclose(logits(loaded), want, atol=1e-6)


@pytest.mark.parametrize("kw,message", [
    (dict(expert_paths=["a"]), r"method.expert_paths must list num_A=2 adapter dirs, got 1"),
    (dict(init="pissa", expert_paths=["a", "b"]), r"method.init must be 'lora', got 'pissa'"),
])
def test_bad_config_is_one_line(kw, message):
    cfg = MethodConfig(name="mole", kind="mole_block", num_A=2, num_B=2, r=4, alpha=8.0, **kw)
    with pytest.raises(AdapterError, match=message):
        attach_adapter(llama(), cfg, TARGETS)
