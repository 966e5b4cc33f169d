"""Progress for the long phases before and after training (adapter init, tokenization, benchmark).

A bar only when it is worth one: tqdm's `delay` keeps it hidden until the phase has run for a
couple of seconds, so tests and small runs stay quiet, while a Llama-8B init or a 14k-question
MMLU pass shows how far it is. Only the main process (RANK 0) draws, so N ranks print one bar.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, TypeVar

T = TypeVar("T")
DELAY_S = 2.0


def main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def bar(items: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "it",
        enabled: Optional[bool] = None) -> Iterable[T]:
    """`items`, wrapped in a tqdm bar that appears after DELAY_S seconds (enabled=False: never)."""
    if enabled is False or not main_process():
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return items
    return tqdm(items, desc=desc, total=total, unit=unit, delay=DELAY_S, leave=False)
