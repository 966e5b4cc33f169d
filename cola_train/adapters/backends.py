"""Backends: who implements a method's layers. The one seam io, chain and eval cross instead of
branching on the method's kind.

    ours  (OursBackend)  LowRankLinear + a Combiner: CoLA, HydraLoRA, our MoLE (and LoRA as 1 x 1)
    peft  (PeftBackend)  HF PEFT's LoRA / DoRA / PiSSA, the reference implementations
    full  (FullBackend)  full fine-tuning: nothing attached, every weight trains

Each answers attach, merge, unmerge, merged (merge_and_unload), commit, reinit, layer_factors,
base_layers, save, load and export. A backend object is made per model by attach/load and kept in the model's
adapter info (`adapters.backend(model)`), with what it must remember (PEFT's init/commit record).
"""
from __future__ import annotations

import glob
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..parallel import gathered  # ZeRO-3: a base weight whole for a merge; no-op otherwise
from ..progress import bar
from . import committed, gated_mlp, peft_methods, shared_qkv
from . import init as inits
from .combiners import AuxCollector, Combiner
from .lowrank import COMMITTED_A, COMMITTED_B, OPTIONAL_STATE, LowRankLinear
from .options import DEFAULT as DEFAULT_KERNELS, Kernels
from .spec import AdapterError, match_targets

WEIGHTS = "cola_adapter.safetensors"
PEFT_RECORD = "cola_peft_record.safetensors"


def our_layers(model: nn.Module) -> Dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _short(name: str) -> str:
    """A PEFT module's name as in the base model (without PeftModel's prefix)."""
    prefix = "base_model.model."
    return name[len(prefix):] if name.startswith(prefix) else name


def _log_init_time(log, cfg, n_layers: int, started: float) -> None:
    svd = f"lowrank SVD, niter={cfg.svd_niter}" if cfg.svd == "lowrank" else "exact SVD"
    log.info("%s init: %d layers, %s, %.1f s", cfg.init, n_layers, svd, time.perf_counter() - started)


class Backend:
    """The protocol (with the defaults of a backend that has no adapter layers)."""
    name = "?"
    mergeable = True
    has_adapter = True

    def __init__(self, method, cfg):
        self.method, self.cfg = method, cfg   # the registry entry and the method config

    @property
    def label(self) -> str:
        return self.method.kind

    @classmethod
    def check(cls, cfg) -> None:
        """This backend's rules of the method config beyond the common ones: AdapterError."""

    def attach(self, model: nn.Module, targets: List[str], seed: int, loading: bool, log,
               kernels: Kernels = DEFAULT_KERNELS) -> nn.Module:
        raise NotImplementedError

    def merge(self, model) -> None:
        raise NotImplementedError

    def unmerge(self, model) -> None:
        raise NotImplementedError

    def merged(self, model) -> nn.Module:
        raise NotImplementedError

    def commit(self, model) -> None:
        raise NotImplementedError

    def reinit(self, model, rank: Optional[int]) -> None:
        raise NotImplementedError

    def layer_factors(self, model) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """{layer name as in the base model: float32 (A, B)} with the live update == B @ A."""
        raise NotImplementedError

    def base_layers(self, model) -> Dict[str, nn.Module]:
        """{layer name as in the base model: its frozen base linear}: what a merge writes into (and
        whose dtype decides what a merge rounds away: chain.py's warning)."""
        raise NotImplementedError

    def save(self, model, directory: str, meta: dict) -> None:
        raise NotImplementedError

    def load(self, base_model, directory: str, meta: dict, targets: List[str], log) -> nn.Module:
        raise NotImplementedError

    def export_factors(self, model) -> Tuple[Optional[Dict[str, tuple]], Optional[str]]:
        """({PEFT key: (A, B)}, base model name) relative to the original base, or (None, None)
        when the model already is a standard PEFT adapter (save_pretrained writes it)."""
        raise NotImplementedError


class FullBackend(Backend):
    """Full fine-tuning: nothing attached, everything trainable; the whole model is saved."""
    name = "full"
    has_adapter = False

    def _none(self, what: str) -> AdapterError:
        return AdapterError(f"full fine-tuning (kind none) has no adapter to {what}")

    def attach(self, model, targets, seed, loading, log, kernels=DEFAULT_KERNELS):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def merge(self, model) -> None:
        pass

    unmerge = merge

    def merged(self, model):
        committed.fold_all(model)
        return model

    def commit(self, model) -> None:
        raise self._none("commit")

    def reinit(self, model, rank) -> None:
        raise self._none("re-initialise")

    def layer_factors(self, model):
        return {}

    def base_layers(self, model):
        return {}

    def save(self, model, directory, meta) -> None:
        model.save_pretrained(directory)

    def load(self, base_model, directory, meta, targets, log):
        _load_full(base_model, directory)
        for p in base_model.parameters():
            p.requires_grad_(True)
        return base_model

    def export_factors(self, model):
        raise AdapterError("full fine-tuning (kind none) has no adapter to export; save the model itself")


