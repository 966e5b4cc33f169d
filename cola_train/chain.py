"""Chain of LoRA (Xia, Qin, Hazan 2024): a training schedule around a mergeable adapter.

One run, one Trainer, the same data order and the same total number of optimizer steps as a
plain LoRA run; only what is trained when changes. The steps are split into `links`; at the end
of each link but the last:

    1. merge:   W <- W + dW_link in every adapted layer, for good. `merge=factors` (default):
                adapters.commit_adapter keeps the link as frozen low-rank factors beside the
                base weight (adapters/committed.py), exact in any dtype; `merge=weights`: added
                into W (adapters.merge_adapter + reinit_adapter's commit), which in bf16 rounds
                most of a small update away. Either way it is recorded, so save/export stay
                relative to the original base;
    2. re-init: a fresh module (Kaiming A, zero B: the model's output does not change), at the
                link's rank from `rank_schedule`, drawn from a generator seeded by seed + link;
    3. restart: the next link trains as a fresh Trainer would: ColaTrainer.restart empties the
                optimizer and, with `restart_lr`, starts the learning-rate schedule again over
                the new link's steps (warm-up: `link_warmup`); otherwise one schedule runs over
                the whole chain.

Why links are restarts of one Trainer rather than one new Trainer each: the run's step count,
data order (mid-epoch), random stream, callbacks (metrics, W&B step axis, checkpoints every
save_steps, preemption, totals) and a resume from any step all belong to one Trainer, and a
second Trainer on a ZeRO-3 model fails (accelerate refuses a second DeepSpeed Accelerator; past
that, the first engine's gradient hooks break the second one's backward unless the first is
destroyed). So a link is a short training inside the run, and this module is its schedule (link
ends, ranks, warm-ups), its switch (commit or merge, re-init) and its state (records, checkpoints).

`method.base` is the chained method's config, composed by Hydra from the defaults list
(conf/method/chain_of_lora.yaml: `/method@base: lora`; `method.base=cola_heuristic` picks another);
the chain config's r / alpha / dropout / target_modules replace the base's, everything else
(kind, init, strategy, num_A, num_B, impl) comes from the base. The chain's rules are
config.ChainSchema.check and checks.spanning.

DeepSpeed: under ZeRO-3 the adapter factors (and each base weight, one layer at a time) are
gathered for the merge and scattered back from rank 0; under ZeRO-2/3 the optimizer's fp32 master
copies are refreshed from the re-initialised weights. A changing rank needs new parameter
tensors, which a DeepSpeed engine or DDP cannot take mid-run: rank_schedule with different ranks
runs in a single process without DeepSpeed only.

Logged per switch (metrics.jsonl and W&B, keys chain/*; results.json "chain" records, the last
link's too, unmerged): the link, its steps and rank, the training loss logged at the switch step
(a log is forced there: the mean since the previous log, the switch step's own loss with
trainer.logging_steps=1), ||dW||_F of the link's update over all layers, per layer and its
maximum, and ||sum of the merged dW||_F so far.

Resume: a Trainer checkpoint of a PEFT model holds only the live adapter, so every checkpoint
also gets `chain_state.json` (link, step within the link, the records so far) and
`chain_state.safetensors` (each merged link's adapter weights). Before training continues the
merged links are replayed on the fresh base (same code path, same seeds), then the Trainer loads
the live link's adapter and optimizer state as usual, and the live link's learning-rate schedule
is set again (the scheduler's step count is global: chain_state format 2; format 1 counted per link).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from transformers import TrainerCallback

from . import adapters
from .adapters import fp32_path
from .adapters.io import unwrap
from .checks import check_link_ends as _check_ends
from .config import ConfigError, MethodConfig, base_name, link_ends, method_view
from .models import upcast_trainable
from .parallel import gathered  # ZeRO-3: the one gather helper (modify: rank 0's values scattered back)

log = logging.getLogger("cola_train")

STATE_JSON = "chain_state.json"
STATE_TENSORS = "chain_state.safetensors"
FORMAT = "cola_train.chain/2"  # 2: the lr scheduler's step count in a checkpoint is global
FORMAT_1 = "cola_train.chain/1"
FROM_CHAIN = ("r", "alpha", "dropout", "target_modules", "svd", "svd_niter",
              "lr_scale_A", "lr_scale_B", "init_tilt")   # per-link LoRA settings, the SVD of a PiSSA base


# ----------------------------------------------------------------------------------------------
# config: the base method, the link schedule, the checks


def _field(m, key):
    return m[key] if isinstance(m, dict) else getattr(m, key)


def base_method(method_cfg) -> MethodConfig:
    """The MethodConfig of the chained adapter: the composed `method.base` with the chain's
    r / alpha / dropout / target_modules / svd / svd_niter (r: the first link's rank when
    rank_schedule is set)."""
    changes = {}
    for key in FROM_CHAIN:
        value = _field(method_cfg, key)
        changes[key] = list(value) if key == "target_modules" and value is not None else value
    schedule = _field(method_cfg, "rank_schedule")
    if schedule:
        changes["r"] = int(schedule[0])
    base = _field(method_cfg, "base")
    if isinstance(base, str):  # a config saved before the base was a node of it (runs before 2026-12-03)
        from .compose import compose

        base = compose([f"method={base}"]).method
    return method_view(base, **changes)


def adapter_method(method_cfg):
    """What attach_adapter gets, a typed MethodConfig: the base method's for a chain, the
    method's own otherwise."""
    return base_method(method_cfg) if _field(method_cfg, "kind") == "chain" else method_view(method_cfg)


