"""A record never misstates what was trained (issue #28): a job's training-sample count is part
of its identity. Sweeps whose jobs collapse to one effective config are refused before any job
runs (or run with --force and marked), the report never shows repeats as seed variance, the run
log says which of data.fraction / data.max_samples set the count, and a sweep with a failed job
exits non-zero.

Expected counts are computed here from the data file and the documented rule (a validation set
of min(max_val_samples, ceil(val_fraction * records)) held out, then floor(fraction * pool)
capped by max_samples), not taken from the code under test."""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from conftest import REPO, TINY, run_cli

FAST = [*TINY, "trainer.max_steps=1"]  # TINY: data.max_samples=8, data.max_val_samples=8


def _gsm8k_records(data_root: Path) -> int:
    return len(json.loads((data_root / "train" / "gsm8k_train.json").read_text()))


def _expected_count(n_records: int, fraction: float, max_samples: int | None,
                    val_fraction: float = 0.1, max_val: int = 200) -> tuple[int, int]:
    """(training samples, pool) by the documented rule."""
    pool = n_records - min(max_val, math.ceil(val_fraction * n_records))
    by_fraction = max(1, math.floor(fraction * pool))
    return (by_fraction if max_samples is None else min(by_fraction, max_samples)), pool


# ---------------------------------------------------------------------------------------------
# (d) the log line that says which knob decided


def test_describe_sample_names_the_knob_that_decides():
    from cola_train.config import DataConfig
    from cola_train.data.sampling import describe_sample

    n = 7475  # pool 7275 after 200 validation records
    capped = describe_sample(DataConfig(fraction=0.5, max_samples=1000), n)
    assert capped.startswith("data: 1000 training samples from a pool of 7275 (7475 records, 200 held out")
    assert "data.max_samples=1000 decides" in capped and "data.fraction=0.5 (3637 samples)" in capped
    by_fraction = describe_sample(DataConfig(fraction=0.1, max_samples=1000), n)
    assert by_fraction.startswith("data: 727 training samples")
    assert "data.fraction=0.1 decides; data.max_samples=1000 does not bind" in by_fraction
    uncapped = describe_sample(DataConfig(fraction=1.0, max_samples=None), n)
    assert uncapped.startswith("data: 7275 training samples") and "data.max_samples=null" in uncapped
    assert "\n" not in capped + by_fraction + uncapped


# ---------------------------------------------------------------------------------------------
# (4) the README's example sweep: one distinct run per distinct setting


def _readme_sweep() -> list[str]:
    text = (REPO / "README.md").read_text()
    line = next(l for l in text.splitlines() if "-m cola_train -m " in l and "data.fraction=" in l)
    return line.split("-m cola_train ", 1)[1].split()


def test_readme_sweep_gives_as_many_sample_counts_as_fractions(data_root):
    from cola_train.effective import identity
    from cola_train.sweep_check import _sweep_jobs, collisions, effective_job

    argv = _readme_sweep()
    assert "data.max_samples=null" in argv
    jobs = _sweep_jobs([a for a in argv if a != "-m"])
    assert len(jobs) == 27
    n = _gsm8k_records(data_root)
    counts, distinct = {}, set()
    for job in jobs:
        flat = effective_job(job)
        fraction = float(next(o for o in job if o.startswith("data.fraction=")).split("=")[1])
        counts.setdefault(fraction, set()).add(flat["n_train_samples"])
        distinct.add(identity(flat))
    assert counts == {f: {_expected_count(n, f, None)[0]} for f in (0.1, 0.5, 1.0)}
    assert len({c for (c,) in counts.values()}) == 3 and len(distinct) == 27
    # without the null (the README's old line) 0.5 and 1.0 collapse to the same 1000 samples
    old = [a for a in argv if a not in ("-m", "data.max_samples=null")]
    old = [("method=lora" if a.startswith("method=") else "seed=1" if a.startswith("seed=") else a) for a in old]
    old_jobs = _sweep_jobs(old)
    assert collisions(old_jobs) == [([1, 2], 1000)]
    assert [j for j in old_jobs if "data.fraction=0.5" in j] == [old_jobs[1]]


# ---------------------------------------------------------------------------------------------
# (a) the collapse refusal through the real CLI


