"""Typed schemas for every config group, and the one list of every choice.

Hydra merges each group's YAML into these dataclasses, so a misspelt key, a value of the wrong
type or a choice outside its enum fails at compose time with a message naming the key (and the
allowed values). Each method option has the schema of its kind (`method=lora method.num_B=3`
fails: LoRA has no num_B). Rules a type cannot express are each schema's `check()`; the rules that
span groups are in checks.py, above this module. This module imports nothing else of cola_train:
everything else imports it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Dict, List, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A bad value in the composed config: printed as one line, never as a traceback."""


# ----------------------------------------------------------------------------------------------
# the choices: written once, here. StrEnum members compare and hash as their text, so
# `cfg.method.kind == "peft"` and dict lookups by name keep working.


class Kind(StrEnum):
    """What a method attaches: none (full fine-tuning), peft (LoRA/DoRA/PiSSA via PEFT), our
    cola / hydralora / mole layers, or chain (a schedule around another method)."""
    none = "none"
    peft = "peft"
    cola = "cola"
    hydralora = "hydralora"
    mole = "mole"               # our token-gated mixture of jointly trained experts (method=lora_moe)
    mole_block = "mole_block"   # MoLE as published (method=mole): frozen experts, a gate per block
    mola = "mola"               # MoLA: top-k routing, more experts in higher layers
    moelora = "moelora"         # MOELoRA: a task-id gate over split-rank experts
    chain = "chain"


class Init(StrEnum):
    lora = "lora"          # Kaiming A, zero B
    pissa = "pissa"        # W's top-r SVD part (docs/INIT.md)
    pissa_split = "pissa_split"   # our extension: CoLA's copies on distinct singular directions (split_init.py)


def _choice(name: str, *values: str) -> type[StrEnum]:
    """A StrEnum whose members are `values`, each named as its text: one line per choice list."""
    return StrEnum(name, {value: value for value in values}, module=__name__, qualname=name)


# PiSSA-style inits: lowrank (torch.svd_lowrank, seeded) | exact (torch.linalg.svd)
Svd = _choice("Svd", "lowrank", "exact")
Strategy = _choice("Strategy", "fully", "random", "heuristic")
Impl = _choice("Impl", "fused", "loop")                    # loop: the per-pair oracle
# shared: one mask per shared input (q/k/v; gate/up), the grouped GEMMs keep running |
# per_layer: each adapted linear its own mask (PEFT's way; the maths before issue #22)
DropoutMask = _choice("DropoutMask", "shared", "per_layer")
Pairing = _choice("Pairing", "paper", "code")              # the paper's formula | the authors' released code
Merge = _choice("Merge", "factors", "weights")
LinkWarmup = _choice("LinkWarmup", "scaled", "full")
Precision = _choice("Precision", "auto", "bf16", "fp16", "fp32")
Family = _choice("Family", "llama", "opt")
Kernels = _choice("Kernels", "auto", "liger", "none")
AttnKernel = _choice("AttnKernel", "auto", "flash", "efficient", "cudnn", "math", "torch")  # SDPA backends (attention.py)
Template = _choice("Template", "chat", "plain")
LoggerName = _choice("LoggerName", "wandb", "tensorboard", "mlflow", "none")
DataFormat = _choice("DataFormat", "auto", "alpaca", "sharegpt", "messages", "text")
TooLong = _choice("TooLong", "truncate", "drop")
LoggerMode = _choice("LoggerMode", "online", "offline", "disabled")
Scoring = _choice("Scoring", "letter", "cloze")


def choices(enum: type[StrEnum]) -> tuple[str, ...]:
    """The allowed values of a choice, in order, as plain text."""
    return tuple(member.value for member in enum)


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    family: Family = Family.llama              # llama | opt: picks default target modules
    hub_id: Optional[str] = None               # e.g. meta-llama/Llama-3.1-8B
    path: Optional[str] = None                 # local dir (overrides hub_id)
    gguf_file: Optional[str] = None            # file name inside `path` (or a package spec, see models.py)
    gguf_package: Optional[str] = None         # python package that ships the GGUF file
    random_init: bool = False                  # build from `arch` with random weights (tests)
    arch: Dict[str, Any] = field(default_factory=dict)   # AutoConfig kwargs for random_init
    tokenizer: Optional[str] = None            # hub id / dir; "bytes" = built-in byte tokenizer
    target_modules: List[str] = field(default_factory=list)
    dtype: Precision = Precision.auto          # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    gradient_checkpointing: bool = False


