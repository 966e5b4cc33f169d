#!/usr/bin/env python
"""Where a CLI training step's aten ops come from: the real run (cola_train's ColaTrainer, the
configs' defaults) against a bare loop (forward, backward, fused AdamW step) on the same model and
the same batch, counted per optimizer step with a TorchDispatchMode, on the CPU.

    python scripts/count_ops.py                                  # tiny_llama, cola_heuristic, fp32
    python scripts/count_ops.py method=lora trainer.precision=bf16 data.packing=true

Why: at the 8B shape the default run is host-bound (docs/PERFORMANCE.md, "The CLI path"): ~30k aten
ops a step against ~8.4k in bench_throughput's step for the same adapters. Every aten op costs
host time whatever its size, so the op count is the CPU-measurable proxy for the host cost. The
run's step is split into what the Trainer does around the model:
collate (the data collator), forward (per decoder layer and outside the layers), loss + aux
(compute_loss around the forward), backward, grad clip + norm, optimizer, scheduler, zero_grad,
callbacks, and the rest of the Trainer's loop. Prints a table; --json writes the counts.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = ["model=tiny_llama", "data=math", "data.max_samples=16", "data.max_val_samples=8",
        "data.cutoff_len=256", "trainer.max_steps=6", "trainer.warmup_steps=2", "eval=none",
        "logger=none", "trainer.save_steps=0", "trainer.logging_steps=1"]


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched, by the category on top of `stack` and by op name."""

    def __init__(self):
        super().__init__()
        self.stack = ["other"]
        self.by_category: collections.Counter = collections.Counter()
        self.by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            cat = self.stack[-1]
            self.by_category[cat] += 1
            self.by_op[cat][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def category(self, name):
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()


def _wrap(counter: OpCounter, name: str, fn):
    def wrapped(*a, **k):
        with counter.category(name):
            return fn(*a, **k)
    return wrapped


def _layer_hooks(counter: OpCounter, model) -> None:
    """Forward ops inside a decoder layer vs outside (embedding, final norm, lm_head)."""
    layers = None
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
            layers = module.layers
            break
    def enter(name):
        def hook(module, args):
            counter.stack.append(name)
        return hook

    def leave(module, args, output):
        counter.stack.pop()

    model.register_forward_pre_hook(enter("forward (outside layers)"))
    model.register_forward_hook(leave)
    for layer in layers or []:
        layer.register_forward_pre_hook(enter("forward (decoder layers)"))
        layer.register_forward_hook(leave)


def count_trainer(overrides: list[str], measure_step: int) -> tuple[OpCounter, dict]:
    """The real CLI run (run.run on the composed config) with the counter on optimizer step
    `measure_step`; also returns one batch of that run and the config, for the bare loop."""
    from transformers import TrainerCallback

    from cola_train import run as run_mod, trainer as trainer_mod
    from cola_train.compose import compose

    counter = OpCounter()
    seen = {}

    class Window(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            t = seen["trainer"]
            acc = t.accelerator
            acc.backward = _wrap(counter, "backward", acc.backward)
            acc.clip_grad_norm_ = _wrap(counter, "grad clip + norm", acc.clip_grad_norm_)
            t.optimizer.step = _wrap(counter, "optimizer", t.optimizer.step)
            t.model.zero_grad = _wrap(counter, "zero_grad", t.model.zero_grad)
            handler = t.callback_handler
            handler.call_event = _wrap(counter, "callbacks", handler.call_event)
            _layer_hooks(counter, t.model)

        def on_step_end(self, args, state, control, **kw):
            # the window: from the end of step measure_step - 1 to the end of step measure_step,
            # so the next step's batch fetch (collation) and every hook between fall inside it
            if state.global_step == measure_step - 1:
                counter.active = True
            elif state.global_step == measure_step:
                counter.active = False

    class Counted(trainer_mod.ColaTrainer):
        def __init__(self, *a, **k):
            collate = k.get("data_collator")

            def collate_and_keep(features):
                batch = collate(features)
                seen.setdefault("batch", batch)
                return batch
            k["data_collator"] = _wrap(counter, "collate", collate_and_keep)
            k["callbacks"] = [*k.get("callbacks", []), Window()]
            super().__init__(*a, **k)
            seen["trainer"] = self

        def compute_loss(self, *a, **k):
            with counter.category("loss + aux (around forward)"):
                return super().compute_loss(*a, **k)

    cfg = compose(overrides)
    original = trainer_mod.ColaTrainer
    trainer_mod.ColaTrainer = Counted
    try:
        with counter, tempfile.TemporaryDirectory() as out:
            run_mod.run(cfg, Path(out))
    finally:
        trainer_mod.ColaTrainer = original
    return counter, {"batch": seen["batch"], "cfg": cfg}


def count_bare(cfg, batch, steps: int = 2) -> OpCounter:
    """forward (under the run's autocast), backward, fused AdamW step, zero_grad(set_to_none) on the
    model the CLI builds, on the batch the run trained on first."""
    from cola_train import run as run_mod

    torch.manual_seed(0)
    _, model, _ = run_mod.build_model(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    counter = OpCounter()
    _layer_hooks(counter, model)
    mixed = run_mod._precision(cfg)  # the Trainer's autocast, so both sides compute alike
    dtype = torch.bfloat16 if mixed["bf16"] else torch.float16 if mixed["fp16"] else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype else contextlib.nullcontext
    with counter:
        for i in range(steps):
            counter.active = i == steps - 1
            with counter.category("loss + aux (around forward)"), autocast():
                loss = model(**batch).loss
            with counter.category("backward"):
                loss.backward()
            with counter.category("optimizer"):
                opt.step()
            with counter.category("zero_grad"):
                opt.zero_grad(set_to_none=True)
    return counter


def table(trainer: OpCounter, bare: OpCounter, top: int = 6) -> str:
    cats = sorted(set(trainer.by_category) | set(bare.by_category), key=lambda c: -trainer.by_category[c])
    lines = ["| part of the step | CLI (ColaTrainer) ops | bare loop ops | CLI's top ops |", "|---|---:|---:|---|"]
    for c in cats:
        tops = ", ".join(f"{k} {v}" for k, v in trainer.by_op[c].most_common(top))
        lines.append(f"| {c} | {trainer.by_category[c]} | {bare.by_category[c]} | {tops} |")
    lines.append(f"| **total** | **{sum(trainer.by_category.values())}** | **{sum(bare.by_category.values())}** | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="CLI overrides after the tiny defaults (method=lora, ...)")
    p.add_argument("--step", type=int, default=4, help="the optimizer step counted (after warm-up ones)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = [*TINY, "method=cola_heuristic", *args.overrides]
    trainer, seen = count_trainer(overrides, args.step)
    bare = count_bare(seen["cfg"], seen["batch"])
    print(table(trainer, bare))
    if args.json:
        args.json.write_text(json.dumps({"overrides": overrides, "cli": dict(trainer.by_category),
                                         "bare": dict(bare.by_category),
                                         "cli_ops": {k: dict(v) for k, v in trainer.by_op.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
