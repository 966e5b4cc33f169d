"""cola_train: CoLA, Chain of LoRA and their baselines, one Hydra command per run."""
from . import dirnames, resume

__version__ = "0.1.0"
dirnames.register()
resume.register()
from .data import custom as _custom  # noqa: E402 - ${custom_eval:} in conf/eval/custom.yaml

_custom.register_resolver()