# ----------------------------------------------------------------------------------------------
# methods: one schema per kind, so a key a method does not have fails at compose time


@dataclass
class MethodSchema:
    """What every method has. Each conf/method/<name>.yaml starts from the schema of its kind
    (`defaults: [<kind>_schema, _self_]`), so `method=lora method.num_B=3` fails at compose time
    naming the key: LoRA has no num_B. `check()` holds the rules a type cannot express."""
    name: str = MISSING
    kind: Kind = MISSING

    def check(self, where: str = "method") -> None:
        """Rules on this method's own fields: ConfigError naming the key (`where`: method, or
        method.base for a chain's base)."""


@dataclass
class FullFinetuneSchema(MethodSchema):
    """No adapter: every weight trains (kind none)."""
    kind: Kind = Kind.none


@dataclass
class AdapterSchema(MethodSchema):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: Optional[List[str]] = None  # None: the model's own list
    # Per-factor scales (factor_scales.py): A-factors' lr x lr_scale_A, B-factors' x lr_scale_B; at
    # init A x init_tilt, B / init_tilt (B A unchanged). The collapsed control of CoLA-fully(M, N).
    lr_scale_A: float = 1.0
    lr_scale_B: float = 1.0
    init_tilt: float = 1.0

    def check(self, where: str = "method") -> None:
        if self.r < 1:
            raise ConfigError(f"{where}.r={self.r} must be >= 1")
        for key in ("lr_scale_A", "lr_scale_B", "init_tilt"):   # factor_scales.py
            value = float(getattr(self, key))
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{where}.{key}={value:g} must be a finite number > 0")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout={self.dropout} is outside [0, 1)")
        svd_niter = getattr(self, "svd_niter", 0)
        if svd_niter < 0:
            raise ConfigError(f"{where}.svd_niter={svd_niter} must be >= 0")
        for key in ("num_A", "num_B"):
            value = getattr(self, key, 1)
            if value < 1:
                raise ConfigError(f"{where}.{key}={value} must be >= 1")


@dataclass
class SvdInitSchema(AdapterSchema):
    """An adapter whose factors a PiSSA-style init may set from W's top-r SVD part."""
    init: Init = Init.lora                     # lora (Kaiming A, zero B) | pissa | pissa_split
    # PiSSA-style inits: how W's top-r part is found (adapters/init.py, docs/INIT.md)
    svd: Svd = Svd.lowrank                     # lowrank (torch.svd_lowrank, seeded) | exact (torch.linalg.svd)
    svd_niter: int = 16                        # lowrank's power iterations (the paper's PiSSA baseline: 16)


@dataclass
class PeftSchema(SvdInitSchema):
    """LoRA, DoRA, PiSSA through HF PEFT: one A, one B."""
    kind: Kind = Kind.peft
    use_dora: bool = False


@dataclass
class ColaSchema(SvdInitSchema):
    """CoLA: num_A down- and num_B up-projections and a rule that pairs them."""
    kind: Kind = Kind.cola
    strategy: Strategy = Strategy.fully
    num_A: int = 1
    num_B: int = 1
    impl: Impl = Impl.fused                    # fused | loop (the per-pair oracle)
    pairing: Pairing = Pairing.paper           # heuristic: paper (the paper's formula) | code (the authors' code)
    dropout_mask: DropoutMask = DropoutMask.shared   # shared | per_layer (adapters/fused_ops.py, docs/PERFORMANCE.md)


