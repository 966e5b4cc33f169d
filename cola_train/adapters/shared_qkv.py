"""`SharedInputGroup`: sibling adapted linears that read one input (an attention's q_proj, k_proj,
v_proj), computed by one fused call. The group is a module of the attention (`shared_qkv`,
visible in `print(model)`; no parameters, so the state dict is unchanged) and each member holds
it; the attention's own forward is untouched.

How: the first member called on x computes all the members' outputs through
LowRankLinear.shared_input_forward and keeps the others' for their own call on the same x
(the same tensor object), which returns it. Where the grouped call does not apply (dropout,
hooks, ZeRO-3 partitioned parameters, torch.compile tracing, another x, dropout with
method.dropout_mask=per_layer) each member computes its own output as usual. With dropout and
dropout_mask=shared (the default) the members share one mask, shown in the repr.

Why: apart, the three adapters each read x for z = x A^T and again for dA, each write an input
gradient that autograd then sums; together it is one GEMM each way and one dx buffer
(docs/PERFORMANCE.md, run 9).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from . import instance_forward

_PROJS = ("q_proj", "k_proj", "v_proj")
NAME = "shared_qkv"


class SharedInputGroup(nn.Module):
    def __init__(self, members: List[nn.Module], names=_PROJS):
        super().__init__()
        self.__dict__["members"] = list(members)   # not children: the attention owns them
        self.names = tuple(names)
        self.pending: Dict[int, tuple] = {}        # member index -> (x, its output)

    def output(self, member: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """member(x) from the group's one fused call, or None (the member computes it itself)."""
        if torch.compiler.is_compiling():
            return None
        index = next(i for i, m in enumerate(self.members) if m is member)
        handed = self.pending.pop(index, None)
        if handed is not None and handed[0] is x:
            return handed[1]
        self.pending.clear()
        outs = type(member).shared_input_forward(self.members, x)
        if outs is None:
            return None
        self.pending.update((i, (x, out)) for i, out in enumerate(outs) if i != index)
        return outs[index]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["pending"] = {}   # outputs with an autograd graph: not copied
        return state

    def extra_repr(self) -> str:
        return ", ".join(self.names) + instance_forward.mask_repr(self.members)


def _shares_qkv(module: nn.Module) -> bool:
    return instance_forward.can_share([getattr(module, name, None) for name in _PROJS])


def install(model: nn.Module) -> int:
    """A SharedInputGroup for every attention whose q/k/v can share their input; the count."""
    count = 0
    for module in model.modules():
        if isinstance(module, SharedInputGroup) or not _shares_qkv(module):
            continue
        if not isinstance(getattr(module, NAME, None), SharedInputGroup):
            members = [getattr(module, name) for name in _PROJS]
            group = SharedInputGroup(members)
            setattr(module, NAME, group)
            for member in members:
                member.__dict__["group"] = group
        count += 1
    return count


def routing(module: nn.Module):
    """The attention's SharedInputGroup, or None."""
    found = module._modules.get(NAME)
    return found if isinstance(found, SharedInputGroup) else None


def uninstall(model: nn.Module) -> None:
    for module in list(model.modules()):
        group = routing(module)
        if group is not None:
            for member in group.members:
                member.__dict__.pop("group", None)
            del module._modules[NAME]
