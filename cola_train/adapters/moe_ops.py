"""The updates of MOELoRA and MoLA, fused: two skinny matmuls with the experts stacked, the
gate applied to the small (tokens, experts x rank) tensor in between. Plain functions of
(x, factors, gate parameters), so a combiner can call them whatever layer holds the factors;
tests/reference_moe.py has the per-expert float64 oracles they are tested against.

Layout: A is the experts' down-projections stacked, (E * r_e, d_in); B the up-projections side by
side, (d_out, E * r_e), expert i owning rows / columns i*r_e .. (i+1)*r_e - 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _blockwise(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor, scaling: float):
    """s * sum_i w_i B_i A_i x with w (..., E) broadcast over the tokens it covers."""
    E = weights.shape[-1]
    h = F.linear(x, A)                                               # (..., E * r_e)
    h = (h.unflatten(-1, (E, -1)) * weights.unsqueeze(-1).to(h.dtype)).flatten(-2)
    return F.linear(h, B) * scaling


def softmax_fp32(logits: torch.Tensor) -> torch.Tensor:
    """A softmax over the last dim in float32 at least, so the weights sum to one in any dtype."""
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def moelora_gate(task_ids: torch.Tensor, task_embedding: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """omega = softmax(W_T E[t]) per sequence, (batch, E), in float32 at least."""
    return softmax_fp32(F.embedding(task_ids, task_embedding) @ gate_weight.T)


def moelora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, omega: torch.Tensor):
    """MOELoRA: (alpha / r) sum_i omega_{t,i} B_i A_i x, x (batch, tokens, d_in), omega (batch, E):
    one weight vector per sequence (its task's)."""
    return _blockwise(x, A, B, omega[:, None, :], scaling)


def mola_routing(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-token weights (..., E): softmax(W_r x) (float32 at least), the top_k kept and
    renormalised to sum 1, the rest 0 (MoLA's code, Linear_MoE.forward)."""
    logits = F.linear(x, router_weight)
    p = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    top = torch.topk(p, top_k, dim=-1)
    kept = torch.zeros_like(p).scatter(-1, top.indices, top.values)
    return kept / kept.sum(-1, keepdim=True)


def mola_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, router_weight: torch.Tensor,
               top_k: int = 2):
    """MoLA: sum over each token's top-k experts of w_i * s B_i A_i x. Computed densely (every
    expert's rank-r_e product, the unchosen ones weighted 0): for LoRA ranks that costs less than
    gathering tokens per expert."""
    return _blockwise(x, A, B, mola_routing(x, router_weight, top_k), scaling)
