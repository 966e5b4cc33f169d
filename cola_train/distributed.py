"""One run on one CPU, N local ranks, or N SLURM tasks, with the same command.

- DeepSpeed: the `deepspeed` group's dict goes to TrainingArguments(deepspeed=...); the HF
  integration fills its "auto" values from the trainer config. `check` rejects conflicts first.
- `trainer.devices=N` (N > 1) re-executes the same job under torchrun with N ranks, all writing
  into the one run dir the parent already made (`hydra.run.dir` is pinned for the children).
- `torchrun -m cola_train` / `deepspeed --module cola_train` / SLURM tasks are ranks already;
  SLURM tasks get the torch.distributed environment from submitit.
- Preemption (submitit's signal, USR2 by default): every rank stops at the end of the step, the
  Trainer saves a checkpoint, results.json says "preempted", and submitit requeues the job; the
  job comes back into the same run dir, sees that (or SLURM_RESTART_COUNT) and resumes.
- Rank 0 alone writes results, metrics and the adapter; collectives (ZeRO-3 gathers, the
  benchmark forward under ZeRO-3) run on every rank so nothing deadlocks.

Module level imports stay stdlib-only: `__main__` imports this before Hydra or torch.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .compose import hydra_quote  # stdlib-only at module level
from . import preemption  # Ctrl-C: checkpoint, "interrupted", exit 130 (stdlib only)

log = logging.getLogger("cola_train")

# Set when this process made itself rank 0 of a world of one (single-process DeepSpeed); it
# must not count as "launched by a launcher" when a later job of the same sweep wants N ranks.
_SELF_RANK = "COLA_TRAIN_SELF_RANK"
# Set in the environment of the ranks that `trainer.devices=N` starts: their parent requeues.
_SPAWNED = preemption.SPAWNED
_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------
# where are we


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def is_rank() -> bool:
    """True when a launcher (torchrun, deepspeed, our own parent, a SLURM task) started us."""
    if os.environ.get(_SELF_RANK) == "1":
        return False
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def global_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0"))


def under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def under_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ


def requeued() -> bool:
    """A SLURM job that runs again after a requeue (SLURM counts restarts for us)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def resuming(out: Path) -> bool:
    """Resume without being asked when this job runs again after a requeue: SLURM says so, or
    the last attempt left results.json saying it was preempted (submitit's local executor, or a
    re-run by hand into the same run dir)."""
    return requeued() or _read_results(out).get("status") == "preempted"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    import shutil

    if shutil.which("sbatch"):
        return None
    return ("hydra/launcher=slurm submits jobs with SLURM's sbatch, which is not on PATH here; "
            "run on a SLURM login node, or use hydra/launcher=local (or no launcher) on this machine")


# ----------------------------------------------------------------------------------------------
# DeepSpeed config and the checks that run before any model is built


def _container(node) -> dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return copy.deepcopy(dict(node or {}))


def deepspeed_enabled(cfg) -> bool:
    return cfg.deepspeed.name != "none"


def zero_stage(cfg) -> int:
    if not deepspeed_enabled(cfg):
        return 0
    return int((_container(cfg.deepspeed.config).get("zero_optimization") or {}).get("stage", 0))


def deepspeed_config(cfg) -> dict | None:
    """The dict handed to TrainingArguments(deepspeed=...). On CPU DeepSpeed's fused Adam is not
    built, so Adam/AdamW runs as torch's (`torch_adam: true`) unless the config says otherwise."""
    if not deepspeed_enabled(cfg):
        return None
    ds = _container(cfg.deepspeed.config)
    # HF fills an "auto" train_batch_size when TrainingArguments is built, before it knows the
    # world size (it writes batch × accum × 1); left out, DeepSpeed computes it with the ranks.
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    opt = ds.get("optimizer")
    if opt and str(opt.get("type", "")).lower() in ("adam", "adamw") and not cuda():
        opt.setdefault("params", {}).setdefault("torch_adam", True)
    return ds


def resolved_precision(cfg) -> str:
    p = cfg.trainer.precision
    if p == "auto":
        return "bf16" if cuda() else "fp32"
    return p


