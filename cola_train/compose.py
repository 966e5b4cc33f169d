"""The config a `python -m cola_train <overrides>` job would get, composed in this process.

Checks that must run before Hydra makes a run dir (a bad value, a sweep whose jobs collapse, the
run a bare `trainer.resume=true` should continue) need the composed config without running the
job. Composing takes well under a second and imports neither torch nor transformers.
"""
from __future__ import annotations

from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"


def hydra_quote(value: str) -> str:
    """A path as a Hydra override value: quoted, so '=' ',' or spaces in it stay part of it."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose(overrides: list[str], return_hydra_config: bool = False):
    """The composed job config (no `hydra` node) for these task overrides; with
    `return_hydra_config`, also the `hydra` node (run and sweep dirs, unresolved `${now:}`), and
    `hydra.*` overrides may be among the overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .config import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides),
                                return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()
