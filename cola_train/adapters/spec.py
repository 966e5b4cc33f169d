"""The method config as the adapters see it: normalisation, validation, target matching.

Every bad value is caught here, before a model is touched, with a one-line message that names
the value, so a sweep with a typo fails at the start of the job and not after the SVD.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping

from torch import nn

from cola_train.config import DropoutMask, Impl, Init, Kind, MethodConfig, Pairing, Strategy, Svd, choices

# the choice lists are config.py's enums (one source); a chain is a schedule, not a layer kind
KINDS = tuple(k for k in choices(Kind) if k != Kind.chain)
STRATEGIES = choices(Strategy)
INITS = choices(Init)
IMPLS = choices(Impl)
PAIRINGS = choices(Pairing)   # pairing.RULES: the heuristic strategy's two definitions
SVDS = choices(Svd)
DROPOUT_MASKS = choices(DropoutMask)


class AdapterError(ValueError):
    """Bad adapter input (config value, target module, saved adapter): one line naming the value."""


def method_config(obj: Any) -> MethodConfig:
    """Accept a MethodConfig, an OmegaConf node (Hydra's `cfg.method`) or a plain mapping."""
    if isinstance(obj, MethodConfig):
        return dataclasses.replace(obj)
    try:  # OmegaConf is optional at this level; Hydra passes DictConfig nodes
        from omegaconf import DictConfig, OmegaConf

        if isinstance(obj, DictConfig):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(obj, Mapping):
        raise AdapterError(f"method config must be a MethodConfig or a mapping, got {type(obj).__name__}")
    known = {f.name for f in dataclasses.fields(MethodConfig)}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise AdapterError(f"unknown method config key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return MethodConfig(**dict(obj))


def config_dict(cfg: MethodConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def check_common(cfg: MethodConfig) -> None:
    """The rules every adapter method shares (rank, alpha, dropout, init, SVD, impl, counts); the
    method's own live with its combiner / backend, and registry.validate runs both."""
    if not isinstance(cfg.r, int) or cfg.r < 1:
        raise AdapterError(f"method.r must be an integer >= 1, got {cfg.r!r}")
    if not cfg.alpha > 0:
        raise AdapterError(f"method.alpha must be > 0, got {cfg.alpha!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise AdapterError(f"method.dropout must be in [0, 1), got {cfg.dropout!r}")
    if cfg.init not in INITS:
        raise AdapterError(f"unknown method.init {cfg.init!r} (expected one of {', '.join(INITS)})")
    if cfg.init == "pissa_split" and not (cfg.kind == "cola" and cfg.strategy in ("heuristic", "random")):
        raise AdapterError(f"method.init=pissa_split (our symmetry-breaking init) applies to cola_heuristic and "
                           f"cola_random, not {cfg.name} (kind={cfg.kind}, strategy={cfg.strategy}): fully reads only "
                           f"sum(B) sum(A), so no init breaks its copies' symmetry")
    if cfg.svd not in SVDS:
        raise AdapterError(f"unknown method.svd {cfg.svd!r} (expected one of {', '.join(SVDS)})")
    if not isinstance(cfg.svd_niter, int) or cfg.svd_niter < 0:
        raise AdapterError(f"method.svd_niter must be an integer >= 0, got {cfg.svd_niter!r}")
    if cfg.dropout_mask not in DROPOUT_MASKS:
        raise AdapterError(f"unknown method.dropout_mask {cfg.dropout_mask!r} (expected one of {', '.join(DROPOUT_MASKS)})")
    if cfg.impl not in IMPLS:
        raise AdapterError(f"unknown method.impl {cfg.impl!r} (expected one of {', '.join(IMPLS)})")
    for field in ("num_A", "num_B"):
        value = getattr(cfg, field)
        if not isinstance(value, int) or value < 1:
            raise AdapterError(f"method.{field} must be an integer >= 1, got {value!r}")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def linear_names(model: nn.Module) -> List[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name]


def match_targets(model: nn.Module, targets: List[str]) -> List[str]:
    """Full names of the nn.Linear modules whose name ends with a target, as PEFT matches them.

    Every target must match something: a typo in a target list would otherwise silently train
    fewer layers than the paper's setup.
    """
    if not targets:
        raise AdapterError("no target modules: method.target_modules is empty and no default list was given")
    names = linear_names(model)
    for target in targets:
        if not any(_matches(name, target) for name in names):
            suffixes = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))
            raise AdapterError(
                f"target module {target!r} not found; the model's linear modules are: {', '.join(suffixes)}"
            )
    return [name for name in names if any(_matches(name, t) for t in targets)]
