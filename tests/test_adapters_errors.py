"""Every bad input fails with a one-line AdapterError that names the value."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from cola_train.adapters import (AdapterError, attach_adapter, commit_adapter, export_peft, load_adapter,
                                 merge_adapter, merged_model, reinit_adapter, save_adapter, unmerge_adapter)
from cola_train.config import MethodConfig

TARGETS = ["q_proj", "v_proj"]


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=64))


def cfg(**kw):
    base = dict(kind="cola", r=2, alpha=4.0, dropout=0.0, num_A=2, num_B=3)
    base.update(kw)
    return MethodConfig(**base)


@pytest.mark.parametrize("kw,match", [
    (dict(kind="bogus"), r"unknown method kind 'bogus'"),
    (dict(kind="chain"), r"kind 'chain' is a training schedule"),
    (dict(r=0), r"method.r must be an integer >= 1, got 0"),
    (dict(alpha=0.0), r"method.alpha must be > 0, got 0.0"),
    (dict(alpha=-1.0), r"method.alpha must be > 0, got -1.0"),
    (dict(dropout=1.0), r"method.dropout must be in \[0, 1\), got 1.0"),
    (dict(num_A=0), r"method.num_A must be an integer >= 1, got 0"),
    (dict(num_B=0), r"method.num_B must be an integer >= 1, got 0"),
    (dict(strategy="greedy"), r"unknown method.strategy 'greedy'"),
    (dict(init="gaussian"), r"unknown method.init 'gaussian'"),
    (dict(impl="triton"), r"unknown method.impl 'triton'"),
    (dict(kind="peft", num_A=2, num_B=1), r"kind 'peft' .* one A and one B: got num_A=2"),
    (dict(kind="hydralora", num_A=2, num_B=3), r"hydralora shares one A .* num_A must be 1, got 2"),
    (dict(kind="hydralora", num_A=1, num_B=1), r"hydralora needs num_B >= 2 heads .* got 1"),
    (dict(kind="mole", num_A=1, num_B=1), r"mole needs num_A >= 2 experts to gate between, got 1"),
    (dict(kind="mole", num_A=2, num_B=3), r"num_B must equal num_A=2, got 3"),
    (dict(kind="mole", num_A=2, num_B=2, balance_coef=-1.0), r"balance_coef must be >= 0, got -1.0"),
    (dict(kind="mole", num_A=2, num_B=2, expert_paths=["a"]), r"num_A=2 experts but 1 expert_paths"),
    (dict(kind="mole", num_A=2, num_B=2, freeze_experts=True), r"freeze_experts=true needs expert_paths"),
    (dict(kind="mole", num_A=2, num_B=2, expert_paths=["a", "b"]), r"mole expert 'a' is not a PEFT LoRA"),
    (dict(expert_paths=["a"]), r"expert_paths is only used by kind 'mole', 'mole_block', not 'cola'"),
    (dict(target_modules=["q_proj", "qkv"]), r"target module 'qkv' not found; the model's linear modules "
                                             r"are: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                             r"down_proj, lm_head$"),
])
def test_bad_config(kw, match):
    with pytest.raises(AdapterError, match=match):
        attach_adapter(llama(), cfg(**kw), TARGETS)


def test_messages_are_one_line():
    with pytest.raises(AdapterError) as err:
        attach_adapter(llama(), cfg(target_modules=["nope"]), TARGETS)
    assert "\n" not in str(err.value)


def test_no_targets_and_unknown_key_and_double_attach():
    with pytest.raises(AdapterError, match="no target modules"):
        attach_adapter(llama(), cfg(), [])
    with pytest.raises(AdapterError, match=r"unknown method config key 'rank'"):
        attach_adapter(llama(), {"kind": "cola", "rank": 4}, TARGETS)
    model = attach_adapter(llama(), cfg(), TARGETS)
    with pytest.raises(AdapterError, match="already has an adapter"):
        attach_adapter(model, cfg(), TARGETS)
    with pytest.raises(AdapterError, match="already has an adapter"):
        attach_adapter(attach_adapter(llama(), cfg(kind="peft", num_A=1, num_B=1), TARGETS), cfg(), TARGETS)


def test_omegaconf_node_accepted():
    node = OmegaConf.structured(cfg(strategy="heuristic"))
    model = attach_adapter(llama(), node, TARGETS)
    assert model.model.layers[0].self_attn.q_proj.combiner.strategy == "heuristic"


def test_routed_methods_cannot_merge_or_export(tmp_path):
    for kind, kw in (("hydralora", dict(num_A=1)), ("mole", dict(num_B=2))):
        model = attach_adapter(llama(), cfg(kind=kind, **kw), TARGETS)
        for fn in (merge_adapter, unmerge_adapter, merged_model):
            with pytest.raises(AdapterError, match=f"{kind} routes each token"):
                fn(model)
        with pytest.raises(AdapterError, match=f"{kind} has an input-dependent router"):
            export_peft(model, tmp_path)
    fft = attach_adapter(llama(), cfg(kind="none"), TARGETS)
    with pytest.raises(AdapterError, match="kind none"):
        export_peft(fft, tmp_path)
    with pytest.raises(AdapterError, match="kind none"):
        reinit_adapter(fft)
    with pytest.raises(AdapterError, match="reinit rank must be an integer >= 1, got 0"):
        reinit_adapter(attach_adapter(llama(), cfg(), TARGETS), rank=0)
    with pytest.raises(AdapterError, match="no adapter attached"):
        save_adapter(llama(), tmp_path)


def test_load_mismatches(tmp_path):
    model = attach_adapter(llama(), cfg(strategy="fully"), TARGETS)
    save_adapter(model, tmp_path)
    with pytest.raises(AdapterError, match=r"asks for cola/random .*: strategy 'fully' != 'random'"):
        load_adapter(llama(), str(tmp_path), method_cfg=cfg(strategy="random"))
    with pytest.raises(AdapterError, match=r"r 2 != 4"):
        load_adapter(llama(), str(tmp_path), method_cfg=cfg(r=4))
    with pytest.raises(AdapterError, match="not a saved cola_train adapter"):
        load_adapter(llama(), str(tmp_path / "missing"))
    meta_path = tmp_path / "cola_adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["method"]["num_B"] = 4  # weights saved for 3 B's
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=r"lora_B' has shape \(32, 3, 2\) but method cola/fully .* expects "
                                           r"\(32, 4, 2\)"):
        load_adapter(llama(), str(tmp_path))
    meta["method"].update(kind="hydralora", num_A=1, num_B=3)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=r"lora_A' has shape \(2, 2, 32\) but method hydralora .* expects "
                                           r"\(2, 32\)"):
        load_adapter(llama(), str(tmp_path))
    meta["method"].update(kind="cola", num_A=2, num_B=3, init="pissa")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=r"lacks its initial factors A0/B0"):
        load_adapter(llama(), str(tmp_path))
    meta["method"].update(init="lora")
    meta_path.write_text(json.dumps(meta))
    tensors = load_file(tmp_path / "cola_adapter.safetensors")
    tensors["model.layers.0.mlp.up_proj.lora_A"] = torch.zeros(1)
    save_file(tensors, tmp_path / "cola_adapter.safetensors")
    with pytest.raises(AdapterError, match=r"'model.layers.0.mlp.up_proj.lora_A' in .* matches no cola/fully"):
        load_adapter(llama(), str(tmp_path))
    del tensors["model.layers.0.mlp.up_proj.lora_A"]
    tensors["model.layers.0.self_attn.q_proj.extra"] = torch.zeros(1)
    save_file(tensors, tmp_path / "cola_adapter.safetensors")
    with pytest.raises(AdapterError, match=r"'model.layers.0.self_attn.q_proj.extra' is not part of method"):
        load_adapter(llama(), str(tmp_path))


def test_committed_factors_broken_on_disk_or_merged(tmp_path):
    """A chain's committed links (a frozen path beside the weight) saved with the adapter: a file
    missing one factor, or one that does not fit the layer, is one clear error; a merged layer
    cannot commit its factors."""
    model = attach_adapter(llama(), cfg(), TARGETS)
    merge_adapter(model)
    with pytest.raises(AdapterError, match=r"commit_factors on a merged layer: unmerge_adapter first"):
        commit_adapter(model)
    unmerge_adapter(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    commit_adapter(model)
    reinit_adapter(model)
    save_adapter(model, tmp_path)
    path = tmp_path / "cola_adapter.safetensors"
    tensors = load_file(path)
    key = "model.layers.0.self_attn.q_proj.committed_B"
    assert tensors[key].shape == (32, 2)   # one link; fully collaborative: (sum of B's)(sum of A's), rank r
    broken = dict(tensors)
    del broken[key]
    save_file(broken, path)
    with pytest.raises(AdapterError, match=r"'model.layers.0.self_attn.q_proj' .* has only one of its committed "
                                           r"factors committed_A/committed_B"):
        load_adapter(llama(), str(tmp_path))
    broken[key] = torch.zeros(32, 3)
    save_file(broken, path)
    with pytest.raises(AdapterError, match=r"committed_A \(2, 32\) / committed_B \(32, 3\) do not fit"):
        load_adapter(llama(), str(tmp_path))


def test_mole_expert_with_wrong_rank(tmp_path):
    lora = attach_adapter(llama(), cfg(kind="peft", num_A=1, num_B=1, r=4), TARGETS)
    save_adapter(lora, tmp_path / "e")
    paths = [str(tmp_path / "e")] * 2
    with pytest.raises(AdapterError, match=r"lora_A \(4, 32\) / lora_B \(32, 4\) do not fit r=2"):
        attach_adapter(llama(), cfg(kind="mole", num_B=2, expert_paths=paths), TARGETS)
    with pytest.raises(AdapterError, match=r"has no LoRA weights for module 'model.layers.0.self_attn.k_proj'"):
        attach_adapter(llama(), cfg(kind="mole", num_B=2, r=4, expert_paths=paths, target_modules=["k_proj"]),
                       TARGETS)
