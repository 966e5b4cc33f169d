"""transformers' Trainer with the few hooks our methods need: auxiliary losses (MoLE's gate
balance), per-step re-drawing of CoLA-random pairings, token counting, and a metrics file."""
from __future__ import annotations

import math
import os
import time

import torch
from transformers import Trainer, TrainerCallback

from . import adapters, checkpoints, factor_scales
from .results import append_jsonl


class ColaTrainer(Trainer):
    """Adds adapter auxiliary losses to the task loss and counts the tokens it trains on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_tokens = 0

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, its groups split by factor for method.lr_scale_A/B (factor_scales.py)."""
        super().create_optimizer(model)
        factor_scales.split_param_groups(self.optimizer, self.model if model is None else model)
        return self.optimizer

    # -- checkpoints: our own layers save and load only what cannot be rebuilt (checkpoints.py)
    def _slim(self) -> bool:
        return not self.is_deepspeed_enabled and checkpoints.slim_model(self.model)

    def _save(self, output_dir=None, state_dict=None):
        if not self._slim():
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            from transformers.trainer import TRAINING_ARGS_NAME

            checkpoints.save_slim(self.model, output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if checkpoints.is_slim(resume_from_checkpoint) and not self.is_deepspeed_enabled:
            checkpoints.load_slim(model if model is not None else self.model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best and checkpoints.is_slim(best) and not self.is_deepspeed_enabled:
            checkpoints.load_slim(self.model, best)
            return
        super()._load_best_model()

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        if model.training and "attention_mask" in inputs:
            self.trained_tokens += int(inputs["attention_mask"].sum())
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if not model.training:
            return out
        aux = adapters.aux_loss(model)
        if aux is None:
            return out
        if self.model_accepts_loss_kwargs and kwargs.get("num_items_in_batch") is not None:
            # the Trainer will not divide this micro-batch's loss by the accumulation steps
            aux = aux / self.current_gradient_accumulation_steps
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


class NoGradientError(RuntimeError):
    pass


class StopWithoutGradient(TrainerCallback):
    """A logged gradient norm of exactly 0 ends the run: no gradient reaches the trainable weights,
    so every further step would leave the model as it is (a compiled GPU run once trained that way
    for its whole budget: docs/PERFORMANCE.md, run 7). Not used under DeepSpeed, whose fp16 loss
    scaling skips its first steps."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        norm = (logs or {}).get("grad_norm")
        if norm is not None and norm == 0.0:
            raise NoGradientError(f"grad_norm was 0 at step {state.global_step}: no gradient reaches the "
                                  "trainable parameters, so training would not change the model")


COMPLETE = checkpoints.COMPLETE
last_complete_checkpoint = checkpoints.last_complete_checkpoint


def saved_checkpoint(args, state):
    """The folder the Trainer has just written for this step (in on_save), or None if there is none."""
    from pathlib import Path

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    return folder if folder.is_dir() else None


class CheckpointCompleteMarker(TrainerCallback):
    """Mark a checkpoint folder complete once the Trainer has written all of it (on_save runs
    after the save). The Trainer writes checkpoints in place, so a kill mid-save leaves a folder
    that looks like a checkpoint; resume only trusts marked ones."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from .results import write_json_atomic

            folder = saved_checkpoint(args, state)
            if folder is not None:
                write_json_atomic(folder / COMPLETE, {"step": state.global_step})
