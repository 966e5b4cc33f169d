"""Every PEFT method of the study behind one small surface.

    model = attach_adapter(model, cfg.method, default_targets)   # freeze base, wrap targets
    ... train: resample(model, step, seed) each optimizer step; loss += aux_loss(model) ...
    save_adapter(model, dir); model = load_adapter(fresh_base, dir)
    merge_adapter / unmerge_adapter / merged_model / export_peft / commit_adapter / reinit_adapter

Two seams (DESIGN.md, "The adapter family"): a method is a Backend (backends.py: ours, HF PEFT,
full fine-tuning) and, for ours, a Combiner (combiners.py) inside the one low-rank layer
(lowrank.LowRankLinear); registry.py maps each method to them in one line. The functions here
ask the model's backend (`backend(model)`) and never branch on the method's kind. `chain` is a
schedule around one of these (see commit_adapter/reinit_adapter).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import committed, fp32_path, gated_mlp, registry, shared_qkv, task_input  # noqa: F401  (public modules)
from .combiners import AuxCollector, Combiner, RoutedCombiner, StaticCombiner
from .io import (adapter_info, backend, export_peft, load_adapter, our_layers, require_info, save_adapter,
                 set_info, unwrap)
from .lowrank import LowRankLinear
from .options import Kernels
from .registry import validate
from .spec import AdapterError, method_config

AdapterLinear = LowRankLinear   # the name before the one-layer refactor
log = logging.getLogger("cola_train.adapters")

__all__ = [
    "AdapterError", "attach_adapter", "save_adapter", "load_adapter", "merge_adapter", "unmerge_adapter",
    "merged_model", "export_peft", "commit_adapter", "reinit_adapter", "trainable_parameters", "aux_loss", "resample",
    "LowRankLinear", "Combiner", "StaticCombiner", "RoutedCombiner", "Kernels", "adapter_info", "backend",
    "set_kernels", "kernels_of", "layer_factors", "base_layers", "set_default_task",
]


def attach_adapter(model: nn.Module, method_cfg, default_targets: Optional[List[str]] = None,
                   _loading: bool = False, seed: int = 0, kernels: Optional[Kernels] = None) -> nn.Module:
    """Freeze the base and wrap the target nn.Linear modules (matched by name suffix, like PEFT).

    Returns a PeftModel for the PEFT backend, the same model with LowRankLinear layers for ours,
    and the untouched (fully trainable) model for full fine-tuning. `_loading` skips the
    data-dependent init (SVD, expert files): load_adapter fills the tensors from disk. `seed`
    seeds the randomized SVD of a PiSSA-style init (method.svd=lowrank; per layer, see
    init.layer_seed), so the same seed rebuilds the same factors. `kernels`: the computation our
    layers choose (options.Kernels; the defaults when None).
    """
    cfg = method_config(method_cfg)
    validate(cfg)
    if adapter_info(model) is not None or any(isinstance(m, LowRankLinear) for m in model.modules()) \
            or hasattr(model, "peft_config"):
        raise AdapterError("model already has an adapter attached; attach to a fresh base model")
    targets = list(cfg.target_modules) if cfg.target_modules else list(default_targets or [])
    cfg.target_modules = targets
    chosen = registry.lookup(cfg).make_backend(cfg)
    model = chosen.attach(model, targets, seed, _loading, log, kernels or Kernels())
    set_info(model, {"method": cfg, "targets": targets, "backend": chosen})
    return model


def merge_adapter(model: nn.Module) -> None:
    """W <- W + dW in every adapted layer (CoLA random: the eval-mode expectation); the layers then
    skip their update until unmerge_adapter. For inference, or before reinit_adapter (Chain of LoRA)."""
    model = unwrap(model)
    backend(model).merge(model)


def unmerge_adapter(model: nn.Module) -> None:
    model = unwrap(model)
    backend(model).unmerge(model)


def merged_model(model: nn.Module) -> nn.Module:
    """A plain HF model with the update folded into its weights (consumes the adapted model, like
    PEFT's merge_and_unload); `save_pretrained` on it writes an ordinary checkpoint."""
    model = unwrap(model)
    plain = backend(model).merged(model)
    set_info(model, None)
    set_info(plain, None)
    return plain


def commit_adapter(model: nn.Module) -> None:
    """Next Chain-of-LoRA link, exactly: the live update joins a frozen low-rank path beside each
    base weight for good (committed.py), then reinit_adapter starts afresh. Unlike merge_adapter +
    reinit_adapter nothing is rounded to the weights' dtype (bf16 drops most of a small update)."""
    model = unwrap(model)
    backend(model).commit(model)


def reinit_adapter(model: nn.Module, rank: Optional[int] = None) -> None:
    """Next Chain-of-LoRA link: a merged update is committed to the base for good (and recorded, so
    save/export stay relative to the original base), then fresh Kaiming A's and zero B's.

    Without merge_adapter first, the current update is discarded. Same rank: parameters are reset
    in place (optimizer references stay valid, its state should still be reset); a new rank makes
    new parameter tensors, so the optimizer must be rebuilt.
    """
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"reinit rank must be an integer >= 1, got {rank!r}")
    model = unwrap(model)
    backend(model).reinit(model, rank)
    if rank is not None:
        require_info(model)["method"].r = rank


