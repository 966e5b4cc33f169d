"""`trainer.resume`: continue a run only with the config it was trained with, and say from where.

A run dir is a record: results.json, the adapter and the checkpoints must describe one training.
Resuming with a changed value (say `trainer.lr`) would continue the optimizer's state under another
schedule and then write the new value into results.json as if the whole run had used it. So:

- `trainer.resume` is `false`, `true` or `force`. `true` continues only a run whose saved config
  equals this one apart from RESUME_ONLY keys; otherwise it stops in one line naming each
  differing key with its old and new value, before any model is built and before any file of
  the run is touched. `force` continues anyway, and results.json then holds the new "config"
  plus "resumed_with_changes": {key: [old, new]}.
- The saved config is `config.trained.yaml`, written into the run dir when training starts from
  step 0 and never rewritten by a resume; runs from before it fall back to results.json's
  "config" (completed or preempted) and then to `.hydra/config.yaml`.
- Hydra rewrites `.hydra/{config,overrides,hydra}.yaml` at every job start. For a job that
  continues a trained run, `hydra.output_subdir` (conf/config.yaml, resolver below) sends them to
  `.hydra/resume-<time>/` instead, so the originals keep saying what the run was started with, in
  single runs and in each job dir of a sweep alike.
- A bare `trainer.resume=true` (no `hydra.run.dir`, whose default contains `${now:...}` and so
  names a new dir every time) looks for the newest run under the runs root with the same config
  and continues it, or stops saying there is none (`before_hydra`, called from __main__).

Module level imports stay stdlib-only: the resolver is registered with the package.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .compose import hydra_quote  # stdlib-only at module level

MODES = ("false", "true", "force")
SAVED = "config.trained.yaml"

# Keys whose value may differ on a resume because they cannot change what is trained: what to do
# (resume itself), where files are on this machine (the run dir, a local copy of the weights or the
# data; the same keys a sweep leaves out of its job dir names), where metrics are sent, and how
# evaluation and loading are batched or how many checkpoints are kept.
RESUME_ONLY = ("trainer.resume", "output_dir", "model.path", "data.root", "logger",
               "eval.batch_size", "trainer.eval_batch_size", "trainer.num_workers",
               "trainer.save_total_limit")


def mode(value) -> str:
    """`trainer.resume` as one of MODES; anything else is a one-line error listing them (which
    leaves the run dir as it is: it may hold a finished run)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.lower() in MODES:
        return value.lower()
    raise refused(f"trainer.resume={value!r} is not one of {', '.join(MODES)}")


def asked(cfg) -> bool:
    """Whether trainer.resume asks to continue (`true` or `force`)."""
    return mode(cfg.trainer.resume) != "false"


def refused(message: str):
    """A ConfigError (one line, exit 2, wherever user errors are handled) that leaves the run dir
    exactly as it is: no results.json saying "failed" over the record of a run that is fine."""
    from .config import ConfigError

    err = ConfigError(message)
    err.record_failure = False  # errors.run_guarded
    return err


# ----------------------------------------------------------------------------------------------
# the saved config and the comparison


def trained_before(out: Path) -> bool:
    """Whether `out` holds something trained: a checkpoint, or a completed or preempted run."""
    out = Path(out)
    if any((out / "checkpoints").glob("checkpoint-*")):
        return True
    return _results(out).get("status") in ("completed", "preempted")


def _results(out: Path) -> dict:
    from .results import read_results

    return read_results(out)


def saved_config(out: Path) -> dict | None:
    """The config the run in `out` was started with, or None if no record of it is there."""
    from omegaconf import OmegaConf

    out = Path(out)
    if (out / SAVED).is_file():
        return _plain(OmegaConf.to_container(OmegaConf.load(out / SAVED)))
    results = _results(out)
    if isinstance(results.get("config"), dict):
        return _plain(results["config"])
    hydra_saved = out / ".hydra" / "config.yaml"
    if hydra_saved.is_file():
        loaded = OmegaConf.load(hydra_saved)
        try:
            return _plain(OmegaConf.to_container(loaded, resolve=True))
        except Exception:  # noqa: BLE001 - an interpolation only Hydra can resolve: compare as written
            return _plain(OmegaConf.to_container(loaded))
    return None


def record_start(cfg, out: Path) -> None:
    """Write the config of a run that trains from step 0 (rank 0 only): what a resume compares to."""
    from omegaconf import OmegaConf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{SAVED}.{os.getpid()}.tmp"
    from .config import as_dict

    OmegaConf.save(OmegaConf.create(as_dict(cfg)), tmp)
    os.replace(tmp, out / SAVED)


