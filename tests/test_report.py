"""Sweep report on a synthetic multirun dir, with expected statistics computed here."""
from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from cola_train.report import ReportError, find_jobs, main, summarize, write_report

REPO = Path(__file__).resolve().parent.parent

# (method, samples, seed) -> (accuracy, eval loss, tokens/s, joules or None)
RUNS = {
    ("lora", 100, 1): (0.30, 2.0, 1000.0, 500.0),
    ("lora", 100, 2): (0.34, 1.8, 1100.0, 540.0),
    ("lora", 100, 3): (0.35, 1.9, 1050.0, 520.0),
    ("lora", 1000, 1): (0.40, 1.5, 1200.0, 900.0),
    ("lora", 1000, 2): (0.44, 1.4, 1150.0, 950.0),
    ("cola_fully", 100, 1): (0.36, 1.7, 900.0, None),
    ("cola_fully", 100, 2): (0.38, 1.6, 950.0, None),
    ("cola_fully", 1000, 1): (0.50, 1.2, 800.0, 1000.0),
}
TRAINABLE = {"lora": 1_000_000, "cola_fully": 2_500_000}


def _job(root: Path, index: int, method="lora", samples=100, seed=1, results="ok"):
    d = root / "2025-01-01" / "12-00-00" / str(index)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(
        f"model:\n  name: tiny_llama\nmethod:\n  name: {method}\ndata:\n  domain: math\n"
        f"  max_samples: {samples}\nseed: {seed}\n")
    if results is None:
        return d
    if isinstance(results, str) and results != "ok":
        (d / "results.json").write_text(results)
        return d
    if results == "ok":
        acc, loss, tps, joules = RUNS[(method, samples, seed)]
        results = {
            "status": "completed",
            "config": {"model": {"name": "tiny_llama"}, "method": {"name": method},
                       "data": {"domain": "math", "max_samples": samples}, "seed": seed},
            "n_train_samples": samples,
            "params": {"trainable": TRAINABLE[method], "total": 10_000_000},
            "train": {"loss": 1.0, "runtime_s": 10.0, "tokens_per_s": tps, "steps": 5},
            "eval": {"loss_before": None, "loss": loss},
            "benchmark": {"name": "gsm8k", "accuracy": acc, "macro_accuracy": acc,
                          "accuracy_before": None},
            "energy": None if joules is None else {"joules": joules, "joules_per_token": 0.1},
        }
    (d / "results.json").write_text(json.dumps(results))
    return d


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun"
    for i, (method, samples, seed) in enumerate(RUNS):
        _job(root, i, method, samples, seed)
    n = len(RUNS)
    _job(root, n, "lora", 100, 4, results=None)                                    # crashed
    _job(root, n + 1, "lora", 100, 5,
         results={"status": "failed", "error": "CUDA out of memory"})
    _job(root, n + 2, "lora", 1000, 3, results='{"status": "completed", "config": {')  # torn
    return root


def _expected(method, samples, index):
    values = [v[index] for (m, s, _), v in RUNS.items()
              if (m, s) == (method, samples) and v[index] is not None]
    if not values:
        return None, None, 0
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None), \
        len(values)


def test_report_statistics_and_failed_jobs(sweep):
    paths = write_report(sweep)
    assert {"markdown", "csv"} <= set(paths)

    with open(paths["csv"]) as f:
        rows = {(r["method"], int(r["n_train_samples"])): r for r in csv.DictReader(f)}
    assert set(rows) == {("lora", 100), ("lora", 1000), ("cola_fully", 100),
                         ("cola_fully", 1000)}
    for (method, samples), row in rows.items():
        assert row["domain"] == "math" and row["model"] == "tiny_llama"
        assert int(row["n"]) == sum(1 for m, s, _ in RUNS if (m, s) == (method, samples))
        for name, index in (("accuracy", 0), ("eval_loss", 1), ("tokens_per_s", 2),
                            ("energy_j", 3)):
            mean, std, n = _expected(method, samples, index)
            assert int(row[f"{name}_n"]) == n
            if mean is None:
                assert row[f"{name}_mean"] == "" and row[f"{name}_std"] == ""
                continue
            assert float(row[f"{name}_mean"]) == pytest.approx(mean)
            if std is None:
                assert row[f"{name}_std"] == ""
            else:
                assert float(row[f"{name}_std"]) == pytest.approx(std)
        assert float(row["trainable_params_mean"]) == TRAINABLE[method]
        assert row["trainable_params_std"] == ("0.0" if int(row["n"]) > 1 else "")
    # the failed jobs' seeds (4, 5, 3 at 1000) are not averaged in
    assert rows[("lora", 100)]["seeds"] == "1 2 3"
    assert rows[("lora", 1000)]["seeds"] == "1 2"

    md = paths["markdown"].read_text()
    assert "| tiny_llama | lora | math | 100 | 3 | 1 2 3 | 0.3300 ± 0.0265 |" in md
    assert "| tiny_llama | cola_fully | math | 100 | 2 | 1 2 |" in md
    lora100 = next(line for line in md.splitlines() if "| lora | math | 100 |" in line)
    assert "520 ± 20" in lora100                                  # energy
    cola100 = next(line for line in md.splitlines() if "| cola_fully | math | 100 |" in line)
    assert cola100.rstrip().endswith("| — |")                    # energy not measured
    failed = md.split("## Failed jobs")[1]
    assert f"2025-01-01/12-00-00/{len(RUNS)}`: no results.json" in failed
    assert f"2025-01-01/12-00-00/{len(RUNS) + 1}`: status=failed: CUDA out of memory" in failed
    assert f"2025-01-01/12-00-00/{len(RUNS) + 2}`: unparseable results.json" in failed
    assert "8 completed, 3 failed" in md


