"""trainer.attn_kernel: which SDPA backends a CUDA run may use (cola_train/attention.py)."""
from __future__ import annotations

import pytest
import torch

from cola_train import attention
from conftest import TINY, compose, run_cli

FLAGS = {"flash": torch.backends.cuda.flash_sdp_enabled, "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
         "cudnn": torch.backends.cuda.cudnn_sdp_enabled, "math": torch.backends.cuda.math_sdp_enabled}


@pytest.fixture
def restore_flags():
    before = {k: f() for k, f in FLAGS.items()}
    yield
    for name, on in before.items():
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)


def test_default_is_auto_and_turns_cudnn_off_on_cuda(restore_flags):
    assert compose(["model=tiny_llama"]).trainer.attn_kernel == "auto"
    record = attention.apply("auto", cuda=True)
    assert {k: f() for k, f in FLAGS.items()} == {"flash": True, "mem_efficient": True, "cudnn": False, "math": True}
    assert record == {"attn_kernel": "auto", "sdpa_backends": ["flash", "mem_efficient", "math"]}
    attention.apply("efficient", cuda=True)
    assert {k: f() for k, f in FLAGS.items()} == {"flash": False, "mem_efficient": True, "cudnn": False, "math": True}
    attention.apply("torch", cuda=True)  # torch's own choice again: every backend allowed
    assert all(f() for f in FLAGS.values())


def test_cpu_leaves_the_flags_alone(restore_flags):
    before = {k: f() for k, f in FLAGS.items()}
    assert attention.apply("math", cuda=False) == {"attn_kernel": "math", "sdpa_backends": "cpu (unchanged)"}
    assert {k: f() for k, f in FLAGS.items()} == before


def test_cli_bad_attn_kernel_is_one_line(tmp_path):
    proc = run_cli(TINY + ["trainer.attn_kernel=fast", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: trainer.attn_kernel='fast' is not one of auto, flash, efficient, cudnn, math, torch" in proc.stderr
