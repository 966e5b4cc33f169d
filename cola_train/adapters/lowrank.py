"""`LowRankLinear`: every one of our adapted linears, a frozen base nn.Linear plus a low-rank update
whose pairs a Combiner (combiners.py) mixes. One class, one forward; init, merge, commit, export,
save and load live here once.

Storage: lora_A is (m, r, d_in) ((r, d_in) when the combiner shares one A, HydraLoRA) and lora_B
is (d_out, n, r), so [A_1; ..; A_m] and [B_1 .. B_n] are free reshapes; A_i = lora_A[i],
B_j = lora_B[:, j]. A routed combiner's router lives on the layer under its saved name.

The forward, in order (the first that applies):
  * in a group of siblings reading one input (q/k/v, shared_qkv.SharedInputGroup; gate/up,
    gated_mlp): the group's one fused call, with one dropout mask for the group where
    kernels.dropout_mask is shared (method.dropout_mask, the default);
  * `impl=loop`, merged, extra arguments, or a routed layer on the fp32 path: the reference,
    base(x) + delta(x), with delta the per-pair formula (loop) or the plain product;
  * the fused kernels (fused_ops; `kernels.custom_backward`): `low_rank_linear` /
    `gated_low_rank_mlp` with the static combiner's two effective factors, or
    `routed_low_rank_linear` with the router, all A's and all B's;
  * otherwise plain autograd ops on 2-D rows, the update added into the base output in place.
`forward(gate, up=up)` computes a gated MLP's down_proj on silu(gate) * up (gated_mlp.py).

`A0`, `B0`, `init_coef` record how the live base weight differs from the original one:
W_original - W_live = init_coef * B0 @ A0 (zero when absent). A PiSSA-style init sets them; a
committed merge into the weights (Chain of LoRA, method.merge=weights) appends to them. They let
`load_adapter` rebuild the residual base from a fresh model bit for bit, and `export_peft` express
the update relative to the original weights. An exact commit (`commit_factors`, the default)
leaves the base weight alone: the update joins a frozen path beside it (committed.py).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import committed, fused_ops
from . import init as inits
from .combiners import Combiner
from .options import DEFAULT as DEFAULT_KERNELS, Kernels
from .spec import AdapterError

from ..parallel import gathered  # the weight whole under DeepSpeed ZeRO-3, no-op otherwise


COMMITTED_A, COMMITTED_B = "committed_A", "committed_B"  # saved names of the committed path
OPTIONAL_STATE = ("A0", "B0", COMMITTED_A, COMMITTED_B)    # tensors a saved layer may or may not have
IMPLS = ("fused", "loop")


def new_param(shape, fac: dict, requires_grad: bool = True) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, **fac), requires_grad=requires_grad)


class LowRankLinear(nn.Module):
    takes_gated_input = True   # forward(gate, up=up): see gated_mlp.py
    adds_committed = True      # committed Chain-of-LoRA links are a frozen term of this forward
    group = None               # a shared_qkv.SharedInputGroup (set per instance, not a child module)
    # how a PiSSA-style init finds W's top-r part and forms the residual (init.py); attach_adapter
    # sets it per layer from method.svd / method.svd_niter and the run's seed
    init_svd = inits.SVDChoice()

    def __init__(self, base_layer: nn.Linear, combiner: Combiner, r: int, alpha: float, dropout: float,
                 impl: str = "fused", kernels: Kernels = DEFAULT_KERNELS):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.combiner = combiner
        self.r = r
        self.alpha = float(alpha)
        self.impl = impl
        self.kernels = kernels
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.init_coef = 1.0
        self.register_buffer("A0", None)
        self.register_buffer("B0", None)
        fac = self._factory()
        self.lora_A = new_param(combiner.a_shape(r, self.in_features), fac)
        self.lora_B = new_param(combiner.b_shape(r, self.out_features), fac)
        combiner.build(self, fac)
        self._reset()

    @classmethod
    def from_config(cls, base_layer: nn.Linear, cfg, combiner: Combiner,
                    kernels: Kernels = DEFAULT_KERNELS) -> "LowRankLinear":
        r, alpha = combiner.layer_rank(cfg.r, cfg.alpha)   # MOELoRA: r / E per expert, the same alpha / r
        return cls(base_layer, combiner, r, alpha, cfg.dropout, cfg.impl, kernels)

    # -- what HF / user code may reach for on a target module ---------------------------------
    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def mergeable(self) -> bool:
        return self.combiner.merge_refusal() is None

    @property
    def num_A(self) -> int:
        return self.combiner.num_A

    @property
    def num_B(self) -> int:
        return self.combiner.num_B

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def _factory(self) -> dict:
        w = self.base_layer.weight
        return {"dtype": w.dtype, "device": w.device}

    def _cast_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # under autocast F.linear picks the dtype; otherwise match the adapter (as PEFT does)
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            return x.to(dtype)
        return x

    @staticmethod
    def _to_compute(x: torch.Tensor, *weights: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """fp32 master weights under mixed precision (models.upcast_trainable) run in the
        activations' half dtype: a differentiable cast of the small factors, so the fused path and
        its hand-written backward still apply and the fp32 weights get the gradient."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if dtype not in (torch.bfloat16, torch.float16):
            return weights
        return tuple(w.to(dtype) if w.dtype == torch.float32 else w for w in weights)

    def _dropout_p(self) -> float:
        return float(self.dropout.p) if self.training and isinstance(self.dropout, nn.Dropout) else 0.0

    # -- the combiner's view ---------------------------------------------------------------------
    def factors(self, dtype: Optional[torch.dtype] = None, train_rule: bool = False):
        """(A_eff, B_eff) with the update == B_eff @ A_eff (scaling folded into B_eff): static
        combiners only (eval rule unless train_rule: CoLA random's expectation)."""
        refusal = self.combiner.merge_refusal() if self.combiner.routed else None
        if refusal:
            raise NotImplementedError(f"{type(self.combiner).__name__} {refusal}")
        A, B = self.lora_A, self.lora_B
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return self.combiner.factors(self, A, B, train_rule)

    def current_pairs(self) -> List[Tuple[int, int, float]]:
        return self.combiner.pairs(self, self.training)

    def set_pairing(self, P: torch.Tensor) -> None:
        self.combiner.set_pairing(self, P)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token router weights (routed combiners): a softmax in at least float32, so the rows
        sum to one however the activations are stored."""
        route = getattr(self.combiner, "route", None)   # a gate that does not read x (MOELoRA's task gate)
        if route is not None:
            return route(self, x)
        router = self.combiner.router(self)
        x = self._cast_input(x, router.weight.dtype)
        return self.combiner.probs(router(x))

    def _routed_factors(self):
        """(router weight, [A_1; ..; A_G], [B_1 .. B_E] * s) as RoutedLowRankLinear takes them."""
        A = self.lora_A if self.lora_A.dim() == 2 else self.lora_A.reshape(-1, self.in_features)  # shared A: as is
        return self.combiner.router(self).weight, A, self.lora_B.reshape(self.out_features, -1) * self.scaling

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, up: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """self(x), or self(gate, up=up) for silu(gate) * up (a gated MLP's down_proj, gated_mlp.py).

        Both go through the module call, so hooks that manage parameters (DeepSpeed ZeRO-3's
        gather) run before any parameter is read."""
        group = self.group   # siblings reading one input (shared_qkv.SharedInputGroup)
        if group is not None and up is None and not args and not kwargs:
            out = group.output(self, x)
            if out is not None:
                return out
        reference = self.merged or self.impl == "loop" or (self.kernels.fp32_path and self.combiner.routed)
        if up is not None:
            out = None if reference else self._kernel(x, up)
            return self.forward(F.silu(x) * up) if out is None else out
        if reference or args or kwargs:
            return self._reference(x, *args, **kwargs)
        out = self._kernel(x)
        if out is not None:
            return out
        if self.kernels.fp32_path:
            return self._reference(x)
        return self._rows(x)

    def _kernel(self, x: torch.Tensor, up: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The fused autograd functions of fused_ops, or None where they do not apply."""
        if not self.kernels.custom_backward:
            return None
        if self.combiner.routed:
            return self._routed_kernel(x, up)
        A, B = self._compute_factors(x)
        frozen = self._frozen(x)
        if up is not None:
            g2, u2 = x.reshape(-1, x.shape[-1]), up.reshape(-1, up.shape[-1])
            if g2.dtype == u2.dtype and fused_ops.can_fuse(self.base_layer, g2, A, B):
                out = fused_ops.gated_low_rank_mlp(self.base_layer, g2, u2, A, B, self._dropout_p(), frozen)
                return out.view(*x.shape[:-1], out.shape[-1])
            return None
        x2 = x.reshape(-1, x.shape[-1])
        if fused_ops.can_fuse(self.base_layer, x2, A, B):
            result = fused_ops.low_rank_linear(self.base_layer, x2, A, B, self._dropout_p(), frozen)
            return result.view(*x.shape[:-1], result.shape[-1])
        return None

    def _frozen(self, x: torch.Tensor):
        """The committed links (A_c, B_c) in x's dtype for the fused kernels, or None."""
        found = committed.factors(self)
        return None if found is None else (found[0].to(x.dtype), found[1].to(x.dtype))

    def _base(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base(x) plus the committed links (plain ops; the kernels add them themselves)."""
        out = self.base_layer(x, *args, **kwargs)
        found = committed.factors(self)
        return out if found is None else committed.add_to(out, x, *found)

    def _routed_kernel(self, x: torch.Tensor, up: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """fused_ops.RoutedLowRankLinear (with up: GatedRoutedLowRankMLP), or None."""
        if not self.combiner.softmax_routing:   # the fused kernel computes a plain softmax (MoLA: top-k)
            return None
        x2 = x.reshape(-1, x.shape[-1])
        u2 = None if up is None else up.reshape(-1, up.shape[-1])
        R, A, B = self._to_compute(x2, *self._routed_factors())
        if not (committed.factors(self) is None and R.dtype == A.dtype == x2.dtype and (u2 is None or u2.dtype == x2.dtype)
                and fused_ops.can_fuse(self.base_layer, x2, A, B)):
            return None
        out, probs = fused_ops.routed_low_rank_linear(self.base_layer, x2, R, A, B, self.r,
                                                      self._dropout_p(), up=u2)
        self.combiner.observe(self, probs)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _compute_factors(self, x: torch.Tensor):
        """The effective (A, B) in the dtype the update is computed in: the activations', or fp32
        on the fp32 adapter path (fused_ops computes the rank-r path in fp32 then)."""
        factors = self.factors(train_rule=self.training)
        return factors if self.kernels.fp32_path else self._to_compute(x, *factors)

    def _mixed(self, x: torch.Tensor):
        """(z, B) on rows x with the update == z B^T, in plain autograd ops: static, z = drop(x) A_eff^T;
        routed, z = the router-weighted [A_1 x; ..] per head."""
        if not self.combiner.routed:
            A, B = self._compute_factors(x)
            return F.linear(self.dropout(self._cast_input(x, A.dtype)), A), B
        probs, xd = self._probs_and_input(x)
        _, A, B = self._routed_factors()
        h = F.linear(xd, A).unflatten(-1, (-1, self.r))                   # (..., G, r), G = 1 or E
        return (probs.to(h.dtype).unsqueeze(-1) * h).flatten(-2), B       # (..., E r)

    def _probs_and_input(self, x: torch.Tensor):
        probs = self.route(x)
        self.combiner.observe(self, probs)
        return probs, self.dropout(self._cast_input(x, self.lora_A.dtype))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + z B^T for (z, B) = _mixed(x) on 2-D rows.

        The update is added into the base output in place when no cast is needed: one read and
        one write of the output instead of a delta tensor plus an add. Autograd-safe: the base
        linear's backward needs its input and weight, never its output; 2-D, so no view is rebased.
        """
        x2 = x.reshape(-1, x.shape[-1])
        result = self._base(x2)
        z, B = self._mixed(x2)
        if z.dtype == B.dtype == result.dtype:
            result.addmm_(z, B.t())
        else:  # autocast or fp32 adapters
            result = result + F.linear(z, B).to(result.dtype)
        return result.view(*x.shape[:-1], result.shape[-1])

    def _reference(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self._base(x, *args, **kwargs)
        if self.merged:
            return result
        if self.kernels.fp32_path:  # fp32_path.py: the low-rank path in fp32 next to a half-precision base
            with torch.autocast(x.device.type, enabled=False):
                return result + self.delta(x.float()).to(result.dtype)
        return result + self.delta(x).to(result.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update alone; impl=loop computes every pair on the activations straight from the
        method's formula (the test oracle's twin, the benchmark's stand-in for the authors' code)."""
        s = self.scaling
        if self.combiner.routed:
            if self.impl != "loop":
                return F.linear(*self._mixed(x))
            probs, xd = self._probs_and_input(x)
            shared = self.combiner.shared_A
            hs = [F.linear(xd, self.lora_A)] if shared else None
            out = 0
            for e in range(self.combiner.heads):
                h = hs[0] if shared else F.linear(xd, self.lora_A[e])
                out = out + probs.to(h.dtype)[..., e:e + 1] * F.linear(h, self.lora_B[:, e]) * s
            return out
        x = self.dropout(self._cast_input(x, self.lora_A.dtype))
        if self.impl == "loop":
            out = None
            for i, j, w in self.current_pairs():
                term = F.linear(F.linear(x, self.lora_A[i]), self.lora_B[:, j]) * (s * w)
                out = term if out is None else out + term
            return out
        A, B = self.factors(train_rule=self.training)
        return F.linear(F.linear(x, A), B)

    # -- siblings sharing one input (shared_qkv.py, gated_mlp.py) --------------------------------
    @property
    def can_share_input(self) -> bool:
        return not self.combiner.routed

    @classmethod
    def shared_input_forward(cls, layers: List["LowRankLinear"], x: torch.Tensor) -> Optional[List[torch.Tensor]]:
        """[layer(x) for layer in layers] through one fused_ops.SharedInputLowRank, or None where
        that does not apply: in eager mode, static fused layers, without dropout or with one mask
        for the group (kernels.dropout_mask=shared, one p), no hooks, no partitioned (ZeRO-3)
        parameters, whose gathering needs each layer's own module call."""
        if torch.compiler.is_compiling():
            return None
        if not all(type(layer) is cls and layer._plain_fused_call() for layer in layers):
            return None
        p = layers[0]._dropout_p()
        if any(layer._dropout_p() != p for layer in layers):
            return None
        x2 = x.reshape(-1, x.shape[-1])
        factors = [layer._compute_factors(x2) for layer in layers]
        if p == 0.0:   # the committed links join the grouped GEMMs (exact: they read the same x)
            factors, frozen = [layer._with_committed(*f) for layer, f in zip(layers, factors)], None
        else:          # they read the undropped x: each its own term
            frozen = [layer._frozen(x2) for layer in layers]
        if not all(A.dtype == x2.dtype and fused_ops.can_fuse(layer.base_layer, x2, A, B)
                   for layer, (A, B) in zip(layers, factors)):
            return None
        outs = fused_ops.shared_input_low_rank([layer.base_layer for layer in layers], x2, factors, p, frozen)
        return [out.view(*x.shape[:-1], out.shape[-1]) for out in outs]

    def _with_committed(self, A: torch.Tensor, B: torch.Tensor):
        """(A, B) with the committed links appended: [A; A_c], [B, B_c]. Exact without dropout
        (then every row reads the same x): the frozen rows only add their product and get no gradient."""
        found = committed.factors(self)
        if found is None:
            return A, B
        return torch.cat([A, found[0].to(A.dtype)]), torch.cat([B, found[1].to(B.dtype)], 1)

    def _plain_fused_call(self) -> bool:
        k = self.kernels
        return (k.group_shared_inputs and k.custom_backward and not k.fp32_path and self.can_share_input
                and not self.merged and self.impl != "loop"
                and (k.dropout_mask == "shared" or self._dropout_p() == 0.0)
                and not (self._forward_hooks or self._forward_pre_hooks)
                and not any(hasattr(p, "ds_id") for p in self.parameters()))

    # -- init ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _reset(self) -> None:
        """Kaiming A's, zero B's (LoRA's init), then the combiner's own parameters."""
        inits.kaiming_(self.lora_A.data)
        self.lora_B.data.zero_()
        self.combiner.reset(self)

    def principal(self) -> Tuple[torch.Tensor, torch.Tensor]:
        with gathered(self.base_layer.weight, modify=True):
            return inits.principal_factors(self.base_layer.weight, self.r, self.scaling, self.init_svd)

    @torch.no_grad()
    def init_pissa(self) -> None:
        """(Split) PiSSA: every A_i and B_j a copy of the principal factors scaled by
        total_weight^-1/2, so the combiner's initial update is exactly the principal part (routed:
        the router's weights sum to one, every head gets the whole part); the base keeps the rest."""
        total = self.combiner.total_weight()
        a, b = inits.split(*self.principal(), total)
        fac = self._factory()
        a, b = a.to(**fac), b.to(**fac)
        self.lora_A.data.copy_(a.expand_as(self.lora_A))
        self.lora_B.data.copy_(b[:, None, :].expand_as(self.lora_B))
        self.set_initial(a, b, self.scaling * total)

    @torch.no_grad()
    def init_pissa_split(self, noise: float = 0.1) -> None:
        """method.init=pissa_split (OUR extension, split_init.py): heuristic groups get distinct
        singular blocks of W's top K.r; random keeps split PiSSA's B's and gives the A's a seeded
        zero-sum perturbation (relative size `noise`); the residual is formed from the factors
        used, so the step-0 output is the base model's either way."""
        from . import split_init

        strategy = getattr(self.combiner, "strategy", None)
        if strategy == "random":   # every B the same b: b (sum_i A_i) whatever the draw
            a, b = inits.split(*self.principal(), self.combiner.total_weight())
            fac = self._factory()
            a, b = a.to(**fac), b.to(**fac)
            A = split_init.zero_sum_perturbation(a.expand_as(self.lora_A).clone(), noise, self.init_svd.seed)
            self.lora_A.data.copy_(A)
            self.lora_B.data.copy_(b[:, None, :].expand_as(self.lora_B))
            self.set_initial(self.lora_A.data.sum(0), b, self.scaling)
            return
        if strategy != "heuristic":
            raise AdapterError("method.init=pissa_split applies to cola_heuristic and cola_random: fully reads only "
                               "sum(B) sum(A), so no init breaks its copies' symmetry (docs/PROTOCOL.md)")
        with gathered(self.base_layer.weight, modify=True):
            A, B = split_init.split_directions(self.base_layer.weight, self.r, self.scaling, self.pairing, self.init_svd)
        fac = self._factory()
        self.lora_A.data.copy_(A.to(**fac))
        self.lora_B.data.copy_(B.to(**fac))
        A0, B0 = split_init.effective(self.lora_A.data.float(), self.lora_B.data.float(), self.pairing.float(), self.scaling)
        self.set_initial(A0, B0, 1.0)

    @torch.no_grad()
    def set_initial(self, A0: torch.Tensor, B0: torch.Tensor, coef: float) -> None:
        """Record the initial update and move it out of the (original) base weight."""
        fac = self._factory()
        self.A0 = A0.detach().to(**fac).clone()
        self.B0 = B0.detach().to(**fac).clone()
        self.init_coef = float(coef)
        weight = self.base_layer.weight
        with gathered(weight, modify=True):
            weight.data.copy_(inits.residual(weight.data, self.A0, self.B0, self.init_coef,
                                             self.init_svd.residual_dtype))

    @torch.no_grad()
    def reinit(self, rank: Optional[int] = None) -> None:
        """Fresh Kaiming A's, zero B's (Chain of LoRA's next link); new tensors only if the rank changes."""
        if rank is not None and rank != self.r:
            fac = self._factory()
            self.r = rank
            self.lora_A = new_param(self.combiner.a_shape(rank, self.in_features), fac)
            self.lora_B = new_param(self.combiner.b_shape(rank, self.out_features), fac)
            self.combiner.resized(self)
        self._reset()

    # -- merge / unmerge / commit ------------------------------------------------------------------
    @torch.no_grad()
    def _delta_weight(self) -> torch.Tensor:
        A, B = self.factors(dtype=torch.float32)
        return B @ A

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base_layer.weight
        with gathered(weight, modify=True):
            weight.data.copy_((weight.data.float() + self._delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        with gathered(weight, modify=True):
            weight.data.copy_((weight.data.float() - self._delta_weight()).to(weight.dtype))
        self.merged = False

    @torch.no_grad()
    def commit(self) -> None:
        """Make a merge permanent (Chain of LoRA): the merged update joins the recorded base offset."""
        if not self.merged:
            return
        A, B = (t.detach().clone() for t in self.factors(dtype=torch.float32))  # may alias lora_A
        fac = self._factory()
        if self.A0 is None:
            A0, B0 = A, -B
        else:
            A0 = torch.cat([self.A0.float(), A], 0)
            B0 = torch.cat([self.B0.float() * self.init_coef, -B], 1)
        self.A0, self.B0, self.init_coef = A0.to(**fac), B0.to(**fac), 1.0
        self.merged = False

    @torch.no_grad()
    def commit_factors(self) -> None:
        """Make the live update permanent without rounding it into the weight: it joins the base
        linear's frozen low-rank path (committed.py); reinit then starts the next link."""
        if self.merged:
            raise AdapterError("commit_factors on a merged layer: unmerge_adapter first")
        A, B = (t.detach().clone() for t in self.factors(dtype=torch.float32))  # may alias lora_A
        committed.append(self, A, B)

    def export_factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 (A, B) with B @ A == (W_live + committed + update) - W_original: the LoRA to ship."""
        A, B = self.factors(dtype=torch.float32)
        As, Bs = [A.float()], [B.float()]
        if self.A0 is not None:
            As.append(self.A0.float()), Bs.append(-self.init_coef * self.B0.float())
        found = committed.factors(self)
        if found is not None:
            As.append(found[0].float().to(As[0].device)), Bs.append(found[1].float().to(As[0].device))
        return torch.cat(As, 0), torch.cat(Bs, 1)

    # -- save / load -------------------------------------------------------------------------------
    def adapter_state(self) -> Dict[str, torch.Tensor]:
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}
        found = committed.factors(self)
        if found is not None:
            state[COMMITTED_A], state[COMMITTED_B] = found
        return state

    @torch.no_grad()
    def load_adapter_state(self, state: Dict[str, torch.Tensor], init_coef: float) -> None:
        """Load saved tensors (already checked by io.load_adapter); rebuild the residual base."""
        fac = self._factory()
        if "A0" in state:
            self.set_initial(state["A0"], state["B0"], init_coef)
        if COMMITTED_A in state:
            committed.append(self, state[COMMITTED_A], state[COMMITTED_B])
        own = dict(self.named_parameters())
        own.update((k, v) for k, v in self.named_buffers() if k not in ("A0", "B0"))
        for key, value in state.items():
            if key in OPTIONAL_STATE:
                continue
            own[key].data.copy_(value.to(device=fac["device"], dtype=own[key].dtype))

    def extra_repr(self) -> str:
        kernels = self.kernels.changed()
        extra = "".join(f", {k}={v}" for k, v in kernels.items())
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
                f"{type(self.combiner).__name__}({self.combiner.extra_repr()}), impl={self.impl}{extra}")


# -- layers built directly, without a method config (tests, scripts) ------------------------------
def cola_layer(base_layer: nn.Linear, r: int, alpha: float, dropout: float, num_A: int, num_B: int,
               strategy: str, impl: str = "fused", pairing_rule: str = "paper") -> LowRankLinear:
    from . import combiners

    combiner = {"fully": lambda: combiners.Fully(num_A, num_B), "random": lambda: combiners.Random(num_A, num_B),
                "heuristic": lambda: combiners.Heuristic(num_A, num_B, pairing_rule)}[strategy]()
    return LowRankLinear(base_layer, combiner, r, alpha, dropout, impl)


def hydralora_layer(base_layer: nn.Linear, r: int, alpha: float, dropout: float, num_B: int,
                    impl: str = "fused") -> LowRankLinear:
    from .combiners import HeadRouter

    return LowRankLinear(base_layer, HeadRouter(1, num_B), r, alpha, dropout, impl)


def mole_layer(base_layer: nn.Linear, r: int, alpha: float, dropout: float, num_experts: int,
               balance_coef: float, impl: str = "fused") -> LowRankLinear:
    from .combiners import ExpertGate

    return LowRankLinear(base_layer, ExpertGate(num_experts, num_experts, balance_coef), r, alpha, dropout, impl)
