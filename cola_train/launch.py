"""Before and after one run in this process: one CPU, N local ranks or N SLURM tasks, the same
command.

- `preflight`: the command line before Hydra (deepspeed's `--local_rank`, sbatch for SLURM).
- `job`: what one Hydra job does. `trainer.devices=N` (N > 1) re-executes the same job under
  torchrun with N ranks, all writing into the run dir the parent already made (`hydra.run.dir`
  is pinned for the children); `torchrun -m cola_train` / `deepspeed --module cola_train` /
  SLURM tasks are ranks already (SLURM tasks get the torch.distributed environment from submitit).
- `guarded`: the one failure wrapper around a job: bad input is one line and exit 2, a Ctrl-C
  exit 130, a benchmark that failed after training exit 1; in a multirun a failed job records
  "failed" and the sweep goes on.

Preemption (signal → checkpoint → requeue) is preemption.py; the Runtime and the collectives
are parallel.py. Rank 0 alone writes results, metrics and the adapter; collectives run on every
rank so nothing deadlocks.

Module level imports stay stdlib-only: `__main__` imports this before Hydra or torch. Imports
only downward (parallel, preemption, results, compose; config, checks and resume in `job`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import preemption
from .compose import hydra_quote  # stdlib-only at module level
from .parallel import SPAWNED, cuda, is_rank, launcher_env, spawned

log = logging.getLogger("cola_train")


# ----------------------------------------------------------------------------------------------
# command line, before Hydra


def preflight(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` that `deepspeed --module cola_train` appends (Hydra would reject
    it; LOCAL_RANK is in the environment anyway) and refuse the SLURM launcher without sbatch."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank", "--local-rank")):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            skip = "=" not in arg
            if value is not None:
                os.environ.setdefault("LOCAL_RANK", value)
            continue
        kept.append(arg)
    for arg in kept:
        if arg.lstrip("+").replace(" ", "") in ("hydra/launcher=slurm",):
            message = sbatch_missing()
            if message:
                print(f"error: {message}", file=sys.stderr)
                sys.exit(2)
    return kept


def sbatch_missing() -> str | None:
    if shutil.which("sbatch"):
        return None
    return ("hydra/launcher=slurm submits jobs with SLURM's sbatch, which is not on PATH here; "
            "run on a SLURM login node, or use hydra/launcher=local (or no launcher) on this machine")


# ----------------------------------------------------------------------------------------------
# the job as __main__ runs it


def guarded(job, out: Path, sweeping: bool):
    """The one failure wrapper around a Hydra job (docs/ERRORS.md, "Exit codes").

    Bad input (errors.user_errors): results.json "failed", one `error:` line, exit 2; in a
    multirun the job returns None and the sweep goes on. A Ctrl-C outside a training step: one
    line, exit 130. Any other error: a single run ends with its traceback (exit 1); in a
    multirun the job records "failed" (the log has the traceback) and the sweep goes on to the
    next job and its summary. A benchmark that failed after training (weights and results.json
    written, status "benchmark_failed") still exits 1 so that scripts notice; ranks that
    `trainer.devices` spawned exit 0 and leave that to their parent."""
    from .errors import run_guarded
    from .results import RunRecord, read_results

    try:
        results = run_guarded(job, out, exit_on_error=not sweeping)
    except Exception as err:  # noqa: BLE001
        if not sweeping:
            raise
        log.exception("job failed: %s", err)
        if out.is_dir() and read_results(out).get("status") != "completed":
            RunRecord(out).write("failed", error=f"{type(err).__name__}: {err}")
        return None
    if not sweeping and isinstance(results, dict) and results.get("status") == "benchmark_failed" \
            and not spawned():
        print(f"error: {results.get('error')} (the trained weights and results.json were written)", file=sys.stderr)
        sys.exit(1)
    return results


def job(cfg, out: Path, run, sweeping: bool):
    """What one Hydra job does: become a rank if SLURM says so, fan out to N local ranks if
    trainer.devices asks for it, else run here."""
    from hydra.core.hydra_config import HydraConfig

    adopt_slurm_tasks()
    hc = HydraConfig.get()
    if should_spawn(cfg):
        from .checks import before_model, validate
        from .distributed import check as check_distributed
        from .resume import check as check_resume

        validate(cfg)  # bad input stops here, once, before any rank starts
        check_distributed(cfg)  # DeepSpeed vs trainer, devices vs GPUs (checks.py may not import distributed)
        check_resume(cfg, out, preemption.resuming(out))  # and a resume with another config
        before_model(cfg)  # data, benchmark, DeepSpeed, ranks: one line here, not one per rank
        return launch_local_ranks(cfg, out, list(hc.overrides.task), sweeping)
    pinned = any(o.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for o in hc.overrides.hydra)
    out = agree_on_output_dir(out, pinned=pinned or sweeping)
    results = run(cfg, out)
    finish_ranks()
    return results


def finish_ranks() -> None:
    """All ranks leave together (rank 0 may still be writing results) and tear the process group
    down before the interpreter exits: a rank that exits first, or exits with live gloo threads,
    can abort, and torchrun then kills the others."""
    import torch.distributed as dist

    # only ranks of a launcher, which exit after this job: a process that made itself a world of
    # one (DeepSpeed in a single process) may run the next job of an in-process sweep, and
    # DeepSpeed keeps using the group it made
    if not (is_rank() and dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# N local ranks from one command


def should_spawn(cfg) -> bool:
    return cfg.trainer.devices > 1 and not is_rank()


def _torchrun_prefix() -> list[str]:
    """`python -m torch.distributed.run`, or the same with the preemption signal ignored by the
    agent when under SLURM (the ranks handle it; the agent would otherwise die of it)."""
    if not (preemption.under_submitit() or preemption.under_slurm()):
        return [sys.executable, "-m", "torch.distributed.run"]
    sig = preemption.preempt_signal()
    code = (f"import signal, sys; signal.signal({int(sig)}, signal.SIG_IGN); sys.argv[0] = 'torchrun'; "
            "from torch.distributed.run import main; main()")
    return [sys.executable, "-c", code]


def launch_local_ranks(cfg, out: Path, overrides: list[str], sweeping: bool):
    """Run this job as `trainer.devices` ranks under torchrun, in this job's run dir."""
    from .results import RunRecord

    n = cfg.trainer.devices
    cmd = [*_torchrun_prefix(), "--standalone", "--nnodes=1", f"--nproc-per-node={n}",
           "-m", "cola_train", *overrides,
           f"hydra.run.dir={hydra_quote(str(out))}", "hydra.output_subdir=null"]
    env = {**launcher_env(dict(os.environ)), SPAWNED: "1"}
    if not cuda():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    log.info("starting %d local ranks (%s) in %s", n, "nccl" if cuda() else "gloo", out)
    started = time.time()
    # the ranks in a session of their own: a terminal's Ctrl-C reaches only this process, which
    # forwards it to the ranks (torchrun's agent would tear them down before they save)
    with preemption.forward_to_ranks() as forwarded:
        proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), start_new_session=True)
        forwarded.append(proc)
        rc = proc.wait()
    record = RunRecord(out)
    fresh = record.path.is_file() and record.path.stat().st_mtime >= started - 1
    results = record.read() if fresh else {}  # not the one an earlier attempt left
    status = results.get("status")
    preemption.parent_outcome(out, results)  # Ctrl-C: exit 130; preempted: requeue, exit 3
    if rc != 0 and status == "completed":
        # rank 0 writes a completed results.json only after every rank has trained and evaluated
        # (they meet in collectives on the way): a rank that then dies in teardown (gloo's threads
        # can abort at exit under load) has lost nothing, so the run stands
        log.warning("a local rank exited with code %s after the run completed; keeping its results", rc)
        return results
    if rc != 0:
        if status != "failed":
            record.write("failed", error=f"{n} local ranks exited with code {rc} (see the log above)")
        if not sweeping:
            print(f"error: {n} local ranks exited with code {rc}", file=sys.stderr)
            sys.exit(rc if 0 < rc < 256 else 1)
        return None
    return results