def link_ranks(m) -> List[int]:
    schedule = _field(m, "rank_schedule")
    return [int(r) for r in schedule] if schedule else [int(_field(m, "r"))] * int(_field(m, "links"))


def link_fractions(m) -> List[float]:
    fractions = _field(m, "link_fractions")
    links = int(_field(m, "links"))
    return [float(f) for f in fractions] if fractions else [1.0 / links] * links


# ----------------------------------------------------------------------------------------------
# schedule: which link trains a step, each link's learning-rate warm-up


def link_warmup_steps(args, total_steps: int, link_steps: int, mode: str) -> int:
    """A link's warm-up under restart_lr. `full` repeats the run's whole warm-up in every link,
    which a short link may never finish (20 warm-up steps, 11-step links: the peak lr is never
    reached). `scaled` gives each link its share, as if the run's schedule were squeezed into it."""
    whole = args.get_warmup_steps(total_steps)
    if mode == "full" or total_steps <= 0:
        return whole
    return math.ceil(whole * link_steps / total_steps)


# ----------------------------------------------------------------------------------------------
# switch: end a link on a plain or a DeepSpeed-partitioned model (commit or merge, re-init)


def _cpu_factors(model) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """float32 CPU copies of each layer's live (A, B), the mergeable update == B @ A (scaling
    folded into B): the model's backend answers, whatever the chained method's kind."""
    return {name: (A.detach().to("cpu", torch.float32, copy=True), B.detach().to("cpu", torch.float32, copy=True))
            for name, (A, B) in adapters.layer_factors(model).items()}


def frobenius(A: torch.Tensor, B: torch.Tensor) -> float:
    """||B @ A||_F from the r x r Gram matrices, without forming the d_out x d_in product."""
    A, B = A.double(), B.double()
    return math.sqrt(max(0.0, float(torch.sum((B.T @ B) * (A @ A.T)))))


@contextlib.contextmanager
def seeded(seed: int):
    """Draw from a generator seeded by `seed` without disturbing the run's own random stream."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _trainable(model) -> Dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def half_precision_base(model) -> Optional[torch.dtype]:
    """The adapted layers' base weight dtype when it is bf16/fp16, else None. A merge into such
    weights rounds: an update below a weight's rounding step (2^-8 of it in bf16) is lost."""
    for base in adapters.base_layers(model).values():
        dtype = base.weight.dtype
        return dtype if dtype in (torch.bfloat16, torch.float16) else None
    return None


def current_factors(model) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """The live link's per-layer factors (gathers under ZeRO-3, read-only)."""
    model = unwrap(model)
    with gathered(_trainable(model).values(), modify=False):
        return _cpu_factors(model)


