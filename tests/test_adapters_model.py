"""Adapters on tiny random HF causal LMs (Llama, OPT): step-0 exactness, save/load, merge,
merged_model, export to PEFT on the original base, Chain-of-LoRA hooks, and a few training steps."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from cola_train.adapters import (AdapterError, LowRankLinear, attach_adapter, aux_loss, export_peft,
                                 load_adapter, merge_adapter, merged_model, reinit_adapter, resample,
                                 save_adapter, trainable_parameters, unmerge_adapter)
from cola_train.config import MethodConfig

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

METHODS = {
    "fft": dict(kind="none"),
    "lora": dict(kind="peft"),
    "dora": dict(kind="peft", use_dora=True),
    "pissa": dict(kind="peft", init="pissa"),
    "cola_fully": dict(kind="cola", strategy="fully", num_A=2, num_B=3),
    "cola_random": dict(kind="cola", strategy="random", num_A=2, num_B=3),
    "cola_heuristic": dict(kind="cola", strategy="heuristic", num_A=2, num_B=3),
    "hydralora": dict(kind="hydralora", num_B=3),
    "mole": dict(kind="mole", num_A=2, num_B=2),
}


def method(name, **overrides):
    kw = dict(name=name, r=4, alpha=8.0, dropout=0.0)
    kw.update(METHODS[name])
    kw.update(overrides)
    return MethodConfig(**kw)


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def opt(seed=0):
    torch.manual_seed(seed)
    cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                    max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0)
    return OPTForCausalLM(cfg).eval()


def logits(model, train=False):
    model.train(train)
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    model.eval()
    return out


@torch.no_grad()
def perturb(model, seed=1, std=0.05):
    """Stand-in for training: move every trainable tensor (zero B's included)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


# -- step 0 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(1, 1), (1, 4), (2, 3), (3, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("strategy,pairing", [("fully", "paper"), ("random", "paper"), ("heuristic", "paper"),
                                              ("heuristic", "code")])
def test_split_pissa_step0_equals_base(strategy, pairing, m, n):
    ref = logits(llama())
    model = attach_adapter(llama(), method("cola_fully", strategy=strategy, num_A=m, num_B=n, init="pissa",
                                           pairing=pairing), LLAMA_TARGETS)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight,
                           llama().model.layers[0].self_attn.q_proj.weight)  # the residual moved out
    close(logits(model), ref)
    for step in range(3):  # all B's are copies at init, so every draw is exact in training too
        resample(model, step, seed=0)
        close(logits(model, train=True), ref)


@pytest.mark.parametrize("name", ["cola_fully", "cola_random", "cola_heuristic", "hydralora", "mole", "pissa"])
def test_pissa_step0_equals_base_opt(name):
    ref = logits(opt())
    model = attach_adapter(opt(), method(name, init="pissa"), OPT_TARGETS)
    close(logits(model), ref)
    close(logits(model, train=True), ref)


def test_lora_init_leaves_base_untouched():
    ref = logits(llama())
    model = attach_adapter(llama(), method("cola_heuristic", num_A=3, num_B=2), LLAMA_TARGETS)
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=0)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, LowRankLinear) and layer.A0 is None and torch.all(layer.lora_B == 0)


# -- parameters ------------------------------------------------------------------------------------
def test_trainable_parameters_and_frozen_base():
    base_total = sum(p.numel() for p in llama().parameters())
    assert trainable_parameters(attach_adapter(llama(), method("fft"), LLAMA_TARGETS)) == (base_total, base_total)
    lora = attach_adapter(llama(), method("lora"), LLAMA_TARGETS)
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]  # (in, out)
    expected = 2 * sum(4 * (i + o) for i, o in shapes)
    assert trainable_parameters(lora) == (expected, base_total + expected)
    cola = attach_adapter(llama(), method("cola_fully", num_A=2, num_B=3), LLAMA_TARGETS)
    expected = 2 * sum(4 * (2 * i + 3 * o) for i, o in shapes)
    assert trainable_parameters(cola) == (expected, base_total + expected)
    for name, p in cola.named_parameters():
        assert p.requires_grad == ("lora_" in name), name


# -- save / load -----------------------------------------------------------------------------------
CASES = [(name, "lora") for name in METHODS] + [
    (name, "pissa") for name in ("cola_fully", "cola_random", "cola_heuristic", "hydralora")]


