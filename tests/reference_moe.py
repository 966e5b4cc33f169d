"""Float64 reference implementations of the mixture-of-LoRA baselines of issue #23, written from
the papers' equations (and, where /work/shared/PAPERS.md and the paper are silent, from the
authors' code, which each function says). They are test oracles: plain loops over experts, no
fusion, no caching, no dtype tricks, so that a production layer can be checked against them for
outputs and gradients (autograd runs through every function here).

    MoLE     Wu, Huang, Wei, "Mixture of LoRA Experts", ICLR 2024          mole_block, mole_balance_loss
    MOELoRA  Liu et al., "When MOE Meets LLMs" (SIGIR 2024, arXiv 2310.18339)   moelora_linear, moelora_merged_weight
    MoLA     Gao et al., "Higher Layers Need More LoRA Experts" (arXiv 2402.08562)  mola_linear,
             mola_expert_counts, mola_balance_loss

Notation: x is (batch, tokens, d_in); a LoRA expert i is (A_i, B_i) with A_i (r_i x d_in),
B_i (d_out x r_i); s = alpha / r is the LoRA scaling. Equation numbers are not given because
they were not checked against the PDFs; each docstring writes the equation out instead.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

F64 = torch.float64


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """s * B A x, token by token."""
    return s * ((x @ A.T) @ B.T)


# ------------------------------------------------------------------------------------------------
# MoLE (Wu, Huang, Wei, ICLR 2024)

def mole_block(block: Callable[[torch.Tensor, Optional[int]], torch.Tensor], h: torch.Tensor, n_experts: int,
               e: torch.Tensor, tau: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               ln_eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """One gated transformer block of MoLE. Returns (O(h), G), G of shape (batch, N).

    The paper's equations, for a block F_theta with N frozen LoRA experts Delta theta_i:
        E_Omega(x) = Normalization(E_{Delta theta_1}(x) (+) ... (+) E_{Delta theta_N}(x))   ((+): concatenation)
        epsilon    = Flatten(E_Omega(x))^T e,                e: the gate's weights, epsilon in R^N
        G(epsilon)_i = exp(epsilon_i / tau) / sum_j exp(epsilon_j / tau)      (tau: learnable temperature)
        O(x)       = F_theta(x) + sum_i G(epsilon)_i E_{Delta theta_i}(x)
    Only e and tau train; the experts and the block are frozen (PAPERS.md, MoLE).

    What the equations leave open, and the choice made here:
      * E_{Delta theta_i}(x), "the output of expert i" at block level, is read as the change that
        LoRA i alone makes to the block's output: block(h, i) - block(h, None). With it O(x) is the
        base block plus a gated sum of the experts' contributions, and with a single expert and
        G = 1 it is exactly the block with that LoRA (the identity the tests check).
      * "Normalization": a LayerNorm without affine parameters over each token's concatenated
        N*d vector (eps 1e-5).
      * Flatten over (tokens x d) with one weight per position fixes the sequence length; here
        the weights are shared across positions and the token terms are averaged over the
        sequence's real tokens (attention_mask), so epsilon = mean_t(E_Omega(x)_t) e with
        e of shape (N*d, N): one gate vector per sequence, as PAPERS.md states.
      * The official code (vision-language only) reads the block input and leaves tau unused
        (PAPERS.md); this oracle follows the paper, not that code.
    """
    base = block(h, None)
    outs = [block(h, i) - base for i in range(n_experts)]          # E_{Delta theta_i}(x)
    cat = torch.cat(outs, dim=-1)                                     # (b, t, N*d)
    mean = cat.mean(-1, keepdim=True)
    var = cat.var(-1, unbiased=False, keepdim=True)
    normed = (cat - mean) / torch.sqrt(var + ln_eps)
    per_token = normed @ e                                            # (b, t, N)
    if attention_mask is None:
        attention_mask = torch.ones(per_token.shape[:2], dtype=per_token.dtype)
    m = attention_mask.to(per_token.dtype).unsqueeze(-1)
    eps_ = (per_token * m).sum(1) / m.sum(1)                          # (b, N): epsilon per sequence
    G = torch.softmax(eps_ / tau, dim=-1)
    out = base + sum(G[:, i, None, None] * outs[i] for i in range(n_experts))
    return out, G


def mole_balance_loss(gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_balance = -log prod_i q^(i),  q^(i) = (1/M) sum_{j=1}^{M} G^(j)_i  over the M gated blocks
    (and, for a batch, over its sequences). The training loss is L_task + alpha * L_balance with
    alpha = 0.5 (PAPERS.md, MoLE). Minimal (= N log N) when every q^(i) = 1/N."""
    q = torch.stack([g.mean(0) for g in gates]).mean(0)              # (N,)
    return -torch.log(q).sum()


MOLE_BALANCE_WEIGHT = 0.5


# ------------------------------------------------------------------------------------------------
# MOELoRA (Liu et al. 2023/2024)

