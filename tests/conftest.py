"""Shared fixtures: composing configs in-process and finding the real data root."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
DATA_ROOT = Path(os.environ.get("COLA_DATA_ROOT") or REPO.parent / "shared" / "data")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COLA_DATA_ROOT", str(DATA_ROOT))
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs the single-process tests on two workers: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "train").is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT} (set COLA_DATA_ROOT)")
    return DATA_ROOT


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is no package): the code a test checks, run the
    way a user runs it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose(overrides: list[str]):
    """The typed Config `python -m cola_train <overrides>` would run, composed in-process (and
    typed once, as __main__ does: what run / build_model / validate take)."""
    from cola_train.compose import typed_config

    return typed_config(overrides)


def compose_node(overrides: list[str]):
    """The composed DictConfig, as Hydra hands it to __main__ before it is typed."""
    from cola_train.compose import compose as compose_job

    return compose_job(overrides)


TINY = ["model=tiny_llama", "data=math", "data.max_samples=8", "data.max_val_samples=8",
        "data.cutoff_len=96", "trainer.batch_size=8", "trainer.eval_batch_size=8",
        "trainer.max_steps=8", "trainer.warmup_steps=0", "trainer.logging_steps=1",
        "eval=none", "trainer.save_steps=4"]


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 600, env: dict | None = None):
    full_env = {**os.environ, "COLA_DATA_ROOT": str(DATA_ROOT), "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cola_train", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
