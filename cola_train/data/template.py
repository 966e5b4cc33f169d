"""Prompt formatting and tokenization with the prompt masked out of the loss.

The model's own chat template is used when it has one (the instruction-tuned models were trained
on it); otherwise the Alpaca-style plain template. Labels are -100 on prompt tokens, so the loss
is the response's only; in a multi-turn conversation (own data, data/custom.py), on every
assistant turn and nothing else.
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
    prompt, response = _prompt_response(tokenizer, rec, template)
    return _truncated(prompt, response, cutoff_len)


def _prompt_response(tokenizer, rec: dict, template: str) -> tuple[list[int], list[int]]:
    use_chat = template == "chat" and getattr(tokenizer, "chat_template", None)
    return (_chat_pair if use_chat else _plain_pair)(tokenizer, rec)


def _truncated(prompt: list[int], response: list[int], cutoff_len: int) -> dict:
    prompt = prompt[: max(cutoff_len // 2, cutoff_len - len(response))]  # keep room for the answer
    ids = (prompt + response)[:cutoff_len]
    labels = ([IGNORE] * len(prompt) + response)[:cutoff_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


# ----------------------------------------------------------------------------------------------
# own data (data/custom.py): multi-turn chats, loss on the assistant turns; plain text


class TemplateRefused(ValueError):
    """The tokenizer's chat template raised on a conversation (e.g. roles that must alternate)."""


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]] | None:
    """The conversation as (text, trains) pieces in the tokenizer's chat template: the template
    rendered up to each assistant turn's generation prompt (masked), then up to the end of that
    turn (trained: the assistant's text and the template's end-of-turn marker). None when a
    template rewrites earlier turns, so that one rendering is not a prefix of the next."""
    pieces, done = [], ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        try:
            head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        except Exception as err:  # noqa: BLE001 - jinja's TemplateError and friends: a bad record
            raise TemplateRefused(f"the tokenizer's chat template refused it: {str(err).splitlines()[0]}") from None
        if not head.startswith(done) or not full.startswith(head):
            return None
        pieces += [(head[len(done):], False), (full[len(head):], True)]
        done = full
    return pieces


def _plain_segments(tokenizer, messages: list[dict]) -> list[tuple[list[int], bool]]:
    """The plain template of `_plain_pair`, turn after turn: each user turn is an
    '### Instruction' block ending in '### Response:', each assistant turn its text and EOS."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces, pending = [], ""
    for turn in messages:
        if turn["role"] == "system":
            pending += f"### System:\n{turn['content']}\n\n"
        elif turn["role"] == "user":
            pending += PLAIN_PROMPT.format(instruction=turn["content"])
        else:
            pieces += [(bos + _ids(tokenizer, pending), False), (_ids(tokenizer, turn["content"]) + eos, True)]
            bos, pending = [], ""
    return pieces


def encode_messages(tokenizer, messages: list[dict], template: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a whole conversation, untruncated: labels are the ids on assistant
    turns and IGNORE elsewhere (system and user turns, the template's headers)."""
    pieces = None
    if template == "chat" and getattr(tokenizer, "chat_template", None):
        text_pieces = _chat_segments(tokenizer, messages)
        pieces = None if text_pieces is None else [(_ids(tokenizer, t), trains) for t, trains in text_pieces]
    if pieces is None:  # no chat template (or one that rewrites earlier turns): the plain one
        pieces = _plain_segments(tokenizer, messages)
    ids, labels = [], []
    for piece, trains in pieces:
        ids += piece
        labels += piece if trains else [IGNORE] * len(piece)
    return ids, labels


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Plain language modelling: BOS, the text, EOS; every token trains."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = bos + _ids(tokenizer, text) + eos
    return ids, list(ids)


def encode_record(tokenizer, rec: dict, template: str, cutoff_len: int, too_long: str = "truncate"):
    """(example or None when dropped, whether it was longer than cutoff_len). Built-in domains'
    instruction records keep `encode`'s truncation (the prompt gives way to the answer); a chat
    or a text is cut at cutoff_len. `too_long="drop"` drops a longer record instead, and a record
    left with no trained token after the cut is dropped either way (it would teach nothing)."""
    if "messages" in rec or "text" in rec:
        ids, labels = (encode_messages(tokenizer, rec["messages"], template) if "messages" in rec
                       else encode_text(tokenizer, rec["text"]))
        long = len(ids) > cutoff_len
        if long and too_long == "drop":
            return None, True
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if all(label == IGNORE for label in labels):
            return None, long
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, long
    prompt, response = _prompt_response(tokenizer, rec, template)
    long = len(prompt) + len(response) > cutoff_len
    if long and too_long == "drop":
        return None, True
    return _truncated(prompt, response, cutoff_len), long


def tokenize_records(records: list[dict], tokenizer, template: str, cutoff_len: int,
                     too_long: str = "truncate", skip_bad_rows: bool = False):
    """The records as a `datasets.Dataset` of input ids, attention masks and labels. Records
    longer than cutoff_len are truncated or dropped (data.too_long) and counted in the log; a
    conversation the chat template refuses is a DataError naming its file:line, or is skipped
    and counted with data.skip_bad_rows=true."""
    from datasets import Dataset

    from .sources import DataError

    started = time.perf_counter()
    rows, n_long, n_empty, refused = [], 0, 0, []
    for rec in bar(records, desc="tokenize", total=len(records), unit="record"):
        try:
            row, long = encode_record(tokenizer, rec, template, cutoff_len, too_long)
        except TemplateRefused as err:
            if not skip_bad_rows:
                raise DataError(f"{rec.get('where', 'a record')}: {err} (data.skip_bad_rows=true skips "
                                f"bad records)") from None
            refused.append(f"{rec.get('where', 'a record')}: {err}")
            continue
        n_long += long and (row is not None or too_long == "drop")  # truncated and kept, or dropped
        n_empty += row is None and not (long and too_long == "drop")
        if row is not None:
            if "task_id" in rec:  # data.task_key (data/tasks.py): one id per sequence
                row["task_ids"] = rec["task_id"]
            rows.append(row)
    if n_long:
        log.warning("data: %d of %d records are longer than data.cutoff_len=%d tokens: %s", n_long,
                    len(records), cutoff_len, "dropped (data.too_long=drop)" if too_long == "drop"
                    else "truncated (data.too_long=drop drops them instead)")
    if n_empty:
        log.warning("data: %d of %d records dropped: no assistant token within data.cutoff_len=%d",
                    n_empty, len(records), cutoff_len)
    if refused:
        log.warning("data: skipped %d record(s) the chat template refused (data.skip_bad_rows=true): %s",
                    len(refused), "; ".join(refused[:3]))
    if records and not rows:
        raise DataError(f"data: none of {len(records)} records is left to train or validate on "
                        f"(data.cutoff_len={cutoff_len}, data.too_long={too_long})")
    if len(records) >= 1000:  # a pool of 15k Dolly records takes a while: say what it did
        log.info("tokenized %d records (%d tokens) in %.1f s", len(rows),
                 sum(len(r["input_ids"]) for r in rows), time.perf_counter() - started)
    return Dataset.from_list(rows)
