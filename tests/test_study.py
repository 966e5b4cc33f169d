"""scripts/study.py end to end on tiny_llama: the runs of a stage go in their fixed dirs, the next
stage starts once the first has ended, a deadline after which no run starts, and a second call
that runs only what is not complete (a stopped run resumes from its checkpoint). The planner,
the lr pick and the verdict are tested without training in test_study_plan.py."""
from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

from conftest import TINY

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "study.py"
# the tiny run's overrides minus the ones study.py sets itself; the protocol's effective batch 64
# would make 8 micro-batches of every step
EXTRA = [o for o in TINY if not o.startswith(("data=", "data.max_samples="))] + [
    "trainer.max_steps=2", "trainer.effective_batch=null"]
ONE_LR = ["--domains", "math", "--arms", "lora", "--lrs", "1e-4", "--seeds", "1,2", "--grid-sizes", "8"]


def _study():
    spec = importlib.util.spec_from_file_location("study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(tmp_path, size):
    runs = tmp_path / "math" / "lora" / f"n{size}" / "lr0.0001"
    return {int(p.parent.name[1:]): p for p in runs.glob("s*/results.json")}


def test_study_runs_the_sweep_then_the_other_seeds_and_respects_the_deadline(tmp_path, data_root, capsys):
    study = _study()
    args = [*ONE_LR, "--parallel", "2", "--sweep-dir", str(tmp_path)]
    assert study.main([*args, "--sizes", "8", "--", *EXTRA]) == 0
    results = {seed: json.loads(p.read_text()) for seed, p in _results(tmp_path, 8).items()}
    assert sorted(results) == [1, 2] and {r["config"]["seed"] for r in results.values()} == {1, 2}
    assert {r["status"] for r in results.values()} == {"completed"}
    assert {r["config"]["data"]["max_samples"] for r in results.values()} == {8}
    assert {r["config"]["trainer"]["lr"] for r in results.values()} == {1e-4}
    assert {r["config"]["eval"]["scoring"][1] for r in results.values()} == {"cloze"}
    assert (tmp_path / "verdict" / "verdict.md").is_file()
    out = capsys.readouterr().out
    assert "sweep math lora n=8 lr=0.0001 seed=1: exit 0" in out and "final math lora n=8 lr=0.0001 seed=2: exit 0" in out

    done = _results(tmp_path, 8)
    stamp = max(p.stat().st_mtime for p in done.values())
    time.sleep(0.01)
    assert study.main([*args, "--sizes", "8,16", "--deadline", "0", "--", *EXTRA]) == 0
    out = capsys.readouterr().out
    assert "1 run(s) to run" in out and "2 done" in out      # n=16's sweep run, not started
    assert not (tmp_path / "math" / "lora" / "n16").exists()
    assert max(p.stat().st_mtime for p in done.values()) == stamp

    # which runs a call runs again (preempted, failed) and which it leaves (completed, diverged):
    # test_study_plan.py::test_the_plan_skips_finished_runs_and_reruns_the_rest; resuming: below


def test_a_stopped_study_leaves_its_runs_preempted_and_the_same_command_resumes(tmp_path, data_root,
                                                                                 monkeypatch, capsys):
    """What `timeout`, Ctrl-C or --stop-after do: the running run checkpoints and says so in
    results.json before the study returns; the same command then resumes it from that checkpoint."""
    study = _study()
    extra = [o for o in EXTRA if not o.startswith("trainer.max_steps=")] + ["trainer.max_steps=16"]
    # one seed: the sweep's run is the whole study (two processes, as few as a stop and a resume need)
    args = ["--domains", "math", "--arms", "lora", "--lrs", "1e-4", "--seeds", "1", "--parallel", "1", "--sizes", "8",
            "--sweep-dir", str(tmp_path), "--", *extra]
    monkeypatch.setenv("COLA_TRAIN_DEBUG_STEP_SLEEP_S", "0.3")  # slow steps: the stop lands mid-run
    codes = []
    runner = threading.Thread(target=lambda: codes.append(study.main(args)))
    runner.start()
    run = tmp_path / "math" / "lora" / "n8" / "lr0.0001" / "s1"
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        assert runner.is_alive() and time.time() < deadline, "the run ended before the stop"
        time.sleep(0.05)
    study.stop_running(grace=120)
    runner.join(timeout=300)
    assert codes == [1] and "stopped 1 running run(s)" in capsys.readouterr().out
    (stopped,) = [json.loads(p.read_text()) for p in _results(tmp_path, 8).values()]
    assert stopped["status"] == "preempted" and stopped["config"]["seed"] == 1
    assert 2 <= stopped["train"]["steps"] < 16

    monkeypatch.delenv("COLA_TRAIN_DEBUG_STEP_SLEEP_S")
    assert study.main(args) == 0
    done = {seed: json.loads(p.read_text()) for seed, p in _results(tmp_path, 8).items()}
    assert {s: r["status"] for s, r in done.items()} == {1: "completed"}
    assert done[1]["train"]["resumed"] is True and done[1]["train"]["steps"] == 16
