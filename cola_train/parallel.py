"""Where this process stands among the run's ranks, and the two collectives the code needs.

- `Runtime`: rank, world size, local rank, device, ZeRO stage, built once per run (`Runtime.of`)
  and passed down, so no step asks the environment again.
- `all_reduce`: one number summed (tokens, joules) or maxed (the preemption vote) over the ranks.
- `gathered`: ZeRO-3 parameters whole on every rank for a block (save, merge, read factors).
- The DeepSpeed dict handed to TrainingArguments and its ZeRO stage.

Why one module: the same three things were done three ways each (environment lookups, scalar
all-reduces, ZeRO-3 gathers), and a rank that takes another path than its peers deadlocks.
Every helper here is a no-op in a single process, so callers never branch on the world size.

The bottom layer: stdlib only at module level (launch imports it before Hydra or torch), and it
imports nothing of cola_train.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import socket

# Set in the environment of the ranks that `trainer.devices=N` starts: their parent checked the
# run before starting them, reports their outcome and requeues. An environment variable because
# the ranks are other processes.
SPAWNED = "COLA_TRAIN_SPAWNED"
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------
# where are we


class _WorldOfOne:
    """This process made itself rank 0 of a world of one (single-process DeepSpeed needs a
    process group). It must not then count as "started by a launcher" when a later job of the
    same in-process sweep wants N ranks. Read only through `is_rank` and `launcher_env`."""

    made = False


_WORLD_OF_ONE = _WorldOfOne()


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def is_rank() -> bool:
    """True when a launcher (torchrun, deepspeed, our own parent, a SLURM task) started us."""
    if _WORLD_OF_ONE.made:
        return False
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def spawned() -> bool:
    """A rank that `trainer.devices` started: its parent checked the run before starting it and
    reports its outcome."""
    return bool(os.environ.get(SPAWNED))


def _process_group(ask: str, env: str, default: str) -> int:
    """The live process group's answer (`dist.<ask>()`), else the launcher's environment."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return getattr(dist, ask)()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get(env, default))


def global_rank() -> int:
    return _process_group("get_rank", "RANK", "0")


def world_size() -> int:
    return _process_group("get_world_size", "WORLD_SIZE", "1")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_world_of_one() -> None:
    """Rank 0 of a world of one, unless a launcher made this process a rank already."""
    if is_rank() or "LOCAL_RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    _WORLD_OF_ONE.made = True


def launcher_env(env: dict) -> dict:
    """`env` for ranks this process starts: without the world of one it may have made itself."""
    if _WORLD_OF_ONE.made:
        env = {k: v for k, v in env.items() if k not in RANK_VARS}
    return env


# ----------------------------------------------------------------------------------------------
# DeepSpeed: the dict for TrainingArguments and its ZeRO stage


def plain_dict(node) -> dict:
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
    return int((plain_dict(cfg.deepspeed.config).get("zero_optimization") or {}).get("stage", 0))


def deepspeed_config(cfg) -> dict | None:
    """The dict handed to TrainingArguments(deepspeed=...). On CPU DeepSpeed's fused Adam is not
    built, so Adam/AdamW runs as torch's (`torch_adam: true`) unless the config says otherwise."""
    if not deepspeed_enabled(cfg):
        return None
    ds = plain_dict(cfg.deepspeed.config)
    # HF fills an "auto" train_batch_size when TrainingArguments is built, before it knows the
    # world size (it writes batch × accum × 1); left out, DeepSpeed computes it with the ranks.
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    opt = ds.get("optimizer")
    if opt and str(opt.get("type", "")).lower() in ("adam", "adamw") and not cuda():
        opt.setdefault("params", {}).setdefault("torch_adam", True)
    return ds


# ----------------------------------------------------------------------------------------------
# the run's place among the ranks


@dataclasses.dataclass(frozen=True)
class Runtime:
    """This process's part in the run, fixed once the launcher has set the environment (and
    `launch.job` has agreed on the run dir). Frozen: nothing changes it halfway through a run."""

    rank: int
    world_size: int
    local_rank: int
    device: str            # "cuda:<local rank>" or "cpu": where the model lives without DeepSpeed
    zero_stage: int        # 0 without DeepSpeed
    deepspeed: bool
    spawned: bool          # started by our own parent (`trainer.devices`), which reports for it

    @property
    def is_main(self) -> bool:
        """Rank 0: it alone writes results, metrics and the adapter."""
        return self.rank == 0

    @property
    def forward_on_every_rank(self) -> bool:
        """Under ZeRO-3 a forward outside the engine (the benchmark) needs every rank, since the
        parameters are partitioned; otherwise rank 0 runs it alone."""
        return self.zero_stage == 3

    @classmethod
    def of(cls, cfg) -> "Runtime":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(rank=global_rank(), world_size=world_size(), local_rank=local,
                   device=f"cuda:{local}" if cuda() else "cpu", zero_stage=zero_stage(cfg),
                   deepspeed=deepspeed_enabled(cfg), spawned=spawned())


# ----------------------------------------------------------------------------------------------
# collectives: every rank must call them; each is a no-op in a single process


def _group() -> bool:
    """A process group of more than one rank is up."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(value, op: str = "sum"):
    """`value` (an int or a float) summed (op="sum") or maxed (op="max") over the ranks, in
    float64 on the device the backend needs; an int comes back an int."""
    if not _group():
        return value
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return type(value)(t.item()) if isinstance(value, int) else t.item()


def barrier() -> None:
    if _group():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def gathered(params, modify: bool = False):
    """ZeRO-3: the partitioned parameters whole on every rank inside the block (`modify`: rank
    0's values are scattered back on exit); a no-op for ordinary tensors. `params`: one tensor or
    several. Every rank must enter it (a collective)."""
    params = [params] if hasattr(params, "shape") else list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield
