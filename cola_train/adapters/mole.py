"""MoLE (Wu et al., 2024): m LoRA experts (A_i, B_i) mixed by a per-layer softmax gate on the input.

    y = W_res x + s * sum_i g_i(x) B_i A_i drop(x),   g(x) = softmax(gate(x))

The gate is a bias-free Linear(d_in -> m), zero-initialised so training starts from the plain
average of the experts. Its balance loss, in the normalised form L = -sum_i log(m * q_i) with q_i
the gate probability of expert i averaged over the batch's tokens (padding included: the layer
does not see the attention mask), is zero for a uniform gate and positive otherwise. Each
training-mode forward stores q on the layer (one reduction), and `aux_loss` takes the loss of all
layers' q at once: taken per layer, the loss's small ops, forward and backward, made a MoLE
training step ~23 ops per adapted linear longer than HydraLoRA's (counted on CPU), each a kernel
launch on a GPU. Experts are trained jointly or loaded from PEFT LoRA adapter directories (and
optionally frozen).

Fused: one matmul for all A's stacked, the gate scales the small (m, r) tensor, one matmul with
[B_1 .. B_m].
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import init as inits
from .layer import AdapterLinear, new_param
from .spec import AdapterError


class MoLELinear(AdapterLinear):
    mergeable = False
    takes_gated_input = True   # forward(gate, up=up): see gated_mlp.py

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float,
                 num_experts: int, balance_coef: float, impl: str = "fused"):
        super().__init__(base_layer, r, alpha, dropout)
        self.num_experts, self.balance_coef, self.impl = num_experts, float(balance_coef), impl
        fac = self._factory()
        self.lora_A = new_param((num_experts, r, self.in_features), fac)
        self.lora_B = new_param((self.out_features, num_experts, r), fac)
        self.gate = nn.Linear(self.in_features, num_experts, bias=False, **fac)
        self.gate_mean: Optional[torch.Tensor] = None   # q of the latest training forward (float32)
        self._reset()

    @classmethod
    def from_config(cls, base_layer: nn.Linear, cfg) -> "MoLELinear":
        return cls(base_layer, cfg.r, cfg.alpha, cfg.dropout, cfg.num_A, cfg.balance_coef, cfg.impl)

    @torch.no_grad()
    def _reset(self) -> None:
        inits.kaiming_(self.lora_A.data)
        self.lora_B.data.zero_()
        self.gate.weight.data.zero_()

    def gate_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self._router_probs(self.gate, x)

    def forward(self, x: torch.Tensor, *args, up: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """self(x), or self(gate, up=up) for silu(gate) * up (a gated MLP's down_proj, gated_mlp.py)."""
        plain = self.merged or self.impl == "loop" or self.fp32_path
        if up is not None:
            routed = None if plain else self._routed_forward(x, self.gate, *self._factors(), up=up)
            if routed is None:
                return self.forward(F.silu(x) * up)
        elif plain or args or kwargs:
            return super().forward(x, *args, **kwargs)
        else:
            routed = self._routed_forward(x, self.gate, *self._factors())
            if routed is None:
                return self._fused_forward(x, self._mixed)
        out, probs = routed
        self.gate_mean = gate_mean(probs) if self.training else None
        return out

    def _factors(self):
        """([A_1; ..; A_m], [B_1 .. B_m] * s)."""
        m, r = self.num_experts, self.r
        return (self.lora_A.reshape(m * r, self.in_features),
                self.lora_B.reshape(self.out_features, m * r) * self.scaling)

    def _gate_and_input(self, x: torch.Tensor):
        probs = self.gate_probs(x)
        self.gate_mean = gate_mean(probs) if self.training else None
        xd = self.dropout(self._cast_input(x, self.lora_A.dtype))
        return probs.to(xd.dtype), xd

    def _mixed(self, x: torch.Tensor):
        """(gate-weighted [A_1 x; ..; A_m x], [B_1 .. B_m] * s): the update is their product."""
        m = self.num_experts
        gate, xd = self._gate_and_input(x)
        A, B = self._factors()
        h = F.linear(xd, A).unflatten(-1, (m, self.r))
        weighted = (h * gate.unsqueeze(-1)).flatten(-2)
        return weighted, B

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "loop":
            gate, xd = self._gate_and_input(x)
            return sum(gate[..., i:i + 1] * F.linear(F.linear(xd, self.lora_A[i]), self.lora_B[:, i])
                       * self.scaling for i in range(self.num_experts))
        return F.linear(*self._mixed(x))

    @property
    def balance_loss(self) -> Optional[torch.Tensor]:
        """This layer's balance loss from its latest training forward (aux_loss sums them all)."""
        return None if self.gate_mean is None else _loss_of_means(self.gate_mean)

    def __getstate__(self):
        # the stored mean holds an autograd graph, which deepcopy/pickle cannot copy
        state = self.__dict__.copy()
        state["gate_mean"] = None
        return state

    @torch.no_grad()
    def init_pissa(self) -> None:
        """Every expert = the principal factors; gate weights sum to one, so the initial update
        is the principal part."""
        a, b = (t.to(**self._factory()) for t in self.principal())
        self.lora_A.data.copy_(a.expand_as(self.lora_A))
        self.lora_B.data.copy_(b[:, None, :].expand_as(self.lora_B))
        self.set_initial(a, b, self.scaling)

    @torch.no_grad()
    def reinit(self, rank: Optional[int] = None) -> None:
        if rank is not None and rank != self.r:
            fac = self._factory()
            self.r = rank
            self.lora_A = new_param((self.num_experts, rank, self.in_features), fac)
            self.lora_B = new_param((self.out_features, self.num_experts, rank), fac)
        self._reset()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.num_experts}, impl={self.impl}"


