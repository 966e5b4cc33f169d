"""`python -m cola_train [group=option ...] [key=value ...]`: compose the config, then run."""
from __future__ import annotations

import sys
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"


def check_group_choices(argv: list[str]) -> None:
    """One line naming the bad option and the valid ones, instead of Hydra's multi-line error."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        group = CONF / key
        if key.startswith("hydra/") or not group.is_dir() or "." in key:
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for v in value.split(","):
            if v and v not in options:
                sys.exit(f"error: {key}={v!r} is not an option; choose from: {', '.join(options)}")


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from .config import register_schemas
    from .errors import run_guarded

    register_schemas()

    @hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig):
        from .run import run

        from hydra.types import RunMode

        from . import distributed

        out = Path(cfg.output_dir or HydraConfig.get().runtime.output_dir)
        sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
        # here, as N local ranks (trainer.devices), or as one SLURM task's rank
        job = lambda: distributed.job(cfg, out, run, sweeping)  # noqa: E731
        if not sweeping:
            return run_guarded(job, out, exit_on_error=True)
        return distributed.keep_sweeping(lambda: run_guarded(job, out, exit_on_error=False), out)

    _main()


if __name__ == "__main__":
    from .distributed import preflight

    sys.argv[1:] = preflight(sys.argv[1:])  # deepspeed's --local_rank; sbatch for the SLURM launcher
    check_group_choices(sys.argv[1:])
    main()
