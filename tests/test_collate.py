"""trainer.pad_to_multiple_of: rounding the padded length up changes shapes, never the loss."""
from __future__ import annotations

import pytest
import torch

from cola_train.collate import collator, pad_multiple
from cola_train.config import ConfigError


def test_pad_multiple_resolves_auto_by_device_and_refuses_bad_values():
    assert pad_multiple("auto", cuda=True) == 64
    assert pad_multiple("auto", cuda=False) is None
    assert pad_multiple(1) is None and pad_multiple(8) == 8
    for bad in (0, -8, "eight", True, 2.5):
        with pytest.raises(ConfigError, match="trainer.pad_to_multiple_of"):
            pad_multiple(bad)


def test_rounded_padding_keeps_the_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    from cola_train.models import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id)).eval()
    texts = ["The answer is 42.", "A short one", "Some rather longer sample text, with more tokens in it."]
    samples = []
    for t in texts:
        ids = tok(t)["input_ids"]
        samples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    plain = collator(tok, 1)([dict(s) for s in samples])
    rounded = collator(tok, 64)([dict(s) for s in samples])
    longest = max(len(s["input_ids"]) for s in samples)
    assert plain["input_ids"].shape[1] == longest
    assert rounded["input_ids"].shape[1] == 64 > longest
    with torch.no_grad():
        a = model(**plain).loss
        b = model(**rounded).loss
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
