"""EleutherAI's lm-evaluation-harness, run through our shipped task YAMLs on the in-memory model,
agrees with our own scorer question by question (docs/EVALUATION.md, "lm-evaluation-harness").

The reference is lm-eval's own computation (HFLM.loglikelihood via simple_evaluate); ours is
eval/scorer.py (letter) and eval/cloze.py (cloze). Same questions (the loader applies
eval.subjects / eval.max_examples as our scorer does), same prompts, a real model (SmolLM2).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

SUBJECT, N = "global_facts", 4


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("lm_eval")
    from cola_train.models import load_model, load_tokenizer
    from conftest import compose

    cfg = compose(["model=smollm2_135m"]).model
    try:
        tok = load_tokenizer(cfg)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"SmolLM2 not installed: {err}")
    return load_model(cfg, torch.float32).eval(), tok


def _by_source(samples: list[dict]) -> dict[str, list[float]]:
    """{question source: [lm-eval's log-likelihood of each choice]}."""
    return {s["doc"]["source"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}


@pytest.mark.slow
def test_our_scorer_and_lm_eval_agree_question_by_question(smollm2, data_root):
    from cola_train.eval import cloze_scores, letter_logits, load_benchmark, select_subset
    from cola_train.eval.scoring import _accuracy
    from cola_train.eval.harness import run_harness

    model, tok = smollm2
    eval_cfg = SimpleNamespace(subjects=[SUBJECT], max_examples=N, batch_size=4, skip_bad_rows=False,
                               chat_template=False, harness=None)
    got = run_harness(model, tok, eval_cfg, ["cola_mmlu", "cola_mmlu_cloze"], data_root, return_samples=True)
    examples = select_subset(list(load_benchmark("mmlu", data_root, subjects=[SUBJECT])), N)
    assert got["n"] == {"cola_mmlu": N, "cola_mmlu_cloze": N}

    letter, _ = letter_logits(model, tok, examples, batch_size=4)
    theirs = _by_source(got["samples"]["cola_mmlu"])
    assert sorted(theirs) == sorted(ex["source"] for ex in examples)
    for ex, logits in zip(examples, letter):
        ll = theirs[ex["source"]]
        # one-token letters at one position: log-likelihoods differ by the logits' differences
        assert max(abs((a - ll[0]) - (b - logits[0])) for a, b in zip(ll, logits)) < 1e-3, ex["source"]
        assert ll.index(max(ll)) == logits.index(max(logits)), ex["source"]

    norm, raw, _ = cloze_scores(model, tok, examples, batch_size=4)
    theirs = _by_source(got["samples"]["cola_mmlu_cloze"])
    for ex, ours_raw, ours_norm in zip(examples, raw, norm):
        ll = theirs[ex["source"]]
        assert max(abs(a - b) for a, b in zip(ll, ours_raw)) < 1e-3, ex["source"]
        their_norm = [v / len(opt) for v, opt in zip(ll, ex["options"])]  # acc_norm: per character
        assert their_norm.index(max(their_norm)) == ours_norm.index(max(ours_norm)), ex["source"]

    # the accuracies, from our scores as eval/scoring.py turns them into accuracy
    ours = {name: _accuracy(examples, scores)[0]["accuracy"] for name, scores in (("letter", letter), ("cloze", norm))}
    assert got["results"]["cola_mmlu"]["acc"] == pytest.approx(ours["letter"])
    assert got["results"]["cola_mmlu_cloze"]["acc_norm"] == pytest.approx(ours["cloze"])


def test_unknown_harness_task_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import DATA_ROOT, REPO

    pytest.importorskip("lm_eval")
    proc = subprocess.run([sys.executable, "-m", "cola_train.eval", "--model", "tiny_llama", "--harness", "mmlu_nope"],
                          cwd=REPO, env={**os.environ, "COLA_DATA_ROOT": str(DATA_ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: unknown lm-eval task 'mmlu_nope'; the offline tasks shipped here are "
                                  "cola_bbh, cola_bbh_cloze,")
