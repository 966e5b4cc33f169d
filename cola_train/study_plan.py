"""The paper-protocol study (issue #27) as a list of single runs: which runs exist, which are done,
which wait on others, and what they will cost. scripts/study.py runs them; verdict.py reads them.

Why a plan of single runs and not Hydra multiruns: the study has dependencies a sweep cannot say.
Each method's lr is chosen on the validation loss of its seed-1 runs (the lr sweep), and only then
do the other seeds run at that lr; MoLE's gate needs the study's own LoRA runs as its experts; the
(num_A, num_B) grid runs at the grid method's chosen lr. So every run has a fixed directory that
names it, and the plan is recomputed from what is on disk each time: a finished run
(results.json status "completed") is never run again, a run whose dependency is missing is
"blocked" with the reason, and the same command always goes on where the last one stopped.

Layout: <root>/<domain>/<arm>/n<size>/lr<lr>/s<seed>/ (a Hydra run dir: .hydra/, results.json).
An *arm* is a method as the study runs it (e.g. cola_heuristic with init=pissa_split is the arm
cola_heuristic_split). Nothing here imports torch: --plan runs in a second.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"
SINGLE_DOMAINS = ("math", "medicine", "finance")
MULTITASK = "multitask"
DEFAULT_SIZES = (100, 1000)
DEFAULT_SEEDS = (42, 43, 44)          # the first three of cola_paper's 42-46
GRID = tuple((a, b) for a in (1, 2, 3) for b in (1, 2, 3))
STAGES = ("sweep", "final", "grid")
# what every run gets: both scorings (docs/EVALUATION.md), resume in place, medicine's iCliniq
# is not in the data root (GenMedGPT-5k alone, as in docs/RESULTS.md)
COMMON = ["eval.scoring=[letter,cloze]", "trainer.resume=true", "data.skip_missing=true"]


@dataclass(frozen=True)
class Arm:
    """A method as the study runs it: its overrides and the claim rows it appears in."""
    name: str
    overrides: tuple[str, ...]
    experiment: str = "cola_paper"
    method: str = ""                   # conf/method/<method>.yaml that must exist
    needs_experts: bool = False        # MoLE as published: the study's LoRA runs are its experts

    def __post_init__(self):
        if not self.method:
            object.__setattr__(self, "method", next(o.split("=", 1)[1] for o in self.overrides
                                                    if o.startswith("method=")))


# issue #27's methods on the single domains, in the order the tables list them
ARMS = {a.name: a for a in [
    Arm("lora", ("method=lora",)),
    Arm("pissa", ("method=pissa",)),
    Arm("pissa_collapsed", ("method=pissa_collapsed",)),       # the lr-matched control of cola_fully(2, 3)
    Arm("cola_fully", ("method=cola_fully",)),
    Arm("cola_heuristic", ("method=cola_heuristic",)),
    Arm("cola_random", ("method=cola_random",)),
    Arm("cola_heuristic_split", ("method=cola_heuristic", "method.init=pissa_split")),  # symmetry-breaking init
    Arm("hydralora", ("method=hydralora",)),
    Arm("mole", ("method=mole", "method.init=lora"), needs_experts=True),
    Arm("mola", ("method=mola",)),
    Arm("moelora", ("method=moelora",)),
    Arm("fft", ("method=fft",)),
    Arm("chain_of_lora", ("method=chain_of_lora",)),
]}
# the BBH table's rows (docs/PROTOCOL.md, "The multi-task setup")
MULTITASK_ARMS = {a.name: a for a in [
    Arm("lora_r64", ("method=lora",), experiment="cola_paper_multitask_lora"),
    Arm("hydralora_1x14", ("method=hydralora",), experiment="cola_paper_multitask_hydralora"),
    Arm("cola_1x14", ("method=cola_fully",), experiment="cola_paper_multitask_cola"),
    Arm("cola_t_4x10", ("method=cola_fully",), experiment="cola_paper_multitask_cola_t"),
    Arm("moelora", ("method=moelora",), experiment="cola_paper_multitask"),
    Arm("mola", ("method=mola",), experiment="cola_paper_multitask"),
]}
KEY_ARMS = ("lora", "pissa", "pissa_collapsed", "cola_fully", "cola_heuristic", "cola_heuristic_split")


def sweep_lrs() -> list[str]:
    """The lr grid of conf/experiment/lr_sweep.yaml (one source for the preset and the study)."""
    from omegaconf import OmegaConf

    params = OmegaConf.load(CONF / "experiment" / "lr_sweep.yaml").hydra.sweeper.params
    return [lr_text(v) for v in str(params["trainer.lr"]).split(",")]


def lr_text(value) -> str:
    """One spelling per lr (5e-5, 5.0e-05 and 0.00005 are one dir)."""
    return f"{float(value):g}"


def preset_overrides(name: str, drop: tuple[str, ...] = ("method", "hydra", "seed", "defaults")) -> list[str]:
    """The preset's values as command-line overrides, less `drop`'s sections. method=fft cannot take
    experiment=cola_paper (the preset sets method.r, which FFT's schema has not): FFT runs the
    preset's data/trainer/eval values from the file itself, so they cannot drift apart."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"))
    out = []

    def walk(node, prefix):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".")
            else:
                out.append(f"{path}={'null' if value is None else value}")
    walk({k: v for k, v in cfg.items() if k not in drop}, "")
    return out


