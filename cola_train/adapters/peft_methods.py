"""LoRA, DoRA and PiSSA through HF PEFT: the reference implementations, used as they are.

Two records are kept next to PEFT's own state (in the model's adapter info, saved by save_adapter):
  * `init`: PiSSA's initial factors per layer (PEFT moves s * B0 @ A0 out of the base), so the
    update can be exported relative to the original weights, as PEFT's own
    `path_initial_model_for_weight_conversion` does, without an extra save at step 0;
  * `commits`: updates made permanent by a schedule (Chain of LoRA): kept beside the base as a
    frozen low-rank path (committed.py) or merged into it; a reload re-adds them as that path
    and an export still starts from the original weights.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from . import committed
from . import init as inits
from .spec import AdapterError

ADAPTER = "default"


def init_lora_weights(cfg):
    """PEFT's name for the init: PiSSA with the exact SVD ("pissa") or with torch.svd_lowrank and
    method.svd_niter iterations ("pissa_niter_N", what LLaMA-Factory's --pissa_init runs)."""
    if cfg.init != "pissa":
        return True
    return "pissa" if cfg.svd == "exact" else f"pissa_niter_{cfg.svd_niter}"


def attach(model: nn.Module, cfg, targets: List[str], seed: int = 0):
    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(targets),
        use_dora=cfg.use_dora,
        init_lora_weights=init_lora_weights(cfg),
        task_type="CAUSAL_LM",
    )
    # pissa_niter draws its sketch from the global generators: seeded here, so the same seed gives
    # the same factors, and forked, so the run's own random stream does not depend on the init
    device = next(model.parameters()).device
    with inits.seeded(seed, device):
        peft_model = get_peft_model(model, lora_cfg, autocast_adapter_dtype=False)
    return peft_model, {"init": capture_init(peft_model) if cfg.init == "pissa" else {}, "commits": {}}


def load(base_model: nn.Module, directory: str, init: Dict[str, tuple]):
    """PeftModel.from_pretrained without PEFT's second PiSSA SVD: with `init` (the recorded initial
    factors) the base weights get their residual from those factors, as attach made it, instead
    of from a new SVD -- a randomized one (pissa_niter) on another device or generator state would
    give another residual, and the loaded model would not be the trained one."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(directory)
    pissa = str(getattr(config, "init_lora_weights", "")).lower().startswith("pissa")
    if pissa and init:
        config.init_lora_weights = True
    model = PeftModel.from_pretrained(base_model, directory, is_trainable=True, config=config,
                                      autocast_adapter_dtype=False)
    if pissa and init:
        residual_from_record(model, init)
    return model


@torch.no_grad()
def residual_from_record(peft_model, init: Dict[str, tuple]) -> None:
    """W <- W - coef * B0 @ A0 for every recorded layer, computed exactly as PEFT's pissa_init does
    (float32, (coef * B) @ A), so the rebuilt base equals the one attach made, bit for bit."""
    modules = dict(lora_layers(peft_model))
    for name, (A0, B0, coef) in init.items():
        weight = modules[name].get_base_layer().weight
        w32 = weight.data.to(torch.float32)
        A0, B0 = A0.to(w32.device, torch.float32), B0.to(w32.device, torch.float32)
        weight.data = (w32 - coef * B0 @ A0).to(weight.dtype)


def lora_layers(peft_model) -> Iterator[Tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


@torch.no_grad()
def capture_init(peft_model) -> Dict[str, tuple]:
    return {
        name: (m.lora_A[ADAPTER].weight.detach().clone(), m.lora_B[ADAPTER].weight.detach().clone(),
               float(m.scaling[ADAPTER]))
        for name, m in lora_layers(peft_model)
    }


def _is_dora(module) -> bool:
    return bool(getattr(module, "use_dora", {}).get(ADAPTER, False))


@torch.no_grad()
def current_factors(module) -> Tuple[torch.Tensor, torch.Tensor]:
    A = module.lora_A[ADAPTER].weight.detach().float().clone()  # a copy: reinit resets in place
    B = module.lora_B[ADAPTER].weight.detach().float() * float(module.scaling[ADAPTER])
    return A, B


@torch.no_grad()
def export_factors(name: str, module, record: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 (A, B) with B @ A == (live model's W + update) - original W."""
    if _is_dora(module):
        raise AdapterError(f"DoRA layer {name!r} with a PiSSA init or committed merges cannot be written "
                           f"as a plain LoRA")
    As, Bs = [], []
    A, B = current_factors(module)
    As.append(A), Bs.append(B)
    if name in record["commits"]:
        Ac, Bc = record["commits"][name]
        As.append(Ac.float().to(A.device)), Bs.append(Bc.float().to(A.device))
    if name in record["init"]:
        A0, B0, coef = record["init"][name]
        As.append(A0.float().to(A.device)), Bs.append(-coef * B0.float().to(A.device))
    return torch.cat(As, 0), torch.cat(Bs, 1)


def _record_commit(record: dict, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Append a committed update of layer `name` to the record (save / export read it)."""
    if name in record["commits"]:
        Ac, Bc = record["commits"][name]
        A, B = torch.cat([Ac.float().to(A.device), A], 0), torch.cat([Bc.float().to(B.device), B], 1)
    record["commits"][name] = (A, B)


@torch.no_grad()
def apply_commits(peft_model, commits: Dict[str, tuple]) -> None:
    """Re-add committed updates to a freshly loaded base as its frozen path (committed.py): the
    effective weight W_init + Bc @ Ac, exact in any weight dtype."""
    modules = dict(lora_layers(peft_model))
    for name, (Ac, Bc) in commits.items():
        committed.append(modules[name].get_base_layer(), Ac, Bc)


@torch.no_grad()
def commit_factors(peft_model, record: dict) -> None:
    """Make the live update permanent without rounding it into the weight: it joins the base
    linear's frozen low-rank path and the record (so save / export see it); reinit follows."""
    for name, module in lora_layers(peft_model):
        if module.merged:
            raise AdapterError(f"layer {name!r} is merged; unmerge_adapter before committing its factors")
        A, B = current_factors(module)
        committed.append(module.get_base_layer(), A, B)
        _record_commit(record, name, A, B)


@torch.no_grad()
def reinit(peft_model, record: dict, rank: Optional[int]) -> None:
    """Commit a merged update (if merged), then fresh Kaiming A / zero B at `rank`."""
    config = peft_model.peft_config[ADAPTER]
    new_config = copy.deepcopy(config)
    new_config.init_lora_weights = True
    if rank is not None:
        new_config.r = rank
    for name, module in lora_layers(peft_model):
        if module.merged:
            if _is_dora(module):
                raise AdapterError(f"DoRA layer {name!r}: a merged DoRA update is not low-rank and cannot be "
                                   f"committed; unmerge_adapter first")
            _record_commit(record, name, *current_factors(module))
            module.merged_adapters = []
        if _is_dora(module) or (rank is not None and rank != module.r[ADAPTER]):
            module.update_layer(ADAPTER, new_config.r, new_config.lora_alpha, config=new_config)
        else:
            module.reset_lora_parameters(ADAPTER, True)
    config.r = new_config.r
