"""scripts/study.py: one cell per (domain, method, size) over the seeds, a deadline after which no
cell starts, and a second call that skips the cells already complete and, inside a cell started
again, the jobs already complete."""
from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

from conftest import TINY

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "study.py"
# the tiny run's overrides minus the ones study.py sets itself
EXTRA = [o for o in TINY if not o.startswith(("data=", "data.max_samples="))] + ["trainer.max_steps=2"]


def _study():
    spec = importlib.util.spec_from_file_location("study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_runs_cells_then_resumes_and_respects_the_deadline(tmp_path, data_root, capsys):
    study = _study()
    args = ["--domains", "math", "--methods", "lora", "--seeds", "1,2", "--parallel", "2",
            "--sweep-dir", str(tmp_path)]
    assert study.main([*args, "--sizes", "8", "--", *EXTRA]) == 0
    cell = tmp_path / "math" / "lora_n8"
    results = [json.loads(p.read_text()) for p in cell.glob("*/results.json")]
    assert sorted(r["config"]["seed"] for r in results) == [1, 2]
    assert {r["status"] for r in results} == {"completed"}
    assert {r["config"]["data"]["max_samples"] for r in results} == {8}
    assert (tmp_path / "math" / "report.md").is_file()
    out = capsys.readouterr().out
    assert "1 shards to run" in out and "(2/2 jobs completed)" in out

    stamp = max(p.stat().st_mtime for p in cell.glob("*/results.json"))
    time.sleep(0.01)
    assert study.main([*args, "--sizes", "8,16", "--deadline", "0", "--", *EXTRA]) == 0
    out = capsys.readouterr().out
    assert "1 shards to run" in out                             # n=8 is complete: skipped
    assert "math lora n=16: not started (deadline)" in out
    assert not (tmp_path / "math" / "lora_n16").exists()
    assert max(p.stat().st_mtime for p in cell.glob("*/results.json")) == stamp

    # a cell cut short: seed 2 preempted. Started again, the cell runs seed 2 only (resumed).
    done, cut = sorted(cell.glob("*/results.json"), key=lambda p: json.loads(p.read_text())["config"]["seed"])
    cut.write_text(json.dumps({**json.loads(cut.read_text()), "status": "preempted"}))
    kept = done.read_bytes(), done.stat().st_mtime
    assert study.main([*args, "--sizes", "8", "--", *EXTRA]) == 0
    assert "(2/2 jobs completed)" in capsys.readouterr().out
    assert (done.read_bytes(), done.stat().st_mtime) == kept
    assert json.loads(cut.read_text())["status"] == "completed"


def test_a_stopped_study_leaves_its_jobs_preempted_and_the_same_command_resumes(tmp_path, data_root,
                                                                                  monkeypatch, capsys):
    """What `timeout`, Ctrl-C or --stop-after do: the running job checkpoints and says so in
    results.json before the study returns; the same command then finishes the cell."""
    study = _study()
    extra = [o for o in EXTRA if not o.startswith("trainer.max_steps=")] + ["trainer.max_steps=40"]
    args = ["--domains", "math", "--methods", "lora", "--seeds", "1,2", "--parallel", "1", "--sizes", "8",
            "--sweep-dir", str(tmp_path), "--", *extra]
    monkeypatch.setenv("COLA_TRAIN_DEBUG_STEP_SLEEP_S", "0.3")  # slow steps: the stop lands mid-run
    codes = []
    runner = threading.Thread(target=lambda: codes.append(study.main(args)))
    runner.start()
    cell = tmp_path / "math" / "lora_n8"
    deadline = time.time() + 300
    while not any(len(m.read_text().splitlines()) >= 2 for m in cell.glob("*/metrics.jsonl")):
        assert runner.is_alive() and time.time() < deadline, "the job ended before the stop"
        time.sleep(0.05)
    study.stop_running(grace=120)
    runner.join(timeout=300)
    assert codes == [1] and "stopped 1 running shard(s)" in capsys.readouterr().out
    (stopped,) = [json.loads(p.read_text()) for p in cell.glob("*/results.json")]   # seed 2 never started
    assert stopped["status"] == "preempted" and stopped["config"]["seed"] == 1
    assert 2 <= stopped["train"]["steps"] < 40

    monkeypatch.delenv("COLA_TRAIN_DEBUG_STEP_SLEEP_S")
    assert study.main(args) == 0
    done = {r["config"]["seed"]: r for r in (json.loads(p.read_text()) for p in cell.glob("*/results.json"))}
    assert {s: r["status"] for s, r in done.items()} == {1: "completed", 2: "completed"}
    assert done[1]["train"]["resumed"] is True and done[1]["train"]["steps"] == 40


def test_jobs_per_cell_counts_swept_overrides():
    study = _study()
    assert study.jobs_per_cell("1,2,3", ["trainer.batch_size=16"]) == 3
    assert study.jobs_per_cell("1,2,3", ["trainer.lr=5e-5,2e-4", "method.r=4,8"]) == 12
    assert study.jobs_per_cell("1", ["method.target_modules=[q_proj,v_proj]"]) == 1