def test_report_plots(sweep):
    paths = write_report(sweep, sweep / "report")
    for name in ("plot_accuracy_vs_samples.png", "plot_eval_loss_vs_samples.png",
                 "plot_energy.png"):
        p = sweep / "report" / name
        assert p.is_file() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p in paths.values()


def test_report_tolerates_missing_optional_keys(tmp_path):
    root = tmp_path / "m"
    _job(root, 0, results={"status": "completed",
                           "config": {"method": {"name": "fft"}, "data": {"domain": "law"},
                                      "seed": 1},
                           "n_train_samples": 50, "benchmark": None, "energy": None})
    paths = write_report(root)
    md = paths["markdown"].read_text()
    # model.name is missing from results.json: taken from the job's .hydra/config.yaml
    assert "| tiny_llama | fft | law | 50 | 1 | 1 | — | — | — | — | — |" in md
    assert "plot_energy" not in paths and "plot_accuracy" not in paths


def test_report_errors(tmp_path, capsys):
    with pytest.raises(ReportError, match="no job dirs"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match="no such directory"):
        write_report(tmp_path / "nope")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no job dirs")


def test_cli(sweep):
    proc = subprocess.run([sys.executable, "-m", "cola_train.report", str(sweep)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| model | method | domain | samples | n | seeds | accuracy |" in proc.stdout
    assert str(sweep / "report.md") in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "cola_train.report", str(sweep / "missing")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such directory" in proc.stderr


def test_a_swept_hyper_parameter_splits_its_cells(tmp_path):
    """An lr sweep inside one (method, size) cell: one row per lr, labelled, never averaged
    together; a setting that differs only between methods adds no column."""
    root = tmp_path / "multirun"
    losses = {("lora", 1e-4, 1): 1.5, ("lora", 1e-4, 2): 1.7, ("lora", 5e-4, 1): 0.9,
              ("cola_fully", 1e-4, 1): 1.1}
    for i, ((method, lr, seed), loss) in enumerate(losses.items()):
        _job(root, i, method, 100, seed, results={
            "status": "completed", "n_train_samples": 100,
            "config": {"model": {"name": "tiny_llama"}, "data": {"domain": "math", "max_samples": 100},
                       "method": {"name": method, "alpha": 16 if method == "lora" else 8},
                       "trainer": {"lr": lr}, "seed": seed},
            "eval": {"loss": loss}})
    rows = {(r["method"], r["settings"]): r for r in summarize(find_jobs(root))}
    assert set(rows) == {("lora", "lr=0.0001"), ("lora", "lr=0.0005"), ("cola_fully", "lr=0.0001")}
    assert rows[("lora", "lr=0.0001")]["eval_loss"]["mean"] == pytest.approx(1.6)
    assert rows[("lora", "lr=0.0001")]["n"] == 2 and rows[("lora", "lr=0.0005")]["n"] == 1
    md = write_report(root)["markdown"].read_text()
    assert "| model | method | settings | domain |" in md
    assert "| tiny_llama | lora | lr=0.0005 | math | 100 | 1 | 1 |" in md
    assert "alpha" not in md


def test_energy_leaves_out_jobs_that_counted_only_their_last_segment(tmp_path):
    """A job resumed without its earlier segments' totals reports too little energy: it is not
    averaged into the energy column, while its tokens/s (a rate) still is."""
    root = tmp_path / "multirun"
    trains = [{"resumed": False, "counted_from_step": 0, "segments": 1},     # whole run
              {"resumed": True, "counted_from_step": 0, "segments": 2},      # resumed, totals carried
              {"resumed": True, "counted_from_step": 40, "segments": None},  # resumed, counted from 40
              {"resumed": True},                                             # written before totals
              {"resumed": False}]                                            # ditto, never resumed
    joules = [100.0, 120.0, 30.0, 20.0, 110.0]
    for i, (train, j) in enumerate(zip(trains, joules)):
        _job(root, i, "lora", 100, i + 1, results={
            "status": "completed", "n_train_samples": 100,
            "config": {"model": {"name": "tiny_llama"}, "method": {"name": "lora"},
                       "data": {"domain": "math", "max_samples": 100}, "seed": i + 1},
            "train": {**train, "tokens_per_s": 1000.0 + i}, "eval": {"loss": 1.0},
            "energy": {"joules": j, "joules_per_token": 0.1}})
    (row,) = summarize(find_jobs(root))
    assert row["energy_j"]["n"] == 3 and row["energy_j"]["mean"] == pytest.approx(110.0)
    assert row["tokens_per_s"]["n"] == 5
    assert "110 ± 10 (n=3)" in write_report(root)["markdown"].read_text()
