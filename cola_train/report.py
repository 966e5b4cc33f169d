"""A sweep's job dirs -> one table (Markdown + CSV) and the paper's plots.

    python -m cola_train.report <multirun dir> [--out DIR]

A job dir is any folder under the multirun dir holding `.hydra/config.yaml`. A job counts only
if its `results.json` parses and says status "completed"; every other job is listed under
"Failed jobs" with the reason and never averaged in. Completed jobs are grouped by model,
method, domain and training-set size (n_train_samples), and split by any swept hyper-parameter
(HYPER: lr, r, ...) that varies inside such a cell; each metric is shown as the mean and the
sample standard deviation (ddof=1) over the group's seeds, with n.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class ReportError(RuntimeError):
    """Nothing to report on (no such dir, no job dirs): one line, exit code 2."""


# (key in a row, column title, how to read it from results.json)
METRICS = [
    ("accuracy", "accuracy", ("benchmark", "accuracy")),
    ("eval_loss", "eval loss", ("eval", "loss")),
    ("trainable_params", "trainable params", ("params", "trainable")),
    ("tokens_per_s", "tokens/s", ("train", "tokens_per_s")),
    ("energy_j", "energy (J)", ("energy", "joules")),
]
PLOTTED = ["accuracy", "eval_loss"]
# totals over a run, which a job resumed without its earlier segments' totals undercounts
# (run_totals.py); rates such as tokens/s stay valid for it
WHOLE_RUN = {"energy_j"}
# hyper-parameters a study may sweep besides the seed: where one varies inside a (model, method,
# domain, size) cell, its value splits the cell and is shown as the row's "settings"
HYPER = [("trainer", "lr", "lr"), ("method", "r", "r"), ("method", "alpha", "alpha"),
         ("method", "num_A", "num_A"), ("method", "num_B", "num_B"), ("method", "dropout", "dropout"),
         ("method", "links", "links"), ("trainer", "batch_size", "batch"), ("trainer", "epochs", "epochs"),
         ("data", "cutoff_len", "cutoff")]


@dataclass
class Job:
    dir: Path
    config: dict = field(default_factory=dict)
    results: dict | None = None
    reason: str | None = None           # why it failed; None if completed


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _merge(base: dict, over: dict) -> dict:
    """`over` wins; keys only `base` has are kept (results.json may hold a partial config)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _hydra_config(job_dir: Path) -> dict:
    try:
        from omegaconf import OmegaConf
        return OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "config.yaml")) or {}
    except Exception:  # a broken config.yaml still leaves the job listed
        return {}


def find_jobs(multirun_dir: str | Path) -> list[Job]:
    root = Path(multirun_dir)
    if not root.is_dir():
        raise ReportError(f"no such directory: {root}")
    dirs = sorted({p.parent.parent for p in root.rglob(".hydra/config.yaml")},
                  key=lambda d: [(0, int(s), "") if s.isdigit() else (1, 0, s)
                                 for s in d.relative_to(root).parts])
    if not dirs:
        raise ReportError(f"no job dirs (folders with .hydra/config.yaml) under {root}")
    jobs = []
    for d in dirs:
        job = Job(dir=d, config=_hydra_config(d))
        path = d / "results.json"
        if not path.is_file():
            job.reason = "no results.json"
        else:
            try:
                results = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                results = None
            if not isinstance(results, dict):
                job.reason = "unparseable results.json"
            elif results.get("status") != "completed":
                error = results.get("error")
                job.reason = f"status={results.get('status')}" + (f": {error}" if error else "")
            else:
                job.results = results
                if isinstance(results.get("config"), dict):
                    job.config = _merge(job.config, results["config"])
        jobs.append(job)
    return jobs


def _key(job: Job) -> tuple:
    cfg, res = job.config, job.results or {}
    samples = res.get("n_train_samples")
    if not isinstance(samples, int):
        samples = _get(cfg, "data", "max_samples")
    return (str(_get(cfg, "model", "name") or "?"), str(_get(cfg, "method", "name") or "?"),
            str(_get(cfg, "data", "domain") or "?"), samples if isinstance(samples, int) else -1)


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
            "n": len(arr)}


