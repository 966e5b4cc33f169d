"""Refuse a multirun whose jobs would train the same thing, before any job runs.

data.max_samples (1000 by default) caps the sample count after data.fraction, so a sweep over
fractions can give several jobs the same sample: on math, fractions 0.5 and 1.0 both train on the
same 1000 records. Such jobs are one run repeated, not distinct settings; a report that averaged
them would show seed variance that is not there. Here the sweep is expanded as Hydra's basic
sweeper will expand it, each job's config is composed, its training-sample count is computed from
the local data files' record counts, and jobs whose effective configs (effective.py, seed
included) are identical stop the multirun in one `error:` line (exit 2) naming them. `--force`
runs them anyway, with a warning line.

A job whose count cannot be known here (data not local, a value the job itself will refuse) is
left out of the comparison: the check never stops a sweep it cannot judge.
"""
from __future__ import annotations

import sys

FORCE = "--force"
SHOWN = 3  # collision groups named in the one line; the rest are counted


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Each job's task overrides, in job-number order, as the basic sweeper expands them
    (sweep._expected_jobs, which also reads hydra.sweeper.params); [] where that is not known."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from .compose import CONF
    from .config import register_schemas
    from .sweep import _expected_jobs

    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = GlobalHydra.instance().hydra.compose_config(
                config_name="config", overrides=list(overrides), run_mode=RunMode.MULTIRUN,
                with_log_configuration=False)
    except Exception:  # noqa: BLE001 - Hydra reports a bad override itself, in its own words
        return []
    finally:
        GlobalHydra.instance().clear()
    jobs = _expected_jobs(cfg)
    return [jobs[n] for n in sorted(jobs)]


def effective_job(overrides: list[str]) -> dict | None:
    """The job's effective config (effective.py), or None where its sample count is unknown."""
    from omegaconf import OmegaConf

    from .compose import compose
    from .data.sampling import n_train_samples
    from .data.sources import local_record_count
    from .effective import effective_config

    try:
        cfg = compose(overrides)
        n_records = local_record_count(cfg.data)
        if n_records is None:
            return None
        count = n_train_samples(cfg.data, n_records)
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - the job fails on its own, with its own message
        return None
    return effective_config(config, count)


def collisions(jobs: list[list[str]]) -> list[tuple[list[int], int]]:
    """(job numbers, their training-sample count) for each group of two or more jobs with one
    effective config."""
    from .effective import identity

    groups: dict[str, list[int]] = {}
    counts: dict[str, int] = {}
    for num, overrides in enumerate(jobs):
        flat = effective_job(overrides)
        if flat is not None:
            key = identity(flat)
            groups.setdefault(key, []).append(num)
            counts[key] = flat["n_train_samples"]
    return [(nums, counts[key]) for key, nums in groups.items() if len(nums) > 1]


def _swept_keys(jobs: list[list[str]]) -> set[str]:
    values: dict[str, set[str]] = {}
    for job in jobs:
        for o in job:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    return {k for k, v in values.items() if len(v) > 1}


def message(jobs: list[list[str]], groups: list[tuple[list[int], int]], force: bool = False) -> str:
    """The one line naming the colliding jobs (by their swept overrides) and their count."""
    swept = _swept_keys(jobs)

    def name(num: int) -> str:
        shown = [o for o in jobs[num] if o.partition("=")[0] in swept] or jobs[num]
        return f"#{num} [{' '.join(shown)}]"

    parts = []
    for nums, count in groups[:SHOWN]:
        together = "both" if len(nums) == 2 else "all"
        parts.append(f"{' and '.join(name(n) for n in nums)} {together} train on the same {count} samples")
    more = f"; and {len(groups) - SHOWN} more such group(s)" if len(groups) > SHOWN else ""
    size_knobs = any(o.partition("=")[0].lstrip("+") in ("data.fraction", "data.max_samples")
                     for nums, _ in groups for n in nums for o in jobs[n])
    hint = ("data.max_samples caps data.fraction: set data.max_samples=null or choose fractions "
            "that give different counts" if size_knobs else "drop the repeated values")
    n_jobs = sum(len(nums) for nums, _ in groups)
    action = f" ({FORCE}: running them anyway)" if force else f", or pass {FORCE} to run them anyway"
    return (f"{n_jobs} sweep jobs are only {len(groups)} distinct run(s) (same effective config, "
            "seed included): " + "; ".join(parts) + more + f"; {hint}{action}")


def check_sweep(argv: list[str]) -> list[str]:
    """argv without --force; exits 2 (one line) when a multirun's jobs collide and --force is
    absent. Anything other than a plain multirun of the project's config is left alone."""
    if "-m" not in argv and "--multirun" not in argv:
        return argv
    force = FORCE in argv
    argv = [a for a in argv if a != FORCE]
    try:
        import contextlib
        import io

        from hydra._internal.utils import get_args_parser

        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except (Exception, SystemExit):  # noqa: BLE001 - Hydra reports its own usage errors, once
        return argv
    if (args.cfg or args.info or args.help or args.hydra_help or args.shell_completion
            or args.config_name or args.config_path or args.config_dir or args.experimental_rerun):
        return argv
    jobs = _sweep_jobs(args.overrides)
    groups = collisions(jobs) if len(jobs) > 1 else []
    if groups:
        print(f"{'warning' if force else 'error'}: {message(jobs, groups, force)}", file=sys.stderr)
        if not force:
            sys.exit(2)
    return argv
