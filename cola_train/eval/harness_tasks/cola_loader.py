"""lm-evaluation-harness reads our benchmarks through this (`custom_dataset: !function
cola_loader.load` in each task YAML here): the authors' local CSV files under the data root, read
by cola_train.eval.benchmarks with all its repairs (encodings, bad rows, BBH's 2-18 options), and
cut to eval.subjects / eval.max_examples exactly as our own scorer cuts them, so both score the
same questions in the same order. Runs offline: no hub dataset is involved."""
from __future__ import annotations

import os


def load(benchmark: str, style: str, data_root: str | None = None, subjects=None,
         max_examples: int | None = None, skip_bad_rows: bool = True, **_ignored):
    """A DatasetDict with one "test" split of {prompt, choices, target, subject, source}.

    style "letter": our letter prompt (options listed, ends "Answer:"), choices "A", "B", ...
    style "cloze": our cloze prompt (no options listed), choices the option texts.
    lm-eval adds its target_delimiter " " before each choice (none after a chat template)."""
    from datasets import Dataset, DatasetDict

    from cola_train.eval.benchmarks import LETTERS, load_benchmark, select_subset
    from cola_train.eval.cloze import cloze_prompt
    from cola_train.eval.scorer import build_prompt

    root = data_root or os.environ.get("COLA_DATA_ROOT")
    examples = load_benchmark(benchmark, root, subjects=list(subjects) if subjects else None,
                              skip_bad_rows=bool(skip_bad_rows))
    rows = []
    for ex in select_subset(list(examples), max_examples):
        n = len(ex["options"])
        rows.append({"prompt": build_prompt(ex) if style == "letter" else cloze_prompt(ex),
                     "choices": list(LETTERS[:n]) if style == "letter" else list(ex["options"]),
                     "target": LETTERS.index(ex["answer"]), "subject": ex["subject"],
                     "source": ex["source"]})
    return DatasetDict({"test": Dataset.from_list(rows)})
