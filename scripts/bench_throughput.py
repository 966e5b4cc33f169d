#!/usr/bin/env python
"""Side-by-side training-step throughput of every method on one model and one batch.

    python scripts/bench_throughput.py                  # Llama-3.1-8B shape, random bf16 weights (GPU)
    python scripts/bench_throughput.py --model llama3_2_3b
    python scripts/bench_throughput.py --small          # a tiny Llama on CPU, seconds (CI checks it runs)
    python scripts/bench_throughput.py --only floor "fully fused" --profile fully   # + top kernels
    python scripts/bench_throughput.py --compile        # every variant, the floor too, regionally compiled

A step is forward + backward + AdamW step on the trainable parameters. Every variant is built on
the same frozen base (adapters are attached, timed, then the original modules are put back), so
the ratios within one run compare like with like. Adapters use the lora init (zero B): the SVD
of a PiSSA init changes values, not cost. Every variant is measured --rounds times, interleaved,
and its fastest median is kept: a shared GPU drifts between runs, the code does not. The column
"rounds spread" (slowest / fastest - 1) says which figures that drift touched. The last column,
the first step's gradient norm, is the same for a variant compiled and eager, and 0 where no
gradient reaches the trainable weights (a step that trains nothing can be fast). "ops" counts the
aten ops one forward + backward dispatches (views included; in eager mode on a GPU most of the
others are a kernel launch each): the host-side cost of many small ops, the same on any device
but for the dropout mask (torch ops on a CPU, one Triton kernel on a GPU). Prints a table last and writes JSON (--out).

--compile: after the adapter is attached, each decoder layer is torch.compile'd in place, as
`trainer.compile=true` does (regional compilation: one graph serves every layer, whose parameters
are its inputs). The warm-up then
includes the compilation; a row records the graphs compiled and the graph breaks, and a
recompilation during the timed steps is printed as a warning.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cola_train import adapters, kernels  # noqa: E402
from cola_train.adapters import gated_act, gated_mlp, set_kernels, shared_qkv  # noqa: E402
from cola_train.config import MethodConfig  # noqa: E402
from cola_train.models import DEFAULT_TARGETS, upcast_trainable  # noqa: E402
from cola_train.regional_compile import compile_blocks  # noqa: E402

SHAPES = {
    "llama3_1_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                        rope_theta=500000.0, max_position_embeddings=8192),
    "llama3_2_3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                        rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                  max_position_embeddings=512),
}
COLA = dict(kind="cola", num_A=2, num_B=3, r=8, alpha=16, dropout=0.0, init="lora")
VARIANTS = {
    "frozen base (floor)": None,
    "PEFT LoRA (default, fp32 adapters)": "peft_default",
    "PEFT LoRA (bf16 adapters)": MethodConfig(name="lora", kind="peft", r=8, alpha=16, dropout=0.0),
    "ours LoRA (m=n=1)": MethodConfig(name="lora1", **{**COLA, "num_A": 1, "num_B": 1}),
    **{f"CoLA {s} fused": MethodConfig(name=f"cola_{s}", strategy=s, impl="fused", **COLA)
       for s in ("fully", "random", "heuristic")},
    # the same fused maths with autograd's own backward (before fused_ops): the change, measured
    "CoLA fully fused, autograd backward": MethodConfig(name="cola_fully", strategy="fully", impl="fused", **COLA),
    **{f"CoLA {s} per-pair loop": MethodConfig(name=f"cola_{s}", strategy=s, impl="loop", **COLA)
       for s in ("fully", "random", "heuristic")},
    "HydraLoRA (n=3)": MethodConfig(name="hydralora", kind="hydralora", num_A=1, num_B=3, r=8,
                                    alpha=16, dropout=0.0),
    "MoLE (3 experts)": MethodConfig(name="mole", kind="mole", num_A=3, num_B=3, r=8, alpha=16,
                                     dropout=0.0),
    "HydraLoRA (n=3), autograd backward": MethodConfig(name="hydralora", kind="hydralora", num_A=1, num_B=3,
                                                       r=8, alpha=16, dropout=0.0),
    "MoLE (3 experts), autograd backward": MethodConfig(name="mole", kind="mole", num_A=3, num_B=3, r=8,
                                                        alpha=16, dropout=0.0),
    # what `python -m cola_train` trains with under bf16 without DeepSpeed (trainer.master_weights):
    # fp32 trainable weights, cast to bf16 for the maths every step
    "CoLA heuristic fused, fp32 master weights": MethodConfig(name="cola_heuristic", strategy="heuristic",
                                                              impl="fused", **COLA),
    "HydraLoRA (n=3), fp32 master weights": MethodConfig(name="hydralora", kind="hydralora", num_A=1,
                                                         num_B=3, r=8, alpha=16, dropout=0.0),
    "MoLE (3 experts), fp32 master weights": MethodConfig(name="mole", kind="mole", num_A=3, num_B=3, r=8,
                                                          alpha=16, dropout=0.0),
    # trainer.fp32_adapter_path: fp32 master weights and the low-rank path computed in fp32
    "CoLA heuristic, fp32 adapter path": MethodConfig(name="cola_heuristic", strategy="heuristic", impl="fused",
                                                      **COLA),
    "HydraLoRA (n=3), fp32 adapter path": MethodConfig(name="hydralora", kind="hydralora", num_A=1, num_B=3,
                                                       r=8, alpha=16, dropout=0.0),
    "PEFT LoRA, fp32 adapter path": MethodConfig(name="lora", kind="peft", r=8, alpha=16, dropout=0.0),
    # the method configs' dropout (the papers' 0.05): seeded masks, redrawn in backward (fused_ops);
    # method.dropout_mask=shared (the default): one mask per shared input, q/k/v and gate/up grouped
    "ours LoRA (m=n=1), dropout 0.05": MethodConfig(name="lora1", **{**COLA, "num_A": 1, "num_B": 1,
                                                                     "dropout": 0.05}),
    "CoLA heuristic fused, dropout 0.05": MethodConfig(name="cola_heuristic", strategy="heuristic",
                                                       impl="fused", **{**COLA, "dropout": 0.05}),
    # before/after: dropout_mask=per_layer, each linear its own mask, q/k/v and gate/up apart (run 11's code)
    "ours LoRA (m=n=1), dropout 0.05, per_layer masks": MethodConfig(
        name="lora1", **{**COLA, "num_A": 1, "num_B": 1, "dropout": 0.05}, dropout_mask="per_layer"),
    "CoLA heuristic fused, dropout 0.05, per_layer masks": MethodConfig(
        name="cola_heuristic", strategy="heuristic", impl="fused", **{**COLA, "dropout": 0.05},
        dropout_mask="per_layer"),
    # what a run gets from the YAMLs without overrides: dropout 0.05 (shared masks) and fp32 master weights
    "ours LoRA (m=n=1), config defaults: dropout 0.05, fp32 master weights": MethodConfig(
        name="lora1", **{**COLA, "num_A": 1, "num_B": 1, "dropout": 0.05}),
    **{f"CoLA {s} fused, config defaults: dropout 0.05, fp32 master weights": MethodConfig(
        name=f"cola_{s}", strategy=s, impl="fused", **{**COLA, "dropout": 0.05})
       for s in ("fully", "random", "heuristic")},
    "HydraLoRA (n=3), config defaults: dropout 0.05, fp32 master weights": MethodConfig(
        name="hydralora", kind="hydralora", num_A=1, num_B=3, r=8, alpha=16, dropout=0.05),
    # the config defaults as run 11 measured them, per-layer masks: heuristic only (CI's --small run
    # times every variant, so each one listed costs CI time)
    "CoLA heuristic fused, config defaults with per_layer masks: dropout 0.05, fp32 master weights": MethodConfig(
        name="cola_heuristic", strategy="heuristic", impl="fused", **{**COLA, "dropout": 0.05},
        dropout_mask="per_layer"),
    # session 11's changes undone: the gated activation as torch ops (not gated_act's Triton kernels),
    # q, k, v and gate, up each with its own GEMMs (not one SharedInputLowRank per shared input)
    "ours LoRA (m=n=1), torch gated act, projections apart": MethodConfig(name="lora1", **{**COLA, "num_A": 1,
                                                                                       "num_B": 1}),
    "CoLA heuristic fused, torch gated act, projections apart": MethodConfig(name="cola_heuristic",
                                                                         strategy="heuristic", impl="fused",
                                                                         **COLA),
    "FFT": "fft",
}


def matmul_peak_tflops(device, dtype) -> float:
    """The bf16 matmul rate this GPU reaches here: the MFU denominator."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_base(shape: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)           # build in bf16 directly: no 32 GB fp32 detour for 8B
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    model.enable_input_require_grads()   # backward flows through every layer, as with adapters
    return model


