"""scripts/mole_recipe.py: one LoRA per domain, then the gate over the frozen experts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DATA_ROOT, REPO

TINY_RECIPE = ["model=tiny_llama", "data.max_samples=8", "data.max_val_samples=8", "data.cutoff_len=64",
               "trainer.batch_size=8", "trainer.eval_batch_size=8", "trainer.max_steps=1", "trainer.warmup_steps=0",
               "trainer.logging_steps=1", "eval=none"]


def recipe(args, timeout=900):
    import os

    env = {**os.environ, "COLA_DATA_ROOT": str(DATA_ROOT), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "mole_recipe.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_commands_and_skipping_a_trained_expert(tmp_path):
    done = tmp_path / "experts" / "math"
    (done / "adapter").mkdir(parents=True)
    (done / "adapter" / "adapter_config.json").write_text("{}")
    (done / "results.json").write_text(json.dumps({"status": "completed"}))
    proc = recipe(["--domains", "math,finance", "--gate-data", "math", "--out", str(tmp_path), "--dry-run",
                   "--gate-args", "trainer.lr=1e-4", "--", "model=tiny_llama"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"[mole_recipe] expert math: already trained in {done}"
    assert lines[1].startswith("[mole_recipe] expert finance: ") and "method=lora data=finance" in lines[1]
    import shlex

    gate = shlex.split(lines[2].split(": ", 1)[1])
    assert gate[1:7] == ["-m", "cola_train", "method=mole", "data=math", "method.num_A=2", "method.num_B=2"]
    assert f"method.expert_paths=['{done}/adapter','{tmp_path}/experts/finance/adapter']" in gate
    # MoLE's schema has no freeze_experts: its experts are always frozen
    assert "method.freeze_experts=true" not in gate and gate[-2:] == ["model=tiny_llama", "trainer.lr=1e-4"]


@pytest.mark.parametrize("domains,message", [
    ("math", "needs at least two domains"), ("math,math", "names a domain twice")])
def test_bad_domains_are_one_line(tmp_path, domains, message):
    proc = recipe(["--domains", domains, "--gate-data", "math", "--out", str(tmp_path)])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr


@pytest.mark.slow
def test_recipe_trains_experts_then_only_the_gate(tmp_path, data_root):
    from safetensors.torch import load_file

    proc = recipe(["--domains", "math,finance", "--gate-data", "math", "--out", str(tmp_path), "--", *TINY_RECIPE])
    assert proc.returncode == 0, proc.stderr[-3000:]
    gate = json.loads((tmp_path / "gate" / "results.json").read_text())
    assert gate["status"] == "completed"
    m = gate["config"]["method"]
    assert (m["kind"], m["num_A"]) == ("mole_block", 2)      # MoLE as published
    assert m["expert_paths"] == [str(tmp_path / "experts" / d / "adapter") for d in ("math", "finance")]
    # only the gates trained: per block e (2 experts x 64 wide x 2) and tau on tiny_llama's 2 blocks
    expert = json.loads((tmp_path / "experts" / "math" / "results.json").read_text())
    assert gate["params"]["trainable"] == 2 * (2 * 64 * 2 + 1) < expert["params"]["trainable"]
    # the gate run's expert 0 is the math expert's LoRA A (PEFT's tensor, copied as it is)
    peft = load_file(str(tmp_path / "experts" / "math" / "adapter" / "adapter_model.safetensors"))
    key = next(k for k in peft if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    ours = load_file(str(next((tmp_path / "gate" / "adapter").glob("*.safetensors"))))
    mine = next(v for k, v in ours.items() if k.endswith("layers.0.block.self_attn.q_proj.lora_A"))
    assert (mine[0] == peft[key]).all()