@dataclass
class HydraLoraSchema(SvdInitSchema):
    """HydraLoRA: one shared A, num_B heads, a per-token router."""
    kind: Kind = Kind.hydralora
    num_A: int = 1
    num_B: int = 3

    def check(self, where: str = "method") -> None:
        super().check(where)
        if self.num_A != 1:
            raise ConfigError(f"hydralora shares one A across its B heads: num_A must be 1, got {self.num_A}")
        if self.num_B < 2:
            raise ConfigError(f"hydralora needs num_B >= 2 heads to route between, got {self.num_B} (use method lora)")


@dataclass
class MoleSchema(AdapterSchema):
    """A gated mixture of num_A (A_i, B_i) LoRA experts with a balance loss."""
    kind: Kind = Kind.mole
    num_A: int = 3
    num_B: int = 3
    init: Init = Init.lora
    balance_coef: float = 0.01
    expert_paths: List[str] = field(default_factory=list)
    freeze_experts: bool = False

    def check(self, where: str = "method") -> None:
        super().check(where)
        if self.num_A < 2:
            raise ConfigError(f"mole needs num_A >= 2 experts to gate between, got {self.num_A} (use method lora)")
        if self.num_B != self.num_A:
            raise ConfigError(f"mole experts are (A_i, B_i) pairs: num_B must equal num_A={self.num_A}, got {self.num_B}")
        if self.balance_coef < 0:
            raise ConfigError(f"{where}.balance_coef={self.balance_coef} must be >= 0")
        if self.init == Init.pissa:
            # issue #23, measured: every expert starts from the same top-r SVD part, the gate sees
            # identical experts, gets no gradient to tell them apart (it moved 1.6e-11) and they stay equal
            raise ConfigError(f"method={self.name} with {where}.init=pissa is degenerate: a routed mixture (kind "
                              "mole) whose experts all start from the same SVD part keeps the gate and every "
                              f"expert identical; use {where}.init=lora")
        if self.expert_paths and len(self.expert_paths) != self.num_A:
            raise ConfigError(f"mole has num_A={self.num_A} experts but {len(self.expert_paths)} expert_paths were given")
        if self.freeze_experts and not self.expert_paths:
            raise ConfigError(f"{where}.freeze_experts=true needs expert_paths (frozen untrained experts add nothing)")


@dataclass
class MoeloraSchema(AdapterSchema):
    """MOELoRA (Liu et al. 2023): num_A experts sharing the rank r (r / num_A each), mixed per
    sequence by a gate on its task's embedding (adapters/combiners.TaskGate). The task id comes
    from the data (data.task_key); default_task is the task of a forward without one (the
    benchmark, generation): null = the mean of the task gates. Merge / export need it set."""
    kind: Kind = Kind.moelora
    num_A: int = 8
    num_B: int = 8
    num_tasks: int = 2
    task_embedding_dim: int = 64
    default_task: Optional[int] = None
    init: Init = Init.lora

    def check(self, where: str = "method") -> None:
        super().check(where)
        if self.num_A < 2 or self.num_B != self.num_A:
            raise ConfigError(f"moelora gates between num_A >= 2 experts (A_i, B_i), num_B = num_A: got "
                              f"{where}.num_A={self.num_A}, {where}.num_B={self.num_B}")
        if self.r % self.num_A:
            raise ConfigError(f"moelora splits the rank among its experts: {where}.r={self.r} must be a multiple "
                              f"of {where}.num_A={self.num_A}")
        if self.num_tasks < 1 or self.task_embedding_dim < 1:
            raise ConfigError(f"{where}.num_tasks={self.num_tasks} and {where}.task_embedding_dim="
                              f"{self.task_embedding_dim} must be >= 1")
        if self.default_task is not None and not 0 <= self.default_task < self.num_tasks:
            raise ConfigError(f"{where}.default_task={self.default_task} must be null (the mean of the task "
                              f"gates) or a task id in 0..{self.num_tasks - 1}")
        if self.init != Init.lora:
            raise ConfigError(f"moelora initialises as the authors' code (A ~ N(0, 0.01^2), B = 0): "
                              f"{where}.init must be lora, got {self.init}")


