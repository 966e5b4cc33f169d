"""The throughput benchmark's --small preset runs and reports every variant (not a timing test)."""
from __future__ import annotations

import importlib.util
import json

import pytest
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
    norms = {r["variant"]: r["grad_norm"] for r in rows}
    assert norms.pop("frozen base (floor)") is None
    assert all(n > 0 for n in norms.values()), norms   # every variant trains
    # the same weights and batch: the fused path and its autograd twin, the paths of the same maths
    assert norms["CoLA fully fused"] == pytest.approx(norms["CoLA fully fused, autograd backward"], rel=1e-3)
    assert norms["CoLA fully fused"] == pytest.approx(norms["CoLA fully per-pair loop"], rel=1e-2)
    ops = {r["variant"]: r["ops"] for r in rows}   # aten ops per forward + backward
    assert ops["frozen base (floor)"] < ops["ours LoRA (m=n=1)"] < ops["CoLA fully per-pair loop"]
    assert ops["MoLE (3 experts)"] > ops["HydraLoRA (n=3)"]   # the gate's balance loss
    for r in rows:  # best of the rounds, and how far apart they were
        assert r["step_ms"] == min(r["round_ms"])
        assert r["spread"] == (max(r["round_ms"]) / min(r["round_ms"]) - 1 if len(r["round_ms"]) > 1 else None)
    # one dropout mask per shared input (method.dropout_mask=shared): the grouped GEMMs keep running
    for name in ("ours LoRA (m=n=1), dropout 0.05", "CoLA heuristic fused, dropout 0.05"):
        assert ops[name] < ops[f"{name}, per_layer masks"]
    # session 11's changes (gated_act's kernels, shared-input GEMMs) change the work, not the maths
    for name in ("ours LoRA (m=n=1)", "CoLA heuristic fused"):
        before = f"{name}, torch gated act, projections apart"
        assert norms[name] == pytest.approx(norms[before], rel=1e-3)
        assert ops[name] < ops[before]


def test_bench_compile_undo_leaves_the_plain_layers():
    """--compile compiles every decoder layer in place per variant; the undo must hand the next variant
    the plain, un-adapted, eager layers (torch.compile is lazy: nothing is compiled here)."""
    import torch

    from cola_train.adapters import AdapterLinear

    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = bench.build_base("small", torch.device("cpu"), torch.float32)
    plain = list(base.model.layers)
    name = "CoLA heuristic fused"
    model, undo = bench.attach_variant(base, name, bench.VARIANTS[name], bench.DEFAULT_TARGETS["llama"], compile=True)
    assert all(layer._compiled_call_impl is not None for layer in base.model.layers)
    assert any(isinstance(m, AdapterLinear) for m in base.modules())
    undo()
    assert all(now is was for now, was in zip(base.model.layers, plain)) and len(base.model.layers) == len(plain)
    assert not any(isinstance(m, AdapterLinear) for m in base.modules())
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in base.modules())


@pytest.mark.parametrize("args", [["--exact", "--only", "MoLE"], ["--only", "floor", "HydraLoRA (n=4)"]])
def test_bench_refuses_an_only_name_that_picks_nothing(args, capsys):
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--small", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--only {args[-1]!r}" in err and "frozen base (floor)" in err


def test_kernel_bench_small_runs(capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT.parent / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--small"])
    out = capsys.readouterr().out
    assert out.count("| cuBLAS (torch) |") == 6 and "| silu(gate) * up, forward | torch ops |" in out
