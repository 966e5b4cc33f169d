"""A sweep's job dirs -> one table (Markdown + CSV) and the paper's plots.

    python -m cola_train.report <multirun dir> [--out DIR]

A job dir is any folder under the multirun dir holding `.hydra/config.yaml`. A job counts only
if its `results.json` parses and says status "completed"; every other job is listed under
"Failed jobs" with the reason and never averaged in.

A row is one *effective config* (effective.py): every config value but the seed, with the
training-sample count the job really had (n_train_samples) in place of data.fraction and
data.max_samples, which only bound it. Rows are labelled by model, method, domain and size; any
other value that differs between rows of one such cell (an lr sweep, a scheduler, ...) is shown
under "settings". Each metric is the mean and the sample standard deviation (ddof=1) over the
row's distinct seeds, with n = the number of distinct seeds. Jobs with one effective config *and*
one seed are one run repeated, not seed variance: they count as one seed (their mean), the row
says so under "duplicates", and the report warns.

An lr sweep (experiment=lr_sweep) adds a table of each method at its own best lr, chosen by the
mean validation loss and never by the benchmark (select_by_eval_loss; docs/PROTOCOL.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .effective import effective_config

log = logging.getLogger("cola_train")


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
# short names for the settings a study sweeps most; any other config value that varies inside a
# (model, method, domain, size) cell splits it too, shown under its dotted key
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


# the row's own columns; every other varying value is a setting
CELL = ("model.name", "method.name", "data.domain", "n_train_samples")


def _effective(job: Job) -> dict:
    """The job's effective config, less the seed (what a row's seeds vary)."""
    samples = (job.results or {}).get("n_train_samples")
    known = isinstance(samples, int) and not isinstance(samples, bool)
    flat = effective_config(job.config, samples if known else None)
    flat.pop("seed", None)
    flat.setdefault("n_train_samples", -1)
    return flat


def _seed_order(seed) -> tuple:
    return (0, seed, "") if _number(seed) is not None else (1, 0, str(seed))


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


def _setting_name(key: str) -> str:
    return next((label for section, name, label in HYPER if key == f"{section}.{name}"), key)


def summarize(jobs: list[Job]) -> list[dict]:
    """One row per effective config (see the module doc), with per-metric mean/std/n over its
    distinct seeds; a value that varies inside a (model, method, domain, size) cell is shown
    as the row's settings, on every row."""
    done = [j for j in jobs if j.results is not None]
    groups: dict[str, tuple[dict, list[Job]]] = {}
    for job in done:
        flat = _effective(job)
        key = json.dumps(sorted(flat.items()), default=str)
        groups.setdefault(key, (flat, []))[1].append(job)
    cells: dict[tuple, list[dict]] = {}
    for flat, _ in groups.values():
        cells.setdefault(tuple(str(flat.get(k, "?")) for k in CELL), []).append(flat)
    keys = sorted({k for flat, _ in groups.values() for k in flat} - set(CELL))
    varying = [k for k in keys
               if any(len({repr(f.get(k, "<unset>")) for f in cell}) > 1 for cell in cells.values())]
    hyper_order = [f"{section}.{name}" for section, name, _ in HYPER]
    varying.sort(key=lambda k: (hyper_order.index(k) if k in hyper_order else len(hyper_order), k))
    rows = []
    for flat, members in groups.values():
        by_seed: dict = {}
        for job in members:
            by_seed.setdefault(_get(job.config, "seed"), []).append(job)
        seeds = sorted(by_seed, key=_seed_order)
        samples = flat["n_train_samples"]
        row = {"model": str(flat.get("model.name") or "?"), "method": str(flat.get("method.name") or "?"),
               "domain": str(flat.get("data.domain") or "?"),
               "n_train_samples": samples if isinstance(samples, int) else -1,
               "settings": ", ".join(f"{_setting_name(k)}={flat.get(k)}" for k in varying),
               "n": len(seeds), "seeds": seeds, "jobs": len(members), "lr": flat.get("trainer.lr"),
               "settings_but_lr": ", ".join(f"{_setting_name(k)}={flat.get(k)}" for k in varying if k != "trainer.lr"),
               "duplicates": {seed: [j.dir for j in by_seed[seed]] for seed in seeds if len(by_seed[seed]) > 1}}
        for name, _, path in METRICS:
            per_seed = []
            for seed in seeds:
                whole = [j for j in by_seed[seed] if name not in WHOLE_RUN or counts_whole_run(j.results)]
                values = [v for v in (_number(_get(j.results, *path)) for j in whole) if v is not None]
                if values:  # a repeated run is one seed: its jobs' mean, never a spread
                    per_seed.append(float(np.mean(values)))
            row[name] = _stats(per_seed)
        rows.append(row)
    rows.sort(key=lambda r: (r["model"], r["domain"], r["method"], r["n_train_samples"], r["settings"]))
    return rows


