"""End to end on CPU with tiny models: a run trains, writes its files, resumes, logs to W&B."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from conftest import TINY, compose


def _run(overrides, out: Path):
    from cola_train.run import run

    return run(compose(TINY + overrides), out)


def _losses(out: Path) -> list[float]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_opt"])
@pytest.mark.parametrize("method,lr", [("fft", "1e-3"), ("lora", "5e-3")])
def test_tiny_models_train_and_write_results(data_root, tmp_path, model, method, lr):
    res = _run([f"model={model}", f"method={method}", f"trainer.lr={lr}"], tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "completed" and saved["train"]["steps"] == 8
    assert saved["config"]["method"]["name"] == method and saved["n_train_samples"] == 8
    assert 0 < saved["params"]["trainable"] <= saved["params"]["total"]
    if method == "fft":
        assert saved["params"]["trainable"] == saved["params"]["total"]
    else:
        assert saved["params"]["trainable"] < 0.2 * saved["params"]["total"]
        assert (tmp_path / "adapter").is_dir()
    assert saved["train"]["tokens_per_s"] > 0 and saved["eval"]["loss"] is not None
    losses = _losses(tmp_path)
    assert len(losses) == 8
    assert losses[-1] < losses[0] * 0.9, losses          # same batch every step: loss must fall
    assert res["train"]["loss"] == pytest.approx(saved["train"]["loss"])


def test_resume_continues_and_matches_uninterrupted(data_root, tmp_path):
    common = ["method=lora", "trainer.lr=5e-3", "data.max_samples=16", "trainer.batch_size=4",
              "trainer.max_steps=8", "trainer.save_steps=4", "trainer.save_total_limit=3"]
    full = _run(common, tmp_path / "full")
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "checkpoint-8")      # as if killed after step 4's save
    (part / "results.json").unlink()
    (part / "metrics.jsonl").unlink()
    resumed = _run(common + ["trainer.resume=true"], part)
    assert resumed["train"]["resumed"] is True and resumed["train"]["steps"] == 8
    steps = [json.loads(l)["step"] for l in (part / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps[0] == 5                                      # continued, not restarted
    assert resumed["eval"]["loss"] == pytest.approx(full["eval"]["loss"], rel=1e-5, abs=1e-6)
    # the totals cover both segments: the same tokens as one uninterrupted run
    assert full["train"]["segments"] == 1 and resumed["train"]["segments"] == 2
    assert resumed["train"]["tokens"] == full["train"]["tokens"] > 0
    assert resumed["train"]["counted_from_step"] == 0
    carried = json.loads((part / "checkpoints" / "checkpoint-4" / "run_totals.json").read_text())
    assert 0 < carried["tokens"] < full["train"]["tokens"] and carried["step"] == 4
    assert resumed["train"]["runtime_s"] > carried["runtime_s"]
    assert resumed["energy"] is None                          # no NVIDIA GPU here: absent, not 0

    # a checkpoint from before the totals existed: the run says where its counting starts
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "full", old)
    shutil.rmtree(old / "checkpoints" / "checkpoint-8")
    for name in ("results.json", "metrics.jsonl", "checkpoints/checkpoint-4/run_totals.json"):
        (old / name).unlink()
    partial = _run(common + ["trainer.resume=true"], old)
    assert partial["train"]["counted_from_step"] == 4 and partial["train"]["segments"] is None
    assert partial["train"]["tokens"] == full["train"]["tokens"] - carried["tokens"]


def test_resume_of_a_completed_run_leaves_it_as_it_is(data_root, tmp_path, caplog):
    """trainer.resume=true on a finished job dir (a sweep started again) neither retrains nor
    rewrites it; a preempted one in the same sweep would resume (the test above)."""
    first = _run(["method=lora", "trainer.max_steps=3", "trainer.save_steps=100"], tmp_path)
    files = {p.name: p.read_bytes() for p in (tmp_path / "results.json", tmp_path / "metrics.jsonl")}
    with caplog.at_level("INFO", logger="cola_train"):
        again = _run(["method=lora", "trainer.max_steps=3", "trainer.save_steps=100", "trainer.resume=true"], tmp_path)
    assert "already completed" in caplog.text
    assert again["train"] == first["train"] and again["eval"] == first["eval"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "results.json", tmp_path / "metrics.jsonl")} == files
    doc = json.loads((tmp_path / "results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps({**doc, "status": "preempted"}))
    # not completed: it runs again, here from the final checkpoint, so only the evaluation repeats
    redone = _run(["method=lora", "trainer.max_steps=3", "trainer.save_steps=100", "trainer.resume=true"], tmp_path)
    assert redone["status"] == "completed" and redone["train"]["resumed"] is True
    assert (tmp_path / "metrics.jsonl").read_bytes() != files["metrics.jsonl"]


def test_wandb_offline_writes_a_run_with_metrics(data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # nor `wandb login` credentials: offline
    _run(["method=lora", "logger=wandb", "logger.mode=online", "trainer.max_steps=3"], tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    (log,) = runs[0].glob("run-*.wandb")
    keys = (b"train/loss", b"train/learning_rate", b"final/eval_loss", b"final/trainable_params")
    # protobuf records, the metric keys stored as plain strings. W&B's own service process writes the
    # file; on a loaded 2-core CI machine it once held only the header right after wandb.finish()
    deadline = time.time() + 60
    while not all(k in log.read_bytes() for k in keys) and time.time() < deadline:
        time.sleep(0.5)
    data = log.read_bytes()
    for key in keys:
        assert key in data, key


@pytest.mark.slow
def test_smollm2_eval_loss_drops(data_root, tmp_path):
    from cola_train.run import run

    cfg = compose(["model=smollm2_135m", "method=lora", "data=math", "data.max_samples=32",
                   "data.max_val_samples=16", "data.cutoff_len=192", "trainer.max_steps=12",
                   "trainer.batch_size=4", "trainer.lr=5e-4", "trainer.warmup_steps=2",
                   "eval=none", "eval.before=true", "trainer.save_steps=100"])
    res = run(cfg, tmp_path)
    assert res["eval"]["loss"] < res["eval"]["loss_before"] - 0.05, res["eval"]