def switch(model, next_rank: int, seed: int, merge: str = "factors"):
    """End a link: record its factors and weights, merge it for good (`merge`: factors, beside
    the base weight; weights, into it), start a fresh module at `next_rank` from a generator
    seeded by `seed`. The model's output is unchanged. Returns ({param name: CPU copy},
    {layer: (A, B)}) of the link that ended."""
    model = unwrap(model)
    trainable = _trainable(model)
    fp32_masters = any(p.dtype == torch.float32 for p in trainable.values())
    with gathered(trainable.values(), modify=True):
        weights = {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()}
        factors = _cpu_factors(model)
        if merge == "weights":
            adapters.merge_adapter(model)  # each base weight gathered under ZeRO-3 (the backend's merge)
        else:
            adapters.commit_adapter(model)
        with seeded(seed):
            adapters.reinit_adapter(model, rank=next_rank)
    if fp32_masters:  # a new rank builds new tensors in the base's dtype: keep fp32 master weights
        upcast_trainable(model)
    if fp32_path.enabled(model):  # and PEFT builds new lora_A / lora_B modules
        fp32_path.enable(model)
    return weights, factors


def norms(factors: Dict[str, tuple], previous: List[Dict[str, tuple]]) -> dict:
    """Frobenius norms of this link's update dW (all layers together and per layer) and of the
    sum of every update merged so far, this one included."""
    per_layer = {name: frobenius(A, B) for name, (A, B) in factors.items()}
    total = 0.0
    for name, (A, B) in factors.items():
        As = [f[name][0] for f in previous] + [A]
        Bs = [f[name][1] for f in previous] + [B]
        total += frobenius(torch.cat(As, 0), torch.cat(Bs, 1)) ** 2
    worst = max(per_layer, key=per_layer.get) if per_layer else None
    return {"delta_norm": math.sqrt(math.fsum(v * v for v in per_layer.values())),
            "cumulative_delta_norm": math.sqrt(total),
            "layer_norm_max": per_layer.get(worst) if worst else None, "layer_norm_max_name": worst,
            "layer_norm_mean": (math.fsum(per_layer.values()) / len(per_layer)) if per_layer else None,
            "layer_norms": per_layer}


# ----------------------------------------------------------------------------------------------
# the chain: links as short trainings in one Trainer, and its state (records, checkpoints, resume)


