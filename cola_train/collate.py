"""How a batch of tokenized samples becomes tensors: padded to the longest sample, optionally
rounded up (`trainer.pad_to_multiple_of`).

Why the option: every new sequence length is a new shape for the GPU, and the profile of a default
8B run (docs/PERFORMANCE.md run 11) showed cuDNN's attention spending ~2 ms of host time per call.
Rounding the padded length up to a multiple of 64 leaves at most cutoff_len / 64 shapes. Measured in
the same way (run 11, call B) it did not make the default run faster (median step 460 against 436 ms
without), so it is off by default (1); `auto` rounds to 64 on a CUDA device and not on a CPU. The
extra positions are padding: masked in attention and -100 in the labels, so the loss is the same to
float rounding (tests/test_collate.py).
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


def collator(tokenizer, value: Any = 1, packing: bool = False):
    """The batch collator: padded to the longest (rounded up by `value`), or with `packing` the
    examples in one row without padding (data/packing.py)."""
    if packing:
        from .data.packing import collator as packed

        return packed()
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100,
                                  pad_to_multiple_of=pad_multiple(value))
