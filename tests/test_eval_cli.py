"""`python -m cola_train.eval` re-scores a finished run from its saved adapter and matches the
accuracy the run itself recorded; it also scores a base model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import DATA_ROOT, REPO, TINY, run_cli


def _eval_cli(args):
    env = {**os.environ, "COLA_DATA_ROOT": str(DATA_ROOT)}
    return subprocess.run([sys.executable, "-m", "cola_train.eval", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_eval_cli_reproduces_the_runs_accuracy(data_root, tmp_path):
    run = run_cli(TINY + ["method=cola_fully", "eval=default", "eval.max_examples=24",
                          "trainer.lr=5e-3", f"hydra.run.dir={tmp_path}"])
    assert run.returncode == 0, run.stderr[-2000:]
    recorded = json.loads((tmp_path / "results.json").read_text())["benchmark"]
    again = _eval_cli([str(tmp_path), "eval.max_examples=24"])
    assert again.returncode == 0, again.stderr[-2000:]
    rescored = json.loads((tmp_path / "benchmark.json").read_text())
    assert rescored["n_examples"] == recorded["n_examples"] == 24
    assert rescored["accuracy"] == recorded["accuracy"]
    assert rescored["per_subject"] == recorded["per_subject"]


def test_eval_cli_on_a_base_model(data_root):
    proc = _eval_cli(["--model", "tiny_llama", "--domain", "finance", "eval.max_examples=8"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["name"] == "fineval" and out["n_examples"] == 8 and 0 <= out["accuracy"] <= 1


def test_eval_cli_rejects_a_dir_that_is_not_a_run(tmp_path):
    proc = _eval_cli([str(tmp_path)])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{tmp_path} is not a run dir" in proc.stderr