def _dotted(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _offloaded(zero: dict, key: str) -> bool:
    sub = zero.get(key) or {}
    return isinstance(sub, dict) and str(sub.get("device", "none")).lower() not in ("none", "null", "")


def check(cfg) -> None:
    """Conflicts between the DeepSpeed config, the trainer and the machine: one ConfigError."""
    _check_deepspeed(cfg)
    _check_devices(cfg)


def _check_deepspeed(cfg) -> None:
    from .config import ConfigError

    if not deepspeed_enabled(cfg):
        return
    name, t = cfg.deepspeed.name, cfg.trainer
    ds = _container(cfg.deepspeed.config)
    if not ds:
        raise ConfigError(f"deepspeed={name} has an empty deepspeed.config")
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed={name}: zero_optimization.stage={stage!r} is not one of 0, 1, 2, 3")
    if _offloaded(zero, "offload_param") and stage != 3:
        raise ConfigError(f"deepspeed={name}: offload_param needs ZeRO stage 3 but "
                          f"zero_optimization.stage={stage} (use deepspeed=zero3_offload)")
    if _offloaded(zero, "offload_optimizer") and stage < 1:
        raise ConfigError(f"deepspeed={name}: offload_optimizer needs ZeRO stage >= 1 but "
                          f"zero_optimization.stage={stage}")
    precision = resolved_precision(cfg)
    flags = {k: _dotted(ds, f"{k}.enabled") for k in ("bf16", "fp16")}
    if flags["bf16"] is True and flags["fp16"] is True:
        raise ConfigError(f"deepspeed={name} enables both bf16 and fp16; enable one (or set both to auto)")
    for key, flag in flags.items():
        if flag is True and precision != key:
            raise ConfigError(f"deepspeed={name} sets {key}.enabled=true but trainer.precision="
                              f"{t.precision} ({precision}); set trainer.precision={key} or {key}.enabled=auto")
        if flag is False and precision == key:
            raise ConfigError(f"deepspeed={name} sets {key}.enabled=false but trainer.precision="
                              f"{t.precision} ({precision}); set {key}.enabled=auto")
    if not cuda() and precision in ("bf16", "fp16"):
        raise ConfigError(f"deepspeed={name} on CPU trains in fp32 (no {precision} there); "
                          "set trainer.precision=fp32 (or auto)")
    # explicit numbers must agree with the trainer: HF would stop later with a longer message
    world = int(os.environ.get("WORLD_SIZE", "0")) if is_rank() else t.devices
    pairs = [("train_micro_batch_size_per_gpu", t.batch_size, "trainer.batch_size"),
             ("gradient_accumulation_steps", t.grad_accum, "trainer.grad_accum"),
             ("gradient_clipping", t.max_grad_norm, "trainer.max_grad_norm"),
             ("optimizer.params.lr", t.lr, "trainer.lr"),
             ("optimizer.params.weight_decay", t.weight_decay, "trainer.weight_decay")]
    if world:
        pairs.append(("train_batch_size", t.batch_size * t.grad_accum * world,
                      f"trainer.batch_size*grad_accum*{world} ranks"))
    for key, want, source in pairs:
        have = _dotted(ds, key)
        if have is None or have == "auto":
            continue
        try:
            same = abs(float(have) - float(want)) <= 1e-12 * max(1.0, abs(float(want)))
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ConfigError(f"deepspeed={name}: {key}={have} conflicts with {source}={want}; "
                              f"set deepspeed.config.{key}=auto")


def _check_devices(cfg) -> None:
    from .config import ConfigError

    n = cfg.trainer.devices
    if n <= 1 or is_rank():
        return
    if cuda():
        import torch

        visible = torch.cuda.device_count()
        if n > visible:
            raise ConfigError(f"trainer.devices={n} but only {visible} GPU(s) are visible "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


# ----------------------------------------------------------------------------------------------
# what the Trainer needs


def trainer_kwargs(cfg) -> dict:
    """TrainingArguments entries for the device and the process group.

    CPU without DeepSpeed: use_cpu (accelerate runs MULTI_CPU on gloo when there are ranks).
    CPU with DeepSpeed: accelerate only takes the DeepSpeed path when use_cpu is off, and
    DeepSpeed's CPU accelerator would pick oneCCL: ask for gloo. GPU: NCCL, chosen by accelerate.
    A single process running DeepSpeed still needs a (world of one) process group.
    """
    ds = deepspeed_config(cfg)
    on_gpu = cuda()
    if ds is not None and not is_rank() and "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        os.environ[_SELF_RANK] = "1"
    kwargs = {"deepspeed": ds, "use_cpu": not on_gpu and ds is None, "dataloader_pin_memory": on_gpu}
    if not on_gpu and "LOCAL_RANK" in os.environ:  # ranks on CPU: gloo, state set up here
        kwargs["ddp_backend"] = "gloo"
        _cpu_ranks_state(deepspeed=ds is not None)
        kwargs["accelerator_config"] = {"use_configured_state": True}
    return kwargs


def _cpu_ranks_state(deepspeed: bool) -> None:
    """accelerate's (shared) state for ranks on CPU, configured before TrainingArguments, which
    then uses it as is. Two fixes over what TrainingArguments would set up:
    - DeepSpeed: accelerate takes its DeepSpeed path only off-CPU and then picks the backend from
      the GPU kind; on a CPU it would end with no backend and count one process (every rank would
      read all the data). Here: the DeepSpeed path with gloo.
    - The device is plain `cpu`, not `cpu:<local rank>`: the Trainer resumes with
      torch.load(map_location=args.device), which rejects "cpu:1"."""
    import torch
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(backend="gloo") if deepspeed else PartialState(cpu=True, backend="gloo")
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    state.device = torch.device("cpu")


def forget_deepspeed() -> None:
    """The HF integration keeps the last DeepSpeed config in a module global; a later job of an
    in-process sweep must not see ZeRO-3 switched on when it loads its model."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:  # pragma: no cover
        pass


def eval_before_training(cfg, trainer) -> float | None:
    """The eval loss before training. Under DeepSpeed, trainer.evaluate() before train() builds an
    inference-only engine that train() then cannot use, so the Trainer evaluates at the start of
    train() instead (eval_on_start) and `eval_loss_at_start` reads it back."""
    if deepspeed_enabled(cfg):
        trainer.args.eval_on_start = True
        return None
    return trainer.evaluate()["eval_loss"]


def eval_loss_at_start(trainer) -> float | None:
    for entry in trainer.state.log_history:
        if "eval_loss" in entry:
            return entry["eval_loss"]
    return None


def all_sum(value: float) -> float:
    """Sum a per-rank number (tokens seen) over the ranks; unchanged in a single process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return type(value)(t.item()) if isinstance(value, int) else t.item()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def benchmark_on_this_rank(cfg, trainer) -> bool:
    """Under ZeRO-3 a forward needs every rank (parameters are partitioned): all ranks run the
    benchmark and rank 0 writes it. Otherwise rank 0 runs it alone."""
    return zero_stage(cfg) == 3 or trainer.is_world_process_zero()


@contextlib.contextmanager
def full_weights(model, cfg):
    """Gather the trainable (adapter) weights on every rank under ZeRO-3 so rank 0 can save
    them; a no-op otherwise. Every rank must enter this (it is a collective)."""
    if zero_stage(cfg) != 3:
        yield
        return
    import deepspeed

    params = {id(p): p for p in model.parameters() if p.requires_grad}
    try:  # frozen adapter weights too (MoLE's frozen experts), never the base layer's
        from .adapters.layer import AdapterLinear

        for module in model.modules():
            if isinstance(module, AdapterLinear):
                params.update({id(p): p for n, p in module.named_parameters()
                               if not n.startswith("base_layer.")})
    except ImportError:  # pragma: no cover
        pass
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        yield


def release_zero3_params(cfg, trainer) -> None:
    """A forward outside the engine (the benchmark) can leave ZeRO-3 prefetches in flight, and
    a later gather would then fail ("Cannot partition a param in flight"): release them."""
    if zero_stage(cfg) != 3:
        return
    engine = getattr(trainer, "deepspeed", None) or getattr(trainer, "model_wrapped", None)
    if hasattr(engine, "empty_partition_cache"):
        engine.empty_partition_cache()


def save_weights(cfg, trainer, model, out: Path, save_adapter) -> None:
    """Adapter (or full model for fft) into the run dir. Called on every rank; writes on rank 0."""
    release_zero3_params(cfg, trainer)
    if cfg.method.kind == "none":
        trainer.save_model(str(out / "model"))  # the Trainer gathers under ZeRO-3 and writes on rank 0
        return
    with full_weights(model, cfg):
        if trainer.is_world_process_zero():
            save_adapter(model, out / "adapter")
    barrier()


# ----------------------------------------------------------------------------------------------
# N local ranks from one command


def spawned() -> bool:
    """A rank that `trainer.devices` started: its parent checked the run before starting it and
    reports its outcome."""
    return bool(os.environ.get(_SPAWNED))


def should_spawn(cfg) -> bool:
    return cfg.trainer.devices > 1 and not is_rank()


def _torchrun_prefix() -> list[str]:
    """`python -m torch.distributed.run`, or the same with the preemption signal ignored by the
    agent when under SLURM (the ranks handle it; the agent would otherwise die of it)."""
    if not (under_submitit() or under_slurm()):
        return [sys.executable, "-m", "torch.distributed.run"]
    sig = preempt_signal()
    code = (f"import signal, sys; signal.signal({int(sig)}, signal.SIG_IGN); sys.argv[0] = 'torchrun'; "
            "from torch.distributed.run import main; main()")
    return [sys.executable, "-c", code]


def launch_local_ranks(cfg, out: Path, overrides: list[str], sweeping: bool):
    """Run this job as `trainer.devices` ranks under torchrun, in this job's run dir."""
    from .results import write_json_atomic

    n = cfg.trainer.devices
    cmd = [*_torchrun_prefix(), "--standalone", "--nnodes=1", f"--nproc-per-node={n}",
           "-m", "cola_train", *overrides,
           f"hydra.run.dir={hydra_quote(str(out))}", "hydra.output_subdir=null"]
    env = {**os.environ, _SPAWNED: "1"}
    if env.pop(_SELF_RANK, None):
        for k in _RANK_VARS:
            env.pop(k, None)
    if not cuda():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    log.info("starting %d local ranks (%s) in %s", n, "nccl" if cuda() else "gloo", out)
    started = time.time()
    # the ranks in a session of their own: a terminal's Ctrl-C reaches only this process, which
    # forwards it to the ranks (torchrun's agent would tear them down before they save)
    with _forward_preemption() as forwarded, preemption.forward_to_ranks(forwarded):
        proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), start_new_session=True)
        forwarded.append(proc)
        rc = proc.wait()
    fresh = (out / "results.json").is_file() and (out / "results.json").stat().st_mtime >= started - 1
    results = _read_results(out) if fresh else {}  # not the one an earlier attempt left
    status = results.get("status")
    if status == preemption.STATUS or (preemption.requested() and status != "completed"):
        preemption.report_ranks(out, results)  # one line, exit 130
    if status == "preempted":
        log.warning("ranks stopped for preemption at step %s", results.get("train", {}).get("steps"))
        hand_over_preemption()
        raise SystemExit(EXIT_PREEMPTED)
    if rc != 0 and status == "completed":
        # rank 0 writes a completed results.json only after every rank has trained and evaluated
        # (they meet in collectives on the way): a rank that then dies in teardown (gloo's threads
        # can abort at exit under load) has lost nothing, so the run stands
        log.warning("a local rank exited with code %s after the run completed; keeping its results", rc)
        return results
    if rc != 0:
        if status != "failed":
            write_json_atomic(out / "results.json", {
                "status": "failed", "error": f"{n} local ranks exited with code {rc} (see the log above)"})
        if not sweeping:
            print(f"error: {n} local ranks exited with code {rc}", file=sys.stderr)
            sys.exit(rc if 0 < rc < 256 else 1)
        return None
    return results


