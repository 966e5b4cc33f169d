"""transformers' Trainer with the few hooks our methods need: auxiliary losses (MoLE's gate
balance), per-step re-drawing of CoLA-random pairings, token counting, and a metrics file.

Also the Trainer's quirks, in one place: the TrainingArguments entries for ranks on CPU (which
reach into accelerate's private state), DeepSpeed's evaluation before training, the mean loss
after a resume, the ZeRO-3 gather before saving, and HF's module-global DeepSpeed config."""
from __future__ import annotations

import math
import os
import time
import warnings

import torch
from transformers import Trainer, TrainerCallback

from . import adapters, checkpoints, factor_scales, parallel
from .data.packing import real_tokens
from .results import append_jsonl


# ----------------------------------------------------------------------------------------------
# before the Trainer: the device and the process group


def trainer_kwargs(cfg) -> dict:
    """TrainingArguments entries for the device and the process group.

    CPU without DeepSpeed: use_cpu (accelerate runs MULTI_CPU on gloo when there are ranks).
    CPU with DeepSpeed: accelerate only takes the DeepSpeed path when use_cpu is off, and
    DeepSpeed's CPU accelerator would pick oneCCL: ask for gloo. GPU: NCCL, chosen by accelerate.
    A single process running DeepSpeed still needs a (world of one) process group.
    """
    ds = parallel.deepspeed_config(cfg)
    on_gpu = parallel.cuda()
    if ds is not None:
        parallel.become_world_of_one()  # unless a launcher made this process a rank already
    kwargs = {"deepspeed": ds, "use_cpu": not on_gpu and ds is None, "dataloader_pin_memory": on_gpu}
    if not on_gpu and "LOCAL_RANK" in os.environ:  # ranks on CPU: gloo, state set up here
        kwargs["ddp_backend"] = "gloo"
        _cpu_ranks_state(deepspeed=ds is not None)
        kwargs["accelerator_config"] = {"use_configured_state": True}
    return kwargs


def _cpu_ranks_state(deepspeed: bool) -> None:
    """accelerate's (shared) state for ranks on CPU, configured before TrainingArguments, which
    then uses it as is. Two fixes over what TrainingArguments would set up:
    - DeepSpeed: accelerate takes its DeepSpeed path only off-CPU and then picks the backend from
      the GPU kind; on a CPU it would end with no backend and count one process (every rank would
      read all the data). Here: the DeepSpeed path with gloo.
    - The device is plain `cpu`, not `cpu:<local rank>`: the Trainer resumes with
      torch.load(map_location=args.device), which rejects "cpu:1"."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # private, but the only reset there is
    if deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(backend="gloo") if deepspeed else PartialState(cpu=True, backend="gloo")
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    state.device = torch.device("cpu")


def forget_deepspeed() -> None:
    """The HF integration keeps the last DeepSpeed config in a module global; a later job of an
    in-process sweep must not see ZeRO-3 switched on when it loads its model."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:  # pragma: no cover
        pass


