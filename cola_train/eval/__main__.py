"""Stand-alone benchmark evaluation.

    python -m cola_train.eval outputs/runs/.../<run dir>      # the trained model of a run
    python -m cola_train.eval --model smollm2_135m --domain math   # a base model
    python -m cola_train.eval RUN_DIR --harness cola_mmlu_law       # lm-evaluation-harness
Extra `key=value` arguments override the eval config (e.g. eval.max_examples=200).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from ..__main__ import CONF
    from ..config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cola_train.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="[run_dir] [key=value ...]")
    parser.add_argument("--model", help="a model config name, to evaluate the base model")
    parser.add_argument("--domain", default="math")
    parser.add_argument("--harness", action="append", metavar="TASK",
                        help="score with EleutherAI's lm-evaluation-harness on TASK instead (repeatable; "
                             "our offline tasks: cola_<benchmark>[_cloze], see docs/EVALUATION.md); "
                             "writes RUN_DIR/harness.json")
    args = parser.parse_intermixed_args(argv)
    overrides = [a for a in args.items if "=" in a]
    dirs = [Path(a) for a in args.items if "=" not in a]
    args.run_dir = dirs[0] if dirs else None
    if len(dirs) > 1 or (args.run_dir is None) == (args.model is None):
        parser.error("give a run dir or --model NAME (not both)")

    from ..data.sources import data_root
    from ..errors import run_guarded
    from ..models import load_model, load_tokenizer, resolve_dtype
    from . import run_benchmark
    from .run_dir import cli_logging, load_run

    cli_logging()

    def evaluate():
        if args.model:
            cfg = _compose([f"model={args.model}", f"data={args.domain}", *overrides])
            model, tokenizer, out = load_model(cfg.model, resolve_dtype(cfg.model.dtype)), load_tokenizer(cfg.model), None
            import torch

            if torch.cuda.is_available():
                model = model.cuda()
        else:
            cfg, model, tokenizer = load_run(args.run_dir, overrides)
            out = args.run_dir / ("harness.json" if args.harness else "benchmark.json")
        if args.harness:
            from .harness import run_harness

            result = run_harness(model, tokenizer, cfg.eval, list(args.harness), data_root(cfg.data))
        else:
            result = run_benchmark(model, tokenizer, cfg.eval, cfg.data.domain, data_root(cfg.data))
        if out is not None:
            from ..results import write_json_atomic

            write_json_atomic(out, result)
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))} if not args.harness
                         else result.get("results", result), indent=2))
        return 0

    return run_guarded(evaluate)


if __name__ == "__main__":
    sys.exit(main())
