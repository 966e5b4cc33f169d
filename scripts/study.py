#!/usr/bin/env python
"""The CoLA low-sample study as parallel Hydra multiruns on one GPU machine, then the report.

    python scripts/study.py --domain math --sweep-dir outputs/study/math \
        --methods lora,cola_fully --sizes 100,1000 --seeds 1,2,3 --parallel 8 -- model.path=/dir

One shard = one (method, seed) multirun over every sample size; shards run --parallel at a time
(a 135M model leaves an H100 mostly idle, so several processes share it). Every job lands under
--sweep-dir; `python -m cola_train.report <sweep-dir>` (run at the end) builds the tables and plots.
A failed shard is reported and the others go on; the report lists failed jobs.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def shard_command(method: str, seed: int, args, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "cola_train", "-m", f"method={method}", f"data={args.domain}",
            f"seed={seed}", f"data.max_samples={args.sizes}",
            f"hydra.sweep.dir={args.sweep_dir}/{method}_s{seed}", *extra]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--methods", required=True, help="comma-separated method configs")
    ap.add_argument("--sizes", default="100,250,500,1000")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--sweep-dir", type=Path, required=True)
    ap.add_argument("extra", nargs="*", help="overrides for every job (after --)")
    args = ap.parse_args(argv)
    args.sweep_dir.mkdir(parents=True, exist_ok=True)
    shards = list(itertools.product(args.methods.split(","), [int(s) for s in args.seeds.split(",")]))
    # parallel jobs share the cores: without this each one starts a thread per core
    threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **os.environ, "PYTHONUNBUFFERED": "1"}

    def launch(shard):
        method, seed = shard
        log = args.sweep_dir / f"{method}_s{seed}.log"
        start = time.time()
        with open(log, "w") as f:
            rc = subprocess.call(shard_command(method, seed, args, args.extra), stdout=f,
                                 stderr=subprocess.STDOUT, env=env)
        print(f"{method} seed {seed}: exit {rc} in {time.time() - start:.0f}s ({log})", flush=True)
        return rc

    with ThreadPoolExecutor(args.parallel) as pool:
        codes = list(pool.map(launch, shards))
    from cola_train.report import write_report

    paths = write_report(args.sweep_dir)
    print((args.sweep_dir / "report.md").read_text() if (args.sweep_dir / "report.md").exists() else paths)
    return int(any(codes))


if __name__ == "__main__":
    sys.exit(main())
