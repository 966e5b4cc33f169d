"""transformers' Trainer with the few hooks our methods need: auxiliary losses (MoLE's gate
balance), per-step re-drawing of CoLA-random pairings, token counting, and a metrics file."""
from __future__ import annotations

import math
import time

import torch
from transformers import Trainer, TrainerCallback

from . import adapters
from .results import append_jsonl


class ColaTrainer(Trainer):
    """Adds adapter auxiliary losses to the task loss and counts the tokens it trains on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        if model.training and "attention_mask" in inputs:
            self.trained_tokens += int(inputs["attention_mask"].sum())
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if not model.training:
            return out
        aux = adapters.aux_loss(model)
        if aux is None:
            return out
        if return_outputs:
            return out[0] + aux, out[1]
        return out + aux


class ResampleCallback(TrainerCallback):
    """CoLA-random draws its pairing once per optimizer step, from (seed, step): reproducible
    across resume and identical on every rank."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        adapters.resample(model, state.global_step, self.seed)


class MetricsFileCallback(TrainerCallback):
    """Every logged step as one JSON line, so a curve survives even if the run dies."""

    def __init__(self, path):
        self.path = path
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch,
                                     "time_s": round(time.time() - self.start, 3), **logs})


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFiniteLoss(TrainerCallback):
    """A NaN/inf loss ends the run naming the step; checkpoints already on disk stay good
    because saving is skipped for the bad step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            control.should_save = False
            raise NonFiniteLossError(f"loss became {loss} at step {state.global_step}; "
                                     "the last good checkpoint is kept")
