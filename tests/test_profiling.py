"""trainer.profile_steps: the real run profiles N steps after the warm ones and records where the
time went (profile.txt + results.json "profile")."""
from __future__ import annotations

import json

from conftest import TINY, run_cli


def test_profile_steps_writes_table_and_summary(tmp_path, data_root):
    out = tmp_path / "run"
    proc = run_cli([*TINY, "method=cola_heuristic", "trainer.profile_steps=2", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    prof = results["profile"]
    # the adapters' kernel options are recorded (adapters/options.py: these are the documented defaults)
    assert results["adapter_kernels"] == {"custom_backward": True, "group_shared_inputs": True, "fp32_path": False,
                                          "dropout_mask": "shared"}
    # steps 3 and 4 of 8: after the three warm steps, exactly two optimizer steps
    assert (prof["steps"], prof["from_step"]) == (2, 3)
    assert prof["wall_s"] > 0 and prof["ops"] > 0
    # the count bench_throughput reports (no op nested in another): fewer than every aten event
    assert 0 < prof["top_level_ops_per_step"] * prof["steps"] < prof["ops"]
    assert prof["device_busy"] is None  # CPU: no device time to sum
    table = (out / "profile.txt").read_text()
    assert table.startswith("# 2 optimizer steps from step 3")
    # the adapted linears' matmuls ran inside the profiled window
    assert "aten::mm" in table or "aten::addmm" in table


def test_profile_off_by_default_and_negative_refused(tmp_path, data_root):
    proc = run_cli([*TINY, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'plain'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "profile" not in json.loads((tmp_path / "plain" / "results.json").read_text())
    assert not (tmp_path / "plain" / "profile.txt").exists()
    bad = run_cli([*TINY, "trainer.profile_steps=-1", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert bad.returncode == 2
    assert "trainer.profile_steps=-1" in bad.stderr and "Traceback" not in bad.stderr
