"""Typed schemas for every config group.

Hydra merges each group's YAML into these dataclasses, so a misspelt key or a value of the
wrong type fails at compose time with a message naming the key. Cross-field rules that a type
cannot express live in `validate`, which the run calls before touching a model or a file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A bad value in the composed config: printed as one line, never as a traceback."""


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    family: str = "llama"                      # llama | opt: picks default target modules
    hub_id: Optional[str] = None               # e.g. meta-llama/Llama-3.1-8B
    path: Optional[str] = None                 # local dir (overrides hub_id)
    gguf_file: Optional[str] = None            # file name inside `path` (or a package spec, see models.py)
    gguf_package: Optional[str] = None         # python package that ships the GGUF file
    random_init: bool = False                  # build from `arch` with random weights (tests)
    arch: Dict[str, Any] = field(default_factory=dict)   # AutoConfig kwargs for random_init
    tokenizer: Optional[str] = None            # hub id / dir; "bytes" = built-in byte tokenizer
    target_modules: List[str] = field(default_factory=list)
    dtype: str = "auto"                        # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    gradient_checkpointing: bool = False


@dataclass
class MethodConfig:
    name: str = "lora"
    # lora | dora | pissa go through PEFT; cola / hydralora / mole are ours; none = full fine-tuning
    kind: str = "peft"                         # none | peft | cola | hydralora | mole | chain
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: Optional[List[str]] = None  # None: the model's own list
    init: str = "lora"                         # lora (Kaiming A, zero B) | pissa
    # PiSSA-style inits: how W's top-r part is found (adapters/init.py, docs/INIT.md)
    svd: str = "lowrank"                       # lowrank (torch.svd_lowrank, seeded) | exact (torch.linalg.svd)
    svd_niter: int = 16                        # lowrank's power iterations (the paper's PiSSA baseline: 16)
    use_dora: bool = False
    # CoLA
    strategy: str = "fully"                    # fully | random | heuristic
    num_A: int = 1
    num_B: int = 1
    impl: str = "fused"                        # fused | loop (the per-pair oracle)
    pairing: str = "paper"                     # heuristic: paper (the paper's formula) | code (the authors' code)
    # MoLE
    balance_coef: float = 0.01
    expert_paths: List[str] = field(default_factory=list)
    freeze_experts: bool = False
    # MoLA: each token's top_k experts; experts per layer group, bottom first ([] = num_A everywhere)
    top_k: int = 2
    experts_per_group: List[int] = field(default_factory=list)
    # Chain of LoRA: a schedule around another adapter (`base`)
    base: str = "lora"
    links: int = 1
    link_fractions: Optional[List[float]] = None
    rank_schedule: Optional[List[int]] = None
    restart_lr: bool = True
    link_warmup: str = "scaled"                # scaled | full: each link's share of the warm-up, or all of it
    merge: str = "factors"                     # factors (exact, beside the weights) | weights (W += BA, rounds)
    # Per-factor scales (factor_scales.py): A-factors' lr x lr_scale_A, B-factors' x lr_scale_B; at
    # init A x init_tilt, B / init_tilt (B A unchanged). The collapsed control of CoLA-fully(M, N).
    lr_scale_A: float = 1.0
    lr_scale_B: float = 1.0
    init_tilt: float = 1.0


@dataclass
class DataSource:
    name: str = ""
    file: Optional[str] = None                 # relative to data.root
    hub_id: Optional[str] = None
    split: str = "train"
    columns: Dict[str, str] = field(default_factory=dict)  # our field -> dataset column


@dataclass
class DataConfig:
    domain: str = "math"
    root: Optional[str] = None                 # default: $COLA_DATA_ROOT
    sources: List[DataSource] = field(default_factory=list)
    skip_missing: bool = False                 # drop sources missing offline instead of stopping
    fraction: float = 1.0
    max_samples: Optional[int] = 1000
    val_fraction: float = 0.1                  # held out from the pool, same for every seed
    max_val_samples: int = 200
    cutoff_len: int = 1024
    template: str = "chat"                     # chat (model's template, fallback plain) | plain


@dataclass
class TrainerConfig:
    epochs: float = 5.0
    max_steps: int = -1
    batch_size: int = 4
    eval_batch_size: int = 8
    grad_accum: int = 1
    # Optimizer-step batch over all devices: grad_accum is derived from it at run time (batching.py)
    effective_batch: Optional[int] = None
    lr: float = 5e-5
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    precision: str = "auto"                    # auto | bf16 | fp16 | fp32
    master_weights: bool = True                # bf16/fp16 without DeepSpeed: fp32 trainable weights
    fp32_adapter_path: bool = False            # bf16/fp16: the adapters' low-rank path in fp32 (fp32_path.py)
    compile: bool = False                      # torch.compile each transformer block (regional_compile.py)
    kernels: str = "auto"                      # auto | liger | none: fused model kernels under the adapters (kernels.py)
    logging_steps: int = 10
    eval_steps: int = 0                        # 0: evaluate at the end only
    save_steps: int = 0                        # 0: save at the end only
    save_total_limit: int = 2
    resume: Any = False                        # false | true | force (resume.py); a bool or 'force'
    devices: int = 1
    num_workers: int = 0


