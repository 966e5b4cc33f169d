"""`Kernels`: which computation our low-rank layers choose, as one visible options object.

Why an object and not class-level switches: a switch flipped on a class (the benchmark's
before/after, a test's autograd reference) changed every layer of every model in the process,
out of sight. The options are now a value each LowRankLinear holds, printed by `print(model)`
when not the default, passed to `attach_adapter(kernels=...)` or changed on a built model with
`adapters.set_kernels(model, ...)`, and readable for results.json (`Kernels.as_dict`).
"""
from __future__ import annotations

import dataclasses

DROPOUT_MASKS = ("shared", "per_layer")   # config.DropoutMask's values (spec.py checks the method config)


@dataclasses.dataclass(frozen=True)
class Kernels:
    # the hand-written backward of fused_ops where it applies; False: plain autograd ops (the
    # benchmark's before/after, and the reference the fused maths is tested against)
    custom_backward: bool = True
    # sibling linears reading one input (q/k/v, gate/up) as one fused call (fused_ops.SharedInputLowRank)
    group_shared_inputs: bool = True
    # the low-rank path in fp32 next to half-precision activations (fp32_path.enable)
    fp32_path: bool = False
    # dropout on siblings reading one input: "shared", one mask for the group's x, so the grouped
    # GEMMs run with dropout too; "per_layer", each linear its own mask (as PEFT's layers do). Set
    # from method.dropout_mask by attach_adapter. Where the grouped call does not run (fp32 path,
    # ZeRO-3, impl=loop) every linear draws its own mask either way; regional_compile.compile_blocks
    # sets per_layer (compiled blocks run each linear alone).
    dropout_mask: str = "shared"

    def __post_init__(self):
        if self.dropout_mask not in DROPOUT_MASKS:
            raise ValueError(f"unknown dropout_mask {self.dropout_mask!r} (known: {', '.join(DROPOUT_MASKS)})")

    def replace(self, **changes) -> "Kernels":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown kernel option {unknown[0]!r} (known: "
                             f"{', '.join(f.name for f in dataclasses.fields(self))})")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def changed(self) -> dict:
        """The options that differ from the defaults (what extra_repr shows)."""
        default = Kernels()
        return {k: v for k, v in self.as_dict().items() if getattr(default, k) != v}


DEFAULT = Kernels()
