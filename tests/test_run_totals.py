"""A run's tokens, time and energy summed over the segments a preemption splits it into
(cola_train/run_totals.py), with a meter whose readings the test sets (no GPU needed)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cola_train.run_totals import FILE, RunTotals


class Meter:
    """EnergyMeter's interface; joules() returns what the test set (None: no GPU)."""

    def __init__(self, joules):
        self.value = joules

    def start(self):
        pass

    def joules(self):
        return self.value


def _save(totals: RunTotals, tmp_path, step: int):
    folder = tmp_path / f"checkpoint-{step}"
    folder.mkdir()
    totals.on_save(SimpleNamespace(output_dir=str(tmp_path)),
                   SimpleNamespace(global_step=step, is_world_process_zero=True), None)
    return folder


def test_three_segments_add_up(tmp_path):
    first = RunTotals(Meter(100.0), tokens_so_far=lambda: 40)
    first.start()
    ckpt = _save(first, tmp_path, 4)
    saved = json.loads((ckpt / FILE).read_text())
    assert saved["tokens"] == 40 and saved["joules"] == 100.0 and saved["segments"] == 1

    second = RunTotals(Meter(30.0), tokens_so_far=lambda: 25)
    second.resume_from(str(ckpt))
    second.start()
    ckpt = _save(second, tmp_path, 7)

    third = RunTotals(Meter(12.5), tokens_so_far=lambda: 10)
    third.resume_from(str(ckpt))
    third.start()
    run = third.totals()
    assert run["tokens"] == 40 + 25 + 10 and run["joules"] == pytest.approx(142.5)
    assert run["segments"] == 3 and run["counted_from_step"] == 0
    assert run["runtime_s"] >= saved["runtime_s"]


@pytest.mark.parametrize("unmeasured", ["earlier", "now"])
def test_a_segment_without_a_meter_makes_the_energy_absent_not_smaller(tmp_path, unmeasured):
    first = RunTotals(Meter(None if unmeasured == "earlier" else 80.0), tokens_so_far=lambda: 8)
    first.start()
    ckpt = _save(first, tmp_path, 2)
    second = RunTotals(Meter(None if unmeasured == "now" else 20.0), tokens_so_far=lambda: 8)
    second.resume_from(str(ckpt))
    second.start()
    run = second.totals()
    assert run["joules"] is None and run["tokens"] == 16


def test_a_checkpoint_without_totals_counts_from_its_step(tmp_path):
    ckpt = tmp_path / "checkpoint-6"
    ckpt.mkdir()
    totals = RunTotals(Meter(9.0), tokens_so_far=lambda: 30)
    totals.resume_from(str(ckpt))
    totals.start()
    run = totals.totals()
    assert run["counted_from_step"] == 6 and run["segments"] is None
    assert run["tokens"] == 30 and run["joules"] == 9.0