class PeftBackend(Backend):
    """LoRA, DoRA and PiSSA through HF PEFT (peft_methods.py); `record` keeps PiSSA's initial
    factors and the committed Chain-of-LoRA links, saved beside PEFT's own files."""
    name = "peft"

    def __init__(self, method, cfg, record: Optional[dict] = None):
        super().__init__(method, cfg)
        self.record = record if record is not None else {"init": {}, "commits": {}}

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.num_A != 1 or cfg.num_B != 1:
            raise AdapterError(
                f"kind 'peft' ({cfg.name}) has one A and one B: got num_A={cfg.num_A}, num_B={cfg.num_B}"
            )

    def attach(self, model, targets, seed, loading, log, kernels=DEFAULT_KERNELS):
        cfg = self.cfg
        names = match_targets(model, targets)
        started = time.perf_counter()
        peft_model, self.record = peft_methods.attach(model, cfg, targets, seed)
        if cfg.init == "pissa":
            _log_init_time(log, cfg, len(names), started)
        return peft_model

    def merge(self, model) -> None:
        # per layer, its base weight gathered: PEFT's merge_adapter does not gather under ZeRO-3
        # (our layers gather their own)
        for _, layer in peft_methods.lora_layers(model):
            with gathered([layer.get_base_layer().weight], modify=True):
                layer.merge(adapter_names=[peft_methods.ADAPTER])

    def unmerge(self, model) -> None:
        model.unmerge_adapter()

    def merged(self, model):
        committed.fold_all(model)
        return model.merge_and_unload()

    def commit(self, model) -> None:
        peft_methods.commit_factors(model, self.record)

    def reinit(self, model, rank) -> None:
        peft_methods.reinit(model, self.record, rank)

    def layer_factors(self, model):
        return {_short(n): peft_methods.current_factors(m) for n, m in peft_methods.lora_layers(model)}

    def base_layers(self, model):
        return {_short(n): m.get_base_layer() for n, m in peft_methods.lora_layers(model)}

    def save(self, model, directory, meta) -> None:
        from safetensors.torch import save_file

        model.save_pretrained(directory)
        tensors = {}
        for name, (A0, B0, coef) in self.record["init"].items():
            tensors[f"init.{name}.A0"], tensors[f"init.{name}.B0"] = A0, B0
        for name, (Ac, Bc) in self.record["commits"].items():
            tensors[f"commit.{name}.A"], tensors[f"commit.{name}.B"] = Ac, Bc
        meta["init_coef"] = {name: coef for name, (_, _, coef) in self.record["init"].items()}
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      os.path.join(directory, PEFT_RECORD))

    def load(self, base_model, directory, meta, targets, log):
        from safetensors.torch import load_file

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
        self.record = record
        return model

    def export_factors(self, model):
        record = self.record
        if not record["init"] and not record["commits"]:
            return None, None   # already a standard PEFT adapter (LoRA or DoRA)
        factors = {name: peft_methods.export_factors(name, module, record)
                   for name, module in peft_methods.lora_layers(model)}
        return factors, model.peft_config[peft_methods.ADAPTER].base_model_name_or_path


