"""Signal → checkpoint at the end of the step → requeue (preemption) or exit 130 (Ctrl-C).

Two kinds of stop, one path through the Trainer:
- Preemption: submitit's signal under SLURM (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise),
  SIGTERM or SIGUSR1 elsewhere (a user's kill, a local scheduler). Every rank stops at the end of
  the step, the Trainer saves a checkpoint, results.json says "preempted", and the job is
  requeued (submitit's handler, or `scontrol requeue`); it comes back into the same run dir, sees
  that (or SLURM_RESTART_COUNT) and resumes by itself. Exit code 3 (EXIT_PREEMPTED).
- Ctrl-C. Why not Python's KeyboardInterrupt: it unwinds from wherever the signal lands
  (mid-backward, mid-save), so nothing is saved, results.json is never written and the user gets
  a long traceback. Here the first SIGINT while the Trainer runs only sets a flag, the same
  checkpoint is saved, results.json says "interrupted" and one line says where to resume from
  (exit 130). "interrupted" is not "preempted": nothing resumes it without being asked, but
  `trainer.resume=true` continues it. A second Ctrl-C quits at once (exit 130, no checkpoint).
  Outside training (model loading, the evaluations) a Ctrl-C unwinds as usual and
  `report_keyboard_interrupt` turns it into the same one line.

Under `trainer.devices=N` the ranks run in a session of their own, so a terminal's Ctrl-C (or a
stop meant for the job) reaches only the parent, which forwards it (`forward_to_ranks`) and
reports what rank 0 wrote (`report_ranks`).

What the signals said lives in one object, `_SIGNALS`, read only in this module: the signal
handlers must reach it, the rest of the code asks `StopCallback` or `requested()`.

Stdlib only at module level (launch imports it before Hydra or torch); imports only downward
(parallel, results, checkpoints).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .parallel import all_reduce, barrier, global_rank, spawned

log = logging.getLogger("cola_train")

EXIT_PREEMPTED = 3            # checkpoint saved; the same command (or the requeued job) resumes
EXIT_INTERRUPTED = 130        # what a shell reports for a process ended by SIGINT (128 + 2)
STATUS = "interrupted"        # results.json status: not "preempted", so nothing auto-resumes it
PREEMPTED = "preempted"

# Seconds to sleep after every step; for the preemption tests only (they run the CLI).
_DEBUG_STEP_SLEEP = float(os.environ.get("COLA_TRAIN_DEBUG_STEP_SLEEP_S", "0") or 0)


class _Signals:
    """What this process has been told: by Ctrl-C (`interrupts`) or by a preemption/stop signal
    (`preempt_signum`), and whether a SIGINT now means "checkpoint" (`training`)."""

    interrupts = 0          # SIGINTs received in this process
    training = False        # inside trainer.train(): a SIGINT only asks for a checkpoint
    preempt_signum = None   # the preemption/stop signal, once caught
    previous = None         # submitit's handler, kept to requeue once our checkpoint is on disk


_SIGNALS = _Signals()


# ----------------------------------------------------------------------------------------------
# where the job runs


def under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def under_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ


def requeued() -> bool:
    """A SLURM job that runs again after a requeue (SLURM counts restarts for us)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def resuming(out: Path) -> bool:
    """Resume without being asked when this job runs again after a requeue: SLURM says so, or
    the last attempt left results.json saying it was preempted (submitit's local executor, or a
    re-run by hand into the same run dir)."""
    from .results import read_results

    return requeued() or read_results(out).get("status") == PREEMPTED


def preempt_signal() -> signal.Signals:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


# ----------------------------------------------------------------------------------------------
# the handlers


def requested() -> bool:
    """This process got a Ctrl-C while training."""
    return _SIGNALS.interrupts > 0


def preemption_requested() -> bool:
    return _SIGNALS.preempt_signum is not None


def _quit_now() -> None:
    os.write(2, b"\ninterrupted again: quitting now, without a checkpoint\n")  # \n: after a progress bar
    os._exit(EXIT_INTERRUPTED)


def _on_sigint(signum, frame):  # noqa: ARG001
    if not _SIGNALS.training:
        raise KeyboardInterrupt  # nothing to checkpoint here: unwind, report_keyboard_interrupt says so
    _SIGNALS.interrupts += 1
    if _SIGNALS.interrupts > 1:
        _quit_now()
    if not spawned():  # the parent of local ranks says it once for all of them
        log.warning("Ctrl-C: saving a checkpoint at the end of this step, then stopping "
                    "(Ctrl-C again quits at once, without it)")


