"""trainer.compile: torch.compile each transformer block in place (regional compilation).

Why: an adapter adds many small launches per layer (rank-r GEMMs, casts, the combiner), and on a
fast GPU the CPU can fall behind launching them (docs/PERFORMANCE.md, run 6). One compiled graph,
shared by every block of the same class, launches fewer and fused kernels. In place
(`module.compile()`), so the model keeps its structure: parameter names, checkpoints and adapter
files are those of the eager model. Blocks are the classes the model lists in `_no_split_modules`
(transformers' own "repeated block" list, e.g. LlamaDecoderLayer). A training forward then builds
no KV cache: with one, every block's graph would be specialised to its layer index (an FFT run's
saved config then says use_cache=false; set it back for generation). Random ops in the graphs
(the adapters' dropout seeds, PEFT's nn.Dropout) draw from torch's generators as in eager mode
(inductor's fallback_random), so a compiled run draws eager's masks. Dynamo's guards on module
hooks are turned on (off by default): a hook added after compiling, as Chain of LoRA adds one per
merged link, then recompiles the blocks instead of being silently left out of their graph
(tests/test_compile.py caught that). Both settings are process-wide.

On torch 2.11 (the GPU machines' build) MoLE's balance loss, read from the layers after the compiled
call, came back with wrong gradients (the main loss's part all but lost; 2.13 is right), so
`check` refuses that pairing there (docs/PERFORMANCE.md, run 8).
"""
from __future__ import annotations

import torch
import torch._dynamo.config
import torch._inductor.config
from torch import nn

from .config import ConfigError


_FIRST_GOOD_TORCH = (2, 13)   # MoLE's balance loss under compile: wrong on 2.11, right on 2.13; 2.12 untested


def check(cfg) -> None:
    """trainer.compile=true pairings known to train wrongly on this torch: refused in one line."""
    from torch.torch_version import TorchVersion

    m = cfg.method
    if m.kind == "mole" and m.balance_coef > 0 and TorchVersion(torch.__version__) < _FIRST_GOOD_TORCH:
        raise ConfigError(f"trainer.compile=true with method={m.name} (balance_coef={m.balance_coef}) computes "
                          f"wrong gradients on torch {torch.__version__}; needs torch>=2.13, or "
                          "trainer.compile=false, or method.balance_coef=0")


def block_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def compile_blocks(model: nn.Module, backend="inductor") -> list[nn.Module]:
    """Compile every block in place; returns them. Raises if the model names no block class."""
    names = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"trainer.compile=true: {type(model).__name__} lists no repeated block class "
                          "(_no_split_modules) to compile")
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False):
            config.use_cache = False
    # compiled blocks run each adapted linear on its own (the q/k/v and gate/up groups hand outputs
    # between module calls, which is eager-only): with dropout each draws its own mask, and the
    # layers' options say so (results.json's adapter_kernels), not method.dropout_mask=shared
    from .adapters import set_kernels

    set_kernels(model, dropout_mask="per_layer")
    torch._inductor.config.fallback_random = True
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    for block in blocks:
        block.compile(backend=backend)
    return blocks