def layer_factors(model: nn.Module):
    """{layer name as in the base model: float32 (A, B)} with each layer's live (mergeable) update
    == B @ A, scaling folded into B."""
    model = unwrap(model)
    return backend(model).layer_factors(model)


def base_layers(model: nn.Module):
    """{layer name as in the base model: the frozen base linear under its adapter}."""
    model = unwrap(model)
    return backend(model).base_layers(model)


def aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The routed layers' aux losses (our MoLE's balance loss times method.balance_coef) from their
    latest training forward, or None: taken from the model's AuxCollector(s)."""
    collectors = {}
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            found = getattr(module.combiner, "collector", None)
            if found is not None:
                collectors.setdefault(id(found), found)
    total = None
    for collector in collectors.values():
        term = collector.loss()
        if term is not None:
            total = term if total is None else total + term.to(total.device)
    return total


def resample(model: nn.Module, step: int, seed: int) -> None:
    """Set every random-pairing layer's pairing for optimizer step `step`.

    One CPU generator seeded by (seed, step) walks the layers in module order, so the draw is a
    pure function of (seed, step): identical on every rank and after a resume.
    """
    from . import pairing

    gen = None
    for module in model.modules():
        if isinstance(module, LowRankLinear) and hasattr(module.combiner, "resample"):
            gen = gen or pairing.generator(seed, step)
            module.combiner.resample(module, gen)


def set_kernels(model: nn.Module, **changes) -> int:
    """Change the kernel options (options.Kernels) of every LowRankLinear of `model`; the count."""
    layers = [m for m in unwrap(model).modules() if isinstance(m, LowRankLinear)]
    for layer in layers:
        layer.kernels = layer.kernels.replace(**changes)
    return len(layers)


def kernels_of(model: nn.Module) -> Optional[dict]:
    """The kernel options of the model's layers (one dict when they all agree), for results.json."""
    found = {m.kernels for m in unwrap(model).modules() if isinstance(m, LowRankLinear)}
    if not found:
        return None
    return found.pop().as_dict() if len(found) == 1 else {"mixed": [k.as_dict() for k in found]}


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) element counts; DeepSpeed ZeRO-3 partitioned parameters count in full."""
    def numel(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(unwrap(model).parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def set_default_task(model: nn.Module, task: Optional[int]) -> int:
    """Make `task` (None: the mean of the task gates) the task of a forward without task ids, and
    the one merge / export serve, in every MOELoRA layer of `model` (a run loaded for eval or
    export with `method.default_task=<id>`: the saved adapter keeps the value it was trained
    with). Returns how many layers changed; 0 for other methods."""
    model = unwrap(model)
    info = adapter_info(model)
    layers = [m for m in our_layers(model).values() if hasattr(m.combiner, "default_task")]
    if not layers:
        return 0
    num_tasks = layers[0].combiner.num_tasks
    if task is not None and not 0 <= int(task) < num_tasks:
        raise AdapterError(f"method.default_task={task} must be null (the mean of the task gates) or a task id "
                           f"in 0..{num_tasks - 1}")
    for layer in layers:
        layer.combiner.default_task = task
    found = getattr(model, task_input.ATTR, None)
    if isinstance(found, task_input.TaskInput):
        found.default_task = task
    if info is not None:
        info["method"].default_task = task   # the backend's config too (merge / export ask it)
    return len(layers)
