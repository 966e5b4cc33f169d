"""The study's verdict (issue #27): from the run dirs of study_plan's layout, one row per claim of
the CoLA paper with our numbers and whether the difference is larger than the seeds' spread.

    python scripts/study.py --verdict --sweep-dir <root> --out docs/study_<date>

The test, stated once (it heads verdict.md): for a pair of arms in one (domain, size), each at its
own lr chosen on the validation loss of its first seed (study_plan.pick_lr), the per-seed values
of a metric are compared with Welch's two-sided t-test (unequal variances), alpha = 0.05. p < alpha
names the better arm; otherwise the row says "not separable". No correction for the many rows is
made: read a lone p of 0.04 among fifty rows as chance. A side with fewer than 3 seeds is never
given a verdict: the row prints "n < 3" with what there is. Where both sides have zero spread the
test is undefined: equal means are "not separable", different ones separable (p = 0).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .report import counts_whole_run
from .study_plan import (ARMS, MULTITASK, MULTITASK_ARMS, Study, data_missing, eval_loss,
                         lr_text, method_missing, pick_lr, read_status)

ALPHA = 0.05
MIN_SEEDS = 3
# (key, title, lower is better)
METRICS = [("eval_loss", "eval loss", True), ("letter", "accuracy (letter)", False),
           ("cloze", "accuracy (cloze)", False), ("energy_j", "energy (J)", True)]
LOWER_BETTER = {k: low for k, _, low in METRICS}
TITLE = {k: t for k, t, _ in METRICS}


def metric(results: dict, name: str) -> float | None:
    """One number of a completed run's results.json (None where it was not measured)."""
    bench = results.get("benchmark") or {}
    if name == "eval_loss":
        return eval_loss(results)
    if name in ("letter", "cloze"):
        by = bench.get("by_scoring") or {}
        if name in by:
            value = by[name].get("accuracy")
        elif name == "letter" and bench.get("accuracy") is not None and not bench.get("scoring"):
            value = bench.get("accuracy")      # letter only: the default output has no by_scoring
        else:
            value = None
    elif name == "energy_j":
        value = (results.get("energy") or {}).get("joules") if counts_whole_run(results) else None
    else:
        raise KeyError(name)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass
class Cell:
    """One arm in one (domain, size) at its chosen lr: the per-seed values of each metric."""
    domain: str
    arm: str
    size: int
    lr: str | None
    values: dict = field(default_factory=dict)     # metric -> [value per seed]
    seeds: list = field(default_factory=list)
    tried: list = field(default_factory=list)      # (lr, validation loss, status) of the first seed
    why: str = ""                                  # why there is no lr yet / why skipped


def cell(study: Study, domain: str, arm: str, size: int) -> Cell:
    """The arm's runs at its chosen lr (grid arms: at the one lr they ran at)."""
    root = Path(study.root)
    if arm.startswith("grid_"):
        lrs = sorted(p.name[2:] for p in (root / domain / arm / f"n{size}").glob("lr*") if p.is_dir())
        lr, tried, why = (lrs[0] if len(lrs) == 1 else None), [], "" if len(lrs) == 1 else \
            ("not run" if not lrs else f"runs at several lrs: {', '.join(lrs)}")
    else:
        pick = pick_lr(root, domain, arm, size, study.lrs, study.seeds[0])
        lr, tried, why = pick["lr"], pick["tried"], pick["why"] or ""
        if all(status == "todo" for _, _, status in tried) and not any(
                (root / domain / arm / f"n{size}").glob("lr*/s*/results.json")):
            why = "not run"
    out = Cell(domain, arm, size, lr, {k: [] for k, _, _ in METRICS}, tried=tried, why=why)
    if lr is None:
        return out
    for seed in study.seeds:
        status, results = read_status(root / domain / arm / f"n{size}" / f"lr{lr_text(lr)}" / f"s{seed}")
        if status != "completed":
            continue
        out.seeds.append(seed)
        for name, _, _ in METRICS:
            value = metric(results, name)
            if value is not None:
                out.values[name].append(value)
    return out


def stats(values: list[float]) -> dict:
    n = len(values)
    return {"mean": statistics.fmean(values) if n else None,
            "std": statistics.stdev(values) if n > 1 else None, "n": n}


def welch_p(x: list[float], y: list[float]) -> float:
    """Two-sided p of Welch's t-test; both spreads zero: 1 for equal means, else 0."""
    vx, vy = statistics.variance(x), statistics.variance(y)
    if vx == 0 and vy == 0:
        return 1.0 if statistics.fmean(x) == statistics.fmean(y) else 0.0
    from scipy import stats as st

    return float(st.ttest_ind(x, y, equal_var=False).pvalue)