def method_missing(arm: Arm) -> str | None:
    if not (CONF / "method" / f"{arm.method}.yaml").is_file():
        return f"method {arm.method!r} is unknown in this checkout (no conf/method/{arm.method}.yaml)"
    return None


def data_missing(domain: str, root: Path | None) -> str | None:
    """Why a domain cannot train here (no source file of it under the data root), or None."""
    from omegaconf import OmegaConf

    path = CONF / "data" / f"{domain}.yaml"
    if not path.is_file():
        return f"no conf/data/{domain}.yaml"
    sources = OmegaConf.load(path).get("sources") or []
    if root is None:
        return "no data root (data.root= or $COLA_DATA_ROOT)"
    here = [s for s in sources if s.get("file") and (Path(root) / s["file"]).is_file()]
    if not here:
        files = ", ".join(str(s.get("file")) for s in sources)
        return f"its training data ({files}) is not in the data root {root}"
    return None


# ---- what is on disk ------------------------------------------------------------------------

def run_dir(root: Path, domain: str, arm: str, size: int, lr: str, seed: int) -> Path:
    return Path(root) / domain / arm / f"n{size}" / f"lr{lr_text(lr)}" / f"s{seed}"


def read_status(path: Path) -> tuple[str, dict | None]:
    """'completed', 'diverged' (the loss went non-finite: final, never re-run, never the best lr),
    or 'todo' (absent, preempted, failed otherwise: the runner runs it, resuming if it can)."""
    try:
        results = json.loads((Path(path) / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "todo", None
    if not isinstance(results, dict):
        return "todo", None
    if results.get("status") == "completed":
        return "completed", results
    if results.get("status") == "failed" and "loss became" in str(results.get("error") or ""):
        return "diverged", results
    return "todo", results


def eval_loss(results: dict | None) -> float | None:
    value = ((results or {}).get("eval") or {}).get("loss")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def pick_lr(root: Path, domain: str, arm: str, size: int, lrs: list[str], seed: int) -> dict:
    """The lr a cell is compared at: the lowest VALIDATION loss (eval.loss, the 10 % held out of
    the training pool) of its seed-`seed` runs, never the benchmark, which would tune on the test
    set. Only once every lr's run has ended (completed or diverged); a diverged lr is never
    picked. Returns {"lr": best or None, "tried": [(lr, loss, status)], "why": reason if None}."""
    tried = []
    for lr in lrs:
        status, results = read_status(run_dir(root, domain, arm, size, lr, seed))
        tried.append((lr_text(lr), eval_loss(results) if status == "completed" else None, status))
    waiting = [lr for lr, _, status in tried if status == "todo"]
    if waiting:
        return {"lr": None, "tried": tried, "why": f"lr sweep not finished ({len(tried) - len(waiting)}/"
                                                   f"{len(tried)} lrs done at seed {seed})"}
    scored = [(loss, float(lr), lr) for lr, loss, _ in tried if loss is not None]
    if not scored:
        return {"lr": None, "tried": tried, "why": "no lr of the sweep has a validation loss"}
    return {"lr": min(scored)[2], "tried": tried, "why": None}


# ---- the plan -------------------------------------------------------------------------------

@dataclass
class Job:
    stage: str
    domain: str
    arm: str
    size: int
    lr: str | None
    seed: int
    overrides: list[str] = field(default_factory=list)
    status: str = "todo"               # completed | diverged | todo | blocked | skipped
    why: str = ""
    dir: Path | None = None


@dataclass
class Study:
    root: Path
    domains: list[str]
    arms: list[str]
    sizes: list[int]
    seeds: list[int]
    lrs: list[str]
    data_root: Path | None = None
    grid_domain: str = "math"
    grid_method: str = "cola_heuristic"
    grid_sizes: list[int] = field(default_factory=lambda: [100])
    grid: tuple = GRID
    expert_domains: tuple = SINGLE_DOMAINS
    multitask_arms: list[str] = field(default_factory=lambda: list(MULTITASK_ARMS))


def arm_of(domain: str, name: str) -> Arm | None:
    if domain == MULTITASK:
        return MULTITASK_ARMS.get(name)
    if name.startswith("grid_"):
        return None
    return ARMS.get(name)


def grid_arm(method: str, a: int, b: int) -> Arm:
    return Arm(f"grid_{method}_A{a}B{b}", (f"method={method}", f"method.num_A={a}", f"method.num_B={b}"))


def arms_for(study: Study, domain: str) -> list[Arm]:
    if domain == MULTITASK:
        return [MULTITASK_ARMS[n] for n in study.multitask_arms]
    return [ARMS[n] for n in study.arms]


def job_overrides(study: Study, arm: Arm, domain: str, size: int, lr: str, seed: int, path: Path,
                  experts: list[Path] | None = None) -> list[str]:
    from .compose import hydra_quote

    if arm.method == "fft":   # see preset_overrides
        base = preset_overrides(arm.experiment)
    else:
        base = [f"experiment={arm.experiment}"]
    out = [*base, *arm.overrides, f"data={domain}", f"data.max_samples={size}", f"seed={seed}",
           f"trainer.lr={lr_text(lr)}", *COMMON]
    if experts is not None:
        k = len(experts)
        out += [f"method.num_A={k}", f"method.num_B={k}",
                f"method.expert_paths=[{','.join(hydra_quote(str(p / 'adapter')) for p in experts)}]"]
    return out + [f"output_dir={hydra_quote(str(path))}", f"hydra.run.dir={hydra_quote(str(path))}"]


def _experts(study: Study, size: int, seed: int) -> tuple[list[Path] | None, str]:
    """MoLE's experts: the study's own LoRA run of each expert domain at this size and seed, at
    LoRA's chosen lr there. None (and why) until they have all completed with an adapter."""
    paths = []
    for d in study.expert_domains:
        pick = pick_lr(study.root, d, "lora", size, study.lrs, study.seeds[0])
        if pick["lr"] is None:
            return None, f"needs the lora runs of {d} n={size} as experts: {pick['why']}"
        path = run_dir(study.root, d, "lora", size, pick["lr"], seed)
        if read_status(path)[0] != "completed" or not (path / "adapter" / "adapter_config.json").is_file():
            return None, f"needs its expert {path} (lora, {d}, seed {seed}) completed with an adapter"
        paths.append(path)
    return paths, ""


def plan(study: Study, stages=STAGES) -> list[Job]:
    """Every run of the asked stages with its status (see Job.status)."""
    jobs: list[Job] = []
    for domain in study.domains:
        missing_data = data_missing(domain, study.data_root)
        for arm in arms_for(study, domain):
            why = f"{domain}: {missing_data}" if missing_data else method_missing(arm)
            skip = f"skipped: {why}" if why else None
            for size in study.sizes:
                if "sweep" in stages:
                    for lr in study.lrs:
                        jobs.append(_job(study, "sweep", arm, domain, size, lr, study.seeds[0], skip))
                if "final" in stages:
                    if skip:
                        jobs += [Job("final", domain, arm.name, size, None, s, status="skipped", why=skip)
                                 for s in study.seeds[1:]]
                        continue
                    pick = pick_lr(study.root, domain, arm.name, size, study.lrs, study.seeds[0])
                    for seed in study.seeds[1:]:
                        if pick["lr"] is None:
                            jobs.append(Job("final", domain, arm.name, size, None, seed, status="blocked",
                                            why=pick["why"]))
                        else:
                            jobs.append(_job(study, "final", arm, domain, size, pick["lr"], seed, None))
    if "grid" in stages and study.grid_domain in study.domains:
        domain = study.grid_domain
        for size in study.grid_sizes:
            pick = pick_lr(study.root, domain, study.grid_method, size, study.lrs, study.seeds[0])
            for a, b in study.grid:
                arm = grid_arm(study.grid_method, a, b)
                for seed in study.seeds:
                    if pick["lr"] is None:
                        absent = "" if study.grid_method in study.arms else \
                            f" ({study.grid_method} is not among the arms: add it, its sweep picks the lr)"
                        jobs.append(Job("grid", domain, arm.name, size, None, seed, status="blocked",
                                        why=f"needs {study.grid_method}'s lr at {domain} n={size}: {pick['why']}{absent}"))
                    else:
                        jobs.append(_job(study, "grid", arm, domain, size, pick["lr"], seed, None))
    return jobs


def _job(study: Study, stage: str, arm: Arm, domain: str, size: int, lr: str, seed: int, skip) -> Job:
    path = run_dir(study.root, domain, arm.name, size, lr, seed)
    job = Job(stage, domain, arm.name, size, lr_text(lr), seed, dir=path)
    if skip:
        job.status, job.why = "skipped", skip
        return job
    job.status = read_status(path)[0]
    if job.status != "todo":
        return job
    experts = None
    if arm.needs_experts:
        experts, why = _experts(study, size, seed)
        if experts is None:
            job.status, job.why = "blocked", why
            return job
    job.overrides = job_overrides(study, arm, domain, size, lr, seed, path, experts)
    return job


# ---- what it costs --------------------------------------------------------------------------

# Per-run wall seconds with 9 runs sharing one H200 (docs/RESULTS.md, fp32 master weights, bf16
# mixed): 54 runs of 100 samples in 6.4 min (call 1: 64 s a run), 3.6-4.5 min for a 1,000-sample
# run (240 s). Those ran batch 16 and letter scoring; the protocol's batch 8 x 8 trains the same
# tokens (5 epochs), cloze scoring adds a benchmark pass: measure with --cost-from after a pilot.
DEFAULT_COST = {"fixed_s": 44.4, "per_sample_s": 0.1956, "parallel": 9, "source": "docs/RESULTS.md timings"}


STARTUP_S = 10.0   # a run's process start and imports, before its first timed phase


def measure_cost(dirs: list[Path], parallel: int) -> dict:
    """Per-run wall time = fixed + per_sample x training samples, from completed runs' results.json
    timings (the phases' seconds: "training" scales with the samples, the rest is fixed), run with
    `parallel` runs sharing the GPU; STARTUP_S is added for the process start the phases miss."""
    fixed, per_sample, n = [], [], 0
    for d in dirs:
        for path in Path(d).rglob("results.json"):
            status, results = read_status(path.parent)
            timings = (results or {}).get("timings") or {}
            samples = (results or {}).get("n_train_samples")
            if status != "completed" or not isinstance(samples, int) or samples <= 0:
                continue
            # the named phases ("model load (<model>)", "training", "benchmark", ...); the step
            # timer's keys (step_s_median, mfu, ...) are no durations of the run and have no space
            phases = {k: v for k, v in timings.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                      and (" " in k or k in ("training", "benchmark"))}
            train = float(phases.get("training", 0.0))
            fixed.append(STARTUP_S + sum(phases.values()) - train)
            per_sample.append(train / samples)
            n += 1
    if not n:
        raise ValueError(f"no completed run with timings under {', '.join(map(str, dirs))}")
    return {"fixed_s": sum(fixed) / n, "per_sample_s": sum(per_sample) / n, "parallel": parallel,
            "source": f"{n} completed run(s) under {', '.join(map(str, dirs))}"}


def cost_from_points(points: dict[int, float], parallel: int) -> dict:
    """The cost model through measured (samples -> wall seconds a run) points: the line through
    them (least squares for more than two); one point is a cost that does not grow with size."""
    sizes = sorted(points)
    if len(sizes) == 1:
        return {"fixed_s": points[sizes[0]], "per_sample_s": 0.0, "parallel": parallel, "source": "--run-seconds"}
    mx = sum(sizes) / len(sizes)
    my = sum(points[n] for n in sizes) / len(sizes)
    slope = sum((n - mx) * (points[n] - my) for n in sizes) / sum((n - mx) ** 2 for n in sizes)
    return {"fixed_s": my - slope * mx, "per_sample_s": slope, "parallel": parallel, "source": "--run-seconds"}


def run_seconds(cost: dict, size: int) -> float:
    return cost["fixed_s"] + cost["per_sample_s"] * size


def estimate(jobs: list[Job], cost: dict) -> dict:
    """Per stage: runs in all, done, to run now, blocked (they run once what they wait on has),
    skipped; GPU wall time for the ones not done (runnable and blocked), as cost's concurrency
    runs them: sum of per-run wall / parallel."""
    out: dict[str, dict] = {}
    for job in jobs:
        row = out.setdefault(job.stage, {"runs": 0, "done": 0, "todo": 0, "blocked": 0, "skipped": 0, "gpu_s": 0.0})
        row["runs"] += 1
        key = "done" if job.status in ("completed", "diverged") else job.status
        row[key] += 1
        if key in ("todo", "blocked"):
            row["gpu_s"] += run_seconds(cost, job.size) / cost["parallel"]
    return out


def plan_text(jobs: list[Job], cost: dict) -> str:
    est = estimate(jobs, cost)
    lines = [f"{'stage':<7} {'runs':>5} {'done':>5} {'to run':>6} {'blocked':>7} {'skipped':>7} {'GPU min':>8}"]
    total = 0.0
    for stage in STAGES:
        if stage in est:
            r = est[stage]
            total += r["gpu_s"]
            lines.append(f"{stage:<7} {r['runs']:>5} {r['done']:>5} {r['todo']:>6} {r['blocked']:>7} "
                         f"{r['skipped']:>7} {r['gpu_s'] / 60:>8.1f}")
    lines.append(f"estimated GPU time for the runs not done: {total / 60:.1f} min on one GPU "
                 f"({cost['parallel']} runs at a time; per run {cost['fixed_s']:.0f} s + "
                 f"{cost['per_sample_s']:.3f} s x samples; cost from {cost['source']})")
    reasons: dict[str, dict] = {}   # one line per reason, naming the cells it holds back
    for job in jobs:
        if job.status in ("skipped", "blocked"):
            why = job.why.removeprefix("skipped: ").replace(f"{job.domain}: ", "", 1)
            entry = reasons.setdefault(f"{job.status}: {why}", {"cells": {}, "runs": 0})
            entry["cells"].setdefault(f"{job.domain}/{job.arm}", None)
            entry["runs"] += 1
    for why, entry in reasons.items():
        cells = list(entry["cells"])
        shown = ", ".join(cells[:6]) + (f" and {len(cells) - 6} more" if len(cells) > 6 else "")
        lines.append(f"  {why} ({entry['runs']} run(s): {shown})")
    return "\n".join(lines)