def _read_results(out: Path) -> dict:
    from .results import read_results

    return read_results(out)


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
                import shutil

                shutil.rmtree(out)
    return shared


# ----------------------------------------------------------------------------------------------
# SLURM tasks as ranks


def adopt_slurm_tasks() -> None:
    """Under submitit with several tasks, each task is one rank: export the torch.distributed
    environment (MASTER_ADDR = first node, RANK, WORLD_SIZE, LOCAL_RANK) from the job."""
    if is_rank():
        return
    if under_submitit():
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


# ----------------------------------------------------------------------------------------------
# preemption: checkpoint, then requeue


EXIT_PREEMPTED = 3


def preempt_signal() -> signal.Signals:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class _Flag:
    signum: int | None = None
    previous = None  # submitit's handler, kept to requeue once our checkpoint is on disk


_FLAG = _Flag()


def _on_signal(signum, frame):  # noqa: ARG001
    if _FLAG.signum is None:
        then = "requeueing" if (under_submitit() or under_slurm()) else "stopping (the same command resumes)"
        log.warning("caught %s: saving a checkpoint at the end of this step, then %s",
                    signal.Signals(signum).name, then)
    _FLAG.signum = signum


def install_preemption_handler() -> bool:
    """Catch submitit's preemption/time-out signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says
    otherwise) under SLURM/submitit; remember submitit's own handler to requeue later."""
    if not (under_submitit() or under_slurm()):
        return _install_local_stop_handlers()
    sig = preempt_signal()
    try:
        current = signal.getsignal(sig)
        if current is not _on_signal:
            _FLAG.previous = current
            signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread
        return False
    return True


