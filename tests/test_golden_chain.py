"""Chain of LoRA's training record is pinned (tests/golden/chain_curves.json, written by
scripts/chain_curves.py from the code before the chain became a schedule around ColaTrainer.restart):
every logged step's loss, learning rate and grad norm, the chain/* rows, the per-link records and
the final eval loss of five short tiny_llama runs (2 and 3 links, lr restarts with scaled and full
warm-up and one schedule, merge factors and weights, a rank schedule, logging every 2 steps). A
change to when links switch, what is merged or how the optimizer and schedule restart shows here."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import chain_curves  # noqa: E402

GOLDEN = json.loads(chain_curves.GOLDEN.read_text())


def _close(got, want, where: str) -> None:
    if isinstance(want, float) and isinstance(got, (int, float)):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


@pytest.mark.parametrize("name", sorted(chain_curves.CASES))
def test_chain_run_keeps_its_pinned_curve(name, data_root):
    _close(chain_curves.record(name), GOLDEN[name], name)
