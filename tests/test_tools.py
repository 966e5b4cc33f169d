"""`python -m cola_train.generate` and `python -m cola_train.export` on a finished run.

One trained tiny LoRA run (module fixture, the real CLI; it also scores an lm-eval task after
training) plus run dirs for other methods built in-process from its config with random,
non-zero adapter factors (cola_fully: a mergeable method of our own; hydralora, lora_moe: routed).
References are independent of the code under test: the adapter loaded on a fresh base with
adapters.load_adapter, HF generate on adapters.merged_model, PEFT's PeftModel.from_pretrained,
AutoModelForCausalLM.from_pretrained on the written checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA_ROOT, REPO, TINY, compose, run_cli

PROMPT = "What is 2+3?"
N_TOKENS = 12


def _seeded_base(run: Path):
    from transformers import set_seed

    from cola_train.eval.run_dir import run_config
    from cola_train.models import load_model, load_tokenizer

    cfg = run_config(run)
    set_seed(cfg.seed)
    return cfg, load_model(cfg.model, torch.float32), load_tokenizer(cfg.model)


def _adapted(run: Path):
    from cola_train import adapters

    cfg, base, tok = _seeded_base(run)
    return cfg, adapters.load_adapter(base, run / "adapter").eval(), tok


def _plain_prompt_ids(tok, text: str) -> list[int]:
    """The training prompt of the byte tokenizer (no chat template), written out by hand."""
    return [tok.bos_token_id] + tok(f"### Instruction:\n{text}\n\n### Response:\n", add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("lora_run")
    proc = run_cli(TINY + ["method=lora", "trainer.lr=1e-3", "eval.harness.tasks=[cola_mmlu_law_cloze]",
                           "eval.max_examples=3", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def built_runs(tmp_path_factory, lora_run):
    """{method: run dir} for cola_fully, hydralora and lora_moe: the lora run's config with another
    method, and an adapter of random non-zero factors saved as a run saves it."""
    from omegaconf import OmegaConf
    from transformers import set_seed

    from cola_train import adapters
    from cola_train.models import load_model, target_modules

    runs = {}
    for method in ("cola_fully", "hydralora", "lora_moe"):
        run = tmp_path_factory.mktemp(method)
        cfg = OmegaConf.load(lora_run / ".hydra" / "config.yaml")
        cfg.method = compose([f"method={method}"]).method   # its kind's schema, as a run composes it
        (run / ".hydra").mkdir()
        OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
        set_seed(cfg.seed)
        model = adapters.attach_adapter(load_model(cfg.model, torch.float32), cfg.method, target_modules(cfg.model))
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.data = torch.randn(p.shape, generator=gen) * 0.3
        adapters.save_adapter(model, run / "adapter")
        runs[method] = run
    return runs


def _main(module, argv, capsys):
    """(exit code, stdout, stderr) of module.main(argv) in-process."""
    try:
        code = module.main(argv)
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


# -- generate ------------------------------------------------------------------------------------
def test_generate_greedy_equals_merged_model_generate(lora_run, tmp_path, capsys):
    from cola_train import adapters, generate
    from cola_train.data.template import encode

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"instruction": "Add 4 and 9."}) + "\n")
    code, out, err = _main(generate, [str(lora_run), "--file", str(prompts), "--max-new-tokens", str(N_TOKENS),
                                      "--min-new-tokens", str(N_TOKENS)], capsys)
    assert code == 0, err
    got = [json.loads(line)["output"] for line in out.splitlines()]

    cfg, adapted, tok = _adapted(lora_run)
    plain = adapters.merged_model(adapted)
    _, base, _ = _seeded_base(lora_run)
    want, base_out = [], []
    for text in (PROMPT, "Add 4 and 9."):
        ids = _plain_prompt_ids(tok, text)
        trained = encode(tok, {"instruction": text, "input": "", "output": "x"}, cfg.data.template, 512)
        assert trained["input_ids"][:len(ids)] == ids  # the hand-written prompt is training's prompt
        for model, into in ((plain, want), (base, base_out)):
            seq = model.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            into.append(tok.decode(seq[0, len(ids):], skip_special_tokens=True))
    assert got == want
    assert want != base_out  # the adapter changes what is generated: the comparison means something

    code, streamed, err = _main(generate, [str(lora_run), "--prompt", PROMPT, "--max-new-tokens", str(N_TOKENS),
                                           "--min-new-tokens", str(N_TOKENS)], capsys)
    assert code == 0, err
    assert streamed.rstrip("\n") == want[0]


def test_interactive_chat_keeps_the_conversation(lora_run, capsys, monkeypatch):
    """Each turn's prompt is the conversation so far: the previous prompt, its reply, the new turn."""
    from cola_train import generate

    lines = iter(["What is 2+3?", "And 4+4?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen, replies, real = [], [], generate.generate

    def spy(model, tok, ids, **kw):
        seen.append(ids)
        replies.append(real(model, tok, ids, **kw))
        return replies[-1]

    monkeypatch.setattr(generate, "generate", spy)
    code, out, err = _main(generate, [str(lora_run), "--interactive", "--max-new-tokens", "4",
                                      "--min-new-tokens", "4"], capsys)
    assert code == 0, err
    from cola_train.eval.run_dir import run_config
    from cola_train.models import load_tokenizer

    tok = load_tokenizer(run_config(lora_run).model)
    assert len(seen) == 2 and seen[0] == _plain_prompt_ids(tok, "What is 2+3?")
    history = f"### Instruction:\nWhat is 2+3?\n\n### Response:\n{replies[0]}\n\n"
    assert seen[1] == [tok.bos_token_id] + tok(history + "### Instruction:\nAnd 4+4?\n\n### Response:\n",
                                               add_special_tokens=False)["input_ids"]
    assert replies[0] in out and replies[1] in out  # both streamed


@pytest.mark.parametrize("method", ["hydralora", "lora_moe"])
def test_a_routed_method_generates_unmerged(built_runs, method, capsys):
    from cola_train import generate

    run = built_runs[method]
    code, out, err = _main(generate, [str(run), "--prompt", PROMPT, "--max-new-tokens", "6",
                                      "--min-new-tokens", "6"], capsys)
    assert code == 0, err
    _, adapted, tok = _adapted(run)  # the routed model itself, generating token by token
    ids = _plain_prompt_ids(tok, PROMPT)
    seq = adapted.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    assert out.rstrip("\n") == tok.decode(seq[0, len(ids):], skip_special_tokens=True) != ""


@pytest.mark.slow
def test_generate_prompt_of_a_chat_tokenizer_is_trainings():
    """With a chat template (SmolLM2's), the generation prompt is the training prompt."""
    from cola_train.data.template import encode
    from cola_train.generate import prompt_ids
    from cola_train.models import load_tokenizer
    from conftest import compose

    try:
        tok = load_tokenizer(compose(["model=smollm2_135m"]).model)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"SmolLM2 not installed: {err}")
    trained = encode(tok, {"instruction": PROMPT, "input": "", "output": "5"}, "chat", 512)
    n_prompt = trained["labels"].index(next(x for x in trained["labels"] if x != -100))
    assert prompt_ids(tok, [{"role": "user", "content": PROMPT}], "chat") == trained["input_ids"][:n_prompt]


def test_generate_bad_inputs_are_one_line(lora_run, tmp_path, capsys):
    from cola_train import generate

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "?"}) + "\n")
    cases = [
        ([str(lora_run), "--file", str(bad)], f"error: {bad}:2: a record needs \"prompt\", \"instruction\" or \"messages\""),
        ([str(lora_run)], "error: one of the arguments --prompt --file --interactive is required"),
        ([str(tmp_path), "--prompt", "hi"], f"error: {tmp_path} is not a run dir (no .hydra/config.yaml)"),
        ([str(lora_run), "--prompt", "hi", "--max-new-tokens", "0"],
         "error: argument --max-new-tokens: --max-new-tokens must be a positive integer, got '0'"),
    ]
    for argv, message in cases:
        code, _, err = _main(generate, argv, capsys)
        assert code == 2 and err.strip() == message, (argv, err)


