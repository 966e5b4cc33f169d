"""Ctrl-C through the real CLI: a checkpoint at the end of the step, results.json "interrupted",
one line, exit 130, and trainer.resume=true continues; a second Ctrl-C quits at once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA_ROOT, REPO, TINY, run_cli

ARGS = TINY + ["method=cola_heuristic", "trainer.lr=5e-3", "trainer.max_steps=12", "trainer.save_steps=100"]
LINE = "interrupted at step "


def _start(args, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "COLA_DATA_ROOT": str(DATA_ROOT), "COLA_TRAIN_DEBUG_STEP_SLEEP_S": str(sleep),
           "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen([sys.executable, "-m", "cola_train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, run_dir: Path, steps: int, timeout: float = 300) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= steps):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.05)


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _check_interrupted(proc, err: str, run_dir: Path) -> dict:
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [l for l in err.splitlines() if LINE in l]
    assert len(lines) == 1, err[-3000:]
    stopped = _results(run_dir)
    step = stopped["train"]["steps"]
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
    assert lines[0].strip() == (f"interrupted at step {step} of 12; checkpoint saved in {checkpoint}; "
                                "re-run with trainer.resume=true to continue")
    assert stopped["status"] == "interrupted" and 2 <= step < 12
    assert (checkpoint / "CHECKPOINT_COMPLETE").is_file()
    assert "requeu" not in err.lower()
    return stopped


def test_ctrl_c_checkpoints_says_so_in_one_line_and_resume_continues(tmp_path, data_root):
    run_dir = tmp_path / "run"
    args = ARGS + [f"hydra.run.dir={run_dir}"]
    proc = _start(args, sleep=0.3)
    _wait_for_steps(proc, run_dir, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    stopped = _check_interrupted(proc, err, run_dir)

    from cola_train.preemption import resuming

    assert not resuming(run_dir)          # not a preemption: the same command alone would start afresh
    again = run_cli(args + ["trainer.resume=true"])
    assert again.returncode == 0, again.stderr[-2000:]
    done = _results(run_dir)
    assert done["status"] == "completed" and done["train"]["resumed"] is True and done["train"]["steps"] == 12
    assert done["train"]["segments"] == 2


def test_a_second_ctrl_c_quits_at_once(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = _start(ARGS + [f"hydra.run.dir={run_dir}"], sleep=10)   # a step of 10 s: the first Ctrl-C waits
    _wait_for_steps(proc, run_dir, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert proc.poll() is None                                      # still finishing its step
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 5, "the second Ctrl-C did not quit at once"
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.rstrip().endswith("\ninterrupted again: quitting now, without a checkpoint")
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_a_stop_signal_outside_slurm_says_nothing_of_requeueing(monkeypatch, caplog):
    from cola_train import preemption

    for var in ("SLURM_JOB_ID", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(preemption._SIGNALS, "preempt_signum", None)
    with caplog.at_level("WARNING", logger="cola_train"):
        preemption._on_signal(signal.SIGTERM, None)
    assert "requeu" not in caplog.text and "then stopping (the same command resumes)" in caplog.text
    caplog.clear()
    monkeypatch.setattr(preemption._SIGNALS, "preempt_signum", None)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    with caplog.at_level("WARNING", logger="cola_train"):
        preemption._on_signal(signal.SIGUSR2, None)
    assert "then requeueing" in caplog.text                          # under SLURM: as before


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_ctrl_c_reaches_local_ranks_through_their_parent(tmp_path, data_root):
    """trainer.devices=2: Ctrl-C to the parent (the ranks run in a session of their own) reaches
    both ranks, which stop at the same step with a checkpoint; the parent says so in one line."""
    run_dir = tmp_path / "run"
    args = ARGS + ["method=lora", "trainer.batch_size=4", "trainer.devices=2", f"hydra.run.dir={run_dir}"]
    proc = _start(args, sleep=1)
    try:
        _wait_for_steps(proc, run_dir, 2, timeout=600)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    _check_interrupted(proc, err, run_dir)
    again = run_cli(args + ["trainer.resume=true"])
    assert again.returncode == 0, again.stderr[-2000:]
    done = _results(run_dir)
    assert done["status"] == "completed" and done["train"]["resumed"] is True and done["train"]["steps"] == 12


def test_ctrl_c_outside_a_training_step_is_one_line_and_exit_130(tmp_path, capsys):
    """A Ctrl-C while loading or evaluating unwinds (nothing to checkpoint there) and ends as one
    line naming the last checkpoint, exit 130, results.json "interrupted"; before, a traceback."""
    from cola_train.errors import run_guarded

    checkpoint = tmp_path / "checkpoints" / "checkpoint-6"
    checkpoint.mkdir(parents=True)
    (checkpoint / "CHECKPOINT_COMPLETE").write_text("{}")

    def evaluating():
        raise KeyboardInterrupt

    try:
        run_guarded(evaluating, tmp_path, exit_on_error=True)
    except SystemExit as stopped:
        assert stopped.code == 130
    except KeyboardInterrupt:  # not turned into the line: fail this test, not the whole session
        pytest.fail("KeyboardInterrupt escaped run_guarded")
    else:
        pytest.fail("run_guarded returned after a KeyboardInterrupt")
    err = capsys.readouterr().err
    assert err == (f"interrupted outside a training step; the last checkpoint is {checkpoint} (step 6); "
                   "re-run with trainer.resume=true to continue\n")
    assert _results(tmp_path)["status"] == "interrupted"
