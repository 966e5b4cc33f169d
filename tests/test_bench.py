"""The throughput benchmark's --small preset runs and reports every variant (not a timing test)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_throughput.py"


def test_bench_small_runs_every_variant(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    rows = bench.main(["--small", "--out", str(out)])
    assert [r["variant"] for r in rows] == list(bench.VARIANTS)
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    trainable = {r["variant"]: r["trainable"] for r in rows}
    assert trainable["frozen base (floor)"] == 0
    assert trainable["ours LoRA (m=n=1)"] == trainable["PEFT LoRA (bf16 adapters)"]
    assert trainable["CoLA fully fused"] == trainable["CoLA fully per-pair loop"]
    assert json.loads(out.read_text())["rows"][0]["variant"] == "frozen base (floor)"
    assert "| variant | step ms |" in capsys.readouterr().out
    for r in rows:  # best of the rounds, and how far apart they were
        assert r["step_ms"] == min(r["round_ms"])
        assert r["spread"] == (max(r["round_ms"]) / min(r["round_ms"]) - 1 if len(r["round_ms"]) > 1 else None)
