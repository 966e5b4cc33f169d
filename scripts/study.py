#!/usr/bin/env python
"""The CoLA low-sample study as parallel Hydra multiruns on one GPU machine, then the report.

    python scripts/study.py --domains math,medicine --methods lora,cola_fully --sizes 100,1000 \
        --seeds 1,2,3 --parallel 7 --sweep-dir outputs/study --deadline 500 -- model.path=/dir

One shard = one (domain, method, sample size) cell: a multirun over the seeds, so a finished
shard is a finished table cell. Shards run --parallel at a time, largest sample size first (a
135M model leaves an H100 mostly idle, so several processes share it). Every job lands under
<sweep-dir>/<domain>/<method>_n<size>/. After --deadline seconds no new shard starts: the device
tool limits a call's length, and the study is spread over several calls. A shard whose jobs all
completed is skipped, so running the same command again goes on where the last call stopped; in a
shard started again, the completed jobs are skipped and a preempted one resumes from its
checkpoint (every job runs with trainer.resume=true).
A comma list after -- is swept inside every cell (the learning-rate check:
`-- trainer.lr=5e-5,2e-4,1e-3`); the report then shows one row per value.
`python -m cola_train.report <sweep-dir>/<domain>` (run at the end for each domain) builds the
tables and plots. A failed shard is reported and the others go on; the report lists failed jobs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def shard_dir(args, domain: str, method: str, size: int) -> Path:
    return args.sweep_dir / domain / f"{method}_n{size}"


def shard_command(args, domain: str, method: str, size: int, extra: list[str]) -> list[str]:
    # trainer.resume: a shard started again skips its completed jobs and resumes a preempted one
    # from its checkpoint, in the same job dirs (resume is not part of a job dir's name)
    return [sys.executable, "-m", "cola_train", "-m", f"method={method}", f"data={domain}",
            f"seed={args.seeds}", f"data.max_samples={size}", "trainer.resume=true",
            f"hydra.sweep.dir={shard_dir(args, domain, method, size)}", *extra]


def jobs_per_cell(seeds: str, extra: list[str]) -> int:
    """Seeds times every comma-swept override after -- (e.g. trainer.lr=5e-5,2e-4 doubles it)."""
    n = len(seeds.split(","))
    for override in extra:
        _, _, value = override.partition("=")
        if "," in value and not value.lstrip().startswith(("[", "{", "'", '"')):
            n *= len(value.split(","))
    return n


def completed(path: Path) -> int:
    done = 0
    for results in path.glob("*/results.json"):
        try:
            done += json.loads(results.read_text()).get("status") == "completed"
        except (OSError, ValueError):
            pass
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", required=True, help="comma-separated data configs")
    ap.add_argument("--methods", required=True, help="comma-separated method configs")
    ap.add_argument("--sizes", default="100,250,500,1000")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--parallel", type=int, default=7)
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which no new shard starts")
    ap.add_argument("--sweep-dir", type=Path, required=True)
    ap.add_argument("extra", nargs="*", help="overrides for every job (after --)")
    args = ap.parse_args(argv)
    start = time.time()
    n_jobs = jobs_per_cell(args.seeds, args.extra)
    sizes = sorted((int(s) for s in args.sizes.split(",")), reverse=True)
    shards = [(d, m, n) for n, d, m in itertools.product(sizes, args.domains.split(","), args.methods.split(","))
              if completed(shard_dir(args, d, m, n)) < n_jobs]
    # parallel jobs share the cores: without this each one starts a thread per core
    threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"{len(shards)} shards to run", flush=True)

    def launch(shard):
        domain, method, size = shard
        if args.deadline is not None and time.time() - start > args.deadline:
            print(f"{domain} {method} n={size}: not started (deadline)", flush=True)
            return 0
        path = shard_dir(args, domain, method, size)
        path.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(path.with_suffix(".log"), "w") as f:
            rc = subprocess.call(shard_command(args, domain, method, size, args.extra), stdout=f,
                                 stderr=subprocess.STDOUT, env=env)
        print(f"{domain} {method} n={size}: exit {rc} in {time.time() - t0:.0f}s "
              f"({completed(path)}/{n_jobs} jobs completed)", flush=True)
        return rc

    with ThreadPoolExecutor(args.parallel) as pool:
        codes = list(pool.map(launch, shards))
    from cola_train.report import write_report

    for domain in args.domains.split(","):
        if (args.sweep_dir / domain).is_dir():
            write_report(args.sweep_dir / domain)
    return int(any(codes))


if __name__ == "__main__":
    sys.exit(main())
