#!/usr/bin/env python
"""Kernel-level timings behind the adapters' step cost, one table.

    python scripts/bench_kernels.py            # Llama-3.1-8B shapes on the GPU, 4096 tokens, r = 8
    python scripts/bench_kernels.py --small    # tiny shapes on the CPU: checks the script runs

Rows: the six GEMMs of one adapted linear's rank-r path (forward z = x A^T and z B^T; backward g B,
g^T z, gz^T x, gz A), per projection shape of the model, as cuBLAS runs them through torch; and the
gated activation silu(gate) * up forward and backward (gated_act) as torch ops and as its Triton
kernels. Each timing is the mean over --reps calls, CUDA events around the loop, inputs rotated
over four copies so that a 32 MB operand is not served from the 50 MB L2 cache. GB/s counts the
bytes a call must move at least (inputs read once, output written once).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cola_train.adapters import gated_act  # noqa: E402

SHAPES = {  # (d_in, d_out) per projection of Llama-3.1-8B
    "q_proj / o_proj": (4096, 4096), "k_proj / v_proj": (4096, 1024),
    "gate_proj / up_proj": (4096, 14336), "down_proj": (14336, 4096),
}
SMALL = {"small": (96, 80)}


def timed_us(fn, device, reps: int) -> float:
    if device.type != "cuda":
        fn()
        return float("nan")
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def rotating(make, copies: int):
    """A callable returning one of `copies` tensors in turn."""
    tensors = [make() for _ in range(copies)]
    it = itertools.cycle(tensors)
    return lambda: next(it)


def gemm_rows(shapes, tokens, r, device, dtype, reps, copies):
    rows = []
    for name, (d_in, d_out) in shapes.items():
        def randn(*shape):
            return torch.randn(*shape, device=device, dtype=dtype)

        x, g = rotating(lambda: randn(tokens, d_in), copies), rotating(lambda: randn(tokens, d_out), copies)
        A, B, z, gz = randn(r, d_in), randn(d_out, r), randn(tokens, r), randn(tokens, r)
        size = torch.finfo(dtype).bits // 8
        small = (r * d_in + r * d_out + 2 * tokens * r) * size
        ops = [("z = x A^T", lambda: x() @ A.t(), tokens * d_in),
               ("z B^T", lambda: z @ B.t(), tokens * d_out),
               ("gz = g B", lambda: g() @ B, tokens * d_out),
               ("dB = g^T z", lambda: g().t() @ z, tokens * d_out),
               ("dA = gz^T x", lambda: gz.t() @ x(), tokens * d_in),
               ("gz A", lambda: gz @ A, tokens * d_in)]
        for op, fn, big in ops:
            us = timed_us(fn, device, reps)
            rows.append((name, op, "cuBLAS (torch)", us, (big * size + small) / us / 1e3))
    return rows


def gated_rows(tokens, d_ff, device, dtype, reps, copies):
    def triple():
        return [torch.randn(tokens, d_ff, device=device, dtype=dtype) for _ in range(3)]

    t = rotating(triple, copies)
    nbytes = tokens * d_ff * (torch.finfo(dtype).bits // 8)
    rows = []
    for impl, on in (("torch ops", False), ("gated_act kernels", True)):
        if on and not gated_act._kernel_here(*triple()):
            continue
        gated_act.use_kernels = on
        try:
            fwd = timed_us(lambda: gated_act.forward(*t()[:2]), device, reps)
            # backward overwrites dh: its copy is timed too, and given alone below
            bwd = timed_us(lambda: gated_act.backward(*t()[:2], t()[2].clone()), device, reps)
        finally:
            gated_act.use_kernels = True
        rows += [(f"{tokens} x {d_ff}", "silu(gate) * up, forward", impl, fwd, 3 * nbytes / fwd / 1e3),
                 (f"{tokens} x {d_ff}", "backward (+ a copy of dh)", impl, bwd, 8 * nbytes / bwd / 1e3)]
    copy = timed_us(lambda: t()[2].clone(), device, reps)
    rows.append((f"{tokens} x {d_ff}", "the copy of dh alone", "torch", copy, 2 * nbytes / copy / 1e3))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens, shapes, d_ff = (args.tokens, SHAPES, 14336) if cuda else (64, SMALL, 48)
    copies = 4 if cuda else 1
    torch.manual_seed(0)
    rows = gemm_rows(shapes, tokens, 8, device, dtype, args.reps, copies)
    rows += gated_rows(tokens, d_ff, device, dtype, args.reps, copies)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# {gpu}, {dtype}, {tokens} tokens, r = 8; mean of {args.reps} calls")
    print("| shape | op | implementation | us | GB/s |\n|---|---|---|---:|---:|")
    for shape, op, impl, us, gbs in rows:
        print(f"| {shape} | {op} | {impl} | {us:.1f} | {gbs:.0f} |")


if __name__ == "__main__":
    main()
