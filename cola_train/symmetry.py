"""(method, init) combinations whose copies can never become different: refused in one line.

A mixture whose experts all start as the same tensor under a uniform gate is one adapter: the
output reads sum_i g_i B_i A_i = (sum_i g_i) B A = B A whatever the gate, so the gate gets no
gradient, every expert gets the same one, and they stay identical for the whole run (issue #23
measured it in float64: the gate moved 1.6e-11, the experts stayed equal). Today's MoLE layer
(kind mole: zero-initialised gate, so uniform at step 0) with method.init=pissa is that case.
Called from config.validate.
"""
from __future__ import annotations

from .config import ConfigError

# kinds whose gate is uniform at step 0 and whose pissa init copies one principal part into every expert
UNIFORM_GATED = ("mole",)


def check(method_cfg) -> None:
    if method_cfg.kind in UNIFORM_GATED and method_cfg.init == "pissa":
        raise ConfigError(
            f"method={method_cfg.name} with method.init=pissa starts every expert as the same principal "
            f"factors under a uniform gate, so the gate gets no gradient and the experts stay identical "
            f"(one adapter, not a mixture): use method.init=lora, or load experts with method.expert_paths")
