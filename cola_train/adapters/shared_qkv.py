"""Attention blocks whose q_proj, k_proj and v_proj are adapters able to share their input
(LowRankLinear.shared_input_forward, static combiners): one fused call computes the three outputs, then the model's own
attention forward runs, and its q_proj(x), k_proj(x) and v_proj(x) module calls hand them back.

Why: apart, the three adapters each read x for z = x A^T and again for dA, each write an input
gradient that autograd then sums; together it is one GEMM each way and one dx buffer
(docs/PERFORMANCE.md, run 9). The model's attention code (RoPE, KV cache, attention kernels) is
untouched. Installed per module instance by attach_adapter, like gated_mlp.
"""
from __future__ import annotations

from torch import nn

from . import instance_forward

_PROJS = ("q_proj", "k_proj", "v_proj")


def _shares_qkv(module: nn.Module) -> bool:
    return instance_forward.can_share([getattr(module, name, None) for name in _PROJS])


class SharedQKVForward:
    """The attention module's instance forward (an object, picklable; see gated_mlp.GatedForward)."""

    def __init__(self, attn: nn.Module):
        self.attn = attn

    def __call__(self, *args, **kwargs):
        attn = self.attn
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        projs = [getattr(attn, name) for name in _PROJS]
        outs = instance_forward.together(projs, x)
        if outs is None:
            return type(attn).forward(attn, *args, **kwargs)
        for proj, out in zip(projs, outs):
            proj.hand_back = (x, out)
        try:
            return type(attn).forward(attn, *args, **kwargs)
        finally:
            for proj in projs:
                proj.hand_back = None


def install(model: nn.Module) -> int:
    return instance_forward.install(model, _shares_qkv, SharedQKVForward)


def routing(module: nn.Module):
    return instance_forward.routing(module, SharedQKVForward)


def uninstall(model: nn.Module) -> None:
    instance_forward.uninstall(model, SharedQKVForward)
