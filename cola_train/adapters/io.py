"""Save, load, merge and export: small files next to an untouched base model.

Directory layout written by `save_adapter`:
    cola_adapter.json            method config, resolved targets, per-layer init coefficients
    cola_adapter.safetensors     our layers' tensors (cola / hydralora / mole)
    adapter_config.json,         PEFT's own files (peft kinds; save_pretrained)
    adapter_model.safetensors
    cola_peft_record.safetensors PiSSA initial factors / committed merges (peft kinds, if any)
    model*.safetensors ...       the whole model (kind none: full fine-tuning has no adapter)
`export_peft` writes a standard PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
for the ORIGINAL base model.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Union

import torch
from torch import nn

from . import registry
from .backends import PEFT_RECORD, WEIGHTS, our_layers  # noqa: F401  (their old home)
from .backends import check_tensors as _backend_check_tensors
from .lowrank import COMMITTED_A, COMMITTED_B, OPTIONAL_STATE
from .registry import validate
from .spec import AdapterError, config_dict, method_config

META = "cola_adapter.json"
FORMAT = "cola_train.adapter/1"
log = logging.getLogger("cola_train.adapters")
# fields every saved adapter must match; a method adds its own (registry.Method.structural)
STRUCTURAL = ("kind", "num_A", "num_B", "r", "init", "use_dora")
# An adapter saved before method.pairing existed was trained with the authors' code pairing.
PAIRING_BEFORE_RECORDED = "code"


# -- adapter info kept on the model ------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed-engine wrappers (they hold the real model in `.module`)."""
    while adapter_info(model) is None and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def adapter_info(model: nn.Module) -> Optional[dict]:
    return model.__dict__.get("_cola_adapter")  # not getattr: PeftModel forwards missing attributes


def set_info(model: nn.Module, info: Optional[dict]) -> None:
    if info is None:
        model.__dict__.pop("_cola_adapter", None)
    else:
        model.__dict__["_cola_adapter"] = info


def require_info(model: nn.Module) -> dict:
    info = adapter_info(model)
    if info is None:
        raise AdapterError("model has no adapter attached by cola_train (call attach_adapter or load_adapter)")
    return info


def backend(model: nn.Module):
    """The Backend (backends.py) that attached the model's adapter."""
    return require_info(unwrap(model))["backend"]


def describe(cfg) -> str:
    return registry.lookup(cfg).describe(cfg)


_describe = describe


# -- save ----------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    directory = os.fspath(directory)

    model = unwrap(model)
    info = require_info(model)
    cfg = info["method"]
    os.makedirs(directory, exist_ok=True)
    meta = {"format": FORMAT, "method": config_dict(cfg), "targets": list(info["targets"])}
    info["backend"].save(model, directory, meta)
    with open(os.path.join(directory, META), "w") as fh:
        json.dump(meta, fh, indent=2)


# -- load ----------------------------------------------------------------------------------------
def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        raise AdapterError(f"{directory!r} is not a saved cola_train adapter (no {META})")
    with open(path) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def check_same_method(saved, given, directory: str) -> None:
    method = registry.lookup(saved)
    for field in STRUCTURAL[:1] + method.structural + STRUCTURAL[1:]:
        if getattr(saved, field) != getattr(given, field):
            raise AdapterError(
                f"adapter in {directory!r} is {describe(saved)} but the config asks for {describe(given)}: "
                f"{field} {getattr(saved, field)!r} != {getattr(given, field)!r}"
            )


def load_adapter(base_model: nn.Module, directory: Union[str, os.PathLike], method_cfg=None) -> nn.Module:
    directory = os.fspath(directory)

    meta = read_meta(directory)
    # saved before method.svd existed: made with the exact SVD and a float64 residual, which the
    # reload must rebuild the same way
    meta["method"].setdefault("svd", "exact")
    cfg = method_config({"pairing": PAIRING_BEFORE_RECORDED, **meta["method"]})
    validate(cfg)
    if method_cfg is not None:
        given = method_config(method_cfg)
        validate(given)
        check_same_method(cfg, given, directory)
    cfg.target_modules = list(meta["targets"])
    if adapter_info(base_model) is not None:
        raise AdapterError("load_adapter needs a fresh base model; this one already has an adapter")
    backend = registry.lookup(cfg).make_backend(cfg)
    model = backend.load(base_model, directory, meta, list(meta["targets"]), log)
    set_info(model, {"method": cfg, "targets": list(meta["targets"]), "backend": backend})
    return model


def check_tensors(layers, tensors, cfg, directory) -> Dict[str, Dict[str, torch.Tensor]]:
    """backends.check_tensors, the method named as describe() names it."""
    return _backend_check_tensors(layers, tensors, cfg, directory, describe(cfg))


_check_tensors = check_tensors


# -- merge / export ------------------------------------------------------------------------------
def export_peft(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write the adapter as a standard PEFT LoRA for the ORIGINAL base: B @ A = W_final - W_original,
    lora_alpha = r so PEFT's scaling is 1 (ours is folded into B)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    model = unwrap(model)
    info = require_info(model)
    factors, base_name = info["backend"].export_factors(model)
    if factors is None:
        model.save_pretrained(directory)  # already a standard PEFT adapter (LoRA or DoRA)
        return
    rank = max(A.shape[0] for A, _ in factors.values())
    tensors = {}
    for key, (A, B) in factors.items():
        pad = rank - A.shape[0]  # zero rows/columns change nothing
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])], 0)
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1)
        tensors[f"{key}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = B.contiguous().cpu()
    os.makedirs(directory, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(info["targets"]),
               init_lora_weights=True, task_type="CAUSAL_LM",
               base_model_name_or_path=base_name).save_pretrained(directory)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
