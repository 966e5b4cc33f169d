"""Every method our adapters know, one line each: its kind (and strategy), backend and combiner.

A new method is one Combiner (combiners.py) plus one `register` line here (and its conf/method
YAML). io.py, the public functions of adapters/__init__.py and chain.py ask `lookup(cfg)` (or
`adapters.backend(model)`) instead of branching on the kind.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Type

from . import combiners
from .backends import Backend, FullBackend, OursBackend, PeftBackend
from .spec import AdapterError, check_common


@dataclasses.dataclass(frozen=True)
class Method:
    kind: str
    backend: Type[Backend]
    combiner: Optional[Type[combiners.Combiner]] = None

    def check(self, cfg) -> None:
        self.backend.check(cfg)
        if self.combiner is not None:
            self.combiner.check(cfg)

    def describe(self, cfg) -> str:
        if self.combiner is not None:
            return self.combiner.describe(cfg)
        return f"{cfg.name} (kind={cfg.kind}, r={cfg.r}, init={cfg.init}, use_dora={cfg.use_dora})"

    @property
    def structural(self) -> tuple:
        """Config fields a saved adapter must match, beyond the common ones (io.STRUCTURAL)."""
        return self.combiner.structural if self.combiner is not None else ()

    @property
    def uses_expert_paths(self) -> bool:
        return self.combiner is not None and self.combiner.uses_expert_paths

    def make_backend(self, cfg) -> Backend:
        return self.backend(self, cfg)


METHODS: Dict[str, Method] = {}


def register(key: str, backend: Type[Backend], combiner: Optional[Type[combiners.Combiner]] = None) -> None:
    """key: the method's kind, or "kind/strategy" where one kind has several combiners."""
    METHODS[key] = Method(key.split("/")[0], backend, combiner)


register("none", FullBackend)                              # full fine-tuning
register("peft", PeftBackend)                              # LoRA / DoRA / PiSSA via HF PEFT
register("cola/fully", OursBackend, combiners.Fully)
register("cola/random", OursBackend, combiners.Random)
register("cola/heuristic", OursBackend, combiners.Heuristic)
register("hydralora", OursBackend, combiners.HeadRouter)
register("mole", OursBackend, combiners.ExpertGate)
register("mole_block", OursBackend, combiners.ExpertSwitch)   # MoLE as published (method=mole)
register("mola", OursBackend, combiners.TopKRouter)      # MoLA: top-k routing, experts per layer group
register("moelora", OursBackend, combiners.TaskGate)     # MOELoRA: a task-id gate over split-rank experts


def kinds() -> tuple:
    return tuple(dict.fromkeys(m.kind for m in METHODS.values()))


def strategies(kind: str) -> tuple:
    return tuple(key.split("/", 1)[1] for key in METHODS if key.startswith(kind + "/"))


def known_kind(kind: str) -> bool:
    return kind in kinds()


def takes_adapter_options(kind: str) -> bool:
    """False where the method attaches no adapter (its r, alpha, ... are not used)."""
    return any(m.backend.has_adapter for m in METHODS.values() if m.kind == kind)


def lookup(cfg) -> Method:
    """The registered method of a (validated) config; AdapterError naming the bad kind or strategy."""
    found = METHODS.get(f"{cfg.kind}/{cfg.strategy}") or METHODS.get(cfg.kind)
    if found is not None:
        return found
    choices = strategies(cfg.kind)
    if choices:
        raise AdapterError(f"unknown method.strategy {cfg.strategy!r} (expected one of {', '.join(choices)})")
    raise AdapterError(f"unknown method kind {cfg.kind!r} (expected one of {', '.join(kinds())})")


def validate(cfg) -> None:
    """Cross-field rules; the message names the offending field and value. The rules of one
    method live with its combiner / backend (Method.check)."""
    if cfg.kind == "chain":
        raise AdapterError(
            f"method kind 'chain' is a training schedule, not a layer: attach its base method "
            f"({cfg.base!r}) and drive commit_adapter/reinit_adapter from the schedule"
        )
    if not known_kind(cfg.kind):
        raise AdapterError(f"unknown method kind {cfg.kind!r} (expected one of {', '.join(kinds())})")
    if not takes_adapter_options(cfg.kind):   # full fine-tuning: nothing else to check
        return
    check_common(cfg)
    method = lookup(cfg)
    if cfg.expert_paths and not method.uses_expert_paths:
        users = [k for k, m in METHODS.items() if m.uses_expert_paths]
        raise AdapterError(f"method.expert_paths is only used by kind {', '.join(map(repr, users))}, "
                           f"not {cfg.kind!r}")
    method.check(cfg)
