"""One run, in the order of the paper's experiment: seed → model → adapter → data → train →
evaluate → results.json. Every step is a plain function call; read it top to bottom."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from . import adapters, attention, chain, checks, collate, config, distributed, factor_scales, kernels, loggers, preemption, \
    profiling, resume as resuming
from .checks import validate
from .energy import EnergyMeter, energy_summary
from .data import load_domain_records, split_train_val, tokenize_records
from .data import tasks
from .data.sampling import describe_sample
from .eval import harness
from .models import load_model, load_tokenizer, resolve_dtype, target_modules, upcast_trainable
from .parallel import Runtime
from .phases import Phases, StepTimer
from .regional_compile import compile_blocks
from .results import RunRecord, completed_results

log = logging.getLogger("cola_train")


def run_name(cfg) -> str:
    return f"{cfg.method.name}-{cfg.data.domain}-{cfg.model.name}-n{cfg.data.max_samples}-f{cfg.data.fraction}-s{cfg.seed}"


def _precision(cfg) -> dict:
    p = cfg.trainer.precision
    if p == "auto":
        p = "bf16" if torch.cuda.is_available() else "fp32"
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def training_arguments(cfg, out: Path, report_to: list[str]):
    from transformers import TrainingArguments

    from .trainer import trainer_kwargs

    t = cfg.trainer
    save = {"save_strategy": "steps", "save_steps": t.save_steps} if t.save_steps > 0 else {"save_strategy": "epoch"}
    evals = {"eval_strategy": "steps", "eval_steps": t.eval_steps} if t.eval_steps > 0 else {"eval_strategy": "no"}
    return TrainingArguments(
        output_dir=str(out / "checkpoints"), run_name=run_name(cfg), report_to=report_to,
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_steps, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, save_total_limit=t.save_total_limit, seed=cfg.seed,
        data_seed=cfg.seed, dataloader_num_workers=t.num_workers, remove_unused_columns=False,
        disable_tqdm=False, logging_nan_inf_filter=False,  # a NaN must reach StopOnNonFiniteLoss
        **trainer_kwargs(cfg),  # device, gloo/nccl, DeepSpeed dict
        **save, **evals, **_precision(cfg),
    )


def build_model(cfg: config.Config, phases: Phases | None = None, rt: Runtime | None = None):
    """Tokenizer, base model and the method's adapter. Returns (tokenizer, model, the fused
    kernels applied under the adapters)."""
    config.require_typed(cfg, "build_model")
    phases, rt = phases or Phases(), rt or Runtime.of(cfg)
    with phases(f"model load ({cfg.model.name})"):
        tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model, resolve_dtype(cfg.model.dtype))
        targets = getattr(cfg.method, "target_modules", None) or target_modules(cfg.model)  # fft has none
        checks.check_layers(model, cfg)  # targets exist, ranks fit their widths: before any adapter
        if torch.cuda.is_available() and not rt.deepspeed:
            # on the GPU before attaching: PiSSA's SVDs run there, not on a few contended CPU cores
            model = model.to(rt.device)
    choice, why = kernels.choose(cfg.trainer.kernels, cfg.model.family, torch.cuda.is_available())
    if choice == "none" and cfg.trainer.kernels == "auto" and torch.cuda.is_available():
        log.info("fused model kernels: none (%s)", why)
    applied = kernels.apply(model, choice, rt.zero_stage == 3, list(targets))
    with phases("adapter init"):
        model = adapters.attach_adapter(model, chain.adapter_method(cfg.method), list(targets),  # chain: its base
                                        seed=cfg.seed)
        factor_scales.tilt_init(model)  # method.init_tilt: A x t, B / t, the output unchanged
    mixed = any(_precision(cfg).values())
    if mixed and cfg.trainer.master_weights and not rt.deepspeed:
        log.info("fp32 master weights: %d trainable parameters upcast", upcast_trainable(model))
        if cfg.trainer.fp32_adapter_path:
            log.info("fp32 low-rank path: %d adapted layers", adapters.fp32_path.enable(model))
    if cfg.trainer.compile:
        log.info("torch.compile: %d blocks, in place", len(compile_blocks(model)))
    return tokenizer, model, applied


def build_data(cfg, tokenizer, records: list[dict] | None = None, phases: Phases | None = None):
    with (phases or Phases())("data split and tokenization"):
        records = load_domain_records(cfg.data) if records is None else records
        train, val = split_train_val(records, cfg.data, cfg.seed)
        log.info(describe_sample(cfg.data, len(records)))  # fraction or max_samples: which one decided
        if tasks.describe(records, cfg.data):
            log.info(tasks.describe(records, cfg.data))  # data.task_key: records per task id
        encode = lambda recs: tokenize_records(recs, tokenizer, cfg.data.template, cfg.data.cutoff_len,
                                               cfg.data.too_long, cfg.data.skip_bad_rows)
        return encode(train), (encode(val) if val else None)


def _benchmark(cfg, model, tokenizer) -> dict | None:
    from .eval import run_benchmark
    from .data.sources import data_root

    return run_benchmark(model, tokenizer, cfg.eval, cfg.data.domain, data_root(cfg.data))


# results.json status of a run that trained and saved its weights but whose benchmark failed: not
# "completed", so reports list it apart from scored runs and trainer.resume=true scores it again
BENCHMARK_FAILED = "benchmark_failed"


def _benchmark_after_training(cfg, model, tokenizer, bench_before: dict | None) -> dict:
    """The benchmark's result, or {"name", "error"} when it fails: the training it comes after
    is kept either way (the caller has saved the weights and writes results.json)."""
    try:
        bench = _benchmark(cfg, model, tokenizer)
    except Exception as err:  # noqa: BLE001 - any failure here must not lose the trained run
        from .errors import user_errors

        if isinstance(err, user_errors()):  # bad or vanished eval data: its one line says it
            log.error("the benchmark failed after training: %s", err)
        else:  # a fault in the scorer (or out of memory): the traceback is for the bug report
            log.exception("the benchmark failed after training")
        message = str(err).splitlines()[0] if str(err) else ""
        from .eval import DOMAIN_BENCHMARK

        name = cfg.eval.benchmark or DOMAIN_BENCHMARK.get(cfg.data.domain)
        return {"name": name, "error": f"{type(err).__name__}: {message}".rstrip(": ")}
    if bench_before is not None:
        bench["accuracy_before"] = bench_before.get("accuracy")
    return bench


def run(cfg: config.Config, out: Path) -> dict:
    """One run of the typed config (`__main__` converts Hydra's DictConfig once) into `out`."""
    from transformers import set_seed

    from .eval.scoring import check_tokenizer
    from .run_totals import RunTotals
    from .trainer import (CheckpointCompleteMarker, ColaTrainer, MetricsFileCallback, ResampleCallback,
                          StopOnNonFiniteLoss, StopWithoutGradient, forget_deepspeed)

    validate(cfg)  # a TypeError for a DictConfig: config.typed at the entry point
    distributed.check(cfg)  # DeepSpeed vs trainer, trainer.devices vs GPUs
    rt = Runtime.of(cfg)  # rank, world size, device, ZeRO stage: fixed for the whole run
    requeued = preemption.resuming(out)  # back after a preemption: resume without being asked
    changes = resuming.check(cfg, out, requeued)  # another config: refused (unless force)
    done = completed_results(out) if resuming.asked(cfg) else None
    if done is not None and not changes:
        # a sweep started again (study.py, a requeued array) skips the jobs it has finished
        log.info("%s: already completed in %s; trainer.resume leaves it as it is", run_name(cfg), out)
        print(summary_line(done, out), flush=True)
        return done
    if not rt.spawned:  # the parent checked before starting the ranks
        checks.before_model(cfg)  # data, benchmark files, DeepSpeed, ranks vs widths: one line each
        harness.check_tasks(harness.task_list(cfg.eval), cfg.eval.harness.lm_eval_tasks)  # lm-eval task names (eval/harness.py)
    records = load_domain_records(cfg.data)  # read (bad rows, bad bytes) before the model is built
    tasks.check_ids(records, cfg)  # method=moelora: every task id of the data < method.num_tasks
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    phases = Phases()
    tokenizer, model, applied_kernels = build_model(cfg, phases, rt)
    check_tokenizer(cfg.eval, tokenizer)  # eval.chat_template needs a template: stop now, not after training
    train_ds, val_ds = build_data(cfg, tokenizer, records, phases)
    report_to = loggers.setup(cfg, out)  # wandb | tensorboard | mlflow, through the Trainer's report_to
    args = training_arguments(cfg, out, report_to)
    stopper = preemption.stop_callback()  # a signal or Ctrl-C: checkpoint at the end of the step, stop
    no_gradient = [] if rt.deepspeed else [StopWithoutGradient()]
    totals = RunTotals(EnergyMeter(), tokens_so_far=lambda: trainer.trained_tokens)  # trainer: next line
    timer = StepTimer(phases, tokens_so_far=lambda: trainer.trained_tokens)
    step_profiler = profiling.profiler(cfg, out)  # trainer.profile_steps: where a step's time goes
    with phases("trainer set-up"):
        trainer = ColaTrainer(
            model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
            data_collator=tasks.collator(collate.collator(tokenizer, cfg.trainer.pad_to_multiple_of, cfg.data.packing), cfg.method),
            # totals before the marker: a checkpoint marked complete holds the run's totals so far
            callbacks=[ResampleCallback(cfg.seed), MetricsFileCallback(out / "metrics.jsonl"),
                       StopOnNonFiniteLoss(), *no_gradient, totals, timer, *filter(None, [step_profiler]),
                       CheckpointCompleteMarker(), stopper],
        )
    loggers.attach(trainer, report_to)  # peak GPU memory into every logged step; the MLflow run
    schedule = chain.attach(cfg, trainer)  # Chain of LoRA: merge + re-init at link ends; None otherwise
    results = RunRecord(out, config=config.as_dict(cfg), kernels=applied_kernels,
                        adapter_kernels=adapters.kernels_of(model),  # what our layers compute with (options.py)
                        n_train_samples=len(train_ds), n_val_samples=len(val_ds) if val_ds else 0)
    results["attention"] = attention.apply(cfg.trainer.attn_kernel, torch.cuda.is_available())  # SDPA backends
    trainable, total = adapters.trainable_parameters(model)
    results["params"] = {"trainable": trainable, "total": total}
    log.info("%s: %d train / %d val samples; %d of %d parameters trainable",
             run_name(cfg), results["n_train_samples"], results["n_val_samples"], trainable, total)

    eval_before = trainer.eval_before_training() if (val_ds and cfg.eval.before) else None
    bench_here = rt.is_main or rt.forward_on_every_rank  # ZeRO-3: a forward needs every rank
    bench_before = _benchmark(cfg, model, tokenizer) if (cfg.eval.enabled and cfg.eval.before and bench_here) else None

    checkpoint = _last_checkpoint(out) if (resuming.asked(cfg) or requeued) else None
    resume = checkpoint is not None
    if resume:
        trainer.add_callback(resuming.announcer(checkpoint, completed=done is not None))  # "resumed from ..."
        results.update({"resumed_with_changes": changes} if changes else {})  # force: old and new values
    elif rt.is_main:
        resuming.record_start(cfg, out)  # the config a later resume must match
    chain.resume(schedule, checkpoint)  # replay merged links first
    totals.resume_from(checkpoint)  # tokens, time and energy of the segments before this one
    totals.start()
    timer.train_called_at = time.time()
    try:
        with phases("training"):
            train_out = trainer.train(resume_from_checkpoint=checkpoint)
    except resuming.NothingToTrain as why:  # trainer.resume=force on a completed run: nothing to add
        print(f"[cola_train] {run_name(cfg)}: already completed in {out} ({why}); left as it is", flush=True)
        forget_deepspeed()
        return done
    if stopper.preempted(trainer.state):
        stopper.stop(trainer, results)  # checkpoint saved; Ctrl-C: exit 130; preempted: requeue, exit 3
    whole = totals.totals()  # every segment of the run, every rank's tokens
    results["energy"] = energy_summary(whole["joules"], whole["tokens"])
    results["train"] = {"loss": trainer.mean_train_loss(train_out, resume),
                        "steps": trainer.state.global_step,
                        "runtime_s": whole["runtime_s"], "tokens": whole["tokens"],
                        "tokens_per_s": whole["tokens"] / max(whole["runtime_s"], 1e-9),
                        "resumed": bool(resume), "segments": whole["segments"],
                        "counted_from_step": whole["counted_from_step"]}
    with phases("validation loss"):
        eval_after = trainer.evaluate()["eval_loss"] if val_ds else None
    if eval_before is None and val_ds and cfg.eval.before:
        eval_before = trainer.eval_loss_at_start()  # DeepSpeed: evaluated inside train()
    results["eval"] = {"loss_before": eval_before, "loss": eval_after}
    if schedule is not None:
        results["chain"] = schedule.summary()  # per link: steps, rank, loss at the switch, |dW|
    # the weights first: a benchmark that fails after hours of training loses no trained adapter
    with phases("adapter save"):
        trainer.save_weights(out, rt, full_model=not adapters.backend(model).has_adapter)  # collective; rank 0 writes
    results["benchmark"] = None
    if cfg.eval.enabled and bench_here:
        with phases("benchmark"):
            results["benchmark"] = _benchmark_after_training(cfg, model, tokenizer, bench_before)
    if bench_here and harness.task_list(cfg.eval):  # lm-evaluation-harness, on the model as trained
        with phases("lm-eval harness"):
            results["harness"] = harness.after_training(cfg, model, tokenizer)
    per_sequence = args.per_device_train_batch_size * args.gradient_accumulation_steps
    results["timings"] = {**{k: round(v, 3) for k, v in phases.seconds.items()},
                          **timer.summary(seq_len=_mean_sequence(timer, per_sequence))}
    if step_profiler is not None:
        results["profile"] = step_profiler.summary  # None: the run ended before the profiled steps
    if rt.is_main:
        failed = (results["benchmark"] or {}).get("error")
        if failed:  # trained and saved, but not scored
            results["error"] = f"benchmark failed after training: {failed}"
        results.write(BENCHMARK_FAILED if failed else "completed")
        print(summary_line(results.fields, out), flush=True)
    forget_deepspeed()
    loggers.finish(report_to, results.fields)  # final numbers into W&B's summary / the MLflow run
    return results.fields


def _mean_sequence(timer: StepTimer, sequences_per_step: int) -> float | None:
    """Tokens per sequence over the trained steps (the attention term of the FLOPs count)."""
    tokens = sum(t for _, _, t in timer.steps)
    return tokens / (len(timer.steps) * sequences_per_step) if timer.steps else None


def summary_line(results: dict, out: Path) -> str:
    """What a researcher wants from a finished run, in one line: the losses and the benchmark."""
    ev, bench = results["eval"], results.get("benchmark") or {}
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    parts = [f"eval loss {fmt(ev['loss_before'])} -> {fmt(ev['loss'])}" if ev["loss_before"] is not None
             else f"eval loss {fmt(ev['loss'])}"]
    if bench.get("error"):
        parts.append(f"benchmark FAILED after training ({bench['error']}); weights saved")
    elif bench:
        label = f"{bench['name']} {bench['scoring'][0]}" if bench.get("scoring") else bench["name"]
        acc = f"{label} accuracy {fmt(bench.get('accuracy_before'))} -> {fmt(bench['accuracy'])}" \
            if bench.get("accuracy_before") is not None else f"{label} accuracy {fmt(bench['accuracy'])}"
        for name, numbers in list((bench.get("by_scoring") or {}).items())[1:]:  # eval.scoring's others
            acc += f", {name} {fmt(numbers['accuracy'])}"
        parts.append(f"{acc} ({bench['n_examples']} questions)")
    parts.append(f"{results['train']['tokens_per_s']:.0f} tokens/s")
    return f"[cola_train] {run_name_from(results)}: " + "; ".join(parts) + f"; results in {out / 'results.json'}"


def run_name_from(results: dict) -> str:
    c = results["config"]
    return f"{c['method']['name']} on {c['data']['domain']} ({c['model']['name']}, {results['n_train_samples']} samples, seed {c['seed']})"


def _last_checkpoint(out: Path) -> str | None:
    """The newest checkpoint that was completely written (see CheckpointCompleteMarker) and
    loads; a checkpoint cut short by a kill is ignored, a corrupt one is named and skipped."""
    from .checkpoints import last_usable_checkpoint

    return last_usable_checkpoint(out / "checkpoints")
