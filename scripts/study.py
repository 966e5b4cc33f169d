#!/usr/bin/env python
"""The CoLA study under the paper's protocol (issue #27), as one resumable command.

    python scripts/study.py --sweep-dir /root/study --plan                  # runs, GPU time; runs nothing
    python scripts/study.py --sweep-dir /root/study --stage all --parallel 9 -- model.path=/root/gpucache/smol ...
    python scripts/study.py --sweep-dir /root/study --verdict --out docs/study_<date>

Every run is `python -m cola_train experiment=cola_paper method=... data=<domain>
data.max_samples=<size> seed=<seed> trainer.lr=<lr> eval.scoring=[letter,cloze]` in its own dir
<sweep-dir>/<domain>/<arm>/n<size>/lr<lr>/s<seed> (cola_train/study_plan.py says why and holds
the grid). The stages:
- sweep: each arm at every lr of conf/experiment/lr_sweep.yaml, first seed only;
- final: the other seeds at the lr whose first-seed run had the lowest VALIDATION loss (never the
  benchmark); blocked until the arm's sweep has ended;
- grid:  --grid-method (cola_heuristic) with num_A, num_B in 1..3 on --grid-domain, every seed,
  at that method's chosen lr;
- all:   sweep, final and grid, recomputing the plan after each round (MoLE's gate waits for the
  study's LoRA runs, its experts), until nothing more can run or --deadline passes.
A run whose results.json says "completed" (or that diverged: the loss went non-finite) is never
run again; any other is run again with trainer.resume=true, from its checkpoint where it has one.
Multi-task (experiment=cola_paper_multitask_*) runs only where its data is in the data root;
otherwise, like a method this checkout does not have (moelora), it is listed as skipped with
the reason. --plan prints the runs per stage and the GPU time they need, from --cost-from (the
completed runs of a pilot) or docs/RESULTS.md's timings.

Runs go --parallel at a time on one GPU (a 135M model leaves an H200 mostly idle). After
--deadline seconds no new run starts. Stopping: SIGTERM to this script (e.g. `timeout 500 python
scripts/study.py ...`), Ctrl-C, or --stop-after seconds send SIGTERM to every running run; each
saves a checkpoint, writes results.json with status `preempted` and exits, and this script waits
for them (SIGKILL after --grace seconds), so the same command resumes them. At the end the verdict
(cola_train/verdict.py: the claims' table, every cell, plots) is written to --out.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cola_train import study_plan as sp

# the runs going now (one process group each) and whether the study is stopping
_RUNNING: dict[int, subprocess.Popen] = {}
_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the job and any ranks it started
    except ProcessLookupError:
        pass


def stop_running(grace: float = 120.0) -> None:
    """Start no more runs; SIGTERM the running ones and wait until they have exited, which
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
    print(f"stopped {len(procs)} running run(s); the same command resumes them", flush=True)


