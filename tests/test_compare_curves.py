"""scripts/compare_curves.py: the table that backs the ZeRO-3 GPU proof (docs/ZERO3_GPU.md)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import load_script

def _load():
    return load_script("compare_curves")


def _run_dir(root: Path, name: str, losses: dict[int, float], eval_loss=None) -> Path:
    d = root / name
    d.mkdir()
    rows = [{"step": s, "loss": v, "learning_rate": 1e-4} for s, v in losses.items()]
    rows.append({"step": max(losses), "train_runtime": 1.0})   # a row without a loss is skipped
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if eval_loss is not None:
        (d / "results.json").write_text(json.dumps({"status": "completed", "eval": {"loss": eval_loss},
                                                    "benchmark": {"accuracy": 0.25}}))
    return d


def test_table_reports_the_largest_step_difference(tmp_path, capsys):
    cc = _load()
    ref = _run_dir(tmp_path, "a", {1: 2.0, 2: 1.5, 3: 1.0}, eval_loss=0.9)
    other = _run_dir(tmp_path, "b", {1: 2.0, 2: 1.2, 3: 1.1, 4: 0.5})
    assert cc.main(["--out", str(tmp_path / "out"), f"ref={ref}", f"two={other}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ref_row = next(line for line in lines if line.startswith("| ref |"))
    two_row = next(line for line in lines if line.startswith("| two |"))
    assert ref_row == "| ref | 3 | 0.00e+00 | 0.00e+00 | 0.9000 | 0.2500 | completed |"
    # shared steps 1..3: |1.2 - 1.5| = 0.3 is the largest, and 0.3 / 1.5 = 0.2 the largest relative
    assert two_row == "| two | 3 | 3.00e-01 | 2.00e-01 |  |  |  |"
    with open(tmp_path / "out" / "curves.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "ref", "two"] and rows[-1] == ["4", "", "0.5"]
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_divergence_without_shared_steps_is_nan():
    d = _load().divergence({1: 1.0}, {2: 1.0})
    assert d["steps"] == 0 and d["max_abs"] != d["max_abs"]


@pytest.mark.parametrize("spec, message", [("no_label_here", "is not label=run_dir"),
                                           ("x={missing}", "metrics.jsonl")])
def test_bad_run_arguments_fail_with_one_line(tmp_path, spec, message):
    with pytest.raises(SystemExit) as err:
        _load().main(["--out", str(tmp_path / "out"), spec.format(missing=tmp_path / "nope")])
    assert message in str(err.value) and "\n" not in str(err.value)
