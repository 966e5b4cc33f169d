"""EleutherAI's lm-evaluation-harness on the model in memory (eval.harness.tasks, or
`python -m cola_train.eval RUN_DIR --harness TASK`).

The model goes to lm-eval as it is, adapters attached and not merged (lm_eval's HFLM wrapper
takes an already built model), so routed methods (HydraLoRA, MoLE), which have no merged form,
are scored too, and a run is scored without saving and reloading it. The tasks shipped in
harness_tasks/ (cola_<benchmark> and cola_<benchmark>_cloze) read our local benchmark files
through cola_loader.py, so they run offline on exactly the questions eval.subjects /
eval.max_examples select for our own scorer; their prompts are ours (letter and cloze), so the
two scorers must agree question by question (tests/test_harness.py, docs/EVALUATION.md). Any
other lm-eval task needs eval.harness.lm_eval_tasks=true (those read hub datasets: online only).
"""
from __future__ import annotations

import logging
from pathlib import Path

from .benchmarks import EvalDataError

log = logging.getLogger("cola_train.eval")
TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"
# the metric that matches our scorer: lm-eval's acc (raw log-likelihood) for one-token letters,
# acc_norm (log-likelihood / characters) for cloze
OURS = {"letter": "acc", "cloze": "acc_norm"}


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("cola_*.yaml"))


def task_list(eval_cfg) -> list[str]:
    harness = getattr(eval_cfg, "harness", None)
    tasks = getattr(harness, "tasks", None) if harness is not None else None
    return [str(t) for t in (tasks or [])]


def check_tasks(tasks: list[str], lm_eval_tasks: bool = False) -> None:
    """Before training / loading a model: every task is one shipped here, or (with
    eval.harness.lm_eval_tasks=true) one in lm-eval's own registry; and lm-eval is installed."""
    if not tasks:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise EvalDataError(f"eval.harness.tasks needs lm-evaluation-harness: pip install 'cola_train[harness]' "
                            f"(import lm_eval: {err})")
    unknown = [t for t in tasks if t not in shipped_tasks()]
    if unknown and lm_eval_tasks:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager(include_defaults=True).all_tasks)
        unknown = [t for t in unknown if t not in known]
    if unknown:
        more = "" if lm_eval_tasks else " (eval.harness.lm_eval_tasks=true also accepts lm-eval's own tasks, online)"
        raise EvalDataError(f"unknown lm-eval task {unknown[0]!r}; the offline tasks shipped here are "
                            f"{', '.join(shipped_tasks())}{more}")


def run_harness(model, tokenizer, eval_cfg, tasks: list[str], data_root, return_samples: bool = False) -> dict:
    """{"results": {task: {metric: value}}, "n": {task: questions}, "lm_eval_version", ...}."""
    harness_cfg = getattr(eval_cfg, "harness", None)
    lm_eval_tasks = bool(getattr(harness_cfg, "lm_eval_tasks", False))
    check_tasks(tasks, lm_eval_tasks)
    import importlib.metadata

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    subjects = getattr(eval_cfg, "subjects", None)
    selection = {"data_root": str(data_root) if data_root else None,
                 "subjects": list(subjects) if subjects else None,
                 "max_examples": getattr(eval_cfg, "max_examples", None),
                 "skip_bad_rows": bool(getattr(eval_cfg, "skip_bad_rows", True))}
    batch_size = getattr(harness_cfg, "batch_size", None) or int(getattr(eval_cfg, "batch_size", 16) or 16)
    chat = bool(getattr(eval_cfg, "chat_template", False))
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices; our own log says what ran
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(TASKS_DIR),
                          include_defaults=lm_eval_tasks and any(t not in shipped_tasks() for t in tasks), metadata=selection)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=0,
                              apply_chat_template=chat, bootstrap_iters=0, log_samples=return_samples,
                              verbosity="WARNING")
    finally:
        model.train(was_training)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
    n = {task: int((info or {}).get("effective", 0)) for task, info in (out.get("n-samples") or {}).items()}
    summary = {"tasks": list(tasks), "results": results, "n": n, "chat_template": chat,
               "lm_eval_version": importlib.metadata.version("lm_eval"), **{k: v for k, v in selection.items()
                                                                           if k != "data_root"}}
    for task, metrics in results.items():
        log.info("lm-eval %s: %s on %d questions", task,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), n.get(task, 0))
    if return_samples:
        summary["samples"] = out.get("samples", {})
    return summary


def after_training(cfg, model, tokenizer) -> dict | None:
    """results.json's "harness" after training: its scores, or {"error"} (the trained run is kept
    either way, like a failing benchmark); None when eval.harness.tasks is empty."""
    tasks = task_list(cfg.eval)
    if not tasks:
        return None
    from ..data.sources import data_root

    try:
        return run_harness(model, tokenizer, cfg.eval, tasks, data_root(cfg.data))
    except Exception as err:  # noqa: BLE001 - never lose a trained run to its scoring
        log.exception("lm-evaluation-harness failed after training")
        return {"tasks": tasks, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}


def wandb_summary(harness: dict | None) -> dict:
    """harness/<task>/<metric> entries for the W&B run summary, next to final/accuracy."""
    return {f"harness/{task}/{metric}": value for task, metrics in ((harness or {}).get("results") or {}).items()
            for metric, value in metrics.items()}