@pytest.mark.timeout(120)
def test_a_sweep_whose_jobs_collapse_is_refused_before_any_job(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *FAST, "data.fraction=0.5,1.0", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "#0 [data.fraction=0.5] and #1 [data.fraction=1.0] both train on the same 8 samples" in lines[0]
    assert "data.max_samples=null" in lines[0] and "--force" in lines[0]
    assert not sweep.exists()  # no job dir, no sweep dir


@pytest.mark.timeout(300)
def test_forced_collapsing_sweep_runs_and_the_report_marks_the_repeat(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *FAST, "data.fraction=0.5,1.0", "--force", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(l.startswith("warning: ") and "--force" in l for l in proc.stderr.splitlines()), proc.stderr
    # (d) each job says, before training, that the cap decided its count
    n = _gsm8k_records(data_root)
    for fraction in (0.5, 1.0):
        count, pool = _expected_count(n, fraction, 8, max_val=8)
        by_fraction = math.floor(fraction * pool)
        assert (f"data: {count} training samples from a pool of {pool}" in proc.stdout and
                f"data.max_samples=8 decides; it caps data.fraction={fraction} ({by_fraction} samples)"
                in proc.stdout), proc.stdout[-3000:]
    dirs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/config.yaml"))
    assert len(dirs) == 2
    results = [json.loads((d / "results.json").read_text()) for d in dirs]
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert [r["n_train_samples"] for r in results] == [8, 8]

    md = (sweep / "report.md").read_text()
    table = [l for l in md.splitlines() if l.startswith("| ") and "---" not in l]
    assert len(table) == 2, md  # the header and ONE row
    header, row = ([c.strip() for c in l.strip("|").split("|")] for l in table)
    cell = dict(zip(header, row))
    assert cell["samples"] == "8" and cell["n"] == "1" and cell["seeds"] == "42"
    assert cell["duplicates"] == "seed 42 ×2"
    assert "±" not in table[1]  # no spread from a repeated run
    assert "**Warning:** 1 job(s) repeat another job's effective config and seed" in md


# ---------------------------------------------------------------------------------------------
# (c) a sweep with a failed job exits non-zero, after its summary and report are written


@pytest.mark.timeout(300)
def test_a_sweep_with_a_failed_job_exits_1_after_summary_and_report(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *FAST, "method=lora", "method.r=4,0", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["counts"] == {"completed": 1, "failed": 1}
    md = (sweep / "report.md").read_text()
    assert "1 completed, 1 failed" in md and "method.r=0" in md.split("## Failed jobs")[1]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"cola_train: sweep {sweep} did not complete")


@pytest.mark.timeout(120)
def test_bad_input_exits_2(tmp_path):
    """Bad input is exit 2 whichever check finds it (the argv checks exited 1 before)."""
    for bad in ("method=lorax", "trainer.bogus=1"):
        proc = run_cli([*FAST, bad, f"hydra.run.dir={tmp_path / 'run'}"])
        assert proc.returncode == 2, (bad, proc.stderr[-2000:])
        assert proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr


def test_sweep_exit_code_per_outcome():
    from cola_train.sweep import exit_code

    def summary(**counts):
        return {"counts": counts}
    assert exit_code(summary(completed=3)) == 0
    assert exit_code(summary(completed=2, failed=1)) == 1
    assert exit_code(summary(completed=2, missing=1)) == 1
    assert exit_code(summary(completed=2, unknown=1)) == 1
    assert exit_code(summary(completed=2, preempted=1)) == 3  # the same command resumes it
    assert exit_code(summary(failed=1, preempted=1)) == 1
    assert exit_code(None) == 1  # no summary: nothing says the sweep is whole


# ---------------------------------------------------------------------------------------------
# (b) report grouping by effective config, on synthetic job dirs


def _job(root: Path, index: int, *, fraction: float, max_samples, samples: int, seed: int, acc: float,
         scheduler: str = "cosine") -> Path:
    d = root / f"{index}_job"
    (d / ".hydra").mkdir(parents=True)
    config = {"model": {"name": "tiny_llama"}, "method": {"name": "lora", "r": 8},
              "data": {"domain": "math", "fraction": fraction, "max_samples": max_samples},
              "trainer": {"lr": 1e-4, "scheduler": scheduler}, "seed": seed}
    (d / ".hydra" / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (d / "results.json").write_text(json.dumps({
        "status": "completed", "config": config, "n_train_samples": samples,
        "eval": {"loss": 1.0}, "benchmark": {"name": "gsm8k", "accuracy": acc}}))
    return d


def test_report_groups_by_effective_config_and_flags_repeats(tmp_path):
    from cola_train.report import find_jobs, summarize, write_report

    root = tmp_path / "multirun"
    # the sweep, one method: fraction 0.1 -> 727 samples; 0.5 and 1.0 -> capped at 1000
    _job(root, 0, fraction=0.1, max_samples=1000, samples=727, seed=1, acc=0.30)
    _job(root, 1, fraction=0.1, max_samples=1000, samples=727, seed=2, acc=0.34)
    _job(root, 2, fraction=0.5, max_samples=1000, samples=1000, seed=42, acc=0.40)
    _job(root, 3, fraction=1.0, max_samples=1000, samples=1000, seed=42, acc=0.44)
    # the same effective config as 2/3 but reached with max_samples=null, another seed
    _job(root, 4, fraction=0.1375, max_samples=None, samples=1000, seed=7, acc=0.50)
    # a setting outside the short HYPER list that varies: its own row, shown
    _job(root, 5, fraction=0.1, max_samples=1000, samples=727, seed=1, acc=0.20, scheduler="linear")

    rows = summarize(find_jobs(root))
    by = {(r["n_train_samples"], r["settings"]): r for r in rows}
    assert set(by) == {(727, "trainer.scheduler=cosine"), (1000, "trainer.scheduler=cosine"),
                       (727, "trainer.scheduler=linear")}
    small = by[(727, "trainer.scheduler=cosine")]
    assert small["n"] == 2 and small["seeds"] == [1, 2] and small["duplicates"] == {}
    assert small["accuracy"]["mean"] == pytest.approx(statistics.mean([0.30, 0.34]))
    assert small["accuracy"]["std"] == pytest.approx(statistics.stdev([0.30, 0.34]))
    big = by[(1000, "trainer.scheduler=cosine")]
    # seeds 42 (twice: one run repeated) and 7: n = 2 distinct seeds; seed 42 counts once
    assert big["n"] == 2 and big["seeds"] == [7, 42] and big["jobs"] == 3
    assert sorted(big["duplicates"]) == [42] and len(big["duplicates"][42]) == 2
    per_seed = [statistics.mean([0.40, 0.44]), 0.50]
    assert big["accuracy"]["mean"] == pytest.approx(statistics.mean(per_seed))
    assert big["accuracy"]["std"] == pytest.approx(statistics.stdev(per_seed))
    assert by[(727, "trainer.scheduler=linear")]["n"] == 1

    paths = write_report(root)
    md = paths["markdown"].read_text()
    assert "| tiny_llama | lora | trainer.scheduler=cosine | math | 1000 | 2 | 7 42 | seed 42 ×2 |" in md
    assert "**Warning:** 1 job(s) repeat another job's effective config and seed" in md
    assert "jobs #2 = #3 (lora, 1000 samples, seed 42)" in md
    with open(paths["csv"]) as f:
        csv_rows = {(int(r["n_train_samples"]), r["settings"]): r for r in csv.DictReader(f)}
    assert csv_rows[(1000, "trainer.scheduler=cosine")]["duplicates"] == "seed 42 ×2"
    assert csv_rows[(1000, "trainer.scheduler=cosine")]["seeds"] == "7 42"
    assert csv_rows[(727, "trainer.scheduler=cosine")]["duplicates"] == ""


def test_report_of_one_repeated_run_computes_no_spread(tmp_path):
    """Two jobs, one effective config, one seed: n=1 and no std (it was 'n=2 ± 0.0000')."""
    from cola_train.report import find_jobs, summarize

    root = tmp_path / "multirun"
    _job(root, 0, fraction=0.5, max_samples=1000, samples=1000, seed=42, acc=0.40)
    _job(root, 1, fraction=1.0, max_samples=1000, samples=1000, seed=42, acc=0.40)
    (row,) = summarize(find_jobs(root))
    assert row["n"] == 1 and row["accuracy"]["std"] is None and row["accuracy"]["n"] == 1
    assert row["seeds"] == [42] and [len(dirs) for dirs in row["duplicates"].values()] == [2]
