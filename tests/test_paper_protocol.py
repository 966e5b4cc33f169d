"""experiment=cola_paper(_multitask[_<method>]) against the values docs/PROTOCOL.md lists (from
/work/shared/PAPERS.md), trainer.effective_batch's derivation, method.pairing's config value."""
from __future__ import annotations

import functools

import pytest
from omegaconf import OmegaConf

from cola_train.batching import apply_effective_batch, derive_grad_accum
from cola_train.checks import validate
from cola_train.config import ConfigError, as_dict, method_view
from conftest import CONF, compose

PROTOCOL = {  # PAPERS.md, CoLA "Protocol"
    "trainer.lr": 5e-5, "trainer.scheduler": "cosine", "trainer.warmup_steps": 20, "trainer.epochs": 5.0,
    "trainer.max_steps": -1, "trainer.batch_size": 8, "trainer.effective_batch": 64,
    "data.cutoff_len": 1024, "data.max_samples": 1000, "data.val_fraction": 0.1,
    "method.r": 8, "method.alpha": 16.0, "method.dropout": 0.0, "method.target_modules": None,
    "eval.chat_template": True, "seed": 42,
}


def check(cfg, expected):
    for key, value in expected.items():
        assert functools.reduce(getattr, key.split("."), cfg) == value, key


@pytest.mark.parametrize("method", ["cola_heuristic", "cola_fully", "lora", "pissa", "hydralora", "dora"])
def test_cola_paper_applies_to_the_chosen_method(method):
    cfg = compose(["experiment=cola_paper", f"method={method}"])
    check(cfg, PROTOCOL)
    assert cfg.method.name == method
    validate(cfg)
    assert cfg.trainer.grad_accum == 8   # one device: 64 / 8


def test_cola_paper_defaults_to_the_readme_command():
    cfg = compose(["experiment=cola_paper"])
    assert (cfg.method.name, cfg.method.num_A, cfg.method.num_B) == ("cola_heuristic", 2, 3)


@pytest.mark.parametrize("preset,method,num_A,num_B,r", [
    ("cola_paper_multitask", "cola_heuristic", 2, 3, 8),
    ("cola_paper_multitask_lora", "lora", 1, 1, 64),
    ("cola_paper_multitask_hydralora", "hydralora", 1, 14, 8),
    ("cola_paper_multitask_cola", "cola_fully", 1, 14, 8),
    ("cola_paper_multitask_cola_t", "cola_fully", 4, 10, 8),
    ("cola_paper_multitask_moelora", "moelora", 8, 8, 8),   # 8 experts sharing r = 8 (tests/test_moelora.py)
])
def test_multitask_presets(preset, method, num_A, num_B, r):
    cfg = compose([f"experiment={preset}"])
    check(cfg, {**PROTOCOL, "method.r": r})
    assert cfg.data.domain == "multitask"
    # LoRA's schema has no num_A / num_B: the layers' view of it has one A and one B
    view = method_view(cfg.method)
    assert (view.name, view.num_A, view.num_B) == (method, num_A, num_B)
    validate(cfg)


def test_multitask_preset_keeps_its_shape_under_another_strategy():
    cfg = compose(["experiment=cola_paper_multitask_cola_t", "method=cola_heuristic"])
    assert (cfg.method.strategy, cfg.method.num_A, cfg.method.num_B) == ("heuristic", 4, 10)


def test_seeds_42_to_46_are_swept_with_m_and_a_single_run_uses_42():
    """hydra.sweeper.params.seed in the preset: the basic sweeper expands it with -m only."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cola_train.config import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=["experiment=cola_paper"], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    jobs = [job for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
            for job in batch]
    assert jobs == [[f"seed={s}"] for s in (42, 43, 44, 45, 46)]
    assert cfg.seed == 42


def test_pissa_alpha_is_the_papers():
    assert compose(["method=pissa"]).method.alpha == 16.0   # LLaMA-Factory --pissa_init with alpha 16


# -- trainer.effective_batch ---------------------------------------------------------------------
@pytest.mark.parametrize("devices,accum", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_grad_accum_derived_for_any_number_of_devices(devices, accum, monkeypatch):
    assert derive_grad_accum(64, 8, devices) == accum
    assert 8 * accum * devices == 64
    monkeypatch.setenv("RANK", "0")                  # inside a rank: the launcher's world size
    monkeypatch.setenv("WORLD_SIZE", str(devices))
    cfg = compose(["experiment=cola_paper"])
    apply_effective_batch(cfg)
    assert cfg.trainer.grad_accum == accum
    assert as_dict(cfg)["trainer"]["grad_accum"] == accum   # what results.json gets


def test_grad_accum_from_trainer_devices_before_spawning(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg = compose(["experiment=cola_paper", "trainer.devices=2"])
    apply_effective_batch(cfg)
    assert cfg.trainer.grad_accum == 4


def test_effective_batch_off_leaves_grad_accum():
    cfg = compose(["trainer.grad_accum=3"])
    validate(cfg)
    assert cfg.trainer.effective_batch is None and cfg.trainer.grad_accum == 3


@pytest.mark.parametrize("overrides,message", [
    (["trainer.effective_batch=64", "trainer.batch_size=6"],
     r"^trainer.effective_batch=64 is not a multiple of trainer.batch_size=6 x 1 device\(s\) = 6; "),
    (["trainer.effective_batch=0"], r"^trainer.effective_batch=0 must be >= 1 \(or null: off\)$"),
    (["experiment=cola_paper", "trainer.grad_accum=3"],
     r"^trainer.grad_accum=3 conflicts with trainer.effective_batch=64 \(which gives 8 on 1 device\(s\)\)"),
    (["method.pairing=papr"], r"^method.pairing='papr' is not one of paper, code$"),
    (["eval.scoring=[letter,mc]"], r"^eval.scoring=\[letter,mc\] must be one or more distinct of letter, cloze$"),
])
def test_bad_values_are_one_line(overrides, message, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def test_effective_batch_not_divisible_on_three_devices(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"effective_batch=64 is not a multiple of .* x 3 device\(s\) = 24"):
        apply_effective_batch(compose(["experiment=cola_paper"]))


def test_heuristic_default_pairing_is_the_papers():
    assert compose(["method=cola_heuristic"]).method.pairing == "paper"
