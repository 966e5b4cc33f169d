#!/usr/bin/env python
"""Weak scaling of the real CLI path across GPUs: bench_run.py's rows at trainer.devices=1,2,4,8
under DeepSpeed ZeRO-2 and ZeRO-3, the per-GPU batch fixed (trainer.batch_size).

    python scripts/bench_scaling.py --ckpt /root/ckpt8b                          # 8B shape, 1,2,4,8 GPUs
    python scripts/bench_scaling.py --ckpt /root/ckpt8b --devices 1,2 --zero 3 --methods lora
    python scripts/bench_scaling.py --shape small --ckpt /tmp/small --devices 1,2 --zero 2 \
        --methods lora --steps 6 --chain no                                        # CPU, gloo ranks

Each row is one `python -m cola_train ... trainer.devices=N deepspeed=zeroK` process (bench_run's
run_method, so the same random-weight checkpoint loaded through model.path), profiled over three
steady steps (`trainer.profile_steps=3`, cola_train/profiling.py). Per row:
- tokens/s per GPU: rank 0's steady rate (phases.StepTimer counts this rank's tokens; every rank
  gets batch_size sequences a step) and in total (x N);
- weak-scaling efficiency: tokens/s per GPU against the 1-GPU row of the same method and stage;
- peak GiB (rank 0), time to first step (the PiSSA-style SVD on gathered weights under ZeRO-3),
  checkpoint save seconds;
- the NCCL kernels' share of the step's GPU time (profiling.py's collectives_share).
Chain of LoRA (cola_heuristic base, two links) runs under ZeRO-3 across its link switch unless
`--chain no`. Leave NCCL_NVLS_ENABLE=0 set (NVLink multicast off), as the device's KINDS.md asks.
Prints a Markdown table last and writes JSON (<runs>/bench_scaling.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_run  # noqa: E402

CHAIN = "chain_of_lora"


def row_of(method: str, devices: int, zero: int, raw: dict) -> dict:
    t = raw.get("timings") or {}
    prof = raw.get("profile") or {}
    saves = t.get("checkpoints") or []
    per_gpu = t.get("steady_tokens_per_s")
    return {"method": method, "devices": devices, "zero": zero, "status": raw.get("status"), "rc": raw.get("rc"),
            "tokens_per_s_per_gpu": per_gpu, "tokens_per_s": None if per_gpu is None else per_gpu * devices,
            "step_ms": None if t.get("step_s_median") is None else t["step_s_median"] * 1e3,
            "peak_gib": t.get("peak_gib"), "time_to_first_step_s": t.get("time_to_first_step_s"),
            "ckpt_save_s": (saves[-1] if saves else {}).get("seconds"),
            "collectives_share": prof.get("collectives_share"), "device_busy": prof.get("device_busy"),
            "command": raw.get("command")}


def add_efficiency(rows: list[dict]) -> None:
    """Weak-scaling efficiency: per-GPU tokens/s over the same method and stage's 1-GPU row."""
    base = {(r["method"], r["zero"]): r["tokens_per_s_per_gpu"] for r in rows if r["devices"] == 1}
    for r in rows:
        one = base.get((r["method"], r["zero"]))
        r["efficiency"] = (r["tokens_per_s_per_gpu"] / one) if (one and r["tokens_per_s_per_gpu"]) else None


def table(rows: list[dict]) -> str:
    def f(x, spec):
        return "" if x is None else format(x, spec)

    head = ["method", "ZeRO", "GPUs", "status", "tok/s total", "tok/s per GPU", "weak-scaling eff.", "step ms",
            "peak GiB", "to 1st step s", "ckpt save s", "NCCL share", "GPU busy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], str(r["zero"]), str(r["devices"]), str(r["status"]), f(r["tokens_per_s"], ".0f"),
            f(r["tokens_per_s_per_gpu"], ".0f"), f(r["efficiency"], ".1%"), f(r["step_ms"], ".0f"),
            f(r["peak_gib"], ".1f"), f(r["time_to_first_step_s"], ".1f"), f(r["ckpt_save_s"], ".1f"),
            f(r["collectives_share"], ".1%"), f(r["device_busy"], ".0%")]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    raw, extra = bench_run.split_argv(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3_1_8b", choices=sorted(bench_run.MODEL_CONFIG))
    p.add_argument("--ckpt", type=Path, required=True, help="the random-weight checkpoint (made if absent)")
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--zero", default="2,3")
    p.add_argument("--methods", default="lora,cola_heuristic,cola_fully")
    p.add_argument("--chain", choices=["yes", "no"], default="yes", help="Chain of LoRA across a link switch, ZeRO-3")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--data", default="math")
    p.add_argument("--eval-examples", type=int, default=0)
    p.add_argument("--runs", type=Path, default=Path("outputs/bench_scaling"))
    args = p.parse_args(raw)
    try:
        devices = [int(d) for d in args.devices.split(",") if d]
        zeros = [int(z) for z in args.zero.split(",") if z]
    except ValueError:
        p.error(f"--devices {args.devices!r} / --zero {args.zero!r}: comma-separated integers")
    if any(d < 1 for d in devices) or any(z not in (2, 3) for z in zeros):
        p.error(f"--devices must be >= 1 and --zero 2 or 3 (got {args.devices!r}, {args.zero!r})")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if not (bench_run.REPO / "conf" / "method" / f"{m}.yaml").is_file()]
    if unknown:
        p.error(f"--methods {','.join(unknown)}: no such method")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    args.runs.mkdir(parents=True, exist_ok=True)
    if not (args.ckpt / "config.json").is_file():
        print(f"building a random {args.shape} checkpoint in {args.ckpt} ...", flush=True)
        bench_run.build_checkpoint(args.shape, args.ckpt)
    plan = [(m, n, z) for z in zeros for m in methods for n in devices]
    if args.chain == "yes":
        plan += [(CHAIN, n, 3) for n in devices]
    eval_flags = ["eval=none"] if args.eval_examples == 0 else []
    rows = []
    for method, n, zero in plan:
        run_args = argparse.Namespace(shape=args.shape, ckpt=args.ckpt, data=args.data, samples=args.samples,
                                      steps=args.steps, eval_examples=max(args.eval_examples, 1))
        chain_flags = ["method.links=2"] if method == CHAIN else []
        flags = [f"trainer.devices={n}", f"deepspeed=zero{zero}", "trainer.profile_steps=3", *eval_flags,
                 *chain_flags, *extra]
        runs = args.runs / f"zero{zero}_gpus{n}"
        runs.mkdir(parents=True, exist_ok=True)
        print(f"{method}, ZeRO-{zero}, {n} GPU(s) ...", flush=True)
        got = bench_run.run_method(method, run_args, flags, runs)
        results = {}
        try:
            results = json.loads((runs / method / "results.json").read_text())
        except (OSError, ValueError):
            pass
        row = row_of(method, n, zero, {**got, "profile": results.get("profile")})
        rows.append(row)
        print(f"  {row['status']} (rc {row['rc']}): {row['tokens_per_s_per_gpu']} tok/s per GPU", flush=True)
        add_efficiency(rows)
        (args.runs / "bench_scaling.json").write_text(json.dumps({"shape": args.shape, "extra": extra,
                                                                   "rows": rows}, indent=2))
    print(table(rows))
    return 0 if all(r["status"] == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
