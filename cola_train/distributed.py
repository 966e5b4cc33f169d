"""Does this run's DeepSpeed config agree with the trainer and the machine? One ConfigError.

The single job left here after the split by lifetime (launch.py: before and after a run;
preemption.py: signals; parallel.py: the Runtime, collectives and the DeepSpeed dict; trainer.py:
the Trainer's quirks). `__main__`, `launch.job` and `run` call `check` after `checks.validate`, so a conflict stops the run in one line
before any rank starts, instead of as a long message from HF or DeepSpeed after the model loads.
"""
from __future__ import annotations

import os

from .parallel import plain_dict, cuda, deepspeed_enabled, is_rank


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
    ds = plain_dict(cfg.deepspeed.config)
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
