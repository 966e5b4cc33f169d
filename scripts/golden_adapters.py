"""Adapters saved by an older cola_train, kept as test fixtures: the refactored code must load them.

    PYTHONPATH=/tmp/old python scripts/golden_adapters.py --write   # the old code writes the dirs
    python scripts/golden_adapters.py --pack                        # their .safetensors -> tensors.json
    python scripts/golden_adapters.py                               # load with this code + compare

The old code is commit 4327780 (before the one-layer refactor; `git archive 4327780 | tar -x -C
/tmp/old`); it knew our token-gated layer as method=mole, today's method=lora_moe.

For each method: a one-layer tiny_llama (hidden 16, rank 2: every saved format, small files)
from a fixed seed, the adapter attached, its trainable tensors moved off their init (seeded
noise; a Chain of LoRA commits one link first), `save_adapter`, and the eval-mode loss of the
adapted model on a fixed batch written beside it (losses.json), with its logits at each sequence's
last position (logits.json: a lost tensor may barely move the loss of a tiny random model, it
moves these). Loading the saved dir into a fresh base must give them again
(tests/test_golden_curves.py), so the saved tensor names, the residual base (A0/B0), the
committed path and the routers all round-trip.

Git holds no binaries: each dir keeps the old code's text files and `tensors.json`, every
tensor of every .safetensors file it wrote (name, dtype, shape, values) with the file's sha256.
`materialize` writes the .safetensors files again and checks each against its sha256, so what
the test loads is byte for byte what the old code wrote.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "golden" / "adapters_v1"
SEED = 4321
TINY = ["model=tiny_llama", "data=math", "trainer.precision=fp32", "eval=none", f"seed={SEED}",
        "method.target_modules=[v_proj,down_proj]",   # attention and the gated MLP path (q_proj: a tiny
        # random model attends almost uniformly, so a lost q_proj tensor barely moves the loss)
        "model.arch.hidden_size=16", "model.arch.intermediate_size=24", "model.arch.num_hidden_layers=1",
        "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=1", "method.r=2"]   # small files
PACKED = "tensors.json"
LEFT_OUT = ("README.md",)   # PEFT's model card: not read by the loader
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
WRITTEN_AT_4327780 = {**METHODS, "mole": ["method=mole"]}   # the old name of the token-gated layer


def _cfg(name, methods=METHODS):
    try:
        from cola_train.compose import typed_config as compose
    except ImportError:  # the old code (--write): its compose gives the DictConfig its run took
        from cola_train.compose import compose

    return compose(TINY + methods[name])


def _base(cfg):
    from transformers import set_seed

    from cola_train.models import load_model, resolve_dtype

    set_seed(SEED)
    return load_model(cfg.model, resolve_dtype(cfg.model.dtype))


def evaluate(model) -> tuple:
    """(loss, [[logit, ...] at each sequence's last position]) of the model in eval mode on a
    fixed batch; the logits rounded to the shortest decimals that read back as the same float32."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, 259, (2, 24), generator=gen)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    last = out.logits[:, -1, :].float().numpy()
    return float(out.loss), [[float(str(v)) for v in row] for row in last]


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

    cfg = _cfg(name, WRITTEN_AT_4327780)
    torch.set_num_threads(1)
    targets = list(cfg.method.target_modules or target_modules(cfg.model))
    model = adapters.attach_adapter(_base(cfg), chain.adapter_method(cfg.method), targets, seed=SEED)
    _perturb(model, 1)
    if cfg.method.kind == "chain":
        adapters.commit_adapter(model)
        adapters.reinit_adapter(model)
        _perturb(model, 2)
    adapters.save_adapter(model, FIXTURES / name)
    return evaluate(model)


LOSS_RTOL = 1e-6    # the loaded model computes what the saving one did: same ops, same order
LOGIT_ATOL = 1e-6


def mismatch(name: str, loss: float, logits) -> str | None:
    """None when `loss` and `logits` are what the old code recorded for `name` (losses.json,
    logits.json); else what differs, in words."""
    import numpy as np

    want_loss = json.loads((FIXTURES / "losses.json").read_text())[name]
    want_logits = np.asarray(json.loads((FIXTURES / "logits.json").read_text())[name], dtype=np.float64)
    worst = float(np.abs(np.asarray(logits, dtype=np.float64) - want_logits).max())
    if abs(loss - want_loss) > LOSS_RTOL * abs(want_loss) or worst > LOGIT_ATOL:
        return f"loss {loss:.7f} (old code: {want_loss:.7f}), logits off by up to {worst:.1e}"
    return None


def pack(name: str) -> None:
    """FIXTURES/<name>/*.safetensors -> FIXTURES/<name>/tensors.json (names, dtypes, shapes,
    values as the shortest decimal that reads back to the same float, each file's sha256)."""
    import numpy as np
    from safetensors import safe_open

    packed = {}
    for path in sorted((FIXTURES / name).glob("*.safetensors")):
        tensors = {}
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata()
            for key in f.keys():
                value = f.get_tensor(key)
                tensors[key] = {"dtype": str(value.dtype), "shape": list(value.shape),
                                "values": [float(str(v)) for v in np.asarray(value).reshape(-1)]}
        packed[path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "metadata": metadata,
                             "tensors": tensors}
    (FIXTURES / name / PACKED).write_text(json.dumps(packed, separators=(",", ":")) + "\n")
    for left_out in LEFT_OUT:
        (FIXTURES / name / left_out).unlink(missing_ok=True)


def materialize(name: str, directory: Path) -> Path:
    """The adapter dir the old code wrote, in `directory`/<name>: its text files copied, each
    .safetensors written from tensors.json; ValueError when one differs from the file's sha256."""
    import numpy as np
    from safetensors.numpy import save_file

    out = Path(directory) / name
    out.mkdir(parents=True, exist_ok=True)
    for path in (FIXTURES / name).iterdir():
        if path.name != PACKED and path.suffix != ".safetensors":
            shutil.copy(path, out / path.name)
    for file_name, packed in json.loads((FIXTURES / name / PACKED).read_text()).items():
        tensors = {key: np.asarray(t["values"], dtype=t["dtype"]).reshape(t["shape"])
                   for key, t in packed["tensors"].items()}
        save_file(tensors, str(out / file_name), metadata=packed["metadata"])
        digest = hashlib.sha256((out / file_name).read_bytes()).hexdigest()
        if digest != packed["sha256"]:
            raise ValueError(f"{name}/{file_name} written from {PACKED} has sha256 {digest}, not the old "
                             f"code's {packed['sha256']}")
    return out


_LOAD_CFG: dict = {}


def load(name: str, directory: Path | None = None) -> tuple:
    """(loss, last-position logits) of a fresh base with the saved adapter (in `directory`,
    default FIXTURES/<name>) loaded by this code."""
    import torch

    from cola_train import adapters

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if name not in _LOAD_CFG:   # composed once per method: a test loads a method many times
        _LOAD_CFG[name] = _cfg(name)
    try:
        return evaluate(adapters.load_adapter(_base(_LOAD_CFG[name]), directory or FIXTURES / name))
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the dirs (run with the old code)")
    parser.add_argument("--pack", action="store_true", help="their .safetensors into tensors.json")
    args = parser.parse_args(argv)
    if args.pack:
        for name in METHODS:
            pack(name)
        return 0
    if args.write:
        written = {name: write(name) for name in METHODS}
        losses = {name: loss for name, (loss, _) in written.items()}
        (FIXTURES / "losses.json").write_text(json.dumps(losses, indent=1) + "\n")
        (FIXTURES / "logits.json").write_text(json.dumps({name: logits for name, (_, logits) in written.items()},
                                                         separators=(",", ":")) + "\n")
        print(json.dumps(losses, indent=1))
        return 0
    import tempfile

    tmp, failed = Path(tempfile.mkdtemp()), 0
    for name in METHODS:
        loss, logits = load(name, materialize(name, tmp))
        wrong = mismatch(name, loss, logits)
        failed += wrong is not None
        print(f"{name:24s} loss {loss:.6f}: {wrong or 'as the old code computed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
