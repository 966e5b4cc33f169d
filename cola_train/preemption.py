"""Ctrl-C during training: checkpoint at the end of the step, record "interrupted", exit 130.

Why not Python's KeyboardInterrupt: it unwinds from wherever the signal lands (mid-backward,
mid-save), so nothing is saved, results.json is never written and the user gets a long
traceback. Here the first SIGINT while the Trainer runs only sets a flag; distributed's
PreemptionCallback sees it at the end of the step (all ranks agree on the step), the Trainer
saves a checkpoint and stops, and `stop` writes results.json with status "interrupted" and
prints one line. "interrupted" is not "preempted": nothing resumes it without being asked (a
requeued or re-run preempted job resumes by itself), but `trainer.resume=true` continues it from
the checkpoint. A second Ctrl-C quits at once (exit 130, no checkpoint, no traceback).

Outside training (model loading, the evaluations before and after) a Ctrl-C unwinds as usual:
`report_keyboard_interrupt` turns it into the same one line, the last checkpoint (if any) and
exit 130.

Under `trainer.devices=N` the ranks run in a session of their own, so a terminal's Ctrl-C reaches
only the parent (torchrun's agent would otherwise tear the ranks down before they save): the
parent forwards the first SIGINT to the ranks and reports what rank 0 wrote; the second kills them.

Stdlib only at module level (imported by distributed before torch), and imports nothing of
cola_train that imports it back.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("cola_train")

EXIT_INTERRUPTED = 130        # what a shell reports for a process ended by SIGINT (128 + 2)
STATUS = "interrupted"        # results.json status: not "preempted", so nothing auto-resumes it
SPAWNED = "COLA_TRAIN_SPAWNED"  # set in the ranks `trainer.devices=N` starts: their parent reports


class _State:
    count = 0          # SIGINTs received in this process
    training = False   # inside trainer.train(): a SIGINT only asks for a checkpoint
    stop = False       # the ranks agreed to stop for an interrupt (set by the callback)


STATE = _State()


def requested() -> bool:
    """This process got a Ctrl-C while training."""
    return STATE.count > 0


def _quit_now() -> None:
    os.write(2, b"\ninterrupted again: quitting now, without a checkpoint\n")  # \n: after a progress bar
    os._exit(EXIT_INTERRUPTED)


def _on_sigint(signum, frame):  # noqa: ARG001
    if not STATE.training:
        raise KeyboardInterrupt  # nothing to checkpoint here: unwind, report_keyboard_interrupt says so
    STATE.count += 1
    if STATE.count > 1:
        _quit_now()
    if not os.environ.get(SPAWNED):  # the parent of local ranks says it once for all of them
        log.warning("Ctrl-C: saving a checkpoint at the end of this step, then stopping "
                    "(Ctrl-C again quits at once, without it)")


def install() -> bool:
    """Take SIGINT over, unless something other than Python's default handles it already."""
    try:
        if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, signal.SIG_DFL, _on_sigint):
            signal.signal(signal.SIGINT, _on_sigint)
            return True
    except ValueError:  # not the main thread
        pass
    return False


def set_training(on: bool) -> None:
    STATE.training = on


def _checkpoint_dir(out: Path) -> str | None:
    from .checkpoints import last_complete_checkpoint  # torch-free

    return last_complete_checkpoint(out / "checkpoints")


def line(step, max_steps, checkpoint) -> str:
    where = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint was saved"
    return (f"interrupted at step {step} of {max_steps}; {where}; "
            "re-run with trainer.resume=true to continue")


def stop(out: Path, trainer, results: dict, barrier, spawned: bool) -> None:
    """After trainer.train() returned early on Ctrl-C (its checkpoint is on disk): results.json
    says "interrupted", one line says where to resume from, exit 130 (a spawned rank exits 0 and
    leaves the report to its parent)."""
    from .results import write_json_atomic

    step, max_steps = trainer.state.global_step, trainer.state.max_steps
    checkpoint = _checkpoint_dir(out)
    barrier()
    if trainer.is_world_process_zero():
        write_json_atomic(out / "results.json", {
            **results, "status": STATUS, "checkpoint": checkpoint,
            "train": {"steps": step, "max_steps": max_steps}})
    barrier()
    if spawned:
        raise SystemExit(0)
    if trainer.is_world_process_zero():
        print(line(step, max_steps, checkpoint), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


def report_keyboard_interrupt(out: Path | None) -> None:
    """A Ctrl-C outside the training steps (loading, evaluating): one line, exit 130. results.json
    says "interrupted" unless the run had already completed."""
    from .results import completed_results, write_json_atomic

    if os.environ.get(SPAWNED):
        os._exit(EXIT_INTERRUPTED)  # the parent reports; no teardown of a half-set-up process group
    checkpoint = _checkpoint_dir(out) if out is not None else None
    if out is not None and out.is_dir() and completed_results(out) is None \
            and os.environ.get("RANK", "0") == "0":
        write_json_atomic(out / "results.json", {"status": STATUS, "checkpoint": checkpoint,
                                                 "error": "interrupted (Ctrl-C) outside a training step"})
    step = checkpoint.rsplit("-", 1)[-1] if checkpoint else None
    where = (f"the last checkpoint is {checkpoint} (step {step}); re-run with trainer.resume=true to continue"
             if checkpoint else "no checkpoint was saved")
    print(f"interrupted outside a training step; {where}", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)


# ----------------------------------------------------------------------------------------------
# the parent of `trainer.devices=N` local ranks


def _ranks(proc) -> list:
    try:
        import psutil

        return psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - gone already
        return []


@contextlib.contextmanager
def forward_to_ranks(procs: list):
    """While local ranks run (in their own session): the first SIGINT goes on to every rank,
    the second kills them all and exits 130."""
    def on_sigint(signum, frame):  # noqa: ARG001
        STATE.count += 1
        if STATE.count > 1:
            for proc in procs:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
            _quit_now()
        log.warning("Ctrl-C: the ranks save a checkpoint at the end of this step, then stop "
                    "(Ctrl-C again quits at once, without it)")
        for proc in procs:
            ranks = _ranks(proc)
            for rank in ranks or [proc]:  # no rank started yet: torchrun's agent stops them
                with contextlib.suppress(Exception):
                    rank.send_signal(signal.SIGINT)

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        yield procs
        return
    try:
        yield procs
    finally:
        signal.signal(signal.SIGINT, previous)


def report_ranks(out: Path, results: dict) -> None:
    """After the ranks exited on a forwarded Ctrl-C: the line rank 0's results.json supports,
    exit 130."""
    from .results import write_json_atomic

    if results.get("status") == STATUS and "train" in results:
        train = results["train"]
        print(line(train.get("steps"), train.get("max_steps"), results.get("checkpoint")),
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED)
    checkpoint = _checkpoint_dir(out)
    write_json_atomic(out / "results.json", {"status": STATUS, "checkpoint": checkpoint,
                                             "error": "interrupted (Ctrl-C) outside a training step"})
    where = (f"the last checkpoint is {checkpoint}; re-run with trainer.resume=true to continue"
             if checkpoint else "no checkpoint was saved")
    print(f"interrupted outside a training step; {where}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)
