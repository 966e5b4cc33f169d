"""Combiners: the one thing that differs between our low-rank layers (DESIGN.md, "The adapter family").

Every method here is a frozen W plus down-projections A_1..A_m, up-projections B_1..B_n and a rule
saying which (A_i, B_j) pairs contribute, with what weight. That rule is a Combiner:

  * static (`StaticCombiner`): the weights do not depend on the input, so the update collapses to
    two effective factors, `factors(layer) -> (A_eff, B_eff)`, dW = B_eff A_eff (scaling folded
    into B_eff), which merge, export and the fused kernels use; `pairs(layer)` lists the
    (i, j, weight) terms for the per-pair oracle (method.impl=loop). LoRA is the 1 x 1 case;
    CoLA's fully / random / heuristic are pairing matrices P (pairing.py).
  * routed (`RoutedCombiner`): a per-token softmax router R over E heads, y = Wx + s sum_e
    p_e(x) B_e A_{e or shared} x. HydraLoRA (one shared A, n B heads) and a gate over whole
    (A_i, B_i) experts (our MoLE). Not mergeable. A routed combiner may have an aux loss
    (`observe` records what it needs per forward into an `AuxCollector`; `adapters.aux_loss`
    sums it).

A combiner is a plain object, one per layer: the parameters it owns (a router) are created on
the layer by `build` under their saved names (`router.weight`, `gate.weight`), so saved adapters
keep their tensor names. Per-method config rules (`check`), the one-line description (`describe`)
and the fields a saved adapter must match (`structural`) live here too, so a new method is one
class plus one registry line (registry.py).
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import init as inits
from . import moe_ops, pairing
from .spec import AdapterError


class Combiner:
    routed = False
    mergeable = True          # False: the update depends on more than the layer's input (MoLE's block gate)
    shared_A = False          # one A for every head: lora_A is (r, d_in), not (m, r, d_in)
    structural: Tuple[str, ...] = ()   # config fields a saved adapter must match (io.check_same_method)
    uses_expert_paths = False

    def __init__(self, num_A: int, num_B: int):
        self.num_A, self.num_B = int(num_A), int(num_B)

    # -- config --------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg) -> "Combiner":
        return cls(cfg.num_A, cfg.num_B)

    @classmethod
    def for_layer(cls, cfg, name: str, names: List[str]) -> "Combiner":
        """The combiner of the target `name` among all targets `names` (default: the same for all)."""
        return cls.from_config(cfg)

    @classmethod
    def check(cls, cfg) -> None:
        """Rules of this method's config beyond the common ones (spec.check_common; registry.validate runs both): AdapterError."""

    @classmethod
    def describe(cls, cfg) -> str:
        return f"{cfg.name} (num_A={cfg.num_A}, num_B={cfg.num_B}, r={cfg.r}, init={cfg.init})"

    # -- what the layer stores -----------------------------------------------------------------
    def a_shape(self, r: int, d_in: int) -> tuple:
        return (r, d_in) if self.shared_A else (self.num_A, r, d_in)

    def b_shape(self, r: int, d_out: int) -> tuple:
        return (d_out, self.num_B, r)

    def build(self, layer, fac: dict) -> None:
        """Create this combiner's own parameters / buffers on `layer` (after lora_A / lora_B)."""

    @classmethod
    def prepare(cls, layers: dict, cfg, loading: bool) -> None:
        """After every target is wrapped (and a PiSSA-style init ran): method-specific set-up of
        the layers {name: LowRankLinear}, e.g. loading pre-trained experts. `loading`: the
        tensors come from a saved adapter next (load_adapter)."""

    @classmethod
    def install(cls, model, layers: dict, cfg, loading: bool) -> None:
        """After prepare: changes above the layers (MoLE as published wraps each decoder block)."""

    @torch.no_grad()
    def reset(self, layer) -> None:
        """Re-initialise this combiner's own parameters (layer init and Chain of LoRA's reinit)."""

    def resized(self, layer) -> None:
        """lora_A / lora_B were made anew at another rank (reinit): adjust rank-sized state."""

    def layer_rank(self, r: int, alpha: float) -> tuple:
        """(rank of each pair, alpha) the layer is built with from method.r / method.alpha; the
        layer's scaling is alpha / rank. MOELoRA splits r among its experts (TaskGate)."""
        return r, alpha

    def merge_refusal(self) -> Optional[str]:
        """Why this layer's update has no fixed matrix to merge or export (the message's tail,
        after the method's name), or None when it has one."""
        if self.routed or not self.mergeable:
            return "routes each token: its update depends on the input and cannot be merged"
        return None

    @classmethod
    def uninstall(cls, model) -> None:
        """merged_model: undo `install`'s changes above the layers."""

    def total_weight(self) -> float:
        """The sum of the pair weights the initial update sees: a PiSSA-style init gives every A_i
        and B_j the principal factors divided by sqrt of it, so the adapter starts at exactly the
        principal part (1: the router's weights sum to one, each head gets the whole part)."""
        return 1.0

    def extra_repr(self) -> str:
        return f"num_A={self.num_A}, num_B={self.num_B}"


