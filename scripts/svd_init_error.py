#!/usr/bin/env python
"""How close the randomized SVD of a PiSSA-style init (method.svd=lowrank) is to the exact one.

    python scripts/svd_init_error.py [--r 8] [--niter 2 4 8 16] [--every 1]

Real SmolLM2-135M weights (model=smollm2_135m, float32), every adapted projection of every
`--every`-th block. For each projection type and each choice it prints, against a float64 exact
SVD as the reference (P = U_r S_r V_r^T, W's best rank-r part):
  * rel. error  ||P~ - P||_F / ||P||_F of the top-r part the init moves into the adapter
    (mean and max over the layers);
  * energy      ||P~||_F^2 / ||P||_F^2, the share of the top-r energy captured;
  * the time per matrix on this machine.
and, last, how much the float32 residual W - P~ differs from the float64 one once rounded to
float32 and bf16 (the lowrank path forms it in float32). "PEFT pissa_niter_16" is the sketch of
only r columns that PEFT (method=pissa) and the paper's PiSSA baseline use. docs/INIT.md holds a run's output.
"""
import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cola_train.adapters.init import SVDChoice, layer_seed, principal_factors, residual, top_svd
from cola_train.config import ModelConfig
from cola_train.models import load_model, target_modules

CONF = Path(__file__).resolve().parent.parent / "conf" / "model" / "smollm2_135m.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--niter", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--every", type=int, default=1, help="use every k-th transformer block")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF))
    model = load_model(cfg, torch.float32)
    kinds = target_modules(cfg)
    blocks = model.model.layers[::args.every]
    choices = [("exact (float32)", SVDChoice("exact"))] + [
        (f"lowrank niter={k}", SVDChoice("lowrank", niter=k)) for k in args.niter] + [
        # what PEFT's init_lora_weights="pissa_niter_16" computes (method=pissa): a sketch of r columns
        ("PEFT pissa_niter_16 (q=r)", SVDChoice("lowrank", niter=16, oversample=0))]
    ours = f"lowrank niter={max(args.niter)}"
    stats = {(kind, label): [] for kind in kinds for label, _ in choices}
    times = {label: 0.0 for label, _ in choices}
    n_mat = 0
    res32, res_fp32, res_bf16, n_res = 0.0, 0.0, 0.0, 0
    for b, block in enumerate(blocks):
        for kind in kinds:
            lin = getattr(block.self_attn, kind, None) or getattr(block.mlp, kind)
            W = lin.weight.detach()
            U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            P = (U[:, :args.r] * S[:args.r]) @ Vh[:args.r]
            norm = P.norm()
            n_mat += 1
            for label, choice in choices:
                choice = SVDChoice(choice.mode, choice.niter, layer_seed(0, f"{b}.{kind}"), choice.oversample)
                t0 = time.perf_counter()
                u, s, vh = top_svd(W, args.r, choice)
                times[label] += time.perf_counter() - t0
                Pt = (u.double() * s.double()) @ vh.double()
                stats[(kind, label)].append((float((Pt - P).norm() / norm), float(Pt.norm() ** 2 / norm ** 2)))
                if label == ours:  # the residual in float32 vs float64, for the factors used
                    A, B = principal_factors(W, args.r, 2.0, choice)
                    r64, r32 = residual(W, A, B, 2.0, torch.float64), residual(W, A, B, 2.0, torch.float32)
                    res32 += float((r32 - r64).norm() / r64.norm())
                    res_fp32 += float((r32 != r64).float().mean())
                    Wb = W.bfloat16()
                    res_bf16 += float((residual(Wb, A, B, 2.0, torch.float32)
                                       != residual(Wb, A, B, 2.0, torch.float64)).float().mean())
                    n_res += 1
    print(f"SmolLM2-135M, r={args.r}, {len(blocks)} blocks x {len(kinds)} projections = {n_mat} matrices")
    print("| projection | " + " | ".join(label for label, _ in choices) + " |")
    print("|---|" + "---|" * len(choices))
    for kind in kinds:
        cells = []
        for label, _ in choices:
            errs = [e for e, _ in stats[(kind, label)]]
            energy = [en for _, en in stats[(kind, label)]]
            cells.append(f"{sum(errs) / len(errs):.1e} (max {max(errs):.1e}), {100 * min(energy):.2f} %")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print("| time per matrix | " + " | ".join(f"{1000 * times[l] / n_mat:.1f} ms" for l, _ in choices) + " |")
    print(f"cells: mean rel. error of the top-{args.r} part (max), lowest energy captured")
    print(f"residual W - P~ formed in float32 vs float64 ({ours}), means over matrices: "
          f"||r32 - r64||_F / ||r64||_F = {res32 / n_res:.1e}; float32 weights: {100 * res_fp32 / n_res:.3f} % "
          f"of entries differ (by one rounding); bf16 weights: {100 * res_bf16 / n_res:.4f} % round differently")


if __name__ == "__main__":
    main()
