"""`hydra/launcher=slurm` against a real single-node SLURM cluster that scripts/slurm_local.sh
starts (installing slurm-wlm + munge with apt where needed; skipped, saying why, where it can't).

One sweep of two jobs goes through sbatch; job 1 gets submitit's preemption signal (USR2) in the
middle of training: it saves a checkpoint, requeues itself, and the second attempt resumes from
that checkpoint and finishes all its steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA_ROOT, REPO, run_cli

SCRIPT = REPO / "scripts" / "slurm_local.sh"
STEPS = 8
SWEEP = ["model=tiny_llama", "data=math", "data.max_samples=16", "data.max_val_samples=4",
         "data.cutoff_len=96", "trainer.batch_size=4", f"trainer.max_steps={STEPS}",
         "trainer.warmup_steps=0", "trainer.logging_steps=1", "trainer.save_steps=100", "eval=none",
         "hydra/launcher=slurm", "hydra.launcher.mem_gb=1", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=15", "method=lora,cola_heuristic"]


@pytest.fixture(scope="module")
def slurm_cluster():
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    if not was_up:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
        if proc.returncode == 3:
            pytest.skip(f"no local SLURM: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, proc.stderr
    yield
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


def _wait(predicate, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"sweep ended while waiting for {what}: rc={proc.returncode}\n{err[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def _logged_steps(job_dir: Path) -> list[int]:
    path = job_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r["step"] for r in rows if "loss" in r]


def _slurm_ids(sweep: Path) -> list[str]:
    return sorted(p.name for p in (sweep / ".submitit").glob("*_*") if p.is_dir())


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_slurm_sweep_runs_through_sbatch_and_a_preempted_job_resumes(slurm_cluster, tmp_path, data_root):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "COLA_DATA_ROOT": str(DATA_ROOT), "HYDRA_FULL_ERROR": "0",
           "COLA_TRAIN_DEBUG_STEP_SLEEP_S": "1.0"}  # slow steps: the signal lands mid-run
    proc = subprocess.Popen([sys.executable, "-m", "cola_train", "-m", *SWEEP, f"hydra.sweep.dir={sweep}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job1 = lambda: next(iter(sweep.glob("1_*/")), None)  # noqa: E731
        _wait(lambda: job1() is not None and len(_logged_steps(job1())) >= 2, 240,
              "job 1 to log two steps", proc)
        ids = [i for i in _slurm_ids(sweep) if i.endswith("_1")]
        assert ids, _slurm_ids(sweep)
        subprocess.run(["scancel", "--signal=USR2", ids[0]], check=True)  # submitit's preemption signal
        out, err = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            proc.kill()
        for job_id in _slurm_ids(sweep) if sweep.is_dir() else []:
            subprocess.run(["scancel", job_id.split("_")[0]], capture_output=True)
    assert proc.returncode == 0, err[-3000:]

    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["counts"] == {"completed": 2}, summary
    by_num = {j["num"]: j for j in summary["jobs"]}
    assert by_num[0]["resumed"] is False and by_num[0]["steps"] == STEPS
    # the preempted job: requeued, resumed from its checkpoint, all steps done
    job_dir = sweep / by_num[1]["dir"]
    res = json.loads((job_dir / "results.json").read_text())
    assert res["status"] == "completed" and res["train"]["resumed"] is True
    assert res["train"]["steps"] == STEPS
    saved = sorted(int(p.name.split("-")[1]) for p in (job_dir / "checkpoints").glob("checkpoint-*"))
    assert saved[-1] == STEPS and 0 < saved[0] < STEPS, saved  # the one written on the signal
    steps = _logged_steps(job_dir)
    stop = saved[0]
    assert steps == list(range(1, stop + 1)) + list(range(stop + 1, STEPS + 1)), steps
    assert 4.0 < res["train"]["loss"] < 7.0  # mean over all 8 steps, not only the resumed ones
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*_1/*.err"))
    assert "this job is preempted" in logs


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_slurm_tasks_are_the_ranks_of_one_deepspeed_run(slurm_cluster, tmp_path, data_root):
    """tasks_per_node=2: one job, two SLURM tasks, one ZeRO-3 world of two ranks."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "model=tiny_llama", "data=math", "data.max_samples=16", "data.max_val_samples=4",
                    "data.cutoff_len=96", "trainer.batch_size=2", "trainer.max_steps=4", "trainer.warmup_steps=0",
                    "trainer.logging_steps=1", "eval=none", "deepspeed=zero3", "hydra/launcher=slurm",
                    "hydra.launcher.mem_gb=1", "hydra.launcher.cpus_per_task=1", "hydra.launcher.tasks_per_node=2",
                    "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}"], timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job_dir,) = [p.parent.parent for p in sweep.glob("*/.hydra/hydra.yaml")]
    res = json.loads((job_dir / "results.json").read_text())
    assert res["status"] == "completed" and res["train"]["steps"] == 4
    # 16 train samples, 2 per rank and step: with two ranks 4 steps are one epoch (half with one)
    rows = [json.loads(l) for l in (job_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "loss" in r] == [0.25, 0.5, 0.75, 1.0]  # rank 0 alone writes
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "SLURM task 0 of 2 is rank 0" in logs and "SLURM task 1 of 2 is rank 1" in logs


def test_slurm_launcher_without_sbatch_is_one_line(tmp_path):
    proc = run_cli(["-m", "hydra/launcher=slurm", "model=tiny_llama", f"hydra.sweep.dir={tmp_path}"],
                   env={"PATH": str(tmp_path)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: hydra/launcher=slurm submits jobs with SLURM's sbatch, which is not on PATH "
                     "here; run on a SLURM login node, or use hydra/launcher=local (or no launcher) on "
                     "this machine"], proc.stderr


def test_slurm_launcher_chosen_in_a_config_without_sbatch_is_one_line(monkeypatch, capsys):
    from omegaconf import OmegaConf

    from cola_train.sweep import SweepSummary

    monkeypatch.setenv("PATH", "/nonexistent")
    cfg = OmegaConf.create({"hydra": {"launcher": {
        "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}}})
    with pytest.raises(SystemExit) as exit_info:
        SweepSummary().on_multirun_start(cfg)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: hydra/launcher=slurm submits jobs with SLURM's sbatch")
