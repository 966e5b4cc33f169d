"""`trainer.attn_kernel`: which of torch's scaled-dot-product-attention backends a CUDA run may use.

Why: the default 8B CLI run (docs/PERFORMANCE.md, "The CLI path: the step is host-bound") spent
~2 ms of CPU per attention call in cuDNN's SDPA, because every batch has a new padded length and
cuDNN builds an execution plan for each new shape (~117 ms of host time a step at batch 4). Flash
and memory-efficient attention take any length without planning. So:

- `auto` (the default): cuDNN's backend off; torch then picks flash where there is no mask and
  memory-efficient where there is one (padding, packed sequences), math as the last resort.
- `flash` / `efficient` / `cudnn`: that backend only, with math as the fallback where it cannot run
  (flash takes no attention mask: a padded or packed batch falls back to math, which is slow).
- `math`: the plain composite (a reference, slow).
- `torch`: leave torch's own choice as it is (cuDNN included).

The switches are torch's process-wide `torch.backends.cuda.enable_*_sdp` flags, set for every run
(an in-process sweep's next job sets its own). On a CPU nothing is changed and results.json says so.
"""
from __future__ import annotations

import logging

log = logging.getLogger("cola_train")

BACKENDS = ("flash", "mem_efficient", "cudnn", "math")
# the backends each choice enables (the others are switched off)
ENABLED = {
    "auto": ("flash", "mem_efficient", "math"),
    "flash": ("flash", "math"),
    "efficient": ("mem_efficient", "math"),
    "cudnn": ("cudnn", "math"),
    "math": ("math",),
    "torch": BACKENDS,
}


def check(choice: str) -> None:
    from .config import ConfigError

    if choice not in ENABLED:
        raise ConfigError(f"trainer.attn_kernel={choice!r} is not one of {', '.join(ENABLED)}")


def apply(choice: str, cuda: bool) -> dict:
    """Set torch's SDPA backend flags for `choice` on a CUDA device; what results.json records."""
    import torch

    check(choice)
    if not cuda:
        return {"attn_kernel": choice, "sdpa_backends": "cpu (unchanged)"}
    enabled = ENABLED[choice]
    for name in BACKENDS:
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(name in enabled)
    log.info("attention (SDPA) backends: %s (trainer.attn_kernel=%s)", ", ".join(enabled), choice)
    return {"attn_kernel": choice, "sdpa_backends": list(enabled)}
