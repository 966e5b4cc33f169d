#!/usr/bin/env python
"""The real CLI path at real scale, per method: compose -> model -> adapter -> data -> Trainer ->
checkpoint -> eval -> results.json, timed phase by phase.

    python scripts/bench_run.py --shape llama3_1_8b --ckpt /root/ckpt8b            # every method
    python scripts/bench_run.py --shape llama3_2_3b --ckpt /root/ckpt3b --methods lora,fft
    python scripts/bench_run.py --ckpt /root/ckpt8b --methods cola_heuristic -- deepspeed=zero3
    python scripts/bench_run.py --shape small --ckpt /tmp/small --steps 4 --methods lora   # CPU, seconds

A random-weight checkpoint of the shape is built once (on the GPU, in bf16) and saved with
save_pretrained into --ckpt; every method then loads it through `model.path` as a downloaded model
would be loaded (`model.tokenizer=bytes`: no tokenizer files needed). Each method runs as its own
`python -m cola_train` process, so nothing is shared between rows but the disk cache. The numbers
come from the run's own results.json ("timings", written by cola_train/phases.py):
- to first step: process start -> the end of the first optimizer step, split into model load,
  adapter init, data load + tokenization, Trainer set-up and train() -> first step done;
- steady tokens/s, median step time and MFU over the steps after the first three (phases.py says
  how FLOPs are counted: the frozen base's backward has no weight gradients);
- peak GiB: torch.cuda.max_memory_allocated over training;
- checkpoint save seconds and size (the last save), eval seconds (validation loss + benchmark).
Arguments after `--` go to every run (e.g. `deepspeed=zero3`, `trainer.kernels=none`).
`--variants` runs each method once per named variant (VARIANTS: the host-cost options of issue #22,
padding-free packing and the attention backend), e.g. the comparison to make on one lease:

    python scripts/bench_run.py --ckpt /root/ckpt8b --methods cola_heuristic,lora \
        --variants default,packing,attn_cudnn,packing_compile

Prints a Markdown table last and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

METHODS = ["lora", "pissa", "cola_fully", "cola_random", "cola_heuristic", "hydralora", "lora_moe", "moelora",
           "chain_of_lora", "fft"]
# each method's overrides beyond its own YAML: Chain of LoRA chains CoLA heuristic, as the issue asks;
# MOELoRA needs a task per record: one data source is one task
EXTRA = {"chain_of_lora": ["method.base=cola_heuristic", "method.links=3"],
         "moelora": ["data.task_key=source", "method.num_tasks=1"]}
# named override sets (--variants): `default` is the configs' defaults (trainer.attn_kernel=auto:
# flash / memory-efficient attention, no cuDNN); the others change one host-cost option each
VARIANTS = {
    "default": [],
    "packing": ["data.packing=true"],                     # padding-free: one row per batch (data/packing.py)
    "attn_cudnn": ["trainer.attn_kernel=cudnn"],          # the attention backend before trainer.attn_kernel
    "attn_torch": ["trainer.attn_kernel=torch"],          # torch's own choice (cuDNN first on an H200)
    "packing_compile": ["data.packing=true", "trainer.compile=true"],
    "pad64": ["trainer.pad_to_multiple_of=64"],
}
MODEL_CONFIG = {"llama3_1_8b": "llama3_1_8b", "llama3_2_3b": "llama3_2_3b", "small": "tiny_llama"}


def build_checkpoint(shape: str, ckpt: Path) -> float:
    """A random bf16 model of `shape`, built on the GPU when there is one, saved to `ckpt`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_throughput import SHAPES

    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(str(ckpt))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def run_method(method: str, args, extra: list[str], runs: Path, variant: str = "default") -> dict:
    label = method if variant == "default" else f"{method}+{variant}"
    run_dir = runs / label
    model = MODEL_CONFIG[args.shape]
    save = max(1, args.steps // 2)
    cmd = [sys.executable, "-m", "cola_train", f"model={model}", f"model.path={args.ckpt}",
           "model.tokenizer=bytes", "model.random_init=false", f"method={method}", f"data={args.data}",
           f"data.max_samples={args.samples}", f"trainer.max_steps={args.steps}",
           f"trainer.save_steps={save}", f"eval.max_examples={args.eval_examples}", "logger=none",
           f"hydra.run.dir={run_dir}", *EXTRA.get(method, []), *VARIANTS[variant], *extra]
    if args.shape == "small":
        cmd.append("model.hub_id=null")
    start = time.time()
    with open(runs / f"{label}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    row = {"method": label, "variant": variant, "rc": proc.returncode, "wall_s": wall, "command": " ".join(cmd[1:])}
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        row["status"] = "no results.json"
        return row
    t = results.get("timings") or {}
    row.update(status=results.get("status"), timings=t, kernels=results.get("kernels"),
               chain=(results.get("chain") or {}).get("ends"))
    return row


def _f(x, spec=".1f"):
    return "" if x is None else format(x, spec)


def link_medians(row: dict) -> list[float]:
    """Chain of LoRA: the median step time of each link (the schedule's link ends, in steps)."""
    steps, ends = (row.get("timings") or {}).get("step_s") or [], row.get("chain") or []
    out, start = [], 0
    for end in list(ends) + [len(steps)]:
        # the first two steps of a link carry its re-init and fresh optimizer state: left out
        part = steps[start + 2:end] if end - start > 3 else steps[start:end]
        if part:
            out.append(statistics.median(part))
        start = end
    return out


def _phase(timings: dict, prefix: str):
    """A phase's seconds by the start of its name ("model load (llama3_1_8b)")."""
    return next((v for k, v in timings.items() if k.startswith(prefix) and isinstance(v, (int, float))), None)


def table(rows: list[dict]) -> str:
    head = ["method", "status", "to 1st step s", "load s", "adapter init s", "data s", "trainer set-up s",
            "train() to 1st step s", "steady tok/s", "step ms", "MFU", "peak GiB", "ckpt save s", "ckpt MiB",
            "eval s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r.get("timings") or {}
        saves = t.get("checkpoints") or []
        last = saves[-1] if saves else {}
        ev = (t.get("validation loss") or 0) + (t.get("benchmark") or 0)
        method = r["method"]
        medians = link_medians(r) if r.get("chain") else []
        if medians:
            method += " (link step ms: " + ", ".join(f"{m * 1e3:.0f}" for m in medians) + ")"
        lines.append("| " + " | ".join([
            method, str(r.get("status")), _f(t.get("time_to_first_step_s")), _f(_phase(t, "model load")),
            _f(t.get("adapter init")), _f(_phase(t, "data ")), _f(t.get("trainer set-up")),
            _f(t.get("train_call_to_first_step_s")), _f(t.get("steady_tokens_per_s"), ".0f"),
            _f(None if t.get("step_s_median") is None else t["step_s_median"] * 1e3, ".0f"),
            _f(t.get("mfu"), ".3f"), _f(t.get("peak_gib")), _f(last.get("seconds")),
            _f(None if last.get("bytes") is None else last["bytes"] / 2**20, ".0f"), _f(ev), _f(r.get("wall_s"), ".0f"),
        ]) + " |")
    return "\n".join(lines)


def split_argv(argv=None) -> tuple[list[str], list[str]]:
    """(this script's arguments, the overrides after `--` that go to every run)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--" not in raw:
        return raw, []
    return raw[:raw.index("--")], raw[raw.index("--") + 1:]


def main(argv=None) -> int:
    raw, extra = split_argv(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3_1_8b", choices=sorted(MODEL_CONFIG))
    p.add_argument("--ckpt", type=Path, help="where the random-weight checkpoint is (made if absent)")
    p.add_argument("--table", type=Path, help="only print the table of an earlier run's JSON")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--variants", default="default",
                   help=f"comma-separated, each method once per variant: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--data", default="math")
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--runs", type=Path, default=Path("outputs/bench_run"))
    p.add_argument("--out", type=Path, default=None, help="JSON of every row (default: <runs>/bench_run.json)")
    args = p.parse_args(raw)
    if args.table:
        print(table(json.loads(args.table.read_text())["rows"]))
        return 0
    if args.ckpt is None:
        p.error("--ckpt is required (where the random-weight checkpoint is, or is to be made)")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if not (REPO / "conf" / "method" / f"{m}.yaml").is_file()]
    if unknown:
        p.error(f"--methods {','.join(unknown)}: no such method; choose from {', '.join(METHODS)}")
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        p.error(f"--variants {','.join(bad)}: no such variant; choose from {', '.join(VARIANTS)}")
    args.runs.mkdir(parents=True, exist_ok=True)
    built = None
    if not (args.ckpt / "config.json").is_file():
        print(f"building a random {args.shape} checkpoint in {args.ckpt} ...", flush=True)
        built = build_checkpoint(args.shape, args.ckpt)
        print(f"checkpoint built and saved in {built:.1f} s", flush=True)
    rows = []
    out = args.out or args.runs / "bench_run.json"
    for method, variant in [(m, v) for m in methods for v in variants]:
        print(f"{method} ({variant}) ...", flush=True)
        row = run_method(method, args, extra, args.runs, variant)
        rows.append(row)
        t = row.get("timings") or {}
        print(f"{row['method']}: {row.get('status')} (rc {row['rc']}), first step after "
              f"{_f(t.get('time_to_first_step_s'))} s, {_f(t.get('steady_tokens_per_s'), '.0f')} tok/s, "
              f"wall {row['wall_s']:.0f} s", flush=True)
        # after every row: a run cut short by a time limit keeps the rows it finished
        out.write_text(json.dumps({"shape": args.shape, "extra": extra, "checkpoint_build_s": built,
                                   "rows": rows}, indent=2))
    print(table(rows))
    return 0 if all(r.get("status") == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