def _swap_back(model, originals: dict):
    for name, module in originals.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def attach(base, variant, targets):
    """(model to step, undo callable that leaves `base` as it was: frozen, no adapter)."""
    originals = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}

    def undo():
        _swap_back(base, originals)
        gated_mlp.uninstall(base)
        shared_qkv.uninstall(base)
        base.requires_grad_(False)
        base.__dict__.pop("_cola_adapter", None)
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in base.__dict__:
                delattr(base, attr)

    torch.manual_seed(0)   # every variant's factors drawn alike: equal first-step gradients where the maths is
    if variant is None:
        return base, undo
    if variant == "fft":
        base.requires_grad_(True)
        return base, undo
    if variant == "peft_default":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                               target_modules=targets)), undo
    return adapters.attach_adapter(base, variant, targets), undo


def compile_layers(base):
    """Regional compilation as `trainer.compile=true` does it (cola_train/regional_compile.py): every
    decoder layer compiled in place. Returns the undo: the layers eager again, and dynamo's caches
    dropped, so that the next variant compiles afresh (the variants' entries would otherwise pile up
    on the same code objects, and past dynamo's recompile limit, 8, the layers would run eagerly)."""
    torch._dynamo.reset()
    counters.clear()
    blocks = compile_blocks(base)

    def undo():
        for block in blocks:
            block._compiled_call_impl = None   # what nn.Module.compile() set: eager again
        torch._dynamo.reset()

    return undo


