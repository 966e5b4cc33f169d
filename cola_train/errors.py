"""Known bad input ends a run with one line on stderr and exit code 2, never a traceback.

In a sweep the failing job records `results.json` with status "failed" and the reason, and the
sweep goes on: the report lists it as failed instead of averaging it in.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def user_errors() -> tuple[type[BaseException], ...]:
    from .adapters import AdapterError
    from .checkpoints import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .eval import EvalDataError
    from .trainer import NoGradientError, NonFiniteLossError

    return (ConfigError, DataError, AdapterError, NonFiniteLossError, NoGradientError, EvalDataError,
            CheckpointError)


def run_guarded(fn, out: Path | None = None, exit_on_error: bool = True):
    try:
        return fn()
    except KeyboardInterrupt:  # Ctrl-C outside a training step (inside one: preemption.stop)
        from .preemption import report_keyboard_interrupt

        report_keyboard_interrupt(out)
    except user_errors() as err:
        logging.getLogger("cola_train").error("%s", err)
        if out is not None and out.is_dir() and getattr(err, "record_failure", True):  # resume.refused
            from .results import RunRecord

            RunRecord(out).write("failed", error=str(err))
        if exit_on_error:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        return None