# ------------------------------------------------------------------------------------------------
# static pairings


class StaticCombiner(Combiner):
    """A pairing matrix P (n x m), P[j, i] the weight of B_j A_i; see pairing.py."""
    strategy = "fully"
    structural = ("strategy",)

    @classmethod
    def check(cls, cfg) -> None:   # (an unknown strategy: registry.lookup names it)
        if cfg.pairing not in pairing.RULES:
            raise AdapterError(f"unknown method.pairing {cfg.pairing!r} (expected one of {', '.join(pairing.RULES)})")

    @classmethod
    def describe(cls, cfg) -> str:
        return f"cola/{cfg.strategy} (num_A={cfg.num_A}, num_B={cfg.num_B}, r={cfg.r}, init={cfg.init})"

    def initial(self) -> torch.Tensor:
        return pairing.fully(self.num_A, self.num_B)

    def build(self, layer, fac: dict) -> None:
        m, n, r = self.num_A, self.num_B, layer.r
        layer.register_buffer("pairing", torch.zeros(n, m, **fac), persistent=False)
        layer.register_buffer("mixing", torch.zeros(n * r, m * r, **fac), persistent=False)
        self.set_pairing(layer, self.initial())

    def resized(self, layer) -> None:
        self.set_pairing(layer, layer.pairing)   # the mixing matrix has the rank's size

    @torch.no_grad()
    def set_pairing(self, layer, P: torch.Tensor) -> None:
        P = P.detach().to("cpu", torch.float32)
        self._pairs: List[Tuple[int, int, float]] = [
            (i, j, float(P[j, i])) for i in range(self.num_A) for j in range(self.num_B) if P[j, i] != 0
        ]
        r = layer.r
        if layer.mixing.shape != (self.num_B * r, self.num_A * r):   # a new rank (reinit)
            layer.mixing = layer.mixing.new_zeros(self.num_B * r, self.num_A * r)
        mixing = pairing.mixing_matrix(P, r)
        for buffer, value in ((layer.pairing, P), (layer.mixing, mixing)):
            if buffer.is_cuda:
                # the random strategy redraws every step in every layer: a copy from pageable memory
                # would wait for the GPU each time; from pinned memory it is queued like a kernel
                buffer.copy_(value.pin_memory(), non_blocking=True)
            else:
                buffer.copy_(value)

    def eval_rule(self, train_rule: bool) -> bool:
        """The eval-mode expectation replaces the per-step draw (random only)."""
        return False

    def pairs(self, layer, train_rule: bool) -> List[Tuple[int, int, float]]:
        """(i, j, weight) of every contributing pair: the oracle's terms (impl=loop)."""
        if self.eval_rule(train_rule):
            return [(i, j, 1.0 / self.num_B) for i in range(self.num_A) for j in range(self.num_B)]
        return self._pairs

    def factors(self, layer, A: torch.Tensor, B: torch.Tensor, train_rule: bool = False):
        """(A_eff, B_eff) from the stored lora_A (m, r, d_in) and lora_B (d_out, n, r):
          * fully (P all ones) and random in eval (P all 1/n) are rank one in P:
            (sum_j B_j * w)(sum_i A_i), a rank-r update;
          * m <= n: group the B's by their A, B~_i = sum_j P[j, i] B_j, [B~_1 .. B~_m][A_1; ..; A_m];
          * m > n: group the A's by their B, A~_j = sum_i P[j, i] A_i, [B_1 .. B_n][A~_1; ..; A~_n]."""
        m, n, r, s = self.num_A, self.num_B, layer.r, layer.scaling
        if self.strategy == "fully" or self.eval_rule(train_rule):
            w = s if self.strategy == "fully" else s / n
            return A.sum(0), B.sum(1) * w
        K = self._mixing(layer, A.dtype)   # P (x) I_r: one matmul groups the factors (few ops a step)
        if m <= n:
            B_grouped = B.reshape(layer.out_features, n * r) @ K
            return A.reshape(m * r, layer.in_features), B_grouped * s
        A_grouped = K @ A.reshape(m * r, layer.in_features)
        return A_grouped, B.reshape(layer.out_features, n * r) * s

    def _mixing(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """The mixing buffer in the factors' dtype. With fp32 master weights (models.upcast_trainable)
        the factors are fp32 and the buffer stays in the base's bf16: the cast is kept until the
        buffer changes (set_pairing: heuristic never, random each step), not redone every forward.
        Not cached while compiling (inductor plans it) or in inference mode (an inference tensor
        cannot be saved for a later training backward)."""
        K = layer.mixing
        if K.dtype == dtype:
            return K
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
            return K.to(dtype)
        cached = layer.__dict__.get("_mixing_cast")   # (the buffer object, its version, dtype, the cast)
        if cached is None or cached[0] is not K or cached[1] != K._version or cached[2] != dtype:
            cached = (K, K._version, dtype, K.to(dtype))
            layer.__dict__["_mixing_cast"] = cached
        return cached[3]

    def total_weight(self) -> float:
        return pairing.total_weight(self.strategy, self.num_A, self.num_B)

    def extra_repr(self) -> str:
        return f"num_A={self.num_A}, num_B={self.num_B}, strategy={self.strategy}"


class Fully(StaticCombiner):
    """CoLA fully collaborative: every pair, dW = s (sum_j B_j)(sum_i A_i)."""
    strategy = "fully"


class LoRA(Fully):
    """LoRA as the 1 x 1 pairing (the same maths PEFT's LoRA computes; tests prove them equal)."""

    def __init__(self, num_A: int = 1, num_B: int = 1):
        super().__init__(1, 1)


class Heuristic(StaticCombiner):
    """CoLA heuristic: a fixed pairing, the paper's or the authors' code's (pairing.heuristic)."""
    strategy = "heuristic"
    structural = ("strategy", "pairing")

    def __init__(self, num_A: int, num_B: int, rule: str = "paper"):
        super().__init__(num_A, num_B)
        self.rule = rule

    @classmethod
    def from_config(cls, cfg) -> "Heuristic":
        return cls(cfg.num_A, cfg.num_B, cfg.pairing)

    @classmethod
    def describe(cls, cfg) -> str:
        return (f"cola/heuristic (pairing={cfg.pairing}, num_A={cfg.num_A}, num_B={cfg.num_B}, r={cfg.r}, "
                f"init={cfg.init})")

    def initial(self) -> torch.Tensor:
        return pairing.heuristic(self.num_A, self.num_B, self.rule)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pairing={self.rule}"


class Random(StaticCombiner):
    """CoLA random: in training each A_i with one B drawn per optimizer step (`resample`, set from
    outside, never inside forward, which gradient checkpointing replays); in eval the
    expectation, every A_i with the mean of the B's, so evaluation and merging are deterministic."""
    strategy = "random"

    def initial(self) -> torch.Tensor:
        return pairing.draw(self.num_A, self.num_B, pairing.generator(seed=0, step=0))

    def eval_rule(self, train_rule: bool) -> bool:
        return not train_rule

    def resample(self, layer, gen: torch.Generator) -> None:
        self.set_pairing(layer, pairing.draw(self.num_A, self.num_B, gen))



class ExpertSwitch(StaticCombiner):
    """MoLE as published (Wu, Huang, Wei, ICLR 2024): N frozen pre-trained LoRA experts per layer,
    of which a MoLEBlock (mole_block.py) switches on none or one at a time (`layer.active_expert`)
    to run the decoder block once without and once per expert; the block's gate (mole_gate.py,
    created by `install` and kept on the block's first adapted linear, so it is saved with the
    adapter) mixes the experts' block contributions. Only the gates train. Experts come from
    method.expert_paths (PEFT LoRA dirs: our runs' `adapter/` or any PEFT LoRA). Not mergeable.
    Oracle: tests/reference_moe.py, mole_block."""
    strategy = "switch"
    structural = ()
    uses_expert_paths = True
    mergeable = False

    def __init__(self, num_A: int, num_B: int):
        super().__init__(num_A, num_A)
        self.collector = None     # mole_gate.GateCollector, shared by the model's switches (install)

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.num_A < 2 or cfg.num_B != cfg.num_A:
            raise AdapterError(f"mole gates between num_A >= 2 frozen experts (num_B = num_A): got num_A={cfg.num_A}, "
                               f"num_B={cfg.num_B}")
        if len(cfg.expert_paths) != cfg.num_A:
            raise AdapterError(f"mole composes pre-trained LoRA experts: method.expert_paths must list num_A={cfg.num_A} "
                               f"adapter dirs, got {len(cfg.expert_paths)} (scripts/mole_recipe.py trains them)")
        if cfg.init != "lora":
            raise AdapterError(f"mole loads its experts from method.expert_paths: method.init must be 'lora', got {cfg.init!r}")

    @classmethod
    def describe(cls, cfg) -> str:
        return f"mole (MoLE as published: {cfg.num_A} frozen experts, a gate per block, r={cfg.r})"

    def initial(self) -> torch.Tensor:
        return torch.zeros(self.num_B, self.num_A)

    def pairs(self, layer, train_rule: bool):
        k = getattr(layer, "active_expert", None)
        return [(0, 0, 0.0)] if k is None else [(k, k, 1.0)]

    def factors(self, layer, A: torch.Tensor, B: torch.Tensor, train_rule: bool = False):
        k = getattr(layer, "active_expert", None)
        if k is None:
            return A[0] * 0, B[:, 0] * 0
        return A[k], B[:, k] * layer.scaling

    def total_weight(self) -> float:
        return 1.0

    @classmethod
    def prepare(cls, layers: dict, cfg, loading: bool) -> None:
        if not loading:
            from .mole import load_experts

            load_experts(layers, list(cfg.expert_paths))
        for layer in layers.values():
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)

    @classmethod
    def install(cls, model, layers: dict, cfg, loading: bool) -> None:
        from .mole_block import install_blocks

        install_blocks(model, layers, cfg.num_A)

    def extra_repr(self) -> str:
        return f"experts={self.num_A}, switched by the block"


