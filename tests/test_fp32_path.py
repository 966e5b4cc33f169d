"""trainer.fp32_adapter_path: under bf16 autocast the adapters' low-rank path runs in fp32, so a
step far below bf16's rounding step of the factors reaches the output as itself, not as the
rounding noise of the cast factors. Checked against float64, for our layers and for PEFT's."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from cola_train import chain
from cola_train.adapters import attach_adapter, set_kernels, fp32_path, fused_ops, resample, seeded_dropout
from cola_train.adapters.spec import AdapterError
from cola_train.config import MethodConfig
from cola_train.models import upcast_trainable
from test_fused_ops import TARGETS, _cola, _saved_bytes
from test_fused_ops import _llama as _llama_fused

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


def _llama_all(strategy: str) -> nn.Module:
    """test_fused_ops' tiny Llama in bf16, CoLA on all seven projections (down_proj through the
    gated MLP), fp32 master weights, on the fp32 path."""
    model = attach_adapter(_llama_fused(torch.bfloat16), _cola(strategy), TARGETS)
    upcast_trainable(model)
    fp32_path.enable(model)
    model.enable_input_require_grads()
    return model


def _loss_and_grads(model, ids, custom: bool):
    set_kernels(model, custom_backward=custom)
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        resample(model, 0, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        set_kernels(model, custom_backward=True)
    return loss.detach().float(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("strategy", ["fully", "heuristic"])
def test_the_fused_fp32_path_matches_plain_autograd(strategy):
    """fused_ops with fp32 factors beside bf16 activations against the plain fp32 path (autograd),
    without dropout (nn.Dropout draws other masks; the unit test below covers dropout): the same
    loss and factor gradients up to the bf16 rounding of the activations."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    model = _llama_all(strategy)
    loss_f, fused = _loss_and_grads(model, ids, custom=True)
    loss_p, plain = _loss_and_grads(model, ids, custom=False)
    assert abs(float(loss_f - loss_p)) < 0.02 * float(loss_p)
    assert fused.keys() == plain.keys() and len(fused) == 2 * 7 * 2
    for name in fused:
        assert fused[name].dtype == torch.float64 and fused[name].abs().sum() > 0
        rel = float((fused[name] - plain[name]).norm() / plain[name].norm())
        assert rel < 0.05, (name, rel)


def test_the_fused_fp32_path_keeps_no_fp32_copy_of_the_inputs():
    """The plain fp32 path keeps an fp32 copy of every adapted input for backward; the fused one
    keeps the bf16 inputs the base keeps anyway, plus the small fp32 z's."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    model = _llama_all("fully")

    def saved(custom):
        set_kernels(model, custom_backward=custom)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _saved_bytes(model, ids)
        finally:
            set_kernels(model, custom_backward=True)
    fused, plain = saved(True), saved(False)
    # fp32 copies of q/k/v, o, gate/up and down_proj inputs: (3 + 1 + 2) x 64 + 160 wide, 4 bytes, 2 layers
    copies = (6 * 64 + 160) * ids.numel() * 4 * 2
    assert plain - fused >= copies, (fused, plain, copies)


@pytest.mark.parametrize("gated", [False, True])
def test_fused_functions_with_fp32_factors_and_dropout(gated):
    """One fused function, bf16 activations and base weight, fp32 factors, dropout 0.3: output and
    gradients against the same maths in plain autograd ops with the same mask."""
    g = torch.Generator().manual_seed(4)
    d_in, d_out, T, p, seed = 24, 16, 40, 0.3, 77
    a = torch.randn(T, d_in, generator=g).to(torch.bfloat16).requires_grad_(True)
    u = torch.randn(T, d_in, generator=g).to(torch.bfloat16).requires_grad_(True)
    W = torch.randn(d_out, d_in, generator=g).to(torch.bfloat16)
    A = (torch.randn(4, d_in, generator=g) * 0.3).requires_grad_(True)
    B = (torch.randn(d_out, 4, generator=g) * 0.3).requires_grad_(True)
    gout = torch.randn(T, d_out, generator=g).to(torch.bfloat16)

    def fused():
        if gated:
            return fused_ops.GatedLowRankMLP.apply(a, u, W, None, A, B, p, seed)
        return fused_ops.LowRankLinear.apply(a, W, None, A, B, p, seed)

    def reference():
        h = torch.nn.functional.silu(a) * u if gated else a
        update = ((h.float() * seeded_dropout.dropout_mask(h.float(), p, seed)) @ A.t()) @ B.t()
        return (h @ W.t()).float() + update

    results = []
    for fn in (fused, reference):
        for t in (a, u, A, B):
            t.grad = None
        out = fn()
        out.backward(gout.to(out.dtype))
        results.append((out.float(), [t.grad.float() if t.grad is not None else None for t in (a, u, A, B)]))
    (out_f, grads_f), (out_r, grads_r) = results
    assert out_f.dtype == torch.float32 and fused().dtype == torch.bfloat16
    torch.testing.assert_close(out_f, out_r, rtol=2e-2, atol=2e-2)
    for name, gf, gr in zip("a u A B".split(), grads_f, grads_r):
        if gr is None:
            assert gf is None, name
            continue
        rel = float((gf - gr).norm() / gr.norm())
        assert rel < (1e-3 if name in "AB" else 2e-2), (name, rel)
