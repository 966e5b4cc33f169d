"""What every one of our adapted linears shares: a frozen base nn.Linear plus a low-rank update.

Subclasses only say how the update is computed from x (`delta`) and, when it does not depend on
x, which two factors it collapses to (`factors`, used by merge and export). The base output is
computed by the base module itself (so DeepSpeed ZeRO-3 gathers its weight) and the update is
added once.

`A0`, `B0`, `init_coef` record how the live base weight differs from the original one:
W_original - W_live = init_coef * B0 @ A0 (zero when absent). A PiSSA-style init sets them; a
committed merge into the weights (Chain of LoRA, method.merge=weights) appends to them. They let
`load_adapter` rebuild the residual base from a fresh model bit for bit, and `export_peft` express
the update relative to the original weights. An exact commit (`commit_factors`, the default)
leaves the base weight alone: the update joins a frozen path beside it (committed.py).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import committed, fused_ops
from . import init as inits
from .spec import AdapterError

from ..parallel import gathered  # the weight whole under DeepSpeed ZeRO-3, no-op otherwise


COMMITTED_A, COMMITTED_B = "committed_A", "committed_B"  # saved names of the committed path
OPTIONAL_STATE = ("A0", "B0", COMMITTED_A, COMMITTED_B)    # tensors a saved layer may or may not have


class AdapterLinear(nn.Module):
    mergeable = True
    # fused impl: the hand-written backward of fused_ops where it applies (False: plain autograd
    # ops, kept for the benchmark's before/after and as the ZeRO-3 / mixed-dtype path)
    custom_backward = True
    # the low-rank path in fp32 next to half-precision activations (fp32_path.enable)
    fp32_path = False
    # how a PiSSA-style init finds W's top-r part and forms the residual (init.py); attach_adapter
    # sets it per layer from method.svd / method.svd_niter and the run's seed
    init_svd = inits.SVDChoice()

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = float(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.init_coef = 1.0
        self.register_buffer("A0", None)
        self.register_buffer("B0", None)

    # -- properties HF / user code may reach for on a target module --------------------------
    @property
    def scaling(self) -> float:
        return self.alpha / self.r

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

    def _router_probs(self, router: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """Per-token weights from a routing Linear (HydraLoRA's heads, MoLE's experts): a softmax in
        at least float32, so the rows sum to one however the activations are stored."""
        x = self._cast_input(x, router.weight.dtype)
        return torch.softmax(router(x), dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))

    @staticmethod
    def _to_compute(x: torch.Tensor, *weights: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """fp32 master weights under mixed precision (models.upcast_trainable) run in the
        activations' half dtype: a differentiable cast of the small factors, so the fused path and
        its hand-written backward still apply and the fp32 weights get the gradient."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if dtype not in (torch.bfloat16, torch.float16):
            return weights
        return tuple(w.to(dtype) if w.dtype == torch.float32 else w for w in weights)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if self.fp32_path:  # fp32_path.py: the low-rank path in fp32 next to a half-precision base
            with torch.autocast(x.device.type, enabled=False):
                return result + self.delta(x.float()).to(result.dtype)
        return result + self.delta(x).to(result.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _dropout_p(self) -> float:
        return float(self.dropout.p) if self.training and isinstance(self.dropout, nn.Dropout) else 0.0

    def _routed_forward(self, x: torch.Tensor, router: nn.Linear, A: torch.Tensor, B: torch.Tensor,
                        up: Optional[torch.Tensor] = None):
        """(output, router probabilities) through fused_ops.RoutedLowRankLinear (HydraLoRA, MoLE),
        or None where it does not apply and the caller takes the plain path. With up, x is a gated
        MLP's gate and the input is silu(gate) * up (fused_ops.GatedRoutedLowRankMLP)."""
        x2 = x.reshape(-1, x.shape[-1])
        u2 = None if up is None else up.reshape(-1, up.shape[-1])
        R, A, B = self._to_compute(x2, router.weight, A, B)
        if not (self.custom_backward and R.dtype == A.dtype == x2.dtype
                and (u2 is None or u2.dtype == x2.dtype) and fused_ops.can_fuse(self.base_layer, x2, A, B)):
            return None
        out, probs = fused_ops.routed_low_rank_linear(self.base_layer, x2, R, A, B, self.r,
                                                      self._dropout_p(), up=u2)
        return out.view(*x.shape[:-1], out.shape[-1]), probs

    def _fused_forward(self, x: torch.Tensor, mixed) -> torch.Tensor:
        """base(x) + z B^T for an update computed as (z, B) = mixed(x) on 2-D rows.

        The update is added into the base output in place when no cast is needed: one read and
        one write of the output instead of a delta tensor plus an add. Autograd-safe: the base
        linear's backward needs its input and weight, never its output; 2-D, so no view is rebased.
        """
        x2 = x.reshape(-1, x.shape[-1])
        result = self.base_layer(x2)
        z, B = mixed(x2)
        if z.dtype == B.dtype == result.dtype:
            result.addmm_(z, B.t())
        else:  # autocast or fp32 adapters
            result = result + F.linear(z, B).to(result.dtype)
        return result.view(*x.shape[:-1], result.shape[-1])

    def factors(self, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(A_eff, B_eff) with the eval-time update == B_eff @ A_eff (scaling folded into B_eff)."""
        raise NotImplementedError(f"{type(self).__name__} has an input-dependent update and cannot be merged")

    # -- init --------------------------------------------------------------------------------
    def principal(self) -> Tuple[torch.Tensor, torch.Tensor]:
        with gathered(self.base_layer.weight, modify=True):
            return inits.principal_factors(self.base_layer.weight, self.r, self.scaling, self.init_svd)

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

    # -- merge / unmerge / commit --------------------------------------------------------------
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
        committed.append(self.base_layer, A, B)

    def export_factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 (A, B) with B @ A == (W_live + committed + update) - W_original: the LoRA to ship."""
        A, B = self.factors(dtype=torch.float32)
        As, Bs = [A.float()], [B.float()]
        if self.A0 is not None:
            As.append(self.A0.float()), Bs.append(-self.init_coef * self.B0.float())
        found = committed.factors(self.base_layer)
        if found is not None:
            As.append(found[0].float().to(As[0].device)), Bs.append(found[1].float().to(As[0].device))
        return torch.cat(As, 0), torch.cat(Bs, 1)

    def reinit(self, rank: Optional[int] = None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- save / load -------------------------------------------------------------------------
    def adapter_state(self) -> Dict[str, torch.Tensor]:
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}
        found = committed.factors(self.base_layer)
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
            committed.append(self.base_layer, state[COMMITTED_A], state[COMMITTED_B])
        own = dict(self.named_parameters())
        own.update((k, v) for k, v in self.named_buffers() if k not in ("A0", "B0"))
        for key, value in state.items():
            if key in OPTIONAL_STATE:
                continue
            own[key].data.copy_(value.to(device=fac["device"], dtype=own[key].dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}"


def new_param(shape, fac: dict, requires_grad: bool = True) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, **fac), requires_grad=requires_grad)

