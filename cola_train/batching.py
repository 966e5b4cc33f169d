"""trainer.effective_batch: the gradient accumulation a fixed effective batch needs on this world.

A paper's protocol fixes the batch an optimizer step sees (CoLA: 64 = 8 per device x 8 steps on
its machines), not the accumulation. With `trainer.effective_batch` set, grad_accum is derived
from it, the per-device batch and the number of ranks, so the same preset gives the same
optimizer steps on 1, 2, 4 or 8 devices. The derived value is written into the config itself
(trainer.grad_accum), so results.json records what the run used.
"""
from __future__ import annotations

import os


def world_size(cfg) -> int:
    """Ranks of this run: the launcher's WORLD_SIZE inside a rank, trainer.devices before spawning."""
    from .parallel import is_rank

    if is_rank():
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    return max(1, int(cfg.trainer.devices))


def derive_grad_accum(effective_batch: int, batch_size: int, world: int) -> int:
    """effective_batch / (batch_size x world); a ConfigError in one line when that is no integer."""
    from .config import ConfigError

    if effective_batch < 1:
        raise ConfigError(f"trainer.effective_batch={effective_batch} must be >= 1 (or null: off)")
    per_step = batch_size * world
    if per_step < 1 or effective_batch % per_step:
        raise ConfigError(f"trainer.effective_batch={effective_batch} is not a multiple of trainer.batch_size="
                          f"{batch_size} x {world} device(s) = {per_step}; choose a batch_size that divides it")
    return effective_batch // per_step


def apply_effective_batch(cfg) -> None:
    """Set trainer.grad_accum from trainer.effective_batch (null: leave it as configured). An
    explicit grad_accum other than 1 (the default) that disagrees is refused, not silently replaced."""
    from .config import ConfigError

    t = cfg.trainer
    if getattr(t, "effective_batch", None) is None:
        return
    world = world_size(cfg)
    accum = derive_grad_accum(int(t.effective_batch), int(t.batch_size), world)
    if t.grad_accum not in (1, accum):
        raise ConfigError(f"trainer.grad_accum={t.grad_accum} conflicts with trainer.effective_batch="
                          f"{t.effective_batch} (which gives {accum} on {world} device(s)); leave grad_accum "
                          f"unset or set trainer.effective_batch=null")
    t.grad_accum = accum