def compare(a: list[float], b: list[float], lower_better: bool, names=("A", "B")) -> dict:
    """The verdict on a pair (see the module doc): 'A better', 'B better', 'not separable',
    'n < 3' or 'pending: not run'."""
    out = {"a": stats(a), "b": stats(b), "diff": None, "p": None}
    if not a and not b:
        out["verdict"] = "pending: not run"
        return out
    if out["a"]["n"] and out["b"]["n"]:
        out["diff"] = out["a"]["mean"] - out["b"]["mean"]
    if len(a) < MIN_SEEDS or len(b) < MIN_SEEDS:
        out["verdict"] = f"n < {MIN_SEEDS} (n={len(a)} vs {len(b)}): no verdict"
        return out
    out["p"] = welch_p(a, b)
    if out["p"] >= ALPHA:
        out["verdict"] = "not separable"
    else:
        a_better = (out["diff"] < 0) == lower_better
        out["verdict"] = f"{names[0] if a_better else names[1]} better"
    return out


# ---- the claims -----------------------------------------------------------------------------

CLAIMS = {
    "low_sample": ("CoLA beats LoRA and PiSSA at low sample sizes",
                   "CoLA ahead of LoRA r8 and PiSSA in every domain (Llama-3.1-8B: e.g. math 59.1 vs 51.0 / 57.0); "
                   "holds down to ~200 samples, LoRA degrades below 300"),
    "strategies": ("fully vs heuristic vs random", "energy (CodeCarbon): random < heuristic < fully"),
    "grid": ("#A < #B is best", "#A < #B best in the 1..5 grid"),
    "multitask": ("CoLA beats HydraLoRA and MOELoRA on multi-task",
                  "BBH 8B: CoLA 1\\|14 42.9, CoLA-T 4\\|10 43.6 vs HydraLoRA 1\\|14 39.1, MOELoRA 8\\|8 40.5"),
    "lr_effect": ("CoLA's gain is more than a learning-rate effect",
                  "(not a claim of the paper: our control) the gain comes from collaboration"),
}


@dataclass
class Row:
    claim: str
    domain: str
    size: int | str
    metric: str
    a: str
    b: str
    result: dict
    note: str = ""
    expect: str | None = "a"          # which side the paper's claim says is better (None: no direction)


def _expect(claim: str, metric: str) -> str | None:
    if claim == "strategies":
        # the paper ranks energy random < heuristic < fully; the pairs are (more, less) collaborative
        return "b" if metric == "energy_j" else None
    return "a"


def _pairs_rows(study: Study, claim: str, domain: str, pairs, metrics, cells: dict, skip: dict) -> list[Row]:
    rows = []
    for size in study.sizes:
        for a, b in pairs:
            if a in skip or b in skip:
                why = skip.get(a) or skip.get(b)
                for m in metrics:
                    rows.append(Row(claim, domain, size, m, a, b, {"verdict": f"skipped: {why}", "a": stats([]),
                                                                   "b": stats([]), "diff": None, "p": None},
                                    expect=_expect(claim, m)))
                continue
            ca = cells.get((domain, a, size)) or Cell(domain, a, size, None, {k: [] for k, _, _ in METRICS})
            cb = cells.get((domain, b, size)) or Cell(domain, b, size, None, {k: [] for k, _, _ in METRICS})
            note = f"lr {ca.lr or '?'} vs {cb.lr or '?'}"
            for m in metrics:
                rows.append(Row(claim, domain, size, m, a, b,
                                compare(ca.values[m], cb.values[m], LOWER_BETTER[m], (a, b)), note, _expect(claim, m)))
    return rows


