"""Llama-family MLPs, down(silu(gate(x)) * up(x)), sent through an adapted down_proj's fused path.

Why: an adapter on down_proj must keep its input, the d_ff-wide product silu(gate) * up, for dA,
the largest activation of the layer (117 MB per layer for Llama-3.1-8B at 4 x 1024 tokens). The
fused path (fused_ops.GatedLowRankMLP) keeps gate and up instead, which the frozen model keeps
anyway, and recomputes the product in backward. Where gate_proj and up_proj are adapters too, one
fused call computes both from their shared input (LowRankLinear.shared_input_forward, static combiners). Installed per
module instance by attach_adapter; the instance forward falls back to the model's own formula
whenever down_proj is not ours.
"""
from __future__ import annotations

from torch import nn

from . import instance_forward

_SILU = ("SiLU", "SiLUActivation")


def is_gated_silu_mlp(module: nn.Module) -> bool:
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)).__name__ in _SILU)


def _takes_gated_input(module: nn.Module) -> bool:
    return getattr(module, "takes_gated_input", False)


def _shared_input(mlp: nn.Module, x):
    """(gate, up) from one call where both are adapters that can share their input
    (LowRankLinear.shared_input_forward, static combiners: one GEMM over x for both A's), else None."""
    return instance_forward.together([mlp.gate_proj, mlp.up_proj], x)


class GatedForward:
    """A routed MLP's instance forward is this object's bound __call__: picklable (a function bound to the
    MLP would not be), and torch.compile guards a patched forward that is a bound method by its
    function's code, the same in every layer. The object itself would be guarded by identity: a
    compiled decoder layer would recompile for each layer, and past dynamo's recompile limit (8)
    run eagerly."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp

    def __call__(self, x):
        mlp = self.mlp
        both = _shared_input(mlp, x)
        gate, up = both if both is not None else (mlp.gate_proj(x), mlp.up_proj(x))
        if _takes_gated_input(mlp.down_proj):
            return mlp.down_proj(gate, up=up)   # a module call: ZeRO-3 gathers its parameters first
        return mlp.down_proj(mlp.act_fn(gate) * up)


def install(model: nn.Module) -> int:
    """Route every gated SiLU MLP whose down_proj takes (gate, up=up) through it; returns the count."""
    return instance_forward.install(
        model, lambda m: is_gated_silu_mlp(m) and _takes_gated_input(m.down_proj), GatedForward)


def routing(module: nn.Module):
    """The GatedForward that install() routed module through, or None."""
    return instance_forward.routing(module, GatedForward)


def uninstall(model: nn.Module) -> None:
    instance_forward.uninstall(model, GatedForward)
