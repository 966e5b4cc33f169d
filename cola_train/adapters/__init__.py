"""Every PEFT method of the study behind one small surface.

    model = attach_adapter(model, cfg.method, default_targets)   # freeze base, wrap targets
    ... train: resample(model, step, seed) each optimizer step; loss += aux_loss(model) ...
    save_adapter(model, dir); model = load_adapter(fresh_base, dir)
    merge_adapter / unmerge_adapter / merged_model / export_peft / commit_adapter / reinit_adapter

kind -> implementation: none (full fine-tuning: nothing attached, all trainable), peft (LoRA, DoRA,
PiSSA via HF PEFT), cola (CoLALinear: fully / random / heuristic), hydralora (HydraLoRALinear),
mole (MoLELinear). `chain` is a schedule around one of these (see commit_adapter/reinit_adapter).
"""
from __future__ import annotations

import logging
import time
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..progress import bar
from . import committed, fp32_path, gated_mlp, peft_methods, shared_qkv
from . import init as inits
from .cola_layer import CoLALinear, resample
from .hydralora import HydraLoRALinear
from .io import (adapter_info, export_peft, load_adapter, our_layers, require_info, save_adapter, set_info,
                 unwrap)
from .layer import AdapterLinear
from .mole import MoLELinear, aux_loss, load_experts
from .spec import AdapterError, match_targets, method_config, validate

LAYERS = {"cola": CoLALinear, "hydralora": HydraLoRALinear, "mole": MoLELinear}
log = logging.getLogger("cola_train.adapters")

__all__ = [
    "AdapterError", "attach_adapter", "save_adapter", "load_adapter", "merge_adapter", "unmerge_adapter",
    "merged_model", "export_peft", "commit_adapter", "reinit_adapter", "trainable_parameters", "aux_loss", "resample",
    "CoLALinear", "HydraLoRALinear", "MoLELinear", "adapter_info",
]


def attach_adapter(model: nn.Module, method_cfg, default_targets: Optional[List[str]] = None,
                   _loading: bool = False, seed: int = 0) -> nn.Module:
    """Freeze the base and wrap the target nn.Linear modules (matched by name suffix, like PEFT).

    Returns a PeftModel for kind peft, the same model with our layers for cola/hydralora/mole, and
    the untouched (fully trainable) model for kind none. `_loading` skips the data-dependent init
    (SVD, expert files): load_adapter fills the tensors from disk. `seed` seeds the randomized
    SVD of a PiSSA-style init (method.svd=lowrank; per layer, see init.layer_seed), so the same
    seed rebuilds the same factors.
    """
    cfg = method_config(method_cfg)
    validate(cfg)
    if adapter_info(model) is not None or any(isinstance(m, AdapterLinear) for m in model.modules()) \
            or hasattr(model, "peft_config"):
        raise AdapterError("model already has an adapter attached; attach to a fresh base model")
    targets = list(cfg.target_modules) if cfg.target_modules else list(default_targets or [])
    cfg.target_modules = targets
    if cfg.kind == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        set_info(model, {"method": cfg, "targets": targets})
        return model

    names = match_targets(model, targets)
    if cfg.kind == "peft":
        started = time.perf_counter()
        peft_model, record = peft_methods.attach(model, cfg, targets, seed)
        if cfg.init == "pissa":
            _log_init_time(cfg, len(names), started)
        set_info(peft_model, {"method": cfg, "targets": targets, "peft": record})
        return peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LAYERS[cfg.kind].from_config(getattr(parent, child), cfg)
        layer.init_svd = inits.SVDChoice(cfg.svd, cfg.svd_niter, inits.layer_seed(seed, name))
        setattr(parent, child, layer)
        layers[name] = layer
    if not _loading:
        if cfg.init == "pissa":
            started = time.perf_counter()
            for layer in bar(layers.values(), desc=f"PiSSA init ({cfg.svd} SVD)", total=len(layers),
                             unit="layer"):
                layer.init_pissa()
            _log_init_time(cfg, len(layers), started)
        if cfg.kind == "mole" and cfg.expert_paths:
            load_experts(layers, list(cfg.expert_paths))
    if cfg.kind == "mole" and cfg.freeze_experts:
        for layer in layers.values():
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)
    if cfg.kind in ("cola", "hydralora", "mole"):
        gated_mlp.install(model)   # the layers that take (gate, up=up) say so (takes_gated_input)
        shared_qkv.install(model)  # CoLA's layers only (shared_input_forward)
    set_info(model, {"method": cfg, "targets": targets})
    return model


