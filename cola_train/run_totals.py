"""Tokens, seconds and GPU energy of a whole run, across preemptions and resumes.

A resumed run is a new process: without this, its results.json would count only the last
segment, and a study whose jobs were stopped and resumed would report a fraction of their energy.
Every checkpoint carries the totals up to its step (`run_totals.json`, written before the
checkpoint is marked complete), and the next segment starts from them. Work done after the last
checkpoint and lost to a kill is not counted: the totals are those of the steps that made the
final weights. A checkpoint written before this existed has no totals; a run resumed from it
counts from that checkpoint's step (`counted_from_step` in results.json), so a report can tell.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from transformers import TrainerCallback

from .parallel import all_reduce
from .energy import EnergyMeter
from .results import write_json_atomic
from .trainer import saved_checkpoint

FILE = "run_totals.json"


class RunTotals(TrainerCallback):
    """tokens_so_far: this process's trained tokens in this segment (summed over ranks here)."""

    def __init__(self, meter: EnergyMeter, tokens_so_far: Callable[[], int]):
        self.meter, self.tokens_so_far = meter, tokens_so_far
        self.carried = {"tokens": 0, "runtime_s": 0.0, "joules": 0.0, "segments": 0, "counted_from_step": 0}
        self.start_time: Optional[float] = None

    def resume_from(self, checkpoint: Optional[str]) -> None:
        if checkpoint is None:
            return
        path = Path(checkpoint) / FILE
        if path.is_file():
            self.carried = json.loads(path.read_text(encoding="utf-8"))
        else:  # an older checkpoint: what came before it is unknown
            step = int(Path(checkpoint).name.rpartition("-")[2])
            self.carried = {**self.carried, "segments": None, "counted_from_step": step}

    def start(self) -> None:
        self.meter.start()
        self.start_time = time.time()

    def totals(self) -> dict:
        """Carried + this segment. A collective under torch.distributed: call it on every rank."""
        tokens = all_reduce(self.tokens_so_far())
        joules = self.meter.joules()
        carried = self.carried
        return {
            "tokens": carried["tokens"] + tokens,
            "runtime_s": carried["runtime_s"] + (time.time() - self.start_time),
            # absent, not zero, if any segment had no meter: a missing measurement is not a free one
            "joules": None if joules is None or carried["joules"] is None else carried["joules"] + joules,
            "segments": None if carried["segments"] is None else carried["segments"] + 1,
            "counted_from_step": carried["counted_from_step"],
        }

    def on_save(self, args, state, control, **kwargs):
        totals = self.totals()  # every rank: the sums are collectives
        folder = saved_checkpoint(args, state) if state.is_world_process_zero else None
        if folder is not None:
            write_json_atomic(folder / FILE, {"step": state.global_step, **totals})
