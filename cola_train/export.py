"""Export a finished run for serving elsewhere (docs/EXPORT.md).

    python -m cola_train.export RUN_DIR --to peft   [--out DIR]               # standard PEFT LoRA
    python -m cola_train.export RUN_DIR --to merged [--out DIR] [--dtype bf16] # full HF checkpoint
`key=value` arguments override the run's config (e.g. model.path=/moved/base). The default --out
is RUN_DIR/export/<peft|merged>; an existing --out is refused, never overwritten.

peft: the run's update as a LoRA for the ORIGINAL base (adapters.export_peft: B @ A = W_final -
W_original, lora_alpha = r), loadable with PeftModel.from_pretrained and vLLM's LoRA support.
merged: the update folded into the base weights (adapters.merged_model), written with
save_pretrained next to the tokenizer. It is checked before anything is written: on a few
prompts the merged model's logits must equal the float32 adapted model's, first in float32 (is
the merge right?) and then cast to the --dtype it is saved in (does it cost no more than casting
the adapted model itself?), within the bound of each dtype; otherwise nothing is written. Routed methods (HydraLoRA, MoLE) have no export: their
update depends on each token's routing, so neither a LoRA nor a merged weight can represent it.

Everything is written into a hidden sibling directory that is renamed to --out at the end, so
an interrupted export leaves no directory that looks complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from .__main__ import refuse
from .config import ConfigError

DTYPES = ("fp32", "bf16", "fp16")
# max |logit difference| allowed, as a fraction of max(1, max |logit|): float32 holds a merge to
# rounding (measured 2e-7 tiny_llama, 1e-4 SmolLM2); half precision rounds each weight to
# 2^-8 (bf16) / 2^-11 (fp16) of its size and that adds up through the layers (docs/EXPORT.md)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
PROBES = ("What is 12 times 7?", "Name the capital of France.",
          "Write one sentence about the sea.", "Is 91 a prime number? Explain.")
REPORT = "cola_export.json"


class ExportError(ConfigError):
    """An export refused: one line, exit code 2 (errors.run_guarded), nothing written."""


def routed_method(model) -> str | None:
    """The method's name when some adapted layer routes each token (no fixed update), else None."""
    from . import adapters
    from .adapters.io import unwrap

    info = adapters.adapter_info(unwrap(model))
    layers = adapters.our_layers(unwrap(model))
    if info is not None and any(not layer.mergeable for layer in layers.values()):
        return info["method"].name
    return None


def routed_by_task(model) -> bool:
    """Whether the layers weight their experts by the sequence's task (MOELoRA): exportable once a
    task is chosen (method.default_task), unlike a per-token router. Asked of the combiners."""
    from . import adapters
    from .adapters.io import unwrap

    return any(hasattr(layer.combiner, "default_task") for layer in adapters.our_layers(unwrap(model)).values())


def has_adapter(model) -> bool:
    """Whether the model's backend attached an adapter (full fine-tuning's has none): asked of
    the backend, not read off the method's kind."""
    from . import adapters
    from .adapters.io import unwrap

    info = adapters.adapter_info(unwrap(model))
    return info is not None and info["backend"].has_adapter


def probe_logits(model, tokenizer, template: str):
    """Float32 logits at every position of a few chat prompts (one unpadded forward each)."""
    import torch

    from .generate import prompt_ids

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for text in PROBES:
            ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": text}], template)], device=device)
            out.append(model(input_ids=ids).logits.float().cpu())
    return out


def compare(reference, got, dtype: str, baseline: float | None = None) -> dict:
    """{max_abs_diff, bound, ok}: max |diff| over all probe logits against the dtype's bound,
    TOLERANCE[dtype] x max(1, max |logit|), or twice `baseline` (what casting the adapted model
    itself to that dtype costs) when that is larger: a deep model's half-precision rounding alone
    can exceed a fixed bound (SmolLM2 in bf16: 1.6 on logits of size 40)."""
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, got))
    scale = max(1.0, max(float(a.abs().max()) for a in reference))
    bound = max(TOLERANCE[dtype] * scale, 2 * baseline if baseline is not None else 0.0)
    out = {"dtype": dtype, "max_abs_diff": diff, "bound": bound, "ok": diff <= bound}
    return {**out, "cast_alone": baseline} if baseline is not None else out


