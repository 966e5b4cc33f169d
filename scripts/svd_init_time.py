#!/usr/bin/env python
"""Time of a PiSSA-style init at the Llama-3.1-8B shape: exact vs lowrank SVD, per layer and in all.

    python scripts/svd_init_time.py [--device cuda] [--layers 32] [--r 8] [--niter 16] [--scale 1]

Random bf16 weights of the seven projection shapes of one Llama-3.1-8B block (q, o: 4096x4096;
k, v: 1024x4096; gate, up: 14336x4096; down: 4096x14336); each choice runs the init's own code
(init.principal_factors + init.residual, in the residual dtype that choice uses) on each shape a
few times and the total is scaled to `--layers` blocks. Timings only: random matrices have flat
spectra, so the lowrank error is measured on real weights by scripts/svd_init_error.py.
"""
import argparse
import time

import torch

from cola_train.adapters.init import SVDChoice, principal_factors, residual

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
          "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--niter", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=int, default=1, help="divide every shape by this (a quick smoke run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    weights = {k: (0.02 * torch.randn(s[0] // args.scale, s[1] // args.scale, generator=gen)).to(device, torch.bfloat16)
               for k, s in SHAPES.items()}
    choices = [("exact", SVDChoice("exact")), (f"lowrank niter={args.niter}", SVDChoice("lowrank", args.niter, 1))]
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| choice | " + " | ".join(SHAPES) + f" | init of {args.layers} blocks ({7 * args.layers} matrices) |")
    print("|---|" + "---|" * (len(SHAPES) + 1))
    for label, choice in choices:
        per = {}
        for name, W in weights.items():
            A, B = principal_factors(W, args.r, 2.0, choice)   # warm-up (cuSOLVER handles, kernels)
            residual(W, A.bfloat16(), B.bfloat16(), 2.0, choice.residual_dtype)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.repeat):
                A, B = principal_factors(W, args.r, 2.0, choice)
                residual(W, A.bfloat16(), B.bfloat16(), 2.0, choice.residual_dtype)
            sync(device)
            per[name] = (time.perf_counter() - t0) / args.repeat
        total = args.layers * sum(per.values())
        print(f"| {label} | " + " | ".join(f"{1000 * t:.0f} ms" for t in per.values()) + f" | {total:.1f} s |")


if __name__ == "__main__":
    main()