@dataclass
class LoggerConfig:
    name: str = "none"                         # wandb | none
    mode: str = "offline"                      # online | offline | disabled
    project: str = "cola_train"
    entity: Optional[str] = None


@dataclass
class EvalConfig:
    enabled: bool = True
    benchmark: Optional[str] = None            # None: the domain's benchmark
    before: bool = False
    subjects: Optional[List[str]] = None
    max_examples: Optional[int] = None
    batch_size: int = 16
    skip_bad_rows: bool = False
    # true: each prompt is the user turn of the tokenizer's chat template, scored after the
    # generation prompt (the authors' LLaMA-Factory evaluator); false: plain text
    chat_template: bool = False
    # letter (next-token logits of the option letters) and/or cloze (length-normalised option
    # log-likelihood): a name or a list; the first one fills benchmark.accuracy (eval/scoring.py)
    scoring: Any = field(default_factory=lambda: ["letter"])


@dataclass
class DeepSpeedConfig:
    name: str = "none"
    config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    seed: int = 42
    output_dir: Optional[str] = None           # default: Hydra's run dir


def register_schemas() -> None:
    ConfigStore.instance().store(name="schema", node=Config)


_CHOICES = {
    "method.kind": ("none", "peft", "cola", "hydralora", "mole", "mole_block", "mola", "chain"),
    "method.strategy": ("fully", "random", "heuristic"),
    "method.init": ("lora", "pissa", "pissa_split"),
    "method.svd": ("lowrank", "exact"),
    "method.impl": ("fused", "loop"),
    "method.pairing": ("paper", "code"),
    "data.template": ("chat", "plain"),
    "trainer.precision": ("auto", "bf16", "fp16", "fp32"),
    "trainer.kernels": ("auto", "liger", "none"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("online", "offline", "disabled"),
}


SCORINGS = ("letter", "cloze")


def scoring_list(value) -> List[str]:
    """eval.scoring as a list of names ("cloze" or [letter, cloze]); ConfigError naming a bad one."""
    names = [value] if isinstance(value, (str, int, float)) or value is None else list(value)
    if not names or any(n not in SCORINGS for n in names) or len(set(names)) != len(names):
        shown = value if isinstance(value, str) else "[" + ",".join(map(str, names)) + "]"
        raise ConfigError(f"eval.scoring={shown} must be one or more distinct of {', '.join(SCORINGS)}")
    return names


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part) if not isinstance(cfg, dict) else cfg[part]
    return cfg


def validate(cfg) -> None:
    """Cross-field checks that types cannot express; raise ConfigError with one line. Also sets
    trainer.grad_accum from trainer.effective_batch (the one value derived here, batching.py)."""
    from .batching import apply_effective_batch

    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    apply_effective_batch(cfg)
    scoring_list(cfg.eval.scoring)
    d, t, m = cfg.data, cfg.trainer, cfg.method
    from .data.sampling import check_sample_config

    check_sample_config(d)
    if d.cutoff_len < 8:
        raise ConfigError(f"data.cutoff_len={d.cutoff_len} must be >= 8")
    for key in ("batch_size", "grad_accum", "devices"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(t, key)} must be >= 1")
    if t.lr <= 0:
        raise ConfigError(f"trainer.lr={t.lr} must be > 0")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError(f"trainer.epochs={t.epochs} must be > 0 when trainer.max_steps <= 0")
    if t.fp32_adapter_path and (not t.master_weights or cfg.deepspeed.name != "none"):
        raise ConfigError("trainer.fp32_adapter_path=true needs fp32 adapter weights in the model: "
                          f"trainer.master_weights=true and deepspeed=none (got master_weights="
                          f"{str(t.master_weights).lower()}, deepspeed={cfg.deepspeed.name})")
    if t.compile and cfg.deepspeed.name != "none":
        raise ConfigError(f"trainer.compile=true runs without DeepSpeed only (got deepspeed={cfg.deepspeed.name})")
    if t.compile:
        from .regional_compile import check as check_compile

        check_compile(cfg)
    if m.kind != "none":
        for key in ("r", "num_A", "num_B"):
            if getattr(m, key) < 1:
                raise ConfigError(f"method.{key}={getattr(m, key)} must be >= 1")
        if m.alpha <= 0:
            raise ConfigError(f"method.alpha={m.alpha} must be > 0")
        if not 0 <= m.dropout < 1:
            raise ConfigError(f"method.dropout={m.dropout} is outside [0, 1)")
        if m.svd_niter < 0:
            raise ConfigError(f"method.svd_niter={m.svd_niter} must be >= 0")
    from .factor_scales import check as check_factor_scales

    check_factor_scales(m)  # lr_scale_A/B, init_tilt: > 0, and a method with factors
    from .symmetry import check as check_symmetry

    check_symmetry(m)  # a mixture whose experts start identical under a uniform gate stays one adapter
    e = cfg.eval
    if e.max_examples is not None and e.max_examples < 1:  # else select_subset fails after training
        raise ConfigError(f"eval.max_examples={e.max_examples} must be >= 1 (or null: every question)")
    if m.kind == "chain":
        from .chain import check_config as check_chain

        check_chain(cfg)  # links, fractions, rank schedule, the chained base method
    from .distributed import check as check_distributed

    check_distributed(cfg)  # DeepSpeed vs trainer, trainer.devices vs GPUs
