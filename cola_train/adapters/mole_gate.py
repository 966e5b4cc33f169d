"""MoLE's gate (Wu, Huang, Wei, ICLR 2024), one per transformer block: the part of MoLE as
published that does not depend on how the experts are run (tests/reference_moe.py, mole_block,
is its float64 oracle).

    E_Omega = Normalization(E_1 (+) ... (+) E_N)        the experts' block outputs, concatenated
    epsilon = Flatten(E_Omega)^T e                       e: (N*d, N), the gate's only weight
    G       = softmax(epsilon / tau)                     tau: learnable temperature
    O       = F(x) + sum_i G_i E_i

Choices where the paper and PAPERS.md are silent (the same as the oracle's): Normalization is a
LayerNorm without affine parameters over each token's N*d vector; the per-position weights of
Flatten are shared across positions and the token terms averaged over the sequence's real tokens
(a flattened L x d input would fix the sequence length), giving one gate vector per sequence;
e starts at zero (G uniform: the experts' average) and tau at 1. `balance_loss` is the paper's
-log prod_i q^(i) over the blocks' gates, weight 0.5 in the training loss.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BALANCE_WEIGHT = 0.5   # alpha in L = L_task + alpha * L_balance (PAPERS.md, MoLE)


class MoLEGate(nn.Module):
    """G = softmax(mean_t(LN(E_1 (+) .. (+) E_N)_t) e / tau), one row per sequence."""

    def __init__(self, n_experts: int, d_model: int, eps: float = 1e-5, dtype=None, device=None):
        super().__init__()
        self.n_experts, self.d_model, self.eps = n_experts, d_model, eps
        self.e = nn.Parameter(torch.zeros(n_experts * d_model, n_experts, dtype=dtype, device=device))
        self.tau = nn.Parameter(torch.ones((), dtype=dtype, device=device))
        self.last: Optional[torch.Tensor] = None   # G of the latest training forward (balance loss)

    def forward(self, expert_outputs: Sequence[torch.Tensor],
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """expert_outputs: N tensors (batch, tokens, d); attention_mask: (batch, tokens) or None."""
        cat = torch.cat(list(expert_outputs), dim=-1)
        normed = F.layer_norm(cat, (cat.shape[-1],), eps=self.eps)
        per_token = normed @ self.e.to(normed.dtype)                      # (b, t, N)
        if attention_mask is None:
            pooled = per_token.mean(1)
        else:
            m = attention_mask.to(per_token.dtype).unsqueeze(-1)
            pooled = (per_token * m).sum(1) / m.sum(1).clamp_min(1)
        G = torch.softmax(pooled / self.tau.to(pooled.dtype), dim=-1)
        self.last = G if self.training else None
        return G

    @staticmethod
    def mix(base: torch.Tensor, expert_outputs: Sequence[torch.Tensor], G: torch.Tensor) -> torch.Tensor:
        """O = F(x) + sum_i G_i E_i (G per sequence)."""
        out = base
        for i, E in enumerate(expert_outputs):
            out = out + G[:, i, None, None].to(E.dtype) * E
        return out

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, d_model={self.d_model}"


def balance_loss(gates: List[torch.Tensor]) -> torch.Tensor:
    """-log prod_i q^(i) = -sum_i log q^(i), q^(i) = expert i's gate probability averaged over the
    gated blocks and the batch's sequences (float32 at least)."""
    q = torch.stack([g.to(torch.promote_types(g.dtype, torch.float32)).mean(0) for g in gates]).mean(0)
    return -torch.log(q.clamp_min(1e-30)).sum()


def aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """BALANCE_WEIGHT * balance_loss over every MoLEGate's latest training forward, or None."""
    gates = [m.last for m in model.modules() if isinstance(m, MoLEGate) and m.last is not None]
    return None if not gates else BALANCE_WEIGHT * balance_loss(gates)


class GateCollector:
    """What adapters.aux_loss asks a layer's combiner for (`collector.loss()`): the balance loss
    over all of the model's MoLE gates, BALANCE_WEIGHT * -log prod q, from their latest training
    forward (None when there was none)."""

    def __init__(self):
        self.gates: List[MoLEGate] = []

    def loss(self) -> Optional[torch.Tensor]:
        seen = [g.last for g in self.gates if g.last is not None]
        return None if not seen else BALANCE_WEIGHT * balance_loss(seen)
