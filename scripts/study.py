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
Stopping: SIGTERM to this script (e.g. `timeout 500 python scripts/study.py ...`), Ctrl-C, or
--stop-after seconds send SIGTERM to every running job. Each one saves a checkpoint at the end of
its step, writes results.json with status `preempted` and exits (cola_train's local stop
handling); this script waits for them (SIGKILL after --grace seconds), so whatever packs the
results afterwards sees them, and the same command resumes them.
A comma list after -- is swept inside every cell (the learning-rate check:
`-- trainer.lr=5e-5,2e-4,1e-3`); the report then shows one row per value.
`python -m cola_train.report <sweep-dir>/<domain>` (run at the end for each domain) builds the
tables and plots. A failed shard is reported and the others go on; the report lists failed jobs.
"""
from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cola_train.results import completed_results

# the shards running now (one process group each) and whether the study is stopping
_RUNNING: dict[int, subprocess.Popen] = {}
_LOCK = threading.Lock()
_STOPPING = threading.Event()


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
    jobs = [job for job in path.iterdir() if job.is_dir()] if path.is_dir() else []
    return sum(completed_results(job) is not None for job in jobs)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the job and any ranks it started
    except ProcessLookupError:
        pass


def stop_running(grace: float = 120.0) -> None:
    """Start no more shards; SIGTERM the running ones and wait until they have exited, which
    for a training job means: checkpoint saved, results.json says preempted. SIGKILL after
    `grace` seconds."""
    with _LOCK:
        _STOPPING.set()
        procs = list(_RUNNING.values())
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    end = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, end - time.time()))
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
    print(f"stopped {len(procs)} running shard(s); the same command resumes them", flush=True)


def _stop_in_background(grace: float) -> None:
    threading.Thread(target=stop_running, args=(grace,), daemon=True).start()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", required=True, help="comma-separated data configs")
    ap.add_argument("--methods", required=True, help="comma-separated method configs")
    ap.add_argument("--sizes", default="100,250,500,1000")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--parallel", type=int, default=7)
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which no new shard starts")
    ap.add_argument("--stop-after", type=float, default=None,
                    help="seconds after which the running jobs are stopped (checkpointed, resumable)")
    ap.add_argument("--grace", type=float, default=120.0, help="seconds a stopped job gets to save before SIGKILL")
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
        with open(path.with_suffix(".log"), "a") as f, _LOCK:
            if _STOPPING.is_set():
                print(f"{domain} {method} n={size}: not started (stopped)", flush=True)
                return 0
            proc = subprocess.Popen(shard_command(args, domain, method, size, args.extra), stdout=f,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            _RUNNING[proc.pid] = proc
        rc = proc.wait()
        with _LOCK:
            _RUNNING.pop(proc.pid, None)
        print(f"{domain} {method} n={size}: exit {rc} in {time.time() - t0:.0f}s "
              f"({completed(path)}/{n_jobs} jobs completed)", flush=True)
        return rc

    _STOPPING.clear()
    on_main = threading.current_thread() is threading.main_thread()  # where signals can be caught
    previous = signal.signal(signal.SIGTERM, lambda *_: _stop_in_background(args.grace)) if on_main else None
    timer = threading.Timer(args.stop_after, stop_running, (args.grace,)) if args.stop_after is not None else None
    if timer:
        timer.daemon = True
        timer.start()
    pool = ThreadPoolExecutor(args.parallel)
    try:
        codes = list(pool.map(launch, shards))
    except KeyboardInterrupt:  # the jobs run in their own sessions: Ctrl-C reaches only this script
        stop_running(args.grace)
        raise
    finally:
        pool.shutdown(wait=True)
        if timer:
            timer.cancel()
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    from cola_train.report import write_report

    for domain in args.domains.split(","):
        if (args.sweep_dir / domain).is_dir():
            write_report(args.sweep_dir / domain)
    return int(any(codes))


if __name__ == "__main__":
    sys.exit(main())