def counts_whole_run(results: dict) -> bool:
    """False for a job resumed from a checkpoint without run totals, or written before they existed."""
    train = results.get("train") or {}
    if "counted_from_step" in train:
        return train["counted_from_step"] == 0
    return not train.get("resumed", False)


def _hyper(job: Job) -> dict:
    return {label: _get(job.config, section, key) for section, key, label in HYPER}


def summarize(jobs: list[Job]) -> list[dict]:
    """One row per (model, method, domain, n_train_samples) with per-metric mean/std/n; split
    further by any HYPER setting that varies inside such a cell (e.g. an lr sweep)."""
    done = [j for j in jobs if j.results is not None]
    cells: dict[tuple, list[Job]] = {}
    for job in done:
        cells.setdefault(_key(job), []).append(job)
    varying = [label for _, _, label in HYPER
               if any(len({repr(_hyper(j)[label]) for j in cell}) > 1 for cell in cells.values())]
    groups: dict[tuple, list[Job]] = {}
    for job in done:
        settings = tuple((label, _hyper(job)[label]) for label in varying)
        groups.setdefault((*_key(job), settings), []).append(job)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[2], k[1], k[3], repr(k[4]))):
        members = groups[key]
        row = {"model": key[0], "method": key[1], "domain": key[2], "n_train_samples": key[3],
               "settings": ", ".join(f"{label}={value}" for label, value in key[4]),
               "n": len(members),
               "seeds": sorted({_get(j.config, "seed") for j in members}, key=str)}
        for name, _, path in METRICS:
            whole = [j for j in members if name not in WHOLE_RUN or counts_whole_run(j.results)]
            values = [v for v in (_number(_get(j.results, *path)) for j in whole) if v is not None]
            row[name] = _stats(values)
        rows.append(row)
    return rows


def _fmt(value: float | None, name: str) -> str:
    if value is None:
        return "—"
    if name == "trainable_params":
        return f"{value:,.0f}"
    if name in ("accuracy",):
        return f"{value:.4f}"
    if name == "eval_loss":
        return f"{value:.4f}"
    return f"{value:.4g}"


def _cell(stat: dict, name: str, n_group: int) -> str:
    if stat["n"] == 0:
        return "—"
    text = _fmt(stat["mean"], name)
    if stat["std"] is not None:
        text += f" ± {_fmt(stat['std'], name)}"
    if stat["n"] != n_group:
        text += f" (n={stat['n']})"
    return text


