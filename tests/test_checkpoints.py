"""Checkpoints of our own adapter layers hold only what cannot be rebuilt, resume exactly from it,
and a corrupt newest checkpoint falls back to the previous one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose, run_cli

COLA = TINY + ["method=cola_heuristic", "trainer.lr=5e-3", "trainer.save_total_limit=3"]  # split-PiSSA init


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "cola_adapter.safetensors"))


def _loss_steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _as_if_killed_after_step_4(full: Path, part: Path) -> Path:
    shutil.copytree(full, part)
    for name in ("results.json", "metrics.jsonl"):
        (part / name).unlink()
    shutil.rmtree(part / "adapter")
    return part


def _truncate_weights(checkpoint: Path) -> Path:
    weights = max(checkpoint.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return weights


@pytest.fixture(scope="module")
def cola_run(tmp_path_factory, data_root):
    """An uninterrupted 8-step CoLA (split PiSSA) run with checkpoints at steps 4 and 8."""
    from cola_train.run import run

    out = tmp_path_factory.mktemp("cola") / "full"
    return out, run(compose(COLA), out)


def test_a_cola_checkpoint_holds_the_adapter_and_no_base_weight(cola_run):
    """The tensors in the checkpoint are exactly the adapter's (trainable factors, buffers, the
    initial factors A0/B0 of the residual base): no base weight, and no more bytes than those."""
    from safetensors import safe_open

    from cola_train.adapters.io import our_layers
    from cola_train.run import build_model

    out, _ = cola_run
    checkpoint = out / "checkpoints" / "checkpoint-4"
    names, data_bytes = set(), 0
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                names.add(key)
                t = f.get_tensor(key)
                data_bytes += t.numel() * t.element_size()
    _, model, _ = build_model(compose(COLA))  # the reference: what this model's adapter consists of
    base = {n for n, _ in model.named_parameters() if "lora_" not in n}
    adapter = {}
    for name, layer in our_layers(model).items():
        for key, value in layer.named_parameters():
            if not key.startswith("base_layer."):
                adapter[f"{name}.{key}"] = value
        for key, value in layer.named_buffers():
            if not key.startswith("base_layer.") and value is not None and key in layer.state_dict():
                adapter[f"{name}.{key}"] = value
    assert names == set(adapter)                                   # nothing else, nothing missing
    assert not names & base and not any("base_layer" in n or "embed_tokens" in n for n in names)
    assert data_bytes == sum(v.numel() * v.element_size() for v in adapter.values())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert data_bytes < model_bytes
    assert not (checkpoint / "model.safetensors").exists()
    assert not (checkpoint / "tokenizer.json").exists() and not (checkpoint / "tokenizer_config.json").exists()


def test_a_resume_from_a_slim_checkpoint_ends_where_the_uninterrupted_run_ends(cola_run, tmp_path):
    """Stopped after step 4 (CoLA, split PiSSA: the residual base must be rebuilt exactly),
    resumed: the same final adapter, bit for bit, and the same losses."""
    from cola_train.run import run

    full, full_res = cola_run
    assert not (full / "checkpoints" / "checkpoint-4" / "model.safetensors").exists()
    part = _as_if_killed_after_step_4(full, tmp_path / "part")
    shutil.rmtree(part / "checkpoints" / "checkpoint-8")
    res = run(compose(COLA + ["trainer.resume=true"]), part)
    assert res["train"]["resumed"] is True and _loss_steps(part)[0] == 5
    ours, theirs = _adapter(part), _adapter(full)
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert res["eval"]["loss"] == full_res["eval"]["loss"]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(cola_run, tmp_path, caplog):
    from cola_train.run import run

    full, full_res = cola_run
    part = _as_if_killed_after_step_4(full, tmp_path / "part")
    bad = _truncate_weights(part / "checkpoints" / "checkpoint-8")
    assert (part / "checkpoints" / "checkpoint-8" / "CHECKPOINT_COMPLETE").is_file()   # marked complete
    with caplog.at_level("WARNING", logger="cola_train"):
        res = run(compose(COLA + ["trainer.resume=true"]), part)
    warned = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith(f"checkpoint {part / 'checkpoints' / 'checkpoint-8'} is unusable ({bad.name} is ")
    assert warned[0].endswith(f"; resuming from {part / 'checkpoints' / 'checkpoint-4'} instead")
    assert res["train"]["resumed"] is True and _loss_steps(part)[0] == 5     # from step 4, not 8
    ours, theirs = _adapter(part), _adapter(full)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert res["eval"]["loss"] == full_res["eval"]["loss"]


def test_no_loadable_checkpoint_is_one_line_error(cola_run, tmp_path):
    full, _ = cola_run
    part = _as_if_killed_after_step_4(full, tmp_path / "part")
    for step in (4, 8):
        _truncate_weights(part / "checkpoints" / f"checkpoint-{step}")
    proc = run_cli(COLA + ["trainer.resume=true", f"hydra.run.dir={part}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no usable checkpoint to resume in {part / 'checkpoints'} (checkpoint-8: ")
    assert "checkpoint-4: " in last and last.endswith("move that folder away to start afresh")


def test_loadability_is_checked_from_headers_and_sizes(tmp_path):
    """The cheap check against an independent reader: safetensors' own loader and torch.load."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from cola_train.checkpoints import problem

    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    save_file({"a": torch.arange(100.0), "b": torch.ones(3, 4)}, str(ckpt / "w.safetensors"))
    torch.save({"state": {0: torch.ones(50)}}, ckpt / "optimizer.pt")
    assert problem(ckpt) is None
    load_file(str(ckpt / "w.safetensors")), torch.load(ckpt / "optimizer.pt")
    whole = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(whole[:-10])
    assert problem(ckpt).startswith("optimizer.pt is not a complete torch file")
    with pytest.raises(Exception):
        torch.load(ckpt / "optimizer.pt")
    (ckpt / "optimizer.pt").write_bytes(whole)
    data = (ckpt / "w.safetensors").read_bytes()
    (ckpt / "w.safetensors").write_bytes(data[:-1])
    assert problem(ckpt) == f"w.safetensors is {len(data) - 1} bytes but its header says {len(data)}"
    with pytest.raises(SafetensorError):
        load_file(str(ckpt / "w.safetensors"))
    (ckpt / "w.safetensors").unlink()
    assert problem(ckpt) == "it has no weights file"


