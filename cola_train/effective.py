"""What identifies a training run: its config with the sample-size knobs replaced by the count
they gave, less the keys that only say where things are.

data.fraction and data.max_samples both bound the training-sample count, so two configs that
differ in them may train on the very same sample (fraction 0.5 and 1.0 under max_samples=1000
both give 1000 records of the same seeded draw). Comparing jobs by this *effective* config is what
tells a sweep's distinct runs from repeats of one run: the sweep check (sweep_check.py) refuses
repeats before they start, and the report (report.py) never averages them as seed variance.
"""
from __future__ import annotations

import json

# the sample-size knobs: replaced by "n_train_samples" where the count is known
SIZE_KEYS = ("data.fraction", "data.max_samples")
# where things are or how they are logged, not what is trained: the same keys Hydra leaves out of
# a job dir's name (conf/config.yaml), and the logger
BOOKKEEPING = ("output_dir", "trainer.resume", "model.path", "data.root", "logger")


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their JSON text, so every value is hashable."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, dict)):
            flat[name] = json.dumps(value, sort_keys=True, default=str)
        else:
            flat[name] = value
    return flat


def under(key: str, names: tuple[str, ...]) -> bool:
    """key is one of `names` or below one (logger.mode is under logger)."""
    return any(key == n or key.startswith(n + ".") for n in names)


def effective_config(config: dict, n_train_samples: int | None) -> dict[str, object]:
    """The flattened config that says what a job trains. With the count unknown (None) the size
    knobs stay in, so two jobs are only taken for one run when they are one."""
    flat = {k: v for k, v in flatten(config).items() if not under(k, BOOKKEEPING)}
    if n_train_samples is not None:
        flat = {k: v for k, v in flat.items() if not under(k, SIZE_KEYS)}
        flat["n_train_samples"] = n_train_samples
    return flat


def identity(flat: dict[str, object]) -> str:
    """A hashable, order-free text of a flattened config, for grouping."""
    return json.dumps(sorted(flat.items(), key=lambda kv: kv[0]), default=str)