MERGEABLE = (Kind.peft, Kind.cola)   # a chain's base: an update that merges exactly into the weights


@dataclass
class MoleBlockSchema(AdapterSchema):
    """MoLE as published (method=mole): num_A frozen pre-trained LoRA experts from expert_paths,
    one gate per transformer block (adapters/mole_gate.py); the combiner checks the rest."""
    kind: Kind = Kind.mole_block
    num_A: int = 2
    num_B: int = 2
    init: Init = Init.lora
    expert_paths: List[str] = field(default_factory=list)


@dataclass
class MolaSchema(SvdInitSchema):
    """MoLA: jointly trained LoRA experts, each token routed to its top_k, experts_per_group
    experts in each layer group from the bottom ([]: num_A everywhere)."""
    kind: Kind = Kind.mola
    num_A: int = 8
    num_B: int = 8
    top_k: int = 2
    experts_per_group: List[int] = field(default_factory=list)


@dataclass
class ChainSchema(AdapterSchema):
    """Chain of LoRA: a schedule around another method, `base`, which comes from the defaults
    list (`/method@base: lora` in conf/method/chain_of_lora.yaml; `method.base=<name>` on the
    command line, see compose.translate). r / alpha / dropout / target_modules / svd / svd_niter
    here replace the base's."""
    kind: Kind = Kind.chain
    base: Any = MISSING                        # the base method's schema node
    links: int = 1
    link_fractions: Optional[List[float]] = None
    rank_schedule: Optional[List[int]] = None
    restart_lr: bool = True
    link_warmup: LinkWarmup = LinkWarmup.scaled  # scaled | full: each link's share of the warm-up, or all of it
    merge: Merge = Merge.factors               # factors (exact, beside the weights) | weights (W += BA, rounds)
    svd: Svd = Svd.lowrank
    svd_niter: int = 16

    def base_name(self) -> str:
        return base_name(self.base)

    def fractions(self) -> List[float]:
        """Each link's share of the steps (equal shares when link_fractions is null)."""
        if self.link_fractions:
            return [float(f) for f in self.link_fractions]
        return [1.0 / self.links] * self.links

    def check(self, where: str = "method") -> None:
        super().check(where)
        links = self.links
        if links < 1:
            raise ConfigError(f"{where}.links={links} must be an integer >= 1")
        if self.link_fractions is not None:
            fractions = [float(f) for f in self.link_fractions]
            if len(fractions) != links:
                raise ConfigError(f"{where}.link_fractions has {len(fractions)} entries but {where}.links={links}")
            bad = [f for f in fractions if not f > 0]
            if bad:
                raise ConfigError(f"{where}.link_fractions={fractions} has a non-positive entry {bad[0]}")
            if abs(math.fsum(fractions) - 1.0) > 1e-6:
                raise ConfigError(f"{where}.link_fractions={fractions} sums to {math.fsum(fractions):g}, not 1")
        if self.rank_schedule is not None:
            ranks = list(self.rank_schedule)
            if len(ranks) != links:
                raise ConfigError(f"{where}.rank_schedule has {len(ranks)} entries but {where}.links={links}")
            bad = [r for r in ranks if not isinstance(r, int) or r < 1]
            if bad:
                raise ConfigError(f"{where}.rank_schedule={ranks} has an entry {bad[0]!r} that is not an integer >= 1")
        base, name = self.base, self.base_name()
        label = f"{where}.base={name!r}"
        mergeable = ", ".join(CHAIN_BASES)
        if not isinstance(base, MethodSchema) or base.kind == Kind.chain:
            raise ConfigError(f"{label} is a chain itself; name the method to chain ({mergeable})")
        if base.kind == Kind.none:
            raise ConfigError(f"{label} is full fine-tuning: there is no adapter to merge ({mergeable})")
        if base.kind not in MERGEABLE:
            raise ConfigError(f"{label} routes each token, so its update cannot be merged into the "
                              f"weights; chain a mergeable method ({mergeable})")
        if getattr(base, "use_dora", False):
            raise ConfigError(f"{label}: a merged DoRA update is not low-rank and cannot be committed; "
                              f"chain a mergeable method ({mergeable})")
        try:
            base.check(f"{where}.base")
        except ConfigError as err:
            raise ConfigError(f"{label}: {err}") from None


