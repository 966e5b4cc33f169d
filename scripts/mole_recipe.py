#!/usr/bin/env python
"""MoLE's recipe in one command: train one LoRA expert per domain, then the gate over them.

    python scripts/mole_recipe.py --domains law,medicine,math --gate-data math --out runs/mole \
        -- model=smollm2_135m trainer.max_steps=200

MoLE (Wu, Huang, Wei, ICLR 2024) composes LoRA experts that were trained beforehand and trains
only the gate (PAPERS.md, MoLE). Step 1 runs `python -m cola_train method=lora data=<domain>` for
each domain into <out>/experts/<domain>; each run's adapter (<run>/adapter, a PEFT LoRA dir) is an
expert. Step 2 runs `python -m cola_train method=mole data=<gate data>` into <out>/gate with
method.num_A = num_B = the number of experts and method.expert_paths = those adapter dirs; MoLE
keeps its experts frozen, so only the gate trains.

Overrides after `--` go to every run; --expert-args / --gate-args (one string each, split like a
shell line) to the expert runs / the gate run only. An expert whose run completed (results.json
status "completed" and an adapter dir) is not trained again, so the same command goes on where an
interrupted one stopped. A failed expert stops the recipe before the gate (exit code of that run).
--dry-run prints the commands.

The gate's method is --gate-method (default: mole, MoLE as published: a gate per block over the
frozen experts; `lora_moe`: our per-layer, per-token gate over them, frozen by
method.freeze_experts=true). The experts' rank must be the gate run's method.r (the same r in
both: pass it after `--`).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from cola_train.compose import hydra_quote
from cola_train.results import completed_results

ADAPTER = "adapter"   # the run dir's adapter folder (distributed.save_weights)


def expert_dir(out: Path, domain: str) -> Path:
    return out / "experts" / domain


def expert_done(run_dir: Path) -> bool:
    return completed_results(run_dir) is not None and (run_dir / ADAPTER / "adapter_config.json").is_file()


def expert_command(python: str, out: Path, domain: str, common: list[str], extra: list[str]) -> list[str]:
    run_dir = expert_dir(out, domain)
    return [python, "-m", "cola_train", "method=lora", f"data={domain}", f"output_dir={hydra_quote(str(run_dir))}",
            f"hydra.run.dir={hydra_quote(str(run_dir))}", *common, *extra]


def gate_command(python: str, out: Path, domains: list[str], gate_data: str, gate_method: str,
                 common: list[str], extra: list[str]) -> list[str]:
    paths = ",".join(hydra_quote(str(expert_dir(out, d) / ADAPTER)) for d in domains)
    run_dir = out / "gate"
    k = len(domains)
    return [python, "-m", "cola_train", f"method={gate_method}", f"data={gate_data}",
            f"method.num_A={k}", f"method.num_B={k}", f"method.expert_paths=[{paths}]",
            # MoLE as published always freezes its experts; our token-gated mixture is told to
            *(["method.freeze_experts=true"] if gate_method != "mole" else []), "method.init=lora",
            f"output_dir={hydra_quote(str(run_dir))}", f"hydra.run.dir={hydra_quote(str(run_dir))}", *common, *extra]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, common = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", required=True, help="comma list: one LoRA expert per domain (conf/data/<domain>)")
    ap.add_argument("--gate-data", required=True, help="the data the gate trains on (conf/data/<name>)")
    ap.add_argument("--out", required=True, help="experts go to OUT/experts/<domain>, the gate to OUT/gate")
    ap.add_argument("--gate-method", default="mole", help="conf/method/<name> of the gate run (default: mole)")
    ap.add_argument("--expert-args", default="", help="overrides for the expert runs only (one string)")
    ap.add_argument("--gate-args", default="", help="overrides for the gate run only (one string)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    domains = [d for d in args.domains.split(",") if d]
    if len(domains) < 2:
        print(f"error: --domains={args.domains!r} needs at least two domains (MoLE gates between experts)",
              file=sys.stderr)
        return 2
    if len(set(domains)) != len(domains):
        print(f"error: --domains={args.domains!r} names a domain twice", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    python = sys.executable
    for domain in domains:
        cmd = expert_command(python, out, domain, common, shlex.split(args.expert_args))
        if expert_done(expert_dir(out, domain)):
            print(f"[mole_recipe] expert {domain}: already trained in {expert_dir(out, domain)}", flush=True)
            continue
        print("[mole_recipe] expert " + domain + ": " + shlex.join(cmd), flush=True)
        if not args.dry_run:
            code = subprocess.call(cmd)
            if code != 0:
                print(f"error: the expert run for domain {domain!r} failed (exit code {code}); the gate was "
                      f"not trained. Fix it and run the same command again", file=sys.stderr)
                return code
    cmd = gate_command(python, out, domains, args.gate_data, args.gate_method, common, shlex.split(args.gate_args))
    print("[mole_recipe] gate: " + shlex.join(cmd), flush=True)
    return 0 if args.dry_run else subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
