"""data.packing=true: padding-free batches (cola_train/data/packing.py) compute what the padded
batch computes. The reference is each example run alone, with neither padding nor packing."""
from __future__ import annotations

import pytest
import torch

from cola_train.collate import collator
from cola_train.config import ConfigError
from cola_train.data.packing import real_tokens

TEXTS = ["The answer is 42.", "A short one", "Some rather longer sample text, with more tokens in it."]


def _model(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cola_train.models import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = attn
    return tok, LlamaForCausalLM(cfg).eval()


def _samples(tok):
    out = []
    for t in TEXTS:
        ids = tok(t)["input_ids"]
        labels = [-100] * 3 + list(ids[3:])  # a masked prompt, as the templates make
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def _alone(model, sample):
    """Logits and (summed CE, target count) of one example with no padding and no packing."""
    ids = torch.tensor([sample["input_ids"]])
    labels = torch.tensor(sample["labels"])
    logits = model(input_ids=ids).logits[0]
    targets = labels[1:]
    keep = targets != -100
    ce = torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum")
    return logits, ce, int(keep.sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_matches_each_example_alone_and_the_padded_loss(attn):
    tok, model = _model(attn)
    samples = _samples(tok)
    packed = collator(tok, 1, packing=True)([dict(s) for s in samples])
    padded = collator(tok, 1)([dict(s) for s in samples])
    lengths = [len(s["input_ids"]) for s in samples]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    with torch.no_grad():
        out = model(**packed)
        alone = [_alone(model, s) for s in samples]
        padded_loss = model(**padded).loss
    for logits, piece in zip([a[0] for a in alone], torch.split(out.logits[0], lengths)):
        torch.testing.assert_close(piece, logits, rtol=1e-5, atol=1e-5)
    reference = sum(a[1] for a in alone) / sum(a[2] for a in alone)  # one token mean over the batch
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded_loss, reference, rtol=1e-5, atol=1e-6)


def test_trainer_counts_real_tokens_and_the_same_loss_packed_or_padded(tmp_path):
    """ColaTrainer.compute_loss, as the Trainer calls it (num_items_in_batch: the shifted targets):
    the same loss and the same trained tokens (padding left out) for both collators."""
    from transformers import TrainingArguments

    from cola_train.trainer import ColaTrainer

    tok, model = _model("sdpa")
    samples = _samples(tok)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True)
    trainer = ColaTrainer(model=model, args=args)
    model.train()
    results = []
    for packing in (False, True):
        batch = collator(tok, 1, packing=packing)([dict(s) for s in samples])
        trainer.trained_tokens = 0
        items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch, num_items_in_batch=items)
        results.append((loss, trainer.trained_tokens))
    (padded_loss, padded_tokens), (packed_loss, packed_tokens) = results
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert padded_tokens == packed_tokens == sum(len(s["input_ids"]) for s in samples)


def test_real_tokens_leaves_padding_out():
    from cola_train.models import byte_tokenizer

    tok = byte_tokenizer()
    samples = _samples(tok)
    padded = collator(tok, 64)([dict(s) for s in samples])
    assert padded["input_ids"].numel() == 3 * 64
    assert int(real_tokens(padded)) == real_tokens(collator(tok, 1, packing=True)([dict(s) for s in samples]))


@pytest.mark.parametrize("overrides,pattern", [
    (["trainer.pad_to_multiple_of=64"], r"data.packing=true has no padding to round, but trainer.pad_to_multiple_of=64"),
    (["model=tiny_opt"], r"data.packing=true needs a model whose attention separates examples by position_ids .*model.family=opt"),
])
def test_packing_refuses_what_cannot_work(overrides, pattern):
    from conftest import compose

    from cola_train.checks import validate

    cfg = compose(["model=tiny_llama", "data.packing=true", *overrides])
    with pytest.raises(ConfigError, match=pattern):
        validate(cfg)
    validate(compose(["model=tiny_llama", "data.packing=true"]))  # alone: accepted