def _plain(container) -> dict:
    return json.loads(json.dumps(container, default=str))


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict) and node:
        flat = {}
        for key, value in node.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _resume_only(key: str) -> bool:
    from .effective import under

    return under(key, RESUME_ONLY)


_ABSENT = "(absent)"
# keys added after earlier runs were saved, at the values that train exactly as the code before
# them did: absent from an old run's config means this value (any other value is a change)
ADDED_KEYS = {"method.lr_scale_A": 1.0, "method.lr_scale_B": 1.0, "method.init_tilt": 1.0,
              "method.dropout_mask": "per_layer", "method.base.dropout_mask": "per_layer",   # issue #22
              "trainer.profile_steps": 0, "trainer.pad_to_multiple_of": 1,
              "data.path": None, "data.format": "auto", "data.skip_bad_rows": False, "data.too_long": "truncate",
              "eval.harness.tasks": [], "eval.harness.batch_size": None, "eval.harness.lm_eval_tasks": False,
              "data.task_key": None, "data.task_pattern": None, "data.tasks": []}   # data/tasks.py (moelora)


def differences(saved: dict, cfg) -> dict:
    """{dotted key: [saved value, this value]} for every key that differs, RESUME_ONLY aside
    (`cfg`: the typed Config, or a plain dict of one)."""
    from .config import as_dict, saved_in_this_layout

    now = _plain(cfg) if isinstance(cfg, dict) else as_dict(cfg)
    old, new = _flat(_plain(saved_in_this_layout(_plain(saved), now))), _flat(now)  # runs saved before #24
    for key, value in ADDED_KEYS.items():
        if key in new and key not in old:
            old[key] = value
    return {k: [old.get(k, _ABSENT), new.get(k, _ABSENT)] for k in sorted(old.keys() | new.keys())
            if not _resume_only(k) and old.get(k, _ABSENT) != new.get(k, _ABSENT)}


def describe(changes: dict) -> str:
    show = lambda v: v if v == _ABSENT else json.dumps(v)  # noqa: E731
    return "; ".join(f"{k} {show(a)} -> {show(b)}" for k, (a, b) in changes.items())


def check(cfg, out: Path, resuming: bool = False) -> dict:
    """Before any model is built: the changes this resume makes to the run in `out` ({} when it
    continues with the same config, or trains from the start). Raises a ConfigError (`refused`)
    when there are changes and trainer.resume is not `force`. `resuming`: the run continues
    without being asked (preempted, requeued), so it is held to the same rule."""
    wanted = mode(cfg.trainer.resume)
    if (wanted == "false" and not resuming) or not trained_before(out):
        return {}
    saved = saved_config(out)
    if saved is None:
        return {}
    changes = differences(saved, cfg)
    if changes and wanted != "force":
        raise refused(
            f"trainer.resume={wanted}: {out} was trained with a different config: {describe(changes)}; "
            "use the same values, or trainer.resume=force to continue anyway (results.json then "
            "records both), or another hydra.run.dir to start a new run")
    return changes


class NothingToTrain(Exception):
    """A completed run continued (trainer.resume=force) from a checkpoint already at the last step:
    stopped before the Trainer logs a 0-step segment, so the run's files stay as they were."""


