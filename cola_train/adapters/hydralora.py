"""HydraLoRA (Tian et al., 2024): one shared A, n B heads, a per-token softmax router over the heads.

    y = W_res x + s * sum_j g_j(x) B_j A drop(x),   g(x) = softmax(router(x))

As in the official code: the router is a bias-free Linear(d_in -> n) reading the undropped input,
Kaiming-initialised like A; the softmax runs in float32; B heads start at zero. Fused: h = A x
once, the gate scales h per head on the small (n, r) tensor, then one matmul with [B_1 .. B_n].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import init as inits
from .layer import AdapterLinear, new_param


class HydraLoRALinear(AdapterLinear):
    mergeable = False
    takes_gated_input = True   # forward(gate, up=up): see gated_mlp.py

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float,
                 num_B: int, impl: str = "fused"):
        super().__init__(base_layer, r, alpha, dropout)
        self.num_B, self.impl = num_B, impl
        fac = self._factory()
        self.lora_A = new_param((r, self.in_features), fac)
        self.lora_B = new_param((self.out_features, num_B, r), fac)
        self.router = nn.Linear(self.in_features, num_B, bias=False, **fac)
        self._reset()

    @classmethod
    def from_config(cls, base_layer: nn.Linear, cfg) -> "HydraLoRALinear":
        return cls(base_layer, cfg.r, cfg.alpha, cfg.dropout, cfg.num_B, cfg.impl)

    @torch.no_grad()
    def _reset(self) -> None:
        inits.kaiming_(self.lora_A.data)
        inits.kaiming_(self.router.weight.data)
        self.lora_B.data.zero_()

    def route(self, x: torch.Tensor) -> torch.Tensor:
        return self._router_probs(self.router, x)

    def forward(self, x: torch.Tensor, *args, up: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """self(x), or self(gate, up=up) for silu(gate) * up (a gated MLP's down_proj, gated_mlp.py)."""
        plain = self.merged or self.impl == "loop" or self.fp32_path
        if up is not None:
            routed = None if plain else self._routed_forward(x, self.router, *self._factors(), up=up)
            return self.forward(F.silu(x) * up) if routed is None else routed[0]
        if plain or args or kwargs:
            return super().forward(x, *args, **kwargs)
        routed = self._routed_forward(x, self.router, *self._factors())
        if routed is not None:
            return routed[0]
        return self._fused_forward(x, self._mixed)

    def _factors(self):
        """(A, [B_1 .. B_n] * s)."""
        return self.lora_A, self.lora_B.reshape(self.out_features, -1) * self.scaling

    def _mixed(self, x: torch.Tensor):
        """(gate-weighted h, [B_1 .. B_n] * s): the update is their product."""
        gate = self.route(x)
        h = F.linear(self.dropout(self._cast_input(x, self.lora_A.dtype)), self.lora_A)
        weighted = (gate.to(h.dtype).unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)  # (..., n*r)
        return weighted, self._factors()[1]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "loop":
            gate = self.route(x)
            h = F.linear(self.dropout(self._cast_input(x, self.lora_A.dtype)), self.lora_A)
            gate = gate.to(h.dtype)
            return sum(gate[..., j:j + 1] * F.linear(h, self.lora_B[:, j]) * self.scaling
                       for j in range(self.num_B))
        return F.linear(*self._mixed(x))

    @torch.no_grad()
    def init_pissa(self) -> None:
        """A and every head = the principal factors: router weights sum to one, so the initial
        update is the principal part whatever the routing."""
        a, b = (t.to(**self._factory()) for t in self.principal())
        self.lora_A.data.copy_(a)
        self.lora_B.data.copy_(b[:, None, :].expand_as(self.lora_B))
        self.set_initial(a, b, self.scaling)

    @torch.no_grad()
    def reinit(self, rank: Optional[int] = None) -> None:
        if rank is not None and rank != self.r:
            fac = self._factory()
            self.r = rank
            self.lora_A = new_param((rank, self.in_features), fac)
            self.lora_B = new_param((self.out_features, self.num_B, rank), fac)
        self._reset()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_B={self.num_B}, impl={self.impl}"