def _install_local_stop_handlers() -> bool:
    """Outside SLURM, SIGTERM and SIGUSR1 (a user's kill, a local scheduler) also mean: save a
    checkpoint at the end of this step and exit with EXIT_PREEMPTED; re-running the same command
    resumes from it. Left alone when something else already handles them."""
    installed = False
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, _on_signal):
                signal.signal(sig, _on_signal)
                installed = True
        except ValueError:  # not the main thread
            return False
    return installed


def preemption_requested() -> bool:
    return _FLAG.signum is not None


def hand_over_preemption() -> None:
    """Give the signal to submitit's handler: it pickles the launcher call again (same overrides,
    so the same run dir), requeues the job and exits. Only submitit's global rank 0 requeues."""
    handler, signum = _FLAG.previous, _FLAG.signum or int(preempt_signal())
    if callable(handler) and global_rank() == 0:
        handler(signum, None)  # exits (requeued), or raises if it may not requeue
    elif under_slurm() and not under_submitit() and global_rank() == 0:
        if shutil.which("scontrol") is None:  # the checkpoint is saved: a re-run resumes it
            log.warning("scontrol not on PATH: job %s not requeued; run it again to resume",
                        os.environ["SLURM_JOB_ID"])
            return
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)


@contextlib.contextmanager
def _forward_preemption():
    """While local ranks run: note the preemption signal here (under SLURM submitit's handler
    would exit at once; outside it SIGTERM / SIGUSR1) and pass it on to the ranks, which
    checkpoint and stop."""
    procs: list = []
    if not install_preemption_handler():
        yield procs
        return

    def forward(signum, frame):
        _on_signal(signum, frame)
        for proc in procs:
            with contextlib.suppress(Exception):
                import psutil

                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.send_signal(signum)
    # outside SLURM the ranks run in a session of their own (launch_local_ranks): a stop meant
    # for the job (scripts/study.py signals its process group) reaches them through here
    sigs = [preempt_signal()] if (under_submitit() or under_slurm()) else [signal.SIGTERM, signal.SIGUSR1]
    for sig in sigs:
        signal.signal(sig, forward)
    try:
        yield procs
    finally:
        for sig in sigs:
            signal.signal(sig, _on_signal)


