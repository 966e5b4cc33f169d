"""How a batch of tokenized samples becomes tensors: padded to the longest sample, rounded up.

Why round up (`trainer.pad_to_multiple_of`): every new sequence length is a new shape for the GPU.
With lengths that differ every step, cuDNN's attention builds a new execution plan in each layer,
forward and backward (about 2 ms of host time per call on an H200, a third of a default 8B step:
docs/PERFORMANCE.md run 11), and cuBLAS picks tiles afresh. Rounding the padded length up to a
multiple of 64 leaves at most cutoff_len / 64 shapes, each planned once. The extra positions are
padding: masked in attention and -100 in the labels, so the loss is the same (to float rounding).
`auto` rounds to 64 on a CUDA device and not at all on a CPU, where shapes cost nothing to plan
and the padding would only add work.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .config import ConfigError

AUTO_MULTIPLE = 64


def pad_multiple(value: Any, cuda: Optional[bool] = None) -> Optional[int]:
    """trainer.pad_to_multiple_of resolved: an int >= 1 (1: no rounding) or `auto`."""
    if value == "auto":
        cuda = torch.cuda.is_available() if cuda is None else cuda
        return AUTO_MULTIPLE if cuda else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"trainer.pad_to_multiple_of={value!r} must be auto or an integer >= 1")
    return None if value == 1 else value


def collator(tokenizer, value: Any = "auto"):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100,
                                  pad_to_multiple_of=pad_multiple(value))
