"""Files a run leaves behind, written so that a half-written file never passes for a result.

`RunRecord` is the only writer of a run dir's results.json (a test holds every other module to
that). The file had been written from five places in three shapes; one writer keeps its schema
in one place. Its statuses: "running" (never on disk: the record in memory), "completed",
"benchmark_failed" (trained and saved, not scored), "preempted" (resumes by itself), "interrupted"
(Ctrl-C; resumes with trainer.resume=true) and "failed". Readers: `read_results`,
`completed_results`, report.py, sweep.py, resume.py.
"""
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


RESULTS = "results.json"


class RunRecord:
    """A run dir's results.json: the fields gathered so far in memory (`fields`, a plain dict a
    run fills step by step), written whole and atomically by `write`, with the status first."""

    def __init__(self, out: str | Path, **fields):
        self.out = Path(out)
        self.fields = {"status": "running", **fields}

    @property
    def path(self) -> Path:
        return self.out / RESULTS

    def __getitem__(self, key):
        return self.fields[key]

    def __setitem__(self, key, value) -> None:
        self.fields[key] = value

    def get(self, key, default=None):
        return self.fields.get(key, default)

    def update(self, more: dict) -> None:
        self.fields.update(more)

    def write(self, status: str, **fields) -> dict:
        """results.json = this record's fields, then `fields`, under `status`; returns it."""
        self.fields = {**self.fields, **fields, "status": status}
        write_json_atomic(self.path, self.fields)
        return self.fields

    def read(self) -> dict:
        return read_results(self.out)


def read_results(out: str | Path) -> dict:
    """The run dir's results.json, or {} when it is absent, unreadable or not an object."""
    try:
        results = json.loads((Path(out) / RESULTS).read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def completed_results(out: str | Path) -> dict | None:
    """The run's results.json if it says the run completed, else None (absent, unreadable,
    preempted, failed): what a re-run with trainer.resume=true may leave as it is."""
    results = read_results(out)
    return results if results.get("status") == "completed" else None
