"""Nothing lost on kill -9, nothing half-written passes for a result, bad output dirs fail early."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import DATA_ROOT, REPO, TINY, run_cli

COMMON = TINY + ["method=lora", "trainer.lr=5e-3", "data.max_samples=16", "trainer.batch_size=4",
                 "trainer.max_steps=12", "trainer.save_steps=2", "trainer.save_total_limit=2"]


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    assert run_cli(COMMON + [f"hydra.run.dir={full}"]).returncode == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "COLA_DATA_ROOT": str(DATA_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cola_train", *COMMON, f"hydra.run.dir={killed}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "checkpoint-4").is_dir():   # killed at once: maybe mid-save
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    again = run_cli(COMMON + [f"hydra.run.dir={killed}", "trainer.resume=true"])
    assert again.returncode == 0, again.stderr[-2000:]
    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert b["train"]["resumed"] and b["train"]["steps"] == a["train"]["steps"] == 12
    # same seed, same data order, optimizer and RNG restored: equal to float tolerance
    assert b["eval"]["loss"] == pytest.approx(a["eval"]["loss"], rel=1e-5)


def test_output_dir_under_a_file_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_cli(TINY + [f"hydra.run.dir={blocker}/run"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"error: output dir '{blocker}/run' is not writable" in proc.stderr


def test_results_are_written_atomically(tmp_path, monkeypatch):
    from cola_train.results import write_json_atomic

    target = tmp_path / "results.json"
    write_json_atomic(target, {"status": "completed", "x": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(target, {"status": "completed", "x": 2})
    assert json.loads(target.read_text())["x"] == 1          # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]   # no temp file left behind


def test_nan_loss_stops_naming_the_step_and_keeps_good_checkpoints(data_root, tmp_path):
    import math

    from cola_train.run import run
    from cola_train.trainer import NonFiniteLossError, last_complete_checkpoint
    from conftest import compose

    cfg = compose(TINY + ["method=fft", "trainer.lr=1e30", "trainer.max_grad_norm=0",
                          "trainer.save_steps=1", "trainer.save_total_limit=10"])
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf) at step \d+"):
        run(cfg, tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    bad_step = next(r["step"] for r in rows if "loss" in r and not math.isfinite(r["loss"] or float("nan")))
    last = last_complete_checkpoint(tmp_path / "checkpoints")
    assert last is not None and int(last.rsplit("-", 1)[1]) < bad_step
    assert not (tmp_path / "results.json").exists()


def test_a_run_whose_gradients_are_all_zero_stops_in_one_line(data_root, tmp_path, monkeypatch):
    """No gradient reaching the trainable weights (grad_norm exactly 0) ends the run at its first
    logged step, as a user error: results.json says failed and why."""
    from cola_train.errors import run_guarded
    from cola_train.run import run
    from cola_train.trainer import ColaTrainer
    from conftest import compose

    loss_of = ColaTrainer.compute_loss
    monkeypatch.setattr(ColaTrainer, "compute_loss", lambda self, *a, **k: loss_of(self, *a, **k) * 0.0)
    assert run_guarded(lambda: run(compose(TINY + ["method=cola_heuristic"]), tmp_path), tmp_path,
                       exit_on_error=False) is None
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed"
    assert results["error"].startswith("grad_norm was 0 at step 1: no gradient reaches the trainable parameters")
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_checkpoints_exits_and_the_same_command_resumes(tmp_path, sig):
    full = tmp_path / "full"
    assert run_cli(COMMON + ["trainer.save_steps=100", f"hydra.run.dir={full}"]).returncode == 0
    run_dir = tmp_path / "stopped"
    args = COMMON + ["trainer.save_steps=100", f"hydra.run.dir={run_dir}"]   # no periodic checkpoints
    env = {**os.environ, "COLA_DATA_ROOT": str(DATA_ROOT), "COLA_TRAIN_DEBUG_STEP_SLEEP_S": "0.3"}
    proc = subprocess.Popen([sys.executable, "-m", "cola_train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").is_file() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline, "run ended before the signal"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-2000:]                  # EXIT_PREEMPTED, not a crash
    stopped = json.loads((run_dir / "results.json").read_text())
    assert stopped["status"] == "preempted" and 3 <= stopped["train"]["steps"] < 12
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped['train']['steps']}").is_dir()
    again = run_cli(args)                                       # the same command, nothing added
    assert again.returncode == 0, again.stderr[-2000:]
    a = json.loads((full / "results.json").read_text())
    b = json.loads((run_dir / "results.json").read_text())
    assert b["status"] == "completed" and b["train"]["resumed"] and b["train"]["steps"] == 12
    assert b["eval"]["loss"] == pytest.approx(a["eval"]["loss"], rel=1e-5)
