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
                 padding: Optional[PaddingMask] = None, dtype=None, device=None,
                 gate: Optional[MoLEGate] = None):
        super().__init__()
        self.block = block
        if gate is None:
            self.gate = MoLEGate(n_experts, d_model, dtype=dtype, device=device)
        else:   # owned by an adapted linear (saved with it); not registered here a second time
            self._gate = (gate,)
        self._switches = experts          # the block's adapted linears (not registered twice)
        self._padding = padding

    def __getattr__(self, name):
        if name == "gate" and "_gate" in self.__dict__:
            return self.__dict__["_gate"][0]
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "block":
                raise
            # what the model asks of its decoder layers (e.g. attention_type) is the block's
            return getattr(super().__getattr__("block"), name)

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


def install_blocks(model: nn.Module, layers: dict, n_experts: int) -> List[MoLEBlock]:
    """Wrap every decoder block holding adapted linears in a MoLEBlock (method=mole). The block is
    the module at the first numbered path segment of a layer's name (model.layers.3 for
    model.layers.3.self_attn.q_proj). Each block's gate is created on its first adapted linear as
    `mole_gate` (saved and loaded with the adapter); one GateCollector gives adapters.aux_loss the
    balance loss over all gates; the model's 2-D attention mask reaches the gates through a
    forward pre-hook."""
    import re

    from .mole_gate import GateCollector

    by_block: dict = {}
    for name, layer in layers.items():
        found = re.match(r"^(.*?\.\d+)\.", name)
        if found is None:
            raise AdapterError(f"mole gates per transformer block, but {name!r} is in no numbered block")
        by_block.setdefault(found.group(1), []).append(layer)
    padding = PaddingMask()
    model.register_forward_pre_hook(padding.hook, with_kwargs=True)
    collector = GateCollector()
    wrapped = []
    for path, switches in by_block.items():
        parent, _, index = path.rpartition(".")
        container = model.get_submodule(parent)
        block = container[int(index)]
        d_model = getattr(getattr(model, "config", None), "hidden_size", None) or switches[0].in_features
        w = switches[0].base_layer.weight
        gate = MoLEGate(n_experts, d_model, dtype=torch.float32 if w.dtype in (torch.float16, torch.bfloat16)
                        else w.dtype, device=w.device)
        switches[0].mole_gate = gate
        collector.gates.append(gate)
        for layer in switches:
            layer.combiner.collector = collector
        container[int(index)] = MoLEBlock(block, switches, n_experts, d_model, padding, gate=gate)
        wrapped.append(container[int(index)])
    return wrapped
