"""Files a run leaves behind, written so that a half-written file never passes for a result."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: str | Path, payload) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(payload), f, indent=2, sort_keys=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def append_jsonl(path: str | Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(_clean(row), default=str) + "\n")


def read_results(out: str | Path) -> dict:
    """The run dir's results.json, or {} when it is absent, unreadable or not an object."""
    try:
        results = json.loads((Path(out) / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def completed_results(out: str | Path) -> dict | None:
    """The run's results.json if it says the run completed, else None (absent, unreadable,
    preempted, failed): what a re-run with trainer.resume=true may leave as it is."""
    results = read_results(out)
    return results if results.get("status") == "completed" else None
