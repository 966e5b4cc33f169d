"""method.lr_scale_A / lr_scale_B / init_tilt (cola_train/factor_scales.py): the collapsed control
of CoLA-fully(M, N) and the optimizer's parameter groups.

The reference for the control is the algebra in factor_scales' docstring, checked here by training
both models in float64 and comparing logits: CoLA-fully(M, N) with split PiSSA against one PEFT
PiSSA adapter with A's lr x M, B's lr x N and the init tilted by sqrt(M/N). The two inits round
differently in float32 (our SVD split vs PEFT's), so the logits agree to ~1e-7, not bit for bit;
the controls that are NOT equivalent (no tilt, or the scales swapped under Adam) differ by far more,
which the test checks too so that it can fail.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from cola_train import factor_scales
from cola_train.adapters import attach_adapter
from cola_train.config import ConfigError, MethodConfig

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
M, N = 2, 3


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def cola_fully():
    return MethodConfig(name="cola_fully", kind="cola", strategy="fully", num_A=M, num_B=N, r=4, alpha=8.0,
                        dropout=0.0, init="pissa", svd="exact")


def pissa(**scales):
    return MethodConfig(name="pissa", kind="peft", init="pissa", svd="exact", r=4, alpha=8.0, dropout=0.0, **scales)


def attached(method_cfg):
    """Attached in float32 (PEFT refuses a PiSSA init in float64), then trained in float64."""
    model = attach_adapter(llama(), method_cfg, TARGETS).double()
    factor_scales.tilt_init(model)
    return model


def train(model, optimizer_cls, lr, steps=4):
    """A few optimizer steps on one batch; the logits after each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"weight_decay": 0.0} if optimizer_cls is torch.optim.AdamW else {}
    opt = optimizer_cls(params, lr=lr, **kwargs)
    factor_scales.split_param_groups(opt, model)
    out = []
    for _ in range(steps):
        model.train()
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            out.append(model(input_ids=IDS).logits)
    return torch.stack(out)


def gap(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("optimizer_cls,lr", [(torch.optim.SGD, 0.5), (torch.optim.AdamW, 1e-2)],
                         ids=["sgd", "adamw"])
def test_cola_fully_collapses_to_tilted_pissa_with_scaled_lrs(optimizer_cls, lr):
    cola = train(attached(cola_fully()), optimizer_cls, lr)
    control = train(attached(pissa(lr_scale_A=M, lr_scale_B=N, init_tilt=math.sqrt(M / N))), optimizer_cls, lr)
    untilted = train(attached(pissa(lr_scale_A=M, lr_scale_B=N)), optimizer_cls, lr)
    plain = train(attached(pissa()), optimizer_cls, lr)
    assert gap(cola, control) < 1e-5          # init rounding only (float32 SVD split), see the module doc
    assert gap(cola, untilted) > 1e-3         # the tilt is needed
    assert gap(cola, plain) > 1e-3            # and the scales


def test_sgd_plain_pissa_matches_with_the_scales_swapped():
    """The docstring's SGD remark: untilted PiSSA equals CoLA-fully(M, N) with A x N, B x M."""
    cola = train(attached(cola_fully()), torch.optim.SGD, 0.5)
    swapped = train(attached(pissa(lr_scale_A=N, lr_scale_B=M)), torch.optim.SGD, 0.5)
    assert gap(cola, swapped) < 1e-5


def test_tilt_keeps_the_output_and_scales_the_factors():
    plain, tilted = attached(pissa()), attached(pissa(init_tilt=2.0))
    with torch.no_grad():
        assert gap(plain(input_ids=IDS).logits, tilted(input_ids=IDS).logits) < 1e-12
    p, t = dict(plain.named_parameters()), dict(tilted.named_parameters())
    name_a = next(n for n in p if n.endswith("q_proj.lora_A.default.weight"))
    name_b = name_a.replace("lora_A", "lora_B")
    assert torch.allclose(t[name_a], 2.0 * p[name_a], rtol=0, atol=1e-14)
    assert torch.allclose(t[name_b], 0.5 * p[name_b], rtol=0, atol=1e-14)


def _groups(model, lr=1e-3, weight_decay=0.1, tmp_path=None):
    from cola_train.trainer import ColaTrainer

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=lr, weight_decay=weight_decay,
                             report_to=[], use_cpu=True)
    trainer = ColaTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g.get("factor"), g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]])
            for g in optimizer.param_groups]


