"""scripts/study.py: one cell per (domain, method, size) over the seeds, a deadline after which no
cell starts, and a second call that skips the cells already complete and, inside a cell started
again, the jobs already complete."""
from __future__ import annotations

import importlib.util
import json
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


def test_jobs_per_cell_counts_swept_overrides():
    study = _study()
    assert study.jobs_per_cell("1,2,3", ["trainer.batch_size=16"]) == 3
    assert study.jobs_per_cell("1,2,3", ["trainer.lr=5e-5,2e-4", "method.r=4,8"]) == 12
    assert study.jobs_per_cell("1", ["method.target_modules=[q_proj,v_proj]"]) == 1
