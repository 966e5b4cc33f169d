"""`python -m cola_train [group=option ...] [key=value ...]`: compose the config, then run."""
from __future__ import annotations

import sys
from pathlib import Path

from .compose import CONF  # conf/: the groups and their options (stdlib-only import)


def refuse(message: str) -> None:
    """Bad input: one `error:` line on stderr and exit code 2 (docs/ERRORS.md, "Exit codes");
    `sys.exit(text)` would exit 1, the code of a failed run."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_group_choices(argv: list[str]) -> None:
    """One line naming the bad option and the valid ones, instead of Hydra's multi-line error."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        group = CONF / key.split("@", 1)[0]     # method@method.base: a chain's base, an option of method
        if key.startswith("hydra/") or not group.is_dir() or "." in key.split("@", 1)[0]:
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for v in value.split(","):
            if v and v not in options:
                refuse(f"{key}={v!r} is not an option; choose from: {', '.join(options)}")


def _method_schemas(argv: list[str]) -> list:
    """The schemas of the method option(s) this command line picks (a sweep may pick several)."""
    from omegaconf import OmegaConf

    from .config import METHOD_SCHEMAS, Kind

    chosen = [a.split("=", 1)[1] for a in argv if a.lstrip("+").split("=", 1)[0] == "method"] or \
             [d["method"] for d in OmegaConf.load(CONF / "config.yaml").defaults if OmegaConf.is_dict(d) and "method" in d]
    schemas = []
    for name in (chosen[-1] if chosen else "").split(","):
        try:
            schemas.append(METHOD_SCHEMAS[Kind(OmegaConf.load(CONF / "method" / f"{name}.yaml").kind)])
        except Exception:  # noqa: BLE001 - a bad option or file: check_group_choices / Hydra say it
            continue
    return schemas


def check_keys(argv: list[str]) -> None:
    """An unknown `a.b=c` key fails in one line naming it and the keys allowed there (Hydra's own
    message for this spans several lines). `method.*` keys are checked against the schema of the
    chosen method (each one of a sweep)."""
    import dataclasses
    import typing

    from .config import Config

    for arg in argv:
        if arg.startswith(("-", "+", "~", "hydra")) or "=" not in arg or "@" in arg.split("=")[0] \
                or (CONF / arg.split("=")[0]).is_dir():
            continue
        parts = arg.split("=", 1)[0].split(".")
        starts = [(Config, [])]
        if parts[0] == "method" and len(parts) > 1:
            starts = [(schema, ["method"]) for schema in _method_schemas(argv)]
            parts = parts[1:]
        for node, path in starts:
            path = list(path)
            for part in parts:
                if not dataclasses.is_dataclass(node):
                    break                   # below a dict, list or Any: free-form (model.arch, method.base)
                fields = {f.name: f for f in dataclasses.fields(node)}
                if part not in fields:
                    where = ".".join(path) or "the config"
                    kind = getattr(fields.get("kind"), "default", None) if path == ["method"] else None
                    where = f"{where} (kind {kind})" if kind is not None else where
                    refuse(f"unknown key {'.'.join(path + [part])!r}; {where} has: {', '.join(fields)}")
                path.append(part)
                node = typing.get_type_hints(node)[part]


def check_output_dirs(argv: list[str]) -> None:
    """A run dir that cannot be created or written fails here, in one line, before any model
    is loaded, instead of as a traceback from Hydra or after hours of training."""
    import os
    import tempfile

    wanted = [a.split("=", 1)[1] for a in argv
              if a.split("=", 1)[0].lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir", "output_dir")]
    for raw in wanted or ["outputs"]:
        path = Path(raw.split("${", 1)[0] or ".").expanduser()
        probe = path
        while not probe.exists():
            probe = probe.parent
        try:
            if not probe.is_dir():
                raise NotADirectoryError(f"{probe} is a file")
            if probe == path:
                tempfile.TemporaryFile(dir=path).close()
            elif not os.access(probe, os.W_OK):
                raise PermissionError(f"cannot create folders in {probe}")
        except OSError as err:
            refuse(f"output dir {raw!r} is not writable: {err.strerror or err}")


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from .config import register_schemas
    register_schemas()

    @hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig):
        from hydra.types import RunMode

        from . import launch
        from .config import typed
        from .run import run

        out = Path(cfg.output_dir or HydraConfig.get().runtime.output_dir)
        sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
        # here, as N local ranks (trainer.devices), or as one SLURM task's rank; OmegaConf.to_object
        # once, here: every module below gets the typed Config (config.py's dataclasses)
        return launch.guarded(lambda: launch.job(typed(cfg), out, run, sweeping), out, sweeping)

    _main()


if __name__ == "__main__":
    from .launch import preflight
    from .sweep_check import check_sweep

    sys.argv[1:] = preflight(sys.argv[1:])  # deepspeed's --local_rank; sbatch for the SLURM launcher
    from .compose import translate
    from .config import ConfigError

    try:
        sys.argv[1:] = translate(sys.argv[1:])  # method.base=<name>: Hydra's method@method.base=<name>
    except ConfigError as err:
        refuse(str(err))
    check_group_choices(sys.argv[1:])
    check_keys(sys.argv[1:])
    check_output_dirs(sys.argv[1:])
    from .checks import check_values
    from .distributed import check as check_distributed

    check_values(sys.argv[1:], more=(check_distributed,))  # bad values exit 2 here, before Hydra makes a run dir
    sys.argv[1:] = check_sweep(sys.argv[1:])  # -m: jobs that would train the same thing; --force
    from .resume import before_hydra

    sys.argv[1:] = before_hydra(sys.argv[1:])  # trainer.resume: the same config, or refused; which run dir
    main()
