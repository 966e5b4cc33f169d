"""What must be true before the model is built, checked before the model is built.

`validate` judges the values: each group's schema checks its own fields (config.py, `check()`),
and the rules here judge how groups combine (method x trainer x deepspeed ...). This module sits
above config and below run; it reaches only down (config, batching, data, eval, models, adapters,
regional_compile), never into chain, distributed or run, which import it. The DeepSpeed-vs-trainer
and device-count rules are distributed.check, which the callers run after `validate`.

The other checks judge the world the values point at: the training data (on disk, or a hub that
answers), the benchmark files, ranks that fit the layers they adapt, DeepSpeed importable, W&B
credentials. Each of these used to fail late: after a 52 s model load, after every rank printed
the same traceback, or after the whole training run, when the benchmark could not find its files
and the trained adapter was never written. Each failure here is one line (DataError, EvalDataError
or ConfigError, which errors.py prints as `error: ...`).

`check_values` runs in __main__ on the composed config, before Hydra makes a run dir, so a bad
value leaves no folder named like a run. `before_model` runs in run.py before the model is built,
and in the parent before `trainer.devices` ranks are spawned. `check_layers` runs on the built
model before adapters attach (the widths of a hub or GGUF model are known only then).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from .compose import CONF
from .config import ConfigError

log = logging.getLogger("cola_train")


# ----------------------------------------------------------------------------------------------
# values, before Hydra makes a run dir


def check_values(argv: list[str], more=()) -> None:
    """`validate` (then each of `more`, e.g. distributed.check) on the config these overrides
    compose to; a bad value, or a config that does not compose for a reason compose.one_line
    knows (a key the schema lacks, a value outside its enum), exits 2 in one line.

    Only for a single run: a multirun (or any Hydra flag: --cfg, --help, ...) goes to Hydra, and
    each of its jobs validates (its dir then records the failure). Imports neither torch nor
    transformers, so `data.fraction=-1` fails in about a second. A config that does not compose
    for another reason is left to Hydra, which reports it its own way.
    """
    if any(a.startswith("-") for a in argv):
        return
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    from .compose import compose
    from .config import typed

    try:
        try:
            cfg = typed(compose(overrides))  # the typed Config, as the Hydra job will get it
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - Hydra's own error path says it
            return
        validate(cfg)
        from .data.custom import check_config

        check_config(cfg.data)  # data=custom: data.path is a file or a folder of them
        for check in more:
            check(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def validate(cfg) -> None:
    """Every rule on the values; raise ConfigError with one line. Also sets trainer.grad_accum
    from trainer.effective_batch (the one value derived here, batching.py), on `cfg` itself."""
    from .batching import apply_effective_batch
    from .config import require_typed
    from .data.sampling import check_sample_config

    require_typed(cfg, "checks.validate")
    apply_effective_batch(cfg)
    check_sample_config(cfg.data)
    cfg.check()             # each group's own fields (config.py)
    spanning(cfg)


def spanning(cfg) -> None:
    """The rules that involve more than one group (cfg: the typed Config)."""
    from .config import Kind, link_ends

    from .data.packing import check as check_packing

    check_packing(cfg)  # data.packing against trainer.pad_to_multiple_of and model.family
    t, m, ds = cfg.trainer, cfg.method, cfg.deepspeed.name
    if t.fp32_adapter_path and (not t.master_weights or ds != "none"):
        raise ConfigError("trainer.fp32_adapter_path=true needs fp32 adapter weights in the model: "
                          f"trainer.master_weights=true and deepspeed=none (got master_weights="
                          f"{str(t.master_weights).lower()}, deepspeed={ds})")
    if t.compile and ds != "none":
        raise ConfigError(f"trainer.compile=true runs without DeepSpeed only (got deepspeed={ds})")
    if t.compile:
        from .regional_compile import check as check_compile  # imports torch: only when asked

        check_compile(cfg)
    from .data.tasks import check_config as check_tasks

    check_tasks(cfg)  # data.task_key / task_pattern / tasks, and the method that reads the task ids
    if m.kind != Kind.chain:
        return
    ranks = list(m.rank_schedule or [])
    if len(set(ranks)) > 1 and (ds != "none" or t.devices > 1):
        raise ConfigError(f"method.rank_schedule={ranks} changes the rank, which needs new parameter tensors: "
                          f"it runs in one process without DeepSpeed only (use one rank for all links)")
    if m.links > 1 and m.restart_lr and ds != "none" and "scheduler" in (cfg.deepspeed.config or {}):
        raise ConfigError(f"method.restart_lr=true restarts the trainer's schedule, but deepspeed={ds} "
                          f"brings its own scheduler; drop deepspeed.config.scheduler or set method.restart_lr=false")
    if m.links > 1 and m.restart_lr and t.scheduler in STEPLESS_SCHEDULES:
        raise ConfigError(f"method.restart_lr=true restarts the learning-rate schedule at each link, but "
                          f"trainer.scheduler={t.scheduler!r} is not a schedule over steps; choose "
                          f"another trainer.scheduler or set method.restart_lr=false")
    if t.max_steps > 0:
        fractions, steps = m.fractions(), t.max_steps
        check_link_ends(link_ends(steps, fractions), fractions, f"trainer.max_steps={steps}")


# learning-rate schedules that are not a function of the step: ColaTrainer.restart cannot restart them
STEPLESS_SCHEDULES = ("reduce_lr_on_plateau", "greedy")


def check_link_ends(ends: list[int], fractions: list[float], where: str) -> None:
    """Every link of a chain gets at least one of the steps `where` gives."""
    links = len(ends)
    if ends[-1] < links:
        raise ConfigError(f"method.links={links} needs at least {links} training steps, but {where} gives {ends[-1]}")
    start = 0
    for i, end in enumerate(ends):
        if end <= start:
            raise ConfigError(f"method.link_fractions={fractions} leaves link {i} with no steps "
                              f"out of the {ends[-1]} that {where} gives")
        start = end


# ----------------------------------------------------------------------------------------------
# before the model is built


def before_model(cfg) -> None:
    """Everything that can fail before the first step and does not need the built model."""
    data_present(cfg.data)
    benchmark_present(cfg)
    deepspeed_importable(cfg)
    logger_importable(cfg)
    ranks_fit_config(cfg)


def data_present(data_cfg) -> None:
    """Every source is a local file, or has a hub id and the hub answers (`hub_offline`, decided
    once: offline, `load_dataset` is never called, so there are no retries). A missing source
    names the file, the root and the hub id, and the domains whose data *is* in the root."""
    from .data import DataError
    from .data.sources import data_root, hub_offline, local_file, missing_message

    if getattr(data_cfg, "path", None) or data_cfg.domain == "custom":  # own data (data/custom.py)
        from .data.custom import check_config

        return check_config(data_cfg)
    if not data_cfg.sources:
        raise DataError(f"data.domain={data_cfg.domain!r} lists no sources")
    root = data_root(data_cfg)
    missing = [s for s in data_cfg.sources
               if local_file(s, root) is None and not (s.hub_id and not hub_offline())]
    if not missing or (data_cfg.skip_missing and len(missing) < len(data_cfg.sources)):
        return
    hint = "" if data_cfg.skip_missing else " (data.skip_missing=true trains on the sources present)"
    raise DataError("; ".join(missing_message(s, root) for s in missing) + hint + "; " + domains_present(root))


def domains_present(root: Path | None) -> str:
    """Which conf/data/<domain>.yaml have their files under `root`: what the user can run now."""
    from omegaconf import OmegaConf

    from .config import DataSource
    from .data.sources import local_file

    if root is None:
        return "no data root to look in"
    full, partly = [], []
    for path in sorted((CONF / "data").glob("*.yaml")):
        try:
            sources = [DataSource(**{k: v for k, v in OmegaConf.to_container(s).items()
                                     if k in ("name", "file", "hub_id")})
                       for s in OmegaConf.load(path).get("sources") or []]
        except Exception:  # noqa: BLE001 - a broken domain file is not this run's concern
            continue
        here = [s.name for s in sources if local_file(s, root) is not None]
        if sources and len(here) == len(sources):
            full.append(path.stem)
        elif here:
            partly.append(f"{path.stem} (only {', '.join(here)}: data.skip_missing=true)")
    if not full and not partly:
        return f"no domain has its data in {root}"
    return f"domains with their data in {root}: {', '.join(full + partly)}"


def benchmark_present(cfg) -> None:
    """The benchmark the run ends with can be read: loaded here with the same reader the
    evaluation uses (a second or less), so a custom domain without a benchmark, a root without
    eval/, a missing subject file or a bad row fails now and not after training."""
    if not cfg.eval.enabled:
        return
    from .data.sources import data_root
    from .eval import EvalDataError, benchmark_for_domain, load_benchmark

    subjects = list(cfg.eval.subjects) if cfg.eval.subjects is not None else None
    try:
        name = cfg.eval.benchmark or benchmark_for_domain(cfg.data.domain)
        with _quiet("cola_train.eval"):  # its warnings (skipped rows) come once, with the scores
            load_benchmark(name, data_root(cfg.data), subjects=subjects, skip_bad_rows=cfg.eval.skip_bad_rows)
    except EvalDataError as err:
        raise EvalDataError(f"{err}; eval=none (or eval.enabled=false) trains without a benchmark") from None


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def deepspeed_importable(cfg) -> None:
    """deepspeed!=none needs `import deepspeed` to work: one line here, in the parent, instead
    of an ImportError traceback from every rank."""
    name = cfg.deepspeed.name
    if name == "none":
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"deepspeed={name} needs the deepspeed package: pip install 'cola_train[train]' "
                          f"(import deepspeed: {str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def logger_importable(cfg) -> None:
    """logger=wandb|tensorboard|mlflow needs its package (cola_train/loggers.py): one line here
    instead of the Trainer's RuntimeError once the model is loaded."""
    import importlib.util

    name, disabled = cfg.logger.name, cfg.logger.name == "wandb" and cfg.logger.mode == "disabled"
    if name in ("wandb", "tensorboard", "mlflow") and not disabled and importlib.util.find_spec(name) is None:
        package = "mlflow-skinny" if name == "mlflow" else name
        raise ConfigError(f"logger={name} needs the {package} package: pip install 'cola_train[loggers]' (or logger=none)")


