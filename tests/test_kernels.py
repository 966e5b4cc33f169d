"""trainer.kernels: which fused model kernels a run uses, the fallback when Liger cannot run, and
(on a GPU) that a Liger-patched Llama with our adapters computes what the unpatched one does."""
from __future__ import annotations

import copy

import pytest
import torch

from cola_train import kernels
from cola_train.config import ConfigError
from conftest import TINY, run_cli


def test_auto_falls_back_to_none_off_gpu_and_says_why():
    choice, why = kernels.choose("auto", "llama", cuda=False)
    assert choice == "none" and "no CUDA device" in why


def test_auto_without_liger_installed_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    choice, why = kernels.choose("auto", "llama", cuda=True)
    assert choice == "none" and "pip install 'cola_train[gpu]'" in why


def test_auto_picks_liger_where_it_can_run(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    assert kernels.choose("auto", "llama", cuda=True)[0] == "liger"
    assert kernels.choose("auto", "opt", cuda=True)[0] == "none"   # wired for Llama-family bases only


def test_liger_asked_for_where_it_cannot_run_is_one_config_error(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer.kernels=liger: liger-kernel is not installed"):
        kernels.choose("liger", "llama", cuda=True)
    with pytest.raises(ConfigError, match=r"no CUDA device is visible; use trainer.kernels=auto or none"):
        kernels.choose("liger", "llama", cuda=False)


def test_apply_none_leaves_the_model_alone():
    model = torch.nn.Linear(2, 2)
    before = copy.deepcopy(model.state_dict())
    assert kernels.apply(model, "none", zero3=False, targets=[]) == {"name": "none"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("args,pattern", [
    (["trainer.kernels=fast"], r"trainer.kernels='fast' is not one of auto, liger, none"),
    (["trainer.kernels=liger"], r"trainer.kernels=liger: liger kernels are Triton GPU kernels and no CUDA device"),
])
def test_cli_bad_kernels_value_is_one_line(tmp_path, args, pattern):
    import re

    proc = run_cli(TINY + args + [f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr
    assert any(re.search(pattern, line) for line in proc.stderr.splitlines()), proc.stderr[-2000:]


def test_liger_leaves_transformers_llama_classes_as_they_were(monkeypatch):
    """Liger's model= path swaps LlamaMLP / LlamaRMSNorm in transformers' module for the whole
    process; apply() puts them back, so the next model (an in-process sweep's next job) is built
    from transformers' own classes and our gated MLP path still takes its MLPs. A stand-in for
    liger_kernel does what Liger 0.8.5's apply_liger_kernel_to_llama does to the module."""
    import sys
    import types

    from transformers.models.llama import modeling_llama

    before = {k: getattr(modeling_llama, k) for k in ("LlamaMLP", "LlamaRMSNorm", "apply_rotary_pos_emb")}
    fake_rope = object()

    def fake_apply(rope, rms_norm, swiglu, cross_entropy, fused_linear_cross_entropy, model):
        modeling_llama.LlamaMLP, modeling_llama.LlamaRMSNorm = type("LigerSwiGLUMLP", (), {}), type("LigerRMSNorm", (), {})
        modeling_llama.apply_rotary_pos_emb = fake_rope

    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = fake_apply
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    try:
        kernels.apply(torch.nn.Linear(2, 2), "liger", zero3=False, targets=[])
        assert modeling_llama.LlamaMLP is before["LlamaMLP"]
        assert modeling_llama.LlamaRMSNorm is before["LlamaRMSNorm"]
        assert modeling_llama.apply_rotary_pos_emb is fake_rope   # read at call time by the patched model
        kernels.apply(torch.nn.Linear(2, 2), "none", zero3=False, targets=[])
        assert modeling_llama.apply_rotary_pos_emb is before["apply_rotary_pos_emb"]
    finally:
        for k, v in before.items():
            setattr(modeling_llama, k, v)


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["cola_heuristic", "lora_ours", "hydralora"])
def test_liger_base_with_our_adapters_matches_the_plain_base(method):
    """Same weights, same adapter init, same batch: loss and every trainable gradient agree (fp32,
    Triton vs torch: 1e-4 relative); our gated MLP replaces Liger's SwiGLU where down_proj is ours."""
    pytest.importorskip("liger_kernel")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from transformers.models.llama import modeling_llama

    from cola_train import adapters
    from cola_train.adapters import gated_mlp
    from cola_train.config import MethodConfig

    cfgs = {"cola_heuristic": dict(kind="cola", strategy="heuristic", num_A=2, num_B=3),
            "lora_ours": dict(kind="cola", strategy="fully", num_A=1, num_B=1),
            "hydralora": dict(kind="hydralora", num_A=1, num_B=3)}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    batch = torch.randint(3, 320, (2, 64), device="cuda")

    def step(model):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        aux = adapters.aux_loss(model)
        (loss if aux is None else loss + aux).backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def build():
        model = _tiny_llama(0).cuda()
        torch.manual_seed(1)
        return model, MethodConfig(name=method, r=8, alpha=16, dropout=0.0, init="lora", **cfgs[method])

    rope = modeling_llama.apply_rotary_pos_emb
    try:
        plain, m = build()
        plain = adapters.attach_adapter(plain, m, targets)
        with torch.no_grad():   # B = 0 would give A no gradient: non-zero B's on both sides
            for name, p in plain.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.02)
        b_values = {n: p.detach().clone() for n, p in plain.named_parameters() if "lora_B" in n}
        loss_ref, grads_ref = step(plain)

        patched, m = build()
        applied = kernels.apply(patched, "liger", zero3=False, targets=targets)
        assert applied["fused_linear_cross_entropy"]
        patched = adapters.attach_adapter(patched, m, targets)
        with torch.no_grad():
            for name, p in patched.named_parameters():
                if name in b_values:
                    p.copy_(b_values[name])
        assert "LigerRMSNorm" in str(patched)
        routed = [mlp for mlp in patched.modules() if gated_mlp.routing(mlp) is not None]
        assert routed and all(type(mlp).__name__ in str(patched) for mlp in routed)
        loss, grads = step(patched)
    finally:
        modeling_llama.apply_rotary_pos_emb = rope
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        ref = grads_ref[name]
        err = (grads[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 1e-3, (name, float(err))


def test_a_cpu_run_records_the_kernels_it_used(tmp_path):
    """On this CPU machine auto resolves to none: results.json says which kernels ran."""
    import json

    proc = run_cli(TINY + ["trainer.max_steps=1", "trainer.save_steps=0", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["kernels"] == {"name": "none"}
