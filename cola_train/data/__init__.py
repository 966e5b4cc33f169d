"""Domain data: sources → records → a deterministic sample → tokenized, prompt-masked examples."""
from .sources import DataError
from .sources import load_domain_records as _load_sources
from .sampling import split_train_val
from .template import tokenize_records
from . import custom, tasks


def load_domain_records(cfg) -> list[dict]:
    """The records a run trains on: a built-in domain's sources, or one's own files (data.path,
    data=custom: data/custom.py); with data.task_key each has its task id (data/tasks.py)."""
    records = custom.load_records(cfg) if getattr(cfg, "path", None) else _load_sources(cfg)
    return tasks.assign(records, cfg)


__all__ = ["DataError", "load_domain_records", "split_train_val", "tokenize_records"]
