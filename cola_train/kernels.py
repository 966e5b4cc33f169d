"""Fused model kernels under the adapters: liger-kernel's RMSNorm, RoPE, SwiGLU and fused linear
cross-entropy for Llama-family bases (`trainer.kernels=auto|liger|none`).

Why: a speed-minded user of HF Trainer + PEFT already gets Liger's frozen floor (-20 % step time,
-30 % memory at the Llama-3.1-8B shape, docs/PERFORMANCE.md); the adapters must be measured against
that floor and compose with it. How they compose:
- RMSNorm and SwiGLU are patched per module instance (Liger's own `model=` path), so
  `print(model)` shows LigerRMSNorm / LigerSwiGLUMLP; RoPE is Liger's module-level function;
  the fused linear cross-entropy is the causal-LM's forward (no logits tensor in training).
- Where our adapters route an MLP through their gated path (adapters/gated_mlp.py: down_proj
  keeps gate and up, silu(gate)*up recomputed in backward by our Triton kernel), that forward
  replaces Liger's SwiGLU on that MLP only: the MLP is then ours, and says so in print(model).
- Not with DeepSpeed ZeRO-3: the fused cross-entropy reads lm_head.weight outside lm_head's own
  forward, where ZeRO-3 would not have gathered it; there only RMSNorm, RoPE and SwiGLU are used.
`auto` (the default) is Liger on a CUDA device where liger-kernel is installed (the `gpu` extra)
for a Llama-family model, else none, with one log line saying why.
"""
from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger("cola_train")


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def choose(kernels: str, family: str, cuda: bool) -> tuple[str, str]:
    """(what to use, why): `kernels` resolved for this model family and machine. `liger` asked
    for where it cannot run is a ConfigError (one line); `auto` falls back quietly but says so."""
    from .config import ConfigError, Kernels, choices

    CHOICES = choices(Kernels)
    if kernels not in CHOICES:
        raise ConfigError(f"trainer.kernels={kernels!r} is not one of {', '.join(CHOICES)}")
    if kernels == "none":
        return "none", "trainer.kernels=none"
    problem = None
    if family != "llama":
        problem = f"liger kernels are wired for Llama-family models here, not model.family={family}"
    elif not cuda:
        problem = "liger kernels are Triton GPU kernels and no CUDA device is visible"
    elif not liger_installed():
        problem = "liger-kernel is not installed (pip install 'cola_train[gpu]')"
    if problem is None:
        return "liger", f"trainer.kernels={kernels}"
    if kernels == "liger":
        raise ConfigError(f"trainer.kernels=liger: {problem}; use trainer.kernels=auto or none")
    return "none", problem


# transformers' own Llama pieces, as first seen: Liger's `model=` path still swaps the module's
# classes (LlamaMLP, LlamaRMSNorm) and its RoPE function for the whole process
_ORIGINAL: dict = {}


def _llama_module():
    from transformers.models.llama import modeling_llama

    if not _ORIGINAL:
        _ORIGINAL.update({k: getattr(modeling_llama, k) for k in ("LlamaMLP", "LlamaRMSNorm", "apply_rotary_pos_emb")})
    return modeling_llama


def apply(model, choice: str, zero3: bool, targets: list[str]) -> dict:
    """Patch the (un-adapted) base model in place; returns what was applied, for results.json.

    Only this model changes: the classes Liger swaps in transformers' Llama module are put back
    at once, so a later model of the same process (the next job of an in-process sweep) is built
    from transformers' own classes, and our gated MLP path still recognises its MLPs. RoPE is a
    module-level function Liger's attention forward reads at call time: it stays Liger's while a
    liger run is in the process, and `none` puts transformers' back."""
    if choice != "liger":
        if _ORIGINAL:
            _llama_module().apply_rotary_pos_emb = _ORIGINAL["apply_rotary_pos_emb"]
        return {"name": "none"}
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    modeling_llama = _llama_module()
    flce = not zero3 and "lm_head" not in targets
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=flce, model=model)
    modeling_llama.LlamaMLP = _ORIGINAL["LlamaMLP"]
    modeling_llama.LlamaRMSNorm = _ORIGINAL["LlamaRMSNorm"]
    applied = {"name": "liger", "rms_norm": True, "rope": True, "swiglu": True,
               "fused_linear_cross_entropy": flce}
    log.info("liger kernels: RMSNorm, RoPE, SwiGLU%s", ", fused linear cross-entropy" if flce
             else " (no fused cross-entropy: %s)" % ("ZeRO-3" if zero3 else "lm_head is adapted"))
    return applied