def _stop_in_background(grace: float) -> None:
    threading.Thread(target=stop_running, args=(grace,), daemon=True).start()


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def parse(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep-dir", type=Path, required=True, help="where the run dirs go (and are found)")
    ap.add_argument("--stage", choices=["sweep", "final", "grid", "all"], default="all")
    ap.add_argument("--domains", default=",".join([*sp.SINGLE_DOMAINS, sp.MULTITASK]))
    ap.add_argument("--arms", default=",".join(sp.ARMS), help=f"methods as the study runs them: {', '.join(sp.ARMS)}")
    ap.add_argument("--multitask-arms", default=",".join(sp.MULTITASK_ARMS))
    ap.add_argument("--sizes", default=",".join(map(str, sp.DEFAULT_SIZES)))
    ap.add_argument("--seeds", default=",".join(map(str, sp.DEFAULT_SEEDS)), help="the first one is the lr sweep's")
    ap.add_argument("--lrs", default=None, help="the lr grid (default: conf/experiment/lr_sweep.yaml's)")
    ap.add_argument("--grid-domain", default="math")
    ap.add_argument("--grid-method", default="cola_heuristic")
    ap.add_argument("--grid-sizes", default="100")
    ap.add_argument("--grid", default="1..3x1..3", help="num_A and num_B ranges, e.g. 1..3x1..3")
    ap.add_argument("--parallel", type=int, default=9)
    ap.add_argument("--plan", action="store_true", help="print the runs per stage and their GPU time; run nothing")
    ap.add_argument("--cost-from", type=Path, nargs="+", default=None,
                    help="run dirs whose completed results.json time a run (e.g. a pilot's --sweep-dir)")
    ap.add_argument("--run-seconds", default=None,
                    help="wall seconds of one run per size with --cost-parallel runs sharing the GPU, e.g. "
                         "100=64,1000=240 (the cost model's line through them)")
    ap.add_argument("--cost-parallel", type=int, default=None,
                    help="how many runs shared the GPU in --cost-from (default: --parallel)")
    ap.add_argument("--verdict", action="store_true", help="only write the verdict from the run dirs")
    ap.add_argument("--out", type=Path, default=None, help="where the verdict goes (default: <sweep-dir>/verdict)")
    ap.add_argument("--device", default=None, help="where the runs ran, for the verdict's header (default: this "
                                                   "machine's GPU when it has one)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which no new run starts")
    ap.add_argument("--stop-after", type=float, default=None,
                    help="seconds after which the running runs are stopped (checkpointed, resumable)")
    ap.add_argument("--grace", type=float, default=120.0, help="seconds a stopped run gets to save before SIGKILL")
    args = ap.parse_args(argv)
    args.extra = extra
    return ap, args


def _range(text: str) -> list[int]:
    lo, _, hi = text.partition("..")
    return list(range(int(lo), int(hi or lo) + 1))


def study_from(ap, args) -> sp.Study:
    """The Study the arguments describe; a bad value stops in one line (exit 2)."""
    def bad(message):
        ap.exit(2, f"error: {message}\n")

    arms = _csv(args.arms)
    unknown = [a for a in arms if a not in sp.ARMS]
    if unknown:
        bad(f"--arms {','.join(unknown)}: not an arm of the study; choose from {', '.join(sp.ARMS)}")
    mt_arms = _csv(args.multitask_arms)
    unknown = [a for a in mt_arms if a not in sp.MULTITASK_ARMS]
    if unknown:
        bad(f"--multitask-arms {','.join(unknown)}: choose from {', '.join(sp.MULTITASK_ARMS)}")
    domains = _csv(args.domains)
    unknown = [d for d in domains if not (sp.CONF / "data" / f"{d}.yaml").is_file()]
    if unknown:
        bad(f"--domains {','.join(unknown)}: no conf/data/<domain>.yaml")
    try:
        sizes, seeds, grid_sizes = ([int(v) for v in _csv(t)] for t in (args.sizes, args.seeds, args.grid_sizes))
        lrs = [sp.lr_text(v) for v in _csv(args.lrs)] if args.lrs else sp.sweep_lrs()
        a_range, _, b_range = args.grid.partition("x")
        grid = tuple((a, b) for a in _range(a_range) for b in _range(b_range or a_range))
    except ValueError as err:
        bad(f"{err}: --sizes, --seeds, --grid-sizes are comma lists of integers, --lrs of numbers, --grid like 1..3x1..3")
    if not seeds or not sizes or not lrs or min(sizes + grid_sizes) < 1:
        bad("--sizes, --seeds and --lrs need at least one value each, sizes >= 1")
    if args.grid_method not in ("cola_fully", "cola_heuristic", "cola_random"):
        bad(f"--grid-method {args.grid_method}: one of cola_fully, cola_heuristic, cola_random")
    root_override = next((o.split("=", 1)[1] for o in args.extra if o.startswith("data.root=")), None)
    data_root = root_override or os.environ.get("COLA_DATA_ROOT")
    return sp.Study(root=args.sweep_dir.resolve(), domains=domains, arms=arms, sizes=sizes, seeds=seeds, lrs=lrs,
                    data_root=Path(data_root) if data_root else None, grid_domain=args.grid_domain,
                    grid_method=args.grid_method, grid_sizes=grid_sizes, grid=grid, multitask_arms=mt_arms)


def stages_of(stage: str) -> tuple[str, ...]:
    return sp.STAGES if stage == "all" else (stage,)


def launch(job: sp.Job, extra: list[str], env: dict, start: float, deadline: float | None) -> int:
    label = f"{job.stage} {job.domain} {job.arm} n={job.size} lr={job.lr} seed={job.seed}"
    if deadline is not None and time.time() - start > deadline:
        print(f"{label}: not started (deadline)", flush=True)
        return 0
    job.dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(job.dir / "study.log", "a") as f, _LOCK:
        if _STOPPING.is_set():
            print(f"{label}: not started (stopped)", flush=True)
            return 0
        proc = subprocess.Popen([sys.executable, "-m", "cola_train", *job.overrides, *extra], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _RUNNING[proc.pid] = proc
    rc = proc.wait()
    with _LOCK:
        _RUNNING.pop(proc.pid, None)
    print(f"{label}: exit {rc} in {time.time() - t0:.0f}s ({sp.read_status(job.dir)[0]})", flush=True)
    return rc


def main(argv=None) -> int:
    ap, args = parse(argv)
    study = study_from(ap, args)
    stages = stages_of(args.stage)
    if args.verdict:
        from cola_train.verdict import write

        paths = write(study, args.out or study.root / "verdict", device=args.device,
                      command=" ".join(["scripts/study.py", *(sys.argv[1:] if argv is None else argv)]))
        print(paths["markdown"])
        return 0
    if args.plan:
        if args.cost_from:
            try:
                cost = sp.measure_cost(args.cost_from, args.cost_parallel or args.parallel)
            except ValueError as err:
                ap.exit(2, f"error: --cost-from: {err}\n")
        elif args.run_seconds:
            try:
                points = {int(n): float(sec) for n, sec in (p.split("=") for p in _csv(args.run_seconds))}
            except ValueError:
                ap.exit(2, f"error: --run-seconds {args.run_seconds!r}: write SIZE=SECONDS pairs, e.g. 100=64,1000=240\n")
            cost = sp.cost_from_points(points, args.cost_parallel or args.parallel)
        else:
            cost = sp.DEFAULT_COST
        print(sp.plan_text(sp.plan(study, stages), cost))
        return 0
    start = time.time()
    # parallel runs share the cores: without this each one starts a thread per core
    threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **os.environ, "PYTHONUNBUFFERED": "1"}
    _STOPPING.clear()
    on_main = threading.current_thread() is threading.main_thread()  # where signals can be caught
    previous = signal.signal(signal.SIGTERM, lambda *_: _stop_in_background(args.grace)) if on_main else None
    timer = threading.Timer(args.stop_after, stop_running, (args.grace,)) if args.stop_after is not None else None
    if timer:
        timer.daemon = True
        timer.start()
    codes, tried = [], set()
    pool = ThreadPoolExecutor(args.parallel)   # shut down after a Ctrl-C has stopped the runs, not before
    try:
        while not _STOPPING.is_set():
            jobs = sp.plan(study, stages)
            # a run that failed this call is not retried in it (the next call retries it)
            todo = [j for j in jobs if j.status == "todo" and j.dir not in tried]
            blocked = sum(j.status == "blocked" for j in jobs)
            print(f"{len(todo)} run(s) to run, {blocked} blocked, "
                  f"{sum(j.status in ('completed', 'diverged') for j in jobs)} done", flush=True)
            if not todo or (args.deadline is not None and time.time() - start > args.deadline):
                break
            tried.update(j.dir for j in todo)
            todo.sort(key=lambda j: -j.size)   # the long runs first: the short ones fill in behind them
            codes += list(pool.map(lambda j: launch(j, args.extra, env, start, args.deadline), todo))
    except KeyboardInterrupt:  # the runs are in their own sessions: Ctrl-C reaches only this script
        stop_running(args.grace)
        raise
    finally:
        pool.shutdown(wait=True)
        if timer:
            timer.cancel()
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    from cola_train.verdict import gpu_name, write

    try:
        print(write(study, args.out or study.root / "verdict", device=args.device or gpu_name(),
                    command=" ".join(["scripts/study.py", *(sys.argv[1:] if argv is None else argv)]))["markdown"],
              flush=True)
    except Exception as err:  # noqa: BLE001 - the runs stand; `--verdict` writes it again
        print(f"warning: verdict not written: {type(err).__name__}: {err}", file=sys.stderr)
    return int(any(codes))


if __name__ == "__main__":
    sys.exit(main())
