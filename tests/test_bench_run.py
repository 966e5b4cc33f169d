"""scripts/bench_run.py --variants: each method once per named set of host-cost overrides."""
from __future__ import annotations

import importlib.util
import subprocess
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_run.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_method_runs_once_per_variant_with_its_overrides(tmp_path, monkeypatch):
    bench = _script()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    bench.main(["--shape", "small", "--ckpt", str(tmp_path / "ckpt"), "--methods", "lora",
                "--variants", "default,packing,attn_cudnn", "--runs", str(tmp_path / "runs"), "--", "trainer.lr=0.001"])
    assert len(commands) == 3
    default, packing, cudnn = commands
    assert not any("packing" in a or "attn_kernel" in a for a in default)
    assert "data.packing=true" in packing and f"hydra.run.dir={tmp_path / 'runs' / 'lora+packing'}" in packing
    assert "trainer.attn_kernel=cudnn" in cudnn
    assert cudnn.index("trainer.lr=0.001") > cudnn.index("trainer.attn_kernel=cudnn")  # `--` overrides win


def test_unknown_variant_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _script().main(["--ckpt", str(tmp_path), "--methods", "lora", "--variants", "default,turbo"])
    assert exit_.value.code == 2
    assert "--variants turbo: no such variant" in capsys.readouterr().err