# the options a chain may take as its base (conf/method/*.yaml whose kind merges exactly)
CHAIN_BASES = ("lora", "pissa", "cola_fully", "cola_random", "cola_heuristic")

# kind -> its schema: the ConfigStore entry conf/method/<name>.yaml names in its defaults
METHOD_SCHEMAS: Dict[Kind, type] = {
    Kind.none: FullFinetuneSchema, Kind.peft: PeftSchema, Kind.cola: ColaSchema,
    Kind.hydralora: HydraLoraSchema, Kind.mole: MoleSchema, Kind.mole_block: MoleBlockSchema,
    Kind.mola: MolaSchema, Kind.moelora: MoeloraSchema, Kind.chain: ChainSchema,
}


def schema_name(kind: Kind) -> str:
    return f"{kind.value}_schema"


def base_name(base: Any) -> str:
    """The chain base's method name, from its node (or a plain name, as older configs saved it)."""
    if isinstance(base, str):
        return base
    if isinstance(base, Mapping):
        return str(base.get("name"))
    return str(getattr(base, "name", base))


@dataclass
class MethodConfig:
    """Every method field at once, with defaults: what the adapters read (adapters/spec.py
    builds one from a method node), so a backend can ask any method for num_B (1 for LoRA). The
    schemas above are what a config may set; this is what a layer sees."""
    name: str = "lora"
    # lora | dora | pissa go through PEFT; cola / hydralora / mole are ours; none = full fine-tuning
    kind: str = "peft"                         # none | peft | cola | hydralora | mole | chain
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: Optional[List[str]] = None  # None: the model's own list
    init: str = "lora"                         # lora (Kaiming A, zero B) | pissa
    svd: str = "lowrank"                       # lowrank (torch.svd_lowrank, seeded) | exact (torch.linalg.svd)
    svd_niter: int = 16                        # lowrank's power iterations (the paper's PiSSA baseline: 16)
    use_dora: bool = False
    # CoLA
    strategy: str = "fully"                    # fully | random | heuristic
    num_A: int = 1
    num_B: int = 1
    impl: str = "fused"                        # fused | loop (the per-pair oracle)
    pairing: str = "paper"                     # heuristic: paper (the paper's formula) | code (the authors' code)
    dropout_mask: str = "shared"               # shared (one mask per shared input) | per_layer
    # MoLE
    balance_coef: float = 0.01
    expert_paths: List[str] = field(default_factory=list)
    freeze_experts: bool = False
    # MoLA: each token's top_k experts; experts per layer group, bottom first ([] = num_A everywhere)
    top_k: int = 2
    experts_per_group: List[int] = field(default_factory=list)
    # MOELoRA: tasks the gate knows (ids 0..num_tasks-1), its task-embedding width, the task of a
    # forward without task ids (None: the mean of the task gates)
    num_tasks: int = 2
    task_embedding_dim: int = 64
    default_task: Optional[int] = None
    # Chain of LoRA: a schedule around another adapter (`base`)
    base: Any = "lora"
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


