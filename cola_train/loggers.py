"""Where the Trainer's logged metrics go: `logger=wandb | tensorboard | mlflow | none`.

Each one is the Trainer's own integration (`report_to`), configured through the environment
variables it reads, so loss, learning rate, gradient norm, evaluation and our extra keys reach it
the same way; nothing is re-implemented here. TensorBoard writes its event files to
<run dir>/tensorboard, MLflow its local file store to <run dir>/mlruns (`mlflow ui
--backend-store-uri <run dir>/mlruns`), W&B its files to <run dir>/wandb.

The packages come with the `loggers` extra (`pip install 'cola_train[loggers]'`, part of
`train`); a logger whose package is missing stops the run before the model is built, in one line
(checks.logger_importable).

Peak GPU memory: `PeakMemoryLog` adds the peak since training began to every logged step (so
each logger and metrics.jsonl has its curve) and logs it once when training ends; results.json
keeps it as `timings.peak_gib` (phases.StepTimer; null on a CPU).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers import TrainerCallback

from .eval import harness

log = logging.getLogger("cola_train")

PEAK_KEY = "peak_gpu_memory_gib"


def setup(cfg, out: Path) -> list[str]:
    """The Trainer's `report_to` for this run, with the chosen integration pointed at the run dir."""
    name = cfg.logger.name
    if name != "wandb" or cfg.logger.mode == "disabled":
        os.environ.setdefault("WANDB_DISABLED", "true")
    if name == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
        return ["tensorboard"]
    if name == "mlflow":
        # mlflow 3 keeps its file store in "maintenance mode" and refuses it unless allowed; a
        # database store needs SQLAlchemy and a server-side migration: too much for a run dir
        os.environ.update(MLFLOW_TRACKING_URI=(out / "mlruns").resolve().as_uri(),
                          MLFLOW_EXPERIMENT_NAME=cfg.logger.project, MLFLOW_ALLOW_FILE_STORE="true")
        return ["mlflow"]
    if name != "wandb" or cfg.logger.mode == "disabled":
        return []
    from .checks import wandb_credentials

    mode = cfg.logger.mode
    if mode == "online" and not wandb_credentials():
        log.warning("no W&B credentials (WANDB_API_KEY or `wandb login`'s netrc entry): "
                    "logging to W&B offline (wandb sync later)")
        mode = "offline"
    os.environ.update(WANDB_MODE=mode, WANDB_PROJECT=cfg.logger.project, WANDB_DIR=str(out))
    if cfg.logger.entity:
        os.environ["WANDB_ENTITY"] = cfg.logger.entity
    return ["wandb"]


class PeakMemoryLog(TrainerCallback):
    """Adds the peak GPU memory (GiB, since training began: StepTimer resets the counter) to
    every logged step. It must see the logs before the integrations write them, so `attach`
    puts it first in the Trainer's callback list. Nothing on a CPU (there is no such peak)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        import torch

        if logs is not None and torch.cuda.is_available():
            logs[PEAK_KEY] = round(torch.cuda.max_memory_allocated() / 2**30, 3)

    def on_train_end(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available() and state.is_world_process_zero:
            log.info("peak GPU memory in training: %.2f GiB (results.json timings.peak_gib)",
                     torch.cuda.max_memory_allocated() / 2**30)


class MlflowRun(TrainerCallback):
    """Starts the MLflow run before the Trainer's MLflowCallback looks for one, so that the
    callback does not end it when training ends: the validation loss and the benchmark that come
    after training then land in the same run, which `finish` ends. A run an earlier job of this
    process left open (it failed) is ended as FAILED first, so a sweep's jobs never share one."""

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run("FAILED")
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
        mlflow.start_run(run_name=args.run_name)


def attach(trainer, report_to: list[str]) -> None:
    """Our callbacks that must run before the Trainer's integrations (they come first in its list)."""
    trainer.callback_handler.callbacks.insert(0, PeakMemoryLog())
    if "mlflow" in report_to:
        trainer.callback_handler.callbacks.insert(0, MlflowRun())


def final_numbers(results: dict) -> dict:
    bench = results.get("benchmark") or {}
    return {
        "final/eval_loss": results["eval"]["loss"], "final/eval_loss_before": results["eval"]["loss_before"],
        "final/accuracy": bench.get("accuracy"), "final/macro_accuracy": bench.get("macro_accuracy"),
        "final/tokens_per_s": results["train"]["tokens_per_s"],
        "final/trainable_params": results["params"]["trainable"],
        "final/energy_j": (results.get("energy") or {}).get("joules"),
        "final/peak_gib": (results.get("timings") or {}).get("peak_gib"),
        **harness.wandb_summary(results.get("harness")),   # lm-eval's scores, next to ours
    }


def finish(report_to: list[str], results: dict) -> None:
    """The run's final numbers into the W&B summary or the MLflow run, which are then closed so
    their files (W&B offline: wandb/offline-run-*; mlruns/) are complete."""
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.run.summary.update(final_numbers(results))
            wandb.finish()
    if "mlflow" in report_to:
        import mlflow

        if mlflow.active_run() is not None:
            numbers = {k: float(v) for k, v in final_numbers(results).items() if v is not None}
            mlflow.log_metrics(numbers)
            mlflow.end_run()