@pytest.mark.parametrize("merge", ["factors", "weights"])
def test_chain_of_cola_resumes_from_a_slim_checkpoint(merge, tmp_path, data_root):
    """Chain of LoRA around CoLA (split PiSSA, 3 links; step 4 is in link 1, one link merged):
    the replayed links and the slim checkpoint give the uninterrupted run's final adapter."""
    from cola_train.run import run

    chain = TINY + ["method=chain_of_lora", "method.base=cola_heuristic", f"method.merge={merge}",
                    "trainer.lr=5e-3", "method.dropout=0", "trainer.save_total_limit=3"]
    full = tmp_path / "full"
    full_res = run(compose(chain), full)
    assert not (full / "checkpoints" / "checkpoint-4" / "model.safetensors").exists()
    part = _as_if_killed_after_step_4(full, tmp_path / "part")
    shutil.rmtree(part / "checkpoints" / "checkpoint-8")
    res = run(compose(chain + ["trainer.resume=true"]), part)
    assert res["chain"]["resumed_from"].endswith("checkpoint-4") and _loss_steps(part)[0] == 5
    ours, theirs = _adapter(part), _adapter(full)
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert res["eval"]["loss"] == full_res["eval"]["loss"]


@pytest.mark.parametrize("method", ["hydralora", "lora_moe", "cola_fully"])
def test_slim_save_then_load_restores_every_adapter_tensor(method, tmp_path):
    """Routers (HydraLoRA), frozen experts (MoLE), split-PiSSA factors (CoLA): a model built
    afresh from the same config and given the checkpoint equals the trained one, base included."""
    from transformers import set_seed

    from cola_train.checkpoints import load_slim, save_slim
    from cola_train.run import build_model

    cfg = compose(TINY + [f"method={method}"])
    set_seed(0)
    _, trained, _ = build_model(cfg)
    with torch.no_grad():  # "training": every adapter tensor moves, frozen ones included
        for name, t in list(trained.named_parameters()) + list(trained.named_buffers()):
            if "base_layer" not in name and t is not None and t.is_floating_point() and (
                    "lora_" in name or "router" in name or "gate" in name.rsplit(".", 1)[-1]):
                t.add_(torch.randn_like(t) * 0.01)
    save_slim(trained, tmp_path)
    set_seed(0)
    _, fresh, _ = build_model(cfg)
    want = trained.state_dict()
    moved = {k for k, v in fresh.state_dict().items() if not torch.equal(v, want[k])}
    assert any("lora_A" in k for k in moved) and any("lora_B" in k for k in moved)
    if method != "cola_fully":
        assert any("router" in k or "gate" in k for k in moved), sorted(moved)[:5]
    load_slim(fresh, tmp_path)
    got = fresh.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