def method_view(method: Any, **changes) -> MethodConfig:
    """The MethodConfig (every field) of a method schema object, node or mapping, with `changes`."""
    if dataclasses.is_dataclass(method):
        values = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
    else:
        try:
            from omegaconf import OmegaConf

            if OmegaConf.is_config(method):
                method = OmegaConf.to_container(method, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        values = dict(method)
    known = {f.name for f in dataclasses.fields(MethodConfig)}
    plain = lambda v: v.value if isinstance(v, StrEnum) else v  # noqa: E731 - the layers get plain text
    return MethodConfig(**{k: plain(v) for k, v in {**values, **changes}.items() if k in known})


def saved_in_this_layout(saved: dict, now: dict) -> dict:
    """A config saved before each method had the schema of its kind (runs before 2026-12-03: every
    method field filled in, a chain's base a name), as this layout writes it, so a resume or a
    re-run sweep compares like with like. A field the method's schema lacks is dropped where it
    holds the all-methods default (it meant nothing for that method; any other value stays, and
    shows as a change); a base saved as a name stands for today's base node of that name (the old
    code read conf/method/<base>.yaml then, as Hydra composes it now)."""
    method = saved.get("method") if isinstance(saved, dict) else None
    schema = METHOD_SCHEMAS.get(method.get("kind")) if isinstance(method, dict) else None
    if schema is None:
        return saved
    fields = {f.name for f in dataclasses.fields(schema)}
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(MethodConfig)}
    method = {k: v for k, v in method.items() if k in fields or k not in defaults or v != defaults[k]}
    now_base = (now.get("method") or {}).get("base") if isinstance(now, dict) else None
    if isinstance(method.get("base"), str) and isinstance(now_base, dict) and now_base.get("name") == method["base"]:
        method["base"] = now_base
    return {**saved, "method": method}


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
    template: Template = Template.chat         # chat (model's template, fallback plain) | plain
    # own data (data=custom, data/custom.py, docs/DATA.md)
    path: Optional[str] = None                 # a .json / .jsonl file or a folder of them
    format: DataFormat = DataFormat.auto       # auto | alpaca | sharegpt | messages | text
    skip_bad_rows: bool = False                # skip (and count) bad records instead of stopping
    too_long: TooLong = TooLong.truncate       # records past cutoff_len: truncate | drop (counted)
    packing: bool = False                      # padding-free batches: examples in one row (data/packing.py)
    # a task id per record (data/tasks.py; method=moelora's gate reads it): null | source (the
    # record's source: its place in data.sources, or its file among data.path's) | a record field
    task_key: Optional[str] = None
    task_pattern: Optional[str] = None         # a regex on that field: its first group (or match) is the label
    tasks: List[str] = field(default_factory=list)   # the labels in id order ([]: the sorted labels found)

    def check(self) -> None:
        # fraction / max_samples / val_fraction: data.sampling.check_sample_config (checks.py calls it)
        if self.cutoff_len < 8:
            raise ConfigError(f"data.cutoff_len={self.cutoff_len} must be >= 8")


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
    precision: Precision = Precision.auto      # auto | bf16 | fp16 | fp32
    master_weights: bool = True                # bf16/fp16 without DeepSpeed: fp32 trainable weights
    fp32_adapter_path: bool = False            # bf16/fp16: the adapters' low-rank path in fp32 (fp32_path.py)
    compile: bool = False                      # torch.compile each transformer block (regional_compile.py)
    kernels: Kernels = Kernels.auto            # auto | liger | none: fused model kernels under the adapters (kernels.py)
    attn_kernel: AttnKernel = AttnKernel.auto  # SDPA backends on CUDA; auto: no cuDNN (attention.py)
    # round each batch's padded length up (collate.py): 1 = no rounding; auto = 64 on a CUDA device
    pad_to_multiple_of: Any = 1
    profile_steps: int = 0                     # >0: torch profiler over that many steps (profiling.py, profile.txt)
    logging_steps: int = 10
    eval_steps: int = 0                        # 0: evaluate at the end only
    save_steps: int = 0                        # 0: save at the end only
    save_total_limit: int = 2
    resume: Any = False                        # false | true | force (resume.py); a bool or 'force'
    devices: int = 1
    num_workers: int = 0

    def check(self) -> None:
        for key in ("batch_size", "grad_accum", "devices"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key}={getattr(self, key)} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"trainer.lr={self.lr} must be > 0")
        pad = self.pad_to_multiple_of
        if pad != "auto" and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise ConfigError(f"trainer.pad_to_multiple_of={pad!r} must be auto or an integer >= 1")
        if self.profile_steps < 0:
            raise ConfigError(f"trainer.profile_steps={self.profile_steps} must be >= 0 (0: no profile)")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError(f"trainer.epochs={self.epochs} must be > 0 when trainer.max_steps <= 0")


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none         # wandb | tensorboard | mlflow | none (loggers.py)
    mode: LoggerMode = LoggerMode.offline      # online | offline | disabled
    project: str = "cola_train"
    entity: Optional[str] = None