def moelora_gate(task_ids: torch.Tensor, task_embedding: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """omega = Softmax(W_T E[:, t]): the task's embedding through a bias-free linear map, a softmax
    over the experts; one weight vector per sequence (the task, not the tokens, chooses).
    task_embedding: (n_tasks, d_T); gate_weight: (N, d_T). In the authors' code
    (HydraLoRA repo, peft/tuners/mmoelora.py) each adapted linear has its own embedding table
    (n_tasks + 1 rows) and gate."""
    return torch.softmax(task_embedding[task_ids] @ gate_weight.T, dim=-1)


def moelora_linear(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], As: Sequence[torch.Tensor],
                   Bs: Sequence[torch.Tensor], alpha: float, r: int, task_ids: torch.Tensor,
                   task_embedding: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """h = W0 x + (alpha / r) sum_{i=1}^{N} omega_{t,i} B_i A_i x, with the rank split: each expert
    has rank r / N (A_i: (r/N) x d_in, B_i: d_out x (r/N)), so the N experts together have the
    parameters of one rank-r LoRA. The scaling is alpha / r with the TOTAL rank r (the authors'
    code: scaling = lora_alpha / r). No balance loss (PAPERS.md, MOELoRA)."""
    N = len(As)
    assert all(A.shape[0] * N == r for A in As), "MOELoRA splits the rank: every expert has r / N"
    omega = moelora_gate(task_ids, task_embedding, gate_weight)      # (batch, N)
    y = x @ W.T + (b if b is not None else 0)
    for i in range(N):
        y = y + omega[:, i, None, None] * lora_delta(x, As[i], Bs[i], alpha / r)
    return y


def moelora_merged_weight(W: torch.Tensor, As, Bs, alpha: float, r: int, task: int,
                          task_embedding: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """W_t = W0 + (alpha / r) sum_i omega_{t,i} B_i A_i: MOELoRA merges per task (the code's merge(task_id))."""
    omega = moelora_gate(torch.tensor([task]), task_embedding, gate_weight)[0]
    return W + sum(omega[i] * (alpha / r) * (Bs[i] @ As[i]) for i in range(len(As)))


# ------------------------------------------------------------------------------------------------
# MoLA (Gao et al. 2024)

def mola_expert_counts(n_layers: int, groups: Sequence[int]) -> List[int]:
    """The number of experts of each transformer layer: the layers split into len(groups) equal,
    contiguous groups from the bottom, group g getting groups[g] experts ("more experts in higher
    layers": the paper's 2-4-6-8 is groups = [2, 4, 6, 8], on a 32-layer Llama 8 layers each, as
    the code's default number_experts "2,...,2,4,...,4,6,...,6,8,...,8"). Layer l is in group
    floor(l * G / L), which also covers L not divisible by G."""
    G = len(groups)
    return [int(groups[(l * G) // n_layers]) for l in range(n_layers)]


def mola_router_probs(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """p = softmax(W_r x) per token, over the layer's E experts (router: bias-free Linear d_in -> E)."""
    return torch.softmax(x @ router_weight.T, dim=-1)


def mola_linear(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], As: Sequence[torch.Tensor],
                Bs: Sequence[torch.Tensor], s: float, router_weight: torch.Tensor, top_k: int = 2) -> torch.Tensor:
    """o = W0 x + sum_{i in TopK(p)} w_i * s B_i A_i x,  p = softmax(W_r x),
    w_i = p_i / sum_{j in TopK(p)} p_j   (the top-k probabilities renormalised to sum 1).
    Per token. The renormalisation follows the authors' code (src/mola_lora_hacked.py,
    Linear_MoE.forward: routing_weights /= routing_weights.sum(-1)); each expert is a full rank-r
    LoRA with s = alpha / r. Written as a loop over tokens and their chosen experts."""
    p = mola_router_probs(x, router_weight)
    y = x @ W.T + (b if b is not None else 0)
    batch, tokens, _ = x.shape
    rows = []
    for bi in range(batch):
        for t in range(tokens):
            top = torch.topk(p[bi, t], top_k)
            w = top.values / top.values.sum()
            term = sum(w[k] * lora_delta(x[bi, t], As[int(i)], Bs[int(i)], s) for k, i in enumerate(top.indices))
            rows.append(term)
    delta = torch.stack(rows).reshape(batch, tokens, -1)
    return y + delta


def mola_balance_loss(router_logits: Sequence[torch.Tensor], top_k: int = 2) -> torch.Tensor:
    """The optional balance loss of the authors' code (src/mola_modeling_llama_hacked.py,
    load_balancing_loss_func; off by default, obalance=False; coefficient 0.001): per layer l with
    E_l experts, over its tokens, f_i = the share of the top-k choices that went to expert i,
    P_i = the mean router probability of expert i, L_l = E_l * sum_i f_i P_i (Switch
    Transformer's form); the loss is sum_l L_l. router_logits[l]: (tokens, E_l), the layer's
    routers' logits (the code stacks a block's linears along the token axis)."""
    total = torch.zeros((), dtype=router_logits[0].dtype)
    for logits in router_logits:
        E = logits.shape[-1]
        p = torch.softmax(logits, dim=-1)
        chosen = torch.topk(p, top_k, dim=-1).indices.reshape(-1)
        counts = torch.bincount(chosen, minlength=E).to(p.dtype)
        f = counts / counts.sum()
        total = total + E * (f * p.mean(0)).sum()
    return total


MOLA_BALANCE_WEIGHT = 0.001
