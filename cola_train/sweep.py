"""The end of a multirun: summary.json / summary.md in the sweep dir, listing every job with its
status and result path, then the report (cola_train.report.write_report) where it exists.

Registered as a Hydra callback in conf/config.yaml (hydra.callbacks.sweep_summary).
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("cola_train")


def _expected_jobs(config: DictConfig) -> dict[int, list[str]]:
    """Job number → overrides, as the basic sweeper expands them (empty for other sweepers)."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if "basic" not in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).lower():
            return {}
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
        args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(args)
        batches = BasicSweeper.split_arguments(parsed, None)
        jobs = [job for batch in batches for job in batch]
        return {i: list(job) for i, job in enumerate(jobs)}
    except Exception:  # noqa: BLE001 - the summary must not fail the sweep
        return {}


def _job_dirs(sweep_dir: Path) -> dict[int, tuple[Path, list[str]]]:
    found = {}
    for hydra_yaml in sorted(sweep_dir.glob("*/.hydra/hydra.yaml")):
        try:
            hc = OmegaConf.load(hydra_yaml).hydra
            found[int(hc.job.num)] = (hydra_yaml.parent.parent, list(hc.overrides.task))
        except Exception:  # noqa: BLE001
            continue
    return found


def _row(num: int, job_dir: Path | None, overrides: list[str], sweep_dir: Path) -> dict:
    row = {"num": num, "overrides": overrides, "dir": None, "status": "missing", "result": None}
    if job_dir is None:
        row["error"] = "no run dir (the job never started)"
        return row
    row["dir"] = str(job_dir.relative_to(sweep_dir))
    path = job_dir / "results.json"
    if not path.is_file():
        row.update(status="unknown", error="no results.json (the job died before writing it)")
        return row
    try:
        res = json.loads(path.read_text())
    except ValueError as err:
        row.update(status="unknown", error=f"unreadable results.json: {err}")
        return row
    train, ev, bench = res.get("train") or {}, res.get("eval") or {}, res.get("benchmark") or {}
    row.update(status=res.get("status", "unknown"), result=str(path.relative_to(sweep_dir)),
               error=res.get("error"), train_loss=train.get("loss"), steps=train.get("steps"),
               resumed=train.get("resumed"), eval_loss=ev.get("loss"), accuracy=bench.get("accuracy"))
    return row


def summarize(sweep_dir: str | Path, config: DictConfig | None = None) -> dict:
    """summary.json and summary.md for the sweep dir; returns the summary."""
    from .results import write_json_atomic

    sweep_dir = Path(sweep_dir)
    expected = _expected_jobs(config) if config is not None else {}
    found = _job_dirs(sweep_dir)
    rows = []
    for num in sorted(set(expected) | set(found)):
        job_dir, overrides = found.get(num, (None, expected.get(num, [])))
        rows.append(_row(num, job_dir, overrides, sweep_dir))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = {"sweep_dir": str(sweep_dir.resolve()), "n_jobs": len(rows), "counts": counts, "jobs": rows}
    write_json_atomic(sweep_dir / "summary.json", summary)
    (sweep_dir / "summary.md").write_text(_markdown(summary))
    return summary


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _varying(jobs: list[dict]) -> set[str]:
    """Override keys whose value differs between jobs: the table shows those (the JSON all)."""
    values: dict[str, set] = {}
    for r in jobs:
        for o in r["overrides"]:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    if len(jobs) < 2:
        return set(values)
    return {k for k, v in values.items() if len(v) > 1 or sum(1 for r in jobs if any(
        o.split("=", 1)[0] == k for o in r["overrides"])) < len(jobs)}


def _markdown(summary: dict) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items()))
    lines = ["# Sweep summary", "", f"{summary['sweep_dir']}: {summary['n_jobs']} jobs ({counts})", "",
             "| # | overrides | status | train loss | steps | eval loss | accuracy | result | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    varying = _varying(summary["jobs"])
    for r in summary["jobs"]:
        shown = [o for o in r["overrides"] if o.split("=", 1)[0] in varying] or r["overrides"]
        cells = [r["num"], " ".join(shown), r["status"], r.get("train_loss"), r.get("steps"),
                 r.get("eval_loss"), r.get("accuracy"), r["result"], (r.get("error") or "").splitlines()[:1]]
        cells[-1] = cells[-1][0] if cells[-1] else ""
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _report(sweep_dir: Path) -> None:
    if importlib.util.find_spec("cola_train.report") is None:
        return
    try:
        from .report import write_report

        write_report(sweep_dir)
    except Exception as err:  # noqa: BLE001 - one warning line, the sweep's results stand
        first = (str(err).splitlines() or [""])[0]
        log.warning("report for %s not written: %s: %s", sweep_dir, type(err).__name__, first)


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """The SLURM launcher without sbatch: one line before anything is submitted."""
        target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        if target.endswith("SlurmLauncher"):
            import sys

            from .launch import sbatch_missing

            message = sbatch_missing()
            if message:
                print(f"error: {message}", file=sys.stderr)
                sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        summary = None
        try:
            summary = summarize(sweep_dir, config)
            log.info("sweep summary: %s (%s)", sweep_dir / "summary.md", _counts(summary))
        except Exception as err:  # noqa: BLE001
            log.warning("sweep summary for %s not written: %s: %s", sweep_dir, type(err).__name__, err)
        _report(sweep_dir)
        code = exit_code(summary)  # last: the summary and the report are written whatever it is
        if code:
            import sys

            print(f"cola_train: sweep {sweep_dir} did not complete every job "
                  f"({_counts(summary)}); see summary.md. Exit {code}", file=sys.stderr)
            sys.exit(code)


def _counts(summary: dict | None) -> str:
    if summary is None:
        return "no summary"
    return ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items()))


def exit_code(summary: dict | None) -> int:
    """The multirun's exit code (docs/ERRORS.md, "Exit codes"): 0 when every job completed;
    3 (preemption.EXIT_PREEMPTED) when the only unfinished jobs were preempted, since the same
    command resumes them; 1 when any job failed, died or never started, or when the summary could
    not be written (nothing then says the sweep is whole). A script that runs sweeps (study.py,
    a CI job) must not take a sweep with failed jobs for a finished one."""
    from .preemption import EXIT_PREEMPTED

    if summary is None:
        return 1
    unfinished = {s for s, n in summary["counts"].items() if n and s != "completed"}
    if not unfinished:
        return 0
    return EXIT_PREEMPTED if unfinished == {"preempted"} else 1