@dataclass
class HarnessConfig:
    # EleutherAI lm-evaluation-harness tasks scored after training (eval/harness.py), e.g.
    # [cola_mmlu_law, cola_mmlu_law_cloze]; empty: none
    tasks: List[str] = field(default_factory=list)
    batch_size: Optional[int] = None           # None: eval.batch_size
    # also accept lm-eval's own tasks (they read hub datasets: online only; indexing them takes ~50 s)
    lm_eval_tasks: bool = False


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
    harness: HarnessConfig = field(default_factory=HarnessConfig)

    def check(self) -> None:
        scoring_list(self.scoring)
        if self.max_examples is not None and self.max_examples < 1:  # else select_subset fails after training
            raise ConfigError(f"eval.max_examples={self.max_examples} must be >= 1 (or null: every question)")


@dataclass
class DeepSpeedConfig:
    name: str = "none"
    config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = MISSING                      # the chosen option's schema (METHOD_SCHEMAS)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    seed: int = 42
    output_dir: Optional[str] = None           # default: Hydra's run dir

    def check(self) -> None:
        """Every group's own rules (checks.validate adds the ones that span groups)."""
        self.trainer.check()
        self.data.check()
        self.method.check()
        self.eval.check()


def register_schemas() -> None:
    """The top-level schema, and one schema per method kind in group `method` (what
    conf/method/<name>.yaml names first in its defaults list)."""
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for kind, schema in METHOD_SCHEMAS.items():
        store.store(group="method", name=schema_name(kind), node=schema)


def typed(cfg) -> Config:
    """The composed config as dataclasses (each method its own schema): OmegaConf.to_object, at
    the entry points only (`__main__`'s Hydra job, checks.check_values before Hydra, and
    compose.typed_config for scripts and tests); a Config is returned as it is. Everything
    below them takes the Config (`require_typed`)."""
    if isinstance(cfg, Config):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)


def require_typed(cfg, who: str) -> Config:
    """`cfg` itself when it is the typed Config; a TypeError naming `who` for a DictConfig (a
    caller that skipped the entry point's one conversion), so the code below never sees both."""
    if not isinstance(cfg, Config):
        raise TypeError(f"{who} takes the typed Config (config.typed(cfg) at the entry point), "
                        f"got {type(cfg).__name__}")
    return cfg


def as_dict(cfg: Config) -> dict:
    """The typed config as plain data (choices as their text): what results.json,
    config.trained.yaml, resume's comparison and a logger get. The one way back from the
    dataclasses; it equals OmegaConf.to_container(resolve=True) of the composed node
    (tests/test_config.py checks it for every method)."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(require_typed(cfg, "as_dict")), default=str))


SCORINGS = choices(Scoring)


def scoring_list(value) -> List[str]:
    """eval.scoring as a list of names ("cloze" or [letter, cloze]); ConfigError naming a bad one."""
    names = [value] if isinstance(value, (str, int, float)) or value is None else list(value)
    if not names or any(n not in SCORINGS for n in names) or len(set(names)) != len(names):
        shown = value if isinstance(value, str) else "[" + ",".join(map(str, names)) + "]"
        raise ConfigError(f"eval.scoring={shown} must be one or more distinct of {', '.join(SCORINGS)}")
    return [str(n) for n in names]


def link_ends(total_steps: int, fractions: List[float]) -> List[int]:
    """The global step at which each link of a chain ends (the last one at total_steps): the
    schedule chain.py runs and checks.py checks against trainer.max_steps."""
    ends = [int(math.floor(total_steps * math.fsum(fractions[: i + 1]) + 0.5)) for i in range(len(fractions) - 1)]
    return ends + [int(total_steps)]
