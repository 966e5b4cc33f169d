"""`FusedGatedMLP`: a Llama-family MLP, down(silu(gate(x)) * up(x)), whose adapted down_proj takes
(gate, up) and runs the fused gated path. A module of its own, visible in `print(model)`, put in
the MLP's place by attach_adapter (no patched instance forward).

Why: an adapter on down_proj must keep its input, the d_ff-wide product silu(gate) * up, for dA,
the largest activation of the layer (117 MB per layer for Llama-3.1-8B at 4 x 1024 tokens). The
fused path (fused_ops.GatedLowRankMLP, GatedRoutedLowRankMLP) keeps gate and up instead, which the
frozen model keeps anyway, and recomputes the product in backward. Where gate_proj and up_proj
are adapters too, one fused call computes both from their shared input
(LowRankLinear.shared_input_forward, static combiners). The module owns the MLP's own
gate_proj / up_proj / down_proj / act_fn under the same names, so state-dict keys do not change;
`uninstall` puts the model's own MLP module back with the current children.
"""
from __future__ import annotations

from torch import nn

from . import instance_forward

_SILU = ("SiLU", "SiLUActivation")
_CHILDREN = ("gate_proj", "up_proj", "down_proj", "act_fn")


def is_gated_silu_mlp(module: nn.Module) -> bool:
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)).__name__ in _SILU)


def _takes_gated_input(module: nn.Module) -> bool:
    return getattr(module, "takes_gated_input", False)


def _shared_input(mlp: nn.Module, x):
    """(gate, up) from one call where both are adapters that can share their input
    (LowRankLinear.shared_input_forward: one GEMM over x for both A's), else None."""
    return instance_forward.together([mlp.gate_proj, mlp.up_proj], x)


class FusedGatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with down_proj called as down_proj(gate, up=up) (a module call,
    so ZeRO-3 gathers its parameters first); the model's own formula where down_proj is not ours."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        for name in _CHILDREN:
            setattr(self, name, getattr(mlp, name))
        for name in ("config", "hidden_size", "intermediate_size"):   # what HF code may read on an MLP
            if name in mlp.__dict__:
                self.__dict__[name] = mlp.__dict__[name]
        self.__dict__["_replaced"] = mlp   # not a child: uninstall puts it back

    def forward(self, x):
        both = _shared_input(self, x)
        gate, up = both if both is not None else (self.gate_proj(x), self.up_proj(x))
        if _takes_gated_input(self.down_proj):
            return self.down_proj(gate, up=up)
        return self.down_proj(self.act_fn(gate) * up)

    def restored(self) -> nn.Module:
        """The model's own MLP module, with this module's current children."""
        mlp = self.__dict__["_replaced"]
        for name in _CHILDREN:
            setattr(mlp, name, getattr(self, name))
        return mlp

    def extra_repr(self) -> str:
        return (f"replaces={type(self.__dict__['_replaced']).__name__}"
                + instance_forward.mask_repr([self.gate_proj, self.up_proj]))


def _parents(model: nn.Module):
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]


def install(model: nn.Module) -> int:
    """Every gated SiLU MLP whose down_proj takes (gate, up=up) becomes a FusedGatedMLP; returns how
    many the model has."""
    for parent, name, child in _parents(model):
        if (not isinstance(child, FusedGatedMLP) and is_gated_silu_mlp(child)
                and _takes_gated_input(child.down_proj)):
            setattr(parent, name, FusedGatedMLP(child))
    return sum(1 for m in model.modules() if isinstance(m, FusedGatedMLP))


def routing(module: nn.Module):
    """The module itself where it is a FusedGatedMLP, else None."""
    return module if isinstance(module, FusedGatedMLP) else None


def uninstall(model: nn.Module) -> None:
    for parent, name, child in _parents(model):
        if isinstance(child, FusedGatedMLP):
            setattr(parent, name, child.restored())
