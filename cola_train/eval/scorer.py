"""Zero-shot multiple choice by option fill, batched, on the model being trained.

Prompt (eval.chat_template=false, plain text):

    The following are multiple choice questions (with answers) about <subject>.

    <question>
    A. <option A>
    B. <option B>
    ...
    Answer:

With eval.chat_template=true that whole text, "Answer:" included, is the user turn of the
tokenizer's chat template followed by its generation prompt (the assistant header), and the
letter is scored as the first token of the assistant's reply: what the authors' evaluator
(LLaMA-Factory with `--template llama3`) does.

Letter scoring (eval.scoring=letter): the model reads the prompt once; the prediction is the
option letter whose token gets the highest next-token logit at the end of the prompt, among this
question's letters only. Cloze scoring (eval.scoring=cloze) is in cloze.py.

Letter-token rule (`letter_tokens`): the letter's token is what the tokenizer produces for the
text that follows "Answer:", i.e. encode("Answer: A") minus encode("Answer:") (chat template:
encode(<prompt> + "A") minus encode(<prompt>), no space, as the reply starts with the letter). For BPE
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
from .benchmarks import LETTERS, EvalDataError

log = logging.getLogger("cola_train.eval")

ANSWER_CUE = "Answer:"


def build_prompt(example: dict) -> str:
    subject = example["subject"].replace("_", " ")
    lines = [f"The following are multiple choice questions (with answers) about {subject}.", "",
             example["question"]]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(example["options"])]
    lines.append(ANSWER_CUE)
    return "\n".join(lines)


def chat_prompt(tokenizer, text: str) -> str:
    """`text` as the user turn of the tokenizer's chat template, ending with the generation
    prompt (the assistant header), so the next token is the first of the reply."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise EvalDataError(f"eval.chat_template=true but the tokenizer {name!r} has no chat template; "
                            "set eval.chat_template=false or model.tokenizer to one that has a template")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, text: str, chat_template: bool) -> list[int]:
    """Token ids of a prompt: plain text with the tokenizer's special tokens (BOS), or the chat
    template's text as it stands (the template writes its own BOS, as data/template.py trains)."""
    if chat_template:
        return _encode(tokenizer, chat_prompt(tokenizer, text))
    return list(tokenizer(text)["input_ids"])


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def letter_tokens(tokenizer, n_letters: int = len(LETTERS),
                  chat_template: bool = False) -> tuple[list[int], list[int]]:
    """(ids appended to every prompt after "Answer:", one token id per letter A, B, ...); with
    the chat template, the letter follows the generation prompt directly (no space)."""
    cue_text, sep = (chat_prompt(tokenizer, ANSWER_CUE), "") if chat_template else (ANSWER_CUE, " ")
    where = "the chat template's generation prompt" if chat_template else repr(ANSWER_CUE)
    cue = _encode(tokenizer, cue_text)
    tails = []
    for letter in LETTERS[:n_letters]:
        full = _encode(tokenizer, f"{cue_text}{sep}{letter}")
        if full[: len(cue)] != cue:
            raise EvalDataError(f"tokenizer encodes {where} differently when followed by "
                                f"{sep + letter!r}: cannot find the answer letter's token")
        tails.append(full[len(cue):])
    shared = 0
    while all(len(t) > shared + 1 for t in tails) and len({t[shared] for t in tails}) == 1:
        shared += 1
    prefix = tails[0][:shared]
    if any(len(t) != shared + 1 for t in tails):
        bad = [LETTERS[i] for i, t in enumerate(tails) if len(t) != shared + 1]
        raise EvalDataError(f"answer letter(s) {', '.join(bad)} are not a single token after "
                            f"{where} with this tokenizer")
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
                  progress: bool | None = None,
                  chat_template: bool = False) -> tuple[list[list[float]], int]:
    """The next-token logits of each example's option letters at the end of its prompt.

    Returns (per example: [logit of A, logit of B, ...], number of prompts left-truncated).
    Batches are built from length-sorted prompts, left-padded, with an attention mask and
    position ids that start at 0 on each row's first real token, so every row sees exactly
    what it would see alone.
    """
    if not examples:
        return [], 0
    n_letters = max(len(ex["options"]) for ex in examples)
    prefix, ids = letter_tokens(tokenizer, n_letters, chat_template)
    max_length = max_length or _max_length(model, tokenizer)
    encoded, truncated = [], 0
    for ex in bar(examples, desc="benchmark prompts", total=len(examples), unit="prompt",
                  enabled=progress):
        seq = prompt_ids(tokenizer, build_prompt(ex), chat_template) + prefix
        if max_length and len(seq) > max_length:
            seq, truncated = seq[-max_length:], truncated + 1
        encoded.append(seq)
    if truncated:
        log.warning("%d prompt(s) longer than %d tokens were cut from the left", truncated,
                    max_length)
    scores: list[list[float] | None] = [None] * len(examples)
    letter_index = None
    for batch, logits in batched_logits(model, tokenizer, encoded, batch_size, device,
                                        keep=lambda rows: 1, progress=progress):
        if letter_index is None:
            letter_index = torch.tensor(ids, device=logits.device)
        last = logits[:, -1, :].float().index_select(-1, letter_index).cpu()
        for row, i in enumerate(batch):
            scores[i] = last[row, : len(examples[i]["options"])].tolist()
    return scores, truncated  # type: ignore[return-value]


def batched_logits(model, tokenizer, encoded: list[list[int]], batch_size: int, device=None,
                   keep=lambda rows: 1, progress: bool | None = None, desc: str = "benchmark"):
    """Yield (row indices, logits of the last keep(rows) positions) over length-sorted,
    left-padded batches of the token sequences `encoded`; the model in eval mode, no grad,
    its training mode restored at the end. Position ids start at 0 on each row's first real
    token, so every row sees exactly what it would see alone."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0  # any id works: padded positions are masked out and never read
    device = torch.device(device) if device is not None else _model_device(model)
    accepted = _forward_kwargs(model)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batch_iter = bar(batches, desc=desc, unit="batch", enabled=progress)

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
                n_keep = min(width, int(keep(batch)))
                if "position_ids" in accepted:
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
                if "logits_to_keep" in accepted:
                    kwargs["logits_to_keep"] = n_keep
                if "use_cache" in accepted:
                    kwargs["use_cache"] = False
                out = model(**kwargs)
                logits = out.logits if hasattr(out, "logits") else out[0]
                yield batch, logits[:, -n_keep:, :]
    finally:
        model.train(was_training)