def dynamo_stats() -> dict:
    """Graphs dynamo compiled and graph breaks it met since compile_layers."""
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def attach_variant(base, name, variant, targets, compile: bool = False):
    """attach(), plus what the variant's name asks for: fp32 master weights, the fp32 adapter path,
    autograd's own backward, session 11's changes undone (the caller's restore_switches() puts them
    back); then the decoder layers compiled if asked (the undo puts the plain ones back first)."""
    model, undo = attach(base, variant, targets)
    if "fp32 master weights" in name or "fp32 adapter path" in name:
        upcast_trainable(model)
    if "fp32 adapter path" in name:
        adapters.fp32_path.enable(model)
    set_kernels(model, custom_backward="autograd backward" not in name,
                group_shared_inputs="projections apart" not in name)   # per model (adapters.Kernels)
    gated_act.use_kernels = "torch gated act" not in name
    if not compile:
        return model, undo
    uncompile = compile_layers(base)

    def undo_both():
        uncompile()
        undo()

    return model, undo_both


def restore_switches() -> None:
    """What attach_variant may have switched off for a before/after variant, back on (the layers'
    own Kernels options go with the model)."""
    gated_act.use_kernels = True


def forward_backward(model, batch) -> None:
    """The training loss (+ MoLE's balance loss), backpropagated. No KV cache in a training step:
    with one, each compiled layer would recompile for its layer_idx."""
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    aux = adapters.aux_loss(model)
    (loss if aux is None else loss + aux).backward()


