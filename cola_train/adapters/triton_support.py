"""Where the package's own Triton kernels run: eager mode on a CUDA GPU with Triton installed.

Elsewhere (CPU, float64, torch.compile, which writes its own kernels) the same maths runs as torch ops;
tests on a GPU compare the two."""
from __future__ import annotations

import torch


def available(x: torch.Tensor) -> bool:
    if x.device.type != "cuda" or x.dtype == torch.float64 or torch.compiler.is_compiling():
        return False
    from torch.utils._triton import has_triton
    return has_triton()
