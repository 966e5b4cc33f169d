"""CoLA strategies as pairing matrices P in R^{n x m}: P[j, i] is the weight of pair (A_i, B_j).

The combiner is the only thing that differs between strategies, so each strategy is nothing but
a way to produce P (and, for `random`, a fresh P per optimizer step).
"""
from __future__ import annotations

import hashlib

import torch


def fully(m: int, n: int) -> torch.Tensor:
    return torch.ones(n, m)


RULES = ("paper", "code")


def heuristic(m: int, n: int, rule: str = "paper") -> torch.Tensor:
    """Fixed pairing of the heuristic strategy; both definitions pair every B with one A (m <= n),
    or every A with one B (m > n), so the adapter has max(m, n) pairs either way.

    paper: the CoLA paper's text, for m <= n
        dW = s [B_1 A_1 + ... + B_{m-1} A_{m-1} + (B_m + ... + B_n) A_m],
    i.e. A_i takes B_i and the last A takes all the remaining B's; (2, 3) gives A1:{B1}, A2:{B2, B3}.
    For m > n (CoLA-T, more A's than B's) the same rule with the roles swapped:
        dW = s [B_1 A_1 + ... + B_{n-1} A_{n-1} + B_n (A_n + ... + A_m)].
    code: the authors' released code: with k = n // m, A_1 takes B_1..B_k, A_2 the next k, ...;
    the leftover B's go to A_1, A_2, ... in turn; (2, 3) gives A1:{B1, B3}, A2:{B2}. When m > n
    the roles swap (each B takes m // n consecutive A's, leftovers round-robin from B_1).
    """
    if rule not in RULES:
        raise ValueError(f"method.pairing={rule!r} is not one of {', '.join(RULES)}")
    P = torch.zeros(n, m)
    small, large = (m, n) if n >= m else (n, m)
    k = large // small
    for idx in range(large):
        if rule == "paper":
            owner = min(idx, small - 1)
        else:
            owner = idx // k if idx < small * k else (idx - small * k) % small
        if n >= m:
            P[idx, owner] = 1.0  # B_idx belongs to A_owner
        else:
            P[owner, idx] = 1.0  # A_idx belongs to B_owner
    return P


def draw(m: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """One draw of the random strategy: each A_i paired with one B chosen uniformly."""
    choice = torch.randint(0, n, (m,), generator=generator)
    P = torch.zeros(n, m)
    P[choice, torch.arange(m)] = 1.0
    return P


def expected_random(m: int, n: int) -> torch.Tensor:
    """Expectation of `draw` over the draws: every A_i with the mean of the B's."""
    return torch.full((n, m), 1.0 / n)


def initial(strategy: str, m: int, n: int, rule: str = "paper") -> torch.Tensor:
    if strategy == "fully":
        return fully(m, n)
    if strategy == "heuristic":
        return heuristic(m, n, rule)
    return draw(m, n, generator(seed=0, step=0))


def mixing_matrix(P: torch.Tensor, r: int) -> torch.Tensor:
    """P (x) I_r, (n r, m r): [B_1 .. B_n] times it is [B~_1 .. B~_m] with B~_i = sum_j P[j, i] B_j,
    and it times [A_1; ..; A_m] is [A~_1; ..; A~_n] with A~_j = sum_i P[j, i] A_i (r x d blocks)."""
    return torch.kron(P, torch.eye(r, dtype=P.dtype))


def total_weight(strategy: str, m: int, n: int) -> float:
    """Sum of P's entries, the same for every random draw and its expectation; a split PiSSA init
    divides the principal part by it so the adapter starts at exactly that part."""
    if strategy == "fully":
        return float(m * n)
    if strategy == "heuristic":
        return float(max(m, n))
    return float(m)


def generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator determined by (seed, step) alone, so every rank draws the same pairing and
    a resumed run redraws the pairing of the step it resumes at."""
    digest = hashlib.sha256(f"cola-random:{int(seed)}:{int(step)}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen
