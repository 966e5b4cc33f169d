"""A module instance's forward replaced by an object's bound __call__ (gated_mlp, shared_qkv).

Why an object rather than a function bound to the module: it pickles and deep-copies with the
model, and torch.compile guards a bound method by its function's code, the same in every layer, so
one compiled graph serves them all (gated_mlp.GatedForward says more). Both patched forwards also
ask whether sibling linears reading one input can run as one call (can_share, together)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import nn


def install(model: nn.Module, wanted: Callable[[nn.Module], bool], forward_type: type) -> int:
    """module.forward = forward_type(module).__call__ for every module `wanted` accepts; the count."""
    count = 0
    for module in model.modules():
        if wanted(module):
            module.forward = forward_type(module).__call__
            # a class name another instance patch gave (Liger's SwiGLU, kernels.py) no longer says
            # what runs: the forward is ours now, and print(model) shows the module's own class
            module.__dict__.pop("_get_name", None)
            count += 1
    return count


def routing(module: nn.Module, forward_type: type):
    """The forward_type object install() routed module through, or None."""
    found = getattr(module.__dict__.get("forward"), "__self__", None)
    return found if isinstance(found, forward_type) else None


def uninstall(model: nn.Module, forward_type: type) -> None:
    for module in model.modules():
        if routing(module, forward_type) is not None:
            del module.forward


def can_share(modules: Sequence) -> bool:
    """Modules that read one input and can run as one call: all of one class that has a
    shared_input_forward (LowRankLinear's) and all able to (static combiners)."""
    cls = type(modules[0])
    return (hasattr(cls, "shared_input_forward") and all(type(m) is cls for m in modules)
            and all(getattr(m, "can_share_input", False) for m in modules))


def together(modules: Sequence[nn.Module], x: torch.Tensor) -> Optional[List[torch.Tensor]]:
    """[m(x) for m in modules] from one shared_input_forward call, or None where they cannot share
    (can_share) or that call declines."""
    return type(modules[0]).shared_input_forward(modules, x) if can_share(modules) else None