def announcer(checkpoint: str, completed: bool):
    """A Trainer callback that prints, once the checkpoint's state is loaded, where training
    continues from and how far it goes (the Trainer knows max_steps only then); for a `completed`
    run with no step left it raises NothingToTrain instead."""
    from transformers import TrainerCallback

    class ResumedFrom(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if completed and state.global_step >= state.max_steps:
                raise NothingToTrain(f"{checkpoint} is at step {state.global_step} of {state.max_steps}")
            if state.is_world_process_zero:
                print(f"resumed from {checkpoint} (step {state.global_step} of {state.max_steps})", flush=True)

    return ResumedFrom()


# ----------------------------------------------------------------------------------------------
# Hydra's own record of the run: keep the first one


def continues(job_dir: str, resume) -> bool:
    """Whether the job starting in `job_dir` continues a trained run there: trainer.resume asks
    for it, or the run was preempted or requeued (it then resumes by itself, see
    preemption.resuming)."""
    out = Path(job_dir)
    if not trained_before(out):
        return False
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    return str(resume).lower() != "false" or requeued or _results(out).get("status") == "preempted"


def output_subdir(job_dir: str, resume) -> str:
    """`hydra.output_subdir` for a job: `.hydra`, or `.hydra/resume-<time>` when the job continues
    a trained run whose `.hydra/` already says what it was started with."""
    if (Path(job_dir) / ".hydra" / "config.yaml").is_file() and continues(job_dir, resume):
        return f".hydra/resume-{time.strftime('%Y%m%d-%H%M%S')}"
    return ".hydra"


def register() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("resume_output_subdir", output_subdir, replace=True)


# ----------------------------------------------------------------------------------------------
# the command line, before Hydra starts


def _value(argv: list[str], key: str) -> str | None:
    found = None
    for arg in argv:
        if not arg.startswith("-") and "=" in arg and arg.split("=", 1)[0].lstrip("+") == key:
            found = arg.split("=", 1)[1]
    return found


def _swept(arg: str) -> bool:
    """Whether an override sweeps (`a=1,2`, `a=range(3)`), which a single compose cannot take."""
    value = arg.split("=", 1)[1] if "=" in arg else ""
    depth = 0
    for ch in value:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return value.startswith(("range(", "choice(", "glob(", "interval("))


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def before_hydra(argv: list[str]) -> list[str]:
    """Check a `trainer.resume=true|force` command before Hydra makes or touches any dir; return
    the argv to run (with `hydra.run.dir=<found>` added for a bare resume). Exits 2 in one line
    when the resume is refused or there is nothing to resume."""
    raw = _value(argv, "trainer.resume")
    if raw is None:
        return argv
    pieces = [p.strip().strip("'\"").lower() for p in raw.split(",")]  # a sweep over it: each one
    for piece, given in zip(pieces, raw.split(",")):
        if piece not in MODES:
            _fail(f"trainer.resume={given!r} is not one of {', '.join(MODES)}")
    if len(pieces) > 1 or pieces[0] == "false":
        return argv
    wanted = pieces[0]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    task = [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith(("hydra.", "hydra/"))
            and not _swept(a)]  # a sweep: only its dir matters here
    try:
        cfg = _compose(task + [a for a in argv if a.lstrip("+").startswith("hydra.")])
        pattern = str(cfg.hydra["sweep" if multirun else "run"]._get_node("dir")._value())
        job = _job(cfg)
        fixed = None if "${now:" in pattern else Path(str(cfg.hydra["sweep" if multirun else "run"].dir))
    except Exception:  # noqa: BLE001 - a bad override: Hydra reports it in its own words
        return argv
    if multirun:
        if fixed is None:
            _fail(f"trainer.resume={wanted} with -m continues a sweep in its dir: add hydra.sweep.dir=<that "
                  "sweep's dir> (the default names a new dir each time)")
        return argv  # each job checks its own dir (run.py) once Hydra has named it
    if job.output_dir or fixed is not None:
        out = Path(job.output_dir or fixed)
    else:
        prefix = pattern.split("${", 1)[0]
        root = Path(prefix or ".") if prefix.endswith("/") or not prefix else Path(prefix).parent
        out = newest_match(job, root, depth=pattern[len(prefix):].count("/") + 1)
        if out is None:
            _fail(f"trainer.resume={wanted}: no run under {root}/ with a checkpoint or results has this config, "
                  "so there is none to resume; name one with hydra.run.dir=<its dir>, or leave trainer.resume "
                  "out to start a new run")
        out = out.resolve()
        print(f"trainer.resume={wanted}: continuing {out}, the newest run with this config", flush=True)
        argv = [*argv, f"hydra.run.dir={hydra_quote(str(out))}"]
    from .config import ConfigError

    try:
        check(job, out, resuming=True)
    except ConfigError as err:
        _fail(str(err))
    return argv


def _compose(overrides: list[str]):
    from .compose import compose

    return compose(overrides, return_hydra_config=True)


def _job(cfg):
    """The job's typed Config, without the `hydra` node (what run() gets)."""
    from omegaconf import open_dict

    from .config import typed

    job = cfg.copy()
    with open_dict(job):
        job.pop("hydra", None)
    return typed(job)


def newest_match(job, root: Path, depth: int) -> Path | None:
    """The most recently started run dir `depth` levels below `root` that holds something trained
    and whose saved config equals `job` (RESUME_ONLY aside)."""
    if not root.is_dir():
        return None
    found = []
    for run_dir in root.glob("/".join(["*"] * depth)):
        if not run_dir.is_dir() or not trained_before(run_dir):
            continue
        saved = saved_config(run_dir)
        if saved is None or differences(saved, job):
            continue
        started = next((p for p in (run_dir / SAVED, run_dir / ".hydra" / "config.yaml") if p.is_file()), run_dir)
        found.append((started.stat().st_mtime, str(run_dir), run_dir))
    return max(found)[2] if found else None