def _on_signal(signum, frame):  # noqa: ARG001
    if _SIGNALS.preempt_signum is None:
        then = "requeueing" if (under_submitit() or under_slurm()) else "stopping (the same command resumes)"
        log.warning("caught %s: saving a checkpoint at the end of this step, then %s",
                    signal.Signals(signum).name, then)
    _SIGNALS.preempt_signum = signum


def install() -> bool:
    """Take SIGINT over, unless something other than Python's default handles it already."""
    try:
        if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, signal.SIG_DFL, _on_sigint):
            signal.signal(signal.SIGINT, _on_sigint)
            return True
    except ValueError:  # not the main thread
        pass
    return False


def install_preemption_handler() -> bool:
    """Catch submitit's preemption/time-out signal under SLURM/submitit, remembering submitit's
    own handler to requeue later; elsewhere SIGTERM and SIGUSR1."""
    if not (under_submitit() or under_slurm()):
        return _install_local_stop_handlers()
    sig = preempt_signal()
    try:
        current = signal.getsignal(sig)
        if current is not _on_signal:
            _SIGNALS.previous = current
            signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread
        return False
    return True


def _install_local_stop_handlers() -> bool:
    """Outside SLURM, SIGTERM and SIGUSR1 (a user's kill, a local scheduler) also mean: save a
    checkpoint at the end of this step and exit with EXIT_PREEMPTED; re-running the same command
    resumes from it. Left alone when something else already handles them."""
    installed = False
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, _on_signal):
                signal.signal(sig, _on_signal)
                installed = True
        except ValueError:  # not the main thread
            return False
    return installed


def hand_over_preemption() -> None:
    """Give the signal to submitit's handler: it pickles the launcher call again (same overrides,
    so the same run dir), requeues the job and exits. Only submitit's global rank 0 requeues."""
    handler, signum = _SIGNALS.previous, _SIGNALS.preempt_signum or int(preempt_signal())
    if callable(handler) and global_rank() == 0:
        handler(signum, None)  # exits (requeued), or raises if it may not requeue
    elif under_slurm() and not under_submitit() and global_rank() == 0:
        if shutil.which("scontrol") is None:  # the checkpoint is saved: a re-run resumes it
            log.warning("scontrol not on PATH: job %s not requeued; run it again to resume",
                        os.environ["SLURM_JOB_ID"])
            return
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)


# ----------------------------------------------------------------------------------------------
# inside a rank: the Trainer stops at the end of the step


def _checkpoint_dir(out: Path) -> str | None:
    from .checkpoints import last_complete_checkpoint  # torch-free

    return last_complete_checkpoint(out / "checkpoints")


def line(step, max_steps, checkpoint) -> str:
    where = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint was saved"
    return (f"interrupted at step {step} of {max_steps}; {where}; "
            "re-run with trainer.resume=true to continue")


def _stop_callback_class():
    from transformers import TrainerCallback

    class StopCallback(TrainerCallback):
        """At the end of each step: did any rank get a stop signal? Then save and stop, all ranks
        at the same step and for the same reason (one tiny all-reduce per step, only when a
        handler is installed). `stop` then records the run and exits."""

        def __init__(self):
            self.active = install_preemption_handler() | install()  # both, always
            self.stopped_at: int | None = None
            self.interrupted = False  # the ranks agreed: Ctrl-C (else a preemption)

        def on_train_begin(self, args, state, control, **kwargs):
            _SIGNALS.training = True  # a Ctrl-C from here asks for a checkpoint

        def on_train_end(self, args, state, control, **kwargs):
            _SIGNALS.training = False

        def _any_rank(self) -> bool:
            """Max over the ranks of 0 (go on), 1 (preemption signal), 2 (Ctrl-C)."""
            mine = 2 if requested() else 1 if preemption_requested() else 0
            reason = all_reduce(mine, "max") if self.active else mine
            self.interrupted = reason == 2
            return reason > 0

        def on_step_end(self, args, state, control, **kwargs):
            if _DEBUG_STEP_SLEEP:  # tests: slow steps down so a signal lands mid-run
                time.sleep(_DEBUG_STEP_SLEEP)
            if self.stopped_at is None and self._any_rank():
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

        def preempted(self, state) -> bool:
            """Stopped by a signal before the planned last step."""
            return self.stopped_at is not None and state.global_step < state.max_steps

        def stop(self, trainer, record) -> None:
            """After trainer.train() returned early (its checkpoint is on disk): record it, then
            exit. Ctrl-C: "interrupted", one line, exit 130. Preemption: "preempted", requeue,
            exit 3. A spawned rank exits 0 and leaves the report to its parent."""
            step, max_steps = trainer.state.global_step, trainer.state.max_steps
            train = {"steps": step, "max_steps": max_steps}
            if self.interrupted:
                checkpoint = _checkpoint_dir(record.out)
                barrier()
                if trainer.is_world_process_zero():
                    record.write(STATUS, checkpoint=checkpoint, train=train)
                barrier()
                if spawned():
                    raise SystemExit(0)
                if trainer.is_world_process_zero():
                    print(line(step, max_steps, checkpoint), file=sys.stderr, flush=True)
                raise SystemExit(EXIT_INTERRUPTED)
            barrier()
            if trainer.is_world_process_zero():
                record.write(PREEMPTED, train=train)
            log.warning("preempted at step %d of %d; checkpoint saved in %s", step, max_steps,
                        record.out / "checkpoints")
            barrier()
            hand_over_preemption()
            # not requeued by submitit here (a rank > 0, or ranks of a local torchrun under SLURM
            # whose parent requeues): leave quietly so the parent sees results.json
            raise SystemExit(0 if spawned() else EXIT_PREEMPTED)

    return StopCallback


