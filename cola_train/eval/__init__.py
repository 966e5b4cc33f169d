"""Multiple-choice (option-fill) benchmarks: loaders for the paper's test sets and a batched
scorer that runs in-process on the (possibly adapter-wrapped) model. See docs/EVALUATION.md."""
from .benchmarks import (BENCHMARKS, DOMAIN_BENCHMARK, EvalDataError, ExampleList,
                         benchmark_for_domain, eval_dir, load_benchmark, read_text_robust,
                         select_subset)
from .scorer import (build_prompt, evaluate_benchmark, letter_logits, letter_tokens,
                     run_benchmark)

__all__ = ["BENCHMARKS", "DOMAIN_BENCHMARK", "EvalDataError", "ExampleList",
           "benchmark_for_domain", "build_prompt", "eval_dir", "evaluate_benchmark",
           "letter_logits", "letter_tokens", "load_benchmark", "read_text_robust",
           "run_benchmark", "select_subset"]
