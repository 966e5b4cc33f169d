"""One benchmark run: load the examples, score them by letter and/or cloze, and turn the scores
into accuracies (micro, macro, per subject). Scoring itself is in scorer.py (letter) and cloze.py."""
from __future__ import annotations

import logging

from ..config import scoring_list
from .benchmarks import LETTERS, EvalDataError, benchmark_for_domain, load_benchmark, select_subset
from .cloze import cloze_scores
from .scorer import ANSWER_CUE, chat_prompt, letter_logits

log = logging.getLogger("cola_train.eval")


def check_tokenizer(eval_cfg, tokenizer) -> None:
    """Before training: the benchmark's prompt can be built with this tokenizer (a missing chat
    template would otherwise stop the run at its end, after the training it throws away)."""
    if getattr(eval_cfg, "enabled", True) and getattr(eval_cfg, "chat_template", False):
        chat_prompt(tokenizer, ANSWER_CUE)


def _accuracy(chosen: list[dict], scores: list[list[float]]) -> tuple[dict, list[str]]:
    """accuracy, macro_accuracy and per_subject of the argmax predictions of `scores`."""
    per_subject: dict[str, dict] = {}
    predictions, n_correct = [], 0
    for ex, s in zip(chosen, scores):
        pred = LETTERS[max(range(len(s)), key=s.__getitem__)]
        ok = pred == ex["answer"]
        n_correct += ok
        entry = per_subject.setdefault(ex["subject"], {"correct": 0, "n": 0})
        entry["correct"] += ok
        entry["n"] += 1
        predictions.append(pred)
    for entry in per_subject.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
    return {"accuracy": n_correct / len(chosen),
            "macro_accuracy": sum(e["accuracy"] for e in per_subject.values()) / len(per_subject),
            "per_subject": dict(sorted(per_subject.items()))}, predictions


def evaluate_benchmark(model, tokenizer, examples: list[dict], batch_size: int = 16,
                       max_examples: int | None = None, device=None,
                       return_predictions: bool = False, scoring=("letter",),
                       chat_template: bool = False) -> dict:
    """Accuracy of `model` on `examples` (from a loader): micro (mean over examples), macro
    (mean over subjects), per subject; n_skipped is the loader's count of skipped rows.

    `scoring`: letter and/or cloze (cloze.py). The first fills accuracy / macro_accuracy /
    per_subject / n_truncated; with anything but the default ["letter"], `scoring` lists the
    names and `by_scoring` holds each one's numbers (the default output stays as it was)."""
    names = scoring_list(scoring)
    n_skipped = getattr(examples, "n_skipped", 0)
    chosen = select_subset(list(examples), max_examples)
    if not chosen:
        raise EvalDataError("no benchmark examples to evaluate")
    by_scoring, first_predictions = {}, None
    for name in names:
        if name == "letter":
            scores, truncated = letter_logits(model, tokenizer, chosen, batch_size=batch_size,
                                              device=device, chat_template=chat_template)
        else:
            scores, _, truncated = cloze_scores(model, tokenizer, chosen, batch_size=batch_size,
                                                device=device, chat_template=chat_template)
        numbers, predictions = _accuracy(chosen, scores)
        by_scoring[name] = {**numbers, "n_truncated": truncated}
        if first_predictions is None:
            first_predictions = predictions
    first = by_scoring[names[0]]
    result = {
        "accuracy": first["accuracy"],
        "macro_accuracy": first["macro_accuracy"],
        "per_subject": first["per_subject"],
        "n_examples": len(chosen),
        "n_skipped": n_skipped,
        "n_truncated": first["n_truncated"],
    }
    if names != ["letter"]:
        result["scoring"] = names
        result["by_scoring"] = by_scoring
    if return_predictions:
        result["predictions"] = [{"source": ex["source"], "prediction": pred, "answer": ex["answer"]}
                                 for ex, pred in zip(chosen, first_predictions)]
    return result


def run_benchmark(model, tokenizer, eval_cfg, domain: str, data_root) -> dict:
    """Load the benchmark that `eval_cfg` (or else the domain) names and score the model."""
    name = getattr(eval_cfg, "benchmark", None) or benchmark_for_domain(domain)
    subjects = getattr(eval_cfg, "subjects", None)
    if subjects is not None:
        subjects = list(subjects)
    examples = load_benchmark(name, data_root, subjects=subjects,
                              skip_bad_rows=bool(getattr(eval_cfg, "skip_bad_rows", False)))
    max_examples = getattr(eval_cfg, "max_examples", None)
    result = evaluate_benchmark(model, tokenizer, examples,
                                batch_size=int(getattr(eval_cfg, "batch_size", 16) or 16),
                                max_examples=max_examples,
                                scoring=getattr(eval_cfg, "scoring", None) or ["letter"],
                                chat_template=bool(getattr(eval_cfg, "chat_template", False)))
    for scoring, numbers in (result.get("by_scoring") or {"": result}).items():
        log.info("benchmark %s%s: accuracy %.4f (macro %.4f) on %d examples, %d row(s) skipped",
                 name, f" ({scoring})" if scoring else "", numbers["accuracy"], numbers["macro_accuracy"],
                 result["n_examples"], result["n_skipped"])
    return {"name": name, **result, "subjects": subjects, "max_examples": max_examples,
            "skipped_rows": list(getattr(examples, "skipped", []))}