# Seconds to sleep after every step; for the preemption tests only.
_DEBUG_STEP_SLEEP = float(os.environ.get("COLA_TRAIN_DEBUG_STEP_SLEEP_S", "0") or 0)


def _preempt_callback_class():
    from transformers import TrainerCallback

    class PreemptionCallback(TrainerCallback):
        """At the end of each step: did any rank get the signal? Then save and stop, all ranks
        at the same step (one tiny all-reduce per step, only under SLURM)."""

        def __init__(self):
            self.active = install_preemption_handler() | preemption.install()  # both, always
            self.stopped_at: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            preemption.set_training(True)  # a Ctrl-C from here asks for a checkpoint

        def on_train_end(self, args, state, control, **kwargs):
            preemption.set_training(False)

        def _any_rank(self, args) -> bool:
            """Max over the ranks of 0 (go on), 1 (preemption signal), 2 (Ctrl-C): every rank
            stops at the same step and for the same reason."""
            mine = 2 if preemption.requested() else 1 if preemption_requested() else 0
            reason = self._reduce(args, mine)
            preemption.STATE.stop = reason == 2
            return reason > 0

        def _reduce(self, args, mine: int) -> int:
            if not self.active:
                return mine
            import torch
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                return mine
            device = args.device if dist.get_backend() == "nccl" else torch.device("cpu")
            t = torch.tensor([float(mine)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return int(t.item())

        def on_step_end(self, args, state, control, **kwargs):
            if _DEBUG_STEP_SLEEP:  # tests: slow steps down so a signal lands mid-run
                time.sleep(_DEBUG_STEP_SLEEP)
            if self.stopped_at is None and self._any_rank(args):
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

        def preempted(self, state) -> bool:
            """Stopped by the signal before the planned last step."""
            return self.stopped_at is not None and state.global_step < state.max_steps

    return PreemptionCallback


def preemption_callback():
    return _preempt_callback_class()()


def mean_train_loss(trainer, train_out, resumed: bool) -> float:
    """The mean training loss over all steps. After a resume the Trainer sums only the steps of
    this attempt but divides by all of them; the log history (restored with the checkpoint)
    still holds every logged interval, so average that, weighted by interval length."""
    if not resumed:
        return train_out.training_loss
    total, steps, last = 0.0, 0, 0
    for entry in trainer.state.log_history:
        if "loss" in entry and "step" in entry:
            span = entry["step"] - last
            total, steps, last = total + float(entry["loss"]) * span, steps + span, entry["step"]
    return total / steps if steps else train_out.training_loss


def stop_for_preemption(out: Path, trainer, results: dict) -> None:
    """After trainer.train() returned early on the signal: record it, then requeue and exit.
    A Ctrl-C instead: results.json says "interrupted", nothing is requeued, exit 130."""
    from .results import write_json_atomic

    if preemption.STATE.stop:
        preemption.stop(out, trainer, results, barrier, spawned=bool(os.environ.get(_SPAWNED)))

    step = trainer.state.global_step
    results = {**results, "status": "preempted",
               "train": {"steps": step, "max_steps": trainer.state.max_steps}}
    barrier()
    if trainer.is_world_process_zero():
        write_json_atomic(out / "results.json", results)
    log.warning("preempted at step %d of %d; checkpoint saved in %s", step, trainer.state.max_steps,
                out / "checkpoints")
    barrier()
    hand_over_preemption()
    # not requeued by submitit here (a rank > 0, or ranks of a local torchrun under SLURM whose
    # parent requeues): leave quietly so the parent sees results.json
    raise SystemExit(0 if os.environ.get(_SPAWNED) else EXIT_PREEMPTED)


# ----------------------------------------------------------------------------------------------
# the job as __main__ runs it


def job(cfg, out: Path, run, sweeping: bool):
    """What one Hydra job does: become a rank if SLURM says so, fan out to N local ranks if
    trainer.devices asks for it, else run here."""
    from hydra.core.hydra_config import HydraConfig

    from .checks import validate

    adopt_slurm_tasks()
    hc = HydraConfig.get()
    if should_spawn(cfg):
        validate(cfg)  # bad input stops here, once, before any rank starts
        check(cfg)  # DeepSpeed vs trainer, devices vs GPUs (checks.py may not import this module)
        from .resume import check as check_resume

        check_resume(cfg, out, resuming(out))  # and a resume with another config
        from .checks import before_model

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


def keep_sweeping(fn, out: Path):
    """In a multirun an unexpected error fails this job (results.json says so, the log has the
    traceback) and the sweep goes on to the next job and its summary."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        from .results import write_json_atomic

        log.exception("job failed: %s", err)
        if out.is_dir() and _read_results(out).get("status") != "completed":
            write_json_atomic(out / "results.json",
                              {"status": "failed", "error": f"{type(err).__name__}: {err}"})
        return None
