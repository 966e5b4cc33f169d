"""A task id per record, and per sequence in the batch (`task_ids`): what MOELoRA's gate reads.

Where the label comes from (`data.task_key`):
  * null: no task ids;
  * `source`: the record's source, for a mixture: its place in data.sources (built-in domains),
    or its file's place among the files data.path names (data=custom with a folder; sorted, as
    data/custom.py reads them);
  * any other name: that field of the raw record (e.g. OpenOrca's `id`), optionally cut by
    `data.task_pattern`, a regex whose first group (or whole match) is the label (OpenOrca's
    ids are `<source>.<number>`: `^([a-z0-9]+)\\.` gives cot / flan / niv / t0).
Labels become ids by their place in `data.tasks` (an explicit, stable order: the same id in a
later run with other data), or, when it is empty, by the sorted set of labels in the data (all
records, before the train/validation split, so both splits agree).

The ids ride along as a column of the tokenized dataset (`task_ids`) and the collator wrapper here
stacks them into a LongTensor of one entry per sequence; the model's TaskInput hook
(adapters/task_input.py) takes them from there. Methods that take no task id get batches without
it. Why the raw field is read at load time: the loaders keep only the fields they train on.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

from ..config import ConfigError
from .sources import DataError

SOURCE = "source"
KEY = "task_ids"                         # the batch entry (adapters/task_input.BATCH_KEY)
TAKES_TASK_IDS = ("moelora",)            # method kinds whose layers read the task id


def field_of(data_cfg) -> Optional[str]:
    """The raw record field the label is read from, or None (no task key, or the source)."""
    key = getattr(data_cfg, "task_key", None)
    return None if key in (None, SOURCE) else key


def takes_task_ids(method_cfg) -> bool:
    return str(getattr(method_cfg, "kind", "")) in TAKES_TASK_IDS


# ----------------------------------------------------------------------------------------------
# config: before Hydra makes a run dir (checks.spanning)


def check_config(cfg) -> None:
    """The task settings and the method that reads them agree; ConfigError in one line."""
    data, method = cfg.data, cfg.method
    key, pattern = data.task_key, data.task_pattern
    if pattern is not None:
        if key in (None, SOURCE):
            raise ConfigError(f"data.task_pattern={pattern!r} cuts a record field's value: set data.task_key to "
                              f"that field (got data.task_key={key})")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"data.task_pattern={pattern!r} is not a regular expression ({err})") from None
    if data.tasks and key == SOURCE:
        raise ConfigError(f"data.tasks={list(data.tasks)} names field labels; data.task_key=source numbers the "
                          f"sources in their order (drop data.tasks)")
    if len(set(data.tasks)) != len(data.tasks):
        raise ConfigError(f"data.tasks={list(data.tasks)} names a task twice")
    if not takes_task_ids(method):
        return
    if key is None:
        raise ConfigError(f"method={method.name} gates by each sequence's task: set data.task_key (a record "
                          f"field, e.g. id, or source for a mixture of sources; docs/DATA.md)")
    if getattr(data, "packing", False):
        raise ConfigError(f"method={method.name} reads one task id per sequence, which data.packing=true "
                          f"(several sequences in one row) does not carry: set data.packing=false")
    if data.tasks and len(data.tasks) > method.num_tasks:
        raise ConfigError(f"data.tasks lists {len(data.tasks)} tasks but method.num_tasks={method.num_tasks}")


# ----------------------------------------------------------------------------------------------
# records: the raw label at load time, then the ids


def label(row: Any, data_cfg, where: str) -> Any:
    """The raw label of one raw record (a field mode task key), for `assign`."""
    field = field_of(data_cfg)
    value = row.get(field) if isinstance(row, dict) else None
    if value is None:
        raise DataError(f"{where}: no {field!r} field for data.task_key={field} "
                        f"(it has {sorted(row) if isinstance(row, dict) else type(row).__name__})")
    return value


def assign(records: list[dict], data_cfg) -> list[dict]:
    """Each record's `task_id` from its raw label (`task`; the source mode set `task_id` when it
    read the files); DataError naming the record for a label that does not fit."""
    field = field_of(data_cfg)
    if field is None:
        return records
    pattern = re.compile(data_cfg.task_pattern) if data_cfg.task_pattern else None
    labels = []
    for rec in records:
        value = str(rec.pop("task"))
        where = rec.pop("task_where", "a record")
        if pattern is not None:
            found = pattern.search(value)
            if found is None:
                raise DataError(f"{where}: {field}={value!r} does not match data.task_pattern={data_cfg.task_pattern!r}")
            value = found.group(1) if found.groups() else found.group(0)
        labels.append((value, where))
    order = list(data_cfg.tasks) or sorted({v for v, _ in labels})
    ids = {name: i for i, name in enumerate(order)}
    for rec, (value, where) in zip(records, labels):
        if value not in ids:
            raise DataError(f"{where}: task {value!r} is not in data.tasks={order}")
        rec["task_id"] = ids[value]
    return records


def describe(records: list[dict], data_cfg) -> Optional[str]:
    """One log line: how many records each task id has, and the labels' order."""
    if getattr(data_cfg, "task_key", None) is None:
        return None
    counts: dict[int, int] = {}
    for rec in records:
        counts[rec["task_id"]] = counts.get(rec["task_id"], 0) + 1
    shown = ", ".join(f"{t}: {n}" for t, n in sorted(counts.items()))
    return f"data: task ids from data.task_key={data_cfg.task_key} (records per id: {shown})"


def check_ids(records: list[dict], cfg) -> None:
    """Every task id the data holds is one the method's gate knows (< method.num_tasks)."""
    if not takes_task_ids(cfg.method) or not records:
        return
    top = max(rec.get("task_id", 0) for rec in records)
    if top >= cfg.method.num_tasks:
        raise ConfigError(f"the data has task id {top} (data.task_key={cfg.data.task_key}: "
                          f"{top + 1} or more tasks) but method.num_tasks={cfg.method.num_tasks}; "
                          f"set method.num_tasks={top + 1}")


# ----------------------------------------------------------------------------------------------
# the batch


class TaskCollator:
    """Wraps a collator: takes each sample's `task_ids` out before it (padding collators would try
    to pad it), and puts them back as a LongTensor of one entry per sequence when `keep`."""

    def __init__(self, inner: Callable, keep: bool):
        self.inner, self.keep = inner, keep

    def __call__(self, features: list[dict]):
        import torch

        features = [dict(f) for f in features]   # the dataset's rows stay as they are
        ids = [f.pop(KEY, None) for f in features]
        batch = self.inner(features)
        if self.keep and ids and all(i is not None for i in ids):
            batch[KEY] = torch.tensor(ids, dtype=torch.long)
        return batch


def collator(inner: Callable, method_cfg) -> Callable:
    return TaskCollator(inner, takes_task_ids(method_cfg))