class ColaTrainer(Trainer):
    """Adds adapter auxiliary losses to the task loss and counts the tokens it trains on, and can
    restart its optimizer and learning-rate schedule mid-run (restart: Chain of LoRA's links)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._trained = 0  # an int, or a device tensor summed without a host sync (read when asked)
        self._lr = _Restartable()  # shared with the shallow copy DeepSpeed's integration schedules on

    @property
    def trained_tokens(self) -> int:
        """Tokens trained on so far, padding left out (data/packing.py real_tokens)."""
        return int(self._trained)

    @trained_tokens.setter
    def trained_tokens(self, value: int) -> None:
        self._trained = value

    # -- restart: a new link of a Chain of LoRA run starts as if a fresh Trainer took over, but in
    # the same one, so the step count, data order, random stream, callbacks, checkpoints and the
    # DeepSpeed engine (which cannot be built twice on a ZeRO-3 model) simply go on
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        fresh = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if fresh:
            self._lr.adopt(scheduler)
        return scheduler

    def restart(self, names_before=None, schedule=None) -> None:
        """From the current step on, as a new Trainer would start: an empty optimizer
        (reset_optimizer) and, with `schedule` = (first step, steps, warm-up steps), the learning-
        rate schedule again (restart_schedule); without it the run's schedule goes on."""
        self.reset_optimizer(names_before)
        if schedule is not None:
            self.restart_schedule(*schedule)

    def restart_schedule(self, start: int, steps: int, warmup: int, counted_from: int = 0) -> None:
        """The Trainer's schedule type (cosine, linear, ...) again, as created over `steps` steps
        with `warmup` warm-up steps, counted from global step `start` (a resume: a past step). The
        scheduler object stays the one the engine, accelerate and the callbacks hold; only the
        function it reads the learning rate from changes. `counted_from`: the step a resumed
        scheduler's own count began at, when that was not step 0."""
        from transformers.optimization import get_scheduler

        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        fresh = get_scheduler(self.args.lr_scheduler_type, optimizer=probe, num_warmup_steps=warmup,
                              num_training_steps=steps, scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        self._lr.restart(start, fresh.lr_lambdas[0], counted_from)

    def reset_optimizer(self, names_before=None) -> None:
        """No optimizer state from before: Adam's moments and step counts go. `names_before`
        ({id(parameter): name} of the trainable parameters before a rank change built new ones)
        puts the new tensors in the old ones' place in the param groups. Under ZeRO the fp32
        master copies are refreshed from the current (re-initialised) weights."""
        inner = _innermost(self.optimizer)
        if names_before and not self.is_deepspeed_enabled:
            current = dict(self.model.named_parameters())
            for group in inner.param_groups:
                group["params"] = [current[names_before[id(p)]] if id(p) in names_before else p
                                   for p in group["params"]]
        inner.state.clear()
        for group in inner.param_groups:
            group.pop("step", None)  # optimizers that count per group (e.g. FusedAdam)
        if self.is_deepspeed_enabled:
            refresh = getattr(self.model_wrapped.optimizer, "refresh_fp32_params", None)
            if refresh is not None:
                refresh()

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

    # -- evaluation and saving around train(), the same on one process and on N ranks
    def eval_before_training(self) -> float | None:
        """The eval loss before training. Under DeepSpeed, evaluate() before train() builds an
        inference-only engine that train() then cannot use, so the Trainer evaluates at the start
        of train() instead (eval_on_start) and `eval_loss_at_start` reads it back."""
        if self.is_deepspeed_enabled:
            self.args.eval_on_start = True
            return None
        return self.evaluate()["eval_loss"]

    def eval_loss_at_start(self) -> float | None:
        for entry in self.state.log_history:
            if "eval_loss" in entry:
                return entry["eval_loss"]
        return None

    def mean_train_loss(self, train_out, resumed: bool) -> float:
        """The mean training loss over all steps. After a resume the Trainer sums only the steps
        of this attempt but divides by all of them; the log history (restored with the
        checkpoint) still holds every logged interval, so average that, weighted by length."""
        if not resumed:
            return train_out.training_loss
        total, steps, last = 0.0, 0, 0
        for entry in self.state.log_history:
            if "loss" in entry and "step" in entry:
                span = entry["step"] - last
                total, steps, last = total + float(entry["loss"]) * span, steps + span, entry["step"]
        return total / steps if steps else train_out.training_loss

    def save_weights(self, out, rt: parallel.Runtime, full_model: bool) -> None:
        """Adapter (or the full model, for fft) into the run dir. Called on every rank (ZeRO-3
        gathers are collectives); rank 0 writes."""
        engine = getattr(self, "deepspeed", None) or getattr(self, "model_wrapped", None)
        if rt.zero_stage == 3 and hasattr(engine, "empty_partition_cache"):
            # a forward outside the engine (the benchmark) can leave ZeRO-3 prefetches in flight,
            # and the gather below would then fail ("Cannot partition a param in flight")
            engine.empty_partition_cache()
        if full_model:
            self.save_model(str(out / "model"))  # the Trainer gathers under ZeRO-3 and writes on rank 0
            return
        with parallel.gathered(_adapter_parameters(self.model)):
            if self.is_world_process_zero():
                adapters.save_adapter(self.model, out / "adapter")
        parallel.barrier()

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        if model.training:
            # no int() here: on a GPU that would wait for the device every micro-step
            self._trained = self._trained + real_tokens(inputs)
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


def _innermost(optimizer):
    """The torch optimizer inside accelerate's and DeepSpeed's wrappers."""
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


class _Restartable:
    """The Trainer's learning-rate scheduler (a LambdaLR, as every transformers schedule over
    steps is), which restart() makes read its factor from a new schedule: factor(step) =
    schedule(step - start). Its step count stays global, so a checkpoint's scheduler state
    resumes as it is; until a restart the Trainer's own schedule runs untouched."""

    def __init__(self):
        self.scheduler = None
        self.start = 0
        self.schedule = None

    def adopt(self, scheduler) -> None:
        self.scheduler = scheduler if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) else None

    def restart(self, start: int, schedule, counted_from: int = 0) -> None:
        if self.scheduler is None:
            raise ValueError("the learning-rate schedule cannot restart: trainer.scheduler must be one of "
                             "transformers' schedules over steps (not reduce_lr_on_plateau or greedy)")
        self.start, self.schedule = int(start), schedule
        scheduler = self.scheduler
        # a plain function: LambdaLR.state_dict leaves it (and with it this object) out of checkpoints
        scheduler.lr_lambdas = [lambda step: self.schedule(step - self.start)] * len(scheduler.lr_lambdas)
        scheduler.last_epoch += int(counted_from) - 1  # step() again at the same step: the lrs follow
        with warnings.catch_warnings():  # "step() before optimizer.step()": a restart at step 0
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()


def _adapter_parameters(model) -> list:
    """What an adapter save reads: the trainable weights and the frozen adapter weights too
    (MoLE's frozen experts), never the base layer's."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    from .adapters.lowrank import LowRankLinear as AdapterLinear

    for module in model.modules():
        if isinstance(module, AdapterLinear):
            params.update({id(p): p for n, p in module.named_parameters() if not n.startswith("base_layer.")})
    return list(params.values())


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
