#!/usr/bin/env python
"""How many of an adapter's factor entries change their bf16 value after k AdamW steps of the warm-up.

    python scripts/bf16_factor_steps.py

Under bf16 autocast the fp32 master factors are cast to bf16 in every forward, so a step smaller
than half a bf16 rounding step of the entry leaves the forward unchanged. Real SmolLM2-135M
weights (model=smollm2_135m), every fourth adapted layer, PiSSA's principal factors as
conf/method sets them up: one pair with alpha/r = 1 (pissa) and CoLA's split copies with
alpha/r = 2; each entry is moved by the warm-up's cumulative lr (one
sign step per AdamW update, the size of Adam's early steps) towards and away from zero
(docs/RESULTS.md, the bf16 caveat).
"""
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cola_train.adapters.init import kaiming_, principal_factors, split
from cola_train.config import ModelConfig
from cola_train.models import load_model, target_modules

CONF = Path(__file__).resolve().parent.parent / "conf" / "model" / "smollm2_135m.yaml"
LR, WARMUP, R = 5e-5, 20, 8
# (label, alpha/r, split: pairing.total_weight for num_A=2, num_B=3)
SETUPS = [("pissa (1 pair)", 1.0, 1), ("cola_random (/2)", 2.0, 2), ("cola_heuristic (/3)", 2.0, 3),
          ("cola_fully (/6)", 2.0, 6)]


def moved(v: torch.Tensor, d: float) -> float:
    """Share of entries whose bf16 value changes when moved by d, averaged over both directions."""
    b0, sign = v.bfloat16(), torch.sign(v)
    return 0.5 * sum(float(((v + k * d * sign).bfloat16() != b0).float().mean()) for k in (1, -1))


def main() -> None:
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF))
    model = load_model(cfg, torch.float32)
    names = set(target_modules(cfg))
    layers = [m for n, m in model.named_modules() if n.split(".")[-1] in names][::4]
    factors = [[split(*principal_factors(m.weight, R, scaling), w) for m in layers] for _, scaling, w in SETUPS]
    torch.manual_seed(0)
    A = kaiming_(torch.empty(R, layers[0].in_features))
    print("share of entries moved (A, B):")
    print("| steps | cumulative lr | " + " | ".join(label for label, _, _ in SETUPS) + " | lora A (kaiming) |")
    print("|---|---|" + "---|" * (len(SETUPS) + 1))
    for k in (10, 35):
        d = sum(LR * min(1.0, t / WARMUP) for t in range(1, k + 1))
        cells = []
        for pairs in factors:
            a = sum(moved(fa, d) for fa, _ in pairs) / len(layers)
            b = sum(moved(fb, d) for _, fb in pairs) / len(layers)
            cells.append(f"{a:.3f}, {b:.3f}")
        print(f"| {k} | {d:.2e} | {' | '.join(cells)} | {moved(A, d):.3f} |")


if __name__ == "__main__":
    main()