def build(study: Study) -> dict:
    """Every cell and every claim row of the study under study.root."""
    skip = {}
    for name in list(ARMS) + [f"{MULTITASK}:{n}" for n in MULTITASK_ARMS]:
        arm = ARMS.get(name) or MULTITASK_ARMS.get(name.split(":", 1)[-1])
        why = method_missing(arm)
        if why:
            skip[name] = why
    mt_missing = data_missing(MULTITASK, study.data_root)
    domains = [d for d in study.domains if d != MULTITASK]
    cells = {(d, a, n): cell(study, d, a, n) for d in domains for a in study.arms for n in study.sizes}
    if MULTITASK in study.domains and not mt_missing:
        cells.update({(MULTITASK, a, n): cell(study, MULTITASK, a, n) for a in study.multitask_arms
                      for n in study.sizes})
    grid_cells = {}
    if study.grid_domain in study.domains:
        for n in study.grid_sizes:
            for a, b in study.grid:
                name = f"grid_{study.grid_method}_A{a}B{b}"
                grid_cells[(a, b, n)] = cell(study, study.grid_domain, name, n)
    single_skip = {k: v for k, v in skip.items() if ":" not in k}
    rows: list[Row] = []
    acc = ["eval_loss", "letter", "cloze"]
    for d in domains:
        rows += _pairs_rows(study, "low_sample", d, [(c, base) for c in ("cola_fully", "cola_heuristic", "cola_random")
                                                     for base in ("lora", "pissa")], acc, cells, single_skip)
    for d in domains:
        rows += _pairs_rows(study, "strategies", d, [("cola_fully", "cola_heuristic"), ("cola_heuristic", "cola_random"),
                                                     ("cola_fully", "cola_random")], acc + ["energy_j"], cells, single_skip)
    for n in study.grid_sizes:
        if grid_cells:
            rows.append(_grid_row(study, grid_cells, n))
        else:
            rows.append(Row("grid", study.grid_domain, n, "eval_loss", "best #A<#B", "best #A>=#B",
                            {"verdict": f"skipped: --grid-domain {study.grid_domain} is not among --domains",
                             "a": stats([]), "b": stats([]), "diff": None, "p": None}))
    mt_pairs = [(c, b) for c in ("cola_1x14", "cola_t_4x10") for b in ("hydralora_1x14", "moelora")]
    if MULTITASK not in study.domains or mt_missing:
        why = mt_missing or "multitask not among --domains"
        rows += [Row("multitask", MULTITASK, "—", m, a, b, {"verdict": f"skipped: {why}", "a": stats([]),
                                                            "b": stats([]), "diff": None, "p": None})
                 for a, b in mt_pairs for m in ("letter", "cloze")]
    else:
        mt_skip = {k.split(":", 1)[1]: v for k, v in skip.items() if k.startswith(f"{MULTITASK}:")}
        rows += _pairs_rows(study, "multitask", MULTITASK, mt_pairs, acc, cells, mt_skip)
    for d in domains:
        rows += _pairs_rows(study, "lr_effect", d, [("cola_fully", "pissa_collapsed"),
                                                    ("cola_heuristic_split", "cola_heuristic")], acc, cells, single_skip)
    return {"cells": cells, "grid": grid_cells, "rows": rows, "skip": skip, "multitask_missing": mt_missing}


def _grid_row(study: Study, grid_cells: dict, size: int) -> Row:
    """The best #A < #B shape against the best #A >= #B shape (by mean validation loss)."""
    def best(shapes):
        scored = [(statistics.fmean(grid_cells[(a, b, size)].values["eval_loss"]), (a, b)) for a, b in shapes
                  if grid_cells[(a, b, size)].values["eval_loss"]]
        return min(scored)[1] if scored else None

    fewer = best([(a, b) for a, b in study.grid if a < b])
    rest = best([(a, b) for a, b in study.grid if a >= b])
    if fewer is None or rest is None:
        result = {"verdict": "pending: not run", "a": stats([]), "b": stats([]), "diff": None, "p": None}
        if fewer or rest:
            result["verdict"] = "pending: one side of the grid has no runs"
        return Row("grid", study.grid_domain, size, "eval_loss", "best #A<#B", "best #A>=#B", result)
    ca, cb = grid_cells[(*fewer, size)], grid_cells[(*rest, size)]
    names = (f"{fewer[0]}x{fewer[1]}", f"{rest[0]}x{rest[1]}")   # #A x #B ("|" would split a table cell)
    return Row("grid", study.grid_domain, size, "eval_loss", *names,
               compare(ca.values["eval_loss"], cb.values["eval_loss"], True, names),
               f"{study.grid_method}, lr {ca.lr}")


# ---- text -----------------------------------------------------------------------------------

def fmt_stat(s: dict, name: str) -> str:
    if not s["n"]:
        return "—"
    digits = ".0f" if name == "energy_j" else ".4f"
    std = "" if s["std"] is None else f" ± {s['std']:{digits}}"
    return f"{s['mean']:{digits}}{std} ({s['n']})"


def test_text() -> str:
    return (f"**The test.** Each arm at its own lr, chosen on the validation loss of seed {{first}} "
            f"(never on the benchmark). Per-seed values of the two arms are compared with Welch's "
            f"two-sided t-test, alpha = {ALPHA}: p < {ALPHA} names the better arm, else \"not "
            f"separable\". Cells are mean ± sample std (n seeds). A side with n < {MIN_SEEDS} gets no "
            f"verdict. No correction for the number of rows.")


