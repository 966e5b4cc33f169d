"""A resume never misstates what was trained (issue #28): another config is refused in one line
before anything is touched (or, with trainer.resume=force, continued and recorded as such), a
completed run that trains nothing is left byte for byte as it was, a resume says which checkpoint
it continues, and a bare `trainer.resume=true` finds the run to continue or says there is none.

Every case runs the real command line. One short run (4 steps, checkpoints at 2 and 4) is trained
once and copied into each test's own dir."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, run_cli

ARGS = TINY + ["method=lora", "trainer.max_steps=4", "trainer.save_steps=2", "trainer.save_total_limit=3"]
LR = 5e-5  # conf/trainer/default.yaml: the run below does not set it
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # cwd may be elsewhere


def _files(run_dir: Path) -> dict:
    """Bytes and modification time of the files that say what the run was."""
    names = ["results.json", "metrics.jsonl", ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"]
    return {n: ((run_dir / n).read_bytes(), (run_dir / n).stat().st_mtime_ns) for n in names}


def _error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [l for l in proc.stderr.splitlines() if l.startswith("error:")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> Path:
    run_dir = tmp_path_factory.mktemp("first") / "run"
    proc = run_cli(ARGS + [f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["trainer"]["lr"] == LR
    return run_dir


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _edit_saved(run_dir: Path, key: str, value) -> None:
    """Change one value (`seed` or `lr`) of the config a run says it was trained with, in both
    places that say it: config.trained.yaml and results.json."""
    saved, results = run_dir / "config.trained.yaml", run_dir / "results.json"
    for path, load, dump in ((saved, yaml.safe_load, yaml.safe_dump), (results, json.loads, json.dumps)):
        doc = load(path.read_text())
        cfg = doc if path == saved else doc["config"]
        (cfg if key == "seed" else cfg["trainer"])[key] = value
        path.write_text(dump(doc))


def _interrupt(run_dir: Path) -> None:
    """As if killed right after the step-2 checkpoint was written."""
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    for name in ("results.json", "metrics.jsonl"):
        (run_dir / name).unlink()


def test_a_changed_lr_is_refused_naming_both_values_and_nothing_is_touched(run_dir):
    before = _files(run_dir)
    proc = run_cli(ARGS + [f"hydra.run.dir={run_dir}", "trainer.resume=true", "trainer.lr=1e-4"])
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert f"trainer.lr {LR!r} -> {1e-4!r}" in line and "trainer.resume=force" in line, line
    assert _files(run_dir) == before
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert "parameters trainable" not in proc.stdout  # refused before the model was built


def test_an_interrupted_run_refuses_too_and_keeps_its_checkpoints(run_dir):
    _interrupt(run_dir)
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_cli(ARGS + [f"hydra.run.dir={run_dir}", "trainer.resume=true", "method.r=4"])
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert "method.r 8 -> 4" in line, line
    assert not (run_dir / "results.json").exists()  # no "failed" record over a run that is fine
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == kept


def test_force_trains_on_and_records_both_configs(run_dir):
    before = _files(run_dir)
    proc = run_cli(ARGS + [f"hydra.run.dir={run_dir}", "trainer.resume=force", "trainer.lr=1e-4",
                           "trainer.max_steps=6"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed" and res["train"]["steps"] == 6 and res["train"]["resumed"] is True
    assert res["config"]["trainer"]["lr"] == pytest.approx(1e-4) and res["config"]["trainer"]["max_steps"] == 6
    assert res["resumed_with_changes"] == {"trainer.lr": [LR, 1e-4], "trainer.max_steps": [4, 6]}
    assert f"resumed from {run_dir}/checkpoints/checkpoint-4 (step 4 of 6)" in proc.stdout
    # Hydra's record of the first start is kept; this start's is beside it
    hydra_files = lambda files: {n: v for n, v in files.items() if n.startswith(".hydra")}  # noqa: E731
    assert hydra_files(_files(run_dir)) == hydra_files(before)
    (again,) = (run_dir / ".hydra").glob("resume-*/config.yaml")
    assert yaml.safe_load(again.read_text())["trainer"]["lr"] == pytest.approx(1e-4)
    assert yaml.safe_load((run_dir / "config.trained.yaml").read_text())["trainer"]["lr"] == LR


@pytest.mark.parametrize("extra", [["trainer.resume=true"], ["trainer.resume=force", "trainer.lr=1e-4"]],
                         ids=["same-config", "force-with-nothing-left-to-train"])
def test_a_completed_run_that_trains_no_step_is_left_as_it_is(run_dir, extra):
    before = _files(run_dir)
    proc = run_cli(ARGS + [f"hydra.run.dir={run_dir}", *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already completed" in proc.stdout
    assert _files(run_dir) == before  # bytes and mtimes: results.json, metrics.jsonl and Hydra's files


def test_a_resume_says_which_checkpoint_it_continues(run_dir):
    _interrupt(run_dir)
    proc = run_cli(ARGS + [f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("resumed from")]
    assert lines == [f"resumed from {run_dir}/checkpoints/checkpoint-2 (step 2 of 4)"]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["train"]["resumed"] is True and res["train"]["steps"] == 4 and "resumed_with_changes" not in res


def test_a_bare_resume_continues_the_newest_run_with_this_config(trained, tmp_path):
    runs = tmp_path / "outputs" / "runs" / "2026-01-01"
    older, newer, other = runs / "09-00-00_a", runs / "10-00-00_b", runs / "11-00-00_c"
    for d in (older, newer, other):
        shutil.copytree(trained, d)
    _edit_saved(other, "seed", 7)  # the newest run, trained with another seed
    for age, d in enumerate((other, newer, older)):  # other newest, then newer, then older
        for f in (d / "config.trained.yaml", d / ".hydra" / "config.yaml"):
            os.utime(f, (1e9 - age * 100, 1e9 - age * 100))
    _interrupt(newer)
    proc = run_cli(ARGS + ["trainer.resume=true"], cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"continuing {newer.resolve()}" in proc.stdout
    assert f"resumed from {newer.resolve()}/checkpoints/checkpoint-2 (step 2 of 4)" in proc.stdout
    assert json.loads((newer / "results.json").read_text())["train"]["steps"] == 4
    assert [p.name for p in runs.parent.iterdir()] == ["2026-01-01"]  # no new run dir
    assert sorted(p.name for p in runs.iterdir()) == ["09-00-00_a", "10-00-00_b", "11-00-00_c"]


@pytest.mark.parametrize("present", ["nothing", "only-another-config"])
def test_a_bare_resume_with_nothing_to_resume_says_so_and_makes_no_dir(trained, tmp_path, present):
    if present == "only-another-config":
        shutil.copytree(trained, tmp_path / "outputs" / "runs" / "2026-01-01" / "10-00-00_b")
    made = sorted(tmp_path.rglob("*"))
    proc = run_cli(ARGS + ["trainer.resume=true", "trainer.lr=1e-3"], cwd=tmp_path, env=ENV)
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert line.startswith("error: trainer.resume=true: no run under outputs/runs/ with a checkpoint or results "
                           "has this config, so there is none to resume"), line
    assert sorted(tmp_path.rglob("*")) == made


def test_resume_takes_false_true_or_force_only(tmp_path):
    proc = run_cli(ARGS + [f"hydra.run.dir={tmp_path / 'run'}", "trainer.resume=bogus"])
    assert proc.returncode == 2
    assert _error_lines(proc) == ["error: trainer.resume='bogus' is not one of false, true, force"]
    assert not (tmp_path / "run").exists()


def test_a_sweep_resume_needs_its_sweep_dir(tmp_path):
    proc = run_cli(["-m", *ARGS, "seed=1,2", "trainer.resume=true"], cwd=tmp_path, env=ENV)
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert "add hydra.sweep.dir=" in line and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_each_job_of_a_resumed_sweep_refuses_another_config_and_keeps_its_record(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    first = run_cli(["-m", *ARGS, "seed=1,2", f"hydra.sweep.dir={sweep}"])
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/config.yaml"))
    assert len(jobs) == 2
    changed, kept = jobs
    _interrupt(kept)
    _edit_saved(changed, "lr", 1e-3)  # as if this job had been trained at another lr
    before = _files(changed)
    again = run_cli(["-m", *ARGS, "seed=1,2", f"hydra.sweep.dir={sweep}", "trainer.resume=true"])
    assert "trainer.lr 0.001 -> 5e-05" in again.stdout + again.stderr
    assert _files(changed) == before
    res = json.loads((kept / "results.json").read_text())
    assert res["status"] == "completed" and res["train"]["resumed"] is True and res["train"]["steps"] == 4
    assert len(list((kept / ".hydra").glob("resume-*/config.yaml"))) == 1


def test_a_refusal_inside_the_job_leaves_the_record_as_it_is(tmp_path):
    """Where the check runs in the job (a sweep's job, a value set in a YAML file), the refusal is
    one error and the finished run's results.json is not replaced by a "failed" one."""
    from cola_train.errors import run_guarded
    from cola_train.run import run
    from conftest import compose

    record = tmp_path / "results.json"
    record.write_text(json.dumps({"status": "completed", "config": {"trainer": {"lr": 1.0}}}))
    before = record.read_bytes()
    for extra in (["trainer.resume=bogus"], ["trainer.resume=true"]):
        assert run_guarded(lambda: run(compose(ARGS + extra), tmp_path), tmp_path, exit_on_error=False) is None
        assert record.read_bytes() == before