# ----------------------------------------------------------------------------------------------
# ranks within the layers' widths


def ranks_fit_config(cfg) -> None:
    """`check_layers` on the model's skeleton (meta device: no weights, no memory) when its
    config is on disk (random init from model.arch, or a local model.path with config.json);
    otherwise build_model checks the loaded model before adapters attach."""
    if cfg.method.kind == "none":
        return
    skeleton = _meta_model(cfg.model)
    if skeleton is not None:
        check_layers(skeleton, cfg)


def _meta_model(model_cfg):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if model_cfg.random_init:
            arch = dict(model_cfg.arch)
            config = AutoConfig.for_model(arch.pop("model_type", model_cfg.family), **arch)
        elif model_cfg.path and not model_cfg.gguf_file and (Path(model_cfg.path) / "config.json").is_file():
            config = AutoConfig.from_pretrained(model_cfg.path)
        else:
            return None
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - the real model is checked after loading anyway
        log.debug("no meta model for the rank check (%s); checking after the model loads", err)
        return None


def needed_rank(method_cfg) -> tuple[str, int]:
    """(the key that sets it, the rank) each adapted linear must hold. Every method's factors
    are rank r: LoRA's pair, each of CoLA's A_i / B_j, HydraLoRA's A and heads, each MoLE expert;
    PiSSA-style inits take the top r singular vectors, so r > min(in, out) cannot even
    initialise. Chain of LoRA: its largest link rank (chain.link_ranks; not imported, as chain
    imports distributed, which imports this module)."""
    if method_cfg.kind == "chain" and method_cfg.rank_schedule:
        ranks = [int(r) for r in method_cfg.rank_schedule]
        return f"method.rank_schedule={ranks} (rank {max(ranks)})", max(ranks)
    return f"method.r={method_cfg.r}", int(method_cfg.r)


