"""Bad input from the real command line: one line on stderr naming the value, exit code != 0,
no traceback, and no results.json that could pass for a result."""
from __future__ import annotations

import json

import pytest

from conftest import TINY, run_cli


def _check(proc, pattern: str):
    import re

    assert proc.returncode != 0, proc.stdout[-2000:]
    err_lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert any(re.search(pattern, l) for l in err_lines), proc.stderr[-3000:]


@pytest.mark.parametrize("args,pattern", [
    (["method=lorax"], r"method='lorax' is not an option; choose from: .*cola_fully.*lora"),
    (["model=gpt5"], r"model='gpt5' is not an option; choose from: .*tiny_llama"),
    (["trainer.bogus=1"], r"unknown key 'trainer.bogus'; trainer has: epochs, max_steps, .*batch_size"),
    (["lr=0.1"], r"unknown key 'lr'; the config has: model, method, data, trainer"),
    (["data.fraction=0"], r"data.fraction=0.0 is outside \(0, 1\]"),
    (["data.fraction=1.01"], r"data.fraction=1.01 is outside \(0, 1\]"),
    (["data.max_samples=0"], r"data.max_samples=0 must be >= 1"),
    (["method=cola_fully", "method.num_A=0"], r"method.num_A=0 must be >= 1"),
    (["method=cola_heuristic", "method.alpha=0"], r"method.alpha=0.0 must be > 0"),
    (["method=hydralora", "method.num_A=2"], r"hydralora shares one A across its B heads: num_A must be 1, got 2"),
    (["trainer.fp32_adapter_path=true", "trainer.master_weights=false"],
     r"trainer.fp32_adapter_path=true needs fp32 adapter weights in the model: trainer.master_weights=true and "
     r"deepspeed=none \(got master_weights=false, deepspeed=none\)"),
    (["trainer.compile=true", "deepspeed=zero2"], r"trainer.compile=true runs without DeepSpeed only \(got deepspeed=zero2\)"),
    (["method=lora_moe", "method.num_B=2"], r"mole experts are \(A_i, B_i\) pairs: num_B must equal num_A=3, got 2"),
    (["method=chain_of_lora", "method.links=0"], r"method.links=0 must be an integer >= 1"),
    (["method=chain_of_lora", "method.link_fractions=[0.5,0.2,0.2]"], r"method.link_fractions=\[0.5, 0.2, 0.2\] sums to 0.9, not 1"),
    (["method=chain_of_lora", "method.rank_schedule=[8,4]"], r"method.rank_schedule has 2 entries but method.links=3"),
    (["eval=default", "eval.benchmark=mmlu_pro"], r"mmlu_pro"),
    (["method=lora_moe", "method.init=pissa"], r"^error: method=lora_moe with method.init=pissa is degenerate: .*use method.init=lora$"),
    (["method=lora", "method.num_B=3"], r"^error: unknown key 'method.num_B'; method \(kind peft\) has: name, kind, r, "),
    (["method=cola_fully", "method.strategy=sometimes"], r"^error: method.strategy='sometimes' is not one of fully, random, heuristic$"),
])
def test_config_errors(tmp_path, args, pattern):
    _check(run_cli(TINY + args + [f"hydra.run.dir={tmp_path}"]), pattern)


def test_missing_data_file_names_file_root_and_hub(tmp_path):
    proc = run_cli(TINY + [f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"])
    _check(proc, rf"'gsm8k' is missing: looked for {tmp_path}/train/gsm8k_train.json; hub id openai/gsm8k")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_malformed_record_names_file_and_row(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "gsm8k_train.json").write_text(json.dumps(
        [{"instruction": "q", "output": "a"}] * 3 + [{"instruction": "q", "output": None}]))
    _check(run_cli(TINY + [f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]),
           r"gsm8k_train.json row 3: needs a non-empty 'output'")


def test_missing_model_path(tmp_path):
    _check(run_cli(TINY + ["model=llama3_2_3b", f"model.path={tmp_path}/nope", f"hydra.run.dir={tmp_path}"]),
           rf"model.path='{tmp_path}/nope' does not exist")


def test_target_module_the_model_lacks_lists_what_it_has(tmp_path):
    _check(run_cli(TINY + ["method.target_modules=[q_proj,qkv]", f"hydra.run.dir={tmp_path}"]),
           r"target module\(s\) \['qkv'\] not in the model; its linear modules are \[.*'down_proj'.*\]")


def test_print_config_works():
    proc = run_cli(["--cfg", "job", "method=cola_fully", "data=law"])
    assert proc.returncode == 0, proc.stderr
    assert "strategy: fully" in proc.stdout and "domain: law" in proc.stdout
