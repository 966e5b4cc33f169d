"""The config a `python -m cola_train <overrides>` job would get, composed in this process.

Checks that must run before Hydra makes a run dir (a bad value, a sweep whose jobs collapse, the
run a bare `trainer.resume=true` should continue) need the composed config without running the
job. Composing takes well under a second and imports neither torch nor transformers (module
level: stdlib only, as distributed imports this before Hydra).

A config that does not compose (a key the method's schema lacks, a value outside its enum, a wrong
type) is a ConfigError here, in one line naming the key: Hydra's own message spans several lines.
`method.base=<name>`, a chain's base method, is a defaults-list choice (`/method@base` in
conf/method/chain_of_lora.yaml), which Hydra spells `method@method.base=<name>`: `translate`
accepts both.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"
BASE_KEY = "method.base"                 # what users type (and what configs said before)
BASE_OVERRIDE = "method@method.base"     # Hydra's key for that defaults-list entry


def hydra_quote(value: str) -> str:
    """A path as a Hydra override value: quoted, so '=' ',' or spaces in it stay part of it."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def method_options() -> list[str]:
    return sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def translate(overrides: list[str]) -> list[str]:
    """`method.base=<name>` -> `method@method.base=<name>` (a sweep `a,b` too); ConfigError for
    a name that is no method, or that is a chain itself."""
    from .config import CHAIN_BASES, ConfigError

    out = []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        plain = key.lstrip("+")
        if sep and plain in (BASE_KEY, BASE_OVERRIDE) and not arg.startswith("-"):
            options = [o for o in method_options() if o != "chain_of_lora"]
            for name in value.split(","):
                if name == "chain_of_lora":
                    raise ConfigError(f"{BASE_KEY}={name!r} is a chain itself; name the method to chain "
                                      f"({', '.join(CHAIN_BASES)})")
                if name not in options:
                    raise ConfigError(f"{BASE_KEY}={name!r} is not a method config; choose from: {', '.join(options)}")
            arg = f"{key[:len(key) - len(plain)]}{BASE_OVERRIDE}={value}"
        out.append(arg)
    return out


def one_line(err: BaseException) -> str | None:
    """Hydra's or OmegaConf's compose error as one line naming the key, or None when it is
    none of the kinds known here (then the caller lets Hydra report it)."""
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    while err is not None and not (isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None)):
        err = err.__cause__ or err.__context__
    if err is None:
        return None
    key = str(err.full_key)
    message = str(getattr(err, "msg", None) or err).splitlines()[0]
    schema = getattr(err, "object_type", None)
    enum = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", message)
    if enum:
        return f"{key}={enum.group(1)!r} is not one of {enum.group(2)}"
    if isinstance(err, ConfigKeyError) or message.startswith("Key '"):
        where = key.rsplit(".", 1)[0] if "." in key else "the config"
        has = ""
        if schema is not None and dataclasses.is_dataclass(schema):
            kind = next((f.default for f in dataclasses.fields(schema) if f.name == "kind"), None)
            label = f"{where} (kind {kind})" if kind is not None and where.startswith("method") else where
            has = f"; {label} has: {', '.join(f.name for f in dataclasses.fields(schema))}"
        return f"unknown key {key!r}{has}"
    if isinstance(err, ValidationError):
        return f"{key}: {message}"
    return None


def typed_config(overrides: list[str]):
    """The typed Config (config.py's dataclasses) `python -m cola_train <overrides>` would run:
    what scripts and tests hand to run.run / run.build_model / checks.validate."""
    from .config import typed

    return typed(compose(overrides))


def compose(overrides: list[str], return_hydra_config: bool = False):
    """The composed job config (no `hydra` node) for these task overrides; with
    `return_hydra_config`, also the `hydra` node (run and sweep dirs, unresolved `${now:}`), and
    `hydra.*` overrides may be among the overrides. A config that does not compose for a reason
    `one_line` knows is a ConfigError."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .config import ConfigError, register_schemas

    register_schemas()
    overrides = translate(list(overrides))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            try:
                return hydra_compose(config_name="config", overrides=overrides,
                                     return_hydra_config=return_hydra_config)
            except Exception as err:  # noqa: BLE001 - re-raised as it was unless one line says it
                message = one_line(err)
                if message is None:
                    raise
                raise ConfigError(message) from None
    finally:
        GlobalHydra.instance().clear()