@pytest.mark.parametrize("method_cfg", [
    pissa(lr_scale_A=2.0, lr_scale_B=3.0),
    MethodConfig(name="hydralora", kind="hydralora", num_B=3, r=4, alpha=8.0, lr_scale_A=2.0, lr_scale_B=3.0),
], ids=["peft", "ours_with_router"])
def test_trainer_param_groups_have_the_scaled_lrs(method_cfg, tmp_path):
    model = attach_adapter(llama(), method_cfg, TARGETS)
    groups = _groups(model, tmp_path=tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    seen = [n for *_, names in groups for n in names]
    assert sorted(seen) == sorted(trainable)                      # every trainable tensor, once
    for which, lr, wd, names in groups:
        want = {"A": 2e-3, "B": 3e-3, "other": 1e-3}[which]
        assert lr == pytest.approx(want)
        for n in names:  # each tensor sits in the group its name says
            expect = "A" if ".lora_A" in n else "B" if ".lora_B" in n else "other"
            assert which == expect, n
    assert {which for which, *_ in groups} >= {"A", "B"}
    if method_cfg.kind == "hydralora":
        assert "other" in {which for which, *_ in groups}       # the router keeps the base lr
    # the Trainer's weight-decay split is kept: biases / norms would sit at 0, the rest at 0.1
    assert {wd for _, _, wd, _ in groups} <= {0.0, 0.1}


def test_default_scales_leave_the_trainers_groups_alone(tmp_path):
    groups = _groups(attach_adapter(llama(), pissa(), TARGETS), tmp_path=tmp_path)
    assert all(which is None and lr == 1e-3 for which, lr, _, _ in groups)


@pytest.mark.parametrize("override,message", [
    ("method.lr_scale_A=0", "method.lr_scale_A=0 must be a finite number > 0"),
    ("method.init_tilt=-1", "method.init_tilt=-1 must be a finite number > 0"),
])
def test_bad_scale_is_one_line(override, message):
    from cola_train.checks import validate

    from conftest import compose

    cfg = compose(["model=tiny_llama", "method=pissa", override])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(cfg)


def test_scale_on_full_finetuning_is_refused():
    """fft's schema has no factors to scale: the key is unknown at compose time."""
    from conftest import compose

    with pytest.raises(ConfigError, match=r"unknown key 'method\.lr_scale_B'; method \(kind none\)"):
        compose(["model=tiny_llama", "method=fft", "method.lr_scale_B=2"])


def test_scale_without_that_factor_is_refused(tmp_path):
    """A method whose B-factors do not train (or are named otherwise) cannot take lr_scale_B silently."""
    model = attach_adapter(llama(), pissa(lr_scale_B=2.0), TARGETS)
    for name, p in model.named_parameters():
        if ".lora_B" in name:
            p.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"method\.lr_scale_B=2, but method=pissa has no trainable B-factor"):
        _groups(model, tmp_path=tmp_path)



def test_build_model_applies_the_tilt():
    """run.build_model tilts right after attaching: pissa_collapsed's A = sqrt(2/3) x pissa's."""
    from transformers import set_seed

    from cola_train.run import build_model

    from conftest import compose

    over = ["model=tiny_llama", "method.svd=exact", "method.dropout=0.0"]
    set_seed(0)   # as run() does before build_model: the same random tiny model twice
    _, plain, _ = build_model(compose(over + ["method=pissa"]))
    set_seed(0)
    _, tilted, _ = build_model(compose(over + ["method=pissa_collapsed"]))
    p, t = dict(plain.named_parameters()), dict(tilted.named_parameters())
    name = next(n for n in p if n.endswith("layers.0.self_attn.q_proj.lora_A.default.weight"))
    assert torch.allclose(t[name], math.sqrt(2 / 3) * p[name], rtol=1e-6, atol=0)
    assert torch.allclose(t[name.replace("lora_A", "lora_B")], p[name.replace("lora_A", "lora_B")] / math.sqrt(2 / 3),
                          rtol=1e-6, atol=0)


def _losses(run_dir):
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_cli_cola_fully_and_its_collapsed_control_train_alike(tmp_path, data_root):
    """The real CLI path (Trainer's AdamW, our param groups, the tilt in build_model): CoLA-fully(2, 3)
    and method=pissa_collapsed give the same training losses (fp32, no clipping; float32 init
    rounding only), plain PiSSA with the same lr scales but no tilt does not."""
    from conftest import TINY, run_cli

    common = [a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.save_steps"))] + [
        "trainer.max_steps=5", "trainer.save_steps=0", "trainer.lr=1e-2", "trainer.max_grad_norm=0",
        "method.svd=exact", "method.dropout=0.0", "trainer.precision=fp32"]
    runs = {"cola": ["method=cola_fully"], "control": ["method=pissa_collapsed"],
            "untilted": ["method=pissa", "method.lr_scale_A=2", "method.lr_scale_B=3"]}
    losses = {}
    for name, args in runs.items():
        proc = run_cli(common + args + [f"hydra.run.dir={tmp_path / name}"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        losses[name] = _losses(tmp_path / name)
    assert len(losses["cola"]) == 5
    gap = lambda a, b: max(abs(x - y) for x, y in zip(losses[a], losses[b]))
    assert gap("cola", "control") < 1e-4, losses
    assert gap("cola", "untilted") > 1e-3, losses