def outcome(row: Row) -> str:
    """'agrees', 'contradicts', 'not separable' or 'no verdict' (n < 3, pending, skipped), for the
    rows whose claim names a better side; 'separable' / 'not separable' / 'no verdict' otherwise."""
    verdict = row.result["verdict"]
    if verdict == "not separable":
        return verdict
    if not verdict.endswith(" better"):
        return "no verdict"
    if row.expect is None:
        return "separable"
    winner = verdict[: -len(" better")]
    return "agrees" if winner == (row.a if row.expect == "a" else row.b) else "contradicts"


def summary_table(rows: list[Row]) -> str:
    """One row per claim: what the paper says and how our comparisons came out."""
    lines = ["| claim | paper says | comparisons | agree | contradict | not separable | no verdict (n < 3, "
             "pending, skipped) |", "|---|---|---|---|---|---|---|"]
    for key, (title, paper) in CLAIMS.items():
        mine = [r for r in rows if r.claim == key]
        counts = {o: sum(outcome(r) == o for r in mine) for o in ("agrees", "contradicts", "separable",
                                                                  "not separable", "no verdict")}
        agree = f"{counts['agrees']}" + (f" (+{counts['separable']} separable, no direction)" if counts["separable"] else "")
        lines.append(f"| {title} | {paper} | {len(mine)} | {agree} | {counts['contradicts']} | "
                     f"{counts['not separable']} | {counts['no verdict']} |")
    return "\n".join(lines)


def claims_table(rows: list[Row]) -> str:
    """Every comparison, claim by claim ("expected": the side the paper's claim says is better)."""
    out = []
    for key, (title, paper) in CLAIMS.items():
        mine = [r for r in rows if r.claim == key]
        if not mine:
            continue
        lines = [f"### {title}", "", f"Paper: {paper}.", "",
                 "| domain | samples | metric | A | A: mean ± std (n) | B | B: mean ± std (n) | A − B | Welch p "
                 "| verdict | expected | lrs |", "|" + "---|" * 12]
        for r in mine:
            res = r.result
            diff = "—" if res.get("diff") is None else f"{res['diff']:+.4g}"
            p = "—" if res.get("p") is None else f"{res['p']:.3g}"
            expected = {"a": r.a, "b": r.b}.get(r.expect, "—")
            lines.append("| " + " | ".join([r.domain, str(r.size), TITLE[r.metric], r.a, fmt_stat(res["a"], r.metric),
                                            r.b, fmt_stat(res["b"], r.metric), diff, p, res["verdict"], expected,
                                            r.note]) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def cells_table(cells: dict) -> str:
    lines = ["| domain | samples | arm | lr (by val. loss) | seeds | eval loss | accuracy (letter) | accuracy (cloze) "
             "| energy (J) | lrs tried at the first seed: val. loss |", "|" + "---|" * 10]
    for (domain, arm, size), c in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        tried = "; ".join(f"{lr}: {'diverged' if status == 'diverged' else ('—' if loss is None else f'{loss:.4f}')}"
                          for lr, loss, status in c.tried)
        lines.append("| " + " | ".join([domain, str(size), arm, c.lr or f"— ({c.why})", " ".join(map(str, c.seeds)) or "—",
                                        *(fmt_stat(stats(c.values[m]), m) for m, _, _ in METRICS), tried]) + " |")
    return "\n".join(lines)


def grid_table(study: Study, grid_cells: dict) -> str:
    out = []
    for n in study.grid_sizes:
        bs = sorted({b for _, b in study.grid})
        lines = [f"{study.grid_method} on {study.grid_domain}, {n} samples, eval loss (rows #A, columns #B):", "",
                 "| #A \\ #B | " + " | ".join(map(str, bs)) + " |", "|---|" + "---|" * len(bs)]
        for a in sorted({a for a, _ in study.grid}):
            lines.append(f"| {a} | " + " | ".join(
                fmt_stat(stats(grid_cells[(a, b, n)].values["eval_loss"]), "eval_loss") if (a, b, n) in grid_cells
                else "" for b in bs) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def gpu_name() -> str | None:
    """The GPU(s) this machine has, from nvidia-smi (no torch import), or None."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    names = [n.strip() for n in names if n.strip()]
    return f"{len(names)}x {names[0]}" if names else None


def write(study: Study, out: Path, command: str = "", device: str | None = None) -> dict[str, Path]:
    """verdict.md, verdict.json and the plots in `out` (e.g. docs/study_<date>/). `device`: where
    the runs ran, for the header (the machine writing it need not be the one that trained)."""
    import datetime

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    built = build(study)
    plots = plot(study, built, out)
    md = [f"# The CoLA paper's claims under its protocol: verdict ({datetime.date.today()})", "",
          f"From the run dirs under `{study.root}`" + (f", written by `{command}`" if command else "") +
          f". Device: {device or 'not recorded (--device)'}.", "",
          test_text().replace("{first}", str(study.seeds[0])), "",
          "## One row per claim", "", summary_table(built["rows"]), "",
          "## Every comparison", "", claims_table(built["rows"]), "",
          "## Every cell: accuracy per scoring, energy per arm", "", cells_table(built["cells"]), ""]
    if built["grid"]:
        md += ["## The (num_A, num_B) grid", "", grid_table(study, built["grid"]), ""]
    if built["multitask_missing"] and MULTITASK in study.domains:
        md += [f"Multi-task: skipped: {built['multitask_missing']}.", ""]
    if plots:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    (out / "verdict.md").write_text("\n".join(md), encoding="utf-8")
    payload = {"test": {"name": "welch_t", "alpha": ALPHA, "min_seeds": MIN_SEEDS},
               "rows": [{"claim": r.claim, "domain": r.domain, "size": r.size, "metric": r.metric,
                         "a": {"arm": r.a, **r.result["a"]}, "b": {"arm": r.b, **r.result["b"]},
                         "diff": r.result["diff"], "p": r.result["p"], "verdict": r.result["verdict"],
                         "note": r.note, "expect": r.expect, "outcome": outcome(r)} for r in built["rows"]],
               "cells": [{"domain": d, "arm": a, "size": n, "lr": c.lr, "seeds": c.seeds, "values": c.values,
                          "tried": c.tried, "why": c.why} for (d, a, n), c in built["cells"].items()]}
    (out / "verdict.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    return {"markdown": out / "verdict.md", "json": out / "verdict.json", **{p.stem: p for p in plots}}


def plot(study: Study, built: dict, out: Path) -> list[Path]:
    """Per domain and metric: a bar per arm and size (mean, std error bars); the grid's heatmap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for m, title, _ in METRICS:
        have = [c for c in built["cells"].values() if c.values[m]]
        if not have:
            continue
        domains = sorted({c.domain for c in have})      # a domain with no run of this metric: no panel
        fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.8), squeeze=False)
        for ax, domain in zip(axes[0], domains):
            arms = [a for a in dict.fromkeys(a for d, a, _ in built["cells"] if d == domain)]
            width = 0.8 / max(1, len(study.sizes))
            for k, size in enumerate(study.sizes):
                cs = [built["cells"].get((domain, a, size)) for a in arms]
                ys = [statistics.fmean(c.values[m]) if c and c.values[m] else float("nan") for c in cs]
                es = [statistics.stdev(c.values[m]) if c and len(c.values[m]) > 1 else 0.0 for c in cs]
                ax.bar([i + (k - (len(study.sizes) - 1) / 2) * width for i in range(len(arms))], ys, width,
                       yerr=es, capsize=2, label=f"{size} samples")
            low = min((statistics.fmean(c.values[m]) for c in have if c.domain == domain), default=0.0)
            if m != "energy_j" and low > 0:   # differences of a few % would not show on bars from 0
                ax.set_ylim(bottom=0.9 * low)
            ax.set_xticks(range(len(arms)))
            ax.set_xticklabels(arms, rotation=60, ha="right", fontsize="small")
            ax.set_title(domain)
            ax.set_ylabel(title)
            ax.grid(axis="y", alpha=0.3)
        axes[0][-1].legend(fontsize="small")
        fig.tight_layout()
        path = out / f"verdict_{m}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    for n in study.grid_sizes:
        cells = {(a, b): c for (a, b, size), c in built["grid"].items() if size == n and c.values["eval_loss"]}
        if not cells:
            continue
        As, Bs = sorted({a for a, _ in study.grid}), sorted({b for _, b in study.grid})
        grid = [[statistics.fmean(cells[(a, b)].values["eval_loss"]) if (a, b) in cells else float("nan")
                 for b in Bs] for a in As]
        fig, ax = plt.subplots(figsize=(4, 3.4))
        im = ax.imshow(grid, cmap="viridis_r")
        ax.set_xticks(range(len(Bs)), [str(b) for b in Bs])
        ax.set_yticks(range(len(As)), [str(a) for a in As])
        ax.set_xlabel("#B")
        ax.set_ylabel("#A")
        ax.set_title(f"{study.grid_method}, {study.grid_domain} {n}: eval loss", fontsize="small")
        fig.colorbar(im)
        fig.tight_layout()
        path = out / f"verdict_grid_n{n}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