def time_steps(model, batch, device, warmup: int, reps: int, seed: int = 0, optimizer: str = "fused",
               compiled: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per step, what the Trainer uses (optim=adamw_torch_fused, its default)
    fused = optimizer == "fused" and device.type == "cuda"
    # lr 0: the same kernels, but FFT leaves the shared base as it was for the next variant and round
    opt = torch.optim.AdamW(params, lr=0.0, fused=fused, foreach=not fused) if params else None
    model.train()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm = None
    for i in range(warmup + reps):
        if compiled and i == warmup:
            warm = dynamo_stats()
        adapters.resample(model, i, seed)
        _sync(device)
        t = time.perf_counter()
        forward_backward(model, batch)
        if i == 0:
            first_grad_norm = grad_norm(params)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del opt
    if compiled and dynamo_stats() != warm:
        print(f"# warning: recompiled during the timed steps: {warm} -> {dynamo_stats()}", flush=True)
    return statistics.median(times), peak, first_grad_norm


def _under_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def count_ops(model, batch) -> int:
    """Top-level aten ops of one forward + backward (+ MoLE's balance loss); gradients cleared after."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    model.train()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        forward_backward(model, batch)
    model.zero_grad(set_to_none=True)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not _under_aten(e))


def grad_norm(params) -> float | None:
    """The first step's gradient norm: the same for a variant compiled and eager (same weights, same
    batch), and 0 only where no gradient reaches the trainable weights (a broken graph runs fast)."""
    if not params:
        return None
    grads = [p.grad.float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


def measure(base, name, variant, targets, batch, device, args, n_params, peak) -> dict:
    model, undo = attach_variant(base, name, variant, targets, args.compile)
    try:
        warmup = max(args.warmup, 2) if args.compile else args.warmup   # the first step compiles
        ms, mem, norm = time_steps(model, batch, device, warmup, args.reps, optimizer=args.optimizer,
                                   compiled=args.compile)
        row = {"variant": name, "step_ms": ms * 1e3, "tokens_per_s": batch.numel() / ms, "peak_gib": mem,
               "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "grad_norm": norm,
               "ops": count_ops(model, batch)}
        if norm == 0.0 or (norm is not None and not math.isfinite(norm)):
            print(f"# warning: {name}: first-step gradient norm {norm}: this variant does not train", flush=True)
        if args.compile:
            row.update(dynamo_stats())
        flops_per_token = (6 if variant == "fft" else 4) * n_params
        row["mfu"] = flops_per_token * row["tokens_per_s"] / (peak * 1e12)
    except torch.OutOfMemoryError:
        row = {"variant": name, "error": "OOM"}
    finally:
        restore_switches()
        undo()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def profile(base, name, variant, targets, batch, device, optimizer: str, compile: bool = False) -> None:
    """Where one step's GPU time goes: the top kernels by total CUDA time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    model, undo = attach_variant(base, name, variant, targets, compile)
    try:
        time_steps(model, batch, device, warmup=2, reps=1, optimizer=optimizer)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            time_steps(model, batch, device, warmup=0, reps=1, optimizer=optimizer)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"\n## profile: {name}\n" + prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
    finally:
        restore_switches()
        undo()
        del model
        gc.collect()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3_1_8b", choices=[k for k in SHAPES if k != "small"])
    ap.add_argument("--small", action="store_true", help="tiny Llama, CPU-sized batch")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="variant names (substring match)")
    ap.add_argument("--exact", action="store_true", help="--only names whole variant names")
    ap.add_argument("--skip-fft", action="store_true")
    ap.add_argument("--rounds", type=int, default=2,
                    help="measure every variant this many times, interleaved; report the fastest median")
    ap.add_argument("--profile", nargs="*", default=[],
                    help="variant names (substring): print the torch profiler's top CUDA kernels for one step")
    ap.add_argument("--optimizer", choices=["fused", "foreach"], default="fused",
                    help="AdamW implementation on GPU (fused: the Trainer's default; runs 1-3 in docs/PERFORMANCE.md "
                         "used foreach)")
    ap.add_argument("--compile", action="store_true",
                    help="regional torch.compile: each decoder layer compiled, for every variant and the floor")
    ap.add_argument("--kernels", choices=["none", "liger"], default="none",
                    help="the base model's kernels for every variant and the floor (cola_train/kernels.py): "
                         "liger = liger-kernel's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy, "
                         "what trainer.kernels=auto runs on a GPU")
    ap.add_argument("--out", type=Path, default=Path("bench_throughput.json"))
    args = ap.parse_args(argv)

    def picks(s: str, name: str) -> bool:
        return s.lower() == name.lower() if args.exact else s.lower() in name.lower()

    for s in args.only or []:   # a typo would otherwise drop a variant from the table, silently
        if not any(picks(s, name) for name in VARIANTS):
            ap.error(f"--only {s!r} {'is' if args.exact else 'is in'} no variant name; the variants: "
                     + "; ".join(VARIANTS))
    chosen = [(name, variant) for name, variant in VARIANTS.items()
              if not (args.only and not any(picks(s, name) for s in args.only))
              and not (variant == "fft" and args.skip_fft)]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = "small" if args.small else args.model
    if args.small:
        args.batch, args.seq, args.reps, args.warmup = 2, 64, 3, 1
    torch.manual_seed(0)
    base = build_base(shape, device, dtype)
    applied_kernels = kernels.apply(base, args.kernels, zero3=False, targets=DEFAULT_TARGETS["llama"])
    n_params = sum(p.numel() for p in base.parameters())
    peak = matmul_peak_tflops(device, dtype)
    targets = DEFAULT_TARGETS["llama"]
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {shape} ({n_params/1e9:.2f} B params, {dtype}) on {gpu}; batch {args.batch}x{args.seq}; "
          f"r=8, num_A=2, num_B=3, targets={','.join(targets)}; matmul peak {peak:.0f} TFLOP/s"
          f"{'; decoder layers compiled' if args.compile else ''}; kernels {applied_kernels['name']}", flush=True)

    best, rounds = {}, {}
    for rnd in range(args.rounds):
        for name, variant in chosen:
            if variant == "fft" and rnd > 0:      # one FFT round: it is not near the others
                continue
            row = measure(base, name, variant, targets, batch, device, args, n_params, peak)
            print(json.dumps({"round": rnd, **row}), flush=True)
            if "step_ms" in row:
                rounds.setdefault(name, []).append(row["step_ms"])
            if name not in best or best[name].get("step_ms", float("inf")) > row.get("step_ms", float("inf")):
                best[name] = row
    rows = [best[name] for name, _ in chosen]
    for name, row in best.items():  # how far apart the rounds are: a wide spread flags a noisy figure
        ms = rounds.get(name, [])
        row["round_ms"] = ms
        row["spread"] = max(ms) / min(ms) - 1 if len(ms) > 1 else None
    for name, variant in chosen:
        if any(s.lower() in name.lower() for s in args.profile):
            profile(base, name, variant, targets, batch, device, args.optimizer, args.compile)

    floor = next((r for r in rows if r["variant"].startswith("frozen") and "step_ms" in r), None)
    print("\n| variant | step ms | tokens/s | x floor | peak GiB | MFU | trainable | rounds spread | grad norm | ops |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | | | | | | |")
            continue
        x = r["step_ms"] / floor["step_ms"] if floor else float("nan")
        r["x_floor"] = x
        spread = "—" if r["spread"] is None else f"{r['spread']:.1%}"
        norm = "—" if r.get("grad_norm") is None else f"{r['grad_norm']:.4g}"
        print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {x:.3f} | "
              f"{r['peak_gib']:.1f} | {r['mfu']:.1%} | {r['trainable']:,} | {spread} | {norm} | {r['ops']} |")
    args.out.write_text(json.dumps({"shape": shape, "device": gpu, "batch": [args.batch, args.seq],
                                    "compile": args.compile, "kernels": applied_kernels,
                                    "peak_tflops": peak, "params": n_params, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
