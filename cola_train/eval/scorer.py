"""Zero-shot multiple choice by option fill, batched, on the model being trained.

Prompt (plain text, no chat template, as in the paper's evaluation):

    The following are multiple choice questions (with answers) about <subject>.

    <question>
    A. <option A>
    B. <option B>
    ...
    Answer:

The model reads the prompt once; the prediction is the option letter whose token gets the
highest next-token logit at the end of the prompt, among this question's letters only.

Letter-token rule (`letter_tokens`): the letter's token is what the tokenizer produces for the
text that follows "Answer:", i.e. encode("Answer: A") minus encode("Answer:"). For BPE
vocabularies with a space-letter token (Llama 3, GPT-2, OPT: " A"; SentencePiece: "▁A") that
is one token. Tokenizers that split the space off (byte-level without merges, some
SentencePiece setups) give [space, A]: the part shared by every letter (the space) is appended
to every prompt, and the letter token that follows it is scored. Anything else (a letter that
is not a single token after that, or two letters with the same id) is an EvalDataError.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from ..progress import bar
from .benchmarks import (LETTERS, EvalDataError, benchmark_for_domain, load_benchmark,
                         select_subset)

log = logging.getLogger("cola_train.eval")

ANSWER_CUE = "Answer:"


def build_prompt(example: dict) -> str:
    subject = example["subject"].replace("_", " ")
    lines = [f"The following are multiple choice questions (with answers) about {subject}.", "",
             example["question"]]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(example["options"])]
    lines.append(ANSWER_CUE)
    return "\n".join(lines)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def letter_tokens(tokenizer, n_letters: int = len(LETTERS)) -> tuple[list[int], list[int]]:
    """(ids appended to every prompt after "Answer:", one token id per letter A, B, ...)."""
    cue = _encode(tokenizer, ANSWER_CUE)
    tails = []
    for letter in LETTERS[:n_letters]:
        full = _encode(tokenizer, f"{ANSWER_CUE} {letter}")
        if full[: len(cue)] != cue:
            raise EvalDataError(f"tokenizer encodes {ANSWER_CUE!r} differently when followed by "
                                f"' {letter}': cannot find the answer letter's token")
        tails.append(full[len(cue):])
    shared = 0
    while all(len(t) > shared + 1 for t in tails) and len({t[shared] for t in tails}) == 1:
        shared += 1
    prefix = tails[0][:shared]
    if any(len(t) != shared + 1 for t in tails):
        bad = [LETTERS[i] for i, t in enumerate(tails) if len(t) != shared + 1]
        raise EvalDataError(f"answer letter(s) {', '.join(bad)} are not a single token after "
                            f"{ANSWER_CUE!r} with this tokenizer")
    ids = [t[shared] for t in tails]
    if len(set(ids)) != len(ids):
        raise EvalDataError("two answer letters share a token id with this tokenizer")
    return prefix, ids


def _unwrap(model):
    """The transformers model inside PEFT / DeepSpeed wrappers (for its forward signature)."""
    inner = model
    for _ in range(4):
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif type(inner).__name__ == "DeepSpeedEngine" and hasattr(inner, "module"):
            inner = inner.module
        else:
            break
    return inner


def _forward_kwargs(model) -> set[str]:
    """Which of position_ids / logits_to_keep / use_cache the model's forward takes."""
    try:
        outer = inspect.signature(model.forward).parameters
        inner = inspect.signature(_unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return set()
    passes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in outer.values())
    return {k for k in ("position_ids", "logits_to_keep", "use_cache")
            if k in inner and (k in outer or passes_kwargs)}


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _max_length(model, tokenizer) -> int | None:
    limits = []
    config = getattr(_unwrap(model), "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    return min(limits) if limits else None


def letter_logits(model, tokenizer, examples: list[dict], batch_size: int = 16,
                  device=None, max_length: int | None = None,
                  progress: bool | None = None) -> tuple[list[list[float]], int]:
    """The next-token logits of each example's option letters at the end of its prompt.

    Returns (per example: [logit of A, logit of B, ...], number of prompts left-truncated).
    Batches are built from length-sorted prompts, left-padded, with an attention mask and
    position ids that start at 0 on each row's first real token, so every row sees exactly
    what it would see alone.
    """
    if not examples:
        return [], 0
    n_letters = max(len(ex["options"]) for ex in examples)
    prefix, ids = letter_tokens(tokenizer, n_letters)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0  # any id works: padded positions are masked out and never read
    max_length = max_length or _max_length(model, tokenizer)
    device = torch.device(device) if device is not None else _model_device(model)
    accepted = _forward_kwargs(model)

    encoded, truncated = [], 0
    for ex in bar(examples, desc="benchmark prompts", total=len(examples), unit="prompt",
                  enabled=progress):
        seq = list(tokenizer(build_prompt(ex))["input_ids"]) + prefix
        if max_length and len(seq) > max_length:
            seq, truncated = seq[-max_length:], truncated + 1
        encoded.append(seq)
    if truncated:
        log.warning("%d prompt(s) longer than %d tokens were cut from the left", truncated,
                    max_length)

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    scores: list[list[float] | None] = [None] * len(examples)
    letter_index = torch.tensor(ids, device=device)

    batch_iter = bar(batches, desc="benchmark", unit="batch", enabled=progress)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batch_iter:
                width = max(len(encoded[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    seq = encoded[i]
                    input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                    mask[row, width - len(seq):] = 1
                kwargs: dict[str, Any] = {"input_ids": input_ids.to(device),
                                          "attention_mask": mask.to(device)}
                if "position_ids" in accepted:
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
                if "logits_to_keep" in accepted:
                    kwargs["logits_to_keep"] = 1
                if "use_cache" in accepted:
                    kwargs["use_cache"] = False
                out = model(**kwargs)
                logits = out.logits if hasattr(out, "logits") else out[0]
                last = logits[:, -1, :].float().index_select(-1, letter_index).cpu()
                for row, i in enumerate(batch):
                    scores[i] = last[row, : len(examples[i]["options"])].tolist()
    finally:
        model.train(was_training)
    return scores, truncated  # type: ignore[return-value]


def evaluate_benchmark(model, tokenizer, examples: list[dict], batch_size: int = 16,
                       max_examples: int | None = None, device=None,
                       return_predictions: bool = False) -> dict:
    """Accuracy of `model` on `examples` (from a loader): micro (mean over examples), macro
    (mean over subjects), per subject; n_skipped is the loader's count of skipped rows."""
    n_skipped = getattr(examples, "n_skipped", 0)
    chosen = select_subset(list(examples), max_examples)
    if not chosen:
        raise EvalDataError("no benchmark examples to evaluate")
    scores, truncated = letter_logits(model, tokenizer, chosen, batch_size=batch_size,
                                      device=device)
    per_subject: dict[str, dict] = {}
    predictions, n_correct = [], 0
    for ex, s in zip(chosen, scores):
        pred = LETTERS[max(range(len(s)), key=s.__getitem__)]
        ok = pred == ex["answer"]
        n_correct += ok
        entry = per_subject.setdefault(ex["subject"], {"correct": 0, "n": 0})
        entry["correct"] += ok
        entry["n"] += 1
        predictions.append({"source": ex["source"], "prediction": pred, "answer": ex["answer"]})
    for entry in per_subject.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
    result = {
        "accuracy": n_correct / len(chosen),
        "macro_accuracy": sum(e["accuracy"] for e in per_subject.values()) / len(per_subject),
        "per_subject": dict(sorted(per_subject.items())),
        "n_examples": len(chosen),
        "n_skipped": n_skipped,
        "n_truncated": truncated,
    }
    if return_predictions:
        result["predictions"] = predictions
    return result


def run_benchmark(model, tokenizer, eval_cfg, domain: str, data_root) -> dict:
    """Load the benchmark that `eval_cfg` (or else the domain) names and score the model."""
    name = getattr(eval_cfg, "benchmark", None) or benchmark_for_domain(domain)
    subjects = getattr(eval_cfg, "subjects", None)
    if subjects is not None:
        subjects = list(subjects)
    examples = load_benchmark(name, data_root, subjects=subjects,
                              skip_bad_rows=bool(getattr(eval_cfg, "skip_bad_rows", False)))
    max_examples = getattr(eval_cfg, "max_examples", None)
    log.info("benchmark %s: scoring %d of %d questions", name,
             len(examples) if max_examples is None else min(max_examples, len(examples)), len(examples))
    result = evaluate_benchmark(model, tokenizer, examples,
                                batch_size=int(getattr(eval_cfg, "batch_size", 16) or 16),
                                max_examples=max_examples)
    log.info("benchmark %s: accuracy %.4f (macro %.4f) on %d examples, %d row(s) skipped",
             name, result["accuracy"], result["macro_accuracy"], result["n_examples"],
             result["n_skipped"])
    return {"name": name, **result, "subjects": subjects, "max_examples": max_examples,
            "skipped_rows": list(getattr(examples, "skipped", []))}