def gate_mean(probs: torch.Tensor) -> torch.Tensor:
    """q: the gate distribution averaged over all tokens, float32, shape (m,)."""
    return probs.reshape(-1, probs.shape[-1]).float().mean(0)


def _loss_of_means(q: torch.Tensor) -> torch.Tensor:
    """-sum log(m * q_i) over q's last dim (m experts) and every leading one (layers)."""
    return -torch.log(q.clamp_min(1e-30) * q.shape[-1]).sum()


def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """-sum_i log(m * q_i), q = mean gate distribution over all tokens (float32)."""
    return _loss_of_means(gate_mean(probs))


def aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """balance_coef * sum over MoLE layers of their latest training forward's balance loss: the
    layers' q stacked and the loss taken once per (coefficient, experts, device)."""
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for module in model.modules():
        if isinstance(module, MoLELinear) and module.gate_mean is not None:
            q = module.gate_mean
            groups.setdefault((module.balance_coef, q.shape[-1], q.device), []).append(q)
    total = None
    for (coef, _, _), qs in groups.items():
        term = coef * _loss_of_means(torch.stack(qs))
        total = term if total is None else total + term.to(total.device)
    return total


def _read_expert(path: str) -> tuple:
    config_file = os.path.join(path, "adapter_config.json")
    weights_file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(config_file) or not os.path.isfile(weights_file):
        raise AdapterError(f"mole expert {path!r} is not a PEFT LoRA adapter dir "
                           f"(needs adapter_config.json and adapter_model.safetensors)")
    with open(config_file) as fh:
        cfg = json.load(fh)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise AdapterError(f"mole expert {path!r} is not a plain LoRA adapter (peft_type/use_dora)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian",):
        raise AdapterError(f"mole expert {path!r} was initialised with {init!r}, which changes the base "
                           f"weights; convert it to a plain LoRA first (export_peft does)")
    from safetensors.torch import load_file

    return cfg, load_file(weights_file)


@torch.no_grad()
def load_experts(layers: Dict[str, MoLELinear], paths: List[str]) -> None:
    """Copy expert i of every layer from the PEFT LoRA adapter at paths[i].

    An expert's own scaling (lora_alpha / r, or / sqrt(r) with rsLoRA) is folded into its B so
    that it contributes exactly what it did as a stand-alone LoRA under our shared scaling.
    """
    for i, path in enumerate(paths):
        cfg, tensors = _read_expert(path)
        r_e = int(cfg.get("r", 8))
        scale_e = cfg.get("lora_alpha", 8) / (r_e ** 0.5 if cfg.get("use_rslora") else r_e)
        for name, layer in layers.items():
            key = f"base_model.model.{name}"
            A, B = tensors.get(f"{key}.lora_A.weight"), tensors.get(f"{key}.lora_B.weight")
            if A is None or B is None:
                raise AdapterError(f"mole expert {path!r} has no LoRA weights for module {name!r}")
            if A.shape != (layer.r, layer.in_features) or B.shape != (layer.out_features, layer.r):
                raise AdapterError(
                    f"mole expert {path!r} module {name!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} "
                    f"do not fit r={layer.r}, in={layer.in_features}, out={layer.out_features}"
                )
            layer.lora_A.data[i].copy_(A.to(layer.lora_A.dtype))
            layer.lora_B.data[:, i].copy_((B.float() * (scale_e / layer.scaling)).to(layer.lora_B.dtype))
