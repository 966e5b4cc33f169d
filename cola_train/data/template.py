"""Prompt formatting and tokenization with the prompt masked out of the loss.

The model's own chat template is used when it has one (the instruction-tuned models were trained
on it); otherwise the Alpaca-style plain template. Labels are -100 on prompt tokens, so the loss
is the response's only.
"""
from __future__ import annotations

import logging
import time

from ..progress import bar

log = logging.getLogger("cola_train.data")
IGNORE = -100
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"


def _user_text(rec: dict) -> str:
    return f"{rec['instruction']}\n\n{rec['input']}".strip() if rec["input"] else rec["instruction"]


def _chat_pair(tokenizer, rec: dict) -> tuple[list[int], list[int]]:
    user = [{"role": "user", "content": _user_text(rec)}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": rec["output"]}], tokenize=False)
    if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to plain
        return _plain_pair(tokenizer, rec)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return p, r


def _plain_pair(tokenizer, rec: dict) -> tuple[list[int], list[int]]:
    prompt = PLAIN_PROMPT.format(instruction=_user_text(rec))
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        p = [tokenizer.bos_token_id] + p
    r = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p, r


def encode(tokenizer, rec: dict, template: str, cutoff_len: int) -> dict:
    use_chat = template == "chat" and getattr(tokenizer, "chat_template", None)
    prompt, response = (_chat_pair if use_chat else _plain_pair)(tokenizer, rec)
    prompt = prompt[: max(cutoff_len // 2, cutoff_len - len(response))]  # keep room for the answer
    ids = (prompt + response)[:cutoff_len]
    labels = ([IGNORE] * len(prompt) + response)[:cutoff_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_records(records: list[dict], tokenizer, template: str, cutoff_len: int):
    from datasets import Dataset

    started = time.perf_counter()
    rows = [encode(tokenizer, r, template, cutoff_len)
            for r in bar(records, desc="tokenize", total=len(records), unit="record")]
    if len(records) >= 1000:  # a pool of 15k Dolly records takes a while: say what it did
        log.info("tokenized %d records (%d tokens) in %.1f s", len(rows),
                 sum(len(r["input_ids"]) for r in rows), time.perf_counter() - started)
    return Dataset.from_list(rows)
