"""A finished run's model, rebuilt from its run dir: the one loader behind `python -m
cola_train.eval`, `.generate` and `.export`, so the three see exactly the same model.

The run dir holds the base model's *config* (.hydra/config.yaml), not its weights: the base is
loaded again as the run loaded it (seeded first, so a random-init test model is the same one),
then the saved adapter is attached to it with adapters.load_adapter, which keeps routed methods
(HydraLoRA, MoLE) routed. Full fine-tuning saved the whole model under model/ instead.
"""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError


def run_config(run_dir: Path, overrides=()):
    """The run's saved config under the current schema, with `key=value` overrides applied."""
    import yaml
    from omegaconf import OmegaConf

    from ..config import Config

    saved = Path(run_dir) / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{run_dir} is not a run dir (no .hydra/config.yaml)")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved))
    for item in overrides:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value))
    return cfg


def load_run(run_dir: Path, overrides=(), dtype=None, device: str | None = "auto"):
    """(cfg, model, tokenizer) of a finished run: the base with the run's adapter attached (or
    the full fine-tuned model), in eval mode. `dtype` overrides the run's model.dtype; `device`
    "auto" moves the model to the GPU when there is one, None leaves it on the CPU."""
    import torch
    from transformers import set_seed

    from .. import adapters
    from ..models import load_model, load_tokenizer, resolve_dtype

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    dtype = dtype or resolve_dtype(cfg.model.dtype)
    set_seed(cfg.seed)  # as the run did before building its model: a random-init base matches
    if (run_dir / "model").is_dir():
        cfg.model.path, cfg.model.gguf_file, cfg.model.random_init = str(run_dir / "model"), None, False
        model = load_model(cfg.model, dtype)
    else:
        if not (run_dir / "adapter").is_dir():
            raise ConfigError(f"{run_dir} has no adapter/ or model/: the run did not finish training "
                              "(resume it with trainer.resume=true)")
        model = adapters.load_adapter(load_model(cfg.model, dtype), run_dir / "adapter")
        if "default_task" in cfg.method:  # method=moelora: the task a forward without ids (and a merge) serves
            adapters.set_default_task(model, cfg.method.default_task)
    if device == "auto" and torch.cuda.is_available():
        model = model.cuda()
    model.eval()
    return cfg, model, load_tokenizer(cfg.model)


def cli_logging() -> None:
    """For the run-dir commands (eval, generate, export): warnings on stderr as plain lines, and
    no second copy of the `error:` line that errors.run_guarded prints for bad input."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("cola_train").addFilter(lambda record: record.levelno < logging.ERROR)
