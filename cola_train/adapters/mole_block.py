"""MoLE as published, at the level the paper defines it: a transformer block run once without its
LoRA experts and once with each expert alone, the experts' contributions mixed by the block's
gate (mole_gate.MoLEGate; oracle: tests/reference_moe.py, mole_block).

    F   = block(h)                    every expert off
    E_i = block_i(h) - F              expert i alone on, i = 1..N
    O   = F + sum_i G_i E_i,   G = MoLEGate(E_1, .., E_N)

Cost: N + 1 runs of each gated block (the experts are frozen, only the gates train). The expert
switch is an attribute every adapted linear of the block honours: `active_expert` = None (base
only) or i (base + expert i's LoRA). Whatever layer class holds the experts implements that; this
wrapper only sets it.

A KV cache cannot serve N + 1 runs of one block (each run would append its keys), so the runs
get none; incremental decoding (a cache already holding this block's keys) is refused in one line.
The gate averages over the sequence's real tokens: `PaddingMask` captures the 2-D attention
mask from the top model's call, since a decoder block only sees the 4-D causal one (or none).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from .mole_gate import MoLEGate
from .spec import AdapterError

CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


class PaddingMask:
    """The (batch, tokens) attention mask of the model call in progress, for the gates."""

    def __init__(self):
        self.value: Optional[torch.Tensor] = None

    def hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.value = mask if (mask is not None and mask.dim() == 2) else None


class MoLEBlock(nn.Module):
    """A decoder block with MoLE's gate over its experts (see the module doc)."""

    def __init__(self, block: nn.Module, experts: List[nn.Module], n_experts: int, d_model: int,
                 padding: Optional[PaddingMask] = None, dtype=None, device=None):
        super().__init__()
        self.block = block
        self.gate = MoLEGate(n_experts, d_model, dtype=dtype, device=device)
        self._switches = experts          # the block's adapted linears (not registered twice)
        self._padding = padding

    def _run(self, expert: Optional[int], hidden_states, args, kwargs):
        for layer in self._switches:
            layer.active_expert = expert
        try:
            return self.block(hidden_states, *args, **kwargs)
        finally:
            for layer in self._switches:
                layer.active_expert = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = next((kwargs[k] for k in CACHE_KEYS if kwargs.get(k) is not None), None)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise AdapterError("MoLE runs each gated block once per expert and cannot decode with a KV cache: "
                               "generate with use_cache=False")
        kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KEYS}
        kwargs["use_cache"] = False
        base = self._run(None, hidden_states, args, kwargs)
        outs = [self._run(i, hidden_states, args, kwargs) - base for i in range(self.gate.n_experts)]
        mask = self._padding.value if self._padding is not None else None
        G = self.gate(outs, mask)
        return MoLEGate.mix(base, outs, G)