def export_merged(model, tokenizer, template: str, dtype: str, directory: Path) -> dict:
    """Merge, check against the adapted model, then write (raise ExportError before writing)."""
    from . import adapters
    from .models import resolve_dtype

    reference = probe_logits(model, tokenizer, template)
    baseline = None
    if dtype != "fp32":  # what casting alone costs: the adapted model itself in that dtype
        import copy

        baseline = compare(reference, probe_logits(copy.deepcopy(model).to(resolve_dtype(dtype)), tokenizer,
                                                   template), dtype)["max_abs_diff"]
    plain = adapters.merged_model(model) if has_adapter(model) else model
    checks = [compare(reference, probe_logits(plain, tokenizer, template), "fp32")]
    if dtype != "fp32":
        plain = plain.to(resolve_dtype(dtype))
        checks.append(compare(reference, probe_logits(plain, tokenizer, template), dtype, baseline))
    for check in checks:
        if not check["ok"]:
            raise ExportError(f"the merged model's logits differ from the adapted model's by "
                              f"{check['max_abs_diff']:.3g} in {check['dtype']} (allowed {check['bound']:.3g}): "
                              "nothing written")
    plain.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return {"checks": checks}


def export_run(run_dir: Path, to: str, out: Path | None = None, dtype: str = "fp32", overrides=()) -> Path:
    """Write the export of `run_dir` to `out` (default RUN_DIR/export/<to>) and return it."""
    import torch

    from . import adapters
    from .eval.run_dir import load_run, run_config

    run_config(run_dir)  # "not a run dir" before the output dir is looked at
    out = Path(out) if out is not None else Path(run_dir) / "export" / to
    if out.exists():
        raise ExportError(f"--out {out} already exists; export writes a new directory (remove it or "
                          "choose another --out)")
    cfg, model, tokenizer = load_run(run_dir, overrides, dtype=torch.float32)
    routed = routed_method(model)
    if routed and routed_by_task(model):
        raise ExportError(f"cannot export {routed} without a task: it weights its experts by each sequence's task; "
                          f"give the task the exported weights serve as method.default_task=<task id>")
    if routed:
        raise ExportError(f"cannot export {routed}: it routes each token through a learned router, so its "
                          "weight update depends on the input and has neither a LoRA (--to peft) nor a merged "
                          "(--to merged) form; use --to merged where possible (lora, dora, pissa, cola, "
                          "chain_of_lora) and serve this run with python -m cola_train.generate RUN_DIR")
    if to == "peft" and not has_adapter(model):
        raise ExportError("full fine-tuning has no adapter to export as PEFT; use --to merged")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if to == "peft":
            adapters.export_peft(model, partial)
            report = {}
        else:
            partial.mkdir()
            report = export_merged(model, tokenizer, cfg.data.template, dtype, partial)
        report = {"run_dir": str(Path(run_dir).resolve()), "to": to, "method": cfg.method.name,
                  "dtype": dtype if to == "merged" else "fp32", **report}
        (partial / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cola_train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = refuse  # one line and exit 2, not argparse's usage block
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--to", required=True, choices=("peft", "merged"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="merged only: the saved weights' dtype")
    args = parser.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"unexpected argument {bad[0]!r}: give one run dir, then key=value overrides")
    if args.to == "peft" and args.dtype != "fp32":
        parser.error("--dtype is for --to merged (a PEFT export keeps the adapter's float32 factors)")
    from .errors import run_guarded
    from .eval.run_dir import cli_logging

    cli_logging()

    def go():
        out = export_run(args.run_dir, args.to, args.out, args.dtype, args.overrides)
        print(f"wrote {out}")
        return 0

    return run_guarded(go) or 0


if __name__ == "__main__":
    sys.exit(main())