class ChainSchedule(TrainerCallback):
    """Ends each link but the last at its last step (on_step_end): switch, then the Trainer's
    restart (an empty optimizer; with restart_lr a new learning-rate schedule over the next
    link). Logs each switch, saves and restores the chain with every checkpoint. One per run;
    `attach` adds it to the trainer."""

    def __init__(self, cfg, trainer):
        m = cfg.method
        self.trainer = trainer
        self.seed = int(cfg.seed)
        self.base = base_name(m.base)
        self.links = int(m.links)
        self.fractions = link_fractions(m)
        self.ranks = link_ranks(m)
        self.restart_lr = bool(m.restart_lr)
        self.link_warmup = str(m.link_warmup)
        self.merge = str(m.merge)
        self.ends: Optional[List[int]] = None
        self.link = 0
        self.records: List[dict] = []                    # one per merged link (+ the last at the end)
        self.merged_factors: List[Dict[str, tuple]] = []  # CPU (A, B) per merged link, per layer
        self.merged_weights: List[Dict[str, torch.Tensor]] = []  # for chain_state (resume)
        self._switched_at: Optional[int] = None
        self._last_loss: Optional[Tuple[int, float]] = None
        self._restored_from: Optional[str] = None
        self._step_counted_from = 0  # a checkpoint of format 1 counted the lr schedule's steps per link

    def _info(self, *args) -> None:
        if self.trainer.is_world_process_zero():
            log.info(*args)

    # -- schedule ----------------------------------------------------------------------------
    def start_of(self, link: int) -> int:
        return 0 if link == 0 else self.ends[link - 1]

    def link_at(self, step: int) -> int:
        """The link that trains optimizer step `step` + 1 (after `step` steps are done)."""
        return sum(1 for end in self.ends[:-1] if end <= step)

    def _lr_schedule(self, link: int) -> Tuple[int, int, int]:
        """(first step, steps, warm-up steps) of the learning-rate schedule `link` trains with."""
        steps = self.ends[link] - self.start_of(link)
        return self.start_of(link), steps, link_warmup_steps(self.trainer.args, self.ends[-1], steps, self.link_warmup)

    def on_train_begin(self, args, state, control, **kwargs):
        ends = link_ends(state.max_steps, self.fractions)
        _check_ends(ends, self.fractions, f"the trainer's step count ({state.max_steps} steps)")
        if self.ends is not None and self.ends != ends:  # restored from a checkpoint
            raise ConfigError(f"the checkpoint's chain ends its links at steps {self.ends}, but this run "
                              f"({state.max_steps} steps, links={self.links}) would end them at {ends}")
        self.ends = ends
        if args.world_size > 1 and len(set(self.ranks)) > 1:
            raise ConfigError(f"method.rank_schedule={self.ranks} changes the rank, which needs new parameter "
                              f"tensors: it runs in one process only ({args.world_size} ranks here)")
        link = self.link_at(state.global_step)
        if link != self.link:
            raise ConfigError(f"resuming at step {state.global_step} (link {link}) but the chain state says link "
                              f"{self.link}: the checkpoint has no matching {STATE_JSON}")
        if self.restart_lr and self.links > 1:  # the live link's schedule (a resume: part-way through it)
            self.trainer.restart_schedule(*self._lr_schedule(link), counted_from=self._step_counted_from)
        half = half_precision_base(self.trainer.model) if self.links > 1 and self.merge == "weights" else None
        if half is not None and self.trainer.is_world_process_zero():
            # measured on SmolLM2-135M at lr 5e-5: about 7 % of a link's update survives the merge
            log.warning("Chain of LoRA merges every link into %s base weights: an update smaller than a "
                        "weight's rounding step is lost in the merge (docs/RESULTS.md, Chain of LoRA); "
                        "method.merge=factors merges exactly", str(half).replace("torch.", ""))
        self._info("Chain of LoRA: %d links (base %s) ending at steps %s, ranks %s, %s", self.links, self.base,
                   self.ends, self.ranks,
                   f"lr restarts per link ({self.link_warmup} warm-up)" if self.restart_lr else "one lr schedule")

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.ends is None or self.link >= self.links - 1 or step != self.ends[self.link]:
            return control
        trainer, ended, nxt = self.trainer, self.link, self.link + 1
        names_before = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
        weights, factors = switch(trainer.model, self.ranks[nxt], self.seed + nxt, self.merge)
        trainer.restart(names_before, self._lr_schedule(nxt) if self.restart_lr else None)
        self._record(ended, weights, factors)
        self.link, self._switched_at = nxt, step
        self._info("Chain of LoRA: link %d merged at step %d (|dW|_F = %.4g); link %d starts at rank %d",
                   ended, step, self.records[-1]["delta_norm"], nxt, self.ranks[nxt])
        control.should_log = True  # the loss at the switch goes into the record
        return control

    def _record(self, link: int, weights, factors, merged: bool = True) -> dict:
        stats = norms(factors, self.merged_factors)
        record = {"link": link, "start_step": self.start_of(link), "end_step": self.ends[link],
                  "rank": self.ranks[link], "merged": merged, "loss_at_switch": None, **stats}
        if merged:
            self.merged_factors.append(factors)
            self.merged_weights.append(weights)
        self.records.append(record)
        return record

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return control
        self._last_loss = (state.global_step, float(logs["loss"]))
        if self._switched_at is not None and state.global_step == self._switched_at:
            self._switched_at = None
            record = self.records[-1]
            record["loss_at_switch"] = float(logs["loss"])
            self.trainer.log({  # after the loss row, in metrics.jsonl and W&B alike
                "chain/link": record["link"], "chain/loss_at_switch": record["loss_at_switch"],
                "chain/delta_norm": record["delta_norm"],
                "chain/cumulative_delta_norm": record["cumulative_delta_norm"],
                "chain/layer_norm_max": record["layer_norm_max"], "chain/next_rank": self.ranks[record["link"] + 1],
            })
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.ends is None or state.global_step < self.ends[-1] or self.link != self.links - 1:
            return control  # stopped early (preemption): the last link is not finished
        if any(r["link"] == self.link for r in self.records):
            return control
        record = self._record(self.link, None, current_factors(self.trainer.model), merged=False)
        if self._last_loss and self._last_loss[0] == state.global_step:
            record["loss_at_switch"] = self._last_loss[1]
        return control

    # -- state: every checkpoint, and a resume from one ---------------------------------------
    def on_save(self, args, state, control, **kwargs):
        from .trainer import saved_checkpoint

        if not state.is_world_process_zero:
            return control
        directory = saved_checkpoint(args, state)
        if directory is not None:
            self.save_state(directory, state.global_step)
        return control

    def save_state(self, directory, global_step: int) -> None:
        from safetensors.torch import save_file

        from .results import write_json_atomic

        directory = Path(directory)
        tensors = {f"link{i}:{name}": t.contiguous() for i, w in enumerate(self.merged_weights)
                   for name, t in w.items()}
        if tensors:
            save_file(tensors, str(directory / STATE_TENSORS))
        write_json_atomic(directory / STATE_JSON, {
            "format": FORMAT, "link": self.link, "global_step": global_step,
            "step_in_link": global_step - self.start_of(self.link), "ends": self.ends, "ranks": self.ranks,
            "fractions": self.fractions, "restart_lr": self.restart_lr, "link_warmup": self.link_warmup,
            "merge": self.merge, "base": self.base, "seed": self.seed,
            "records": [r for r in self.records if r["merged"]],
        })

    def restore(self, checkpoint) -> None:
        """Before trainer.train(resume_from_checkpoint=...): replay the merged links on the fresh
        base and re-initialise at the live link's rank, so the Trainer can load its adapter."""
        from safetensors.torch import load_file

        checkpoint = Path(checkpoint)
        path = checkpoint / STATE_JSON
        if not path.is_file():
            raise ConfigError(f"cannot resume Chain of LoRA from {checkpoint}: it has no {STATE_JSON} "
                              f"(not written by a method.kind=chain run)")
        saved = json.loads(path.read_text())
        if saved.get("format") not in (FORMAT, FORMAT_1):
            raise ConfigError(f"{path} has format {saved.get('format')!r}, expected {FORMAT!r}")
        saved.setdefault("link_warmup", "full")  # written before link_warmup existed
        saved.setdefault("merge", "weights")     # ... and before merge did
        for key, mine in (("base", self.base), ("ranks", self.ranks), ("seed", self.seed),
                          ("restart_lr", self.restart_lr), ("link_warmup", self.link_warmup),
                          ("merge", self.merge)):
            if saved[key] != mine:
                raise ConfigError(f"cannot resume from {checkpoint}: its chain has {key}={saved[key]!r}, "
                                  f"this run has {mine!r}")
        if len(saved["ends"]) != self.links:
            raise ConfigError(f"cannot resume from {checkpoint}: its chain has {len(saved['ends'])} links, "
                              f"this run method.links={self.links}")
        tensors = load_file(str(checkpoint / STATE_TENSORS)) if saved["link"] > 0 else {}
        self.ends = list(saved["ends"])
        model = unwrap(self.trainer.model)
        for i in range(saved["link"]):
            prefix = f"link{i}:"
            weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            params = _trainable(model)
            if set(weights) != set(params):
                raise ConfigError(f"{checkpoint / STATE_TENSORS}: link {i}'s weights do not match this model's "
                                  f"adapter ({len(weights)} vs {len(params)} tensors)")
            with torch.no_grad():
                for name, p in params.items():
                    p.data.copy_(weights[name].to(p.device, p.dtype))
            weights, factors = switch(model, self.ranks[i + 1], self.seed + i + 1, self.merge)
            self.merged_factors.append(factors)
            self.merged_weights.append(weights)
        self.records = [dict(r) for r in saved["records"]]
        self.link = int(saved["link"])
        if saved["format"] == FORMAT_1 and self.restart_lr:  # its scheduler counted from the link's start
            self._step_counted_from = self.start_of(self.link)
        self._restored_from = str(checkpoint)
        self._info("Chain of LoRA: resuming in link %d (%d merged links replayed) from %s", self.link, self.link,
                   checkpoint)

    # -- results -----------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"base": self.base, "links": self.links, "fractions": self.fractions, "ranks": self.ranks,
                "ends": self.ends, "restart_lr": self.restart_lr, "link_warmup": self.link_warmup,
                "merge": self.merge, "current_link": self.link, "resumed_from": self._restored_from,
                "records": self.records}


def attach(cfg, trainer) -> Optional[ChainSchedule]:
    """Add the schedule to the trainer for a chain run; None (nothing to do) otherwise."""
    if cfg.method.kind != "chain":
        return None
    schedule = ChainSchedule(cfg, trainer)
    trainer.add_callback(schedule)
    return schedule


def resume(schedule: Optional[ChainSchedule], checkpoint) -> None:
    """Replay the merged links of `checkpoint` (a run being resumed) before training continues."""
    if schedule is not None and checkpoint is not None:
        schedule.restore(checkpoint)
