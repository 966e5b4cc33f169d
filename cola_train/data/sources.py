"""Read instruction records from a local data root or a hub id, checking every row.

A record is {"instruction", "input", "output"} (strings). Local files may be a JSON list or
JSON lines. A missing source stops the run naming the file, the root and the hub id, because a
silent fallback would change what the experiment measures.
"""
from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path

from ..config import DataConfig, DataSource

FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """Missing or malformed training data: one line naming the file and row."""


def data_root(cfg: DataConfig) -> Path | None:
    root = cfg.root or os.environ.get("COLA_DATA_ROOT")
    return Path(root).expanduser() if root else None


def _decode(path: Path) -> str:
    """The file as UTF-8 (a BOM is dropped), strictly: a replaced byte would change the training
    text without a word, so a bad byte stops the run naming where it is."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}: not valid UTF-8 at line {line}, column {column} (byte offset {err.start}: "
                        f"{raw[err.start:err.end]!r}); re-encode the file as UTF-8, e.g. "
                        f"iconv -f cp1252 -t utf-8 (or its real encoding)") from None


def _read_json(path: Path) -> list:
    text = _decode(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise DataError(f"{path}: not valid JSON or JSON lines ({err.msg} at line {err.lineno})")
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows


def _normalise(rows, source: DataSource, where: str, task_field: str | None = None) -> list[dict]:
    columns = {f: source.columns.get(f, f) for f in FIELDS}
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where} row {i}: expected an object with {list(columns.values())}, "
                            f"got {type(row).__name__}")
        rec = {}
        for field, col in columns.items():
            value = row.get(col, "" if field == "input" else None)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise DataError(f"{where} row {i}: {col!r} must be a string, got {type(value).__name__}")
            rec[field] = value
        if not rec["output"].strip() or not (rec["instruction"].strip() or rec["input"].strip()):
            raise DataError(f"{where} row {i}: needs a non-empty {columns['output']!r} and "
                            f"{columns['instruction']!r} or {columns['input']!r}")
        if task_field is not None:  # data.task_key: the raw label, made an id by data/tasks.py
            rec["task"], rec["task_where"] = row.get(task_field), f"{where} row {i}"
            if rec["task"] is None:
                raise DataError(f"{where} row {i}: no {task_field!r} field for data.task_key={task_field}")
        records.append(rec)
    return records


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=None)
def hub_offline(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub is out of reach, decided once per process.

    The offline switches (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE) say so at
    once; otherwise one request to the hub's endpoint (HF_ENDPOINT, proxies honoured) with a
    short deadline. Without this, `load_dataset` on a machine with no network retries each
    source for half a minute, printing every retry, before the run can say what is missing.
    """
    if any(_is_true(os.environ.get(k)) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    reached: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
            reached.append(True)
        except urllib.error.HTTPError:  # an answer, even 4xx/5xx: the hub is there
            reached.append(True)
        except Exception:  # noqa: BLE001 - no DNS, refused, timed out, bad proxy: all mean offline
            reached.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # DNS lookups ignore socket timeouts
    thread.start()
    thread.join(timeout_s + 0.5)
    return not (reached and reached[0])


def local_file(source: DataSource, root: Path | None) -> Path | None:
    """The source's file on this machine (under the data root, or an absolute path), or None."""
    if source.file and root is not None and (root / source.file).is_file():
        return root / source.file
    if source.file and Path(source.file).is_absolute() and Path(source.file).is_file():
        return Path(source.file)
    return None


def _from_hub(source: DataSource) -> list | None:
    try:
        from datasets import load_dataset

        return list(load_dataset(source.hub_id, split=source.split))
    except Exception:  # offline, gated or unknown: reported by the caller with the full picture
        return None


def load_source(source: DataSource, root: Path | None, task_field: str | None = None) -> list[dict] | None:
    """Records of one source, or None when it is nowhere to be found."""
    path = local_file(source, root)
    if path is not None:
        return _normalise(_read_json(path), source, str(path), task_field)
    if source.hub_id and not hub_offline():
        rows = _from_hub(source)
        if rows is not None:
            return _normalise(rows, source, source.hub_id, task_field)
    return None


def missing_message(source: DataSource, root: Path | None) -> str:
    looked = f"looked for {root / source.file}" if (root and source.file) else "no data root set (data.root or $COLA_DATA_ROOT)"
    hub = f"hub id {source.hub_id} unreachable" if source.hub_id else "no hub id"
    return f"data source {source.name!r} is missing: {looked}; {hub}"


def load_domain_records(cfg: DataConfig) -> list[dict]:
    if not cfg.sources:
        raise DataError(f"data.domain={cfg.domain!r} lists no sources")
    root = data_root(cfg)
    records, missing = [], []
    key = getattr(cfg, "task_key", None)
    for index, source in enumerate(cfg.sources):
        got = load_source(source, root, None if key in (None, "source") else key)
        if got is None:
            missing.append(missing_message(source, root))
        else:
            if key == "source":  # a mixture: the source's place in data.sources is the task (data/tasks.py)
                for rec in got:
                    rec["task_id"] = index
            records.extend(got)
    if missing and (not cfg.skip_missing or not records):
        hint = "" if cfg.skip_missing else " (data.skip_missing=true trains on the sources present)"
        raise DataError("; ".join(missing) + hint)
    return records


_COUNTS: dict[tuple, int] = {}


def local_record_count(cfg: DataConfig) -> int | None:
    """How many records the domain's local files hold, without checking each row (a job checks
    them when it loads them); None when a source is not a local file (the hub, or missing), since
    then the count is only known once the job fetches it. Cached per file and modification time:
    a sweep asks once per job."""
    root, total = data_root(cfg), 0
    for source in cfg.sources:
        path = local_file(source, root)
        if path is None:
            return None
        key = (str(path), path.stat().st_mtime_ns)
        if key not in _COUNTS:
            try:
                _COUNTS[key] = len(_read_json(path))
            except DataError:
                return None
        total += _COUNTS[key]
    return total if cfg.sources else None