def agree_on_output_dir(out: Path, pinned: bool) -> Path:
    """Ranks started by an outside launcher (`torchrun -m cola_train ...`) each composed their
    own timestamped run dir: they adopt rank 0's so the run has one dir. Needs the process group,
    which is set up here (accelerate and DeepSpeed reuse it)."""
    if pinned or not is_rank() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return out
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda() else "gloo")
    box = [str(out)]
    dist.broadcast_object_list(box, src=0)
    shared = Path(box[0])
    if shared != out:
        with contextlib.suppress(OSError):  # our own dir holds only Hydra's .hydra/: drop it
            if all(p.name == ".hydra" for p in out.iterdir()):
                shutil.rmtree(out)
    return shared


# ----------------------------------------------------------------------------------------------
# SLURM tasks as ranks


def adopt_slurm_tasks() -> None:
    """Under submitit with several tasks, each task is one rank: export the torch.distributed
    environment (MASTER_ADDR = first node, RANK, WORLD_SIZE, LOCAL_RANK) from the job."""
    if is_rank():
        return
    if preemption.under_submitit():
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                  overwrite=True)
            log.info("SLURM task %d of %d is rank %d", env.global_rank, env.num_tasks, env.global_rank)
    elif int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        # plain `srun python -m cola_train ...`
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_STEP_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        ntasks = int(os.environ["SLURM_STEP_NUM_TASKS"])
        os.environ.update(
            MASTER_ADDR=nodes[0], MASTER_PORT=os.environ.get("MASTER_PORT", str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)),
            RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=str(ntasks), LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
            LOCAL_WORLD_SIZE=str(ntasks // max(1, len(nodes))))
