"""Adapters saved by an older cola_train, kept as test fixtures: the refactored code must load them.

    PYTHONPATH=/path/to/old/checkout python scripts/golden_adapters.py --write   # write the fixtures
    python scripts/golden_adapters.py                                            # load + compare

For each method: tiny_llama from a fixed seed, the adapter attached, its trainable tensors moved
off their init (seeded noise; a Chain of LoRA commits one link first), `save_adapter`, and the
eval-mode loss of the adapted model on a fixed batch written beside it. Loading the saved dir
into a fresh base must give that loss again (tests/test_golden_curves.py), so the saved tensor
names, the residual base (A0/B0), the committed path and the routers all round-trip.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "golden" / "adapters_v1"
SEED = 4321
TINY = ["model=tiny_llama", "data=math", "trainer.precision=fp32", "eval=none", f"seed={SEED}",
        "method.target_modules=[q_proj,down_proj]"]   # attention and the gated MLP path; small files
METHODS = {
    "lora": ["method=lora"],
    "pissa": ["method=pissa"],
    "cola_heuristic": ["method=cola_heuristic"],
    "cola_random": ["method=cola_random"],
    "hydralora": ["method=hydralora"],
    "mole": ["method=lora_moe"],   # our token-gated layer, formerly method=mole (the curve is the same)
    "chain_cola_heuristic": ["method=chain_of_lora", "method.links=2", "method.base=cola_heuristic"],
    "chain_lora": ["method=chain_of_lora", "method.links=2"],
}


def _cfg(name):
    from cola_train.compose import typed_config as compose

    return compose(TINY + METHODS[name])


def _base(cfg):
    from transformers import set_seed

    from cola_train.models import load_model, resolve_dtype

    set_seed(SEED)
    return load_model(cfg.model, resolve_dtype(cfg.model.dtype))


def eval_loss(model) -> float:
    import torch

    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, 259, (2, 24), generator=gen)
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _perturb(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad and p.dim() >= 1 and p.numel() < 100_000:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def write(name: str) -> float:
    import torch

    from cola_train import adapters, chain
    from cola_train.models import target_modules

    cfg = _cfg(name)
    torch.set_num_threads(1)
    targets = list(cfg.method.target_modules or target_modules(cfg.model))
    model = adapters.attach_adapter(_base(cfg), chain.adapter_method(cfg.method), targets, seed=SEED)
    _perturb(model, 1)
    if cfg.method.kind == "chain":
        adapters.commit_adapter(model)
        adapters.reinit_adapter(model)
        _perturb(model, 2)
    adapters.save_adapter(model, FIXTURES / name)
    return eval_loss(model)


def load(name: str) -> float:
    import torch

    from cola_train import adapters

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return eval_loss(adapters.load_adapter(_base(_cfg(name)), FIXTURES / name))
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    if args.write:
        losses = {name: write(name) for name in METHODS}
        (FIXTURES / "losses.json").write_text(json.dumps(losses, indent=1) + "\n")
        print(json.dumps(losses, indent=1))
        return 0
    want = json.loads((FIXTURES / "losses.json").read_text())
    worst = 0.0
    for name in METHODS:
        got = load(name)
        err = abs(got - want[name]) / abs(want[name])
        worst = max(worst, err)
        print(f"{name:24s} {got:.6f} want {want[name]:.6f} rel err {err:.1e}")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
