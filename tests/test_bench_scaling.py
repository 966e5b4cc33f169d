"""scripts/bench_scaling.py: the weak-scaling arithmetic on rows given here, and one real 2-rank
row (DeepSpeed ZeRO-2 on gloo, the tiny shape) through the CLI path."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench_scaling  # noqa: E402


def _raw(tok_per_s, profile=None):
    return {"status": "completed", "rc": 0, "command": "x",
            "timings": {"steady_tokens_per_s": tok_per_s, "step_s_median": 0.5, "peak_gib": 10.0,
                        "time_to_first_step_s": 20.0, "checkpoints": [{"seconds": 1.5, "bytes": 10}]},
            "profile": profile}


def test_weak_scaling_efficiency_is_per_gpu_rate_over_the_one_gpu_row():
    rows = [bench_scaling.row_of("lora", 1, 2, _raw(1000.0)),
            bench_scaling.row_of("lora", 4, 2, _raw(900.0, {"collectives_share": 0.12, "device_busy": 0.8})),
            bench_scaling.row_of("lora", 8, 3, _raw(700.0)),           # no 1-GPU row at ZeRO-3
            bench_scaling.row_of("cola_fully", 2, 2, _raw(500.0))]     # nor for this method
    bench_scaling.add_efficiency(rows)
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert rows[1]["efficiency"] == pytest.approx(0.9)
    assert rows[1]["tokens_per_s"] == pytest.approx(3600.0)    # 4 GPUs x 900
    assert rows[1]["collectives_share"] == 0.12
    assert rows[2]["efficiency"] is None and rows[3]["efficiency"] is None
    text = bench_scaling.table(rows)
    assert "| lora | 2 | 4 | completed | 3600 | 900 | 90.0% |" in text


def test_bad_arguments_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_scaling.py"), "--ckpt", str(tmp_path),
                           "--zero", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--zero 2 or 3" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_give_a_row(tmp_path, data_root):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_scaling.py"), "--shape", "small",
                           "--ckpt", str(tmp_path / "ckpt"), "--devices", "2", "--zero", "2", "--methods", "lora",
                           "--steps", "4", "--samples", "16", "--chain", "no", "--runs", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "runs" / "bench_scaling.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["devices"] == 2
    assert rows[0]["tokens_per_s"] == pytest.approx(2 * rows[0]["tokens_per_s_per_gpu"])
    assert rows[0]["collectives_share"] is None  # no GPU: nothing to profile on a device
    assert "| lora | 2 | 2 | completed |" in proc.stdout
