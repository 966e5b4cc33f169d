"""The phases of one run, announced and timed: model load, adapter init, tokenization, trainer
set-up, the first optimizer step, steady training, checkpoint saves and the benchmark.

Why: at 8B a phase can take minutes (a load from disk, an SVD init, a checkpoint), and a run that
prints nothing meanwhile looks hung. Each phase prints one line when it starts and one when it
ends, with its seconds; results.json keeps the seconds ("timings"), so scripts/bench_run.py can
split the time to the first step and read the steady rate, MFU, peak memory and checkpoint cost
from a real run instead of a bench-built model.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger("cola_train")



def _process_start() -> float:
    """When this process started (the interpreter's own start-up and imports count toward the
    time to the first step); the import of this module where psutil cannot tell."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001
        return time.time()


_PROCESS_START = _process_start()

# Dense bf16 matmul peaks (no sparsity) from the vendors' data sheets, in TFLOP/s: the MFU
# denominator. A device not listed gets no MFU rather than a guessed one.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.0, "B200": 2250.0}


class Phases:
    """Named, timed phases. `with phases("model load"):` logs its start and end and keeps the
    seconds; `seconds` is what results.json's "timings" holds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        log.info("%s ...", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + took
            log.info("%s: %.1f s", name, took)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def matmul_parameters(model) -> tuple[int, int]:
    """(weights of every linear the forward multiplies by, those of them that train): the N of
    the 2N-FLOPs-per-token forward. Embedding look-ups are no matmul; a tied lm_head is."""
    import torch

    total = trainable = 0
    seen = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            n = module.weight.numel()
            total += n
            trainable += n if module.weight.requires_grad else 0
    return total, trainable


def flops_per_token(n_matmul: int, n_trainable_matmul: int, layers: int, width: int, seq: float) -> float:
    """Training FLOPs per token actually computed: forward 2N, backward 2N for the input
    gradients plus 2N_trainable for the weight gradients (a frozen weight has none), and
    attention's QK^T and AV (4·L·d·s forward, twice that backward; full, not causal-halved, as in
    PaLM's appendix B). Adapters' own GEMMs are rank-r and left out (< 1 % at r = 8)."""
    dense = 2 * n_matmul + 2 * n_matmul + 2 * n_trainable_matmul
    attention = 12 * layers * width * seq
    return dense + attention


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step and the tokens each trained, on rank 0: the time to the
    first step (from process start), the steady rate (steps after `warm` ones), MFU and the peak
    GPU memory. Checkpoint saves are timed apart (on_save ends them) and left out of the rate."""

    def __init__(self, phases: Phases, tokens_so_far, warm: int = 3):
        self.phases, self.tokens_so_far, self.warm = phases, tokens_so_far, warm
        self.steps: list[tuple[int, float, int]] = []   # (global step, seconds, tokens)
        self._t = self._tokens = None
        self.first_step_at: float | None = None
        self.train_called_at: float | None = None   # set by the caller just before trainer.train()
        self.model_shape = None
        self._ended: float | None = None
        self.peak_gib: float | None = None
        self.saves: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if model is not None:
            cfg = getattr(model, "config", None)
            n, n_train = matmul_parameters(model)
            self.model_shape = (n, n_train, getattr(cfg, "num_hidden_layers", 0) or 0,
                                getattr(cfg, "hidden_size", 0) or 0)
        self._mark()

    def on_train_end(self, args, state, control, **kwargs):
        """Peak memory of training alone (the validation loss and the benchmark come after)."""
        import torch

        if torch.cuda.is_available():
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30

    def on_step_begin(self, args, state, control, **kwargs):
        if self._t is None:
            self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        tokens = self.tokens_so_far()
        self.steps.append((state.global_step, now - self._t, tokens - self._tokens))
        if self.first_step_at is None:
            self.first_step_at = time.time()
            log.info("first optimizer step done %.1f s after start (this step %.1f s)",
                     self.first_step_at - _PROCESS_START, now - self._t)
        self._t = None   # the next step starts at its on_step_begin: a save in between is not a step
        self._ended = now

    def on_save(self, args, state, control, **kwargs):
        """The Trainer saves right after on_step_end: the time since then is the save's."""
        from .trainer import saved_checkpoint

        took = time.perf_counter() - self._ended if self._ended is not None else 0.0
        self.phases.add("checkpoint save", took)
        folder = saved_checkpoint(args, state)
        self.saves.append({"step": state.global_step, "seconds": round(took, 3),
                           "bytes": folder_bytes(folder) if folder is not None else None})
        if state.is_world_process_zero:
            log.info("checkpoint at step %d saved in %.1f s (%s)", state.global_step, took,
                     _size(self.saves[-1]["bytes"]))

    def _mark(self):
        self._t, self._tokens = time.perf_counter(), self.tokens_so_far()

    def summary(self, seq_len: float | None) -> dict:
        steady = self.steps[self.warm:] if len(self.steps) > self.warm else self.steps[1:]
        out = {"time_to_first_step_s": None if self.first_step_at is None else self.first_step_at - _PROCESS_START,
               # trainer.train() called -> first step done: optimizer, data loader, engine set-up
               "train_call_to_first_step_s": None if self.first_step_at is None or self.train_called_at is None
               else self.first_step_at - self.train_called_at,
               "first_step_s": self.steps[0][1] if self.steps else None,
               "steady_steps": len(steady), "step_s_median": None, "steady_tokens_per_s": None,
               "mfu": None, "peak_gib": None, "step_s": [round(s, 4) for _, s, _ in self.steps],
               "checkpoints": self.saves}
        if steady:
            secs = sum(s for _, s, _ in steady)
            out["step_s_median"] = statistics.median(s for _, s, _ in steady)
            out["steady_tokens_per_s"] = sum(t for _, _, t in steady) / secs if secs > 0 else None
        peak = peak_tflops()
        if peak and out["steady_tokens_per_s"] and self.model_shape and seq_len:
            n, n_train, layers, width = self.model_shape
            flops = flops_per_token(n, n_train, layers, width, seq_len)
            out["mfu"] = flops * out["steady_tokens_per_s"] / (peak * 1e12)   # this rank's tokens, one GPU
        out["peak_gib"] = self.peak_gib
        return out


def folder_bytes(path: str | Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _size(n: int | None) -> str:
    return "size unknown" if n is None else f"{n / 2**20:.1f} MiB"
