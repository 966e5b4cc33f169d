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

import glob
import json
import os
from typing import Dict, Optional, Union

import torch
from torch import nn

from . import peft_methods
from .layer import COMMITTED_A, COMMITTED_B, OPTIONAL_STATE, AdapterLinear
from .spec import AdapterError, config_dict, method_config, validate

META = "cola_adapter.json"
WEIGHTS = "cola_adapter.safetensors"
PEFT_RECORD = "cola_peft_record.safetensors"
FORMAT = "cola_train.adapter/1"
STRUCTURAL = ("kind", "strategy", "pairing", "num_A", "num_B", "r", "init", "use_dora")
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


def our_layers(model: nn.Module) -> Dict[str, AdapterLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def _describe(cfg) -> str:
    if cfg.kind == "cola" and cfg.strategy == "heuristic":
        return (f"cola/heuristic (pairing={cfg.pairing}, num_A={cfg.num_A}, num_B={cfg.num_B}, r={cfg.r}, "
                f"init={cfg.init})")
    if cfg.kind == "cola":
        return f"cola/{cfg.strategy} (num_A={cfg.num_A}, num_B={cfg.num_B}, r={cfg.r}, init={cfg.init})"
    if cfg.kind == "hydralora":
        return f"hydralora (num_B={cfg.num_B}, r={cfg.r}, init={cfg.init})"
    if cfg.kind == "mole":
        return f"mole (num_A={cfg.num_A}, r={cfg.r}, init={cfg.init})"
    return f"{cfg.name} (kind={cfg.kind}, r={cfg.r}, init={cfg.init}, use_dora={cfg.use_dora})"


# -- save ----------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    from safetensors.torch import save_file

    directory = os.fspath(directory)

    model = unwrap(model)
    info = require_info(model)
    cfg = info["method"]
    os.makedirs(directory, exist_ok=True)
    meta = {"format": FORMAT, "method": config_dict(cfg), "targets": list(info["targets"])}
    if cfg.kind == "none":
        model.save_pretrained(directory)
    elif cfg.kind == "peft":
        model.save_pretrained(directory)
        record = info["peft"]
        tensors = {}
        for name, (A0, B0, coef) in record["init"].items():
            tensors[f"init.{name}.A0"], tensors[f"init.{name}.B0"] = A0, B0
        for name, (Ac, Bc) in record["commits"].items():
            tensors[f"commit.{name}.A"], tensors[f"commit.{name}.B"] = Ac, Bc
        meta["init_coef"] = {name: coef for name, (_, _, coef) in record["init"].items()}
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      os.path.join(directory, PEFT_RECORD))
    else:
        tensors, coefs = {}, {}
        for name, layer in our_layers(model).items():
            coefs[name] = layer.init_coef
            for key, value in layer.adapter_state().items():
                tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
        meta["init_coef"] = coefs
        save_file(tensors, os.path.join(directory, WEIGHTS))
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
    for field in STRUCTURAL:
        if field == "strategy" and saved.kind != "cola":
            continue
        if field == "pairing" and (saved.kind, saved.strategy) != ("cola", "heuristic"):
            continue
        if getattr(saved, field) != getattr(given, field):
            raise AdapterError(
                f"adapter in {directory!r} is {_describe(saved)} but the config asks for {_describe(given)}: "
                f"{field} {getattr(saved, field)!r} != {getattr(given, field)!r}"
            )


def load_adapter(base_model: nn.Module, directory: Union[str, os.PathLike], method_cfg=None) -> nn.Module:
    from safetensors.torch import load_file

    directory = os.fspath(directory)

    from . import attach_adapter  # the registry lives in __init__

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

    if cfg.kind == "none":
        _load_full(base_model, directory)
        for p in base_model.parameters():
            p.requires_grad_(True)
        set_info(base_model, {"method": cfg, "targets": list(meta["targets"])})
        return base_model

    if cfg.kind == "peft":
        record = {"init": {}, "commits": {}}
        path = os.path.join(directory, PEFT_RECORD)
        tensors = load_file(path) if os.path.isfile(path) else {}
        for name, coef in meta.get("init_coef", {}).items():
            record["init"][name] = (tensors[f"init.{name}.A0"], tensors[f"init.{name}.B0"], coef)
        for key in tensors:
            if key.startswith("commit.") and key.endswith(".A"):
                name = key[len("commit."):-2]
                record["commits"][name] = (tensors[key], tensors[f"commit.{name}.B"])
        model = peft_methods.load(base_model, directory, record["init"])
        peft_methods.apply_commits(model, record["commits"])
        set_info(model, {"method": cfg, "targets": list(meta["targets"]), "peft": record})
        return model

    path = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(path):
        raise AdapterError(f"{directory!r} has no {WEIGHTS} for method {_describe(cfg)}")
    tensors = load_file(path)
    model = attach_adapter(base_model, cfg, list(meta["targets"]), _loading=True)
    layers = our_layers(model)
    per_layer = _check_tensors(layers, tensors, cfg, directory)
    for name, layer in layers.items():
        layer.load_adapter_state(per_layer[name], float(meta.get("init_coef", {}).get(name, 1.0)))
    return model