class OursBackend(Backend):
    """Our LowRankLinear with the method's combiner in every target linear."""
    name = "ours"

    @property
    def mergeable(self) -> bool:
        return self.refusal() is None

    def refusal(self) -> Optional[str]:
        """Why this method's update cannot be merged or exported (Combiner.merge_refusal), or None."""
        return self.method.combiner.from_config(self.cfg).merge_refusal()

    def attach(self, model, targets, seed, loading, log, kernels=DEFAULT_KERNELS):
        cfg, combiner_type = self.cfg, self.method.combiner
        kernels = kernels.replace(dropout_mask=cfg.dropout_mask)   # the method's choice, visible per layer
        names = match_targets(model, targets)
        for p in model.parameters():
            p.requires_grad_(False)
        collector = AuxCollector()
        layers = {}
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            combiner = combiner_type.for_layer(cfg, name, names)   # MoLA: expert count per layer group
            if combiner.routed:
                combiner.attach_collector(collector)   # the model's one collector (aux_loss)
            layer = LowRankLinear.from_config(getattr(parent, child), cfg, combiner, kernels)
            layer.init_svd = inits.SVDChoice(cfg.svd, cfg.svd_niter, inits.layer_seed(seed, name))
            setattr(parent, child, layer)
            layers[name] = layer
        if not loading and cfg.init in ("pissa", "pissa_split"):
            started = time.perf_counter()
            for layer in bar(layers.values(), desc=f"PiSSA init ({cfg.svd} SVD)", total=len(layers),
                             unit="layer"):
                layer.init_pissa() if cfg.init == "pissa" else layer.init_pissa_split()
            _log_init_time(log, cfg, len(layers), started)
        combiner_type.prepare(layers, cfg, loading)   # e.g. MoLE's experts from PEFT adapters
        combiner_type.install(model, layers, cfg, loading)   # MoLE as published: a gate per block
        gated_mlp.install(model)   # the layers that take (gate, up=up) say so (takes_gated_input)
        shared_qkv.install(model)  # static combiners only (can_share_input)
        self.collector = collector
        return model

    def _mergeable_layers(self, model):
        if not self.mergeable:
            raise AdapterError(f"{self.label} {self.refusal()}")
        return our_layers(model)

    def merge(self, model) -> None:
        for layer in self._mergeable_layers(model).values():
            layer.merge()

    def unmerge(self, model) -> None:
        for layer in self._mergeable_layers(model).values():
            layer.unmerge()

    def merged(self, model):
        committed.fold_all(model)  # merged Chain-of-LoRA links kept beside the weights
        for name, layer in self._mergeable_layers(model).items():
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base_layer)
        gated_mlp.uninstall(model)
        shared_qkv.uninstall(model)
        self.method.combiner.uninstall(model)   # MOELoRA: the task-id hook
        return model

    def commit(self, model) -> None:
        for layer in self._mergeable_layers(model).values():
            layer.commit_factors()

    def reinit(self, model, rank) -> None:
        for layer in our_layers(model).values():
            layer.commit()
            layer.reinit(rank)

    def layer_factors(self, model):
        return {name: layer.factors(dtype=torch.float32) for name, layer in self._mergeable_layers(model).items()}

    def base_layers(self, model):
        return {name: layer.base_layer for name, layer in our_layers(model).items()}

    def save(self, model, directory, meta) -> None:
        from safetensors.torch import save_file

        tensors, coefs = {}, {}
        for name, layer in our_layers(model).items():
            coefs[name] = layer.init_coef
            for key, value in layer.adapter_state().items():
                tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
        meta["init_coef"] = coefs
        save_file(tensors, os.path.join(directory, WEIGHTS))

    def load(self, base_model, directory, meta, targets, log):
        from safetensors.torch import load_file

        path = os.path.join(directory, WEIGHTS)
        if not os.path.isfile(path):
            raise AdapterError(f"{directory!r} has no {WEIGHTS} for method {self.method.describe(self.cfg)}")
        tensors = load_file(path)
        model = self.attach(base_model, targets, 0, True, log)
        layers = our_layers(model)
        per_layer = check_tensors(layers, tensors, self.cfg, directory, self.method.describe(self.cfg))
        for name, layer in layers.items():
            layer.load_adapter_state(per_layer[name], float(meta.get("init_coef", {}).get(name, 1.0)))
        return model

    def export_factors(self, model):
        if not self.mergeable:
            if self.method.combiner.routed and self.method.combiner.merge_refusal is not Combiner.merge_refusal:
                raise AdapterError(f"{self.label} {self.refusal()}")   # MOELoRA: its own reason
            raise AdapterError(f"{self.label} has an input-dependent router and cannot be written as a LoRA adapter")
        factors = {f"base_model.model.{name}": layer.export_factors() for name, layer in our_layers(model).items()}
        return factors, getattr(getattr(model, "config", None), "_name_or_path", None) or None


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


def check_tensors(layers, tensors, cfg, directory, label: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """Every saved tensor belongs to a layer of the method (`label`: how the messages name it), with the shape it has."""
    per_layer = {name: {} for name in layers}
    for key, value in tensors.items():
        name, _, local = key.rpartition(".")
        if name not in layers:  # a submodule's tensor, e.g. router.weight, mole_gate.e
            parent, _, sub = name.rpartition(".")
            if parent in layers:
                name, local = parent, f"{sub}.{local}"
        if name not in layers:
            raise AdapterError(f"adapter weight {key!r} in {directory!r} matches no {label} layer "
                               f"of this model")
        per_layer[name][local] = value
    for name, layer in layers.items():
        expected = {k: tuple(v.shape) for k, v in layer.adapter_state().items() if k not in OPTIONAL_STATE}
        got = per_layer[name]
        for key, shape in expected.items():
            if key not in got:
                raise AdapterError(f"adapter weight '{name}.{key}' missing from {directory!r} "
                                   f"(method {label})")
            if tuple(got[key].shape) != shape:
                raise AdapterError(f"adapter weight '{name}.{key}' has shape {tuple(got[key].shape)} but "
                                   f"method {label} expects {shape}")
        extra = set(got) - set(expected) - set(OPTIONAL_STATE)
        if extra:
            raise AdapterError(f"adapter weight '{name}.{sorted(extra)[0]}' is not part of method {label}")
        has_init = "A0" in got and "B0" in got
        if ("A0" in got) != ("B0" in got) or (cfg.init in ("pissa", "pissa_split") and not has_init):
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
