"""Stand-alone benchmark evaluation.

    python -m cola_train.eval outputs/runs/.../<run dir>      # the trained model of a run
    python -m cola_train.eval --model smollm2_135m --domain math   # a base model
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


def _run_config(run_dir: Path, overrides: list[str]):
    from omegaconf import OmegaConf

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        sys.exit(f"error: {run_dir} is not a run dir (no .hydra/config.yaml)")
    from ..config import Config

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved))
    for item in overrides:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, _parse(value))
    return cfg


def _parse(value: str):
    import yaml

    return yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cola_train.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="[run_dir] [key=value ...]")
    parser.add_argument("--model", help="a model config name, to evaluate the base model")
    parser.add_argument("--domain", default="math")
    args = parser.parse_args(argv)
    overrides = [a for a in args.items if "=" in a]
    dirs = [Path(a) for a in args.items if "=" not in a]
    args.run_dir = dirs[0] if dirs else None
    if len(dirs) > 1 or (args.run_dir is None) == (args.model is None):
        parser.error("give a run dir or --model NAME (not both)")

    from .. import adapters
    from ..data.sources import data_root
    from ..errors import run_guarded
    from ..models import load_model, load_tokenizer, resolve_dtype
    from . import run_benchmark

    def evaluate():
        if args.model:
            cfg = _compose([f"model={args.model}", f"data={args.domain}", *overrides])
            model = load_model(cfg.model, resolve_dtype(cfg.model.dtype))
            out = None
        else:
            cfg = _run_config(args.run_dir, overrides)
            from transformers import set_seed

            set_seed(cfg.seed)  # as the run did before building its model: a random-init base matches
            if (args.run_dir / "model").is_dir():
                cfg.model.path, cfg.model.gguf_file, cfg.model.random_init = str(args.run_dir / "model"), None, False
                model = load_model(cfg.model, resolve_dtype(cfg.model.dtype))
            else:
                base = load_model(cfg.model, resolve_dtype(cfg.model.dtype))
                model = adapters.load_adapter(base, args.run_dir / "adapter")
            out = args.run_dir / "benchmark.json"
        import torch

        if torch.cuda.is_available():
            model = model.cuda()
        result = run_benchmark(model, load_tokenizer(cfg.model), cfg.eval, cfg.data.domain, data_root(cfg.data))
        if out is not None:
            from ..results import write_json_atomic

            write_json_atomic(out, result)
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=2))
        return 0

    return run_guarded(evaluate)


if __name__ == "__main__":
    sys.exit(main())
