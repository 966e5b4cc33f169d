"""Your own data: `data=custom data.path=FILE_OR_FOLDER` (JSON or JSON lines), in one of four
formats, auto-detected per file or set by `data.format` (docs/DATA.md):

    alpaca     {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
    messages   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    sharegpt   {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...], "system"?}
    text       {"text": str}                     (plain language modelling, every token trains)

Every record becomes either {"messages": [...]} (alpaca and both chat formats; the loss is on the
assistant turns only, template.py) or {"text": str}. A bad record stops the run with one line naming
`file:line` and what is wrong; `data.skip_bad_rows=true` skips it instead and the count is printed.

Why the files are read here with the standard json module and not `datasets.load_dataset("json")`:
its Arrow reader loses the line a record came from, coerces a field that is a string in one record
and a list in another into an Arrow error about schemas, and replaces or rejects bad UTF-8 for the
whole file. The records go into a `datasets.Dataset` once tokenized (template.tokenize_records).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import ConfigError
from .sources import DataError

log = logging.getLogger("cola_train.data")

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "text")
SUFFIXES = (".json", ".jsonl")
# the key whose presence names a record's format, in the order auto-detection tries them
DETECT = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
          ("output", "alpaca"), ("text", "text"))
CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


class BadRecord(ValueError):
    """One record that cannot be trained on; the caller adds where it is."""


# ----------------------------------------------------------------------------------------------
# config: before Hydra makes a run dir, and before the model is built


def check_config(data_cfg) -> None:
    """data.path, when given (data=custom), names a file or a folder that exists; ConfigError in
    one line otherwise. Cheap: only the path is looked at, the records are read by the run."""
    path = getattr(data_cfg, "path", None)
    if data_cfg.domain == "custom" and not path:
        raise ConfigError("data=custom needs data.path=FILE_OR_FOLDER (a .json or .jsonl file, or a "
                          "folder of them; docs/DATA.md)")
    if not path:
        return
    if data_cfg.sources:
        raise ConfigError(f"data.path={path} and data.sources ({', '.join(s.name for s in data_cfg.sources)}) "
                          f"are both set: own data goes with data=custom")
    files(data_cfg)


def files(data_cfg) -> list[Path]:
    """The JSON / JSON lines files data.path names: itself, or those in the folder (recursively,
    sorted, hidden ones left out)."""
    path = Path(data_cfg.path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise ConfigError(f"data.path={data_cfg.path}: the folder holds no .json or .jsonl file")
        return found
    raise ConfigError(f"data.path={data_cfg.path} does not exist (absolute: {path.resolve()}); "
                      f"give a .json or .jsonl file or a folder of them")


# ----------------------------------------------------------------------------------------------
# reading: every record with the line it starts on


def _rows(path: Path):
    """(line, parsed value) for each record of a JSON list or a JSON lines file.

    Bytes that are not UTF-8 are kept as surrogate escapes so that only the records holding them
    are bad (named by their line), not the whole file. A syntax error in a JSON lines file is that
    line's record; in a JSON list nothing after it can be found, so it ends the reading (DataError).
    """
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "[":
        yield from _json_list(path, text, start + 1)
        return
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, BadRecord(f"not valid JSON ({err.msg} at column {err.colno})")


def _json_list(path: Path, text: str, i: int):
    decoder, line, counted = json.JSONDecoder(), 1, 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise DataError(f"{path}: the JSON list is not closed with ']'")
        if text[i] == "]":
            return
        line += text.count("\n", counted, i)
        counted = i
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                            f"a JSON list cannot be read past it") from None
        yield line, value


def _no_bad_bytes(value, where: str = "") -> None:
    """A string that held bytes that are not UTF-8 (surrogate escapes, see _rows) is bad."""
    if isinstance(value, str):
        bad = next((c for c in value if "\udc80" <= c <= "\udcff"), None)
        if bad is not None:
            raise BadRecord(f"not valid UTF-8 (byte {bytes([ord(bad) - 0xDC00])!r}{where}); "
                            f"re-encode the file as UTF-8, e.g. iconv -f cp1252 -t utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_bad_bytes(k, where)
            _no_bad_bytes(v, f" in {k!r}")
    elif isinstance(value, list):
        for v in value:
            _no_bad_bytes(v, where)


# ----------------------------------------------------------------------------------------------
# one record of each format -> {"messages": [...]} or {"text": ...}


def detect(row) -> str | None:
    if isinstance(row, dict):
        return next((fmt for key, fmt in DETECT if key in row), None)
    return None


def _string(row: dict, key: str, fmt: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise BadRecord(f"no {key!r} field ({fmt} records need {_needs(fmt)}; it has {sorted(row)})")
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _needs(fmt: str) -> str:
    return {"alpaca": "'instruction' and 'output' ('input', 'system', 'history' optional)",
            "messages": "'messages': a list of {'role', 'content'}",
            "sharegpt": "'conversations': a list of {'from', 'value'}",
            "text": "'text'"}[fmt]


def _turns(turns, fmt: str) -> list[dict]:
    key, role_key, text_key = (("messages", "role", "content") if fmt == "messages"
                               else ("conversations", "from", "value"))
    roles = CHAT_ROLES if fmt == "messages" else tuple(SHAREGPT_ROLES)
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"{key!r} must be a non-empty list of {{{role_key!r}, {text_key!r}}}")
    out = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise BadRecord(f"turn {n} must be an object with {role_key!r} and {text_key!r}")
        role, text = turn[role_key], turn[text_key]
        if role not in roles:
            raise BadRecord(f"turn {n}: unknown role {role!r}; allowed: {', '.join(roles)}")
        if not isinstance(text, str):
            raise BadRecord(f"turn {n}: {text_key!r} must be a string, got {type(text).__name__}")
        role = role if fmt == "messages" else SHAREGPT_ROLES[role]
        if role == "system" and out:
            raise BadRecord(f"turn {n}: a system turn may only come first")
        if role == "assistant" and not text.strip():
            raise BadRecord(f"turn {n}: empty assistant turn (nothing to train on)")
        out.append({"role": role, "content": text})
    if not any(t["role"] == "assistant" for t in out):
        raise BadRecord("no assistant turn (the loss is on assistant turns: nothing to train on)")
    return out


def normalise(row, fmt: str) -> dict:
    """The record as {"messages": [...]} or {"text": str}; BadRecord naming what is wrong."""
    if not isinstance(row, dict):
        raise BadRecord(f"expected a JSON object, got {type(row).__name__}")
    _no_bad_bytes(row)
    if fmt == "text":
        text = _string(row, "text", fmt)
        if not text.strip():
            raise BadRecord("empty 'text'")
        return {"text": text}
    if fmt == "alpaca":
        instruction, output = _string(row, "instruction", fmt), _string(row, "output", fmt)
        user, system = _string(row, "input", fmt, required=False), _string(row, "system", fmt, required=False)
        if not output.strip():
            raise BadRecord("empty 'output' (nothing to train on)")
        if not (instruction.strip() or user.strip()):
            raise BadRecord("empty 'instruction' and 'input'")
        messages = [{"role": "system", "content": system}] if system else []
        history = row.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2
                                                    and all(isinstance(x, str) for x in h) for h in history):
            raise BadRecord("'history' must be a list of [user, assistant] string pairs")
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        prompt = f"{instruction}\n\n{user}".strip() if user else instruction  # as template._user_text
        return {"messages": messages + [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": output}]}
    if fmt == "messages":
        return {"messages": _turns(row.get("messages"), fmt)} if "messages" in row else _missing(row, fmt)
    if "conversations" not in row:
        return _missing(row, fmt)
    turns = _turns(row["conversations"], fmt)
    system = _string(row, "system", fmt, required=False)
    if system and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system}] + turns
    return {"messages": turns}


def _missing(row: dict, fmt: str):
    raise BadRecord(f"no {'messages' if fmt == 'messages' else 'conversations'!r} field "
                    f"({fmt} records need {_needs(fmt)}; it has {sorted(row)})")


# ----------------------------------------------------------------------------------------------
# the whole data set


def load_records(data_cfg) -> list[dict]:
    """Every good record of every file; the first bad one stops the run (DataError naming
    file:line), or with data.skip_bad_rows=true each bad one is skipped and they are counted."""
    check_config(data_cfg)
    from . import tasks

    records, bad = [], []
    field, by_source = tasks.field_of(data_cfg), getattr(data_cfg, "task_key", None) == tasks.SOURCE
    for index, path in enumerate(files(data_cfg)):
        fmt = None if data_cfg.format == "auto" else data_cfg.format
        for line, row in _rows(path):
            try:
                if isinstance(row, BadRecord):
                    raise row
                if fmt is None:
                    fmt = detect(row)
                    if fmt is None:
                        raise DataError(f"{path}:{line}: cannot tell the record's format from its keys "
                                        f"{sorted(row) if isinstance(row, dict) else type(row).__name__}; "
                                        f"set data.format to one of {', '.join(FORMATS[1:])}")
                    log.info("data: %s read as %s (data.format=auto)", path, fmt)
                rec = {**normalise(row, fmt), "where": f"{path}:{line}"}
                if field is not None:   # data.task_key: the raw label (data/tasks.py makes it an id)
                    rec["task"], rec["task_where"] = tasks.label(row, data_cfg, f"{path}:{line}"), f"{path}:{line}"
                elif by_source:         # the file's place among data.path's files is the task
                    rec["task_id"] = index
                records.append(rec)
            except BadRecord as err:
                where = f"{path}:{line}: {err}"
                if not data_cfg.skip_bad_rows:
                    raise DataError(f"{where} (data.skip_bad_rows=true skips bad records)") from None
                bad.append(where)
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        log.warning("data: skipped %d bad record(s) of %d (data.skip_bad_rows=true): %s",
                    len(bad), len(bad) + len(records), shown)
    if not records:
        raise DataError(f"data.path={data_cfg.path}: no usable record"
                        + (f" ({len(bad)} bad ones skipped)" if bad else ""))
    return records


def register_resolver() -> None:
    """`${custom_eval:${.benchmark}}` in conf/eval/custom.yaml: data=custom evaluates only when
    eval.benchmark names a benchmark (own data has no benchmark of its own)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("custom_eval", lambda benchmark: benchmark is not None, replace=True)