def markdown_table(rows: list[dict]) -> str:
    with_settings = any(r.get("settings") for r in rows)
    titles = ["model", "method"] + (["settings"] if with_settings else []) + ["domain", "samples", "n"]
    titles += [t for _, t, _ in METRICS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in rows:
        cells = [r["model"], r["method"]] + ([r.get("settings", "")] if with_settings else [])
        cells += [r["domain"], str(r["n_train_samples"]) if r["n_train_samples"] >= 0 else "?", str(r["n"])]
        cells += [_cell(r[name], name, r["n"]) for name, _, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    header = ["model", "method", "settings", "domain", "n_train_samples", "n", "seeds"]
    for name, _, _ in METRICS:
        header += [f"{name}_mean", f"{name}_std", f"{name}_n"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            line = [r["model"], r["method"], r.get("settings", ""), r["domain"], r["n_train_samples"], r["n"],
                    " ".join(map(str, r["seeds"]))]
            for name, _, _ in METRICS:
                s = r[name]
                line += ["" if s["mean"] is None else repr(s["mean"]),
                         "" if s["std"] is None else repr(s["std"]), s["n"]]
            writer.writerow(line)
    return path


def _label(row: dict, many_models: bool) -> str:
    label = f"{row['model']}/{row['method']}" if many_models else row["method"]
    return f"{label} ({row['settings']})" if row.get("settings") else label


def plot_vs_samples(rows: list[dict], metric: str, title: str, path: Path) -> Path | None:
    """The paper's low-sample figure: metric vs training-set size, a line per method with
    std error bars, a subplot per domain."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r[metric]["n"] > 0 and r["n_train_samples"] >= 0]
    if not rows:
        return None
    domains = sorted({r["domain"] for r in rows})
    many_models = len({r["model"] for r in rows}) > 1
    fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.6), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        lines: dict[str, list[dict]] = {}
        for r in rows:
            if r["domain"] == domain:
                lines.setdefault(_label(r, many_models), []).append(r)
        for label, points in sorted(lines.items()):
            points.sort(key=lambda r: r["n_train_samples"])
            x = [p["n_train_samples"] for p in points]
            y = [p[metric]["mean"] for p in points]
            err = [p[metric]["std"] or 0.0 for p in points]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        xs = sorted({r["n_train_samples"] for r in rows if r["domain"] == domain})
        if xs and xs[0] > 0 and xs[-1] / xs[0] >= 10:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_title(domain)
        ax.set_xlabel("training samples")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_energy(rows: list[dict], path: Path) -> Path | None:
    """Energy per method (bars, std error bars), grouped by domain and training-set size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["energy_j"]["n"] > 0]
    if not rows:
        return None
    many_models = len({r["model"] for r in rows}) > 1
    groups = sorted({(r["domain"], r["n_train_samples"]) for r in rows})
    labels = sorted({_label(r, many_models) for r in rows})
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(labels)) * 0.6), 3.8))
    for k, label in enumerate(labels):
        xs, ys, errs = [], [], []
        for g, (domain, samples) in enumerate(groups):
            for r in rows:
                if (r["domain"], r["n_train_samples"], _label(r, many_models)) == (domain, samples, label):
                    xs.append(g + (k - (len(labels) - 1) / 2) * width)
                    ys.append(r["energy_j"]["mean"])
                    errs.append(r["energy_j"]["std"] or 0.0)
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{d}\n{s} samples" for d, s in groups])
    ax.set_ylabel("energy (J)")
    ax.set_title("GPU energy per run")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(multirun_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.csv and the plots; return {name: path} of what was written."""
    root = Path(multirun_dir)
    jobs = find_jobs(root)
    out = Path(out_dir) if out_dir else root
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(jobs)
    failed = [j for j in jobs if j.results is None]

    paths: dict[str, Path] = {"csv": write_csv(rows, out / "report.csv")}
    plots = {}
    for metric in PLOTTED:
        title = dict((n, t) for n, t, _ in METRICS)[metric]
        p = plot_vs_samples(rows, metric, title, out / f"plot_{metric}_vs_samples.png")
        if p:
            plots[f"plot_{metric}"] = p
    p = plot_energy(rows, out / "plot_energy.png")
    if p:
        plots["plot_energy"] = p

    n_done = len(jobs) - len(failed)
    md = [f"# Sweep report: {root}", "",
          f"{len(jobs)} job(s): {n_done} completed, {len(failed)} failed. Cells are mean ± "
          "sample std over seeds (n = completed jobs in the group; '(n=k)' where a metric was "
          "measured in fewer: energy leaves out jobs resumed without their earlier segments' "
          "totals).", ""]
    md += [markdown_table(rows) if rows else "_No completed jobs._", ""]
    if plots:
        md += ["## Plots", ""] + [f"![{k}]({p.name})" for k, p in plots.items()] + [""]
    md += ["## Failed jobs", ""]
    if failed:
        for j in failed:
            md.append(f"- `{j.dir.relative_to(root) if j.dir != root else '.'}`: {j.reason}")
    else:
        md.append("None.")
    md.append("")
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    paths = {"markdown": out / "report.md", **paths, **plots}
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cola_train.report",
                                     description="Table and plots from a Hydra multirun dir.")
    parser.add_argument("multirun_dir")
    parser.add_argument("--out", default=None, help="where to write (default: the multirun dir)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.multirun_dir, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = summarize(find_jobs(args.multirun_dir))
    print(markdown_table(rows) if rows else "(no completed jobs)")
    print()
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