def select_by_eval_loss(rows: list[dict]) -> list[dict]:
    """The lr each method is compared at: within one (model, method, domain, size, other settings)
    the row whose lr gave the lowest mean validation loss (eval.loss, the held-out split of the
    training data). Never the benchmark: choosing by the test score would tune on the test set.
    Only cells that tried more than one lr with a validation loss; each pick lists the lrs tried."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("lr") is not None and r["eval_loss"]["mean"] is not None:
            key = (r["model"], r["method"], r["domain"], r["n_train_samples"], r.get("settings_but_lr", ""))
            cells.setdefault(key, []).append(r)
    picks = []
    for members in cells.values():
        if len({r["lr"] for r in members}) < 2:
            continue
        best = min(members, key=lambda r: (r["eval_loss"]["mean"], float(r["lr"])))
        tried = sorted(members, key=lambda r: float(r["lr"]))
        picks.append({**best, "tried": [(r["lr"], r["eval_loss"]["mean"]) for r in tried]})
    return sorted(picks, key=lambda r: (r["model"], r["domain"], r["method"], r["n_train_samples"]))


def selection_table(picks: list[dict]) -> str:
    titles = ["model", "method", "other settings", "domain", "samples", "lr (by eval loss)", "n", "eval loss",
              "accuracy", "lrs tried: eval loss"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in picks:
        tried = "; ".join(f"{lr:g}: {loss:.4f}" for lr, loss in r["tried"])
        lines.append("| " + " | ".join([
            r["model"], r["method"], r.get("settings_but_lr", ""), r["domain"],
            str(r["n_train_samples"]) if r["n_train_samples"] >= 0 else "?", f"{float(r['lr']):g}", str(r["n"]),
            _cell(r["eval_loss"], "eval_loss", r["n"]), _cell(r["accuracy"], "accuracy", r["n"]), tried]) + " |")
    return "\n".join(lines)


def duplicates_text(row: dict) -> str:
    return ", ".join(f"seed {seed} ×{len(dirs)}" for seed, dirs in row["duplicates"].items())


def duplicate_warning(rows: list[dict], root: Path) -> str | None:
    """One line naming the repeated jobs (a sweep's `<num>_<overrides>` dir as #num), or None."""
    def rel(d: Path) -> str:
        if d == root:
            return "."
        path, number = d.relative_to(root), re.match(r"(\d+)_", d.name)
        return str(path.parent / f"#{number[1]}") if number else str(path)

    repeats = [(r, seed, dirs) for r in rows for seed, dirs in r["duplicates"].items()]
    if not repeats:
        return None
    n_extra = sum(len(dirs) - 1 for _, _, dirs in repeats)
    named = "; ".join(f"jobs {' = '.join(rel(d) for d in dirs)} ({r['method']}, {r['n_train_samples']} "
                      f"samples, seed {seed})" for r, seed, dirs in repeats)
    return (f"{n_extra} job(s) repeat another job's effective config and seed, so each such seed "
            f"counts once (the jobs' mean) and is no seed variance: {named}")


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
    with_duplicates = any(r.get("duplicates") for r in rows)
    titles = ["model", "method"] + (["settings"] if with_settings else []) + ["domain", "samples", "n", "seeds"]
    titles += (["duplicates"] if with_duplicates else []) + [t for _, t, _ in METRICS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in rows:
        cells = [r["model"], r["method"]] + ([r.get("settings", "")] if with_settings else [])
        cells += [r["domain"], str(r["n_train_samples"]) if r["n_train_samples"] >= 0 else "?", str(r["n"]),
                  " ".join(map(str, r["seeds"]))]
        cells += [duplicates_text(r)] if with_duplicates else []
        cells += [_cell(r[name], name, r["n"]) for name, _, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    header = ["model", "method", "settings", "domain", "n_train_samples", "n", "seeds"]
    for name, _, _ in METRICS:
        header += [f"{name}_mean", f"{name}_std", f"{name}_n"]
    header += ["jobs", "duplicates"]
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
            line += [r["jobs"], duplicates_text(r)]
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
          f"{len(jobs)} job(s): {n_done} completed, {len(failed)} failed. A row is one effective "
          "config: every config value but the seed, with the training-sample count the jobs had "
          "in place of data.fraction/data.max_samples. Cells are mean ± sample std over the row's "
          "distinct seeds (n = distinct seeds; '(n=k)' where a metric was measured in fewer: "
          "energy leaves out jobs resumed without their earlier segments' totals).", ""]
    warning = duplicate_warning(rows, root)
    if warning:
        log.warning("report: %s", warning)
        md += [f"**Warning:** {warning}", ""]
    md += [markdown_table(rows) if rows else "_No completed jobs._", ""]
    picks = select_by_eval_loss(rows)
    if picks:  # an lr sweep (experiment=lr_sweep): each method at its own best lr, docs/PROTOCOL.md
        md += ["## Each method at its best lr (chosen by validation loss, never by the benchmark)", "",
               selection_table(picks), ""]
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
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
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