def check_layers(model, cfg) -> None:
    """The target linears exist, and the rank fits the narrowest of them (min(in, out))."""
    import torch

    from .adapters.spec import match_targets
    from .models import check_targets, target_modules

    if cfg.method.kind == "none":
        return
    targets = list(cfg.method.target_modules or target_modules(cfg.model))
    check_targets(model, targets)
    key, r = needed_rank(cfg.method)
    too_narrow = []
    for name in match_targets(model, targets):
        layer = model.get_submodule(name)
        if isinstance(layer, torch.nn.Linear) and r > min(layer.in_features, layer.out_features):
            too_narrow.append((min(layer.in_features, layer.out_features), name, layer))
    if not too_narrow:
        return
    width, name, layer = min(too_narrow, key=lambda t: t[0])
    kinds = sorted({n.rsplit(".", 1)[-1] for _, n, _ in too_narrow})
    raise ConfigError(f"{key} is larger than the width of {name} ({layer.in_features} -> {layer.out_features}, "
                      f"so rank <= {width}); too narrow: {', '.join(kinds)}; lower the rank or leave them "
                      f"out of method.target_modules")


# ----------------------------------------------------------------------------------------------
# W&B


def wandb_credentials() -> bool:
    """An API key in WANDB_API_KEY, or the netrc entry `wandb login` writes (machine
    api.wandb.ai, or the host of WANDB_BASE_URL; file $NETRC, else ~/.netrc)."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])
