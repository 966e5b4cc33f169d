"""logger=tensorboard and logger=mlflow (cola_train/loggers.py): a tiny_llama CLI run writes its
event files / its local MLflow store with the loss the run logged (metrics.jsonl, written by our
own callback, is the reference), and peak GPU memory reaches results.json and the logs."""
from __future__ import annotations

import json

import pytest

from conftest import TINY, compose, run_cli

ARGS = TINY + ["method=lora", "trainer.max_steps=4", "trainer.save_steps=0"]


def _logged(run_dir, key="loss") -> dict[int, float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def _run(tmp_path, logger: str, args: list[str] = ARGS):
    run_dir = tmp_path / "run"
    proc = run_cli(args + [f"logger={logger}", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, results = _run(tmp_path, "tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = _logged(run_dir)
    assert len(expected) == 4 and tb == pytest.approx(expected, rel=1e-6)
    assert {e.step for e in events.Scalars("eval/loss")} == {4}
    # peak GPU memory: on a CPU the key is there and null (timings.peak_gib, phases.StepTimer)
    import torch

    if not torch.cuda.is_available():
        assert "peak_gib" in results["timings"] and results["timings"]["peak_gib"] is None


@pytest.mark.slow
def test_mlflow_store_holds_the_loss_in_one_finished_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    run_dir, results = _run(tmp_path, "mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 reads its file store only then
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("cola_train")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # training, validation and the end: one run
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(_logged(run_dir), rel=1e-6)
    assert run.data.metrics["final/eval_loss"] == pytest.approx(results["eval"]["loss"], rel=1e-6)


def test_missing_logger_package_is_one_line(monkeypatch):
    import importlib.util

    from cola_train.checks import logger_importable
    from cola_train.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^logger=mlflow needs the mlflow-skinny package: "
                                          r"pip install 'cola_train\[loggers\]' \(or logger=none\)$"):
        logger_importable(compose(["logger=mlflow"]))
    logger_importable(compose(["logger=tensorboard"]))  # installed: no error


def test_peak_memory_reaches_every_logger_before_it_writes(monkeypatch):
    """PeakMemoryLog adds the key to the logs dict ahead of the Trainer's integrations (first in
    its callback list), so TensorBoard / MLflow / W&B and metrics.jsonl all get it. The CUDA
    counter is faked here; the real one is checked by the gpu test below."""
    import torch
    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

    from cola_train.loggers import PEAK_KEY, PeakMemoryLog, attach

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    seen = {}

    class Writer:  # stands for an integration callback, added before ours as the Trainer does
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.update(logs)

    class FakeTrainer:
        callback_handler = CallbackHandler([DefaultFlowCallback(), Writer()], None, None, None, None)

    trainer = FakeTrainer()
    attach(trainer, ["tensorboard"])
    assert isinstance(trainer.callback_handler.callbacks[0], PeakMemoryLog)
    trainer.callback_handler.on_log(None, TrainerState(), TrainerControl(), {"loss": 1.0})
    assert seen == {"loss": 1.0, PEAK_KEY: 3.0}


@pytest.mark.gpu
def test_peak_gpu_memory_in_results_and_every_logged_step(tmp_path):
    # own data, so that the GPU machine needs no data root
    rows = [{"text": f"{i} plus {i} is {2 * i}."} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [a for a in ARGS if not a.startswith("data=")] + ["data=custom", f"data.path={tmp_path / 'd.jsonl'}"]
    run_dir, results = _run(tmp_path, "tensorboard", args)
    peaks = _logged(run_dir, "peak_gpu_memory_gib")
    assert len(peaks) == 4 and all(p > 0 for p in peaks.values())
    assert results["timings"]["peak_gib"] == pytest.approx(max(peaks.values()), abs=1e-3)