@pytest.mark.parametrize("name,init", CASES)
def test_save_load_into_fresh_base(tmp_path, name, init):
    cfg = method(name) if init == "lora" else method(name, init="pissa")
    model = attach_adapter(llama(), cfg, LLAMA_TARGETS)
    perturb(model)
    expected = logits(model)
    save_adapter(model, tmp_path)
    if name != "fft":  # small files: no base weights
        size = sum(f.stat().st_size for f in tmp_path.iterdir())
        assert size < 0.6 * sum(p.numel() * 4 for p in llama().parameters()), size
    loaded = load_adapter(llama(), str(tmp_path))
    close(logits(loaded), expected, atol=1e-6)
    assert trainable_parameters(loaded) == trainable_parameters(model)
    if init == "pissa":  # the residual base is rebuilt bit for bit from the saved A0/B0
        a = dict(model.named_parameters())
        for key, value in loaded.named_parameters():
            if key.endswith("base_layer.weight"):
                assert torch.equal(value, a[key]), key


def test_load_adapter_into_opt_and_with_matching_config(tmp_path):
    cfg = method("cola_random", init="pissa")
    model = attach_adapter(opt(), cfg, OPT_TARGETS)
    perturb(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(opt(), str(tmp_path), method_cfg=cfg)
    close(logits(loaded), logits(model), atol=1e-6)


@pytest.mark.parametrize("pairing", ["paper", "code"])
def test_saved_heuristic_adapter_keeps_its_pairing(tmp_path, pairing):
    """A loaded adapter computes with the pairing it was trained with (cola_adapter.json records
    it); asking for the other one is a mismatch, like any structural field."""
    other = {"paper": "code", "code": "paper"}[pairing]
    model = attach_adapter(llama(), method("cola_heuristic", pairing=pairing), LLAMA_TARGETS)
    perturb(model)
    expected = logits(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(llama(), str(tmp_path))
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.combiner.rule == pairing
    close(logits(loaded), expected, atol=1e-6)
    with pytest.raises(AdapterError, match=f"pairing '{pairing}' != '{other}'"):
        load_adapter(llama(), str(tmp_path), method_cfg=method("cola_heuristic", pairing=other))


def test_adapter_saved_before_pairing_was_recorded_loads_with_the_code_pairing(tmp_path):
    """cola_adapter.json files written before method.pairing existed have no such field: those
    adapters were trained with the authors' code pairing (the only one then)."""
    import json

    model = attach_adapter(llama(), method("cola_heuristic", pairing="code"), LLAMA_TARGETS)
    perturb(model)
    expected = logits(model)
    save_adapter(model, tmp_path)
    meta_path = tmp_path / "cola_adapter.json"
    meta = json.loads(meta_path.read_text())
    assert meta["method"].pop("pairing") == "code"
    meta_path.write_text(json.dumps(meta))
    loaded = load_adapter(llama(), str(tmp_path))
    assert loaded.model.layers[0].self_attn.q_proj.combiner.rule == "code"
    close(logits(loaded), expected, atol=1e-6)


# -- merge / merged_model / export ---------------------------------------------------------------
MERGEABLE = [("lora", "lora"), ("dora", "lora"), ("pissa", "pissa")] + [
    (f"cola_{s}", init) for s in ("fully", "random", "heuristic") for init in ("lora", "pissa")]


@pytest.mark.parametrize("name,init", MERGEABLE)
def test_merge_unmerge_restores_and_merged_model_matches(name, init):
    model = attach_adapter(llama(), method(name, init=init), LLAMA_TARGETS)
    perturb(model)
    expected = logits(model)
    weights = {k: v.clone() for k, v in model.named_parameters() if k.endswith("base_layer.weight")}
    merge_adapter(model)
    close(logits(model), expected)
    assert any(not torch.allclose(v, weights[k]) for k, v in model.named_parameters() if k in weights)
    unmerge_adapter(model)
    for k, v in model.named_parameters():
        if k in weights:
            close(v, weights[k], atol=1e-6)
    close(logits(model), expected)
    plain = merged_model(model)
    assert isinstance(plain, LlamaForCausalLM)
    assert not any(isinstance(m, LowRankLinear) or hasattr(m, "lora_A") for m in plain.modules())
    close(logits(plain), expected)


def test_merged_model_saves_as_plain_checkpoint(tmp_path):
    model = attach_adapter(llama(), method("cola_heuristic", num_A=3, num_B=2, init="pissa"), LLAMA_TARGETS)
    perturb(model)
    expected = logits(model)
    merged_model(model).save_pretrained(tmp_path)
    close(logits(LlamaForCausalLM.from_pretrained(tmp_path)), expected)


@pytest.mark.parametrize("name,init", MERGEABLE)
def test_export_peft_loads_on_original_base(tmp_path, name, init):
    from peft import PeftConfig, PeftModel

    model = attach_adapter(llama(), method(name, init=init), LLAMA_TARGETS)
    perturb(model)
    expected = logits(model)
    export_peft(model, tmp_path)
    exported = PeftModel.from_pretrained(llama(), str(tmp_path))
    close(logits(exported), expected)
    config = PeftConfig.from_pretrained(str(tmp_path))
    if name.startswith("cola") or init == "pissa":
        assert config.lora_alpha == config.r  # PEFT scaling 1, ours folded into B
        collapsed = name in ("pissa", "cola_fully", "cola_random")  # rank r; heuristic (m=2, n=3): m r
        assert config.r == (4 if collapsed else 8) + (4 if init == "pissa" else 0)


def test_export_peft_opt(tmp_path):
    from peft import PeftModel

    model = attach_adapter(opt(), method("cola_random", num_A=3, num_B=2, init="pissa"), OPT_TARGETS)
    perturb(model)
    export_peft(model, tmp_path)
    close(logits(PeftModel.from_pretrained(opt(), str(tmp_path))), logits(model))


# -- Chain-of-LoRA hooks -------------------------------------------------------------------------
@pytest.mark.parametrize("name,init,rank", [("cola_fully", "pissa", None), ("cola_random", "lora", 2),
                                            ("lora", "lora", None), ("lora", "lora", 2)])
def test_merge_then_reinit_keeps_output_and_export(tmp_path, name, init, rank):
    from peft import PeftModel

    model = attach_adapter(llama(), method(name, init=init), LLAMA_TARGETS)
    perturb(model, seed=1)
    expected = logits(model)
    merge_adapter(model)
    reinit_adapter(model, rank=rank)
    close(logits(model), expected)  # the merged update stays, the fresh B's are zero
    perturb(model, seed=2)  # the next link trains
    expected = logits(model)
    export_peft(model, tmp_path / "export")
    close(logits(PeftModel.from_pretrained(llama(), str(tmp_path / "export"))), expected)
    save_adapter(model, tmp_path / "adapter")
    close(logits(load_adapter(llama(), str(tmp_path / "adapter"))), expected)


# -- MoLE experts from PEFT LoRA adapters ---------------------------------------------------------
def test_mole_loads_frozen_experts(tmp_path):
    experts = []
    for e in range(2):
        lora = attach_adapter(llama(), method("lora", alpha=4.0 * (e + 1)), LLAMA_TARGETS)
        perturb(lora, seed=10 + e)
        save_adapter(lora, tmp_path / f"e{e}")
        experts.append(lora)
    model = attach_adapter(llama(), method("mole", expert_paths=[str(tmp_path / "e0"), str(tmp_path / "e1")],
                                           freeze_experts=True), LLAMA_TARGETS)
    trainable, _ = trainable_parameters(model)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert trainable == sum(m.gate.weight.numel() for m in layers)
    layer = model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 64)
    expected = 0
    for lora in experts:  # zero-initialised gate: the plain average of the experts' updates
        peft_layer = lora.base_model.model.model.layers[0].self_attn.v_proj
        A, B = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        expected = expected + 0.5 * peft_layer.scaling["default"] * (x @ A.T) @ B.T
    with torch.no_grad():
        close(layer(x) - layer.base_layer(x), expected, atol=1e-6)


# -- random strategy across "ranks" ----------------------------------------------------------------
def test_resample_same_draw_on_every_rank_and_differs_across_steps():
    a = attach_adapter(llama(0), method("cola_random", num_A=3, num_B=4), LLAMA_TARGETS)
    b = attach_adapter(llama(1), method("cola_random", num_A=3, num_B=4), LLAMA_TARGETS)
    seen = set()
    for step in range(4):
        resample(a, step, seed=5)
        resample(b, step, seed=5)
        pa = [m.pairing.clone() for m in a.modules() if isinstance(m, LowRankLinear)]
        pb = [m.pairing.clone() for m in b.modules() if isinstance(m, LowRankLinear)]
        assert all(torch.equal(x, y) for x, y in zip(pa, pb))
        seen.add(tuple(torch.cat([p.flatten() for p in pa]).tolist()))
    assert len(seen) == 4


# -- training ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_few_steps_reduce_loss(name):
    model = attach_adapter(llama(), method(name, dropout=0.05), LLAMA_TARGETS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt_ = torch.optim.AdamW(params, lr=1e-3 if name == "fft" else 1e-2)
    losses = []
    for step in range(6):
        resample(model, step, seed=0)
        out = model(input_ids=IDS, labels=IDS)
        loss = out.loss
        extra = aux_loss(model)
        assert (extra is not None) == (name == "mole")
        if extra is not None:
            loss = loss + extra
        opt_.zero_grad()
        loss.backward()
        opt_.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    copy.deepcopy(model)  # e.g. for an EMA or a best-model snapshot, even right after a forward
