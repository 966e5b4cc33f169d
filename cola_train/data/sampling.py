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


def n_validation(cfg: DataConfig, n_records: int) -> int:
    """How many of `n_records` are held out for validation (the rest is the training pool)."""
    return min(cfg.max_val_samples, math.ceil(cfg.val_fraction * n_records))


def n_train_samples(cfg: DataConfig, n_records: int) -> int:
    """The training-sample count a domain of `n_records` records gives: what a run trains on,
    known from a record count alone (a sweep is checked with it before any job runs)."""
    return sample_size(cfg, n_records - n_validation(cfg, n_records))


def describe_sample(cfg: DataConfig, n_records: int) -> str:
    """One line saying which knob set the training-sample count. data.fraction and
    data.max_samples both bound it; where one of them decides, the other changes nothing, and a
    sweep over it trains the same sample several times: the line says which one decided."""
    n_val = n_validation(cfg, n_records)
    pool = n_records - n_val
    size = sample_size(cfg, pool)
    by_fraction = max(1, math.floor(cfg.fraction * pool))
    head = (f"data: {size} training samples from a pool of {pool} ({n_records} records, "
            f"{n_val} held out for validation): ")
    if cfg.max_samples is None:
        return head + f"data.fraction={cfg.fraction} decides (data.max_samples=null)"
    if by_fraction > cfg.max_samples:
        return head + (f"data.max_samples={cfg.max_samples} decides; it caps data.fraction={cfg.fraction} "
                       f"({by_fraction} samples), so the fraction changes nothing here")
    return head + (f"data.fraction={cfg.fraction} decides; data.max_samples={cfg.max_samples} "
                   f"does not bind")


def split_train_val(records: list, cfg: DataConfig, seed: int) -> tuple[list, list]:
    check_sample_config(cfg)
    order = list(range(len(records)))
    random.Random(VAL_SEED).shuffle(order)
    n_val = n_validation(cfg, len(records))
    if len(records) - n_val < 1:
        raise ConfigError(f"data: only {len(records)} records, nothing left to train on after "
                          f"{n_val} validation records")
    val_idx, pool_idx = order[:n_val], sorted(order[n_val:])
    random.Random(seed).shuffle(pool_idx)
    train_idx = pool_idx[: sample_size(cfg, len(pool_idx))]
    return [records[i] for i in train_idx], [records[i] for i in val_idx]
