"""CoLA: m down-projections A_i, n up-projections B_j and a pairing matrix P (see pairing.py).

    y = W_res x + s * sum_{i,j} P[j, i] * B_j A_i x,   s = alpha / r

The fused path sums on the weight side (r x d sized tensors) and then does two skinny matmuls on
the activations, whatever m and n:
  * fully (P = all ones) and random in eval (P = all 1/n) are rank one in P:
    (sum_j B_j * w)(sum_i A_i x), a rank-r update;
  * m <= n (heuristic with n >= m, random in training): group the B's by their A,
    B~_i = sum_j P[j, i] B_j, y = [B~_1 .. B~_m][A_1; ..; A_m] x   (rank m r);
  * m > n: group the A's by their B, A~_j = sum_i P[j, i] A_i, y = [B_1 .. B_n][A~_1; ..; A~_n] x.
The two factors then go through fused_ops (one hand-written backward for base + update; for a
Llama MLP's down_proj the whole gated tail, see gated_mlp.py) wherever it applies.
`impl="loop"` computes every pair on the activations, B_j (A_i x), straight from the formula: the
test oracle's twin and the benchmark's stand-in for the authors' implementation.

Random strategy: in training each A_i is paired with one B drawn uniformly, the same draw for the
whole optimizer step; the draw is set from outside by `resample(model, step, seed)` (never inside
forward, which gradient checkpointing replays). In eval mode the layer uses the expectation over
draws, every A_i with the mean of the B's, so evaluation and merging are deterministic.

Storage: lora_A is (m, r, d_in) and lora_B is (d_out, n, r), so [A_1; ..; A_m] and
[B_1 .. B_n] are free reshapes; A_i = lora_A[i], B_j = lora_B[:, j].
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_ops
from . import init as inits
from . import pairing
from .layer import AdapterLinear, new_param


class CoLALinear(AdapterLinear):
    takes_gated_input = True   # forward(gate, up=up): see gated_mlp.py
    group_shared_inputs = True  # shared_input_forward applies (False: the benchmark's before/after)
    hand_back = None            # (x, output) set by shared_qkv for this module's next call on x
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float,
                 num_A: int, num_B: int, strategy: str, impl: str = "fused", pairing_rule: str = "paper"):
        super().__init__(base_layer, r, alpha, dropout)
        self.num_A, self.num_B, self.strategy, self.impl = num_A, num_B, strategy, impl
        self.pairing_rule = pairing_rule   # heuristic only: the paper's or the authors' code's (pairing.py)
        fac = self._factory()
        self.lora_A = new_param((num_A, r, self.in_features), fac)
        self.lora_B = new_param((self.out_features, num_B, r), fac)
        inits.kaiming_(self.lora_A.data)
        self.register_buffer("pairing", torch.zeros(num_B, num_A, **fac), persistent=False)
        self.register_buffer("mixing", torch.zeros(num_B * r, num_A * r, **fac), persistent=False)
        self.set_pairing(pairing.initial(strategy, num_A, num_B, pairing_rule))

    @classmethod
    def from_config(cls, base_layer: nn.Linear, cfg) -> "CoLALinear":
        return cls(base_layer, cfg.r, cfg.alpha, cfg.dropout, cfg.num_A, cfg.num_B, cfg.strategy, cfg.impl,
                   cfg.pairing)

    # -- pairing -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_pairing(self, P: torch.Tensor) -> None:
        P = P.detach().to("cpu", torch.float32)
        self._pairs: List[Tuple[int, int, float]] = [
            (i, j, float(P[j, i])) for i in range(self.num_A) for j in range(self.num_B) if P[j, i] != 0
        ]
        if self.mixing.shape != (self.num_B * self.r, self.num_A * self.r):   # a new rank (reinit)
            self.mixing = self.mixing.new_zeros(self.num_B * self.r, self.num_A * self.r)
        mixing = pairing.mixing_matrix(P, self.r)
        for buffer, value in ((self.pairing, P), (self.mixing, mixing)):
            if buffer.is_cuda:
                # the random strategy redraws every step in every layer: a copy from pageable memory
                # would wait for the GPU each time; from pinned memory it is queued like a kernel
                buffer.copy_(value.pin_memory(), non_blocking=True)
            else:
                buffer.copy_(value)

    def _eval_rule(self, train_rule: bool) -> bool:
        return self.strategy == "random" and not train_rule

    def current_pairs(self) -> List[Tuple[int, int, float]]:
        if self._eval_rule(self.training):
            return [(i, j, 1.0 / self.num_B) for i in range(self.num_A) for j in range(self.num_B)]
        return self._pairs

    # -- forward -----------------------------------------------------------------------------
    def factors(self, dtype: Optional[torch.dtype] = None, train_rule: bool = False):
        A, B = self.lora_A, self.lora_B
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        m, n, r, s = self.num_A, self.num_B, self.r, self.scaling
        if self.strategy == "fully" or self._eval_rule(train_rule):
            w = s if self.strategy == "fully" else s / n
            return A.sum(0), B.sum(1) * w
        K = self.mixing.to(A.dtype)   # P (x) I_r: one matmul groups the factors (few ops a step)
        if m <= n:
            B_grouped = B.reshape(self.out_features, n * r) @ K
            return A.reshape(m * r, self.in_features), B_grouped * s
        A_grouped = K @ A.reshape(m * r, self.in_features)
        return A_grouped, B.reshape(self.out_features, n * r) * s

    def forward(self, x: torch.Tensor, *args, up: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """self(x), or self(gate, up=up) for silu(gate) * up (a gated MLP's down_proj, gated_mlp.py).

        Both go through the module call, so hooks that manage parameters (DeepSpeed ZeRO-3's
        gather) run before any parameter is read."""
        handed = self.hand_back
        if handed is not None and handed[0] is x:   # computed with its siblings (shared_qkv.py)
            self.hand_back = None
            return handed[1]
        if up is not None:
            return self._forward_gated(x, up)
        if self.merged or self.impl == "loop" or args or kwargs:
            return super().forward(x, *args, **kwargs)
        A, B = self._compute_factors(x)
        x2 = x.reshape(-1, x.shape[-1])
        if self.custom_backward and fused_ops.can_fuse(self.base_layer, x2, A, B):
            result = fused_ops.low_rank_linear(self.base_layer, x2, A, B, self._dropout_p())
            return result.view(*x.shape[:-1], result.shape[-1])
        if self.fp32_path:
            return super().forward(x)
        return self._fused_forward(x, lambda rows: (F.linear(self.dropout(self._cast_input(rows, A.dtype)), A), B))

    @classmethod
    def shared_input_forward(cls, layers: List["CoLALinear"], x: torch.Tensor) -> Optional[List[torch.Tensor]]:
        """[layer(x) for layer in layers] through one fused_ops.SharedInputLowRank, or None where
        that does not apply: in eager mode, fused layers of this class without dropout (each
        layer's own mask would differ), hooks, or partitioned (ZeRO-3) parameters, whose
        gathering needs each layer's own module call."""
        if not cls.group_shared_inputs or torch.compiler.is_compiling():
            return None
        if not all(type(layer) is cls and layer._plain_fused_call() for layer in layers):
            return None
        x2 = x.reshape(-1, x.shape[-1])
        factors = [layer._compute_factors(x2) for layer in layers]
        if not all(A.dtype == x2.dtype and fused_ops.can_fuse(layer.base_layer, x2, A, B)
                   for layer, (A, B) in zip(layers, factors)):
            return None
        outs = fused_ops.shared_input_low_rank([layer.base_layer for layer in layers], x2, factors)
        return [out.view(*x.shape[:-1], out.shape[-1]) for out in outs]

    def _plain_fused_call(self) -> bool:
        return (self.custom_backward and not self.merged and self.impl != "loop" and not self.fp32_path
                and self._dropout_p() == 0.0 and not (self._forward_hooks or self._forward_pre_hooks)
                and not any(hasattr(p, "ds_id") for p in self.parameters()))

    def _compute_factors(self, x: torch.Tensor):
        """The effective (A, B) in the dtype the update is computed in: the activations', or fp32
        on the fp32 adapter path (fused_ops computes the rank-r path in fp32 then)."""
        factors = self.factors(train_rule=self.training)
        return factors if self.fp32_path else self._to_compute(x, *factors)

    def _forward_gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Fused, the product silu(gate) * up is never stored: the backward recomputes it."""
        if self.custom_backward and not self.merged and self.impl != "loop":
            A, B = self._compute_factors(gate)
            g2, u2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
            if g2.dtype == u2.dtype and fused_ops.can_fuse(self.base_layer, g2, A, B):
                out = fused_ops.gated_low_rank_mlp(self.base_layer, g2, u2, A, B, self._dropout_p())
                return out.view(*gate.shape[:-1], out.shape[-1])
        return self.forward(F.silu(gate) * up)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self._cast_input(x, self.lora_A.dtype))
        if self.impl == "loop":
            out = None
            for i, j, w in self.current_pairs():
                term = F.linear(F.linear(x, self.lora_A[i]), self.lora_B[:, j]) * (self.scaling * w)
                out = term if out is None else out + term
            return out
        A, B = self.factors(train_rule=self.training)
        return F.linear(F.linear(x, A), B)

    # -- init ----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_pissa(self) -> None:
        """Split PiSSA: every A_i and B_j a scaled copy of the principal factors, scaled so the
        combiner's initial update is exactly the principal part; the base keeps the rest."""
        total = pairing.total_weight(self.strategy, self.num_A, self.num_B)
        a, b = inits.split(*self.principal(), total)
        fac = self._factory()
        a, b = a.to(**fac), b.to(**fac)
        self.lora_A.data.copy_(a.expand_as(self.lora_A))
        self.lora_B.data.copy_(b[:, None, :].expand_as(self.lora_B))
        self.set_initial(a, b, self.scaling * total)

    @torch.no_grad()
    def reinit(self, rank: Optional[int] = None) -> None:
        """Fresh Kaiming A's, zero B's (Chain of LoRA's next link); new tensors only if the rank changes."""
        if rank is not None and rank != self.r:
            fac = self._factory()
            self.r = rank
            self.lora_A = new_param((self.num_A, rank, self.in_features), fac)
            self.lora_B = new_param((self.out_features, self.num_B, rank), fac)
            self.set_pairing(self.pairing)   # the mixing matrix has the rank's size
        inits.kaiming_(self.lora_A.data)
        self.lora_B.data.zero_()

    def extra_repr(self) -> str:
        pairing_rule = f", pairing={self.pairing_rule}" if self.strategy == "heuristic" else ""
        return (f"{super().extra_repr()}, num_A={self.num_A}, num_B={self.num_B}, "
                f"strategy={self.strategy}{pairing_rule}, impl={self.impl}")


def resample(model: nn.Module, step: int, seed: int) -> None:
    """Set every random-strategy layer's pairing for optimizer step `step`.

    One CPU generator seeded by (seed, step) walks the layers in module order, so the draw is a
    pure function of (seed, step): identical on every rank and after a resume.
    """
    gen = None
    for module in model.modules():
        if isinstance(module, CoLALinear) and module.strategy == "random":
            gen = gen or pairing.generator(seed, step)
            module.set_pairing(pairing.draw(module.num_A, module.num_B, gen))
