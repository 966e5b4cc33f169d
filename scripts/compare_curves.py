#!/usr/bin/env python
"""Overlay the training-loss curves of runs that should agree (1 GPU vs 2 GPUs, ZeRO-3 vs none)
and print how far apart they are, step by step — the evidence that sharding changes nothing.

    python scripts/compare_curves.py --out docs/zero3_gpu 1gpu=runs/a 2gpu_zero3=runs/b

The first run is the reference. Prints the per-run max |Δloss| and max relative Δ over the shared
steps, the final eval loss and benchmark accuracy (from results.json), and writes curves.png and
curves.csv under --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from the run's metrics.jsonl (rows without a loss are skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: pass a run dir that holds metrics.jsonl")
    losses = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[int(row["step"])] = float(row["loss"])
    return losses


def divergence(ref: dict[int, float], other: dict[int, float]) -> dict:
    """Max absolute and relative loss difference over the steps both runs logged."""
    steps = sorted(set(ref) & set(other))
    if not steps:
        return {"steps": 0, "max_abs": float("nan"), "max_rel": float("nan")}
    abs_d = [abs(other[s] - ref[s]) for s in steps]
    rel_d = [d / max(abs(ref[s]), 1e-12) for d, s in zip(abs_d, steps)]
    return {"steps": len(steps), "max_abs": max(abs_d), "max_rel": max(rel_d)}


def _final(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text())
    return {"status": res.get("status"), "eval_loss": (res.get("eval") or {}).get("loss"),
            "accuracy": (res.get("benchmark") or {}).get("accuracy")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="label=run_dir; the first is the reference")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    runs = []
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"error: run {spec!r} is not label=run_dir")
        runs.append((label, Path(path)))
    curves = {label: read_losses(path) for label, path in runs}
    ref_label = runs[0][0]
    args.out.mkdir(parents=True, exist_ok=True)

    steps = sorted(set().union(*curves.values()))
    with open(args.out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *curves])
        for s in steps:
            w.writerow([s, *(curves[k].get(s, "") for k in curves)])

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, curve), style in zip(curves.items(), ["-", "--", ":", "-.", "-", "--"]):
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=120)

    print(f"| run | steps compared | max abs Δloss vs {ref_label} | max rel Δ | final eval loss | accuracy | status |")
    print("|---|---|---|---|---|---|---|")
    for label, path in runs:
        d = divergence(curves[ref_label], curves[label])
        fin = _final(path)
        ev = fin.get("eval_loss")
        acc = fin.get("accuracy")
        print(f"| {label} | {d['steps']} | {d['max_abs']:.2e} | {d['max_rel']:.2e} | "
              f"{'' if ev is None else f'{ev:.4f}'} | {'' if acc is None else f'{acc:.4f}'} | {fin.get('status', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
