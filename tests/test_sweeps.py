"""Multiruns: one run dir per job, each with results.json, and summary.md / summary.json in the
sweep dir; a failing job is recorded as failed, the sweep goes on, and the multirun exits 1."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose, run_cli

SMALL = ["model=tiny_llama", "data=math", "data.max_samples=8", "data.max_val_samples=4",
         "data.cutoff_len=96", "trainer.batch_size=4", "trainer.max_steps=2", "trainer.warmup_steps=0",
         "trainer.logging_steps=1", "eval=none"]


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent.parent for p in sweep.glob("*/.hydra/hydra.yaml"))


def _summary(sweep: Path) -> dict:
    assert (sweep / "summary.md").is_file()
    return json.loads((sweep / "summary.json").read_text())


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_basic_launcher_sweep_writes_one_dir_per_job_and_a_summary(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    # all in one process, one job after the other: DeepSpeed (a world of one) twice in a row
    proc = run_cli(["-m", *SMALL, "deepspeed=zero3", "method=lora,cola_fully", "method.r=4,0",
                    f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 1, proc.stderr[-3000:]  # failed jobs: exit 1 once the summary is written
    dirs = _job_dirs(sweep)
    assert len(dirs) == 4
    status = {}
    for d in dirs:
        res = json.loads((d / "results.json").read_text())
        status[d.name.split("_", 1)[0]] = res["status"]
    # method.r=0 is bad input: those jobs failed (one line in results.json), the others ran
    assert sorted(status.values()) == ["completed", "completed", "failed", "failed"]
    summary = _summary(sweep)
    assert summary["n_jobs"] == 4 and summary["counts"] == {"completed": 2, "failed": 2}
    for job in summary["jobs"]:
        assert (sweep / job["result"]).is_file()
        if job["status"] == "failed":
            assert "method.r=0" in " ".join(job["overrides"]) and "r" in job["error"]
        else:
            assert job["steps"] == 2 and job["train_loss"] > 0
    md = (sweep / "summary.md").read_text()
    assert "2 completed" in md and "2 failed" in md and "method=cola_fully" in md


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_local_submitit_launcher_sweep(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *SMALL, "hydra/launcher=local", "method=lora,cola_heuristic",
                    f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / ".submitit").is_dir()  # went through submitit's local executor
    dirs = _job_dirs(sweep)
    assert len(dirs) == 2
    for d in dirs:
        assert json.loads((d / "results.json").read_text())["status"] == "completed"
        assert (d / "adapter").is_dir()
    summary = _summary(sweep)
    assert summary["counts"] == {"completed": 2}
    assert [j["num"] for j in summary["jobs"]] == [0, 1]


def test_job_dirname_keeps_short_names_and_cuts_long_ones_uniquely():
    from cola_train.dirnames import LIMIT, job_dirname

    short = "method=lora,seed=1"
    assert job_dirname(short) == short                      # existing sweep dirs keep their names
    long_a, long_b = "x" * 300 + ",seed=1", "x" * 300 + ",seed=2"
    cut_a, cut_b = job_dirname(long_a), job_dirname(long_b)
    assert len(cut_a.encode()) == LIMIT and cut_a.startswith("x" * 150)
    assert cut_a != cut_b and job_dirname(long_a) == cut_a   # one dir per job, the same every time
    assert len(job_dirname("é" * 300).encode()) <= LIMIT      # bytes, not characters, hit the limit


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_sweep_with_many_overrides_gets_dirs_the_file_system_takes(tmp_path, data_root):
    """Over 255 bytes of overrides used to kill every job with 'File name too long'; here through
    submitit's local executor, whose worker process resolves the job dir itself."""
    sweep = tmp_path / "sweep"
    many = ["trainer.eval_batch_size=4", "trainer.save_steps=400", "trainer.save_total_limit=1",
            "trainer.max_grad_norm=1.0", "method.dropout=0.0", "data.template=plain"]
    proc = run_cli(["-m", *SMALL, *many, "hydra/launcher=local", "method=lora", "seed=1,2",
                    f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = _job_dirs(sweep)
    assert len(dirs) == 2
    for d in dirs:  # cut to a prefix and a hash of the full name
        assert len(d.name.encode()) <= 210 and re.fullmatch(r"[01]_.*,seed=\d+.*_[0-9a-f]{10}", d.name), d.name
    for d in dirs:
        assert json.loads((d / "results.json").read_text())["status"] == "completed"


def test_summary_lists_jobs_that_never_started_or_died(tmp_path):
    from cola_train.sweep import summarize

    for num, status in [(0, "completed"), (2, None)]:
        job = tmp_path / f"{num}_seed={num}"
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save({"hydra": {"job": {"num": num}, "overrides": {"task": [f"seed={num}"]}}},
                       job / ".hydra" / "hydra.yaml")
        if status:
            (job / "results.json").write_text(json.dumps(
                {"status": status, "train": {"loss": 1.5, "steps": 3}, "eval": {"loss": 1.25}}))
    config = OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                                     "params": None},
                                         "overrides": {"task": ["seed=0,1,2"]}}})
    summary = summarize(tmp_path, config)
    assert [(j["num"], j["status"]) for j in summary["jobs"]] == [(0, "completed"), (1, "missing"), (2, "unknown")]
    assert summary["jobs"][1]["overrides"] == ["seed=1"]
    assert summary["jobs"][0]["result"] == "0_seed=0/results.json"
    md = (tmp_path / "summary.md").read_text()
    assert "| 1 | seed=1 | missing |" in md


def test_report_failure_is_one_warning(tmp_path, monkeypatch, caplog):
    import cola_train.report as report
    from cola_train import sweep

    def boom(_):
        raise RuntimeError("no results to plot\nsecond line")
    monkeypatch.setattr(report, "write_report", boom)
    with caplog.at_level("WARNING", logger="cola_train"):
        sweep._report(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"report for {tmp_path} not written: RuntimeError: no results to plot"]


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launcher_options_compose(launcher, target):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cola_train.config import register_schemas
    from conftest import CONF

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"hydra/launcher={launcher}"],
                            return_hydra_config=True)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_.endswith(target)
    if launcher == "slurm":
        for key in ("partition", "account", "qos", "nodes", "gpus_per_node", "tasks_per_node",
                    "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism"):
            assert key in launcher_cfg, key
    assert cfg.hydra.callbacks.sweep_summary._target_ == "cola_train.sweep.SweepSummary"