# ------------------------------------------------------------------------------------------------
# routed mixtures


class AuxCollector:
    """Where `adapters.aux_loss` takes the routed layers' aux losses from: one per model
    (attach_adapter makes it and registers every routed combiner in module order), explicit,
    instead of a walk over the model for tensors left on its layers.

    Each combiner keeps the summary of its latest training forward (`summary`, overwritten by
    each forward: a gradient-checkpointing replay writes the same value again; None after an
    eval-mode forward) -- an attribute of a plain object, which torch.compile traces as a side
    effect without a guard per layer (a per-layer key would compile once per layer). The loss is
    taken per group of summaries that share (combiner type, coefficient, heads, device),
    stacked: one small op chain per group instead of per layer (a MoLE step was ~23 ops per
    layer longer that way, counted on CPU)."""

    def __init__(self):
        self.members: List["RoutedCombiner"] = []

    def register(self, combiner: "RoutedCombiner") -> None:
        self.members.append(combiner)

    def loss(self) -> Optional[torch.Tensor]:
        groups: Dict[tuple, list] = {}
        for combiner in self.members:
            if combiner.summary is not None:
                groups.setdefault(combiner.aux_group(combiner.summary), []).append(combiner)
        total = None
        for members in groups.values():
            term = members[0].aux_loss(torch.stack([c.summary for c in members]))
            total = term if total is None else total + term.to(total.device)
        return total


