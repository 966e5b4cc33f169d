"""`data.packing=true`: padding-free batches. The batch's examples are concatenated into one row,
with position ids restarting at 0 for each example and the first label of each example masked
(-100), so that no padding token is ever computed and no token attends across examples.

Why: the default run's batches are short GSM8K records of unequal length; padded to the longest,
part of every step is spent on padding, and each new padded length is a new shape for the GPU.
Packing is what LLaMA-Factory calls neat_packing and TRL padding_free; the collator is
transformers' DataCollatorWithFlattening. The model sees `position_ids`, no attention mask and
`use_cache=False`: transformers' masking_utils then finds the example boundaries from the position
ids (a block-diagonal causal mask for sdpa / eager; flash-attention reads the same boundaries).

The maths is the padded batch's (tests/test_packing.py): per-example logits are equal, and the loss
is the same token mean (the Trainer counts the labels of the shifted targets, and the masked first
label of each example is no target in the padded batch either).

Refused (one line, `check`): a padded length rounding (`trainer.pad_to_multiple_of`, which packing
has no use for) and model families whose positions are not read from `position_ids` here (OPT).
TODO(lead, h-moelora): method=moelora routes by a task id per sequence; with packing a row holds
several sequences, so that combination must be refused or given a per-token task id there.
"""
from __future__ import annotations

# the families whose transformers model reads position_ids and finds packed sequences from them
PACKABLE_FAMILIES = ("llama",)


def check(cfg) -> None:
    """data.packing against the rest of the (typed) config; ConfigError in one line."""
    from ..config import ConfigError

    if not cfg.data.packing:
        return
    pad = cfg.trainer.pad_to_multiple_of
    if pad not in (1, None):
        raise ConfigError(f"data.packing=true has no padding to round, but trainer.pad_to_multiple_of={pad}; "
                          "set trainer.pad_to_multiple_of=1 or data.packing=false")
    family = str(cfg.model.family)
    if family not in PACKABLE_FAMILIES:
        raise ConfigError(f"data.packing=true needs a model whose attention separates examples by position_ids "
                          f"({', '.join(PACKABLE_FAMILIES)}), not model.family={family}; set data.packing=false")


def collator():
    """One row per batch: the examples concatenated, positions restarting per example."""
    from transformers import DataCollatorWithFlattening

    class PackedCollator(DataCollatorWithFlattening):
        """Also `use_cache=False` in every batch: transformers looks for packed sequences in the
        position ids only when the model runs without a KV cache, and a Llama model makes one by
        default (config.use_cache), in training too; with a cache every example of the row would
        attend to the ones before it (tests/test_packing.py catches that)."""

        def __call__(self, features, return_tensors=None, separator_id=None):
            return {**super().__call__(features, return_tensors, separator_id), "use_cache": False}

    return PackedCollator(return_position_ids=True, separator_id=-100)


def real_tokens(inputs) -> "int | object":
    """The tokens a batch computes on, padding left out: the attention mask's ones for a padded
    batch, every position of a packed one (no mask, no padding). A tensor for a padded batch (no
    host sync here: the caller reads it when it needs the number)."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.sum()
    return int(inputs["input_ids"].numel())