def stop_callback():
    """The Trainer callback that turns a signal into a checkpoint and a clean stop."""
    return _stop_callback_class()()


def report_keyboard_interrupt(out: Path | None) -> None:
    """A Ctrl-C outside the training steps (loading, evaluating): one line, exit 130. results.json
    says "interrupted" unless the run had already completed."""
    from .results import RunRecord, completed_results

    if spawned():
        os._exit(EXIT_INTERRUPTED)  # the parent reports; no teardown of a half-set-up process group
    checkpoint = _checkpoint_dir(out) if out is not None else None
    if out is not None and out.is_dir() and completed_results(out) is None \
            and os.environ.get("RANK", "0") == "0":
        RunRecord(out).write(STATUS, checkpoint=checkpoint, error="interrupted (Ctrl-C) outside a training step")
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
def _forward_stop(procs: list):
    """While local ranks run: note the preemption signal here (under SLURM submitit's handler
    would exit at once; outside it SIGTERM / SIGUSR1) and pass it on to the ranks, which
    checkpoint and stop."""
    if not install_preemption_handler():
        yield
        return

    def forward(signum, frame):
        _on_signal(signum, frame)
        for proc in procs:
            for child in _ranks(proc):
                with contextlib.suppress(Exception):
                    child.send_signal(signum)
    # outside SLURM the ranks run in a session of their own (launch.launch_local_ranks): a stop
    # meant for the job (scripts/study.py signals its process group) reaches them through here
    sigs = [preempt_signal()] if (under_submitit() or under_slurm()) else [signal.SIGTERM, signal.SIGUSR1]
    for sig in sigs:
        signal.signal(sig, forward)
    try:
        yield
    finally:
        for sig in sigs:
            signal.signal(sig, _on_signal)


@contextlib.contextmanager
def _forward_sigint(procs: list):
    """The first SIGINT goes on to every rank, the second kills them all and exits 130."""
    def on_sigint(signum, frame):  # noqa: ARG001
        _SIGNALS.interrupts += 1
        if _SIGNALS.interrupts > 1:
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
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def forward_to_ranks():
    """While local ranks run (in a session of their own): a stop signal or a Ctrl-C that reaches
    this process goes on to them. Yields the list to append the rank processes to."""
    procs: list = []
    with _forward_stop(procs), _forward_sigint(procs):
        yield procs


def report_ranks(out: Path, results: dict) -> None:
    """After the ranks exited on a forwarded Ctrl-C: the line rank 0's results.json supports,
    exit 130."""
    from .results import RunRecord

    if results.get("status") == STATUS and "train" in results:
        train = results["train"]
        print(line(train.get("steps"), train.get("max_steps"), results.get("checkpoint")),
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED)
    checkpoint = _checkpoint_dir(out)
    RunRecord(out).write(STATUS, checkpoint=checkpoint, error="interrupted (Ctrl-C) outside a training step")
    where = (f"the last checkpoint is {checkpoint}; re-run with trainer.resume=true to continue"
             if checkpoint else "no checkpoint was saved")
    print(f"interrupted outside a training step; {where}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


def parent_outcome(out: Path, results: dict) -> None:
    """The parent of local ranks, after they exited: a forwarded Ctrl-C ends as rank 0 recorded
    it (exit 130); a preemption is handed on (requeue) and exits 3. Returns otherwise."""
    status = results.get("status")
    if status == STATUS or (requested() and status != "completed"):
        report_ranks(out, results)  # one line, exit 130
    if status == PREEMPTED:
        log.warning("ranks stopped for preemption at step %s", results.get("train", {}).get("steps"))
        hand_over_preemption()
        raise SystemExit(EXIT_PREEMPTED)
