"""`trainer.profile_steps=N`: the torch profiler over N optimizer steps of the real run.

Why: a slow step has two very different causes. Either the GPU is busy (then the kernels' table
says which ones cost), or it waits for the host to launch work (many small ops, a sync, the data
loader). The benchmark scripts time a step built outside the Trainer; this profiles the run itself
(our adapters, the Trainer's optimizer step, gradient clipping, logging) and writes:
- `profile.txt`: the ops' table sorted by device time (CPU time where there is no GPU);
- results.json "profile": the profiled steps' wall seconds, the device's busy seconds (the sum of
  kernel self times) and their ratio, `device_busy` - far below 1 means the run is host-bound -
  and the NCCL kernels' share of the busy time (`collectives_share`, multi-GPU runs).
The first `warm` steps are skipped (allocator, autotuning, lazy init), as in phases.StepTimer.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

log = logging.getLogger("cola_train.profiling")


class StepProfiler(TrainerCallback):
    def __init__(self, out: Path, steps: int, warm: int = 3):
        self.out, self.steps, self.warm = Path(out), int(steps), int(warm)
        self._prof = None
        self._started_at: Optional[float] = None
        self._start_step: Optional[int] = None
        self.summary: Optional[dict] = None

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._prof is not None or self.summary is not None or state.global_step < self.warm:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._sync()
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._start_step, self._started_at = state.global_step, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._prof is None or state.global_step - self._start_step < self.steps:
            return
        self._sync()
        wall = time.perf_counter() - self._started_at
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        averages = prof.key_averages()
        on_device = torch.cuda.is_available()
        busy_us = sum(getattr(e, "self_device_time_total", 0) for e in averages) if on_device else None
        # NCCL's kernels (all-reduce, all-gather, reduce-scatter): the collectives' share of the busy time
        nccl_us = (sum(getattr(e, "self_device_time_total", 0) for e in averages if "nccl" in e.key.lower())
                   if on_device else None)
        sort_by = "self_device_time_total" if on_device else "self_cpu_time_total"
        steps = state.global_step - self._start_step
        self.summary = {
            "steps": steps, "from_step": self._start_step, "wall_s": round(wall, 4),
            "step_ms": round(wall / steps * 1e3, 2),
            "device_busy_s": None if busy_us is None else round(busy_us / 1e6, 4),
            "device_busy": None if busy_us is None else round(busy_us / 1e6 / wall, 4),
            "collectives_s": None if nccl_us is None else round(nccl_us / 1e6, 4),
            "collectives_share": None if not busy_us else round(nccl_us / busy_us, 4),
            "ops": sum(e.count for e in averages if e.key.startswith("aten::")),
            # per step, and only the top-level aten ops (none nested in another: aten::linear, not also
            # its aten::t and aten::addmm), as scripts/bench_throughput.py's "ops" column counts them
            "top_level_ops_per_step": round(top_level_ops(prof) / steps),
            "table": "profile.txt",
        }
        if state.is_world_process_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            head = (f"# {steps} optimizer steps from step {self._start_step}: {wall:.3f} s wall"
                    + (f", device busy {busy_us / 1e6:.3f} s ({self.summary['device_busy']:.1%})"
                       if busy_us is not None else " (no GPU: CPU times)") + "\n")
            (self.out / "profile.txt").write_text(head + averages.table(sort_by=sort_by, row_limit=40) + "\n")
            busy = "" if busy_us is None else f", device busy {self.summary['device_busy']:.0%}"
            log.info("profiled %d steps: %.0f ms a step%s (%s)", steps, self.summary["step_ms"], busy,
                     self.out / "profile.txt")


def top_level_ops(prof) -> int:
    """aten ops called from outside any other aten op. `ops` (every aten event) counts an op and
    the ops it calls inside it (aten::to -> _to_copy -> empty_strided, copy_), so it is several
    times the count bench_throughput reports for the same step (docs/PERFORMANCE.md compared the
    two: ~30k against ~8.4k a step, mostly this difference)."""
    def nested(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not nested(e))


def profiler(cfg, out: Path) -> Optional[StepProfiler]:
    steps = int(getattr(cfg.trainer, "profile_steps", 0) or 0)
    return StepProfiler(out, steps) if steps > 0 else None
