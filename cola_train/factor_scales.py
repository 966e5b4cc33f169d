"""Per-factor scales: the A- and B-factors' learning rates and their balance at init.

    method.lr_scale_A, method.lr_scale_B   every A-factor (lora_A) trains at trainer.lr x lr_scale_A,
                                           every B-factor (lora_B) at trainer.lr x lr_scale_B; every
                                           other trainable tensor (gates, routers, DoRA magnitudes,
                                           full fine-tuning) at trainer.lr
    method.init_tilt                       after the adapter's init, every A-factor x init_tilt and
                                           every B-factor / init_tilt: the update B A, and so the
                                           model's output at step 0, does not change

Why they exist (issue #23, part 5): with the split-PiSSA init every A_i of CoLA-fully(M, N) is the
same tensor, every B_j too, and they stay identical under any optimizer that treats parameters
element-wise (SGD, Adam): each A_i gets the gradient of A = sum_i A_i, so A moves M times as far as
one A_i does. CoLA-fully(M, N) is then exactly ONE rank-r adapter (A, B) = (sum_i A_i, sum_j B_j)
trained with A's lr x M and B's lr x N, starting from (sqrt(M/N) A_p, sqrt(N/M) B_p), where
(A_p, B_p) are PiSSA's balanced factors (split PiSSA gives each copy A_p / sqrt(MN)).
So the collapsed control is

    method=pissa method.lr_scale_A=M method.lr_scale_B=N method.init_tilt=sqrt(M/N)

(conf/method/pissa_collapsed.yaml for (2, 3)). The tilt matters: under SGD, plain PiSSA equals
CoLA-fully(M, N) only with the scales swapped (A x N, B x M); under Adam no scaling of plain PiSSA
is exact (lr x sqrt(MN) on both comes within Adam's eps). With the tilt, A x M and B x N is exact
under both (tests/test_factor_scales.py, float64; docs/PROTOCOL.md).

The parameter groups are made by splitting the groups transformers' Trainer builds (weight decay
and its exclusions stay as they are), so whatever optimizer the Trainer picks gets them.
"""
from __future__ import annotations

import math
import re
from typing import List, Optional, Tuple

import torch
from torch import nn

from .config import ConfigError

FACTORS = {"A": re.compile(r"(^|\.)lora_A(\.|$)"), "B": re.compile(r"(^|\.)lora_B(\.|$)")}
MARK = "factor"   # the key each of our param groups carries: "A", "B" or "other"


def scales(method_cfg) -> Tuple[float, float]:
    """(lr_scale_A, lr_scale_B) of a method config (1.0 where the config has no such field)."""
    return (float(getattr(method_cfg, "lr_scale_A", 1.0)), float(getattr(method_cfg, "lr_scale_B", 1.0)))


def check(method_cfg) -> None:
    """The config rules: positive, finite, and something to scale (called from config.validate)."""
    for key in ("lr_scale_A", "lr_scale_B", "init_tilt"):
        value = float(getattr(method_cfg, key, 1.0))
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"method.{key}={value:g} must be a finite number > 0")
        if value != 1.0 and method_cfg.kind == "none":
            raise ConfigError(f"method.{key}={value:g} scales low-rank factors, and full fine-tuning "
                              f"(method={method_cfg.name}) has none: leave it at 1")


def factor_of(name: str) -> Optional[str]:
    """'A' for an A-factor parameter (PEFT's ...lora_A.default.weight, ours ...lora_A), 'B' for a
    B-factor, None otherwise."""
    for which, pattern in FACTORS.items():
        if pattern.search(name):
            return which
    return None


def _method(model: nn.Module):
    from .adapters import adapter_info

    info = adapter_info(model)
    return None if info is None else info["method"]


def split_param_groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    """Split every param group of a freshly built optimizer into its A-factors (lr x lr_scale_A),
    B-factors (lr x lr_scale_B) and the rest (lr as it was), keeping each group's other settings.
    The scales come from the method recorded on the model (adapters.adapter_info), i.e. the method
    that was attached. Does nothing when both scales are 1 or the groups are split already.
    Returns whether it split."""
    method = _method(model)
    scale = dict(zip("AB", scales(method))) if method is not None else {"A": 1.0, "B": 1.0}
    if scale == {"A": 1.0, "B": 1.0} or any(MARK in g for g in optimizer.param_groups):
        return False
    names = {id(p): n for n, p in model.named_parameters()}
    found = {"A": 0, "B": 0}
    groups: List[dict] = []
    for group in optimizer.param_groups:
        parts = {"A": [], "B": [], "other": []}
        for p in group["params"]:
            which = factor_of(names.get(id(p), "")) or "other"
            parts[which].append(p)
        for which, params in parts.items():
            if not params:
                continue
            found[which] = found.get(which, 0) + len(params)
            lr = group["lr"] * scale.get(which, 1.0)
            groups.append({**group, "params": params, "lr": lr, MARK: which})
    for which in "AB":
        if scale[which] != 1.0 and not found[which]:
            raise ConfigError(f"method.lr_scale_{which}={scale[which]:g}, but method={method.name} has no "
                              f"trainable {which}-factor (a parameter named lora_{which})")
    optimizer.param_groups[:] = []
    for group in groups:
        optimizer.param_groups.append(group)
    return True


@torch.no_grad()
def tilt_init(model: nn.Module) -> int:
    """A-factors x init_tilt, B-factors / init_tilt (the method recorded on the model); the number
    of factors changed. Run right after attach_adapter, before any training or checkpoint load."""
    method = _method(model)
    tilt = float(getattr(method, "init_tilt", 1.0)) if method is not None else 1.0
    if tilt == 1.0:
        return 0
    changed = 0
    for name, p in model.named_parameters():
        which = factor_of(name)
        if which is not None and p.requires_grad:
            p.mul_(tilt if which == "A" else 1.0 / tilt)
            changed += 1
    if not changed:
        raise ConfigError(f"method.init_tilt={tilt:g}, but method={method.name} has no trainable "
                          f"low-rank factors to tilt")
    return changed
