"""experiment=lr_sweep / cola_paper_lr_sweep (three lrs per method) and the report's pick of each
method's lr by validation loss (report.select_by_eval_loss), never by the benchmark."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cola_train.compose import compose
from cola_train.report import find_jobs, select_by_eval_loss, summarize, write_report


def sweep_jobs(overrides):
    """The job list the basic sweeper makes from the preset's hydra.sweeper.params."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose(overrides, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    jobs = [job for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
            for job in batch]
    as_values = lambda job: tuple(sorted((k, float(v)) for k, v in (o.split("=", 1) for o in job)))
    return cfg, [as_values(job) for job in jobs]


def test_lr_sweep_runs_three_lrs():
    cfg, jobs = sweep_jobs(["experiment=lr_sweep"])
    assert jobs == [(("trainer.lr", lr),) for lr in (5e-5, 1e-4, 2e-4)]


def test_cola_paper_lr_sweep_is_the_protocol_times_three_lrs():
    cfg, jobs = sweep_jobs(["experiment=cola_paper_lr_sweep", "method=pissa"])
    assert len(jobs) == 15
    assert set(jobs) == {(("seed", s), ("trainer.lr", lr)) for s in range(42, 47) for lr in (5e-5, 1e-4, 2e-4)}
    assert cfg.trainer.effective_batch == 64 and cfg.method.alpha == 16 and cfg.method.dropout == 0.0


def test_pissa_collapsed_preset_is_the_2_3_control():
    from cola_train.checks import validate
    from cola_train.config import typed

    cfg = typed(compose(["model=tiny_llama", "method=pissa_collapsed"]))
    validate(cfg)
    m = cfg.method
    assert (m.kind, m.init, m.lr_scale_A, m.lr_scale_B, m.dropout) == ("peft", "pissa", 2.0, 3.0, 0.0)
    assert m.init_tilt == pytest.approx(math.sqrt(2 / 3), rel=1e-14)


# (method, lr, seed) -> (validation loss, benchmark accuracy). lora: lowest validation loss at 1e-4,
# highest accuracy at 2e-4 -- the pick must be 1e-4. pissa: 2e-4 by both.
RUNS = {
    ("lora", 5e-5, 1): (1.50, 0.30), ("lora", 5e-5, 2): (1.60, 0.31),
    ("lora", 1e-4, 1): (1.20, 0.33), ("lora", 1e-4, 2): (1.30, 0.32),
    ("lora", 2e-4, 1): (1.40, 0.45), ("lora", 2e-4, 2): (1.20, 0.47),
    ("pissa", 5e-5, 1): (1.40, 0.30), ("pissa", 2e-4, 1): (1.10, 0.40),
    ("cola_fully", 5e-5, 1): (1.00, 0.50),      # one lr only: nothing to pick
}


def write_sweep(root: Path) -> None:
    for i, ((method, lr, seed), (loss, acc)) in enumerate(RUNS.items()):
        d = root / str(i)
        (d / ".hydra").mkdir(parents=True)
        config = {"model": {"name": "tiny_llama"}, "method": {"name": method},
                  "data": {"domain": "math", "max_samples": 100}, "trainer": {"lr": lr}, "seed": seed}
        (d / ".hydra" / "config.yaml").write_text(json.dumps(config))
        (d / "results.json").write_text(json.dumps({
            "status": "completed", "config": config, "n_train_samples": 100,
            "eval": {"loss_before": None, "loss": loss}, "benchmark": {"name": "gsm8k", "accuracy": acc}}))


def test_report_picks_each_methods_lr_by_validation_loss_not_accuracy(tmp_path):
    write_sweep(tmp_path)
    picks = {p["method"]: p for p in select_by_eval_loss(summarize(find_jobs(tmp_path)))}
    assert set(picks) == {"lora", "pissa"}
    assert picks["lora"]["lr"] == 1e-4                       # mean loss 1.25 < 1.30 (2e-4) < 1.55
    assert picks["lora"]["eval_loss"]["mean"] == pytest.approx(1.25)
    assert picks["lora"]["accuracy"]["mean"] == pytest.approx(0.325)   # the benchmark AT that lr
    assert [lr for lr, _ in picks["lora"]["tried"]] == [5e-5, 1e-4, 2e-4]
    assert picks["pissa"]["lr"] == 2e-4
    md = write_report(tmp_path)["markdown"].read_text()
    assert "## Each method at its best lr (chosen by validation loss, never by the benchmark)" in md
    assert "| tiny_llama | lora |  | math | 100 | 0.0001 | 2 | 1.2500 ± 0.0707 | 0.3250 ± 0.0071 |" in md


def test_no_selection_table_without_an_lr_sweep(tmp_path):
    RUNS_ONE = {k: v for k, v in RUNS.items() if k[1] == 5e-5}
    for i, ((method, lr, seed), (loss, acc)) in enumerate(RUNS_ONE.items()):
        d = tmp_path / str(i)
        (d / ".hydra").mkdir(parents=True)
        config = {"model": {"name": "m"}, "method": {"name": method}, "data": {"domain": "math"},
                  "trainer": {"lr": lr}, "seed": seed}
        (d / ".hydra" / "config.yaml").write_text(json.dumps(config))
        (d / "results.json").write_text(json.dumps({"status": "completed", "config": config, "n_train_samples": 10,
                                                    "eval": {"loss": loss}}))
    assert select_by_eval_loss(summarize(find_jobs(tmp_path))) == []
    assert "best lr" not in write_report(tmp_path)["markdown"].read_text()
