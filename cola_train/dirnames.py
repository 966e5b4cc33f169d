"""Job dir names that fit the file system.

A multirun job's dir is named after its overrides (`hydra.job.override_dirname`). With enough of
them the name passes the 255-byte limit of a file name, and the job dies in Hydra with "File name
too long" before it starts. The `job_dirname` resolver (conf/config.yaml, hydra.sweep.subdir)
keeps names up to LIMIT bytes as they are, so existing sweep dirs resume in the same place,
and cuts longer ones to a prefix plus a hash of the whole name, still one dir per job.
"""
from __future__ import annotations

import hashlib

LIMIT = 200  # leaves room for the job number in front and stays under 255 bytes


def job_dirname(overrides: str, limit: int = LIMIT) -> str:
    if len(overrides.encode()) <= limit:
        return overrides
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:10]
    prefix = overrides.encode()[:limit - len(digest) - 1].decode(errors="ignore")
    return f"{prefix}_{digest}"


def register() -> None:
    """Before Hydra resolves a job's dir: imported with the package, so also in a submitit worker
    (it unpickles the sweep's cola_train callback before it sets up the job)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