class RoutedCombiner(Combiner):
    """A per-token softmax router (a bias-free Linear(d_in -> E) on the layer, `router_name`) over
    E heads; head e uses B_e and A_e (or the shared A)."""
    routed = True
    router_name = "router"
    softmax_routing = True    # probs = softmax(router(x)): the fused routed kernel applies

    def __init__(self, num_A: int, num_B: int, collector: Optional[AuxCollector] = None):
        super().__init__(num_A, num_B)
        self.collector: Optional[AuxCollector] = None
        self.summary: Optional[torch.Tensor] = None   # what the aux loss needs from the latest forward
        if collector is not None:
            self.attach_collector(collector)

    @property
    def heads(self) -> int:
        return self.num_B

    def build(self, layer, fac: dict) -> None:
        setattr(layer, self.router_name, nn.Linear(layer.in_features, self.heads, bias=False, **fac))

    def router(self, layer) -> nn.Linear:
        return getattr(layer, self.router_name)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-token head weights from the router's logits: a softmax in at least float32."""
        return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))

    def attach_collector(self, collector: AuxCollector) -> None:
        self.collector = collector
        collector.register(self)

    def observe(self, layer, probs: torch.Tensor) -> None:
        """Record this forward's aux-loss summary in `self.summary` (None in eval mode); nothing
        for a router without aux loss."""

    def __getstate__(self):
        # a recorded summary holds an autograd graph, which deepcopy / pickle cannot copy
        state = self.__dict__.copy()
        state["summary"] = None
        return state

    def aux_group(self, summary: torch.Tensor) -> tuple:
        return (type(self), summary.shape[-1], summary.device)

    def aux_loss(self, summaries: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class HeadRouter(RoutedCombiner):
    """HydraLoRA (Tian et al., 2024): one shared A, n B heads, y = Wx + s sum_j g_j(x) B_j A drop(x).
    As in the official code the router reads the undropped input and is Kaiming-initialised like
    A; the softmax runs in float32; B heads start at zero."""
    shared_A = True

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.num_A != 1:
            raise AdapterError(f"hydralora shares one A across its B heads: num_A must be 1, got {cfg.num_A}")
        if cfg.num_B < 2:
            raise AdapterError(
                f"hydralora needs num_B >= 2 heads to route between, got {cfg.num_B} (use method lora)"
            )

    @classmethod
    def describe(cls, cfg) -> str:
        return f"hydralora (num_B={cfg.num_B}, r={cfg.r}, init={cfg.init})"

    @torch.no_grad()
    def reset(self, layer) -> None:
        inits.kaiming_(self.router(layer).weight.data)

    def extra_repr(self) -> str:
        return f"num_B={self.num_B}"


class ExpertGate(RoutedCombiner):
    """Our MoLE: m LoRA experts (A_i, B_i) mixed by a per-token softmax gate on the input,
    y = Wx + s sum_i g_i(x) B_i A_i drop(x). The gate starts at zero (the plain average of the
    experts). Balance loss, normalised: L = -sum_i log(m q_i), q_i the gate probability of expert
    i averaged over the batch's tokens (padding included: the layer does not see the attention
    mask); zero for a uniform gate, positive otherwise; times method.balance_coef."""
    router_name = "gate"
    uses_expert_paths = True

    def __init__(self, num_A: int, num_B: int, balance_coef: float = 0.0,
                 collector: Optional[AuxCollector] = None):
        # a layer built on its own gets a collector of its own; attach_adapter shares one per model
        super().__init__(num_A, num_B, collector if collector is not None else AuxCollector())
        self.balance_coef = float(balance_coef)

    @classmethod
    def from_config(cls, cfg) -> "ExpertGate":
        return cls(cfg.num_A, cfg.num_B, cfg.balance_coef)

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.num_A < 2:
            raise AdapterError(f"mole needs num_A >= 2 experts to gate between, got {cfg.num_A} (use method lora)")
        if cfg.num_B != cfg.num_A:
            raise AdapterError(
                f"mole experts are (A_i, B_i) pairs: num_B must equal num_A={cfg.num_A}, got {cfg.num_B}"
            )
        if cfg.balance_coef < 0:
            raise AdapterError(f"method.balance_coef must be >= 0, got {cfg.balance_coef!r}")
        if cfg.expert_paths and len(cfg.expert_paths) != cfg.num_A:
            raise AdapterError(
                f"mole has num_A={cfg.num_A} experts but {len(cfg.expert_paths)} expert_paths were given"
            )
        if cfg.freeze_experts and not cfg.expert_paths:
            raise AdapterError("method.freeze_experts=true needs expert_paths (frozen untrained experts add nothing)")
        if cfg.expert_paths and cfg.init == "pissa":
            raise AdapterError("mole with expert_paths loads its experts: method.init must be 'lora', got 'pissa'")

    @classmethod
    def describe(cls, cfg) -> str:
        return f"mole (num_A={cfg.num_A}, r={cfg.r}, init={cfg.init})"

    @classmethod
    def prepare(cls, layers: dict, cfg, loading: bool) -> None:
        """Experts from PEFT LoRA adapter directories (method.expert_paths), optionally frozen."""
        if not loading and cfg.expert_paths:
            from .mole import load_experts

            load_experts(layers, list(cfg.expert_paths))
        if cfg.freeze_experts:
            for layer in layers.values():
                layer.lora_A.requires_grad_(False)
                layer.lora_B.requires_grad_(False)

    @torch.no_grad()
    def reset(self, layer) -> None:
        self.router(layer).weight.data.zero_()

    def observe(self, layer, probs: torch.Tensor) -> None:
        self.summary = gate_mean(probs) if layer.training else None

    def gate_mean(self) -> Optional[torch.Tensor]:
        """q of the latest training forward (float32, (m,)), or None."""
        return self.summary

    def balance_loss(self) -> Optional[torch.Tensor]:
        """This layer's balance loss (without the coefficient) from its latest training forward."""
        q = self.gate_mean()
        return None if q is None else loss_of_means(q)

    def aux_group(self, summary: torch.Tensor) -> tuple:
        return (type(self), self.balance_coef, summary.shape[-1], summary.device)

    def aux_loss(self, summaries: torch.Tensor) -> torch.Tensor:
        return self.balance_coef * loss_of_means(summaries)

    def extra_repr(self) -> str:
        return f"experts={self.num_A}"


class TopKRouter(RoutedCombiner):
    """MoLA (Gao et al. 2024, "Higher Layers Need More LoRA Experts"; code GCYZSL/MoLA): E_l LoRA
    experts (A_i, B_i) in layer l, each token routed to its top-k (k = method.top_k, 2):
        y = Wx + sum_{i in TopK(p)} (p_i / sum_{TopK} p) s B_i A_i drop(x),   p = softmax(W_r x)
    (the renormalisation of the kept probabilities: the authors' Linear_MoE.forward). E_l comes
    from method.experts_per_group: the transformer layers split into len(groups) equal contiguous
    groups from the bottom (the paper's 2,4,6,8 on 32 layers: 8 layers each; layer l in group
    floor(l G / L)); empty: num_A experts everywhere. The router is Kaiming-initialised (as
    in the code), B's start at zero. The code's optional Switch balance loss (off by default) is
    not implemented. Oracle: tests/reference_moe.py, mola_linear / mola_expert_counts."""
    softmax_routing = False
    structural = ("top_k", "experts_per_group")

    def __init__(self, num_A: int, num_B: int, top_k: int = 2, collector: Optional[AuxCollector] = None):
        super().__init__(num_A, num_B, collector)
        self.top_k = int(top_k)

    @classmethod
    def from_config(cls, cfg) -> "TopKRouter":
        return cls(cfg.num_A, cfg.num_A, cfg.top_k)

    @classmethod
    def for_layer(cls, cfg, name: str, names: List[str]) -> "TopKRouter":
        groups = list(cfg.experts_per_group or [])
        if not groups:
            return cls.from_config(cfg)
        index = lambda n: int(re.search(r"\.(\d+)\.", n).group(1))
        n_layers = 1 + max(index(n) for n in names)
        experts = expert_counts(n_layers, groups)[index(name)]
        return cls(experts, experts, cfg.top_k)

    @classmethod
    def check(cls, cfg) -> None:
        counts = list(cfg.experts_per_group or []) or [cfg.num_A]
        if cfg.top_k < 1 or any(int(c) < cfg.top_k for c in counts):
            raise AdapterError(f"mola routes each token to its top {cfg.top_k}: every layer needs at least that "
                               f"many experts and top_k >= 1 (num_A={cfg.num_A}, experts_per_group="
                               f"{list(cfg.experts_per_group or [])})")
        if cfg.num_B != cfg.num_A:
            raise AdapterError(f"mola experts are (A_i, B_i) pairs: num_B must equal num_A={cfg.num_A}, got {cfg.num_B}")

    @classmethod
    def describe(cls, cfg) -> str:
        return f"mola (experts_per_group={list(cfg.experts_per_group or []) or [cfg.num_A]}, top_k={cfg.top_k}, r={cfg.r})"

    @torch.no_grad()
    def reset(self, layer) -> None:
        inits.kaiming_(self.router(layer).weight.data)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        p = super().probs(logits)
        top = torch.topk(p, self.top_k, dim=-1)
        kept = torch.zeros_like(p).scatter(-1, top.indices, top.values)
        return kept / kept.sum(-1, keepdim=True)

    def total_weight(self) -> float:
        return 1.0   # the kept weights sum to one

    def extra_repr(self) -> str:
        return f"experts={self.num_A}, top_k={self.top_k}"


class TaskGate(RoutedCombiner):
    """MOELoRA (Liu et al. 2023, "When MOE Meets LLMs"; code: peft/tuners/mmoelora.py, a copy in
    the HydraLoRA repo): E experts (A_i, B_i) that split the rank r (r / E each), mixed per
    sequence by its task's gate,
        y = Wx + (alpha / r) sum_i omega_{t,i} B_i A_i drop(x),   omega_t = softmax(W_T E[t]),
    with a task-embedding table E (num_tasks x task_embedding_dim) and a bias-free gate W_T in
    every adapted linear (`task_embedding`, `task_gate`). Initialised as the authors' code:
    A ~ N(0, 0.01^2), B = 0, E ~ N(0, 1) and W_T as nn.Linear (their Embedding and Linear
    defaults). No balance loss. The scaling is alpha / r with the TOTAL r: the layer is built with
    rank r / E and alpha / E (`layer_rank`), which gives the same alpha / r.

    The task ids come from the batch through the model's TaskInput (task_input.py, made by
    `install`); a forward without them (the benchmark, generation) uses method.default_task, or
    the mean of the task gates when that is null. The update is fixed once the task is: merge
    and export use method.default_task and are refused without it. Oracle: tests/reference_moe.py,
    moelora_linear / moelora_merged_weight; the fused update is moe_ops.moelora_delta's."""
    router_name = "task_gate"
    softmax_routing = False   # the fused routed kernel routes by the tokens; this gate by the task
    structural = ("num_tasks", "task_embedding_dim")

    def __init__(self, num_A: int, num_B: int, num_tasks: int = 1, task_dim: int = 64,
                 default_task: Optional[int] = None):
        super().__init__(num_A, num_A)
        self.num_tasks, self.task_dim, self.default_task = int(num_tasks), int(task_dim), default_task
        self.tasks = None   # the model's task_input.TaskInput (install); None: always the default

    @classmethod
    def from_config(cls, cfg) -> "TaskGate":
        return cls(cfg.num_A, cfg.num_A, cfg.num_tasks, cfg.task_embedding_dim, cfg.default_task)

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.num_A < 2 or cfg.num_B != cfg.num_A:
            raise AdapterError(f"moelora gates between num_A >= 2 experts (A_i, B_i), num_B = num_A: got "
                               f"num_A={cfg.num_A}, num_B={cfg.num_B}")
        if cfg.r % cfg.num_A:
            raise AdapterError(f"moelora splits the rank among its experts: r={cfg.r} must be a multiple of "
                               f"num_A={cfg.num_A}")
        if cfg.num_tasks < 1 or cfg.task_embedding_dim < 1:
            raise AdapterError(f"moelora needs num_tasks >= 1 and task_embedding_dim >= 1, got "
                               f"{cfg.num_tasks} and {cfg.task_embedding_dim}")
        if cfg.default_task is not None and not 0 <= cfg.default_task < cfg.num_tasks:
            raise AdapterError(f"method.default_task={cfg.default_task} must be null (the mean of the task gates) "
                               f"or a task id in 0..{cfg.num_tasks - 1}")
        if cfg.init != "lora":
            raise AdapterError(f"moelora initialises as the authors' code (A ~ N(0, 0.01^2), B = 0): method.init "
                               f"must be 'lora', got {cfg.init!r}")

    @classmethod
    def describe(cls, cfg) -> str:
        return (f"moelora ({cfg.num_A} experts of rank {cfg.r // max(cfg.num_A, 1)}, r={cfg.r}, "
                f"num_tasks={cfg.num_tasks})")

    def layer_rank(self, r: int, alpha: float) -> tuple:
        return r // self.num_A, alpha / self.num_A

    def build(self, layer, fac: dict) -> None:
        layer.task_embedding = nn.Embedding(self.num_tasks, self.task_dim, **fac)
        layer.task_gate = nn.Linear(self.task_dim, self.num_B, bias=False, **fac)

    @torch.no_grad()
    def reset(self, layer) -> None:
        layer.lora_A.data.normal_(0.0, 0.01)
        nn.init.normal_(layer.task_embedding.weight)                      # nn.Embedding's default
        nn.init.kaiming_uniform_(layer.task_gate.weight, a=math.sqrt(5))  # nn.Linear's default

    @classmethod
    def install(cls, model, layers: dict, cfg, loading: bool) -> None:
        from .task_input import install

        tasks = install(model, cfg.num_tasks, cfg.default_task)
        for layer in layers.values():
            layer.combiner.tasks = tasks

    @classmethod
    def uninstall(cls, model) -> None:
        from .task_input import uninstall

        uninstall(model)

    def gate(self, layer, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """omega, (batch, E) in float32 at least: the ids' gates (given, or the current forward's),
        else the default task's, else the mean over the tasks (1, E)."""
        device = layer.task_embedding.weight.device
        if task_ids is None and self.tasks is not None:
            task_ids = self.tasks.current
        mean = task_ids is None and self.default_task is None
        if task_ids is None:
            task_ids = torch.arange(self.num_tasks) if mean else torch.tensor([self.default_task])
        # softmax(W_T E[t]) as moe_ops.moelora_gate, through the module calls: DeepSpeed ZeRO-3
        # gathers a partitioned weight when its module is called, not when it is read
        logits = layer.task_gate(layer.task_embedding(task_ids.reshape(-1).to(device)))
        omega = moe_ops.softmax_fp32(logits)
        return omega.mean(0, keepdim=True) if mean else omega

    def route(self, layer, x: torch.Tensor) -> torch.Tensor:
        """Each row's expert weights (..., E): its sequence's omega. x is (batch, tokens, d) or its
        rows (batch * tokens, d), sequence-major, so the rows of sequence b are b*T .. (b+1)*T - 1."""
        omega = self.gate(layer)
        lead = x.shape[:-1]
        n, b = math.prod(lead), omega.shape[0]
        if b != 1 and n % b:
            raise AdapterError(f"moelora got {b} task ids for an input of {n} positions ({tuple(x.shape)}): "
                               f"one id per sequence of the batch is needed")
        rows = omega.expand(n, -1) if b == 1 else omega.repeat_interleave(n // b, 0)
        return rows.reshape(*lead, omega.shape[-1])

    def merge_refusal(self) -> Optional[str]:
        if self.default_task is None:
            return ("weights its experts by each sequence's task: merge and export need method.default_task="
                    "<task id>, the task the merged weights serve")
        return None

    def factors(self, layer, A: torch.Tensor, B: torch.Tensor, train_rule: bool = False):
        """(A_eff, B_eff) of method.default_task: [A_1; ..; A_E], [w_1 B_1 .. w_E B_E] * s (the code's merge(task_id))."""
        w = self.gate(layer, torch.tensor([self.default_task], device=A.device))[0].to(B.dtype)
        return A.reshape(-1, layer.in_features), (B * w[None, :, None]).reshape(layer.out_features, -1) * layer.scaling

    def extra_repr(self) -> str:
        default = "mean of the task gates" if self.default_task is None else f"task {self.default_task}"
        return (f"experts={self.num_A} (rank r/{self.num_A} each), num_tasks={self.num_tasks}, "
                f"task_dim={self.task_dim}, without task ids: {default}")


def expert_counts(n_layers: int, groups: List[int]) -> List[int]:
    """Experts per layer: layer l gets groups[floor(l * G / L)] (MoLA's layer groups, bottom first)."""
    G = len(groups)
    return [int(groups[(l * G) // n_layers]) for l in range(n_layers)]


def gate_mean(probs: torch.Tensor) -> torch.Tensor:
    """q: the gate distribution averaged over all tokens, float32, shape (m,)."""
    return probs.reshape(-1, probs.shape[-1]).float().mean(0)


def loss_of_means(q: torch.Tensor) -> torch.Tensor:
    """-sum log(m * q_i) over q's last dim (m experts) and every leading one (layers)."""
    return -torch.log(q.clamp_min(1e-30) * q.shape[-1]).sum()


def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """-sum_i log(m * q_i), q = mean gate distribution over all tokens (float32)."""
    return loss_of_means(gate_mean(probs))
