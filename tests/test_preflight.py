"""What must be true before the model is built fails before the model is built, in one line
(cola_train/checks.py); a benchmark that fails after training anyway loses no trained weights.

Real CLI runs with TINY overrides. "Before the model is built" is read off the log: run.py logs
"building model" when it starts on the model and "parameters trainable" once the adapter is on;
neither may appear, and no checkpoints/ may exist, when a check fails.
"""
from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import yaml

from conftest import CONF, DATA_ROOT, REPO, TINY, run_cli

BUILT = ("building model", "parameters trainable")


def _one_error(proc, pattern: str, code: int = 2) -> str:
    """Exit `code`, no traceback, exactly one `error:` line on stderr, matching `pattern`."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def _not_built(proc, run_dir):
    for marker in BUILT:
        assert marker not in proc.stdout + proc.stderr, f"{marker!r} logged: the model was built"
    assert not (run_dir / "checkpoints").exists()


def _root_with(tmp_path, files: list[str]):
    """A data root holding only these train/ files (copied from the real root)."""
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    for name in files:
        shutil.copy(DATA_ROOT / "train" / name, root / "train" / name)
    return root


# ----------------------------------------------------------------------------------------------
# data present


def test_missing_domain_names_the_domains_present(tmp_path, data_root):
    root = _root_with(tmp_path, ["gsm8k_train.json", "fineval_train-en.json"])
    run_dir = tmp_path / "run"
    proc = run_cli(TINY + ["data=law", f"data.root={root}", f"hydra.run.dir={run_dir}"])
    line = _one_error(proc, rf"'us_terms' is missing: looked for {root}/train/us_terms.json; no hub id; "
                            rf"data source 'Lawyer-Instruct' is missing: looked for {root}/train/Lawyer-Instruct.json; "
                            rf"hub id Alignment-Lab-AI/Lawyer-Instruct")
    # the two files put there are those of conf/data/finance.yaml and conf/data/math.yaml
    assert line.endswith(f"domains with their data in {root}: finance, math"), line
    _not_built(proc, run_dir)


def test_offline_without_data_root_fails_at_once_without_hub_retries(tmp_path):
    """No COLA_DATA_ROOT, no HF_*_OFFLINE, and a hub that does not answer (HF_ENDPOINT points at a
    closed local port, as unreachable as the sandbox's internet): one probe, no load_dataset."""
    run_dir = tmp_path / "run"
    env = {"COLA_DATA_ROOT": "", "HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "TRANSFORMERS_OFFLINE": "",
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = run_cli(TINY + [f"hydra.run.dir={run_dir}"], env=env)
    _one_error(proc, r"data source 'gsm8k' is missing: no data root set \(data.root or \$COLA_DATA_ROOT\); "
                     r"hub id openai/gsm8k unreachable .*no data root to look in")
    assert "Retry" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    _not_built(proc, run_dir)


# ----------------------------------------------------------------------------------------------
# benchmark files present


@pytest.mark.parametrize("case", ["custom_domain", "root_without_eval"])
def test_benchmark_that_cannot_run_fails_before_training(tmp_path, data_root, case):
    run_dir = tmp_path / "run"
    if case == "custom_domain":  # a domain of the user's own: no benchmark is known for it
        args = ["data.domain=contracts"]
        pattern = r"no benchmark for domain 'contracts'; known domains: .*math.*; eval=none \(or eval.enabled=false\) " \
                  r"trains without a benchmark$"
    else:
        root = _root_with(tmp_path, ["gsm8k_train.json"])
        args = [f"data.root={root}"]
        pattern = rf"benchmark data not found: {root}/eval does not exist .*; eval=none \(or eval.enabled=false\) " \
                  r"trains without a benchmark$"
    proc = run_cli(TINY + ["eval=default", "eval.max_examples=4", *args, f"hydra.run.dir={run_dir}"])
    _one_error(proc, pattern)
    _not_built(proc, run_dir)
    assert not (run_dir / "adapter").exists()


# ----------------------------------------------------------------------------------------------
# ranks within layer widths


def _tiny_llama_kv_width() -> int:
    """k_proj/v_proj's output width from conf/model/tiny_llama.yaml: kv heads x head size."""
    arch = yaml.safe_load((CONF / "model" / "tiny_llama.yaml").read_text())["arch"]
    return arch["num_key_value_heads"] * arch["hidden_size"] // arch["num_attention_heads"]


@pytest.mark.parametrize("method", ["cola_fully", "lora"])
def test_rank_larger_than_a_layer_fails_before_the_model(tmp_path, method):
    """CoLA used to stop with a traceback from its SVD init; LoRA (PEFT) trained without a word."""
    width = _tiny_llama_kv_width()
    run_dir = tmp_path / "run"
    proc = run_cli(TINY + [f"method={method}", f"method.r={width + 1}", f"hydra.run.dir={run_dir}"])
    _one_error(proc, rf"method.r={width + 1} is larger than the width of model.layers.0.self_attn.k_proj "
                     rf"\(64 -> {width}, so rank <= {width}\); too narrow: k_proj, v_proj")
    _not_built(proc, run_dir)


def _cfg(overrides):
    from conftest import compose

    return compose(["model=tiny_llama", *overrides])


@pytest.mark.parametrize("overrides,fits", [
    (["method=lora", "method.r=32"], True),
    (["method=lora", "method.r=33"], False),
    (["method=hydralora", "method.r=33"], False),
    (["method=lora_moe", "method.r=33"], False),
    (["method=cola_heuristic", "method.r=32"], True),
    (["method=chain_of_lora", "method.r=8", "method.rank_schedule=[8,33,4]"], False),
    (["method=lora", "method.r=33", "method.target_modules=[q_proj,o_proj]"], True),  # 64 wide
    (["method=fft"], True),
])
def test_rank_check_on_the_model_skeleton(overrides, fits):
    from cola_train.checks import ranks_fit_config
    from cola_train.config import ConfigError

    assert _tiny_llama_kv_width() == 32
    cfg = _cfg(overrides)
    if fits:
        ranks_fit_config(cfg)
    else:
        with pytest.raises(ConfigError, match=r"is larger than the width of .*k_proj \(64 -> 32, so rank <= 32\)"):
            ranks_fit_config(cfg)


def test_rank_check_reads_a_local_model_dir_config_json(tmp_path):
    """model.path with a config.json (and no weights at all): the rank is judged from the config,
    before loading would even be tried."""
    from cola_train.checks import ranks_fit_config
    from cola_train.config import ConfigError

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 300,
              "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    base = ["model=llama3_2_3b", f"model.path={tmp_path}", "method=lora"]
    ranks_fit_config(_cfg(base + ["method.r=96"]))
    with pytest.raises(ConfigError, match=r"method.r=97 is larger than the width of model.layers.0.self_attn.q_proj "
                                          r"\(96 -> 96, so rank <= 96\)"):
        ranks_fit_config(_cfg(base + ["method.r=97"]))


# ----------------------------------------------------------------------------------------------
# DeepSpeed importable


@pytest.mark.parametrize("devices", [1, 2])
def test_deepspeed_not_importable_is_one_line_before_any_rank(tmp_path, devices):
    shim = tmp_path / "shim" / "deepspeed"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('deepspeed is broken here (test shim)')\n")
    run_dir = tmp_path / "run"
    proc = run_cli(TINY + ["deepspeed=zero2", f"trainer.devices={devices}", f"hydra.run.dir={run_dir}"],
                   env={"PYTHONPATH": f"{tmp_path / 'shim'}:{REPO}"})
    _one_error(proc, r"^error: deepspeed=zero2 needs the deepspeed package: pip install 'cola_train\[train\]' "
                     r"\(import deepspeed: deepspeed is broken here \(test shim\)\)$")
    assert "local ranks" not in proc.stdout + proc.stderr
    _not_built(proc, run_dir)


# ----------------------------------------------------------------------------------------------
# value errors: no run dir, fast


@pytest.mark.parametrize("args,pattern", [
    (["data.fraction=-1"], r"^error: data.fraction=-1.0 is outside \(0, 1\]$"),
    (["eval=default", "eval.max_examples=0"], r"^error: eval.max_examples=0 must be >= 1 \(or null: every question\)$"),
])
def test_value_error_is_fast_and_leaves_no_run_dir(tmp_path, args, pattern):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = run_cli(TINY + args + [f"hydra.run.dir={run_dir}"])
    elapsed = time.monotonic() - started
    _one_error(proc, pattern)
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    assert elapsed < 10, f"{elapsed:.1f} s"


# ----------------------------------------------------------------------------------------------
# a benchmark that fails after training anyway


def test_benchmark_failing_after_training_keeps_adapter_and_results(tmp_path, data_root):
    """The benchmark breaks after training although it was readable before (here: a
    sitecustomize makes run_benchmark raise as if the eval files had gone, e.g. a network file
    system that dropped out): the adapter and results.json, with the trained steps and the
    benchmark's error, are still written, and the command exits 1."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import cola_train.eval as ev\n"
        "def _broken(*args, **kwargs):\n"
        "    raise ev.EvalDataError('benchmark file missing: /nfs/eval/gsm8k/gsm8k_test.csv (test shim)')\n"
        "ev.run_benchmark = _broken\n")
    run_dir = tmp_path / "run"
    proc = run_cli(TINY + ["eval=default", "eval.max_examples=4", f"hydra.run.dir={run_dir}"],
                   env={"PYTHONPATH": f"{shim}:{REPO}"})
    _one_error(proc, r"^error: benchmark failed after training: EvalDataError: benchmark file missing: "
                     r"/nfs/eval/gsm8k/gsm8k_test.csv \(test shim\) "
                     r"\(the trained weights and results.json were written\)$", code=1)
    assert (run_dir / "adapter").is_dir() and any((run_dir / "adapter").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "benchmark_failed"
    assert results["train"]["steps"] == 8  # TINY's trainer.max_steps
    assert results["eval"]["loss"] is not None
    assert results["benchmark"] == {
        "name": "gsm8k", "error": "EvalDataError: benchmark file missing: /nfs/eval/gsm8k/gsm8k_test.csv (test shim)"}
    assert "benchmark FAILED after training" in proc.stdout


# ----------------------------------------------------------------------------------------------
# training JSON must be UTF-8


def test_non_utf8_training_json_names_file_and_position(tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    raw = ('[\n  {"instruction": "What is 2+2?", "output": "4"},\n'
           '  {"instruction": "Caf').encode() + b"\xe9" + ' au lait?", "output": "yes"}\n]\n'.encode()
    path = root / "train" / "gsm8k_train.json"
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")
    line = raw[:offset].count(b"\n") + 1
    column = offset - raw[:offset].rfind(b"\n")
    run_dir = tmp_path / "run"
    proc = run_cli(TINY + [f"data.root={root}", f"hydra.run.dir={run_dir}"])
    _one_error(proc, rf"{path}: not valid UTF-8 at line {line}, column {column} \(byte offset {offset}: "
                     rf"b'\\xe9'\); re-encode the file as UTF-8")
    assert (line, column) == (3, 23)  # by hand: 22 characters precede it on line 3
    _not_built(proc, run_dir)


def test_training_json_with_a_bom_still_reads(tmp_path):
    from cola_train.config import DataSource
    from cola_train.data.sources import load_source

    (tmp_path / "t.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "q", "output": "a"}]).encode())
    assert load_source(DataSource(name="t", file="t.json"), tmp_path) == [{"instruction": "q", "input": "", "output": "a"}]


# ----------------------------------------------------------------------------------------------
# W&B credentials


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_ENTITY", "WANDB_DISABLED"):
        monkeypatch.setenv(key, "")  # restored after the test: loggers.setup writes them
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path


def _logger_mode(tmp_path) -> str:
    from cola_train.loggers import setup

    assert setup(_cfg(["logger=wandb", "logger.mode=online"]), tmp_path) == ["wandb"]
    import os

    return os.environ["WANDB_MODE"]


def test_wandb_login_netrc_counts_as_credentials(wandb_env):
    # what `wandb login` writes
    (wandb_env / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert _logger_mode(wandb_env) == "online"


def test_wandb_without_key_or_netrc_goes_offline(wandb_env, caplog):
    (wandb_env / "netrc").write_text("machine github.com\n  login me\n  password x\n")
    assert _logger_mode(wandb_env) == "offline"
    assert "no W&B credentials" in caplog.text
