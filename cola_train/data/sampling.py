"""Choose the training sample and the held-out validation set.

The validation set is drawn with a fixed seed from the whole pool and excluded from training, so
every seed and every sample size of a sweep is judged on the same held-out records; the training
sample is then a seeded draw of `size` records from the rest. Same seed, same sample.
"""
from __future__ import annotations

import math
import random

from ..config import ConfigError, DataConfig

VAL_SEED = 1234


def check_sample_config(cfg: DataConfig) -> None:
    if not 0 < cfg.fraction <= 1:
        raise ConfigError(f"data.fraction={cfg.fraction} is outside (0, 1]")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise ConfigError(f"data.max_samples={cfg.max_samples} must be >= 1 (or null for all)")
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} is outside [0, 1)")


def sample_size(cfg: DataConfig, pool: int) -> int:
    check_sample_config(cfg)
    size = max(1, math.floor(cfg.fraction * pool))
    return min(size, cfg.max_samples) if cfg.max_samples is not None else size


def split_train_val(records: list, cfg: DataConfig, seed: int) -> tuple[list, list]:
    check_sample_config(cfg)
    order = list(range(len(records)))
    random.Random(VAL_SEED).shuffle(order)
    n_val = min(cfg.max_val_samples, math.ceil(cfg.val_fraction * len(records)))
    if len(records) - n_val < 1:
        raise ConfigError(f"data: only {len(records)} records, nothing left to train on after "
                          f"{n_val} validation records")
    val_idx, pool_idx = order[:n_val], sorted(order[n_val:])
    random.Random(seed).shuffle(pool_idx)
    train_idx = pool_idx[: sample_size(cfg, len(pool_idx))]
    return [records[i] for i in train_idx], [records[i] for i in val_idx]