# -- export --------------------------------------------------------------------------------------
def _probe_logits(model, ids=(1, 40, 41, 42, 80, 90, 100, 120, 2)):
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits.float()


@pytest.mark.parametrize("method", ["lora", "cola_fully"])
def test_peft_export_loads_in_peft_and_matches(lora_run, built_runs, method, tmp_path, capsys):
    from peft import PeftModel

    from cola_train import export

    run = lora_run if method == "lora" else built_runs[method]
    out = tmp_path / "peft"
    code, _, err = _main(export, [str(run), "--to", "peft", "--out", str(out)], capsys)
    assert code == 0, err
    _, adapted, _ = _adapted(run)
    _, base, _ = _seeded_base(run)
    loaded = PeftModel.from_pretrained(base, out).eval()
    want, got = _probe_logits(adapted), _probe_logits(loaded)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
    assert not torch.allclose(want, _probe_logits(_seeded_base(run)[1]), atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merged_export_loads_with_automodel_and_matches(lora_run, dtype, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cola_train import export

    out = tmp_path / "merged"
    code, _, err = _main(export, [str(lora_run), "--to", "merged", "--out", str(out), "--dtype", dtype], capsys)
    assert code == 0, err
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    AutoTokenizer.from_pretrained(out)
    _, adapted, _ = _adapted(lora_run)
    want, got = _probe_logits(adapted), _probe_logits(loaded)
    tol = 1e-4 if dtype == "fp32" else 5e-2 * max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= tol
    report = json.loads((out / "cola_export.json").read_text())
    assert report["method"] == "lora" and all(c["ok"] for c in report["checks"])


def test_merged_export_refuses_a_wrong_merge_and_writes_nothing(lora_run, tmp_path, capsys, monkeypatch):
    """The check before writing catches a merge that lost the update (here: PEFT's unload, which
    drops the LoRA layers without folding them in)."""
    from cola_train import adapters, export

    monkeypatch.setattr(adapters, "merged_model", lambda model: model.unload())
    out = tmp_path / "merged"
    code, _, err = _main(export, [str(lora_run), "--to", "merged", "--out", str(out)], capsys)
    assert code == 2 and err.startswith("error: the merged model's logits differ from the adapted model's by")
    assert err.strip().endswith("nothing written") and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial directory either


@pytest.mark.parametrize("method", ["hydralora", "lora_moe"])
def test_export_refuses_a_routed_method(built_runs, method, tmp_path, capsys):
    from cola_train import export

    for to in ("peft", "merged"):
        out = tmp_path / to
        code, _, err = _main(export, [str(built_runs[method]), "--to", to, "--out", str(out)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert err.startswith(f"error: cannot export {method}: it routes each token through a learned router")
        assert "use --to merged where possible" in err and not out.exists()


def test_export_bad_inputs_are_one_line(lora_run, tmp_path, capsys):
    from cola_train import export

    taken = tmp_path / "taken"
    taken.mkdir()
    cases = [
        ([str(lora_run), "--to", "peft", "--out", str(taken)],
         f"error: --out {taken} already exists; export writes a new directory (remove it or choose another --out)"),
        ([str(lora_run), "--to", "gguf"], "error: argument --to: invalid choice: 'gguf' (choose from 'peft', 'merged')"),
        ([str(tmp_path), "--to", "peft"], f"error: {tmp_path} is not a run dir (no .hydra/config.yaml)"),
    ]
    for argv, message in cases:
        code, _, err = _main(export, argv, capsys)
        assert code == 2 and err.strip() == message, (argv, err)
    # the real entry point: no traceback, exit 2
    env = {**os.environ, "COLA_DATA_ROOT": str(DATA_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "cola_train.export", str(tmp_path), "--to", "merged"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path} is not a run dir (no .hydra/config.yaml)"


# -- lm-eval after training ----------------------------------------------------------------------
def test_run_writes_harness_scores_next_to_ours(lora_run):
    from cola_train.eval.harness import wandb_summary

    results = json.loads((lora_run / "results.json").read_text())
    harness = results["harness"]
    assert harness["tasks"] == ["cola_mmlu_law_cloze"] and harness["n"] == {"cola_mmlu_law_cloze": 3}
    scores = harness["results"]["cola_mmlu_law_cloze"]
    assert set(scores) == {"acc", "acc_norm"} and all(abs(v * 3 - round(v * 3)) < 1e-9 for v in scores.values())
    assert wandb_summary(harness) == {"harness/cola_mmlu_law_cloze/acc": scores["acc"],
                                      "harness/cola_mmlu_law_cloze/acc_norm": scores["acc_norm"]}


def test_harness_scores_a_routed_model_in_memory(built_runs, data_root):
    """lm-eval runs on the HydraLoRA model as loaded (routed, unmerged), on the questions our
    eval.max_examples picks."""
    from types import SimpleNamespace

    from cola_train.eval.harness import run_harness

    _, adapted, tok = _adapted(built_runs["hydralora"])
    eval_cfg = SimpleNamespace(subjects=None, max_examples=2, batch_size=2, skip_bad_rows=False,
                               chat_template=False, harness=None)
    got = run_harness(adapted, tok, eval_cfg, ["cola_mmlu_law_cloze"], data_root, return_samples=True)
    assert got["n"] == {"cola_mmlu_law_cloze": 2}
    sources = [s["doc"]["source"] for s in got["samples"]["cola_mmlu_law_cloze"]]
    from cola_train.eval import load_benchmark, select_subset

    want = [ex["source"] for ex in select_subset(list(load_benchmark("mmlu_law", data_root)), 2)]
    assert sorted(sources) == sorted(want) and len(set(want)) == 2
