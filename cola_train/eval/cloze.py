"""Cloze scoring (eval.scoring=cloze): each option's text as the continuation of a prompt that
does not list the options, the lm-evaluation-harness way of scoring multiple choice.

Prompt (eval.chat_template=false; with true it is the user turn of the chat template, followed
by the generation prompt, and the continuation starts without the space):

    The following are questions (with answers) about <subject>.

    <question>
    Answer:

Continuation: " <option text>". Its log-likelihood is the sum over its tokens of
log p(token | everything before it), with the tokens split as lm-eval splits them:
encode(prompt + continuation) minus the first len(encode(prompt)) tokens. The prediction is the
argmax over the options of log-likelihood / len(option text), lm-eval's `acc_norm` (it divides
by the length in characters of the choice string, `float(len(choice))`; 0-shot, no delimiter).
Scoring by letter asks the model to map an answer to a label it has just read; cloze asks how
likely the answer's own words are, so it does not depend on the model having learnt the
"A./B." format (small and base models often have not).

One forward per (question, option) pair, batched by length, left-padded, keeping only the
logits of the last continuation-length positions.
"""
from __future__ import annotations

import logging

import torch

from .benchmarks import EvalDataError
from .scorer import ANSWER_CUE, batched_logits, chat_prompt, _encode, _max_length

log = logging.getLogger("cola_train.eval")


def cloze_prompt(example: dict) -> str:
    subject = example["subject"].replace("_", " ")
    return (f"The following are questions (with answers) about {subject}.\n\n"
            f"{example['question']}\n{ANSWER_CUE}")


def _pair(tokenizer, context: str, continuation: str, chat_template: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's _encode_pair splits them."""
    encode = (lambda t: _encode(tokenizer, t)) if chat_template else (lambda t: list(tokenizer(t)["input_ids"]))
    whole, ctx = encode(context + continuation), encode(context)
    cont = whole[len(ctx):]
    if not cont:
        raise EvalDataError(f"option {continuation.strip()!r} encodes to no tokens after its prompt")
    return whole[: len(ctx)], cont


def cloze_scores(model, tokenizer, examples: list[dict], batch_size: int = 16, device=None,
                 max_length: int | None = None, progress: bool | None = None,
                 chat_template: bool = False) -> tuple[list[list[float]], list[list[float]], int]:
    """(per example: [normalised score of each option], [its raw log-likelihood], number of
    sequences cut from the left to fit the model)."""
    if not examples:
        return [], [], 0
    max_length = max_length or _max_length(model, tokenizer)
    seqs, conts, owners, truncated = [], [], [], 0
    for e, ex in enumerate(examples):
        context = cloze_prompt(ex)
        if chat_template:
            context = chat_prompt(tokenizer, context)
        sep = "" if chat_template else " "
        for k, option in enumerate(ex["options"]):
            ctx, cont = _pair(tokenizer, context, sep + option, chat_template)
            seq = ctx + cont
            if max_length and len(seq) > max_length:
                if len(cont) >= max_length:
                    raise EvalDataError(f"option {k} of {ex.get('source', 'an example')} is longer than "
                                        f"the model's {max_length} tokens")
                seq, truncated = seq[-max_length:], truncated + 1
            seqs.append(seq)
            conts.append(cont)
            owners.append((e, k))
    if truncated:
        log.warning("%d cloze sequence(s) longer than %d tokens were cut from the left", truncated, max_length)
    lls = [0.0] * len(seqs)
    keep = lambda rows: 1 + max(len(conts[i]) for i in rows)   # noqa: E731 - the continuation's predictions
    for batch, logits in batched_logits(model, tokenizer, seqs, batch_size, device, keep=keep,
                                        progress=progress, desc="benchmark (cloze)"):
        width = logits.shape[1]
        for row, i in enumerate(batch):
            c = len(conts[i])
            # position width-1 predicts the token after the sequence: the continuation's tokens
            # are predicted by the c positions before it
            picked = logits[row, width - 1 - c: width - 1].float().log_softmax(-1)
            target = torch.tensor(conts[i], device=picked.device)
            lls[i] = float(picked.gather(-1, target[:, None]).sum())
    raw = [[0.0] * len(ex["options"]) for ex in examples]
    norm = [[0.0] * len(ex["options"]) for ex in examples]
    for (e, k), ll in zip(owners, lls):
        raw[e][k] = ll
        norm[e][k] = ll / max(1, len(examples[e]["options"][k]))
    return norm, raw, truncated