def _check_tensors(layers, tensors, cfg, directory) -> Dict[str, Dict[str, torch.Tensor]]:
    per_layer = {name: {} for name in layers}
    for key, value in tensors.items():
        name, _, local = key.rpartition(".")
        if local.startswith("weight"):  # submodule parameter, e.g. router.weight
            name, _, sub = name.rpartition(".")
            local = f"{sub}.{local}"
        if name not in layers:
            raise AdapterError(f"adapter weight {key!r} in {directory!r} matches no {_describe(cfg)} layer "
                               f"of this model")
        per_layer[name][local] = value
    for name, layer in layers.items():
        expected = {k: tuple(v.shape) for k, v in layer.adapter_state().items() if k not in OPTIONAL_STATE}
        got = per_layer[name]
        for key, shape in expected.items():
            if key not in got:
                raise AdapterError(f"adapter weight '{name}.{key}' missing from {directory!r} "
                                   f"(method {_describe(cfg)})")
            if tuple(got[key].shape) != shape:
                raise AdapterError(f"adapter weight '{name}.{key}' has shape {tuple(got[key].shape)} but "
                                   f"method {_describe(cfg)} expects {shape}")
        extra = set(got) - set(expected) - set(OPTIONAL_STATE)
        if extra:
            raise AdapterError(f"adapter weight '{name}.{sorted(extra)[0]}' is not part of method {_describe(cfg)}")
        has_init = "A0" in got and "B0" in got
        if ("A0" in got) != ("B0" in got) or (cfg.init == "pissa" and not has_init):
            raise AdapterError(f"adapter layer {name!r} in {directory!r} lacks its initial factors A0/B0")
        if (COMMITTED_A in got) != (COMMITTED_B in got):
            raise AdapterError(f"adapter layer {name!r} in {directory!r} has only one of its committed factors "
                               f"{COMMITTED_A}/{COMMITTED_B}")
        for a_key, b_key in (("A0", "B0"), (COMMITTED_A, COMMITTED_B)):
            if a_key not in got:
                continue
            A0, B0 = got[a_key], got[b_key]
            if (A0.dim() != 2 or B0.dim() != 2 or A0.shape[1] != layer.in_features
                    or B0.shape[0] != layer.out_features or A0.shape[0] != B0.shape[1]):
                raise AdapterError(f"adapter layer {name!r}: {a_key} {tuple(A0.shape)} / {b_key} {tuple(B0.shape)} "
                                   f"do not fit in={layer.in_features}, out={layer.out_features}")
    return per_layer


def _load_full(model: nn.Module, directory: str) -> None:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(directory, "model*.safetensors")))
    if not files:
        raise AdapterError(f"{directory!r} has no model*.safetensors for a full fine-tuning checkpoint")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise AdapterError(f"checkpoint weight {unexpected[0]!r} in {directory!r} is not part of this model")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    for key in missing:  # tied weights (e.g. lm_head) are saved once
        if key in params and params[key].data_ptr() not in loaded:
            raise AdapterError(f"model weight {key!r} missing from {directory!r}")


# -- merge / export ------------------------------------------------------------------------------
def export_peft(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write the adapter as a standard PEFT LoRA for the ORIGINAL base: B @ A = W_final - W_original,
    lora_alpha = r so PEFT's scaling is 1 (ours is folded into B)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    model = unwrap(model)
    info = require_info(model)
    cfg = info["method"]
    if cfg.kind == "none":
        raise AdapterError("full fine-tuning (kind none) has no adapter to export; save the model itself")
    if cfg.kind in ("hydralora", "mole"):
        raise AdapterError(f"{cfg.kind} has an input-dependent router and cannot be written as a LoRA adapter")
    factors: Dict[str, tuple] = {}
    if cfg.kind == "peft":
        record = info["peft"]
        if not record["init"] and not record["commits"]:
            model.save_pretrained(directory)  # already a standard PEFT adapter (LoRA or DoRA)
            return
        for name, module in peft_methods.lora_layers(model):
            factors[name] = peft_methods.export_factors(name, module, record)
        base_name = model.peft_config[peft_methods.ADAPTER].base_model_name_or_path
    else:
        for name, layer in our_layers(model).items():
            factors[f"base_model.model.{name}"] = layer.export_factors()
        base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
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
