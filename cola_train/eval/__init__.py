"""Multiple-choice (option-fill) benchmarks: loaders for the paper's test sets and a batched
scorer that runs in-process on the (possibly adapter-wrapped) model. See docs/EVALUATION.md."""
from .benchmarks import (BENCHMARKS, DOMAIN_BENCHMARK, EvalDataError, ExampleList,
                         benchmark_for_domain, eval_dir, load_benchmark, read_text_robust,
                         select_subset)
from .scorer import build_prompt, chat_prompt, letter_logits, letter_tokens
from .cloze import cloze_prompt, cloze_scores
from .scoring import evaluate_benchmark, run_benchmark

__all__ = ["BENCHMARKS", "DOMAIN_BENCHMARK", "EvalDataError", "ExampleList",
           "benchmark_for_domain", "build_prompt", "chat_prompt", "cloze_prompt", "cloze_scores",
           "eval_dir", "evaluate_benchmark",
           "letter_logits", "letter_tokens", "load_benchmark", "read_text_robust",
           "run_benchmark", "select_subset"]