def _log_init_time(cfg, n_layers: int, started: float) -> None:
    svd = f"lowrank SVD, niter={cfg.svd_niter}" if cfg.svd == "lowrank" else "exact SVD"
    log.info("%s init: %d layers, %s, %.1f s", cfg.init, n_layers, svd, time.perf_counter() - started)


def _mergeable_layers(model: nn.Module, kind: str):
    layers = our_layers(model)
    for layer in layers.values():
        if not layer.mergeable:
            raise AdapterError(f"{kind} routes each token: its update depends on the input and cannot be merged")
    return layers


def merge_adapter(model: nn.Module) -> None:
    """W <- W + dW in every adapted layer (CoLA random: the eval-mode expectation); the layers then
    skip their update until unmerge_adapter. For inference, or before reinit_adapter (Chain of LoRA)."""
    model = unwrap(model)
    kind = require_info(model)["method"].kind
    if kind == "peft":
        model.merge_adapter()
    elif kind != "none":
        for layer in _mergeable_layers(model, kind).values():
            layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    model = unwrap(model)
    kind = require_info(model)["method"].kind
    if kind == "peft":
        model.unmerge_adapter()
    elif kind != "none":
        for layer in _mergeable_layers(model, kind).values():
            layer.unmerge()


def merged_model(model: nn.Module) -> nn.Module:
    """A plain HF model with the update folded into its weights (consumes the adapted model, like
    PEFT's merge_and_unload); `save_pretrained` on it writes an ordinary checkpoint."""
    model = unwrap(model)
    kind = require_info(model)["method"].kind
    committed.fold_all(model)  # merged Chain-of-LoRA links kept beside the weights
    if kind == "none":
        set_info(model, None)
        return model
    if kind == "peft":
        plain = model.merge_and_unload()
        set_info(plain, None)
        return plain
    for name, layer in _mergeable_layers(model, kind).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    gated_mlp.uninstall(model)
    shared_qkv.uninstall(model)
    set_info(model, None)
    return model


def commit_adapter(model: nn.Module) -> None:
    """Next Chain-of-LoRA link, exactly: the live update joins a frozen low-rank path beside each
    base weight for good (committed.py), then reinit_adapter starts afresh. Unlike merge_adapter +
    reinit_adapter nothing is rounded to the weights' dtype (bf16 drops most of a small update)."""
    model = unwrap(model)
    info = require_info(model)
    kind = info["method"].kind
    if kind == "none":
        raise AdapterError("full fine-tuning (kind none) has no adapter to commit")
    if kind == "peft":
        peft_methods.commit_factors(model, info["peft"])
    else:
        for layer in _mergeable_layers(model, kind).values():
            layer.commit_factors()


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
    info = require_info(model)
    cfg = info["method"]
    if cfg.kind == "none":
        raise AdapterError("full fine-tuning (kind none) has no adapter to re-initialise")
    if cfg.kind == "peft":
        peft_methods.reinit(model, info["peft"], rank)
    else:
        for layer in our_layers(model).values():
            layer.commit()
            layer.reinit(rank)
    if rank is not None:
        cfg.r = rank


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) element counts; DeepSpeed ZeRO-3 partitioned parameters count in full."""
    def numel(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(unwrap(model).parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)
